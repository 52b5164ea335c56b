//! The NBD server: accepts connections, runs the handshake, and serves requests.
//!
//! Owns: the connection cap, the handshake timeout, the reader and writer of each
//! connection, what each request costs in the in-flight budget, and the mapping of the
//! core's host errors to NBD errors.
//!
//! Must not: check requests itself (`proto::check_request` is the one gate), write to media
//! (reads go to `Volume::read`, writes to the volume's driver), or account bytes in flight
//! itself (`budget` does, for all connections of the site).
//!
//! Each connection is two tasks. The reader parses requests and submits them; every
//! request first takes its cost (its payload, at least `MIN_REQUEST_COST`) from the budget,
//! before its payload is read, and holds it until its reply has been written; a write gives
//! back all but `MIN_REQUEST_COST` once the volume has applied it. A client that sends
//! faster than it reads replies, or a site whose budget is spent, simply stops being read.
//! Replies go out in completion order, written by the thread that completes the request;
//! the writer sends only what the socket did not take at once (`replies`).
//!
//! A client that finishes sending (a half-close, as libnbd does after `NBD_CMD_DISC`) has
//! every request it sent served and answered. A connection ends as soon as its client has
//! reset the socket (`HangUp` sees it without reading; a client that closed its socket
//! altogether resets it at the first reply) or its socket no longer takes replies, whatever
//! the reader was waiting for: requests read and not yet submitted are dropped, and those
//! still unread in the socket are never served (a client that hangs up gets no reply anyway;
//! NBD calls this a hard disconnect). Requests already submitted finish, their replies
//! written if the socket still takes them and dropped if not; the slot is given back once
//! the last has finished, so a free slot holds nothing of the budget. After a disconnect or
//! a server shutdown, the replies owed are followed by the end of output, and input still
//! coming is read and dropped for a bounded time, so that closing never resets the
//! connection under replies the client has not yet received.
//!
//! Outside the budget, each connection holds a fixed buffer of `INPUT_BUFFER_BYTES` of input;
//! replies not yet written are held by the budget of their requests. A write's payload is
//! read into its own buffer of exactly its size, so that no payload keeps a larger input
//! buffer alive.

use super::budget::{BudgetCounters, ConnectionBudget, Held, SiteBudget, GUARANTEED_BYTES_PER_CONNECTION};
use super::handshake::{ExportInfo, Handshake, Negotiated, Step};
use super::proto::*;
use super::replies::{self, Encoded, Sender};
use crate::config::NbdConfig;
use crate::volume::Volume;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use geomirror_core::{HostError, WriteOp};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// What a request without payload costs (and a write keeps once applied, while its reply
/// waits), so that the count of requests and replies in flight is bounded too.
const MIN_REQUEST_COST: u32 = 4096;
/// The reader's input buffer, and the most it reads ahead of the request it is parsing:
/// enough to take many small requests in one read, small enough to stay outside the budget.
const INPUT_BUFFER_BYTES: usize = 64 << 10;
/// Payload bytes of a refused write are read and dropped through a buffer of this size.
const SKIP_CHUNK_BYTES: usize = 64 << 10;
/// After closing on a protocol violation, input is still read and dropped for this long (and
/// at most `LINGER_BYTES`), so that the client receives the error reply instead of a reset
/// that would discard it.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

/// How the transmission phase ended.
enum End {
    /// The client's input ended (it finished sending, or the socket failed): nothing it sent
    /// is left unread.
    InputEnded,
    /// Disconnect, or server shutdown: the client may have sent more, which stays unread.
    Stopped,
    /// The client broke the protocol; the connection closes with a lingering read.
    Violation,
}

/// Counters of the NBD front end, for status and metrics.
#[derive(Debug, Default)]
pub struct NbdCounters {
    pub connections_accepted: AtomicU64,
    pub connections_refused_at_cap: AtomicU64,
    pub handshakes_timed_out: AtomicU64,
    pub handshakes_refused: AtomicU64,
    pub requests: AtomicU64,
    /// Requests refused by the gate or failed by the volume, by NBD error.
    pub errors_inval: AtomicU64,
    pub errors_nospc: AtomicU64,
    pub errors_overflow: AtomicU64,
    pub errors_io: AtomicU64,
    pub errors_other: AtomicU64,
    pub protocol_violations: AtomicU64,
    /// The site's in-flight budget.
    pub inflight: Arc<BudgetCounters>,
}

impl NbdCounters {
    fn error(&self, e: NbdError) {
        let c = match e {
            NbdError::Inval => &self.errors_inval,
            NbdError::NoSpc => &self.errors_nospc,
            NbdError::Overflow => &self.errors_overflow,
            NbdError::Io => &self.errors_io,
            _ => &self.errors_other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Maps the core's reasons to the errors NBD clients know.
pub fn nbd_error(e: HostError) -> NbdError {
    match e {
        HostError::OutOfRange => NbdError::Inval,
        HostError::Fenced => NbdError::Perm,
        // ESHUTDOWN asks the client to disconnect and retry elsewhere (a switchover).
        HostError::NotServing => NbdError::Shutdown,
        HostError::LinkDown | HostError::Media | HostError::ReplicationTimeout => NbdError::Io,
    }
}

pub struct NbdServer {
    listener: TcpListener,
    cfg: NbdConfig,
    counters: Arc<NbdCounters>,
    budget: Arc<SiteBudget>,
    /// One permit per connection, held until the connection has ended and given back all it
    /// held.
    slots: Arc<Semaphore>,
}

impl NbdServer {
    /// Binds the listener. Clients that connect wait in its queue until `serve`.
    pub async fn bind(cfg: NbdConfig) -> io::Result<NbdServer> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let counters = Arc::new(NbdCounters::default());
        let budget = Arc::new(SiteBudget::new(
            cfg.max_inflight_bytes,
            cfg.max_connections,
            GUARANTEED_BYTES_PER_CONNECTION,
            counters.inflight.clone(),
        ));
        let slots = Arc::new(Semaphore::new(cfg.max_connections));
        Ok(NbdServer { listener, cfg, counters, budget, slots })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn counters(&self) -> Arc<NbdCounters> {
        self.counters.clone()
    }

    /// The connection slots: all of them can be taken once every connection has ended.
    #[cfg(test)]
    pub(crate) fn slots(&self) -> Arc<Semaphore> {
        self.slots.clone()
    }

    /// Serves `volumes` until `shutdown` turns true; then stops accepting, lets every
    /// connection finish the requests it has read, and returns when all have closed.
    pub async fn serve(self, volumes: Vec<Volume>, mut shutdown: watch::Receiver<bool>) {
        let volumes = Arc::new(volumes);
        let slots = self.slots.clone();
        let exports: Vec<ExportInfo> = volumes
            .iter()
            .map(|v| ExportInfo { name: v.name().into(), description: v.description().into(), size_bytes: v.size_bytes() })
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            // Out of file descriptors and the like: back off a little
                            // rather than spin on the error.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        self.counters.connections_refused_at_cap.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%peer, max = self.cfg.max_connections, "connection refused: too many connections");
                        drop(stream);
                        continue;
                    };
                    self.counters.connections_accepted.fetch_add(1, Ordering::Relaxed);
                    let conn = Connection {
                        volumes: volumes.clone(),
                        exports: exports.clone(),
                        cfg: self.cfg.clone(),
                        counters: self.counters.clone(),
                        budget: self.budget.clone(),
                        shutdown: shutdown.clone(),
                        peer,
                    };
                    tasks.spawn(conn.run(stream, slot));
                }
                _ = shutdown.changed() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        drop(self.listener);
        while tasks.join_next().await.is_some() {}
    }
}

struct Connection {
    volumes: Arc<Vec<Volume>>,
    exports: Vec<ExportInfo>,
    cfg: NbdConfig,
    counters: Arc<NbdCounters>,
    budget: Arc<SiteBudget>,
    shutdown: watch::Receiver<bool>,
    peer: SocketAddr,
}

/// The reader's buffered input: requests and payloads are split off it without copying.
struct ClientInput {
    rd: OwnedReadHalf,
    buf: BytesMut,
}

impl ClientInput {
    /// Makes `buf` hold at least `n` bytes (a request header), reading no more than the
    /// buffer has room for. False if the client closed before sending them.
    async fn fill(&mut self, n: usize) -> io::Result<bool> {
        while self.buf.len() < n {
            if self.buf.capacity() == self.buf.len() {
                // Nothing split off the buffer outlives the reader's use of it, so this moves
                // the few unparsed bytes to the front of the same allocation instead of
                // growing it.
                self.buf.reserve(n - self.buf.len());
            }
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The next `n` bytes, in a buffer of their own: what was read ahead is copied, the rest
    /// is read straight into it. None if the client closed before sending them.
    async fn take(&mut self, n: usize) -> io::Result<Option<Bytes>> {
        let mut data = BytesMut::with_capacity(n);
        let have = n.min(self.buf.len());
        data.put_slice(&self.buf[..have]);
        self.buf.advance(have);
        while data.len() < n {
            let room = n - data.len();
            if self.rd.read_buf(&mut (&mut data).limit(room)).await? == 0 {
                return Ok(None);
            }
        }
        Ok(Some(data.freeze()))
    }

    /// Reads and drops `n` bytes without holding more than one chunk.
    async fn skip(&mut self, mut n: usize) -> io::Result<bool> {
        let have = n.min(self.buf.len());
        let _ = self.buf.split_to(have);
        n -= have;
        let mut scratch = vec![0u8; SKIP_CHUNK_BYTES.min(n)];
        while n > 0 {
            let want = n.min(scratch.len());
            let got = self.rd.read(&mut scratch[..want]).await?;
            if got == 0 {
                return Ok(false);
            }
            n -= got;
        }
        Ok(true)
    }
}

/// Tells when the client has reset the connection (it is gone, or closed its socket with
/// replies unread), without reading from the socket: the requests it sent before are still
/// there, and reading them to find the end would undo the backpressure. A plain end of the
/// client's input is not a hang-up: a client may finish sending and still read its replies
/// (libnbd half-closes after `NBD_CMD_DISC`), so what it sent is served; one that closed
/// altogether answers the first reply with a reset, which the reply path sees. It watches a
/// duplicate of the socket's descriptor, registered on its own, so that waiting for the
/// reset never consumes a readiness the reader waits for.
struct HangUp(TcpStream);

impl HangUp {
    fn watch(stream: &TcpStream) -> io::Result<HangUp> {
        let dup = std::net::TcpStream::from(stream.as_fd().try_clone_to_owned()?);
        Ok(HangUp(TcpStream::from_std(dup)?))
    }

    async fn wait(&self) {
        loop {
            match self.0.ready(Interest::READABLE).await {
                Ok(ready) if ready.is_read_closed() => {
                    // A reset leaves its error on the socket (unless the reader took it first,
                    // which ends the connection just as well); a plain end of input does not,
                    // and the end of input stays signalled: nothing more to wait for here.
                    if matches!(self.0.take_error(), Ok(Some(_))) {
                        return;
                    }
                    return std::future::pending().await;
                }
                Ok(_) => {
                    // More input, not its end: forget this readiness (of the duplicate only)
                    // and wait for the next change.
                    let _ = self.0.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                }
                // The runtime is going away, and the connection with it.
                Err(_) => return,
            }
        }
    }
}

enum Body {
    Done,
    Read { offset: u64, data: Bytes },
    Error { error: NbdError, message: String },
}

impl Body {
    fn encode(self, structured: bool, cookie: u64) -> Encoded {
        let mut head = BytesMut::with_capacity(64);
        let data = match self {
            Body::Done => {
                put_reply_ok(&mut head, structured, cookie, None);
                None
            }
            Body::Error { error, message } => {
                put_reply_error(&mut head, structured, cookie, error, &message);
                None
            }
            Body::Read { offset, data } => {
                put_reply_ok(&mut head, structured, cookie, Some((offset, data.len() as u32)));
                Some(data)
            }
        };
        Encoded { head: head.freeze(), data }
    }
}

/// Where a request's reply goes: the connection's reply path, in the framing negotiated.
struct ReplyTo {
    sender: Sender,
    structured: bool,
}

impl ReplyTo {
    /// Sends the reply, holding `budget` until it has been written.
    fn send(self, cookie: u64, body: Body, budget: Held) {
        self.sender.send(body.encode(self.structured, cookie), budget);
    }

    fn clone(&self) -> ReplyTo {
        ReplyTo { sender: self.sender.clone(), structured: self.structured }
    }
}

impl Connection {
    async fn run(mut self, stream: TcpStream, slot: OwnedSemaphorePermit) {
        let _ = stream.set_nodelay(true);
        let hang_up = match HangUp::watch(&stream) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(peer = %self.peer, error = %e, "cannot watch the connection for the client hanging up; closed");
                return;
            }
        };
        let (rd, mut wr) = stream.into_split();
        let mut input = ClientInput { rd, buf: BytesMut::with_capacity(INPUT_BUFFER_BYTES) };
        let mut shutdown = self.shutdown.clone();
        let negotiated = tokio::select! {
            r = tokio::time::timeout(self.cfg.handshake_timeout, self.handshake(&mut input, &mut wr)) => r,
            _ = shutdown.changed() => return self.close(slot, wr, input),
        };
        let negotiated = match negotiated {
            Ok(Ok(Some(n))) => n,
            Ok(Ok(None)) => return self.close(slot, wr, input),
            Ok(Err(e)) => {
                tracing::debug!(peer = %self.peer, error = %e, "connection lost during the handshake");
                return self.close(slot, wr, input);
            }
            Err(_) => {
                self.counters.handshakes_timed_out.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %self.peer, timeout = ?self.cfg.handshake_timeout, "handshake not finished in time; dropped");
                return self.close(slot, wr, input);
            }
        };
        let volume = self.volumes[negotiated.export].clone();
        tracing::info!(peer = %self.peer, volume = volume.name(), structured = negotiated.structured, "client connected");
        let (sender, writer) = replies::open(wr);
        let reply_to = ReplyTo { sender, structured: negotiated.structured };
        let writing = tokio::spawn({
            let writer = writer.clone();
            async move { writer.run().await }
        });
        // Reading stops as soon as the client has hung up or no reply can reach it, whatever
        // the reader waits for (the budget, most often): what it read and has not submitted
        // is dropped, and the requests still unread in the socket are never served.
        let end = tokio::select! {
            r = self.transmission(&mut input, &volume, negotiated, reply_to) => match r {
                Ok(end) => end,
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "connection read ended");
                    End::InputEnded
                }
            },
            _ = hang_up.wait() => {
                tracing::debug!(peer = %self.peer, "client hung up; the requests not yet started are dropped");
                End::InputEnded
            }
            () = writer.broken() => {
                tracing::debug!(peer = %self.peer, "replies cannot be sent; the requests not yet started are dropped");
                End::InputEnded
            }
        };
        // Every reply still owed is written before the connection closes (or dropped, if the
        // socket no longer takes them), and every request has ended: the connection gives
        // its slot back holding nothing.
        // Input left unread in the socket would make the kernel close it with a reset, which
        // discards the replies still on their way: the replies are followed by the end of
        // output, and what the client still sends is read and dropped until it closes (for
        // `LINGER` and `LINGER_BYTES` at most).
        let written = matches!(writing.await, Ok(Ok(())));
        if written && matches!(end, End::Stopped | End::Violation) {
            let _ = writer.shutdown();
            let _ = tokio::time::timeout(LINGER, input.skip(LINGER_BYTES)).await;
        }
        tracing::info!(peer = %self.peer, volume = volume.name(), "client disconnected");
        drop(slot);
        drop(writer);
        drop(input);
    }

    /// The connection slot is released before the socket closes, so a client that sees the
    /// close can connect again at once.
    fn close(self, slot: OwnedSemaphorePermit, wr: OwnedWriteHalf, input: ClientInput) {
        drop(slot);
        drop(wr);
        drop(input);
    }

    async fn handshake(&self, input: &mut ClientInput, wr: &mut OwnedWriteHalf) -> io::Result<Option<Negotiated>> {
        let mut hs = Handshake::new(self.exports.clone());
        loop {
            let step = hs.feed(&mut input.buf);
            let out = hs.take_output();
            if !out.is_empty() {
                wr.write_all(&out).await?;
            }
            match step {
                Step::More => {
                    if input.rd.read_buf(&mut input.buf).await? == 0 {
                        return Ok(None);
                    }
                }
                Step::Transmit(n) => return Ok(Some(n)),
                Step::Close(why) => {
                    self.counters.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(peer = %self.peer, why, "handshake ended");
                    return Ok(None);
                }
            }
        }
    }

    async fn transmission(&mut self, input: &mut ClientInput, volume: &Volume, n: Negotiated, reply_to: ReplyTo) -> io::Result<End> {
        let limits = Limits { export_bytes: volume.size_bytes(), structured: n.structured };
        let budget: ConnectionBudget = self.budget.connection(self.cfg.max_inflight_bytes_per_connection);
        loop {
            let more = tokio::select! {
                more = input.fill(REQUEST_HEADER_BYTES) => more?,
                _ = self.shutdown.changed() => {
                    tracing::info!(peer = %self.peer, "server shutting down; closing after the replies owed");
                    return Ok(End::Stopped);
                }
            };
            if !more {
                return Ok(End::InputEnded);
            }
            let raw: [u8; REQUEST_HEADER_BYTES] = input.buf.split_to(REQUEST_HEADER_BYTES)[..].try_into().expect("28 bytes");
            let header = match parse_request_header(&raw) {
                Ok(h) => h,
                Err(BadMagic(m)) => {
                    self.counters.protocol_violations.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %self.peer, magic = format!("{m:#010x}"), "request without the request magic; closing");
                    return Ok(End::Violation);
                }
            };
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let command = match check_request(&header, &limits) {
                Ok(c) => c,
                Err(refusal) => {
                    self.counters.error(refusal.error);
                    tracing::debug!(peer = %self.peer, ?header, reason = refusal.reason, "request refused");
                    let permit = budget.take(MIN_REQUEST_COST).await;
                    let body = Body::Error { error: refusal.error, message: refusal.reason.into() };
                    reply_to.clone().send(header.cookie, body, permit);
                    if refusal.close {
                        self.counters.protocol_violations.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = %self.peer, len = header.len, "write larger than the maximum block size; closing");
                        return Ok(End::Violation);
                    }
                    if refusal.skip_payload > 0 && !input.skip(refusal.skip_payload as usize).await? {
                        return Ok(End::InputEnded);
                    }
                    continue;
                }
            };
            tracing::trace!(peer = %self.peer, cookie = header.cookie, ?command, "request");
            let cost = |len: u32| len.max(MIN_REQUEST_COST);
            match command {
                Command::Disconnect => return Ok(End::Stopped),
                Command::Read { offset, len } => {
                    let permit = budget.take(cost(len)).await;
                    let (volume, reply_to, counters) = (volume.clone(), reply_to.clone(), self.counters.clone());
                    let cookie = header.cookie;
                    tokio::task::spawn_blocking(move || {
                        let body = match volume.read(offset, len) {
                            Ok(data) => Body::Read { offset, data },
                            Err(e) => {
                                counters.error(nbd_error(e));
                                Body::Error { error: nbd_error(e), message: e.to_string() }
                            }
                        };
                        reply_to.send(cookie, body, permit);
                    });
                }
                Command::Write { offset, len, fua } => {
                    let permit = budget.take(cost(len)).await;
                    let Some(data) = input.take(len as usize).await? else {
                        return Ok(End::InputEnded);
                    };
                    volume.write(WriteOp::data(offset, data), fua, self.completion(&reply_to, header.cookie, permit));
                }
                Command::Trim { offset, len, fua } => {
                    let permit = budget.take(MIN_REQUEST_COST).await;
                    volume.write(WriteOp::trim(offset, len as u64), fua, self.completion(&reply_to, header.cookie, permit));
                }
                Command::WriteZeroes { offset, len, fua } => {
                    let permit = budget.take(MIN_REQUEST_COST).await;
                    volume.write(WriteOp::zero(offset, len as u64), fua, self.completion(&reply_to, header.cookie, permit));
                }
                Command::Flush => {
                    let permit = budget.take(MIN_REQUEST_COST).await;
                    volume.flush(self.completion(&reply_to, header.cookie, permit));
                }
            }
        }
    }

    /// Sends the reply of a write, trim, zeroing or flush. The payload is on the media by
    /// then (what replication still ships of it counts against the lag bound, not here), so
    /// only the reply's cost stays held.
    fn completion(&self, reply_to: &ReplyTo, cookie: u64, mut permit: Held) -> crate::volume::Completion {
        let reply_to = reply_to.clone();
        let counters = self.counters.clone();
        Box::new(move |result| {
            permit.shrink_to(MIN_REQUEST_COST);
            let body = match result {
                Ok(()) => Body::Done,
                Err(e) => {
                    counters.error(nbd_error(e));
                    Body::Error { error: nbd_error(e), message: e.to_string() }
                }
            };
            reply_to.send(cookie, body, permit);
        })
    }
}
