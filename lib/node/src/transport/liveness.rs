//! Whether the peer of a replication session is alive: keep-alive probes on the control
//! streams, their echoes, and the moment a silent peer is declared lost.
//!
//! Owns: the probe ids, the time the peer was last heard from, and the deadline that
//! follows from it. Must not: send, receive or close anything; the link does, and asks this
//! what a keep-alive means and when the session is lost.
//!
//! Why not QUIC's idle timeout alone: quinn closes a connection after
//! `max(idle_timeout, 3 × PTO)` without a packet (RFC 9000 §10.1), and PTO grows with the
//! measured round trip. A queue on the path (a congested or throttled link) inflates the
//! round trip to seconds, and a dead peer's connection then lingers for minutes; packets of
//! a dead peer still queued on the path also reset the timer as they arrive.
//!
//! The rule: each side sends a probe on every control stream each `keep_alive`, and the
//! peer's link echoes it at once. The peer counts as heard from at the moment the newest
//! echoed probe was *sent*, not when its echo arrived. So
//! - a dead peer is declared lost at most `silence` after it died, whatever is still queued
//!   on the path: no echo can leave it after its death, so no probe sent after then is
//!   echoed;
//! - a live peer is declared lost when a probe's round trip plus `keep_alive` exceeds
//!   `silence`: a link that holds control frames back that long cannot answer a record
//!   update in time either, and counts as down (docs/protocol.md, "Link loss");
//! - neither side stays up more than `silence` after the other declared the link lost: a
//!   probe echoed by the other side left before that side's declaration, so the link loss
//!   detection skew the core allows for (`link_loss_detection_skew`, one idle timeout)
//!   holds however slow the path is.
//!
//! Probe ids are nanoseconds since this session's start on the sender's clock, so an echo
//! names its probe's send time and nothing is kept per probe.

use geomirror_core::Frame;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often to probe and how long a silence declares the peer lost: the site's
/// `[link] keep_alive_ms` and `idle_timeout_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub keep_alive: Duration,
    pub silence: Duration,
}

/// What a keep-alive frame asks of the link.
#[derive(Debug, PartialEq, Eq)]
pub enum KeepAlive {
    /// A probe of the peer: send this echo back on the same control stream, at once.
    Answer(Frame),
    /// An echo of one of our probes.
    Echo(u64),
}

impl KeepAlive {
    /// Sorts out a keep-alive; any other frame is handed back for the volume.
    // The `Err` is the frame itself, moved back to the caller, not an error to propagate:
    // boxing it would allocate for every frame on the link.
    #[allow(clippy::result_large_err)]
    pub fn of(frame: Frame) -> Result<KeepAlive, Frame> {
        match frame {
            Frame::KeepAlive { probe, echo: false } => Ok(KeepAlive::Answer(Frame::KeepAlive { probe, echo: true })),
            Frame::KeepAlive { probe, echo: true } => Ok(KeepAlive::Echo(probe)),
            other => Err(other),
        }
    }
}

/// One session's liveness, shared by the tasks of its control streams.
#[derive(Debug)]
pub struct Liveness {
    start: Instant,
    timing: Timing,
    /// The id (nanoseconds since `start`) of the latest probe sent.
    sent: AtomicU64,
    /// The send time (nanoseconds since `start`) of the newest probe echoed; the session's
    /// start until one is.
    heard: AtomicU64,
}

impl Liveness {
    /// A session that starts now: its peer counts as heard from now.
    pub fn new(timing: Timing) -> Liveness {
        Liveness { start: Instant::now(), timing, sent: AtomicU64::new(0), heard: AtomicU64::new(0) }
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// A new probe to send.
    pub fn probe(&self) -> Frame {
        let now = self.start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        // Ids only grow, even if two probes are taken within the clock's resolution.
        let id = self.sent.fetch_max(now, Ordering::AcqRel).max(now);
        Frame::KeepAlive { probe: id, echo: false }
    }

    /// An echo arrived: the peer was alive when `probe` was sent. False for an echo of a
    /// probe never sent (an id past the latest), which is ignored.
    pub fn echoed(&self, probe: u64) -> bool {
        if probe > self.sent.load(Ordering::Acquire) {
            return false;
        }
        self.heard.fetch_max(probe, Ordering::AcqRel);
        true
    }

    /// When the peer was last heard from: the send time of the newest echoed probe.
    pub fn heard_at(&self) -> Instant {
        self.start + Duration::from_nanos(self.heard.load(Ordering::Acquire))
    }

    /// When the peer is declared lost unless an echo comes first.
    pub fn deadline(&self) -> Instant {
        self.heard_at() + self.timing.silence
    }

    /// Whether the peer has been silent for `silence`.
    pub fn is_lost(&self) -> bool {
        Instant::now() >= self.deadline()
    }

    /// Why the session ends, for logs and the peer's close reason.
    pub fn reason(&self) -> String {
        format!(
            "no keep-alive answered for {:.1} s (idle_timeout_ms {}): the peer is declared lost",
            self.heard_at().elapsed().as_secs_f64(),
            self.timing.silence.as_millis()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing { keep_alive: Duration::from_millis(100), silence: Duration::from_secs(3) }
    }

    #[test]
    fn a_probe_is_answered_with_its_echo_and_other_frames_pass_through() {
        let live = Liveness::new(timing());
        let Frame::KeepAlive { probe, echo: false } = live.probe() else { panic!("a probe") };
        assert_eq!(KeepAlive::of(Frame::KeepAlive { probe, echo: false }), Ok(KeepAlive::Answer(Frame::KeepAlive { probe, echo: true })));
        assert_eq!(KeepAlive::of(Frame::KeepAlive { probe, echo: true }), Ok(KeepAlive::Echo(probe)));
        let other = Frame::Authoritative { epoch: geomirror_core::Epoch(3) };
        assert_eq!(KeepAlive::of(other.clone()), Err(other));
    }

    /// The peer is heard from when the probe left, not when its echo came back: an echo
    /// delayed on the path does not push the deadline past `silence` after the probe; and
    /// an older echo arriving late never moves it back.
    #[test]
    fn the_deadline_runs_from_the_echoed_probes_send_time() {
        let live = Liveness::new(timing());
        assert_eq!(live.heard_at(), live.start);
        assert_eq!(live.deadline(), live.start + Duration::from_secs(3));
        let Frame::KeepAlive { probe: first, .. } = live.probe() else { panic!("a probe") };
        let Frame::KeepAlive { probe: second, .. } = live.probe() else { panic!("a probe") };
        assert!(second >= first, "probe ids only grow");
        assert!(live.echoed(second));
        assert_eq!(live.heard_at(), live.start + Duration::from_nanos(second));
        assert!(live.echoed(first), "a valid echo, arriving after a newer one");
        assert_eq!(live.heard_at(), live.start + Duration::from_nanos(second), "the older echo does not move it back");
        assert_eq!(live.deadline(), live.heard_at() + Duration::from_secs(3));
        assert!(!live.is_lost());
    }

    #[test]
    fn an_echo_of_a_probe_never_sent_is_ignored() {
        let live = Liveness::new(timing());
        let before = live.heard_at();
        assert!(!live.echoed(u64::MAX), "a peer cannot keep the session alive by echoing the future");
        assert_eq!(live.heard_at(), before);
    }

    #[test]
    fn a_silent_peer_is_lost_once_the_silence_has_passed() {
        let live = Liveness::new(Timing { keep_alive: Duration::from_millis(1), silence: Duration::ZERO });
        assert!(live.is_lost());
        assert!(live.reason().contains("idle_timeout_ms 0"), "{}", live.reason());
    }
}
