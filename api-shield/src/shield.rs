//! The loaded data plane: loading with capacities, attaching, and typed access to its maps.

use std::{
    collections::BTreeSet,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use api_shield_common::{
    counters::{COUNTER_SLOTS, Counter, Reason},
    events::EVENTS_RING_BYTES,
    limiter::{
        DEFAULT_LIMIT, LIMIT_SLOTS, LIMITER_WAYS, LimiterKey, LimiterSet, LimiterState, RateLimit,
    },
    lists::{HashedV6Key, InnerV4, InnerV6, ListVerdict, summary_v6},
    names,
    rules::{PENALTY_RING_BYTES, RuleCounter, TABLE_SLOTS},
    settings::{SETTINGS_DRY_RUN, SETTINGS_RULES, Settings},
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapInfo, MapType, PerCpuArray, RingBuf, lpm_trie::Key,
    },
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
        xdp::{XdpLink, XdpLinkId},
    },
};
use ipnet::IpNet;

use crate::{
    EBPF_OBJECT,
    config::{AttachMode, Capacity, Config, OnMalformed},
    kernel,
    limiter::LimiterTable,
    limits::{event_limit, limit_slot, rule_table},
    lists::{ListDiff, ListTable, fold},
    summary::{self, Family, InnerVerdicts, SummaryMaps, inner_key},
};

/// Sets of the limiter table for `sources` buckets (rounded up to whole sets).
fn limiter_sets(sources: u32) -> u32 {
    sources.div_ceil(LIMITER_WAYS as u32).max(1)
}

/// The shape a map must have; a pinned map of another shape is never reused silently.
struct MapShape {
    name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

fn map_shapes(capacity: &Capacity) -> Result<Vec<MapShape>> {
    use std::mem::size_of;
    let list_entries = u32::try_from(capacity.blocklist.0 + capacity.allowlist.0)
        .context("capacity.blocklist + capacity.allowlist exceeds 2^32")?;
    let sources = u32::try_from(capacity.sources.0).context("capacity.sources exceeds 2^32")?;
    let limiter_sets = limiter_sets(sources);
    Ok(vec![
        MapShape {
            name: names::MAP_LIST_V4,
            map_type: MapType::LpmTrie,
            key_size: 8,
            value_size: 4,
            max_entries: list_entries,
        },
        MapShape {
            name: names::MAP_LIST_V6,
            map_type: MapType::LpmTrie,
            key_size: 20,
            value_size: 4,
            max_entries: list_entries,
        },
        // IPv4 /32 entries live in the exact map, the rest in the trie; the controller keeps
        // their sum within the family's capacity.
        MapShape {
            name: names::MAP_LIST_V4_EXACT,
            map_type: MapType::Hash,
            key_size: 4,
            value_size: 4,
            max_entries: list_entries,
        },
        // A /24 per IPv4 entry of /25 to /31 at most: within the family's entries.
        MapShape {
            name: names::MAP_LIST_V4_INNER,
            map_type: MapType::Hash,
            key_size: 4,
            value_size: size_of::<InnerV4>() as u32,
            max_entries: list_entries,
        },
        // A /24 per IPv6 entry of /25 to /39 at most: within the family's entries.
        MapShape {
            name: names::MAP_LIST_V6_INNER,
            map_type: MapType::Hash,
            key_size: 4,
            value_size: size_of::<InnerV6>() as u32,
            max_entries: list_entries,
        },
        // IPv6 entries of /48, /56, /64 and /128, also in the trie: at most the family's entries.
        MapShape {
            name: names::MAP_LIST_V6_HASHED,
            map_type: MapType::Hash,
            key_size: size_of::<HashedV6Key>() as u32,
            value_size: 4,
            max_entries: list_entries,
        },
        MapShape {
            name: names::MAP_LIST_V4_SUMMARY,
            map_type: MapType::Array,
            key_size: 4,
            value_size: 8,
            max_entries: api_shield_common::lists::summary::WORDS,
        },
        MapShape {
            name: names::MAP_LIST_V6_SUMMARY,
            map_type: MapType::Array,
            key_size: 4,
            value_size: 8,
            max_entries: api_shield_common::lists::summary_v6::WORDS,
        },
        MapShape {
            name: names::MAP_LIMITER,
            map_type: MapType::Array,
            key_size: 4,
            value_size: size_of::<LimiterSet>() as u32,
            max_entries: limiter_sets,
        },
        MapShape {
            name: names::MAP_LIMITS,
            map_type: MapType::Array,
            key_size: 4,
            value_size: size_of::<RateLimit>() as u32,
            max_entries: api_shield_common::limiter::LIMIT_SLOTS,
        },
        MapShape {
            name: names::MAP_COUNTERS,
            map_type: MapType::PerCpuArray,
            key_size: 4,
            value_size: size_of::<Counter>() as u32,
            max_entries: COUNTER_SLOTS,
        },
        MapShape {
            name: names::MAP_SETTINGS,
            map_type: MapType::Array,
            key_size: 4,
            value_size: size_of::<Settings>() as u32,
            max_entries: 1,
        },
        MapShape {
            name: names::MAP_EVENTS,
            map_type: MapType::RingBuf,
            key_size: 0,
            value_size: 0,
            max_entries: EVENTS_RING_BYTES,
        },
        MapShape {
            name: names::MAP_EVENT_LIMIT,
            map_type: MapType::Array,
            key_size: 4,
            value_size: 8,
            max_entries: COUNTER_SLOTS,
        },
        MapShape {
            name: names::MAP_EVENTS_SUPPRESSED,
            map_type: MapType::PerCpuArray,
            key_size: 4,
            value_size: 8,
            max_entries: COUNTER_SLOTS,
        },
        MapShape {
            name: names::MAP_RULE_TABLE,
            map_type: MapType::Array,
            key_size: 4,
            value_size: 4,
            max_entries: TABLE_SLOTS,
        },
        MapShape {
            name: names::MAP_RULE_COUNTERS,
            map_type: MapType::PerCpuArray,
            key_size: 4,
            value_size: size_of::<RuleCounter>() as u32,
            max_entries: LIMIT_SLOTS,
        },
        MapShape {
            name: names::MAP_PENALTIES,
            map_type: MapType::RingBuf,
            key_size: 0,
            value_size: 0,
            max_entries: PENALTY_RING_BYTES,
        },
    ])
}

/// A random non-zero seed for the limiter table's hash.
fn random_seed() -> Result<u64> {
    let mut buf = [0u8; 8];
    // SAFETY: writes at most 8 bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        bail!("getrandom: {}", std::io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(buf) | 1)
}

/// Fails if the map pinned at `path` exists with another shape than `want`.
fn check_pinned_shape(path: &Path, want: &MapShape) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let info = MapInfo::from_pin(path)
        .with_context(|| format!("reading pinned map {}", path.display()))?;
    let map_type = info.map_type()?;
    if map_type != want.map_type
        || info.key_size() != want.key_size
        || info.value_size() != want.value_size
        || info.max_entries() != want.max_entries
    {
        bail!(
            "pinned map {} has another shape ({map_type:?}, key {} B, value {} B, {} entries) than this \
             version and config need ({:?}, key {} B, value {} B, {} entries): a capacity change or an \
             incompatible upgrade; run `api-shield detach` to start afresh (this drops dynamic state)",
            path.display(),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            want.map_type,
            want.key_size,
            want.value_size,
            want.max_entries
        );
    }
    Ok(())
}

/// Entries per batch update of the exact map.
const BATCH_CHUNK: usize = 1 << 14;

/// The IPv4 address `net` is, if it is one (/32): the exact map's entry, not the trie's.
fn exact_address(net: &IpNet) -> Option<Ipv4Addr> {
    match net {
        IpNet::V4(n) if n.prefix_len() == 32 => Some(n.addr()),
        _ => None,
    }
}

/// The IPv6 hash's key of `net`, if it is an IPv6 entry of a hashed length (/48, /56,
/// /64, /128): its network address, as the data plane masks a source, and its length.
fn hashed_v6_key(net: &IpNet) -> Option<HashedV6Key> {
    match net {
        IpNet::V6(n) if summary_v6::length_flag(n.prefix_len()) != summary_v6::UNHASHED => {
            Some(HashedV6Key {
                addr: n.network().octets(),
                prefix_len: u32::from(n.prefix_len()),
            })
        }
        _ => None,
    }
}

/// The list maps, in the order a change writes them.
const LIST_MAPS: [&str; 3] = [
    names::MAP_LIST_V4_EXACT,
    names::MAP_LIST_V4,
    names::MAP_LIST_V6,
];

/// The list map that holds `net`: IPv4 addresses the exact map, other prefixes their
/// family's trie.
fn list_map_of(net: &IpNet) -> &'static str {
    match net {
        _ if exact_address(net).is_some() => names::MAP_LIST_V4_EXACT,
        IpNet::V4(_) => names::MAP_LIST_V4,
        IpNet::V6(_) => names::MAP_LIST_V6,
    }
}

/// `nets` as the keys of a trie of `N`-byte addresses; one of the other family is an error.
fn trie_keys<const N: usize>(nets: &[IpNet]) -> Result<Vec<Key<[u8; N]>>> {
    nets.iter()
        .map(|net| {
            let data = match net {
                IpNet::V4(n) => <[u8; N]>::try_from(n.addr().octets().as_slice()),
                IpNet::V6(n) => <[u8; N]>::try_from(n.addr().octets().as_slice()),
            }
            .map_err(|_| anyhow!("{net} in a batch for a trie of {N}-byte addresses"))?;
            Ok(Key::new(u32::from(net.prefix_len()), data))
        })
        .collect()
}

/// Removes `key` from the IPv6 hash; a key not there is no error (a copy that could not
/// be made for want of memory, see `Shield::list_insert`).
fn remove_if_present(
    hashed: &mut HashMap<&mut MapData, HashedV6Key, ListVerdict>,
    key: &HashedV6Key,
) -> Result<()> {
    match hashed.remove(key) {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(e).context("removing an entry from the IPv6 hash"),
    }
}

/// Whether a map update failed for want of kernel memory.
fn is_out_of_memory(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(s)
        if matches!(s.io_error.raw_os_error(), Some(libc::ENOMEM | libc::E2BIG)))
}

/// Entries each address family's lists can still take (see `Shield::list_room`).
struct ListRoom {
    v4: usize,
    v6: usize,
}

impl ListRoom {
    fn of(&mut self, net: &IpNet) -> &mut usize {
        match net {
            IpNet::V4(_) => &mut self.v4,
            IpNet::V6(_) => &mut self.v6,
        }
    }
}

/// Whether a map update failed because the map is at capacity.
fn is_map_full(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let io = cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error);
        let syscall = cause
            .downcast_ref::<aya::maps::MapError>()
            .and_then(|m| match m {
                aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error(),
                _ => None,
            });
        matches!(io.or(syscall), Some(libc::ENOSPC | libc::E2BIG))
    })
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

/// Totals of one reason's counter, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReasonTotals {
    pub reason_index: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// The program and its maps, loaded into the kernel.
pub struct Shield {
    ebpf: Ebpf,
    /// Interfaces attached to, and how (the links themselves are pinned).
    attached: Vec<(String, AttachedMode)>,
    /// What the list tries hold now, so updates can be applied as diffs.
    lists: ListTable,
    /// The tries' summaries, mapped into this process.
    summary: SummaryMaps,
    /// The limiter's buckets, mapped read-only, and the seed that places them.
    limiter: LimiterTable,
    limiter_seed: u64,
    /// Where maps and the link are pinned, if they are.
    pin_dir: Option<PathBuf>,
    shapes: Vec<MapShape>,
    /// What the rule table holds, once this process wrote it (so updates are diffs).
    rule_table: Option<Vec<u32>>,
    /// IPv6 entries of hashed lengths now in the trie, to copy into the hash in batches
    /// once a list change is done with the trie.
    hashed_pending: Vec<(HashedV6Key, ListVerdict)>,
    /// The /24s (cells) whose inner verdicts the maps hold: IPv4's, IPv6's.
    inner_held: [BTreeSet<u32>; 2],
}

impl Shield {
    /// Loads the program with map capacities from the config; nothing is attached yet.
    pub fn load(capacity: &Capacity) -> Result<Shield> {
        Shield::load_at(capacity, None, EBPF_OBJECT)
    }

    /// As [`Shield::load`] with another build of the data plane (the benchmarks' variant),
    /// configured from `config`.
    #[doc(hidden)]
    pub fn from_config_object(config: &Config, object: &[u8]) -> Result<Shield> {
        let mut shield = Shield::load_at(&config.capacity, None, object)?;
        shield.apply_config(config)?;
        Ok(shield)
    }

    /// The loaded object, for the benchmarks' extra programs and maps.
    #[doc(hidden)]
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// As [`Shield::load`], with every map pinned in `dir`: maps already pinned there (by
    /// an earlier daemon) are reused after a shape check, so state and counters continue.
    pub fn load_pinned(capacity: &Capacity, dir: &Path) -> Result<Shield> {
        Shield::load_at(capacity, Some(dir), EBPF_OBJECT)
    }

    fn load_at(capacity: &Capacity, pin_dir: Option<&Path>, object: &[u8]) -> Result<Shield> {
        let shapes = map_shapes(capacity)?;
        let mut loader = EbpfLoader::new();
        for shape in &shapes {
            loader.map_max_entries(shape.name, shape.max_entries);
        }
        if let Some(dir) = pin_dir {
            fs::create_dir_all(dir)
                .with_context(|| format!("creating pin directory {}", dir.display()))?;
            for shape in &shapes {
                let path = dir.join(shape.name);
                check_pinned_shape(&path, shape)?;
                loader.map_pin_path(shape.name, path);
            }
        }
        let mut ebpf = loader
            .load(object)
            .context("loading the eBPF object (are you root, with CAP_BPF and CAP_NET_ADMIN?)")?;
        let program: &mut Xdp = ebpf
            .program_mut(names::PROGRAM_XDP)
            .context("the eBPF object has no XDP program")?
            .try_into()?;
        program.load().map_err(|e| kernel::refused("XDP", e))?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(names::PROGRAM_TC)
            .context("the eBPF object has no TC program")?
            .try_into()?;
        tc.load().map_err(|e| kernel::refused("TC", e))?;
        let summary = match (
            ebpf.map(names::MAP_LIST_V4_SUMMARY),
            ebpf.map(names::MAP_LIST_V6_SUMMARY),
        ) {
            (Some(aya::maps::Map::Array(v4)), Some(aya::maps::Map::Array(v6))) => {
                SummaryMaps::map(&v4.fd().as_fd(), &v6.fd().as_fd())?
            }
            _ => bail!("the eBPF object lacks the list summary arrays"),
        };
        let sets = shapes
            .iter()
            .find(|s| s.name == names::MAP_LIMITER)
            .context("no shape for the limiter table")?
            .max_entries;
        let limiter = match ebpf.map(names::MAP_LIMITER) {
            Some(aya::maps::Map::Array(table)) => LimiterTable::map(&table.fd().as_fd(), sets)?,
            _ => bail!("the eBPF object lacks the limiter table"),
        };
        // A reused table keeps its seed, or its buckets would be lost; a new one gets a
        // random seed. Written before anything is attached: a table without a size in the
        // settings is not used.
        let mut settings: Array<_, Settings> = Array::try_from(
            ebpf.map_mut(names::MAP_SETTINGS)
                .context("the eBPF object lacks the settings map")?,
        )?;
        let mut current = settings.get(&0, 0).context("reading the settings")?;
        if current.limiter_seed == 0 || current.limiter_sets != sets {
            current.limiter_seed = random_seed()?;
            current.limiter_sets = sets;
            settings
                .set(0, current, 0)
                .context("writing the limiter's seed")?;
        }
        let limiter_seed = current.limiter_seed;
        let mut shield = Shield {
            ebpf,
            attached: Vec::new(),
            lists: ListTable::default(),
            summary,
            limiter,
            limiter_seed,
            pin_dir: pin_dir.map(Path::to_path_buf),
            shapes,
            rule_table: None,
            hashed_pending: Vec::new(),
            inner_held: [BTreeSet::new(), BTreeSet::new()],
        };
        // Reused tries already hold entries: learn them, so the first update is a diff.
        shield.lists = shield.read_lists()?;
        // A reused hash of IPv6 entries may lag the trie (a daemon stopped between the two),
        // and reused inner verdicts may be from another version.
        shield.sync_hashed_v6()?;
        shield.sync_inner::<InnerV4>()?;
        shield.sync_inner::<InnerV6>()?;
        // The summary must match the tries before this program is attached (a new map
        // reads "listed nowhere" everywhere; a reused one may be from another version).
        shield.summary.write_all(&shield.lists);
        Ok(shield)
    }

    fn read_lists(&mut self) -> Result<ListTable> {
        let mut table = ListTable::default();
        for item in self.trie_v4()?.iter() {
            let (key, verdict) = item?;
            let net = IpNet::new(
                IpAddr::V4(Ipv4Addr::from(key.data())),
                key.prefix_len() as u8,
            )?;
            table.entries.insert(net, verdict);
        }
        for item in self.trie_v6()?.iter() {
            let (key, verdict) = item?;
            let net = IpNet::new(
                IpAddr::V6(Ipv6Addr::from(key.data())),
                key.prefix_len() as u8,
            )?;
            table.entries.insert(net, verdict);
        }
        for item in self.exact_v4()?.iter() {
            let (addr, verdict) = item?;
            table
                .entries
                .insert(IpNet::new(IpAddr::V4(Ipv4Addr::from(addr)), 32)?, verdict);
        }
        Ok(table)
    }

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

    /// The TC ingress program, e.g. for BPF_PROG_TEST_RUN.
    pub fn tc_program(&mut self) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(names::PROGRAM_TC)
            .context("the eBPF object has no TC program")?
            .try_into()?)
    }

    /// The kernel's id of a map (for tools such as bpftool).
    pub fn map_id(&self, name: &str) -> Result<u32> {
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("map {name} missing"))?;
        Ok(match map {
            aya::maps::Map::LpmTrie(data)
            | aya::maps::Map::Array(data)
            | aya::maps::Map::HashMap(data)
            | aya::maps::Map::LruHashMap(data)
            | aya::maps::Map::PerCpuArray(data) => data.info()?.id(),
            _ => bail!("map {name}: no id for this map type"),
        })
    }

    /// The kernel's id of the loaded program.
    pub fn program_id(&mut self) -> Result<u32> {
        if self.attached.iter().any(|(_, m)| m.is_tc()) {
            return Ok(self.tc_program()?.info()?.id());
        }
        Ok(self.program()?.info()?.id())
    }

    /// Entries and capacity of each map (the counters and settings arrays are always full).
    pub fn map_fill(&self) -> Result<Vec<(&'static str, usize, u32)>> {
        let mut out = Vec::new();
        // The maps an operator sizes; the event, penalty and rule maps are fixed.
        let fixed = [
            names::MAP_EVENTS,
            names::MAP_EVENT_LIMIT,
            names::MAP_EVENTS_SUPPRESSED,
            names::MAP_PENALTIES,
            names::MAP_RULE_TABLE,
            names::MAP_RULE_COUNTERS,
            names::MAP_LIST_V4_SUMMARY,
            names::MAP_LIST_V6_SUMMARY,
            // Counted with the IPv4 trie, which stands for the whole IPv4 list.
            names::MAP_LIST_V4_EXACT,
            // A copy of some of the IPv6 trie's entries, and verdicts derived from the
            // tries'.
            names::MAP_LIST_V6_HASHED,
            names::MAP_LIST_V4_INNER,
            names::MAP_LIST_V6_INNER,
        ];
        let map = |name: &str| {
            self.ebpf
                .map(name)
                .with_context(|| format!("map {name} missing"))
        };
        for shape in self.shapes.iter().filter(|s| !fixed.contains(&s.name)) {
            let entries = match shape.map_type {
                MapType::LpmTrie if shape.key_size == 8 => {
                    LpmTrie::<_, [u8; 4], ListVerdict>::try_from(map(shape.name)?)?
                        .keys()
                        .filter(Result::is_ok)
                        .count()
                        + HashMap::<_, [u8; 4], ListVerdict>::try_from(map(
                            names::MAP_LIST_V4_EXACT,
                        )?)?
                        .keys()
                        .filter(Result::is_ok)
                        .count()
                }
                MapType::LpmTrie => {
                    LpmTrie::<_, [u8; 16], ListVerdict>::try_from(map(shape.name)?)?
                        .keys()
                        .filter(Result::is_ok)
                        .count()
                }
                _ if shape.name == names::MAP_LIMITER => {
                    out.push((
                        shape.name,
                        self.limiter.occupied(),
                        self.limiter.capacity() as u32,
                    ));
                    continue;
                }
                _ => shape.max_entries as usize,
            };
            out.push((shape.name, entries, shape.max_entries));
        }
        Ok(out)
    }

    /// Loads and fills every map from the config; still nothing attached.
    pub fn from_config(config: &Config) -> Result<Shield> {
        let mut shield = Shield::load(&config.capacity)?;
        shield.apply_config(config)?;
        Ok(shield)
    }

    /// Brings limits, settings and lists in line with `config`; lists change as a diff.
    pub fn apply_config(&mut self, config: &Config) -> Result<()> {
        self.apply_settings(config)?;
        let folded = fold(&config.allowlist, &config.blocklist);
        for net in &folded.shadowed {
            log::warn!(
                "blocklist entry {net} lies inside an allowlisted prefix: the allowlist wins"
            );
        }
        let refused = self.apply_lists(&folded.table)?;
        if !refused.is_empty() {
            bail!(
                "{} list entries refused: the list maps are full (raise capacity)",
                refused.len()
            );
        }
        Ok(())
    }

    /// Limits, rules and settings from `config`; buckets keep their state.
    ///
    /// Order matters for a running program: the rules' limits are written before the
    /// table points at them, and the table before the settings switch it on.
    pub fn apply_settings(&mut self, config: &Config) -> Result<()> {
        let limits = &config.limits;
        let penalty = limits.penalty.as_ref();
        self.set_limit(
            DEFAULT_LIMIT,
            limit_slot(&limits.default, &limits.default_policy, penalty),
        )?;
        for (i, rule) in limits.rules.iter().enumerate() {
            self.set_limit(i as u32 + 1, limit_slot(&rule.limit, &rule.policy, penalty))?;
        }
        let rules = !limits.rules.is_empty();
        if rules || self.rule_table.is_some() {
            self.write_rule_table(rule_table(&limits.rules))?;
        }
        let (event_cost, event_capacity) = event_limit(config.events.rate.0);
        let mut flags = 0;
        if config.dry_run {
            flags |= SETTINGS_DRY_RUN;
        }
        if rules {
            flags |= SETTINGS_RULES;
        }
        self.set_settings(Settings {
            drop_malformed: u32::from(config.on_malformed == OnMalformed::Drop),
            flags,
            event_cost,
            event_capacity,
            ..Settings::default()
        })
    }

    /// Writes the entries of `table` that differ from what the map holds (all of them
    /// the first time).
    fn write_rule_table(&mut self, table: Vec<u32>) -> Result<()> {
        let old = self.rule_table.take();
        let mut map: Array<_, u32> = Array::try_from(self.map_mut(names::MAP_RULE_TABLE)?)?;
        for (i, slot) in table.iter().enumerate() {
            if old.as_ref().is_none_or(|o| o[i] != *slot) {
                map.set(i as u32, slot, 0)
                    .context("writing the rule table")?;
            }
        }
        self.rule_table = Some(table);
        Ok(())
    }

    /// Per limit slot (0: default, i + 1: rule i), what its buckets did, summed over CPUs.
    pub fn rule_counters(&self) -> Result<Vec<RuleCounter>> {
        let map = self
            .ebpf
            .map(names::MAP_RULE_COUNTERS)
            .context("rule counters map missing")?;
        let per_cpu: PerCpuArray<_, RuleCounter> = PerCpuArray::try_from(map)?;
        (0..LIMIT_SLOTS)
            .map(|slot| {
                Ok(per_cpu
                    .get(&slot, 0)?
                    .iter()
                    .fold(RuleCounter::default(), |a, c| RuleCounter {
                        passed_packets: a.passed_packets + c.passed_packets,
                        passed_bytes: a.passed_bytes + c.passed_bytes,
                        dropped_packets: a.dropped_packets + c.dropped_packets,
                        dropped_bytes: a.dropped_bytes + c.dropped_bytes,
                        would_drop_packets: a.would_drop_packets + c.would_drop_packets,
                        would_drop_bytes: a.would_drop_bytes + c.would_drop_bytes,
                    }))
            })
            .collect()
    }

    /// Zeroes a limit slot's counters (when the slot passes to another rule).
    pub fn reset_rule_counter(&mut self, slot: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let mut map: PerCpuArray<_, RuleCounter> =
            PerCpuArray::try_from(self.map_mut(names::MAP_RULE_COUNTERS)?)?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![RuleCounter::default(); cpus])?;
        map.set(slot, zeros, 0).context("resetting rule counters")?;
        Ok(())
    }

    /// Takes the penalty ring buffer out (once), for a reader task to own.
    pub fn take_penalties(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(names::MAP_PENALTIES)
            .context("the penalty ring buffer was already taken")?;
        Ok(RingBuf::try_from(map)?)
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

    /// Takes the list tries to `next` without a gap: upserts first, then removals. A trie
    /// that is full refuses entries; they are retried once the removals made room, and
    /// those still refused are returned (and not recorded, so the next update retries them).
    pub fn apply_lists(&mut self, next: &ListTable) -> Result<Vec<IpNet>> {
        let diff = self.lists.diff_to(next);
        // What this changes asks the trie while it changes, then gets its new summary.
        let touched = self
            .summary
            .before_change(diff.upserts.iter().map(|(net, _)| net), &diff.removals);
        // Those /24s walk the trie while it changes: their inner verdicts go first.
        let cleared = self
            .clear_inner::<InnerV4>(&touched.v4)
            .and_then(|()| self.clear_inner::<InnerV6>(&touched.v6));
        let result = cleared.and_then(|()| self.apply_diff(next, &diff));
        // The hash and the inner verdicts are whole before the summary may send sources
        // to them.
        let copied = self.copy_pending_hashed_v6();
        let inner_v4 = self.write_inner::<InnerV4>(&touched.v4);
        let inner_v6 = self.write_inner::<InnerV6>(&touched.v6);
        self.summary.after_change(&self.lists, &touched);
        let refused = result?;
        copied?;
        inner_v4?;
        inner_v6?;
        Ok(refused)
    }

    fn apply_diff(&mut self, next: &ListTable, diff: &ListDiff) -> Result<Vec<IpNet>> {
        let mut room = self.list_room()?;
        let mut refused = Vec::new();
        self.upsert_in_batches(&diff.upserts, &mut room, &mut refused)?;
        self.remove_hashed_v6(&diff.removals)?;
        let mut left = Vec::new();
        for map in LIST_MAPS {
            let nets: Vec<IpNet> = diff
                .removals
                .iter()
                .filter(|net| list_map_of(net) == map)
                .copied()
                .collect();
            let removed = self.list_batch(map, &nets, None)?;
            for net in &nets[..removed] {
                self.lists.entries.remove(net);
                *room.of(net) += 1;
            }
            left.extend_from_slice(&nets[removed..]);
        }
        // What a batch left: one by one, each failure reported as it is.
        for net in &left {
            self.list_remove(*net)
                .with_context(|| format!("removing {net} from the lists"))?;
            self.lists.entries.remove(net);
            *room.of(net) += 1;
        }
        if !refused.is_empty() && !diff.removals.is_empty() {
            let retry = std::mem::take(&mut refused);
            for net in retry {
                self.upsert_or_refuse(net, next.entries[&net], &mut room, &mut refused)?;
            }
        }
        Ok(refused)
    }

    /// Entries each family's lists can still take: its capacity (the trie's size) less
    /// what it holds (for IPv4, the trie and the exact map share it).
    fn list_room(&self) -> Result<ListRoom> {
        let capacity = |name: &str| {
            self.shapes
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.max_entries as usize)
                .with_context(|| format!("no shape for {name}"))
        };
        let v4 = self
            .lists
            .entries
            .keys()
            .filter(|n| n.addr().is_ipv4())
            .count();
        let v6 = self.lists.entries.len() - v4;
        Ok(ListRoom {
            v4: capacity(names::MAP_LIST_V4)?.saturating_sub(v4),
            v6: capacity(names::MAP_LIST_V6)?.saturating_sub(v6),
        })
    }

    /// Adds or updates entries in batches (one call per 16k entries, where one by one
    /// costs a call each): IPv4 addresses into the exact map, other prefixes into their
    /// family's trie. Those that find no room are refused, as in
    /// [`Shield::upsert_or_refuse`], which also finishes what a batch left.
    fn upsert_in_batches(
        &mut self,
        entries: &[(IpNet, ListVerdict)],
        room: &mut ListRoom,
        refused: &mut Vec<IpNet>,
    ) -> Result<()> {
        let mut taken: [Vec<(IpNet, ListVerdict)>; 3] = Default::default();
        for &(net, verdict) in entries {
            let old = self.lists.entries.get(&net).copied();
            if old.is_none() {
                let left = room.of(&net);
                if *left == 0 {
                    refused.push(net);
                    continue;
                }
                *left -= 1;
            }
            self.unhash_if_changed(net, verdict)?;
            let map = LIST_MAPS.iter().position(|&m| m == list_map_of(&net));
            taken[map.expect("every entry has a list map")].push((net, verdict));
        }
        for (map, taken) in LIST_MAPS.into_iter().zip(taken) {
            let nets: Vec<IpNet> = taken.iter().map(|&(n, _)| n).collect();
            let values: Vec<ListVerdict> = taken.iter().map(|&(_, v)| v).collect();
            let done = self.list_batch(map, &nets, Some(&values))?;
            for &(net, verdict) in &taken[..done] {
                self.lists.entries.insert(net, verdict);
                if let Some(key) = hashed_v6_key(&net) {
                    self.hashed_pending.push((key, verdict));
                }
            }
            // Stopped short (a full map, out of memory): the rest one by one, with their
            // room given back first, so each gets its own verdict or error.
            for &(net, verdict) in &taken[done..] {
                if !self.lists.entries.contains_key(&net) {
                    *room.of(&net) += 1;
                }
                self.upsert_or_refuse(net, verdict, room, refused)?;
            }
        }
        Ok(())
    }

    /// [`Shield::in_batches`] on the list map `map` (see [`list_map_of`]), with `nets`
    /// as its keys.
    fn list_batch(
        &mut self,
        map: &'static str,
        nets: &[IpNet],
        values: Option<&[ListVerdict]>,
    ) -> Result<usize> {
        match map {
            names::MAP_LIST_V4_EXACT => {
                let keys: Vec<[u8; 4]> = nets
                    .iter()
                    .map(|net| exact_address(net).map(|a| a.octets()))
                    .collect::<Option<_>>()
                    .context("a prefix in a batch for the exact map")?;
                self.in_batches(map, &keys, values)
            }
            names::MAP_LIST_V4 => self.in_batches(map, &trie_keys::<4>(nets)?, values),
            _ => self.in_batches(map, &trie_keys::<16>(nets)?, values),
        }
    }

    /// [`Shield::map_batch`] over `keys` (and `values`) in chunks of [`BATCH_CHUNK`]: how
    /// many of them, from the start, were done before a batch stopped short.
    fn in_batches<K: aya::Pod, V: aya::Pod>(
        &mut self,
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
            let n = self.map_batch(map, chunk, values)?;
            done += n;
            if n < chunk.len() {
                break;
            }
        }
        Ok(done)
    }

    /// Copies the IPv6 entries of hashed lengths the trie took in this change into the
    /// hash, in batches; what the kernel will not take for want of memory stays out (its
    /// sources walk the trie).
    fn copy_pending_hashed_v6(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.hashed_pending);
        let keys: Vec<HashedV6Key> = pending.iter().map(|&(k, _)| k).collect();
        let values: Vec<ListVerdict> = pending.iter().map(|&(_, v)| v).collect();
        let done = self.in_batches(names::MAP_LIST_V6_HASHED, &keys, Some(&values))?;
        for &(key, verdict) in &pending[done..] {
            match self.hashed_v6()?.insert(key, verdict, 0) {
                Ok(()) => {}
                Err(e) if is_out_of_memory(&e) => log::warn!(
                    "an IPv6 /{} is in force but not in the IPv6 hash (out of memory): its \
                     sources take the trie walk",
                    key.prefix_len
                ),
                Err(e) => return Err(e).context("adding an entry to the IPv6 hash"),
            }
        }
        Ok(())
    }

    /// Takes the IPv6 entries of hashed lengths among `removals` out of the hash, in
    /// batches, before they leave the trie: the hash never holds what the trie does not.
    fn remove_hashed_v6(&mut self, removals: &[IpNet]) -> Result<()> {
        let keys: Vec<HashedV6Key> = removals.iter().filter_map(hashed_v6_key).collect();
        let done = self.in_batches(names::MAP_LIST_V6_HASHED, &keys, None::<&[ListVerdict]>)?;
        // Stopped at a key not there (a copy never made) or refused outright.
        for key in &keys[done..] {
            remove_if_present(&mut self.hashed_v6()?, key)?;
        }
        Ok(())
    }

    /// BPF_MAP_UPDATE_BATCH of `keys` and `values` on the hash or trie `map` (without
    /// values, BPF_MAP_DELETE_BATCH of `keys`): how many the kernel did before it stopped,
    /// all of them unless something failed. The caller does the rest one by one, which
    /// reports each failure as it is (a full map, a missing entry, or no batch support at
    /// all). `K` and `V` must be the map's key and value types.
    fn map_batch<K: aya::Pod, V: aya::Pod>(
        &mut self,
        map: &'static str,
        keys: &[K],
        values: Option<&[V]>,
    ) -> Result<usize> {
        use std::os::fd::AsRawFd as _;
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
        if self.shapes.iter().find(|s| s.name == map).is_none_or(|s| {
            !matches!(s.map_type, MapType::Hash | MapType::LpmTrie)
                || s.key_size != key_size
                || (values.is_some() && s.value_size != value_size)
        }) {
            bail!(
                "map {map} is not a hash map or trie of {key_size}-byte keys (and {value_size}-byte values)"
            );
        }
        let fd = match self.map_mut(map)? {
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

    fn upsert_or_refuse(
        &mut self,
        net: IpNet,
        verdict: ListVerdict,
        room: &mut ListRoom,
        refused: &mut Vec<IpNet>,
    ) -> Result<()> {
        let new = !self.lists.entries.contains_key(&net);
        if new && *room.of(&net) == 0 {
            refused.push(net);
            return Ok(());
        }
        match self.list_insert(net, verdict) {
            Ok(()) => {
                self.lists.entries.insert(net, verdict);
                if new {
                    *room.of(&net) -= 1;
                }
                Ok(())
            }
            Err(e) if is_map_full(&e) => {
                refused.push(net);
                Ok(())
            }
            Err(e) => Err(e.context(format!("adding {net} to the lists"))),
        }
    }

    pub fn lists(&self) -> &ListTable {
        &self.lists
    }

    /// Adds or updates one entry: an IPv4 address (/32) in the exact map, any other prefix
    /// in its family's trie (and an IPv6 entry of a hashed length in the hash too).
    fn list_insert(&mut self, net: IpNet, verdict: ListVerdict) -> Result<()> {
        let len = u32::from(net.prefix_len());
        match net.addr() {
            IpAddr::V4(a) if len == 32 => self.exact_v4()?.insert(a.octets(), verdict, 0)?,
            IpAddr::V4(a) => self
                .trie_v4()?
                .insert(&Key::new(len, a.octets()), verdict, 0)?,
            IpAddr::V6(a) => {
                self.unhash_if_changed(net, verdict)?;
                self.trie_v6()?
                    .insert(&Key::new(len, a.octets()), verdict, 0)?;
                if let Some(key) = hashed_v6_key(&net) {
                    self.hashed_pending.push((key, verdict));
                }
            }
        }
        Ok(())
    }

    /// Takes `net`'s copy out of the IPv6 hash if the lists hold it with a verdict other
    /// than `verdict`: the hash must never hold what the trie does not, so a changed
    /// verdict leaves it before the trie changes, and joins it after.
    fn unhash_if_changed(&mut self, net: IpNet, verdict: ListVerdict) -> Result<()> {
        if let Some(key) = hashed_v6_key(&net)
            && self.lists.entries.get(&net).is_some_and(|&v| v != verdict)
        {
            remove_if_present(&mut self.hashed_v6()?, &key)?;
        }
        Ok(())
    }

    fn list_remove(&mut self, net: IpNet) -> Result<()> {
        let len = u32::from(net.prefix_len());
        match net.addr() {
            IpAddr::V4(a) if len == 32 => self.exact_v4()?.remove(&a.octets())?,
            IpAddr::V4(a) => self.trie_v4()?.remove(&Key::new(len, a.octets()))?,
            // Its copy in the hash went first (`remove_hashed_v6`).
            IpAddr::V6(a) => self.trie_v6()?.remove(&Key::new(len, a.octets()))?,
        }
        Ok(())
    }

    /// Makes the IPv6 hash hold exactly the entries of hashed lengths in the lists: what
    /// it holds beyond them (or with another verdict) goes, what it lacks is added.
    fn sync_hashed_v6(&mut self) -> Result<()> {
        let want: std::collections::HashMap<HashedV6Key, ListVerdict> = self
            .lists
            .entries
            .iter()
            .filter_map(|(net, &v)| hashed_v6_key(net).map(|k| (k, v)))
            .collect();
        let mut hashed = self.hashed_v6()?;
        let held: Vec<(HashedV6Key, ListVerdict)> = hashed
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the IPv6 hash")?;
        for (key, verdict) in &held {
            if want.get(key) != Some(verdict) {
                remove_if_present(&mut hashed, key)?;
            }
        }
        let held: std::collections::HashMap<HashedV6Key, ListVerdict> = held.into_iter().collect();
        for (key, verdict) in want {
            if held.get(&key) != Some(&verdict) {
                hashed
                    .insert(key, verdict, 0)
                    .context("adding an entry to the IPv6 hash")?;
            }
        }
        Ok(())
    }

    /// Takes the inner verdicts of `I`'s family's /24s in `ranges` out of their map (in
    /// batches): until [`Shield::write_inner`], those /24s walk the trie.
    fn clear_inner<I: InnerVerdicts>(&mut self, ranges: &[(u32, u32)]) -> Result<()> {
        let held = &self.inner_held[I::FAMILY as usize];
        let cells: Vec<u32> = summary::cells_in_ranges(held.iter().copied(), ranges).collect();
        let keys: Vec<[u8; 4]> = cells.iter().map(|&c| inner_key(c)).collect();
        let done = self.in_batches(I::MAP, &keys, None::<&[I]>)?;
        for key in &keys[done..] {
            self.remove_inner::<I>(key)?;
        }
        for cell in cells {
            self.inner_held[I::FAMILY as usize].remove(&cell);
        }
        Ok(())
    }

    /// Writes the inner verdicts of `I`'s family's /24s in `ranges` that hold entries of
    /// /25 to /31 (IPv4) or /39 (IPv6) now (in batches). One the kernel will not take for
    /// want of memory stays out: its sources walk the trie.
    fn write_inner<I: InnerVerdicts>(&mut self, ranges: &[(u32, u32)]) -> Result<()> {
        let cells = summary::inner_cells(&self.lists, I::FAMILY, ranges);
        let values: Vec<I> = cells
            .iter()
            .map(|&c| summary::inner_value(&self.lists, c).expect("a cell with inner entries"))
            .collect();
        let keys: Vec<[u8; 4]> = cells.iter().map(|&c| inner_key(c)).collect();
        let done = self.in_batches(I::MAP, &keys, Some(&values))?;
        self.inner_held[I::FAMILY as usize].extend(&cells[..done]);
        let mut left_out = Vec::new();
        for ((&cell, key), value) in cells.iter().zip(&keys).zip(&values).skip(done) {
            match self.inner_map::<I>()?.insert(key, value, 0) {
                Ok(()) => {
                    self.inner_held[I::FAMILY as usize].insert(cell);
                }
                Err(e) if is_out_of_memory(&e) => left_out.push(cell),
                Err(e) => return Err(e).context("writing a /24's inner verdicts"),
            }
        }
        if let Some(&first) = left_out.first() {
            let first = match I::FAMILY {
                Family::V4 => IpAddr::from(Ipv4Addr::from(first << 8)),
                Family::V6 => IpAddr::from(Ipv6Addr::from(u128::from(first) << 104)),
            };
            log::warn!(
                "the inner verdicts of {} /24s (the first {first}/24) found no room in the \
                 kernel: their sources take the trie walk",
                left_out.len()
            );
        }
        Ok(())
    }

    /// Makes `I`'s family's inner verdicts map hold exactly those of the lists (a reused
    /// map may be from another version, or behind a change a stopped daemon left).
    fn sync_inner<I: InnerVerdicts>(&mut self) -> Result<()> {
        let held: Vec<([u8; 4], I)> = self
            .inner_map::<I>()?
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the inner verdicts")?;
        let all = [(0, (1 << 24) - 1)];
        let want: std::collections::HashMap<[u8; 4], I> =
            summary::inner_cells(&self.lists, I::FAMILY, &all)
                .into_iter()
                .map(|c| {
                    let value = summary::inner_value(&self.lists, c).expect("inner entries");
                    (inner_key(c), value)
                })
                .collect();
        // Stale ones go first (their /24s walk the trie until rewritten).
        for (key, value) in &held {
            if want.get(key) == Some(value) {
                self.inner_held[I::FAMILY as usize].insert(u32::from_be_bytes(*key) >> 8);
            } else {
                self.remove_inner::<I>(key)?;
            }
        }
        let mut missing: Vec<(u32, u32)> = want
            .keys()
            .map(|k| u32::from_be_bytes(*k) >> 8)
            .filter(|c| !self.inner_held[I::FAMILY as usize].contains(c))
            .map(|c| (c, c))
            .collect();
        missing.sort_unstable();
        self.write_inner::<I>(&missing)
    }

    /// Removes one key from an inner verdicts map; one not there is no error.
    fn remove_inner<I: InnerVerdicts>(&mut self, key: &[u8; 4]) -> Result<()> {
        match self.inner_map::<I>()?.remove(key) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(e).context("removing a /24's inner verdicts"),
        }
    }

    fn inner_map<I: InnerVerdicts>(&mut self) -> Result<HashMap<&mut MapData, [u8; 4], I>> {
        Ok(HashMap::try_from(self.map_mut(I::MAP)?)?)
    }

    fn hashed_v6(&mut self) -> Result<HashMap<&mut MapData, HashedV6Key, ListVerdict>> {
        Ok(HashMap::try_from(self.map_mut(names::MAP_LIST_V6_HASHED)?)?)
    }

    fn exact_v4(&mut self) -> Result<HashMap<&mut MapData, [u8; 4], ListVerdict>> {
        Ok(HashMap::try_from(self.map_mut(names::MAP_LIST_V4_EXACT)?)?)
    }

    fn trie_v4(&mut self) -> Result<LpmTrie<&mut MapData, [u8; 4], ListVerdict>> {
        Ok(LpmTrie::try_from(self.map_mut(names::MAP_LIST_V4)?)?)
    }

    fn trie_v6(&mut self) -> Result<LpmTrie<&mut MapData, [u8; 16], ListVerdict>> {
        Ok(LpmTrie::try_from(self.map_mut(names::MAP_LIST_V6)?)?)
    }

    /// Sets limit `index`. Buckets keep their state: a new rate applies from the next packet.
    pub fn set_limit(&mut self, index: u32, limit: RateLimit) -> Result<()> {
        let mut limits: Array<_, RateLimit> = Array::try_from(self.map_mut(names::MAP_LIMITS)?)?;
        limits.set(index, limit, 0).context("writing a limit")?;
        Ok(())
    }

    /// Writes the settings; the limiter's seed and size are the table's, whatever
    /// `settings` says of them.
    pub fn set_settings(&mut self, mut settings: Settings) -> Result<()> {
        settings.limiter_seed = self.limiter_seed;
        settings.limiter_sets = self.limiter.sets();
        let mut map: Array<_, Settings> = Array::try_from(self.map_mut(names::MAP_SETTINGS)?)?;
        map.set(0, settings, 0).context("writing settings")?;
        Ok(())
    }

    /// Per-reason packet and byte totals, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>> {
        let map = self
            .ebpf
            .map(names::MAP_COUNTERS)
            .ok_or_else(|| anyhow!("map {} missing", names::MAP_COUNTERS))?;
        let counters: PerCpuArray<_, Counter> = PerCpuArray::try_from(map)?;
        let mut out = Vec::with_capacity(Reason::ALL.len());
        for reason in Reason::ALL {
            debug_assert!((reason as u32) < COUNTER_SLOTS);
            let per_cpu = counters.get(&(reason as u32), 0)?;
            let total = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            });
            out.push((reason, total));
        }
        Ok(out)
    }

    /// Buckets the limiter has created since its map was made (summed over CPUs).
    pub fn limiter_buckets_created(&self) -> Result<u64> {
        let map = self
            .ebpf
            .map(names::MAP_COUNTERS)
            .ok_or_else(|| anyhow!("map {} missing", names::MAP_COUNTERS))?;
        let counters: PerCpuArray<_, Counter> = PerCpuArray::try_from(map)?;
        Ok(counters
            .get(&api_shield_common::counters::LIMITER_CREATED_SLOT, 0)?
            .iter()
            .map(|c| c.packets)
            .sum())
    }

    /// Number of sources the limiter currently tracks.
    pub fn tracked_sources(&self) -> Result<usize> {
        Ok(self.limiter.occupied())
    }

    /// Takes the drop-events ring buffer out (once), for a reader task to own.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(names::MAP_EVENTS)
            .context("the events ring buffer was already taken")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Events suppressed (over the rate, or ring full), per reason, summed over CPUs.
    pub fn events_suppressed(&self) -> Result<Vec<(Reason, u64)>> {
        let map = self
            .ebpf
            .map(names::MAP_EVENTS_SUPPRESSED)
            .context("suppressed-events map missing")?;
        let per_cpu: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        Reason::ALL
            .iter()
            .map(|r| Ok((*r, per_cpu.get(&(*r as u32), 0)?.iter().sum())))
            .collect()
    }

    /// Every bucket the limiter tracks.
    pub fn limiter_entries(&self) -> Result<Vec<(LimiterKey, LimiterState)>> {
        Ok(self.limiter.entries())
    }

    /// Ends the penalty windows of the buckets of `net` (a prefix the penalty box
    /// released), under every limit: its next violations are counted afresh. Returns how
    /// many buckets there were.
    pub fn reset_penalty_windows(&self, net: &IpNet) -> usize {
        let addr = match net.network() {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        (0..LIMIT_SLOTS)
            .filter(|&limit| {
                self.limiter
                    .reset_window(&LimiterKey { addr, limit }, self.limiter_seed)
            })
            .count()
    }

    /// The limiter's state for one bucket, if it is tracked.
    pub fn limiter_state(&self, key: &LimiterKey) -> Result<Option<LimiterState>> {
        Ok(self.limiter.get(key, self.limiter_seed))
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        match self.ebpf.map_mut(name) {
            Some(map) => Ok(map),
            None => bail!("map {name} missing from the eBPF object"),
        }
    }
}
