//! Every list entry and who put it there. A prefix can be listed by several origins (the
//! config, the CLI, later feeds and the penalty box); it stays listed until the last one
//! lets go. Entries from origins other than the config persist in the state directory.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt, fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    str::FromStr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::fold::{Folded, fold};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    Allow,
    Block,
}

impl ListKind {
    pub fn name(self) -> &'static str {
        match self {
            ListKind::Allow => "allowlist",
            ListKind::Block => "blocklist",
        }
    }
}

/// Who listed an entry. Shown as `config`, `cli`, `feed:NAME`, `penalty`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    Config,
    Cli,
    Feed(String),
    Penalty,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Config => f.write_str("config"),
            Origin::Cli => f.write_str("cli"),
            Origin::Feed(name) => write!(f, "feed:{name}"),
            Origin::Penalty => f.write_str("penalty"),
        }
    }
}

impl FromStr for Origin {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "config" => Ok(Origin::Config),
            "cli" => Ok(Origin::Cli),
            "penalty" => Ok(Origin::Penalty),
            _ => match s.strip_prefix("feed:") {
                Some(name) if !name.is_empty() => Ok(Origin::Feed(name.to_owned())),
                _ => Err(format!("unknown origin `{s}`")),
            },
        }
    }
}

impl Serialize for Origin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Origin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What one origin says about an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub origin: Origin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix seconds after which this claim lapses; None: until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// One listed prefix with all its claims, as `block list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    pub cidr: IpNet,
    pub claims: Vec<Claim>,
}

/// Why a removal did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoveError {
    #[error("{cidr} is not in the {list}")]
    NotListed { list: &'static str, cidr: IpNet },
    #[error(
        "{cidr} was not added by {origin}; it is listed by {others} (edit the config and reload to change config entries)"
    )]
    OtherOrigins {
        cidr: IpNet,
        origin: Origin,
        others: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    entries: BTreeMap<(ListKind, IpNet), BTreeMap<Origin, Claim>>,
    /// Feed name -> the prefixes of its version in force (they block). Kept apart from
    /// `entries`: a feed can hold a million prefixes, with no reason or expiry each.
    feeds: BTreeMap<String, HashSet<IpNet>>,
}

/// What replacing a feed's version changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedChange {
    pub added: usize,
    pub removed: usize,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How long until the wall clock's next whole second, when entries due then expire
/// (`expires_at` counts whole seconds).
pub fn until_next_whole_second() -> Duration {
    let into = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    Duration::from_secs(1) - Duration::from_nanos(into.into())
}

impl Registry {
    /// Both lists folded into the table the list maps take: the one route from what is
    /// listed to what the data plane reads.
    pub fn fold(&self) -> Folded {
        fold(
            &self.prefixes(ListKind::Allow),
            &self.prefixes(ListKind::Block),
        )
    }

    /// Replaces every config claim with these lists; other origins are untouched.
    pub fn set_config(&mut self, allow: &[IpNet], block: &[IpNet]) {
        self.entries.retain(|_, claims| {
            claims.remove(&Origin::Config);
            !claims.is_empty()
        });
        for (kind, nets) in [(ListKind::Allow, allow), (ListKind::Block, block)] {
            for net in nets {
                self.add(
                    kind,
                    net.trunc(),
                    Claim {
                        origin: Origin::Config,
                        reason: None,
                        expires_at: None,
                    },
                );
            }
        }
    }

    /// Adds (or refreshes) `claim` on `cidr`. Returns true if the prefix was not listed before.
    pub fn add(&mut self, kind: ListKind, cidr: IpNet, claim: Claim) -> bool {
        let claims = self.entries.entry((kind, cidr.trunc())).or_default();
        let new = claims.is_empty();
        claims.insert(claim.origin.clone(), claim);
        new
    }

    /// Removes `origin`'s claim; returns the origins that still list the prefix.
    pub fn remove(
        &mut self,
        kind: ListKind,
        cidr: IpNet,
        origin: &Origin,
    ) -> Result<Vec<Origin>, RemoveError> {
        let key = (kind, cidr.trunc());
        let feeds: Vec<Origin> = match kind {
            ListKind::Block => self
                .feeds
                .iter()
                .filter(|(_, s)| s.contains(&key.1))
                .map(|(n, _)| Origin::Feed(n.clone()))
                .collect(),
            ListKind::Allow => Vec::new(),
        };
        let others = |claims: Option<&BTreeMap<Origin, Claim>>| -> String {
            let mut all: Vec<String> = claims
                .into_iter()
                .flat_map(|c| c.keys().map(ToString::to_string))
                .collect();
            all.extend(feeds.iter().map(ToString::to_string));
            all.join(", ")
        };
        let Some(claims) = self.entries.get_mut(&key) else {
            if feeds.is_empty() {
                return Err(RemoveError::NotListed {
                    list: kind.name(),
                    cidr,
                });
            }
            return Err(RemoveError::OtherOrigins {
                cidr,
                origin: origin.clone(),
                others: others(None),
            });
        };
        if claims.remove(origin).is_none() {
            let others = others(Some(claims));
            return Err(RemoveError::OtherOrigins {
                cidr,
                origin: origin.clone(),
                others,
            });
        }
        let mut left: Vec<Origin> = claims.keys().cloned().collect();
        if left.is_empty() {
            self.entries.remove(&key);
        }
        left.extend(feeds);
        Ok(left)
    }

    /// Drops claims that expired at or before `now`; returns the (prefix, origin) dropped.
    /// Whether any claim has expired by `now` (a cheap look before a change).
    pub fn has_expired(&self, now: u64) -> bool {
        self.entries.values().any(|claims| {
            claims
                .values()
                .any(|c| c.expires_at.is_some_and(|t| t <= now))
        })
    }

    pub fn expire(&mut self, now: u64) -> Vec<(ListKind, IpNet, Origin)> {
        let mut gone = Vec::new();
        self.entries.retain(|(kind, cidr), claims| {
            claims.retain(|origin, claim| {
                let live = claim.expires_at.is_none_or(|t| t > now);
                if !live {
                    gone.push((*kind, *cidr, origin.clone()));
                }
                live
            });
            !claims.is_empty()
        });
        gone
    }

    /// Puts `entries` in force as feed `name`'s version (they block); returns what changed.
    pub fn set_feed(&mut self, name: &str, entries: HashSet<IpNet>) -> FeedChange {
        let old = self.feeds.remove(name).unwrap_or_default();
        let change = FeedChange {
            added: entries.difference(&old).count(),
            removed: old.difference(&entries).count(),
        };
        if !entries.is_empty() {
            self.feeds.insert(name.to_owned(), entries);
        }
        change
    }

    /// The version of feed `name` in force.
    pub fn feed(&self, name: &str) -> Option<&HashSet<IpNet>> {
        self.feeds.get(name)
    }

    /// Forgets feeds no longer configured.
    pub fn retain_feeds(&mut self, keep: impl Fn(&str) -> bool) {
        self.feeds.retain(|name, _| keep(name));
    }

    /// The prefixes of one list, whatever their origins, sorted and distinct.
    pub fn prefixes(&self, kind: ListKind) -> Vec<IpNet> {
        let mut out: BTreeSet<IpNet> = self
            .entries
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| *n)
            .collect();
        if kind == ListKind::Block {
            for set in self.feeds.values() {
                out.extend(set.iter().copied());
            }
        }
        out.into_iter().collect()
    }

    /// Whether `cidr` is listed in `kind` by any origin.
    /// Whether `origin` lists `cidr` (feeds are not asked).
    pub fn has_claim(&self, kind: ListKind, cidr: IpNet, origin: &Origin) -> bool {
        self.entries
            .get(&(kind, cidr))
            .is_some_and(|claims| claims.contains_key(origin))
    }

    pub fn contains(&self, kind: ListKind, cidr: IpNet) -> bool {
        self.entries.contains_key(&(kind, cidr))
            || (kind == ListKind::Block && self.feeds.values().any(|s| s.contains(&cidr)))
    }

    /// The entries of `kind` that hold `addr`, longest prefix first, with every claim
    /// (feeds included): one lookup per prefix length, however long the feeds are.
    pub fn covering(&self, kind: ListKind, addr: std::net::IpAddr) -> Vec<Listed> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let mut out = Vec::new();
        for len in (0..=max).rev() {
            let Ok(net) = IpNet::new(addr, len).map(|n| n.trunc()) else {
                continue;
            };
            let mut claims: Vec<Claim> = self
                .entries
                .get(&(kind, net))
                .map(|c| c.values().cloned().collect())
                .unwrap_or_default();
            if kind == ListKind::Block {
                claims.extend(self.feeds.iter().filter(|(_, set)| set.contains(&net)).map(
                    |(name, _)| Claim {
                        origin: Origin::Feed(name.clone()),
                        reason: None,
                        expires_at: None,
                    },
                ));
            }
            if !claims.is_empty() {
                out.push(Listed { cidr: net, claims });
            }
        }
        out
    }

    pub fn list(&self, kind: ListKind) -> Vec<Listed> {
        let mut out: BTreeMap<IpNet, Vec<Claim>> = self
            .entries
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, cidr), claims)| (*cidr, claims.values().cloned().collect()))
            .collect();
        if kind == ListKind::Block {
            for (name, set) in &self.feeds {
                for cidr in set {
                    out.entry(*cidr).or_default().push(Claim {
                        origin: Origin::Feed(name.clone()),
                        reason: None,
                        expires_at: None,
                    });
                }
            }
        }
        out.into_iter()
            .map(|(cidr, claims)| Listed { cidr, claims })
            .collect()
    }

    /// Counts per list and origin, e.g. for metrics: (list, origin) -> entries.
    pub fn counts(&self) -> BTreeMap<(ListKind, String), usize> {
        let mut out = BTreeMap::new();
        for ((kind, _), claims) in &self.entries {
            for origin in claims.keys() {
                *out.entry((*kind, origin.to_string())).or_insert(0) += 1;
            }
        }
        for (name, set) in &self.feeds {
            out.insert((ListKind::Block, format!("feed:{name}")), set.len());
        }
        out
    }

    /// Claims that persist across restarts: everything but the config's (which the config
    /// file restores) and feeds' (whose last good lists are kept by the feed code).
    fn persistent(&self) -> Vec<PersistedEntry> {
        let mut out = Vec::new();
        for ((list, cidr), claims) in &self.entries {
            for claim in claims.values() {
                if matches!(claim.origin, Origin::Cli | Origin::Penalty) {
                    out.push(PersistedEntry {
                        list: *list,
                        cidr: *cidr,
                        claim: claim.clone(),
                    });
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PersistedEntry {
    list: ListKind,
    cidr: IpNet,
    #[serde(flatten)]
    claim: Claim,
}

/// The state directory: CLI and penalty entries, written atomically, files 0600.
pub struct StateDir {
    dir: PathBuf,
}

const ENTRIES_FILE: &str = "entries.json";

impl StateDir {
    /// Creates the directory (0700) if needed.
    pub fn open(dir: &Path) -> Result<StateDir> {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting permissions of {}", dir.display()))?;
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes `name` atomically (temporary file, fsync, rename), mode 0600.
    pub fn write(&self, name: &str, contents: &[u8]) -> Result<()> {
        let path = self.dir.join(name);
        let parent = path.parent().unwrap_or(&self.dir).to_path_buf();
        if parent != self.dir {
            fs::create_dir_all(&parent)
                .with_context(|| format!("creating {}", parent.display()))?;
            fs::set_permissions(&parent, fs::Permissions::from_mode(0o700))?;
        }
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = parent.join(format!(".{file_name}.tmp"));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.write_all(contents)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, &path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }

    pub fn save_entries(&self, registry: &Registry) -> Result<()> {
        let json = serde_json::to_vec_pretty(&registry.persistent())?;
        self.write(ENTRIES_FILE, &json)
    }

    /// Restores persisted entries into `registry`, dropping those already expired.
    /// Returns how many were restored.
    pub fn load_entries(&self, registry: &mut Registry, now: u64) -> Result<usize> {
        let path = self.dir.join(ENTRIES_FILE);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let entries: Vec<PersistedEntry> =
            serde_json::from_slice(&data).with_context(|| format!("parsing {}", path.display()))?;
        let mut restored = 0;
        for e in entries {
            if e.claim.expires_at.is_none_or(|t| t > now) {
                registry.add(e.list, e.cidr, e.claim);
                restored += 1;
            }
        }
        Ok(restored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn cli(reason: &str, expires_at: Option<u64>) -> Claim {
        Claim {
            origin: Origin::Cli,
            reason: Some(reason.into()),
            expires_at,
        }
    }

    #[test]
    fn covering_finds_every_prefix_holding_an_address_longest_first() {
        let mut r = Registry::default();
        r.set_config(&[], &[net("10.0.0.0/8")]);
        r.add(ListKind::Block, net("10.1.2.0/24"), cli("scan", Some(99)));
        r.add(ListKind::Allow, net("10.1.2.3/32"), cli("office", None));
        r.set_feed("drop", [net("10.1.0.0/16"), net("192.0.2.0/24")].into());
        let covering = r.covering(ListKind::Block, "10.1.2.3".parse().unwrap());
        let cidrs: Vec<String> = covering.iter().map(|l| l.cidr.to_string()).collect();
        assert_eq!(cidrs, ["10.1.2.0/24", "10.1.0.0/16", "10.0.0.0/8"]);
        assert_eq!(covering[0].claims, vec![cli("scan", Some(99))]);
        assert_eq!(covering[1].claims[0].origin, Origin::Feed("drop".into()));
        assert_eq!(covering[2].claims[0].origin, Origin::Config);
        assert_eq!(
            r.covering(ListKind::Allow, "10.1.2.3".parse().unwrap())[0].cidr,
            net("10.1.2.3/32")
        );
        assert!(
            r.covering(ListKind::Block, "10.2.0.1".parse().unwrap())
                .len()
                == 1
        );
        assert!(
            r.covering(ListKind::Block, "2001:db8::1".parse().unwrap())
                .is_empty()
        );
    }

    #[test]
    fn a_prefix_stays_listed_until_its_last_origin_lets_go() {
        let mut r = Registry::default();
        r.set_config(&[], &[net("192.0.2.0/24")]);
        assert!(!r.add(ListKind::Block, net("192.0.2.0/24"), cli("abuse", None)));
        r.add(
            ListKind::Block,
            net("192.0.2.0/24"),
            Claim {
                origin: Origin::Feed("drop".into()),
                reason: None,
                expires_at: None,
            },
        );
        assert_eq!(
            r.remove(ListKind::Block, net("192.0.2.0/24"), &Origin::Cli)
                .unwrap(),
            vec![Origin::Config, Origin::Feed("drop".into())]
        );
        r.set_config(&[], &[]);
        assert_eq!(
            r.prefixes(ListKind::Block),
            vec![net("192.0.2.0/24")],
            "the feed still lists it"
        );
        assert_eq!(
            r.remove(
                ListKind::Block,
                net("192.0.2.0/24"),
                &Origin::Feed("drop".into())
            )
            .unwrap(),
            vec![]
        );
        assert!(r.prefixes(ListKind::Block).is_empty());
    }

    #[test]
    fn removing_what_another_origin_listed_is_refused() {
        let mut r = Registry::default();
        r.set_config(&[], &[net("192.0.2.0/24")]);
        let e = r
            .remove(ListKind::Block, net("192.0.2.0/24"), &Origin::Cli)
            .unwrap_err();
        assert!(e.to_string().contains("listed by config"), "{e}");
        let e = r
            .remove(ListKind::Block, net("198.51.100.0/24"), &Origin::Cli)
            .unwrap_err();
        assert_eq!(e.to_string(), "198.51.100.0/24 is not in the blocklist");
        assert_eq!(r.prefixes(ListKind::Block), vec![net("192.0.2.0/24")]);
    }

    #[test]
    fn config_reload_leaves_other_origins_alone() {
        let mut r = Registry::default();
        r.set_config(&[net("10.0.0.0/8")], &[net("192.0.2.0/24")]);
        r.add(ListKind::Block, net("203.0.113.7/32"), cli("x", None));
        r.set_config(&[], &[net("198.51.100.0/24")]);
        assert_eq!(
            r.prefixes(ListKind::Block),
            vec![net("198.51.100.0/24"), net("203.0.113.7/32")]
        );
        assert!(r.prefixes(ListKind::Allow).is_empty());
    }

    #[test]
    fn the_next_whole_second_is_under_a_second_away() {
        let before = unix_now();
        let wait = until_next_whole_second();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Sleeping it out lands in the next second, where entries due then expire.
        std::thread::sleep(wait);
        assert!(
            unix_now() > before,
            "still in second {before} after {wait:?}"
        );
    }

    #[test]
    fn claims_expire_at_their_time() {
        let mut r = Registry::default();
        r.add(
            ListKind::Block,
            net("192.0.2.1/32"),
            cli("short", Some(100)),
        );
        r.add(ListKind::Block, net("192.0.2.2/32"), cli("long", Some(200)));
        r.set_config(&[], &[net("192.0.2.1/32")]);
        assert!(r.expire(99).is_empty());
        assert_eq!(
            r.expire(100),
            vec![(ListKind::Block, net("192.0.2.1/32"), Origin::Cli)]
        );
        assert_eq!(
            r.prefixes(ListKind::Block).len(),
            2,
            "the config claim keeps 192.0.2.1"
        );
        r.expire(200);
        assert_eq!(r.prefixes(ListKind::Block), vec![net("192.0.2.1/32")]);
    }

    #[test]
    fn state_round_trips_with_0600_files_and_skips_expired() {
        let dir = std::env::temp_dir().join(format!("api-shield-registry-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let state = StateDir::open(&dir).unwrap();
        let mut r = Registry::default();
        r.set_config(&[], &[net("198.51.100.0/24")]);
        r.add(ListKind::Block, net("192.0.2.1/32"), cli("a", Some(1000)));
        r.add(ListKind::Block, net("192.0.2.2/32"), cli("b", Some(10)));
        r.add(ListKind::Allow, net("2001:db8::/32"), cli("c", None));
        state.save_entries(&r).unwrap();
        let mode = fs::metadata(dir.join(ENTRIES_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let mut back = Registry::default();
        assert_eq!(state.load_entries(&mut back, 500).unwrap(), 2);
        assert_eq!(
            back.prefixes(ListKind::Block),
            vec![net("192.0.2.1/32")],
            "config entries are not persisted; expired ones are not restored"
        );
        assert_eq!(
            back.list(ListKind::Allow)[0].claims[0].reason.as_deref(),
            Some("c")
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn feeds_overlap_with_each_other_the_config_and_the_cli() {
        let mut r = Registry::default();
        r.set_config(&[], &[net("192.0.2.0/24")]);
        r.add(ListKind::Block, net("198.51.100.0/24"), cli("x", None));
        let a: HashSet<IpNet> = [
            net("192.0.2.0/24"),
            net("198.51.100.0/24"),
            net("203.0.113.0/24"),
        ]
        .into();
        let b: HashSet<IpNet> = [net("203.0.113.0/24")].into();
        assert_eq!(
            r.set_feed("a", a.clone()),
            FeedChange {
                added: 3,
                removed: 0
            }
        );
        r.set_feed("b", b);
        let listed = r.list(ListKind::Block);
        let origins = |cidr: &str| -> Vec<String> {
            listed
                .iter()
                .find(|l| l.cidr == net(cidr))
                .unwrap()
                .claims
                .iter()
                .map(|c| c.origin.to_string())
                .collect()
        };
        assert_eq!(origins("192.0.2.0/24"), ["config", "feed:a"]);
        assert_eq!(origins("198.51.100.0/24"), ["cli", "feed:a"]);
        assert_eq!(origins("203.0.113.0/24"), ["feed:a", "feed:b"]);
        // The CLI lets go: the feed still lists it.
        assert_eq!(
            r.remove(ListKind::Block, net("198.51.100.0/24"), &Origin::Cli)
                .unwrap(),
            vec![Origin::Feed("a".into())]
        );
        assert!(r.contains(ListKind::Block, net("198.51.100.0/24")));
        // Feed a drops everything: 203.0.113.0/24 stays for feed b, 192.0.2.0/24 for the config.
        assert_eq!(
            r.set_feed("a", HashSet::new()),
            FeedChange {
                added: 0,
                removed: 3
            }
        );
        assert_eq!(
            r.prefixes(ListKind::Block),
            vec![net("192.0.2.0/24"), net("203.0.113.0/24")]
        );
        let e = r
            .remove(ListKind::Block, net("203.0.113.0/24"), &Origin::Cli)
            .unwrap_err();
        assert!(e.to_string().contains("feed:b"), "{e}");
        assert_eq!(r.counts()[&(ListKind::Block, "feed:b".to_owned())], 1);
    }

    #[test]
    fn origins_print_and_parse() {
        for o in ["config", "cli", "penalty", "feed:spamhaus-drop"] {
            assert_eq!(o.parse::<Origin>().unwrap().to_string(), o);
        }
        assert!("feed:".parse::<Origin>().is_err());
        assert!("bogus".parse::<Origin>().is_err());
    }
}
