//! `node status [NODE]`: what each node's agent reports about its dataplane, from the Node
//! resources (agents write `status.dataplane` when it changes, the map fill levels at most every
//! 10 s in BPF mode, and refresh it every minute), so it works from any machine that reaches the
//! datastore.
//!
//! Without NODE: one line per node. With NODE (or `-o wide` for every node): the whole report,
//! the preflight's checks, each program attachment and each map's fill level. `-o json|yaml`:
//! the report as data.

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
    let rows: Vec<Value> = nodes.iter().map(row).collect();
    match output.as_str() {
        "json" => margayctl::outln!("{}", serde_json::to_string_pretty(&rows)?),
        "yaml" => margayctl::out!("{}", serde_yaml_ng::to_string(&rows)?),
        "wide" => margayctl::out!("{}", details(&rows)),
        "ps" | "" if node.is_some() => margayctl::out!("{}", details(&rows)),
        "ps" | "" => margayctl::out!("{}", summary(&rows)),
        other => bail!("unknown output format {other:?}; use ps, wide, json or yaml"),
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

/// One node's report, flattened from its Node resource.
fn row(n: &Value) -> Value {
    let dp = &n["status"]["dataplane"];
    json!({
        "name": n["metadata"]["name"],
        "requested": dp["requested"],
        "active": dp["active"],
        "message": dp["message"],
        "preflight": dp["preflight"],
        "lastSyncTime": dp["lastSyncTime"],
        "lastSyncDurationMs": dp["lastSyncDurationMs"],
        "attached": dp["attached"],
        "maps": dp["maps"],
        "bpffsDir": dp["bpffsDir"],
        "podCIDRs": n["status"]["podCIDRs"],
        "wireguardPublicKey": n["status"]["wireguardPublicKey"],
        "wireguardDevice": dp["wireguardDevice"],
        "agentVersion": dp["agentVersion"],
    })
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

/// `passed`, `FAILED (check, check)` or `-` (not run: BPF was not requested).
fn preflight_text(p: &Value) -> String {
    match p["passed"].as_bool() {
        None => "-".to_owned(),
        Some(true) => "passed".to_owned(),
        Some(false) => {
            let failed: Vec<&str> = p["checks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["passed"] == false)
                .filter_map(|c| c["name"].as_str())
                .collect();
            format!("FAILED ({})", failed.join(", "))
        }
    }
}

/// Columns padded to their widest cell, `indent` before each line.
fn table(rows: Vec<Vec<String>>, indent: &str) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(indent);
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn summary(rows: &[Value]) -> String {
    let mut lines = vec![
        [
            "NAME",
            "REQUESTED",
            "ACTIVE",
            "PREFLIGHT",
            "LAST-SYNC",
            "SYNC-MS",
            "POD-CIDRS",
            "WIREGUARD",
            "MESSAGE",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for r in rows {
        lines.push(vec![
            text(&r["name"]),
            text(&r["requested"]),
            text(&r["active"]),
            preflight_text(&r["preflight"]),
            text(&r["lastSyncTime"]),
            text(&r["lastSyncDurationMs"]),
            text(&r["podCIDRs"]),
            wireguard_column(&r["wireguardPublicKey"], &r["wireguardDevice"]),
            text(&r["message"]),
        ]);
    }
    table(lines, "")
}

/// Every node's whole report: a block each.
fn details(rows: &[Value]) -> String {
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "Node {}: dataplane requested {}, in use {}\n",
            text(&r["name"]),
            text(&r["requested"]),
            text(&r["active"])
        ));
        let mut facts = vec![
            vec!["message:".to_owned(), text(&r["message"])],
            vec![
                "last sync:".to_owned(),
                format!(
                    "{} ({} ms)",
                    text(&r["lastSyncTime"]),
                    text(&r["lastSyncDurationMs"])
                ),
            ],
            vec!["pod CIDRs:".to_owned(), text(&r["podCIDRs"])],
            vec![
                "wireguard:".to_owned(),
                match r["wireguardDevice"].as_str() {
                    Some(device) if r["wireguardPublicKey"].is_string() => format!("on, {device}"),
                    _ => wireguard_column(&r["wireguardPublicKey"], &r["wireguardDevice"]),
                },
            ],
            vec!["agent:".to_owned(), text(&r["agentVersion"])],
        ];
        if r["bpffsDir"].is_string() {
            facts.push(vec!["bpffs:".to_owned(), text(&r["bpffsDir"])]);
        }
        facts.push(vec![
            "preflight:".to_owned(),
            preflight_text(&r["preflight"]),
        ]);
        out.push_str(&table(facts, "  "));
        if let Some(checks) = r["preflight"]["checks"].as_array() {
            let lines = checks
                .iter()
                .map(|c| {
                    vec![
                        text(&c["name"]),
                        if c["passed"] == true { "ok" } else { "FAILED" }.to_owned(),
                        text(&c["detail"]),
                    ]
                })
                .collect();
            out.push_str(&table(lines, "    "));
        }
        match r["attached"].as_array() {
            Some(attached) if !attached.is_empty() => {
                out.push_str(&format!("  attached ({} programs):\n", attached.len()));
                let mut lines = vec![
                    ["PROGRAM", "HOOK", "MODE", "WHERE"]
                        .map(str::to_owned)
                        .to_vec(),
                ];
                for a in attached {
                    let place = if a["interface"].is_string() {
                        text(&a["interface"])
                    } else {
                        text(&a["cgroup"])
                    };
                    lines.push(vec![
                        text(&a["program"]),
                        text(&a["hook"]),
                        text(&a["mode"]),
                        place,
                    ]);
                }
                out.push_str(&table(lines, "    "));
            }
            _ => out.push_str("  attached: nothing (no BPF program of ours on this node)\n"),
        }
        if let Some(maps) = r["maps"].as_array() {
            out.push_str("  maps:\n");
            let mut lines = vec![
                ["MAP", "ENTRIES", "MAX", "FILL", "COUNTED"]
                    .map(str::to_owned)
                    .to_vec(),
            ];
            for m in maps {
                let entries = m["entries"].as_u64().unwrap_or(0);
                let max = m["maxEntries"].as_u64().unwrap_or(0);
                let fill = if max > 0 {
                    format!("{:.2}%", entries as f64 * 100.0 / max as f64)
                } else {
                    "-".to_owned()
                };
                lines.push(vec![
                    text(&m["name"]),
                    entries.to_string(),
                    max.to_string(),
                    fill,
                    match m["source"].as_str() {
                        Some("scan") => "periodic scan (10 s)".to_owned(),
                        Some("exact") => "exact".to_owned(),
                        _ => "-".to_owned(),
                    },
                ]);
            }
            out.push_str(&table(lines, "    "));
        }
    }
    out
}
