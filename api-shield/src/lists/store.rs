//! The list maps as the lists hold them: one `ListStore` owns what the maps hold (to
//! write changes as diffs) and the summaries mapped into this process, and takes the maps
//! from one list table to the next without a moment where a source gets a verdict the
//! lists never held.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result, anyhow};
use api_shield_common::{
    lists::{HashedV6Key, InnerV4, InnerV6, ListVerdict, summary_v6},
    names,
};
use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, MapData, lpm_trie::Key},
};
use ipnet::IpNet;

use crate::{
    lists::{
        fold::{ListDiff, ListTable},
        summary::{self, Family, InnerVerdicts, SummaryMaps, inner_key},
    },
    shield::batch::{self, map_mut},
};

/// The lists in the kernel: what the list maps hold, the summaries, and the IPv6 hash and
/// inner verdicts derived from them.
pub struct ListStore {
    /// What the list maps hold now, so updates are applied as diffs.
    table: ListTable,
    /// The summaries, mapped into this process.
    summary: SummaryMaps,
    /// Entries each family's lists may hold (the tries' size).
    capacity: usize,
    /// IPv6 entries of hashed lengths now in the trie, to copy into the hash in batches
    /// once a list change is done with the trie.
    hashed_pending: Vec<(HashedV6Key, ListVerdict)>,
    /// The /24s (cells) whose inner verdicts the maps hold: IPv4's, IPv6's.
    inner_held: [BTreeSet<u32>; 2],
}

impl ListStore {
    /// Takes over the list maps of a loaded program: learns what reused (pinned) maps
    /// hold, brings the hash and inner verdicts derived from them back in step, and writes
    /// the summaries, all before the program sees a packet.
    pub fn open(ebpf: &mut Ebpf, summary: SummaryMaps, capacity: usize) -> Result<ListStore> {
        let mut store = ListStore {
            table: ListStore::read_lists(ebpf)?,
            summary,
            capacity,
            hashed_pending: Vec::new(),
            inner_held: [BTreeSet::new(), BTreeSet::new()],
        };
        // A reused hash of IPv6 entries may lag the trie (a daemon stopped between the
        // two), and reused inner verdicts may be from another version.
        store.sync_hashed_v6(ebpf)?;
        store.sync_inner::<InnerV4>(ebpf)?;
        store.sync_inner::<InnerV6>(ebpf)?;
        // The summary must match the tries before the program is attached (a new map
        // reads "listed nowhere" everywhere; a reused one may be from another version).
        store.summary.write_all(&store.table);
        Ok(store)
    }

    /// What the list maps hold.
    pub fn table(&self) -> &ListTable {
        &self.table
    }

    fn read_lists(ebpf: &mut Ebpf) -> Result<ListTable> {
        let mut table = ListTable::default();
        for item in trie_v4(ebpf)?.iter() {
            let (key, verdict) = item?;
            let net = IpNet::new(
                IpAddr::V4(Ipv4Addr::from(key.data())),
                key.prefix_len() as u8,
            )?;
            table.entries.insert(net, verdict);
        }
        for item in trie_v6(ebpf)?.iter() {
            let (key, verdict) = item?;
            let net = IpNet::new(
                IpAddr::V6(Ipv6Addr::from(key.data())),
                key.prefix_len() as u8,
            )?;
            table.entries.insert(net, verdict);
        }
        for item in exact_v4(ebpf)?.iter() {
            let (addr, verdict) = item?;
            table
                .entries
                .insert(IpNet::new(IpAddr::V4(Ipv4Addr::from(addr)), 32)?, verdict);
        }
        Ok(table)
    }

    /// Takes the list tries to `next` without a gap: upserts first, then removals. A trie
    /// that is full refuses entries; they are retried once the removals made room, and
    /// those still refused are returned (and not recorded, so the next update retries them).
    pub fn apply(&mut self, ebpf: &mut Ebpf, next: &ListTable) -> Result<Vec<IpNet>> {
        let diff = self.table.diff_to(next);
        // What this changes asks the trie while it changes, then gets its new summary.
        let touched = self
            .summary
            .before_change(diff.upserts.iter().map(|(net, _)| net), &diff.removals);
        // Those /24s walk the trie while it changes: their inner verdicts go first.
        let cleared = self
            .clear_inner::<InnerV4>(ebpf, &touched.v4)
            .and_then(|()| self.clear_inner::<InnerV6>(ebpf, &touched.v6));
        let result = cleared.and_then(|()| self.apply_diff(ebpf, next, &diff));
        // The hash and the inner verdicts are whole before the summary may send sources
        // to them.
        let copied = self.copy_pending_hashed_v6(ebpf);
        let inner_v4 = self.write_inner::<InnerV4>(ebpf, &touched.v4);
        let inner_v6 = self.write_inner::<InnerV6>(ebpf, &touched.v6);
        self.summary.after_change(&self.table, &touched);
        let refused = result?;
        copied?;
        inner_v4?;
        inner_v6?;
        Ok(refused)
    }

    fn apply_diff(
        &mut self,
        ebpf: &mut Ebpf,
        next: &ListTable,
        diff: &ListDiff,
    ) -> Result<Vec<IpNet>> {
        let mut room = self.list_room();
        let mut refused = Vec::new();
        self.upsert_in_batches(ebpf, &diff.upserts, &mut room, &mut refused)?;
        self.remove_hashed_v6(ebpf, &diff.removals)?;
        let mut left = Vec::new();
        for map in LIST_MAPS {
            let nets: Vec<IpNet> = diff
                .removals
                .iter()
                .filter(|net| list_map_of(net) == map)
                .copied()
                .collect();
            let removed = self.list_batch(ebpf, map, &nets, None)?;
            for net in &nets[..removed] {
                self.table.entries.remove(net);
                *room.of(net) += 1;
            }
            left.extend_from_slice(&nets[removed..]);
        }
        // What a batch left: one by one, each failure reported as it is.
        for net in &left {
            self.list_remove(ebpf, *net)
                .with_context(|| format!("removing {net} from the lists"))?;
            self.table.entries.remove(net);
            *room.of(net) += 1;
        }
        if !refused.is_empty() && !diff.removals.is_empty() {
            let retry = std::mem::take(&mut refused);
            for net in retry {
                self.upsert_or_refuse(ebpf, net, next.entries[&net], &mut room, &mut refused)?;
            }
        }
        Ok(refused)
    }

    /// Entries each family's lists can still take: its capacity (the trie's size) less
    /// what it holds (for IPv4, the trie and the exact map share it).
    fn list_room(&self) -> ListRoom {
        let v4 = self
            .table
            .entries
            .keys()
            .filter(|n| n.addr().is_ipv4())
            .count();
        let v6 = self.table.entries.len() - v4;
        ListRoom {
            v4: self.capacity.saturating_sub(v4),
            v6: self.capacity.saturating_sub(v6),
        }
    }

    /// Adds or updates entries in batches (one call per 16k entries, where one by one
    /// costs a call each): IPv4 addresses into the exact map, other prefixes into their
    /// family's trie. Those that find no room are refused, as in
    /// [`Shield::upsert_or_refuse`], which also finishes what a batch left.
    fn upsert_in_batches(
        &mut self,
        ebpf: &mut Ebpf,
        entries: &[(IpNet, ListVerdict)],
        room: &mut ListRoom,
        refused: &mut Vec<IpNet>,
    ) -> Result<()> {
        let mut taken: [Vec<(IpNet, ListVerdict)>; 3] = Default::default();
        for &(net, verdict) in entries {
            let old = self.table.entries.get(&net).copied();
            if old.is_none() {
                let left = room.of(&net);
                if *left == 0 {
                    refused.push(net);
                    continue;
                }
                *left -= 1;
            }
            self.unhash_if_changed(ebpf, net, verdict)?;
            let map = LIST_MAPS.iter().position(|&m| m == list_map_of(&net));
            taken[map.expect("every entry has a list map")].push((net, verdict));
        }
        for (map, taken) in LIST_MAPS.into_iter().zip(taken) {
            let nets: Vec<IpNet> = taken.iter().map(|&(n, _)| n).collect();
            let values: Vec<ListVerdict> = taken.iter().map(|&(_, v)| v).collect();
            let done = self.list_batch(ebpf, map, &nets, Some(&values))?;
            for &(net, verdict) in &taken[..done] {
                self.table.entries.insert(net, verdict);
                if let Some(key) = hashed_v6_key(&net) {
                    self.hashed_pending.push((key, verdict));
                }
            }
            // Stopped short (a full map, out of memory): the rest one by one, with their
            // room given back first, so each gets its own verdict or error.
            for &(net, verdict) in &taken[done..] {
                if !self.table.entries.contains_key(&net) {
                    *room.of(&net) += 1;
                }
                self.upsert_or_refuse(ebpf, net, verdict, room, refused)?;
            }
        }
        Ok(())
    }

    /// [`Shield::in_batches`] on the list map `map` (see [`list_map_of`]), with `nets`
    /// as its keys.
    fn list_batch(
        &mut self,
        ebpf: &mut Ebpf,
        map: &'static str,
        nets: &[IpNet],
        values: Option<&[ListVerdict]>,
    ) -> Result<usize> {
        match map {
            names::MAP_LIST_V4_EXACT => {
                let keys: Vec<[u8; 4]> = nets
                    .iter()
                    .map(|net| exact_address(net).map(|a| a.octets()))
                    .collect::<Option<_>>()
                    .context("a prefix in a batch for the exact map")?;
                batch::in_batches(ebpf, map, &keys, values)
            }
            names::MAP_LIST_V4 => batch::in_batches(ebpf, map, &trie_keys::<4>(nets)?, values),
            _ => batch::in_batches(ebpf, map, &trie_keys::<16>(nets)?, values),
        }
    }

    /// Copies the IPv6 entries of hashed lengths the trie took in this change into the
    /// hash, in batches; what the kernel will not take for want of memory stays out (its
    /// sources walk the trie).
    fn copy_pending_hashed_v6(&mut self, ebpf: &mut Ebpf) -> Result<()> {
        let pending = std::mem::take(&mut self.hashed_pending);
        let keys: Vec<HashedV6Key> = pending.iter().map(|&(k, _)| k).collect();
        let values: Vec<ListVerdict> = pending.iter().map(|&(_, v)| v).collect();
        let done = batch::in_batches(ebpf, names::MAP_LIST_V6_HASHED, &keys, Some(&values))?;
        for &(key, verdict) in &pending[done..] {
            match hashed_v6(ebpf)?.insert(key, verdict, 0) {
                Ok(()) => {}
                Err(e) if is_out_of_memory(&e) => log::warn!(
                    "an IPv6 /{} is in force but not in the IPv6 hash (out of memory): its \
                     sources take the trie walk",
                    key.prefix_len
                ),
                Err(e) => return Err(e).context("adding an entry to the IPv6 hash"),
            }
        }
        Ok(())
    }

    /// Takes the IPv6 entries of hashed lengths among `removals` out of the hash, in
    /// batches, before they leave the trie: the hash never holds what the trie does not.
    fn remove_hashed_v6(&mut self, ebpf: &mut Ebpf, removals: &[IpNet]) -> Result<()> {
        let keys: Vec<HashedV6Key> = removals.iter().filter_map(hashed_v6_key).collect();
        let done = batch::in_batches(
            ebpf,
            names::MAP_LIST_V6_HASHED,
            &keys,
            None::<&[ListVerdict]>,
        )?;
        // Stopped at a key not there (a copy never made) or refused outright.
        for key in &keys[done..] {
            remove_if_present(&mut hashed_v6(ebpf)?, key)?;
        }
        Ok(())
    }

    fn upsert_or_refuse(
        &mut self,
        ebpf: &mut Ebpf,
        net: IpNet,
        verdict: ListVerdict,
        room: &mut ListRoom,
        refused: &mut Vec<IpNet>,
    ) -> Result<()> {
        let new = !self.table.entries.contains_key(&net);
        if new && *room.of(&net) == 0 {
            refused.push(net);
            return Ok(());
        }
        match self.list_insert(ebpf, net, verdict) {
            Ok(()) => {
                self.table.entries.insert(net, verdict);
                if new {
                    *room.of(&net) -= 1;
                }
                Ok(())
            }
            Err(e) if is_map_full(&e) => {
                refused.push(net);
                Ok(())
            }
            Err(e) => Err(e.context(format!("adding {net} to the lists"))),
        }
    }

    /// Adds or updates one entry: an IPv4 address (/32) in the exact map, any other prefix
    /// in its family's trie (and an IPv6 entry of a hashed length in the hash too).
    fn list_insert(&mut self, ebpf: &mut Ebpf, net: IpNet, verdict: ListVerdict) -> Result<()> {
        let len = u32::from(net.prefix_len());
        match net.addr() {
            IpAddr::V4(a) if len == 32 => exact_v4(ebpf)?.insert(a.octets(), verdict, 0)?,
            IpAddr::V4(a) => trie_v4(ebpf)?.insert(&Key::new(len, a.octets()), verdict, 0)?,
            IpAddr::V6(a) => {
                self.unhash_if_changed(ebpf, net, verdict)?;
                trie_v6(ebpf)?.insert(&Key::new(len, a.octets()), verdict, 0)?;
                if let Some(key) = hashed_v6_key(&net) {
                    self.hashed_pending.push((key, verdict));
                }
            }
        }
        Ok(())
    }

    /// Takes `net`'s copy out of the IPv6 hash if the lists hold it with a verdict other
    /// than `verdict`: the hash must never hold what the trie does not, so a changed
    /// verdict leaves it before the trie changes, and joins it after.
    fn unhash_if_changed(
        &mut self,
        ebpf: &mut Ebpf,
        net: IpNet,
        verdict: ListVerdict,
    ) -> Result<()> {
        if let Some(key) = hashed_v6_key(&net)
            && self.table.entries.get(&net).is_some_and(|&v| v != verdict)
        {
            remove_if_present(&mut hashed_v6(ebpf)?, &key)?;
        }
        Ok(())
    }

    fn list_remove(&mut self, ebpf: &mut Ebpf, net: IpNet) -> Result<()> {
        let len = u32::from(net.prefix_len());
        match net.addr() {
            IpAddr::V4(a) if len == 32 => exact_v4(ebpf)?.remove(&a.octets())?,
            IpAddr::V4(a) => trie_v4(ebpf)?.remove(&Key::new(len, a.octets()))?,
            // Its copy in the hash went first (`remove_hashed_v6`).
            IpAddr::V6(a) => trie_v6(ebpf)?.remove(&Key::new(len, a.octets()))?,
        }
        Ok(())
    }

    /// Makes the IPv6 hash hold exactly the entries of hashed lengths in the lists: what
    /// it holds beyond them (or with another verdict) goes, what it lacks is added.
    fn sync_hashed_v6(&mut self, ebpf: &mut Ebpf) -> Result<()> {
        let want: std::collections::HashMap<HashedV6Key, ListVerdict> = self
            .table
            .entries
            .iter()
            .filter_map(|(net, &v)| hashed_v6_key(net).map(|k| (k, v)))
            .collect();
        let mut hashed = hashed_v6(ebpf)?;
        let held: Vec<(HashedV6Key, ListVerdict)> = hashed
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the IPv6 hash")?;
        for (key, verdict) in &held {
            if want.get(key) != Some(verdict) {
                remove_if_present(&mut hashed, key)?;
            }
        }
        let held: std::collections::HashMap<HashedV6Key, ListVerdict> = held.into_iter().collect();
        for (key, verdict) in want {
            if held.get(&key) != Some(&verdict) {
                hashed
                    .insert(key, verdict, 0)
                    .context("adding an entry to the IPv6 hash")?;
            }
        }
        Ok(())
    }

    /// Takes the inner verdicts of `I`'s family's /24s in `ranges` out of their map (in
    /// batches): until [`Shield::write_inner`], those /24s walk the trie.
    fn clear_inner<I: InnerVerdicts>(
        &mut self,
        ebpf: &mut Ebpf,
        ranges: &[(u32, u32)],
    ) -> Result<()> {
        let held = &self.inner_held[I::FAMILY as usize];
        let cells: Vec<u32> = summary::cells_in_ranges(held.iter().copied(), ranges).collect();
        let keys: Vec<[u8; 4]> = cells.iter().map(|&c| inner_key(c)).collect();
        let done = batch::in_batches(ebpf, I::MAP, &keys, None::<&[I]>)?;
        for key in &keys[done..] {
            self.remove_inner::<I>(ebpf, key)?;
        }
        for cell in cells {
            self.inner_held[I::FAMILY as usize].remove(&cell);
        }
        Ok(())
    }

    /// Writes the inner verdicts of `I`'s family's /24s in `ranges` that hold entries of
    /// /25 to /31 (IPv4) or /39 (IPv6) now (in batches). One the kernel will not take for
    /// want of memory stays out: its sources walk the trie.
    fn write_inner<I: InnerVerdicts>(
        &mut self,
        ebpf: &mut Ebpf,
        ranges: &[(u32, u32)],
    ) -> Result<()> {
        let cells = summary::inner_cells(&self.table, I::FAMILY, ranges);
        let values: Vec<I> = cells
            .iter()
            .map(|&c| summary::inner_value(&self.table, c).expect("a cell with inner entries"))
            .collect();
        let keys: Vec<[u8; 4]> = cells.iter().map(|&c| inner_key(c)).collect();
        let done = batch::in_batches(ebpf, I::MAP, &keys, Some(&values))?;
        self.inner_held[I::FAMILY as usize].extend(&cells[..done]);
        let mut left_out = Vec::new();
        for ((&cell, key), value) in cells.iter().zip(&keys).zip(&values).skip(done) {
            match inner_map::<I>(ebpf)?.insert(key, value, 0) {
                Ok(()) => {
                    self.inner_held[I::FAMILY as usize].insert(cell);
                }
                Err(e) if is_out_of_memory(&e) => left_out.push(cell),
                Err(e) => return Err(e).context("writing a /24's inner verdicts"),
            }
        }
        if let Some(&first) = left_out.first() {
            let first = match I::FAMILY {
                Family::V4 => IpAddr::from(Ipv4Addr::from(first << 8)),
                Family::V6 => IpAddr::from(Ipv6Addr::from(u128::from(first) << 104)),
            };
            log::warn!(
                "the inner verdicts of {} /24s (the first {first}/24) found no room in the \
                 kernel: their sources take the trie walk",
                left_out.len()
            );
        }
        Ok(())
    }

    /// Makes `I`'s family's inner verdicts map hold exactly those of the lists (a reused
    /// map may be from another version, or behind a change a stopped daemon left).
    fn sync_inner<I: InnerVerdicts>(&mut self, ebpf: &mut Ebpf) -> Result<()> {
        let held: Vec<([u8; 4], I)> = inner_map::<I>(ebpf)?
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the inner verdicts")?;
        let all = [(0, (1 << 24) - 1)];
        let want: std::collections::HashMap<[u8; 4], I> =
            summary::inner_cells(&self.table, I::FAMILY, &all)
                .into_iter()
                .map(|c| {
                    let value = summary::inner_value(&self.table, c).expect("inner entries");
                    (inner_key(c), value)
                })
                .collect();
        // Stale ones go first (their /24s walk the trie until rewritten).
        for (key, value) in &held {
            if want.get(key) == Some(value) {
                self.inner_held[I::FAMILY as usize].insert(u32::from_be_bytes(*key) >> 8);
            } else {
                self.remove_inner::<I>(ebpf, key)?;
            }
        }
        let mut missing: Vec<(u32, u32)> = want
            .keys()
            .map(|k| u32::from_be_bytes(*k) >> 8)
            .filter(|c| !self.inner_held[I::FAMILY as usize].contains(c))
            .map(|c| (c, c))
            .collect();
        missing.sort_unstable();
        self.write_inner::<I>(ebpf, &missing)
    }

    /// Removes one key from an inner verdicts map; one not there is no error.
    fn remove_inner<I: InnerVerdicts>(&mut self, ebpf: &mut Ebpf, key: &[u8; 4]) -> Result<()> {
        match inner_map::<I>(ebpf)?.remove(key) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(e).context("removing a /24's inner verdicts"),
        }
    }
}

fn inner_map<I: InnerVerdicts>(ebpf: &mut Ebpf) -> Result<HashMap<&mut MapData, [u8; 4], I>> {
    Ok(HashMap::try_from(map_mut(ebpf, I::MAP)?)?)
}

fn hashed_v6(ebpf: &mut Ebpf) -> Result<HashMap<&mut MapData, HashedV6Key, ListVerdict>> {
    Ok(HashMap::try_from(map_mut(
        ebpf,
        names::MAP_LIST_V6_HASHED,
    )?)?)
}

fn exact_v4(ebpf: &mut Ebpf) -> Result<HashMap<&mut MapData, [u8; 4], ListVerdict>> {
    Ok(HashMap::try_from(map_mut(ebpf, names::MAP_LIST_V4_EXACT)?)?)
}

fn trie_v4(ebpf: &mut Ebpf) -> Result<LpmTrie<&mut MapData, [u8; 4], ListVerdict>> {
    Ok(LpmTrie::try_from(map_mut(ebpf, names::MAP_LIST_V4)?)?)
}

fn trie_v6(ebpf: &mut Ebpf) -> Result<LpmTrie<&mut MapData, [u8; 16], ListVerdict>> {
    Ok(LpmTrie::try_from(map_mut(ebpf, names::MAP_LIST_V6)?)?)
}

/// The IPv4 address `net` is, if it is one (/32): the exact map's entry, not the trie's.
fn exact_address(net: &IpNet) -> Option<Ipv4Addr> {
    match net {
        IpNet::V4(n) if n.prefix_len() == 32 => Some(n.addr()),
        _ => None,
    }
}

/// The IPv6 hash's key of `net`, if it is an IPv6 entry of a hashed length (/48, /56,
/// /64, /128): its network address, as the data plane masks a source, and its length.
fn hashed_v6_key(net: &IpNet) -> Option<HashedV6Key> {
    match net {
        IpNet::V6(n) if summary_v6::length_flag(n.prefix_len()) != summary_v6::UNHASHED => {
            Some(HashedV6Key {
                addr: n.network().octets(),
                prefix_len: u32::from(n.prefix_len()),
            })
        }
        _ => None,
    }
}

/// The list maps, in the order a change writes them.
const LIST_MAPS: [&str; 3] = [
    names::MAP_LIST_V4_EXACT,
    names::MAP_LIST_V4,
    names::MAP_LIST_V6,
];

/// The list map that holds `net`: IPv4 addresses the exact map, other prefixes their
/// family's trie.
fn list_map_of(net: &IpNet) -> &'static str {
    match net {
        _ if exact_address(net).is_some() => names::MAP_LIST_V4_EXACT,
        IpNet::V4(_) => names::MAP_LIST_V4,
        IpNet::V6(_) => names::MAP_LIST_V6,
    }
}

/// `nets` as the keys of a trie of `N`-byte addresses; one of the other family is an error.
fn trie_keys<const N: usize>(nets: &[IpNet]) -> Result<Vec<Key<[u8; N]>>> {
    nets.iter()
        .map(|net| {
            let data = match net {
                IpNet::V4(n) => <[u8; N]>::try_from(n.addr().octets().as_slice()),
                IpNet::V6(n) => <[u8; N]>::try_from(n.addr().octets().as_slice()),
            }
            .map_err(|_| anyhow!("{net} in a batch for a trie of {N}-byte addresses"))?;
            Ok(Key::new(u32::from(net.prefix_len()), data))
        })
        .collect()
}

/// Removes `key` from the IPv6 hash; a key not there is no error (a copy that could not
/// be made for want of memory, see `Shield::list_insert`).
fn remove_if_present(
    hashed: &mut HashMap<&mut MapData, HashedV6Key, ListVerdict>,
    key: &HashedV6Key,
) -> Result<()> {
    match hashed.remove(key) {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(e).context("removing an entry from the IPv6 hash"),
    }
}

/// Whether a map update failed for want of kernel memory.
fn is_out_of_memory(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(s)
        if matches!(s.io_error.raw_os_error(), Some(libc::ENOMEM | libc::E2BIG)))
}

/// Entries each address family's lists can still take (see `Shield::list_room`).
struct ListRoom {
    v4: usize,
    v6: usize,
}

impl ListRoom {
    fn of(&mut self, net: &IpNet) -> &mut usize {
        match net {
            IpNet::V4(_) => &mut self.v4,
            IpNet::V6(_) => &mut self.v6,
        }
    }
}

/// Whether a map update failed because the map is at capacity.
fn is_map_full(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let io = cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error);
        let syscall = cause
            .downcast_ref::<aya::maps::MapError>()
            .and_then(|m| match m {
                aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error(),
                _ => None,
            });
        matches!(io.or(syscall), Some(libc::ENOSPC | libc::E2BIG))
    })
}
