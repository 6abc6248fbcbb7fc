//! The limiter table as the controller sees it: the data plane's bucket array, mapped
//! into this process, to count, list and find buckets without a system call per bucket.
//! The controller writes one thing there: a released penalty box's windows (see
//! [`LimiterTable::reset_window`]).

use std::os::fd::AsRawFd;

use anyhow::{Result, bail};
use api_shield_common::limiter::{LIMITER_WAYS, LimiterKey, LimiterSet, LimiterState, set_of};

pub struct LimiterTable {
    sets: *mut LimiterSet,
    len: usize,
}

// SAFETY: a mapping owned by this value; the data plane writes it concurrently, which
// every reader here tolerates (a bucket read mid-update is one packet off).
unsafe impl Send for LimiterTable {}

impl LimiterTable {
    /// Maps the `sets` sets of the array map behind `fd` (created BPF_F_MMAPABLE).
    pub fn map(fd: &impl AsRawFd, sets: u32) -> Result<LimiterTable> {
        let len = sets as usize;
        // SAFETY: a fresh shared mapping of the whole map; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * size_of::<LimiterSet>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mapping the limiter table: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(LimiterTable {
            sets: ptr.cast::<LimiterSet>(),
            len,
        })
    }

    /// Sets in the table.
    pub fn sets(&self) -> u32 {
        self.len as u32
    }

    /// Buckets the table can hold.
    pub fn capacity(&self) -> usize {
        self.len * LIMITER_WAYS
    }

    fn set(&self, index: usize) -> LimiterSet {
        debug_assert!(index < self.len);
        // SAFETY: index < len, inside the mapping; a volatile copy, as the kernel writes it.
        unsafe { self.sets.add(index).read_volatile() }
    }

    /// Buckets in use.
    pub fn occupied(&self) -> usize {
        (0..self.len)
            .map(|i| self.set(i).slots.iter().filter(|s| s.occupied != 0).count())
            .sum()
    }

    /// Every bucket in use.
    pub fn entries(&self) -> Vec<(LimiterKey, LimiterState)> {
        let mut out = Vec::new();
        for i in 0..self.len {
            for slot in self.set(i).slots {
                if slot.occupied != 0 {
                    out.push((slot.key, slot.state));
                }
            }
        }
        out
    }

    /// Where the bucket of `key` is (set index, way), found as the data plane finds it
    /// (its set under `seed`).
    fn find(&self, key: &LimiterKey, seed: u64) -> Option<(usize, usize)> {
        if self.len == 0 {
            return None;
        }
        let index = set_of(key.words(), seed, self.len as u32) as usize;
        let way = self
            .set(index)
            .slots
            .iter()
            .position(|s| s.occupied != 0 && s.key == *key)?;
        Some((index, way))
    }

    /// The bucket of `key`, if the table holds it.
    pub fn get(&self, key: &LimiterKey, seed: u64) -> Option<LimiterState> {
        let (index, way) = self.find(key, seed)?;
        Some(self.set(index).slots[way].state)
    }

    /// Ends the penalty window of `key`'s bucket, if the table holds it, so its next drop
    /// starts a new one: a prefix released from the penalty box is counted afresh, not
    /// against the window that boxed it (in which it was already reported once). Returns
    /// whether there was such a bucket. The data plane's own updates of these two fields
    /// are plain read-modify-writes too; a drop racing this write is at worst counted in
    /// the old window.
    pub fn reset_window(&self, key: &LimiterKey, seed: u64) -> bool {
        let Some((index, way)) = self.find(key, seed) else {
            return false;
        };
        // SAFETY: index < len and way < LIMITER_WAYS: a slot inside the mapping;
        // aligned u64 fields, written volatile as the kernel reads them concurrently.
        unsafe {
            let state = &raw mut (*self.sets.add(index)).slots[way].state;
            (&raw mut (*state).window_start).write_volatile(0);
            (&raw mut (*state).window_drops).write_volatile(0);
        }
        true
    }
}

impl Drop for LimiterTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe {
            libc::munmap(self.sets.cast(), self.len * size_of::<LimiterSet>());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_spread_keys_evenly() {
        // 64k sequential IPv4 sources over 1,024 sets: no set far from its share of 64,
        // which is what keeps 4 ways enough.
        let sets = 1024u32;
        let mut counts = vec![0u32; sets as usize];
        for n in 0u32..65_536 {
            let mut addr = [0u8; 16];
            addr[10] = 0xff;
            addr[11] = 0xff;
            addr[12..].copy_from_slice(&(0x0a00_0000 + n).to_be_bytes());
            let key = LimiterKey { addr, limit: 0 };
            let set = set_of(key.words(), 0x1234_5678_9abc_def1, sets);
            assert!(set < sets);
            counts[set as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(
            *min >= 32 && *max <= 110,
            "sets hold {min} to {max} keys of 64 expected"
        );
    }

    #[test]
    fn the_seed_moves_keys_between_sets() {
        let key = |n: u8| LimiterKey {
            addr: [n; 16],
            limit: 1,
        };
        let moved = (0..=255u8)
            .filter(|n| set_of(key(*n).words(), 1, 4096) != set_of(key(*n).words(), 2, 4096))
            .count();
        assert!(
            moved > 240,
            "only {moved} of 256 keys changed set with the seed"
        );
    }
}
