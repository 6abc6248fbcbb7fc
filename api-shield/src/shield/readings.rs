//! What the loaded program reports: counters, rule counters, suppressed events, map fill,
//! the limiter's buckets, and the ring buffers of drop events and penalty reports.

use anyhow::{Context as _, Result, anyhow, bail};
use api_shield_common::{
    counters::{COUNTER_SLOTS, Counter, Reason},
    limiter::{LIMIT_SLOTS, LimiterKey, LimiterState},
    names,
    rules::RuleCounter,
};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use ipnet::IpNet;
use std::net::IpAddr;

use super::Shield;

/// Totals of one reason's counter, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReasonTotals {
    pub reason_index: u32,
    pub packets: u64,
    pub bytes: u64,
}

impl Shield {
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
            names::MAP_TRACE,
        ];
        // The list store knows what the list maps hold (it read them at load and writes
        // every change): no walk of a million keys, a system call each.
        let (v4, v6) = self.lists().counts();
        for shape in self.shapes.iter().filter(|s| !fixed.contains(&s.name())) {
            let entries = match shape.name() {
                names::MAP_LIST_V4 => v4,
                names::MAP_LIST_V6 => v6,
                names::MAP_LIMITER => {
                    out.push((
                        shape.name(),
                        self.limiter.occupied(),
                        self.limiter.capacity() as u32,
                    ));
                    continue;
                }
                _ => shape.max_entries as usize,
            };
            out.push((shape.name(), entries, shape.max_entries));
        }
        Ok(out)
    }

    /// What the buckets of limit slot `slot` did, summed over CPUs.
    pub fn rule_counter(&self, slot: u32) -> Result<RuleCounter> {
        let map = self
            .ebpf
            .map(names::MAP_RULE_COUNTERS)
            .context("rule counters map missing")?;
        let per_cpu: PerCpuArray<_, RuleCounter> = PerCpuArray::try_from(map)?;
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
    }

    /// Per limit slot (0: default, i + 1: rule i), what its buckets did, summed over CPUs.
    pub fn rule_counters(&self) -> Result<Vec<RuleCounter>> {
        (0..LIMIT_SLOTS)
            .map(|slot| self.rule_counter(slot))
            .collect()
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

    /// Takes the penalty ring buffer out (once), for a reader task to own.
    pub fn take_penalties(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(names::MAP_PENALTIES)
            .context("the penalty ring buffer was already taken")?;
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
}

/// What the live maps hold for one source and one kind of packet: what `explain` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveView {
    /// The list tries' verdict for the source (0: listed nowhere).
    pub list_verdict: api_shield_common::lists::ListVerdict,
    pub settings: api_shield_common::settings::Settings,
    /// The limit slot the rule table gives the packet (0: the default limit).
    pub slot: u32,
    pub limit: api_shield_common::limiter::RateLimit,
}

impl Shield {
    /// Reads, from the kernel's maps (not this process's copies), the list verdict of
    /// `source`, the settings, the limit slot of rule-table index `table_index` and that
    /// slot's limit.
    pub fn live_view(&self, source: IpAddr, table_index: u32) -> Result<LiveView> {
        use api_shield_common::{
            limiter::RateLimit, lists::ListVerdict, settings::SETTINGS_RULES, settings::Settings,
        };
        use aya::maps::{Array, LpmTrie, lpm_trie::Key};
        let map = |name: &str| {
            self.ebpf
                .map(name)
                .with_context(|| format!("map {name} missing"))
        };
        // A lookup in an LPM trie returns the longest prefix holding the key: the verdict
        // the data plane's summaries and hashes stand in for. IPv4 addresses (/32) are
        // held in the exact map instead, and are the longest match where listed.
        let list_verdict = match source {
            IpAddr::V4(a) => {
                let exact: aya::maps::HashMap<_, [u8; 4], ListVerdict> =
                    aya::maps::HashMap::try_from(map(names::MAP_LIST_V4_EXACT)?)?;
                let trie: LpmTrie<_, [u8; 4], ListVerdict> =
                    LpmTrie::try_from(map(names::MAP_LIST_V4)?)?;
                exact
                    .get(&a.octets(), 0)
                    .ok()
                    .or_else(|| trie.get(&Key::new(32, a.octets()), 0).ok())
            }
            IpAddr::V6(a) => {
                let trie: LpmTrie<_, [u8; 16], ListVerdict> =
                    LpmTrie::try_from(map(names::MAP_LIST_V6)?)?;
                trie.get(&Key::new(128, a.octets()), 0).ok()
            }
        }
        .unwrap_or(0);
        let settings: Array<_, Settings> = Array::try_from(map(names::MAP_SETTINGS)?)?;
        let settings = settings.get(&0, 0).context("reading the settings")?;
        let slot = if settings.flags & SETTINGS_RULES != 0 {
            let table: Array<_, u32> = Array::try_from(map(names::MAP_RULE_TABLE)?)?;
            table
                .get(&table_index, 0)
                .context("reading the rule table")?
        } else {
            api_shield_common::limiter::DEFAULT_LIMIT
        };
        let limits: Array<_, RateLimit> = Array::try_from(map(names::MAP_LIMITS)?)?;
        let limit = limits.get(&slot, 0).context("reading a limit")?;
        Ok(LiveView {
            list_verdict,
            settings,
            slot,
            limit,
        })
    }
}

impl Shield {
    /// The distinct limit slots the rule table gives the ports of `class` (as this process
    /// wrote it): one slot means the port does not matter to the verdict.
    pub fn slots_of_class(&self, class: u32) -> Vec<u32> {
        use api_shield_common::rules::{PORTS, table_index};
        let Some(table) = &self.rule_table else {
            return vec![api_shield_common::limiter::DEFAULT_LIMIT];
        };
        let first = table_index(class, 0) as usize;
        let mut slots: Vec<u32> = table[first..first + PORTS as usize].to_vec();
        slots.sort_unstable();
        slots.dedup();
        slots
    }
}

impl Shield {
    /// The trace filter the data plane follows now.
    pub fn trace_filter(&self) -> Result<api_shield_common::trace::TraceFilter> {
        use aya::maps::Array;
        let map = self
            .ebpf
            .map(names::MAP_TRACE)
            .context("trace map missing")?;
        let array: Array<_, api_shield_common::trace::TraceFilter> = Array::try_from(map)?;
        Ok(array.get(&0, 0)?)
    }

    /// Points the data plane at the traced prefixes and deadline of `next`, keeping the
    /// rate bucket and the missed count it keeps itself.
    pub fn set_trace(&mut self, next: &api_shield_common::trace::TraceFilter) -> Result<()> {
        use aya::maps::Array;
        let current = self.trace_filter()?;
        let value = api_shield_common::trace::TraceFilter {
            tat_ns: current.tat_ns,
            missed: current.missed,
            ..*next
        };
        let map = self
            .ebpf
            .map_mut(names::MAP_TRACE)
            .context("trace map missing")?;
        let mut array: Array<_, api_shield_common::trace::TraceFilter> = Array::try_from(map)?;
        array.set(0, value, 0).context("writing the trace filter")?;
        Ok(())
    }

    /// Starts reading the data plane's aya-log records (trace records) into `logger`; the
    /// caller polls the returned logger's fd and flushes it.
    pub fn take_trace_log<T: log::Log>(&mut self, logger: T) -> Result<aya_log::EbpfLogger<T>> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .context("opening the data plane's log ring (aya-log)")
    }
}
