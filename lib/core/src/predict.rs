//! Prediction: which extents the host will write next.
//!
//! Owns: the primary's `StreamDetector`, which watches every write (hits included) and names
//! the sequential and strided streams it sees, and the secondary's `Predictor`, which turns a
//! record update (missed extents plus stream hints) into the extra extents to record
//! (claims 18-19). Also the ghost list of recently evicted extents, for re-admission.
//! Must not: touch the record. It proposes extents; the secondary's state machine decides,
//! within the room the primary granted.

use crate::config::{PredictorConfig, PredictorKind};
use crate::frame::StreamHint;
use crate::ids::{ExtentId, Generation};
use crate::record::Record;
use crate::time::Time;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// Largest stride, in extents, that counts as a stream rather than a random jump.
const MAX_STRIDE: i64 = 64;

#[derive(Clone, Debug)]
struct Stream {
    /// Last extent written by the stream.
    last: u64,
    stride: i64,
    run: u32,
    /// Logical clock of the last touch, for replacing the least recently used stream.
    touched: u64,
    /// Furthest extent already asked for by a pre-extension, so that one is not sent twice.
    asked_through: i64,
    /// When the stream last advanced a stride, and its smoothed time per stride (µs).
    last_step_at: Time,
    step_us: u64,
}

/// Detects streams in the primary's write sequence.
#[derive(Clone, Debug)]
pub struct StreamDetector {
    streams: Vec<Stream>,
    max_streams: usize,
    clock: u64,
}

/// What the detector learned from one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The stream the write belongs to, once it has shown a stride.
    pub hint: Option<StreamHint>,
    /// Index of the stream, for `mark_asked`.
    pub stream: usize,
}

impl StreamDetector {
    pub fn new(max_streams: usize) -> StreamDetector {
        StreamDetector { streams: Vec::new(), max_streams: max_streams.max(1), clock: 0 }
    }

    /// Feeds the extents `[first, last]` of one write, seen at `now`.
    pub fn observe(&mut self, now: Time, first: u64, last: u64) -> Observation {
        self.clock += 1;
        let clock = self.clock;
        // Continue a stream. A strided stream continues at its next stride. A forward stream
        // also continues with a write that starts in its last extent: small writes inside a
        // large extent, and writes not aligned to extents, whose first extent is the previous
        // write's last. Such a write advances the stream when it reaches past its last extent.
        let found = self.streams.iter().position(|s| {
            let expected = s.last as i64 + s.stride;
            let forward = s.stride == 1 || s.run == 0;
            (s.run > 0 && first as i64 == expected) || (forward && first == s.last)
        });
        let idx = match found {
            Some(i) => {
                let s = &mut self.streams[i];
                let stepped = if first as i64 == s.last as i64 + s.stride && s.run > 0 {
                    true
                } else if first == s.last && last > s.last {
                    // An unaligned sequential write: a stream of stride 1.
                    s.stride = 1;
                    true
                } else {
                    false
                };
                if stepped {
                    s.run = s.run.saturating_add(1);
                    let step = now.since(s.last_step_at).as_micros() as u64;
                    // Smoothed like TCP's srtt: seven parts old, one part new.
                    s.step_us = if s.step_us == 0 { step } else { (7 * s.step_us + step) / 8 };
                    s.last_step_at = now;
                }
                s.last = last.max(s.last);
                s.touched = clock;
                i
            }
            None => {
                // Give a single sighting its stride.
                let young = self.streams.iter().position(|s| {
                    let d = first as i64 - s.last as i64;
                    s.run == 0 && d != 0 && d.abs() <= MAX_STRIDE
                });
                match young {
                    Some(i) => {
                        let s = &mut self.streams[i];
                        s.stride = first as i64 - s.last as i64;
                        s.run = 1;
                        s.last = last;
                        s.touched = clock;
                        s.asked_through = last as i64;
                        s.step_us = now.since(s.last_step_at).as_micros() as u64;
                        s.last_step_at = now;
                        i
                    }
                    None => {
                        let fresh =
                            Stream { last, stride: 0, run: 0, touched: clock, asked_through: last as i64, last_step_at: now, step_us: 0 };
                        if self.streams.len() < self.max_streams {
                            self.streams.push(fresh);
                            self.streams.len() - 1
                        } else {
                            let lru = (0..self.streams.len()).min_by_key(|&i| self.streams[i].touched).unwrap_or(0);
                            self.streams[lru] = fresh;
                            lru
                        }
                    }
                }
            }
        };
        let s = &self.streams[idx];
        // Two writes make a stride by chance; three in step make a stream.
        let hint = (s.run >= 2).then_some(StreamHint { last: s.last, stride: s.stride, run: s.run, want: 0 });
        Observation { hint, stream: idx }
    }

    /// Strides the stream covers in `horizon` at its current pace (at least `min`, at most
    /// `max`): how far ahead the record must reach so the stream never waits for it.
    pub fn lookahead(&self, stream: usize, horizon: Duration, min: u32, max: u32) -> u32 {
        let min = min.min(max);
        let Some(s) = self.streams.get(stream) else { return min };
        if s.step_us == 0 {
            return max.min(min.max(1) * 4);
        }
        let strides = (horizon.as_micros() as u64).div_ceil(s.step_us.max(1));
        strides.min(max as u64).max(min as u64) as u32
    }

    /// The extents `within` strides ahead of a stream that a pre-extension should cover, or
    /// nothing when it has already asked that far.
    pub fn ahead(&self, stream: usize, within: u32) -> Option<(StreamHint, Vec<u64>)> {
        let s = self.streams.get(stream)?;
        if s.run < 2 {
            return None;
        }
        let mut out = Vec::new();
        for i in 1..=within as i64 {
            let e = s.last as i64 + s.stride * i;
            if e < 0 {
                break;
            }
            out.push(e as u64);
        }
        Some((StreamHint { last: s.last, stride: s.stride, run: s.run, want: within }, out))
    }

    pub fn asked_through(&self, stream: usize) -> i64 {
        self.streams.get(stream).map_or(i64::MAX, |s| s.asked_through)
    }

    pub fn mark_asked(&mut self, stream: usize, through: i64) {
        if let Some(s) = self.streams.get_mut(stream) {
            s.asked_through = through;
        }
    }
}

/// Recently evicted extents, grouped by the generation they were evicted from. A miss on one
/// of them means the working set came back: its generation-mates are re-admitted with it.
#[derive(Clone, Debug, Default)]
pub struct Ghosts {
    of: BTreeMap<ExtentId, Generation>,
    mates: BTreeMap<Generation, BTreeSet<ExtentId>>,
    order: VecDeque<(ExtentId, Generation)>,
    capacity: usize,
}

impl Ghosts {
    pub fn new(capacity: usize) -> Ghosts {
        Ghosts { capacity, ..Ghosts::default() }
    }

    pub fn len(&self) -> usize {
        self.of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.of.is_empty()
    }

    pub fn remember(&mut self, e: ExtentId, g: Generation) {
        if self.capacity == 0 {
            return;
        }
        self.forget(e);
        self.of.insert(e, g);
        self.mates.entry(g).or_default().insert(e);
        self.order.push_back((e, g));
        while self.of.len() > self.capacity {
            match self.order.pop_front() {
                Some((old, og)) if self.of.get(&old) == Some(&og) => self.forget(old),
                Some(_) => {}
                None => break,
            }
        }
    }

    pub fn forget(&mut self, e: ExtentId) {
        if let Some(g) = self.of.remove(&e) {
            if let Some(m) = self.mates.get_mut(&g) {
                m.remove(&e);
                if m.is_empty() {
                    self.mates.remove(&g);
                }
            }
        }
    }

    /// The generation-mates of a returning extent (itself excluded), forgotten as they are
    /// handed out.
    pub fn take_mates(&mut self, e: ExtentId) -> Vec<ExtentId> {
        let Some(g) = self.of.get(&e).copied() else {
            return Vec::new();
        };
        let mates: Vec<ExtentId> = self.mates.get(&g).map(|m| m.iter().copied().filter(|x| *x != e).collect()).unwrap_or_default();
        self.forget(e);
        for m in &mates {
            self.forget(*m);
        }
        mates
    }
}

/// The secondary's predictor.
#[derive(Clone, Debug)]
pub struct Predictor {
    cfg: PredictorConfig,
    ghosts: Ghosts,
}

impl Predictor {
    pub fn new(cfg: PredictorConfig) -> Predictor {
        let ghosts = Ghosts::new(cfg.ghost_capacity);
        Predictor { cfg, ghosts }
    }

    pub fn note_evicted(&mut self, e: ExtentId, g: Generation) {
        if self.cfg.kind == PredictorKind::Adaptive {
            self.ghosts.remember(e, g);
        }
    }

    pub fn ghost_count(&self) -> usize {
        self.ghosts.len()
    }

    /// Extra extents to record beyond `missed`: not in `record`, not in `missed`, inside the
    /// volume, at most `room` of them, in the order they should be preferred.
    pub fn predict(&mut self, missed: &[ExtentId], hints: &[StreamHint], room: u32, record: &Record) -> Vec<ExtentId> {
        let limit = record.extent_count();
        let missed_set: BTreeSet<ExtentId> = missed.iter().copied().collect();
        let mut out: Vec<ExtentId> = Vec::new();
        let mut chosen: BTreeSet<ExtentId> = BTreeSet::new();
        let room = room as usize;
        let mut push = |e: i64, out: &mut Vec<ExtentId>| -> bool {
            if out.len() >= room {
                return false;
            }
            if e >= 0 && (e as u64) < limit {
                let x = ExtentId(e as u64);
                if !record.contains(x) && !missed_set.contains(&x) && chosen.insert(x) {
                    out.push(x);
                }
            }
            true
        };
        match self.cfg.kind {
            PredictorKind::KNext => {
                for m in missed {
                    for i in 1..=self.cfg.k_next as i64 {
                        if !push(m.0 as i64 + i, &mut out) {
                            return out;
                        }
                    }
                }
            }
            PredictorKind::Adaptive => {
                // Re-admission first: a returning working set is the strongest signal.
                for m in missed {
                    for mate in self.ghosts.take_mates(*m) {
                        if !push(mate.0 as i64, &mut out) {
                            return out;
                        }
                    }
                }
                // Streams: extend ahead along the stride, further the longer the stream has
                // run (doubling, like readahead), skipping what is already recorded so the
                // frontier moves out.
                for h in hints.iter().filter(|h| h.stride != 0) {
                    // The primary measures how far the stream gets in a round trip and says so
                    // in `want`; without it, grow with the stream's run, like readahead.
                    let window = if h.want > 0 { h.want as u64 } else { (self.cfg.k_next as u64) << h.run.min(4) };
                    let window = window.min(self.cfg.max_ahead as u64) as usize;
                    let mut added = 0usize;
                    let mut i = 1i64;
                    while added < window && i <= 2 * self.cfg.max_ahead as i64 {
                        let e = h.last as i64 + h.stride * i;
                        if e < 0 || e as u64 >= limit {
                            break;
                        }
                        let before = out.len();
                        if !push(e, &mut out) {
                            return out;
                        }
                        if out.len() > before {
                            added += 1;
                        }
                        i += 1;
                    }
                }
                // A miss outside any known stream adds nothing more: a bet on its neighbour
                // would only fill the record (and the failback debt) on random workloads, and a
                // real stream is detected at its second write.
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: PredictorKind) -> PredictorConfig {
        PredictorConfig { kind, ..PredictorConfig::default() }
    }

    #[test]
    fn detector_finds_sequential_and_strided_streams() {
        let mut d = StreamDetector::new(4);
        assert_eq!(d.observe(Time::ZERO, 10, 10).hint, None);
        // Two writes make a stride by chance: no hint yet.
        assert_eq!(d.observe(Time::ZERO, 11, 11).hint, None);
        let h = d.observe(Time::ZERO, 12, 13).hint.unwrap();
        assert_eq!((h.last, h.stride, h.run), (13, 1, 2));
        // A strided stream alongside.
        d.observe(Time::ZERO, 100, 100);
        d.observe(Time::ZERO, 103, 103);
        let h = d.observe(Time::ZERO, 106, 106).hint.unwrap();
        assert_eq!((h.stride, h.run), (3, 2));
        // Small writes inside the same extent keep the sequential stream alive.
        assert_eq!(d.observe(Time::ZERO, 13, 13).hint.unwrap().stride, 1);
    }

    #[test]
    fn unaligned_sequential_writes_make_a_stream() {
        // 1 MiB writes starting half way into 1 MiB extents: each covers two extents and starts
        // in the one where the previous write ended.
        let mut d = StreamDetector::new(4);
        assert_eq!(d.observe(Time::ZERO, 0, 1).hint, None);
        d.observe(Time::ZERO, 1, 2);
        let h = d.observe(Time::ZERO, 2, 3).hint.expect("a stream after three writes in step");
        assert_eq!((h.last, h.stride), (3, 1));
        // A random write elsewhere does not break it.
        d.observe(Time::ZERO, 900, 900);
        assert_eq!(d.observe(Time::ZERO, 3, 4).hint.map(|h| h.last), Some(4));
    }

    #[test]
    fn k_next_is_claim_19() {
        let mut p = Predictor::new(PredictorConfig { k_next: 3, ..cfg(PredictorKind::KNext) });
        let r = Record::new(100);
        assert_eq!(p.predict(&[ExtentId(5)], &[], 100, &r), vec![ExtentId(6), ExtentId(7), ExtentId(8)]);
        // Room bounds it, and the volume end clips it.
        assert_eq!(p.predict(&[ExtentId(5)], &[], 1, &r), vec![ExtentId(6)]);
        assert_eq!(p.predict(&[ExtentId(98)], &[], 100, &r), vec![ExtentId(99)]);
    }

    #[test]
    fn adaptive_follows_a_stride_and_grows_with_confidence() {
        let mut p = Predictor::new(cfg(PredictorKind::Adaptive));
        let r = Record::new(10_000);
        let short = p.predict(&[ExtentId(30)], &[StreamHint { last: 30, stride: 3, run: 1, want: 0 }], 1000, &r);
        assert_eq!(&short[..3], &[ExtentId(33), ExtentId(36), ExtentId(39)]);
        let long = p.predict(&[ExtentId(30)], &[StreamHint { last: 30, stride: 3, run: 6, want: 0 }], 1000, &r);
        assert!(long.len() > short.len());
        assert!(long.len() <= 64 + 1);
    }

    #[test]
    fn adaptive_skips_recorded_extents_to_move_the_frontier() {
        let mut p = Predictor::new(cfg(PredictorKind::Adaptive));
        let mut r = Record::new(1000);
        for e in 11..20 {
            r.insert(ExtentId(e), Generation(1));
        }
        let got = p.predict(&[], &[StreamHint { last: 10, stride: 1, run: 1, want: 0 }], 100, &r);
        assert_eq!(got.first(), Some(&ExtentId(20)));
    }

    #[test]
    fn returning_extents_bring_back_their_generation() {
        let mut p = Predictor::new(cfg(PredictorKind::Adaptive));
        let r = Record::new(1000);
        for e in [500, 700, 900] {
            p.note_evicted(ExtentId(e), Generation(4));
        }
        let got = p.predict(&[ExtentId(700)], &[], 100, &r);
        assert!(got.contains(&ExtentId(500)) && got.contains(&ExtentId(900)));
        assert_eq!(p.ghost_count(), 0);
    }

    #[test]
    fn ghosts_are_bounded() {
        let mut g = Ghosts::new(3);
        for e in 0..10 {
            g.remember(ExtentId(e), Generation(e));
        }
        assert_eq!(g.len(), 3);
    }
}
