//! `create`, `apply` and `replace -f FILE`.

use anyhow::{Result, bail};
use margay_datastore::{Client, WriteMode};

use super::{parse_kind, summary};
use crate::cli::WriteArgs;
use margayctl::input::read_manifests;

#[derive(Clone, Copy, Debug)]
pub enum Verb {
    Create,
    Apply,
    Replace,
}

pub async fn run(
    client: &Client,
    args: WriteArgs,
    namespace: Option<&str>,
    verb: Verb,
) -> Result<()> {
    let manifests = read_manifests(&args.filename)?;
    // `margayctl replace felixconfiguration default -f f.yaml`: the file must hold exactly that.
    if let [kind, name] = args.target.as_slice() {
        let kind = parse_kind(kind)?;
        for m in &manifests {
            let (file_kind, file_name) = (
                m["kind"].as_str().unwrap_or_default(),
                m["metadata"]["name"].as_str().unwrap_or_default(),
            );
            if file_kind != kind.as_str() || file_name != name {
                bail!(
                    "the file holds {file_kind} {file_name:?}, but the command line names {kind} {name:?}"
                );
            }
        }
    } else if !args.target.is_empty() {
        bail!("name both the kind and the name on the command line, or neither");
    }
    let (mode, past) = match verb {
        Verb::Create => (WriteMode::Create, "created"),
        Verb::Apply => (WriteMode::Apply, "applied"),
        Verb::Replace => (WriteMode::Replace, "replaced"),
    };
    let stored = client
        .write(manifests, namespace.unwrap_or("default"), mode)
        .await?;
    let kinds: Vec<_> = stored.iter().map(|s| s.key.kind).collect();
    margayctl::outln!("{}", summary(past, &kinds, true));
    Ok(())
}
