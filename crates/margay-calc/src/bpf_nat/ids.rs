//! Service ids: derived from the name, sticky across recalculations and agent restarts.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sha2::{Digest, Sha256};

use super::{BackendKey, NatModel, NatService};

/// The id a new service port starts from: the first 32 bits (big endian) of SHA-256 of its name;
/// 0 is reserved (conntrack entries of non-NAT flows carry svc_id 0), so it becomes 1.
pub fn service_id_hash(name: &str) -> u32 {
    let digest = Sha256::digest(name.as_bytes());
    let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    id.max(1)
}

/// Gives every backend list an id and builds the model, keeping the ids `previous` uses:
///
/// 1. a name `previous` knows keeps its id;
/// 2. otherwise, when `previous` does not name the id one of the list's frontends carries (a
///    model read back from the maps by a restarted agent has no names), that id is adopted: the
///    first frontend (the ClusterIP) is tried for every list before any other frontend is;
/// 3. otherwise the name's hash, or the next value up (wrapping, skipping 0) that is neither
///    taken in this model nor used anywhere in `previous`: an id whose entries are still in the
///    maps is never handed to someone else in the same sync.
///
/// Lists are taken in name order at every step, so the result depends only on the inputs. Two
/// lists claiming one frontend: the first in name order keeps it, the conflict is recorded.
pub fn assign_ids(services: Vec<NatService>, previous: &NatModel) -> NatModel {
    let n = services.len();
    let mut ids: Vec<Option<u32>> = vec![None; n];
    let mut taken: BTreeSet<u32> = BTreeSet::new();

    // 1. By name.
    let by_name: HashMap<&str, u32> = previous
        .services
        .iter()
        .map(|(id, name)| (name.as_str(), *id))
        .collect();
    for (i, svc) in services.iter().enumerate() {
        if let Some(&id) = by_name.get(svc.name.as_str())
            && taken.insert(id)
        {
            ids[i] = Some(id);
        }
    }

    // 2. Adoption through frontends, for ids `previous` does not name.
    let mut adopt = |first_only: bool, ids: &mut Vec<Option<u32>>| {
        for (i, svc) in services.iter().enumerate() {
            if ids[i].is_some() {
                continue;
            }
            let candidates = svc
                .frontends
                .iter()
                .take(if first_only { 1 } else { usize::MAX });
            for (key, _) in candidates {
                let Some(v) = previous.frontends.get(key) else {
                    continue;
                };
                if previous.services.contains_key(&v.svc_id) || taken.contains(&v.svc_id) {
                    continue;
                }
                taken.insert(v.svc_id);
                ids[i] = Some(v.svc_id);
                break;
            }
        }
    };
    adopt(true, &mut ids);
    adopt(false, &mut ids);

    // 3. New ids.
    let reserved = previous.ids();
    for (i, svc) in services.iter().enumerate() {
        if ids[i].is_some() {
            continue;
        }
        let mut id = service_id_hash(&svc.name);
        while id == 0 || taken.contains(&id) || reserved.contains(&id) {
            id = id.wrapping_add(1);
        }
        taken.insert(id);
        ids[i] = Some(id);
    }

    build(services, &ids)
}

fn build(services: Vec<NatService>, ids: &[Option<u32>]) -> NatModel {
    let mut model = NatModel::default();
    let mut owner: BTreeMap<super::FrontendKey, String> = BTreeMap::new();
    for (svc, id) in services.into_iter().zip(ids) {
        let Some(id) = *id else { continue };
        for (key, flags) in &svc.frontends {
            if let Some(first) = owner.get(key) {
                model.conflicts.push(format!(
                    "{key}: kept by {first}, also wanted by {}",
                    svc.name
                ));
                continue;
            }
            owner.insert(*key, svc.name.clone());
            model.frontends.insert(*key, svc.value(id, *flags));
        }
        for (ordinal, backend) in (0u32..).zip(&svc.backends) {
            model.backends.insert(
                BackendKey {
                    svc_id: id,
                    ordinal,
                },
                *backend,
            );
        }
        model.services.insert(id, svc.name);
    }
    model
}

/// One-Service updates: the entries the lists named by `replaced` hold in `current` (`old`) and
/// the entries `lists` (their recalculation) should hold (`new`), ids kept by name as
/// [`assign_ids`] keeps them, new names hashed past every id `current` uses. `old.diff(&new)` is
/// then exactly what a full recalculation against `current` would write for these lists.
///
/// Refused (the caller recalculates everything) when the answer could depend on other lists:
/// `current` records a frontend conflict, or a new frontend belongs to a list not replaced, or
/// two new lists claim one frontend.
pub fn replace_lists(
    current: &NatModel,
    replaced: &dyn Fn(&str) -> bool,
    lists: Vec<NatService>,
) -> Result<(NatModel, NatModel), String> {
    if !current.conflicts.is_empty() {
        return Err("the maps' model records a frontend conflict".to_owned());
    }
    let mut old = NatModel::default();
    for (id, name) in &current.services {
        if replaced(name) {
            old.services.insert(*id, name.clone());
        }
    }
    for (key, value) in &current.frontends {
        if old.services.contains_key(&value.svc_id) {
            old.frontends.insert(*key, *value);
        }
    }
    for id in old.services.keys() {
        for (ordinal, backend) in current.backends_of(*id) {
            old.backends.insert(
                BackendKey {
                    svc_id: *id,
                    ordinal,
                },
                *backend,
            );
        }
    }

    let by_name: HashMap<&str, u32> = old
        .services
        .iter()
        .map(|(id, name)| (name.as_str(), *id))
        .collect();
    let mut taken: BTreeSet<u32> = BTreeSet::new();
    let mut ids: Vec<Option<u32>> = vec![None; lists.len()];
    for (i, list) in lists.iter().enumerate() {
        if let Some(&id) = by_name.get(list.name.as_str())
            && taken.insert(id)
        {
            ids[i] = Some(id);
        }
    }
    let in_use = |id: u32| {
        current.services.contains_key(&id)
            || current.backends_of(id).next().is_some()
            || current.frontends.values().any(|v| v.svc_id == id)
    };
    for (i, list) in lists.iter().enumerate() {
        if ids[i].is_some() {
            continue;
        }
        let mut id = service_id_hash(&list.name);
        while id == 0 || taken.contains(&id) || in_use(id) {
            id = id.wrapping_add(1);
        }
        taken.insert(id);
        ids[i] = Some(id);
    }
    let new = build(lists, &ids);
    if let Some(c) = new.conflicts.first() {
        return Err(format!("a frontend conflict among the updated lists: {c}"));
    }
    for key in new.frontends.keys() {
        if let Some(owner) = current.frontends.get(key)
            && !old.services.contains_key(&owner.svc_id)
        {
            return Err(format!(
                "{key} belongs to {} (id {}) as well",
                current
                    .services
                    .get(&owner.svc_id)
                    .map_or("another list", String::as_str),
                owner.svc_id
            ));
        }
    }
    Ok((old, new))
}
