//! The verdict, shared by every hook: lists, then the token bucket, then counters.

use api_shield_common::{
    counters::{Reason, WOULD_DROP_OFFSET},
    events::{DropEvent, EVENT_SOURCE_KNOWN, EVENT_SOURCE_V6, EVENT_WOULD_DROP},
    limiter::{DEFAULT_LIMIT, LIMIT_DRY_RUN, LimiterKey, RateLimit},
    lists::{LIST_ALLOW, LIST_BLOCK},
    rules::{CLASS_OTHER, CLASS_TCP, CLASS_TCP_SYN, CLASS_UDP, table_index},
    settings::{SETTINGS_DRY_RUN, SETTINGS_RULES},
};
use aya_ebpf::helpers::bpf_ktime_get_ns;

use crate::{
    counters::{count, count_rule, suppressed},
    limiter::{bucket_time, limiter_key, take, take_tokens},
    lists::{list_v4, list_v6},
    maps::{EVENT_LIMIT, EVENTS, LIMITS, RULE_TABLE, SETTINGS},
    parse::{Frame, L3, L4, parse_ipv4, parse_l3, parse_l4_v4, parse_l4_v6},
    trace,
};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// What to do with the frame.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
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
    /// Where the IP header starts: parsed again if an event needs the ports.
    offset: usize,
}

const FAMILY_NONE: u8 = 0;
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

impl Unparsed {
    const NOTHING: Unparsed = Unparsed {
        family: FAMILY_NONE,
        offset: 0,
    };
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

/// Decides, counts, and reports drops; says whether a trace runs, which the hook then hands
/// the frame to (see [`crate::trace`]). Never fails: every path ends in a counted verdict.
#[inline(always)]
pub fn judge(frame: &Frame) -> (Action, bool) {
    judge_and::<true>(frame)
}

/// [`judge`] without the trace check: the benchmarks' measure of what that check costs.
#[inline(always)]
pub fn judge_untraced(frame: &Frame) -> Action {
    judge_and::<false>(frame).0
}

#[inline(always)]
fn judge_and<const TRACE: bool>(frame: &Frame) -> (Action, bool) {
    // One read of the settings serves the verdict and the event.
    let mode = Mode::read();
    let v = decide(frame, mode);
    let slot = v.reason as u32 + if v.dry_run { WOULD_DROP_OFFSET } else { 0 };
    count(slot, frame.len());
    if (v.action == Action::Drop || v.dry_run) && mode.event_cost != 0 {
        report(frame, &v, slot, mode);
    }
    // The trace is followed in a program of its own (verified apart: a record's fields
    // and aya-log's writing of them would cost this program's verification as much again
    // for each of its paths); here, only what it cannot read from the frame.
    let traced = TRACE
        && v.flags & EVENT_SOURCE_KNOWN != 0
        && trace::active()
        && trace::hand_over(&trace::Judged {
            source: v.source,
            flags: u32::from(v.flags),
            reason: slot,
            rule: v.limit,
            dropped: u32::from(v.action == Action::Drop),
            limited: u32::from(v.unparsed.family == FAMILY_NONE),
        });
    (v.action, traced)
}

/// The transport fields of a judged frame: from the verdict, or, for verdicts given before
/// the transport header was read (the lists), parsed now.
#[inline(always)]
fn transport_of(frame: &Frame, v: &Verdict) -> L4 {
    match v.unparsed.family {
        FAMILY_V4 => match parse_ipv4(frame, v.unparsed.offset) {
            L3::V4 { info, .. } => parse_l4_v4(frame, &info),
            _ => L4::INCOMPLETE,
        },
        FAMILY_V6 => parse_l4_v6(frame, v.unparsed.offset),
        _ => L4 {
            protocol: v.protocol,
            dst_port: v.dst_port,
            ..L4::INCOMPLETE
        },
    }
}

/// Masks the key's address to the limit's prefix for the source's family: sources in one
/// prefix share a bucket.
#[inline(always)]
pub(crate) fn mask_key(key: &mut LimiterKey, limit: &RateLimit, flags: u8) {
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
            // RateLimit map value. Word by word: four instructions where bytes take 64.
            unsafe { *words.add(i) &= masks.add(i).read() };
        }
    }
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
        L3::V4 { src, info, offset } => {
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
                        Unparsed {
                            family: FAMILY_V4,
                            offset,
                        },
                    );
                }
                LIST_BLOCK => {
                    return listed(
                        mode.drop(false),
                        Reason::Blocklisted,
                        &key,
                        EVENT_SOURCE_KNOWN,
                        Unparsed {
                            family: FAMILY_V4,
                            offset,
                        },
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
                        Unparsed {
                            family: FAMILY_V6,
                            offset,
                        },
                    );
                }
                LIST_BLOCK => {
                    return listed(
                        mode.drop(false),
                        Reason::Blocklisted,
                        &key,
                        flags,
                        Unparsed {
                            family: FAMILY_V6,
                            offset,
                        },
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
            mask_key(&mut key, limit, flags);
            let penalize = limit.penalty_after != 0 && !(mode.dry_run || rule_dry_run);
            take_tokens(
                &key,
                limit,
                frame.len(),
                penalize,
                flags,
                mode.limiter_seed,
                mode.limiter_sets,
            )
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
    let l4 = transport_of(frame, v);
    let (protocol, dst_port) = (l4.protocol, l4.dst_port);
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
