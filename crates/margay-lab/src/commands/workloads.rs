//! `margay-lab delete | logs | exec | rollout`: kubectl's workload verbs.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use margay_api::Kind;
use margay_api::selector::Selector;
use margay_datastore::{Key, Stored};
use margay_lab::Target;
use margay_lab::controller::Cluster;
use margay_lab::controller::kubelet::{NETNS_ANNOTATION, pod_log_path};

use crate::cli::{DeleteArgs, ExecArgs, LogsArgs, RolloutArgs};

/// Parses kubectl's equality selectors (`app=customer,tier=front`) into Calico's language.
fn selector(text: &str) -> Result<Selector> {
    let mut parts = Vec::new();
    for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match term.split_once("!=") {
            Some((k, v)) => parts.push(format!("{} != '{}'", k.trim(), v.trim())),
            None => match term.split_once('=') {
                Some((k, v)) => parts.push(format!(
                    "{} == '{}'",
                    k.trim(),
                    v.trim().trim_start_matches('=')
                )),
                None => parts.push(format!("has({term})")),
            },
        }
    }
    Selector::parse(&parts.join(" && ")).map_err(|e| anyhow::anyhow!("bad selector {text:?}: {e}"))
}

fn labels(v: &serde_json::Value) -> BTreeMap<String, String> {
    serde_json::from_value(v["metadata"]["labels"].clone()).unwrap_or_default()
}

async fn pods_matching(cluster: &Cluster, ns: &str, sel: &Selector) -> Result<Vec<Stored>> {
    Ok(cluster
        .client
        .list(Kind::Pod, Some(ns))
        .await?
        .items
        .into_iter()
        .filter(|p| sel.matches(&labels(&p.value)))
        .collect())
}

pub fn delete(name: &str, args: &DeleteArgs) -> Result<ExitCode> {
    super::require_root("delete")?;
    let kind: Kind = args.kind.parse().map_err(anyhow::Error::msg)?;
    super::runtime()?.block_on(async {
        let cluster = Cluster::open(name).await?;
        let ns = args.namespace.as_str();
        let mut names = args.names.clone();
        if let Some(text) = &args.selector {
            let sel = selector(text)?;
            let listed = cluster
                .client
                .list(kind, kind.is_namespaced().then_some(ns))
                .await?;
            names.extend(
                listed
                    .items
                    .into_iter()
                    .filter(|p| sel.matches(&labels(&p.value)))
                    .map(|p| p.key.name),
            );
        }
        if args.all {
            let listed = cluster
                .client
                .list(kind, kind.is_namespaced().then_some(ns))
                .await?;
            names.extend(listed.items.into_iter().map(|p| p.key.name));
        }
        if names.is_empty() {
            bail!("nothing to delete: name the objects, or use -l SELECTOR or --all");
        }
        if kind == Kind::Pod {
            cluster.delete_pods(ns, &names).await?;
        } else {
            let keys = names
                .iter()
                .map(|n| (Key::new(kind, kind.is_namespaced().then_some(ns), n), None))
                .collect();
            cluster.client.delete(keys, false).await?;
            cluster.converge().await?;
        }
        for n in names {
            margayctl::outln!("{} \"{n}\" deleted", kind.as_str().to_ascii_lowercase());
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn logs(name: &str, args: &LogsArgs) -> Result<ExitCode> {
    super::runtime()?.block_on(async {
        let cluster = Cluster::open(name).await?;
        let ns = args.namespace.as_str();
        let pods: Vec<Stored> = match (&args.target, &args.selector) {
            (Some(t), _) if t.starts_with("deployment/") || t.starts_with("deploy/") => {
                let deployment = t.split_once('/').map(|x| x.1).unwrap_or_default();
                let d = cluster
                    .client
                    .get(&Key::new(Kind::Deployment, Some(ns), deployment))
                    .await?;
                let sel: BTreeMap<String, String> =
                    serde_json::from_value(d.value["spec"]["selector"]["matchLabels"].clone())
                        .unwrap_or_default();
                let text: Vec<String> = sel.iter().map(|(k, v)| format!("{k}={v}")).collect();
                // kubectl shows one Pod of the Deployment.
                pods_matching(&cluster, ns, &selector(&text.join(","))?)
                    .await?
                    .into_iter()
                    .filter(|p| p.value["metadata"]["deletionTimestamp"].is_null())
                    .take(1)
                    .collect()
            }
            (Some(t), _) => {
                let pod = t.strip_prefix("pod/").unwrap_or(t);
                vec![
                    cluster
                        .client
                        .get(&Key::new(Kind::Pod, Some(ns), pod))
                        .await?,
                ]
            }
            (None, Some(text)) => pods_matching(&cluster, ns, &selector(text)?).await?,
            (None, None) => bail!("name a pod, deployment/NAME, or use -l SELECTOR"),
        };
        if pods.is_empty() {
            bail!("no pods found in namespace {ns}");
        }
        for pod in &pods {
            let containers = pod.value["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for c in containers {
                let cname = c["name"].as_str().unwrap_or_default();
                let path = pod_log_path(&cluster.lab, ns, &pod.key.name, cname);
                match std::fs::read_to_string(&path) {
                    Ok(text) => margayctl::out!("{text}"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot read {}", path.display()));
                    }
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn exec(name: &str, args: &ExecArgs) -> Result<ExitCode> {
    let netns = super::runtime()?.block_on(async {
        let cluster = Cluster::open(name).await?;
        let pod = cluster
            .client
            .get(&Key::new(Kind::Pod, Some(&args.namespace), &args.pod))
            .await?;
        pod.value["metadata"]["annotations"][NETNS_ANNOTATION]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("pod {}/{} is not running", args.namespace, args.pod))
    })?;
    let lab = margay_lab::Lab::open(name)?;
    let status = lab.exec_interactive(&Target::pod(netns), &args.command.argv)?;
    Ok(super::exit_code(status))
}

pub fn rollout(name: &str, args: &RolloutArgs) -> Result<ExitCode> {
    super::require_root("rollout")?;
    if args.action != "restart" {
        bail!(
            "rollout {}: only `rollout restart` is supported",
            args.action
        );
    }
    let deployment = match args.resource.as_slice() {
        [one] => one
            .split_once('/')
            .filter(|(k, _)| matches!(*k, "deployment" | "deploy" | "deployments"))
            .map(|(_, n)| n.to_owned())
            .with_context(|| format!("{one:?}: write deployment/NAME or deployment NAME"))?,
        [kind, n] if matches!(kind.as_str(), "deployment" | "deploy" | "deployments") => n.clone(),
        _ => bail!("write `rollout restart deployment NAME`"),
    };
    super::runtime()?.block_on(async {
        let cluster = Cluster::open(name).await?;
        cluster
            .rollout_restart(&args.namespace, &deployment)
            .await?;
        margayctl::outln!("deployment.apps/{deployment} restarted");
        Ok(ExitCode::SUCCESS)
    })
}
