//! The record-update round trip, idle and under saturating bulk writes.
//!
//! Two `geomirror run` processes in predictive mode, with `geomirror wan-emu` between them
//! capping the rate and adding the delay. A probe (fio, 4 KiB at queue depth 1, paced) writes
//! each time to a new extent more than a stream's stride away from the last, in a region no
//! earlier probe or prediction reached, so every probe is a miss: its latency is one record
//! update's round trip plus the local write. In the loaded phase fio also writes 1 MiB
//! sequentially at queue depth 8 at the link's full rate, above the paced share, so bulk
//! data waits to cross the whole time. The lag grows by the difference but stays below
//! `max_lag_bytes`: beyond it every host write is held back by design (`on_lag_full =
//! throttle`), and the probes would measure that rather than the record path.
//!
//! What this shows: bulk pacing (`[link] bulk_pace_percent`) keeps the path's queue short,
//! so a record update does not queue behind bulk. The figure to compare is the loaded p99
//! against the idle median.

use anyhow::{Context, Result};
use geomirror_tests::pair::{two_sites, PairOptions, WanEmu};
use geomirror_tests::site::{run_ok, tool};
use std::path::Path;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Bulk writes go to the first 4 GiB; the probes' regions follow.
const BULK_REGION: u64 = 4 * GIB;
/// From one probe to the next: more than the stream detector's largest stride (64 extents
/// of 1 MiB) and than the secondary's prediction after a miss, so no probe is predicted.
const PROBE_STRIDE: u64 = 80 * MIB;
/// Bulk writes start this long before the first probe, so the lag is full when it goes.
const RAMP_SECS: u64 = 4;

pub struct Options {
    pub rtt_ms: u64,
    pub rate_mbps: u64,
    pub probes: u64,
    pub probe_iops: u64,
    pub rounds: usize,
    pub pace_percent: u64,
}

#[derive(Default)]
struct Phase {
    /// Probe completion latencies, in microseconds, from every round.
    probe_us: Vec<f64>,
    bulk_mib_s: Vec<f64>,
}

/// Where the two sites' files live. On one machine both sites share a disk, and the
/// primary's writeback then stalls the secondary's synced RocksDB writes: on ext4 with
/// `data=ordered` an fsync commits the filesystem's journal, which first writes out every
/// file's newly allocated dirty data, the other site's included. Two datacenters do not
/// share a disk, so the second layout gives the primary its own (tmpfs stands in for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// Both sites' media and stores on the same disk.
    Shared,
    /// The primary's media on tmpfs; the secondary's media and store on the disk.
    Separate,
}

impl Layout {
    fn describe(self) -> &'static str {
        match self {
            Layout::Shared => "one disk for both sites",
            Layout::Separate => "primary's media on its own (tmpfs)",
        }
    }
}

struct Outcome {
    layout: Layout,
    idle: Phase,
    loaded: Phase,
    wan: String,
}

pub fn run(bin: &Path, o: &Options, layouts: &[Layout], markdown: bool) -> Result<()> {
    let bdp = queue_bytes(o);
    eprintln!(
        "record-rtt: predictive mode, {} ms RTT, {} Mbit/s with a {} KiB queue, bulk paced at {}%; {} round(s) of {} probes at {}/s, idle and loaded",
        o.rtt_ms,
        o.rate_mbps,
        bdp >> 10,
        o.pace_percent,
        o.rounds,
        o.probes,
        o.probe_iops
    );
    let mut outcomes = Vec::new();
    for layout in layouts {
        eprintln!("{}:", layout.describe());
        outcomes.push(run_layout(bin, o, *layout)?);
    }
    print(o, &outcomes, markdown);
    Ok(())
}

/// A queue of one bandwidth-delay product at the emulated bottleneck (at least 256 KiB), as
/// a well-configured router's would be.
fn queue_bytes(o: &Options) -> u64 {
    (o.rate_mbps * 1_000_000 / 8 * o.rtt_ms / 1000).max(256 << 10)
}

fn run_layout(bin: &Path, o: &Options, layout: Layout) -> Result<Outcome> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let runs = 2 * o.rounds as u64;
    let region = o.probes * PROBE_STRIDE;
    let size = (BULK_REGION + runs * region).div_ceil(GIB) * GIB;
    let options = PairOptions {
        link: format!("bandwidth_mbps = {}\nrtt_ms = {}\nbulk_pace_percent = {}\n", o.rate_mbps, o.rtt_ms, o.pace_percent),
        replication: "[replication]\nmode = \"predictive\"\nmax_lag_bytes = \"256M\"\n".into(),
        size: size.to_string(),
        wan: ["--rtt-ms", &o.rtt_ms.to_string(), "--rate-mbps", &o.rate_mbps.to_string(), "--queue-bytes", &queue_bytes(o).to_string()]
            .map(String::from)
            .to_vec(),
        ..PairOptions::default()
    };
    // The primary's media path is a link to a file on tmpfs, created by the site.
    let shm = match layout {
        Layout::Shared => None,
        Layout::Separate => {
            let shm = tempfile::Builder::new().prefix("geomirror-bench").tempdir_in("/dev/shm").context("a directory on /dev/shm")?;
            std::os::unix::fs::symlink(shm.path().join("dc1.img"), dir.join("dc1.img"))?;
            Some(shm)
        }
    };
    let (primary, secondary, emu) = two_sites(bin, dir, &options);
    let url = primary.url("vol0").to_owned();

    let mut idle = Phase::default();
    let mut loaded = Phase::default();
    let mut run = 0;
    for round in 0..o.rounds {
        // Alternate which phase goes first.
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        for with_bulk in order {
            let offset = BULK_REGION + run * region;
            run += 1;
            let dropped_before = forward_drops(&emu);
            let (probe, bulk) = fio_phase(dir, &url, o, offset, with_bulk)?;
            let dropped = forward_drops(&emu) - dropped_before;
            let phase = if with_bulk { &mut loaded } else { &mut idle };
            eprintln!(
                "  round {} {:<6}: probes p50 {:>6.1} ms  p99 {:>6.1} ms{}  ({dropped} datagrams dropped at the emulated queue)",
                round + 1,
                if with_bulk { "loaded" } else { "idle" },
                percentile(&probe, 50.0) / 1000.0,
                percentile(&probe, 99.0) / 1000.0,
                bulk.map_or(String::new(), |b| format!("  bulk {b:.1} MiB/s"))
            );
            phase.probe_us.extend(probe);
            phase.bulk_mib_s.extend(bulk);
        }
    }
    let wan = emu_status(&emu);
    drop((primary, secondary, emu));
    drop(shm);
    Ok(Outcome { layout, idle, loaded, wan })
}

/// Runs the probe (and, loaded, the bulk job) as one fio invocation; returns the probes'
/// latencies and the bulk job's throughput.
fn fio_phase(dir: &Path, url: &str, o: &Options, offset: u64, with_bulk: bool) -> Result<(Vec<f64>, Option<f64>)> {
    let probe_secs = o.probes.div_ceil(o.probe_iops);
    let mut job = format!(
        "[global]\nioengine=nbd\nuri={url}\n\n\
         [probe]\nrw=write:{skip}\nbs=4k\niodepth=1\noffset={offset}\nsize={size}\nrate_iops={iops}\nnumber_ios={n}\n\
         write_lat_log=probe\nlog_avg_msec=0\n",
        skip = PROBE_STRIDE - 4096,
        size = o.probes * PROBE_STRIDE,
        iops = o.probe_iops,
        n = o.probes,
    );
    if with_bulk {
        job = job.replace("[probe]\n", &format!("[probe]\nstartdelay={RAMP_SECS}\n"));
        job.push_str(&format!(
            "\n[bulk]\nrw=write\nbs=1m\niodepth=8\noffset=0\nsize={BULK_REGION}\nrate={}\ntime_based\nramp_time={RAMP_SECS}\nruntime={}\n",
            o.rate_mbps * 1_000_000 / 8,
            probe_secs + 1
        ));
    }
    for log in ["probe_lat.1.log", "probe_clat.1.log", "probe_slat.1.log"] {
        let _ = std::fs::remove_file(dir.join(log));
    }
    let file = dir.join("phase.fio");
    std::fs::write(&file, job)?;
    let out = run_ok(tool("fio", "fio").current_dir(dir).args(["--output-format=json"]).arg(&file));
    let json: serde_json::Value = serde_json::from_str(&out[out.find('{').context("no JSON from fio")?..])?;
    let bulk = with_bulk.then(|| {
        json["jobs"].as_array().into_iter().flatten().find(|j| j["jobname"] == "bulk").and_then(|j| j["write"]["bw_bytes"].as_f64())
    });
    let bulk = bulk.map(|b| b.context("no bulk figures from fio")).transpose()?.map(|b| b / MIB as f64);
    // write_lat_log: one line per I/O, "msec, latency_ns, direction, bs, offset, ...".
    let log = std::fs::read_to_string(dir.join("probe_lat.1.log")).context("fio's probe latency log")?;
    let lat: Vec<f64> =
        log.lines().filter_map(|l| l.split(',').nth(1)).filter_map(|v| v.trim().parse::<f64>().ok()).map(|ns| ns / 1000.0).collect();
    anyhow::ensure!(lat.len() as u64 == o.probes, "{} probe latencies logged, {} expected", lat.len(), o.probes);
    Ok((lat, bulk))
}

/// Datagrams towards the secondary that the emulated bottleneck's queue dropped so far.
fn forward_drops(emu: &WanEmu) -> u64 {
    let status = emu_status(emu);
    let forward = status.split("| backward").next().unwrap_or_default();
    forward.split_whitespace().find_map(|w| w.strip_prefix("queue_dropped=")).and_then(|n| n.parse().ok()).unwrap_or(0)
}

fn emu_status(emu: &WanEmu) -> String {
    emu.command("status").trim().to_owned()
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn print(o: &Options, outcomes: &[Outcome], markdown: bool) {
    let link_mib_s = o.rate_mbps as f64 * 1e6 / 8.0 / MIB as f64;
    let ms = |v: f64| format!("{:.1}", v / 1000.0);
    let header = ["layout", "phase", "probes", "p50 ms", "p99 ms", "max ms", "bulk writes", "p99 / idle p50"];
    let mut lines: Vec<[String; 8]> = Vec::new();
    let mut verdicts = Vec::new();
    for out in outcomes {
        let base = percentile(&out.idle.probe_us, 50.0);
        let bulk = out.loaded.bulk_mib_s.iter().sum::<f64>() / out.loaded.bulk_mib_s.len().max(1) as f64;
        let rows = [
            ("idle", &out.idle, String::from("-")),
            ("saturating sequential writes", &out.loaded, format!("{bulk:.1} MiB/s ({:.0}% of the link)", 100.0 * bulk / link_mib_s)),
        ];
        for (name, p, bulk) in rows {
            lines.push([
                out.layout.describe().to_string(),
                name.to_string(),
                p.probe_us.len().to_string(),
                ms(percentile(&p.probe_us, 50.0)),
                ms(percentile(&p.probe_us, 99.0)),
                ms(percentile(&p.probe_us, 100.0)),
                bulk,
                format!("{:.2}x", percentile(&p.probe_us, 99.0) / base),
            ]);
        }
        let ratio = percentile(&out.loaded.probe_us, 99.0) / base;
        verdicts.push(format!(
            "{}: loaded p99 / idle p50 = {ratio:.2}x (target at most 1.3x: {})",
            out.layout.describe(),
            if ratio <= 1.3 { "met" } else { "not met" }
        ));
    }
    if markdown {
        println!("| {} |", header.join(" | "));
        println!("|{}", "---|".repeat(header.len()));
        for l in &lines {
            println!("| {} |", l.join(" | "));
        }
        println!();
        for v in &verdicts {
            println!("- {v}");
        }
        println!();
        println!("{} ms RTT, {} Mbit/s, bulk paced at {}%. wan-emu at the end of each layout:", o.rtt_ms, o.rate_mbps, o.pace_percent);
        println!();
        for out in outcomes {
            println!("- {}: `{}`", out.layout.describe(), out.wan);
        }
    } else {
        let widths: Vec<usize> =
            (0..header.len()).map(|i| lines.iter().map(|l| l[i].len()).chain([header[i].len()]).max().unwrap_or(0)).collect();
        let row = |cells: Vec<&str>| cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ");
        println!("{}", row(header.to_vec()));
        for l in &lines {
            println!("{}", row(l.iter().map(String::as_str).collect()));
        }
        for v in &verdicts {
            println!("{v}");
        }
        for out in outcomes {
            println!("wan-emu, {}: {}", out.layout.describe(), out.wan);
        }
    }
}
