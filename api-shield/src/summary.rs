//! The list summaries the data plane reads before the list maps, so that most packets skip
//! the trie walk (a kernel call whose cost grows with the list): for IPv4, four bits per
//! /24 saying what the lists answer for every address in it, or which map to ask
//! ([`api_shield_common::lists::summary`]); for IPv6, bitmaps clear only where no entry
//! can match ([`api_shield_common::lists::summary_v6`]).
//!
//! They are kept in step with the maps by `Shield::apply_lists`: what a change touches is
//! first set to "ask the exact map, then the trie", then the maps change, then it gets its
//! new value. At every moment a cell or bit either says what the maps say or sends the
//! packet to them, so no packet gets a verdict the lists never held.

use std::{net::Ipv4Addr, os::fd::AsRawFd};

use anyhow::{Result, bail};
use api_shield_common::lists::{
    ListVerdict,
    summary::{CELL_BITS, CELLS_PER_WORD, EXACT, NONE, TRIE, WORDS},
    summary_v6,
};
use ipnet::{IpNet, Ipv4Net};

use crate::lists::ListTable;

/// Above this many touched cells, recomputing the whole summary is cheaper than cell by cell.
const FULL_RECOMPUTE_CELLS: u64 = 1 << 16;

/// The cells (/24s) an IPv4 prefix covers or lies inside, as an inclusive range.
pub fn cells_of(net: &Ipv4Net) -> (u32, u32) {
    let first = u32::from(net.network()) >> 8;
    let len = u32::from(net.prefix_len());
    if len >= 24 {
        (first, first)
    } else {
        (first, first + (1 << (24 - len)) - 1)
    }
}

/// The IPv4 entries of `table`.
fn v4_entries(table: &ListTable) -> impl Iterator<Item = (Ipv4Net, ListVerdict)> + '_ {
    table.entries.iter().filter_map(|(net, v)| match net {
        IpNet::V4(n) => Some((*n, *v)),
        IpNet::V6(_) => None,
    })
}

/// The flag a cell gets for an entry longer than /24 inside it.
fn inner_flag(len: u8) -> u32 {
    if len == 32 { EXACT } else { TRIE }
}

/// The value of one cell for `table`: the verdict of the longest entry of /24 or shorter
/// covering it ([`NONE`] if none), with [`EXACT`] if /32 entries lie inside and [`TRIE`]
/// if entries of /25 to /31 do.
pub fn cell_value(table: &ListTable, cell: u32) -> u32 {
    let base = Ipv4Addr::from(cell << 8);
    let last = Ipv4Addr::from((cell << 8) | 0xff);
    // Entries whose network lies in this /24: ordered by (address, length), so one range.
    let lo = IpNet::V4(Ipv4Net::new(base, 0).expect("length 0 is valid"));
    let hi = IpNet::V4(Ipv4Net::new(last, 32).expect("length 32 is valid"));
    let flags = table
        .entries
        .range(lo..=hi)
        .filter(|(net, _)| net.prefix_len() > 24)
        .fold(0, |f, (net, _)| f | inner_flag(net.prefix_len()));
    let verdict = (0..=24u8)
        .rev()
        .find_map(|len| {
            let net = IpNet::V4(Ipv4Net::new(base, len).expect("length <= 24").trunc());
            table.entries.get(&net).copied()
        })
        .unwrap_or(NONE);
    verdict | flags
}

/// Every cell's value for `table`, packed as the map holds them (cell `c` in word
/// `c / 16`, bits `4 * (c % 16)`). One sweep over the entries in address order, each
/// cell painted once with its innermost covering prefix; then the flags of the longer
/// entries.
pub fn summarize(table: &ListTable) -> Vec<u64> {
    let mut words = vec![0u64; WORDS as usize];
    let mut ranges: Vec<(u32, u32, ListVerdict)> = v4_entries(table)
        .filter(|(net, _)| net.prefix_len() <= 24)
        .map(|(net, v)| {
            let (lo, hi) = cells_of(&net);
            (lo, hi, v)
        })
        .collect();
    // Outer prefixes first where two start at the same cell: nesting order.
    ranges.sort_by_key(|&(lo, hi, _)| (lo, std::cmp::Reverse(hi)));
    // Prefixes nest or are disjoint: a stack of the open ones, painted up to `next`.
    let mut open: Vec<(u32, ListVerdict)> = Vec::new();
    let mut next = 0u32;
    for (lo, hi, verdict) in ranges {
        while let Some(&(end, v)) = open.last() {
            if end >= lo {
                break;
            }
            fill(&mut words, next, end, v);
            next = end + 1;
            open.pop();
        }
        if let Some(&(_, v)) = open.last()
            && next < lo
        {
            fill(&mut words, next, lo - 1, v);
        }
        next = lo;
        open.push((hi, verdict));
    }
    while let Some((end, v)) = open.pop() {
        fill(&mut words, next, end, v);
        next = end + 1;
    }
    for (net, _) in v4_entries(table).filter(|(net, _)| net.prefix_len() > 24) {
        let (cell, _) = cells_of(&net);
        let (word, shift) = position(cell);
        words[word] |= u64::from(inner_flag(net.prefix_len())) << shift;
    }
    words
}

/// A cell's four bits in a word of cells.
const CELL_MASK: u64 = (1 << CELL_BITS) - 1;

/// Where cell `cell` is: (word index, shift).
fn position(cell: u32) -> (usize, u32) {
    (
        (cell / CELLS_PER_WORD) as usize,
        (cell % CELLS_PER_WORD) * CELL_BITS,
    )
}

/// A word whose every cell holds `value`.
fn whole_word(value: u32) -> u64 {
    u64::from(value) * (u64::MAX / CELL_MASK)
}

fn set(words: &mut [u64], cell: u32, value: u32) {
    let (word, shift) = position(cell);
    words[word] = (words[word] & !(CELL_MASK << shift)) | (u64::from(value) << shift);
}

/// Sets cells `first..=last` to `value`, whole words at a time where it can.
fn fill(words: &mut [u64], first: u32, last: u32, value: u32) {
    let mut cell = first;
    while cell <= last {
        if cell.is_multiple_of(CELLS_PER_WORD) && last - cell + 1 >= CELLS_PER_WORD {
            words[(cell / CELLS_PER_WORD) as usize] = whole_word(value);
            cell += CELLS_PER_WORD;
        } else {
            set(words, cell, value);
            cell += 1;
        }
    }
}

/// The IPv6 bitmaps ([`summary_v6`]) for a set of entries: the bits of every group an
/// entry may hold an address of. Ranges are merged before they are painted, so a list of
/// wide prefixes costs no more than the bitmap's size.
pub fn v6_bitmap<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Vec<u64> {
    let mut short: Vec<(u32, u32)> = Vec::new();
    let mut cells: Vec<(u32, u32)> = Vec::new();
    for net in nets {
        let IpNet::V6(net) = net else { continue };
        let addr = u128::from(net.network());
        let len = u32::from(net.prefix_len());
        let cell = ((addr >> 88) & 0xff_ffff) as u32;
        match len {
            0..=16 => {
                let first = (addr >> 112) as u32;
                short.push((first, first + (1 << (16 - len)) - 1));
            }
            17..=39 => cells.push((cell, cell + (1 << (40 - len)) - 1)),
            _ => cells.push((cell, cell)),
        }
    }
    let mut words = vec![0u64; summary_v6::WORDS as usize];
    let (short_words, cell_words) = words.split_at_mut(summary_v6::SHORT_WORDS as usize);
    for (bitmap, ranges) in [(short_words, short), (cell_words, cells)] {
        for (first, last) in merge(ranges) {
            set_bits(bitmap, first, last);
        }
    }
    words
}

/// Sorts inclusive ranges and merges those that overlap or touch.
fn merge(mut ranges: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

/// Sets bits `first..=last` of a bitmap, whole words at a time where it can.
fn set_bits(words: &mut [u64], first: u32, last: u32) {
    let mut bit = first;
    while bit <= last {
        let word = &mut words[(bit / 64) as usize];
        if bit.is_multiple_of(64) && last - bit >= 63 {
            *word = u64::MAX;
            bit += 64;
        } else {
            *word |= 1 << (bit % 64);
            bit += 1;
        }
    }
}

/// A BPF_F_MMAPABLE array of u64 words, mapped into this process: written as memory
/// (no syscall per word), read by the data plane with one inlined array load.
struct MappedWords {
    ptr: *mut u64,
    len: usize,
}

// SAFETY: the mapping belongs to this value alone; it is written only through &mut self.
unsafe impl Send for MappedWords {}

impl MappedWords {
    fn map(fd: &impl AsRawFd, len: u32, what: &str) -> Result<MappedWords> {
        let len = len as usize;
        // SAFETY: a fresh shared mapping of the whole map; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mapping {what}: {}", std::io::Error::last_os_error());
        }
        Ok(MappedWords {
            ptr: ptr.cast::<u64>(),
            len,
        })
    }

    fn word(&self, i: usize) -> u64 {
        assert!(i < self.len);
        // SAFETY: in bounds of the mapping; aligned u64 (an atomic load on x86-64 and arm64).
        unsafe { self.ptr.add(i).read_volatile() }
    }

    fn set_word(&mut self, i: usize, value: u64) {
        assert!(i < self.len);
        // SAFETY: as in `word`; one aligned store, so the data plane sees old or new.
        unsafe { self.ptr.add(i).write_volatile(value) }
    }

    /// Makes the map hold `words`, storing only the words that differ.
    fn write_diff(&mut self, words: &[u64]) {
        for (i, &w) in words.iter().enumerate() {
            if self.word(i) != w {
                self.set_word(i, w);
            }
        }
    }

    /// ORs `bits` into the map.
    fn set_bits(&mut self, bits: &[u64]) {
        for (i, &b) in bits.iter().enumerate() {
            let old = self.word(i);
            if old | b != old {
                self.set_word(i, old | b);
            }
        }
    }
}

impl Drop for MappedWords {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len * 8) };
    }
}

/// What a list change touches, from [`SummaryMaps::before_change`] to
/// [`SummaryMaps::after_change`].
pub struct Touched {
    v4: Vec<(u32, u32)>,
    v6_removed: bool,
}

/// Both summaries, mapped into this process.
pub struct SummaryMaps {
    v4: MappedWords,
    v6: MappedWords,
}

impl SummaryMaps {
    /// Maps the IPv4 and IPv6 summary arrays (created with BPF_F_MMAPABLE).
    pub fn map(v4: &impl AsRawFd, v6: &impl AsRawFd) -> Result<SummaryMaps> {
        Ok(SummaryMaps {
            v4: MappedWords::map(v4, WORDS, "the IPv4 list summary")?,
            v6: MappedWords::map(v6, summary_v6::WORDS, "the IPv6 list summary")?,
        })
    }

    /// Writes both summaries of `table` whole (where they differ from the maps).
    pub fn write_all(&mut self, table: &ListTable) {
        self.v4.write_diff(&summarize(table));
        self.v6.write_diff(&v6_bitmap(table.entries.keys()));
    }

    /// Before the maps change: the IPv4 /24s the changed prefixes touch ask the exact map
    /// and the trie, and the IPv6 bits of added prefixes are set (a set bit only sends
    /// packets to the trie).
    pub fn before_change<'a>(
        &mut self,
        upserts: impl IntoIterator<Item = &'a IpNet>,
        removals: &[IpNet],
    ) -> Touched {
        let changed: Vec<&IpNet> = upserts.into_iter().collect();
        let touched = Touched {
            v4: touched_cells(changed.iter().copied().chain(removals)),
            v6_removed: removals.iter().any(|n| matches!(n, IpNet::V6(_))),
        };
        for &(first, last) in &touched.v4 {
            mark_changing(&mut self.v4, first, last);
        }
        if changed.iter().any(|n| matches!(n, IpNet::V6(_))) {
            self.v6.set_bits(&v6_bitmap(changed));
        }
        touched
    }

    /// After the maps changed to `table`: the touched /24s get their new value, and the
    /// IPv6 bitmaps are recomputed if prefixes went (their bits may now be clear).
    pub fn after_change(&mut self, table: &ListTable, touched: &Touched) {
        let cells: u64 = touched.v4.iter().map(|&(a, b)| u64::from(b - a) + 1).sum();
        if cells > FULL_RECOMPUTE_CELLS {
            self.v4.write_diff(&summarize(table));
        } else {
            for &(first, last) in &touched.v4 {
                update_cells(&mut self.v4, first, last, |cell| cell_value(table, cell));
            }
        }
        if touched.v6_removed {
            self.v6.write_diff(&v6_bitmap(table.entries.keys()));
        }
    }
}

/// While a /24 changes: ask the exact map, then the trie.
const CHANGING: u32 = EXACT | TRIE;

/// Sets IPv4 cells `first..=last` to [`CHANGING`]: whole words with one store each (a /8
/// is 4,096 words), the ends cell by cell.
fn mark_changing(map: &mut MappedWords, first: u32, last: u32) {
    let mut cell = first;
    while cell <= last {
        let i = cell / CELLS_PER_WORD;
        if cell.is_multiple_of(CELLS_PER_WORD) && last - cell >= CELLS_PER_WORD - 1 {
            if map.word(i as usize) != whole_word(CHANGING) {
                map.set_word(i as usize, whole_word(CHANGING));
            }
            cell += CELLS_PER_WORD;
        } else {
            let end = last.min((i + 1) * CELLS_PER_WORD - 1);
            update_cells(map, cell, end, |_| CHANGING);
            cell = end + 1;
        }
    }
}

/// Sets IPv4 cells `first..=last` to `value(cell)`, one store per word.
fn update_cells(map: &mut MappedWords, first: u32, last: u32, value: impl Fn(u32) -> u32) {
    let mut cell = first;
    while cell <= last {
        let i = cell / CELLS_PER_WORD;
        let end = last.min((i + 1) * CELLS_PER_WORD - 1);
        let mut w = map.word(i as usize);
        for c in cell..=end {
            let (_, shift) = position(c);
            w = (w & !(CELL_MASK << shift)) | (u64::from(value(c)) << shift);
        }
        if map.word(i as usize) != w {
            map.set_word(i as usize, w);
        }
        cell = end + 1;
    }
}

/// The IPv4 cells a set of list changes touches, merged into disjoint ranges.
pub fn touched_cells<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Vec<(u32, u32)> {
    merge(
        nets.into_iter()
            .filter_map(|net| match net {
                IpNet::V4(n) => Some(cells_of(n)),
                IpNet::V6(_) => None,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use api_shield_common::lists::{LIST_ALLOW, LIST_BLOCK, summary::BASE};

    use super::*;

    fn table(entries: &[(&str, ListVerdict)]) -> ListTable {
        let mut t = ListTable::default();
        for (net, v) in entries {
            t.entries.insert(net.parse::<IpNet>().unwrap().trunc(), *v);
        }
        t
    }

    fn cell_in(words: &[u64], cell: u32) -> u32 {
        let (word, shift) = position(cell);
        (words[word] >> shift & CELL_MASK) as u32
    }

    /// What the lists answer for `addr`: the longest entry holding it (0: none).
    fn longest_match(t: &ListTable, addr: u32) -> ListVerdict {
        (0..=32u8)
            .rev()
            .find_map(|len| {
                let net = Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap().trunc();
                t.entries.get(&IpNet::V4(net)).copied()
            })
            .unwrap_or(NONE)
    }

    /// Every claim the summary makes holds for every address of the /24: the data plane's
    /// answer (the exact map's for a listed /32 where the cell says so, else the trie's
    /// where it says so, else the base) is the longest match.
    fn check_cell(t: &ListTable, words: &[u64], cell: u32) {
        let value = cell_in(words, cell);
        assert_eq!(value, cell_value(t, cell), "cell {cell}: sweep vs one cell");
        if value & TRIE != 0 {
            return;
        }
        for host in 0..256 {
            let addr = (cell << 8) | host;
            let exact = Ipv4Net::new(Ipv4Addr::from(addr), 32).unwrap();
            let answer = match t.entries.get(&IpNet::V4(exact)) {
                Some(v) if value & EXACT != 0 => *v,
                _ => value & BASE,
            };
            assert_eq!(
                longest_match(t, addr),
                answer,
                "{} in cell {cell}",
                Ipv4Addr::from(addr)
            );
        }
    }

    #[test]
    fn cells_say_what_the_trie_says() {
        let t = table(&[
            ("10.0.0.0/8", LIST_BLOCK),
            ("10.1.0.0/16", LIST_ALLOW),
            ("10.1.2.0/24", LIST_BLOCK),
            ("10.1.3.128/25", LIST_BLOCK),
            ("10.2.0.7/32", LIST_ALLOW),
            ("192.0.2.0/24", LIST_BLOCK),
            ("198.51.100.0/23", LIST_ALLOW),
            ("255.255.255.255/32", LIST_BLOCK),
            ("2001:db8::/32", LIST_BLOCK),
        ]);
        let words = summarize(&t);
        let cell = |a: &str| u32::from(a.parse::<Ipv4Addr>().unwrap()) >> 8;
        for (addr, want) in [
            ("10.0.0.1", LIST_BLOCK),
            ("10.255.255.1", LIST_BLOCK),
            ("10.1.0.1", LIST_ALLOW),
            ("10.1.2.1", LIST_BLOCK),
            ("10.1.3.1", TRIE | LIST_ALLOW),
            ("10.2.0.1", EXACT | LIST_BLOCK),
            ("10.2.1.1", LIST_BLOCK),
            ("11.0.0.1", NONE),
            ("9.255.255.255", NONE),
            ("192.0.2.200", LIST_BLOCK),
            ("198.51.101.9", LIST_ALLOW),
            ("198.51.102.9", NONE),
            ("255.255.255.1", EXACT),
            ("0.0.0.0", NONE),
        ] {
            assert_eq!(cell_in(&words, cell(addr)), want, "{addr}");
        }
        for c in [
            0,
            cell("10.0.0.0"),
            cell("10.1.3.0"),
            cell("10.2.0.0"),
            cell("255.255.255.0"),
        ] {
            check_cell(&t, &words, c);
        }
        // The whole space under one prefix, and no entries at all.
        let all = summarize(&table(&[("0.0.0.0/0", LIST_BLOCK)]));
        assert!(all.iter().all(|w| *w == 0x2222_2222_2222_2222));
        assert!(summarize(&ListTable::default()).iter().all(|w| *w == 0));
    }

    #[test]
    fn random_nested_tables_agree_with_a_longest_match() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20 {
            let mut t = ListTable::default();
            // Entries crowded into 10.0.0.0/14 so that they nest and overlap often.
            for _ in 0..200 {
                let addr = 0x0a00_0000 | (next() as u32 & 0x0003_ffff);
                let len = 14 + (next() % 19) as u8;
                let net = Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap().trunc();
                let v = if next().is_multiple_of(2) {
                    LIST_ALLOW
                } else {
                    LIST_BLOCK
                };
                t.entries.insert(IpNet::V4(net), v);
            }
            let words = summarize(&t);
            for _ in 0..64 {
                let cell = (0x0a00_0000u32 >> 8) + (next() as u32 % (1 << 10));
                check_cell(&t, &words, cell);
            }
            check_cell(&t, &words, (0x0a04_0000u32 >> 8) + 1);
        }
    }

    /// A seeded xorshift64 generator: the same tables on every run.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// Whether the data plane would ask the IPv6 trie about `addr`.
    fn asks_trie(bits: &[u64], addr: std::net::Ipv6Addr) -> bool {
        let a = addr.octets();
        let bit = |(word, shift): (u32, u32)| bits[word as usize] >> shift & 1 != 0;
        bit(summary_v6::short_bit(&a)) || bit(summary_v6::cell_bit(&a))
    }

    #[test]
    fn ipv6_bits_cover_every_entry_and_little_else() {
        let nets: Vec<IpNet> = [
            "2001:db8:a11::/48",
            "2001:db8:bad::/48",
            "fc00::/7",
            "2400:cb00::/32",
            "2a02:f000::/20",
            "2001:db8:7::7/128",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let bits = v6_bitmap(&nets);
        let asks = |s: &str| asks_trie(&bits, s.parse().unwrap());
        // A /128 entry sends its address to the trie, and its neighbours in the cell too.
        assert!(asks("2001:db8:7::7") && asks("2001:db8:7::8") && !asks("2001:db8:107::7"));
        for listed in [
            "2001:db8:a11::1",
            "2001:db8:bad:ffff::",
            "fd12::1",
            "fc00::",
            "2400:cb00:ffff::1",
            "2a02:f0ff::1",
        ] {
            assert!(asks(listed), "{listed}");
        }
        // Listed nowhere: no trie walk.
        for clear in [
            "2001:db8:ffff::7",
            "2001:db9::1",
            "fe80::1",
            "2400:cb01::1",
            "::1",
        ] {
            assert!(!asks(clear), "{clear}");
        }
        // Bits 16-39 alias across /16s: sent to the trie, which then says "not listed".
        assert!(asks("2a00:db8:a11::1"));
        assert!(v6_bitmap(&[]).iter().all(|w| *w == 0));
        let everything = v6_bitmap(&["::/0".parse().unwrap()]);
        assert!(
            everything[..summary_v6::SHORT_WORDS as usize]
                .iter()
                .all(|w| *w == u64::MAX)
        );
    }

    #[test]
    fn random_ipv6_entries_always_send_their_addresses_to_the_trie() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..50 {
            let nets: Vec<IpNet> = (0..100)
                .map(|_| {
                    let addr = (u128::from(next()) << 64) | u128::from(next());
                    let len = (next() % 129) as u8;
                    IpNet::V6(ipnet::Ipv6Net::new(addr.into(), len).unwrap().trunc())
                })
                .collect();
            let bits = v6_bitmap(&nets);
            for net in &nets {
                let IpNet::V6(n) = net else { unreachable!() };
                // The first, the last and a random address of every entry.
                let host =
                    (u128::from(next()) << 64 | u128::from(next())) & u128::from(n.hostmask());
                for addr in [
                    n.network(),
                    n.broadcast(),
                    (u128::from(n.network()) | host).into(),
                ] {
                    assert!(asks_trie(&bits, addr), "{addr} in {n}");
                }
            }
        }
    }

    #[test]
    fn touched_cells_merge_and_ignore_ipv6() {
        let nets: Vec<IpNet> = [
            "10.0.0.0/23",
            "10.0.2.5/32",
            "10.0.9.0/24",
            "::/0",
            "0.0.0.0/0",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(
            touched_cells(&nets[..3]),
            vec![(0x0a0000, 0x0a0002), (0x0a0009, 0x0a0009)]
        );
        assert_eq!(touched_cells(&nets[3..]), vec![(0, (1 << 24) - 1)]);
    }
}
