//! Failure detection: how long after a `kill -9` of the primary the secondary reports the
//! link down, idle, under saturating writes, on a slow link and on a congested one.
//!
//! Each kill gets a fresh `geomirror demo` (two sites, two `geomirror wan-emu` relays). The
//! scenario sets the link and the load, the harness waits until the secondary reports the
//! link up, records the wall-clock time and sends SIGKILL to the primary. Two readings of
//! "the secondary noticed":
//! - **the moment**: the timestamp of the secondary's `replication session down` log line,
//!   written when its link tells the volume; the figure reported;
//! - **the poll**: the first `geomirror status` that says `link_up: false` (polled every
//!   `POLL`), an upper bound that includes the admin API's round trip; a check on the first.
//!
//! The target: at most `[link] idle_timeout_ms` + 1 s (the demo's idle timeout is 3 s).

use anyhow::{bail, Context, Result};
use geomirror_tests::demo::{free_ports, Demo};
use geomirror_tests::wait;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The demo's `[link] idle_timeout_ms` (bin/src/demo_site.toml).
const DEMO_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// The target's allowance past the idle timeout.
const TARGET_SLACK: Duration = Duration::from_secs(1);
/// How often the secondary's status is read after the kill.
const POLL: Duration = Duration::from_millis(50);
/// How long a kill may go unnoticed before the harness gives up on it (and reports it as
/// at least this).
const GIVE_UP: Duration = Duration::from_secs(150);
/// How long the secondary may take to report the link up before a kill.
const LINK_UP_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// No writes: the link carries keep-alives only.
    Idle,
    /// fio writes 1 MiB sequentially at queue depth 8 through NBD, flat out, on the demo's
    /// link (configured and emulated alike).
    Load,
    /// The same writes on a link that is slow and configured so: 1 Mbit/s both in wan-emu and
    /// in `[link] bandwidth_mbps`, so bulk is paced to it.
    Slow,
    /// The same writes on a congested link: wan-emu throttled to 1 Mbit/s at run time while
    /// the sites still believe the demo's bandwidth, so wan-emu's queue fills.
    Congested,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Load => "saturating writes",
            Scenario::Slow => "slow link (1 Mbit/s, configured), saturating writes",
            Scenario::Congested => "congested link (throttled to 1 Mbit/s at run time), saturating writes",
        }
    }
}

pub struct Options {
    pub kills: usize,
    pub scenarios: Vec<Scenario>,
    pub rtt_ms: u64,
    pub rate_mbps: u64,
    pub load_s: u64,
    pub dir: Option<PathBuf>,
    pub port_base: Option<u16>,
}

/// One kill.
struct Kill {
    /// From the kill to the secondary's `session down` line.
    moment: Option<Duration>,
    /// From the kill to the first status saying link down.
    poll: Option<Duration>,
    /// The primary's replication lag when it was killed.
    lag_bytes: u64,
    /// Sessions the secondary declared lost before the kill (a congested link's flapping).
    lost_before: usize,
}

pub struct Row {
    scenario: Scenario,
    kills: Vec<Kill>,
}

pub fn run(bin: &Path, o: &Options) -> Result<Vec<Row>> {
    let root = match &o.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::tempdir_in(d)?
        }
        None => tempfile::tempdir()?,
    };
    let mut rows = Vec::new();
    for &scenario in &o.scenarios {
        let mut kills = Vec::new();
        for k in 0..o.kills {
            let dir = root.path().join(format!("{scenario:?}-{k}"));
            std::fs::create_dir_all(&dir)?;
            let kill = one_kill(bin, o, scenario, &dir).with_context(|| format!("{} kill {}", scenario.name(), k + 1))?;
            eprintln!(
                "  {:<12} kill {:>2}: moment {}  poll {}  lag {} MiB  lost before {}",
                format!("{scenario:?}"),
                k + 1,
                secs(kill.moment),
                secs(kill.poll),
                kill.lag_bytes >> 20,
                kill.lost_before
            );
            kills.push(kill);
            // Each demo's files go with it: a scenario of 10 kills would hold 10 volumes.
            let _ = std::fs::remove_dir_all(&dir);
        }
        rows.push(Row { scenario, kills });
    }
    Ok(rows)
}

fn one_kill(bin: &Path, o: &Options, scenario: Scenario, dir: &Path) -> Result<Kill> {
    let rate = if scenario == Scenario::Slow { 1 } else { o.rate_mbps };
    let extra = ["--rtt-ms".to_string(), o.rtt_ms.to_string(), "--rate-mbps".into(), rate.to_string(), "--size".into(), "256M".into()];
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (base, nbd) = match o.port_base {
        Some(b) => (b, b + 130),
        None => free_ports(),
    };
    let demo = Demo::start_at(bin, dir, base, nbd, &extra);
    let status = |site: &str| -> Result<serde_json::Value> {
        let out = Command::new(bin).args(["status", "--json", "--config"]).arg(demo.config(site)).output()?;
        if !out.status.success() {
            bail!("geomirror status of {site}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice::<serde_json::Value>(&out.stdout)?["volumes"][0].clone())
    };
    if scenario == Scenario::Congested {
        for towards in ["dc1", "dc2"] {
            let reply = demo.wan(towards, "rate-mbps 1");
            if !reply.starts_with("ok") {
                bail!("wan-emu towards {towards} refused to throttle: {reply}");
            }
        }
    }
    let mut load = (scenario != Scenario::Idle).then(|| fio(&demo.nbd_url(0), dir)).transpose()?;
    // The load runs this long before the kill, so the lag and the path's queue build up: a
    // phase of the measurement (`--load-s`), not a wait for a state.
    if load.is_some() {
        std::thread::sleep(Duration::from_secs(o.load_s));
    }
    // Polls dc2's link until `up` (an error of the status query ends the wait at once).
    let link_is = |up: bool, limit: Duration| {
        wait::within(limit, POLL, || match status("dc2") {
            Ok(v) if v["link_up"] == up => Ok(Ok(())),
            Ok(_) => Err(()),
            Err(e) => Ok(Err(e)),
        })
    };
    match link_is(true, LINK_UP_DEADLINE) {
        Ok(r) => r?,
        Err(()) => bail!("dc2 did not report the link up within {LINK_UP_DEADLINE:?}"),
    }
    let lag_bytes = status("dc1")?["lag_bytes"].as_u64().unwrap_or(0);
    let log = demo.dir.join("dc2.log");
    let lost_before = std::fs::read_to_string(&log)?.matches("replication peer lost").count();
    let killed_at = SystemTime::now();
    let start = Instant::now();
    rustix::process::kill_process(rustix::process::Pid::from_raw(demo.pid("dc1")).context("dc1's pid")?, rustix::process::Signal::KILL)?;
    // The detection time as the status shows it, to within `POLL`; None if never seen.
    let poll = match link_is(false, GIVE_UP) {
        Ok(r) => r.map(|()| Some(start.elapsed()))?,
        Err(()) => None,
    };
    if let Some(l) = &mut load {
        let _ = l.kill();
        let _ = l.wait();
    }
    let moment = session_down_after(&std::fs::read_to_string(&log)?, killed_at);
    Ok(Kill { moment, poll, lag_bytes, lost_before })
}

/// fio writing 1 MiB sequentially at queue depth 8 through NBD until killed.
fn fio(url: &str, dir: &Path) -> Result<Child> {
    Command::new("fio")
        .args(["--name=load", "--ioengine=nbd", "--rw=write", "--bs=1m", "--iodepth=8", "--time_based", "--runtime=3600"])
        .arg(format!("--uri={url}"))
        .stdout(std::fs::File::create(dir.join("fio.out"))?)
        .stderr(Stdio::null())
        .spawn()
        .context("starting fio (deploy/setup --test installs it)")
}

/// From `at` to the first `replication session down` line of `log` stamped after it.
fn session_down_after(log: &str, at: SystemTime) -> Option<Duration> {
    let at = at.duration_since(UNIX_EPOCH).ok()?;
    log.lines()
        .filter(|l| l.contains("replication session down"))
        .filter_map(|l| timestamp(l.split_whitespace().next()?))
        .find_map(|t| t.checked_sub(at))
}

/// An RFC 3339 UTC timestamp as tracing writes it (`2026-12-07T00:54:37.621875Z`), as time
/// since the Unix epoch.
fn timestamp(s: &str) -> Option<Duration> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (t.next()?.parse::<u64>().ok()?, t.next()?.parse::<u64>().ok()?);
    let sec: f64 = t.next()?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(Duration::from_secs(days * 86_400 + h * 3600 + min * 60) + Duration::from_secs_f64(sec))
}

fn secs(d: Option<Duration>) -> String {
    d.map_or(format!(">{} s", GIVE_UP.as_secs()), |d| format!("{:.2} s", d.as_secs_f64()))
}

/// Median and max of the kills' moments; a kill never noticed counts as `GIVE_UP`.
fn median_max(v: impl Iterator<Item = Option<Duration>>) -> (Duration, Duration, usize) {
    let mut missed = 0;
    let mut v: Vec<Duration> = v
        .map(|d| {
            d.unwrap_or_else(|| {
                missed += 1;
                GIVE_UP
            })
        })
        .collect();
    v.sort();
    let median = if v.is_empty() { Duration::ZERO } else { v[v.len() / 2] };
    (median, v.last().copied().unwrap_or_default(), missed)
}

/// The table and the target, as Markdown.
pub fn markdown(rows: &[Row]) -> String {
    let target = DEMO_IDLE_TIMEOUT + TARGET_SLACK;
    let mut out = String::from(
        "| scenario | kills | moment: median | moment: max | poll: median | poll: max | lag at kill (median) | sessions lost before the kill | target (max ≤ idle timeout + 1 s) |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let (med, max, missed) = median_max(r.kills.iter().map(|k| k.moment));
        let (pmed, pmax, _) = median_max(r.kills.iter().map(|k| k.poll));
        let mut lags: Vec<u64> = r.kills.iter().map(|k| k.lag_bytes).collect();
        lags.sort();
        let lag = lags.get(lags.len() / 2).copied().unwrap_or(0);
        let lost: usize = r.kills.iter().map(|k| k.lost_before).sum();
        let met = if max <= target && missed == 0 { "met" } else { "**missed**" };
        out += &format!(
            "| {} | {} | {:.2} s | {:.2} s{} | {:.2} s | {:.2} s | {} MiB | {lost} | {met} |\n",
            r.scenario.name(),
            r.kills.len(),
            med.as_secs_f64(),
            max.as_secs_f64(),
            if missed > 0 { format!(" ({missed} not noticed in {} s)", GIVE_UP.as_secs()) } else { String::new() },
            pmed.as_secs_f64(),
            pmax.as_secs_f64(),
            lag >> 20,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_read_as_unix_time() {
        assert_eq!(timestamp("1970-01-01T00:00:01.5Z"), Some(Duration::from_millis(1500)));
        // date -u -d 2026-12-07T00:54:37Z +%s
        assert_eq!(timestamp("2026-12-07T00:54:37.000000Z"), Some(Duration::from_secs(1_796_604_877)));
        assert_eq!(timestamp("2024-02-29T12:00:00Z"), Some(Duration::from_secs(1_709_208_000)));
        assert_eq!(timestamp("not a time"), None);
    }
}
