//! The loaded data plane: loading with capacities, attaching, and typed access to its maps.

use std::net::IpAddr;

use anyhow::{Context as _, Result, anyhow, bail};
use api_shield_common::{
    counters::{COUNTER_SLOTS, Counter, Reason},
    limiter::{DEFAULT_LIMIT, LimiterKey, LimiterState, RateLimit},
    lists::ListVerdict,
    names,
    settings::Settings,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use ipnet::IpNet;

use crate::{
    EBPF_OBJECT,
    config::{AttachMode, Capacity, Config, OnMalformed},
    limits::rate_limit,
    lists::{ListTable, fold},
};

/// How the program ended up attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl AttachedMode {
    pub fn name(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
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
    attached: Vec<(String, AttachedMode, XdpLinkId)>,
    /// What the list tries hold now, so updates can be applied as diffs.
    lists: ListTable,
}

impl Shield {
    /// Loads the program with map capacities from the config; nothing is attached yet.
    pub fn load(capacity: &Capacity) -> Result<Shield> {
        let list_entries = u32::try_from(capacity.blocklist.0 + capacity.allowlist.0)
            .context("capacity.blocklist + capacity.allowlist exceeds 2^32")?;
        let sources = u32::try_from(capacity.sources.0).context("capacity.sources exceeds 2^32")?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::MAP_LIST_V4, list_entries)
            .map_max_entries(names::MAP_LIST_V6, list_entries)
            .map_max_entries(names::MAP_LIMITER, sources)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (are you root, with CAP_BPF and CAP_NET_ADMIN?)")?;
        let program: &mut Xdp = ebpf
            .program_mut(names::PROGRAM_XDP)
            .context("the eBPF object has no XDP program")?
            .try_into()?;
        program
            .load()
            .context("the kernel refused the XDP program")?;
        Ok(Shield {
            ebpf,
            attached: Vec::new(),
            lists: ListTable::default(),
        })
    }

    /// Loads and fills every map from the config; still nothing attached.
    pub fn from_config(config: &Config) -> Result<Shield> {
        let mut shield = Shield::load(&config.capacity)?;
        shield.apply_config(config)?;
        Ok(shield)
    }

    /// Brings limits, settings and lists in line with `config`; lists change as a diff.
    pub fn apply_config(&mut self, config: &Config) -> Result<()> {
        self.set_limit(DEFAULT_LIMIT, rate_limit(&config.limits.default))?;
        self.set_settings(Settings {
            drop_malformed: u32::from(config.on_malformed == OnMalformed::Drop),
            _reserved: 0,
        })?;
        let folded = fold(&config.allowlist, &config.blocklist);
        for net in &folded.shadowed {
            log::warn!(
                "blocklist entry {net} lies inside an allowlisted prefix: the allowlist wins"
            );
        }
        self.apply_lists(&folded.table)
    }

    /// Attaches to `interface`; `auto` tries native XDP, then generic.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<AttachedMode> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(names::PROGRAM_XDP)
            .context("the eBPF object has no XDP program")?
            .try_into()?;
        let (link, chosen) = match mode {
            AttachMode::Native => (
                program.attach(interface, XdpMode::Driver)?,
                AttachedMode::Native,
            ),
            AttachMode::Generic => (
                program.attach(interface, XdpMode::Skb)?,
                AttachedMode::Generic,
            ),
            AttachMode::Auto => {
                match program.attach(interface, XdpMode::Driver) {
                    Ok(link) => (link, AttachedMode::Native),
                    Err(native_err) => {
                        log::info!(
                            "{interface}: native XDP refused ({native_err}); trying generic XDP"
                        );
                        let link = program.attach(interface, XdpMode::Skb).with_context(|| {
                        format!("{interface}: native XDP failed ({native_err}) and so did generic XDP")
                    })?;
                        (link, AttachedMode::Generic)
                    }
                }
            }
        };
        self.attached.push((interface.to_owned(), chosen, link));
        Ok(chosen)
    }

    /// Detaches from every interface (dropping the Shield does the same).
    pub fn detach_all(&mut self) -> Result<()> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(names::PROGRAM_XDP)
            .context("the eBPF object has no XDP program")?
            .try_into()?;
        for (interface, _, link) in self.attached.drain(..) {
            program
                .detach(link)
                .with_context(|| format!("detaching from {interface}"))?;
        }
        Ok(())
    }

    pub fn attached(&self) -> impl Iterator<Item = (&str, AttachedMode)> {
        self.attached.iter().map(|(i, m, _)| (i.as_str(), *m))
    }

    /// The XDP program, e.g. for BPF_PROG_TEST_RUN.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(names::PROGRAM_XDP)
            .context("the eBPF object has no XDP program")?
            .try_into()?)
    }

    /// Takes the list tries to `next` without a gap: upserts first, then removals.
    pub fn apply_lists(&mut self, next: &ListTable) -> Result<()> {
        let diff = self.lists.diff_to(next);
        for (net, verdict) in &diff.upserts {
            self.list_insert(*net, *verdict)
                .with_context(|| format!("adding {net} to the lists"))?;
            self.lists.entries.insert(*net, *verdict);
        }
        for net in &diff.removals {
            self.list_remove(*net)
                .with_context(|| format!("removing {net} from the lists"))?;
            self.lists.entries.remove(net);
        }
        Ok(())
    }

    pub fn lists(&self) -> &ListTable {
        &self.lists
    }

    fn list_insert(&mut self, net: IpNet, verdict: ListVerdict) -> Result<()> {
        let len = u32::from(net.prefix_len());
        match net.addr() {
            IpAddr::V4(a) => self
                .trie_v4()?
                .insert(&Key::new(len, a.octets()), verdict, 0)?,
            IpAddr::V6(a) => self
                .trie_v6()?
                .insert(&Key::new(len, a.octets()), verdict, 0)?,
        }
        Ok(())
    }

    fn list_remove(&mut self, net: IpNet) -> Result<()> {
        let len = u32::from(net.prefix_len());
        match net.addr() {
            IpAddr::V4(a) => self.trie_v4()?.remove(&Key::new(len, a.octets()))?,
            IpAddr::V6(a) => self.trie_v6()?.remove(&Key::new(len, a.octets()))?,
        }
        Ok(())
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

    pub fn set_settings(&mut self, settings: Settings) -> Result<()> {
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

    /// Number of sources the limiter currently tracks.
    pub fn tracked_sources(&self) -> Result<usize> {
        let map = self
            .ebpf
            .map(names::MAP_LIMITER)
            .ok_or_else(|| anyhow!("map {} missing", names::MAP_LIMITER))?;
        let limiter: HashMap<_, LimiterKey, LimiterState> = HashMap::try_from(map)?;
        Ok(limiter.keys().filter(Result::is_ok).count())
    }

    /// The limiter's state for one bucket, if it is tracked.
    pub fn limiter_state(&self, key: &LimiterKey) -> Result<Option<LimiterState>> {
        let map = self
            .ebpf
            .map(names::MAP_LIMITER)
            .ok_or_else(|| anyhow!("map {} missing", names::MAP_LIMITER))?;
        let limiter: HashMap<_, LimiterKey, LimiterState> = HashMap::try_from(map)?;
        match limiter.get(key, 0) {
            Ok(state) => Ok(Some(state)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        match self.ebpf.map_mut(name) {
            Some(map) => Ok(map),
            None => bail!("map {name} missing from the eBPF object"),
        }
    }
}
