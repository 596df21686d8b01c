//! `delete -f FILE` and `delete KIND NAME...`.

use anyhow::{Result, bail};
use margay_api::Kind;
use margay_datastore::{Client, Key};

use super::{namespace_for, parse_kind, summary};
use crate::cli::DeleteArgs;
use margayctl::input::read_manifests;

pub async fn run(client: &Client, args: DeleteArgs, namespace: Option<&str>) -> Result<()> {
    let mut keys = Vec::new();
    if let Some(file) = &args.filename {
        // Only identity is needed to delete: a manifest from an older version still names its object.
        for m in read_manifests(file)? {
            let kind = Kind::from_manifest(
                m["apiVersion"].as_str().unwrap_or_default(),
                m["kind"].as_str().unwrap_or_default(),
            )
            .map_err(anyhow::Error::msg)?;
            let Some(name) = m["metadata"]["name"].as_str() else {
                bail!("a {kind} in the file has no metadata.name");
            };
            let ns = m["metadata"]["namespace"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| namespace_for(kind, namespace));
            let pinned = m["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|rv| rv.parse().ok());
            keys.push((Key::new(kind, ns.as_deref(), name), pinned));
        }
    } else {
        let [kind, names @ ..] = args.target.as_slice() else {
            bail!("name what to delete: margayctl delete KIND NAME..., or -f FILE");
        };
        if names.is_empty() {
            bail!("name the {kind} to delete: margayctl delete {kind} NAME");
        }
        let kind = parse_kind(kind)?;
        let ns = namespace_for(kind, namespace);
        for name in names {
            keys.push((Key::new(kind, ns.as_deref(), name), None));
        }
    }
    let deleted = client.delete(keys, args.skip_not_exists).await?;
    let kinds: Vec<_> = deleted.iter().map(|s| s.key.kind).collect();
    margayctl::outln!("{}", summary("deleted", &kinds, true));
    Ok(())
}
