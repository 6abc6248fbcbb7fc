//! The per-CPU counters every verdict adds to.

use crate::maps::{COUNTERS, EVENTS_SUPPRESSED, RULE_COUNTERS};

/// Counts an event not sent: over the event rate, or the ring was full.
#[inline(always)]
pub(crate) fn suppressed(slot: u32) {
    if let Some(n) = EVENTS_SUPPRESSED.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot.
        unsafe { *n += 1 };
    }
}

#[inline(always)]
pub(crate) fn count(slot: u32, len: usize) {
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
pub(crate) fn count_rule(slot: u32, conforms: bool, dry_run: bool, len: usize) {
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
