//! The data plane's maps. Each is declared from its entry in `api_shield_common::maps`, and
//! a compile-time check holds the static's name, type, key and value to that entry.

use core::mem::size_of;

use api_shield_common::{
    counters::Counter,
    limiter::{LimiterSet, RateLimit},
    lists::{HashedV6Key, InnerV4, InnerV6, ListVerdict},
    maps::{self, MapSpec},
    rules::RuleCounter,
    settings::Settings,
    trace::TraceFilter,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, ProgramArray, RingBuf, lpm_trie::Key},
};

/// The kernel's view of a map static's type: what its Rust type makes of it.
trait Shape {
    const MAP_TYPE: u32;
    const KEY_SIZE: u32;
    const VALUE_SIZE: u32;
}

impl<K, V> Shape for LpmTrie<K, V> {
    const MAP_TYPE: u32 = maps::BPF_MAP_TYPE_LPM_TRIE;
    const KEY_SIZE: u32 = size_of::<Key<K>>() as u32;
    const VALUE_SIZE: u32 = size_of::<V>() as u32;
}

impl<K, V> Shape for HashMap<K, V> {
    const MAP_TYPE: u32 = maps::BPF_MAP_TYPE_HASH;
    const KEY_SIZE: u32 = size_of::<K>() as u32;
    const VALUE_SIZE: u32 = size_of::<V>() as u32;
}

impl<T> Shape for Array<T> {
    const MAP_TYPE: u32 = maps::BPF_MAP_TYPE_ARRAY;
    const KEY_SIZE: u32 = 4;
    const VALUE_SIZE: u32 = size_of::<T>() as u32;
}

impl<T> Shape for PerCpuArray<T> {
    const MAP_TYPE: u32 = maps::BPF_MAP_TYPE_PERCPU_ARRAY;
    const KEY_SIZE: u32 = 4;
    const VALUE_SIZE: u32 = size_of::<T>() as u32;
}

impl Shape for RingBuf {
    const MAP_TYPE: u32 = maps::BPF_MAP_TYPE_RINGBUF;
    const KEY_SIZE: u32 = 0;
    const VALUE_SIZE: u32 = 0;
}

/// Whether a static named `name` of type `S` is the map `spec` describes.
const fn matches<S: Shape>(name: &str, spec: &MapSpec) -> bool {
    maps::same_name(name, spec.name)
        && S::MAP_TYPE == spec.map_type
        && S::KEY_SIZE == spec.key_size
        && S::VALUE_SIZE == spec.value_size
}

/// Declares the map `$name` as `api_shield_common::maps::$name` describes it (entries and
/// flags from there; the controller sets the entries that follow the config at load).
macro_rules! shared_map {
    ($name:ident: $ty:ty = $ctor:ident) => {
        #[map]
        pub(crate) static $name: $ty =
            <$ty>::$ctor(maps::$name.declared_entries(), maps::$name.flags);
        const _: () = assert!(
            matches::<$ty>(stringify!($name), &maps::$name),
            concat!(
                "the static ",
                stringify!($name),
                " differs from api_shield_common::maps::",
                stringify!($name)
            )
        );
    };
}

shared_map!(LIST_V4: LpmTrie<[u8; 4], ListVerdict> = with_max_entries);
shared_map!(LIST_V6: LpmTrie<[u8; 16], ListVerdict> = with_max_entries);
shared_map!(LIST_V4_EXACT: HashMap<[u8; 4], ListVerdict> = with_max_entries);
shared_map!(LIST_V4_INNER: HashMap<[u8; 4], InnerV4> = with_max_entries);
shared_map!(LIST_V6_INNER: HashMap<[u8; 4], InnerV6> = with_max_entries);
shared_map!(LIST_V6_HASHED: HashMap<HashedV6Key, ListVerdict> = with_max_entries);
shared_map!(LIST_V4_SUMMARY: Array<u64> = with_max_entries);
shared_map!(LIST_V6_SUMMARY: Array<u64> = with_max_entries);
shared_map!(LIMITER: Array<LimiterSet> = with_max_entries);
shared_map!(LIMITS: Array<RateLimit> = with_max_entries);
shared_map!(COUNTERS: PerCpuArray<Counter> = with_max_entries);
shared_map!(SETTINGS: Array<Settings> = with_max_entries);
shared_map!(EVENTS: RingBuf = with_byte_size);
shared_map!(EVENT_LIMIT: Array<u64> = with_max_entries);
shared_map!(EVENTS_SUPPRESSED: PerCpuArray<u64> = with_max_entries);
shared_map!(RULE_TABLE: Array<u32> = with_max_entries);
shared_map!(RULE_COUNTERS: PerCpuArray<RuleCounter> = with_max_entries);
shared_map!(PENALTIES: RingBuf = with_byte_size);
shared_map!(TRACE: Array<TraceFilter> = with_max_entries);

/// The trace programs the hooks hand frames to while a trace runs (`api_shield_trace`,
/// `api_shield_tc_trace`): one array per program type, as a tail call needs. Not pinned:
/// each load's hooks call its own.
#[map]
pub(crate) static TRACE_XDP: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
pub(crate) static TRACE_TC: ProgramArray = ProgramArray::with_max_entries(1, 0);
