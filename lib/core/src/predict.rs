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
use std::ops::Range;
use std::time::Duration;

/// Largest stride, in extents, that counts as a stream rather than a random jump.
const MAX_STRIDE: i64 = 64;

/// How far, in write lengths, a write may start from where a sequential stream's last write
/// ended and still continue it: writes issued in parallel (qemu-img convert's coroutines, a
/// deep queue) arrive a little out of order.
const REORDER_WRITES: u64 = 8;

/// The least reorder window, in bytes, for streams of very small writes.
const MIN_REORDER_BYTES: u64 = 32 << 10;

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
    /// Byte range of the stream's latest write, and the furthest byte it has written.
    start: u64,
    len: u64,
    end: u64,
    /// Bytes between the starts of consecutive writes, once two writes have been seen.
    byte_stride: i64,
    /// Extents the last sequential step moved the frontier by.
    skip: i64,
    /// The stream has advanced by following on from its last write (not only by repeating a
    /// byte stride first seen between two writes that may have been unrelated).
    sequential: bool,
}

impl Stream {
    fn fresh(clock: u64, now: Time, bytes: &Range<u64>, last: u64) -> Stream {
        Stream {
            last,
            stride: 0,
            run: 0,
            touched: clock,
            asked_through: last as i64,
            last_step_at: now,
            step_us: 0,
            start: bytes.start,
            len: bytes.end - bytes.start,
            end: bytes.end,
            byte_stride: 0,
            skip: 0,
            sequential: false,
        }
    }

    /// Whether the stream is believed: two steps in a row that follow on from the last write,
    /// or three at an exact byte stride. Random 4 KiB writes over 32 MiB repeat some earlier
    /// pair's stride to the byte about once in 500 writes, and twice in a row almost never.
    fn believed(&self) -> bool {
        self.run >= 2 && (self.sequential || self.run >= 3)
    }

    /// How far, in bytes, writes of this stream may arrive out of order.
    fn slack(&self, bytes: &Range<u64>) -> u64 {
        (bytes.end - bytes.start).max(self.len).saturating_mul(REORDER_WRITES).max(MIN_REORDER_BYTES)
    }

    /// Whether a write at `bytes` carries on sequentially from this stream: it starts near
    /// where the stream has written up to, and not before its last write, or (once the stream
    /// has shown its direction) only a little before: a write overtaken by a later one.
    fn followed_by(&self, bytes: &Range<u64>) -> bool {
        let slack = self.slack(bytes);
        let behind = if self.run > 0 { slack } else { 0 };
        bytes.start.saturating_add(behind) >= self.start && bytes.start <= self.end.saturating_add(slack)
    }

    /// Whether a write at `bytes` lands just before this stream's last write: a young stream
    /// cannot tell a write overtaken by its last one from a backward stream, so such a write
    /// starts a second guess beside it rather than turning it round.
    fn just_behind(&self, bytes: &Range<u64>) -> bool {
        bytes.start < self.start && bytes.start.saturating_add(self.slack(bytes)) >= self.start
    }

    /// Whether a write at `bytes` starts exactly one byte stride after this stream's last one.
    fn stepped_to(&self, bytes: &Range<u64>) -> bool {
        self.byte_stride != 0 && bytes.start as i64 == self.start as i64 + self.byte_stride
    }

    fn remember_write(&mut self, bytes: &Range<u64>) {
        self.start = bytes.start;
        self.len = bytes.end - bytes.start;
        self.end = self.end.max(bytes.end);
    }
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

    /// Feeds one write, of the bytes `bytes` and so of the extents `extents`, seen at `now`.
    pub fn observe(&mut self, now: Time, bytes: Range<u64>, extents: Range<u64>) -> Observation {
        self.clock += 1;
        let clock = self.clock;
        let (first, last) = (extents.start, extents.end.saturating_sub(1).max(extents.start));
        // Continue a stream, with evidence at the byte level: extent-level evidence alone is
        // weak, since random writes over a small region land "one stride on" by chance all the
        // time, and each false stream would stretch the record (and the failback debt) ahead.
        // - A forward stream continues with a write that follows its last one (small writes
        //   inside a large extent, writes not aligned to extents, parallel writers slightly out
        //   of order), and advances when the write reaches past its last extent.
        // - A strided stream continues with a write exactly one byte stride on, in the extent
        //   one stride on.
        let found = self.streams.iter().position(|s| {
            let forward = s.stride == 1 || s.run == 0;
            let strided = s.run > 0 && first as i64 == s.last as i64 + s.stride && s.stepped_to(&bytes);
            strided || (forward && s.followed_by(&bytes))
        });
        let idx = match found {
            Some(i) => {
                let s = &mut self.streams[i];
                let stepped = if s.run > 0 && first as i64 == s.last as i64 + s.stride && s.stepped_to(&bytes) {
                    true
                } else if last > s.last {
                    // A write into a later extent, near enough to be sequential: a stream of
                    // stride 1, unless it skips whole extents by the same count and the same
                    // bytes as its last step did. Writes overtaken by later ones leave gaps
                    // too, but those are filled and never repeat to the byte: that is a
                    // strided stream.
                    let skip = first as i64 - s.last as i64;
                    let repeated = skip > 1 && skip == s.skip && bytes.start as i64 - s.start as i64 == s.byte_stride;
                    s.stride = if repeated { skip } else { 1 };
                    s.skip = skip;
                    s.sequential = true;
                    true
                } else {
                    // A write behind the frontier fills a gap: the gaps were reordering.
                    s.skip = 0;
                    false
                };
                if stepped {
                    s.run = s.run.saturating_add(1);
                    let step = now.since(s.last_step_at).as_micros() as u64;
                    // Smoothed like TCP's srtt: seven parts old, one part new.
                    s.step_us = if s.step_us == 0 { step } else { (7 * s.step_us + step) / 8 };
                    s.last_step_at = now;
                    s.byte_stride = bytes.start as i64 - s.start as i64;
                }
                // A backward stream's frontier is its lowest extent.
                s.last = if s.stride < 0 { first } else { last.max(s.last) };
                s.remember_write(&bytes);
                s.touched = clock;
                i
            }
            None => {
                // Give a single sighting its stride. The next step must then match it to the
                // byte (or carry on sequentially) before the stream is believed.
                let young = self.streams.iter().position(|s| {
                    let d = first as i64 - s.last as i64;
                    s.run == 0 && d != 0 && d.abs() <= MAX_STRIDE
                });
                let fresh = Stream::fresh(clock, now, &bytes, last);
                match young {
                    Some(i) => {
                        let young = &self.streams[i];
                        let stride = first as i64 - young.last as i64;
                        let second = Stream {
                            last: if stride < 0 { first } else { last },
                            stride,
                            run: 1,
                            asked_through: if stride < 0 { first as i64 } else { last as i64 },
                            step_us: now.since(young.last_step_at).as_micros() as u64,
                            byte_stride: bytes.start as i64 - young.start as i64,
                            ..fresh
                        };
                        if young.just_behind(&bytes) {
                            // A write just before a young stream's first is either a stream
                            // going backward or one overtaken by the next: keep both guesses.
                            self.insert(second, i)
                        } else {
                            self.streams[i] = second;
                            i
                        }
                    }
                    None => self.insert(fresh, usize::MAX),
                }
            }
        };
        let s = &self.streams[idx];
        // Two writes make a stride by chance; three in step make a stream, if they follow on
        // from each other (four at a bare byte stride).
        let hint = s.believed().then_some(StreamHint { last: s.last, stride: s.stride, run: s.run, want: 0 });
        Observation { hint, stream: idx }
    }

    /// Adds a stream, in place of the least recently used one (never `keep`) when full.
    fn insert(&mut self, stream: Stream, keep: usize) -> usize {
        if self.streams.len() < self.max_streams {
            self.streams.push(stream);
            return self.streams.len() - 1;
        }
        let lru =
            (0..self.streams.len()).filter(|&i| i != keep || self.streams.len() == 1).min_by_key(|&i| self.streams[i].touched).unwrap_or(0);
        self.streams[lru] = stream;
        lru
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
        if !s.believed() {
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
                        // Hints come from the peer: a stride or a start far outside the volume
                        // ends the walk rather than overflowing.
                        let e = match h.stride.checked_mul(i).and_then(|d| i64::try_from(h.last).ok()?.checked_add(d)) {
                            Some(e) if e >= 0 && (e as u64) < limit => e,
                            _ => break,
                        };
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

    const MIB: u64 = 1 << 20;

    /// Feeds a write of `len` bytes at `offset` with 1 MiB extents.
    fn write(d: &mut StreamDetector, offset: u64, len: u64) -> Option<StreamHint> {
        let extents = offset / MIB..(offset + len - 1) / MIB + 1;
        d.observe(Time::ZERO, offset..offset + len, extents).hint
    }

    #[test]
    fn detector_finds_sequential_and_strided_streams() {
        let mut d = StreamDetector::new(4);
        assert_eq!(write(&mut d, 10 * MIB, MIB), None);
        // Two writes make a stride by chance: no hint yet.
        assert_eq!(write(&mut d, 11 * MIB, MIB), None);
        let h = write(&mut d, 12 * MIB, 2 * MIB).unwrap();
        assert_eq!((h.last, h.stride, h.run), (13, 1, 2));
        // A strided stream alongside: a bare byte stride needs a fourth write in step.
        write(&mut d, 100 * MIB, 64 << 10);
        write(&mut d, 103 * MIB, 64 << 10);
        assert_eq!(write(&mut d, 106 * MIB, 64 << 10), None);
        let h = write(&mut d, 109 * MIB, 64 << 10).unwrap();
        assert_eq!((h.stride, h.run), (3, 3));
        // Small writes following on inside the same extent keep the sequential stream alive.
        assert_eq!(write(&mut d, 14 * MIB, 4096).unwrap().stride, 1);
    }

    #[test]
    fn small_sequential_writes_make_a_stream_once_they_cross_two_extents() {
        let mut d = StreamDetector::new(4);
        let mut hint = None;
        let mut offset = 0;
        while hint.is_none() && offset < 4 * MIB {
            hint = write(&mut d, offset, 4096);
            offset += 4096;
        }
        let h = hint.expect("a stream");
        assert_eq!((h.last, h.stride, h.run), (2, 1, 2));
        assert_eq!(offset, 2 * MIB + 4096);
    }

    #[test]
    fn unaligned_sequential_writes_make_a_stream() {
        // 1 MiB writes starting half way into 1 MiB extents: each covers two extents and starts
        // in the one where the previous write ended.
        let mut d = StreamDetector::new(4);
        let half = MIB / 2;
        assert_eq!(write(&mut d, half, MIB), None);
        write(&mut d, MIB + half, MIB);
        let h = write(&mut d, 2 * MIB + half, MIB).expect("a stream after three writes in step");
        assert_eq!((h.last, h.stride), (3, 1));
        // A random write elsewhere does not break it.
        write(&mut d, 900 * MIB, 4096);
        assert_eq!(write(&mut d, 3 * MIB + half, MIB).map(|h| h.last), Some(4));
    }

    #[test]
    fn parallel_writers_slightly_out_of_order_are_one_stream() {
        // Like qemu-img convert's coroutines: 2 MiB chunks, each pair arriving swapped.
        let mut d = StreamDetector::new(8);
        let mut last_hint = None;
        for pair in 0..16u64 {
            for k in [1, 0] {
                let hint = write(&mut d, (pair * 2 + k) * 2 * MIB, 2 * MIB);
                if pair >= 2 {
                    assert_eq!(hint.map(|h| h.stride), Some(1), "chunk {} is in the stream", pair * 2 + k);
                }
                last_hint = hint.or(last_hint);
            }
        }
        let h = last_hint.expect("a stream");
        assert_eq!((h.last, h.stride), (63, 1), "the stream kept up with the writes");
    }

    #[test]
    fn a_stride_within_the_reorder_window_is_still_a_stride() {
        // 256 KiB every 768 KiB, with 256 KiB extents: every write skips two extents, which
        // the reorder window alone would take for a sequential stream and fill in.
        let mut d = StreamDetector::new(4);
        let k = 256 << 10;
        let hints: Vec<Option<StreamHint>> =
            (0..5u64).map(|i| d.observe(Time::ZERO, i * 3 * k..i * 3 * k + k, i * 3..i * 3 + 1).hint).collect();
        let h = hints[4].expect("a stream");
        assert_eq!((h.last, h.stride), (12, 3));
    }

    #[test]
    fn backward_streams_are_followed() {
        let mut d = StreamDetector::new(4);
        write(&mut d, 50 * MIB, MIB);
        write(&mut d, 49 * MIB, MIB);
        write(&mut d, 48 * MIB, MIB);
        let h = write(&mut d, 47 * MIB, MIB).expect("a backward stream");
        assert_eq!((h.last, h.stride), (47, -1));
        assert_eq!(write(&mut d, 46 * MIB, MIB).map(|h| (h.last, h.run)), Some((46, 4)));
    }

    #[test]
    fn random_writes_over_a_small_region_make_no_streams() {
        // 4 KiB writes at random over 32 MiB: at the extent level, "one stride on" happens by
        // chance every few writes. None of it may be taken for a stream.
        let mut d = StreamDetector::new(16);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut hints = 0;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let offset = (x % (32 * MIB / 4096)) * 4096;
            hints += usize::from(write(&mut d, offset, 4096).is_some());
        }
        assert_eq!(hints, 0, "{hints} of 20000 random writes were taken for a stream");
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
    fn hints_far_outside_the_volume_predict_nothing() {
        // Hints come from the peer: a start past `i64::MAX` or strides that overflow must end
        // the walk, not wrap around into the volume (or panic with overflow checks on).
        let mut p = Predictor::new(cfg(PredictorKind::Adaptive));
        let r = Record::new(1000);
        for h in [
            StreamHint { last: u64::MAX, stride: 2, run: 4, want: 8 },
            StreamHint { last: 1 << 62, stride: 1 << 62, run: 4, want: 8 },
            StreamHint { last: 5, stride: i64::MIN, run: 4, want: 8 },
            StreamHint { last: 5, stride: i64::MAX, run: 4, want: 8 },
        ] {
            assert_eq!(p.predict(&[], &[h], 100, &r), vec![], "{h:?}");
        }
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
