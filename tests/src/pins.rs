//! Pin directories of the tests' own (removed on drop), and maps pinned there by hand: the
//! shapes a pinned map might have after an upgrade or a capacity change.

use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::Path};

use anyhow::{Result, bail};

/// A directory under /sys/fs/bpf named after this test process, removed with its pins.
pub struct PinDir(pub std::path::PathBuf);

impl PinDir {
    pub fn new(name: &str) -> PinDir {
        PinDir(std::path::PathBuf::from(format!(
            "/sys/fs/bpf/{}{}-{name}",
            crate::netns::NETNS_PREFIX,
            std::process::id()
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A map's shape as BPF_MAP_CREATE takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zeroed bpf_attr-sized buffer with the fields `cmd` reads set;
    // pointers in it point at live buffers of the caller.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128usize) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Creates a map of `shape`, pins it at `path`, and returns its fd (closed by the caller,
/// or left to the process's end: the pin keeps the map).
pub fn pin_map(path: &Path, shape: RawShape) -> Result<i32> {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(shape.map_type) | (u64::from(shape.key_size) << 32);
    attr[1] = u64::from(shape.value_size) | (u64::from(shape.max_entries) << 32);
    attr[2] = u64::from(shape.flags);
    let fd = match bpf(BPF_MAP_CREATE, &mut attr) {
        Ok(fd) => fd as i32,
        Err(e) => bail!("BPF_MAP_CREATE {shape:?}: {e}"),
    };
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64;
    attr[1] = fd as u64;
    if let Err(e) = bpf(BPF_OBJ_PIN, &mut attr) {
        bail!("pinning at {}: {e}", path.display());
    }
    Ok(fd)
}

/// Writes one entry into the map `fd` (key and value as raw bytes of its sizes).
pub fn update(fd: i32, key: &[u8], value: &[u8]) -> Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = fd as u64;
    attr[1] = key.as_ptr() as u64;
    attr[2] = value.as_ptr() as u64;
    if let Err(e) = bpf(BPF_MAP_UPDATE_ELEM, &mut attr) {
        bail!("BPF_MAP_UPDATE_ELEM: {e}");
    }
    Ok(())
}
