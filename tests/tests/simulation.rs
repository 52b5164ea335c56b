//! Deterministic simulation of both sites under faults: at least 1,000 seeds, every oracle
//! (docs/architecture.md, "The oracles") checked after every event.
//!
//! `GEOMIRROR_SEEDS=N` runs more; `GEOMIRROR_SEED=S` replays one seed and prints its report.

use geomirror_sim::{run_seed, Scenario, SeedTotals, SimConfig};
use geomirror_tests::{describe_failure, run_seeds, seeds_from_env};

#[test]
fn a_thousand_seeds_keep_every_oracle() {
    let seeds = seeds_from_env(1000);
    let reports = run_seeds(&seeds);
    let failures: Vec<String> = reports.iter().filter(|r| !r.violations.is_empty()).map(describe_failure).collect();
    let t = SeedTotals::of(&reports);
    println!("{t}");
    if seeds.len() == 1 {
        println!("{:#?}", reports[0]);
    }
    assert!(failures.is_empty(), "{} of {} seeds failed:\n{}", failures.len(), seeds.len(), failures.join("\n"));
    if seeds.len() >= 1000 {
        // Coverage: the drawn configurations must actually exercise every fault.
        assert!(
            t.crashes > 0
                && t.media_errors > 0
                && t.link_cuts > 0
                && t.promotions > 0
                && t.split_brains > 0
                && t.switchovers > 0
                && t.resyncs > 0
                && t.evicted_generations > 0
                && t.degraded_writes > 0
                && t.writes_failed > 0
                && t.extents_saved_aside > 0
                && t.store_faults > 0
                && t.amnesias_healed > 0
                && t.hidden_rollbacks > 0
                && t.recoveries > 0,
            "the seeds did not cover every fault: {t}"
        );
        // O1 after promotion is only checked strictly for quiet promotions: most must be.
        assert!(
            t.loud_promotions * 2 < t.promotions,
            "{} of {} promotions were loud: O1 after promotion was barely checked",
            t.loud_promotions,
            t.promotions
        );
    }
}

/// Seeds past the default range that once broke an oracle, kept as regressions:
/// - 2165: a media sync finished while a promotion was being persisted, and the resync end
///   it completed deleted the divergent extents from the new primary's failback set (O2).
const REGRESSION_SEEDS: &[u64] = &[2165];

#[test]
fn seeds_that_once_failed_keep_every_oracle() {
    for &seed in REGRESSION_SEEDS {
        let r = run_seed(seed);
        assert!(r.violations.is_empty(), "{}", describe_failure(&r));
    }
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    for seed in [3u64, 7, 42, 1001] {
        let a = run_seed(seed);
        let b = run_seed(seed);
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed} is not deterministic");
        assert_eq!(a.events, b.events);
        assert!(a.events > 1000, "seed {seed} did too little to mean anything");
    }
    assert_ne!(run_seed(3).trace_hash, run_seed(4).trace_hash);
}

#[test]
fn every_scenario_is_drawn() {
    let scenarios: Vec<Scenario> = (0..16).map(|s| SimConfig::for_seed(s).scenario).collect();
    for want in [Scenario::Steady, Scenario::Failover, Scenario::SplitBrain, Scenario::Switchover] {
        assert!(scenarios.contains(&want), "{want:?} never drawn");
    }
}
