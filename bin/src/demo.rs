//! `geomirror demo`: a complete two-site deployment on this machine, for a first hour.
//!
//! Owns: making the deployment's certificates, tokens and site configs in one directory
//! (from the embedded template `demo_site.toml`), starting a WAN emulator each way and the
//! two sites as separate child processes, printing where to connect, and stopping them in
//! order on Ctrl-C: primaries first, so that each drains to a live peer.
//!
//! The files it writes are ordinary: the sites can be started by hand from them afterwards
//! (`geomirror run --config DIR/dc1.toml`), and `DIR/prometheus.yml` scrapes both.
//!
//! Must not: do anything a site does. It only starts processes and asks their admin APIs.

use anyhow::{bail, Context, Result};
use clap::Args;
use geomirror_node::admin_client::{AdminClient, Credentials};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SITE_TEMPLATE: &str = include_str!("demo_site.toml");
const ALERT_RULES: &str = include_str!("../../grafana/alerts.yml");
/// How long a site may take to start, and the link to come up.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a stopping site may take (a primary drains to its peer first) before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(45);

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where the certificates, tokens, configs, volumes, state and logs go. Created if
    /// missing; a second run reuses it, volumes and roles included.
    #[arg(long, default_value = "geomirror-demo")]
    dir: PathBuf,
    /// Round-trip time of the emulated WAN between the sites, in ms.
    #[arg(long, default_value_t = 20)]
    rtt_ms: u64,
    /// The emulated WAN's bandwidth, in Mbit/s.
    #[arg(long, default_value_t = 100)]
    rate_mbps: u64,
    /// Size of the volume each site holds (a new volume only; an existing one keeps its size).
    #[arg(long, default_value = "1G")]
    size: String,
    /// dc1's NBD port; dc2's is the next one.
    #[arg(long, default_value_t = 10809)]
    nbd_port: u16,
    /// The other ports: admin APIs at BASE+1 (dc1) and BASE+2 (dc2), replication (UDP) at
    /// BASE+101 and BASE+102, the WAN emulators at BASE+111 (towards dc2) and BASE+112
    /// (towards dc1), with their control sockets at BASE+121 and BASE+122.
    #[arg(long, default_value_t = 7300)]
    port_base: u16,
}

/// One site of the demo, and its ports.
struct SiteSpec {
    me: &'static str,
    peer: &'static str,
    role: &'static str,
    nbd: u16,
    admin: u16,
    replication: u16,
    /// The WAN emulator in front of this site's peer.
    peer_address: u16,
}

/// A child process the demo started.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    reported_exit: bool,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then up to `deadline` for it to exit, then SIGKILL.
    fn stop(&mut self, deadline: Duration) -> Result<std::process::ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).context("a child's pid")?;
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= until {
                let _ = self.child.kill();
                return Ok(self.child.wait()?);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn demo(a: DemoArgs) -> Result<()> {
    let size = geomirror_node::config::parse_size(&a.size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
    if a.port_base > u16::MAX - 122 || a.nbd_port == u16::MAX {
        bail!("--port-base must leave room for BASE+122, and --nbd-port for the next port");
    }
    if !(1..=10_000).contains(&a.rtt_ms) {
        bail!("--rtt-ms must be between 1 and 10000");
    }
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let dir = a.dir.canonicalize()?;
    let bin = std::env::current_exe().context("finding the geomirror binary")?;
    let b = a.port_base;
    let sites = [
        SiteSpec { me: "dc1", peer: "dc2", role: "primary", nbd: a.nbd_port, admin: b + 1, replication: b + 101, peer_address: b + 111 },
        SiteSpec {
            me: "dc2",
            peer: "dc1",
            role: "secondary",
            nbd: a.nbd_port + 1,
            admin: b + 2,
            replication: b + 102,
            peer_address: b + 112,
        },
    ];

    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner.set_message("making certificates and tokens");
    write_files(&dir, &a, size, &sites)?;

    let mut procs: Vec<Proc> = Vec::new();
    let started = start_all(&bin, &dir, &a, &sites, &spinner, &mut procs);
    if let Err(e) = started {
        spinner.finish_and_clear();
        for p in procs.iter_mut().rev() {
            let _ = p.stop(Duration::from_secs(5));
        }
        return Err(e);
    }
    spinner.finish_and_clear();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // The roles the sites hold now, not the configs': a demo run again after the
    // walkthrough's failover finds dc2 primary and dc1 its secondary.
    let roles: Vec<String> = sites.iter().map(|s| current_role(&rt, &dir, s).unwrap_or_else(|| s.role.to_owned())).collect();
    // The handlers before the summary: whoever waits for it may press Ctrl-C at once, and a
    // signal that comes before its listener exists is lost (the demo would run on).
    let (mut int, mut term) = {
        let _in_runtime = rt.enter();
        use tokio::signal::unix::{signal, SignalKind};
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };
    print_summary(&dir, &a, &sites, &roles, &procs)?;

    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => break,
                _ = tick.tick() => report_exits(&mut procs),
            }
        }
        anyhow::Ok(())
    })?;
    eprintln!("stopping: primaries first, so that each drains to its peer");
    stop_all(&rt, &dir, &sites, &mut procs);
    Ok(())
}

/// Certificates, tokens, the two site configs, prometheus.yml and the alert rules.
fn write_files(dir: &Path, a: &DemoArgs, size: u64, sites: &[SiteSpec]) -> Result<()> {
    let certs = dir.join("certs");
    if !(certs.join("dc1.pem").exists() && certs.join("dc2.pem").exists()) {
        geomirror_node::certs::write_deployment(
            &certs,
            "demo",
            &["dc1".into(), "dc2".into()],
            &[],
            geomirror_node::certs::Validity::days_from_now(365),
            true,
        )?;
    }
    for token in ["admin.token", "metrics.token"] {
        let path = dir.join(token);
        if !path.exists() {
            let mut bytes = [0u8; 32];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            private_file(&path, &hex)?;
        }
    }
    for s in sites {
        let text = SITE_TEMPLATE
            .replace("{dir}", &dir.display().to_string())
            .replace("{me}", s.me)
            .replace("{peer}", s.peer)
            .replace("{role}", s.role)
            .replace("{nbd_port}", &s.nbd.to_string())
            .replace("{admin_port}", &s.admin.to_string())
            .replace("{listen}", &s.replication.to_string())
            .replace("{peer_address}", &s.peer_address.to_string())
            .replace("{rtt_ms}", &a.rtt_ms.to_string())
            .replace("{rate_mbps}", &a.rate_mbps.to_string())
            .replace("{size}", &size.to_string());
        std::fs::write(dir.join(format!("{}.toml", s.me)), text)?;
    }
    let mut scrape = String::new();
    for s in sites {
        scrape += &format!(
            "  - job_name: geomirror-{me}\n    scheme: https\n    authorization:\n      credentials_file: metrics.token\n    tls_config:\n      ca_file: certs/ca.pem\n      server_name: {me}\n    static_configs:\n      - targets: [\"127.0.0.1:{port}\"]\n",
            me = s.me,
            port = s.admin
        );
    }
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "# Scrapes both demo sites: prometheus --config.file={}/prometheus.yml\n# The certificate names the site, not the address: hence server_name.\nglobal:\n  scrape_interval: 5s\n  evaluation_interval: 5s\nrule_files:\n  - alerts.yml\nscrape_configs:\n{scrape}",
            dir.display()
        ),
    )?;
    std::fs::write(dir.join("alerts.yml"), ALERT_RULES)?;
    Ok(())
}

fn private_file(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Starts the WAN emulators, then the secondary, then the primary, each ready before the
/// next, and waits for the replication link. Each process gets its own process group, so a
/// Ctrl-C in the terminal reaches only the demo, which stops them in order.
fn start_all(
    bin: &Path,
    dir: &Path,
    a: &DemoArgs,
    sites: &[SiteSpec],
    spinner: &indicatif::ProgressBar,
    procs: &mut Vec<Proc>,
) -> Result<()> {
    spinner.set_message(format!("starting the WAN emulators ({} ms RTT, {} Mbit/s)", a.rtt_ms, a.rate_mbps));
    for (to, forward, listen, control) in [
        ("dc2", sites[1].replication, sites[0].peer_address, a.port_base + 121),
        ("dc1", sites[0].replication, sites[1].peer_address, a.port_base + 122),
    ] {
        let mut cmd = Command::new(bin);
        cmd.args(["wan-emu", "--listen", &format!("127.0.0.1:{listen}"), "--forward", &format!("127.0.0.1:{forward}")])
            .args(["--control", &format!("127.0.0.1:{control}")])
            .args(["--rtt-ms", &a.rtt_ms.to_string(), "--rate-mbps", &a.rate_mbps.to_string()]);
        let p = spawn(&mut cmd, &format!("wan-to-{to}"), dir)?;
        procs.push(p);
        wait_for_lines(procs.last_mut().expect("pushed"), 2)?;
    }
    for s in sites.iter().rev() {
        spinner.set_message(format!("starting {} ({})", s.me, s.role));
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--config"]).arg(dir.join(format!("{}.toml", s.me)));
        procs.push(spawn(&mut cmd, s.me, dir)?);
        wait_for_lines(procs.last_mut().expect("pushed"), 3)?;
    }
    spinner.set_message("waiting for the replication link");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = client(dir, &sites[0])?;
    let until = Instant::now() + START_DEADLINE;
    loop {
        let up = rt
            .block_on(client.call("GET", "/v1/status", None))
            .ok()
            .filter(|(code, _)| *code == 200)
            .and_then(|(_, j)| j["volumes"].as_array().map(|v| v.iter().all(|v| v["link_up"] == true)));
        if up == Some(true) {
            return Ok(());
        }
        if Instant::now() >= until {
            bail!("the replication link did not come up within {START_DEADLINE:?}; see {}/dc1.log and dc2.log", dir.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Names, to a process the demo starts, the demo's pid: see `stop_with_demo`.
const DEMO_PID_ENV: &str = "GEOMIRROR_DEMO_PID";

/// In a site or relay that a demo started: stop when the demo does, even when it is killed
/// outright (a SIGKILL leaves it no chance to stop its children in order, and they would
/// hold the demo's ports, so that the next demo could not start). The kernel sends SIGTERM,
/// which a site handles as a clean stop. Does nothing in a process the demo did not start.
pub fn stop_with_demo() -> Result<()> {
    let Some(demo) = std::env::var(DEMO_PID_ENV).ok().and_then(|p| p.parse::<i32>().ok()) else {
        return Ok(());
    };
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
        .context("asking to be stopped when the demo exits")?;
    // The demo may have gone before the request above took effect.
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(demo) {
        bail!("the demo that started this process (pid {demo}) has exited");
    }
    Ok(())
}

fn spawn(cmd: &mut Command, name: &str, dir: &Path) -> Result<Proc> {
    let log = dir.join(format!("{name}.log"));
    let err = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = cmd
        .current_dir(dir)
        .env("RUST_BACKTRACE", "0")
        .env(DEMO_PID_ENV, std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc { name: name.into(), child, log, reported_exit: false })
}

/// Waits for a process's first `n` lines of output: each prints its addresses once it listens.
fn wait_for_lines(p: &mut Proc, n: usize) -> Result<()> {
    let out = p.child.stdout.take().context("the child's stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        for _ in 0..n {
            match lines.next() {
                Some(Ok(l)) => {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
        // Keep reading, so the child never blocks on a full pipe.
        for _ in lines {}
    });
    for _ in 0..n {
        if rx.recv_timeout(START_DEADLINE).is_err() {
            let status = p.child.try_wait()?;
            bail!("{} did not start ({}); the end of its log, {}:\n{}", p.name, describe(status), p.log.display(), tail(&p.log));
        }
    }
    Ok(())
}

fn describe(status: Option<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "still running, silent".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (_, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn client(dir: &Path, s: &SiteSpec) -> Result<AdminClient> {
    let token = std::fs::read_to_string(dir.join("admin.token"))?;
    AdminClient::new(
        format!("127.0.0.1:{}", s.admin).parse()?,
        s.me,
        &dir.join("certs/ca.pem"),
        Credentials::Token(token.trim().to_owned()),
    )
}

/// The role a running site reports for its first volume.
fn current_role(rt: &tokio::runtime::Runtime, dir: &Path, s: &SiteSpec) -> Option<String> {
    let c = client(dir, s).ok()?;
    let (code, j) = rt.block_on(c.call("GET", "/v1/status", None)).ok()?;
    (code == 200).then(|| j["volumes"][0]["role"].as_str().unwrap_or("").to_owned())
}

fn print_summary(dir: &Path, a: &DemoArgs, sites: &[SiteSpec], roles: &[String], procs: &[Proc]) -> Result<()> {
    let d = dir.display();
    let pid = |name: &str| procs.iter().find(|p| p.name == name).map_or(0, Proc::pid);
    let mut out = std::io::stdout().lock();
    writeln!(out, "geomirror demo: two sites on this machine, {} ms RTT and {} Mbit/s between them.\n", a.rtt_ms, a.rate_mbps)?;
    for (s, role) in sites.iter().zip(roles) {
        let serves = if role == "primary" { "" } else { "   (serves once promoted)" };
        writeln!(out, "  {} ({role}, pid {})", s.me, pid(s.me))?;
        writeln!(out, "    NBD      nbd://127.0.0.1:{}/vol0{serves}", s.nbd)?;
        writeln!(out, "    admin    https://127.0.0.1:{}   (its certificate names {})", s.admin, s.me)?;
        writeln!(out, "    metrics  https://127.0.0.1:{}/metrics", s.admin)?;
    }
    // The walkthrough starts from whichever site is primary now.
    let p = roles.iter().position(|r| r == "primary").unwrap_or(0);
    let (pr, se) = (&sites[p], &sites[1 - p]);
    let (pn, sn) = (pr.me, se.me);
    let steps = [
        (format!("qemu-io -f raw nbd://127.0.0.1:{}/vol0 -c \"write -P 0xab 0 4M\" -c \"read -P 0xab 0 4M\"", pr.nbd), String::new()),
        (format!("geomirror status --config {d}/{pn}.toml"), "# role, link, hits and misses, record, lag".into()),
        (
            format!(
                "curl -s --cacert {d}/certs/ca.pem --resolve {pn}:{a}:127.0.0.1 -H \"Authorization: Bearer $(cat {d}/metrics.token)\" https://{pn}:{a}/metrics",
                a = pr.admin
            ),
            String::new(),
        ),
        (format!("kill -9 {}", pid(pn)), format!("# lose {pn}; {sn} notices within 3 s")),
        (format!("geomirror promote --config {d}/{sn}.toml --reason \"{pn} lost\""), format!("# {sn} serves nbd://127.0.0.1:{}/vol0", se.nbd)),
        (format!("geomirror run --config {d}/{pn}.toml"), format!("# {pn} returns, fences itself, joins as secondary")),
        (format!("geomirror failback --config {d}/{sn}.toml"), "# copies back only what differs".into()),
    ];
    let width = steps.iter().filter(|s| !s.1.is_empty()).map(|s| s.0.len()).max().unwrap_or(0);
    writeln!(out, "\nTry, in another terminal (docs: README.md, \"Walkthrough\"):")?;
    for (cmd, comment) in &steps {
        if comment.is_empty() {
            writeln!(out, "  {cmd}")?;
        } else {
            writeln!(out, "  {cmd:width$}  {comment}")?;
        }
    }
    writeln!(
        out,
        "\nPrometheus: prometheus --config.file={d}/prometheus.yml (scrapes both, with the alert rules).\n\
         Everything is in {d}/: configs, certificates, tokens, volumes, state, logs (dc1.log, dc2.log).\n\
         Ctrl-C stops both sites."
    )?;
    out.flush()?;
    Ok(())
}

/// Says once when a process the demo started has exited (a `kill -9` of the walkthrough).
fn report_exits(procs: &mut [Proc]) {
    for p in procs.iter_mut() {
        if !p.reported_exit {
            if let Ok(Some(status)) = p.child.try_wait() {
                p.reported_exit = true;
                eprintln!("{} exited ({}); its log: {}", p.name, describe(Some(status)), p.log.display());
            }
        }
    }
}

/// Stops the sites, primaries first (each drains to a live peer), then the secondaries,
/// then the WAN emulators.
fn stop_all(rt: &tokio::runtime::Runtime, dir: &Path, sites: &[SiteSpec], procs: &mut [Proc]) {
    let role = |s: &SiteSpec| -> Option<String> {
        let c = client(dir, s).ok()?;
        let (code, j) = rt.block_on(c.call("GET", "/v1/status", None)).ok()?;
        (code == 200).then(|| j["volumes"][0]["role"].as_str().unwrap_or("").to_owned())
    };
    let mut order: Vec<(&str, bool)> = sites.iter().map(|s| (s.me, role(s).as_deref() == Some("primary"))).collect();
    order.sort_by_key(|(_, primary)| !primary);
    let names: Vec<String> = order
        .iter()
        .map(|(n, _)| n.to_string())
        .chain(procs.iter().filter(|p| p.name.starts_with("wan-")).map(|p| p.name.clone()))
        .collect();
    for name in names {
        let Some(p) = procs.iter_mut().find(|p| p.name == name) else { continue };
        if p.reported_exit {
            continue;
        }
        match p.stop(STOP_DEADLINE) {
            Ok(status) => eprintln!("{} stopped ({})", p.name, describe(Some(status))),
            Err(e) => eprintln!("{}: {e}", p.name),
        }
    }
}
