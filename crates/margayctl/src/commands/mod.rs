//! One file per verb; `run` opens the datastore and dispatches.

mod bpf;
mod delete;
mod get;
mod label;
mod node;
mod patch;
mod version;
mod write;

use anyhow::{Context, Result};
use margay_api::Kind;
use margay_datastore::Client;

use crate::cli::{Cli, Command};

pub async fn run(cli: Cli) -> Result<()> {
    // The BPF dumps read pinned maps, and open the datastore only for `--node`.
    if let Command::Bpf(command) = cli.command {
        return bpf::run(cli.datastore.as_deref(), command).await;
    }
    let client = open_client(cli.datastore.as_deref()).await?;
    let namespace = cli.namespace.as_deref();
    match cli.command {
        Command::Create(args) => write::run(&client, args, namespace, write::Verb::Create).await,
        Command::Apply(args) => write::run(&client, args, namespace, write::Verb::Apply).await,
        Command::Replace(args) => write::run(&client, args, namespace, write::Verb::Replace).await,
        Command::Delete(args) => delete::run(&client, args, namespace).await,
        Command::Get(args) => get::run(&client, args, namespace).await,
        Command::Patch(args) => patch::run(&client, args, namespace).await,
        Command::Label(args) => label::run(&client, args, namespace).await,
        Command::Version => version::run(&client).await,
        Command::Node(command) => node::run(&client, command).await,
        Command::Bpf(command) => bpf::run(cli.datastore.as_deref(), command).await,
    }
}

/// Opens the datastore: --datastore / MARGAY_DATASTORE, else calicoctl's DATASTORE_TYPE=etcdv3
/// + ETCD_ENDPOINTS, else the local SQLite file.
pub async fn open_client(datastore: Option<&str>) -> Result<Client> {
    let url = margay_datastore::open::datastore_url(datastore)?;
    let store = margay_datastore::open(&url)
        .await
        .with_context(|| format!("cannot open the datastore {url}"))?;
    let client = Client::new(store);
    client.bootstrap().await?;
    Ok(client)
}

/// Parses a kind as typed on the command line.
pub fn parse_kind(text: &str) -> Result<Kind> {
    text.parse::<Kind>().map_err(anyhow::Error::msg)
}

/// The namespace a namespaced kind's object is looked up in: `-n`, else `default`.
pub fn namespace_for(kind: Kind, namespace: Option<&str>) -> Option<String> {
    kind.is_namespaced()
        .then(|| namespace.unwrap_or("default").to_owned())
}

/// calicoctl's summary: `'FelixConfiguration' resource(s)` when all share a kind.
pub fn summary(verb: &str, kinds: &[Kind], plural_suffix: bool) -> String {
    let count = kinds.len();
    let noun = if plural_suffix {
        "resource(s)"
    } else {
        "resource"
    };
    match kinds.first() {
        Some(first) if kinds.iter().all(|k| k == first) => {
            format!("Successfully {verb} {count} '{first}' {noun}")
        }
        _ => format!("Successfully {verb} {count} {noun}"),
    }
}
