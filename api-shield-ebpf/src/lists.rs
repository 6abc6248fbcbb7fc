//! The list verdict of a source: its /24's summary cell first (an array read the verifier
//! inlines), then only the lookup that cell points to.

use core::mem::MaybeUninit;

use api_shield_common::lists::{ASK_TRIE, HashedV6Key, InnerV4, ListVerdict, summary, summary_v6};
use aya_ebpf::maps::lpm_trie::Key;

use crate::maps::{
    LIST_V4, LIST_V4_EXACT, LIST_V4_INNER, LIST_V4_SUMMARY, LIST_V6, LIST_V6_HASHED, LIST_V6_INNER,
    LIST_V6_SUMMARY,
};

/// The list verdict of an IPv4 source (0: listed nowhere), as its /24's summary cell (an
/// array read the verifier inlines) directs: the exact map's if the source is listed as a
/// /32 there, else, where entries of /25 to /31 lie in the /24, the /24's inner verdicts
/// (or the trie's, where the /24 has none: it is changing, or they found no memory), else
/// the cell's.
#[inline(always)]
pub(crate) fn list_v4(src: [u8; 4]) -> ListVerdict {
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
pub(crate) fn list_v6(src: &[u8; 16]) -> ListVerdict {
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

/// The last byte of a /48's mask; a mutation test's build shortens it by one bit, so
/// that the tests are seen to catch a prefix length off by one.
#[cfg(not(feature = "mutant-prefix-off-by-one"))]
const MASK_48: u8 = 0xff;
#[cfg(feature = "mutant-prefix-off-by-one")]
const MASK_48: u8 = 0xfe;

/// The hashed entry of length `len` (48, 56, 64 or 128) holding `src`, if listed.
#[inline(always)]
fn hashed_v6(src: &[u8; 16], len: u32) -> Option<ListVerdict> {
    let word = |i: usize| u32::from_ne_bytes([src[i], src[i + 1], src[i + 2], src[i + 3]]);
    let (w1, w2, w3) = match len {
        128 => (word(4), word(8), word(12)),
        64 => (word(4), 0, 0),
        56 => (word(4) & u32::from_ne_bytes([0xff, 0xff, 0xff, 0]), 0, 0),
        // 48: the first two bytes of the second word.
        _ => (word(4) & u32::from_ne_bytes([0xff, MASK_48, 0, 0]), 0, 0),
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
