//! The simulated world: two sites, a network between them, a host, faults, and the oracles.
//!
//! Owns: virtual time and the event queue, the shells around each site's core (a `MemStore`,
//! `Media`, a side store for saved-aside extents), the link with per-stream FIFO delivery,
//! fault injection (link cuts, crashes that lose unsynced state, promotion, failback, split
//! brain, switchover) and the TESTING.md oracles, checked after every event against state kept
//! outside the core: what the host saw, the media, and the synced store contents.
//! Must not: peek into the core to decide whether the core is right. The core's accessors are
//! used only to drive operator actions (is it drained, is it split-brained), never as oracles.

use crate::media::{decode_stamps, encode_stamps, Media, BLOCK};
use crate::workload::{Generator, HostOp, OpKind, Workload};
use bytes::Bytes;
use geomirror_core::frame::{decode, encode};
use geomirror_core::{
    Action, CoreConfig, Epoch, ExtentId, Frame, Geometry, HostError, LinkState, MemStore, Primary, RequestId, Role, Secondary, SiteState,
    Stream, Time, Token, WriteKind, WriteOp,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::time::Duration;

mod amnesia;

/// What happens at the middle of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Faults only.
    Steady,
    /// `kill -9` the primary, promote the secondary, restart the old primary, fail back.
    Failover,
    /// Cut the link, promote the secondary, write on both, heal, detect, resolve.
    SplitBrain,
    /// Drain, demote the primary, promote the secondary, carry on: zero loss.
    Switchover,
}

#[derive(Clone, Debug)]
pub struct Faults {
    /// Chance, per host request issued, of each fault (per million).
    pub link_cut_ppm: u32,
    pub crash_primary_ppm: u32,
    pub crash_secondary_ppm: u32,
    /// Chance per host request that it is a FLUSH instead of a write.
    pub flush_ppm: u32,
    /// Chance that a frame in flight is lost with its connection (a cut mid-frame).
    pub drop_mid_frame_ppm: u32,
    /// Chance that a primary's local write reports an error (its data did reach the media, as
    /// with a write that times out after landing: the host sees an error, the sites must
    /// still converge).
    pub media_error_ppm: u32,
    /// Chance that a site's store is lost whole (its state directory emptied; half the time
    /// its media replaced by a blank one too, a rebuilt site), at a crash.
    pub store_loss_ppm: u32,
    /// Chance that a site's store goes back to an earlier durable state (a restored backup,
    /// a disk that lost synced writes), at a crash: only to states the design promises to
    /// detect (see `amnesia.rs`).
    pub store_rollback_ppm: u32,
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub volume_bytes: u64,
    pub extent_bytes: u64,
    pub core: CoreConfig,
    pub workload: Workload,
    pub write_bytes: u64,
    pub writes: u64,
    pub queue_depth: usize,
    /// One-way link delay range, microseconds.
    pub delay_us: (u64, u64),
    pub faults: Faults,
    pub scenario: Scenario,
    /// Bound on simulation steps; exceeding it is a liveness failure.
    pub max_events: u64,
    /// Check the oracles after every event (true in tests; the replay tool turns it off).
    pub check_every_event: bool,
    /// A fixed list of host writes (trace replay) instead of the generator.
    pub ops: Option<Vec<HostOp>>,
    /// Print every event and action to stderr (set by `GEOMIRROR_TRACE=1` when replaying).
    pub trace: bool,
    /// Bandwidth of the link for bulk data, bytes per second; None for unlimited.
    pub link_bytes_per_sec: Option<u64>,
}

impl SimConfig {
    /// A configuration drawn from the seed: mode, policies, capacity, workload, lanes, faults
    /// and scenario all vary, so that 1,000 seeds cover every fault of TESTING.md.
    ///
    /// Append-only: new draws go after the existing ones (see `media_error_ppm`), so that a
    /// seed keeps naming the same scenario and a failing seed stays a regression case.
    pub fn for_seed(seed: u64) -> SimConfig {
        use geomirror_core::{FlushPolicy, LagPolicy, LinkLossPolicy, Mode, PredictorConfig, PredictorKind};
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_cafe);
        let mode = match r.gen_range(0..10) {
            0 => Mode::Sync,
            1 => Mode::Async,
            _ => Mode::Predictive,
        };
        let scenario = match seed % 8 {
            0 | 1 => Scenario::Steady,
            2..=4 => Scenario::Failover,
            5 | 6 => Scenario::SplitBrain,
            _ => Scenario::Switchover,
        };
        let workload = Workload::ALL[r.gen_range(0..5)];
        let extent_bytes = [64u64 << 10, 128 << 10, 256 << 10][r.gen_range(0..3)];
        let core = CoreConfig {
            mode,
            record_capacity_extents: [8u64, 16, 32, 128][r.gen_range(0..4)],
            predictor: PredictorConfig {
                kind: if r.gen_bool(0.7) { PredictorKind::Adaptive } else { PredictorKind::KNext },
                k_next: r.gen_range(1..6),
                max_ahead: r.gen_range(6..48),
                pre_extend_within: r.gen_range(1..6),
                ghost_capacity: r.gen_range(0..64),
                max_streams: r.gen_range(1..8),
            },
            record_update_timeout: Duration::from_millis(r.gen_range(20..80)),
            on_link_loss: if r.gen_bool(0.5) { LinkLossPolicy::Block } else { LinkLossPolicy::Degrade },
            link_loss_detection_skew: Duration::from_millis(r.gen_range(0..10)),
            link_loss_deadline: Duration::from_millis(r.gen_range(100..400)),
            max_lag_bytes: [2u64 << 20, 4 << 20, 64 << 20][r.gen_range(0..3)],
            on_lag_full: if r.gen_bool(0.5) { LagPolicy::Throttle } else { LagPolicy::Resync },
            max_inflight_bytes: 1 << 20,
            max_record_updates_in_flight: r.gen_range(1..5),
            data_lanes: r.gen_range(1..4),
            flush_policy: if r.gen_bool(0.5) { FlushPolicy::Local } else { FlushPolicy::Remote },
            clean_generation_max_age: if r.gen_bool(0.5) { Some(Duration::from_millis(r.gen_range(5..200))) } else { None },
            eviction_idle_delay: Duration::from_millis(r.gen_range(1..10)),
            local_sync_interval: Duration::from_millis(r.gen_range(1..20)),
            reorder_buffer_bytes: (1 << 20) + geomirror_core::frame::MAX_FRAME_BYTES as u64,
            resync_reads_in_flight: r.gen_range(1..8),
            // From the seed, not the generator, so that every other draw stays as it was.
            verify_failback: !seed.is_multiple_of(5),
            // Drawn below, after the draws that name the scenario.
            peer_memory_persist_interval: Duration::from_secs(1),
        };
        let mut cfg = SimConfig {
            seed,
            volume_bytes: 8 << 20,
            extent_bytes,
            core,
            workload,
            write_bytes: [4096u64, 16384, 65536][r.gen_range(0..3)],
            writes: r.gen_range(200..500),
            queue_depth: r.gen_range(1..12),
            delay_us: (r.gen_range(100..1000), r.gen_range(1000..6000)),
            faults: Faults {
                link_cut_ppm: r.gen_range(0..8000),
                crash_primary_ppm: if scenario == Scenario::Steady { r.gen_range(0..6000) } else { r.gen_range(0..2000) },
                crash_secondary_ppm: r.gen_range(0..6000),
                flush_ppm: r.gen_range(0..80_000),
                drop_mid_frame_ppm: r.gen_range(0..300),
                media_error_ppm: 0,
                store_loss_ppm: 0,
                store_rollback_ppm: 0,
            },
            scenario,
            max_events: 2_000_000,
            check_every_event: true,
            ops: None,
            trace: std::env::var_os("GEOMIRROR_TRACE").is_some(),
            link_bytes_per_sec: if r.gen_bool(0.5) { Some(r.gen_range(20..200) << 20) } else { None },
        };
        // Draws added later go last, so that earlier seeds keep their scenarios.
        cfg.faults.media_error_ppm = if r.gen_bool(0.3) { r.gen_range(0..5000) } else { 0 };
        cfg.faults.store_loss_ppm = if r.gen_bool(0.2) { r.gen_range(0..4000) } else { 0 };
        cfg.faults.store_rollback_ppm = if r.gen_bool(0.2) { r.gen_range(0..6000) } else { 0 };
        cfg.core.peer_memory_persist_interval = Duration::from_millis(r.gen_range(1..40));
        cfg
    }
}

/// One oracle failure, with enough context to replay it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub oracle: &'static str,
    pub event: u64,
    pub time_us: u64,
    pub detail: String,
}

#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub trace_hash: u64,
    pub events: u64,
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub flushes_acked: u64,
    pub hits: u64,
    pub misses: u64,
    pub crashes: u64,
    pub media_errors: u64,
    pub link_cuts: u64,
    pub promotions: u64,
    pub split_brains_detected: u64,
    pub switchovers: u64,
    pub resyncs: u64,
    /// Whole generations evicted, and writes covered by the local dirty map after a link loss
    /// (degrade), by the primary that ends the run.
    pub evicted_generations: u64,
    pub degraded_writes: u64,
    pub failback_bytes: u64,
    pub saved_aside_extents: u64,
    /// Failback checks by digest on the secondary, and how many found the extent equal.
    pub extents_verified: u64,
    pub extents_verified_equal: u64,
    /// Acknowledged writes missing after a promotion, all inside recorded extents (O1 allows
    /// them, counted and reported).
    pub lost_acked_blocks_reported: u64,
    /// Promotions that reported a non-authoritative record or an inconsistent image.
    pub loud_promotions: u64,
    /// Stores lost whole or rolled back, and amnesias the sites detected and healed with a
    /// full verified resync.
    pub store_faults: u64,
    pub amnesias_healed: u64,
    /// Secondary stores gone back to a state their primary's durable memory cannot tell from
    /// the present, with the primary crashed at the same instant (see `amnesia.rs`).
    pub hidden_rollbacks: u64,
    /// Promotions an operator made because no site was primary (a primary's store was lost).
    pub recoveries: u64,
    pub max_record_len: u64,
    /// (time in µs, record length) sampled after every host ack.
    pub record_samples: Vec<(u64, u64)>,
    pub final_record_len: u64,
    /// Failback debt at the end of the workload, before the final drain: bytes that a
    /// failover at that moment would have to copy back.
    pub failback_debt_bytes: u64,
    pub violations: Vec<Violation>,
    pub scenario_done: bool,
}

impl SimReport {
    pub fn hit_ratio(&self) -> f64 {
        if self.hits + self.misses == 0 {
            return 1.0;
        }
        self.hits as f64 / (self.hits + self.misses) as f64
    }
}

type SiteId = usize;

enum Core {
    Primary(Box<Primary>),
    Secondary(Box<Secondary>),
}

struct Site {
    store: MemStore,
    media: Media,
    /// Saved-aside extents: content before a failback overwrote it.
    side: BTreeMap<ExtentId, Vec<u64>>,
    core: Option<Core>,
    /// Bumped at every crash and rebuild; completions of an older life are dropped.
    life: u64,
    persist_done_at: Time,
    media_done_at: Time,
    /// Image when the site was demoted; save-aside is judged against it.
    pre_demotion: Option<Vec<u64>>,
    was_consistent: bool,
    /// Durable states of the store, newest last (bounded): what a rollback goes back to.
    history: VecDeque<SiteState>,
    /// The role a new store of this site starts in (its configured role).
    home_role: Role,
}

#[derive(Clone, Debug)]
enum Ev {
    HostIssue,
    Deliver {
        to: SiteId,
        conn: u64,
        bytes: Vec<u8>,
    },
    PersistDone {
        site: SiteId,
        life: u64,
        token: Token,
        batch: u64,
    },
    LocalWriteDone {
        site: SiteId,
        life: u64,
        token: Token,
        ok: bool,
    },
    SyncDone {
        site: SiteId,
        life: u64,
        token: Token,
        snapshot: Vec<u64>,
        applied_write: u64,
    },
    ReadDone {
        site: SiteId,
        life: u64,
        token: Token,
        data: Bytes,
    },
    VerifyDone {
        site: SiteId,
        life: u64,
        token: Token,
        differing: Vec<u8>,
    },
    Timer {
        site: SiteId,
        life: u64,
    },
    Connect {
        conn: u64,
    },
    Heal {
        cut_id: u64,
    },
    Crash {
        site: SiteId,
    },
    Restart {
        site: SiteId,
    },
    /// A crash that also loses the site's store (and with `blank`, its media).
    StoreLoss {
        site: SiteId,
        blank: bool,
    },
    /// A crash after which the store holds an earlier durable state.
    StoreRollback {
        site: SiteId,
    },
    Scenario,
    Step(u8),
}

#[derive(Clone, Debug)]
struct Outstanding {
    site: SiteId,
    /// None for a flush.
    write: Option<(usize, Vec<u64>)>,
    rogue: bool,
    flush_marks: Option<Vec<usize>>,
    /// For a write issued while the link was up: what must stay unchanged for a `LinkDown`
    /// failure to be a liveness bug (see `Calm`).
    calm: Option<Calm>,
}

/// The state at a write's issue that excuses its failing with `LinkDown` if it changes: the
/// link went down or came back, writes were throttled (a full lag can hold one past the
/// deadline), a resync started, or a miss waited for room in a full record.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Calm {
    link_changes: u64,
    throttled_writes: u64,
    resyncs_started: u64,
    record_full_waits: u64,
}

/// The host's record of what it was told: kept outside the system under test.
struct HostView {
    /// Acknowledged values of each block, oldest first; index 0 is the value at the last
    /// baseline (start, restart or promotion).
    history: Vec<Vec<u64>>,
    /// Index into `history[b]` of the value a completed flush made durable.
    flushed: Vec<usize>,
    /// Blocks whose value is unknown (a write failed after it may have reached media).
    indeterminate: Vec<bool>,
    busy: Vec<u32>,
}

impl HostView {
    fn new(blocks: usize) -> HostView {
        HostView { history: vec![vec![0]; blocks], flushed: vec![0; blocks], indeterminate: vec![false; blocks], busy: vec![0; blocks] }
    }
    fn current(&self, b: usize) -> u64 {
        *self.history[b].last().expect("never empty")
    }
    fn rebase(&mut self, image: &[u64]) {
        for (b, v) in image.iter().enumerate() {
            self.history[b] = vec![*v];
            self.flushed[b] = 0;
            self.indeterminate[b] = false;
        }
    }
}

pub struct World {
    cfg: SimConfig,
    geo: Geometry,
    rng: ChaCha8Rng,
    now: Time,
    queue: BinaryHeap<Reverse<(Time, u64, usize)>>,
    events: Vec<Option<Ev>>,
    next_ev: u64,
    sites: [Site; 2],
    /// The site the host writes to.
    active: SiteId,
    conn: u64,
    link_up: bool,
    /// Counts every connection and disconnection, so a request can tell whether the link
    /// stayed up for its whole life.
    link_changes: u64,
    /// Administrative cut (a fault); while set, no connection is made.
    cut: bool,
    /// Generation of the current cut: a heal scheduled for an earlier cut does nothing.
    cut_id: u64,
    last_delivery: BTreeMap<(SiteId, Stream), Time>,
    /// Per sending site: when the link finishes sending the bulk data already queued.
    link_busy_until: [Time; 2],
    generator: Generator,
    ops_cursor: usize,
    issued: u64,
    outstanding: BTreeMap<RequestId, Outstanding>,
    next_request: u64,
    next_stamp: u64,
    host: HostView,
    /// Each site's dispatch history as primary: seq -> (first block, stamps). Kept per site
    /// because two sites' sequence spaces may overlap after a failover.
    history: [BTreeMap<u64, (usize, Vec<u64>)>; 2],
    /// Per site: (first seq of an incarnation, image at its start).
    bases: [Vec<(u64, Vec<u64>)>; 2],
    /// (site, base index, seq, image) of the last model computed.
    model_cache: Option<(SiteId, usize, u64, Vec<u64>)>,
    /// Per site: the last write it applied as secondary (seq in the sender's space).
    last_applied_write: [u64; 2],
    /// `last_applied_write` as of the last completed media sync: what a crash falls back to.
    synced_applied_write: [u64; 2],
    /// Requests the host gave up on (their site crashed or lost its role); late answers to
    /// them are ignored.
    abandoned: BTreeSet<RequestId>,
    /// The earliest timer event scheduled per site, so that wake-ups are not duplicated.
    armed: [Option<(Time, u64)>; 2],
    writers: BTreeMap<Epoch, SiteId>,
    rogue_extents: BTreeSet<ExtentId>,
    scenario_stage: u8,
    promoted_record: Option<BTreeSet<ExtentId>>,
    report: SimReport,
    hash: u64,
    quiescing: bool,
    event_count: u64,
    /// Store identities are drawn from their own generator, so that drawing them changes no
    /// other draw.
    id_rng: ChaCha8Rng,
    /// Per site: a store fault whose effects invariant R cannot be held to until it is healed.
    amnesia: [Option<amnesia::AmnesiaWatch>; 2],
    /// An operator's promotion of this site because no site was primary; the host moves to
    /// it once it serves.
    recovery: Option<SiteId>,
}

const OTHER: [SiteId; 2] = [1, 0];

impl World {
    pub fn new(cfg: SimConfig) -> World {
        let geo = Geometry::new(cfg.volume_bytes, cfg.extent_bytes).expect("simulation geometry is valid");
        cfg.core.validate().expect("simulation core config is valid");
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut id_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x1d_1d_1d);
        let blocks = (cfg.volume_bytes / BLOCK) as usize;
        let mut mk = |role| Site {
            store: MemStore::new(SiteState::fresh(role, geomirror_core::StoreId(id_rng.gen()))),
            media: Media::new(cfg.volume_bytes),
            side: BTreeMap::new(),
            core: None,
            life: 0,
            persist_done_at: Time::ZERO,
            media_done_at: Time::ZERO,
            pre_demotion: None,
            was_consistent: true,
            history: VecDeque::new(),
            home_role: role,
        };
        let sites = [mk(Role::Primary), mk(Role::Secondary)];
        let generator = Generator::new(cfg.workload, cfg.volume_bytes, cfg.write_bytes, cfg.write_bytes * 3, 2);
        let mut w = World {
            geo,
            rng,
            now: Time::ZERO,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            next_ev: 0,
            sites,
            active: 0,
            conn: 0,
            link_up: false,
            link_changes: 0,
            cut: false,
            cut_id: 0,
            last_delivery: BTreeMap::new(),
            link_busy_until: [Time::ZERO; 2],
            generator,
            ops_cursor: 0,
            issued: 0,
            outstanding: BTreeMap::new(),
            next_request: 1,
            next_stamp: 1,
            host: HostView::new(blocks),
            history: [BTreeMap::new(), BTreeMap::new()],
            bases: [vec![(0, vec![0; blocks])], vec![(0, vec![0; blocks])]],
            model_cache: None,
            last_applied_write: [0, 0],
            synced_applied_write: [0, 0],
            abandoned: BTreeSet::new(),
            armed: [None, None],
            writers: BTreeMap::new(),
            rogue_extents: BTreeSet::new(),
            scenario_stage: 0,
            promoted_record: None,
            report: SimReport { seed: cfg.seed, ..SimReport::default() },
            hash: 0xcbf2_9ce4_8422_2325,
            quiescing: false,
            event_count: 0,
            id_rng,
            amnesia: [None, None],
            recovery: None,
            cfg,
        };
        w.boot(0);
        w.boot(1);
        w.connect_later(Duration::from_micros(10));
        for _ in 0..w.cfg.queue_depth {
            w.schedule(Duration::from_micros(50), Ev::HostIssue);
        }
        w
    }

    /// Runs to the end and returns the report. Stops at the first violation.
    pub fn run(mut self) -> SimReport {
        while let Some(Reverse((t, _, idx))) = self.queue.pop() {
            let Some(ev) = self.events[idx].take() else {
                continue;
            };
            self.now = t;
            self.event_count += 1;
            if self.event_count > self.cfg.max_events {
                self.violate("liveness", format!("more than {} events", self.cfg.max_events));
                break;
            }
            self.mix(idx as u64 ^ t.0.rotate_left(17));
            if self.cfg.trace {
                eprintln!("{:>9} #{} {}", t.0, self.event_count, brief_event(&ev));
            }
            self.handle(ev);
            if !self.report.violations.is_empty() {
                break;
            }
            if self.cfg.check_every_event || self.queue.is_empty() {
                self.check_all();
                if !self.report.violations.is_empty() {
                    break;
                }
            }
            self.operator();
            if self.workload_done() && !self.quiescing {
                self.begin_quiesce();
            }
        }
        if self.report.violations.is_empty() {
            self.final_checks();
        }
        self.report.events = self.event_count;
        self.report.trace_hash = self.hash;
        self.report
    }

    // ----- plumbing -----

    fn schedule(&mut self, after: Duration, ev: Ev) {
        self.schedule_at(self.now + after, ev);
    }

    fn schedule_at(&mut self, at: Time, ev: Ev) {
        let idx = self.events.len();
        self.events.push(Some(ev));
        self.queue.push(Reverse((at, self.next_ev, idx)));
        self.next_ev += 1;
    }

    fn mix(&mut self, v: u64) {
        self.hash ^= v;
        self.hash = self.hash.wrapping_mul(0x0100_0000_01b3);
    }

    fn violate(&mut self, oracle: &'static str, detail: String) {
        self.report.violations.push(Violation { oracle, event: self.event_count, time_us: self.now.0, detail });
    }

    fn us(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_micros(self.rng.gen_range(lo..=hi))
    }

    fn boot(&mut self, s: SiteId) {
        let state = self.sites[s].store.durable().clone();
        let cfg = self.cfg.core.clone();
        let core = match state.role {
            Role::Primary => {
                let p = Primary::new(cfg, self.geo, &state, self.now);
                let first = p.incarnation() << 40;
                // What it applied as a secondary was numbered in another primary's sequence
                // space; when it is a secondary again, O3 starts over from its next apply.
                self.last_applied_write[s] = 0;
                self.synced_applied_write[s] = 0;
                self.bases[s].push((first, self.sites[s].media.current().to_vec()));
                self.model_cache = None;
                Core::Primary(Box::new(p))
            }
            Role::Secondary => Core::Secondary(Box::new(Secondary::new(cfg, self.geo, &state))),
        };
        self.sites[s].life += 1;
        self.sites[s].core = Some(core);
        self.sites[s].was_consistent = state.consistent;
        self.drain_actions(s);
    }

    fn is_primary(&self, s: SiteId) -> bool {
        matches!(self.sites[s].core, Some(Core::Primary(_)))
    }

    fn primary(&mut self, s: SiteId) -> Option<&mut Primary> {
        match &mut self.sites[s].core {
            Some(Core::Primary(p)) => Some(p),
            _ => None,
        }
    }

    fn connect_later(&mut self, after: Duration) {
        self.conn += 1;
        let conn = self.conn;
        self.schedule(after, Ev::Connect { conn });
    }

    fn disconnect(&mut self, reconnect: bool) {
        if self.link_up {
            self.link_up = false;
            self.link_changes += 1;
            for s in 0..2 {
                let now = self.now;
                match &mut self.sites[s].core {
                    Some(Core::Primary(p)) => p.handle_disconnected(now),
                    Some(Core::Secondary(x)) => x.handle_disconnected(now),
                    None => {}
                }
                self.drain_actions(s);
            }
        }
        self.conn += 1;
        if reconnect && !self.cut {
            let d = self.us(2_000, 20_000);
            self.connect_later(d);
        }
    }

    fn with_core<F: FnOnce(&mut Core, Time)>(&mut self, s: SiteId, f: F) {
        let now = self.now;
        if let Some(c) = &mut self.sites[s].core {
            f(c, now);
        }
        self.drain_actions(s);
    }

    // ----- events -----

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::HostIssue => self.host_issue(),
            Ev::Deliver { to, conn, bytes } => {
                if conn != self.conn || !self.link_up {
                    return;
                }
                let frame = match decode(&bytes) {
                    Ok((f, used)) if used == bytes.len() => f,
                    other => {
                        self.violate("codec", format!("frame failed to decode in transit: {other:?}"));
                        return;
                    }
                };
                self.mix(bytes.len() as u64);
                self.with_core(to, |c, now| match c {
                    Core::Primary(p) => p.handle_frame(now, frame),
                    Core::Secondary(x) => x.handle_frame(now, frame),
                });
            }
            Ev::PersistDone { site, life, token, batch } => {
                // The store finishes what it was given even if the state machine that asked
                // was replaced meanwhile (a role change); a crash already discarded it.
                if self.sites[site].store.sync_through(batch) {
                    self.remember_durable(site);
                }
                if life != self.sites[site].life {
                    return;
                }
                self.with_core(site, |c, now| match c {
                    Core::Primary(p) => p.handle_persisted(now, token),
                    Core::Secondary(x) => x.handle_persisted(now, token),
                });
            }
            Ev::LocalWriteDone { site, life, token, ok } => {
                if life == self.sites[site].life {
                    self.with_core(site, |c, now| {
                        if let Core::Primary(p) = c {
                            p.handle_local_write_done(now, token, ok)
                        }
                    });
                }
            }
            Ev::SyncDone { site, life, token, snapshot, applied_write } => {
                if life != self.sites[site].life {
                    return;
                }
                self.sites[site].media.make_durable(snapshot);
                self.synced_applied_write[site] = applied_write;
                self.with_core(site, |c, now| match c {
                    Core::Primary(p) => p.handle_media_synced(now, token),
                    Core::Secondary(x) => x.handle_media_synced(now, token),
                });
            }
            Ev::ReadDone { site, life, token, data } => {
                if life == self.sites[site].life {
                    self.with_core(site, |c, now| {
                        if let Core::Primary(p) = c {
                            p.handle_read_done(now, token, data)
                        }
                    });
                }
            }
            Ev::VerifyDone { site, life, token, differing } => {
                if life == self.sites[site].life {
                    self.with_core(site, |c, now| {
                        if let Core::Secondary(x) = c {
                            x.handle_verified(now, token, differing)
                        }
                    });
                }
            }
            Ev::Timer { site, life } => {
                if self.armed[site] == Some((self.now, life)) {
                    self.armed[site] = None;
                }
                if life == self.sites[site].life {
                    self.with_core(site, |c, now| match c {
                        Core::Primary(p) => {
                            if p.poll_timeout().is_some_and(|t| t <= now) {
                                p.handle_timeout(now)
                            }
                        }
                        Core::Secondary(x) => {
                            if x.poll_timeout().is_some_and(|t| t <= now) {
                                x.handle_timeout(now)
                            }
                        }
                    });
                }
            }
            Ev::Connect { conn } => {
                if conn != self.conn || self.cut || self.link_up || self.sites.iter().any(|s| s.core.is_none()) {
                    return;
                }
                self.link_up = true;
                self.link_changes += 1;
                self.mix(0xC0);
                for s in 0..2 {
                    self.with_core(s, |c, now| match c {
                        Core::Primary(p) => p.handle_connected(now),
                        Core::Secondary(x) => x.handle_connected(now),
                    });
                }
            }
            Ev::Heal { cut_id } => {
                if cut_id != self.cut_id {
                    return;
                }
                self.cut = false;
                if !self.link_up {
                    self.connect_later(Duration::from_micros(100));
                }
            }
            // One fault at a time: a primary whose store went back is not also crashed again
            // before the peer could find it out.
            Ev::Crash { site } if self.amnesia[site].is_some_and(|w| w.primary_rollback && !w.flagged) => {}
            Ev::Crash { site } => self.crash(site),
            Ev::StoreLoss { site, blank } => self.store_loss(site, blank),
            Ev::StoreRollback { site } => self.store_rollback(site),
            Ev::Restart { site } => {
                if self.sites[site].core.is_none() {
                    self.boot(site);
                    if !self.cut {
                        self.disconnect(false);
                        self.connect_later(Duration::from_micros(500));
                    }
                }
            }
            Ev::Scenario => self.scenario_start(),
            Ev::Step(n) => self.scenario_step(n),
        }
    }

    fn crash(&mut self, s: SiteId) {
        if self.sites[s].core.is_none() {
            return;
        }
        self.report.crashes += 1;
        self.disconnect(false);
        let site = &mut self.sites[s];
        site.core = None;
        site.life += 1;
        site.store.crash();
        site.media.crash();
        let _ = site;
        self.last_applied_write[s] = self.synced_applied_write[s];
        // A demoted site that crashes before its failback ends legitimately loses its own
        // unsynced writes: what must be saved aside is what survived, for extents not saved yet.
        let per_extent = (self.geo.extent_bytes() / BLOCK) as usize;
        let img = self.sites[s].media.current().to_vec();
        let site = &mut self.sites[s];
        if let Some(pre) = &mut site.pre_demotion {
            for (e, chunk) in pre.chunks_mut(per_extent).enumerate() {
                if !site.side.contains_key(&ExtentId(e as u64)) {
                    chunk.copy_from_slice(&img[e * per_extent..e * per_extent + chunk.len()]);
                }
            }
        }
        // The host's requests to the dead site fail; their blocks may or may not have landed.
        let dead: Vec<RequestId> = self.outstanding.iter().filter(|(_, o)| o.site == s).map(|(r, _)| *r).collect();
        for r in dead {
            let o = self.outstanding.remove(&r).expect("present");
            if let Some((first, stamps)) = &o.write {
                for b in *first..*first + stamps.len() {
                    self.host.busy[b] -= 1;
                    if !o.rogue {
                        self.host.indeterminate[b] = true;
                    }
                }
            }
            self.schedule(Duration::from_micros(10), Ev::HostIssue);
        }
        // (A site whose store a fault took back may have lost what a flush made durable, and
        // one whose media was replaced holds none of the host's data: the host finds it on
        // the peer, checked at the promotion.)
        if s == self.active && !self.amnesia[s].is_some_and(|w| w.blanked) {
            // O1 across a primary crash: what survived must be at least what a flush made
            // durable. The host then takes the surviving image as its new baseline.
            let image = self.sites[s].media.current().to_vec();
            for (b, v) in image.iter().enumerate() {
                if self.host.indeterminate[b] || self.amnesia[s].is_some() {
                    continue;
                }
                if !self.host.history[b][self.host.flushed[b]..].contains(v) {
                    self.violate(
                        "O1",
                        format!(
                            "block {b} lost flushed data in a primary crash: holds {v}, flushed history {:?}",
                            &self.host.history[b][self.host.flushed[b]..]
                        ),
                    );
                    return;
                }
            }
            self.host.rebase(&image);
        }
        if self.cfg.scenario == Scenario::Steady || self.scenario_stage == 0 || self.scenario_stage >= 9 || self.quiescing {
            let d = self.us(1_000, 50_000);
            self.schedule(d, Ev::Restart { site: s });
        }
    }

    fn host_issue(&mut self) {
        if self.quiescing || self.issued >= self.cfg.writes {
            return;
        }
        let site = self.active;
        if !self.is_primary(site) {
            // No primary to talk to (crashed, or promotion pending): try again later.
            let d = self.us(1_000, 5_000);
            self.schedule(d, Ev::HostIssue);
            return;
        }
        self.issued += 1;
        self.maybe_fault();
        if self.issued == self.cfg.writes / 2 && self.cfg.scenario != Scenario::Steady {
            self.schedule(Duration::from_micros(1), Ev::Scenario);
        }
        let request = RequestId(self.next_request);
        self.next_request += 1;
        if self.rng.gen_range(0..1_000_000) < self.cfg.faults.flush_ppm {
            let marks: Vec<usize> = (0..self.host.history.len()).map(|b| self.host.history[b].len() - 1).collect();
            self.outstanding.insert(request, Outstanding { site, write: None, rogue: false, flush_marks: Some(marks), calm: None });
            self.with_core(site, |c, now| {
                if let Core::Primary(p) = c {
                    p.handle_host_flush(now, request)
                }
            });
            return;
        }
        let op = self.next_op();
        let Some(op) = op else {
            self.schedule(Duration::from_micros(200), Ev::HostIssue);
            return;
        };
        self.issue_write(site, request, op, false);
    }

    fn next_op(&mut self) -> Option<HostOp> {
        for _ in 0..8 {
            let op = match &self.cfg.ops {
                Some(ops) => {
                    let op = ops[self.ops_cursor % ops.len()];
                    self.ops_cursor += 1;
                    op
                }
                None => self.generator.next(&mut self.rng),
            };
            let first = (op.offset / BLOCK) as usize;
            let n = (op.len / BLOCK) as usize;
            // A host never has two overlapping writes in flight (as with fio's verify).
            if (first..first + n).all(|b| self.host.busy[b] == 0) {
                return Some(op);
            }
        }
        None
    }

    fn issue_write(&mut self, site: SiteId, request: RequestId, op: HostOp, rogue: bool) {
        let first = (op.offset / BLOCK) as usize;
        let n = (op.len / BLOCK) as usize;
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let stamps: Vec<u64> = match op.kind {
            OpKind::Write => (0..n as u64).map(|i| (stamp << 16) | (i & 0xffff)).collect(),
            OpKind::Zero | OpKind::Trim => vec![0; n],
        };
        let wop = match op.kind {
            OpKind::Write => WriteOp::data(op.offset, encode_stamps(&stamps)),
            OpKind::Zero => WriteOp::zero(op.offset, op.len),
            OpKind::Trim => WriteOp::trim(op.offset, op.len),
        };
        for b in first..first + n {
            self.host.busy[b] += 1;
        }
        let calm = self.calm(site);
        self.outstanding.insert(request, Outstanding { site, write: Some((first, stamps)), rogue, flush_marks: None, calm });
        let fua = self.rng.gen_range(0..50) == 0;
        self.with_core(site, |c, now| {
            if let Core::Primary(p) = c {
                p.handle_host_write(now, request, wop, fua)
            }
        });
    }

    /// The state a write's `LinkDown` failure is judged against, when the link is up now.
    fn calm(&self, s: SiteId) -> Option<Calm> {
        let Some(Core::Primary(p)) = &self.sites[s].core else { return None };
        (self.link_up && p.link() == geomirror_core::LinkState::Up).then(|| {
            let st = p.stats();
            Calm {
                link_changes: self.link_changes,
                throttled_writes: st.throttled_writes,
                resyncs_started: st.resyncs_started,
                record_full_waits: st.record_full_waits,
            }
        })
    }

    fn on_ack(&mut self, s: SiteId, request: RequestId, result: Result<(), HostError>) {
        if self.abandoned.remove(&request) {
            return;
        }
        let Some(o) = self.outstanding.remove(&request) else {
            self.violate("host", format!("ack for unknown request {request:?} from site {s}"));
            return;
        };
        if o.site != s {
            self.violate("host", format!("request {request:?} sent to site {} acked by site {s}", o.site));
            return;
        }
        // Liveness: a write issued on an up link, which stayed up, fails only for a reason
        // (throttling, a resync, a full record). Without one, it was starved.
        if result == Err(HostError::LinkDown) && o.calm.is_some() && o.calm == self.calm(s) {
            self.violate(
                "liveness",
                format!("write {request:?} failed with LinkDown although the link stayed up and nothing held it back"),
            );
            return;
        }
        match (&o.write, result) {
            (Some((first, stamps)), res) => {
                for (i, v) in stamps.iter().enumerate() {
                    let b = first + i;
                    self.host.busy[b] -= 1;
                    if o.rogue {
                        continue;
                    }
                    match res {
                        Ok(()) => {
                            self.host.history[b].push(*v);
                            self.host.indeterminate[b] = false;
                        }
                        // Never dispatched: the block must keep its old value.
                        Err(HostError::LinkDown) | Err(HostError::OutOfRange) | Err(HostError::NotServing) => {}
                        // It may be on media: a possible value from now on, and unknown until
                        // the next acknowledged write (which a crash may still undo).
                        Err(_) => {
                            self.host.history[b].push(*v);
                            self.host.indeterminate[b] = true;
                        }
                    }
                }
                if o.rogue {
                    if res.is_ok() {
                        let exts = self.geo.extents_of((*first as u64) * BLOCK, stamps.len() as u64 * BLOCK);
                        self.rogue_extents.extend(exts.map(ExtentId));
                    }
                } else if res.is_ok() {
                    self.report.writes_acked += 1;
                    if let Some(p) = self.primary(s) {
                        let len = p.record_copy().len() as u64;
                        self.report.max_record_len = self.report.max_record_len.max(len);
                        let t = self.now.0;
                        self.report.record_samples.push((t, len));
                    }
                } else {
                    self.report.writes_failed += 1;
                }
            }
            (None, Ok(())) => {
                self.report.flushes_acked += 1;
                if let Some(marks) = &o.flush_marks {
                    for (b, m) in marks.iter().enumerate() {
                        if *m < self.host.history[b].len() {
                            self.host.flushed[b] = self.host.flushed[b].max(*m);
                        }
                    }
                }
            }
            (None, Err(_)) => {}
        }
        if !o.rogue {
            let d = if result == Err(HostError::NotServing) {
                // Refused during a switchover's drain: the host retries later, and the refused
                // request does not count against the workload.
                self.issued -= 1;
                Duration::from_millis(1)
            } else {
                self.us(10, 500)
            };
            self.schedule(d, Ev::HostIssue);
        }
    }

    fn maybe_fault(&mut self) {
        let f = self.cfg.faults.clone();
        if self.scenario_stage != 0 && self.scenario_stage < 9 {
            return; // the scenario is choreographed; random faults resume after it
        }
        if self.rng.gen_range(0..1_000_000) < f.link_cut_ppm && !self.cut {
            if self.cfg.trace {
                eprintln!("{:>9}    link cut", self.now.0);
            }
            self.report.link_cuts += 1;
            self.cut = true;
            self.cut_id += 1;
            self.disconnect(false);
            let d = self.us(1_000, 150_000);
            let cut_id = self.cut_id;
            self.schedule(d, Ev::Heal { cut_id });
        }
        if self.rng.gen_range(0..1_000_000) < f.crash_primary_ppm {
            let a = self.active;
            let d = self.us(0, 2_000);
            self.schedule(d, Ev::Crash { site: a });
        }
        if self.rng.gen_range(0..1_000_000) < f.crash_secondary_ppm {
            let b = OTHER[self.active];
            let d = self.us(0, 2_000);
            self.schedule(d, Ev::Crash { site: b });
        }
        self.maybe_store_fault();
    }

    // ----- the scenario, as an operator would run it -----

    fn scenario_start(&mut self) {
        if self.scenario_stage != 0 {
            return;
        }
        self.scenario_stage = 1;
        let a = self.active;
        match self.cfg.scenario {
            Scenario::Steady => {}
            Scenario::Failover => {
                // kill -9 the primary; restart it only after the promotion.
                self.schedule(Duration::from_micros(1), Ev::Crash { site: a });
                self.schedule(Duration::from_millis(2), Ev::Step(1));
            }
            Scenario::SplitBrain => {
                self.cut = true;
                self.cut_id += 1;
                self.report.link_cuts += 1;
                self.disconnect(false);
                self.schedule(Duration::from_millis(2), Ev::Step(1));
            }
            Scenario::Switchover => {
                let started = match self.primary(a) {
                    Some(p) => p.begin_drain().is_ok(),
                    None => false,
                };
                if !started {
                    // Not serving yet (restarting) or down: the operator tries again shortly.
                    self.scenario_stage = 0;
                    self.schedule(Duration::from_millis(2), Ev::Scenario);
                    return;
                }
                self.schedule(Duration::from_millis(1), Ev::Step(1));
            }
        }
    }

    fn scenario_step(&mut self, n: u8) {
        let a = self.active;
        let b = OTHER[a];
        match (self.cfg.scenario, n) {
            (Scenario::Failover, 1) if self.sites[a].core.is_some() => {
                // The old primary came back before the promotion (a restart scheduled by an
                // earlier fault): kill it again, as the drill does.
                self.schedule(Duration::from_micros(1), Ev::Crash { site: a });
                self.schedule(Duration::from_millis(2), Ev::Step(1));
            }
            (Scenario::Failover | Scenario::SplitBrain, 1) => {
                // Promote the secondary. It may be down itself; the operator retries.
                if self.sites[b].core.is_none() {
                    self.schedule(Duration::from_millis(5), Ev::Restart { site: b });
                    self.schedule(Duration::from_millis(10), Ev::Step(1));
                    return;
                }
                self.promote(b, false);
                self.schedule(Duration::from_millis(3), Ev::Step(2));
            }
            (Scenario::Failover | Scenario::SplitBrain, 2) => {
                if !self.is_primary(b) {
                    self.schedule(Duration::from_millis(2), Ev::Step(2));
                    return;
                }
                self.switch_host_to(b, false);
                if self.cfg.scenario == Scenario::SplitBrain {
                    // A writer that still reaches the old primary keeps writing there.
                    if self.sites[a].core.is_none() {
                        self.schedule(Duration::from_millis(1), Ev::Restart { site: a });
                    }
                    self.schedule(Duration::from_millis(2), Ev::Step(3));
                } else {
                    let d = self.us(5_000, 40_000);
                    self.schedule(d, Ev::Restart { site: a });
                    self.scenario_stage = 5;
                }
            }
            (Scenario::SplitBrain, 3) => {
                let old = OTHER[self.active];
                if self.is_primary(old) {
                    for _ in 0..4 {
                        if let Some(op) = self.next_op() {
                            let r = RequestId(self.next_request);
                            self.next_request += 1;
                            self.issue_write(old, r, op, true);
                        }
                    }
                }
                self.schedule(Duration::from_millis(30), Ev::Step(4));
            }
            (Scenario::SplitBrain, 4) => {
                let cut_id = self.cut_id;
                self.schedule(Duration::from_micros(1), Ev::Heal { cut_id });
                self.scenario_stage = 5;
                self.schedule(Duration::from_millis(50), Ev::Step(5));
            }
            (Scenario::SplitBrain, 5) => {
                // The old primary either joins as an ordinary secondary (it acknowledged
                // nothing alone) or the split brain is held for the operator (see `operator`).
                let new = self.active;
                let old = OTHER[new];
                let joined = matches!(&self.sites[old].core, Some(Core::Secondary(_)))
                    && matches!(&self.sites[new].core, Some(Core::Primary(p)) if p.link() == LinkState::Up);
                if joined || self.report.split_brains_detected > 0 {
                    self.scenario_stage = 9;
                } else {
                    self.schedule(Duration::from_millis(10), Ev::Step(5));
                }
            }
            (Scenario::Switchover, 1) => {
                let drained = matches!(&self.sites[a].core, Some(Core::Primary(p)) if p.is_drained());
                if !drained {
                    if self.sites[a].core.is_none() || self.sites[b].core.is_none() || !self.is_primary(a) {
                        // A crash during the drain (or the primary stepped down: its store was
                        // lost): give up the switchover, as an operator would.
                        let now = self.now;
                        if let Some(p) = self.primary(a) {
                            p.end_drain(now);
                        }
                        self.drain_actions(a);
                        for s in [a, b] {
                            if self.sites[s].core.is_none() {
                                self.schedule(Duration::from_millis(5), Ev::Restart { site: s });
                            }
                        }
                        self.scenario_stage = 9;
                        return;
                    }
                    self.schedule(Duration::from_millis(1), Ev::Step(1));
                    return;
                }
                let equal = self.sites[a].media.current() == self.sites[b].media.current();
                if !equal {
                    self.violate("O4", "switchover: drained primary and secondary differ".into());
                    return;
                }
                if let Some(p) = self.primary(a) {
                    if p.demote().is_err() {
                        self.violate("switchover", "drained primary refused to demote".into());
                        return;
                    }
                }
                self.drain_actions(a);
                self.schedule(Duration::from_millis(2), Ev::Step(2));
            }
            (Scenario::Switchover, 2) => {
                if self.is_primary(a) {
                    self.schedule(Duration::from_millis(1), Ev::Step(2));
                    return;
                }
                self.promote(b, true);
                self.report.switchovers += 1;
                self.schedule(Duration::from_millis(2), Ev::Step(3));
            }
            (Scenario::Switchover, 3) => {
                if !self.is_primary(b) {
                    self.schedule(Duration::from_millis(1), Ev::Step(3));
                    return;
                }
                self.switch_host_to(b, true);
                self.disconnect(true);
                self.scenario_stage = 9;
            }
            _ => {}
        }
    }

    /// The operator on call: a held split brain must be reported on both sides; then the
    /// operator keeps the promoted site's data and the loser is failed back with save-aside.
    fn operator(&mut self) {
        self.recover_primary();
        let new = self.active;
        let old = OTHER[new];
        let held = matches!(&self.sites[new].core, Some(Core::Primary(p)) if p.split_brain());
        if !held {
            return;
        }
        let evidence = matches!(&self.sites[old].core, Some(Core::Secondary(x)) if x.split_brain_evidence());
        if !evidence {
            self.violate("split-brain", "held by the primary but not reported by its peer".into());
            return;
        }
        self.report.split_brains_detected += 1;
        let now = self.now;
        if let Some(p) = self.primary(new) {
            p.resolve_split_brain(now);
        }
        self.drain_actions(new);
    }

    fn promote(&mut self, s: SiteId, force: bool) {
        if let Err(e) = self.try_promote(s, force) {
            self.violate("promote", format!("promotion refused: {e}"));
        }
    }

    /// Promotes site `s` as an operator would: an amnesiac is refused, and the operator, whose
    /// primary is gone, forces it (the promotion is then loud).
    fn try_promote(&mut self, s: SiteId, force: bool) -> Result<(), geomirror_core::PromoteError> {
        let record: BTreeSet<ExtentId> = self.sites[s].store.durable().record.keys().copied().collect();
        let dirty: BTreeSet<ExtentId> = self.sites[s].store.durable().dirty.clone();
        let res = match &mut self.sites[s].core {
            Some(Core::Secondary(x)) => match x.promote(force) {
                Err(geomirror_core::PromoteError::Amnesiac | geomirror_core::PromoteError::NeverPaired) => x.promote(true),
                other => other,
            },
            _ => return Ok(()),
        };
        match res {
            Ok(report) => {
                self.report.promotions += 1;
                if !report.authoritative || !report.consistent || report.amnesiac {
                    self.report.loud_promotions += 1;
                    self.promoted_record = None;
                } else {
                    let mut r = record;
                    r.extend(dirty);
                    self.promoted_record = Some(r);
                }
            }
            Err(e) => return Err(e),
        }
        self.drain_actions(s);
        // Idempotence: promoting again while it is persisted is refused, not repeated.
        if let Some(Core::Secondary(x)) = &mut self.sites[s].core {
            if x.promote(true).is_ok() {
                self.violate("promote", "a second promotion was accepted".into());
            }
        }
        Ok(())
    }

    /// The host moves to the promoted site. O1: what it lost must lie in the record, or
    /// (`planned`, a switchover) nothing at all.
    fn switch_host_to(&mut self, s: SiteId, planned: bool) {
        let image = self.sites[s].media.current().to_vec();
        if !planned {
            let mut lost = 0;
            for (b, v) in image.iter().enumerate() {
                if self.host.indeterminate[b] || self.host.busy[b] > 0 {
                    continue;
                }
                if *v != self.host.current(b) {
                    let e = ExtentId(b as u64 * BLOCK / self.geo.extent_bytes());
                    // A site whose store went back, promoted before any handshake could find it
                    // out (its only witness, the primary, was lost too): it cannot know what it
                    // lost. The old primary finds out when it returns (`promoted_from`), and
                    // its failback saves aside whatever differs; O7 and O4 hold it to that.
                    let unknowing = self.amnesia[s].is_some_and(|w| !w.flagged);
                    match &self.promoted_record {
                        _ if unknowing => lost += 1,
                        Some(r) if r.contains(&e) => lost += 1,
                        Some(_) => {
                            self.violate("O1", format!("after promotion block {b} (extent {}) holds {v}, host was acked {}, and the extent is not in the durable record", e.0, self.host.current(b)));
                            return;
                        }
                        None => lost += 1, // reported loudly at promotion
                    }
                }
            }
            self.report.lost_acked_blocks_reported += lost;
        } else if (0..image.len()).any(|b| !self.host.indeterminate[b] && self.host.busy[b] == 0 && image[b] != self.host.current(b)) {
            self.violate("O1", "switchover lost acknowledged data".into());
            return;
        }
        // Outstanding requests to the old site fail from the host's point of view.
        let old = OTHER[s];
        let stale: Vec<RequestId> = self.outstanding.iter().filter(|(_, o)| o.site == old && !o.rogue).map(|(r, _)| *r).collect();
        for r in stale {
            self.abandoned.insert(r);
            let o = self.outstanding.remove(&r).expect("present");
            if let Some((first, stamps)) = &o.write {
                for b in *first..*first + stamps.len() {
                    self.host.busy[b] -= 1;
                }
            }
            self.schedule(Duration::from_micros(10), Ev::HostIssue);
        }
        self.active = s;
        self.host.rebase(&image);
        // The host's data is on this site from now on, whatever a fault did to its media.
        if let Some(w) = &mut self.amnesia[s] {
            w.blanked = false;
        }
        for b in 0..image.len() {
            if self.host.busy[b] > 0 {
                self.host.indeterminate[b] = true;
            }
        }
    }

    // ----- actions -----

    fn drain_actions(&mut self, s: SiteId) {
        loop {
            let action = match &mut self.sites[s].core {
                Some(Core::Primary(p)) => p.poll_action(),
                Some(Core::Secondary(x)) => x.poll_action(),
                None => None,
            };
            let Some(action) = action else { break };
            self.execute(s, action);
            if self.sites[s].core.is_none() {
                break;
            }
        }
        // Timers: one pending wake-up per site is enough, it re-arms itself.
        let t = match &self.sites[s].core {
            Some(Core::Primary(p)) => p.poll_timeout(),
            Some(Core::Secondary(x)) => x.poll_timeout(),
            None => None,
        };
        if let Some(t) = t {
            let life = self.sites[s].life;
            let at = t.max(self.now + Duration::from_micros(1));
            if self.armed[s].is_none_or(|(armed_at, armed_life)| at < armed_at || armed_life != life) {
                self.armed[s] = Some((at, life));
                self.schedule_at(at, Ev::Timer { site: s, life });
            }
        }
    }

    fn execute(&mut self, s: SiteId, action: Action) {
        let life = self.sites[s].life;
        if self.cfg.trace {
            eprintln!("{:>9}    site {s}: {}", self.now.0, brief_action(&action));
        }
        match action {
            Action::Send { stream, frame } => self.send(s, stream, frame),
            Action::Persist { token, batch } => {
                let batch = self.sites[s].store.stage(batch);
                let d = self.us(50, 800);
                let at = (self.now + d).max(self.sites[s].persist_done_at);
                self.sites[s].persist_done_at = at;
                self.schedule_at(at, Ev::PersistDone { site: s, life, token, batch });
            }
            Action::LocalWrite { token, seq, op } => {
                let epoch = match &self.sites[s].core {
                    Some(Core::Primary(p)) => p.epoch(),
                    _ => Epoch(0),
                };
                if let Some(other) = self.writers.get(&epoch) {
                    if *other != s {
                        self.violate("O5", format!("sites {other} and {s} both wrote in epoch {}", epoch.0));
                    }
                }
                self.writers.insert(epoch, s);
                let (first, stamps) = op_stamps(&op);
                self.sites[s].media.write_stamps(op.offset, &stamps);
                self.history[s].insert(seq.0, (first, stamps));
                self.model_cache = None;
                let d = self.us(20, 300);
                let at = (self.now + d).max(self.sites[s].media_done_at);
                self.sites[s].media_done_at = at;
                let ok = self.rng.gen_range(0..1_000_000) >= self.cfg.faults.media_error_ppm;
                self.report.media_errors += u64::from(!ok);
                self.schedule_at(at, Ev::LocalWriteDone { site: s, life, token, ok });
            }
            Action::ApplyWrite { seq, op } => {
                let (_, stamps) = op_stamps(&op);
                self.sites[s].media.write_stamps(op.offset, &stamps);
                self.last_applied_write[s] = seq.0;
                self.mix(seq.0);
            }
            Action::SaveAside { extent } => {
                let r = self.geo.extent_range(extent);
                let content = self.sites[s].media.read(r.start, r.end - r.start);
                self.sites[s].side.entry(extent).or_insert(content);
                self.report.saved_aside_extents += 1;
            }
            Action::VerifyExtent { token, extent, digests } => {
                let r = self.geo.extent_range(extent);
                let data = encode_stamps(&self.sites[s].media.read(r.start, r.end - r.start));
                let differing = geomirror_core::differing_blocks(&geomirror_core::block_digests(&data, r.end - r.start), &digests);
                self.report.extents_verified += 1;
                self.report.extents_verified_equal += u64::from(differing.iter().all(|b| *b == 0));
                let d = self.us(20, 400);
                let at = (self.now + d).max(self.sites[s].media_done_at);
                self.sites[s].media_done_at = at;
                self.schedule_at(at, Ev::VerifyDone { site: s, life, token, differing });
            }
            Action::ReadExtent { token, extent } => {
                let r = self.geo.extent_range(extent);
                let data = encode_stamps(&self.sites[s].media.read(r.start, r.end - r.start));
                let d = self.us(20, 400);
                let at = (self.now + d).max(self.sites[s].media_done_at);
                self.sites[s].media_done_at = at;
                self.schedule_at(at, Ev::ReadDone { site: s, life, token, data });
            }
            Action::SyncMedia { token } => {
                let snapshot = self.sites[s].media.snapshot();
                let applied_write = self.last_applied_write[s];
                let d = self.us(50, 2_000);
                let at = (self.now + d).max(self.sites[s].media_done_at);
                self.sites[s].media_done_at = at;
                self.schedule_at(at, Ev::SyncDone { site: s, life, token, snapshot, applied_write });
            }
            Action::Ack { request, result, .. } => self.on_ack(s, request, result),
            Action::Disconnect { reason } => {
                self.mix(reason.len() as u64);
                self.disconnect(true);
            }
            Action::RoleChanged { role } => {
                if role == Role::Secondary {
                    self.sites[s].pre_demotion = Some(self.sites[s].media.current().to_vec());
                    self.sites[s].side.clear();
                }
                self.sites[s].core = None;
                self.boot(s);
                self.disconnect(true);
            }
        }
    }

    fn send(&mut self, from: SiteId, stream: Stream, frame: Frame) {
        if !self.link_up {
            return;
        }
        let bytes = match encode(&frame) {
            Ok(b) => b,
            Err(e) => {
                self.violate("codec", format!("frame failed to encode: {e}"));
                return;
            }
        };
        if self.rng.gen_range(0..1_000_000) < self.cfg.faults.drop_mid_frame_ppm && !self.quiescing {
            // The connection dies with this frame half sent.
            self.report.link_cuts += 1;
            self.disconnect(true);
            return;
        }
        let to = OTHER[from];
        let (lo, hi) = self.cfg.delay_us;
        let d = self.us(lo, hi);
        // Bulk data serialises on the link at its bandwidth; control frames use their own
        // connection and never queue behind it.
        let mut leave = self.now;
        if let (Stream::Data(_) | Stream::Resync, Some(rate)) = (stream, self.cfg.link_bytes_per_sec) {
            let busy = self.link_busy_until[from].max(self.now);
            leave = busy + Duration::from_micros((bytes.len() as u64 * 1_000_000).div_ceil(rate.max(1)));
            self.link_busy_until[from] = leave;
        }
        let last = self.last_delivery.get(&(from, stream)).copied().unwrap_or(Time::ZERO);
        let at = (leave + d).max(last);
        self.last_delivery.insert((from, stream), at);
        let conn = self.conn;
        self.schedule_at(at, Ev::Deliver { to, conn, bytes });
    }

    // ----- the end of a run -----

    fn workload_done(&self) -> bool {
        self.issued >= self.cfg.writes
            && self.outstanding.values().all(|o| o.rogue)
            && (self.cfg.scenario == Scenario::Steady
                || self.scenario_stage >= 9
                || self.scenario_stage == 5 && self.cfg.scenario == Scenario::Failover)
    }

    fn begin_quiesce(&mut self) {
        self.quiescing = true;
        let a = self.active;
        if let Some(p) = self.primary(a) {
            self.report.failback_debt_bytes = p.failback_debt().bytes;
        }
        // Faults stop: everyone up, link healed.
        for s in 0..2 {
            if self.sites[s].core.is_none() {
                self.schedule(Duration::from_micros(100), Ev::Restart { site: s });
            }
        }
        self.cut_id += 1;
        let cut_id = self.cut_id;
        self.schedule(Duration::from_micros(200), Ev::Heal { cut_id });
    }

    fn final_checks(&mut self) {
        let a = self.active;
        let b = OTHER[a];
        if self.sites.iter().any(|s| s.core.is_none()) {
            self.violate("O6", "a site is still down after faults stopped".into());
            return;
        }
        let (stats, drained, split, copy_len) = match &self.sites[a].core {
            Some(Core::Primary(p)) => (p.stats().clone(), p.is_drained(), p.split_brain(), p.record_copy().len() as u64),
            _ => {
                self.violate("O6", "the active site is not primary at the end".into());
                return;
            }
        };
        if split {
            self.violate("O6", "split brain still held at the end".into());
            return;
        }
        self.report.hits = stats.hits;
        self.report.misses = stats.misses;
        self.report.resyncs = stats.resyncs_started;
        self.report.evicted_generations = stats.evicted_generations;
        self.report.degraded_writes = stats.degraded_writes;
        self.report.failback_bytes = stats.resync_bytes_copied;
        self.report.final_record_len = copy_len;
        self.report.scenario_done = self.cfg.scenario == Scenario::Steady || self.scenario_stage >= 5;
        if !drained {
            self.violate("O6", format!("not drained after faults stopped: lag {} bytes, {} writes waiting", stats.lag_bytes, stats.writes));
            return;
        }
        // O4: byte-identical images once drained.
        if self.sites[a].media.current() != self.sites[b].media.current() {
            let diff = (0..self.sites[a].media.blocks()).find(|i| self.sites[a].media.current()[*i] != self.sites[b].media.current()[*i]);
            self.violate("O4", format!("images differ after drain, first at block {diff:?}"));
            return;
        }
        let cap = self.cfg.core.record_capacity_extents;
        // The record stays within its capacity, or one write's span when a single write is
        // larger than the whole capacity (the largest write here is twice `write_bytes`).
        let span = (2 * self.cfg.write_bytes).div_ceil(self.cfg.extent_bytes) + 1;
        if self.cfg.core.mode == geomirror_core::Mode::Predictive && self.report.max_record_len > cap.max(span) {
            self.violate("record", format!("record reached {} extents, capacity {cap}", self.report.max_record_len));
            return;
        }
        if self.cfg.core.mode == geomirror_core::Mode::Predictive && copy_len > cap {
            self.violate("O6", format!("record holds {copy_len} extents after faults stopped, capacity {cap}"));
            return;
        }
        if self.cfg.scenario == Scenario::SplitBrain && self.report.split_brains_detected > 0 {
            let old = OTHER[self.active];
            for e in &self.rogue_extents {
                if !self.sites[old].side.contains_key(e) && self.sites[old].pre_demotion.is_some() {
                    let r = self.geo.extent_range(*e);
                    let pre = self.sites[old].pre_demotion.as_ref().expect("checked");
                    let (f, n) = ((r.start / BLOCK) as usize, ((r.end - r.start) / BLOCK) as usize);
                    if pre[f..f + n] != self.sites[old].media.current()[f..f + n] {
                        self.violate(
                            "split-brain",
                            format!("extent {} written on the losing side was overwritten without being saved aside", e.0),
                        );
                        return;
                    }
                }
            }
        }
    }

    // ----- the oracles, after every event -----

    fn check_all(&mut self) {
        self.watch_amnesia();
        if self.amnesia.iter().all(Option::is_none) {
            self.check_r();
        }
        self.check_o7();
        self.check_o1();
        self.check_o3();
        self.check_save_aside();
    }

    /// O2, invariant R: every extent where the media may differ is in a durable record (or a
    /// durable dirty map, which in predictive mode exists only after a degrade or promotion).
    /// Judged on synced store contents only, for every combination of what a crash would keep.
    fn check_r(&mut self) {
        let (sa, sb) = (&self.sites[0], &self.sites[1]);
        let mut covered: BTreeSet<u64> = BTreeSet::new();
        for s in [sa, sb] {
            covered.extend(s.store.durable().record.keys().map(|e| e.0));
            covered.extend(s.store.durable().dirty.iter().map(|e| e.0));
        }
        let per_extent = (self.geo.extent_bytes() / BLOCK) as usize;
        let images = [
            (sa.media.current(), sb.media.current()),
            (sa.media.durable(), sb.media.durable()),
            (sa.media.current(), sb.media.durable()),
            (sa.media.durable(), sb.media.current()),
        ];
        let mut bad = None;
        'outer: for (x, y) in images {
            if x == y {
                continue;
            }
            for (i, (p, q)) in x.iter().zip(y.iter()).enumerate() {
                if p != q && !covered.contains(&((i / per_extent) as u64)) {
                    let e = i / per_extent;
                    bad = Some(format!(
                        "block {i} (extent {e}) differs between the sites ({p} vs {q}) but no durable record or dirty map holds extent {e}"
                    ));
                    break 'outer;
                }
            }
        }
        if let Some(detail) = bad {
            self.violate("O2", detail);
        }
    }

    /// O1 while the primary lives: what the host was acknowledged is on the primary's media.
    fn check_o1(&mut self) {
        let a = self.active;
        // A site whose store or media a fault took is not the primary that acknowledged the
        // host's writes; the host finds them on its peer (checked at the promotion).
        if !self.is_primary(a) || self.amnesia[a].is_some_and(|w| w.blanked) {
            return;
        }
        let img = self.sites[a].media.current();
        for (b, v) in img.iter().enumerate() {
            if self.host.busy[b] == 0 && !self.host.indeterminate[b] && *v != self.host.current(b) {
                let want = self.host.current(b);
                self.violate("O1", format!("primary block {b} holds {v} but the host was acknowledged {want}"));
                return;
            }
        }
    }

    /// O3: a consistent secondary image equals the primary's history up to the last write
    /// it applied.
    fn check_o3(&mut self) {
        let a = self.active;
        let b = OTHER[a];
        // A store a fault took back in time claims what it no longer knows until the
        // handshake finds it out, and a primary's may hand out sequence numbers again (the
        // history the model replays is then ambiguous) until it steps down: see `amnesia.rs`.
        let consistent = self.sites[b].store.durable().consistent
            && matches!(self.sites[b].core, Some(Core::Secondary(_)))
            && self.amnesia.iter().all(Option::is_none);
        if !consistent || !self.sites[b].was_consistent {
            self.sites[b].was_consistent = consistent && self.sites[b].core.is_some();
            return;
        }
        let k = self.last_applied_write[b];
        if k == 0 {
            return;
        }
        let model = self.model_at(a, k);
        let img = self.sites[b].media.current();
        if let Some(i) = (0..img.len()).find(|i| img[*i] != model[*i]) {
            self.violate(
                "O3",
                format!(
                    "secondary image is not a prefix of the history at seq {k}: block {i} holds {} where the history has {}",
                    img[i], model[i]
                ),
            );
        }
    }

    /// The image site `s`'s history gives at sequence `k`: the base of the incarnation that
    /// issued `k`, plus that incarnation's writes through `k`.
    fn model_at(&mut self, s: SiteId, k: u64) -> Vec<u64> {
        let (base_idx, base_seq) =
            self.bases[s].iter().enumerate().filter(|(_, (b, _))| *b <= k).map(|(i, (b, _))| (i, *b)).next_back().unwrap_or((0, 0));
        let (from, mut img) = match self.model_cache.take() {
            Some((cs, ci, ck, img)) if cs == s && ci == base_idx && ck <= k => (ck, img),
            _ => (base_seq, self.bases[s][base_idx].1.clone()),
        };
        if from < k {
            for (_, (first, stamps)) in self.history[s].range(from + 1..=k) {
                img[*first..*first + stamps.len()].copy_from_slice(stamps);
            }
        }
        self.model_cache = Some((s, base_idx, k, img.clone()));
        img
    }

    /// A demoted site saves aside what it held before the failback overwrites it: checked
    /// when it becomes consistent again.
    fn check_save_aside(&mut self) {
        for s in 0..2 {
            let consistent = self.sites[s].store.durable().consistent;
            let Some(pre) = self.sites[s].pre_demotion.clone() else {
                continue;
            };
            if !consistent || !matches!(self.sites[s].core, Some(Core::Secondary(_))) {
                continue;
            }
            let per_extent = (self.geo.extent_bytes() / BLOCK) as usize;
            let img = self.sites[s].media.current().to_vec();
            for e in 0..self.geo.extent_count() as usize {
                let (f, n) = (e * per_extent, per_extent.min(pre.len() - e * per_extent));
                if pre[f..f + n] == img[f..f + n] {
                    continue;
                }
                // Changed since demotion: its old content must be saved, unless that content
                // was already on the winning side's history (nothing of the loser's own).
                if let Some(saved) = self.sites[s].side.get(&ExtentId(e as u64)) {
                    if saved[..] != pre[f..f + n] {
                        self.violate("save-aside", format!("site {s} saved extent {e} with content other than it held at demotion"));
                        return;
                    }
                } else if self.rogue_extents.contains(&ExtentId(e as u64)) {
                    self.violate("save-aside", format!("site {s} overwrote extent {e}, written while split, without saving it aside"));
                    return;
                }
            }
            self.sites[s].pre_demotion = None;
        }
    }
}

fn brief_event(ev: &Ev) -> String {
    match ev {
        Ev::Deliver { to, conn, bytes } => match decode(bytes) {
            Ok((f, _)) => format!("deliver to {to} (conn {conn}): {}", brief_frame(&f)),
            Err(e) => format!("deliver to {to}: undecodable {e}"),
        },
        Ev::SyncDone { site, token, applied_write, .. } => format!("sync done site {site} {token:?} write {applied_write}"),
        Ev::ReadDone { site, token, .. } => format!("read done site {site} {token:?}"),
        other => format!("{other:?}"),
    }
}

fn brief_frame(f: &Frame) -> String {
    match f {
        Frame::Data { seq, apply: geomirror_core::frame::Apply::Write(op), .. } => {
            format!("data seq {} write {}+{}", seq.0, op.offset, op.len)
        }
        Frame::Data { seq, apply, .. } => format!("data seq {} {apply:?}", seq.0),
        other => format!("{other:?}"),
    }
}

fn brief_action(a: &Action) -> String {
    match a {
        Action::Send { stream, frame } => format!("send {stream:?} {}", brief_frame(frame)),
        Action::LocalWrite { token, seq, op } => {
            format!("local write {token:?} seq {} {}+{} stamp {}", seq.0, op.offset, op.len, op_stamps(op).1.first().map_or(0, |s| s >> 16))
        }
        Action::ApplyWrite { seq, op } => {
            format!("apply seq {} {}+{} stamp {}", seq.0, op.offset, op.len, op_stamps(op).1.first().map_or(0, |s| s >> 16))
        }
        Action::Persist { token, batch } if batch.len() > 6 => format!("persist {token:?} {} writes {:?}..", batch.len(), &batch[..6]),
        other => format!("{other:?}"),
    }
}

fn op_stamps(op: &WriteOp) -> (usize, Vec<u64>) {
    let first = (op.offset / BLOCK) as usize;
    let n = (op.len / BLOCK) as usize;
    match &op.kind {
        WriteKind::Data(b) => (first, decode_stamps(b)),
        WriteKind::Zero | WriteKind::Trim => (first, vec![0; n]),
    }
}

/// Runs one seed with its drawn configuration.
pub fn run_seed(seed: u64) -> SimReport {
    World::new(SimConfig::for_seed(seed)).run()
}

/// Runs a configuration.
pub fn run(cfg: SimConfig) -> SimReport {
    World::new(cfg).run()
}
