//! What a lab Pod's containers run.
//!
//! A container with a `command` runs it as given (executed directly, no shell), with `args`
//! appended. Otherwise its image decides: the lab cannot pull images, so it maps the images our
//! users' manifests name to programs it ships:
//!
//! | image (registry and tag ignored) | runs |
//! |---|---|
//! | `*yaobank-customer` | `margay-demo-app customer` |
//! | `*yaobank-summary` | `margay-demo-app summary` |
//! | `*yaobank-database` | `margay-demo-app database` |
//! | `*coredns`, `*k8s-dns-*`, `*dnsmasq*` | `dnsmasq` serving the lab's cluster DNS records |
//! | `*margay/echo`, `*agnhost` | `margay-demo-app echo` on the container's ports |
//! | `*margay/loadserver` | `margay-demo-app load-server` on the first port (the benchmark's server) |
//!
//! Anything else is refused with a message saying how to give the container a command.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Container;

/// Where a Pod runs, for environment variables and DNS.
#[derive(Clone, Debug)]
pub struct PodContext {
    pub namespace: String,
    pub pod_name: String,
    pub pod_ip: String,
    pub node_name: String,
    /// The directory dnsmasq reads cluster DNS records from (`--hostsdir`, re-read on change).
    pub dns_hosts_dir: PathBuf,
}

/// A container's process: its argv and extra environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerProcess {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// The program a container runs, or why the lab cannot run it.
pub fn container_process(
    container: &Container,
    ctx: &PodContext,
) -> Result<ContainerProcess, String> {
    let mut env: Vec<(String, String)> = vec![
        ("POD_NAME".into(), ctx.pod_name.clone()),
        ("POD_NAMESPACE".into(), ctx.namespace.clone()),
        ("POD_IP".into(), ctx.pod_ip.clone()),
        ("NODE_NAME".into(), ctx.node_name.clone()),
        ("HOSTNAME".into(), ctx.pod_name.clone()),
    ];
    for var in container.env.iter().flatten() {
        if let Some(value) = &var.value {
            env.push((var.name.clone(), value.clone()));
        }
    }
    let args = container.args.clone().unwrap_or_default();
    if let Some(command) = container.command.as_ref().filter(|c| !c.is_empty()) {
        let mut argv = command.clone();
        argv.extend(args);
        return Ok(ContainerProcess { argv, env });
    }
    let image = container.image.clone().unwrap_or_default();
    let base = image_base(&image);
    let ports: Vec<(i32, String)> = container
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.container_port,
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            )
        })
        .collect();
    let first_port = |default: i32| ports.first().map_or(default, |(p, _)| *p);
    let demo = || {
        find_binary("margay-demo-app")
            .to_string_lossy()
            .into_owned()
    };
    let mut argv: Vec<String> = if base.ends_with("yaobank-customer") {
        vec![
            demo(),
            "customer".into(),
            "--listen".into(),
            format!("0.0.0.0:{}", first_port(80)),
        ]
    } else if base.ends_with("yaobank-summary") {
        vec![
            demo(),
            "summary".into(),
            "--listen".into(),
            format!("0.0.0.0:{}", first_port(80)),
        ]
    } else if base.ends_with("yaobank-database") {
        vec![
            demo(),
            "database".into(),
            "--listen".into(),
            format!("0.0.0.0:{}", first_port(2379)),
        ]
    } else if base.ends_with("coredns") || base.contains("k8s-dns") || base.contains("dnsmasq") {
        dnsmasq_argv(&ctx.dns_hosts_dir)
    } else if base.ends_with("margay/echo") || base.ends_with("agnhost") {
        let mut argv = vec![demo(), "echo".into()];
        for (port, proto) in &ports {
            argv.push(if proto == "UDP" {
                "--udp".into()
            } else {
                "--tcp".into()
            });
            argv.push(port.to_string());
        }
        argv
    } else if base.ends_with("margay/loadserver") {
        vec![
            demo(),
            "load-server".into(),
            "--port".into(),
            first_port(9000).to_string(),
        ]
    } else {
        return Err(format!(
            "container {:?}: the lab cannot pull image {image:?}; give the container a command (it runs directly in the pod's namespace), or use one of the images the lab maps (yaobank, coredns, margay/echo, margay/loadserver)",
            container.name
        ));
    };
    argv.extend(args);
    Ok(ContainerProcess { argv, env })
}

/// The image's repository path without registry host and tag (`spikecurtis/yaobank-customer`).
fn image_base(image: &str) -> String {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    let without_tag = match without_digest[last_slash..].find(':') {
        Some(i) => &without_digest[..last_slash + i],
        None => without_digest,
    };
    let mut parts: Vec<&str> = without_tag.split('/').collect();
    if parts.len() > 1 && (parts[0].contains('.') || parts[0].contains(':')) {
        parts.remove(0);
    }
    parts.join("/")
}

/// dnsmasq as cluster DNS: records only from the lab's hosts directory (re-read on change), no
/// upstream, in the foreground, logging queries to its log.
pub fn dnsmasq_argv(hosts_dir: &Path) -> Vec<String> {
    vec![
        "dnsmasq".into(),
        "--keep-in-foreground".into(),
        "--no-daemon".into(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        format!("--hostsdir={}", hosts_dir.display()),
        "--domain-needed".into(),
        "--no-negcache".into(),
        "--local=/cluster.local/".into(),
        "--log-queries".into(),
        "--log-facility=-".into(),
        "--user=root".into(),
        "--pid-file=".into(),
        "--port=53".into(),
    ]
}

/// A program shipped beside the running binary (the workspace's `target/<profile>/`), else on
/// PATH.
pub fn find_binary(name: &str) -> PathBuf {
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        for candidate in [dir.join(name), dir.join("..").join(name)] {
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> PodContext {
        PodContext {
            namespace: "yaobank".into(),
            pod_name: "customer-abc".into(),
            pod_ip: "192.168.0.5".into(),
            node_name: "node-1".into(),
            dns_hosts_dir: PathBuf::from("/run/x/dns"),
        }
    }

    fn container(v: serde_json::Value) -> Container {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn images_map_to_programs() {
        assert_eq!(
            image_base("docker.io/spikecurtis/yaobank-customer:latest"),
            "spikecurtis/yaobank-customer"
        );
        assert_eq!(
            image_base("registry.k8s.io/coredns/coredns:v1.11.1"),
            "coredns/coredns"
        );
        assert_eq!(image_base("localhost:5000/margay/echo"), "margay/echo");
        let p = container_process(
            &container(serde_json::json!({"name": "customer", "image": "spikecurtis/yaobank-customer:latest",
                "ports": [{"containerPort": 80}]})),
            &ctx(),
        )
        .unwrap();
        assert!(p.argv[0].ends_with("margay-demo-app"));
        assert_eq!(&p.argv[1..], ["customer", "--listen", "0.0.0.0:80"]);
        assert!(p.env.contains(&("POD_NAME".into(), "customer-abc".into())));
        let echo = container_process(
            &container(serde_json::json!({"name": "e", "image": "margay/echo",
                "ports": [{"containerPort": 8080}, {"containerPort": 5353, "protocol": "UDP"}]})),
            &ctx(),
        )
        .unwrap();
        assert_eq!(&echo.argv[1..], ["echo", "--tcp", "8080", "--udp", "5353"]);
        let dns = container_process(
            &container(serde_json::json!({"name": "d", "image": "coredns/coredns"})),
            &ctx(),
        )
        .unwrap();
        assert_eq!(dns.argv[0], "dnsmasq");
        assert!(dns.argv.contains(&"--hostsdir=/run/x/dns".to_owned()));
    }

    #[test]
    fn commands_run_directly_and_unknown_images_are_refused() {
        let p = container_process(
            &container(serde_json::json!({"name": "s", "image": "busybox", "command": ["sleep"], "args": ["100"]})),
            &ctx(),
        )
        .unwrap();
        assert_eq!(p.argv, ["sleep", "100"]);
        let err = container_process(
            &container(serde_json::json!({"name": "n", "image": "nginx"})),
            &ctx(),
        )
        .unwrap_err();
        assert!(err.contains("cannot pull image \"nginx\""), "{err}");
    }
}
