//! `cargo xtask stress`: the tests whose outcome a slow or busy machine could change
//! (rates, TTLs, windows, refills, kills timed into a sync) run round after round beside
//! a CPU hog on every CPU; then, optionally, the whole host suite so. A test that passes
//! only on an idle machine fails here.

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Instant,
};

use anyhow::{Result, bail};

use crate::tasks::{self, Tally};

/// The timing-sensitive tests, by test binary of api-shield-tests: each bounds what it
/// asserts by time it measured, polls a condition, or counts events in a window.
pub(crate) const TIMING_SENSITIVE: &[(&str, &[&str])] = &[
    (
        "verdicts",
        &[
            "exactly_the_burst_passes_back_to_back_then_drops",
            "buckets_refill_after_a_pause",
            "byte_limit_with_large_frames",
            "both_cpus_on_one_source_do_not_lose_updates",
            "a_new_limit_applies_to_existing_sources_without_resetting_their_buckets",
            "a_flooders_bucket_survives_a_spoofed_flood_through_a_small_table",
            "limiter_buckets_continue_across_a_reload_over_pins",
        ],
    ),
    (
        "admin",
        &[
            "ttl_entries_expire_on_time_and_leave_the_list",
            "stats_and_status_report_counters_rates_and_maps",
            "sigkill_keeps_enforcing_and_a_restart_continues_state_and_counters",
        ],
    ),
    (
        "netns",
        &[
            "allowed_blocked_and_flooding_sources_through_a_veth",
            "one_source_at_five_times_its_limit_gets_burst_plus_rate_times_time",
            "mode_tc_enforces_the_same_verdicts_and_restarts_without_a_gap",
        ],
    ),
    (
        "policy",
        &[
            "the_penalty_box_blocks_expires_escalates_survives_restarts_and_spares_the_allowlist",
            "a_dry_run_rule_shows_in_metrics_and_events_and_drops_nothing",
            "a_rotating_source_flood_inside_one_slash_24_is_held_to_the_slash_24_rate",
        ],
    ),
    (
        "rules",
        &[
            "each_rule_shape_takes_its_own_bucket",
            "a_prefix_key_puts_a_whole_prefix_in_one_bucket",
            "a_dry_run_rule_counts_would_drops_and_drops_nothing",
            "penalty_reports_come_once_per_window_past_the_violations",
            "a_released_prefix_reports_again_within_the_window_that_boxed_it",
        ],
    ),
    (
        "top",
        &["top_lists_the_flooding_source_first_and_watch_shows_live_rates"],
    ),
    (
        "events",
        &[
            "a_flood_from_a_thousand_sources_yields_events_at_the_configured_rate",
            "events_can_be_json_or_off",
        ],
    ),
    (
        "capacity",
        &[
            "two_million_sources_against_a_million_buckets_evict_but_never_drop_the_compliant",
            "evictions_reach_the_metrics",
        ],
    ),
    (
        "attack",
        &["the_legitimate_client_keeps_its_service_under_attack_with_the_shield"],
    ),
    (
        "reload",
        &["fifty_reloads_that_keep_a_source_blocked_let_none_of_its_packets_through"],
    ),
    (
        "metrics",
        &["counters_during_a_flood_match_the_traffic_and_pass_promtool"],
    ),
    (
        "trace",
        &[
            "a_trace_shows_each_packet_of_its_sources_with_what_the_program_did",
            "a_trace_is_rate_bounded_and_counts_what_it_did_not_show",
        ],
    ),
    (
        "explain",
        &["explain_gives_the_verdict_the_program_then_gives_a_real_packet"],
    ),
    (
        "faults",
        &[
            "sigkill_during_feed_syncs_loses_nothing_and_leaves_nothing_stale",
            "sigkill_during_reloads_loses_nothing_and_leaves_nothing_stale",
        ],
    ),
];

/// One busy thread per CPU until dropped: plain arithmetic at the tests' own priority.
struct Hog {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Hog {
    fn start() -> Hog {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..cpus)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = i as u64 + 1;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..100_000 {
                            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005) + 1);
                        }
                    }
                })
            })
            .collect();
        println!("stress: a CPU hog on each of {cpus} CPUs");
        Hog { stop, threads }
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub(crate) fn stress(rounds: u32, suite_rounds: u32) -> Result<()> {
    tasks::require_root("stress")?;
    tasks::setup_if_needed()?;
    tasks::mount_bpffs()?;
    tasks::build_binaries()?;
    let names: Vec<&str> = TIMING_SENSITIVE.iter().map(|(b, _)| *b).collect();
    let binaries = tasks::test_binaries(&names)?;
    let root = tasks::workspace_root();
    let count: usize = TIMING_SENSITIVE.iter().map(|(_, t)| t.len()).sum();
    let hog = Hog::start();
    let started = Instant::now();
    for round in 1..=rounds {
        let round_started = Instant::now();
        for ((binary, tests), (_, exe)) in TIMING_SENSITIVE.iter().zip(&binaries) {
            let out = Command::new(exe)
                .current_dir(root.join("tests"))
                .args(["--exact", "--test-threads=1"])
                .args(*tests)
                .env("API_SHIELD_BIN", root.join("target/debug/api-shield"))
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let passed = text
                .lines()
                .filter(|l| l.starts_with("test ") && l.ends_with(" ok"))
                .count();
            if !out.status.success() || passed != tests.len() {
                println!("{text}{}", String::from_utf8_lossy(&out.stderr));
                bail!(
                    "round {round} of {rounds}: {binary} failed beside the CPU hog ({passed} of {} passed)",
                    tests.len()
                );
            }
        }
        println!(
            "stress: round {round} of {rounds}: the {count} timing-sensitive tests passed ({:.0?})",
            round_started.elapsed()
        );
    }
    if rounds > 0 {
        println!(
            "stress: {rounds} rounds of {count} timing-sensitive tests, all green beside the CPU hog, in {:.0?}",
            started.elapsed()
        );
    }
    for round in 1..=suite_rounds {
        let mut tally = Tally::default();
        tasks::host_tests(false, &mut tally)?;
        println!(
            "stress: whole suite, round {round} of {suite_rounds}: {} passed, {} failed beside the CPU hog",
            tally.passed, tally.failed
        );
        if tally.failed > 0 {
            bail!("the whole suite failed beside the CPU hog in round {round}");
        }
    }
    drop(hog);
    Ok(())
}
