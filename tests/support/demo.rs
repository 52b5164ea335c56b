//! `geomirror demo` as a test sees it: started on free ports in a temporary directory,
//! its printed summary, and a stop by SIGINT (Ctrl-C) that must end every process cleanly.
//!
//! Must not: leave any of the demo's processes behind when a test ends.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Demo {
    child: Option<Child>,
    pub dir: PathBuf,
    /// What the demo printed on standard output.
    pub summary: String,
    pub port_base: u16,
    pub nbd_port: u16,
    stderr: PathBuf,
}

/// A port base whose demo ports (BASE+1..=BASE+122, TCP and UDP) and two NBD ports
/// (BASE+130, BASE+131) are free now, and not handed to another demo of this test process
/// (tests run in parallel, and none has bound its ports when the next one asks). Another
/// process may still take one before the demo binds it; the demo then fails loudly with the
/// site's log.
pub fn free_ports() -> (u16, u16) {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok() && UdpSocket::bind(("127.0.0.1", p)).is_ok();
    let seed = std::process::id() as u16;
    for i in 0..200u16 {
        let base = 20_000 + (seed.wrapping_add(i.wrapping_mul(131)) % 20_000);
        if handed_out.iter().any(|b| b.abs_diff(base) <= 131) {
            continue;
        }
        let nbd = base + 130;
        let ports = [1, 2, 101, 102, 111, 112, 121, 122].map(|o| base + o);
        if ports.iter().chain([nbd, nbd + 1].iter()).all(|&p| free(p)) {
            handed_out.push(base);
            return (base, nbd);
        }
    }
    panic!("no free ports for a demo");
}

impl Demo {
    /// Starts `geomirror demo` in `dir` and waits for its summary (it prints it once both
    /// sites serve and the link is up).
    pub fn start(bin: &Path, dir: &Path, extra: &[&str]) -> Demo {
        let (port_base, nbd_port) = free_ports();
        Demo::start_at(bin, dir, port_base, nbd_port, extra)
    }

    /// `start` on given ports: BASE+1..=BASE+122 as `geomirror demo --port-base` takes
    /// them, and NBD at `nbd_port` and the next one.
    pub fn start_at(bin: &Path, dir: &Path, port_base: u16, nbd_port: u16, extra: &[&str]) -> Demo {
        let stderr = dir.join("demo.stderr");
        let mut child = Command::new(bin)
            .args(["demo", "--dir"])
            .arg(dir.join("demo"))
            .args(["--port-base", &port_base.to_string(), "--nbd-port", &nbd_port.to_string()])
            .args(extra)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("demo stderr file"))
            .spawn()
            .expect("start geomirror demo");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut summary = String::new();
        loop {
            let mut line = String::new();
            let n = out.read_line(&mut line).expect("read the demo's output");
            summary += &line;
            if n == 0 {
                let status = child.wait().expect("wait for the demo");
                panic!(
                    "geomirror demo ended ({status}) before it was up:\n{summary}\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
            if line.starts_with("Ctrl-C stops both sites") {
                break;
            }
        }
        // Drain the rest, so the demo never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = out.read_to_string(&mut rest);
        });
        Demo { child: Some(child), dir: dir.join("demo"), summary, port_base, nbd_port, stderr }
    }

    pub fn nbd_url(&self, site: usize) -> String {
        format!("nbd://127.0.0.1:{}/vol0", self.nbd_port + site as u16)
    }

    pub fn config(&self, site: &str) -> PathBuf {
        self.dir.join(format!("{site}.toml"))
    }

    /// The pid the summary gives for `site`.
    pub fn pid(&self, site: &str) -> i32 {
        let line = self.summary.lines().find(|l| l.trim_start().starts_with(&format!("{site} ("))).expect("the site's line");
        line.split("pid ").nth(1).and_then(|p| p.trim_end_matches(')').parse().ok()).expect("a pid")
    }

    /// A command to the WAN emulator towards `site` (dc1 or dc2): `cut`, `restore`, `status`.
    pub fn wan(&self, towards: &str, command: &str) -> String {
        let port = self.port_base + if towards == "dc2" { 121 } else { 122 };
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("the wan-emu control socket");
        s.write_all(format!("{command}\n").as_bytes()).expect("send");
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).expect("a reply");
        reply
    }

    /// The processes the demo started and still holds (sites and WAN emulators), from
    /// /proc: each whose parent is the demo.
    pub fn children(&self) -> Vec<i32> {
        let demo = self.child.as_ref().expect("running").id() as i32;
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            // "pid (comm) state ppid ...": comm may hold spaces, so read after its last ')'.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(demo) {
                out.push(pid);
            }
        }
        out
    }

    /// `kill -9` of the demo itself: it gets no chance to stop what it started. Returns once
    /// the demo is reaped.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL the demo");
        child.wait().expect("reap the demo");
    }

    /// Ctrl-C: the demo stops both sites and the emulators, and must exit 0 with each of
    /// them stopped cleanly. Returns what it printed on standard error.
    pub fn interrupt(&mut self) -> String {
        let child = self.child.take().expect("running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
        let status = crate::site::wait_within(child, Duration::from_secs(120));
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let status = status.unwrap_or_else(|s| panic!("the demo did not stop within 120 s of Ctrl-C ({s}); it printed:\n{err}"));
        assert!(status.success(), "the demo exited with {status} on Ctrl-C:\n{err}");
        err
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            // A failing test: stop everything the demo started, not only the demo.
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
            }
            let _ = crate::site::wait_within(c, Duration::from_secs(60));
        }
    }
}

/// Waits up to `limit` for a process that is not ours to reap (so `wait` cannot) to exit:
/// blocks on its pidfd, which becomes readable when it does. True once it has exited (or
/// was already gone).
pub fn exits_within(pid: i32, limit: Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let Some(p) = rustix::process::Pid::from_raw(pid) else { return true };
    let fd = match rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return true,
        Err(e) => panic!("pidfd_open({pid}): {e}"),
    };
    let timeout = Timespec { tv_sec: limit.as_secs() as i64, tv_nsec: limit.subsec_nanos() as i64 };
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    loop {
        match poll(&mut fds, Some(&timeout)) {
            Ok(n) => return n > 0,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => panic!("poll on the pidfd of {pid}: {e}"),
        }
    }
}
