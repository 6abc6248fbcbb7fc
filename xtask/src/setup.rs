//! `cargo xtask setup`: installs what building and testing api-shield needs, idempotently,
//! one line of output per step. Facts behind each step: shared/notes/toolchain.md.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    util::{command_output, run},
    vm,
};

/// Debian packages the tests, the demo and the benchmarks use.
pub(crate) const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "network namespaces and veth pairs (ip)"),
    ("util-linux", "nsenter and setpriv"),
    ("procps", "sysctl and pgrep"),
    ("systemd", "systemd-analyze, which checks the shipped unit"),
    (
        "bpftool",
        "inspecting loaded programs; running peers by BPF_PROG_TEST_RUN",
    ),
    ("xdp-tools", "xdp-filter, a peer in the benchmarks"),
    ("nftables", "nftables, a peer in the benchmarks"),
    ("iptables", "iptables + hashlimit, a peer in the benchmarks"),
    ("ipset", "ipset, a peer in the benchmarks"),
    ("netsniff-ng", "trafgen, a packet generator"),
    ("hping3", "hping3, a packet generator"),
    ("wrk", "wrk, an HTTP load generator"),
    ("nginx-light", "nginx, an API server stand-in"),
    ("prometheus", "promtool, which checks the metrics output"),
    (
        "qemu-system-x86",
        "QEMU, which boots the other kernels the tests run on",
    ),
    ("kmod", "modprobe, inside those VMs"),
    ("busybox-static", "virtme-ng's initramfs for those VMs"),
    ("python3-venv", "a venv for virtme-ng"),
];

/// Runs every step; stops at the first one that cannot be done, naming it.
pub(crate) fn setup() -> Result<()> {
    rust_src().context("setup step `rust-src for the nightly toolchain` failed")?;
    bpf_linker().context("setup step `bpf-linker` failed")?;
    debian_packages().context("setup step `Debian packages` failed")?;
    vm::install_virtme_ng().context("setup step `virtme-ng` failed")?;
    for kernel in vm::DEFAULT_MATRIX {
        let image =
            vm::resolve(kernel).with_context(|| format!("setup step `kernel {kernel}` failed"))?;
        println!("setup: kernel {kernel} for the VM tests: {}", image.release);
    }
    println!("setup: done");
    Ok(())
}

/// True when nothing needs installing: lets `demo` and `test` skip setup cheaply.
pub(crate) fn is_complete() -> bool {
    rust_src_installed().unwrap_or(false)
        && bpf_linker_works()
        && missing_debian_packages().is_ok_and(|m| m.is_empty())
        && vm::virtme_ng_installed()
        && vm::DEFAULT_MATRIX.iter().all(|k| vm::cached(k))
}

fn rust_src_installed() -> Result<bool> {
    let out = command_output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    Ok(out.lines().any(|l| l.starts_with("rust-src")))
}

fn rust_src() -> Result<()> {
    if rust_src_installed().context("the nightly toolchain is not installed (rustup)")? {
        println!("setup: rust-src for nightly: already installed");
        return Ok(());
    }
    println!("setup: rust-src for nightly: installing");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// bpf-linker must use the nightly's LLVM major; the nightly ships its own libLLVM.so,
/// which bpf-linker links dynamically from a prefix that holds it (no system LLVM needed).
fn bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        let version = command_output(Command::new("bpf-linker").arg("--version"))?;
        println!("setup: bpf-linker: already installed ({})", version.trim());
        return Ok(());
    }
    let sysroot = PathBuf::from(
        command_output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let verbose = command_output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("`rustc +nightly -vV` names no LLVM version")?
        .to_owned();
    let prefix = llvm_prefix()?;
    link_nightly_llvm(&sysroot.join("lib"), &prefix)?;
    println!("setup: bpf-linker: building against the nightly's LLVM {major} (about a minute)");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))?;
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails; is ~/.cargo/bin on PATH?"
        );
    }
    println!("setup: bpf-linker: installed");
    Ok(())
}

fn llvm_prefix() -> Result<PathBuf> {
    let home = env::var_os("HOME").context("HOME is not set")?;
    Ok(Path::new(&home).join(".local/share/api-shield/llvm-prefix"))
}

/// Makes `prefix/lib` hold the nightly's libLLVM under the names bpf-linker's build looks for.
fn link_nightly_llvm(nightly_lib: &Path, prefix: &Path) -> Result<()> {
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let mut versioned = None;
    for entry in fs::read_dir(nightly_lib).with_context(|| nightly_lib.display().to_string())? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.starts_with("libLLVM") {
            continue;
        }
        if name.starts_with("libLLVM.so.") {
            versioned = Some(path.clone());
        }
        replace_symlink(&path, &lib.join(name))?;
    }
    let versioned = versioned.with_context(|| {
        format!(
            "no libLLVM.so.* in {}; is the nightly toolchain complete?",
            nightly_lib.display()
        )
    })?;
    replace_symlink(&versioned, &lib.join("libLLVM.so"))
}

fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    if fs::symlink_metadata(link).is_ok() {
        fs::remove_file(link).with_context(|| format!("removing {}", link.display()))?;
    }
    symlink(target, link).with_context(|| format!("linking {}", link.display()))
}

fn missing_debian_packages() -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for (package, _) in DEBIAN_PACKAGES {
        let status = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", package])
            .output()
            .context("dpkg-query is missing: setup needs a Debian-based system")?;
        if !String::from_utf8_lossy(&status.stdout).contains("install ok installed") {
            missing.push(*package);
        }
    }
    Ok(missing)
}

fn debian_packages() -> Result<()> {
    let missing = missing_debian_packages()?;
    if missing.is_empty() {
        println!(
            "setup: Debian packages: all {} installed",
            DEBIAN_PACKAGES.len()
        );
        return Ok(());
    }
    println!("setup: Debian packages: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update failed (setup must run as root)")?;
    let install = run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if let Err(e) = install {
        let still = missing_debian_packages()?;
        bail!(
            "could not install Debian packages {}: {e:#}",
            still.join(" ")
        );
    }
    println!("setup: Debian packages: installed");
    Ok(())
}
