//! The IPv4 list summary: two bits per /24 saying what the trie answers for every address
//! in it ([`api_shield_common::lists::summary`]), so that the data plane skips the trie
//! walk (a kernel call whose cost grows with the list) for most packets.
//!
//! It is kept in step with the trie by `Shield::apply_lists`: the /24s a change touches
//! are first set to "ask the trie", then the trie changes, then those /24s get their new
//! value. At every moment each cell either says what the trie says or sends the packet to
//! the trie, so no packet gets a verdict the lists never held.

use std::{net::Ipv4Addr, os::fd::AsRawFd};

use anyhow::{Result, bail};
use api_shield_common::lists::{
    ListVerdict,
    summary::{CELLS_PER_WORD, NONE, TRIE, WORDS},
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

/// The value of one cell for `table`: [`TRIE`] if an entry longer than /24 lies inside it,
/// else the verdict of the longest entry covering it, else [`NONE`].
pub fn cell_value(table: &ListTable, cell: u32) -> u32 {
    let base = Ipv4Addr::from(cell << 8);
    let last = Ipv4Addr::from((cell << 8) | 0xff);
    // Entries whose network lies in this /24: ordered by (address, length), so one range.
    let lo = IpNet::V4(Ipv4Net::new(base, 0).expect("length 0 is valid"));
    let hi = IpNet::V4(Ipv4Net::new(last, 32).expect("length 32 is valid"));
    if table
        .entries
        .range(lo..=hi)
        .any(|(net, _)| net.prefix_len() > 24)
    {
        return TRIE;
    }
    (0..=24u8)
        .rev()
        .find_map(|len| {
            let net = IpNet::V4(Ipv4Net::new(base, len).expect("length <= 24").trunc());
            table.entries.get(&net).copied()
        })
        .unwrap_or(NONE)
}

/// Every cell's value for `table`, packed as the map holds them (cell `c` in word
/// `c / 32`, bits `2 * (c % 32)`). One sweep over the entries in address order, each
/// cell painted once with its innermost covering prefix.
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
        set(&mut words, cell, TRIE);
    }
    words
}

fn set(words: &mut [u64], cell: u32, value: u32) {
    let (word, shift) = (
        (cell / CELLS_PER_WORD) as usize,
        (cell % CELLS_PER_WORD) * 2,
    );
    words[word] = (words[word] & !(3 << shift)) | (u64::from(value) << shift);
}

/// Sets cells `first..=last` to `value`, whole words at a time where it can.
fn fill(words: &mut [u64], first: u32, last: u32, value: u32) {
    let mut cell = first;
    while cell <= last {
        if cell.is_multiple_of(CELLS_PER_WORD) && last - cell + 1 >= CELLS_PER_WORD {
            words[(cell / CELLS_PER_WORD) as usize] = u64::from(value) * 0x5555_5555_5555_5555;
            cell += CELLS_PER_WORD;
        } else {
            set(words, cell, value);
            cell += 1;
        }
    }
}

/// The summary map, mapped into this process: written as memory, read by the data plane
/// with one inlined array load.
pub struct SummaryMap {
    words: *mut u64,
}

// SAFETY: the mapping belongs to this value alone; it is written only through &mut self.
unsafe impl Send for SummaryMap {}

impl SummaryMap {
    /// Maps the summary array (created with BPF_F_MMAPABLE) behind `fd`.
    pub fn map(fd: &impl AsRawFd) -> Result<SummaryMap> {
        // SAFETY: a fresh shared mapping of the whole map; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                WORDS as usize * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mapping the IPv4 list summary: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(SummaryMap {
            words: ptr.cast::<u64>(),
        })
    }

    fn word(&self, i: usize) -> u64 {
        assert!(i < WORDS as usize);
        // SAFETY: in bounds of the mapping; aligned u64 (an atomic load on x86-64 and arm64).
        unsafe { self.words.add(i).read_volatile() }
    }

    fn set_word(&mut self, i: usize, value: u64) {
        assert!(i < WORDS as usize);
        // SAFETY: as in `word`; one aligned store, so the data plane sees old or new.
        unsafe { self.words.add(i).write_volatile(value) }
    }

    /// The value of `cell` as the data plane reads it now.
    pub fn cell(&self, cell: u32) -> u32 {
        let word = self.word((cell / CELLS_PER_WORD) as usize);
        (word >> ((cell % CELLS_PER_WORD) * 2)) as u32 & 3
    }

    /// Writes the whole summary of `table` (where it differs from what the map holds).
    pub fn write_all(&mut self, table: &ListTable) {
        for (i, w) in summarize(table).into_iter().enumerate() {
            if self.word(i) != w {
                self.set_word(i, w);
            }
        }
    }

    /// Sends the cells of `touched` to the trie: before the trie changes under them.
    pub fn ask_trie(&mut self, touched: &[(u32, u32)]) {
        for &(first, last) in touched {
            self.update_cells(first, last, |_| TRIE);
        }
    }

    /// Gives the cells of `touched` their value for `table`: after the trie changed.
    pub fn settle(&mut self, table: &ListTable, touched: &[(u32, u32)]) {
        let cells: u64 = touched.iter().map(|&(a, b)| u64::from(b - a) + 1).sum();
        if cells > FULL_RECOMPUTE_CELLS {
            self.write_all(table);
            return;
        }
        for &(first, last) in touched {
            self.update_cells(first, last, |cell| cell_value(table, cell));
        }
    }

    fn update_cells(&mut self, first: u32, last: u32, value: impl Fn(u32) -> u32) {
        let mut cell = first;
        while cell <= last {
            let i = cell / CELLS_PER_WORD;
            let end = last.min((i + 1) * CELLS_PER_WORD - 1);
            let mut w = self.word(i as usize);
            // All the range's cells in this word, then one store.
            for c in cell..=end {
                let shift = (c % CELLS_PER_WORD) * 2;
                w = (w & !(3 << shift)) | (u64::from(value(c)) << shift);
            }
            if self.word(i as usize) != w {
                self.set_word(i as usize, w);
            }
            cell = end + 1;
        }
    }
}

impl Drop for SummaryMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.words.cast(), WORDS as usize * 8) };
    }
}

/// The cells a set of list changes touches, merged into disjoint ranges.
pub fn touched_cells<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Vec<(u32, u32)> {
    let mut ranges: Vec<(u32, u32)> = nets
        .into_iter()
        .filter_map(|net| match net {
            IpNet::V4(n) => Some(cells_of(n)),
            IpNet::V6(_) => None,
        })
        .collect();
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

#[cfg(test)]
mod tests {
    use api_shield_common::lists::{LIST_ALLOW, LIST_BLOCK};

    use super::*;

    fn table(entries: &[(&str, ListVerdict)]) -> ListTable {
        let mut t = ListTable::default();
        for (net, v) in entries {
            t.entries.insert(net.parse::<IpNet>().unwrap().trunc(), *v);
        }
        t
    }

    fn cell_in(words: &[u64], cell: u32) -> u32 {
        (words[(cell / CELLS_PER_WORD) as usize] >> ((cell % CELLS_PER_WORD) * 2)) as u32 & 3
    }

    /// What the trie answers for `addr`: the longest entry holding it (0: none).
    fn longest_match(t: &ListTable, addr: u32) -> ListVerdict {
        (0..=32u8)
            .rev()
            .find_map(|len| {
                let net = Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap().trunc();
                t.entries.get(&IpNet::V4(net)).copied()
            })
            .unwrap_or(NONE)
    }

    /// Every claim the summary makes holds for every address of the /24.
    fn check_cell(t: &ListTable, words: &[u64], cell: u32) {
        let value = cell_in(words, cell);
        assert_eq!(value, cell_value(t, cell), "cell {cell}: sweep vs one cell");
        if value == TRIE {
            return;
        }
        for host in 0..256 {
            let addr = (cell << 8) | host;
            assert_eq!(
                longest_match(t, addr),
                value,
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
            ("10.1.3.1", TRIE),
            ("10.2.0.1", TRIE),
            ("10.2.1.1", LIST_BLOCK),
            ("11.0.0.1", NONE),
            ("9.255.255.255", NONE),
            ("192.0.2.200", LIST_BLOCK),
            ("198.51.101.9", LIST_ALLOW),
            ("198.51.102.9", NONE),
            ("255.255.255.1", TRIE),
            ("0.0.0.0", NONE),
        ] {
            assert_eq!(cell_in(&words, cell(addr)), want, "{addr}");
        }
        for c in [0, cell("10.0.0.0"), cell("10.1.3.0"), cell("255.255.255.0")] {
            check_cell(&t, &words, c);
        }
        // The whole space under one prefix, and no entries at all.
        let all = summarize(&table(&[("0.0.0.0/0", LIST_BLOCK)]));
        assert!(all.iter().all(|w| *w == 0xaaaa_aaaa_aaaa_aaaa));
        assert!(summarize(&ListTable::default()).iter().all(|w| *w == 0));
    }

    #[test]
    fn random_nested_tables_agree_with_a_longest_match() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20 {
            let mut t = ListTable::default();
            // Entries crowded into 10.0.0.0/14 so that they nest and overlap often.
            for _ in 0..200 {
                let addr = 0x0a00_0000 | (next() as u32 & 0x0003_ffff);
                let len = 14 + (next() % 19) as u8;
                let net = Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap().trunc();
                let v = if next() % 2 == 0 {
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
