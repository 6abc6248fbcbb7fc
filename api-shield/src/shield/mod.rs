//! The loaded data plane: the program and its maps in the kernel. Loading here; attaching,
//! settings, readings and batches in the submodules; the list maps in `crate::lists`.

pub mod attach;
pub(crate) mod batch;
pub mod kernel;
pub mod limiter;
pub mod maps;
pub mod readings;
pub mod settings;

use std::{
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use api_shield_common::{names, settings::Settings};
use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    programs::{SchedClassifier, Xdp},
};
use ipnet::IpNet;

pub use self::{
    attach::{AttachedMode, detach_pinned},
    maps::{Difference, MapShape, PinnedMapMismatch},
    readings::ReasonTotals,
};
use self::{
    limiter::LimiterTable,
    maps::{check_pinned_shape, map_shapes},
};
use crate::{
    EBPF_OBJECT,
    config::{Capacity, Config},
    lists::{ListStore, ListTable, Registry, SummaryMaps},
};

/// The program and its maps, loaded into the kernel.
pub struct Shield {
    ebpf: Ebpf,
    /// Interfaces attached to, and how (the links themselves are pinned).
    attached: Vec<(String, AttachedMode)>,
    /// The list maps and their summaries.
    lists: ListStore,
    /// The limiter's buckets, mapped read-only, and the seed that places them.
    limiter: LimiterTable,
    limiter_seed: u64,
    /// Where maps and the link are pinned, if they are.
    pin_dir: Option<PathBuf>,
    shapes: Vec<MapShape>,
    /// What the rule table holds, once this process wrote it (so updates are diffs).
    rule_table: Option<Vec<u32>>,
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
            loader.map_max_entries(shape.name(), shape.max_entries);
        }
        if let Some(dir) = pin_dir {
            fs::create_dir_all(dir)
                .with_context(|| format!("creating pin directory {}", dir.display()))?;
            for shape in &shapes {
                let path = dir.join(shape.name());
                check_pinned_shape(&path, shape)?;
                loader.map_pin_path(shape.name(), path);
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
        // The trace programs, which the hooks tail-call while a trace runs.
        let trace_xdp: &mut Xdp = ebpf
            .program_mut(names::PROGRAM_TRACE_XDP)
            .context("the eBPF object has no XDP trace program")?
            .try_into()?;
        trace_xdp
            .load()
            .map_err(|e| kernel::refused("XDP trace", e))?;
        let trace_xdp = trace_xdp.fd()?.try_clone()?;
        let trace_tc: &mut SchedClassifier = ebpf
            .program_mut(names::PROGRAM_TRACE_TC)
            .context("the eBPF object has no TC trace program")?
            .try_into()?;
        trace_tc
            .load()
            .map_err(|e| kernel::refused("TC trace", e))?;
        let trace_tc = trace_tc.fd()?.try_clone()?;
        for (map, fd) in [
            (names::MAP_TRACE_XDP, &trace_xdp),
            (names::MAP_TRACE_TC, &trace_tc),
        ] {
            let mut array: aya::maps::ProgramArray<_> = aya::maps::ProgramArray::try_from(
                ebpf.map_mut(map)
                    .with_context(|| format!("the eBPF object lacks {map}"))?,
            )?;
            array
                .set(0, fd, 0)
                .with_context(|| format!("putting the trace program in {map}"))?;
        }
        let summary = match (
            ebpf.map(names::MAP_LIST_V4_SUMMARY),
            ebpf.map(names::MAP_LIST_V6_SUMMARY),
        ) {
            (Some(aya::maps::Map::Array(v4)), Some(aya::maps::Map::Array(v6))) => {
                SummaryMaps::map(&v4.fd().as_fd(), &v6.fd().as_fd())?
            }
            _ => bail!("the eBPF object lacks the list summary arrays"),
        };
        let entries = |name: &str| {
            shapes
                .iter()
                .find(|s| s.name() == name)
                .map(|s| s.max_entries)
                .with_context(|| format!("no shape for {name}"))
        };
        let sets = entries(names::MAP_LIMITER)?;
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
        // A trace follows a session of the daemon that started it: none runs in a new one.
        let mut trace: Array<_, api_shield_common::trace::TraceFilter> = Array::try_from(
            ebpf.map_mut(names::MAP_TRACE)
                .context("the eBPF object lacks the trace map")?,
        )?;
        trace
            .set(0, api_shield_common::trace::TraceFilter::default(), 0)
            .context("clearing the trace filter")?;
        let list_capacity = entries(names::MAP_LIST_V4)? as usize;
        let lists = ListStore::open(&mut ebpf, summary, list_capacity)?;
        Ok(Shield {
            ebpf,
            attached: Vec::new(),
            lists,
            limiter,
            limiter_seed,
            pin_dir: pin_dir.map(Path::to_path_buf),
            shapes,
            rule_table: None,
        })
    }

    /// Loads and fills every map from the config; still nothing attached.
    pub fn from_config(config: &Config) -> Result<Shield> {
        let mut shield = Shield::load(&config.capacity)?;
        shield.apply_config(config)?;
        Ok(shield)
    }

    /// Brings limits, settings and lists in line with `config`, by the daemon's own route:
    /// the config's lists go into a registry, whose fold the list maps take as a diff.
    pub fn apply_config(&mut self, config: &Config) -> Result<()> {
        self.apply_settings(config)?;
        let mut registry = Registry::default();
        registry.set_config(&config.allowlist, &config.blocklist);
        let folded = registry.fold();
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

    /// Takes the list maps to `next` without a gap: upserts first, then removals. A map
    /// that is full refuses entries; they are retried once the removals made room, and
    /// those still refused are returned (and not recorded, so the next update retries them).
    pub fn apply_lists(&mut self, next: &ListTable) -> Result<Vec<IpNet>> {
        self.lists.apply(&mut self.ebpf, next)
    }

    /// What the list maps hold.
    pub fn lists(&self) -> &ListTable {
        self.lists.table()
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        batch::map_mut(&mut self.ebpf, name)
    }
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
