//! Many map updates or deletions in one system call (BPF_MAP_UPDATE_BATCH and
//! BPF_MAP_DELETE_BATCH), which aya 0.14 does not offer: the list maps take a million
//! entries in a second this way, where one call each takes several.

use anyhow::{Context as _, Result, bail};
use api_shield_common::maps;
use aya::Ebpf;

/// Entries per batch.
const BATCH_CHUNK: usize = 1 << 14;

/// The map `name` of `ebpf`.
pub(crate) fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

/// [`map_batch`] over `keys` (and `values`) in chunks of [`BATCH_CHUNK`]: how
/// many of them, from the start, were done before a batch stopped short.
pub(crate) fn in_batches<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    map: &'static str,
    keys: &[K],
    values: Option<&[V]>,
) -> Result<usize> {
    if values.is_some_and(|v| v.len() != keys.len()) {
        bail!(
            "{} keys for {map} with another number of values",
            keys.len()
        );
    }
    let mut done = 0;
    for (i, chunk) in keys.chunks(BATCH_CHUNK).enumerate() {
        let values = values.map(|v| &v[i * BATCH_CHUNK..i * BATCH_CHUNK + chunk.len()]);
        let n = map_batch(ebpf, map, chunk, values)?;
        done += n;
        if n < chunk.len() {
            break;
        }
    }
    Ok(done)
}

/// BPF_MAP_UPDATE_BATCH of `keys` and `values` on the hash or trie `map` (without
/// values, BPF_MAP_DELETE_BATCH of `keys`): how many the kernel did before it stopped,
/// all of them unless something failed. The caller does the rest one by one, which
/// reports each failure as it is (a full map, a missing entry, or no batch support at
/// all). `K` and `V` must be the map's key and value types.
fn map_batch<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    map: &'static str,
    keys: &[K],
    values: Option<&[V]>,
) -> Result<usize> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let count = keys.len();
    if values.is_some_and(|v| v.len() != count) {
        bail!("a batch of {count} keys with another number of values");
    }
    /// The batch member of `union bpf_attr`.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
    let key_size = std::mem::size_of::<K>() as u32;
    let value_size = std::mem::size_of::<V>() as u32;
    let spec = maps::ALL.iter().find(|s| s.name == map);
    if spec.is_none_or(|s| {
        ![maps::BPF_MAP_TYPE_HASH, maps::BPF_MAP_TYPE_LPM_TRIE].contains(&s.map_type)
            || s.key_size != key_size
            || (values.is_some() && s.value_size != value_size)
    }) {
        bail!(
            "map {map} is not a hash map or trie of {key_size}-byte keys (and {value_size}-byte values)"
        );
    }
    let fd = match map_mut(ebpf, map)? {
        aya::maps::Map::HashMap(data) | aya::maps::Map::LpmTrie(data) => {
            data.fd().as_fd().as_raw_fd()
        }
        _ => bail!("map {map} is not a hash map or trie"),
    };
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: u32::try_from(count).context("batch too large")?,
        map_fd: fd as u32,
        elem_flags: 0,
        flags: 0,
    };
    let cmd = if values.is_some() {
        BPF_MAP_UPDATE_BATCH
    } else {
        BPF_MAP_DELETE_BATCH
    };
    // SAFETY: `attr` points at `count` keys (and values) of the map's sizes (checked
    // against its shape above), alive for the call; the kernel writes back only
    // `attr.count`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw mut attr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if ret >= 0 {
        return Ok(count);
    }
    // Refused before the first entry (no batch support, bad attributes): the kernel
    // wrote no count. Past that, it says how far it got.
    const ENOTSUPP: i32 = 524;
    Ok(match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | ENOTSUPP) => 0,
        _ => (attr.count as usize).min(count),
    })
}
