//! Pacing of bulk data below the link's bandwidth.
//!
//! Owns: the `Pacer`, a virtual clock shared by every data stream of a session, and
//! `write_paced`, which hands a frame to a stream in small chunks at the paced rate.
//!
//! Why: the path between the sites has one queue per direction (a router's, or wan-emu's),
//! shared by the control and the data connection. Left alone, QUIC's congestion control
//! fills that queue with bulk data until it drops, and a record update then waits behind
//! the whole queue: a 50 ms path turns into 100 ms for the host's misses. Handing bulk data
//! to QUIC a little slower than the path drains keeps the queue empty, so control crosses in
//! one RTT however much bulk is waiting. QUIC's own pacing cannot do this: it paces at
//! the congestion window's rate, which is set by filling the queue.
//!
//! Must not: delay control frames. Only data streams are paced.

use geomirror_core::frame;
use geomirror_core::Frame;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How far the virtual clock may lag behind real time: the burst a quiet pacer allows, which
/// also absorbs the timer's millisecond granularity.
const SLACK: Duration = Duration::from_millis(2);

/// A shared rate limit. Each chunk is given a departure time on a virtual clock that
/// advances by `bytes / rate`; a writer sleeps until its chunk's time. Chunks are served in
/// the order writers ask, so data streams share the rate fairly.
#[derive(Debug)]
pub struct Pacer {
    bytes_per_sec: u64,
    /// Bytes handed to QUIC at once: about a millisecond at the rate, so a chunk never
    /// occupies the path for long.
    chunk: usize,
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    pub fn new(bytes_per_sec: u64) -> Pacer {
        let bytes_per_sec = bytes_per_sec.max(1);
        let chunk = (bytes_per_sec / 1000).clamp(4 << 10, 1 << 20) as usize;
        Pacer { bytes_per_sec, chunk, next: Mutex::new(None) }
    }

    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// When `n` bytes asked for now may leave; reserves them.
    fn reserve(&self, now: Instant, n: usize) -> Instant {
        let mut next = self.next.lock().expect("not poisoned");
        let floor = now.checked_sub(SLACK).unwrap_or(now);
        let at = next.map_or(now, |t| t.max(floor));
        *next = Some(at + Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64));
        at
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn admit(&self, n: usize) {
        let at = self.reserve(Instant::now(), n);
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
        }
    }
}

/// Writes a frame to a data stream in chunks admitted by `pacer`.
pub async fn write_paced(send: &mut quinn::SendStream, f: &Frame, pacer: &Pacer) -> Result<(), super::framing::FramingError> {
    let bytes = frame::encode(f)?;
    for chunk in bytes.chunks(pacer.chunk()) {
        pacer.admit(chunk.len()).await;
        send.write_all(chunk).await.map_err(std::io::Error::from)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Back-to-back reservations are spaced by their size over the rate, and a pacer idle
    /// for a while grants at most `SLACK` of credit, not the whole idle time.
    #[test]
    fn reservations_follow_the_rate_and_idle_time_is_not_banked() {
        let p = Pacer::new(1_000_000);
        let t0 = Instant::now();
        assert_eq!(p.reserve(t0, 1000), t0);
        assert_eq!(p.reserve(t0, 1000), t0 + Duration::from_millis(1));
        assert_eq!(p.reserve(t0, 5000), t0 + Duration::from_millis(2));
        assert_eq!(p.reserve(t0, 1), t0 + Duration::from_millis(7));
        // A second later, the next chunk may go at once, but the one after waits for the
        // rate again, less at most the slack.
        let t1 = t0 + Duration::from_secs(1);
        let first = p.reserve(t1, 10_000);
        assert_eq!(first, t1 - SLACK);
        assert_eq!(p.reserve(t1, 1), t1 - SLACK + Duration::from_millis(10));
    }

    #[test]
    fn chunks_are_about_a_millisecond_at_the_rate() {
        assert_eq!(Pacer::new(25_000_000).chunk(), 25_000);
        assert_eq!(Pacer::new(1_000).chunk(), 4 << 10);
        assert_eq!(Pacer::new(10_000_000_000).chunk(), 1 << 20);
    }

    /// Over a real clock, 200 chunks' worth at 2 MB/s takes its time.
    #[tokio::test]
    async fn admit_holds_writers_to_the_rate() {
        let p = Pacer::new(2_000_000);
        let start = Instant::now();
        let n = 200_000;
        let mut sent = 0;
        while sent < n {
            p.admit(p.chunk()).await;
            sent += p.chunk();
        }
        let took = start.elapsed();
        let floor = Duration::from_secs_f64((n - p.chunk()) as f64 / 2e6) - SLACK;
        assert!(took >= floor, "{n} bytes at 2 MB/s in {took:?}, faster than {floor:?}");
    }
}
