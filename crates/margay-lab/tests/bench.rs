//! `margay-lab bench --quick` end to end on a real lab of its own (root; CI runs it as root): every
//! figure is produced from real traffic, the outputs (JSON, Markdown, PNG plots) are written, and
//! the lab is gone afterwards. The figures themselves are not asserted (the machine is shared
//! and noisy); that traffic flowed through every path is.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::skip_unless_root;

#[test]
fn quick_bench_measures_every_path_and_writes_its_reports() {
    if skip_unless_root("quick_bench_measures_every_path_and_writes_its_reports") {
        return;
    }
    let name = format!("bench{:x}", std::process::id() % 0xfffff);
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_margay-lab"));
    let out = tempfile::tempdir().expect("temp dir");
    let run = Command::new(&bin)
        .args(["--name", &name, "bench", "--quick", "--out"])
        .arg(out.path())
        .output()
        .expect("run margay-lab bench");
    // The bench takes its lab down itself; this is for a run that crashed half-way.
    let _ = Command::new(&bin).args(["--name", &name, "down"]).output();
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        !std::path::Path::new(&format!("/run/netns/{name}-underlay")).exists(),
        "the bench left its lab up"
    );
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("bench.json")).expect("bench.json"),
    )
    .expect("valid JSON");
    let rows = json["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4, "1 and 1000 Services x two dataplanes");
    for row in rows {
        for (path, load) in row["load"].as_object().expect("loads") {
            assert!(
                load["requests"].as_u64().unwrap_or(0) > 0,
                "{} Services, {}: no request through {path}: {load}",
                row["services"],
                row["mode"]
            );
        }
        assert_eq!(
            row["endpoint_change_ms"].as_array().map(Vec::len),
            Some(3),
            "{row}"
        );
        assert!(row["programming_s"].as_f64().is_some());
    }
    for t in json["throughput"].as_array().expect("throughput") {
        assert!(t["pod_ip"]["bytes"].as_u64().unwrap_or(0) > 0, "{t}");
        assert!(t["cluster_ip"]["bytes"].as_u64().unwrap_or(0) > 0, "{t}");
    }
    assert!(json["switch"]["short"]["requests"].as_u64().unwrap_or(0) > 0);
    for png in [
        "rate_short.png",
        "p99_short.png",
        "rate_keepalive.png",
        "p99_keepalive.png",
    ] {
        let bytes = std::fs::read(out.path().join(png)).expect(png);
        assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
    }
    let md = std::fs::read_to_string(out.path().join("bench.md")).expect("bench.md");
    assert!(md.contains("### Targets"), "{md}");
}
