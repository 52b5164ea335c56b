//! The method against the alternatives: geomirror in async, sync and predictive modes, two
//! sites over `geomirror wan-emu` at several round-trip times, the same fio jobs on each,
//! one fresh pair of sites per row so that no row inherits another's record.
//!
//! Each row reports what BENCHMARKS.md asks: p50 and p99 write latency, throughput (the host's,
//! and what the emulated link carried towards the secondary meanwhile), the hit ratio (writes acknowledged without a round trip), the record's size and the failback debt
//! when the job ended, and, after a forced failover (`kill -9` of the primary, `geomirror
//! promote --force` of the secondary, the old primary back as secondary), the bytes the
//! failback actually copied against the volume's size. The failback runs over an unpaced link
//! so that a full copy does not take minutes; what it copies does not depend on the rate.

use anyhow::{bail, Context, Result};
use geomirror_tests::pair::{site_config, two_sites_both_ways, PairOptions, WanEmu};
use geomirror_tests::site::{run_ok, tool, Site};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Bearer token of the benchmark's admin calls (sites read it from `token`).
const TOKEN: &str = "geomirror-bench-admin-token-0001";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Async,
    Sync,
    Predictive,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Async => "async",
            Mode::Sync => "sync",
            Mode::Predictive => "predictive",
        }
    }
}

pub struct Job {
    pub name: &'static str,
    /// Sequential or Zipf: the workloads BENCHMARKS.md's latency targets name.
    pub targeted: bool,
    pub sequential: bool,
    pub args: &'static [&'static str],
}

pub const JOBS: &[Job] = &[
    Job { name: "seq 1M QD1", targeted: true, sequential: true, args: &["--rw=write", "--bs=1m", "--iodepth=1"] },
    Job { name: "seq 1M QD32", targeted: true, sequential: true, args: &["--rw=write", "--bs=1m", "--iodepth=32"] },
    Job { name: "rand 4K QD1", targeted: false, sequential: false, args: &["--rw=randwrite", "--bs=4k", "--iodepth=1"] },
    Job { name: "rand 4K QD32", targeted: false, sequential: false, args: &["--rw=randwrite", "--bs=4k", "--iodepth=32"] },
    Job {
        name: "zipf 4K QD1",
        targeted: true,
        sequential: false,
        args: &["--rw=randwrite", "--bs=4k", "--iodepth=1", "--random_distribution=zipf:1.2"],
    },
    Job {
        name: "zipf 4K QD32",
        targeted: true,
        sequential: false,
        args: &["--rw=randwrite", "--bs=4k", "--iodepth=32", "--random_distribution=zipf:1.2"],
    },
];

pub struct Options {
    pub rtts_ms: Vec<u64>,
    pub modes: Vec<Mode>,
    pub jobs: Vec<&'static Job>,
    pub runtime_s: u64,
    pub rate_mbps: u64,
    pub volume_bytes: u64,
}

pub struct Row {
    pub rtt_ms: u64,
    pub mode: Mode,
    pub job: &'static Job,
    pub fio: super::Figures,
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

impl Row {
    pub fn hit_ratio(&self) -> f64 {
        if self.writes == 0 {
            return 0.0;
        }
        self.hits as f64 / self.writes as f64
    }
}

pub fn run(bin: &Path, o: &Options) -> Result<Vec<Row>> {
    let total = o.rtts_ms.len() * o.modes.len() * o.jobs.len();
    let mut rows = Vec::new();
    for &rtt_ms in &o.rtts_ms {
        for job in &o.jobs {
            for &mode in &o.modes {
                eprintln!("[{}/{total}] RTT {rtt_ms} ms, {}, {}", rows.len() + 1, mode.name(), job.name);
                let row = one_row(bin, o, rtt_ms, mode, job).with_context(|| format!("RTT {rtt_ms} ms, {}, {}", mode.name(), job.name))?;
                eprintln!(
                    "    {:.1} MiB/s, p50 {:.0} us, p99 {:.0} us, hits {:.1}%, record {}, failback copied {}",
                    row.fio.mib_s,
                    row.fio.p50_us,
                    row.fio.p99_us,
                    100.0 * row.hit_ratio(),
                    human(row.record_bytes),
                    human(row.failback_bytes)
                );
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

fn options(rtt_ms: u64, rate_mbps: Option<u64>, mode: Mode, volume_bytes: u64) -> PairOptions {
    let bandwidth = rate_mbps.map_or(String::new(), |r| format!("bandwidth_mbps = {r}\n"));
    PairOptions {
        link: format!("rtt_ms = {}\n{bandwidth}idle_timeout_ms = 2000\nkeep_alive_ms = 500\n", rtt_ms.max(1)),
        replication: format!("[replication]\nmode = \"{}\"\nmax_lag_bytes = \"256M\"\n", mode.name()),
        size: volume_bytes.to_string(),
        wan: vec!["--rtt-ms".into(), rtt_ms.to_string(), "--rate-mbps".into(), rate_mbps.unwrap_or(0).to_string()],
        admin: "listen = \"127.0.0.1:0\"\ntoken_file = \"token\"\n".into(),
    }
}

fn one_row(bin: &Path, o: &Options, rtt_ms: u64, mode: Mode, job: &'static Job) -> Result<Row> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    std::fs::write(dir.join("token"), format!("{TOKEN}\n"))?;
    let paced = options(rtt_ms, Some(o.rate_mbps), mode, o.volume_bytes);
    let (mut dc1, mut dc2, to_dc2, to_dc1) = two_sites_both_ways(bin, dir, &paced);
    let carried_before = forward_bytes(&to_dc2)?;
    let t = Instant::now();
    let fio = super::fio(dc1.url("vol0"), job.args, o.runtime_s, dir)?;
    let link_mib_s = (forward_bytes(&to_dc2)? - carried_before) as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64;
    let s = status(bin, dir, "dc1", &dc1)?;
    let v = &s["volumes"][0];
    let num = |k: &str| v[k].as_u64().with_context(|| format!("status has no {k}: {s}"));
    let (writes, hits, record_bytes, debt_bytes) = (num("writes")?, num("hits")?, num("record_bytes")?, num("failback_debt_bytes")?);

    // A forced failover, then the failback over an unpaced link.
    dc1.kill();
    let out = admin(bin, dir, "promote", "dc2", &dc2, &["--force", "--reason", "benchmark failover"]).output()?;
    if !out.status.success() {
        bail!("promote failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let fast = options(rtt_ms, None, mode, o.volume_bytes);
    let (p1, p2) = (dc1.replication.context("dc1 port")?.port(), dc2.replication.context("dc2 port")?.port());
    site_config(dir, "dc1", "dc2", "primary", p1, to_dc2.port, &fast);
    site_config(dir, "dc2", "dc1", "secondary", p2, to_dc1.port, &fast);
    unpace(&[&to_dc2, &to_dc1])?;
    dc2.restart();
    dc1.start_again();
    let copied = wait_failback(bin, dir, &dc2)?;
    let (end2, log2) = dc2.stop();
    let (end1, log1) = dc1.stop();
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
    Ok(Row { rtt_ms, mode, job, fio, link_mib_s, writes, hits, record_bytes, debt_bytes, failback_bytes: copied })
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
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let s = status(bin, dir, "dc2", promoted)?;
        let v = &s["volumes"][0];
        if v["link_up"] == true && v["drained"] == true && v["resync_in_progress"] == false {
            return v["resync_bytes_copied"].as_u64().context("resync_bytes_copied");
        }
        if Instant::now() > deadline {
            bail!("the failback did not finish within ten minutes: {s}");
        }
        std::thread::sleep(Duration::from_millis(200));
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

/// A row's figure against async mode's on the same job and RTT.
fn async_of<'a>(rows: &'a [Row], r: &Row) -> Option<&'a Row> {
    rows.iter().find(|a| a.mode == Mode::Async && a.rtt_ms == r.rtt_ms && std::ptr::eq(a.job, r.job))
}

pub fn markdown(rows: &[Row], o: &Options) -> String {
    let mut t = String::from(
        "| RTT | job | mode | MiB/s | link MiB/s | IOPS | p50 us | p99 us | vs async p50 / p99 / tput | hits | record | debt | failback copied | of volume |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let vs = match async_of(rows, r) {
            Some(a) if r.mode != Mode::Async => {
                format!("{:.2}x / {:.2}x / {:.2}x", r.fio.p50_us / a.fio.p50_us, r.fio.p99_us / a.fio.p99_us, r.fio.mib_s / a.fio.mib_s)
            }
            _ => "-".into(),
        };
        t += &format!(
            "| {} ms | {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {vs} | {:.1}% | {} | {} | {} | {:.2}% |\n",
            r.rtt_ms,
            r.job.name,
            r.mode.name(),
            r.fio.mib_s,
            r.link_mib_s,
            r.fio.iops,
            r.fio.p50_us,
            r.fio.p99_us,
            100.0 * r.hit_ratio(),
            human(r.record_bytes),
            human(r.debt_bytes),
            human(r.failback_bytes),
            100.0 * r.failback_bytes as f64 / o.volume_bytes as f64
        );
    }
    t
}

/// BENCHMARKS.md's targets, each marked met or not met from these rows.
pub fn targets(rows: &[Row], o: &Options) -> String {
    let mut out = String::new();
    let mut line = |what: String, met: bool| out += &format!("- {} **{}**\n", what, if met { "met" } else { "NOT met" });
    for r in rows.iter().filter(|r| r.mode == Mode::Predictive && r.rtt_ms == 50 && r.job.targeted) {
        let Some(a) = async_of(rows, r) else { continue };
        let (p50, p99, tput) = (r.fio.p50_us / a.fio.p50_us, r.fio.p99_us / a.fio.p99_us, r.fio.mib_s / a.fio.mib_s);
        line(format!("{}, 50 ms: predictive p50 {p50:.2}x async (target ≤ 1.1x)", r.job.name), p50 <= 1.1);
        line(format!("{}, 50 ms: predictive p99 {p99:.2}x async (target ≤ 1.5x)", r.job.name), p99 <= 1.5);
        line(format!("{}, 50 ms: predictive throughput {tput:.2}x async (target ≥ 0.95x)", r.job.name), tput >= 0.95);
    }
    let cap_mib_s = o.rate_mbps as f64 * 1e6 / 8.0 / (1 << 20) as f64;
    for r in rows.iter().filter(|r| r.mode == Mode::Async && r.job.sequential && r.rtt_ms > 0) {
        let share = r.link_mib_s / cap_mib_s;
        line(
            format!(
                "async {}, {} ms: the link carried {:.0}% of its {} Mbit/s (target ≥ 90%)",
                r.job.name,
                r.rtt_ms,
                100.0 * share,
                o.rate_mbps
            ),
            share >= 0.9,
        );
    }
    for r in rows.iter().filter(|r| r.mode == Mode::Predictive) {
        let share = r.failback_bytes as f64 / o.volume_bytes as f64;
        let within_record = r.failback_bytes <= r.record_bytes.max(r.debt_bytes);
        line(
            format!(
                "predictive {}, {} ms: failback copied {} = {:.1}% of the volume, record {} (target ≤ record, ≤ 5%)",
                r.job.name,
                r.rtt_ms,
                human(r.failback_bytes),
                100.0 * share,
                human(r.record_bytes)
            ),
            within_record && share <= 0.05,
        );
    }
    out
}
