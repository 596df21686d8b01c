//! The seed end to end: runs `examples/seed-walkthrough.sh` (the Calico eBPF lab and its reversal
//! on a real 3-node lab, every step checked) with the binaries of this build, and fails when any
//! step's check fails. Root only; run by CI as root. The script takes its lab down on exit; the
//! guard here takes it down too, should the script be killed.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::skip_unless_root;

struct LabGuard {
    bin_dir: PathBuf,
    name: String,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = Command::new(self.bin_dir.join("margay-lab"))
            .args(["--name", &self.name, "down"])
            .output();
    }
}

#[test]
fn the_seed_walkthrough_passes_every_step_and_its_reversal() {
    if skip_unless_root("the_seed_walkthrough_passes_every_step_and_its_reversal") {
        return;
    }
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_margay-lab"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let guard = LabGuard {
        bin_dir: bin_dir.clone(),
        name: format!("walk{:x}", std::process::id() % 0xfffff),
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(root.join("examples/seed-walkthrough.sh"))
        .arg("--bin")
        .arg(&bin_dir)
        .args(["--name", &guard.name])
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the walkthrough failed ({}):\n{stderr}\n--- its output:\n{stdout}",
        out.status
    );
    let plain = stdout.replace("\u{1b}[32m", "").replace("\u{1b}[0m", "");
    for shown in [
        "-> ok: node-1 has its WireGuard interface",
        "-> ok: blank: no WireGuard interface address or public key on any node",
        "-> ok: the customer sees a NODE's address",
        "-> ok: the customer sees the client's address (203.0.113.10)",
        "-> ok: bpfKubeProxyIptablesCleanupEnabled is gone",
        "-> ok: the customer sees a NODE's address again",
        "Walkthrough complete",
    ] {
        assert!(
            plain.contains(shown),
            "the walkthrough did not show {shown:?}"
        );
    }
}
