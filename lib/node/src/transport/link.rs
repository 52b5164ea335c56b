//! The link between two sites: sessions of QUIC streams that carry the volumes' frames.
//!
//! Owns: accepting (always) and connecting (while the site is primary), reconnecting with
//! backoff, routing each volume's outbound frames to the session they belong to, and the
//! stream layout of a session:
//! - two QUIC connections, so that control never waits behind bulk: quinn's send window is
//!   shared by every stream of a connection, so bulk data on the same connection would hold
//!   record updates back;
//! - on the control connection, one bidirectional stream per volume: record updates,
//!   evictions and hellos one way; answers, welcomes and return messages the other;
//! - on the data connection, one unidirectional stream per volume and data lane, from the
//!   site that connected.
//!
//! Who connects: a primary. Every site accepts, whatever its role, because roles change
//! under the link: a promoted secondary starts connecting to the old primary's address, and
//! an old primary coming back still believes it is primary and connects too. Its peer
//! accepts, the cores exchange hellos, and the stale one fences itself and becomes a
//! secondary, which stops connecting and waits for the new primary's connection.
//!
//! Every stream opens with a `Preamble` naming its volume and session. An accepting site
//! keeps the current incoming session per volume and drops frames of any other, so nothing
//! of a dead connection reaches a volume after the next one started.
//!
//! Liveness: each side probes its peer on every control stream and declares the session
//! lost when no probe sent in the last idle timeout was echoed (`liveness`); QUIC's own idle
//! timeout stretches with the measured round trip and is only a backstop. Keep-alive frames
//! are answered and consumed here; a volume learns only when the peer was last heard from.
//!
//! Must not: decide anything about frames. A volume learns `Connected` only once a stream
//! of an authenticated connection exists, and `Disconnected` when it ends; the core does the
//! rest (handshake, resend, resync).

use super::framing::{read_frame, write_frame, FramingError, Preamble};
use super::liveness::{KeepAlive, Liveness, Timing};
use super::pace::{write_paced, Pacer};
use super::tls::Refusals;
use crate::volume::{LinkEvent, Outbound, SessionId, Volume};
use geomirror_core::{Frame, Role, Stream};
use quinn::{Connection, Endpoint, VarInt};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, watch};

/// Reconnection backoff: from the first to the last, doubling.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_LAST: Duration = Duration::from_secs(5);
/// QUIC application close code for a close the core asked for.
const CLOSE_REFUSED: u32 = 1;
const CLOSE_SHUTDOWN: u32 = 2;
/// QUIC application close code for a peer declared lost: no keep-alive answered in time.
const CLOSE_PEER_LOST: u32 = 3;
/// TLS 1.3's certificate_required alert (RFC 8446), sent to a client that presents none.
const CERTIFICATE_REQUIRED: u8 = 116;

/// Why an outgoing session ended (or never began). The link logs it and reconnects.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("{kind} connection: {source}")]
    Connect { kind: ConnKind, source: quinn::ConnectError },
    #[error("{kind} connection: {source}")]
    Connection { kind: ConnKind, source: quinn::ConnectionError },
    #[error("open a {kind} stream: {source}")]
    Open { kind: ConnKind, source: quinn::ConnectionError },
    #[error("stream preamble: {0}")]
    Preamble(quinn::WriteError),
    #[error("{stream}: {source}")]
    Write { stream: String, source: FramingError },
    #[error("the peer closed a control stream")]
    ControlEnded,
    #[error("control stream: {0}")]
    ControlRead(FramingError),
    /// No keep-alive was echoed within the idle timeout; the liveness check's reason.
    #[error("{0}")]
    PeerLost(String),
    #[error("shutting down")]
    ShuttingDown,
    #[error("this site is no longer primary")]
    NoLongerPrimary,
}

/// A volume as the link sees it: its handle and the frames it wants sent.
pub struct LinkVolume {
    pub volume: Volume,
    pub outbox: mpsc::UnboundedReceiver<Outbound>,
}

/// Where the link connects to, and how it paces bulk data.
#[derive(Clone, Debug)]
pub struct Peer {
    pub address: SocketAddr,
    /// The peer's site name: its certificate must name it.
    pub name: String,
    /// The rate at which every data stream of a session together is paced.
    pub bulk_bytes_per_sec: Option<u64>,
    /// How often the peer is probed, and how long a silence declares it lost, on either
    /// side of a session.
    pub liveness: Timing,
}

/// Where one volume's frames of one session go: straight to the writer task of each
/// stream, and the connections to close on a `Disconnect`.
struct Route {
    control: mpsc::UnboundedSender<Frame>,
    /// The volume's data lanes, on the side that connected; the accepting side has none,
    /// since data streams belong to the side that connected.
    lanes: Option<Lanes>,
    conns: Vec<Connection>,
}

impl Route {
    /// Hands a frame to its stream's writer. A data frame asked for on an accepted session
    /// is dropped (the core resends).
    fn send(&mut self, stream: Stream, frame: Frame, volume: &str) {
        match (stream, &mut self.lanes) {
            (Stream::Control, _) => {
                let _ = self.control.send(frame);
            }
            (bulk @ (Stream::Data(_) | Stream::Resync), Some(lanes)) => {
                let _ = lanes.writer(bulk).send(frame);
            }
            (Stream::Data(_) | Stream::Resync, None) => tracing::debug!(volume, "a data frame for an accepted session; dropped"),
        }
    }
}

/// One volume's data lanes in an outgoing session: an ordered stream per data lane (and
/// resync), each with its writer task, which opens the stream on the lane's first frame.
struct Lanes {
    data: Connection,
    session: SessionId,
    volume: String,
    pacer: Option<Arc<Pacer>>,
    err: mpsc::UnboundedSender<SessionError>,
    writers: HashMap<Stream, mpsc::UnboundedSender<Frame>>,
}

impl Lanes {
    fn writer(&mut self, lane: Stream) -> &mpsc::UnboundedSender<Frame> {
        self.writers.entry(lane).or_insert_with(|| {
            let data = self.data.clone();
            let open = async move { data.open_uni().await.map_err(|source| SessionError::Open { kind: ConnKind::Data, source }) };
            let preamble = Preamble { stream: lane, session: self.session, volume: self.volume.clone() };
            spawn_writer(open, Some(preamble), self.pacer.clone(), self.err.clone())
        })
    }
}

/// Routes by volume index and session.
type Routes = Arc<Mutex<HashMap<(usize, SessionId), Route>>>;

/// The accepting side's view of one volume: its current incoming session.
struct Current {
    session: Option<SessionId>,
}

/// The two QUIC connections of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConnKind {
    /// Record updates, answers, hellos and keep-alives: never behind bulk data.
    Control,
    /// Host writes and resync copies.
    Data,
}

impl ConnKind {
    /// Its name in logs and in the metrics' `connection` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnKind::Control => "control",
            ConnKind::Data => "data",
        }
    }
}

impl fmt::Display for ConnKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The QUIC connections of the latest session, by kind: what the link's metrics read
/// (round-trip time, congestion window, bytes sent). Either side fills it: the connecting
/// side with the connections it opened, the accepting side with those it took.
#[derive(Debug, Default)]
pub struct LinkConns {
    conns: Mutex<BTreeMap<ConnKind, Connection>>,
}

impl LinkConns {
    fn set(&self, kind: ConnKind, conn: &Connection) {
        self.conns.lock().expect("not poisoned").insert(kind, conn.clone());
    }

    /// The stats of each connection still open, by kind; closed ones are forgotten.
    pub fn stats(&self) -> Vec<(ConnKind, quinn::ConnectionStats)> {
        let mut conns = self.conns.lock().expect("not poisoned");
        conns.retain(|_, c| c.close_reason().is_none());
        conns.iter().map(|(k, c)| (*k, c.stats())).collect()
    }
}

/// Runs the link until `shutdown`: accepts authenticated connections and attaches their
/// streams to volumes by name, and while the volumes are primaries, connects to the peer
/// and reconnects with backoff when a session ends.
pub async fn run(
    endpoint: Endpoint,
    peer: Peer,
    volumes: Vec<LinkVolume>,
    refusals: Arc<Refusals>,
    conns: Arc<LinkConns>,
    shutdown: watch::Receiver<bool>,
) {
    let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
    let mut handles = Vec::new();
    for (i, lv) in volumes.into_iter().enumerate() {
        tokio::spawn(route_outbox(i, lv.volume.name().to_owned(), lv.outbox, routes.clone()));
        handles.push(lv.volume);
    }
    let accept = tokio::spawn(accept_loop(
        endpoint.clone(),
        peer.liveness,
        handles.clone(),
        routes.clone(),
        refusals,
        conns.clone(),
        shutdown.clone(),
    ));
    connect_loop(&endpoint, &peer, &handles, &routes, &conns, shutdown).await;
    endpoint.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
    let _ = accept.await;
}

/// Hands each frame a volume asks to send to the writer of its stream in the session it was
/// stamped with; frames of a session that has ended are dropped (the core resends what
/// matters).
async fn route_outbox(i: usize, name: String, mut outbox: mpsc::UnboundedReceiver<Outbound>, routes: Routes) {
    while let Some(o) = outbox.recv().await {
        let mut routes = routes.lock().expect("not poisoned");
        match o {
            Outbound::Send { session, stream, frame } => {
                if let Some(r) = routes.get_mut(&(i, session)) {
                    r.send(stream, frame, &name);
                }
            }
            Outbound::Disconnect { session, reason } => {
                if let Some(r) = routes.get(&(i, session)) {
                    tracing::warn!(volume = name, session = session.0, reason, "closing the link to the peer");
                    for c in &r.conns {
                        c.close(VarInt::from_u32(CLOSE_REFUSED), reason.as_bytes());
                    }
                }
            }
        }
    }
}

/// A new session id: unique across both sites' sessions in practice (the clock in
/// nanoseconds, mixed with the process id).
fn new_session_id() -> SessionId {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    SessionId(nanos ^ ((std::process::id() as u64) << 40))
}

fn is_primary(volumes: &[Volume]) -> bool {
    volumes.iter().any(|v| *v.watch_role().borrow() == Role::Primary)
}

/// Waits until some volume is primary (or shutdown: false).
async fn until_primary(volumes: &[Volume], shutdown: &mut watch::Receiver<bool>) -> bool {
    let mut watches: Vec<watch::Receiver<Role>> = volumes.iter().map(Volume::watch_role).collect();
    loop {
        if *shutdown.borrow() {
            return false;
        }
        if watches.iter_mut().any(|w| *w.borrow_and_update() == Role::Primary) {
            return true;
        }
        let changed = futures_any(&mut watches);
        tokio::select! {
            _ = changed => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Resolves when any of the watches changes.
async fn futures_any(watches: &mut [watch::Receiver<Role>]) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let tasks: Vec<_> = watches
        .iter()
        .map(|w| {
            let mut w = w.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if w.changed().await.is_ok() {
                    let _ = tx.send(()).await;
                }
            })
        })
        .collect();
    drop(tx);
    let _ = rx.recv().await;
    for t in tasks {
        t.abort();
    }
}

async fn connect_loop(
    endpoint: &Endpoint,
    peer: &Peer,
    volumes: &[Volume],
    routes: &Routes,
    conns: &LinkConns,
    mut shutdown: watch::Receiver<bool>,
) {
    let pacer = peer.bulk_bytes_per_sec.map(|r| Arc::new(Pacer::new(r)));
    let mut backoff = BACKOFF_FIRST;
    loop {
        if !until_primary(volumes, &mut shutdown).await {
            return;
        }
        let session = new_session_id();
        let mut s = Session { endpoint, peer, volumes, routes, conns, session, pacer: pacer.clone(), connected: false };
        let mut roles: Vec<watch::Receiver<Role>> = volumes.iter().map(Volume::watch_role).collect();
        let result = tokio::select! {
            r = s.run() => r,
            _ = shutdown.changed() => Err(SessionError::ShuttingDown),
            // A primary that fences itself stops connecting: it waits for the new primary.
            _ = async { loop { futures_any(&mut roles).await; if !is_primary(volumes) { break } } } => Err(SessionError::NoLongerPrimary),
        };
        s.end();
        if s.connected {
            backoff = BACKOFF_FIRST;
        }
        if *shutdown.borrow() {
            return;
        }
        if let Err(why) = &result {
            tracing::warn!(peer = %peer.address, peer_name = peer.name, %why, retry_in = ?backoff, "replication link down");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_LAST);
    }
}

/// One outgoing session: two connections and the streams of every volume.
struct Session<'a> {
    endpoint: &'a Endpoint,
    peer: &'a Peer,
    volumes: &'a [Volume],
    routes: &'a Routes,
    conns: &'a LinkConns,
    session: SessionId,
    pacer: Option<Arc<Pacer>>,
    connected: bool,
}

impl Session<'_> {
    async fn run(&mut self) -> Result<(), SessionError> {
        let connect = |kind: ConnKind| {
            let c = self.endpoint.connect(self.peer.address, &self.peer.name);
            async move {
                c.map_err(|source| SessionError::Connect { kind, source })?
                    .await
                    .map_err(|source| SessionError::Connection { kind, source })
            }
        };
        let control = connect(ConnKind::Control).await?;
        let data = connect(ConnKind::Data).await?;
        self.conns.set(ConnKind::Control, &control);
        self.conns.set(ConnKind::Data, &data);
        let _close = CloseOnDrop(vec![control.clone(), data.clone()]);
        let (err_tx, mut err_rx) = mpsc::unbounded_channel::<SessionError>();
        let live = Arc::new(Liveness::new(self.peer.liveness));
        let mut control_writers = Vec::new();
        for (i, v) in self.volumes.iter().enumerate() {
            let (send, recv) = control.open_bi().await.map_err(|source| SessionError::Open { kind: ConnKind::Control, source })?;
            let preamble = Preamble { stream: Stream::Control, session: self.session, volume: v.name().to_owned() };
            let writer = spawn_writer(async { Ok(send) }, Some(preamble), None, err_tx.clone());
            control_writers.push(writer.clone());
            let (v, err, session, live) = (v.clone(), err_tx.clone(), self.session, live.clone());
            tokio::spawn(async move {
                let mut recv = recv;
                let mut buf = Vec::new();
                let end = loop {
                    match read_frame(&mut recv, &mut buf).await {
                        Ok(Some(f)) => received(&v, session, f, &live, &writer),
                        Ok(None) => break SessionError::ControlEnded,
                        Err(e) => break SessionError::ControlRead(e),
                    }
                };
                let _ = err.send(end);
            });
            let lanes = Lanes {
                data: data.clone(),
                session: self.session,
                volume: self.volumes[i].name().to_owned(),
                pacer: self.pacer.clone(),
                err: err_tx.clone(),
                writers: HashMap::new(),
            };
            let route = Route { control: control_writers[i].clone(), lanes: Some(lanes), conns: vec![control.clone(), data.clone()] };
            self.routes.lock().expect("not poisoned").insert((i, self.session), route);
        }
        self.connected = true;
        for v in self.volumes {
            v.link(LinkEvent::Connected(self.session));
            v.link(LinkEvent::Heard { session: self.session, at: live.heard_at(), silence: live.timing().silence });
        }
        tracing::info!(peer = %self.peer.address, peer_name = self.peer.name, session = self.session.0, "replication link up");
        let mut probes = probe_interval(live.timing());
        loop {
            tokio::select! {
                _ = probes.tick() => {
                    for w in &control_writers {
                        let _ = w.send(live.probe());
                    }
                }
                _ = tokio::time::sleep_until(live.deadline().into()) => {
                    if live.is_lost() {
                        let why = live.reason();
                        control.close(VarInt::from_u32(CLOSE_PEER_LOST), why.as_bytes());
                        return Err(SessionError::PeerLost(why));
                    }
                }
                Some(e) = err_rx.recv() => return Err(e),
                source = control.closed() => return Err(SessionError::Connection { kind: ConnKind::Control, source }),
                source = data.closed() => return Err(SessionError::Connection { kind: ConnKind::Data, source }),
            }
        }
    }

    /// Forgets the session's routes and tells the volumes it ended.
    fn end(&mut self) {
        let mut routes = self.routes.lock().expect("not poisoned");
        for i in 0..self.volumes.len() {
            routes.remove(&(i, self.session));
        }
        drop(routes);
        if self.connected {
            for v in self.volumes {
                v.link(LinkEvent::Disconnected(self.session));
            }
        }
    }
}

/// Every `keep_alive`, from now; a tick missed (a busy runtime) is not made up in a burst.
fn probe_interval(t: Timing) -> tokio::time::Interval {
    let mut i = tokio::time::interval(t.keep_alive);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// A frame read from a control stream of `session`: a keep-alive is answered on the
/// stream's `writer` (a probe) or heard (an echo, which the volume learns of); any other
/// frame goes to the volume.
fn received(v: &Volume, session: SessionId, f: Frame, live: &Liveness, writer: &mpsc::UnboundedSender<Frame>) {
    match KeepAlive::of(&f) {
        Some(KeepAlive::Answer(echo)) => {
            let _ = writer.send(echo);
        }
        Some(KeepAlive::Echo(probe)) => {
            if live.echoed(probe) {
                v.link(LinkEvent::Heard { session, at: live.heard_at(), silence: live.timing().silence });
            }
        }
        None => v.link(LinkEvent::Frame(session, f)),
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

/// A task that gets its stream from `open`, writes the preamble (for a stream this site
/// opened), then every frame it is given, in order, paced by `pacer` if given. Each stream
/// has its own task, so a full data stream never holds a control frame back, and a lane
/// being opened holds back only its own frames.
fn spawn_writer(
    open: impl Future<Output = Result<quinn::SendStream, SessionError>> + Send + 'static,
    preamble: Option<Preamble>,
    pacer: Option<Arc<Pacer>>,
    err: mpsc::UnboundedSender<SessionError>,
) -> mpsc::UnboundedSender<Frame> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
    tokio::spawn(async move {
        let what = preamble.as_ref().map_or("reply stream".to_string(), |p| format!("{:?} stream of {}", p.stream, p.volume));
        let mut send = match open.await {
            Ok(send) => send,
            Err(e) => {
                let _ = err.send(e);
                return;
            }
        };
        if let Some(p) = &preamble {
            if let Err(e) = send.write_all(&p.encode()).await {
                let _ = err.send(SessionError::Preamble(e));
                return;
            }
        }
        while let Some(f) = rx.recv().await {
            let written = match &pacer {
                Some(p) => write_paced(&mut send, &f, p).await,
                None => write_frame(&mut send, &f).await,
            };
            if let Err(e) = written {
                let _ = err.send(SessionError::Write { stream: what, source: e });
                return;
            }
        }
        let _ = send.finish();
    });
    tx
}

/// The accepting side: the volumes by name, with their current incoming session.
struct Accepting {
    volumes: HashMap<String, (usize, Volume)>,
    current: Mutex<HashMap<usize, Current>>,
    routes: Routes,
    refusals: Arc<Refusals>,
    conns: Arc<LinkConns>,
    liveness: Timing,
}

async fn accept_loop(
    endpoint: Endpoint,
    liveness: Timing,
    volumes: Vec<Volume>,
    routes: Routes,
    refusals: Arc<Refusals>,
    conns: Arc<LinkConns>,
    mut shutdown: watch::Receiver<bool>,
) {
    let accepting = Arc::new(Accepting {
        volumes: volumes.iter().enumerate().map(|(i, v)| (v.name().to_owned(), (i, v.clone()))).collect(),
        current: Mutex::new((0..volumes.len()).map(|i| (i, Current { session: None })).collect()),
        routes,
        refusals,
        conns,
        liveness,
    });
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                tokio::spawn(serve_connection(incoming, accepting.clone()));
            }
            _ = shutdown.changed() => return,
        }
    }
}

async fn serve_connection(incoming: quinn::Incoming, a: Arc<Accepting>) {
    let remote = incoming.remote_address();
    // The certificate was checked during the handshake, and a bad one counted there. A
    // client that sent none never reaches the verifier: rustls ends the handshake with the
    // certificate_required alert, which is counted here.
    let conn = match incoming.await {
        Ok(c) => c,
        Err(quinn::ConnectionError::TransportError(t)) if t.code == quinn::TransportErrorCode::crypto(CERTIFICATE_REQUIRED) => {
            a.refusals.record("no_certificate", &format!("{remote} presented no client certificate"));
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
                Ok((send, recv)) => { tokio::spawn(control_stream(conn.clone(), send, recv, a.clone())); }
                Err(_) => return,
            },
            uni = conn.accept_uni() => match uni {
                Ok(recv) => { tokio::spawn(data_stream(conn.clone(), recv, a.clone())); }
                Err(_) => return,
            },
        }
    }
}

/// Reads a stream's preamble and finds its volume; a stream naming no volume of this site
/// closes the connection.
async fn attach(conn: &Connection, recv: &mut quinn::RecvStream, a: &Accepting) -> Result<(Preamble, usize, Volume), FramingError> {
    let p = Preamble::read(recv).await?;
    match a.volumes.get(&p.volume) {
        Some((i, v)) => Ok((p, *i, v.clone())),
        None => {
            tracing::warn!(volume = p.volume, "the peer opened a stream for a volume this site does not have; closing");
            conn.close(VarInt::from_u32(CLOSE_REFUSED), b"unknown volume");
            Err(FramingError::Preamble("unknown volume"))
        }
    }
}

fn is_current(a: &Accepting, i: usize, session: SessionId) -> bool {
    a.current.lock().expect("not poisoned").get(&i).is_some_and(|c| c.session == Some(session))
}

async fn control_stream(conn: Connection, send: quinn::SendStream, mut recv: quinn::RecvStream, a: Arc<Accepting>) {
    let Ok((p, i, volume)) = attach(&conn, &mut recv, &a).await else { return };
    if p.stream != Stream::Control {
        conn.close(VarInt::from_u32(CLOSE_REFUSED), b"a bidirectional stream must be a control stream");
        return;
    }
    a.conns.set(ConnKind::Control, &conn);
    let (err_tx, mut err_rx) = mpsc::unbounded_channel::<SessionError>();
    let writer = spawn_writer(async { Ok(send) }, None, None, err_tx);
    // The accepting side answers on the control stream only (see `Route::send`).
    let route = Route { control: writer.clone(), lanes: None, conns: vec![conn.clone()] };
    let keep_alive = writer;
    {
        // A newer session replaces one whose end was not seen yet; the volume handles that
        // when it learns of the new one.
        let mut current = a.current.lock().expect("not poisoned");
        current.insert(i, Current { session: Some(p.session) });
        a.routes.lock().expect("not poisoned").insert((i, p.session), route);
        volume.link(LinkEvent::Connected(p.session));
    }
    let live = Liveness::new(a.liveness);
    volume.link(LinkEvent::Heard { session: p.session, at: live.heard_at(), silence: live.timing().silence });
    tracing::info!(volume = p.volume, session = p.session.0, remote = %conn.remote_address(), "replication session up");
    // Reading a frame is not cancel-safe (a partial frame would be lost), so the reader is
    // one future, polled to its end beside the timers rather than restarted by them.
    let reading = async {
        let mut buf = Vec::new();
        loop {
            match read_frame(&mut recv, &mut buf).await {
                Ok(Some(f)) if is_current(&a, i, p.session) => received(&volume, p.session, f, &live, &keep_alive),
                Ok(Some(_)) | Ok(None) => return,
                Err(e) => {
                    tracing::warn!(volume = p.volume, error = %e, "bad control stream; closing the connection");
                    conn.close(VarInt::from_u32(CLOSE_REFUSED), b"bad frame");
                    return;
                }
            }
        }
    };
    tokio::pin!(reading);
    let mut probes = probe_interval(live.timing());
    loop {
        tokio::select! {
            _ = &mut reading => break,
            Some(e) = err_rx.recv() => {
                tracing::info!(volume = p.volume, error = %e, "control stream write failed");
                break;
            }
            _ = probes.tick() => {
                let _ = keep_alive.send(live.probe());
            }
            _ = tokio::time::sleep_until(live.deadline().into()) => {
                if live.is_lost() {
                    let why = live.reason();
                    tracing::warn!(volume = p.volume, session = p.session.0, why, "replication peer lost; closing the connection");
                    conn.close(VarInt::from_u32(CLOSE_PEER_LOST), why.as_bytes());
                    break;
                }
            }
        }
    }
    a.routes.lock().expect("not poisoned").remove(&(i, p.session));
    let mut current = a.current.lock().expect("not poisoned");
    if current.get(&i).is_some_and(|c| c.session == Some(p.session)) {
        current.insert(i, Current { session: None });
        volume.link(LinkEvent::Disconnected(p.session));
        tracing::info!(volume = p.volume, session = p.session.0, "replication session down");
    }
}

async fn data_stream(conn: Connection, mut recv: quinn::RecvStream, a: Arc<Accepting>) {
    let Ok((p, i, volume)) = attach(&conn, &mut recv, &a).await else { return };
    if !matches!(p.stream, Stream::Data(_) | Stream::Resync) {
        conn.close(VarInt::from_u32(CLOSE_REFUSED), b"a unidirectional stream must be a data or resync stream");
        return;
    }
    a.conns.set(ConnKind::Data, &conn);
    let mut buf = Vec::new();
    loop {
        match read_frame(&mut recv, &mut buf).await {
            Ok(Some(f)) if is_current(&a, i, p.session) => volume.link(LinkEvent::Frame(p.session, f)),
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
