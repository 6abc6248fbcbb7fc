//! Attaching the program to an interface: native or generic XDP, or TC ingress (a TCX
//! link, or a cls_bpf filter where the kernel has no TCX); taking a predecessor's link over
//! without a gap; and detaching.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use api_shield_common::names;
use aya::programs::{
    LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    xdp::{XdpLink, XdpLinkId},
};

use super::{Shield, kernel};
use crate::config::AttachMode;

/// How the program ended up attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
    /// TC ingress (clsact), through a TCX link.
    Tc,
    /// TC ingress through a cls_bpf filter under a clsact qdisc (netlink): kernels
    /// without TCX.
    TcNetlink,
}

impl AttachedMode {
    /// The config's name for the mode.
    pub fn name(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
            AttachedMode::Tc | AttachedMode::TcNetlink => "tc",
        }
    }

    /// For logs: "native XDP mode", "generic XDP mode", "TC ingress mode".
    pub fn describe(self) -> &'static str {
        match self {
            AttachedMode::Native => "native XDP mode",
            AttachedMode::Generic => "generic XDP mode",
            AttachedMode::Tc => "TC ingress mode",
            AttachedMode::TcNetlink => "TC ingress mode (cls_bpf filter: no TCX)",
        }
    }

    pub fn is_tc(self) -> bool {
        matches!(self, AttachedMode::Tc | AttachedMode::TcNetlink)
    }
}

/// Where mode tc falls back to netlink, our filter's place under the clsact qdisc.
const TC_FILTER_PRIORITY: u16 = 0xa51;

const TC_FILTER_HANDLE: TcHandle = TcHandle::new(0, 1);

/// Whether a TCX attach failed because the kernel has no TCX (before 6.6 the link type
/// is unknown: EINVAL).
fn tcx_missing(e: &ProgramError) -> bool {
    matches!(e, ProgramError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EINVAL))
}

/// Removes our cls_bpf filter from `interface`'s ingress, if mode tc left one there on a
/// kernel without TCX. True if one was removed.
fn detach_tc_filter(interface: &str) -> bool {
    match tc::qdisc_detach_program(interface, TcAttachType::Ingress, names::PROGRAM_TC) {
        Ok(()) => true,
        Err(e) => {
            log::debug!("{interface}: no cls_bpf filter of ours to remove ({e})");
            false
        }
    }
}

/// The pinned link's name records the mode it was attached in (bpffs forbids dots in names).
fn link_pin_name(mode: AttachedMode) -> &'static str {
    match mode {
        AttachedMode::Native => "xdp_link_native",
        AttachedMode::Generic => "xdp_link_generic",
        // A cls_bpf filter has no link to pin; it is found by its place instead.
        AttachedMode::Tc | AttachedMode::TcNetlink => "tc_link",
    }
}

/// The XDP link pinned in `dir`, if any, with the mode it was attached in.
fn pinned_link(dir: &Path) -> Option<(PathBuf, AttachedMode)> {
    [
        AttachedMode::Native,
        AttachedMode::Generic,
        AttachedMode::Tc,
    ]
    .into_iter()
    .map(|m| (dir.join(link_pin_name(m)), m))
    .find(|(p, _)| p.exists())
}

/// Detaches the program pinned in `dir` and removes the pins: `api-shield detach`.
/// Returns what was removed. The daemon must not be running (it would re-pin).
pub fn detach_pinned(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    if let Some((path, mode)) = pinned_link(dir) {
        let link =
            PinnedLink::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let fd_link = link
            .unpin()
            .with_context(|| format!("unpinning {}", path.display()))?;
        // Dropping the last reference to a BPF link detaches its program.
        drop(fd_link);
        removed.push(format!(
            "{} link ({} mode)",
            if mode.is_tc() { "TC" } else { "XDP" },
            mode.name()
        ));
    }
    // The pin directory is named after the interface.
    if let Some(interface) = dir.file_name().and_then(|n| n.to_str())
        && detach_tc_filter(interface)
    {
        removed.push("TC filter (tc mode, cls_bpf)".to_owned());
    }
    if dir.exists() {
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.push(
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
        fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(removed)
}

impl Shield {
    /// Attaches to `interface` through a link pinned in the pin directory. If an earlier
    /// daemon left one there, the new program replaces the old in that link atomically
    /// (no moment without a program); else a new link is made and pinned. Returns the mode
    /// and whether an existing link was taken over.
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<(AttachedMode, bool)> {
        let dir = self
            .pin_dir
            .clone()
            .context("this Shield was loaded without a pin directory")?;
        if let Some((path, pinned_mode)) = pinned_link(&dir) {
            let wanted = match mode {
                AttachMode::Auto => pinned_mode != AttachedMode::Tc,
                AttachMode::Native => pinned_mode == AttachedMode::Native,
                AttachMode::Generic => pinned_mode == AttachedMode::Generic,
                AttachMode::Tc => pinned_mode == AttachedMode::Tc,
            };
            if wanted {
                match self.take_over_link(&path, pinned_mode) {
                    Ok(()) => {
                        self.attached.push((interface.to_owned(), pinned_mode));
                        return Ok((pinned_mode, true));
                    }
                    Err(e) => log::warn!(
                        "{interface}: the pinned link is unusable ({e:#}); attaching afresh"
                    ),
                }
            } else {
                log::info!(
                    "{interface}: re-attaching in {mode:?} mode (was {})",
                    pinned_mode.name()
                );
            }
            // Unpinning the last reference to the old link detaches its program.
            fs::remove_file(&path).ok();
        }
        let (chosen, fd_link) = match mode {
            AttachMode::Tc => {
                let program = self.tc_program()?;
                let attached = program.attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                );
                match attached {
                    Ok(id) => {
                        let link = program.take_link(id)?;
                        let fd_link = FdLink::try_from(link)
                            .context("TC attached through TCX without a BPF link")?;
                        (AttachedMode::Tc, fd_link)
                    }
                    Err(e) if tcx_missing(&e) => {
                        log::warn!(
                            "{interface}: this kernel ({}) has no TCX (Linux 6.6 and later): \
                             attaching through a clsact qdisc and a cls_bpf filter (netlink), \
                             which a restart replaces in place",
                            kernel::release()
                        );
                        let replaced = self.attach_tc_netlink(interface)?;
                        self.attached
                            .push((interface.to_owned(), AttachedMode::TcNetlink));
                        return Ok((AttachedMode::TcNetlink, replaced));
                    }
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("{interface}: attaching the TC ingress program")
                        });
                    }
                }
            }
            _ => {
                let (chosen, id) = self.attach(interface, mode)?;
                let link: XdpLink = self.program()?.take_link(id)?;
                // A cls_bpf filter of ours left from mode tc on a kernel without TCX
                // would judge every frame a second time.
                detach_tc_filter(interface);
                (
                    chosen,
                    FdLink::try_from(link)
                        .context("XDP attached without a BPF link (kernel < 5.9?)")?,
                )
            }
        };
        let path = dir.join(link_pin_name(chosen));
        fd_link
            .pin(&path)
            .with_context(|| format!("pinning the link at {}", path.display()))?;
        // Hold the link through the program, as a taken-over one is.
        self.take_over_link(&path, chosen)?;
        self.attached.push((interface.to_owned(), chosen));
        Ok((chosen, false))
    }

    /// Mode tc where the kernel has no TCX: our cls_bpf filter under the interface's clsact
    /// qdisc, at a fixed priority and handle, so that a restarted daemon replaces its
    /// predecessor's program in place (no moment without one). Returns whether it did.
    fn attach_tc_netlink(&mut self, interface: &str) -> Result<bool> {
        match tc::qdisc_add_clsact(interface) {
            Ok(()) | Err(TcError::AlreadyAttached) => {}
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("{interface}: adding the clsact qdisc"));
            }
        }
        let program = self.tc_program()?;
        let ours = SchedClassifierLink::attached(
            interface,
            TcAttachType::Ingress,
            TC_FILTER_PRIORITY,
            TC_FILTER_HANDLE,
            None,
        )
        .with_context(|| format!("{interface}: no such interface"))?;
        // Without NLM_F_CREATE the kernel only replaces: ENOENT says there is nothing to.
        let (id, replaced) = match program.attach_to_link(ours) {
            Ok(id) => (id, true),
            Err(ProgramError::TcError(TcError::NetlinkError(e)))
                if e.raw_os_error() == Some(libc::ENOENT) =>
            {
                let id = program
                    .attach_with_options(
                        interface,
                        TcAttachType::Ingress,
                        TcAttachOptions::Netlink(NlOptions {
                            priority: TC_FILTER_PRIORITY,
                            handle: TC_FILTER_HANDLE,
                            classid: None,
                        }),
                    )
                    .with_context(|| format!("{interface}: adding the cls_bpf filter"))?;
                (id, false)
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("{interface}: replacing our cls_bpf filter"));
            }
        };
        // The filter outlives this process, as a pinned link does: aya would remove it
        // when the program is dropped, so the link is let go of without detaching.
        std::mem::forget(program.take_link(id)?);
        Ok(replaced)
    }

    fn take_over_link(&mut self, path: &Path, mode: AttachedMode) -> Result<()> {
        let link = FdLink::from(
            PinnedLink::from_pin(path).with_context(|| format!("opening {}", path.display()))?,
        );
        match mode {
            AttachedMode::Tc | AttachedMode::TcNetlink => {
                let link = SchedClassifierLink::try_from(link)?;
                self.tc_program()?.attach_to_link(link)?;
            }
            _ => {
                let link = XdpLink::try_from(link)?;
                self.program()?.attach_to_link(link)?;
            }
        }
        Ok(())
    }

    /// Attaches the XDP program to `interface`; `auto` tries native XDP, then generic.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<(AttachedMode, XdpLinkId)> {
        let program = self.program()?;
        Ok(match mode {
            AttachMode::Native => (
                AttachedMode::Native,
                program.attach(interface, XdpMode::Driver)?,
            ),
            AttachMode::Generic => (
                AttachedMode::Generic,
                program.attach(interface, XdpMode::Skb)?,
            ),
            AttachMode::Tc => bail!("{interface}: mode tc attaches the TC program, not XDP"),
            AttachMode::Auto => {
                match program.attach(interface, XdpMode::Driver) {
                    Ok(link) => (AttachedMode::Native, link),
                    Err(native_err) => {
                        log::info!(
                            "{interface}: native XDP refused ({native_err}); trying generic XDP"
                        );
                        let link = program.attach(interface, XdpMode::Skb).with_context(|| {
                        format!("{interface}: native XDP failed ({native_err}) and so did generic XDP")
                    })?;
                        (AttachedMode::Generic, link)
                    }
                }
            }
        })
    }

    /// The XDP program, e.g. for BPF_PROG_TEST_RUN.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(names::PROGRAM_XDP)
            .context("the eBPF object has no XDP program")?
            .try_into()?)
    }

    /// The TC ingress program, e.g. for BPF_PROG_TEST_RUN.
    pub fn tc_program(&mut self) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(names::PROGRAM_TC)
            .context("the eBPF object has no TC program")?
            .try_into()?)
    }

    /// The kernel's id of the loaded program.
    pub fn program_id(&mut self) -> Result<u32> {
        if self.attached.iter().any(|(_, m)| m.is_tc()) {
            return Ok(self.tc_program()?.info()?.id());
        }
        Ok(self.program()?.info()?.id())
    }
}
