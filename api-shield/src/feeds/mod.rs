//! Reputation feeds: parsing, fetching, and the state each feed keeps. The controller
//! (daemon.rs) owns the registry and the maps; this module decides what to fetch when,
//! and remembers each feed's last good version so it can always fall back to it.

pub mod fetch;
pub mod parse;

use std::{
    collections::HashSet,
    hash::BuildHasher as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    config::FeedConfig,
    lists::{StateDir, unix_now},
};

/// What `api-shield feeds` shows, and metrics export, for one feed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FeedStatus {
    pub name: String,
    pub source: String,
    /// Prefixes of the version in force.
    pub entries: usize,
    /// Unix seconds of the last fetch that succeeded (or was not modified).
    pub last_success: Option<u64>,
    pub last_error: Option<String>,
    pub last_attempt: Option<u64>,
    /// Seconds until the next scheduled fetch.
    pub next_refresh_in_secs: u64,
    pub fetch_failures: u64,
    /// Lines of the version in force that were not prefixes, and a few of them.
    pub rejected_lines: usize,
    pub rejected_examples: Vec<String>,
    pub host_bits_cleared: usize,
    /// Entries inside an allowlisted prefix: listed, never blocked.
    pub allowlisted: usize,
    /// Entries the full blocklist map refused (retried on every update).
    pub refused_map_full: usize,
}

/// What is kept on disk next to each feed's last good list.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SavedMeta {
    etag: Option<String>,
    last_modified: Option<String>,
    last_success: Option<u64>,
    rejected_lines: usize,
    rejected_examples: Vec<String>,
    host_bits_cleared: usize,
}

pub struct Feed {
    pub config: FeedConfig,
    pub status: FeedStatus,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub next_refresh: Instant,
    pub in_flight: bool,
}

impl Feed {
    pub fn new(config: FeedConfig) -> Feed {
        let source = match (&config.url, &config.path) {
            (Some(u), _) => u.0.clone(),
            (None, Some(p)) => p.display().to_string(),
            (None, None) => String::new(),
        };
        // The first fetch soon, but not at the same instant on every host of a fleet.
        let first = jitter(
            config.refresh.0.mul_f64(0.1).min(Duration::from_secs(5)),
            config.name.0.as_str(),
        );
        Feed {
            status: FeedStatus {
                name: config.name.0.clone(),
                source,
                ..FeedStatus::default()
            },
            config,
            etag: None,
            last_modified: None,
            next_refresh: Instant::now() + first,
            in_flight: false,
        }
    }

    pub fn job(&self) -> fetch::FetchJob {
        fetch::FetchJob::new(&self.config, self.etag.clone(), self.last_modified.clone())
    }

    /// Schedules the next fetch: a refresh period after a success, sooner after a failure;
    /// always with +-10% jitter so a fleet does not stampede the source.
    pub fn schedule(&mut self, succeeded: bool) {
        let period = self.config.refresh.0;
        let base = if succeeded {
            period
        } else {
            period.min(Duration::from_secs(300))
        };
        let spread = base.mul_f64(0.2);
        self.next_refresh =
            Instant::now() + base.mul_f64(0.9) + jitter(spread, &self.config.name.0);
    }

    pub fn status(&self) -> FeedStatus {
        let mut s = self.status.clone();
        s.next_refresh_in_secs = self
            .next_refresh
            .saturating_duration_since(Instant::now())
            .as_secs();
        s
    }

    fn list_file(&self) -> String {
        format!("feeds/{}.list", self.config.name.0)
    }

    fn meta_file(&self) -> String {
        format!("feeds/{}.json", self.config.name.0)
    }

    /// Saves a version that passed every check, so it survives restarts and outages.
    pub fn save_good(&self, state: &StateDir, entries: &HashSet<IpNet>) -> Result<()> {
        let mut sorted: Vec<&IpNet> = entries.iter().collect();
        sorted.sort();
        let mut text = String::with_capacity(entries.len() * 18);
        for net in sorted {
            text.push_str(&net.to_string());
            text.push('\n');
        }
        state.write(&self.list_file(), text.as_bytes())?;
        let meta = SavedMeta {
            etag: self.etag.clone(),
            last_modified: self.last_modified.clone(),
            last_success: self.status.last_success,
            rejected_lines: self.status.rejected_lines,
            rejected_examples: self.status.rejected_examples.clone(),
            host_bits_cleared: self.status.host_bits_cleared,
        };
        state.write(&self.meta_file(), &serde_json::to_vec_pretty(&meta)?)
    }

    /// The last good version saved by an earlier run, if any.
    pub fn load_good(&mut self, state: &StateDir) -> Result<Option<HashSet<IpNet>>> {
        let path = state.path().join(self.list_file());
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut entries = HashSet::new();
        for (i, line) in text.lines().enumerate() {
            let net: IpNet = line.parse().with_context(|| {
                format!("{} line {}: `{line}` is not a CIDR", path.display(), i + 1)
            })?;
            entries.insert(net);
        }
        if let Ok(meta) = std::fs::read(state.path().join(self.meta_file()))
            && let Ok(meta) = serde_json::from_slice::<SavedMeta>(&meta)
        {
            self.etag = meta.etag;
            self.last_modified = meta.last_modified;
            self.status.last_success = meta.last_success;
            self.status.rejected_lines = meta.rejected_lines;
            self.status.rejected_examples = meta.rejected_examples;
            self.status.host_bits_cleared = meta.host_bits_cleared;
        }
        self.status.entries = entries.len();
        Ok(Some(entries))
    }

    /// Records a failed fetch: the version in force stays.
    pub fn failed(&mut self, error: String) {
        self.status.last_attempt = Some(unix_now());
        self.status.last_error = Some(error);
        self.status.fetch_failures += 1;
        self.in_flight = false;
        self.schedule(false);
    }

    /// Records a fetch that found the version in force current (HTTP 304).
    pub fn not_modified(&mut self) {
        let now = unix_now();
        self.status.last_attempt = Some(now);
        self.status.last_success = Some(now);
        self.status.last_error = None;
        self.in_flight = false;
        self.schedule(true);
    }

    /// Records a good version about to be put in force.
    pub fn succeeded(&mut self, good: &fetch::GoodVersion) {
        let now = unix_now();
        self.status.last_attempt = Some(now);
        self.status.last_success = Some(now);
        self.status.last_error = None;
        self.status.entries = good.entries.len();
        self.status.rejected_lines = good.rejected;
        self.status.rejected_examples = good.examples.clone();
        self.status.host_bits_cleared = good.host_bits_cleared;
        self.etag = good.etag.clone();
        self.last_modified = good.last_modified.clone();
        self.in_flight = false;
        self.schedule(true);
    }
}

/// A random duration in [0, max): from the process's random hasher keys, the feed name
/// and the clock, so hosts and feeds spread out.
fn jitter(max: Duration, salt: &str) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let r = std::hash::RandomState::new().hash_one((salt, std::time::SystemTime::now()));
    max.mul_f64((r >> 11) as f64 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let max = Duration::from_secs(10);
        let draws: HashSet<u128> = (0..50)
            .map(|i| jitter(max, &i.to_string()).as_nanos())
            .collect();
        assert!(draws.iter().all(|&d| d < max.as_nanos()));
        assert!(draws.len() > 40, "jitter should vary: {}", draws.len());
        assert_eq!(jitter(Duration::ZERO, "x"), Duration::ZERO);
    }

    #[test]
    fn last_good_version_round_trips() {
        let dir = std::env::temp_dir().join(format!("api-shield-feeds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = StateDir::open(&dir).unwrap();
        let config: FeedConfig = serde_yaml::from_str("name: drop\npath: /tmp/x\n").unwrap();
        let mut feed = Feed::new(config.clone());
        feed.etag = Some("\"v1\"".into());
        feed.status.last_success = Some(1234);
        let entries: HashSet<IpNet> = [
            "192.0.2.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ]
        .into();
        feed.save_good(&state, &entries).unwrap();
        let mut again = Feed::new(config);
        assert_eq!(again.load_good(&state).unwrap().unwrap(), entries);
        assert_eq!(again.etag.as_deref(), Some("\"v1\""));
        assert_eq!(again.status.last_success, Some(1234));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
