//! The oracles can fail: each deliberate bug is switched on in turn, and the simulation must
//! catch it within a bounded number of seeds, with the oracle that guards against it.
//!
//! The bugs live in `geomirror-core` behind the `mutations` feature and a per-thread switch,
//! so they are off in every other test of this build. Only this package, outside the
//! workspace (see its Cargo.toml), builds the core with that feature: the binaries the
//! workspace builds never contain the bugs.

use geomirror_core::mutations::{self, Mutation};
use geomirror_sim::{run_parallel, run_seed, SimReport};

// The marker the `geomirror` binary's version reads follows the feature: this build has it.
const _: () = assert!(geomirror_core::MUTATIONS_COMPILED_IN, "MUTATIONS_COMPILED_IN does not follow the mutations feature");

fn hunt(m: Mutation, seeds: u64) -> Vec<SimReport> {
    let list: Vec<u64> = (0..seeds).collect();
    run_parallel(&list, |seed| {
        mutations::set(Some(m));
        let r = run_seed(seed);
        mutations::set(None);
        r
    })
}

fn caught_by(m: Mutation, oracles: &[&str]) {
    let reports = hunt(m, 200);
    let caught: Vec<&SimReport> = reports.iter().filter(|r| !r.violations.is_empty()).collect();
    assert!(!caught.is_empty(), "{m:?} was not caught by any of 200 seeds: the oracles cannot see it");
    let first = caught[0];
    let v = &first.violations[0];
    println!("{m:?}: caught by {} of 200 seeds; first: seed {} {} ({})", caught.len(), first.seed, v.oracle, v.detail);
    let mut by: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for r in &caught {
        *by.entry(r.violations[0].oracle).or_default() += 1;
    }
    println!("{m:?}: first violations by oracle: {by:?}");
    assert!(
        caught.iter().any(|r| oracles.contains(&r.violations[0].oracle)),
        "{m:?} was caught, but never by {oracles:?}: {:?}",
        caught.iter().map(|r| r.violations[0].oracle).collect::<Vec<_>>()
    );
}

#[test]
fn an_ack_before_the_record_is_durable_breaks_invariant_r() {
    caught_by(Mutation::AckBeforeDurable, &["O2"]);
}

#[test]
fn evicting_a_dirty_extent_breaks_invariant_r() {
    caught_by(Mutation::EvictDirty, &["O2"]);
}

#[test]
fn applying_out_of_order_breaks_prefix_consistency() {
    caught_by(Mutation::ApplyOutOfOrder, &["O3", "O4"]);
}

#[test]
fn a_failback_check_that_finds_everything_equal_breaks_invariant_r() {
    caught_by(Mutation::VerifyAlwaysEqual, &["O2", "O4"]);
}

#[test]
fn without_a_mutation_the_same_seeds_pass() {
    let reports = run_parallel(&(0..50).collect::<Vec<u64>>(), run_seed);
    assert!(reports.iter().all(|r| r.violations.is_empty()));
}

#[test]
fn withdrawing_coverage_a_waiting_write_needs_starves_it() {
    caught_by(Mutation::UndirtyWaiting, &["liveness"]);
}

#[test]
fn a_failback_that_copies_one_differing_block_too_few_is_caught() {
    caught_by(Mutation::DiffersDropsBlock, &["O2", "O4"]);
}

#[test]
fn resting_a_write_on_a_record_answer_not_yet_remembered_durably_is_caught() {
    caught_by(Mutation::LazyPeerMemory, &["O2", "O7"]);
}

/// Acceptance of `check_invariants`: a bug that breaks one of its checks is caught by that
/// check, on every seed that catches it at all, before any oracle sees an effect. Only the
/// simulation's `invariants` step names that oracle, and only the primary's window check says
/// "the window counts", so neither can pass for the other.
#[test]
fn a_data_window_counted_short_is_caught_by_the_cores_own_invariants() {
    let reports = hunt(Mutation::MiscountWindow, 200);
    let first: Vec<_> = reports.iter().filter_map(|r| r.violations.first().map(|v| (r.seed, v))).collect();
    assert!(!first.is_empty(), "MiscountWindow was not caught by any of 200 seeds");
    println!("MiscountWindow: caught by {} of 200 seeds; first: seed {} ({})", first.len(), first[0].0, first[0].1.detail);
    for (seed, v) in first {
        assert!(
            v.oracle == "invariants" && v.detail.contains("the window counts"),
            "seed {seed}: MiscountWindow was first caught by {} ({}), not by the primary's own window check",
            v.oracle,
            v.detail
        );
    }
}

#[test]
fn trusting_a_store_that_lost_state_makes_sites_differ_while_both_report_clean() {
    caught_by(Mutation::TrustAmnesiac, &["O7"]);
}

#[test]
fn a_secondary_owed_a_full_resync_that_does_not_mark_itself_at_the_hello_promotes_as_consistent() {
    caught_by(Mutation::UnmarkedAtHello, &["O8"]);
}

#[test]
fn a_full_resync_that_skips_an_extent_leaves_sites_that_differ() {
    caught_by(Mutation::SweepSkipsLast, &["O2", "O4", "O7"]);
}

#[test]
fn a_sync_mark_ahead_of_unanswered_checks_makes_a_resumed_sync_skip_extents() {
    caught_by(Mutation::MarkAheadOfChecks, &["O2", "O4", "O7"]);
}

#[test]
fn a_verify_that_does_not_hold_host_writes_reports_false_differences() {
    caught_by(Mutation::VerifyUnordered, &["O9"]);
}

#[test]
fn a_secondary_that_keeps_calling_its_image_consistent_after_a_verify_difference_is_caught() {
    caught_by(Mutation::VerifyLeavesConsistent, &["O9"]);
}

#[test]
fn a_verify_repair_that_copies_nothing_leaves_sites_that_differ() {
    caught_by(Mutation::VerifyRepairSkipped, &["O4"]);
}

#[test]
fn a_resumed_full_resync_that_ignores_the_sync_cursor_is_caught() {
    caught_by(Mutation::ResumeFromStart, &["resume"]);
}
