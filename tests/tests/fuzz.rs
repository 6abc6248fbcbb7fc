//! Packet fuzzing: random and mutated frames (seeded, reproducible) through the loaded
//! program with BPF_PROG_TEST_RUN, each checked against the independent oracle
//! (`api_shield_tests::oracle`): every frame's action, and every reason and rule counter
//! per batch. One config with edges and overlapping rules, one whose lists take every
//! lookup path, and a global dry run. No XDP_ABORTED, ever.
//!
//! `API_SHIELD_FUZZ_SEED` replays a run; `API_SHIELD_SOAK=1` runs ten times as many frames,
//! `API_SHIELD_FUZZ_FRAMES=N` runs N.

use std::time::Instant;

use api_shield_tests::{
    fuzzing::{edges_policy, edges_source, fuzz, load, lookups_policy, lookups_source},
    oracle::Oracle,
    require_root,
};

fn frames_to_fuzz() -> usize {
    // Fewer where the kernel runs emulated (`cargo xtask test` sets it in its VMs).
    if let Some(n) = std::env::var("API_SHIELD_FUZZ_FRAMES")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        return n;
    }
    if std::env::var_os("API_SHIELD_SOAK").is_some() {
        10_000_000
    } else {
        1_000_000
    }
}

fn seed() -> u64 {
    std::env::var("API_SHIELD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x05ee_da91_5e1d)
}

#[test]
fn a_million_fuzzed_frames_agree_with_the_oracle() {
    require_root();
    let (seed, count) = (seed(), frames_to_fuzz());
    let policy = edges_policy();
    let mut shield = load(&policy);
    let mut oracle = Oracle::new(policy);
    let started = Instant::now();
    let report = fuzz(&mut shield, &mut oracle, &edges_source, seed, count)
        .unwrap_or_else(|d| panic!("{d}"));
    api_shield_tests::figure(&format!(
        "packet fuzzing: {} frames through the program in {:.1?} (seed {seed}), 0 disagreements with the oracle; {:?}",
        report.ran,
        started.elapsed(),
        report.tally
    ));
    assert!(
        report.ran >= count * 99 / 100,
        "only {} of {count} ran",
        report.ran
    );
}

#[test]
fn fuzzed_frames_through_every_lookup_path_agree_with_the_oracle() {
    require_root();
    let (seed, count) = (seed() ^ 0x100c, frames_to_fuzz() / 2);
    let (policy, entries) = lookups_policy(seed);
    let (v4, v6) = entries.iter().fold((0, 0), |(a, b), n| {
        if n.addr().is_ipv4() {
            (a + 1, b)
        } else {
            (a, b + 1)
        }
    });
    let mut shield = load(&policy);
    let mut oracle = Oracle::new(policy);
    let started = Instant::now();
    let report = fuzz(
        &mut shield,
        &mut oracle,
        &lookups_source(&entries),
        seed,
        count,
    )
    .unwrap_or_else(|d| panic!("{d}"));
    api_shield_tests::figure(&format!(
        "packet fuzzing (every lookup path: {v4} IPv4 and {v6} IPv6 list entries): {} frames in {:.1?} (seed {seed}), 0 disagreements; {:?}",
        report.ran,
        started.elapsed(),
        report.tally
    ));
    assert!(
        v6 > 1024,
        "the IPv6 hash probes need over 1,024 IPv6 entries: {v6}"
    );
}

#[test]
fn fuzzed_frames_under_a_global_dry_run_are_all_passed_and_counted() {
    require_root();
    let (seed, count) = (seed() ^ 0xd7, frames_to_fuzz() / 10);
    let mut policy = edges_policy();
    policy.dry_run = true;
    let mut shield = load(&policy);
    let mut oracle = Oracle::new(policy);
    let report = fuzz(&mut shield, &mut oracle, &edges_source, seed, count)
        .unwrap_or_else(|d| panic!("{d}"));
    api_shield_tests::figure(&format!(
        "packet fuzzing (global dry run): {} frames (seed {seed}), all passed, every would-drop counted",
        report.ran
    ));
}

#[test]
fn fuzzed_frames_while_a_trace_follows_every_source_agree_with_the_oracle() {
    require_root();
    let (seed, count) = (seed() ^ 0x7ace, frames_to_fuzz() / 10);
    let policy = edges_policy();
    let mut shield = load(&policy);
    // Every source traced (and two narrower prefixes beside): the trace path runs for
    // every frame with a source, and must change no verdict.
    let nets = [
        Some("0.0.0.0/0".parse().unwrap()),
        Some("::/0".parse().unwrap()),
        Some("198.18.0.0/15".parse().unwrap()),
        Some("2001:db8::/32".parse().unwrap()),
    ];
    let until = (api_shield::explain::bucket_now() >> api_shield_common::limiter::TIME_SHIFT)
        + 3_600_000_000_000;
    shield
        .set_trace(&api_shield::trace::filter(&nets, until))
        .unwrap();
    let mut oracle = Oracle::new(policy);
    let report = fuzz(&mut shield, &mut oracle, &edges_source, seed, count)
        .unwrap_or_else(|d| panic!("{d}"));
    let missed = shield.trace_filter().unwrap().missed;
    api_shield_tests::figure(&format!(
        "packet fuzzing (every source traced): {} frames (seed {seed}), 0 disagreements; {missed} trace records over the trace rate",
        report.ran
    ));
    // 200 records a second at most: the rest of the sourced frames were counted.
    assert!(
        missed as usize > report.ran / 4,
        "the trace path ran for too few frames: {missed} of {}",
        report.ran
    );
}
