//! The data plane's mutants: builds of the eBPF object with one deliberate bug each (a
//! cargo feature of api-shield-ebpf), for the mutation tests to load and see the fuzzer
//! catch. Built here, not by build.rs, so an ordinary build never spends time on them.

use std::{path::PathBuf, process::Command};

use anyhow::{Result, bail};

use crate::util::run;

/// The features that plant a bug, as the eBPF crate's Cargo.toml names them.
pub(crate) const MUTANTS: &[&str] = &["mutant-prefix-off-by-one", "mutant-ext-len"];

/// Builds every mutant's object under `root`/target/mutants; returns that directory. The
/// object of mutant M is M/bpfel-unknown-none/release/api-shield there.
pub(crate) fn build(root: &std::path::Path) -> Result<PathBuf> {
    let dir = root.join("target/mutants");
    for mutant in MUTANTS {
        println!("build: data-plane mutant {mutant}");
        // As aya-build builds the real object (its flags, its toolchain).
        let flags = [
            "--cfg=bpf_target_arch=\"x86_64\"",
            "-Cdebuginfo=2",
            "-Clink-arg=--btf",
        ]
        .join("\u{1f}");
        run(Command::new("rustup")
            .current_dir(root)
            .args(["run", "nightly", "cargo", "build", "--quiet"])
            .args(["--package", "api-shield-ebpf", "--bin", "api-shield"])
            .args(["--release", "--target", "bpfel-unknown-none"])
            .args(["-Z", "build-std=core", "--features", mutant])
            .arg("--target-dir")
            .arg(dir.join(mutant))
            .env("CARGO_ENCODED_RUSTFLAGS", flags)
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CARGO"))?;
        let object = dir
            .join(mutant)
            .join("bpfel-unknown-none/release/api-shield");
        if !object.is_file() {
            bail!("the build of {mutant} left no {}", object.display());
        }
    }
    Ok(dir)
}
