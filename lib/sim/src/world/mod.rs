//! The simulated world: two sites, a network between them, a host, faults, and the oracles.
//!
//! Owns: virtual time and the event queue, the dispatch of each event to the part of the
//! world it concerns, the end of a run (faults stop, everything drains, then the final
//! checks) and the report. The parts: `config.rs` (what a seed draws), `shells.rs` (the
//! shells around each site's core and the link between them), `host.rs` (the host's writes,
//! flushes and what it was acknowledged), `scenario.rs` (random faults and the operator's
//! drills), `oracles.rs` (the oracles of docs/architecture.md, checked after every event against state
//! kept outside the core) and `amnesia.rs` (store faults and oracle O7).
//! Must not: peek into the core to decide whether the core is right. The core's accessors are
//! used only to drive operator actions (is it drained, is it split-brained), never as oracles.

use crate::media::BLOCK;
use crate::workload::Generator;
use bytes::Bytes;
use geomirror_core::frame::decode;
use geomirror_core::{Epoch, ExtentId, Geometry, RequestId, Role, Stream, Time, Token};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

mod amnesia;
mod config;
mod host;
mod initial;
mod oracles;
mod scenario;
mod shells;
mod verify;

pub use config::{Faults, Initial, SimConfig};
pub use scenario::Scenario;

use host::Outstanding;
use oracles::HostView;
use scenario::{Stage, Step};
use shells::{brief_frame, Site, SiteId};

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
    /// The run started from an adopted volume (`Initial::Adopted`), and how many times O8
    /// probed a secondary owed a full verified resync.
    pub adopted: bool,
    pub o8_probes: u64,
    /// Full verified resyncs that resumed from the peer's durable sync cursor, and the link
    /// cuts an adopted run made while one was owed.
    pub sync_resumes: u64,
    pub sync_cuts: u64,
    /// Online verifies an operator started (the final one included), and blocks rot
    /// changed on the secondary's disk (`verify.rs`).
    pub verifies: u64,
    pub verifies_cancelled: u64,
    pub rotted_blocks: u64,
    /// Extents the final primary's verifies found different.
    pub verify_found: u64,
    /// Full syncs onto a replaced store an operator approved (after a refused wrong store).
    pub rebuilds_approved: u64,
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
    /// The operator approves the full sync onto the replaced peer store the primary of site
    /// `site` waits for (`amnesia.rs`).
    ApproveRebuild {
        site: SiteId,
    },
    StoreLoss {
        site: SiteId,
        blank: bool,
    },
    /// A crash after which the store holds an earlier durable state.
    HiddenRollback {
        site: SiteId,
    },
    StoreRollback {
        site: SiteId,
    },
    /// The middle of the run: the scenario's drill begins.
    Scenario,
    /// The drill's next step.
    Step(Step),
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
    /// How far the scenario's drill has come.
    stage: Stage,
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
    /// Per site: where oracle O8 stands (`initial.rs`).
    sync_watch: [initial::SyncWatch; 2],
    /// An approval of a rebuild is scheduled (`amnesia.rs`).
    approval_scheduled: bool,
    /// Blocks rot changed (`verify.rs`), how many rotted, and how many final verifies ran.
    rotted: BTreeSet<usize>,
    rot_count: u64,
    final_verifies: u8,
}

const OTHER: [SiteId; 2] = [1, 0];

impl World {
    pub fn new(cfg: SimConfig) -> World {
        let geo = Geometry::new(cfg.volume_bytes, cfg.extent_bytes).expect("simulation geometry is valid");
        cfg.core.validate().expect("simulation core config is valid");
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut id_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x1d_1d_1d);
        let blocks = (cfg.volume_bytes / BLOCK) as usize;
        let mut mk = |role| Site::new(role, geomirror_core::StoreId(id_rng.gen()), cfg.volume_bytes);
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
            stage: Stage::NotStarted,
            promoted_record: None,
            report: SimReport { seed: cfg.seed, ..SimReport::default() },
            hash: 0xcbf2_9ce4_8422_2325,
            quiescing: false,
            event_count: 0,
            id_rng,
            amnesia: [None, None],
            recovery: None,
            sync_watch: Default::default(),
            approval_scheduled: false,
            rotted: BTreeSet::new(),
            rot_count: 0,
            final_verifies: 0,
            cfg,
        };
        if let config::Initial::Adopted { filled_permille, seeded, seed_diff_permille } = w.cfg.initial {
            w.adopt_start(filled_permille, seeded, seed_diff_permille);
        }
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
        loop {
            self.run_queue();
            // Once everything has settled: the final verify (if any), then the end checks.
            if !self.final_verify() {
                break;
            }
        }
        if self.report.violations.is_empty() {
            self.final_checks();
        }
        self.report.events = self.event_count;
        self.report.trace_hash = self.hash;
        self.report
    }

    fn run_queue(&mut self) {
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
                self.note_sync_frame(to, &frame);
                self.with_core(to, |c, now| c.handle_frame(now, frame));
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
                self.with_core(site, |c, now| c.handle_persisted(now, token));
            }
            Ev::LocalWriteDone { site, life, token, ok } => {
                if life == self.sites[site].life {
                    self.with_core(site, |c, now| c.handle_local_write_done(now, token, ok));
                }
            }
            Ev::SyncDone { site, life, token, snapshot, applied_write } => {
                if life != self.sites[site].life {
                    return;
                }
                self.sites[site].media.make_durable(snapshot);
                self.synced_applied_write[site] = applied_write;
                self.with_core(site, |c, now| c.handle_media_synced(now, token));
            }
            Ev::ReadDone { site, life, token, data } => {
                if life == self.sites[site].life {
                    self.with_core(site, |c, now| c.handle_read_done(now, token, data));
                }
            }
            Ev::VerifyDone { site, life, token, differing } => {
                if life == self.sites[site].life {
                    self.with_core(site, |c, now| c.handle_verified(now, token, differing));
                }
            }
            Ev::Timer { site, life } => {
                if self.armed[site] == Some((self.now, life)) {
                    self.armed[site] = None;
                }
                if life == self.sites[site].life {
                    self.with_core(site, |c, now| {
                        if c.poll_timeout().is_some_and(|t| t <= now) {
                            c.handle_timeout(now)
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
                    self.with_core(s, |c, now| c.handle_connected(now));
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
            Ev::ApproveRebuild { site } => self.approve_rebuild(site),
            Ev::StoreLoss { site, blank } => self.store_loss(site, blank),
            Ev::StoreRollback { site } => self.store_rollback(site),
            Ev::HiddenRollback { site } => self.hidden_rollback(site),
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

    // ----- the end of a run -----

    fn workload_done(&self) -> bool {
        self.issued >= self.cfg.writes
            && self.outstanding.values().all(|o| o.rogue)
            && (self.cfg.scenario == Scenario::Steady
                || self.stage == Stage::Over
                || self.stage == Stage::Promoted && self.cfg.scenario == Scenario::Failover)
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

/// Runs one seed with its drawn configuration.
pub fn run_seed(seed: u64) -> SimReport {
    World::new(SimConfig::for_seed(seed)).run()
}

/// Runs a configuration.
pub fn run(cfg: SimConfig) -> SimReport {
    World::new(cfg).run()
}
