//! The kernel state around the tunnel, through `ip` (one `ip -batch` per change, as the route
//! driver does): the device's link settings, the routes of our table and the policy rule.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::routes::ROUTE_PROTOCOL;

async fn ip_json(args: &[&str]) -> Result<Option<Value>> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .with_context(|| format!("cannot run ip {}", args.join(" ")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("does not exist") || err.contains("Cannot find device") {
            return Ok(None);
        }
        bail!("ip {} failed: {}", args.join(" "), err.trim());
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Some(Value::Array(Vec::new())));
    }
    Ok(Some(serde_json::from_slice(&out.stdout).with_context(
        || format!("cannot parse the output of ip {}", args.join(" ")),
    )?))
}

/// Runs `ip -batch -` with `lines` (nothing when empty).
pub async fn batch(lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let text = lines.join("\n") + "\n";
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run ip -batch")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!(
            "ip -batch failed: {} (batch was: {})",
            String::from_utf8_lossy(&out.stderr).trim(),
            lines.join("; ")
        );
    }
    Ok(())
}

/// The kind of the interface called `name` (`tun`, `wireguard`, `dummy`, ... or `""` for
/// plain devices), or `None` when there is none.
pub async fn link_kind(name: &str) -> Result<Option<String>> {
    let Some(v) = ip_json(&["-d", "-j", "link", "show", "dev", name]).await? else {
        return Ok(None);
    };
    Ok(v.as_array().and_then(|a| a.first()).map(|l| {
        l["linkinfo"]["info_kind"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }))
}

/// The MTU of the interface holding `ip` (the underlay), if it can be found.
pub async fn mtu_of_address(ip: Ipv4Addr) -> Option<u32> {
    let Ok(Some(v)) = ip_json(&["-4", "-j", "addr", "show"]).await else {
        return None;
    };
    v.as_array()
        .into_iter()
        .flatten()
        .find(|l| {
            l["addr_info"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["local"] == ip.to_string()))
        })
        .and_then(|l| l["mtu"].as_u64())
        .map(|m| m as u32)
}

/// The destinations of our routes in `table`.
pub async fn table_routes(table: u32) -> Result<BTreeSet<Ipv4Net>> {
    let table = table.to_string();
    let proto = ROUTE_PROTOCOL.to_string();
    let v = ip_json(&[
        "-4", "-j", "route", "show", "table", &table, "proto", &proto,
    ])
    .await?
    .unwrap_or_default();
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let dst = r["dst"].as_str()?;
            if dst.contains('/') {
                dst.parse().ok()
            } else {
                dst.parse::<Ipv4Addr>().ok().map(Ipv4Net::from)
            }
        })
        .collect())
}

/// The priorities of the rules that send traffic without `fwmark` to `table` (ours).
pub async fn rule_priorities(table: u32, fwmark: u32) -> Result<BTreeSet<u32>> {
    let v = ip_json(&["-4", "-j", "rule", "show"])
        .await?
        .unwrap_or_default();
    let mark = format!("{fwmark:#x}");
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|r| {
            r["table"].as_str() == Some(table.to_string().as_str())
                && r["fwmark"].as_str() == Some(mark.as_str())
                && r.get("not").is_some()
        })
        .filter_map(|r| r["priority"].as_u64().map(|p| p as u32))
        .collect())
}

/// The rule that sends unmarked traffic through our table.
pub fn rule_line(verb: &str, priority: u32, table: u32, fwmark: u32) -> String {
    format!("rule {verb} pref {priority} not fwmark {fwmark:#x}/{fwmark:#x} lookup {table}")
}

/// The batch that makes `table` hold exactly `desired`, each `dev <dev>`.
pub fn route_lines(
    current: &BTreeSet<Ipv4Net>,
    desired: &BTreeSet<Ipv4Net>,
    table: u32,
    dev: &str,
) -> Vec<String> {
    let proto = ROUTE_PROTOCOL;
    let mut lines: Vec<String> = current
        .difference(desired)
        .map(|dst| format!("route del {dst} table {table} proto {proto}"))
        .collect();
    lines.extend(desired.difference(current).map(|dst| {
        format!("route replace {dst} dev {dev} scope link table {table} proto {proto}")
    }));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_change_only_what_differs() {
        let net = |s: &str| -> Ipv4Net { s.parse().unwrap() };
        let current = BTreeSet::from([net("10.244.0.64/26"), net("10.244.0.128/26")]);
        let desired = BTreeSet::from([net("10.244.0.64/26"), net("10.244.0.192/26")]);
        assert_eq!(
            route_lines(&current, &desired, 1, "wireguard.cali"),
            [
                "route del 10.244.0.128/26 table 1 proto 80",
                "route replace 10.244.0.192/26 dev wireguard.cali scope link table 1 proto 80",
            ]
        );
        assert_eq!(
            rule_line("add", 99, 1, 0x10_0000),
            "rule add pref 99 not fwmark 0x100000/0x100000 lookup 1"
        );
    }
}
