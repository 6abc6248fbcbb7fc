//! The maps as this config sizes them, and the check that keeps a pinned map of another
//! shape (an upgrade, a capacity change) from being reused and misread.

use std::{fmt, path::Path};

use anyhow::{Context as _, Result};
use api_shield_common::{
    limiter::LIMITER_WAYS,
    maps::{self, Entries, MapSpec},
};
use aya::maps::MapInfo;

use crate::config::Capacity;

/// A map's shape under this config: its [`MapSpec`] with the entries counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    pub spec: MapSpec,
    pub max_entries: u32,
}

impl MapShape {
    pub fn name(&self) -> &'static str {
        self.spec.name
    }
}

/// Sets of the limiter table for `sources` buckets (rounded up to whole sets).
pub(crate) fn limiter_sets(sources: u32) -> u32 {
    sources.div_ceil(LIMITER_WAYS as u32).max(1)
}

/// Every map, with the entries `capacity` gives it.
pub fn map_shapes(capacity: &Capacity) -> Result<Vec<MapShape>> {
    let list_entries = u32::try_from(capacity.blocklist.0 + capacity.allowlist.0)
        .context("capacity.blocklist + capacity.allowlist exceeds 2^32")?;
    let sources = u32::try_from(capacity.sources.0).context("capacity.sources exceeds 2^32")?;
    Ok(maps::ALL
        .iter()
        .map(|&spec| MapShape {
            spec,
            max_entries: match spec.entries {
                Entries::Fixed(n) => n,
                Entries::ListCapacity => list_entries,
                Entries::LimiterSets => limiter_sets(sources),
            },
        })
        .collect())
}

/// One property in which a pinned map differs from what this version and config need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Difference {
    MapType { pinned: u32, wanted: u32 },
    KeySize { pinned: u32, wanted: u32 },
    ValueSize { pinned: u32, wanted: u32 },
    MaxEntries { pinned: u32, wanted: u32 },
    Flags { pinned: u32, wanted: u32 },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, pinned, wanted) = match *self {
            Difference::MapType { pinned, wanted } => ("type", pinned, wanted),
            Difference::KeySize { pinned, wanted } => ("key size", pinned, wanted),
            Difference::ValueSize { pinned, wanted } => ("value size", pinned, wanted),
            Difference::MaxEntries { pinned, wanted } => ("max entries", pinned, wanted),
            Difference::Flags { pinned, wanted } => ("flags", pinned, wanted),
        };
        if matches!(self, Difference::Flags { .. }) {
            write!(f, "{what} {pinned:#x}, needs {wanted:#x}")
        } else {
            write!(f, "{what} {pinned}, needs {wanted}")
        }
    }
}

/// A pinned map this version and config cannot reuse, with every way it differs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PinnedMapMismatch {
    pub path: String,
    pub differences: Vec<Difference>,
}

impl fmt::Display for PinnedMapMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let differences: Vec<String> = self.differences.iter().map(|d| d.to_string()).collect();
        write!(
            f,
            "pinned map {} has another shape than this version and config need ({}): a \
             capacity change or an incompatible upgrade; run `api-shield detach` to start \
             afresh (this drops dynamic state)",
            self.path,
            differences.join("; ")
        )
    }
}

/// What differs between a pinned map (`info`) and `want`: nothing if it can be reused.
fn differences(info: &MapInfo, want: &MapShape) -> Vec<Difference> {
    let map_type = info.map_type().map_or(u32::MAX, |t| t as u32);
    let checks = [
        Difference::MapType {
            pinned: map_type,
            wanted: want.spec.map_type,
        },
        Difference::KeySize {
            pinned: info.key_size(),
            wanted: want.spec.key_size,
        },
        Difference::ValueSize {
            pinned: info.value_size(),
            wanted: want.spec.value_size,
        },
        Difference::MaxEntries {
            pinned: info.max_entries(),
            wanted: want.max_entries,
        },
        Difference::Flags {
            pinned: info.map_flags(),
            wanted: want.spec.flags,
        },
    ];
    checks.into_iter().filter(Difference::is_real).collect()
}

impl Difference {
    fn is_real(&self) -> bool {
        let (Difference::MapType { pinned, wanted }
        | Difference::KeySize { pinned, wanted }
        | Difference::ValueSize { pinned, wanted }
        | Difference::MaxEntries { pinned, wanted }
        | Difference::Flags { pinned, wanted }) = *self;
        pinned != wanted
    }
}

/// Fails if the map pinned at `path` exists with another shape than `want`.
pub fn check_pinned_shape(path: &Path, want: &MapShape) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let info = MapInfo::from_pin(path)
        .with_context(|| format!("reading pinned map {}", path.display()))?;
    let differences = differences(&info, want);
    if differences.is_empty() {
        Ok(())
    } else {
        Err(PinnedMapMismatch {
            path: path.display().to_string(),
            differences,
        }
        .into())
    }
}
