//! `node status [NODE]`: what each node's agent reports about its dataplane, from the Node
//! resources (agents write `status.dataplane` when it changes and refresh it every minute).

use anyhow::{Result, bail};
use margay_api::Kind;
use margay_datastore::{Client, Key};
use serde_json::{Value, json};

use crate::cli::NodeCommand;

pub async fn run(client: &Client, command: NodeCommand) -> Result<()> {
    let NodeCommand::Status { node, output } = command;
    let nodes: Vec<Value> = match &node {
        Some(name) => vec![client.get(&Key::new(Kind::Node, None, name)).await?.value],
        None => client
            .list(Kind::Node, None)
            .await?
            .items
            .into_iter()
            .map(|s| s.value)
            .collect(),
    };
    if nodes.is_empty() {
        bail!("no Node is registered yet: is margay-node running on the nodes?");
    }
    let rows: Vec<Value> = nodes
        .iter()
        .map(|n| {
            let dp = &n["status"]["dataplane"];
            json!({
                "name": n["metadata"]["name"],
                "requested": dp["requested"],
                "active": dp["active"],
                "lastSyncTime": dp["lastSyncTime"],
                "lastSyncDurationMs": dp["lastSyncDurationMs"],
                "message": dp["message"],
                "podCIDRs": n["status"]["podCIDRs"],
                "wireguardPublicKey": n["status"]["wireguardPublicKey"],
                "wireguardDevice": dp["wireguardDevice"],
                "agentVersion": dp["agentVersion"],
            })
        })
        .collect();
    match output.as_str() {
        "json" => margayctl::outln!("{}", serde_json::to_string_pretty(&rows)?),
        "ps" | "" => {
            let text = |v: &Value| match v {
                Value::Null => "-".to_owned(),
                Value::String(s) => s.clone(),
                Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().unwrap_or_default().to_owned())
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            let mut table = vec![vec![
                "NAME".to_owned(),
                "REQUESTED".to_owned(),
                "ACTIVE".to_owned(),
                "LAST-SYNC".to_owned(),
                "SYNC-MS".to_owned(),
                "POD-CIDRS".to_owned(),
                "WIREGUARD".to_owned(),
                "MESSAGE".to_owned(),
            ]];
            for r in &rows {
                table.push(vec![
                    text(&r["name"]),
                    text(&r["requested"]),
                    text(&r["active"]),
                    text(&r["lastSyncTime"]),
                    text(&r["lastSyncDurationMs"]),
                    text(&r["podCIDRs"]),
                    wireguard_column(&r["wireguardPublicKey"], &r["wireguardDevice"]),
                    text(&r["message"]),
                ]);
            }
            let widths: Vec<usize> = (0..table[0].len())
                .map(|c| table.iter().map(|r| r[c].len()).max().unwrap_or(0))
                .collect();
            for r in table {
                let line: Vec<String> = r
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                    .collect();
                margayctl::outln!("{}", line.join("   ").trim_end());
            }
        }
        other => bail!("unknown output format {other:?}; use ps or json"),
    }
    Ok(())
}

/// `off`, or `on` with the implementation (`kernel`, `userspace`) when the agent reports one.
fn wireguard_column(key: &Value, device: &Value) -> String {
    if !key.is_string() {
        return "off".to_owned();
    }
    match device.as_str().and_then(|d| d.split_whitespace().next()) {
        Some(implementation) => format!("on ({implementation})"),
        None => "on".to_owned(),
    }
}
