//! Starting: what is checked before anything is loaded (the kernel's features, the
//! interfaces, bpffs), and what a start that fails undoes.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::shield::kernel;

pub(super) fn interface_exists(name: &str) -> bool {
    std::ffi::CString::new(name)
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        .is_ok_and(|c| unsafe { libc::if_nametoindex(c.as_ptr()) } != 0)
}

/// Writes the whole verifier log of a refused program to the state directory, so the
/// error can name it; other errors pass through.
pub(super) fn save_verifier_log(mut e: anyhow::Error, dir: &Path) -> anyhow::Error {
    if let Some(refused) = e.downcast_mut::<kernel::ProgramRefused>()
        && let Err(io) = refused.save(dir)
    {
        log::warn!("could not save the verifier log in {}: {io}", dir.display());
    }
    e
}

/// Undoes a start that fails: removes the admin socket and the pin directories (maps,
/// links, TC filter) this start created. Pins found from an earlier daemon stay: their
/// program goes on enforcing.
pub(super) struct StartGuard {
    root: PathBuf,
    root_existed: bool,
    socket: PathBuf,
    created: Vec<PathBuf>,
    done: bool,
}

impl StartGuard {
    pub(super) fn new(root: &Path, socket: &Path) -> StartGuard {
        StartGuard {
            root: root.to_owned(),
            root_existed: root.exists(),
            socket: socket.to_owned(),
            created: Vec::new(),
            done: false,
        }
    }

    /// Notes an interface's pin directory before anything is pinned there.
    pub(super) fn pins_of(&mut self, dir: &Path) {
        if !dir.exists() {
            self.created.push(dir.to_owned());
        }
    }

    pub(super) fn succeeded(&mut self) {
        self.done = true;
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let _ = std::fs::remove_file(&self.socket);
        for dir in &self.created {
            match crate::shield::detach_pinned(dir) {
                Ok(removed) if !removed.is_empty() => log::info!(
                    "start failed: removed what it made in {} ({})",
                    dir.display(),
                    removed.join(", ")
                ),
                Ok(_) => {}
                Err(e) => log::error!(
                    "start failed, and removing {} failed too: {e:#}",
                    dir.display()
                ),
            }
        }
        if !self.root_existed {
            // Only if empty: another interface's pins may be there.
            let _ = std::fs::remove_dir(&self.root);
        }
    }
}

/// Pins need a BPF filesystem; mount one at /sys/fs/bpf if the pin directory is below it.
pub(super) fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let bpffs = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(bpffs) {
        return Ok(());
    }
    let c = std::ffi::CString::new("/sys/fs/bpf")?;
    // SAFETY: statfs into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type == BPF_FS_MAGIC {
        return Ok(());
    }
    log::info!("mounting a BPF filesystem at /sys/fs/bpf");
    let (src, fstype) = (
        std::ffi::CString::new("bpf")?,
        std::ffi::CString::new("bpf")?,
    );
    // SAFETY: mount(2) with valid C strings and no data.
    if unsafe {
        libc::mount(
            src.as_ptr(),
            c.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    } != 0
    {
        bail!(
            "mounting bpffs at /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
