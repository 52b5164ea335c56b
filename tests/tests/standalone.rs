//! A site without a peer: the write path of the NBD front end before any link exists. Every
//! write is covered at once, nothing is shipped or tracked, and FUA and FLUSH wait for a
//! media sync.

use bytes::Bytes;
use geomirror_core::config::ConfigError;
use geomirror_core::{
    Action, CoreConfig, FlushPolicy, Geometry, HostError, Mode, Primary, RequestId, Role, SiteState, Time, Token, WriteOp, WritePath,
};

const MIB: u64 = 1 << 20;

fn standalone() -> (Primary, Vec<Action>) {
    let cfg = CoreConfig { mode: Mode::Standalone, ..CoreConfig::default() };
    cfg.validate().unwrap();
    let geo = Geometry::new(64 * MIB, MIB).unwrap();
    let mut p = Primary::new(cfg, geo, &SiteState::fresh(Role::Primary, geomirror_core::StoreId(1)), Time(1));
    let mut out = drain(&mut p);
    // The incarnation is persisted before any write is served.
    let Some(Action::Persist { token, .. }) = out.pop() else { panic!("expected the start persist, got {out:?}") };
    p.handle_persisted(Time(2), token);
    let rest = drain(&mut p);
    (p, rest)
}

fn drain(p: &mut Primary) -> Vec<Action> {
    std::iter::from_fn(|| p.poll_action()).collect()
}

fn write(p: &mut Primary, id: u64, offset: u64, fua: bool) -> Vec<Action> {
    p.handle_host_write(Time(10 + id), RequestId(id), WriteOp::data(offset, Bytes::from(vec![id as u8; 4096])), fua);
    drain(p)
}

fn local_token(actions: &[Action]) -> Token {
    match actions {
        [Action::LocalWrite { token, .. }] => *token,
        other => panic!("expected exactly one local write, got {other:?}"),
    }
}

#[test]
fn a_write_is_acknowledged_after_the_local_write_alone_and_nothing_is_sent() {
    let (mut p, idle) = standalone();
    assert!(idle.is_empty(), "{idle:?}");
    for (id, offset) in [(1, 0), (2, 17 * MIB), (3, 63 * MIB)] {
        let token = local_token(&write(&mut p, id, offset, false));
        p.handle_local_write_done(Time(100), token, true);
        assert_eq!(drain(&mut p), vec![Action::Ack { request: RequestId(id), result: Ok(()), path: Some(WritePath::Hit) }]);
    }
    assert!(p.record_copy().is_empty());
    assert!(p.local_dirty().is_empty());
    assert_eq!(p.failback_debt().bytes, 0, "nothing is tracked without a peer");
    assert_eq!(p.poll_timeout(), None, "no timer runs on an idle standalone site");
}

#[test]
fn fua_and_flush_wait_for_a_media_sync() {
    let (mut p, _) = standalone();
    let out = write(&mut p, 1, 0, true);
    let (Action::LocalWrite { token: w, .. }, Action::SyncMedia { token: s }) = (&out[0], &out[1]) else { panic!("{out:?}") };
    p.handle_local_write_done(Time(20), *w, true);
    assert!(drain(&mut p).is_empty(), "a FUA write waits for the sync");
    p.handle_media_synced(Time(21), *s);
    assert_eq!(drain(&mut p), vec![Action::Ack { request: RequestId(1), result: Ok(()), path: Some(WritePath::Hit) }]);

    let token = local_token(&write(&mut p, 2, MIB, false));
    p.handle_local_write_done(Time(22), token, true);
    assert_eq!(drain(&mut p), vec![Action::Ack { request: RequestId(2), result: Ok(()), path: Some(WritePath::Hit) }]);
    p.handle_host_flush(Time(30), RequestId(3));
    let out = drain(&mut p);
    let [Action::SyncMedia { token }] = out.as_slice() else { panic!("a flush after an unsynced write syncs: {out:?}") };
    p.handle_media_synced(Time(31), *token);
    assert_eq!(drain(&mut p), vec![Action::Ack { request: RequestId(3), result: Ok(()), path: None }]);
}

#[test]
fn a_media_error_fails_the_write_and_out_of_range_is_refused() {
    let (mut p, _) = standalone();
    let token = local_token(&write(&mut p, 1, 0, false));
    p.handle_local_write_done(Time(20), token, false);
    assert_eq!(drain(&mut p), vec![Action::Ack { request: RequestId(1), result: Err(HostError::Media), path: Some(WritePath::Hit) }]);
    assert_eq!(
        write(&mut p, 2, 64 * MIB, false),
        vec![Action::Ack { request: RequestId(2), result: Err(HostError::OutOfRange), path: None }]
    );
}

#[test]
fn a_connection_attempt_is_refused_and_remote_flush_is_a_config_error() {
    let (mut p, _) = standalone();
    p.handle_connected(Time(5));
    assert!(matches!(drain(&mut p).as_slice(), [Action::Disconnect { .. }]));
    let cfg = CoreConfig { mode: Mode::Standalone, flush_policy: FlushPolicy::Remote, ..CoreConfig::default() };
    assert_eq!(cfg.validate(), Err(ConfigError::RemoteFlushWithoutPeer));
}
