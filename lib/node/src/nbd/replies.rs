//! The reply path of one NBD connection: replies go to the socket from the thread that
//! completes the request, and a writer task sends only what the socket would not take at once.
//!
//! Owns: the connection's write half, the replies encoded and not yet written, the budget
//! each of them holds until its last byte is on the wire, and the end of the reply path
//! (every request of the connection has ended and its reply was written or dropped).
//!
//! Must not: reorder the bytes of one reply, or block the thread that sends one (a volume's
//! driver thread completes writes: it never waits for a slow client). A reply the socket does
//! not take at once is queued, in full, behind the ones already queued.
//!
//! Why not a channel to a writer task: a request completes on the volume's driver thread (a
//! write) or on a blocking thread (a read). Handing each reply to a task costs a wake-up of
//! that task and of the runtime's worker per request, which is the largest part of a
//! request's cost at queue depth 1, and the first to grow when the CPU is shared with other
//! processes. A non-blocking write from the completing thread costs one system call, and
//! the socket's own buffer does the batching a writer task would have done.

use super::budget::Held;
use bytes::{Buf, Bytes};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

/// The most chunks one vectored write gathers (Linux's IOV_MAX is 1024).
const MAX_IOVECS: usize = 64;

/// A reply, encoded: its header and, for a read, the data.
pub(super) struct Encoded {
    pub head: Bytes,
    pub data: Option<Bytes>,
}

struct Shared {
    wr: OwnedWriteHalf,
    queue: Mutex<Queue>,
    /// Wakes the writer task: something was queued, or the last sender is gone.
    more: Notify,
    /// Told once, when the socket stops taking replies: the connection stops reading.
    broken: Notify,
}

#[derive(Default)]
struct Queue {
    /// Bytes accepted and not yet written, in order.
    chunks: VecDeque<Bytes>,
    /// The budget of each queued reply, with the stream position of its last byte.
    held: VecDeque<(u64, Held)>,
    /// Stream positions: bytes ever queued (including those written directly) and written.
    queued: u64,
    written: u64,
    /// Senders still alive: requests of the connection that have not yet replied.
    senders: usize,
    /// The socket failed: replies are dropped as they come.
    broken: bool,
}

impl Queue {
    /// Accounts `n` more bytes written: drops written chunks and gives back the budget of
    /// replies now wholly on the wire.
    fn advance(&mut self, mut n: usize) {
        self.written += n as u64;
        while n > 0 {
            let front = self.chunks.front_mut().expect("written bytes were queued");
            if front.len() <= n {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
        while self.held.front().is_some_and(|(end, _)| *end <= self.written) {
            self.held.pop_front();
        }
        debug_assert_eq!(self.chunks.is_empty(), self.written == self.queued, "queued bytes match the chunks");
    }

    fn fail(&mut self) {
        self.broken = true;
        self.chunks.clear();
        self.held.clear();
    }
}

/// Writes as much of the queue as the socket takes now. `Ok(false)` if it would block.
fn write_now(wr: &OwnedWriteHalf, q: &mut Queue) -> io::Result<bool> {
    while !q.chunks.is_empty() {
        let slices: Vec<IoSlice<'_>> = q.chunks.iter().take(MAX_IOVECS).map(|c| IoSlice::new(c)).collect();
        match wr.try_write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => q.advance(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// What a request holds to send its reply. Each request takes one; the reply path ends once
/// every one has been used or dropped.
pub(super) struct Sender(Arc<Shared>);

impl Sender {
    /// Sends a reply, holding `budget` until it is on the wire (or dropped, if the socket
    /// failed). Never blocks: what the socket does not take now, the writer task sends.
    pub fn send(self, reply: Encoded, budget: Held) {
        let shared = &self.0;
        let mut q = shared.queue.lock().expect("not poisoned");
        if q.broken {
            return;
        }
        let was_empty = q.chunks.is_empty();
        for chunk in std::iter::once(reply.head).chain(reply.data).filter(|c| !c.is_empty()) {
            q.queued += chunk.len() as u64;
            q.chunks.push_back(chunk);
        }
        let end = q.queued;
        q.held.push_back((end, budget));
        if !was_empty {
            // The writer task is already waiting for the socket; it sends this too.
            return;
        }
        match write_now(&shared.wr, &mut q) {
            Ok(true) => {}
            Ok(false) => shared.more.notify_one(),
            Err(e) => {
                tracing::debug!(error = %e, "NBD reply not written; the connection's remaining replies are dropped");
                q.fail();
                shared.broken.notify_one();
            }
        }
    }
}

impl Clone for Sender {
    fn clone(&self) -> Sender {
        self.0.queue.lock().expect("not poisoned").senders += 1;
        Sender(self.0.clone())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let last = {
            let mut q = self.0.queue.lock().expect("not poisoned");
            q.senders -= 1;
            q.senders == 0
        };
        if last {
            self.0.more.notify_one();
        }
    }
}

/// The writer task's side: sends what the socket did not take at once, and tells when the
/// reply path has ended.
#[derive(Clone)]
pub(super) struct Writer(Arc<Shared>);

/// Opens the reply path of a connection: the first sender, and its writer.
pub(super) fn open(wr: OwnedWriteHalf) -> (Sender, Writer) {
    let queue = Queue { senders: 1, ..Queue::default() };
    let shared = Arc::new(Shared { wr, queue: Mutex::new(queue), more: Notify::new(), broken: Notify::new() });
    (Sender(shared.clone()), Writer(shared))
}

impl Writer {
    /// Runs until every sender is gone and every reply written: `Ok`, or `Err` once the
    /// socket failed (the replies still to come are then dropped as they complete).
    pub async fn run(&self) -> io::Result<()> {
        let shared = &self.0;
        loop {
            {
                let mut q = shared.queue.lock().expect("not poisoned");
                if q.broken {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                if q.chunks.is_empty() {
                    if q.senders == 0 {
                        return Ok(());
                    }
                } else {
                    match write_now(&shared.wr, &mut q) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => {
                            q.fail();
                            shared.broken.notify_one();
                            return Err(e);
                        }
                    }
                }
            }
            // Queued and not taken: wait for room. Nothing queued: wait for a reply that
            // did not go out at once, or for the last sender to go.
            let pending = !shared.queue.lock().expect("not poisoned").chunks.is_empty();
            if pending {
                shared.wr.writable().await?;
            } else {
                shared.more.notified().await;
            }
        }
    }

    /// Resolves once the socket stopped taking replies.
    pub async fn broken(&self) {
        self.0.broken.notified().await
    }

    /// Shuts the socket's sending side, so that the client sees the end of replies while
    /// its remaining input is read and dropped.
    pub fn shutdown(&self) -> io::Result<()> {
        socket2::SockRef::from(self.0.wr.as_ref()).shutdown(std::net::Shutdown::Write)
    }
}
