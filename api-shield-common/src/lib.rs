//! Map keys and values shared by the api-shield data plane (eBPF) and its controller.
//!
//! Everything here is `#[repr(C)]` without implicit padding so the kernel and userspace agree
//! byte for byte; with the `user` feature the types are `aya::Pod`.
#![no_std]

/// Names of the programs, and of the maps as [`maps`] declares them, so userspace never
/// passes a typo.
pub mod names {
    use crate::maps;

    pub const PROGRAM_XDP: &str = "api_shield";
    pub const PROGRAM_TC: &str = "api_shield_tc";
    /// The programs that follow a trace, tail-called by the hooks while one runs, and the
    /// program arrays they are called through.
    pub const PROGRAM_TRACE_XDP: &str = "api_shield_trace";
    pub const PROGRAM_TRACE_TC: &str = "api_shield_tc_trace";
    pub const MAP_TRACE_XDP: &str = "TRACE_XDP";
    pub const MAP_TRACE_TC: &str = "TRACE_TC";
    pub const MAP_LIST_V4: &str = maps::LIST_V4.name;
    pub const MAP_LIST_V6: &str = maps::LIST_V6.name;
    pub const MAP_LIST_V6_INNER: &str = maps::LIST_V6_INNER.name;
    pub const MAP_LIST_V4_EXACT: &str = maps::LIST_V4_EXACT.name;
    pub const MAP_LIST_V6_HASHED: &str = maps::LIST_V6_HASHED.name;
    pub const MAP_LIST_V4_INNER: &str = maps::LIST_V4_INNER.name;
    pub const MAP_LIST_V4_SUMMARY: &str = maps::LIST_V4_SUMMARY.name;
    pub const MAP_LIST_V6_SUMMARY: &str = maps::LIST_V6_SUMMARY.name;
    pub const MAP_LIMITER: &str = maps::LIMITER.name;
    pub const MAP_LIMITS: &str = maps::LIMITS.name;
    pub const MAP_COUNTERS: &str = maps::COUNTERS.name;
    pub const MAP_SETTINGS: &str = maps::SETTINGS.name;
    pub const MAP_EVENTS: &str = maps::EVENTS.name;
    pub const MAP_EVENT_LIMIT: &str = maps::EVENT_LIMIT.name;
    pub const MAP_EVENTS_SUPPRESSED: &str = maps::EVENTS_SUPPRESSED.name;
    pub const MAP_RULE_TABLE: &str = maps::RULE_TABLE.name;
    pub const MAP_RULE_COUNTERS: &str = maps::RULE_COUNTERS.name;
    pub const MAP_PENALTIES: &str = maps::PENALTIES.name;
    pub const MAP_TRACE: &str = maps::TRACE.name;
    /// aya-log's ring buffer, which the data plane's trace records go through.
    pub const MAP_AYA_LOGS: &str = "AYA_LOGS";
}

/// Every map of the data plane, described once: its name, type, key and value sizes, flags
/// and how many entries it holds. The eBPF crate checks its statics against these at
/// compile time; the controller sizes the maps and checks pinned ones against them.
pub mod maps {
    use core::mem::size_of;

    use crate::{
        counters::{COUNTER_SLOTS, Counter},
        events::EVENTS_RING_BYTES,
        limiter::{LIMIT_SLOTS, LimiterSet, RateLimit},
        lists::{HashedV6Key, InnerV4, InnerV6, ListVerdict, summary, summary_v6},
        rules::{PENALTY_RING_BYTES, RuleCounter, TABLE_SLOTS},
        settings::Settings,
        trace::TraceFilter,
    };

    /// The kernel's map types (`enum bpf_map_type`) that the data plane uses.
    pub const BPF_MAP_TYPE_HASH: u32 = 1;
    pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
    pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    pub const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
    pub const BPF_MAP_TYPE_RINGBUF: u32 = 27;

    /// Hash entries are allocated as they are added: an empty list costs only its buckets.
    /// LPM tries require it.
    pub const BPF_F_NO_PREALLOC: u32 = 1;
    /// The controller maps the array into its memory and reads or writes it there.
    pub const BPF_F_MMAPABLE: u32 = 1 << 10;

    /// How many entries a map holds.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Entries {
        /// Always this many (for a ring buffer: its bytes).
        Fixed(u32),
        /// The config's list capacity: `capacity.blocklist + capacity.allowlist`.
        ListCapacity,
        /// The limiter's sets: `capacity.sources` buckets in sets of
        /// [`LIMITER_WAYS`](crate::limiter::LIMITER_WAYS).
        LimiterSets,
    }

    /// One map's shape.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MapSpec {
        pub name: &'static str,
        pub map_type: u32,
        pub key_size: u32,
        pub value_size: u32,
        pub flags: u32,
        pub entries: Entries,
    }

    impl MapSpec {
        /// The entries the object file declares; the controller sets the real count at
        /// load for those that follow the config.
        pub const fn declared_entries(&self) -> u32 {
            match self.entries {
                Entries::Fixed(n) => n,
                Entries::ListCapacity | Entries::LimiterSets => 1024,
            }
        }
    }

    const fn sized<T>() -> u32 {
        size_of::<T>() as u32
    }

    /// An LPM trie's key: the prefix length, then the address.
    const fn lpm_key<T>() -> u32 {
        4 + sized::<T>()
    }

    const fn list_hash(name: &'static str, key_size: u32, value_size: u32) -> MapSpec {
        MapSpec {
            name,
            map_type: BPF_MAP_TYPE_HASH,
            key_size,
            value_size,
            flags: BPF_F_NO_PREALLOC,
            entries: Entries::ListCapacity,
        }
    }

    const fn array(name: &'static str, value_size: u32, entries: u32) -> MapSpec {
        MapSpec {
            name,
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size,
            flags: 0,
            entries: Entries::Fixed(entries),
        }
    }

    const fn per_cpu_array(name: &'static str, value_size: u32, entries: u32) -> MapSpec {
        MapSpec {
            map_type: BPF_MAP_TYPE_PERCPU_ARRAY,
            ..array(name, value_size, entries)
        }
    }

    const fn ring(name: &'static str, bytes: u32) -> MapSpec {
        MapSpec {
            name,
            map_type: BPF_MAP_TYPE_RINGBUF,
            key_size: 0,
            value_size: 0,
            flags: 0,
            entries: Entries::Fixed(bytes),
        }
    }

    /// LPM trie, IPv4 source prefixes shorter than /32 -> [`ListVerdict`]. Operators see
    /// it as the whole IPv4 list: its fill counts [`LIST_V4_EXACT`] too.
    pub const LIST_V4: MapSpec = MapSpec {
        name: "LIST_V4",
        map_type: BPF_MAP_TYPE_LPM_TRIE,
        key_size: lpm_key::<[u8; 4]>(),
        value_size: sized::<ListVerdict>(),
        flags: BPF_F_NO_PREALLOC,
        entries: Entries::ListCapacity,
    };
    /// LPM trie, IPv6 source prefixes -> [`ListVerdict`].
    pub const LIST_V6: MapSpec = MapSpec {
        name: "LIST_V6",
        key_size: lpm_key::<[u8; 16]>(),
        ..LIST_V4
    };
    /// Hash, IPv4 addresses listed as /32 -> [`ListVerdict`]: most of a large feed, found
    /// by one lookup where the trie walk lengthens with the list.
    pub const LIST_V4_EXACT: MapSpec =
        list_hash("LIST_V4_EXACT", sized::<[u8; 4]>(), sized::<ListVerdict>());
    /// Hash, an IPv4 /24 holding entries of /25 to /31 (its network address) ->
    /// [`InnerV4`], the verdict of each /31 in it. A /24 missing from it walks the trie.
    pub const LIST_V4_INNER: MapSpec =
        list_hash("LIST_V4_INNER", sized::<[u8; 4]>(), sized::<InnerV4>());
    /// Hash, an IPv6 /24 holding entries of /25 to /39 (its first three bytes, then a zero
    /// byte) -> [`InnerV6`], the verdict of each /32 in it. A /24 missing from it walks the
    /// trie, as does a /32 holding entries longer than /32.
    pub const LIST_V6_INNER: MapSpec =
        list_hash("LIST_V6_INNER", sized::<[u8; 4]>(), sized::<InnerV6>());
    /// Hash, IPv6 entries of /48, /56, /64 and /128 (also in the trie), keyed by
    /// [`HashedV6Key`]: a source inside one is found by a probe. It never holds what the
    /// trie does not; an entry missing from it only costs a trie walk.
    pub const LIST_V6_HASHED: MapSpec = list_hash(
        "LIST_V6_HASHED",
        sized::<HashedV6Key>(),
        sized::<ListVerdict>(),
    );
    /// Mmapable array of u64: the IPv4 lists summarised per /24 ([`summary`]).
    pub const LIST_V4_SUMMARY: MapSpec = MapSpec {
        flags: BPF_F_MMAPABLE,
        ..array("LIST_V4_SUMMARY", sized::<u64>(), summary::WORDS)
    };
    /// Mmapable array of u64: the IPv6 lists summarised per /24, and the lengths of their
    /// entries of /40 or longer per /40 ([`summary_v6`]).
    pub const LIST_V6_SUMMARY: MapSpec = MapSpec {
        flags: BPF_F_MMAPABLE,
        ..array("LIST_V6_SUMMARY", sized::<u64>(), summary_v6::WORDS)
    };
    /// Mmapable array of [`LimiterSet`]: the buckets, in a set-associative table the data
    /// plane reads without a kernel call ([`crate::limiter::set_of`]).
    pub const LIMITER: MapSpec = MapSpec {
        flags: BPF_F_MMAPABLE,
        entries: Entries::LimiterSets,
        ..array("LIMITER", sized::<LimiterSet>(), 0)
    };
    /// Array of [`RateLimit`]; index [`crate::limiter::DEFAULT_LIMIT`], then the rules'.
    pub const LIMITS: MapSpec = array("LIMITS", sized::<RateLimit>(), LIMIT_SLOTS);
    /// Per-CPU array of [`Counter`], indexed by [`crate::counters::Reason`].
    pub const COUNTERS: MapSpec = per_cpu_array("COUNTERS", sized::<Counter>(), COUNTER_SLOTS);
    /// Array with one [`Settings`].
    pub const SETTINGS: MapSpec = array("SETTINGS", sized::<Settings>(), 1);
    /// Ring buffer of [`crate::events::DropEvent`].
    pub const EVENTS: MapSpec = ring("EVENTS", EVENTS_RING_BYTES);
    /// Array of u64 bucket times, one per reason: the in-kernel rate limit on events.
    pub const EVENT_LIMIT: MapSpec = array("EVENT_LIMIT", sized::<u64>(), COUNTER_SLOTS);
    /// Per-CPU array of u64, one per reason: events suppressed by that limit (or a full ring).
    pub const EVENTS_SUPPRESSED: MapSpec =
        per_cpu_array("EVENTS_SUPPRESSED", sized::<u64>(), COUNTER_SLOTS);
    /// Array of limit slots, indexed by [`crate::rules::table_index`]: the first rule
    /// matching each protocol, port and flags.
    pub const RULE_TABLE: MapSpec = array("RULE_TABLE", sized::<u32>(), TABLE_SLOTS);
    /// Per-CPU array of [`RuleCounter`], one per limit slot.
    pub const RULE_COUNTERS: MapSpec =
        per_cpu_array("RULE_COUNTERS", sized::<RuleCounter>(), LIMIT_SLOTS);
    /// Ring buffer of [`crate::rules::PenaltyEvent`]: sources the controller should box.
    pub const PENALTIES: MapSpec = ring("PENALTIES", PENALTY_RING_BYTES);
    /// Array with one [`TraceFilter`]: which sources `api-shield trace` follows, if any.
    pub const TRACE: MapSpec = array("TRACE", sized::<TraceFilter>(), 1);

    /// Every map, in the order the controller checks and pins them.
    pub const ALL: [MapSpec; 19] = [
        LIST_V4,
        LIST_V6,
        LIST_V4_EXACT,
        LIST_V4_INNER,
        LIST_V6_INNER,
        LIST_V6_HASHED,
        LIST_V4_SUMMARY,
        LIST_V6_SUMMARY,
        LIMITER,
        LIMITS,
        COUNTERS,
        SETTINGS,
        EVENTS,
        EVENT_LIMIT,
        EVENTS_SUPPRESSED,
        RULE_TABLE,
        RULE_COUNTERS,
        PENALTIES,
        TRACE,
    ];

    /// Whether two names are the same (`==` on `str` is not yet usable in a const).
    pub const fn same_name(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}

/// Allowlist and blocklist, folded by the controller into one trie per address family.
///
/// One longest-prefix lookup per packet gives the verdict of both lists because the
/// controller never stores a block entry inside (or equal to) an allowed prefix: if an
/// address matches an allowed prefix, every longer matching prefix is also allowed.
pub mod lists {
    /// Value of a list trie entry: what a source matching the prefix gets.
    pub type ListVerdict = u32;
    pub const LIST_ALLOW: ListVerdict = 1;
    pub const LIST_BLOCK: ListVerdict = 2;

    /// What the IPv4 lists say of each /24, four bits per /24, so that most packets skip
    /// the trie walk (a kernel call whose cost grows with the list). The low two bits, the
    /// /24's base verdict: [`NONE`](summary::NONE), [`LIST_ALLOW`] or [`LIST_BLOCK`], that
    /// of the longest entry of /24 or shorter covering it; then two flags:
    /// [`EXACT`](summary::EXACT), /32 entries lie inside (ask the exact map first);
    /// [`TRIE`](summary::TRIE), entries of /25 to /31 lie inside (the /24's
    /// [`InnerV4`] answers, else the trie; not the base). Both flags: the controller is
    /// changing the /24.
    pub mod summary {
        /// No entry covers or lies inside this /24.
        pub const NONE: u32 = 0;
        /// The bits of the base verdict.
        pub const BASE: u32 = 3;
        /// /32 entries lie inside: look the address up in the exact map first.
        pub const EXACT: u32 = 4;
        /// Entries of /25 to /31 lie inside: the /24's [`InnerV4`](super::InnerV4), else
        /// the trie's answer, not the base.
        pub const TRIE: u32 = 8;
        /// Bits per cell.
        pub const CELL_BITS: u32 = 4;
        /// Cells (one per /24) in a u64 word of the map.
        pub const CELLS_PER_WORD: u32 = 64 / CELL_BITS;
        /// Words in the map: 2^24 /24s, 8 MiB.
        pub const WORDS: u32 = (1 << 24) / CELLS_PER_WORD;

        /// The cell of an IPv4 address (network order): its /24, and where that /24's
        /// bits are: (word index, shift).
        #[inline(always)]
        pub const fn cell(addr: [u8; 4]) -> (u32, u32) {
            let slash24 = u32::from_be_bytes(addr) >> 8;
            (
                slash24 / CELLS_PER_WORD,
                (slash24 % CELLS_PER_WORD) * CELL_BITS,
            )
        }
    }

    /// The verdicts of the parts ("slots") of a /24 holding entries of /25 to the
    /// finest length a slot splits, two bits per slot, each the verdict of the longest
    /// entry holding the slot ([`summary::NONE`] if none), or [`ASK_TRIE`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Inner<const WORDS: usize> {
        pub verdicts: [u64; WORDS],
    }

    /// A slot's value when entries longer than the slot lie inside it: the trie answers
    /// (for IPv6, after hash probes for the entries of /40 or longer there, if any).
    pub const ASK_TRIE: ListVerdict = 3;

    impl<const WORDS: usize> Inner<WORDS> {
        /// Slots in a value: 32 per word.
        pub const SLOTS: usize = WORDS * 32;

        /// Every slot holding `verdict`.
        pub const fn filled(verdict: ListVerdict) -> Self {
            Inner {
                verdicts: [verdict as u64 * (u64::MAX / 3); WORDS],
            }
        }

        /// Where slot `slot`'s verdict is: (word, shift). The word is masked, so that the
        /// verifier sees it within the value (WORDS is a power of two).
        #[inline(always)]
        pub const fn position(slot: u8) -> (usize, u32) {
            ((slot as usize >> 5) & (WORDS - 1), (slot as u32 & 31) * 2)
        }

        /// The verdict of slot `slot`.
        #[inline(always)]
        pub const fn verdict(&self, slot: u8) -> ListVerdict {
            let (word, shift) = Self::position(slot);
            (self.verdicts[word] >> shift) as u32 & summary::BASE
        }

        /// Sets slot `slot` to `verdict`.
        pub fn set(&mut self, slot: u8, verdict: ListVerdict) {
            let (word, shift) = Self::position(slot);
            self.verdicts[word] =
                (self.verdicts[word] & !(3 << shift)) | (u64::from(verdict & 3) << shift);
        }
    }

    /// The verdicts of an IPv4 /24 holding entries of /25 to /31, in
    /// [`MAP_LIST_V4_INNER`](crate::names::MAP_LIST_V4_INNER): a slot per /31 (the finest
    /// such an entry splits a /24; slot [`InnerV4::slot`]), each the verdict of the
    /// longest entry of /31 or shorter holding it; /32 entries stay in the exact map,
    /// which is asked first.
    pub type InnerV4 = Inner<4>;

    impl Inner<4> {
        /// The slot of an address whose last byte is `last`: its /31.
        #[inline(always)]
        pub const fn slot(last: u8) -> u8 {
            last >> 1
        }
    }

    /// The verdicts of an IPv6 /24 holding entries of /25 to /39, in
    /// [`MAP_LIST_V6_INNER`](crate::names::MAP_LIST_V6_INNER): a slot per /32 (the fourth
    /// address byte), each the verdict of the longest entry of /32 or shorter holding it,
    /// or [`ASK_TRIE`] where entries longer than /32 lie inside that /32.
    pub type InnerV6 = Inner<8>;

    #[cfg(feature = "user")]
    // SAFETY: u64s: no padding.
    unsafe impl<const WORDS: usize> aya::Pod for Inner<WORDS> {}

    /// An IPv6 entry of a hashed length (/48, /56, /64, /128) in
    /// [`MAP_LIST_V6_HASHED`](crate::names::MAP_LIST_V6_HASHED): its network address
    /// and length.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct HashedV6Key {
        pub addr: [u8; 16],
        pub prefix_len: u32,
    }

    #[cfg(feature = "user")]
    // SAFETY: 16 bytes then a u32, 4-aligned: no padding.
    unsafe impl aya::Pod for HashedV6Key {}

    /// What the IPv6 lists say of each /24 (the first 24 address bits), as [`summary`]
    /// says of IPv4's, so that most packets skip the trie walk: four bits per /24, the
    /// base verdict of the longest entry of /24 or shorter covering it, then two flags:
    /// [`LONG`](summary_v6::LONG), entries of /40 or longer lie inside (read the lengths
    /// of the source's /40); [`TRIE`](summary::TRIE), entries of /25 to /39 lie inside
    /// (the /24's [`InnerV6`] answers; where it asks, the /40's lengths as for
    /// [`LONG`](summary_v6::LONG) if that is set too, then the trie; where the /24 has none,
    /// the trie), whether or not [`LONG`](summary_v6::LONG) is set too. Both flags: entries of both kinds lie inside, or the controller is
    /// changing the /24 (and has taken its [`InnerV6`] out).
    ///
    /// After the cells, four bits per value of address bits 16 to 39 (a /40 without its
    /// first 16 bits; within one /24 that is the /40 itself): the lengths of the entries
    /// of /40 or longer there. Where only hashed lengths (/48, /56, /64, /128) lie, the data
    /// plane probes [`MAP_LIST_V6_HASHED`](crate::names::MAP_LIST_V6_HASHED) at each,
    /// longest first, and a hit is the longest match; else (another length there, or no
    /// probe hit) it walks the trie. The bits alias across /24s: an alias only costs
    /// probes or a walk.
    pub mod summary_v6 {
        use super::summary;

        /// Entries of /40 or longer lie inside: read the lengths of the source's /40.
        pub const LONG: u32 = summary::EXACT;
        /// The shortest length [`LONG`] stands for (shorter, down to /25: [`summary::TRIE`]).
        pub const LONG_FROM: u8 = 40;
        /// Lengths of a /40's entries: a /48 ...
        pub const HASHED_48: u32 = 1;
        /// ... a /64 ...
        pub const HASHED_64: u32 = 2;
        /// ... a /128 ...
        pub const HASHED_128: u32 = 4;
        /// ... a /56 (all four also in the hash). The highest bit, so that a program
        /// that does not hash /56s reads this flag as "walk the trie" while a restart
        /// hands over to its successor ...
        pub const HASHED_56: u32 = 8;
        /// ... or an entry of another length: every bit, the trie. A /40 holding all four
        /// hashed lengths reads the same and walks the trie too: the right verdict, slower.
        pub const UNHASHED: u32 = HASHED_48 | HASHED_64 | HASHED_128 | HASHED_56;
        /// The hashed lengths and their flags, longest first: the order of the probes.
        pub const HASHED: [(u32, u32); 4] = [
            (HASHED_128, 128),
            (HASHED_64, 64),
            (HASHED_56, 56),
            (HASHED_48, 48),
        ];
        /// Words of the /24 cells: 2^24 cells of [`summary::CELL_BITS`], 8 MiB.
        pub const CELL_WORDS: u32 = summary::WORDS;
        /// Words of the /40 lengths: 2^24 of four bits, 8 MiB.
        pub const LONG_WORDS: u32 = (1 << 24) / summary::CELLS_PER_WORD;
        /// Words in the map.
        pub const WORDS: u32 = CELL_WORDS + LONG_WORDS;

        /// The cell of an IPv6 address: its /24, and where that /24's bits are:
        /// (word index, shift).
        #[inline(always)]
        pub const fn cell(addr: &[u8; 16]) -> (u32, u32) {
            summary::cell([addr[0], addr[1], addr[2], 0])
        }

        /// Where the lengths of an address's /40 (bits 16 to 39) are: (word index, shift).
        #[inline(always)]
        pub const fn long_cell(addr: &[u8; 16]) -> (u32, u32) {
            let bits = ((addr[2] as u32) << 16) | ((addr[3] as u32) << 8) | addr[4] as u32;
            (
                CELL_WORDS + bits / summary::CELLS_PER_WORD,
                (bits % summary::CELLS_PER_WORD) * summary::CELL_BITS,
            )
        }

        /// The length flag of an entry of [`LONG_FROM`] or longer: its [`HASHED`] flag,
        /// or [`UNHASHED`].
        #[inline(always)]
        pub const fn length_flag(len: u8) -> u32 {
            let mut i = 0;
            while i < HASHED.len() {
                if HASHED[i].1 == len as u32 {
                    return HASHED[i].0;
                }
                i += 1;
            }
            UNHASHED
        }
    }
}

/// Verdict counters: one per-CPU slot of packets and bytes per reason.
pub mod counters {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Counter {
        pub packets: u64,
        pub bytes: u64,
    }

    #[cfg(feature = "user")]
    // SAFETY: two u64, no padding.
    unsafe impl aya::Pod for Counter {}

    /// Why a packet got its verdict; the value is its slot in the counters map.
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum Reason {
        /// Within its source's limits (or no limit): passed.
        Passed = 0,
        /// Source in the allowlist: passed, no limits.
        Allowlisted = 1,
        /// Source in the blocklist: dropped.
        Blocklisted = 2,
        /// Source over its token bucket: dropped.
        RateLimited = 3,
        /// Malformed frame: passed or dropped as the config says.
        Malformed = 4,
        /// Not IPv4/IPv6 (ARP, LLDP, ...): passed untouched.
        NonIp = 5,
        /// Dry run: would have been dropped as blocklisted; passed.
        WouldDropBlocklisted = 10,
        /// Dry run (global or the rule's): over its token bucket; passed.
        WouldDropRateLimited = 11,
        /// Dry run: malformed and `on_malformed: drop`; passed.
        WouldDropMalformed = 12,
    }

    /// A dry-run verdict is counted in its reason's slot plus this.
    pub const WOULD_DROP_OFFSET: u32 = 8;

    impl Reason {
        pub const ALL: [Reason; 9] = [
            Reason::Passed,
            Reason::Allowlisted,
            Reason::Blocklisted,
            Reason::RateLimited,
            Reason::Malformed,
            Reason::NonIp,
            Reason::WouldDropBlocklisted,
            Reason::WouldDropRateLimited,
            Reason::WouldDropMalformed,
        ];

        /// The reason whose drop a dry run turned into a pass; itself otherwise.
        pub const fn base(self) -> Reason {
            match self {
                Reason::WouldDropBlocklisted => Reason::Blocklisted,
                Reason::WouldDropRateLimited => Reason::RateLimited,
                Reason::WouldDropMalformed => Reason::Malformed,
                r => r,
            }
        }

        pub const fn is_would_drop(self) -> bool {
            self as u32 >= WOULD_DROP_OFFSET
        }

        pub fn from_slot(slot: u32) -> Option<Reason> {
            Reason::ALL.into_iter().find(|r| *r as u32 == slot)
        }

        /// The stable name used in logs, CLI output and metrics.
        pub const fn name(self) -> &'static str {
            match self {
                Reason::Passed => "passed",
                Reason::Allowlisted => "allowlisted",
                Reason::Blocklisted => "blocklisted",
                Reason::RateLimited => "rate_limited",
                Reason::Malformed => "malformed",
                Reason::NonIp => "non_ip",
                Reason::WouldDropBlocklisted => "would_drop_blocklisted",
                Reason::WouldDropRateLimited => "would_drop_rate_limited",
                Reason::WouldDropMalformed => "would_drop_malformed",
            }
        }
    }

    /// Slots in the counters map; room is left for reasons added later.
    pub const COUNTER_SLOTS: u32 = 16;
    /// Not a reason: the slot counting buckets the limiter created (in `packets`). Less
    /// the buckets it holds, that is how many the LRU evicted.
    pub const LIMITER_CREATED_SLOT: u32 = 15;
}

/// Per-source token buckets, implemented as GCRA (virtual scheduling): each bucket is one
/// "theoretical arrival time" (TAT), so a refill-and-take is a single compare-and-swap and
/// stays exact when several CPUs hit the same source at once.
pub mod limiter {
    /// Bucket time is kept in 1/16 ns so byte costs stay precise at high byte rates;
    /// a u64 of these lasts 36 years of uptime.
    pub const TIME_SHIFT: u32 = 4;
    /// Units of bucket time per second.
    pub const UNITS_PER_SEC: u64 = 1_000_000_000 << TIME_SHIFT;
    /// Byte costs carry this many extra fractional bits.
    pub const BYTE_COST_FRAC_BITS: u32 = 16;

    /// Index of the default limit in the limits map.
    pub const DEFAULT_LIMIT: u32 = 0;
    /// Entries in the limits map: the default plus up to [`MAX_RULES`] rules.
    pub const LIMIT_SLOTS: u32 = 65;
    /// Rules a config may have; rule `i` (from 0) uses limit slot `i + 1`.
    pub const MAX_RULES: u32 = LIMIT_SLOTS - 1;

    /// `RateLimit::flags`: count-only; over-limit packets pass and count as would-drop.
    pub const LIMIT_DRY_RUN: u32 = 1;
    /// `RateLimit::flags`: read the time from the kernel tick (`jiffies`, `tick_ns` apart)
    /// instead of the nanosecond clock: one load where `bpf_ktime_get_ns` is a helper
    /// call. The controller sets it only where the burst spans at least
    /// [`TICK_CLOCK_MIN_TICKS`] ticks, so a tick's refill always fits in the bucket and
    /// the rate stays exact.
    pub const LIMIT_TICK_CLOCK: u32 = 2;
    /// See [`LIMIT_TICK_CLOCK`].
    pub const TICK_CLOCK_MIN_TICKS: u64 = 2;
    /// The kernel starts jiffies this many ticks before 2^32 (`INITIAL_JIFFIES` is
    /// -300 s worth of ticks as a u32), so that ticks since boot = jiffies - 2^32 + this.
    pub const INITIAL_JIFFIES_SECS: u64 = 300;

    /// One limit, precomputed by the controller so the data plane only adds and compares.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RateLimit {
        /// Bucket time one packet costs; 0: no packet limit.
        pub packet_cost: u64,
        /// How far ahead of now the packet TAT may run: burst_packets * packet_cost.
        pub packet_capacity: u64,
        /// Bucket time one byte costs, with [`BYTE_COST_FRAC_BITS`] fractional bits; 0: no byte limit.
        pub byte_cost_fp: u64,
        /// How far ahead of now the byte TAT may run: burst_bytes worth of bucket time.
        pub byte_capacity: u64,
        /// ANDed with an IPv4 source (as ::ffff:a.b.c.d) to make its bucket key: sources in
        /// one prefix share a bucket.
        pub mask_v4: [u8; 16],
        /// ANDed with an IPv6 source to make its bucket key.
        pub mask_v6: [u8; 16],
        /// [`LIMIT_DRY_RUN`] | [`LIMIT_TICK_CLOCK`].
        pub flags: u32,
        /// Drops within `penalty_window` after which the bucket's prefix is reported to the
        /// controller for the penalty box; 0: never.
        pub penalty_after: u32,
        /// In bucket time.
        pub penalty_window: u64,
        /// Prefix lengths of the masks (for penalty reports).
        pub prefix_v4: u8,
        pub prefix_v6: u8,
        pub _pad: [u8; 2],
        /// Nanoseconds per kernel tick, for [`LIMIT_TICK_CLOCK`].
        pub tick_ns: u32,
    }

    impl RateLimit {
        pub const fn is_unlimited(&self) -> bool {
            self.packet_cost == 0 && self.byte_cost_fp == 0
        }
    }

    /// Key of a bucket: the source address (IPv4 as ::ffff:a.b.c.d) and the limit it is under.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct LimiterKey {
        pub addr: [u8; 16],
        pub limit: u32,
    }

    /// State of a bucket: the TATs of its packet and byte dimensions, in bucket time, and
    /// what the source sent (for `top`). The counters are plain adds, not atomics: they may
    /// undercount slightly when two CPUs hit one source at once, which `top` can afford and
    /// the hot path cannot.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct LimiterState {
        pub packet_tat: u64,
        pub byte_tat: u64,
        /// Packets seen from the source under this limit, passed or dropped.
        pub packets: u64,
        pub bytes: u64,
        /// Of those, dropped as over the limit.
        pub drops: u64,
        /// Start of the current penalty window, in bucket time, and drops within it.
        pub window_start: u64,
        pub window_drops: u64,
    }

    /// Buckets per set of the limiter table. A new source takes the least busy of its set's
    /// ways (an empty one first), so an active flooder's bucket survives up to three others
    /// hashed beside it, as an LRU would keep it.
    pub const LIMITER_WAYS: usize = 4;

    /// One bucket of the limiter table: whose it is, and its state.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct LimiterSlot {
        pub key: LimiterKey,
        /// Non-zero once the slot holds a bucket (an all-zero key is a valid key).
        pub occupied: u32,
        pub state: LimiterState,
    }

    /// The ways one key may occupy, chosen by [`set_of`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct LimiterSet {
        pub slots: [LimiterSlot; LIMITER_WAYS],
    }

    /// The set of `key` among `sets`: a seeded hash of the key's five words, scaled to the
    /// set count by a multiply (no division). The seed is random per table, so sources
    /// cannot be chosen offline to crowd one set. Each word is mixed with its own rotation
    /// of the seed and multiplied apart (five independent multiplies, not a chain of them:
    /// the hash sits on every limited packet's path), then the sum is finalised as in
    /// SplitMix64. Data plane and controller both use it, so they find the same bucket.
    #[inline(always)]
    pub fn set_of(words: [u32; 5], seed: u64, sets: u32) -> u32 {
        const MUL: [u64; 5] = [
            0x9e37_79b9_7f4a_7c15,
            0xc2b2_ae3d_27d4_eb4f,
            0x1656_67b1_9e37_79f9,
            0xd6e8_feb8_6659_fd93,
            0xff51_afd7_ed55_8ccd,
        ];
        let mut h = 0u64;
        let mut i = 0;
        while i < 5 {
            let mixed = words[i] as u64 ^ seed.rotate_left(13 * i as u32);
            h = h.wrapping_add(mixed.wrapping_mul(MUL[i]));
            i += 1;
        }
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
        (((h >> 32) * sets as u64) >> 32) as u32
    }

    impl LimiterKey {
        /// The key as the five native-endian words it is stored as.
        #[inline(always)]
        pub fn words(&self) -> [u32; 5] {
            let a = &self.addr;
            [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
                self.limit,
            ]
        }
    }

    #[cfg(feature = "user")]
    // SAFETY: 4 u64, 2 x 16 bytes, 2 u32, u64, 4 bytes, u32: 88 bytes, 8-aligned, no padding.
    unsafe impl aya::Pod for RateLimit {}
    #[cfg(feature = "user")]
    // SAFETY: 16 bytes + u32, size 20, alignment 4, no padding.
    unsafe impl aya::Pod for LimiterKey {}
    #[cfg(feature = "user")]
    // SAFETY: seven u64, no padding.
    unsafe impl aya::Pod for LimiterState {}
    #[cfg(feature = "user")]
    // SAFETY: a 20-byte key and a u32 (24 bytes, 8-aligned), then seven u64: 80 bytes.
    unsafe impl aya::Pod for LimiterSlot {}
    #[cfg(feature = "user")]
    // SAFETY: four 80-byte slots, no padding.
    unsafe impl aya::Pod for LimiterSet {}
}

/// Settings the controller can change at run time without reloading the program.
pub mod settings {
    /// Global dry run: nothing is dropped; would-be drops are counted as such.
    pub const SETTINGS_DRY_RUN: u32 = 1;
    /// The rule table is in use (else every source is under the default limit).
    pub const SETTINGS_RULES: u32 = 2;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Settings {
        /// Non-zero: drop malformed frames; zero: pass them (counted either way).
        pub drop_malformed: u32,
        /// [`SETTINGS_DRY_RUN`] | [`SETTINGS_RULES`].
        pub flags: u32,
        /// Bucket time one drop event costs (per reason); 0: no events.
        pub event_cost: u64,
        /// How far ahead the event bucket may run: the burst of events per reason.
        pub event_capacity: u64,
        /// The limiter table's hash seed and set count ([`crate::limiter::set_of`]); the
        /// controller writes them at load, before the program is attached. Sets 0: no table
        /// yet, every source conforms.
        pub limiter_seed: u64,
        pub limiter_sets: u32,
        pub _pad: u32,
    }

    #[cfg(feature = "user")]
    // SAFETY: two u32, three u64, two u32: 40 bytes, no padding.
    unsafe impl aya::Pod for Settings {}
}

/// Drop events, sampled in the kernel so at most a configured number per second per reason
/// reach userspace.
pub mod events {
    /// Bytes of the events ring buffer (a power of two, a multiple of the page size).
    pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

    /// `DropEvent::flags`: the source address is IPv6 (else IPv4, as ::ffff:a.b.c.d).
    pub const EVENT_SOURCE_V6: u8 = 1;
    /// `DropEvent::flags`: the frame had a parsed source address.
    pub const EVENT_SOURCE_KNOWN: u8 = 2;
    /// `DropEvent::flags`: dry run: the frame was passed, not dropped.
    pub const EVENT_WOULD_DROP: u8 = 4;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct DropEvent {
        /// bpf_ktime_get_ns() when dropped.
        pub timestamp_ns: u64,
        pub source: [u8; 16],
        pub ifindex: u32,
        /// A [`crate::counters::Reason`].
        pub reason: u32,
        /// The limit (rule) that applied; [`crate::limiter::DEFAULT_LIMIT`] for the default.
        pub rule: u32,
        /// Destination port (TCP/UDP), host order; 0 if none.
        pub dst_port: u16,
        pub protocol: u8,
        pub flags: u8,
    }

    #[cfg(feature = "user")]
    // SAFETY: 8 + 16 + 4 + 4 + 4 + 2 + 1 + 1 = 40 bytes, no padding.
    unsafe impl aya::Pod for DropEvent {}
}

/// `api-shield trace`: the sources the data plane reports every packet of (through
/// aya-log), while a trace runs. With no trace running the check is one inlined array load
/// and a branch.
pub mod trace {
    /// Source prefixes a trace filter holds: one per concurrent `trace` session.
    pub const TRACE_NETS: usize = 4;

    /// One traced prefix: a source matches if `source & mask == addr` and its family is
    /// `family` (IPv4 sources as ::ffff:a.b.c.d).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct TraceNet {
        pub addr: [u8; 16],
        pub mask: [u8; 16],
        /// 4 or 6.
        pub family: u32,
        pub _pad: u32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct TraceFilter {
        /// Bit i: `nets[i]` is traced. 0: no trace runs (the data plane's only check then).
        pub active: u32,
        pub _pad: u32,
        /// bpf_ktime_get_ns() after which the data plane stops tracing by itself, should
        /// the controller never clear the filter (it died).
        pub until_ns: u64,
        /// The records' rate bound (a GCRA bucket, in ns): cost per record, burst, and the
        /// bucket's arrival time, which the data plane advances.
        pub cost_ns: u64,
        pub capacity_ns: u64,
        pub tat_ns: u64,
        /// Matching packets not reported: over the rate bound, or the log ring full.
        pub missed: u64,
        pub nets: [TraceNet; TRACE_NETS],
    }

    /// A trace record's message, as the data plane writes it through aya-log and the
    /// controller parses it back: `key=value` pairs in this order.
    pub const RECORD_KEYS: [&str; 11] = [
        "net", "time", "if", "src", "proto", "sport", "dport", "drop", "reason", "rule", "tokens",
    ];

    /// `tokens` when the packet met no bucket (listed, or an unlimited rule).
    pub const NO_TOKENS: u64 = u64::MAX;

    #[cfg(feature = "user")]
    // SAFETY: 16 + 16 + 4 + 4 = 40 bytes, no padding.
    unsafe impl aya::Pod for TraceNet {}
    #[cfg(feature = "user")]
    // SAFETY: 2 u32, 5 u64, 4 x 40 bytes: 208 bytes, no padding.
    unsafe impl aya::Pod for TraceFilter {}
}

/// Rules: which limit a packet falls under, their counters, and penalty reports.
///
/// The controller compiles the ordered rules into one table with a slot per (class, port):
/// the data plane finds a packet's first matching rule with a single array lookup, so the
/// cost per packet and the verifier's work do not grow with the number of rules.
pub mod rules {
    /// TCP with SYN set and ACK clear (a connection attempt), by destination port.
    pub const CLASS_TCP_SYN: u32 = 0;
    /// Any other TCP, by destination port (non-first fragments: port 0).
    pub const CLASS_TCP: u32 = 1;
    /// UDP, by destination port (non-first fragments: port 0).
    pub const CLASS_UDP: u32 = 2;
    /// Every other protocol, by protocol number.
    pub const CLASS_OTHER: u32 = 3;
    pub const PORTS: u32 = 65_536;
    /// Entries of the rule table.
    pub const TABLE_SLOTS: u32 = CLASS_OTHER * PORTS + 256;

    /// The table slot of a packet of `class`; `port` is the destination port for TCP and
    /// UDP, the protocol number for [`CLASS_OTHER`].
    #[inline(always)]
    pub const fn table_index(class: u32, port: u16) -> u32 {
        class * PORTS + port as u32
    }

    /// Packets and bytes per limit slot, by what the limiter did.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RuleCounter {
        pub passed_packets: u64,
        pub passed_bytes: u64,
        pub dropped_packets: u64,
        pub dropped_bytes: u64,
        /// Over the limit under a dry run: passed.
        pub would_drop_packets: u64,
        pub would_drop_bytes: u64,
    }

    /// Bytes of the penalty ring: 1,365 reports; a bucket reports at most once a window.
    pub const PENALTY_RING_BYTES: u32 = 64 * 1024;

    /// `PenaltyEvent::flags`: the prefix is IPv6.
    pub const PENALTY_V6: u32 = 1;

    /// A bucket's prefix went over `penalty_after` drops within the window.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct PenaltyEvent {
        pub timestamp_ns: u64,
        /// The bucket key's address (already masked to the rule's prefix).
        pub addr: [u8; 16],
        /// Limit slot (0: default, i + 1: rule i).
        pub limit: u32,
        pub prefix_len: u32,
        pub drops: u64,
        pub flags: u32,
        pub _pad: u32,
    }

    #[cfg(feature = "user")]
    // SAFETY: six u64, no padding.
    unsafe impl aya::Pod for RuleCounter {}
    #[cfg(feature = "user")]
    // SAFETY: u64, 16 bytes, 2 u32, u64, 2 u32: 48 bytes, no padding.
    unsafe impl aya::Pod for PenaltyEvent {}
}

/// The layouts the data plane relies on (it reads keys as words and masks at fixed
/// offsets, and the pins of a running system hold these shapes): a change is a build
/// error here, not a misread map at run time.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};

    use crate::{counters, events, limiter, lists, rules, settings};

    assert!(size_of::<limiter::RateLimit>() == 88 && align_of::<limiter::RateLimit>() == 8);
    assert!(offset_of!(limiter::RateLimit, mask_v4) == 32);
    assert!(offset_of!(limiter::RateLimit, mask_v6) == 48);
    assert!(offset_of!(limiter::RateLimit, flags) == 64);
    assert!(offset_of!(limiter::RateLimit, tick_ns) == 84);
    assert!(size_of::<limiter::LimiterKey>() == 20 && align_of::<limiter::LimiterKey>() == 4);
    assert!(offset_of!(limiter::LimiterKey, limit) == 16);
    assert!(size_of::<limiter::LimiterState>() == 56);
    assert!(offset_of!(limiter::LimiterState, byte_tat) == 8);
    assert!(size_of::<limiter::LimiterSlot>() == 80);
    assert!(offset_of!(limiter::LimiterSlot, key) == 0);
    assert!(offset_of!(limiter::LimiterSlot, occupied) == 20);
    assert!(offset_of!(limiter::LimiterSlot, state) == 24);
    assert!(size_of::<limiter::LimiterSet>() == 320);
    assert!(size_of::<settings::Settings>() == 40);
    assert!(offset_of!(settings::Settings, limiter_seed) == 24);
    assert!(size_of::<counters::Counter>() == 16);
    assert!(size_of::<events::DropEvent>() == 40);
    assert!(size_of::<rules::RuleCounter>() == 48);
    assert!(size_of::<rules::PenaltyEvent>() == 48);
    assert!(size_of::<lists::HashedV6Key>() == 20 && align_of::<lists::HashedV6Key>() == 4);
    assert!(offset_of!(lists::HashedV6Key, prefix_len) == 16);
    assert!(size_of::<lists::InnerV4>() == 32);
    assert!(size_of::<lists::InnerV6>() == 64);
};
