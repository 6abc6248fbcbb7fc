//! Scalar values of the config, each checked while serde_yaml still points at it, so an
//! error names its key and line: bounded integers, rates, bursts, durations, names, paths.

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, de};

use crate::prefix::parse_prefix;

pub const MAX_PPS: u64 = 1_000_000_000;
/// The longest penalty block: a year.
pub const MAX_PENALTY_SECS: u64 = 365 * 24 * 3600;
pub const MAX_BPS: u64 = 1_000_000_000_000;
/// A byte bucket smaller than one full-size VLAN-tagged frame would drop every such frame.
pub const MIN_BURST_BYTES: u64 = 1522;

/// An integer that serde_yaml checks (and locates) against an inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bounded<const MIN: u64, const MAX: u64>(pub u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_u64(d, |v| {
            if (MIN..=MAX).contains(&v) {
                Ok(Bounded(v))
            } else {
                Err(format!("{v} is out of range: expected {MIN} to {MAX}"))
            }
        })
    }
}

/// A rate: 0 (no limit) or MIN..=MAX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Rate<const MIN: u64, const MAX: u64>(pub u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Rate<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_u64(d, |v| {
            if v == 0 || (MIN..=MAX).contains(&v) {
                Ok(Rate(v))
            } else {
                Err(format!(
                    "{v} is out of range: expected 0 (no limit) or {MIN} to {MAX}"
                ))
            }
        })
    }
}

/// A burst: MIN..=MAX, or 0 where its rate is 0 (a switched-off limit needs none;
/// validation refuses 0 beside a rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Burst<const MIN: u64, const MAX: u64>(pub u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Burst<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_u64(d, |v| {
            if v == 0 || (MIN..=MAX).contains(&v) {
                Ok(Burst(v))
            } else {
                Err(format!("{v} is out of range: expected {MIN} to {MAX}"))
            }
        })
    }
}

/// Deserializes an unsigned integer and checks it while serde_yaml still points at it,
/// so the error carries the value's own key and line.
pub(super) fn checked_u64<'de, D, T>(
    d: D,
    check: fn(u64) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<T>(fn(u64) -> Result<T, String>);
    impl<T> de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a non-negative integer")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            (self.0)(v).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::custom(format!(
                    "{v} is negative: expected a non-negative integer"
                ))),
            }
        }
    }
    d.deserialize_u64(V(check))
}

/// Deserializes a string and parses it while serde_yaml still points at it (see [`checked_u64`]).
pub(super) fn checked_str<'de, D, T>(
    d: D,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<T>(fn(&str) -> Result<T, String>);
    impl<T> de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.0)(v).map_err(E::custom)
        }
    }
    d.deserialize_str(V(parse))
}

/// A Linux interface name: 1 to 15 bytes, no '/', no whitespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceName(pub String);

impl<'de> Deserialize<'de> for InterfaceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, |s| {
            if s.is_empty()
                || s.len() > 15
                || s.contains(['/', ':'])
                || s.contains(char::is_whitespace)
            {
                return Err(format!(
                    "invalid interface name `{s}`: 1 to 15 characters, no '/', ':' or spaces"
                ));
            }
            Ok(InterfaceName(s.to_owned()))
        })
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A prefix written as a CIDR or a bare address; host bits are cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Prefix(pub(super) IpNet);

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, |s| {
            parse_prefix(s)
                .map(|p| Prefix(p.net))
                .map_err(|e| e.to_string())
        })
    }
}

/// A duration like `500ms`, `10s`, `5m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "0" || s == "off" {
            return Ok(HumanDuration(Duration::ZERO));
        }
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| {
                format!("invalid duration `{s}`: {e} (write it like 500ms, 10s, 5m or 1h)")
            })
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, str::parse)
    }
}

/// An absolute path (relative ones would depend on where the daemon was started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AbsolutePath(pub(super) PathBuf);

impl<'de> Deserialize<'de> for AbsolutePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, |s| {
            if s.starts_with('/') {
                Ok(AbsolutePath(PathBuf::from(s)))
            } else {
                Err(format!("`{s}` is not an absolute path"))
            }
        })
    }
}
