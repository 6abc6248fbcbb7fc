//! Dropping the capabilities the daemon no longer needs once its programs are attached and
//! its sockets bound: everything but CAP_BPF, which every bpf(2) call (map updates, map
//! walks) needs while unprivileged BPF is disabled. A compromised daemon can then still
//! rewrite its own maps, but no longer load programs, touch interfaces, or read files
//! it does not own.

use anyhow::{Context as _, Result, bail};
use caps::{CapSet, Capability, CapsHashSet};

/// The one capability kept: CAP_BPF, or CAP_SYS_ADMIN on kernels before 5.8 (no CAP_BPF),
/// as its number and name.
pub fn kept_capability() -> Result<(u32, &'static str)> {
    let keep = kept()?;
    Ok((
        u32::from(keep.index()),
        if keep == Capability::CAP_BPF {
            "CAP_BPF"
        } else {
            "CAP_SYS_ADMIN"
        },
    ))
}

fn kept() -> Result<Capability> {
    let known = known_capabilities()?;
    Ok(if known.contains(&Capability::CAP_BPF) {
        Capability::CAP_BPF
    } else {
        Capability::CAP_SYS_ADMIN
    })
}

/// The capabilities this kernel knows.
fn known_capabilities() -> Result<CapsHashSet> {
    caps::runtime::procfs_all_supported(None)
        .context("reading the capabilities this kernel knows (/proc/sys/kernel/cap_last_cap)")
}

/// Drops every capability but [`kept_capability`] from the calling thread's bounding,
/// ambient, inheritable, permitted and effective sets, and sets no_new_privs. The daemon
/// runs on one thread, so that is the whole process; any thread started later inherits it.
pub fn drop_to_bpf_only() -> Result<&'static str> {
    let keep = kept()?;
    let (_, name) = kept_capability()?;
    // The bounding set first: dropping from it needs CAP_SETPCAP, dropped just after.
    for cap in known_capabilities()?.into_iter().filter(|c| *c != keep) {
        caps::drop(None, CapSet::Bounding, cap)
            .with_context(|| format!("dropping {cap} from the bounding set"))?;
    }
    let only: CapsHashSet = [keep].into_iter().collect();
    for set in [CapSet::Ambient, CapSet::Inheritable] {
        caps::clear(None, set).with_context(|| format!("clearing the {set:?} set"))?;
    }
    // Effective before permitted: the kernel keeps the one within the other.
    for set in [CapSet::Effective, CapSet::Permitted] {
        caps::set(None, set, &only).with_context(|| format!("setting the {set:?} set"))?;
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
    }
    let effective = caps::read(None, CapSet::Effective).context("reading the effective set")?;
    if effective != only {
        bail!("capabilities still effective after dropping: {effective:?}");
    }
    Ok(name)
}
