//! Golden tests: each `tests/golden/<case>/input.yaml` (a [`Scenario`]) must produce exactly
//! `expected.txt`, its iptables-restore text without a previous state. When the case also has
//! `update.yaml`, the text that moves a node from `input.yaml` to `update.yaml` must be exactly
//! `expected-update.txt`.
//!
//! The expected files are the specification: each was checked by hand against kube-proxy's
//! behaviour (see docs/design/iptables.md). After an intended change, regenerate them with
//! `MARGAY_BLESS=1 cargo test -p margay-calc --test golden` and review the diff.

use std::path::{Path, PathBuf};

use margay_calc::{Scenario, ruleset_to_restore};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn load(path: &Path) -> Scenario {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Scenario::from_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Compares `actual` with the file at `path`, or rewrites the file when blessing. Returns a
/// description of the difference, if any.
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
    for line in &exp {
        if !act.contains(line) {
            diff.push_str(&format!("- {line}\n"));
        }
    }
    for line in &act {
        if !exp.contains(line) {
            diff.push_str(&format!("+ {line}\n"));
        }
    }
    if exp.len() == act.len() && diff.lines().count() == 1 {
        diff.push_str("  (same lines, different order)\n");
    }
    Some(diff)
}

#[test]
fn golden_cases() {
    let bless = std::env::var("MARGAY_BLESS").is_ok_and(|v| v == "1");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("tests/golden exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.join("input.yaml").exists())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 15,
        "golden cases are missing: found {}",
        cases.len()
    );

    let mut failures = Vec::new();
    for case in &cases {
        let input = load(&case.join("input.yaml"));
        let ruleset = input.ruleset();
        failures.extend(check(
            &case.join("expected.txt"),
            &ruleset_to_restore(&ruleset, None),
            bless,
        ));
        let update = case.join("update.yaml");
        if update.exists() {
            let updated = load(&update).ruleset();
            failures.extend(check(
                &case.join("expected-update.txt"),
                &ruleset_to_restore(&updated, Some(&ruleset)),
                bless,
            ));
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

/// Every case computes the same text twice and whatever order its objects come in.
#[test]
fn output_does_not_depend_on_object_order() {
    for entry in std::fs::read_dir(golden_dir()).expect("tests/golden exists") {
        let path = entry.expect("readable entry").path().join("input.yaml");
        if !path.exists() {
            continue;
        }
        let mut scenario = load(&path);
        let forward = ruleset_to_restore(&scenario.ruleset(), None);
        scenario.services.reverse();
        scenario.slices.reverse();
        assert_eq!(
            forward,
            ruleset_to_restore(&scenario.ruleset(), None),
            "{}",
            path.display()
        );
    }
}
