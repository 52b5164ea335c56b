//! The method against the alternatives, side by side in one run: qemu-nbd and geomirror with
//! no peer on the local machine, then geomirror in async, sync and predictive modes with two
//! sites over `geomirror wan-emu` at several round-trip times. Every system runs the same
//! workloads through real clients: fio (`ioengine=nbd`), `qemu-img convert` of a real
//! filesystem image, and block traces replayed by fio from an iolog. One fresh pair of sites
//! per row, so that no row inherits another's record.
//!
//! Each replicated row reports what the targets in docs/benchmarks.md ask: p50 and p99 write latency,
//! throughput (the host's, and what the emulated link carried towards the secondary
//! meanwhile), the hit ratio (writes acknowledged without a round trip), the record's size and
//! the failback debt when the job ended, and, after a forced failover (`kill -9` of the
//! primary, `geomirror promote --force` of the secondary, the old primary back as secondary),
//! the bytes the failback actually copied against the volume's size. The failback runs over
//! an unpaced link so that a full copy does not take minutes; what it copies does not depend
//! on the rate. After it, `qemu-img compare` must find both images equal.

use anyhow::{bail, Context, Result};
use geomirror_sim::{read_trace, write_trace, Synthetic, SyntheticSpec, TraceFormat};
use geomirror_tests::pair::{site_config, two_sites_both_ways, PairOptions, WanEmu};
use geomirror_tests::site::{run_ok, tool, write_secret, Site};
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Bearer token of the benchmark's admin calls (sites read it from `token`).
const TOKEN: &str = "geomirror-bench-admin-token-0001";

/// Writes of a trace replay, at most (a replay also stops at the job's runtime).
const TRACE_WRITES: usize = 200_000;

/// Queue depth of a trace replay: traces record what hosts issued, not how many at once.
const TRACE_QD: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    /// qemu-nbd serving a raw file: the ceiling of an NBD server on this machine.
    QemuNbd,
    /// geomirror with no peer: the NBD front end and local media only.
    NoPeer,
    /// No record, like DRBD protocol A.
    Async,
    /// Every write waits for the secondary, like DRBD protocol C.
    Sync,
    /// The method.
    Predictive,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::QemuNbd => "qemu-nbd",
            System::NoPeer => "no peer",
            System::Async => "async",
            System::Sync => "sync",
            System::Predictive => "predictive",
        }
    }

    /// The `[replication] mode`, for the systems that replicate.
    fn mode(self) -> Option<&'static str> {
        match self {
            System::QemuNbd | System::NoPeer => None,
            System::Async => Some("async"),
            System::Sync => Some("sync"),
            System::Predictive => Some("predictive"),
        }
    }
}

pub enum Work {
    /// A time-based fio job with these options.
    Fio(&'static [&'static str]),
    /// `qemu-img convert` of a filesystem image (`bytes` long) onto the export.
    Convert { image: PathBuf, bytes: u64 },
    /// fio replaying the writes of a block trace (converted to an iolog) at `TRACE_QD`.
    Trace { iolog: PathBuf },
}

pub struct Job {
    pub name: String,
    /// Sequential or Zipf: the workloads the latency and throughput targets (docs/benchmarks.md) name.
    pub targeted: bool,
    pub sequential: bool,
    /// The host's rate as a share of the link's, or None for as fast as it can.
    pub link_share: Option<f64>,
    pub work: Work,
}

/// A fio job: name, targeted, sequential, share of the link, options.
type FioJob = (&'static str, bool, bool, Option<f64>, &'static [&'static str]);

/// The fio jobs. Flat out, a host outruns any WAN link and every mode ends up throttled
/// by the lag limit, so latency there is the throttle's queue; at half the link's rate
/// the lag stays small and latency is the mode's own. Both are measured.
const FIO_JOBS: &[FioJob] = &[
    ("seq 1M QD1", true, true, None, &["--rw=write", "--bs=1m", "--iodepth=1"]),
    ("seq 1M QD32", true, true, None, &["--rw=write", "--bs=1m", "--iodepth=32"]),
    ("seq 1M QD32 at half the link", true, true, Some(0.5), &["--rw=write", "--bs=1m", "--iodepth=32"]),
    ("rand 4K QD1", false, false, None, &["--rw=randwrite", "--bs=4k", "--iodepth=1"]),
    ("rand 4K QD32", false, false, None, &["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    ("zipf 4K QD1", true, false, None, &["--rw=randwrite", "--bs=4k", "--iodepth=1", "--random_distribution=zipf:1.2"]),
    ("zipf 4K QD32", true, false, None, &["--rw=randwrite", "--bs=4k", "--iodepth=32", "--random_distribution=zipf:1.2"]),
    (
        "zipf 4K QD32 at half the link",
        true,
        false,
        Some(0.5),
        &["--rw=randwrite", "--bs=4k", "--iodepth=32", "--random_distribution=zipf:1.2"],
    ),
];

/// The jobs the latency and throughput targets (docs/benchmarks.md) name.
pub fn targeted_jobs() -> Vec<String> {
    FIO_JOBS.iter().filter(|j| j.1).map(|j| j.0.to_string()).collect()
}

/// The jobs a quick look runs: the ones the targets name, at queue depth 32.
pub const QUICK_JOBS: &[&str] = &["seq 1M QD32", "seq 1M QD32 at half the link", "zipf 4K QD32", "zipf 4K QD32 at half the link"];

/// The synthetic traces every full run replays, one in each CSV shape so that both readers
/// are exercised: (name, hot set, sequential share, format).
const SYNTHETIC: &[(&str, u64, f64, TraceFormat)] = &[
    ("trace: synthetic, hot 32 MiB, 30% seq (CloudPhysics CSV)", 32 << 20, 0.3, TraceFormat::CloudPhysics),
    ("trace: synthetic, hot 8 MiB, 80% seq (MSR CSV)", 8 << 20, 0.8, TraceFormat::Msr),
];

const CONVERT: &str = "qemu-img convert (ext4 image)";

/// A trace the user asked for: `--trace FORMAT:FILE`.
#[derive(Clone, Debug)]
pub struct TraceArg {
    pub format: TraceFormat,
    pub path: PathBuf,
}

pub fn parse_trace_arg(s: &str) -> Result<TraceArg, String> {
    let (format, path) = s.split_once(':').ok_or_else(|| format!("{s:?}: expected FORMAT:FILE, e.g. msr:hm_0.csv"))?;
    let format = match format {
        "cloudphysics" => TraceFormat::CloudPhysics,
        "msr" => TraceFormat::Msr,
        other => return Err(format!("unknown trace format {other:?}: cloudphysics or msr")),
    };
    Ok(TraceArg { format, path: PathBuf::from(path) })
}

pub struct Options {
    pub rtts_ms: Vec<u64>,
    pub systems: Vec<System>,
    /// Job names to run; empty: all.
    pub only: Vec<String>,
    pub quick: bool,
    pub traces: Vec<TraceArg>,
    pub runtime_s: u64,
    /// Seconds of each fio job run before measuring; None: `ramp_s(runtime_s)`.
    pub ramp_s: Option<u64>,
    pub rate_mbps: u64,
    pub volume_bytes: u64,
    pub max_lag_bytes: u64,
    /// Extra `[replication]` lines (`key=value`).
    pub replication: Vec<String>,
    /// Print the primary's whole status after each replicated job.
    pub verbose: bool,
}

impl Options {
    /// Seconds of each fio job run before measuring starts.
    pub fn ramp(&self) -> u64 {
        self.ramp_s.unwrap_or_else(|| ramp_s(self.runtime_s))
    }
}

/// Builds the jobs the options select: the fio jobs, and (unless quick) the filesystem image
/// for `qemu-img convert` and the trace iologs, all in `scratch`.
pub fn jobs(o: &Options, scratch: &Path) -> Result<Vec<Job>> {
    let wanted =
        |name: &str| (o.only.is_empty() || o.only.iter().any(|w| name.contains(w.as_str()))) && (!o.quick || QUICK_JOBS.contains(&name));
    let mut jobs = Vec::new();
    for &(name, targeted, sequential, link_share, args) in FIO_JOBS {
        if wanted(name) {
            jobs.push(Job { name: name.into(), targeted, sequential, link_share, work: Work::Fio(args) });
        }
    }
    if wanted(CONVERT) {
        let (image, bytes) = filesystem_image(scratch, o.volume_bytes)?;
        jobs.push(Job { name: CONVERT.into(), targeted: false, sequential: false, link_share: None, work: Convert { image, bytes } });
    }
    for (i, &(name, hot, sequential, format)) in SYNTHETIC.iter().enumerate() {
        if wanted(name) {
            let csv = scratch.join(format!("synthetic-{i}.csv"));
            synthetic_trace(&csv, o.volume_bytes, hot, sequential, format, i as u64)?;
            jobs.push(trace_job(name.into(), &csv, format, o.volume_bytes, scratch)?);
        }
    }
    for t in &o.traces {
        let name = format!("trace: {}", t.path.file_name().map_or("?".into(), |n| n.to_string_lossy()));
        jobs.push(trace_job(name, &t.path, t.format, o.volume_bytes, scratch)?);
    }
    if jobs.is_empty() {
        let mut names: Vec<String> = FIO_JOBS.iter().map(|j| j.0.to_string()).collect();
        names.push(CONVERT.into());
        names.extend(SYNTHETIC.iter().map(|s| s.0.to_string()));
        bail!("no job matches {:?}; the jobs are: {}", o.only, names.join(", "));
    }
    Ok(jobs)
}

use Work::Convert;

/// An ext4 image of half the volume (at most 512 MiB), filled from /usr/share/doc: many small
/// files and directories, as a real filesystem holds.
fn filesystem_image(scratch: &Path, volume_bytes: u64) -> Result<(PathBuf, u64)> {
    let image = scratch.join("fs.img");
    let bytes = (volume_bytes / 2).min(512 << 20) / (1 << 20) * (1 << 20);
    let out = tool("mkfs.ext4", "e2fsprogs")
        .args(["-q", "-F", "-d", "/usr/share/doc", "-E", "root_owner=0:0"])
        .arg(&image)
        .arg(format!("{}M", bytes >> 20))
        .output()?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 could not build a {} MiB image from /usr/share/doc (a bigger --size makes a bigger image): {}",
            bytes >> 20,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((image, bytes))
}

fn synthetic_trace(csv: &Path, volume_bytes: u64, hot_bytes: u64, sequential: f64, format: TraceFormat, seed: u64) -> Result<()> {
    let spec = SyntheticSpec {
        volume_bytes,
        hot_bytes: hot_bytes.min(volume_bytes / 4),
        hot_regions: 4,
        sequential,
        hot_share: 0.95,
        random_bytes: 4096,
        sequential_bytes: 64 << 10,
        run_bytes: 16 << 20,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut g = Synthetic::new(spec, &mut rng).map_err(anyhow::Error::msg)?;
    let ops: Vec<_> = (0..TRACE_WRITES).map(|_| g.next(&mut rng)).collect();
    write_trace(&ops, format, std::io::BufWriter::new(std::fs::File::create(csv)?))?;
    Ok(())
}

/// Reads a trace's writes (folded into the volume) and writes them as a fio iolog (version 2).
fn trace_job(name: String, csv: &Path, format: TraceFormat, volume_bytes: u64, scratch: &Path) -> Result<Job> {
    use std::io::Write;
    let file = std::fs::File::open(csv).with_context(|| format!("opening the trace {}", csv.display()))?;
    let ops = read_trace(std::io::BufReader::new(file), format, volume_bytes, TRACE_WRITES)
        .with_context(|| format!("reading the trace {}", csv.display()))?;
    let iolog = scratch.join(format!("{}.iolog", csv.file_stem().map_or("trace".into(), |s| s.to_string_lossy())));
    let mut w = std::io::BufWriter::new(std::fs::File::create(&iolog)?);
    writeln!(w, "fio version 2 iolog\nvol0 add\nvol0 open")?;
    for op in &ops {
        writeln!(w, "vol0 write {} {}", op.offset, op.len)?;
    }
    writeln!(w, "vol0 close")?;
    w.flush()?;
    let bytes: u64 = ops.iter().map(|op| op.len).sum();
    eprintln!("{name}: {} writes, {}, from {}", ops.len(), human(bytes), csv.display());
    Ok(Job { name, targeted: false, sequential: false, link_share: None, work: Work::Trace { iolog } })
}

/// What a replicated row adds to the host's figures.
pub struct Replica {
    /// What the emulated link carried towards the secondary during the job, per second
    /// (QUIC and framing included): the host's own throughput also counts what waits in the
    /// lag buffer.
    pub link_mib_s: f64,
    pub writes: u64,
    pub hits: u64,
    pub record_bytes: u64,
    pub debt_bytes: u64,
    pub failback_bytes: u64,
}

pub struct Row {
    /// None for the systems without a peer.
    pub rtt_ms: Option<u64>,
    pub system: System,
    pub job: usize,
    pub fio: super::Figures,
    pub replica: Option<Replica>,
}

impl Replica {
    pub fn hit_ratio(&self) -> f64 {
        if self.writes == 0 {
            return 0.0;
        }
        self.hits as f64 / self.writes as f64
    }
}

pub fn run(bin: &Path, o: &Options, jobs: &[Job]) -> Result<Vec<Row>> {
    let local: Vec<System> = o.systems.iter().copied().filter(|s| s.mode().is_none()).collect();
    let replicated: Vec<System> = o.systems.iter().copied().filter(|s| s.mode().is_some()).collect();
    let total = jobs.len() * (local.len() + o.rtts_ms.len() * replicated.len());
    let mut rows = Vec::new();
    let mut plan: Vec<(Option<u64>, System, usize)> = Vec::new();
    for j in 0..jobs.len() {
        // Alternate which local system goes first, job by job, so that neither always runs
        // right after the other.
        let order: Vec<System> = if j % 2 == 0 { local.clone() } else { local.iter().rev().copied().collect() };
        plan.extend(order.into_iter().map(|s| (None, s, j)));
    }
    for &rtt in &o.rtts_ms {
        for j in 0..jobs.len() {
            plan.extend(replicated.iter().map(|&s| (Some(rtt), s, j)));
        }
    }
    for (rtt_ms, system, j) in plan {
        let job = &jobs[j];
        let at = rtt_ms.map_or(String::new(), |r| format!("RTT {r} ms, "));
        eprintln!("[{}/{total}] {at}{}, {}", rows.len() + 1, system.name(), job.name);
        // Every row starts with no dirty pages: none pays for the writeback of the row before.
        run_ok(&mut Command::new("sync"));
        let (fio, replica) = match rtt_ms {
            None => (local_row(bin, o, system, job).with_context(|| format!("{}, {}", system.name(), job.name))?, None),
            Some(rtt) => {
                let (f, r) = replicated_row(bin, o, rtt, system, job).with_context(|| format!("{at}{}, {}", system.name(), job.name))?;
                (f, Some(r))
            }
        };
        let mut line = format!("    {:.1} MiB/s, p50 {}, p99 {}", fio.mib_s, ms(fio.p50_us), ms(fio.p99_us));
        if let Some(r) = &replica {
            line += &format!(
                ", hits {:.1}%, record {}, failback copied {}",
                100.0 * r.hit_ratio(),
                human(r.record_bytes),
                human(r.failback_bytes)
            );
        }
        eprintln!("{line}");
        rows.push(Row { rtt_ms, system, job: j, fio, replica });
    }
    Ok(rows)
}

/// Runs a job against `url`.
fn drive(url: &str, job: &Job, o: &Options, dir: &Path) -> Result<super::Figures> {
    match &job.work {
        Work::Fio(args) => {
            // The first seconds (a record's warm-up, a lag buffer filling) are run but not
            // measured, alike for every system.
            let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            let mut ramp = o.ramp();
            if let Some(share) = job.link_share {
                args.push(format!("--rate={}", (o.rate_mbps as f64 * 1e6 / 8.0 * share) as u64));
                // fio 3.33 with a rate and a ramp_time not under the runtime ends the job at
                // the runtime, ramp included, and records no latency at all. So a long ramp
                // of a rate-limited job is a run of its own, unmeasured, straight before.
                if ramp >= o.runtime_s {
                    let unmeasured: Vec<&str> = args.iter().map(String::as_str).collect();
                    super::fio(url, &unmeasured, ramp, true, dir)?;
                    ramp = 0;
                }
            }
            args.push(format!("--ramp_time={ramp}"));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            super::fio(url, &args, o.runtime_s, true, dir)
        }
        Work::Trace { iolog } => {
            let args = [format!("--read_iolog={}", iolog.display()), format!("--iodepth={TRACE_QD}")];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            // At most the runtime: a slow system replays a prefix of the trace.
            super::fio(url, &args, o.runtime_s, false, dir)
        }
        Convert { image, bytes } => {
            let t = Instant::now();
            run_ok(tool("qemu-img", "qemu-utils").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(image).arg(url));
            let secs = t.elapsed().as_secs_f64();
            Ok(super::Figures { mib_s: *bytes as f64 / secs / (1 << 20) as f64, iops: f64::NAN, p50_us: f64::NAN, p99_us: f64::NAN })
        }
    }
}

/// Seconds of a time-based fio job that are run before measuring starts.
pub fn ramp_s(runtime_s: u64) -> u64 {
    (runtime_s / 3).clamp(1, 3)
}

fn local_row(bin: &Path, o: &Options, system: System, job: &Job) -> Result<super::Figures> {
    match system {
        System::QemuNbd => {
            let tmp = tempfile::tempdir()?;
            let file = tmp.path().join("qemu.img");
            std::fs::File::create(&file)?.set_len(o.volume_bytes)?;
            let qemu = super::QemuNbd::start(&file)?;
            drive(&qemu.url, job, o, tmp.path())
        }
        System::NoPeer => {
            let mut site = Site::start(bin, &format!("[[volume]]\nname = \"vol0\"\nmedia = \"vol0.img\"\nsize = {}\n", o.volume_bytes));
            let figures = drive(site.url("vol0"), job, o, &site.dir)?;
            let (end, log) = site.stop();
            if !end.success() {
                bail!("geomirror did not stop cleanly:\n{log}");
            }
            Ok(figures)
        }
        _ => unreachable!("replicated systems run in replicated_row"),
    }
}

fn options(rtt_ms: u64, rate_mbps: Option<u64>, mode: &str, o: &Options) -> PairOptions {
    let bandwidth = rate_mbps.map_or(String::new(), |r| format!("bandwidth_mbps = {r}\n"));
    PairOptions {
        link: format!("rtt_ms = {}\n{bandwidth}idle_timeout_ms = 2000\nkeep_alive_ms = 500\n", rtt_ms.max(1)),
        // The data window may not exceed the lag; 16 MiB is many times this link's
        // bandwidth-delay product.
        replication: format!(
            "[replication]\nmode = \"{mode}\"\nmax_lag_bytes = {}\nmax_inflight_bytes = {}\n{}",
            o.max_lag_bytes,
            o.max_lag_bytes.min(16 << 20),
            o.replication.iter().map(|l| format!("{l}\n")).collect::<String>()
        ),
        size: o.volume_bytes.to_string(),
        wan: vec!["--rtt-ms".into(), rtt_ms.to_string(), "--rate-mbps".into(), rate_mbps.unwrap_or(0).to_string()],
        admin: "listen = \"127.0.0.1:0\"\ntoken_file = \"token\"\n".into(),
        ..PairOptions::default()
    }
}

fn replicated_row(bin: &Path, o: &Options, rtt_ms: u64, system: System, job: &Job) -> Result<(super::Figures, Replica)> {
    let mode = system.mode().expect("a replicated system");
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_secret(&dir.join("token"), &format!("{TOKEN}\n"));
    let paced = options(rtt_ms, Some(o.rate_mbps), mode, o);
    let started = Instant::now();
    let phase = |what: &str| {
        if o.verbose {
            eprintln!("    {:>6.1} s  {what}", started.elapsed().as_secs_f64());
        }
    };
    let (mut dc1, mut dc2, to_dc2, to_dc1) = two_sites_both_ways(bin, dir, &paced);
    phase("both sites up");
    let carried_before = forward_bytes(&to_dc2)?;
    let t = Instant::now();
    let fio = drive(dc1.url("vol0"), job, o, dir)?;
    let link_mib_s = (forward_bytes(&to_dc2)? - carried_before) as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64;
    let s = status(bin, dir, "dc1", &dc1)?;
    if o.verbose {
        eprintln!("    the primary's status after the job: {s}");
    }
    let v = &s["volumes"][0];
    let num = |k: &str| v[k].as_u64().with_context(|| format!("status has no {k}: {s}"));
    let (writes, hits, record_bytes, debt_bytes) = (num("writes")?, num("hits")?, num("record_bytes")?, num("failback_debt_bytes")?);

    phase("job done");
    // A forced failover, then the failback over an unpaced link. The secondary is restarted
    // on the unpaced config before its promotion: a promoted site that stops waits for its
    // (dead) peer to drain.
    dc1.kill();
    let fast = options(rtt_ms, None, mode, o);
    let (p1, p2) = (dc1.replication.context("dc1 port")?.port(), dc2.replication.context("dc2 port")?.port());
    site_config(dir, "dc1", "dc2", "primary", p1, to_dc2.port, &fast);
    site_config(dir, "dc2", "dc1", "secondary", p2, to_dc1.port, &fast);
    unpace(&[&to_dc2, &to_dc1])?;
    dc2.restart();
    phase("the secondary restarted unpaced");
    let out = admin(bin, dir, "promote", "dc2", &dc2, &["--force", "--reason", "benchmark failover"]).output()?;
    if !out.status.success() {
        bail!("promote failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    phase("promoted");
    dc1.start_again();
    phase("the old primary restarted");
    let copied = wait_failback(bin, dir, &dc2)?;
    phase("failback done");
    let (end2, log2) = dc2.stop();
    phase("the new primary stopped");
    let (end1, log1) = dc1.stop();
    phase("the old primary stopped");
    if !end1.success() || !end2.success() {
        bail!("a site did not stop cleanly:\n{log2}\n{log1}");
    }
    // Nothing may be lost, whatever the mode: after the failback both images are the same.
    let compare = tool("qemu-img", "qemu-utils")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(dir.join("dc1.img"))
        .arg(dir.join("dc2.img"))
        .output()?;
    if !compare.status.success() {
        bail!("after the failback the images differ: {}", String::from_utf8_lossy(&compare.stdout));
    }
    phase("images compared");
    Ok((fio, Replica { link_mib_s, writes, hits, record_bytes, debt_bytes, failback_bytes: copied }))
}

/// Bytes the relay has delivered in its forward direction (towards the secondary).
fn forward_bytes(emu: &WanEmu) -> Result<u64> {
    let status = emu.command("status");
    let forward = status.split("forward:").nth(1).context("no forward counters in wan-emu status")?;
    let bytes = forward.split_whitespace().find_map(|w| w.strip_prefix("bytes=")).context("no bytes= in wan-emu status")?;
    Ok(bytes.parse()?)
}

fn unpace(emus: &[&WanEmu]) -> Result<()> {
    for emu in emus {
        let answer = emu.command("rate-mbps 0");
        if !answer.starts_with("ok") {
            bail!("wan-emu refused to lift its rate cap: {answer}");
        }
    }
    Ok(())
}

/// Follows the failback on the promoted site until it has drained onto the old primary, and
/// returns the bytes it copied. A poll of another process's status, with a deadline.
fn wait_failback(bin: &Path, dir: &Path, promoted: &Site) -> Result<u64> {
    // A failed status query ends the wait at once (Ok(Err)); an unfinished failback polls on.
    let done = geomirror_tests::wait::within(Duration::from_secs(600), Duration::from_millis(200), || {
        let s = match status(bin, dir, "dc2", promoted) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let v = &s["volumes"][0];
        if v["link_up"] == true && v["drained"] == true && v["resync_in_progress"] == false {
            Ok(v["resync_bytes_copied"].as_u64().context("resync_bytes_copied"))
        } else {
            Err(s)
        }
    });
    match done {
        Ok(copied) => copied,
        Err(s) => bail!("the failback did not finish within ten minutes: {s}"),
    }
}

fn admin(bin: &Path, dir: &Path, command: &str, name: &str, site: &Site, extra: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.arg(command)
        .arg("--config")
        .arg(dir.join(format!("{name}.toml")))
        .args(["--address", &site.admin.expect("an admin API").to_string()])
        .arg("--token-file")
        .arg(dir.join("token"))
        .args(extra);
    c
}

fn status(bin: &Path, dir: &Path, name: &str, site: &Site) -> Result<serde_json::Value> {
    let out = run_ok(&mut admin(bin, dir, "status", name, site, &["--json"]));
    Ok(serde_json::from_str(&out)?)
}

pub fn human(bytes: u64) -> String {
    let mib = bytes as f64 / (1 << 20) as f64;
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.1} MiB")
    }
}

/// Microseconds as milliseconds, or "-" when the client does not measure latency.
fn ms(us: f64) -> String {
    if us.is_nan() {
        "-".into()
    } else if us < 10_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.0} ms", us / 1000.0)
    }
}

/// The row of `system` on the same job and RTT as `r`.
fn peer_row<'a>(rows: &'a [Row], r: &Row, system: System) -> Option<&'a Row> {
    let rtt = if system.mode().is_some() { r.rtt_ms } else { None };
    rows.iter().find(|a| a.system == system && a.rtt_ms == rtt && a.job == r.job)
}

pub fn markdown(rows: &[Row], jobs: &[Job], o: &Options) -> String {
    let mut t = String::from(
        "| RTT | job | system | MiB/s | link MiB/s | IOPS | p50 | p99 | vs async: p50 / p99 / MiB/s | hits | record | debt | failback copied | of volume |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let vs = match peer_row(rows, r, System::Async) {
            Some(a) if r.system != System::Async && r.rtt_ms.is_some() => {
                let ratio = |x: f64, y: f64| if x.is_nan() || y.is_nan() { "-".to_string() } else { format!("{:.2}x", x / y) };
                format!(
                    "{} / {} / {}",
                    ratio(r.fio.p50_us, a.fio.p50_us),
                    ratio(r.fio.p99_us, a.fio.p99_us),
                    ratio(r.fio.mib_s, a.fio.mib_s)
                )
            }
            _ => "-".into(),
        };
        let rep = match &r.replica {
            Some(p) => format!(
                "{:.1} | {:.1}% | {} | {} | {} | {:.2}%",
                p.link_mib_s,
                100.0 * p.hit_ratio(),
                human(p.record_bytes),
                human(p.debt_bytes),
                human(p.failback_bytes),
                100.0 * p.failback_bytes as f64 / o.volume_bytes as f64
            ),
            None => "- | - | - | - | - | -".into(),
        };
        let (link, rest) = rep.split_once(" | ").expect("two or more cells");
        let iops = if r.fio.iops.is_nan() { "-".into() } else { format!("{:.0}", r.fio.iops) };
        t += &format!(
            "| {} | {} | {} | {:.1} | {link} | {iops} | {} | {} | {vs} | {rest} |\n",
            r.rtt_ms.map_or("-".into(), |r| format!("{r} ms")),
            jobs[r.job].name,
            r.system.name(),
            r.fio.mib_s,
            ms(r.fio.p50_us),
            ms(r.fio.p99_us),
        );
    }
    t
}

/// The targets of docs/benchmarks.md, each marked met or not met from these rows.
pub fn targets(rows: &[Row], jobs: &[Job], o: &Options) -> String {
    let mut out = String::new();
    let mut line = |what: String, met: bool| out += &format!("- {} **{}**\n", what, if met { "met" } else { "NOT met" });
    for r in rows.iter().filter(|r| r.system == System::NoPeer) {
        let Some(q) = peer_row(rows, r, System::QemuNbd) else { continue };
        let ratio = r.fio.mib_s / q.fio.mib_s;
        line(format!("{}: no peer {ratio:.2}x qemu-nbd's throughput (target ≥ 1.0x)", jobs[r.job].name), ratio >= 1.0);
    }
    for r in rows.iter().filter(|r| r.system == System::Predictive && r.rtt_ms == Some(50) && jobs[r.job].targeted) {
        let Some(a) = peer_row(rows, r, System::Async) else { continue };
        let (p50, p99, tput) = (r.fio.p50_us / a.fio.p50_us, r.fio.p99_us / a.fio.p99_us, r.fio.mib_s / a.fio.mib_s);
        let name = &jobs[r.job].name;
        line(format!("{name}, 50 ms: predictive p50 {p50:.2}x async (target ≤ 1.1x)"), p50 <= 1.1);
        line(format!("{name}, 50 ms: predictive p99 {p99:.2}x async (target ≤ 1.5x)"), p99 <= 1.5);
        line(format!("{name}, 50 ms: predictive throughput {tput:.2}x async (target ≥ 0.95x)"), tput >= 0.95);
    }
    let cap_mib_s = o.rate_mbps as f64 * 1e6 / 8.0 / (1 << 20) as f64;
    for r in rows.iter().filter(|r| {
        r.system == System::Async && jobs[r.job].sequential && jobs[r.job].link_share.is_none() && r.rtt_ms.is_some_and(|t| t > 0)
    }) {
        let Some(p) = &r.replica else { continue };
        let share = p.link_mib_s / cap_mib_s;
        let rtt = r.rtt_ms.unwrap_or(0);
        line(
            format!(
                "async {}, {rtt} ms: the link carried {:.0}% of its {} Mbit/s (target ≥ 90%)",
                jobs[r.job].name,
                100.0 * share,
                o.rate_mbps
            ),
            share >= 0.9,
        );
    }
    for r in rows.iter().filter(|r| r.system == System::Predictive) {
        let Some(p) = &r.replica else { continue };
        let share = p.failback_bytes as f64 / o.volume_bytes as f64;
        let within_record = p.failback_bytes <= p.record_bytes.max(p.debt_bytes);
        line(
            format!(
                "predictive {}, {} ms: failback copied {} = {:.1}% of the volume, record {} (target ≤ record, ≤ 5%)",
                jobs[r.job].name,
                r.rtt_ms.unwrap_or(0),
                human(p.failback_bytes),
                100.0 * share,
                human(p.record_bytes)
            ),
            within_record && share <= 0.05,
        );
    }
    out
}
