//! The model as text: every map entry on one line, grouped by service id.
//!
//! ```text
//! service 0x1f2e3d4c default/web:http/tcp
//!   frontend 10.96.0.10:80/tcp -> count=2 local=1 flags=- affinity=0
//!   backend 0 10.244.1.5:8080 (local)
//!   backend 1 10.244.2.7:8080
//! ```
//!
//! Services are in name order (unnamed ids, as read back from the maps, last by id); frontends in
//! key order; backends by ordinal, those below the service's `local_count` marked `(local)`.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::{FrontendValue, NatModel, flags};

pub(super) fn value(v: &FrontendValue) -> String {
    format!(
        "count={} local={} flags={} affinity={}",
        v.count,
        v.local_count,
        flags::names(v.flags),
        v.affinity_timeout_s
    )
}

pub(super) fn dump(model: &NatModel) -> String {
    let ids = model.ids();
    let mut order: Vec<(Option<&str>, u32)> = ids
        .iter()
        .map(|id| (model.services.get(id).map(String::as_str), *id))
        .collect();
    // Named first (by name), then unnamed by id.
    order.sort_by(|a, b| match (a.0, b.0) {
        (Some(x), Some(y)) => x.cmp(y).then(a.1.cmp(&b.1)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.1.cmp(&b.1),
    });

    let mut out = String::new();
    for (name, id) in order {
        let _ = writeln!(out, "service {id:#010x} {}", name.unwrap_or("(unnamed)"));
        let mut local_counts = BTreeSet::new();
        for (k, v) in model.frontends.iter().filter(|(_, v)| v.svc_id == id) {
            local_counts.insert(v.local_count);
            let _ = writeln!(out, "  frontend {k} -> {}", value(v));
        }
        // Frontends of one list share their local count; mark by the largest if they differ.
        let local = local_counts.last().copied().unwrap_or(0);
        for (ordinal, b) in model.backends_of(id) {
            let mark = if ordinal < local { " (local)" } else { "" };
            let _ = writeln!(out, "  backend {ordinal} {b}{mark}");
        }
    }
    for c in &model.conflicts {
        let _ = writeln!(out, "conflict {c}");
    }
    if out.is_empty() {
        out.push_str("(empty)\n");
    }
    out
}
