//! Host workloads: where the next write goes.
//!
//! Owns: the generators for sequential, strided, Zipf, uniform and mixed write streams, and
//! the block-trace readers (CloudPhysics and MSR Cambridge CSV). Must not: know about the
//! core; a workload yields (offset, length, kind) and nothing else.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::io::BufRead;
use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Sequential,
    Strided,
    Zipf,
    Uniform,
    Mixed,
}

impl Workload {
    pub const ALL: [Workload; 5] = [Workload::Sequential, Workload::Strided, Workload::Zipf, Workload::Uniform, Workload::Mixed];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Sequential => "sequential",
            Workload::Strided => "strided",
            Workload::Zipf => "zipf",
            Workload::Uniform => "uniform",
            Workload::Mixed => "mixed",
        }
    }

    pub fn parse(s: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Write,
    Zero,
    Trim,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostOp {
    pub offset: u64,
    pub len: u64,
    pub kind: OpKind,
}

/// A synthetic stream of host writes over a volume, with a tunable hot set and sequentiality.
#[derive(Clone, Debug)]
pub struct Generator {
    kind: Workload,
    volume_bytes: u64,
    /// Sequential and strided cursors, one per stream.
    cursors: Vec<u64>,
    stride_bytes: u64,
    write_bytes: u64,
    zipf_cdf: Vec<f64>,
    zipf_unit: u64,
}

impl Generator {
    /// `write_bytes` is the usual write size; `stride_bytes` the gap of a strided stream.
    pub fn new(kind: Workload, volume_bytes: u64, write_bytes: u64, stride_bytes: u64, streams: usize) -> Generator {
        let zipf_unit = write_bytes.max(4096);
        let n = (volume_bytes / zipf_unit).max(1) as usize;
        // Zipf with exponent 1.2 over the volume's units, hottest units spread by a fixed
        // permutation so that the hot set is not one contiguous region.
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for i in 0..n {
            acc += 1.0 / ((i + 1) as f64).powf(1.2);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        let cursors = (0..streams.max(1)).map(|i| (volume_bytes / streams.max(1) as u64) * i as u64 / 4096 * 4096).collect();
        Generator { kind, volume_bytes, cursors, stride_bytes, write_bytes, zipf_cdf: cdf, zipf_unit }
    }

    pub fn next(&mut self, rng: &mut ChaCha8Rng) -> HostOp {
        let kind = match self.kind {
            Workload::Mixed => match rng.gen_range(0..10) {
                0..=2 => Workload::Sequential,
                3 => Workload::Strided,
                4..=6 => Workload::Zipf,
                _ => Workload::Uniform,
            },
            k => k,
        };
        let len = self.size(rng, kind);
        let offset = match kind {
            Workload::Sequential | Workload::Mixed => self.advance(rng, len, len),
            Workload::Strided => self.advance(rng, len, self.stride_bytes.max(len)),
            Workload::Zipf => {
                let u: f64 = rng.gen();
                let idx = self.zipf_cdf.partition_point(|c| *c < u).min(self.zipf_cdf.len() - 1) as u64;
                let n = self.zipf_cdf.len() as u64;
                let unit = (idx.wrapping_mul(2_654_435_761) % n) * self.zipf_unit;
                unit.min(self.volume_bytes - len)
            }
            Workload::Uniform => rng.gen_range(0..=(self.volume_bytes - len) / 4096) * 4096,
        };
        let op = match rng.gen_range(0..40) {
            0 => OpKind::Zero,
            1 => OpKind::Trim,
            _ => OpKind::Write,
        };
        HostOp { offset, len, kind: op }
    }

    fn size(&self, rng: &mut ChaCha8Rng, kind: Workload) -> u64 {
        let len = match kind {
            Workload::Sequential | Workload::Strided => self.write_bytes,
            // Mixed sizes: half to four times the usual size.
            _ => {
                let mult = match rng.gen_range(0..8) {
                    0 => 8,
                    1 | 2 => 4,
                    _ => 2,
                };
                self.write_bytes * mult / 4
            }
        };
        (len / 4096 * 4096).clamp(4096, self.volume_bytes)
    }

    fn advance(&mut self, rng: &mut ChaCha8Rng, len: u64, step: u64) -> u64 {
        let i = rng.gen_range(0..self.cursors.len());
        let mut at = self.cursors[i];
        if at + len > self.volume_bytes {
            at = 0;
        }
        self.cursors[i] = at + step;
        at
    }
}

/// A synthetic trace with a tunable hot set and sequentiality, for workloads between the
/// pure shapes above: a share of the writes continues a sequential stream (which now and then
/// starts over somewhere else), the rest are random 4 KiB-aligned writes, most of them into a
/// hot set of a few regions scattered over the volume and the others anywhere.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticSpec {
    pub volume_bytes: u64,
    /// Bytes of the hot set, split into `hot_regions` equal regions.
    pub hot_bytes: u64,
    pub hot_regions: u64,
    /// Share of writes that continue the sequential stream, 0 to 1.
    pub sequential: f64,
    /// Share of the random writes that land in the hot set, 0 to 1.
    pub hot_share: f64,
    /// Size of a random write and of a sequential one.
    pub random_bytes: u64,
    pub sequential_bytes: u64,
    /// A stream runs this many bytes on average before it starts over elsewhere.
    pub run_bytes: u64,
}

impl SyntheticSpec {
    pub fn validate(&self) -> Result<(), String> {
        let aligned = |v: u64| v >= 4096 && v.is_multiple_of(4096);
        if !aligned(self.random_bytes) || !aligned(self.sequential_bytes) {
            return Err("write sizes must be positive multiples of 4 KiB".into());
        }
        if !(0.0..=1.0).contains(&self.sequential) || !(0.0..=1.0).contains(&self.hot_share) {
            return Err("the sequential and hot shares must lie between 0 and 1".into());
        }
        if self.hot_regions == 0 || self.hot_bytes / self.hot_regions < self.random_bytes {
            return Err("each hot region must hold at least one random write".into());
        }
        if self.hot_bytes > self.volume_bytes || self.sequential_bytes > self.volume_bytes || self.random_bytes > self.volume_bytes {
            return Err("the hot set and the write sizes must fit in the volume".into());
        }
        Ok(())
    }
}

/// Generates `SyntheticSpec` writes; the hot regions are placed by the seed.
pub struct Synthetic {
    spec: SyntheticSpec,
    hot_starts: Vec<u64>,
    cursor: u64,
}

impl Synthetic {
    pub fn new(spec: SyntheticSpec, rng: &mut ChaCha8Rng) -> Result<Synthetic, String> {
        spec.validate()?;
        let region = spec.hot_bytes / spec.hot_regions / 4096 * 4096;
        let hot_starts = (0..spec.hot_regions).map(|_| rng.gen_range(0..=(spec.volume_bytes - region) / 4096) * 4096).collect();
        let cursor = rng.gen_range(0..=(spec.volume_bytes - spec.sequential_bytes) / 4096) * 4096;
        Ok(Synthetic { spec, hot_starts, cursor })
    }

    pub fn next(&mut self, rng: &mut ChaCha8Rng) -> HostOp {
        let s = &self.spec;
        if rng.gen_bool(s.sequential) {
            let restart = rng.gen_bool((s.sequential_bytes as f64 / s.run_bytes.max(1) as f64).min(1.0));
            if restart || self.cursor + s.sequential_bytes > s.volume_bytes {
                self.cursor = rng.gen_range(0..=(s.volume_bytes - s.sequential_bytes) / 4096) * 4096;
            }
            let op = HostOp { offset: self.cursor, len: s.sequential_bytes, kind: OpKind::Write };
            self.cursor += s.sequential_bytes;
            return op;
        }
        let (base, span) = if rng.gen_bool(s.hot_share) {
            let region = s.hot_bytes / s.hot_regions / 4096 * 4096;
            (self.hot_starts[rng.gen_range(0..self.hot_starts.len())], region)
        } else {
            (0, s.volume_bytes)
        };
        let offset = base + rng.gen_range(0..=(span - s.random_bytes) / 4096) * 4096;
        HostOp { offset, len: s.random_bytes, kind: OpKind::Write }
    }
}

/// Writes host writes as a block trace in `format`, one line per write, a millisecond apart,
/// so that `read_trace` (and the tools that produced real traces) read it back.
pub fn write_trace<W: std::io::Write>(ops: &[HostOp], format: TraceFormat, mut out: W) -> std::io::Result<()> {
    match format {
        TraceFormat::CloudPhysics => writeln!(out, "timestamp,op,size,lba")?,
        TraceFormat::Msr => writeln!(out, "Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime")?,
    }
    for (i, op) in ops.iter().filter(|op| op.kind == OpKind::Write).enumerate() {
        match format {
            // Microseconds; the address in 512-byte sectors.
            TraceFormat::CloudPhysics => writeln!(out, "{},W,{},{}", i as u64 * 1000, op.len, op.offset / 512)?,
            // Windows file time (100 ns ticks), as MSR Cambridge records it.
            TraceFormat::Msr => {
                writeln!(out, "{},synthetic,0,Write,{},{},0", 128_166_372_000_000_000 + i as u64 * 10_000, op.offset, op.len)?
            }
        }
    }
    Ok(())
}

#[derive(Debug, Error)]
pub enum TraceError {
    #[error("line {line}: {msg}")]
    Parse { line: usize, msg: String },
    #[error("reading trace: {0}")]
    Io(#[from] std::io::Error),
    #[error("the trace has no write records")]
    Empty,
}

/// Trace formats that `read_trace` understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceFormat {
    /// `timestamp,op,size,lba`, with `lba` in 512-byte sectors and `op` R or W.
    CloudPhysics,
    /// `Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime`, offsets in bytes,
    /// `Type` Read or Write.
    Msr,
}

/// Reads the writes of a block trace, aligned to 4 KiB and folded into `volume_bytes`.
/// Reads are skipped: only writes change what the record must track. Bounded: at most
/// `max_ops` writes are kept.
pub fn read_trace<R: BufRead>(input: R, format: TraceFormat, volume_bytes: u64, max_ops: usize) -> Result<Vec<HostOp>, TraceError> {
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let parse = |s: &str, what: &str| {
            s.parse::<u64>().map_err(|_| TraceError::Parse { line: i + 1, msg: format!("{what} {s:?} is not a number") })
        };
        let (is_write, offset, size) = match format {
            TraceFormat::CloudPhysics => {
                if f.len() < 4 {
                    return Err(TraceError::Parse { line: i + 1, msg: format!("expected timestamp,op,size,lba; got {} fields", f.len()) });
                }
                if i == 0 && f[0].parse::<f64>().is_err() {
                    continue; // a header: its timestamp column is not a number
                }
                let op = f[1].to_ascii_uppercase();
                (op.starts_with('W'), parse(f[3], "lba")?.saturating_mul(512), parse(f[2], "size")?)
            }
            TraceFormat::Msr => {
                if f.len() < 6 {
                    return Err(TraceError::Parse { line: i + 1, msg: format!("expected 7 MSR fields; got {}", f.len()) });
                }
                if i == 0 && f[0].parse::<f64>().is_err() {
                    continue; // a header: its timestamp column is not a number
                }
                (f[3].eq_ignore_ascii_case("write"), parse(f[4], "offset")?, parse(f[5], "size")?)
            }
        };
        if !is_write || size == 0 {
            continue;
        }
        let start = offset / 4096 * 4096;
        let end = (offset.saturating_add(size)).div_ceil(4096) * 4096;
        let len = (end - start).clamp(4096, 32 << 20).min(volume_bytes);
        let start = start % volume_bytes;
        let start = if start + len > volume_bytes { volume_bytes - len } else { start };
        out.push(HostOp { offset: start, len, kind: OpKind::Write });
        if out.len() >= max_ops {
            break;
        }
    }
    if out.is_empty() {
        return Err(TraceError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn generators_stay_inside_the_volume() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for w in Workload::ALL {
            let mut g = Generator::new(w, 64 << 20, 64 << 10, 256 << 10, 2);
            for _ in 0..2000 {
                let op = g.next(&mut rng);
                assert!(op.len >= 4096 && op.offset.is_multiple_of(4096) && op.offset + op.len <= 64 << 20, "{w:?} {op:?}");
            }
        }
    }

    #[test]
    fn traces_parse_in_both_formats() {
        let cp = "timestamp,op,size,lba\n1,W,8192,16\n2,R,4096,0\n3,W,4096,100000000\n";
        let ops = read_trace(cp.as_bytes(), TraceFormat::CloudPhysics, 1 << 30, 100).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0], HostOp { offset: 8192, len: 8192, kind: OpKind::Write });
        let msr = "128166372003061629,hm,0,Write,3584,512,6860\n128166372003061630,hm,0,Read,0,4096,1\n";
        let ops = read_trace(msr.as_bytes(), TraceFormat::Msr, 1 << 30, 100).unwrap();
        assert_eq!(ops, vec![HostOp { offset: 0, len: 4096, kind: OpKind::Write }]);
        assert!(matches!(
            read_trace("1,W,x,1\n".as_bytes(), TraceFormat::CloudPhysics, 1 << 30, 10),
            Err(TraceError::Parse { line: 1, .. })
        ));
        assert!(matches!(read_trace("1,R,4096,1\n".as_bytes(), TraceFormat::CloudPhysics, 1 << 30, 10), Err(TraceError::Empty)));
    }
    #[test]
    fn synthetic_traces_have_the_asked_shape_and_read_back_in_both_formats() {
        let spec = SyntheticSpec {
            volume_bytes: 1 << 30,
            hot_bytes: 16 << 20,
            hot_regions: 4,
            sequential: 0.5,
            hot_share: 0.9,
            random_bytes: 4096,
            sequential_bytes: 64 << 10,
            run_bytes: 8 << 20,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut g = Synthetic::new(spec.clone(), &mut rng).unwrap();
        let ops: Vec<HostOp> = (0..20_000).map(|_| g.next(&mut rng)).collect();
        let seq: Vec<&HostOp> = ops.iter().filter(|o| o.len == spec.sequential_bytes).collect();
        let share = seq.len() as f64 / ops.len() as f64;
        assert!((0.47..0.53).contains(&share), "sequential share {share}");
        let continued = ops
            .windows(2)
            .filter(|w| w[1].len == spec.sequential_bytes && w[0].len == w[1].len && w[1].offset == w[0].offset + w[0].len)
            .count();
        assert!(continued as f64 > 0.2 * ops.len() as f64, "sequential writes follow on from each other: {continued}");
        let hot = |o: &HostOp| g.hot_starts.iter().any(|&h| o.offset >= h && o.offset + o.len <= h + spec.hot_bytes / spec.hot_regions);
        let random: Vec<&HostOp> = ops.iter().filter(|o| o.len == spec.random_bytes).collect();
        let hot_share = random.iter().filter(|o| hot(o)).count() as f64 / random.len() as f64;
        assert!((0.88..0.93).contains(&hot_share), "hot share {hot_share}");
        assert!(ops.iter().all(|o| o.offset.is_multiple_of(4096) && o.offset + o.len <= spec.volume_bytes));
        for format in [TraceFormat::CloudPhysics, TraceFormat::Msr] {
            let mut csv = Vec::new();
            write_trace(&ops, format, &mut csv).unwrap();
            assert_eq!(read_trace(&csv[..], format, spec.volume_bytes, usize::MAX).unwrap(), ops, "{format:?}");
        }
        let bad = SyntheticSpec { sequential: 1.5, ..spec };
        assert!(Synthetic::new(bad, &mut rng).is_err());
    }
}
