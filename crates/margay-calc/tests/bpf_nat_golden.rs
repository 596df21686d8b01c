//! Golden tests of the BPF Service NAT: each `tests/golden-bpf-nat/<case>/input.yaml` (a
//! [`Scenario`]; pools are ignored) must produce exactly `expected.txt`, the dump of the NAT
//! maps on a fresh node. When the case also has `update.yaml`, the operations that move the maps
//! from `input.yaml` to `update.yaml` (ids kept) must be exactly `expected-update.txt`.
//!
//! The expected files are the specification: each was checked by hand against the semantics in
//! docs/design/services-nat.md. After an intended change, regenerate them with
//! `MARGAY_BLESS=1 cargo test -p margay-calc --test bpf_nat_golden` and review the diff.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use margay_calc::Scenario;
use margay_calc::bpf_nat::{NatModel, bpf_nat_model};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden-bpf-nat")
}

fn load(path: &Path) -> Scenario {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Scenario::from_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn model(s: &Scenario, previous: &NatModel) -> NatModel {
    bpf_nat_model(&s.services, &s.slices, &s.node, previous)
}

/// Compares `actual` with the file at `path`, or rewrites the file when blessing.
fn check(path: &Path, actual: &str, bless: bool) -> Option<String> {
    if bless {
        std::fs::write(path, actual).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return None;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_default();
    if expected == actual {
        return None;
    }
    let mut diff = format!("{} differs (- expected, + actual):\n", path.display());
    let (exp, act): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    for line in exp.iter().filter(|l| !act.contains(l)) {
        let _ = writeln!(diff, "- {line}");
    }
    for line in act.iter().filter(|l| !exp.contains(l)) {
        let _ = writeln!(diff, "+ {line}");
    }
    Some(diff)
}

fn cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("tests/golden-bpf-nat exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.join("input.yaml").exists())
        .collect();
    cases.sort();
    cases
}

#[test]
fn golden_cases() {
    let bless = std::env::var("MARGAY_BLESS").is_ok_and(|v| v == "1");
    let cases = cases();
    assert!(
        cases.len() >= 15,
        "golden cases are missing: found {}",
        cases.len()
    );

    let mut failures = Vec::new();
    for case in &cases {
        let before = model(&load(&case.join("input.yaml")), &NatModel::default());
        failures.extend(check(&case.join("expected.txt"), &before.dump(), bless));
        let update = case.join("update.yaml");
        if update.exists() {
            let after = model(&load(&update), &before);
            let diff = before.diff(&after);
            let mut text = diff.to_string();
            let touched: Vec<String> = diff
                .touched_ids()
                .iter()
                .map(|id| {
                    let name = after.services.get(id).or(before.services.get(id));
                    format!("{id:#010x} {}", name.map_or("(unnamed)", String::as_str))
                })
                .collect();
            let _ = writeln!(text, "# {} operations; services touched:", diff.len());
            for t in touched {
                let _ = writeln!(text, "#   {t}");
            }
            failures.extend(check(&case.join("expected-update.txt"), &text, bless));
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden file(s) differ; if the change is intended, rerun with MARGAY_BLESS=1 and \
         review the diff\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every case gives the same maps whatever order its objects come in, and recomputing a model
/// over itself changes nothing (ids are sticky).
#[test]
fn output_is_stable() {
    for case in cases() {
        let mut scenario = load(&case.join("input.yaml"));
        let forward = model(&scenario, &NatModel::default());
        scenario.services.reverse();
        scenario.slices.reverse();
        let reversed = model(&scenario, &NatModel::default());
        assert_eq!(forward, reversed, "{}", case.display());
        let again = model(&scenario, &forward);
        assert!(forward.diff(&again).is_empty(), "{}", case.display());
        assert_eq!(forward.services, again.services, "{}", case.display());
    }
}
