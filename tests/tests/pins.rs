//! A restart over pinned maps reuses a map only if it has the shape this version and
//! config need: type, key size, value size, max entries and flags. A map pinned with any
//! other is refused with a typed error that lists every difference; one test per property,
//! and one where the shape is right and the map (with what it holds) is reused.

use api_shield::{
    config::Config,
    shield::{Difference, PinnedMapMismatch, Shield},
};
use api_shield_common::maps::{BPF_F_NO_PREALLOC, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH};
use api_shield_tests::{
    pins::{PinDir, RawShape, pin_map, update},
    require_root,
};

/// The config's list capacity: 1,000 + 24 entries per family.
const CAPACITY: &str = "capacity: {blocklist: 1000, allowlist: 24}\n";
const LIST_ENTRIES: u32 = 1024;
/// BPF_MAP_TYPE_PERCPU_HASH: a hash, but not the one the exact map is.
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;

/// The exact map of IPv4 addresses as its spec and the capacity above make it.
const EXACT: RawShape = RawShape {
    map_type: BPF_MAP_TYPE_HASH,
    key_size: 4,
    value_size: 4,
    max_entries: LIST_ENTRIES,
    flags: BPF_F_NO_PREALLOC,
};

fn config() -> Config {
    Config::parse(&format!("interfaces: [{{name: unused0}}]\n{CAPACITY}")).unwrap()
}

/// Pins `shape` where the exact map goes, then loads over the pins: the refusal, if any.
fn load_over(name: &str, shape: RawShape) -> Result<Shield, anyhow::Error> {
    let pins = PinDir::new(name);
    std::fs::create_dir_all(&pins.0).unwrap();
    pin_map(&pins.0.join("LIST_V4_EXACT"), shape).expect("pinning the map");
    let loaded = Shield::load_pinned(&config().capacity, &pins.0);
    drop(pins);
    loaded
}

fn refused(name: &str, shape: RawShape) -> PinnedMapMismatch {
    match load_over(name, shape) {
        Ok(_) => panic!("a map pinned as {shape:?} was reused"),
        Err(e) => e
            .downcast::<PinnedMapMismatch>()
            .unwrap_or_else(|e| panic!("not a PinnedMapMismatch: {e:#}")),
    }
}

#[test]
fn a_pinned_map_of_another_type_is_refused() {
    require_root();
    let e = refused(
        "type",
        RawShape {
            map_type: BPF_MAP_TYPE_PERCPU_HASH,
            ..EXACT
        },
    );
    assert_eq!(
        e.differences,
        [Difference::MapType {
            pinned: BPF_MAP_TYPE_PERCPU_HASH,
            wanted: BPF_MAP_TYPE_HASH
        }]
    );
    assert!(e.path.ends_with("/LIST_V4_EXACT"), "{e}");
    assert!(e.to_string().contains("api-shield detach"), "{e}");
}

#[test]
fn a_pinned_map_of_another_key_size_is_refused() {
    require_root();
    let e = refused(
        "key",
        RawShape {
            key_size: 8,
            ..EXACT
        },
    );
    assert_eq!(
        e.differences,
        [Difference::KeySize {
            pinned: 8,
            wanted: 4
        }]
    );
}

#[test]
fn a_pinned_map_of_another_value_size_is_refused() {
    require_root();
    let e = refused(
        "value",
        RawShape {
            value_size: 8,
            ..EXACT
        },
    );
    assert_eq!(
        e.differences,
        [Difference::ValueSize {
            pinned: 8,
            wanted: 4
        }]
    );
}

#[test]
fn a_pinned_map_of_another_capacity_is_refused() {
    require_root();
    let e = refused(
        "entries",
        RawShape {
            max_entries: LIST_ENTRIES * 2,
            ..EXACT
        },
    );
    assert_eq!(
        e.differences,
        [Difference::MaxEntries {
            pinned: LIST_ENTRIES * 2,
            wanted: LIST_ENTRIES
        }]
    );
}

#[test]
fn a_pinned_map_with_other_flags_is_refused() {
    require_root();
    let e = refused("flags", RawShape { flags: 0, ..EXACT });
    assert_eq!(
        e.differences,
        [Difference::Flags {
            pinned: 0,
            wanted: BPF_F_NO_PREALLOC
        }]
    );
    assert!(e.to_string().contains("flags 0x0, needs 0x1"), "{e}");
}

#[test]
fn every_difference_is_listed_at_once() {
    require_root();
    let e = refused(
        "all",
        RawShape {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 8,
            max_entries: 7,
            flags: 0,
        },
    );
    assert_eq!(
        e.differences,
        [
            Difference::MapType {
                pinned: BPF_MAP_TYPE_ARRAY,
                wanted: BPF_MAP_TYPE_HASH
            },
            Difference::ValueSize {
                pinned: 8,
                wanted: 4
            },
            Difference::MaxEntries {
                pinned: 7,
                wanted: LIST_ENTRIES
            },
            Difference::Flags {
                pinned: 0,
                wanted: BPF_F_NO_PREALLOC
            },
        ]
    );
    let text = e.to_string();
    for part in ["type 2, needs 1", "value size 8, needs 4", "max entries 7"] {
        assert!(text.contains(part), "{text}");
    }
}

#[test]
fn a_pinned_map_of_the_right_shape_is_reused_with_what_it_holds() {
    require_root();
    let pins = PinDir::new("reused");
    std::fs::create_dir_all(&pins.0).unwrap();
    let fd = pin_map(&pins.0.join("LIST_V4_EXACT"), EXACT).unwrap();
    // 192.0.2.1 blocked (verdict 2), as an earlier daemon would have written it.
    update(fd, &[192, 0, 2, 1], &2u32.to_ne_bytes()).unwrap();
    let shield = Shield::load_pinned(&config().capacity, &pins.0).expect("loading over pins");
    assert_eq!(
        shield.lists().entries.get(&"192.0.2.1/32".parse().unwrap()),
        Some(&2),
        "the entry the reused map held"
    );
    drop(shield);
    let _ = api_shield::shield::detach_pinned(&pins.0);
}
