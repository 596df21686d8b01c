//! `margay-lab get pods|svc|nodes|endpointslices|deployments [NAME] [-n NS|-A] [-o ...]`, with
//! kubectl's columns; nodes show the readiness their agents report.

use std::process::ExitCode;

use anyhow::Result;
use margay_api::Kind;
use margay_datastore::Key;
use margay_lab::controller::{Cluster, agents};
use margayctl::output::{Format, age, render};

use crate::cli::GetArgs;

pub fn run(name: &str, args: &GetArgs) -> Result<ExitCode> {
    let kind: Kind = args.kind.parse().map_err(anyhow::Error::msg)?;
    let format = Format::parse(&args.output)?;
    super::runtime()?.block_on(async {
        let cluster = Cluster::open(name).await?;
        let ns = (kind.is_namespaced() && !args.all_namespaces).then_some(args.namespace.as_str());
        let (items, revision) = if args.names.is_empty() {
            let listing = cluster.client.list(kind, ns).await?;
            (listing.items, listing.revision)
        } else {
            let mut items = Vec::new();
            for n in &args.names {
                items.push(cluster.client.get(&Key::new(kind, ns, n)).await?);
            }
            (items, cluster.client.store().revision().await?)
        };
        if kind == Kind::Node && matches!(format, Format::Ps | Format::Wide) {
            margayctl::out!("{}", node_table(&cluster, &items, format == Format::Wide));
        } else {
            margayctl::out!(
                "{}",
                render(
                    kind,
                    &items,
                    args.names.len() == 1,
                    revision,
                    &format,
                    args.all_namespaces
                )?
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// kubectl's node listing: NAME STATUS ROLES AGE VERSION (wide: INTERNAL-IP, DATAPLANE).
fn node_table(cluster: &Cluster, items: &[margay_datastore::Stored], wide: bool) -> String {
    let mut rows = vec![{
        let mut h = vec!["NAME", "STATUS", "ROLES", "AGE", "VERSION"];
        if wide {
            h.extend(["INTERNAL-IP", "DATAPLANE"]);
        }
        h.into_iter().map(str::to_owned).collect::<Vec<_>>()
    }];
    for item in items {
        let v = &item.value;
        let status = agents::read_status(&cluster.lab, &item.key.name);
        let ready = status.as_ref().is_some_and(|s| {
            s["datastore"] == "InSync"
                && s["lastError"].is_null()
                && s["syncs"].as_u64().unwrap_or(0) > 0
        });
        let mut row = vec![
            item.key.name.clone(),
            if ready { "Ready" } else { "NotReady" }.to_owned(),
            "agent".to_owned(),
            age(&v["metadata"]["creationTimestamp"]),
            format!(
                "v{}",
                v["status"]["dataplane"]["agentVersion"]
                    .as_str()
                    .unwrap_or("?")
            ),
        ];
        if wide {
            row.push(
                v["spec"]["addresses"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["type"] == "InternalIP"))
                    .and_then(|x| x["address"].as_str())
                    .unwrap_or("<none>")
                    .to_owned(),
            );
            row.push(
                v["status"]["dataplane"]["active"]
                    .as_str()
                    .unwrap_or("<none>")
                    .to_owned(),
            );
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                .collect();
            format!("{}\n", line.join("   ").trim_end())
        })
        .collect()
}
