//! Where a new Pod runs: on `spec.nodeName` when set, otherwise on the node with the fewest Pods
//! (ties by name), spreading replicas as the default scheduler's balance does.

use std::collections::BTreeMap;

/// Picks a node for a Pod. `pods_per_node` counts the Pods each schedulable node runs.
pub fn choose_node(
    requested: Option<&str>,
    pods_per_node: &BTreeMap<String, usize>,
) -> Option<String> {
    if let Some(node) = requested {
        return pods_per_node.contains_key(node).then(|| node.to_owned());
    }
    pods_per_node
        .iter()
        .min_by_key(|(name, count)| (**count, (*name).clone()))
        .map(|(name, _)| name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_and_honours_node_name() {
        let mut counts: BTreeMap<String, usize> = [
            ("node-1".into(), 2),
            ("node-2".into(), 0),
            ("node-3".into(), 0),
        ]
        .into();
        assert_eq!(choose_node(None, &counts).as_deref(), Some("node-2"));
        counts.insert("node-2".into(), 1);
        assert_eq!(choose_node(None, &counts).as_deref(), Some("node-3"));
        assert_eq!(
            choose_node(Some("node-1"), &counts).as_deref(),
            Some("node-1")
        );
        assert_eq!(choose_node(Some("node-9"), &counts), None);
        assert_eq!(choose_node(None, &BTreeMap::new()), None);
    }
}
