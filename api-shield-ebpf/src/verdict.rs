//! The verdict, shared by every hook: lists, then the token bucket, then counters.

// The bpf target declares no compare-and-swap, so `core::sync::atomic` offers none; the
// intrinsics still emit LLVM atomics, which BPF CPU v3 (build.rs) lowers to BPF_ATOMIC ops.
use core::intrinsics::{AtomicOrdering::Relaxed, atomic_cxchg, atomic_xsub};

use core::mem::MaybeUninit;

use api_shield_common::{
    counters::{COUNTER_SLOTS, Counter, LIMITER_CREATED_SLOT, Reason, WOULD_DROP_OFFSET},
    events::{DropEvent, EVENT_SOURCE_KNOWN, EVENT_SOURCE_V6, EVENT_WOULD_DROP, EVENTS_RING_BYTES},
    limiter::{
        BYTE_COST_FRAC_BITS, DEFAULT_LIMIT, INITIAL_JIFFIES_SECS, LIMIT_DRY_RUN, LIMIT_SLOTS,
        LIMIT_TICK_CLOCK, LIMITER_WAYS, LimiterKey, LimiterSet, LimiterSlot, LimiterState,
        RateLimit, TIME_SHIFT, set_of,
    },
    lists::{
        ASK_TRIE, HashedV6Key, InnerV4, InnerV6, LIST_ALLOW, LIST_BLOCK, ListVerdict, summary,
        summary_v6,
    },
    rules::{
        CLASS_OTHER, CLASS_TCP, CLASS_TCP_SYN, CLASS_UDP, PENALTY_RING_BYTES, PENALTY_V6,
        PenaltyEvent, RuleCounter, TABLE_SLOTS, table_index,
    },
    settings::{SETTINGS_DRY_RUN, SETTINGS_RULES, Settings},
};
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_jiffies64},
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
};

use crate::parse::{Frame, Ipv4Info, L3, L4, parse_l3, parse_l4_v4, parse_l4_v6};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

// Capacities here are placeholders: the controller sets each from the config at load.
#[map(name = "LIST_V4")]
static LIST_V4: LpmTrie<[u8; 4], ListVerdict> = LpmTrie::with_max_entries(1024, 0);
/// Flags 1024: BPF_F_MMAPABLE, so the controller writes them as memory (8 MiB of cells
/// each, and the IPv6 /40 lengths).
#[map(name = "LIST_V4_SUMMARY")]
static LIST_V4_SUMMARY: Array<u64> = Array::with_max_entries(summary::WORDS, 1024);
#[map(name = "LIST_V6_SUMMARY")]
static LIST_V6_SUMMARY: Array<u64> = Array::with_max_entries(summary_v6::WORDS, 1024);
#[map(name = "LIST_V6")]
static LIST_V6: LpmTrie<[u8; 16], ListVerdict> = LpmTrie::with_max_entries(1024, 0);
/// Flags 1: BPF_F_NO_PREALLOC, so an empty list costs only the buckets.
#[map(name = "LIST_V4_EXACT")]
static LIST_V4_EXACT: HashMap<[u8; 4], ListVerdict> = HashMap::with_max_entries(1024, 1);
/// Flags 1: BPF_F_NO_PREALLOC, as above.
#[map(name = "LIST_V4_INNER")]
static LIST_V4_INNER: HashMap<[u8; 4], InnerV4> = HashMap::with_max_entries(1024, 1);
/// Flags 1: BPF_F_NO_PREALLOC, as above.
#[map(name = "LIST_V6_INNER")]
static LIST_V6_INNER: HashMap<[u8; 4], InnerV6> = HashMap::with_max_entries(1024, 1);
/// Flags 1: BPF_F_NO_PREALLOC, as above.
#[map(name = "LIST_V6_HASHED")]
static LIST_V6_HASHED: HashMap<HashedV6Key, ListVerdict> = HashMap::with_max_entries(1024, 1);
/// An array, not an LRU hash: its lookup is a few instructions the verifier inlines, where
/// a hash lookup is a kernel call (~25 ns here). Flags 1024: BPF_F_MMAPABLE, so the
/// controller reads it as memory.
#[map(name = "LIMITER")]
static LIMITER: Array<LimiterSet> = Array::with_max_entries(1024, 1024);
#[map(name = "LIMITS")]
static LIMITS: Array<RateLimit> = Array::with_max_entries(LIMIT_SLOTS, 0);
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);
#[map(name = "SETTINGS")]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);
#[map(name = "EVENT_LIMIT")]
static EVENT_LIMIT: Array<u64> = Array::with_max_entries(COUNTER_SLOTS, 0);
#[map(name = "EVENTS_SUPPRESSED")]
static EVENTS_SUPPRESSED: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);
#[map(name = "RULE_TABLE")]
static RULE_TABLE: Array<u32> = Array::with_max_entries(TABLE_SLOTS, 0);
#[map(name = "RULE_COUNTERS")]
static RULE_COUNTERS: PerCpuArray<RuleCounter> = PerCpuArray::with_max_entries(LIMIT_SLOTS, 0);
#[map(name = "PENALTIES")]
static PENALTIES: RingBuf = RingBuf::with_byte_size(PENALTY_RING_BYTES, 0);

/// What to do with the frame.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Pass,
    Drop,
}

/// A verdict and what a drop event says about the frame.
struct Verdict {
    action: Action,
    reason: Reason,
    /// A drop a dry run turned into a pass: counted and reported as a would-drop.
    dry_run: bool,
    /// The limit slot that applied (events name the rule).
    limit: u32,
    /// The source (IPv4 as ::ffff:a.b.c.d); all zero if the frame had none we could read.
    source: [u8; 16],
    flags: u8,
    protocol: u8,
    dst_port: u16,
    /// For verdicts given before the transport header was read (the lists): where to read
    /// it, should an event need it. Parsing it only then keeps the blocked path short.
    unparsed: Unparsed,
}

/// Where a later parse finds the transport header. A struct, not an enum with payloads:
/// LLVM may load a payload before testing the variant, and kernels before 6.5 refuse a
/// read of stack that no path wrote, so every field is written on every path.
#[derive(Clone, Copy)]
struct Unparsed {
    family: u8,
    v4: Ipv4Info,
    v6_offset: usize,
}

const FAMILY_NONE: u8 = 0;
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

impl Unparsed {
    const NOTHING: Unparsed = Unparsed {
        family: FAMILY_NONE,
        v4: Ipv4Info {
            l4_offset: 0,
            protocol: 0,
            non_first_fragment: false,
        },
        v6_offset: 0,
    };

    #[inline(always)]
    fn v4(info: Ipv4Info) -> Unparsed {
        Unparsed {
            family: FAMILY_V4,
            v4: info,
            ..Unparsed::NOTHING
        }
    }

    #[inline(always)]
    fn v6(offset: usize) -> Unparsed {
        Unparsed {
            family: FAMILY_V6,
            v6_offset: offset,
            ..Unparsed::NOTHING
        }
    }
}

/// The settings the verdict needs, read once per frame.
#[derive(Clone, Copy)]
struct Mode {
    dry_run: bool,
    rules: bool,
    drop_malformed: bool,
    /// Drop events: bucket time per event and burst; cost 0: none.
    event_cost: u64,
    event_capacity: u64,
    limiter_seed: u64,
    limiter_sets: u32,
}

impl Mode {
    #[inline(always)]
    fn read() -> Mode {
        match SETTINGS.get(0) {
            Some(s) => Mode {
                dry_run: s.flags & SETTINGS_DRY_RUN != 0,
                rules: s.flags & SETTINGS_RULES != 0,
                drop_malformed: s.drop_malformed != 0,
                event_cost: s.event_cost,
                event_capacity: s.event_capacity,
                limiter_seed: s.limiter_seed,
                limiter_sets: s.limiter_sets,
            },
            None => Mode {
                dry_run: false,
                rules: false,
                drop_malformed: false,
                event_cost: 0,
                event_capacity: 0,
                limiter_seed: 0,
                limiter_sets: 0,
            },
        }
    }

    /// The action for a frame that fails a check: dropped, or passed under a dry run.
    #[inline(always)]
    fn drop(self, rule_dry_run: bool) -> (Action, bool) {
        if self.dry_run || rule_dry_run {
            (Action::Pass, true)
        } else {
            (Action::Drop, false)
        }
    }
}

impl Verdict {
    #[inline(always)]
    fn without_source(action: Action, reason: Reason, dry_run: bool) -> Verdict {
        Verdict {
            action,
            reason,
            dry_run,
            limit: DEFAULT_LIMIT,
            source: zero_source(),
            flags: 0,
            protocol: 0,
            dst_port: 0,
            unparsed: Unparsed::NOTHING,
        }
    }
}

/// Decides, counts, and reports drops. Never fails: every path ends in a counted verdict.
#[inline(always)]
pub(crate) fn judge(frame: &Frame) -> Action {
    // One read of the settings serves the verdict and the event.
    let mode = Mode::read();
    let v = decide(frame, mode);
    let slot = v.reason as u32 + if v.dry_run { WOULD_DROP_OFFSET } else { 0 };
    count(slot, frame.len());
    if (v.action == Action::Drop || v.dry_run) && mode.event_cost != 0 {
        report(frame, &v, slot, mode);
    }
    v.action
}

#[inline(always)]
fn decide(frame: &Frame, mode: Mode) -> Verdict {
    let mut key;
    // Lists first: a listed source gets its verdict whatever follows the IP header.
    let (l4, flags) = match parse_l3(frame) {
        L3::NonIp => return Verdict::without_source(Action::Pass, Reason::NonIp, false),
        L3::Malformed => {
            let (action, dry_run) = malformed(mode);
            return Verdict::without_source(action, Reason::Malformed, dry_run);
        }
        L3::V4 { src, info } => {
            key = limiter_key(
                [
                    0,
                    0,
                    u32::from_ne_bytes([0, 0, 0xff, 0xff]),
                    u32::from_ne_bytes(src),
                ],
                DEFAULT_LIMIT,
            );
            match list_v4(src) {
                LIST_ALLOW => {
                    return listed(
                        (Action::Pass, false),
                        Reason::Allowlisted,
                        &key,
                        EVENT_SOURCE_KNOWN,
                        Unparsed::v4(info),
                    );
                }
                LIST_BLOCK => {
                    return listed(
                        mode.drop(false),
                        Reason::Blocklisted,
                        &key,
                        EVENT_SOURCE_KNOWN,
                        Unparsed::v4(info),
                    );
                }
                _ => {}
            }
            (parse_l4_v4(frame, &info), EVENT_SOURCE_KNOWN)
        }
        L3::V6 { src, offset } => {
            key = limiter_key(
                [
                    u32::from_ne_bytes([src[0], src[1], src[2], src[3]]),
                    u32::from_ne_bytes([src[4], src[5], src[6], src[7]]),
                    u32::from_ne_bytes([src[8], src[9], src[10], src[11]]),
                    u32::from_ne_bytes([src[12], src[13], src[14], src[15]]),
                ],
                DEFAULT_LIMIT,
            );
            let flags = EVENT_SOURCE_KNOWN | EVENT_SOURCE_V6;
            match list_v6(&src) {
                LIST_ALLOW => {
                    return listed(
                        (Action::Pass, false),
                        Reason::Allowlisted,
                        &key,
                        flags,
                        Unparsed::v6(offset),
                    );
                }
                LIST_BLOCK => {
                    return listed(
                        mode.drop(false),
                        Reason::Blocklisted,
                        &key,
                        flags,
                        Unparsed::v6(offset),
                    );
                }
                _ => {}
            }
            (parse_l4_v6(frame, offset), flags)
        }
    };
    let source = key.addr;
    let (protocol, dst_port) = (l4.protocol, l4.dst_port);
    // A frame malformed past the IP header has no rule to match: the default limit.
    let slot = if l4.complete && mode.rules {
        rule_slot(&l4)
    } else {
        DEFAULT_LIMIT
    };
    let verdict = |(action, dry_run), reason| Verdict {
        action,
        reason,
        dry_run,
        limit: slot,
        source,
        flags,
        protocol,
        dst_port,
        unparsed: Unparsed::NOTHING,
    };
    // The limiter applies even to frames malformed past the IP header, so that
    // mangling the transport header is no way around a source's limit.
    if let Some(limit) = LIMITS.get(slot) {
        let rule_dry_run = limit.flags & LIMIT_DRY_RUN != 0;
        let conforms = limit.is_unlimited() || {
            key.limit = slot;
            let (mask, whole) = if flags & EVENT_SOURCE_V6 != 0 {
                (&limit.mask_v6, limit.prefix_v6 >= 128)
            } else {
                (&limit.mask_v4, limit.prefix_v4 >= 32)
            };
            // Most limits key by the whole address: skip the masking then.
            if !whole {
                let words = (&raw mut key.addr).cast::<u32>();
                let masks = mask.as_ptr().cast::<u32>();
                for i in 0..4 {
                    // SAFETY: four u32 in each: the key's address starts the 4-aligned
                    // LimiterKey, the masks sit at offsets 32 and 48 of the 8-aligned
                    // RateLimit map value. Word by word: byte by byte took 64 instructions.
                    unsafe { *words.add(i) &= masks.add(i).read() };
                }
            }
            let penalize = limit.penalty_after != 0 && !(mode.dry_run || rule_dry_run);
            take_tokens(&key, limit, frame.len(), penalize, flags, mode)
        };
        count_rule(slot, conforms, mode.dry_run || rule_dry_run, frame.len());
        if !conforms {
            return verdict(mode.drop(rule_dry_run), Reason::RateLimited);
        }
    }
    if l4.complete {
        verdict((Action::Pass, false), Reason::Passed)
    } else {
        verdict(malformed(mode), Reason::Malformed)
    }
}

/// The list verdict of an IPv4 source (0: listed nowhere), as its /24's summary cell (an
/// array read the verifier inlines) directs: the exact map's if the source is listed as a
/// /32 there, else, where entries of /25 to /31 lie in the /24, the /24's inner verdicts
/// (or the trie's, where the /24 has none: it is changing, or they found no memory), else
/// the cell's.
#[inline(always)]
fn list_v4(src: [u8; 4]) -> ListVerdict {
    let (word, shift) = summary::cell(src);
    let cell = match LIST_V4_SUMMARY.get(word) {
        Some(w) => (*w >> shift) as u32 & ((1 << summary::CELL_BITS) - 1),
        None => summary::EXACT | summary::TRIE,
    };
    if cell & summary::EXACT != 0 {
        // SAFETY: the value is copied out at once.
        if let Some(v) = unsafe { LIST_V4_EXACT.get(src) } {
            return *v;
        }
    }
    if cell & summary::TRIE == 0 {
        return cell & summary::BASE;
    }
    // SAFETY: one word is read from the value at once.
    if let Some(inner) = unsafe { LIST_V4_INNER.get([src[0], src[1], src[2], 0]) } {
        return inner.verdict(InnerV4::slot(src[3]));
    }
    LIST_V4
        .get(Key::new(32, src))
        .copied()
        .unwrap_or(summary::NONE)
}

/// The list verdict of an IPv6 source (0: listed nowhere), as its /24's summary cell
/// directs: the cell's, unless entries longer than /24 lie in the /24. Where some are of
/// /25 to /39, the /24's inner verdict of the source's /32 (unless entries longer than
/// /32 lie in that /32, or the /24 has none: it is changing, or they found no memory);
/// where all are of /40 or longer, or the /32's inner verdict asks and the /24 holds some,
/// the lengths of the source's /40 say which hash probes may find its longest match (a
/// hit is it); else, and where no probe hits, the trie's.
#[inline(always)]
fn list_v6(src: &[u8; 16]) -> ListVerdict {
    let (word, shift) = summary_v6::cell(src);
    let cell = match LIST_V6_SUMMARY.get(word) {
        Some(w) => (*w >> shift) as u32 & ((1 << summary::CELL_BITS) - 1),
        None => summary::TRIE,
    };
    if cell & (summary::TRIE | summary_v6::LONG) == 0 {
        return cell & summary::BASE;
    }
    let probe = if cell & summary::TRIE == 0 {
        true
    } else {
        // SAFETY: one word is read from the value at once.
        match unsafe { LIST_V6_INNER.get([src[0], src[1], src[2], 0]) } {
            Some(inner) => {
                let verdict = inner.verdict(src[3]);
                if verdict != ASK_TRIE {
                    return verdict;
                }
                // Entries longer than /32 in the source's /32: those of /40 or longer are
                // probed as below (a hit is longer than any of /33 to /39), the rest walk.
                cell & summary_v6::LONG != 0
            }
            // The /24 may be changing: only the trie is in step then.
            None => false,
        }
    };
    if probe {
        let (word, shift) = summary_v6::long_cell(src);
        let lengths = match LIST_V6_SUMMARY.get(word) {
            Some(w) => (*w >> shift) as u32 & ((1 << summary::CELL_BITS) - 1),
            None => summary_v6::UNHASHED,
        };
        // No entry of /40 or longer in the /40: the /24's base, unless entries of /25 to
        // /39 lie in it too (then the trie knows which holds the source).
        if lengths == 0 && cell & summary::TRIE == 0 {
            return cell & summary::BASE;
        }
        if lengths != 0 && lengths != summary_v6::UNHASHED {
            for (flag, len) in summary_v6::HASHED {
                if lengths & flag != 0
                    && let Some(v) = hashed_v6(src, len)
                {
                    return v;
                }
            }
        }
    }
    LIST_V6
        .get(Key::new(128, *src))
        .copied()
        .unwrap_or(summary::NONE)
}

/// The hashed entry of length `len` (48, 56, 64 or 128) holding `src`, if listed.
#[inline(always)]
fn hashed_v6(src: &[u8; 16], len: u32) -> Option<ListVerdict> {
    let word = |i: usize| u32::from_ne_bytes([src[i], src[i + 1], src[i + 2], src[i + 3]]);
    let (w1, w2, w3) = match len {
        128 => (word(4), word(8), word(12)),
        64 => (word(4), 0, 0),
        56 => (word(4) & u32::from_ne_bytes([0xff, 0xff, 0xff, 0]), 0, 0),
        // 48: the first two bytes of the second word.
        _ => (word(4) & u32::from_ne_bytes([0xff, 0xff, 0, 0]), 0, 0),
    };
    let mut key = MaybeUninit::<HashedV6Key>::uninit();
    let words = key.as_mut_ptr().cast::<u32>();
    // SAFETY: HashedV6Key is #[repr(C)], 16 bytes then a u32, 4-aligned: five u32 slots,
    // all written before the key is read (volatile: no memset call, see `limiter_key`).
    let key = unsafe {
        words.write_volatile(word(0));
        words.add(1).write_volatile(w1);
        words.add(2).write_volatile(w2);
        words.add(3).write_volatile(w3);
        words.add(4).write_volatile(len);
        key.assume_init()
    };
    // SAFETY: the value is copied out at once.
    unsafe { LIST_V6_HASHED.get(key) }.copied()
}

/// A limiter key written as five word stores. The natural `[0; 16]` initialiser compiled
/// to a call of a memset subprogram, which cost as much per packet as hashing the key.
#[inline(always)]
fn limiter_key(addr: [u32; 4], limit: u32) -> LimiterKey {
    let mut key = MaybeUninit::<LimiterKey>::uninit();
    let words = key.as_mut_ptr().cast::<u32>();
    // SAFETY: LimiterKey is #[repr(C)], 16 bytes then a u32, 4-aligned: five u32 slots,
    // all written before the key is read. Volatile: kept as stores, not merged into memset.
    unsafe {
        words.write_volatile(addr[0]);
        words.add(1).write_volatile(addr[1]);
        words.add(2).write_volatile(addr[2]);
        words.add(3).write_volatile(addr[3]);
        words.add(4).write_volatile(limit);
        key.assume_init()
    }
}

/// An all-zero source address, without a memset call (see [`limiter_key`]).
#[inline(always)]
fn zero_source() -> [u8; 16] {
    limiter_key([0; 4], 0).addr
}

/// The limit slot of the first rule matching the packet (the controller compiled them).
#[inline(always)]
fn rule_slot(l4: &L4) -> u32 {
    let index = match l4.protocol {
        IPPROTO_TCP if l4.tcp_syn => table_index(CLASS_TCP_SYN, l4.dst_port),
        IPPROTO_TCP => table_index(CLASS_TCP, l4.dst_port),
        IPPROTO_UDP => table_index(CLASS_UDP, l4.dst_port),
        p => table_index(CLASS_OTHER, u16::from(p)),
    };
    RULE_TABLE.get(index).copied().unwrap_or(DEFAULT_LIMIT)
}

#[inline(always)]
fn listed(
    (action, dry_run): (Action, bool),
    reason: Reason,
    key: &LimiterKey,
    flags: u8,
    unparsed: Unparsed,
) -> Verdict {
    Verdict {
        action,
        reason,
        dry_run,
        limit: DEFAULT_LIMIT,
        source: key.addr,
        flags,
        protocol: 0,
        dst_port: 0,
        unparsed,
    }
}

#[inline(always)]
fn malformed(mode: Mode) -> (Action, bool) {
    if mode.drop_malformed {
        mode.drop(false)
    } else {
        (Action::Pass, false)
    }
}

/// Sends a drop (or would-drop) event, at most at the configured rate per counter slot
/// (a GCRA bucket shared by all CPUs); events over that rate, or that find the ring full,
/// are counted instead.
#[inline(always)]
fn report(frame: &Frame, v: &Verdict, slot: u32, mode: Mode) {
    let Some(tat) = EVENT_LIMIT.get_ptr_mut(slot) else {
        return;
    };
    // The event bucket's burst is a second's worth, always two ticks or more: the tick
    // clock is exact for it, and spares every drop over the event rate a clock call. The
    // controller writes the tick into every limit; the default limit is always there.
    let tick_ns = LIMITS.get(DEFAULT_LIMIT).map_or(0, |l| l.tick_ns);
    if !take(
        tat,
        mode.event_cost,
        mode.event_capacity,
        bucket_time(tick_ns != 0, tick_ns),
    ) {
        suppressed(slot);
        return;
    }
    let (protocol, dst_port) = match v.unparsed.family {
        FAMILY_V4 => {
            let l = parse_l4_v4(frame, &v.unparsed.v4);
            (l.protocol, l.dst_port)
        }
        FAMILY_V6 => {
            let l = parse_l4_v6(frame, v.unparsed.v6_offset);
            (l.protocol, l.dst_port)
        }
        _ => (v.protocol, v.dst_port),
    };
    let sent = EVENTS
        .output::<DropEvent>(
            &DropEvent {
                // SAFETY: a helper without preconditions.
                timestamp_ns: unsafe { bpf_ktime_get_ns() },
                source: v.source,
                ifindex: frame.ifindex,
                reason: slot,
                rule: v.limit,
                dst_port,
                protocol,
                flags: v.flags | if v.dry_run { EVENT_WOULD_DROP } else { 0 },
            },
            0,
        )
        .is_ok();
    if !sent {
        suppressed(slot);
    }
}

/// Counts an event not sent: over the event rate, or the ring was full.
#[inline(always)]
fn suppressed(slot: u32) {
    if let Some(n) = EVENTS_SUPPRESSED.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot.
        unsafe { *n += 1 };
    }
}

#[inline(always)]
fn count(slot: u32, len: usize) {
    if let Some(counter) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot: no other CPU writes it, and we cannot be preempted here.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len as u64;
        }
    }
}

/// What the limit slot's bucket did with the packet, for the rule's counters.
#[inline(always)]
fn count_rule(slot: u32, conforms: bool, dry_run: bool, len: usize) {
    if let Some(c) = RULE_COUNTERS.get_ptr_mut(slot) {
        let len = len as u64;
        // SAFETY: per-CPU slot, as in `count`.
        unsafe {
            if conforms {
                (*c).passed_packets += 1;
                (*c).passed_bytes += len;
            } else if dry_run {
                (*c).would_drop_packets += 1;
                (*c).would_drop_bytes += len;
            } else {
                (*c).dropped_packets += 1;
                (*c).dropped_bytes += len;
            }
        }
    }
}

/// Takes one packet and `len` bytes from the bucket of `key`; false if either is empty.
/// With `penalize`, a drop also counts toward the bucket's penalty window.
#[inline(always)]
fn take_tokens(
    key: &LimiterKey,
    limit: &RateLimit,
    len: usize,
    penalize: bool,
    flags: u8,
    mode: Mode,
) -> bool {
    let now = bucket_time(limit.flags & LIMIT_TICK_CLOCK != 0, limit.tick_ns);
    let byte_cost = (len as u64 * limit.byte_cost_fp) >> BYTE_COST_FRAC_BITS;
    // Read as the five words it was written as, one load each, rather than rebuilt from
    // its bytes as `LimiterKey::words` does for the controller.
    // SAFETY: LimiterKey is five u32 slots, 4-aligned (see `limiter_key`).
    let words = unsafe {
        let w = (key as *const LimiterKey).cast::<u32>();
        [
            w.read(),
            w.add(1).read(),
            w.add(2).read(),
            w.add(3).read(),
            w.add(4).read(),
        ]
    };
    let set_index = set_of(words, mode.limiter_seed, mode.limiter_sets);
    let Some(set) = LIMITER.get_ptr_mut(set_index) else {
        // No table yet (the controller writes its size before attaching): no bucket.
        return true;
    };
    let slots = set.cast::<LimiterSlot>();
    // A hit is the bucket; on a miss, the least busy way is replaced (an empty one first).
    let mut victim = slots;
    let mut victim_busy = u64::MAX;
    for way in 0..LIMITER_WAYS {
        // SAFETY: `way` < LIMITER_WAYS: a slot inside the live map value.
        let slot = unsafe { slots.add(way) };
        if unsafe { (*slot).occupied } == 0 {
            if victim_busy != 0 {
                victim = slot;
                victim_busy = 0;
            }
            continue;
        }
        if same_key(slot, &words) {
            let state = unsafe { &raw mut (*slot).state };
            return take_and_count(state, key, limit, now, byte_cost, len, penalize, flags);
        }
        // Busy until its later TAT: a bucket whose TATs are past is full again, so
        // replacing it loses no limiting, only its counts.
        let busy = unsafe {
            let s = &raw const (*slot).state;
            let (p, b) = ((*s).packet_tat, (*s).byte_tat);
            if p > b { p } else { b }
        };
        if busy < victim_busy {
            victim = slot;
            victim_busy = busy;
        }
    }
    new_bucket(victim, &words, limit, now, byte_cost, len)
}

/// Whether `slot` holds the bucket of the key `words`.
#[inline(always)]
fn same_key(slot: *const LimiterSlot, words: &[u32; 5]) -> bool {
    // SAFETY: the key starts the 8-aligned slot: five u32.
    let stored = slot.cast::<u32>();
    unsafe {
        stored.read_volatile() == words[0]
            && stored.add(1).read_volatile() == words[1]
            && stored.add(2).read_volatile() == words[2]
            && stored.add(3).read_volatile() == words[3]
            && stored.add(4).read_volatile() == words[4]
    }
}

/// Starts the bucket of a source seen first (or again after its bucket was replaced) in
/// `slot`, with this packet taken. Two CPUs starting buckets in one slot at once may leave
/// it to either, or to neither (a torn key, found by no one, replaced in its turn): a
/// source then starts again with a full bucket, as after an LRU eviction.
#[inline(always)]
fn new_bucket(
    slot: *mut LimiterSlot,
    words: &[u32; 5],
    limit: &RateLimit,
    now: u64,
    byte_cost: u64,
    len: usize,
) -> bool {
    let packet_cost = limit.packet_cost;
    let fits = packet_cost <= limit.packet_capacity && byte_cost <= limit.byte_capacity;
    let (packet_tat, byte_tat) = if fits {
        (now + packet_cost, now + byte_cost)
    } else {
        (now, now)
    };
    // SAFETY: `slot` is one of the live map value's slots; word stores, as in
    // [`limiter_key`], so no memset or memcpy call is emitted.
    unsafe {
        let key = slot.cast::<u32>();
        for (i, w) in words.iter().enumerate() {
            key.add(i).write_volatile(*w);
        }
        (*slot).occupied = 1;
        let s = &raw mut (*slot).state;
        (*s).packet_tat = packet_tat;
        (*s).byte_tat = byte_tat;
        (*s).packets = 1;
        (*s).bytes = len as u64;
        (*s).drops = u64::from(!fits);
        (*s).window_start = now;
        (*s).window_drops = u64::from(!fits);
    }
    count(LIMITER_CREATED_SLOT, 0);
    fits
}

/// Now, in bucket time: from the kernel tick (`tick_ns` apart) or the nanosecond clock
/// (see [`LIMIT_TICK_CLOCK`]).
#[inline(always)]
fn bucket_time(tick_clock: bool, tick_ns: u32) -> u64 {
    let ns = if tick_clock {
        // Ticks since boot (jiffies start 300 s of ticks short of 2^32) times the tick:
        // the nanosecond clock's scale and origin, behind it by a constant under a second,
        // so a reload that moves a limit between the clocks barely disturbs its buckets.
        // SAFETY: a helper without preconditions (the verifier inlines it as one load).
        let jiffies = unsafe { bpf_jiffies64() };
        jiffies
            .wrapping_sub(1 << 32)
            .wrapping_mul(u64::from(tick_ns))
            .wrapping_add(INITIAL_JIFFIES_SECS * 1_000_000_000)
    } else {
        // SAFETY: a helper without preconditions.
        unsafe { bpf_ktime_get_ns() }
    };
    ns << TIME_SHIFT
}

#[allow(
    clippy::too_many_arguments,
    reason = "the hot path passes scalars, not a struct"
)]
#[inline(always)]
fn take_and_count(
    state: *mut LimiterState,
    key: &LimiterKey,
    limit: &RateLimit,
    now: u64,
    byte_cost: u64,
    len: usize,
    penalize: bool,
    flags: u8,
) -> bool {
    let passed = take_both(state, limit, now, byte_cost);
    // SAFETY: a live map value; plain adds (see LimiterState).
    unsafe {
        (*state).packets += 1;
        (*state).bytes += len as u64;
        if !passed {
            (*state).drops += 1;
            if penalize {
                count_violation(state, key, limit, now, flags);
            }
        }
    }
    passed
}

/// Counts a drop in the bucket's penalty window; the drop that goes past
/// `penalty_after` reports the bucket's prefix, once per window.
#[inline(always)]
unsafe fn count_violation(
    state: *mut LimiterState,
    key: &LimiterKey,
    limit: &RateLimit,
    now: u64,
    flags: u8,
) {
    // SAFETY (whole body): `state` is a live map value; plain read-modify-writes, which
    // two CPUs may race on: at worst a report comes a drop early or late.
    let start = unsafe { (*state).window_start };
    let drops = if now.wrapping_sub(start) > limit.penalty_window {
        unsafe { (*state).window_start = now };
        1
    } else {
        (unsafe { (*state).window_drops }) + 1
    };
    unsafe { (*state).window_drops = drops };
    if drops != u64::from(limit.penalty_after) + 1 {
        return;
    }
    let v6 = flags & EVENT_SOURCE_V6 != 0;
    // A full ring loses this report; the next window reports again.
    let _ = PENALTIES.output::<PenaltyEvent>(
        &PenaltyEvent {
            timestamp_ns: now >> TIME_SHIFT,
            addr: key.addr,
            limit: key.limit,
            prefix_len: u32::from(if v6 { limit.prefix_v6 } else { limit.prefix_v4 }),
            drops,
            flags: if v6 { PENALTY_V6 } else { 0 },
            _pad: 0,
        },
        0,
    );
}

#[inline(always)]
fn take_both(state: *mut LimiterState, limit: &RateLimit, now: u64, byte_cost: u64) -> bool {
    // `state` points into a map value that stays valid for this program run.
    let packet_tat = unsafe { &raw mut (*state).packet_tat };
    let byte_tat = unsafe { &raw mut (*state).byte_tat };
    if !take(packet_tat, limit.packet_cost, limit.packet_capacity, now) {
        return false;
    }
    if !take(byte_tat, byte_cost, limit.byte_capacity, now) {
        // Give the packet token back: the frame is dropped, it used nothing.
        // SAFETY: aligned u64 inside a live map value.
        unsafe { atomic_xsub::<u64, u64, { Relaxed }>(packet_tat, limit.packet_cost) };
        return false;
    }
    true
}

/// Compare-and-swap retries before a contended take counts as over the limit.
const TAKE_RETRIES: usize = 4;

/// GCRA: the bucket conforms if its TAT, moved up to now and advanced by `cost`, stays
/// within `capacity` of now. A lost race re-reads and retries, so concurrent CPUs never
/// overwrite each other's takes.
#[inline(always)]
fn take(tat: *mut u64, cost: u64, capacity: u64, now: u64) -> bool {
    if cost == 0 {
        return true;
    }
    for _ in 0..TAKE_RETRIES {
        // An aligned 64-bit load cannot tear; the BPF backend has no atomic-load pattern
        // before CPU v4, and the compare-and-swap below catches a stale value anyway.
        // SAFETY: aligned u64 inside a live map value.
        let old = unsafe { core::ptr::read_volatile(tat) };
        let next = if old > now { old } else { now } + cost;
        if next - now > capacity {
            return false;
        }
        // SAFETY: as above.
        let (_, swapped) = unsafe { atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(tat, old, next) };
        if swapped {
            return true;
        }
    }
    false
}
