//! The penalty box: the data plane reports a bucket whose drops within the window went past
//! `after_violations`; the controller blocklists that prefix for `block_for`, multiplied by
//! `escalate` for each earlier offence still remembered, up to `max_block`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context as _, Result};
use api_shield_common::rules::{PENALTY_V6, PenaltyEvent};
use aya::maps::{MapData, RingBuf};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::{config::Penalty, lists::StateDir};

const OFFENCES_FILE: &str = "penalties.json";

/// How long the `repeat`-th box (0: first) lasts.
pub fn block_duration(p: &Penalty, repeat: u32) -> Duration {
    let factor = p.escalate.0.checked_pow(repeat).unwrap_or(u64::MAX);
    let secs = p.block_for.0.as_secs().saturating_mul(factor);
    Duration::from_secs(secs).min(p.max_block.0)
}

/// The prefix a penalty report names; None for a report that is not a valid prefix.
pub fn reported_prefix(e: &PenaltyEvent) -> Option<IpNet> {
    if e.flags & PENALTY_V6 != 0 {
        let len = u8::try_from(e.prefix_len).ok()?;
        Ipv6Net::new(Ipv6Addr::from(e.addr), len)
            .ok()
            .map(|n| IpNet::V6(n.trunc()))
    } else {
        let len = u8::try_from(e.prefix_len).ok()?;
        let a = &e.addr;
        Ipv4Net::new(Ipv4Addr::new(a[12], a[13], a[14], a[15]), len)
            .ok()
            .map(|n| IpNet::V4(n.trunc()))
    }
}

/// One prefix's offences: how many boxes it earned and when it was last boxed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offence {
    pub count: u32,
    pub last_at: u64,
}

/// Offences remembered per prefix, persisted so a restart does not reset escalation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offences {
    by_prefix: BTreeMap<IpNet, Offence>,
}

impl Offences {
    /// Records an offence of `net` at `now` (Unix seconds); returns how long to box it and
    /// which offence this is (1: first).
    pub fn record(&mut self, net: IpNet, now: u64, p: &Penalty) -> (Duration, u32) {
        let forget = p.forget_after.0.as_secs();
        let earlier = self
            .by_prefix
            .get(&net)
            .filter(|o| now.saturating_sub(o.last_at) <= forget)
            .map_or(0, |o| o.count);
        let duration = block_duration(p, earlier);
        self.by_prefix.insert(
            net,
            Offence {
                count: earlier + 1,
                last_at: now,
            },
        );
        (duration, earlier + 1)
    }

    /// Drops offences older than `forget_after`.
    pub fn forget(&mut self, now: u64, forget_after: Duration) -> usize {
        let before = self.by_prefix.len();
        self.by_prefix
            .retain(|_, o| now.saturating_sub(o.last_at) <= forget_after.as_secs());
        before - self.by_prefix.len()
    }

    pub fn len(&self) -> usize {
        self.by_prefix.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    pub fn save(&self, state: &StateDir) -> Result<()> {
        let entries: Vec<(IpNet, Offence)> = self.by_prefix.iter().map(|(n, o)| (*n, *o)).collect();
        state.write(OFFENCES_FILE, &serde_json::to_vec_pretty(&entries)?)
    }

    /// The saved offences; none if nothing was saved.
    pub fn load(state: &StateDir) -> Result<Offences> {
        let path = state.path().join(OFFENCES_FILE);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Offences::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let entries: Vec<(IpNet, Offence)> =
            serde_json::from_slice(&data).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Offences {
            by_prefix: entries.into_iter().collect(),
        })
    }
}

/// Reads penalty reports from `ring` until the task is aborted and hands them on.
pub async fn read(
    interface: String,
    ring: RingBuf<MapData>,
    reports: mpsc::Sender<(String, PenaltyEvent)>,
) {
    // SAFETY: the ring buffer owns its map fd, which stays open and the same for as long
    // as the AsyncFd owns the ring.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("{interface}: cannot poll the penalty ring buffer: {e}");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let mut batch = Vec::new();
        {
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<PenaltyEvent>() {
                    // SAFETY: the data plane writes exactly a PenaltyEvent; read_unaligned
                    // copes with the ring's 8-byte alignment of records.
                    batch.push(unsafe {
                        std::ptr::read_unaligned(item.as_ptr().cast::<PenaltyEvent>())
                    });
                }
            }
        }
        guard.clear_ready();
        for event in batch {
            if reports.send((interface.clone(), event)).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Bounded, HumanDuration};

    fn penalty(block_for: u64, escalate: u64, max_block: u64) -> Penalty {
        Penalty {
            after_violations: Bounded(50),
            window: HumanDuration(Duration::from_secs(10)),
            block_for: HumanDuration(Duration::from_secs(block_for)),
            escalate: Bounded(escalate),
            max_block: HumanDuration(Duration::from_secs(max_block)),
            forget_after: HumanDuration(Duration::from_secs(1000)),
        }
    }

    #[test]
    fn escalation_multiplies_up_to_the_cap() {
        let p = penalty(60, 2, 3600);
        let secs: Vec<u64> = (0..8).map(|r| block_duration(&p, r).as_secs()).collect();
        assert_eq!(secs, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
        // No overflow, however many repeats.
        assert_eq!(block_duration(&p, 1000).as_secs(), 3600);
        let flat = penalty(60, 1, 3600);
        assert_eq!(block_duration(&flat, 50).as_secs(), 60);
    }

    #[test]
    fn offences_escalate_and_are_forgotten() {
        let p = penalty(2, 2, 5);
        let net: IpNet = "198.18.1.0/24".parse().unwrap();
        let mut o = Offences::default();
        assert_eq!(o.record(net, 100, &p), (Duration::from_secs(2), 1));
        assert_eq!(o.record(net, 110, &p), (Duration::from_secs(4), 2));
        assert_eq!(o.record(net, 120, &p), (Duration::from_secs(5), 3));
        // Another prefix starts from the beginning.
        let other: IpNet = "198.18.2.0/24".parse().unwrap();
        assert_eq!(o.record(other, 120, &p), (Duration::from_secs(2), 1));
        // Past forget_after (1000 s) the count starts again.
        assert_eq!(o.record(net, 1200, &p), (Duration::from_secs(2), 1));
        assert_eq!(o.forget(2100, Duration::from_secs(1000)), 1);
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn reports_name_masked_prefixes() {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[198, 18, 1, 0]);
        let e = PenaltyEvent {
            addr,
            prefix_len: 24,
            ..PenaltyEvent::default()
        };
        assert_eq!(reported_prefix(&e), "198.18.1.0/24".parse().ok());
        let bad = PenaltyEvent {
            prefix_len: 33,
            ..e
        };
        assert_eq!(reported_prefix(&bad), None);
        let v6 = PenaltyEvent {
            addr: "2001:db8:1:2::".parse::<Ipv6Addr>().unwrap().octets(),
            prefix_len: 64,
            flags: PENALTY_V6,
            ..e
        };
        assert_eq!(reported_prefix(&v6), "2001:db8:1:2::/64".parse().ok());
    }

    #[test]
    fn offences_round_trip_through_the_state_dir() {
        let dir = std::env::temp_dir().join(format!("apsh-offences-{}", std::process::id()));
        let state = StateDir::open(&dir).unwrap();
        assert!(Offences::load(&state).unwrap().is_empty());
        let mut o = Offences::default();
        o.record("2001:db8::/64".parse().unwrap(), 5, &penalty(1, 2, 9));
        o.save(&state).unwrap();
        assert_eq!(Offences::load(&state).unwrap(), o);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
