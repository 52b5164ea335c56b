//! Bad NBD clients, from a raw socket: each bad input gets an NBD error or a clean close,
//! nothing is written outside the volume, and the server keeps serving others. Clients that
//! send and never read their replies hold no more than the site's in-flight budget, while a
//! client that reads keeps being answered.

use geomirror_node::metrics::{NBD_BUDGET_EXHAUSTED, NBD_INFLIGHT, NBD_INFLIGHT_LIMIT, NBD_INFLIGHT_PEAK};
use geomirror_node::nbd::budget::GUARANTEED_BYTES_PER_CONNECTION;
use geomirror_tests::pair::{stop_both_and_compare, two_sites, PairOptions};
use geomirror_tests::site::{run_ok, tool, Site};
use geomirror_tests::wait;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_geomirror");
const VOLUME_BYTES: u64 = 8 << 20;
/// Longest a test waits for the server to answer or close; a hang fails the test.
const READ_DEADLINE: Duration = Duration::from_secs(30);

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const READ: u16 = 0;
const WRITE: u16 = 1;
const TRIM: u16 = 4;
const DISC: u16 = 2;
const WRITE_ZEROES: u16 = 6;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

fn site(extra: &str) -> Site {
    let config = format!("{extra}[[volume]]\nname = \"vol0\"\nmedia = \"vol0.img\"\nsize = {VOLUME_BYTES}\n");
    Site::start(Path::new(BIN), &config)
}

/// A client that speaks NBD byte by byte, including wrongly.
struct Raw {
    s: TcpStream,
}

impl Raw {
    fn connect(site: &Site) -> Raw {
        let s = TcpStream::connect(&site.addr).expect("connect");
        s.set_read_timeout(Some(READ_DEADLINE)).unwrap();
        Raw { s }
    }

    /// Reads the 18-byte greeting and answers with fixed-newstyle, no-zeroes flags.
    fn greet(site: &Site) -> Raw {
        let mut c = Raw::connect(site);
        let g = c.read_n(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        c.send(&3u32.to_be_bytes());
        c
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
        b
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend(IHAVEOPT.to_be_bytes());
        b.extend(option.to_be_bytes());
        b.extend((data.len() as u32).to_be_bytes());
        b.extend(data);
        self.send(&b);
    }

    /// Reads one option reply: (type, data).
    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let h = self.read_n(20);
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (kind, self.read_n(len))
    }

    /// NBD_OPT_GO for `name`; returns the final reply type.
    fn go(&mut self, name: &[u8]) -> u32 {
        let mut d = Vec::new();
        d.extend((name.len() as u32).to_be_bytes());
        d.extend(name);
        d.extend(0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        loop {
            let (kind, _) = self.option_reply();
            if kind != 3 {
                return kind;
            }
        }
    }

    fn ready(site: &Site) -> Raw {
        let mut c = Raw::greet(site);
        assert_eq!(c.go(b"vol0"), REP_ACK);
        c
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = Vec::new();
        b.extend(0x2560_9513u32.to_be_bytes());
        b.extend(flags.to_be_bytes());
        b.extend(kind.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend(offset.to_be_bytes());
        b.extend(len.to_be_bytes());
        b.extend(payload);
        self.send(&b);
    }

    /// Reads a simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x6744_6698, "simple reply magic");
        (u32::from_be_bytes(h[4..8].try_into().unwrap()), u64::from_be_bytes(h[8..16].try_into().unwrap()))
    }

    fn expect_error(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8], error: u32) {
        self.request(kind, flags, 99, offset, len, payload);
        assert_eq!(self.reply(), (error, 99), "request kind {kind} flags {flags:#x} offset {offset} len {len}");
    }

    /// The server closes the connection (possibly after sending something first).
    fn expect_closed(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) => panic!("expected the server to close the connection, got {e}"),
            }
        }
    }
}

/// A well-behaved request on a fresh connection still works: the server is up.
fn still_serving(site: &Site) {
    let mut c = Raw::ready(site);
    c.request(READ, 0, 1, 0, 4096, &[]);
    assert_eq!(c.reply(), (0, 1));
    c.read_n(4096);
}

/// Nothing outside the writes the test made valid reached the media: no byte holds the
/// marker that every refused write carries.
fn media_free_of(site: &Site, marker: u8) {
    let media = std::fs::read(site.path("vol0.img")).unwrap();
    assert_eq!(media.len() as u64, VOLUME_BYTES, "the media file keeps its size");
    assert!(!media.contains(&marker), "a refused write reached the media");
}

#[test]
fn out_of_range_overflowing_and_empty_requests_get_errors_and_the_connection_goes_on() {
    let s = site("");
    let mut c = Raw::ready(&s);
    let junk = vec![0xEEu8; 4096];
    c.expect_error(READ, 0, u64::MAX - 100, 4096, &[], EINVAL);
    c.expect_error(WRITE, 0, u64::MAX - 100, 4096, &junk, EINVAL);
    c.expect_error(READ, 0, VOLUME_BYTES - 4095, 4096, &[], EINVAL);
    c.expect_error(WRITE, 0, VOLUME_BYTES - 4095, 4096, &junk, ENOSPC);
    c.expect_error(WRITE, 0, VOLUME_BYTES, 4096, &junk, ENOSPC);
    c.expect_error(TRIM, 0, VOLUME_BYTES - 1, 2, &[], ENOSPC);
    c.expect_error(WRITE_ZEROES, 0, u64::MAX, 1, &[], EINVAL);
    c.expect_error(READ, 0, 0, 0, &[], EINVAL);
    c.expect_error(WRITE, 0, 0, 0, &[], EINVAL);
    c.expect_error(TRIM, 0, 4096, 0, &[], EINVAL);
    // The refused payloads were skipped exactly: this request is parsed in step.
    c.request(WRITE, 0, 5, VOLUME_BYTES - 4096, 4096, &[0x11; 4096]);
    assert_eq!(c.reply(), (0, 5));
    drop(c);
    still_serving(&s);
    let mut s = s;
    let (status, log) = s.stop();
    assert!(status.success(), "{log}");
    media_free_of(&s, 0xEE);
}

#[test]
fn unknown_commands_and_unknown_or_unadvertised_flags_get_einval() {
    let s = site("");
    let mut c = Raw::ready(&s);
    let junk = vec![0xEEu8; 512];
    c.expect_error(42, 0, 0, 512, &[], EINVAL);
    c.expect_error(7, 0, 0, 512, &[], EINVAL); // BLOCK_STATUS without a meta context
    c.expect_error(5, 0, 0, 512, &[], EINVAL); // CACHE, not advertised
    c.expect_error(WRITE, 1 << 9, 0, 512, &junk, EINVAL);
    c.expect_error(WRITE, 1 << 4, 0, 512, &junk, EINVAL); // FAST_ZERO is not advertised
    c.expect_error(READ, 1 << 2, 0, 512, &[], EINVAL); // DF without structured replies
    c.expect_error(READ, 1, 0, 512, &[], EINVAL); // FUA on a read
    drop(c);
    still_serving(&s);
    let mut s = s;
    s.stop();
    media_free_of(&s, 0xEE);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn oversized_requests_are_refused_before_any_allocation() {
    let s = site("");
    let mut c = Raw::ready(&s);
    // A read over the 32 MiB maximum: EOVERFLOW, and the connection goes on.
    c.expect_error(READ, 0, 0, 64 << 20, &[], EOVERFLOW);
    c.expect_error(READ, 0, 0, u32::MAX, &[], EOVERFLOW);
    // A write of 4 GiB - 1 announced but never sent: refused and closed at once, without
    // waiting for (or buffering) the payload.
    for _ in 0..8 {
        let mut w = Raw::ready(&s);
        w.request(WRITE, 0, 3, 0, u32::MAX, &[0xEE; 1024]);
        assert_eq!(w.reply(), (EOVERFLOW, 3));
        w.expect_closed();
    }
    assert!(rss_kib(s.pid()) < 200 << 10, "server memory grew to {} KiB", rss_kib(s.pid()));
    still_serving(&s);
}

#[test]
fn malformed_and_truncated_handshakes_are_closed_and_the_server_stays_up() {
    let s = site("");
    // Unknown client flags.
    let mut c = Raw::connect(&s);
    c.read_n(18);
    c.send(&0x8000_0003u32.to_be_bytes());
    c.expect_closed();
    // Garbage where an option header belongs.
    let mut c = Raw::greet(&s);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    c.expect_closed();
    // EXPORT_NAME of an unknown export cannot be answered with an error: closed.
    let mut c = Raw::greet(&s);
    c.option(OPT_EXPORT_NAME, b"nope");
    c.expect_closed();
    // Truncated: half an option header, then the client goes away.
    let mut c = Raw::greet(&s);
    c.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(c);
    // Truncated in the transmission phase: half a request header.
    let mut c = Raw::ready(&s);
    c.send(&0x2560_9513u32.to_be_bytes());
    drop(c);
    // Bad request magic in the transmission phase: the stream cannot be trusted; closed.
    let mut c = Raw::ready(&s);
    c.send(&[0xAB; 28]);
    c.expect_closed();
    // An unknown export on GO is an error reply, and haggling goes on.
    let mut c = Raw::greet(&s);
    assert_eq!(c.go(b"nope"), REP_ERR_UNKNOWN);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().0, REP_ACK);
    assert_eq!(c.go(b"vol0"), REP_ACK);
    // ABORT is acknowledged, then closed.
    let mut c = Raw::greet(&s);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply().0, REP_ACK);
    c.expect_closed();
    still_serving(&s);
}

#[test]
fn export_names_over_4_kib_are_refused() {
    let s = site("");
    let long = vec![b'v'; 4097];
    let mut c = Raw::greet(&s);
    assert_eq!(c.go(&long), REP_ERR_INVALID);
    assert_eq!(c.go(b"vol0"), REP_ACK, "the connection goes on after the refusal");
    // EXPORT_NAME has no error reply: a long name closes the connection, and one longer than
    // the option limit is not even read.
    let mut c = Raw::greet(&s);
    c.option(OPT_EXPORT_NAME, &long);
    c.expect_closed();
    let mut c = Raw::greet(&s);
    let mut header = Vec::new();
    header.extend(IHAVEOPT.to_be_bytes());
    header.extend(OPT_EXPORT_NAME.to_be_bytes());
    header.extend(u32::MAX.to_be_bytes());
    c.send(&header);
    c.expect_closed();
    still_serving(&s);
}

#[test]
fn stalled_handshakes_are_dropped_after_the_timeout() {
    let s = site("[nbd]\nlisten = \"127.0.0.1:0\"\nhandshake_timeout_ms = 300\n");
    // Silent after connecting.
    let mut quiet = Raw::connect(&s);
    // Stalled in the middle of an option.
    let mut midway = Raw::greet(&s);
    midway.send(&IHAVEOPT.to_be_bytes());
    // Dribbling: one byte of a long option now and then never finishes either.
    let mut slow = Raw::greet(&s);
    slow.send(&IHAVEOPT.to_be_bytes());
    slow.send(&OPT_GO.to_be_bytes());
    slow.send(&4000u32.to_be_bytes());
    quiet.read_n(18);
    quiet.expect_closed();
    midway.expect_closed();
    slow.expect_closed();
    still_serving(&s);
}

#[test]
fn connections_over_the_cap_are_closed_at_once_and_a_freed_slot_is_reused() {
    let s = site("[nbd]\nlisten = \"127.0.0.1:0\"\nmax_connections = 3\n");
    // Three connections hold the slots (the greeting proves each was accepted).
    let mut held: Vec<Raw> = (0..3).map(|_| Raw::greet(&s)).collect();
    for _ in 0..3 {
        let mut extra = Raw::connect(&s);
        extra.expect_closed();
    }
    // One holder leaves properly; its slot is free by the time the close is seen.
    let mut leaving = held.remove(0);
    leaving.option(OPT_ABORT, &[]);
    assert_eq!(leaving.option_reply().0, REP_ACK);
    leaving.expect_closed();
    still_serving(&s);
    drop(held);
}

const MIB: u64 = 1 << 20;
/// The site's in-flight budget in the bounded-memory test, and its connection slots: each
/// slot keeps a 2 MiB share, the other 48 MiB are the shared pool.
const BUDGET_BYTES: u64 = 64 << 20;
const BUDGET_CONNECTIONS: u64 = 8;
const STUCK_CLIENTS: u64 = 4;
/// Each stuck client sends this many 1 MiB writes, each followed by `READS_PER_WRITE` 1 MiB
/// reads: 48 MiB of reads each, far more than the budget and the sockets' buffers hold.
const STUCK_WRITES: u64 = 12;
const READS_PER_WRITE: u64 = 4;
/// Each stuck client writes its own 12 MiB of the 64 MiB volume; the reading client the
/// 16 MiB after them.
const REGION_BYTES: u64 = STUCK_WRITES * MIB;
/// How long a stuck client's send may block: a hang guard, far beyond the test's length.
const STUCK_SEND_DEADLINE: Duration = Duration::from_secs(600);
/// How long the metrics may take to show what the test waits for.
const METRICS_DEADLINE: Duration = Duration::from_secs(120);
const ADMIN_TOKEN: &str = "nbd-budget-test-token-0123456789";

/// A 1 MiB block that says which client wrote it and where.
fn stamped(client: u64, k: u64) -> Vec<u8> {
    (0..MIB / 8).flat_map(|w| ((client << 56) | (k << 32) | w).to_be_bytes()).collect()
}

fn write_cookie(k: u64) -> u64 {
    k << 8
}

fn read_cookie(k: u64, j: u64) -> u64 {
    (k << 8) | j
}

/// dc1's metrics, through its admin API with the admin token.
fn scrape(dir: &Path, site: &Site) -> String {
    let port = site.admin.expect("a site with a peer has an admin API").port();
    run_ok(
        tool("curl", "curl")
            .args(["--silent", "--show-error", "--fail", "--cacert"])
            .arg(dir.join("certs/ca.pem"))
            .args(["--resolve", &format!("dc1:{port}:127.0.0.1")])
            .args(["--header", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
            .arg(format!("https://dc1:{port}/metrics")),
    )
}

/// The value of the series `name` whose labels include `label` (e.g. `limit="site"`).
fn metric(text: &str, name: &str, label: &str) -> u64 {
    let found = text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?;
        (rest.starts_with('{') && rest.contains(label)).then(|| value.parse::<f64>().ok()).flatten()
    });
    found.unwrap_or_else(|| panic!("no {name} with {label} in the metrics:\n{text}")) as u64
}

struct Budget {
    held: u64,
    peak: u64,
    limit: u64,
    exhausted: u64,
}

fn budget(dir: &Path, site: &Site) -> Budget {
    let text = scrape(dir, site);
    Budget {
        held: metric(&text, NBD_INFLIGHT, "site="),
        peak: metric(&text, NBD_INFLIGHT_PEAK, "site="),
        limit: metric(&text, NBD_INFLIGHT_LIMIT, "site="),
        exhausted: metric(&text, NBD_BUDGET_EXHAUSTED, "limit=\"site\""),
    }
}

/// Polls dc1's budget until `done`, checking at every look that it never went over.
fn wait_for_budget(dir: &Path, site: &Site, what: &str, done: impl Fn(&Budget) -> bool) -> Budget {
    wait::until(METRICS_DEADLINE, what, || {
        let b = budget(dir, site);
        assert!(b.peak <= BUDGET_BYTES, "the site held {} MiB, over its {} MiB budget", b.peak / MIB, BUDGET_BYTES / MIB);
        if done(&b) {
            Ok(b)
        } else {
            Err(format!("{} MiB held, {} exhaustions", b.held / MIB, b.exhausted))
        }
    })
}

/// A client that sends all its requests at once (from a thread that blocks while the server
/// does not read it) and reads no reply until told to.
struct Stuck {
    go: mpsc::Sender<()>,
    sender: std::thread::JoinHandle<()>,
    /// The writes acknowledged, once it has read every reply.
    reader: std::thread::JoinHandle<Vec<u64>>,
}

impl Stuck {
    fn start(site: &Site, id: u64) -> Stuck {
        let mut reader = Raw::ready(site);
        let s = reader.s.try_clone().unwrap();
        s.set_write_timeout(Some(STUCK_SEND_DEADLINE)).unwrap();
        let mut sender = Raw { s };
        let base = id * REGION_BYTES;
        let sender = std::thread::spawn(move || {
            for k in 0..STUCK_WRITES {
                sender.request(WRITE, 0, write_cookie(k), base + k * MIB, MIB as u32, &stamped(id, k));
                for j in 1..=READS_PER_WRITE {
                    sender.request(READ, 0, read_cookie(k, j), (k + j) % 64 * MIB, MIB as u32, &[]);
                }
            }
            sender.request(DISC, 0, 0, 0, 0, &[]);
        });
        let (go, wait) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            wait.recv().expect("told to read");
            let mut acked = Vec::new();
            for _ in 0..STUCK_WRITES * (1 + READS_PER_WRITE) {
                let (error, cookie) = reader.reply();
                assert_eq!(error, 0, "request {cookie:#x} of stuck client {id} failed");
                if cookie & 0xff == 0 {
                    acked.push(cookie >> 8);
                } else {
                    reader.read_n(MIB as usize);
                }
            }
            // Every reply owed was sent before the server closed on DISC.
            reader.expect_closed();
            acked.sort_unstable();
            acked
        });
        Stuck { go, sender, reader }
    }
}

/// Several clients send far more than the site's budget and do not read their replies. The
/// bytes the site holds stay within the budget (its peak, read from the metrics at every
/// look), the budget is seen spent, a client that reads its replies keeps being answered
/// meanwhile, and once the stuck clients read, every one of their requests is answered and
/// every write they were acknowledged is on both sites' media.
#[test]
fn clients_that_do_not_read_their_replies_hold_no_more_than_the_site_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    geomirror_tests::site::write_secret(&dir.join("token"), &format!("{ADMIN_TOKEN}\n"));
    let o = PairOptions {
        admin: "listen = \"127.0.0.1:0\"\ntoken_file = \"token\"\n".into(),
        nbd: format!(
            "max_connections = {BUDGET_CONNECTIONS}\nmax_inflight_bytes = {BUDGET_BYTES}\nmax_inflight_bytes_per_connection = \"32M\"\n"
        ),
        ..PairOptions::default()
    };
    let (dc1, dc2, _emu) = two_sites(Path::new(BIN), dir, &o);
    assert_eq!(budget(dir, &dc1).limit, BUDGET_BYTES, "the limit is exported");

    let stuck: Vec<Stuck> = (0..STUCK_CLIENTS).map(|id| Stuck::start(&dc1, id)).collect();
    // Spent: the stuck clients hold their own shares and all of the pool, short of less
    // than one 1 MiB request in each (the slots of the reading client and the unused ones
    // keep their shares).
    let share = GUARANTEED_BYTES_PER_CONNECTION as u64;
    let spent = BUDGET_BYTES - (BUDGET_CONNECTIONS - STUCK_CLIENTS) * share - (STUCK_CLIENTS + 1) * MIB;
    let full = wait_for_budget(dir, &dc1, "spending the budget", |b| b.held >= spent && b.exhausted > 0);
    println!("budget spent: {} KiB held of {} KiB, {} waits", full.held >> 10, BUDGET_BYTES >> 10, full.exhausted);

    // A client that reads its replies: writes, then reads back in requests of its whole
    // share, each answered while the stuck clients hold everything else.
    let good = STUCK_CLIENTS;
    let base = good * REGION_BYTES;
    let mut c = Raw::ready(&dc1);
    for k in 0..16 {
        c.request(WRITE, 0, k, base + k * MIB, MIB as u32, &stamped(good, k));
        assert_eq!(c.reply(), (0, k), "write {k} of the reading client");
    }
    for k in (0..16).step_by(2) {
        c.request(READ, 0, k, base + k * MIB, share as u32, &[]);
        assert_eq!(c.reply(), (0, k), "read {k} of the reading client");
        assert!(c.read_n(share as usize) == [stamped(good, k), stamped(good, k + 1)].concat(), "read {k} returned other data");
    }
    c.request(DISC, 0, 0, 0, 0, &[]);
    c.expect_closed();
    let meanwhile = wait_for_budget(dir, &dc1, "a look", |_| true);
    assert!(meanwhile.held >= spent, "the stuck clients still hold the budget: {} MiB", meanwhile.held / MIB);

    // The stuck clients read: every request they sent is answered, writes included.
    for s in &stuck {
        s.go.send(()).unwrap();
    }
    for (id, s) in stuck.into_iter().enumerate() {
        assert_eq!(s.reader.join().expect("the stuck client's reader"), (0..STUCK_WRITES).collect::<Vec<_>>(), "stuck client {id}");
        s.sender.join().expect("the stuck client's sender");
    }
    let end = wait_for_budget(dir, &dc1, "giving the budget back", |b| b.held == 0);
    println!("at the end: peak {} KiB of {} KiB, {} waits", end.peak >> 10, BUDGET_BYTES >> 10, end.exhausted);
    assert!(end.exhausted > 0);

    // Nothing lost: both images are identical, and hold every acknowledged write.
    stop_both_and_compare(dir, dc1, dc2);
    let media = std::fs::read(dir.join("dc1.img")).unwrap();
    let block = |client: u64, k: u64| &media[(client * REGION_BYTES + k * MIB) as usize..][..MIB as usize];
    for client in 0..STUCK_CLIENTS {
        for k in 0..STUCK_WRITES {
            assert!(block(client, k) == stamped(client, k), "write {k} of stuck client {client} is not on the media");
        }
    }
    for k in 0..16 {
        assert!(block(good, k) == stamped(good, k), "write {k} of the reading client is not on the media");
    }
}
