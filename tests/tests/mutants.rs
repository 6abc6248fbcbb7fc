//! Mutation tests: the fuzzer and its oracle must catch a shield that is wrong. Each test
//! plants one bug and runs the fuzzer as the fuzz tests do; the run must end in a
//! disagreement. Two bugs are in the data plane itself (builds of it with a mutant
//! feature, made by `cargo xtask test`); three are in what the controller would write
//! (the list maps, the rule table, the limits), planted through the controller's own API.

use std::path::PathBuf;

use api_shield::{
    config::Config,
    lists::{ListTable, Registry},
    shield::Shield,
};
use api_shield_common::lists::LIST_BLOCK;
use api_shield_tests::{
    fuzzing::{
        Disagreement, edges_policy, edges_source, fuzz, load, lookups_policy, lookups_source,
    },
    oracle::{Oracle, Policy},
    require_root,
};

/// As many frames as the fuzz tests run: a mutant must be caught within a normal run.
fn frames() -> usize {
    std::env::var("API_SHIELD_FUZZ_FRAMES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000)
}

const SEED: u64 = 0x003a_7a17;

/// The data-plane object built with `mutant`'s bug.
fn mutant_object(mutant: &str) -> Vec<u8> {
    let dir = std::env::var_os("API_SHIELD_MUTANTS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/mutants"),
        PathBuf::from,
    );
    let path = dir
        .join(mutant)
        .join("bpfel-unknown-none/release/api-shield");
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "no mutant object at {} ({e}): `cargo xtask test` builds the mutants",
            path.display()
        )
    })
}

fn loaded_mutant(policy: &Policy, mutant: &str) -> Shield {
    let config = Config::parse(&policy.yaml()).unwrap();
    // An ELF reader wants its bytes aligned: copied into u64s.
    let bytes = mutant_object(mutant);
    let mut aligned = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: `aligned` holds at least bytes.len() bytes.
    let view =
        unsafe { std::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast::<u8>(), bytes.len()) };
    view.copy_from_slice(&bytes);
    Shield::from_config_object(&config, view).expect("loading the mutant")
}

/// Fuzzes `shield` against the oracle of `policy`; the disagreement it must find.
fn caught(
    mut shield: Shield,
    policy: Policy,
    source: &dyn Fn(&mut api_shield_tests::rng::Rng, bool) -> std::net::IpAddr,
) -> Disagreement {
    let mut oracle = Oracle::new(policy);
    match fuzz(&mut shield, &mut oracle, source, SEED, frames()) {
        Ok(report) => panic!(
            "the mutant survived {} frames: the fuzzer would not catch this bug",
            report.ran
        ),
        Err(d) => {
            println!("caught: {d}");
            d
        }
    }
}

#[test]
fn a_prefix_length_off_by_one_in_the_data_plane_is_caught() {
    require_root();
    let (policy, entries) = lookups_policy(SEED);
    let shield = loaded_mutant(&policy, "mutant-prefix-off-by-one");
    caught(shield, policy, &lookups_source(&entries));
}

#[test]
fn a_wrong_extension_header_length_in_the_data_plane_is_caught() {
    require_root();
    let policy = edges_policy();
    let shield = loaded_mutant(&policy, "mutant-ext-len");
    caught(shield, policy, &edges_source);
}

#[test]
fn the_blocklist_winning_over_the_allowlist_is_caught() {
    require_root();
    let policy = edges_policy();
    let mut shield = load(&policy);
    // What a fold that let the blocklist win would write: the blocked prefixes inside
    // allowed ones, blocked.
    let mut registry = Registry::default();
    registry.set_config(&policy.allow, &policy.block);
    let folded = registry.fold();
    assert!(!folded.shadowed.is_empty(), "the policy has overlaps");
    let mut table = ListTable {
        entries: folded.table.entries.clone(),
    };
    for net in &folded.shadowed {
        table.entries.insert(*net, LIST_BLOCK);
    }
    shield.apply_lists(&table).unwrap();
    caught(shield, policy, &edges_source);
}

#[test]
fn rules_applied_in_the_wrong_order_are_caught() {
    require_root();
    let policy = edges_policy();
    let mut reversed = policy.clone();
    reversed.rules.reverse();
    caught(load(&reversed), policy, &edges_source);
}

#[test]
fn token_buckets_without_their_burst_are_caught() {
    require_root();
    let policy = edges_policy();
    let mut no_burst = policy.clone();
    no_burst.default_limit.1 = 1;
    for rule in &mut no_burst.rules {
        if let Some((pps, _)) = rule.limit {
            rule.limit = Some((pps, 1));
        }
    }
    caught(load(&no_burst), policy, &edges_source);
}
