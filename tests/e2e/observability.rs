//! Metrics, dashboard and alerts against a real Prometheus (Debian's package): `geomirror
//! demo` runs under fio load, Prometheus scrapes both sites with the prometheus.yml the demo
//! wrote, and then every panel query of grafana/dashboards/geomirror.json and every alert
//! expression of grafana/alerts.yml runs through Prometheus's HTTP API. Each must return at
//! least one finite sample; a query that fails, or returns nothing, fails the test. A healthy
//! demo fires no alert, and cutting the link makes the link-down alert's expression true.

use geomirror_tests::demo::Demo;
use geomirror_tests::site::{run_ok, tool};
use geomirror_tests::wait;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_geomirror");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// Longest wait for Prometheus to have data for every query.
const DATA_DEADLINE: Duration = Duration::from_secs(150);

struct Prometheus {
    child: Child,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(config: &Path, data: &Path) -> Prometheus {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(data.with_extension("log")).unwrap();
        let child = tool("prometheus", "prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus { child, port }
    }

    /// GET `path` over plain HTTP/1.0: the status code and the body.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_owned();
        Some((code, body))
    }

    /// An instant query: Ok(finite samples) or Err(why).
    fn query(&self, expr: &str) -> Result<Vec<(serde_json::Value, f64)>, String> {
        let (code, body) = self.get(&format!("/api/v1/query?query={}", encode(expr))).ok_or("no answer from Prometheus")?;
        let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("HTTP {code}, not JSON ({e}): {body}"))?;
        if json["status"] != "success" {
            return Err(format!("HTTP {code}: {}", json["error"]));
        }
        let result = &json["data"]["result"];
        let samples: Vec<(serde_json::Value, f64)> = match json["data"]["resultType"].as_str() {
            Some("vector") => result
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| Some((s["metric"].clone(), s["value"][1].as_str()?.parse::<f64>().ok()?)))
                .collect(),
            Some("scalar") => result[1].as_str().and_then(|v| v.parse().ok()).map(|v| (serde_json::Value::Null, v)).into_iter().collect(),
            other => return Err(format!("unexpected result type {other:?}")),
        };
        Ok(samples.into_iter().filter(|(_, v)| v.is_finite()).collect())
    }

    /// Waits (up to the deadline) until every query returns a finite sample; returns the
    /// ones that never did, with why.
    fn wait_for_data(&self, queries: &[(String, String)], deadline: Instant) -> Vec<String> {
        let limit = deadline.saturating_duration_since(Instant::now());
        let missing = wait::within(limit, Duration::from_secs(2), || {
            let missing: Vec<String> = queries
                .iter()
                .filter_map(|(what, q)| match self.query(q) {
                    Ok(s) if !s.is_empty() => None,
                    Ok(_) => Some(format!("{what}: no data for {q}")),
                    Err(e) => Some(format!("{what}: {q}: {e}")),
                })
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(missing)
            }
        });
        missing.err().unwrap_or_default()
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every panel's queries, named by panel title.
fn panel_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(format!("{ROOT}/grafana/dashboards/geomirror.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        assert_eq!(p["datasource"]["uid"], "geomirror-prometheus", "panel {} uses the provisioned datasource", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr").to_owned();
            assert!(!expr.contains('$'), "panel {}: a Grafana variable would not run in Prometheus: {expr}", p["title"]);
            out.push((format!("panel {:?}", p["title"].as_str().unwrap_or("?")), expr));
        }
    }
    out
}

/// Every alert's expression, turned into a 0/1 series: its top-level comparison gets `bool`.
fn alert_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(format!("{ROOT}/grafana/alerts.yml")).unwrap();
    let mut out = Vec::new();
    let mut name = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(n) = line.strip_prefix("- alert: ") {
            name = n.to_owned();
        } else if let Some(expr) = line.strip_prefix("expr: ") {
            let (at, op) = [" >= ", " <= ", " == ", " != ", " > ", " < "]
                .iter()
                .filter_map(|op| expr.rfind(op).map(|i| (i, *op)))
                .max_by_key(|(i, _)| *i)
                .unwrap_or_else(|| panic!("alert {name}: its expression has no comparison: {expr}"));
            out.push((format!("alert {name}"), format!("{}{} bool {}", &expr[..at], op.trim_end(), &expr[at + op.len()..])));
        }
    }
    assert!(out.len() >= 5, "alerts.yml: found only {out:?}");
    out
}

#[test]
fn prometheus_scrapes_both_sites_and_every_panel_and_alert_has_data() {
    run_ok(tool("promtool", "prometheus").arg("check").arg("rules").arg(format!("{ROOT}/grafana/alerts.yml")));
    let panels = panel_queries();
    let alerts = alert_queries();
    let tmp = tempfile::tempdir().unwrap();
    let mut demo = Demo::start(Path::new(BIN), tmp.path(), &["--rtt-ms", "10", "--size", "1G"]);
    run_ok(tool("promtool", "prometheus").arg("check").arg("config").arg(demo.dir.join("prometheus.yml")));
    let prom = Prometheus::start(&demo.dir.join("prometheus.yml"), &tmp.path().join("prometheus-data"));

    // Load: Zipf 4 KiB writes over the first 64 MiB, and a sequential stream through the
    // rest of the volume, for as long as the queries wait, stopped once they all have data.
    // Clean extents stay recorded, so the record soon covers the Zipf region and misses and
    // predictions come from the stream alone: at 4 MiB/s it reaches new extents for 224 s,
    // longer than the queries may wait. The stream writes 64 KiB at a time: as 1 MiB writes
    // (4 a second, beside 500 random ones) it lost its slot in the stream detector between
    // two writes, was never believed, and after the first seconds nothing was predicted, so
    // the accuracy panel had data only if Prometheus scraped before then.
    let mut fio = tool("fio", "fio")
        .args(["--ioengine=nbd", &format!("--uri={}", demo.nbd_url(0)), "--time_based", "--runtime=300", "--group_reporting"])
        // Jobs as threads: killing fio then stops them all.
        .arg("--thread")
        .args(["--name=seq", "--rw=write", "--bs=64k", "--iodepth=4", "--rate=4m", "--offset=128m", "--size=896m"])
        .args([
            "--name=zipf",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--random_distribution=zipf:1.2",
            "--rate_iops=500",
            "--offset=0",
            "--size=64m",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("fio.stderr")).unwrap())
        .spawn()
        .expect("start fio");
    let started = Instant::now();
    let deadline = started + DATA_DEADLINE;
    let both_up = [("both sites scraped".to_string(), "count(up{job=~\"geomirror-dc[12]\"} == 1) == 2".to_string())];
    let mut missing = prom.wait_for_data(&both_up, deadline);
    if missing.is_empty() {
        let all: Vec<(String, String)> = panels.iter().chain(alerts.iter()).cloned().collect();
        missing = prom.wait_for_data(&all, deadline);
    }
    eprintln!("[{:?}] every query has data", started.elapsed());
    let _ = fio.kill();
    let _ = fio.wait();
    assert!(
        missing.is_empty(),
        "{} of {} queries have no data:\n{}\n(fio: {})",
        missing.len(),
        panels.len() + alerts.len(),
        missing.join("\n"),
        std::fs::read_to_string(tmp.path().join("fio.stderr")).unwrap_or_default()
    );

    // Healthy: no alert's expression is true.
    for (what, q) in &alerts {
        let firing: Vec<_> = prom.query(q).unwrap().into_iter().filter(|s| s.1 != 0.0).collect();
        assert!(firing.is_empty(), "{what} fires on a healthy demo: {firing:?}");
    }
    // Cut the link both ways: the link-down expression turns true on both sites.
    for towards in ["dc1", "dc2"] {
        assert!(demo.wan(towards, "cut").starts_with("ok link=cut"));
    }
    let link_down = alerts.iter().find(|a| a.0 == "alert GeomirrorLinkDown").expect("a link-down alert").1.clone();
    let sites_down = wait::within(Duration::from_secs(60), Duration::from_secs(1), || {
        let down: Vec<String> = prom
            .query(&link_down)
            .unwrap()
            .into_iter()
            .filter(|s| s.1 == 1.0)
            .map(|s| s.0["site"].as_str().unwrap_or("?").to_owned())
            .collect();
        if down.len() == 2 {
            Ok(down)
        } else {
            Err(down)
        }
    })
    .unwrap_or_else(|down| down);
    eprintln!("[{:?}] link down on both sites", started.elapsed());
    assert_eq!(sites_down.len(), 2, "the link-down expression is true on both sites once the link is cut: {sites_down:?}");
    for towards in ["dc1", "dc2"] {
        assert!(demo.wan(towards, "restore").starts_with("ok link=up"));
    }
    let err = demo.interrupt();
    eprintln!("[{:?}] demo stopped:\n{err}", started.elapsed());
    assert!(err.contains("dc1 stopped (exit code 0)") && err.contains("dc2 stopped (exit code 0)"), "{err}");
}
