//! `get KIND [NAME...] [-o FORMAT] [-n NS | -A]`.

use std::io::Write;

use anyhow::Result;
use margay_datastore::{Client, Key};

use super::{namespace_for, parse_kind};
use crate::cli::GetArgs;
use margayctl::output::{Format, render};

pub async fn run(client: &Client, args: GetArgs, namespace: Option<&str>) -> Result<()> {
    let kind = parse_kind(&args.kind)?;
    let format = Format::parse(&args.output)?;
    let ns = if args.all_namespaces {
        None
    } else {
        namespace_for(kind, namespace)
    };
    let (items, revision) = if args.names.is_empty() {
        let listing = client.list(kind, ns.as_deref()).await?;
        (listing.items, listing.revision)
    } else {
        let mut items = Vec::new();
        for name in &args.names {
            items.push(client.get(&Key::new(kind, ns.as_deref(), name)).await?);
        }
        let revision = client.store().revision().await?;
        (items, revision)
    };
    let text = render(
        kind,
        &items,
        args.names.len() == 1,
        revision,
        &format,
        args.all_namespaces,
    )?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    Ok(())
}
