//! The link between two sites: sessions of QUIC streams that carry the volumes' frames.
//!
//! Owns: connecting (the primary) and accepting (the secondary), reconnecting with backoff,
//! and the stream layout of a session:
//! - two QUIC connections, so that control never waits behind bulk: quinn's send window is
//!   shared by every stream of a connection, so bulk data on the same connection would hold
//!   record updates back;
//! - on the control connection, one bidirectional stream per volume: record updates,
//!   evictions and hellos one way; answers, welcomes and return messages the other;
//! - on the data connection, one unidirectional stream per volume and data lane.
//!
//! Every stream opens with a `Preamble` naming its volume and session. The secondary keeps
//! the current session per volume and drops frames of any other, so nothing of a dead
//! connection reaches a volume after the next one started.
//!
//! Must not: decide anything about frames. A volume learns `Connected` only once a stream
//! of an authenticated connection exists, and `Disconnected` when it ends; the core does the
//! rest (handshake, resend, resync).

use super::framing::{read_frame, write_frame, FramingError, Preamble};
use super::pace::{write_paced, Pacer};
use super::tls::Refusals;
use crate::volume::{LinkEvent, Outbound, Volume};
use geomirror_core::{Frame, Stream};
use quinn::{Connection, Endpoint, VarInt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Reconnection backoff: from the first to the last, doubling.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_LAST: Duration = Duration::from_secs(5);
/// QUIC application close code for a close the core asked for.
const CLOSE_REFUSED: u32 = 1;
const CLOSE_SHUTDOWN: u32 = 2;
/// TLS 1.3's certificate_required alert (RFC 8446), sent to a client that presents none.
const CERTIFICATE_REQUIRED: u8 = 116;

/// A volume as the link sees it: its handle and the frames it wants sent.
pub struct LinkVolume {
    pub volume: Volume,
    pub outbox: mpsc::UnboundedReceiver<Outbound>,
}

/// Runs the primary's side until `shutdown`: connects to the peer, serves sessions, and
/// reconnects with backoff when one ends. Data streams are paced at `bulk_bytes_per_sec`
/// (all of them together), so that bulk never queues ahead of control on the path.
pub async fn run_primary(
    endpoint: Endpoint,
    peer: SocketAddr,
    peer_name: String,
    bulk_bytes_per_sec: Option<u64>,
    volumes: Vec<LinkVolume>,
    mut shutdown: watch::Receiver<bool>,
) {
    let pacer = bulk_bytes_per_sec.map(|r| Arc::new(Pacer::new(r)));
    let (merged_tx, mut merged) = mpsc::unbounded_channel::<(usize, Outbound)>();
    let mut handles = Vec::new();
    for (i, lv) in volumes.into_iter().enumerate() {
        let tx = merged_tx.clone();
        let mut outbox = lv.outbox;
        tokio::spawn(async move {
            while let Some(o) = outbox.recv().await {
                if tx.send((i, o)).is_err() {
                    return;
                }
            }
        });
        handles.push(lv.volume);
    }
    let mut backoff = BACKOFF_FIRST;
    let mut session: u64 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    loop {
        session = session.wrapping_add(1);
        let mut s = Session {
            endpoint: &endpoint,
            peer,
            peer_name: &peer_name,
            volumes: &handles,
            session,
            pacer: pacer.clone(),
            connected: false,
        };
        let result = tokio::select! {
            r = s.run(&mut merged) => r,
            _ = shutdown.changed() => Err("shutting down".into()),
        };
        if s.connected {
            backoff = BACKOFF_FIRST;
            for v in &handles {
                v.link(LinkEvent::Disconnected(session));
            }
        }
        if *shutdown.borrow() {
            endpoint.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
            return;
        }
        if let Err(why) = &result {
            tracing::warn!(peer = %peer, peer_name, why, retry_in = ?backoff, "replication link down");
        }
        // Frames queued for a dead session are not sent: the core resends what matters.
        while merged.try_recv().is_ok() {}
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_LAST);
    }
}

struct Session<'a> {
    endpoint: &'a Endpoint,
    peer: SocketAddr,
    peer_name: &'a str,
    volumes: &'a [Volume],
    session: u64,
    pacer: Option<Arc<Pacer>>,
    connected: bool,
}

impl Session<'_> {
    async fn run(&mut self, merged: &mut mpsc::UnboundedReceiver<(usize, Outbound)>) -> Result<(), String> {
        let connect = |what: &'static str| {
            let c = self.endpoint.connect(self.peer, self.peer_name);
            async move { c.map_err(|e| format!("{what}: {e}"))?.await.map_err(|e| format!("{what}: {e}")) }
        };
        let control = connect("control connection").await?;
        let data = connect("data connection").await?;
        let _close = CloseOnDrop(vec![control.clone(), data.clone()]);
        let (err_tx, mut err_rx) = mpsc::unbounded_channel::<String>();
        let mut control_writers = Vec::new();
        for v in self.volumes {
            let (send, recv) = control.open_bi().await.map_err(|e| format!("open a control stream: {e}"))?;
            let preamble = Preamble { stream: Stream::Control, session: self.session, volume: v.name().to_owned() };
            control_writers.push(spawn_writer(send, preamble, None, err_tx.clone()));
            let (v, err, session) = (v.clone(), err_tx.clone(), self.session);
            tokio::spawn(async move {
                let mut recv = recv;
                let mut buf = Vec::new();
                let end = loop {
                    match read_frame(&mut recv, &mut buf).await {
                        Ok(Some(f)) => v.link(LinkEvent::Frame(session, f)),
                        Ok(None) => break "the peer closed a control stream".to_string(),
                        Err(e) => break format!("control stream: {e}"),
                    }
                };
                let _ = err.send(end);
            });
        }
        self.connected = true;
        for v in self.volumes {
            v.link(LinkEvent::Connected(self.session));
        }
        tracing::info!(peer = %self.peer, peer_name = self.peer_name, session = self.session, "replication link up");
        let mut lanes: HashMap<(usize, u8), mpsc::UnboundedSender<Frame>> = HashMap::new();
        loop {
            tokio::select! {
                Some((i, o)) = merged.recv() => match o {
                    // Asked for in another session (before the volume learned of this one).
                    Outbound::Send { session, .. } | Outbound::Disconnect { session, .. } if session != self.session => {}
                    Outbound::Send { stream: Stream::Control, frame: f, .. } => {
                        let _ = control_writers[i].send(f);
                    }
                    Outbound::Send { stream: Stream::Data(lane), frame: f, .. } => {
                        let tx = match lanes.get(&(i, lane)) {
                            Some(tx) => tx.clone(),
                            None => {
                                let send = data.open_uni().await.map_err(|e| format!("open a data stream: {e}"))?;
                                let preamble = Preamble { stream: Stream::Data(lane), session: self.session, volume: self.volumes[i].name().to_owned() };
                                let tx = spawn_writer(send, preamble, self.pacer.clone(), err_tx.clone());
                                lanes.insert((i, lane), tx.clone());
                                tx
                            }
                        };
                        let _ = tx.send(f);
                    }
                    Outbound::Disconnect { reason, .. } => {
                        control.close(VarInt::from_u32(CLOSE_REFUSED), reason.as_bytes());
                        data.close(VarInt::from_u32(CLOSE_REFUSED), reason.as_bytes());
                        return Err(format!("closed by this site: {reason}"));
                    }
                },
                Some(e) = err_rx.recv() => return Err(e),
                e = control.closed() => return Err(format!("control connection: {e}")),
                e = data.closed() => return Err(format!("data connection: {e}")),
            }
        }
    }
}

/// Closes the connections of a session when it ends, however it ends.
struct CloseOnDrop(Vec<Connection>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        for c in &self.0 {
            c.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"session over");
        }
    }
}

/// A task that writes the preamble, then every frame it is given, in order, to one stream,
/// paced by `pacer` if given. Each stream has its own task, so a full data stream never
/// holds a control frame back.
fn spawn_writer(
    mut send: quinn::SendStream,
    preamble: Preamble,
    pacer: Option<Arc<Pacer>>,
    err: mpsc::UnboundedSender<String>,
) -> mpsc::UnboundedSender<Frame> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
    tokio::spawn(async move {
        if let Err(e) = send.write_all(&preamble.encode()).await {
            let _ = err.send(format!("stream preamble: {e}"));
            return;
        }
        while let Some(f) = rx.recv().await {
            let written = match &pacer {
                Some(p) => write_paced(&mut send, &f, p).await,
                None => write_frame(&mut send, &f).await,
            };
            if let Err(e) = written {
                let _ = err.send(format!("{:?} stream of {}: {e}", preamble.stream, preamble.volume));
                return;
            }
        }
        let _ = send.finish();
    });
    tx
}

/// The secondary's view of one volume's link.
struct Current {
    session: Option<u64>,
    writer: Option<mpsc::UnboundedSender<Frame>>,
    conn: Option<Connection>,
}

type Sessions = Arc<Mutex<HashMap<String, (Volume, Current)>>>;

/// Runs the secondary's side until `shutdown`: accepts authenticated connections and
/// attaches their streams to volumes by name.
pub async fn run_secondary(endpoint: Endpoint, volumes: Vec<LinkVolume>, refusals: Arc<Refusals>, mut shutdown: watch::Receiver<bool>) {
    let sessions: Sessions = Arc::new(Mutex::new(HashMap::new()));
    for lv in volumes {
        let name = lv.volume.name().to_owned();
        sessions.lock().expect("not poisoned").insert(name.clone(), (lv.volume, Current { session: None, writer: None, conn: None }));
        let (sessions, mut outbox) = (sessions.clone(), lv.outbox);
        tokio::spawn(async move {
            while let Some(o) = outbox.recv().await {
                let guard = sessions.lock().expect("not poisoned");
                let current = &guard[&name].1;
                match o {
                    // Frames of another session than the current one are dropped: the
                    // primary's next hello starts over.
                    Outbound::Send { session, .. } | Outbound::Disconnect { session, .. } if current.session != Some(session) => {}
                    Outbound::Send { frame: f, .. } => {
                        if let Some(w) = &current.writer {
                            let _ = w.send(f);
                        }
                    }
                    Outbound::Disconnect { reason, .. } => {
                        if let Some(c) = &current.conn {
                            tracing::warn!(volume = name, reason, "closing the link to the primary");
                            c.close(VarInt::from_u32(CLOSE_REFUSED), reason.as_bytes());
                        }
                    }
                }
            }
        });
    }
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                tokio::spawn(serve_connection(incoming, sessions.clone(), refusals.clone()));
            }
            _ = shutdown.changed() => {
                endpoint.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
                return;
            }
        }
    }
}

async fn serve_connection(incoming: quinn::Incoming, sessions: Sessions, refusals: Arc<Refusals>) {
    let remote = incoming.remote_address();
    // The certificate was checked during the handshake, and a bad one counted there. A
    // client that sent none never reaches the verifier: rustls ends the handshake with the
    // certificate_required alert, which is counted here.
    let conn = match incoming.await {
        Ok(c) => c,
        Err(quinn::ConnectionError::TransportError(t)) if t.code == quinn::TransportErrorCode::crypto(CERTIFICATE_REQUIRED) => {
            refusals.record("no_certificate", &format!("{remote} presented no client certificate"));
            return;
        }
        Err(e) => {
            tracing::info!(%remote, error = %e, "replication connection not established");
            return;
        }
    };
    loop {
        tokio::select! {
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => { tokio::spawn(control_stream(conn.clone(), send, recv, sessions.clone())); }
                Err(_) => return,
            },
            uni = conn.accept_uni() => match uni {
                Ok(recv) => { tokio::spawn(data_stream(conn.clone(), recv, sessions.clone())); }
                Err(_) => return,
            },
        }
    }
}

/// Reads a stream's preamble and finds its volume; a stream naming no volume of this site
/// closes the connection.
async fn attach(conn: &Connection, recv: &mut quinn::RecvStream, sessions: &Sessions) -> Result<(Preamble, Volume), FramingError> {
    let p = Preamble::read(recv).await?;
    let volume = sessions.lock().expect("not poisoned").get(&p.volume).map(|(v, _)| v.clone());
    match volume {
        Some(v) => Ok((p, v)),
        None => {
            tracing::warn!(volume = p.volume, "the peer opened a stream for a volume this site does not have; closing");
            conn.close(VarInt::from_u32(CLOSE_REFUSED), b"unknown volume");
            Err(FramingError::Preamble("unknown volume"))
        }
    }
}

fn is_current(sessions: &Sessions, volume: &str, session: u64) -> bool {
    sessions.lock().expect("not poisoned").get(volume).is_some_and(|(_, c)| c.session == Some(session))
}

async fn control_stream(conn: Connection, send: quinn::SendStream, mut recv: quinn::RecvStream, sessions: Sessions) {
    let Ok((p, volume)) = attach(&conn, &mut recv, &sessions).await else { return };
    if p.stream != Stream::Control {
        conn.close(VarInt::from_u32(CLOSE_REFUSED), b"a bidirectional stream must be a control stream");
        return;
    }
    let (err_tx, mut err_rx) = mpsc::unbounded_channel::<String>();
    let writer = spawn_raw_writer(send, err_tx);
    {
        let mut guard = sessions.lock().expect("not poisoned");
        let current = &mut guard.get_mut(&p.volume).expect("attached").1;
        // A newer session replaces one whose end was not seen yet; the volume handles that
        // when it learns of the new one.
        *current = Current { session: Some(p.session), writer: Some(writer), conn: Some(conn.clone()) };
        volume.link(LinkEvent::Connected(p.session));
    }
    tracing::info!(volume = p.volume, session = p.session, remote = %conn.remote_address(), "replication session up");
    let mut buf = Vec::new();
    loop {
        tokio::select! {
            r = read_frame(&mut recv, &mut buf) => match r {
                Ok(Some(f)) if is_current(&sessions, &p.volume, p.session) => volume.link(LinkEvent::Frame(p.session, f)),
                Ok(Some(_)) => break,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(volume = p.volume, error = %e, "bad control stream; closing the connection");
                    conn.close(VarInt::from_u32(CLOSE_REFUSED), b"bad frame");
                    break;
                }
            },
            Some(e) = err_rx.recv() => {
                tracing::info!(volume = p.volume, error = e, "control stream write failed");
                break;
            }
        }
    }
    let mut guard = sessions.lock().expect("not poisoned");
    let current = &mut guard.get_mut(&p.volume).expect("attached").1;
    if current.session == Some(p.session) {
        *current = Current { session: None, writer: None, conn: None };
        volume.link(LinkEvent::Disconnected(p.session));
        tracing::info!(volume = p.volume, session = p.session, "replication session down");
    }
}

async fn data_stream(conn: Connection, mut recv: quinn::RecvStream, sessions: Sessions) {
    let Ok((p, volume)) = attach(&conn, &mut recv, &sessions).await else { return };
    if !matches!(p.stream, Stream::Data(_)) {
        conn.close(VarInt::from_u32(CLOSE_REFUSED), b"a unidirectional stream must be a data stream");
        return;
    }
    let mut buf = Vec::new();
    loop {
        match read_frame(&mut recv, &mut buf).await {
            Ok(Some(f)) if is_current(&sessions, &p.volume, p.session) => volume.link(LinkEvent::Frame(p.session, f)),
            // A stream of a replaced session: nothing more from it is applied.
            Ok(Some(_)) | Ok(None) => return,
            Err(e) => {
                tracing::warn!(volume = p.volume, error = %e, "bad data stream; closing the connection");
                conn.close(VarInt::from_u32(CLOSE_REFUSED), b"bad frame");
                return;
            }
        }
    }
}

/// Like `spawn_writer`, for a stream the peer opened (no preamble to send).
fn spawn_raw_writer(mut send: quinn::SendStream, err: mpsc::UnboundedSender<String>) -> mpsc::UnboundedSender<Frame> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
    tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if let Err(e) = write_frame(&mut send, &f).await {
                let _ = err.send(e.to_string());
                return;
            }
        }
        let _ = send.finish();
    });
    tx
}
