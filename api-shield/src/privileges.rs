//! Dropping the capabilities the daemon no longer needs once its programs are attached and
//! its sockets bound: everything but CAP_BPF, which every bpf(2) call (map updates, map
//! walks) needs while unprivileged BPF is disabled. A compromised daemon can then still
//! rewrite its own maps, but no longer load programs, touch interfaces, or read files
//! it does not own.

use anyhow::{Context as _, Result, bail};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The highest capability this kernel knows.
fn last_cap() -> Result<u32> {
    let text = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .context("reading /proc/sys/kernel/cap_last_cap")?;
    text.trim()
        .parse()
        .with_context(|| format!("parsing cap_last_cap {text:?}"))
}

/// The one capability kept: CAP_BPF, or CAP_SYS_ADMIN on kernels before 5.8 (no CAP_BPF).
pub fn kept_capability() -> Result<(u32, &'static str)> {
    Ok(if last_cap()? >= CAP_BPF {
        (CAP_BPF, "CAP_BPF")
    } else {
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")
    })
}

/// Drops every capability but [`kept_capability`] from the calling thread's bounding,
/// ambient, inheritable, permitted and effective sets, and sets no_new_privs. The daemon
/// runs on one thread, so that is the whole process; any thread started later inherits it.
pub fn drop_to_bpf_only() -> Result<&'static str> {
    let (keep, name) = kept_capability()?;
    let last = last_cap()?;
    // The bounding set first: dropping from it needs CAP_SETPCAP, dropped just after.
    for cap in (0..=last).filter(|c| *c != keep) {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL: a capability this kernel does not know; nothing to drop.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e)
                    .with_context(|| format!("dropping capability {cap} from the bounding set"));
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    let mut data = [CapData::default(); 2];
    let (word, bit) = ((keep / 32) as usize, 1u32 << (keep % 32));
    data[word].effective = bit;
    data[word].permitted = bit;
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset with a valid v3 header and two data words, as capset(2) documents.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("capset");
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
    }
    let effective = effective_capabilities("self")?;
    if effective != 1u64 << keep {
        bail!("capabilities still effective after dropping: {effective:#x}");
    }
    Ok(name)
}

/// The effective capability set of `/proc/<task>/status`, e.g. `self` or `1234/task/1235`.
pub fn effective_capabilities(task: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{task}/status"))
        .with_context(|| format!("reading /proc/{task}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff line")?;
    u64::from_str_radix(hex.trim(), 16).context("parsing CapEff")
}
