//! Printing resources: calicoctl's `ps` and `wide` tables (kubectl's columns for Kubernetes
//! kinds), YAML, JSON, `name` and JSONPath.

use anyhow::{Result, bail};
use margay_api::Kind;
use margay_datastore::Stored;
use serde_json::{Value, json};

/// An output format chosen with `-o`.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    Ps,
    Wide,
    Yaml,
    Json,
    Name,
    JsonPath(String),
}

impl Format {
    pub fn parse(text: &str) -> Result<Format> {
        Ok(match text {
            "ps" | "" => Format::Ps,
            "wide" => Format::Wide,
            "yaml" => Format::Yaml,
            "json" => Format::Json,
            "name" => Format::Name,
            _ => match text.split_once('=') {
                Some(("jsonpath", template)) => Format::JsonPath(template.to_owned()),
                _ => bail!(
                    "unknown output format {text:?}; use ps, wide, yaml, json, name or jsonpath=TEMPLATE"
                ),
            },
        })
    }
}

/// What `get` prints: one object when exactly one was named, a list otherwise.
pub fn render(
    kind: Kind,
    items: &[Stored],
    single: bool,
    revision: u64,
    format: &Format,
    all_namespaces: bool,
) -> Result<String> {
    let document = || -> Value {
        if single && items.len() == 1 {
            items[0].value.clone()
        } else {
            json!({
                "apiVersion": kind.api_version(),
                "kind": kind.list_kind(),
                "items": items.iter().map(|s| s.value.clone()).collect::<Vec<_>>(),
                "metadata": {"resourceVersion": revision.to_string()},
            })
        }
    };
    Ok(match format {
        Format::Yaml => serde_yaml_ng::to_string(&sorted(document()))?,
        Format::Json => format!("{}\n", serde_json::to_string_pretty(&sorted(document()))?),
        Format::JsonPath(template) => crate::jsonpath::render(template, &document())?,
        Format::Name => items
            .iter()
            .map(|s| format!("{}/{}\n", kind.as_str().to_ascii_lowercase(), s.key.name))
            .collect(),
        Format::Ps | Format::Wide => table(
            kind,
            items,
            *format == Format::Wide,
            all_namespaces && kind.is_namespaced(),
        ),
    })
}

/// Orders object keys alphabetically at every level, as calicoctl's output does (it goes through
/// Go maps), so that our YAML looks like the YAML users know.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

fn table(kind: Kind, items: &[Stored], wide: bool, with_namespace: bool) -> String {
    let (mut header, wide_header) = columns(kind);
    if wide {
        header.extend(wide_header);
    }
    if with_namespace {
        header.insert(0, "NAMESPACE");
    }
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for item in items {
        let mut row = cells(kind, &item.value, wide);
        if with_namespace {
            row.insert(0, item.key.namespace.clone().unwrap_or_default());
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<width$}", width = widths[i]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn columns(kind: Kind) -> (Vec<&'static str>, Vec<&'static str>) {
    match kind {
        Kind::Node => (vec!["NAME"], vec!["ADDRESSES", "DATAPLANE", "POD-CIDRS"]),
        Kind::IPPool => (
            vec!["NAME", "CIDR", "SELECTOR"],
            vec!["NAT", "IPIPMODE", "VXLANMODE", "DISABLED", "ALLOWEDUSES"],
        ),
        Kind::Installation => (vec!["NAME", "DATAPLANE"], vec!["HOSTPORTS"]),
        Kind::Namespace => (vec!["NAME", "AGE"], vec![]),
        Kind::Service => (
            vec![
                "NAME",
                "TYPE",
                "CLUSTER-IP",
                "EXTERNAL-IP",
                "PORT(S)",
                "AGE",
            ],
            vec!["SELECTOR"],
        ),
        Kind::ConfigMap => (vec!["NAME", "DATA", "AGE"], vec![]),
        Kind::Pod => (vec!["NAME", "READY", "STATUS", "AGE"], vec!["IP", "NODE"]),
        Kind::EndpointSlice => (
            vec!["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"],
            vec![],
        ),
        Kind::IPAMBlock => (vec!["NAME", "CIDR", "AFFINITY", "IN-USE"], vec![]),
        Kind::Deployment => (
            vec!["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
            vec![],
        ),
        Kind::BlockAffinity => (vec!["NAME", "NODE", "CIDR", "STATE"], vec![]),
        Kind::FelixConfiguration | Kind::ClusterInformation => (vec!["NAME"], vec![]),
    }
}

fn cells(kind: Kind, v: &Value, wide: bool) -> Vec<String> {
    let name = text(&v["metadata"]["name"]);
    let age = age(&v["metadata"]["creationTimestamp"]);
    let spec = &v["spec"];
    let (mut row, wide_row): (Vec<String>, Vec<String>) = match kind {
        Kind::Node => (
            vec![name],
            vec![
                join(spec["addresses"].as_array(), |a| text(&a["address"])),
                text(&v["status"]["dataplane"]["active"]),
                join(v["status"]["podCIDRs"].as_array(), text),
            ],
        ),
        Kind::IPPool => (
            vec![name, text(&spec["cidr"]), text(&spec["nodeSelector"])],
            vec![
                text(&spec["natOutgoing"]),
                text(&spec["ipipMode"]),
                text(&spec["vxlanMode"]),
                or(text(&spec["disabled"]), "false"),
                join(spec["allowedUses"].as_array(), text),
            ],
        ),
        Kind::Installation => (
            vec![
                name,
                or(text(&spec["calicoNetwork"]["linuxDataplane"]), "Iptables"),
            ],
            vec![or(text(&spec["calicoNetwork"]["hostPorts"]), "Enabled")],
        ),
        Kind::Namespace => (vec![name, age], vec![]),
        Kind::Service => {
            let ports = join(spec["ports"].as_array(), |p| {
                let node_port = p["nodePort"]
                    .as_i64()
                    .map(|n| format!(":{n}"))
                    .unwrap_or_default();
                format!(
                    "{}{}/{}",
                    p["port"],
                    node_port,
                    or(text(&p["protocol"]), "TCP")
                )
            });
            let ingress = join(v["status"]["loadBalancer"]["ingress"].as_array(), |i| {
                text(&i["ip"])
            });
            let external_ips = join(spec["externalIPs"].as_array(), text);
            let external = match (ingress.as_str(), external_ips.as_str()) {
                ("", "") if text(&spec["type"]) == "LoadBalancer" => "<pending>".to_owned(),
                ("", "") => "<none>".to_owned(),
                (i, "") => i.to_owned(),
                ("", e) => e.to_owned(),
                (i, e) => format!("{i},{e}"),
            };
            let selector = spec["selector"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", text(v)))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            (
                vec![
                    name,
                    text(&spec["type"]),
                    or(text(&spec["clusterIP"]), "<none>"),
                    external,
                    ports,
                    age,
                ],
                vec![or(selector, "<none>")],
            )
        }
        Kind::ConfigMap => {
            let count = v["data"].as_object().map_or(0, |m| m.len())
                + v["binaryData"].as_object().map_or(0, |m| m.len());
            (vec![name, count.to_string(), age], vec![])
        }
        Kind::Pod => {
            let containers = spec["containers"].as_array().map_or(0, Vec::len);
            let ready = v["status"]["containerStatuses"]
                .as_array()
                .map_or(0, |s| s.iter().filter(|c| c["ready"] == true).count());
            (
                vec![
                    name,
                    format!("{ready}/{containers}"),
                    or(text(&v["status"]["phase"]), "Pending"),
                    age,
                ],
                vec![
                    or(text(&v["status"]["podIP"]), "<none>"),
                    or(text(&spec["nodeName"]), "<none>"),
                ],
            )
        }
        Kind::EndpointSlice => {
            let ports = join(v["ports"].as_array(), |p| text(&p["port"]));
            let endpoints = v["endpoints"]
                .as_array()
                .map(|eps| {
                    eps.iter()
                        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                        .map(|a| text(&a))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            (
                vec![
                    name,
                    text(&v["addressType"]),
                    or(ports, "<unset>"),
                    or(endpoints, "<unset>"),
                    age,
                ],
                vec![],
            )
        }
        Kind::IPAMBlock => {
            let in_use = spec["allocations"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|x| !x.is_null()).count());
            let size = spec["allocations"].as_array().map_or(0, Vec::len);
            (
                vec![
                    name,
                    text(&spec["cidr"]),
                    text(&spec["affinity"]),
                    format!("{in_use}/{size}"),
                ],
                vec![],
            )
        }
        Kind::BlockAffinity => (
            vec![
                name,
                text(&spec["node"]),
                text(&spec["cidr"]),
                text(&spec["state"]),
            ],
            vec![],
        ),
        Kind::Deployment => {
            let replicas = spec["replicas"].as_i64().unwrap_or(1);
            let ready = v["status"]["readyReplicas"].as_i64().unwrap_or(0);
            let updated = v["status"]["updatedReplicas"].as_i64().unwrap_or(0);
            let available = v["status"]["availableReplicas"].as_i64().unwrap_or(0);
            (
                vec![
                    name,
                    format!("{ready}/{replicas}"),
                    updated.to_string(),
                    available.to_string(),
                    age,
                ],
                vec![],
            )
        }
        Kind::FelixConfiguration | Kind::ClusterInformation => (vec![name], vec![]),
    };
    if wide {
        row.extend(wide_row);
    }
    row
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn or(s: String, fallback: &str) -> String {
    if s.is_empty() { fallback.to_owned() } else { s }
}

fn join(items: Option<&Vec<Value>>, f: impl Fn(&Value) -> String) -> String {
    items
        .map(|a| a.iter().map(f).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

/// kubectl's short ages: `45s`, `12m`, `5h`, `3d`.
pub fn age(created: &Value) -> String {
    let Some(created) = created
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
    else {
        return "<unknown>".to_owned();
    };
    let secs = (chrono::Utc::now() - created.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Writes `args` to stdout, as `print!` does, except when the reader has gone (`margayctl get
/// ... | head`, `margay-lab status | head`): then the process ends at once, quietly and with
/// status 0, as a Unix filter ends on SIGPIPE (Rust ignores SIGPIPE, so `print!` would panic).
/// The output is not wanted any more, and nothing a printing verb does after printing needs to
/// run. Any other error panics, as `print!` does. Use through [`out!`](crate::out) and
/// [`outln!`](crate::outln).
pub fn print_or_exit(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        exit_if_broken_pipe(&e);
        panic!("failed printing to stdout: {e}");
    }
}

/// Ends the process quietly (status 0) if `e` says stdout's reader has gone.
pub fn exit_if_broken_pipe(e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
}

/// Whether a command failed only because stdout's reader went away (its cause chain holds a
/// broken pipe): the CLIs then exit quietly instead of printing an error.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `print!` that exits quietly when stdout's reader has gone ([`print_or_exit`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::print_or_exit(format_args!($($arg)*))
    };
}

/// `println!` that exits quietly when stdout's reader has gone ([`print_or_exit`]).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::print_or_exit(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::print_or_exit(format_args!("{}\n", format_args!($($arg)*)))
    };
}
