//! margayctl end to end: the real binary against a real SQLite datastore in a temporary folder.
//!
//! Every bad-input case asserts two things: the command exits non-zero with one line on stderr,
//! and the datastore is exactly as it was (same revision, same objects).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

/// A datastore in its own temporary folder, removed when the test ends.
struct Env {
    _dir: tempfile::TempDir,
    url: String,
    path: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("margay.db");
        let url = format!("sqlite://{}", path.display());
        let env = Env {
            _dir: dir,
            url,
            path,
        };
        env.ok(&["version"]);
        env
    }

    fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_margayctl"))
            .args(args)
            .env("MARGAY_DATASTORE", &self.url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn margayctl");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write stdin");
        }
        drop(child.stdin.take());
        child.wait_with_output().expect("wait")
    }

    fn ok_stdin(&self, args: &[&str], stdin: &str) -> String {
        let out = self.run_with_stdin(args, Some(stdin));
        assert!(
            out.status.success(),
            "margayctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run_with_stdin(args, None);
        assert!(
            out.status.success(),
            "margayctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    }

    /// Runs a command that must fail, and checks it changed nothing. Returns the error line.
    fn fails(&self, args: &[&str], stdin: Option<&str>) -> String {
        let before = self.dump();
        let out = self.run_with_stdin(args, stdin);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "margayctl {args:?} succeeded but should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "expected one line on stderr, got {stderr:?}"
        );
        assert!(stderr.starts_with("Error: "), "{stderr:?}");
        assert_eq!(
            self.dump(),
            before,
            "margayctl {args:?} changed the datastore"
        );
        stderr.trim_end().to_owned()
    }

    /// Every object and the revision, read through a second, independent handle.
    fn dump(&self) -> (u64, Vec<Value>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let store = margay_datastore::open(&self.url).await.expect("open");
            let listing = store
                .list(&margay_datastore::ListRequest::default())
                .await
                .expect("list");
            (
                listing.revision,
                listing.items.into_iter().map(|s| s.value).collect(),
            )
        })
    }

    fn get_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.ok(&all)).expect("json")
    }
}

#[test]
fn a_fresh_datastore_holds_a_fresh_install() {
    let env = Env::new();
    let felix = env.get_json(&["felixconfiguration", "default"]);
    assert_eq!(felix["spec"]["bpfLogLevel"], "");
    assert_eq!(felix["spec"]["floatingIPs"], "Disabled");
    assert_eq!(felix["spec"]["logSeverityScreen"], "Info");
    assert_eq!(felix["spec"]["reportingInterval"], "0s");
    let inst = env.get_json(&["installation.operator.tigera.io", "default"]);
    assert_eq!(inst["spec"]["calicoNetwork"]["linuxDataplane"], "Iptables");
    let info = env.get_json(&["clusterinformation", "default"]);
    assert_eq!(info["spec"]["datastoreReady"], true);
    let pools = env.get_json(&["ippools"]);
    assert_eq!(pools["kind"], "IPPoolList");
    assert_eq!(pools["items"][0]["spec"]["cidr"], "192.168.0.0/16");
    assert_eq!(pools["items"][0]["spec"]["blockSize"], 26);
    let table = env.ok(&["get", "ippool"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("default-ipv4-ippool   192.168.0.0/16   all()"),
        "{table}"
    );
    // Mode 0600: the datastore holds cluster configuration.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&env.path)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn the_seed_configuration_steps() {
    let env = Env::new();
    // Step 2: disable WireGuard with a merge patch.
    let out = env.ok(&[
        "--allow-version-mismatch",
        "patch",
        "felixconfiguration",
        "default",
        "--type=merge",
        "-p",
        r#"{"spec":{"wireguardEnabled":false}}"#,
    ]);
    assert_eq!(
        out,
        "Successfully patched 1 'FelixConfiguration' resource\n"
    );
    // Step 7: keep kube-proxy's rules (calicoctl's default patch type).
    env.ok(&[
        "--allow-version-mismatch",
        "patch",
        "felixconfiguration",
        "default",
        r#"--patch={"spec": {"bpfKubeProxyIptablesCleanupEnabled": false}}"#,
    ]);
    let yaml = env.ok(&[
        "--allow-version-mismatch",
        "get",
        "felixconfiguration",
        "default",
        "-o",
        "yaml",
    ]);
    assert!(
        yaml.contains("bpfKubeProxyIptablesCleanupEnabled: false"),
        "{yaml}"
    );
    assert!(yaml.contains("wireguardEnabled: false"), "{yaml}");
    // Step 8: the Installation's dataplane, with hostPorts cleared by a null.
    env.ok(&[
        "patch",
        "installation.operator.tigera.io",
        "default",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"calicoNetwork":{"linuxDataplane":"BPF", "hostPorts":null}}}"#,
    ]);
    let inst = env.get_json(&["installation", "default"]);
    assert_eq!(inst["spec"]["calicoNetwork"]["linuxDataplane"], "BPF");
    assert!(inst["spec"]["calicoNetwork"].get("hostPorts").is_none());
    // Reversal: back to Iptables, and the cleanup option removed with a null.
    env.ok(&[
        "patch",
        "installation.operator.tigera.io",
        "default",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"calicoNetwork":{"linuxDataplane":"Iptables"}}}"#,
    ]);
    env.ok(&[
        "patch",
        "felixconfiguration",
        "default",
        r#"--patch={"spec": {"bpfKubeProxyIptablesCleanupEnabled": null}}"#,
    ]);
    let yaml = env.ok(&["get", "felixconfiguration", "default", "-o", "yaml"]);
    assert!(
        !yaml.contains("bpfKubeProxyIptablesCleanupEnabled"),
        "{yaml}"
    );
    assert!(yaml.contains("bpfLogLevel: ''"), "{yaml}");
    assert!(yaml.contains("wireguardEnabled: false"), "{yaml}");
    // Step 5's ConfigMap, and its deletion in the reversal.
    let cm = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: tigera-operator\n---\nkind: ConfigMap\napiVersion: v1\nmetadata:\n  name: kubernetes-services-endpoint\n  namespace: tigera-operator\ndata:\n  KUBERNETES_SERVICE_HOST: \"10.224.0.4\"\n  KUBERNETES_SERVICE_PORT: \"443\"\n";
    env.ok_stdin(&["apply", "-f", "-"], cm);
    let host = env.ok(&[
        "get",
        "cm",
        "kubernetes-services-endpoint",
        "-n",
        "tigera-operator",
        "-o",
        "jsonpath={.data.KUBERNETES_SERVICE_HOST}",
    ]);
    assert_eq!(host, "10.224.0.4");
    env.ok(&[
        "delete",
        "cm",
        "-n",
        "tigera-operator",
        "kubernetes-services-endpoint",
    ]);
}

#[test]
fn get_yaml_applies_back_unchanged() {
    let env = Env::new();
    for (kind, name) in [
        ("felixconfiguration", Some("default")),
        ("installation", Some("default")),
        ("ippools", None),
        ("clusterinformation", Some("default")),
    ] {
        let mut args = vec!["get", kind];
        args.extend(name);
        args.extend(["-o", "yaml"]);
        let before_yaml = env.ok(&args);
        let before = env.dump();
        let out = env.ok_stdin(&["apply", "-f", "-"], &before_yaml);
        assert!(out.starts_with("Successfully applied"), "{out}");
        assert_eq!(env.dump(), before, "applying {kind} back changed the store");
        assert_eq!(env.ok(&args), before_yaml);
        // And as JSON.
        let mut args = vec!["get", kind];
        args.extend(name);
        args.extend(["-o", "json"]);
        let json_text = env.ok(&args);
        env.ok_stdin(&["replace", "-f", "-"], &json_text);
        assert_eq!(env.dump(), before);
    }
}

#[test]
fn create_apply_replace_delete_with_multi_document_files() {
    let env = Env::new();
    let manifests = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: yaobank
---
apiVersion: v1
kind: Service
metadata:
  name: yaobank-customer
  namespace: yaobank
spec:
  selector:
    app: customer
  ports:
  - port: 80
    targetPort: 80
  type: LoadBalancer
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: kubernetes-services-endpoint
  namespace: yaobank
data:
  KUBERNETES_SERVICE_HOST: "api.example"
  KUBERNETES_SERVICE_PORT: "443"
"#;
    let out = env.ok_stdin(&["create", "-f", "-"], manifests);
    assert_eq!(out, "Successfully created 3 resource(s)\n");
    let svc = env.get_json(&["svc", "yaobank-customer", "-n", "yaobank"]);
    assert_eq!(svc["spec"]["externalTrafficPolicy"], "Cluster");
    let table = env.ok(&["get", "svc", "-A"]);
    assert!(table.contains("NAMESPACE"), "{table}");
    assert!(table.contains("yaobank-customer"), "{table}");
    assert!(table.contains("<pending>"), "{table}");
    let cms = env.ok(&["get", "cm", "-n", "yaobank", "-o", "name"]);
    assert_eq!(cms, "configmap/kubernetes-services-endpoint\n");
    // Creating again fails whole.
    let err = env.fails(&["create", "-f", "-"], Some(manifests));
    assert!(err.contains("already exists"), "{err}");
    // Apply of the same content is accepted and writes nothing new.
    let before = env.dump();
    env.ok_stdin(&["apply", "-f", "-"], manifests);
    assert_eq!(env.dump(), before);
    // JSON List input.
    let list = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
         "metadata": {"name": "loadbalancer"},
         "spec": {"cidr": "198.51.100.0/24", "allowedUses": ["LoadBalancer"]}}]});
    env.ok_stdin(&["apply", "-f", "-"], &list.to_string());
    let pool = env.get_json(&["ippool", "loadbalancer"]);
    assert_eq!(pool["spec"]["allowedUses"], json!(["LoadBalancer"]));
    // Delete by name, then a namespace and what is in it.
    assert_eq!(
        env.ok(&["delete", "ippool", "loadbalancer"]),
        "Successfully deleted 1 'IPPool' resource(s)\n"
    );
    env.ok(&["delete", "ns", "yaobank"]);
    assert_eq!(env.ok(&["get", "svc", "-A", "-o", "name"]), "");
    // Skip-not-exists.
    env.ok(&["delete", "ippool", "loadbalancer", "--skip-not-exists"]);
}

#[test]
fn every_bad_input_fails_cleanly_and_changes_nothing() {
    let env = Env::new();
    // Move FelixConfiguration default past revision 1, so that "1" below is stale.
    env.ok(&["label", "felixconfig", "default", "stage=one"]);
    let felix = |spec: &str| {
        format!(
            "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata:\n  name: default\nspec:\n{spec}\n"
        )
    };
    let cases: Vec<(Vec<&str>, Option<String>, &str)> = vec![
        // Malformed YAML and JSON.
        (vec!["apply", "-f", "-"], Some("kind: [unclosed\n".into()), "invalid YAML"),
        (vec!["apply", "-f", "-"], Some("{\"kind\": ".into()), "invalid JSON"),
        // Unknown kind.
        (
            vec!["apply", "-f", "-"],
            Some("apiVersion: v1\nkind: Widget\nmetadata: {name: w}\n".into()),
            "unknown kind \"Widget\"",
        ),
        (vec!["get", "widgets"], None, "unknown resource type"),
        // Unknown field.
        (vec!["apply", "-f", "-"], Some(felix("  bpfEnable: true")), "spec.bpfEnable: unknown field"),
        // Invalid value.
        (
            vec!["apply", "-f", "-"],
            Some(felix("  bpfLogLevel: Loud")),
            "FelixConfiguration default: spec.bpfLogLevel: \"Loud\" is not one of Off, Info, Debug",
        ),
        // A valid document followed by an invalid one: neither is written.
        (
            vec!["apply", "-f", "-"],
            Some(format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: fresh}}\n---\n{}",
                felix("  reportingInterval: often")
            )),
            "spec.reportingInterval",
        ),
        // A failing merge patch (invalid result) and a failing JSON patch test.
        (
            vec!["patch", "felixconfig", "default", "--type", "merge", "-p", r#"{"spec":{"bpfLogLevel":"Loud"}}"#],
            None,
            "spec.bpfLogLevel",
        ),
        (
            vec![
                "patch", "felixconfig", "default", "--type", "json", "-p",
                r#"[{"op":"replace","path":"/spec/logSeverityScreen","value":"Debug"},{"op":"test","path":"/spec/floatingIPs","value":"Enabled"}]"#,
            ],
            None,
            "json patch failed",
        ),
        (vec!["patch", "felixconfig", "default", "-p", "{not json"], None, "not valid JSON or YAML"),
        (vec!["patch", "felixconfig", "default", "--type", "xml", "-p", "{}"], None, "not a patch type"),
        (
            vec!["patch", "felixconfig", "default", "--type", "merge", "-p", r#"{"metadata":{"name":"other"}}"#],
            None,
            "cannot be renamed",
        ),
        // A name in the file that differs from the command line.
        (
            vec!["replace", "felixconfiguration", "default", "-f", "-"],
            Some(felix("  bpfLogLevel: Debug").replace("name: default", "name: other")),
            "the command line names FelixConfiguration \"default\"",
        ),
        // Missing resources.
        (vec!["get", "ippool", "nope"], None, "IPPool nope not found"),
        (vec!["delete", "ippool", "nope"], None, "IPPool nope not found"),
        (vec!["patch", "ippool", "nope", "-p", "{}"], None, "IPPool nope not found"),
        (
            vec!["replace", "-f", "-"],
            Some("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: nope}\nspec: {cidr: 10.9.0.0/16}\n".into()),
            "IPPool nope not found",
        ),
        // A stale resourceVersion.
        (
            vec!["apply", "-f", "-"],
            Some(felix("  bpfLogLevel: Debug").replace("name: default", "name: default\n  resourceVersion: \"1\"")),
            "stale",
        ),
        // Cross-object rules.
        (
            vec!["apply", "-f", "-"],
            Some("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: inner}\nspec: {cidr: 192.168.8.0/24}\n".into()),
            "overlaps IPPool default-ipv4-ippool",
        ),
        (
            vec!["apply", "-f", "-"],
            Some("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ghost}\nspec: {ports: [{port: 80}]}\n".into()),
            "namespace \"ghost\" not found",
        ),
        (vec!["delete", "ns", "kube-system"], None, "system namespace"),
        (
            vec!["patch", "installation", "default", "--type", "merge", "-p", r#"{"spec":{"calicoNetwork":{"linuxDataplane":"VPP"}}}"#],
            None,
            "VPP is a Calico dataplane that Margay does not run yet",
        ),
        (vec!["label", "ippool", "default-ipv4-ippool", "bad key=x"], None, "not a valid key"),
        (vec!["get", "ippool", "-o", "xml"], None, "unknown output format"),
        (vec!["apply", "-f", "/nonexistent/file.yaml"], None, "cannot read /nonexistent/file.yaml"),
    ];
    for (args, stdin, expected) in cases {
        let err = env.fails(&args, stdin.as_deref());
        assert!(
            err.contains(expected),
            "margayctl {args:?}: {err:?} does not mention {expected:?}"
        );
    }
}

#[test]
fn patch_types() {
    let env = Env::new();
    // JSON patch (RFC 6902) with a passing test.
    env.ok(&[
        "patch", "felixconfig", "default", "--type", "json", "-p",
        r#"[{"op":"test","path":"/spec/floatingIPs","value":"Disabled"},{"op":"add","path":"/spec/bpfLogLevel","value":"Debug"}]"#,
    ]);
    assert_eq!(
        env.get_json(&["felixconfig", "default"])["spec"]["bpfLogLevel"],
        "Debug"
    );
    // Strategic (the default) merges like a merge patch.
    env.ok(&[
        "patch",
        "felixconfig",
        "default",
        "-p",
        r#"{"spec":{"bpfEnabled":true}}"#,
    ]);
    let spec = env.get_json(&["felixconfig", "default"])["spec"].clone();
    assert_eq!(spec["bpfEnabled"], true);
    assert_eq!(spec["bpfLogLevel"], "Debug");
    // Merge with null removes.
    env.ok(&[
        "patch",
        "felixconfig",
        "default",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"bpfEnabled":null}}"#,
    ]);
    assert!(
        env.get_json(&["felixconfig", "default"])["spec"]
            .get("bpfEnabled")
            .is_none()
    );
    // YAML patches, as kubectl takes them.
    env.ok(&[
        "patch",
        "ippool",
        "default-ipv4-ippool",
        "-p",
        "spec:\n  natOutgoing: false\n",
    ]);
    assert_eq!(
        env.get_json(&["ippool", "default-ipv4-ippool"])["spec"]["natOutgoing"],
        false
    );
}

#[test]
fn labels_and_jsonpath() {
    let env = Env::new();
    let out = env.ok(&["label", "ippool", "default-ipv4-ippool", "zone=a"]);
    assert_eq!(
        out,
        "Successfully set label zone on ippools default-ipv4-ippool\n"
    );
    let err = env.fails(&["label", "ippool", "default-ipv4-ippool", "zone=b"], None);
    assert!(err.contains("--overwrite"), "{err}");
    env.ok(&[
        "label",
        "ippool",
        "default-ipv4-ippool",
        "zone=b",
        "--overwrite",
    ]);
    let path = env.ok(&[
        "get",
        "ippools",
        "-o",
        "jsonpath={.items[*].metadata.labels.zone}",
    ]);
    assert_eq!(path, "b");
    env.ok(&["label", "ippool", "default-ipv4-ippool", "zone", "--remove"]);
    env.ok(&["label", "ippool", "default-ipv4-ippool", "team=net"]);
    env.ok(&["label", "ippool", "default-ipv4-ippool", "team-"]);
    let labels = env.get_json(&["ippool", "default-ipv4-ippool"])["metadata"]["labels"].clone();
    assert_eq!(labels, json!({}));
    let range = env.ok(&[
        "get",
        "felixconfig",
        "-o",
        r#"jsonpath={range .items[*]}{.metadata.name}{"\n"}{end}"#,
    ]);
    assert_eq!(range, "default\n");
}

#[test]
fn concurrent_patches_from_many_processes_all_land() {
    let env = Env::new();
    // Each process sets its own label through a merge patch, at the same time as the others.
    let count = 16;
    let children: Vec<_> = (0..count)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_margayctl"))
                .args([
                    "patch",
                    "felixconfig",
                    "default",
                    "--type",
                    "merge",
                    "-p",
                    &format!(r#"{{"metadata":{{"labels":{{"writer-{i}":"done"}}}}}}"#),
                ])
                .env("MARGAY_DATASTORE", &env.url)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let labels = env.get_json(&["felixconfig", "default"])["metadata"]["labels"].clone();
    for i in 0..count {
        assert_eq!(
            labels[format!("writer-{i}")],
            "done",
            "writer {i} lost: {labels}"
        );
    }
}

#[test]
fn the_first_allocations_race_safely() {
    // No Service has been allocated yet, so the registry's lock object does not exist: the
    // concurrent writers race to create it, and every one of them must still succeed.
    let env = Env::new();
    let children: Vec<_> = (0..6)
        .map(|i| {
            let manifest = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: r{i}}}\nspec: {{ports: [{{port: 80}}]}}\n");
            let mut child = Command::new(env!("CARGO_BIN_EXE_margayctl"))
                .args(["create", "-f", "-"])
                .env("MARGAY_DATASTORE", &env.url)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn");
            child.stdin.take().expect("stdin").write_all(manifest.as_bytes()).expect("write");
            child
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let all = env.get_json(&["svc"]);
    let ips: std::collections::HashSet<String> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spec"]["clusterIP"].to_string())
        .collect();
    assert_eq!(ips.len(), 6, "{ips:?}");
}

#[test]
fn services_get_addresses_and_ports_like_kube_apiserver_gives_them() {
    let env = Env::new();
    let lb_pool = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: lb}\nspec: {cidr: 198.51.100.0/24, allowedUses: [LoadBalancer]}\n";
    env.ok_stdin(&["apply", "-f", "-"], lb_pool);
    let services = r#"
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  selector: {k8s-app: kube-dns}
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: front}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{port: 80}]
"#;
    env.ok_stdin(&["apply", "-f", "-"], services);
    let dns = env.get_json(&["svc", "kube-dns", "-n", "kube-system"]);
    assert_eq!(dns["spec"]["clusterIP"], "10.96.0.10");
    let web = env.get_json(&["svc", "web"]);
    let web_ip = web["spec"]["clusterIP"].as_str().unwrap().to_owned();
    assert!(web_ip.starts_with("10.96."), "{web_ip}");
    let web_np = web["spec"]["ports"][0]["nodePort"].as_i64().unwrap();
    assert!((30000..=32767).contains(&web_np));
    let front = env.get_json(&["svc", "front"]);
    assert_ne!(front["spec"]["clusterIP"], web["spec"]["clusterIP"]);
    assert_ne!(
        front["spec"]["ports"][0]["nodePort"],
        web["spec"]["ports"][0]["nodePort"]
    );
    assert!(front["spec"]["healthCheckNodePort"].as_i64().is_some());
    assert_eq!(
        front["status"]["loadBalancer"]["ingress"][0]["ip"],
        "198.51.100.1"
    );
    // Re-applying the manifests keeps every allocation.
    env.ok_stdin(&["apply", "-f", "-"], services);
    assert_eq!(env.get_json(&["svc", "web"])["spec"], web["spec"]);
    assert_eq!(env.get_json(&["svc", "front"])["status"], front["status"]);
    // Taken and immutable addresses are refused, and change nothing.
    let taken = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: other}}\nspec: {{clusterIP: {web_ip}, ports: [{{port: 80}}]}}\n"
    );
    let err = env.fails(&["apply", "-f", "-"], Some(&taken));
    assert!(
        err.contains("is already allocated to Service default/web"),
        "{err}"
    );
    let err = env.fails(
        &[
            "patch",
            "svc",
            "web",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"clusterIP":"10.96.5.5"}}"#,
        ],
        None,
    );
    assert!(err.contains("immutable"), "{err}");
    // Changing the type to ClusterIP frees the NodePort; changing it back allocates again.
    env.ok(&[
        "patch",
        "svc",
        "web",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"type":"ClusterIP"}}"#,
    ]);
    assert!(
        env.get_json(&["svc", "web"])["spec"]["ports"][0]
            .get("nodePort")
            .is_none()
    );
    // Many processes creating Services at once never share an address.
    let children: Vec<_> = (0..8)
        .map(|i| {
            let manifest = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{type: NodePort, ports: [{{port: 80}}]}}\n");
            let mut child = Command::new(env!("CARGO_BIN_EXE_margayctl"))
                .args(["create", "-f", "-"])
                .env("MARGAY_DATASTORE", &env.url)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn");
            child.stdin.take().expect("stdin").write_all(manifest.as_bytes()).expect("write");
            child
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let all = env.get_json(&["svc", "-A"]);
    let mut ips = std::collections::HashSet::new();
    let mut ports = std::collections::HashSet::new();
    for s in all["items"].as_array().unwrap() {
        assert!(
            ips.insert(s["spec"]["clusterIP"].to_string()),
            "duplicate ClusterIP {}",
            s["spec"]["clusterIP"]
        );
        for p in s["spec"]["ports"].as_array().unwrap() {
            if let Some(np) = p["nodePort"].as_i64() {
                assert!(ports.insert(np), "duplicate NodePort {np}");
            }
        }
    }
}

#[test]
fn node_status_reports_each_agents_dataplane() {
    let env = Env::new();
    let err = env.fails(&["node", "status"], None);
    assert!(err.contains("no Node is registered yet"), "{err}");
    let node = r#"
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: node-1}
spec:
  addresses: [{address: 10.224.0.4/16, type: CalicoNodeIP}]
status:
  podCIDRs: [192.168.0.0/26]
  dataplane:
    requested: BPF
    active: Iptables
    message: "BPF was requested but this node failed the preflight (no BTF); staying in Iptables"
    lastSyncTime: "2026-11-26T10:00:00.000Z"
    lastSyncDurationMs: 12.5
"#;
    env.ok_stdin(&["apply", "-f", "-"], node);
    let table = env.ok(&["node", "status"]);
    let line = table.lines().nth(1).expect("a row");
    assert!(line.starts_with("node-1"), "{table}");
    assert!(
        line.contains("BPF") && line.contains("Iptables") && line.contains("failed the preflight"),
        "{table}"
    );
    let json: Value =
        serde_json::from_str(&env.ok(&["node", "status", "node-1", "-o", "json"])).unwrap();
    assert_eq!(json[0]["active"], "Iptables");
    assert_eq!(json[0]["podCIDRs"], json!(["192.168.0.0/26"]));
    env.fails(&["node", "status", "node-9"], None);

    // A BPF node's whole report: preflight checks, attachments, map fills.
    let bpf_node = r#"
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: node-2}
spec:
  addresses: [{address: 10.224.0.5/16, type: CalicoNodeIP}]
status:
  dataplane:
    requested: BPF
    active: BPF
    lastSyncTime: "2026-11-26T10:00:00.000Z"
    lastSyncDurationMs: 4.25
    preflight:
      passed: true
      checks:
      - {name: cgroup v2, passed: true, detail: "cgroup v2 at /sys/fs/cgroup/k8s"}
      - {name: datastore, passed: true, detail: "local datastore (SQLite file /var/lib/margay/margay.db)"}
    attached:
    - {program: mg_from_wl, hook: tc ingress, mode: tcx, interface: cali0123456789a}
    - {program: mg_connect4, hook: cgroup connect4, cgroup: /sys/fs/cgroup/k8s}
    maps:
    - {name: mg_ct, entries: 128, maxEntries: 512000, source: scan}
    - {name: mg_nat_fe, entries: 12, maxEntries: 65536, source: exact}
"#;
    env.ok_stdin(&["apply", "-f", "-"], bpf_node);
    let table = env.ok(&["node", "status"]);
    assert_eq!(table.lines().count(), 3, "one line per node:\n{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("node-2") && l.contains("passed")),
        "{table}"
    );
    let full = env.ok(&["node", "status", "node-2"]);
    for expected in [
        "Node node-2: dataplane requested BPF, in use BPF",
        "last sync:   2026-11-26T10:00:00.000Z (4.25 ms)",
        "datastore   ok   local datastore",
        "mg_from_wl    tc ingress        tcx    cali0123456789a",
        "mg_connect4   cgroup connect4   -      /sys/fs/cgroup/k8s",
        "mg_ct       128       512000   0.03%   periodic scan (10 s)",
        "mg_nat_fe   12        65536    0.02%   exact",
    ] {
        assert!(full.contains(expected), "{expected:?} not in:\n{full}");
    }
    let wide = env.ok(&["node", "status", "-o", "wide"]);
    assert!(
        wide.contains("Node node-1: dataplane requested BPF, in use Iptables")
            && wide.contains("preflight:   -")
            && wide.contains("Node node-2"),
        "{wide}"
    );
    let yaml = env.ok(&["node", "status", "node-2", "-o", "yaml"]);
    assert!(
        yaml.contains("interface: cali0123456789a") && yaml.contains("maxEntries: 512000"),
        "{yaml}"
    );
    env.fails(&["node", "status", "-o", "xml"], None);
}

#[test]
fn installation_and_bpf_enabled_move_together() {
    let env = Env::new();
    env.ok(&[
        "patch",
        "installation",
        "default",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"calicoNetwork":{"linuxDataplane":"BPF"}}}"#,
    ]);
    let felix = env.get_json(&["felixconfig", "default"]);
    assert_eq!(felix["spec"]["bpfEnabled"], true);
    assert_eq!(
        felix["metadata"]["annotations"]["operator.tigera.io/bpfEnabled"],
        "true"
    );
    // Patching bpfEnabled directly works too, and the Installation follows.
    env.ok(&[
        "patch",
        "felixconfig",
        "default",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"bpfEnabled":false}}"#,
    ]);
    let inst = env.get_json(&["installation", "default"]);
    assert_eq!(inst["spec"]["calicoNetwork"]["linuxDataplane"], "Iptables");
    let felix = env.get_json(&["felixconfig", "default"]);
    assert!(felix["metadata"].get("annotations").is_none(), "{felix}");
    // One write that contradicts itself is refused, naming both, and changes nothing.
    let both = r#"
apiVersion: operator.tigera.io/v1
kind: Installation
metadata: {name: default}
spec: {calicoNetwork: {linuxDataplane: BPF}}
---
apiVersion: projectcalico.org/v3
kind: FelixConfiguration
metadata: {name: default}
spec: {bpfLogLevel: "", bpfEnabled: false}
"#;
    let err = env.fails(&["apply", "-f", "-"], Some(both));
    assert!(
        err.contains("FelixConfiguration default spec.bpfEnabled: false contradicts Installation default spec.calicoNetwork.linuxDataplane: BPF"),
        "{err}"
    );
}

#[test]
fn bpf_dumps_without_pinned_maps_or_bpf_mode_fail_with_a_clear_line() {
    let env = Env::new();
    let empty = tempfile::tempdir().expect("tempdir");
    let dir = empty.path().to_string_lossy().into_owned();
    for view in [
        vec!["bpf", "nat", "dump"],
        vec!["bpf", "conntrack", "dump"],
        vec!["bpf", "routes", "dump"],
        vec!["bpf", "counters"],
    ] {
        let mut args = view.clone();
        args.extend(["--bpffs-dir", dir.as_str()]);
        let err = env.fails(&args, None);
        assert_eq!(
            err,
            format!(
                "Error: no BPF maps are pinned in {dir}/maps: the agent here does not run the BPF dataplane (margayctl node status shows each node's), or it pins elsewhere (--bpffs-dir, --node)"
            ),
            "{view:?}"
        );
    }
    let err = env.fails(
        &["bpf", "nat", "dump", "--bpffs-dir", &dir, "-o", "yaml"],
        None,
    );
    assert_eq!(
        err,
        "Error: unknown output format \"yaml\"; use text or json"
    );
    // A node whose agent runs Iptables has no maps to show.
    env.ok_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion": "projectcalico.org/v3", "kind": "Node", "metadata": {"name": "n1"},
            "spec": {"bgp": {"ipv4Address": "10.0.0.1/24"}},
            "status": {"dataplane": {"requested": "Iptables", "active": "Iptables"}}}"#,
    );
    let err = env.fails(&["bpf", "nat", "dump", "--node", "n1"], None);
    assert_eq!(
        err,
        "Error: node n1 runs the Iptables dataplane, not BPF: it has no BPF maps (margayctl node status n1 says why)"
    );
    let err = env.fails(&["bpf", "conntrack", "dump", "--node", "nope"], None);
    assert!(err.contains("nope"), "{err}");
}

/// `margayctl get ... | head` must not panic when head has gone: printing verbs end quietly,
/// with status 0. The reader is closed before the command starts, so every write fails with
/// EPIPE: through `outln!` (version), and through a `?`-propagated write error (get).
#[test]
fn printing_into_a_closed_pipe_exits_quietly() {
    let env = Env::new();
    for args in [
        &["version"][..],
        &["get", "felixconfiguration", "-o", "yaml"][..],
        &["get", "ippools"][..],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_margayctl"))
            .args(args)
            .env("MARGAY_DATASTORE", &env.url)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("margayctl");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "margayctl {args:?} into a closed pipe: {:?}, stderr {stderr:?}",
            out.status
        );
    }
}
