//! Scenarios of the write path, driven by hand, step by step, so each ordering rule of
//! the write path (docs/protocol.md) is visible in a few lines. The simulation explores the same rules at random;
//! these pin them down one at a time.

use bytes::Bytes;
use geomirror_core::frame::{Apply, Frame, Stream};
use geomirror_core::{
    Action, CoreConfig, Geometry, HostError, MemStore, Phase, Primary, RequestId, Role, Secondary, SiteState, StoreId, Time, Token,
    WriteOp, WritePath,
};

const MIB: u64 = 1 << 20;

/// Two sites with instant, in-order delivery; stores and media complete only when a test
/// says so, so that the test can look in between.
struct Pair {
    now: Time,
    primary: Primary,
    secondary: Secondary,
    p_store: MemStore,
    s_store: MemStore,
    /// Primary actions not yet acted on, in order.
    p_out: Vec<Action>,
    /// The stream of every data frame the primary sent, and whether it was a host write.
    p_data: Vec<(Stream, bool)>,
    /// Every data item the primary sent, with its sequence number.
    p_items: Vec<(u64, Apply)>,
    /// Extents whose content on the secondary differs from the primary's in their third
    /// 4 KiB block, for failback checks (this harness has no media).
    s_differs: std::collections::BTreeSet<u64>,
}

impl Pair {
    fn new() -> Pair {
        Pair::with(CoreConfig::default())
    }

    fn with(cfg: CoreConfig) -> Pair {
        Pair::from_states(cfg, SiteState::fresh(Role::Primary, StoreId(1)), SiteState::fresh(Role::Secondary, StoreId(2)))
    }

    /// Two sites restarted from the given durable states.
    fn from_states(cfg: CoreConfig, p_state: SiteState, s_state: SiteState) -> Pair {
        let geo = Geometry::new(64 * MIB, MIB).unwrap();
        let mut pair = Pair {
            now: Time(1),
            primary: Primary::new(cfg.clone(), geo, &p_state, Time(1)),
            secondary: Secondary::new(cfg, geo, &s_state),
            p_store: MemStore::new(p_state),
            s_store: MemStore::new(s_state),
            p_out: Vec::new(),
            p_data: Vec::new(),
            p_items: Vec::new(),
            s_differs: Default::default(),
        };
        pair.collect();
        pair
    }

    fn tick(&mut self) {
        self.now = Time(self.now.0 + 100);
    }

    /// Moves primary actions into `p_out` and runs the secondary to quiescence, completing
    /// its stores and media at once and delivering its frames to the primary.
    fn collect(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(a) = self.primary.poll_action() {
                progressed = true;
                match a {
                    Action::Send { stream, frame } => {
                        if let Frame::Data { apply, seq, .. } = &frame {
                            self.p_data.push((stream, matches!(apply, Apply::Write(w) if w.offset % MIB != 0)));
                            self.p_items.push((seq.0, apply.clone()));
                        }
                        let now = self.now;
                        self.secondary.handle_frame(now, frame);
                    }
                    other => self.p_out.push(other),
                }
            }
            while let Some(a) = self.secondary.poll_action() {
                progressed = true;
                let now = self.now;
                match a {
                    Action::Send { frame, .. } => self.primary.handle_frame(now, frame),
                    Action::Persist { token, batch } => {
                        let n = self.s_store.stage(batch);
                        self.s_store.sync_through(n);
                        self.secondary.handle_persisted(now, token);
                    }
                    Action::SyncMedia { token } => self.secondary.handle_media_synced(now, token),
                    Action::VerifyExtent { token, extent, digests } => {
                        // Block 2 of each extent named in `s_differs` differs.
                        let mut mine = digests.clone();
                        if self.s_differs.contains(&extent.0) {
                            mine[2][0] ^= 1;
                        }
                        let differing = geomirror_core::differing_blocks(&mine, &digests);
                        self.secondary.handle_verified(now, token, differing)
                    }
                    _ => {}
                }
            }
            if !progressed {
                break;
            }
        }
    }

    /// Completes every primary store batch emitted so far.
    /// Completes every store write of the primary, and those they lead to (a write resting on
    /// a new record answer waits for the primary's memory of the peer to be persisted).
    fn persist_primary(&mut self) {
        for _ in 0..64 {
            let batches: Vec<(Token, Vec<_>)> = take(&mut self.p_out, |a| matches!(a, Action::Persist { .. }))
                .into_iter()
                .map(|a| match a {
                    Action::Persist { token, batch } => (token, batch),
                    _ => unreachable!(),
                })
                .collect();
            if batches.is_empty() {
                return;
            }
            for (token, batch) in batches {
                let n = self.p_store.stage(batch);
                self.p_store.sync_through(n);
                let now = self.now;
                self.primary.handle_persisted(now, token);
            }
            self.collect();
        }
        panic!("the primary's store writes never settle");
    }

    fn connect(&mut self) {
        let now = self.now;
        self.secondary.handle_connected(now);
        self.primary.handle_connected(now);
        self.collect();
    }

    fn write(&mut self, id: u64, offset: u64, len: u64) {
        let now = self.now;
        self.primary.handle_host_write(now, RequestId(id), WriteOp::data(offset, Bytes::from(vec![7u8; len as usize])), false);
        self.collect();
    }

    fn local_writes(&self) -> Vec<Token> {
        self.p_out.iter().filter_map(|a| if let Action::LocalWrite { token, .. } = a { Some(*token) } else { None }).collect()
    }

    fn acks(&self) -> Vec<(RequestId, Result<(), HostError>)> {
        self.p_out
            .iter()
            .filter_map(|a| if let Action::Ack { request, result, .. } = a { Some((*request, *result)) } else { None })
            .collect()
    }

    /// The path each write's ack named.
    fn ack_paths(&self) -> Vec<(RequestId, Option<WritePath>)> {
        self.p_out.iter().filter_map(|a| if let Action::Ack { request, path, .. } = a { Some((*request, *path)) } else { None }).collect()
    }

    fn finish_local_writes(&mut self) {
        for t in self.local_writes() {
            let now = self.now;
            self.primary.handle_local_write_done(now, t, true);
        }
        self.p_out.retain(|a| !matches!(a, Action::LocalWrite { .. }));
        self.collect();
    }
}

fn take(v: &mut Vec<Action>, f: impl Fn(&Action) -> bool) -> Vec<Action> {
    let (out, keep): (Vec<Action>, Vec<Action>) = v.drain(..).partition(|a| f(a));
    *v = keep;
    out
}

fn started_and_connected() -> Pair {
    let mut p = Pair::new();
    p.persist_primary(); // the new incarnation
    assert_eq!(p.primary.phase(), Phase::Serving);
    p.connect();
    p.persist_primary();
    p
}

#[test]
fn a_miss_reaches_media_only_after_the_record_answer_and_is_acked_after_both() {
    let mut p = Pair::new();
    p.persist_primary();
    // Not connected yet: the write waits, with nothing on local media.
    p.write(1, 5 * MIB, 4096);
    assert!(p.local_writes().is_empty(), "a miss must not reach media before the record covers it");
    p.connect();
    p.persist_primary();
    // The handshake, the record update and its synced answer all ran: now the write may go.
    assert_eq!(p.local_writes().len(), 1);
    assert!(p.s_store.durable().record.contains_key(&geomirror_core::ExtentId(5)), "the extent is durably recorded first");
    assert!(p.acks().is_empty(), "no ack before the local write is done");
    p.finish_local_writes();
    assert_eq!(p.acks(), vec![(RequestId(1), Ok(()))]);
    assert_eq!(p.ack_paths(), vec![(RequestId(1), Some(WritePath::Miss))], "the ack says the write waited for the record");
    assert_eq!(p.primary.stats().misses, 1);
}

#[test]
fn a_hit_sends_no_record_update_and_acks_after_the_local_write() {
    let mut p = started_and_connected();
    p.write(1, 9 * MIB, 4096);
    // (the miss rests on a new answer: the primary's memory of it is persisted first)
    p.persist_primary();
    p.finish_local_writes();
    let updates_before = p.primary.stats().record_updates_sent;
    // Same extent again: a hit.
    p.tick();
    p.write(2, 9 * MIB + 8192, 4096);
    assert_eq!(p.local_writes().len(), 1, "a hit goes to media at once");
    assert_eq!(p.primary.stats().record_updates_sent, updates_before, "a hit sends no record update");
    p.finish_local_writes();
    assert!(p.acks().contains(&(RequestId(2), Ok(()))));
    assert!(p.ack_paths().contains(&(RequestId(2), Some(WritePath::Hit))), "the ack says the write was a hit: {:?}", p.ack_paths());
    assert_eq!(p.primary.stats().hits, 1);
}

#[test]
fn writes_out_of_range_are_refused_without_touching_media() {
    let mut p = started_and_connected();
    let now = p.now;
    p.primary.handle_host_write(now, RequestId(9), WriteOp::data(64 * MIB - 4096, Bytes::from(vec![0u8; 8192])), false);
    p.primary.handle_host_write(now, RequestId(10), WriteOp::zero(u64::MAX - 10, 100), false);
    p.collect();
    assert!(p.local_writes().is_empty());
    assert_eq!(p.acks(), vec![(RequestId(9), Err(HostError::OutOfRange)), (RequestId(10), Err(HostError::OutOfRange))]);
}

#[test]
fn a_switchover_drain_is_refused_while_the_primary_is_still_starting() {
    // Found by a 15,000-seed soak: a switchover that began while a restarted primary was
    // persisting its incarnation drained nothing, and the demotion was then refused.
    let mut p = Pair::new();
    assert_eq!(p.primary.phase(), Phase::Starting);
    assert_eq!(p.primary.begin_drain(), Err(HostError::NotServing));
    p.persist_primary();
    assert_eq!(p.primary.begin_drain(), Ok(()));
    assert_eq!(p.primary.phase(), Phase::Draining);
    // New writes are refused while draining; the host retries on the new primary.
    p.write(1, 0, 4096);
    assert_eq!(p.acks(), vec![(RequestId(1), Err(HostError::NotServing))]);
}

#[test]
fn a_stale_epoch_frame_is_refused_and_never_applied() {
    let mut p = started_and_connected();
    let applied_before = p.secondary.applied();
    let now = p.now;
    p.secondary.handle_frame(
        now,
        Frame::Data {
            epoch: geomirror_core::Epoch(0),
            seq: geomirror_core::Seq(applied_before.0 + 1),
            apply: geomirror_core::frame::Apply::Write(WriteOp::zero(0, 4096)),
        },
    );
    let mut disconnected = false;
    while let Some(a) = p.secondary.poll_action() {
        assert!(!matches!(a, Action::ApplyWrite { .. }), "a stale frame reached media");
        disconnected |= matches!(a, Action::Disconnect { .. });
    }
    assert!(disconnected, "the stale peer is refused");
    assert_eq!(p.secondary.applied(), applied_before);
}

#[test]
fn neither_role_change_carries_a_stale_request_to_save_aside() {
    // A site fenced before it learned its record is asked, durably, to save aside everything
    // the next resync overwrites. Once it becomes the primary, by promotion, its image is the
    // one kept; and once a planned demotion hands over a peer that holds everything, there is
    // nothing of its own to keep. Either way the request must not outlive the role change,
    // or a much later failback would save aside the whole volume.
    for demote in [false, true] {
        let mut p_state = SiteState::fresh(Role::Primary, StoreId(1));
        let mut s_state = SiteState::fresh(Role::Secondary, StoreId(2));
        if demote {
            p_state.save_aside_on_resync = true;
        } else {
            s_state.save_aside_on_resync = true;
        }
        let mut p = Pair::from_states(CoreConfig::default(), p_state, s_state);
        p.persist_primary();
        p.connect();
        p.persist_primary();
        p.write(1, 3 * MIB, 4096);
        // (the miss rests on a new answer: the primary's memory of it is persisted first)
        p.persist_primary();
        p.finish_local_writes();
        p.persist_primary();
        if demote {
            assert_eq!(p.primary.begin_drain(), Ok(()));
            p.collect();
            assert!(p.primary.is_drained());
            assert_eq!(p.primary.demote(), Ok(()));
            p.collect();
            p.persist_primary();
            let durable = p.p_store.durable();
            assert_eq!(durable.role, Role::Secondary);
            assert!(!durable.save_aside_on_resync, "a planned demotion clears the request");
        } else {
            p.secondary.promote(true).expect("a forced promotion");
            p.collect();
            let durable = p.s_store.durable();
            assert_eq!(durable.role, Role::Primary);
            assert!(!durable.save_aside_on_resync, "a promotion clears the request");
        }
    }
}

/// Drives a lone primary (no peer connected) until `until`: completes its stores and local
/// writes at once, fires its timers, and returns the acknowledgements it gave.
fn run_alone(primary: &mut Primary, store: &mut MemStore, from: Time, until: Time) -> Vec<(RequestId, Result<(), HostError>)> {
    let mut acks = Vec::new();
    let mut now = from;
    loop {
        while let Some(a) = primary.poll_action() {
            match a {
                Action::Persist { token, batch } => {
                    let n = store.stage(batch);
                    store.sync_through(n);
                    primary.handle_persisted(now, token);
                }
                Action::LocalWrite { token, .. } => primary.handle_local_write_done(now, token, true),
                Action::SyncMedia { token } => primary.handle_media_synced(now, token),
                Action::Ack { request, result, .. } => acks.push((request, result)),
                _ => {}
            }
        }
        match primary.poll_timeout() {
            Some(t) if t <= until => {
                now = t.max(now);
                primary.handle_timeout(now);
            }
            _ => return acks,
        }
    }
}

#[test]
fn a_promoted_primary_writes_alone_under_block_while_its_failback_is_pending() {
    // After a disaster the promoted site has no peer. Under `block` an ordinary primary holds
    // a miss and fails it at the deadline; a promoted one whose failback is pending tracks it
    // in its dirty map (the failback set) and acknowledges it: there is no secondary record
    // to protect, and refusing writes would make the promotion useless.
    let geo = Geometry::new(64 * MIB, MIB).unwrap();
    let cfg = CoreConfig::default();
    assert_eq!(cfg.on_link_loss, geomirror_core::LinkLossPolicy::Block);
    for promoted in [false, true] {
        let mut state = SiteState::fresh(Role::Primary, StoreId(1));
        state.epoch = geomirror_core::Epoch(2);
        state.failback_pending = promoted;
        let mut store = MemStore::new(state.clone());
        let mut primary = Primary::new(cfg.clone(), geo, &state, Time(1));
        run_alone(&mut primary, &mut store, Time(1), Time(1));
        assert_eq!(primary.phase(), Phase::Serving);
        primary.handle_host_write(Time(2), RequestId(1), WriteOp::data(10 * MIB, Bytes::from(vec![1u8; 4096])), false);
        let end = Time(2 + cfg.link_loss_deadline.as_micros() as u64 + 1);
        let acks = run_alone(&mut primary, &mut store, Time(2), end);
        if promoted {
            assert_eq!(acks, vec![(RequestId(1), Ok(()))], "a promoted primary acknowledges alone");
            assert!(primary.local_dirty().contains(&geomirror_core::ExtentId(10)), "and tracks the extent for the failback");
            assert!(store.durable().dirty.contains(&geomirror_core::ExtentId(10)), "durably");
        } else {
            assert_eq!(acks, vec![(RequestId(1), Err(HostError::LinkDown))], "an ordinary primary under block fails the miss");
            assert!(primary.local_dirty().is_empty());
        }
    }
}

#[test]
fn the_lag_in_seconds_is_the_age_of_the_oldest_write_the_peer_has_not_applied() {
    let mut p = started_and_connected();
    p.write(1, 9 * MIB, 4096);
    p.finish_local_writes();
    p.persist_primary();
    assert_eq!(p.primary.behind_since(), None, "everything applied: no lag");
    // The next two writes are hits whose data frames are lost on the way.
    let lose = |p: &mut Pair, id: u64| {
        let now = p.now;
        p.primary.handle_host_write(now, RequestId(id), WriteOp::data(9 * MIB + id * 4096, Bytes::from(vec![1u8; 4096])), false);
        while let Some(a) = p.primary.poll_action() {
            if !matches!(a, Action::Send { .. }) {
                p.p_out.push(a);
            }
        }
        p.finish_local_writes();
    };
    p.tick();
    let first_unapplied = p.now;
    lose(&mut p, 2);
    for _ in 0..50 {
        p.tick();
    }
    lose(&mut p, 3);
    assert!(p.acks().contains(&(RequestId(3), Ok(()))), "hits are acknowledged before the peer applies them");
    assert_eq!(p.primary.behind_since(), Some(first_unapplied), "the lag runs from the older of the two");
    // A new connection sends them again; once applied, the lag is gone.
    p.tick();
    let now = p.now;
    p.primary.handle_disconnected(now);
    p.secondary.handle_disconnected(now);
    p.collect();
    p.persist_primary();
    p.connect();
    p.persist_primary();
    p.finish_local_writes();
    p.persist_primary();
    assert_eq!(p.primary.applied_ack().0, p.primary.stats().dispatched_seq, "the peer caught up");
    assert_eq!(p.primary.behind_since(), None);
}

#[test]
fn resync_copies_ride_their_own_stream_while_host_writes_keep_theirs() {
    // A primary that restarts with a dirty map must copy those extents to its peer: a resync.
    let geo = Geometry::new(64 * MIB, MIB).unwrap();
    let mut p_state = SiteState::fresh(Role::Primary, StoreId(1));
    p_state.dirty = [geomirror_core::ExtentId(3), geomirror_core::ExtentId(4)].into_iter().collect();
    let mut p = Pair::new();
    p.primary = Primary::new(CoreConfig::default(), geo, &p_state, p.now);
    p.p_store = MemStore::new(p_state);
    p.collect();
    p.persist_primary();
    p.connect();
    p.persist_primary();
    let reads: Vec<Token> = take(&mut p.p_out, |a| matches!(a, Action::ReadExtent { .. }))
        .into_iter()
        .map(|a| match a {
            Action::ReadExtent { token, .. } => token,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(reads.len(), 2, "both dirty extents are read back for the resync");
    // A host write (not extent-aligned, to tell it from the copies) while the copies go.
    p.write(1, 9 * MIB + 4096, 4096);
    p.finish_local_writes();
    for t in reads {
        let now = p.now;
        p.primary.handle_read_done(now, t, Bytes::from(vec![5u8; MIB as usize]));
        p.collect();
    }
    p.persist_primary();
    let host: Vec<Stream> = p.p_data.iter().filter(|(_, host)| *host).map(|(s, _)| *s).collect();
    let resync: Vec<Stream> = p.p_data.iter().filter(|(_, host)| !*host).map(|(s, _)| *s).collect();
    assert_eq!(host.len(), 1);
    assert!(matches!(host[0], Stream::Data(_)), "host writes ship on a data lane: {host:?}");
    assert!(resync.len() >= 4, "begin, two copies and end: {resync:?}");
    assert!(resync.iter().all(|s| *s == Stream::Resync), "every resync item ships on the resync stream: {resync:?}");
    assert!(!p.primary.resync_in_progress(), "and the resync completed");
}

#[test]
fn a_failback_checks_extents_by_digest_and_copies_only_the_blocks_that_differ() {
    // A promoted primary whose failback set is extents 3, 4 and 5; on the returning old
    // primary only one 4 KiB block of extent 4 differs.
    let geo = Geometry::new(64 * MIB, MIB).unwrap();
    let mut p_state = SiteState::fresh(Role::Primary, StoreId(1));
    p_state.failback_pending = true;
    p_state.dirty = [3, 4, 5].into_iter().map(geomirror_core::ExtentId).collect();
    let mut p = Pair::new();
    p.primary = Primary::new(CoreConfig::default(), geo, &p_state, p.now);
    p.p_store = MemStore::new(p_state);
    p.s_differs.insert(4);
    p.collect();
    p.persist_primary();
    p.connect();
    p.persist_primary();
    let mut read = Vec::new();
    for _ in 0..10 {
        let reads = take(&mut p.p_out, |a| matches!(a, Action::ReadExtent { .. }));
        if reads.is_empty() {
            break;
        }
        for a in reads {
            if let Action::ReadExtent { token, extent } = a {
                read.push(extent.0);
                let now = p.now;
                p.primary.handle_read_done(now, token, Bytes::from(vec![5u8; MIB as usize]));
                p.collect();
            }
        }
        p.persist_primary();
    }
    assert_eq!(read, vec![3, 4, 5, 4], "each extent read once to be checked, and the different one again to be copied");
    let verified: Vec<u64> =
        p.p_items.iter().filter_map(|(_, a)| if let Apply::Verify { extent, .. } = a { Some(extent.0) } else { None }).collect();
    assert_eq!(verified, vec![3, 4, 5]);
    let copies: Vec<(u64, u64)> =
        p.p_items.iter().filter_map(|(seq, a)| if let Apply::Write(w) = a { Some((*seq, w.offset)) } else { None }).collect();
    assert_eq!(copies.iter().map(|(_, off)| *off).collect::<Vec<_>>(), vec![4 * MIB + 2 * 4096], "only the block that differs is copied");
    let end = p.p_items.iter().find_map(|(seq, a)| matches!(a, Apply::ResyncEnd).then_some(*seq)).expect("the resync ended");
    let last = p.p_items.iter().filter(|(_, a)| matches!(a, Apply::Write(_) | Apply::Verify { .. })).map(|(s, _)| *s).max().unwrap();
    assert!(end > last, "the end comes after every check and copy");
    let st = p.primary.stats();
    assert_eq!((st.resync_extents_verified, st.resync_extents_mismatched, st.resync_bytes_copied), (3, 1, 4096));
    assert!(!p.primary.resync_in_progress());
    let ss = p.secondary.stats();
    assert_eq!((ss.extents_verified, ss.extents_mismatched), (3, 1));
    assert!(ss.extents_saved_aside >= 1, "the different extent was saved aside before its copy");
    assert!(p.s_store.durable().dirty.is_empty(), "the mismatch was durable only until the failback ended");
}

/// Found by the benchmark harness: in sync mode, qemu-img convert's 2 MiB writes across
/// 1 MiB extents failed after 30 s. A write needing an extent about to become clean and a new
/// one waited for the new one's dirty-map entry; meanwhile the clean one was withdrawn, so the
/// write missed again, and so on: each extent was re-added as the other was withdrawn.
/// Extents a waiting write needs now stay covered (as eviction already kept them).
#[test]
fn a_waiting_write_keeps_the_coverage_it_already_has() {
    let mut p = Pair::with(CoreConfig { mode: geomirror_core::Mode::Sync, ..CoreConfig::default() });
    p.persist_primary();
    p.connect();
    p.persist_primary();
    // A write to extent 1: its dirty-map entry, the local write, the peer's apply.
    p.write(1, MIB, 4096);
    p.persist_primary();
    p.finish_local_writes();
    assert_eq!(p.acks(), vec![(RequestId(1), Ok(()))]);
    // A write across extents 1 and 2: 1 is covered, 2 needs its own entry first.
    p.write(2, 2 * MIB - 4096, 8192);
    assert!(p.local_writes().is_empty(), "extent 2 is not covered yet");
    // Extent 1 becomes clean (the local sync covers the first write) while the second waits.
    // Past the local sync interval: the periodic sync runs.
    p.now = Time(p.now.0 + 1_000_000);
    let now = p.now;
    p.primary.handle_timeout(now);
    p.collect();
    let syncs = take(&mut p.p_out, |a| matches!(a, Action::SyncMedia { .. }));
    for a in syncs {
        if let Action::SyncMedia { token } = a {
            let now = p.now;
            p.primary.handle_media_synced(now, token);
        }
    }
    p.collect();
    let withdrawn = p.p_out.iter().any(|a| {
        matches!(a, Action::Persist { batch, .. } if batch.contains(&geomirror_core::StoreWrite::DelDirty(geomirror_core::ExtentId(1))))
    });
    assert!(!withdrawn, "extent 1 was withdrawn from the dirty map while a write needing it waited");
    p.persist_primary();
    assert_eq!(p.local_writes().len(), 1, "once extent 2 is covered the write goes to media");
}

/// A fresh secondary store (on a blank disk, say) that pairs with a primary owing a full
/// verified resync (promoted by force, remembering no peer store) claims nothing about its
/// image from the handshake on: it is marked durably before its welcome, so that if the link
/// is lost before the resync's first item reaches it, a promotion without force is refused
/// rather than reported consistent over media that may differ everywhere.
#[test]
fn a_store_owed_a_full_resync_claims_nothing_from_the_handshake_on() {
    let geo = Geometry::new(64 * MIB, MIB).unwrap();
    let cfg = CoreConfig::default();
    let mut owing = SiteState::fresh(Role::Primary, StoreId(1));
    owing.full_resync_owed = true;
    owing.epoch = geomirror_core::Epoch(1001);
    let mut p = Primary::new(cfg.clone(), geo, &owing, Time(1));
    let mut s_store = MemStore::new(SiteState::fresh(Role::Secondary, StoreId(2)));
    let mut s = Secondary::new(cfg.clone(), geo, s_store.durable());
    let mut p_store = MemStore::new(owing);
    // Delivers control frames both ways and completes every store write; the primary's data
    // items (the resync's first among them) never arrive: the link is lost before they do.
    let mut run = |p: &mut Primary, s: &mut Secondary, now: Time| {
        let mut welcomed = false;
        for _ in 0..100 {
            let mut progressed = false;
            while let Some(a) = p.poll_action() {
                progressed = true;
                match a {
                    Action::Persist { token, batch } => {
                        let n = p_store.stage(batch);
                        p_store.sync_through(n);
                        p.handle_persisted(now, token);
                    }
                    Action::Send { frame, .. } if !matches!(frame, Frame::Data { .. }) => s.handle_frame(now, frame),
                    _ => {}
                }
            }
            while let Some(a) = s.poll_action() {
                progressed = true;
                match a {
                    Action::Persist { token, batch } => {
                        let n = s_store.stage(batch);
                        s_store.sync_through(n);
                        s.handle_persisted(now, token);
                    }
                    Action::Send { frame, .. } => {
                        if matches!(frame, Frame::Welcome { .. }) {
                            assert!(s_store.durable().amnesiac, "marked durably before the welcome leaves");
                            welcomed = true;
                        }
                        p.handle_frame(now, frame)
                    }
                    _ => {}
                }
            }
            if !progressed {
                break;
            }
        }
        welcomed
    };
    run(&mut p, &mut s, Time(1));
    s.handle_connected(Time(1000));
    p.handle_connected(Time(1000));
    assert!(run(&mut p, &mut s, Time(1000)), "the handshake completes");
    assert_eq!(s.peer_store(), Some(StoreId(1)), "paired");
    s.handle_disconnected(Time(2000));
    assert_eq!(s.promote(false).map(|r| r.consistent), Err(geomirror_core::PromoteError::Amnesiac));
    // So does the same store after a restart.
    let mut again = Secondary::new(cfg, geo, s_store.durable());
    assert_eq!(again.promote(false).map(|r| r.consistent), Err(geomirror_core::PromoteError::Amnesiac));
}

/// A forced promotion of an amnesiac mid-sync names where the unsynced part of its image
/// starts: its durable sync cursor (of its primary, in its epoch), or the first extent.
#[test]
fn a_forced_promotion_mid_sync_names_the_unsynced_range_from_the_sync_cursor() {
    let geo = Geometry::new(64 << 20, 1 << 20).unwrap();
    let primary = geomirror_core::StoreId(7);
    let mut state = SiteState::amnesiac(geomirror_core::StoreId(9));
    state.peer = geomirror_core::PeerMemory { store: Some(primary), ..Default::default() };
    state.sync_cursor = Some(geomirror_core::SyncCursor { primary, epoch: state.epoch, next: 40 });
    let mut s = Secondary::new(CoreConfig::default(), geo, &state);
    assert_eq!(s.promote(false).unwrap_err(), geomirror_core::PromoteError::Amnesiac);
    let r = s.promote(true).expect("forced");
    assert_eq!((r.amnesiac, r.unsynced_from), (true, Some(40)));
    // A cursor of another primary vouches for nothing: everything is unsynced.
    state.sync_cursor = Some(geomirror_core::SyncCursor { primary: geomirror_core::StoreId(8), epoch: state.epoch, next: 40 });
    let r = Secondary::new(CoreConfig::default(), geo, &state).promote(true).expect("forced");
    assert_eq!(r.unsynced_from, Some(0));
    // A trusted secondary has no unsynced range.
    let mut fine = SiteState::fresh(Role::Secondary, geomirror_core::StoreId(9));
    fine.peer = geomirror_core::PeerMemory { store: Some(primary), ..Default::default() };
    let r = Secondary::new(CoreConfig::default(), geo, &fine).promote(true).expect("forced");
    assert_eq!((r.amnesiac, r.unsynced_from), (false, None));
}
