//! geomirror-bench: side-by-side measurements with real clients, as docs/benchmarks.md describes.
//!
//! `geomirror-bench nbd` runs the same fio jobs (ioengine=nbd) against qemu-nbd serving a
//! file and against `geomirror run` with no peer serving an identical file, interleaved
//! round by round so that both see the same machine, and prints throughput ratios and
//! p50/p99 latency side by side; with `--neighbour`, each job again with a CPU-bound process
//! (`stress-ng --cpu 1`) running beside the server for the length of each run.
//!
//! `geomirror-bench record-rtt` measures the record-update round trip on an emulated WAN,
//! idle and under saturating bulk writes (see `record_rtt`).
//!
//! `geomirror-bench modes` compares async, sync and predictive replication over the emulated
//! WAN at several round-trip times, with forced failovers (see `modes`).
//!
//! `geomirror-bench detect` measures how long a secondary takes to notice a primary killed
//! with `kill -9`, idle, under load and on slow or congested links (see `detect`).
//!
//! Timings live here, never in pass/fail tests.

mod detect;
mod modes;
mod plot;
mod record_rtt;
mod report;
mod sync;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use geomirror_tests::site::{run_ok, tool, Site};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

#[derive(Parser)]
#[command(name = "geomirror-bench", about = "Benchmarks geomirror against the alternatives with real clients, side by side in one run")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// The NBD front end with no peer against qemu-nbd, on identical files.
    ///
    /// Jobs: sequential 1 MiB writes (queue depth 8), 4 KiB random writes at queue depth 1
    /// and 32. Each round runs every job on both servers, alternating which goes first; the
    /// table shows the median over rounds. Dirty pages are synced between runs so each run
    /// starts from the same page-cache state.
    ///
    /// With --neighbour, each job also gets a row run beside a CPU-bound neighbour:
    /// `stress-ng --cpu 1` (Debian's stress-ng) runs for the length of each fio run, on both
    /// servers alike, as a storage daemon shares its host with the workloads it serves.
    Nbd {
        /// Seconds per fio run.
        #[arg(long, default_value_t = 10)]
        runtime: u64,
        /// Rounds per job (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Volume size (both files).
        #[arg(long, default_value = "1G")]
        size: String,
        /// The geomirror binary (default: next to this one).
        #[arg(long)]
        geomirror: Option<PathBuf>,
        /// Print the table as Markdown (for docs/benchmarks.md).
        #[arg(long)]
        markdown: bool,
        /// Run only the jobs whose name contains this text (e.g. "QD1"); repeatable.
        #[arg(long)]
        only: Vec<String>,
        /// Also run each job beside a CPU-bound neighbour (`stress-ng --cpu 1`), as a row of
        /// its own.
        #[arg(long)]
        neighbour: bool,
    },
    /// The record-update round trip, idle and under saturating bulk writes.
    ///
    /// Two sites in predictive mode over `geomirror wan-emu` with a rate cap. A probe writes
    /// 4 KiB at queue depth 1 to a new extent each time, far from the last (every probe is a
    /// miss, so its latency is a record-update round trip plus the local write), first alone,
    /// then while fio writes 1 MiB sequentially at queue depth 8 at the link's full rate, so
    /// bulk data waits to cross the whole time. Rounds alternate the two phases. The target: p99 under load at most 1.3x
    /// the idle round trip (the idle probes' median).
    RecordRtt {
        /// The emulated round-trip time.
        #[arg(long, default_value_t = 50)]
        rtt_ms: u64,
        /// The emulated link's rate, and the sites' `[link] bandwidth_mbps`.
        #[arg(long, default_value_t = 100)]
        rate_mbps: u64,
        /// Probes per phase and round (at --probe-iops).
        #[arg(long, default_value_t = 150)]
        probes: u64,
        /// Probes per second (each is one 4 KiB write at queue depth 1).
        #[arg(long, default_value_t = 10)]
        probe_iops: u64,
        /// Rounds of one idle and one loaded phase each.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// The sites' `[link] bulk_pace_percent`: 100 shows what happens without headroom.
        #[arg(long, default_value_t = 92)]
        pace_percent: u64,
        /// Disk layouts to run, each with its own pair of sites (default: both).
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = [record_rtt::Layout::Shared, record_rtt::Layout::Separate])]
        layout: Vec<record_rtt::Layout>,
        /// The geomirror binary (default: next to this one).
        #[arg(long)]
        geomirror: Option<PathBuf>,
        /// Print the table as Markdown (for docs/benchmarks.md).
        #[arg(long)]
        markdown: bool,
    },
    /// The initial sync of an adopted volume that holds data, onto a blank or a seeded
    /// secondary, over wan-emu: wire bytes against what must cross, time against the link's
    /// floor, link use. With --docs, the table goes into docs/benchmarks.md's `sync` section.
    Sync {
        /// The volume's size (a multiple of 4 MiB).
        #[arg(long, default_value = "4G", value_parser = geomirror_node::config::parse_size)]
        size: u64,
        /// Share of the volume allocated (runs of random data; the rest are holes).
        #[arg(long, default_value_t = 25)]
        allocated_percent: u64,
        /// Seeded case: per mille of the allocated 4 KiB blocks that differ on the copy.
        #[arg(long, default_value_t = 10)]
        seeded_diff_permille: u64,
        #[arg(long, default_value_t = 50)]
        rtt_ms: u64,
        #[arg(long, default_value_t = 100)]
        rate_mbps: u64,
        /// Cases to run.
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = [sync::Case::Blank, sync::Case::Seeded])]
        case: Vec<sync::Case>,
        /// Write the table into this file's `sync` section (docs/benchmarks.md).
        #[arg(long)]
        docs: Option<PathBuf>,
        /// The geomirror binary (default: the release build beside this one).
        #[arg(long)]
        geomirror: Option<PathBuf>,
    },
    /// Failure detection: from a `kill -9` of the primary to the secondary reporting the link
    /// down, over fresh `geomirror demo` pairs.
    ///
    /// Scenarios: idle; fio writing 1 MiB sequentially at queue depth 8 flat out; the same on
    /// a slow link (1 Mbit/s, configured so); and on a congested one (wan-emu throttled to
    /// 1 Mbit/s at run time). The moment is the secondary's `replication session down` log
    /// line; a status poll every 50 ms bounds it. Target: at most the idle timeout (3 s in the
    /// demo) + 1 s. With --docs, the table goes into docs/benchmarks.md's `detect` section.
    Detect {
        /// Kills per scenario (median and max are reported).
        #[arg(long, default_value_t = 10)]
        kills: usize,
        /// Scenarios to run.
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = [detect::Scenario::Idle, detect::Scenario::Load, detect::Scenario::Slow, detect::Scenario::Congested])]
        scenario: Vec<detect::Scenario>,
        /// The emulated round-trip time.
        #[arg(long, default_value_t = 20)]
        rtt_ms: u64,
        /// The emulated link's rate, and the sites' `[link] bandwidth_mbps` (not for `slow`).
        #[arg(long, default_value_t = 100)]
        rate_mbps: u64,
        /// Seconds of writes before each kill.
        #[arg(long, default_value_t = 10)]
        load_s: u64,
        /// Where the demos' directories go (default: the system's temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The demos' `--port-base` (NBD at BASE+130); default: free ports.
        #[arg(long)]
        port_base: Option<u16>,
        /// Write the table into this page's `detect` section (e.g. docs/benchmarks.md).
        #[arg(long)]
        docs: Option<PathBuf>,
        /// The geomirror binary (default: next to this one).
        #[arg(long)]
        geomirror: Option<PathBuf>,
    },
    /// Every system side by side: qemu-nbd, geomirror with no peer, and geomirror in async,
    /// sync and predictive modes over the emulated WAN.
    ///
    /// Workloads, each on every system: fio (ioengine=nbd) sequential 1 MiB writes, 4 KiB
    /// random writes (uniform and zipf:1.2), at queue depth 1 and 32, flat out, and for the
    /// targeted ones also at half the link's rate (fio's first seconds are ramp, not
    /// measured); qemu-img convert of an
    /// ext4 image built from /usr/share/doc; two synthetic block traces (one written as a
    /// CloudPhysics CSV, one as an MSR Cambridge CSV, read back and replayed by fio from an
    /// iolog at queue depth 8), and any trace given with --trace.
    ///
    /// Each replicated row gets a fresh pair of sites, runs the workload, reads the primary's
    /// status (hits, record, failback debt), then forces a failover (kill -9, promote --force)
    /// and follows the failback to the end; the images must then compare equal. Prints the
    /// table and the targets docs/benchmarks.md states, met or not, and (unless --quick) writes them with
    /// the machine's description and a plot of p99 latency against RTT into
    /// docs/benchmarks.md and docs/benchmarks-modes.svg (--warm: the page's warm section).
    ///
    /// Examples:
    ///   tests/bench/run modes                     the full run (about an hour)
    ///   tests/bench/run modes --quick             a look in under five minutes
    ///   tests/bench/run modes --warm              the targeted jobs on a warm record
    ///   tests/bench/run modes --only zipf --rtt-ms 50 --mode async,predictive
    ///   tests/bench/run modes --trace msr:hm_0.csv --only hm_0
    #[command(verbatim_doc_comment)]
    Modes {
        /// Round-trip times to emulate, in ms.
        #[arg(long, value_delimiter = ',', default_values_t = [0, 10, 50])]
        rtt_ms: Vec<u64>,
        /// Systems to run.
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = [modes::System::QemuNbd, modes::System::NoPeer, modes::System::Async, modes::System::Sync, modes::System::Predictive])]
        mode: Vec<modes::System>,
        /// Run only the jobs whose name contains this text (e.g. "zipf"); repeatable.
        #[arg(long)]
        only: Vec<String>,
        /// Also replay this block trace: cloudphysics:FILE (timestamp,op,size,lba) or msr:FILE
        /// (MSR Cambridge CSV). Its writes are folded into the volume. Repeatable.
        #[arg(long, value_parser = modes::parse_trace_arg)]
        trace: Vec<modes::TraceArg>,
        /// Seconds per fio run (a trace replay stops there too). Default: 10; 6 with --quick,
        /// 30 with --warm.
        #[arg(long)]
        runtime: Option<u64>,
        /// Seconds each fio job runs before measuring starts, on top of --runtime, alike for
        /// every system (default: a third of the runtime, 1 to 3 s; 120 with --warm). A record starts empty
        /// with each row's fresh sites: a long ramp measures a warm record, the steady state
        /// of a site that has been running, instead of its first seconds.
        #[arg(long)]
        ramp: Option<u64>,
        /// The emulated link's rate, and the sites' `[link] bandwidth_mbps`.
        #[arg(long, default_value_t = 100)]
        rate_mbps: u64,
        /// Volume size.
        #[arg(long, default_value = "1G")]
        size: String,
        /// An extra `[replication]` setting for the replicated systems, as TOML, e.g.
        /// `--replication clean_generation_max_age_ms=0`; repeatable. For trying a setting,
        /// not for the published run.
        #[arg(long, value_name = "KEY=VALUE")]
        replication: Vec<String>,
        /// The sites' `[replication] max_lag_bytes`: how far shipping may fall behind before
        /// the host is throttled. A failback copies at least what was unapplied, so the
        /// default is 1/32 of the volume, under the 5% failback target.
        #[arg(long)]
        max_lag: Option<String>,
        /// A quick look in under five minutes: RTT 50 ms; async and predictive; sequential
        /// and Zipf at QD32, flat out and at half the link's rate; 6 s each; a 256 MiB
        /// volume. Writes no docs unless --docs is given.
        #[arg(long)]
        quick: bool,
        /// The steady state of sites that have been running: the jobs the targets name, at
        /// RTT 50 ms, async and predictive, each measured for 30 s after a 120 s ramp (about
        /// 35 minutes). Written into the page's `warm` section.
        #[arg(long, conflicts_with = "quick")]
        warm: bool,
        /// The page to write the results into (between its BEGIN/END markers of --section);
        /// the plot goes beside it as benchmarks-SECTION.svg. Default: docs/benchmarks.md,
        /// except with --quick.
        #[arg(long)]
        docs: Option<PathBuf>,
        /// Which section of the page the run replaces. Default: `modes`, which holds the full
        /// run; `warm` with --warm.
        #[arg(long, value_parser = parse_section)]
        section: Option<String>,
        /// Print the primary's whole status (JSON) after each replicated job.
        #[arg(long)]
        verbose: bool,
        /// Print only; write no docs.
        #[arg(long, conflicts_with = "docs")]
        no_docs: bool,
        /// The geomirror binary (default: next to this one).
        #[arg(long)]
        geomirror: Option<PathBuf>,
    },
}

struct Job {
    name: &'static str,
    args: &'static [&'static str],
}

const JOBS: &[Job] = &[
    Job { name: "sequential 1 MiB writes, QD8", args: &["--rw=write", "--bs=1m", "--iodepth=8"] },
    Job { name: "random 4 KiB writes, QD1", args: &["--rw=randwrite", "--bs=4k", "--iodepth=1"] },
    Job { name: "random 4 KiB writes, QD32", args: &["--rw=randwrite", "--bs=4k", "--iodepth=32"] },
];

#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    mib_s: f64,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Bench::Nbd { runtime, rounds, size, geomirror, markdown, only, neighbour } => {
            let bin = geomirror_bin(geomirror)?;
            let jobs: Vec<&Job> = JOBS.iter().filter(|j| only.is_empty() || only.iter().any(|o| j.name.contains(o.as_str()))).collect();
            if jobs.is_empty() {
                bail!("no job matches {only:?}; the jobs are: {}", JOBS.iter().map(|j| j.name).collect::<Vec<_>>().join(", "));
            }
            let neighbours: &[bool] = if neighbour { &[false, true] } else { &[false] };
            nbd(&bin, &jobs, neighbours, runtime, rounds.max(1), &size, markdown)
        }
        Bench::RecordRtt { rtt_ms, rate_mbps, probes, probe_iops, rounds, pace_percent, layout, geomirror, markdown } => {
            let bin = geomirror_bin(geomirror)?;
            let o = record_rtt::Options { rtt_ms, rate_mbps, probes, probe_iops: probe_iops.max(1), rounds: rounds.max(1), pace_percent };
            record_rtt::run(&bin, &o, &layout, markdown)
        }
        Bench::Sync { size, allocated_percent, seeded_diff_permille, rtt_ms, rate_mbps, case, docs, geomirror } => {
            let bin = geomirror_bin(geomirror)?;
            if let Some(d) = &docs {
                report::check_docs(d, "sync")?;
            }
            let scratch = tempfile::tempdir()?;
            let machine = report::machine(scratch.path());
            let o = sync::Options { size_bytes: size, allocated_percent, seeded_diff_permille, rtt_ms, rate_mbps };
            let started = std::time::Instant::now();
            let rows = sync::run(&bin, &o, &case)?;
            let table = sync::markdown(&rows, &o);
            println!("{table}");
            if let Some(doc) = docs {
                report::publish(&doc, "sync", started, "", &machine, &table)?;
            }
            Ok(())
        }
        Bench::Detect { kills, scenario, rtt_ms, rate_mbps, load_s, dir, port_base, docs, geomirror } => {
            let bin = geomirror_bin(geomirror)?;
            if let Some(d) = &docs {
                report::check_docs(d, "detect")?;
            }
            let scratch = tempfile::tempdir()?;
            let machine = report::machine(scratch.path());
            let o = detect::Options { kills: kills.max(1), scenarios: scenario, rtt_ms, rate_mbps, load_s, dir, port_base };
            let started = std::time::Instant::now();
            let rows = detect::run(&bin, &o)?;
            let table = detect::markdown(&rows);
            println!("{table}");
            if let Some(doc) = docs {
                let setup = format!(
                    ", `geomirror demo` at {rtt_ms} ms RTT, {rate_mbps} Mbit/s, `idle_timeout_ms` 3000, `keep_alive_ms` 500, {load_s} s of writes before each kill"
                );
                report::publish(&doc, "detect", started, &setup, &machine, &table)?;
            }
            Ok(())
        }
        Bench::Modes {
            rtt_ms,
            mode,
            only,
            trace,
            runtime,
            ramp,
            rate_mbps,
            size,
            replication,
            max_lag,
            quick,
            warm,
            docs,
            section,
            no_docs,
            verbose,
            geomirror,
        } => {
            let bin = geomirror_bin(geomirror)?;
            let size = if quick && size == "1G" { "256M".to_string() } else { size };
            let volume_bytes = geomirror_node::config::parse_size(&size).map_err(anyhow::Error::msg)?;
            let max_lag_bytes = match max_lag {
                Some(l) => geomirror_node::config::parse_size(&l).map_err(|e| anyhow::anyhow!("--max-lag: {e}"))?,
                None => (volume_bytes / 32).max(1 << 20),
            };
            // Both presets compare the modes the targets name, at the RTT they name.
            let target_modes = [modes::System::Async, modes::System::Predictive];
            let preset = quick || warm;
            let o = modes::Options {
                rtts_ms: if preset { vec![50] } else { rtt_ms },
                systems: if preset { mode.into_iter().filter(|m| target_modes.contains(m)).collect() } else { mode },
                only: if warm && only.is_empty() { modes::targeted_jobs() } else { only },
                quick,
                traces: trace,
                runtime_s: runtime
                    .unwrap_or(if quick {
                        6
                    } else if warm {
                        30
                    } else {
                        10
                    })
                    .max(1),
                ramp_s: ramp.or(warm.then_some(120)),
                rate_mbps: rate_mbps.max(1),
                volume_bytes,
                max_lag_bytes,
                replication,
                verbose,
            };
            let section = section.unwrap_or_else(|| if warm { "warm" } else { "modes" }.to_string());
            let docs = match (docs, no_docs, quick) {
                (_, true, _) | (None, false, true) => None,
                (Some(d), false, _) => Some(d),
                (None, false, false) => Some(PathBuf::from("docs/benchmarks.md")),
            };
            if let Some(d) = &docs {
                // Fail before an hour of measuring, not after.
                report::check_docs(d, &section)?;
            }
            let scratch = tempfile::tempdir()?;
            // What is measured, taken before measuring: the tree may change during a long run.
            let machine = report::machine(scratch.path());
            let jobs = modes::jobs(&o, scratch.path())?;
            let started = std::time::Instant::now();
            let rows = modes::run(&bin, &o, &jobs)?;
            let table = modes::markdown(&rows, &jobs, &o);
            let targets = modes::targets(&rows, &jobs, &o);
            println!("{table}\n{targets}");
            eprintln!("{} rows in {:.1} min", rows.len(), started.elapsed().as_secs_f64() / 60.0);
            if let Some(doc) = docs {
                // A plot against RTT needs more than one RTT.
                let svg = (o.rtts_ms.len() > 1).then(|| doc.with_file_name(format!("benchmarks-{section}.svg")));
                if let Some(svg) = &svg {
                    plot::p99_against_rtt(svg, &rows, &jobs)?;
                }
                let args: Vec<String> = std::env::args().skip(1).collect();
                let when = std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output()?;
                let body = format!(
                    "Run of {} (`tests/bench/run {}`, {:.0} min), {} MiB volume, {} Mbit/s link, max_lag_bytes {} MiB, {} s per job after a {} s ramp:\n\n{}\n{table}\n{}\n{targets}",
                    String::from_utf8_lossy(&when.stdout).trim(),
                    args.join(" "),
                    started.elapsed().as_secs_f64() / 60.0,
                    o.volume_bytes >> 20,
                    o.rate_mbps,
                    o.max_lag_bytes >> 20,
                    o.runtime_s,
                    o.ramp(),
                    machine,
                    svg.as_ref()
                        .and_then(|s| s.file_name())
                        .map(|n| format!("![p99 write latency against RTT, one line per mode]({})\n", n.to_string_lossy()))
                        .unwrap_or_default(),
                );
                report::write_docs(&doc, &section, &body)?;
                eprintln!("wrote {}{}", doc.display(), svg.map(|s| format!(" and {}", s.display())).unwrap_or_default());
            }
            Ok(())
        }
    }
}

/// A section name fit for a marker and a file name.
fn parse_section(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?}: a section is letters, digits and '-'"))
    }
}

/// The geomirror binary: given, or next to this one.
fn geomirror_bin(given: Option<PathBuf>) -> Result<PathBuf> {
    let bin = match given {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("geomirror"),
    };
    if !bin.is_file() {
        bail!("{} not found: build it with `cargo build --release -p geomirror` (tests/bench does)", bin.display());
    }
    Ok(bin)
}

/// Runs every job on both servers, once for each entry of `neighbours` (false: alone; true:
/// beside a CPU-bound neighbour), and prints a row for each.
fn nbd(bin: &Path, jobs: &[&Job], neighbours: &[bool], runtime: u64, rounds: usize, size: &str, markdown: bool) -> Result<()> {
    if neighbours.contains(&true) {
        // Checked before anything starts: fails loudly, naming the package, if it is missing.
        tool("stress-ng", "stress-ng");
    }
    let bytes = geomirror_node::config::parse_size(size).map_err(anyhow::Error::msg)?;
    let site = Site::start(bin, &format!("[[volume]]\nname = \"vol0\"\nmedia = \"vol0.img\"\nsize = {bytes}\n"));
    let qemu_file = site.path("qemu.img");
    std::fs::File::create(&qemu_file)?.set_len(bytes)?;
    let qemu = QemuNbd::start(&qemu_file)?;
    let servers = [("qemu-nbd", qemu.url.clone()), ("geomirror", site.url("vol0").to_owned())];
    eprintln!(
        "qemu-nbd at {}, geomirror at {}; {} job(s) x {} condition(s) x {} round(s) x {runtime} s each",
        servers[0].1,
        servers[1].1,
        jobs.len(),
        neighbours.len(),
        rounds
    );

    let mut table = Vec::new();
    for job in jobs {
        for &with_neighbour in neighbours {
            let name = if with_neighbour { format!("{}, CPU-bound neighbour", job.name) } else { job.name.to_string() };
            let mut runs: [Vec<Figures>; 2] = [Vec::new(), Vec::new()];
            for round in 0..rounds {
                // Alternate which server goes first, so neither always inherits the other's
                // writeback.
                let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
                for i in order {
                    run_ok(&mut Command::new("sync"));
                    let neighbour = with_neighbour.then(|| Neighbour::start(runtime)).transpose()?;
                    let f = fio(&servers[i].1, job.args, runtime, true, &site.dir)?;
                    drop(neighbour);
                    eprintln!(
                        "  {:<50} {:<10} round {}: {:>8.1} MiB/s  p50 {:>7.1} us  p99 {:>7.1} us",
                        name,
                        servers[i].0,
                        round + 1,
                        f.mib_s,
                        f.p50_us,
                        f.p99_us
                    );
                    runs[i].push(f);
                }
            }
            table.push((name, median(&runs[0]), median(&runs[1])));
        }
    }
    drop(qemu);
    print_table(&table, markdown);
    Ok(())
}

fn median(runs: &[Figures]) -> Figures {
    let pick = |f: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    Figures { mib_s: pick(|f| f.mib_s), iops: pick(|f| f.iops), p50_us: pick(|f| f.p50_us), p99_us: pick(|f| f.p99_us) }
}

fn print_table(rows: &[(String, Figures, Figures)], markdown: bool) {
    let header = ["job", "qemu-nbd MiB/s", "geomirror MiB/s", "ratio", "qemu-nbd p50 / p99 us", "geomirror p50 / p99 us"];
    let lines: Vec<[String; 6]> = rows
        .iter()
        .map(|(name, q, g)| {
            [
                name.clone(),
                format!("{:.1} ({:.0} IOPS)", q.mib_s, q.iops),
                format!("{:.1} ({:.0} IOPS)", g.mib_s, g.iops),
                format!("{:.2}x", g.mib_s / q.mib_s),
                format!("{:.0} / {:.0}", q.p50_us, q.p99_us),
                format!("{:.0} / {:.0}", g.p50_us, g.p99_us),
            ]
        })
        .collect();
    if markdown {
        println!("| {} |", header.join(" | "));
        println!("|{}", "---|".repeat(header.len()));
        for l in &lines {
            println!("| {} |", l.join(" | "));
        }
    } else {
        let widths: Vec<usize> =
            (0..header.len()).map(|i| lines.iter().map(|l| l[i].len()).chain([header[i].len()]).max().unwrap()).collect();
        let row = |cells: Vec<&str>| cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ");
        println!("{}", row(header.to_vec()));
        for l in &lines {
            println!("{}", row(l.iter().map(String::as_str).collect()));
        }
    }
}

/// Runs fio against `url`: for `runtime` seconds when `time_based`, else until the job's I/O
/// is done or `runtime` is up, whichever comes first.
fn fio(url: &str, job: &[&str], runtime: u64, time_based: bool, dir: &Path) -> Result<Figures> {
    let mut cmd = tool("fio", "fio");
    cmd.current_dir(dir)
        .args(["--name=bench", "--ioengine=nbd", &format!("--uri={url}"), "--output-format=json", "--randrepeat=1"])
        .arg(format!("--runtime={runtime}"))
        .args(job);
    if time_based {
        cmd.arg("--time_based");
    }
    let out = run_ok(&mut cmd);
    let json: serde_json::Value = serde_json::from_str(&out[out.find('{').context("no JSON from fio")?..])?;
    let w = &json["jobs"][0]["write"];
    let pct = |p: &str| w["clat_ns"]["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1000.0;
    Ok(Figures {
        mib_s: w["bw_bytes"].as_f64().context("bw_bytes")? / (1 << 20) as f64,
        iops: w["iops"].as_f64().context("iops")?,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}

/// qemu-nbd serving a raw file with its defaults (writeback cache, thread-pool AIO).
struct QemuNbd {
    pid: i32,
    url: String,
}

impl QemuNbd {
    fn start(file: &Path) -> Result<QemuNbd> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let pid_file = file.with_extension("pid");
        // --fork returns once the server is listening, so nothing has to poll for it.
        run_ok(
            tool("qemu-nbd", "qemu-utils")
                .args(["--fork", "--format=raw", "--export-name=vol0", "--bind=127.0.0.1", "--persistent", "--shared=8"])
                .arg(format!("--port={port}"))
                .arg(format!("--pid-file={}", pid_file.display()))
                .arg(file),
        );
        let pid = std::fs::read_to_string(&pid_file)?.trim().parse().context("qemu-nbd pid file")?;
        Ok(QemuNbd { pid, url: format!("nbd://127.0.0.1:{port}/vol0") })
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
}

/// A CPU-bound process beside the servers for the length of one fio run: `stress-ng --cpu 1`,
/// one worker spinning on arithmetic. Stopped (SIGTERM, then reaped) when dropped.
struct Neighbour(Child);

impl Neighbour {
    /// Starts the neighbour for a run of `runtime` seconds. Its own `--timeout` (the run plus
    /// a minute) ends it should this harness die without stopping it.
    fn start(runtime: u64) -> Result<Neighbour> {
        let child = tool("stress-ng", "stress-ng")
            .args(["--cpu", "1", "--quiet", "--timeout"])
            .arg(format!("{}s", runtime + 60))
            .stdout(Stdio::null())
            .spawn()
            .context("starting stress-ng")?;
        Ok(Neighbour(child))
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.0.wait();
    }
}
