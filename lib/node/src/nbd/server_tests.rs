//! The NBD server over real sockets, against a standalone volume: what a connection holds
//! comes back when its client goes away, whatever the connection was waiting for.

use super::proto::*;
use super::server::NbdServer;
use crate::config::{NbdConfig, VolumeConfig};
use crate::store::MemoryStore;
use crate::volume::Volume;
use bytes::{BufMut, BytesMut};
use geomirror_core::{CoreConfig, Geometry, Mode, Role, SiteState};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const MIB: u32 = 1 << 20;
const VOLUME_BYTES: u64 = 64 << 20;
const SLOTS: usize = 4;
/// Each slot's 2 MiB share, and a pool of two 32 MiB reads.
const BUDGET_BYTES: u64 = SLOTS as u64 * (2 << 20) + (64 << 20);
/// Longest the test waits for what it expects; a hang fails it.
const HANG_GUARD: Duration = Duration::from_secs(30);

fn volume(dir: &std::path::Path) -> (Volume, std::thread::JoinHandle<()>) {
    let cfg = VolumeConfig {
        name: "vol0".into(),
        media: dir.join("vol0.img"),
        geometry: Geometry::new(VOLUME_BYTES, MIB as u64).unwrap(),
        description: String::new(),
        core: CoreConfig { mode: Mode::Standalone, ..CoreConfig::default() },
    };
    let store = MemoryStore::new(SiteState::fresh(Role::Primary, crate::store::new_store_id().unwrap()));
    Volume::start(&cfg, Box::new(store), None).unwrap()
}

/// A client in the transmission phase of `vol0`.
async fn client(addr: SocketAddr) -> TcpStream {
    handshake(TcpStream::connect(addr).await.unwrap()).await
}

/// A client in the transmission phase of `vol0` whose socket takes little at a time, so that
/// the server's replies wait in the server's socket while it reads.
async fn slow_client(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    handshake(socket.connect(addr).await.unwrap()).await
}

async fn handshake(mut s: TcpStream) -> TcpStream {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting[..8], NBDMAGIC.to_be_bytes());
    let mut hello = BytesMut::new();
    hello.put_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    hello.put_u64(IHAVEOPT);
    hello.put_u32(OPT_EXPORT_NAME);
    hello.put_u32(4);
    hello.put_slice(b"vol0");
    s.write_all(&hello).await.unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).await.unwrap();
    assert_eq!(export[..8], VOLUME_BYTES.to_be_bytes());
    s
}

fn read_request(out: &mut BytesMut, cookie: u64, offset: u64, len: u32) {
    request(out, CMD_READ, cookie, offset, len);
}

fn request(out: &mut BytesMut, command: u16, cookie: u64, offset: u64, len: u32) {
    out.put_u32(REQUEST_MAGIC);
    out.put_u16(0);
    out.put_u16(command);
    out.put_u64(cookie);
    out.put_u64(offset);
    out.put_u32(len);
}

/// Sends 32 MiB reads until the socket takes no more (the server has stopped reading it,
/// its budget spent), and reads no reply. Returns how many requests were sent.
fn pipeline_until_full(s: &TcpStream) -> usize {
    let mut batch = BytesMut::new();
    for i in 0..1024 {
        read_request(&mut batch, i, (i % 2) * (32 << 20), 32 * MIB);
    }
    let mut sent = 0;
    loop {
        match s.try_write(&batch[sent % batch.len()..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return sent / REQUEST_HEADER_BYTES,
            Err(e) => panic!("sending requests: {e}"),
        }
    }
}

/// A server of `vol0` with the test's slots and budget.
struct Served {
    addr: SocketAddr,
    counters: std::sync::Arc<super::server::NbdCounters>,
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    stop: watch::Sender<bool>,
    serving: tokio::task::JoinHandle<()>,
    vol: Volume,
    driver: std::thread::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Served {
    async fn start() -> Served {
        let dir = tempfile::tempdir().unwrap();
        let (vol, driver) = volume(dir.path());
        let cfg = NbdConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            max_connections: SLOTS,
            handshake_timeout: HANG_GUARD,
            max_inflight_bytes_per_connection: 64 << 20,
            max_inflight_bytes: BUDGET_BYTES,
        };
        let server = NbdServer::bind(cfg).await.unwrap();
        let (addr, counters, slots) = (server.local_addr().unwrap(), server.counters(), server.slots());
        let (stop, stopped) = watch::channel(false);
        let serving = tokio::spawn(server.serve(vec![vol.clone()], stopped));
        Served { addr, counters, slots, stop, serving, vol, driver, _dir: dir }
    }

    /// Stops the server (if not yet told to) and its volume, and waits for both.
    async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(HANG_GUARD, self.serving).await.expect("the server stops").unwrap();
        self.vol.stop();
        let driver = self.driver;
        tokio::task::spawn_blocking(move || driver.join().unwrap()).await.unwrap();
    }
}

/// Clients pipeline far more large reads than the site's budget holds, read no reply, and
/// go away: some with replies queued for them (their sockets are reset), some that never
/// got one (their sockets see a plain close), all with thousands of requests still unread in
/// the server's socket. Every slot and every byte of the budget comes back without serving
/// those requests, and the site then serves a new client's large read at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_go_away_without_reading_give_back_their_slots_and_budget() {
    let served = Served::start().await;
    let (addr, counters, slots) = (served.addr, served.counters.clone(), served.slots.clone());

    let mut gone = Vec::new();
    for _ in 0..SLOTS {
        gone.push(client(addr).await);
    }
    let mut unread = 0;
    for s in &gone {
        unread += pipeline_until_full(s);
    }
    println!("{unread} requests sent and never to be answered");
    drop(gone);

    let all = tokio::time::timeout(HANG_GUARD, slots.acquire_many(SLOTS as u32))
        .await
        .expect("every connection of a client gone ends, and gives its slot back")
        .unwrap();
    assert_eq!(counters.inflight.held_bytes.load(Ordering::Relaxed), 0, "the budget is all back");
    drop(all);

    // A new client's read, larger than its share, needs the pool: it is served.
    let mut c = client(addr).await;
    let mut request = BytesMut::new();
    read_request(&mut request, 7, 0, 4 * MIB);
    c.write_all(&request).await.unwrap();
    let mut reply = vec![0u8; 16 + 4 * MIB as usize];
    tokio::time::timeout(HANG_GUARD, c.read_exact(&mut reply)).await.expect("the read is answered").unwrap();
    assert_eq!(reply[..16], [&SIMPLE_REPLY_MAGIC.to_be_bytes()[..], &[0; 4], &7u64.to_be_bytes()].concat());

    served.stop().await;
}

/// Reads simple replies until the server's output ends: every read's (cookies 0..reads, of
/// `len` bytes) must be among them, in any order; replies to requests with cookies from
/// `reads` on (no data) may be too. The output must end plainly, not with a reset.
async fn read_replies_then_end(c: &mut TcpStream, reads: u64, len: u32) {
    let mut seen = std::collections::BTreeSet::new();
    let mut data = vec![0u8; len as usize];
    loop {
        let mut head = [0u8; 16];
        match tokio::time::timeout(HANG_GUARD, c.read(&mut head[..1])).await.expect("replies keep coming") {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => panic!("a plain end of output, not a reset: {e} after {} replies", seen.len()),
        }
        c.read_exact(&mut head[1..]).await.expect("a whole reply");
        assert_eq!(head[..8], [&SIMPLE_REPLY_MAGIC.to_be_bytes()[..], &[0; 4]].concat(), "a reply without error");
        let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
        assert!(seen.insert(cookie), "reply {cookie} came twice");
        if cookie < reads {
            c.read_exact(&mut data).await.expect("a read's data follows its reply");
        }
    }
    assert!((0..reads).all(|r| seen.contains(&r)), "every read owed was answered; answered: {seen:?}");
}

/// A client that sends its requests and a disconnect and then finishes sending (a
/// half-close, as libnbd does) gets every reply, although its requests hold far more than
/// the budget, so that most are read only after the half-close: the end of its input is not
/// a hang-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_finishes_sending_gets_every_reply() {
    let served = Served::start().await;
    let addr = served.addr;
    const READS: u64 = 64;
    let mut c = client(addr).await;
    let mut requests = BytesMut::new();
    for i in 0..READS {
        read_request(&mut requests, i, (i % 16) * (4 << 20), 4 * MIB);
    }
    request(&mut requests, CMD_DISC, READS, 0, 0);
    let (mut rd, mut wr) = c.split();
    let reading = async {
        // Reads while sending: the requests do not all fit the sockets' buffers.
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.map(|_| got)
    };
    let sending = async {
        wr.write_all(&requests).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let (got, ()) = tokio::join!(reading, sending);
    let got = got.expect("a plain end of output, not a reset");
    assert_eq!(got.len() as u64, READS * (16 + 4 * MIB as u64), "every read is answered, then the end of output");
    drop(c);

    served.stop().await;
}

/// A connection that ends (here at a disconnect request) with input it will not read in its
/// socket still delivers every reply it owes: the server closes with the end of output after
/// them, never with a reset that would discard replies on their way. The same end follows a
/// server's stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_ends_with_input_unread_delivers_every_reply() {
    let served = Served::start().await;
    const READS: u64 = 16;
    let mut c = slow_client(served.addr).await;
    let mut requests = BytesMut::new();
    for i in 0..READS {
        read_request(&mut requests, i, i * MIB as u64, MIB);
    }
    request(&mut requests, CMD_DISC, READS, 0, 0);
    // More than the server reads ahead: most of it stays in the server's socket, unread.
    requests.put_bytes(0, 512 << 10);
    let (sent, ()) = tokio::join!(c.write_all(&requests), async {
        // Reads nothing until the connection has stopped reading, so that its replies are
        // still on their way when it closes.
        let deadline = tokio::time::Instant::now() + HANG_GUARD;
        while served.counters.requests.load(Ordering::Relaxed) < READS + 1 {
            assert!(tokio::time::Instant::now() < deadline, "the server reads the requests");
            tokio::task::yield_now().await;
        }
    });
    sent.unwrap();
    read_replies_then_end(&mut c, READS, MIB).await;
    served.stop().await;
}
