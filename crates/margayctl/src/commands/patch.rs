//! `patch KIND NAME -p PATCH [--type strategic|merge|json]`.

use anyhow::Result;
use margay_api::patch::PatchType;
use margay_datastore::{Client, Key};

use super::{namespace_for, parse_kind, summary};
use crate::cli::PatchArgs;

pub async fn run(client: &Client, args: PatchArgs, namespace: Option<&str>) -> Result<()> {
    let kind = parse_kind(&args.kind)?;
    let patch_type: PatchType = args.patch_type.parse().map_err(anyhow::Error::msg)?;
    let key = Key::new(kind, namespace_for(kind, namespace).as_deref(), &args.name);
    client.patch(&key, &args.patch, patch_type).await?;
    margayctl::outln!("{}", summary("patched", &[kind], false));
    Ok(())
}
