//! Compiles every `bpf/progs/*.c` into a BPF object in OUT_DIR with clang (Debian's clang 14
//! works; see /work/shared/docs/toolchain.md). The objects are embedded by `src/objects.rs`.
//!
//! `-g` is required: without BTF there is no `.maps` section for aya to read. The clang binary
//! can be overridden with `MARGAY_CLANG`.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let bpf = manifest.join("../../bpf");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let clang = env::var("MARGAY_CLANG").unwrap_or_else(|_| "clang".to_owned());
    println!("cargo:rerun-if-env-changed=MARGAY_CLANG");
    println!("cargo:rerun-if-changed={}", bpf.display());
    for dir in ["include", "include/margay", "lib", "progs"] {
        println!("cargo:rerun-if-changed={}", bpf.join(dir).display());
    }

    // Debian keeps <asm/types.h> under the multiarch directory of the host.
    let multiarch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };

    let mut sources: Vec<PathBuf> = std::fs::read_dir(bpf.join("progs"))
        .expect("read bpf/progs")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    sources.sort();
    for header in list(&bpf.join("lib"))
        .into_iter()
        .chain(list(&bpf.join("include/margay")))
    {
        println!("cargo:rerun-if-changed={}", header.display());
    }
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src
            .file_stem()
            .expect("file stem")
            .to_string_lossy()
            .into_owned();
        let obj = out.join(format!("{stem}.o"));
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-Wall", "-Wextra", "-Werror", "-target", "bpf"])
            .arg(format!("-I/usr/include/{multiarch}"))
            .arg(format!("-I{}", bpf.join("include").display()))
            .arg(format!("-I{}", bpf.join("lib").display()))
            .arg("-c")
            .arg(src)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "running {clang}: {e}; install Debian's `clang` and `libbpf-dev` \
                     (scripts/install-deps.sh)"
                )
            });
        assert!(status.success(), "clang failed on {}", src.display());
    }
}

fn list(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}
