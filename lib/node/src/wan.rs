//! `geomirror wan-emu`: a UDP relay that puts a WAN between two sites on one machine.
//!
//! Owns: per-direction link emulation (one-way delay, jitter, random loss, a bandwidth cap
//! with a bounded queue), cutting and restoring the link, and a line-based control socket.
//! The kernel here has no netem, so this is how tests, benchmarks and users' trials get a
//! WAN: the primary's QUIC endpoint talks to `listen`, the relay talks to `forward`.
//!
//! Must not: look into packets. It relays datagrams as they are (QUIC is encrypted anyway).
//!
//! The model, per direction: a datagram of `n` bytes leaves the sender at `max(now,
//! link_free)`, occupies the link for `n / rate`, and arrives `delay ± jitter` later. If the
//! bytes waiting for the link would exceed `queue_bytes`, it is dropped (tail drop), as a
//! router's buffer would. Arrival times never go backwards within a direction: jitter
//! delays a datagram but never reorders the stream. Timers have millisecond granularity, so
//! at high rates datagrams leave in small bursts; the rate holds on average.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Most client addresses relayed at once; datagrams from further ones are dropped (each
/// client costs a socket and a task).
const MAX_FLOWS: usize = 1024;
/// Largest datagram relayed (QUIC uses at most 1500-byte packets on this path; this leaves
/// room for jumbo frames).
const MAX_DATAGRAM: usize = 65_535;

/// One direction's behaviour.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkConfig {
    pub delay: Duration,
    pub jitter: Duration,
    /// Probability in [0, 1] that a datagram is lost.
    pub loss: f64,
    /// Bytes per second; None is unlimited.
    pub rate_bytes_per_sec: Option<u64>,
    /// Most bytes waiting for the link before tail drop.
    pub queue_bytes: u64,
}

impl LinkConfig {
    /// A link with this round-trip time (half of it each way) and nothing else.
    pub fn with_rtt(rtt: Duration) -> LinkConfig {
        LinkConfig { delay: rtt / 2, jitter: Duration::ZERO, loss: 0.0, rate_bytes_per_sec: None, queue_bytes: 4 << 20 }
    }
}

#[derive(Debug, Default)]
pub struct DirectionCounters {
    pub received_packets: AtomicU64,
    pub delivered_packets: AtomicU64,
    pub delivered_bytes: AtomicU64,
    pub lost_packets: AtomicU64,
    pub queue_dropped_packets: AtomicU64,
    pub cut_dropped_packets: AtomicU64,
}

struct Pending {
    at: Instant,
    to: Arc<UdpSocket>,
    dest: Option<SocketAddr>,
    data: Vec<u8>,
}

/// One direction of the link: its configuration, its queue and its timing state.
struct Direction {
    cfg: Mutex<LinkConfig>,
    state: Mutex<DirectionState>,
    wake: Notify,
    counters: DirectionCounters,
}

struct DirectionState {
    rng: SmallRng,
    link_free: Instant,
    last_arrival: Instant,
    queue: VecDeque<Pending>,
    /// A datagram taken off the queue and not yet handed to its socket.
    sending: bool,
}

impl Direction {
    fn new(cfg: LinkConfig, seed: u64) -> Arc<Direction> {
        let now = Instant::now();
        Arc::new(Direction {
            cfg: Mutex::new(cfg),
            state: Mutex::new(DirectionState {
                rng: SmallRng::seed_from_u64(seed),
                link_free: now,
                last_arrival: now,
                queue: VecDeque::new(),
                sending: false,
            }),
            wake: Notify::new(),
            counters: DirectionCounters::default(),
        })
    }

    /// Schedules a datagram, or drops it.
    fn offer(&self, cut: bool, to: Arc<UdpSocket>, dest: Option<SocketAddr>, data: Vec<u8>) {
        self.counters.received_packets.fetch_add(1, Ordering::Relaxed);
        if cut {
            self.counters.cut_dropped_packets.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let cfg = *self.cfg.lock().expect("not poisoned");
        let mut s = self.state.lock().expect("not poisoned");
        if cfg.loss > 0.0 && s.rng.gen_bool(cfg.loss.min(1.0)) {
            self.counters.lost_packets.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = Instant::now();
        let start = s.link_free.max(now);
        let mut departs = start;
        if let Some(rate) = cfg.rate_bytes_per_sec {
            let backlog = start.duration_since(now).as_secs_f64() * rate as f64;
            if backlog + data.len() as f64 > cfg.queue_bytes as f64 {
                self.counters.queue_dropped_packets.fetch_add(1, Ordering::Relaxed);
                return;
            }
            departs = start + Duration::from_secs_f64(data.len() as f64 / rate as f64);
            s.link_free = departs;
        }
        let jitter = if cfg.jitter.is_zero() { Duration::ZERO } else { cfg.jitter.mul_f64(s.rng.gen_range(0.0..=2.0)) };
        // delay ± jitter, never below zero, and never before the previous arrival.
        let arrival = (departs + cfg.delay + jitter).checked_sub(cfg.jitter).unwrap_or(departs).max(departs).max(s.last_arrival);
        s.last_arrival = arrival;
        s.queue.push_back(Pending { at: arrival, to, dest, data });
        drop(s);
        self.wake.notify_one();
    }

    /// Sends datagrams as they come due, in order.
    async fn deliver(self: Arc<Self>) {
        loop {
            let next = self.state.lock().expect("not poisoned").queue.front().map(|p| p.at);
            match next {
                None => self.wake.notified().await,
                Some(at) if at > Instant::now() => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                Some(_) => {
                    let p = {
                        let mut s = self.state.lock().expect("not poisoned");
                        s.sending = true;
                        s.queue.pop_front().expect("front exists")
                    };
                    let sent = match p.dest {
                        Some(d) => p.to.send_to(&p.data, d).await,
                        None => p.to.send(&p.data).await,
                    };
                    if sent.is_ok() {
                        self.counters.delivered_packets.fetch_add(1, Ordering::Relaxed);
                        self.counters.delivered_bytes.fetch_add(p.data.len() as u64, Ordering::Relaxed);
                    }
                    self.state.lock().expect("not poisoned").sending = false;
                }
            }
        }
    }
}

/// A running relay.
pub struct WanEmu {
    pub listen: SocketAddr,
    pub control: Option<SocketAddr>,
    cut: Arc<AtomicBool>,
    forward: Arc<Direction>,
    backward: Arc<Direction>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl WanEmu {
    /// Starts relaying datagrams from clients of `listen` to `forward` and back. Each client
    /// address gets its own upstream socket, so replies find their way back. `control`, when
    /// given, accepts lines: `cut`, `restore`, `status`, `rtt-ms N`, `loss-percent P`,
    /// `rate-mbps R` (0: unlimited).
    pub async fn start(
        listen: SocketAddr,
        forward: SocketAddr,
        link: LinkConfig,
        control: Option<SocketAddr>,
        seed: u64,
    ) -> std::io::Result<WanEmu> {
        let socket = UdpSocket::bind(listen).await?;
        crate::transport::enlarge_udp_buffers(socket2::SockRef::from(&socket));
        let socket = Arc::new(socket);
        let listen = socket.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let fwd = Direction::new(link, seed);
        let back = Direction::new(link, seed.wrapping_add(1));
        let mut tasks = vec![tokio::spawn(fwd.clone().deliver()), tokio::spawn(back.clone().deliver())];
        tasks.push(tokio::spawn(relay(socket, forward, cut.clone(), fwd.clone(), back.clone())));
        let control = match control {
            Some(addr) => {
                let l = TcpListener::bind(addr).await?;
                let addr = l.local_addr()?;
                tasks.push(tokio::spawn(serve_control(l, cut.clone(), fwd.clone(), back.clone())));
                Some(addr)
            }
            None => None,
        };
        Ok(WanEmu { listen, control, cut, forward: fwd, backward: back, tasks })
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }

    pub fn status(&self) -> String {
        status_line(self.cut.load(Ordering::SeqCst), &self.forward, &self.backward)
    }
}

impl Drop for WanEmu {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn relay(socket: Arc<UdpSocket>, forward: SocketAddr, cut: Arc<AtomicBool>, fwd: Arc<Direction>, back: Arc<Direction>) {
    let mut flows: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
        let upstream = match flows.get(&from) {
            Some(u) => u.clone(),
            None if flows.len() >= MAX_FLOWS => {
                tracing::warn!(%from, max = MAX_FLOWS, "too many client addresses; datagram dropped");
                continue;
            }
            None => {
                let bind: SocketAddr =
                    if forward.is_ipv4() { "0.0.0.0:0".parse().expect("valid") } else { "[::]:0".parse().expect("valid") };
                let Ok(u) = UdpSocket::bind(bind).await else { continue };
                crate::transport::enlarge_udp_buffers(socket2::SockRef::from(&u));
                if u.connect(forward).await.is_err() {
                    continue;
                }
                let u = Arc::new(u);
                flows.insert(from, u.clone());
                tokio::spawn(relay_back(u.clone(), socket.clone(), from, cut.clone(), back.clone()));
                u
            }
        };
        fwd.offer(cut.load(Ordering::Relaxed), upstream, None, buf[..n].to_vec());
    }
}

async fn relay_back(upstream: Arc<UdpSocket>, socket: Arc<UdpSocket>, client: SocketAddr, cut: Arc<AtomicBool>, back: Arc<Direction>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match upstream.recv(&mut buf).await {
            Ok(n) => back.offer(cut.load(Ordering::Relaxed), socket.clone(), Some(client), buf[..n].to_vec()),
            // ICMP port unreachable surfaces here while the server is down: keep going.
            Err(_) => continue,
        }
    }
}

fn status_line(cut: bool, fwd: &Direction, back: &Direction) -> String {
    let cfg = *fwd.cfg.lock().expect("not poisoned");
    let d = |x: &Direction| {
        let c = &x.counters;
        // How long a datagram offered now would wait for the link: the queue's depth in time.
        let queued = x.state.lock().expect("not poisoned").link_free.saturating_duration_since(Instant::now());
        format!(
            "delivered={} bytes={} lost={} queue_dropped={} cut_dropped={} queued_ms={}",
            c.delivered_packets.load(Ordering::Relaxed),
            c.delivered_bytes.load(Ordering::Relaxed),
            c.lost_packets.load(Ordering::Relaxed),
            c.queue_dropped_packets.load(Ordering::Relaxed),
            c.cut_dropped_packets.load(Ordering::Relaxed),
            queued.as_millis()
        )
    };
    format!(
        "link={} rtt_ms={} jitter_ms={} loss_percent={} rate_mbps={} | forward: {} | backward: {}",
        if cut { "cut" } else { "up" },
        (cfg.delay * 2).as_secs_f64() * 1000.0,
        cfg.jitter.as_secs_f64() * 1000.0,
        cfg.loss * 100.0,
        cfg.rate_bytes_per_sec.map_or("unlimited".to_string(), |r| format!("{}", r as f64 * 8.0 / 1e6)),
        d(fwd),
        d(back)
    )
}

async fn serve_control(l: TcpListener, cut: Arc<AtomicBool>, fwd: Arc<Direction>, back: Arc<Direction>) {
    while let Ok((stream, _)) = l.accept().await {
        let (cut, fwd, back) = (cut.clone(), fwd.clone(), back.clone());
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = control_command(line.trim(), &cut, &fwd, &back);
                if wr.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Applies one control line; the reply is `ok ...` or `error ...`.
fn control_command(line: &str, cut: &AtomicBool, fwd: &Direction, back: &Direction) -> String {
    let mut words = line.split_whitespace();
    let (cmd, arg) = (words.next().unwrap_or(""), words.next());
    let number = |what: &str| -> Result<f64, String> {
        arg.and_then(|a| a.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("error {what} needs a number >= 0"))
    };
    let set = |f: &dyn Fn(&mut LinkConfig)| {
        for d in [fwd, back] {
            f(&mut d.cfg.lock().expect("not poisoned"));
        }
    };
    let result = match cmd {
        "cut" => {
            cut.store(true, Ordering::SeqCst);
            Ok(())
        }
        "restore" => {
            cut.store(false, Ordering::SeqCst);
            Ok(())
        }
        "status" => Ok(()),
        "rtt-ms" => number("rtt-ms").map(|v| set(&|c| c.delay = Duration::from_secs_f64(v / 2000.0))),
        "loss-percent" => number("loss-percent").and_then(|v| {
            if v > 100.0 {
                return Err("error loss-percent is at most 100".into());
            }
            set(&|c| c.loss = v / 100.0);
            Ok(())
        }),
        "rate-mbps" => number("rate-mbps").map(|v| set(&|c| c.rate_bytes_per_sec = (v > 0.0).then(|| (v * 1e6 / 8.0) as u64))),
        _ => Err("error unknown command; use cut, restore, status, rtt-ms N, loss-percent P, rate-mbps R".into()),
    };
    match result {
        Ok(()) => format!("ok {}", status_line(cut.load(Ordering::SeqCst), fwd, back)),
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server and a relay in front of it.
    async fn setup(link: LinkConfig) -> (WanEmu, UdpSocket) {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let emu = WanEmu::start("127.0.0.1:0".parse().unwrap(), echo_addr, link, Some("127.0.0.1:0".parse().unwrap()), 7).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(emu.listen).await.unwrap();
        (emu, client)
    }

    /// The emulator never delivers early: a round trip takes at least the configured RTT.
    /// The measured figures are printed; an upper bound would be a timing test.
    #[tokio::test]
    async fn ping_pong_sees_at_least_the_configured_rtt() {
        let rtt = Duration::from_millis(40);
        let (_emu, client) = setup(LinkConfig::with_rtt(rtt)).await;
        let mut buf = [0u8; 64];
        let mut samples = Vec::new();
        for i in 0..10u8 {
            let t = std::time::Instant::now();
            client.send(&[i; 32]).await.unwrap();
            let n = client.recv(&mut buf).await.unwrap();
            samples.push(t.elapsed());
            assert_eq!(&buf[..n], &[i; 32]);
        }
        let min = *samples.iter().min().unwrap();
        eprintln!("configured RTT {rtt:?}; measured min {min:?}, max {:?}", samples.iter().max().unwrap());
        assert!(min >= rtt, "a round trip took {min:?}, less than the configured {rtt:?}");
    }

    /// A burst larger than the link can carry at once drains no faster than the rate, and
    /// what exceeds the queue is dropped and counted.
    #[tokio::test]
    async fn the_rate_cap_paces_and_the_queue_bounds_a_burst() {
        let rate = 1_000_000; // bytes per second
        let link = LinkConfig { rate_bytes_per_sec: Some(rate), queue_bytes: 30_000, ..LinkConfig::with_rtt(Duration::ZERO) };
        let (emu, client) = setup(link).await;
        let t = std::time::Instant::now();
        // 60 datagrams of 1,000 bytes at once into a 30 kB queue. 60 kB fits the sockets'
        // buffers, so every drop is the relay's.
        for _ in 0..60 {
            client.send(&[1u8; 1000]).await.unwrap();
        }
        // Settled: nothing queued in either direction and nothing in flight between them (every
        // datagram the forward direction delivered came back to the backward one), and every
        // echo the backward direction sent has reached the client. A datagram lost anywhere
        // else never lets this hold, and the wait fails with the counters.
        let settled = |emu: &WanEmu, got: u64| {
            let (f, b) = (&emu.forward.counters, &emu.backward.counters);
            let empty = |d: &Direction| {
                let s = d.state.lock().unwrap();
                s.queue.is_empty() && !s.sending
            };
            f.received_packets.load(Ordering::Relaxed) == 60
                && empty(&emu.forward)
                && empty(&emu.backward)
                && b.received_packets.load(Ordering::Relaxed) == f.delivered_packets.load(Ordering::Relaxed)
                && got == b.delivered_packets.load(Ordering::Relaxed)
        };
        let mut buf = [0u8; 2000];
        let mut got = 0u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !settled(&emu, got) {
            assert!(std::time::Instant::now() < deadline, "the relay never settled: {}; {got} echoes received", emu.status());
            // The last event may be a drop rather than an echo, so the wait for an echo is
            // bounded and the counters are looked at again.
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(20), client.recv(&mut buf)).await {
                r.unwrap();
                got += 1;
            }
        }
        let elapsed = t.elapsed();
        let dropped = emu.forward.counters.queue_dropped_packets.load(Ordering::Relaxed);
        // An echo can also be dropped on its way back: when a starved machine runs the
        // forward delivery late, up to a queue's worth of echoes reach the backward queue at
        // once, and the last of them just overflows it.
        let dropped_back = emu.backward.counters.queue_dropped_packets.load(Ordering::Relaxed);
        eprintln!("{got} echoed, {dropped} dropped at the queue ({dropped_back} on the way back), in {elapsed:?}");
        assert_eq!(got + dropped + dropped_back, 60, "every datagram was either carried or dropped at a queue");
        assert!((25..=35).contains(&got), "about a queue's worth got through: {got}");
        let min = Duration::from_secs_f64((got * 1000) as f64 / rate as f64);
        assert!(elapsed >= min.mul_f64(0.95), "{got} kB crossed a {rate} B/s link in {elapsed:?}, faster than {min:?}");
    }

    /// A cut drops everything; after restore the link carries again. No timing involved: the
    /// first reply after the restore must be to the datagram sent after it.
    #[tokio::test]
    async fn cut_and_restore_through_the_control_socket() {
        let (emu, client) = setup(LinkConfig::with_rtt(Duration::from_millis(2))).await;
        let ctl = tokio::net::TcpStream::connect(emu.control.unwrap()).await.unwrap();
        let (rd, mut wr) = ctl.into_split();
        let mut lines = BufReader::new(rd).lines();
        wr.write_all(b"cut\n").await.unwrap();
        assert!(lines.next_line().await.unwrap().unwrap().starts_with("ok link=cut"));
        client.send(b"lost").await.unwrap();
        wr.write_all(b"status\n").await.unwrap();
        let status = lines.next_line().await.unwrap().unwrap();
        assert!(status.contains("cut_dropped=1"), "{status}");
        wr.write_all(b"restore\n").await.unwrap();
        assert!(lines.next_line().await.unwrap().unwrap().starts_with("ok link=up"));
        client.send(b"kept").await.unwrap();
        let mut buf = [0u8; 16];
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"kept");
        wr.write_all(b"rtt-ms x\n").await.unwrap();
        assert!(lines.next_line().await.unwrap().unwrap().starts_with("error"));
        wr.write_all(b"rate-mbps 8\n").await.unwrap();
        assert!(lines.next_line().await.unwrap().unwrap().contains("rate_mbps=8"));
    }
}
