//! Helpers for api-shield's kernel and network tests (root required): crafted frames,
//! network-namespace sandboxes, real traffic, and running the daemon.

pub mod daemon;
pub mod flood;
pub mod frames;
pub mod fuzzing;
pub mod headlines;
pub mod http;
pub mod netns;
pub mod oracle;
pub mod pins;
pub mod rng;
pub mod traffic;

/// Fails the test unless it runs as root: kernel tests must never be silently skipped.
pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "kernel tests need root (CAP_BPF, CAP_NET_ADMIN): run `cargo xtask test` as root"
    );
}

/// The running kernel's (major, minor) version, from its release string.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| {
            n.parse::<u32>()
                .expect("a kernel release starts with numbers")
        });
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Whether the kernel has TCX links (merged in Linux 6.6); without them mode tc goes
/// through a clsact qdisc and a cls_bpf filter.
pub fn kernel_has_tcx() -> bool {
    kernel_version() >= (6, 6)
}

/// Unix time in seconds, as the daemon's registry stamps expiries.
pub fn registry_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Prints a reliability figure and appends it to the file `cargo xtask test` names in
/// API_SHIELD_FIGURES, which it prints at the end (captured test output would hide it).
pub fn figure(line: &str) {
    use std::io::Write as _;
    println!("reliability: {line}");
    if let Some(path) = std::env::var_os("API_SHIELD_FIGURES")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}
