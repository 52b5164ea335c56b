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
    /// Runs until every sender is gone and every reply written: `Ok`; or, once the socket
    /// failed, until every sender is gone, dropping the replies still to come as they
    /// complete: `Err`.
    pub async fn run(&self) -> io::Result<()> {
        let shared = &self.0;
        loop {
            let wait_for_room = {
                let mut q = shared.queue.lock().expect("not poisoned");
                if q.broken || q.chunks.is_empty() {
                    // Ends only once every request has: a connection gives its slot back
                    // holding nothing of the budget.
                    if q.senders == 0 {
                        return if q.broken { Err(io::ErrorKind::BrokenPipe.into()) } else { Ok(()) };
                    }
                    false
                } else {
                    match write_now(&shared.wr, &mut q) {
                        Ok(true) => continue,
                        Ok(false) => true,
                        Err(e) => {
                            tracing::debug!(error = %e, "NBD reply not written; the connection's remaining replies are dropped");
                            q.fail();
                            shared.broken.notify_one();
                            continue;
                        }
                    }
                }
            };
            // Queued and not taken: wait for room. Otherwise wait for a reply that did not go
            // out at once, or for the last sender to go.
            if wait_for_room {
                if let Err(e) = shared.wr.writable().await {
                    tracing::debug!(error = %e, "NBD socket not writable; the connection's remaining replies are dropped");
                    shared.queue.lock().expect("not poisoned").fail();
                    shared.broken.notify_one();
                }
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

#[cfg(test)]
mod tests {
    use super::super::budget::{BudgetCounters, SiteBudget};
    use super::*;
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncReadExt;
    use tokio::net::tcp::OwnedReadHalf;
    use tokio::net::{TcpListener, TcpStream};

    /// A reply path over a real socket, its client end, and a budget to send with.
    struct Path {
        client: TcpStream,
        _input: OwnedReadHalf,
        counters: Arc<BudgetCounters>,
        budget: super::super::budget::ConnectionBudget,
        sender: Sender,
        writer: Writer,
        writing: tokio::task::JoinHandle<io::Result<()>>,
    }

    impl Path {
        async fn open() -> Path {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let (input, wr) = server.into_split();
            let counters = Arc::new(BudgetCounters::default());
            let budget = SiteBudget::new(1 << 30, 1, 1 << 20, counters.clone()).connection(1 << 30);
            let (sender, writer) = open(wr);
            let writing = tokio::spawn({
                let writer = writer.clone();
                async move { writer.run().await }
            });
            Path { client, _input: input, counters, budget, sender, writer, writing }
        }
    }

    /// Replies sent from several threads at once, many more bytes than the socket buffers
    /// take while the client reads nothing, then read back: each arrives whole (its bytes
    /// never interleaved with another's), exactly once; the budget of each is held until it
    /// was written, and the writer ends once the last sender is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replies_from_many_threads_arrive_whole_and_give_their_budget_back() {
        const THREADS: u64 = 4;
        const PER_THREAD: u64 = 200;
        let Path { mut client, _input, counters, budget, sender, writer: _, writing } = Path::open().await;

        // Reply i of thread t: a 16-byte head naming it, then (t + i) % 7 * 9,000 bytes of
        // data filled with its own byte, so that an interleaving shows.
        let mut threads = Vec::new();
        let mut total = 0u64;
        for t in 0..THREADS {
            let mut held = Vec::new();
            for i in 0..PER_THREAD {
                let len = (t + i) % 7 * 9_000;
                total += 16 + len;
                held.push((i, len, budget.take(len.max(1) as u32).await));
            }
            let sender = sender.clone();
            threads.push(std::thread::spawn(move || {
                for (i, len, h) in held {
                    let id = t * PER_THREAD + i;
                    let mut head = Vec::with_capacity(16);
                    head.extend_from_slice(&id.to_be_bytes());
                    head.extend_from_slice(&len.to_be_bytes());
                    let data = (len > 0).then(|| Bytes::from(vec![id as u8; len as usize]));
                    sender.clone().send(Encoded { head: Bytes::from(head), data }, h);
                }
            }));
        }
        drop(sender);
        for t in threads {
            t.join().unwrap();
        }
        assert!(counters.held_bytes.load(Ordering::Relaxed) > 0, "replies not yet read still hold their budget");

        let mut seen = vec![false; (THREADS * PER_THREAD) as usize];
        let mut read = 0u64;
        while read < total {
            let mut head = [0u8; 16];
            client.read_exact(&mut head).await.unwrap();
            let id = u64::from_be_bytes(head[..8].try_into().unwrap());
            let len = u64::from_be_bytes(head[8..].try_into().unwrap());
            assert!(!std::mem::replace(&mut seen[id as usize], true), "reply {id} arrived twice");
            assert_eq!(len, (id / PER_THREAD + id % PER_THREAD) % 7 * 9_000, "reply {id}'s head is its own");
            let mut data = vec![0u8; len as usize];
            client.read_exact(&mut data).await.unwrap();
            assert!(data.iter().all(|b| *b == id as u8), "reply {id} arrived whole, not interleaved");
            read += 16 + len;
        }
        assert!(seen.iter().all(|s| *s), "every reply arrived");
        writing.await.unwrap().expect("the writer ends cleanly once every sender is gone");
        assert_eq!(counters.held_bytes.load(Ordering::Relaxed), 0, "every reply's budget is back");
    }

    /// A socket that fails drops the replies queued and those still to come, gives back
    /// their budget, says so to the connection, and ends the writer with the error once
    /// every request has ended (not before: the connection's slot would be free while
    /// requests still hold budget).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_socket_drops_the_replies_and_gives_their_budget_back() {
        let Path { client, _input, counters, budget, sender, writer, writing } = Path::open().await;
        // Fill the socket while the client reads nothing, then reset it.
        let later = sender.clone();
        for _ in 0..64 {
            sender.clone().send(
                Encoded { head: Bytes::from_static(b"reply"), data: Some(Bytes::from(vec![0; 1 << 20])) },
                budget.take(1 << 20).await,
            );
        }
        socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(client);
        writer.broken().await;
        assert!(!writing.is_finished(), "the writer waits for the requests still running");
        later.send(Encoded { head: Bytes::from_static(b"late"), data: None }, budget.take(4096).await);
        drop(sender);
        assert!(writing.await.unwrap().is_err(), "the writer ends with the socket's error once every request has");
        assert_eq!(counters.held_bytes.load(Ordering::Relaxed), 0, "queued and later replies gave their budget back");
    }
}
