//! `label KIND NAME key=value... [--overwrite]`, `label KIND NAME key --remove`, and kubectl's
//! `key-` to remove.

use anyhow::{Result, bail};
use margay_api::names::check_label_key;
use margay_datastore::{Client, ClientError, Key};
use serde_json::Value;

use super::{namespace_for, parse_kind};
use crate::cli::LabelArgs;

enum Change {
    Set(String, String),
    Remove(String),
}

pub async fn run(client: &Client, args: LabelArgs, namespace: Option<&str>) -> Result<()> {
    let kind = parse_kind(&args.kind)?;
    let mut changes = Vec::new();
    for label in &args.labels {
        let change = match label.split_once('=') {
            Some(_) if args.remove => bail!("--remove takes a key, not {label:?}"),
            Some((k, v)) => Change::Set(k.to_owned(), v.to_owned()),
            None if args.remove => Change::Remove(label.clone()),
            None => match label.strip_suffix('-') {
                Some(k) => Change::Remove(k.to_owned()),
                None => bail!("{label:?} is not key=value (or key- to remove it)"),
            },
        };
        let key = match &change {
            Change::Set(k, _) | Change::Remove(k) => k,
        };
        check_label_key("label", key).map_err(|e| anyhow::anyhow!("{e}"))?;
        changes.push(change);
    }
    let key = Key::new(kind, namespace_for(kind, namespace).as_deref(), &args.name);
    let overwrite = args.overwrite;
    client
        .modify(&key, |current| {
            let mut next = current.clone();
            let labels = next["metadata"]
                .as_object_mut()
                .map(|m| m.entry("labels").or_insert_with(|| Value::Object(Default::default())));
            let Some(Value::Object(labels)) = labels else {
                return Err(ClientError::Refused("the object has no metadata".into()));
            };
            for change in &changes {
                match change {
                    Change::Set(k, v) => {
                        if let Some(old) = labels.get(k).and_then(Value::as_str)
                            && old != v && !overwrite {
                                return Err(ClientError::Refused(format!(
                                    "label {k:?} already has value {old:?}; use --overwrite to change it"
                                )));
                            }
                        labels.insert(k.clone(), v.clone().into());
                    }
                    Change::Remove(k) => {
                        if labels.remove(k).is_none() {
                            return Err(ClientError::Refused(format!(
                                "label {k:?} is not set on {key}"
                            )));
                        }
                    }
                }
            }
            Ok(next)
        })
        .await?;
    for change in &changes {
        match change {
            Change::Set(k, _) => margayctl::outln!(
                "Successfully set label {k} on {} {}",
                kind.plural(),
                args.name
            ),
            Change::Remove(k) => {
                margayctl::outln!(
                    "Successfully removed label {k} from {} {}",
                    kind.plural(),
                    args.name
                )
            }
        }
    }
    Ok(())
}
