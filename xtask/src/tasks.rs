//! `cargo xtask demo` and `cargo xtask test`.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{
    mutants, setup,
    util::{is_root, run},
    vm,
};

pub(crate) fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub(crate) fn require_root(task: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask {task}` loads eBPF programs and creates network namespaces: run it as root"
        );
    }
    Ok(())
}

pub(crate) fn setup_if_needed() -> Result<()> {
    if setup::is_complete() {
        println!("setup: everything is installed");
        return Ok(());
    }
    setup::setup()
}

/// bpffs, for tools that pin (bpftool, xdp-filter); harmless when already mounted.
pub(crate) fn mount_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// The daemon, the demo and the test helpers' binaries, which demo and test run.
pub(crate) fn build_binaries() -> Result<()> {
    println!("build: api-shield and the demo");
    run(cargo().args([
        "build",
        "--quiet",
        "-p",
        "api-shield",
        "-p",
        "api-shield-tests",
        "--bins",
    ]))
}

pub(crate) fn demo() -> Result<()> {
    require_root("demo")?;
    setup_if_needed()?;
    mount_bpffs()?;
    build_binaries()?;
    run(&mut Command::new(
        workspace_root().join("target/debug/demo"),
    ))
}

/// Measurements into docs/benchmarks.md, with release builds; timings are never asserted.
/// `cargo xtask flood`: the end-to-end flood comparison alone, printed (not written).
pub(crate) fn flood(quick: bool) -> Result<()> {
    build_release("flood")?;
    let root = workspace_root();
    let mut cmd = Command::new(root.join("target/release/flood"));
    cmd.current_dir(&root)
        .env("API_SHIELD_BIN", root.join("target/release/api-shield"));
    if quick {
        cmd.arg("--quick");
    }
    run(&mut cmd)
}

fn build_release(what: &str) -> Result<()> {
    require_root(what)?;
    setup_if_needed()?;
    mount_bpffs()?;
    println!("build: release binaries for the benchmarks");
    run(cargo().args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "api-shield",
        "-p",
        "api-shield-tests",
        "--bins",
    ]))
}

pub(crate) fn bench(quick: bool, only: Option<&str>) -> Result<()> {
    build_release("bench")?;
    let root = workspace_root();
    let mut cmd = Command::new(root.join("target/release/bench"));
    cmd.current_dir(&root)
        .env("API_SHIELD_BIN", root.join("target/release/api-shield"));
    match only {
        Some(sections) => cmd.args(["--only", sections, "--out", "target/benchmarks-partial.md"]),
        None => cmd.args(["--out", "docs/benchmarks.md"]),
    };
    if quick {
        cmd.arg("--quick");
    }
    run(&mut cmd)
}

pub(crate) fn test(soak: bool, kernels: &[String], host_only: bool) -> Result<()> {
    require_root("test")?;
    setup_if_needed()?;
    mount_bpffs()?;
    let mut tally = Tally::default();
    if kernels.is_empty() {
        host_tests(soak, &mut tally)?;
    } else {
        build_binaries()?;
    }
    if !host_only {
        let matrix: Vec<String> = if kernels.is_empty() {
            vm::DEFAULT_MATRIX.iter().map(|k| (*k).to_owned()).collect()
        } else {
            kernels.to_vec()
        };
        for kernel in &matrix {
            vm_tests(kernel, &mut tally)?;
        }
    }
    // One closing line for every test binary together.
    println!("{} passed, {} failed", tally.passed, tally.failed);
    Ok(())
}

/// Lints, unit tests and the kernel and network tests, on this machine's kernel.
pub(crate) fn host_tests(soak: bool, tally: &mut Tally) -> Result<()> {
    println!("test: formatting");
    run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("`cargo fmt --all` would change files: run it")?;
    println!("test: clippy");
    run(cargo().args(["clippy", "--quiet", "--all-targets", "--", "-D", "warnings"]))?;
    // The eBPF crate only builds for the bpf target, with the nightly (see the style notes).
    println!("test: clippy (eBPF crate)");
    run(Command::new("rustup")
        .current_dir(workspace_root())
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--quiet",
            "-p",
            "api-shield-ebpf",
            "--target",
            "bpfel-unknown-none",
        ])
        .args([
            "-Z",
            "build-std=core",
            "--target-dir",
            "target/ebpf-clippy",
            "--",
            "-D",
            "warnings",
        ])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO"))?;
    build_binaries()?;
    let mutants = mutants::build(&workspace_root())?;
    // The reliability tests append their figures (frames fuzzed, faults injected, entries
    // checked) here; they are printed at the end and recorded in docs/reliability.md.
    let figures = workspace_root().join("target/reliability-figures.txt");
    let _ = std::fs::remove_file(&figures);
    let with_env = |cmd: &mut Command| {
        cmd.env("API_SHIELD_FIGURES", &figures)
            .env("API_SHIELD_MUTANTS", &mutants);
        if soak {
            cmd.env("API_SHIELD_SOAK", "1");
        }
    };
    println!(
        "test: unit tests (no kernel){}",
        if soak { ", soak" } else { "" }
    );
    let mut unit = cargo();
    unit.args([
        "test",
        "-p",
        "api-shield",
        "-p",
        "api-shield-common",
        "-p",
        "xtask",
    ]);
    with_env(&mut unit);
    tally.run(&mut unit)?;
    // Kernel tests share CPUs and time: one at a time, so rate checks are not disturbed.
    println!(
        "test: kernel and network tests on this machine's kernel ({}): BPF_PROG_TEST_RUN, namespaces + veth",
        kernel_release()
    );
    let mut kernel = cargo();
    kernel
        .args(["test", "-p", "api-shield-tests", "--", "--test-threads=1"])
        .env(
            "API_SHIELD_BIN",
            workspace_root().join("target/debug/api-shield"),
        );
    with_env(&mut kernel);
    tally.run(&mut kernel)?;
    if let Ok(text) = std::fs::read_to_string(&figures) {
        println!("reliability figures (see docs/reliability.md):");
        for line in text.lines() {
            println!("  {line}");
        }
    }
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The test binaries of api-shield-tests that [`vm::VM_TESTS`] names, built for the host.
fn vm_test_binaries() -> Result<Vec<(String, PathBuf)>> {
    let names: Vec<&str> = vm::VM_TESTS.iter().map(|(n, _)| *n).collect();
    test_binaries(&names)
}

/// The test binaries of api-shield-tests called `names`, built for the host, in that order.
pub(crate) fn test_binaries(names: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let out = cargo()
        .args([
            "test",
            "-p",
            "api-shield-tests",
            "--no-run",
            "--quiet",
            "--message-format=json",
        ])
        .output()
        .context("building the test binaries")?;
    if !out.status.success() {
        bail!(
            "building the test binaries failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = message["target"]["name"].as_str().unwrap_or_default();
        if message["reason"] == "compiler-artifact"
            && message["profile"]["test"] == true
            && names.contains(&name)
            && let Some(exe) = message["executable"].as_str()
        {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    for name in names {
        if !found.iter().any(|(n, _)| n == name) {
            bail!("no test binary `{name}` in api-shield-tests");
        }
    }
    found.sort_by_key(|(n, _)| names.iter().position(|t| t == n));
    Ok(found)
}

/// The kernel-level tests inside a VM booted with `spec`.
fn vm_tests(spec: &str, tally: &mut Tally) -> Result<()> {
    let kernel = vm::resolve(spec)?;
    let binaries = vm_test_binaries()?;
    println!(
        "test: kernel-level tests on Linux {} in a VM ({}); the fuzzer runs {} frames per test there",
        kernel.release,
        vm::VM_TESTS
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", "),
        vm::VM_FUZZ_FRAMES
    );
    let root = workspace_root();
    let out_dir = root.join("target/vm").join(&kernel.label);
    let env = [
        (
            "API_SHIELD_BIN".to_owned(),
            root.join("target/debug/api-shield").display().to_string(),
        ),
        (
            "API_SHIELD_FUZZ_FRAMES".to_owned(),
            vm::VM_FUZZ_FRAMES.to_string(),
        ),
        (
            "API_SHIELD_FIGURES".to_owned(),
            out_dir.join("figures.txt").display().to_string(),
        ),
    ];
    let outcomes = vm::run_tests(&kernel, &binaries, &env, &root.join("tests"), &out_dir)?;
    let mut failed = Vec::new();
    for outcome in outcomes {
        println!("--- {} on Linux {}", outcome.name, kernel.release);
        for line in outcome.output.lines() {
            println!("{line}");
            tally.count(line);
        }
        if outcome.exit_code != Some(0) {
            failed.push(format!(
                "{} ({})",
                outcome.name,
                outcome.exit_code.map_or(
                    "no exit code: the VM stopped first".to_owned(),
                    |c| format!("exit {c}")
                )
            ));
        }
    }
    if !failed.is_empty() {
        println!("{} passed, {} failed", tally.passed, tally.failed.max(1));
        bail!(
            "on Linux {}, these failed: {}",
            kernel.release,
            failed.join(", ")
        );
    }
    Ok(())
}

/// Adds up cargo test's "test result:" lines while passing its output through.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) passed: u64,
    pub(crate) failed: u64,
}

impl Tally {
    fn count(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("test result: ") {
            self.passed += count_before(rest, "passed");
            self.failed += count_before(rest, "failed");
        }
    }

    pub(crate) fn run(&mut self, cmd: &mut Command) -> Result<()> {
        use std::io::{BufRead as _, BufReader};
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start {cmd:?}"))?;
        let stdout = child.stdout.take().context("cargo test stdout")?;
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            self.count(&line);
        }
        let status = child.wait()?;
        if !status.success() {
            println!("{} passed, {} failed", self.passed, self.failed.max(1));
            bail!("{cmd:?} failed: {status}");
        }
        Ok(())
    }
}

/// In "ok. 13 passed; 0 failed; ...", the number before `word`.
fn count_before(text: &str, word: &str) -> u64 {
    text.split(';')
        .find_map(|part| {
            let mut words = part.split_whitespace().rev();
            (words.next() == Some(word)).then(|| words.next()).flatten()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::count_before;

    #[test]
    fn reads_cargo_test_result_lines() {
        let line =
            "ok. 13 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 4.59s";
        assert_eq!(count_before(line, "passed"), 13);
        assert_eq!(count_before(line, "failed"), 2);
        assert_eq!(count_before("FAILED. 0 passed; 1 failed;", "failed"), 1);
    }
}
