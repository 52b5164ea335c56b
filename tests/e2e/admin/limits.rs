//! The admin API's defences on a real site: strangers are refused before anything of their
//! request but its head is read, inputs naming extents are checked against the volume, and a
//! flood of slow connections neither locks out an admin certificate nor holds its slots for
//! long. Sources other than 127.0.0.1 are other loopback addresses (127.0.0.2, ...), which
//! Linux routes to the same host: each stands for another machine.

use super::{options, setup_with, TOKEN};
use geomirror_node::admin::limits::{
    ADMIN_RESERVED_CONNECTIONS, MAX_BODY_BYTES, MAX_CHECKSUM_EXTENTS, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS,
};
use geomirror_node::admin_client::{AdminClient, Answer, Credentials};
use geomirror_tests::pair::{PairOptions, WanEmu};
use geomirror_tests::site::{write_secret, Site};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const METRICS_TOKEN: &str = "fedcba9876543210fedcba9876543210";
/// How long any one awaited event may take before the test fails: a failure bound only.
const DEADLINE: Duration = Duration::from_secs(60);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// dc1 and dc2 with the admin token and a metrics token.
fn sites(dir: &Path) -> (Site, Site, WanEmu, WanEmu) {
    write_secret(&dir.join("metrics.token"), &format!("{METRICS_TOKEN}\n"));
    let mut o: PairOptions = options();
    o.admin.push_str("metrics_token_file = \"metrics.token\"\n");
    setup_with(dir, o)
}

/// A client of dc2's admin API.
fn client(site: &Site, dir: &Path, credentials: Credentials<'_>) -> AdminClient {
    AdminClient::new(site.admin.unwrap(), "dc2", &dir.join("certs/ca.pem"), credentials).unwrap()
}

fn admin_cert(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    (dir.join("certs/admin-ops.pem"), dir.join("certs/admin-ops.key"))
}

/// One request, failing the test if no answer comes within `DEADLINE`.
async fn send(c: &AdminClient, method: &str, path: &str, body: Option<(&str, Vec<u8>)>) -> Answer {
    match tokio::time::timeout(DEADLINE, c.send(method, path, body)).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => panic!("{method} {path}: {e:#}"),
        Err(_) => panic!("{method} {path}: no answer within {DEADLINE:?}"),
    }
}

fn text(a: &Answer) -> String {
    String::from_utf8_lossy(&a.body).into_owned()
}

/// Words that would tell a stranger something of a route's fields or of the body parser.
const TELLTALES: &[&str] =
    &["volume", "extents", "reason", "force", "drain_timeout", "field", "expected", "json", "deserial", "syntax", "eof", "column"];

/// Anonymous callers, a wrong token, the metrics token (off `/metrics`) and a site
/// certificate are refused on every route, an unknown one included, whatever the body:
/// malformed, of the wrong shape, of the wrong type, larger than any body allowed. The
/// answer is the same sentence for every route and says nothing of fields, and the
/// connection is closed. Past authentication the same bodies reach the routes, which tell
/// an admin what is wrong with them, and a body over the limit is refused as such.
#[test]
fn strangers_are_refused_on_every_route_before_the_body_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_dc1, dc2, _a, _b) = sites(dir);
    let certs = dir.join("certs");
    let routes = [
        ("GET", "/metrics"),
        ("GET", "/v1/status"),
        ("POST", "/v1/promote"),
        ("POST", "/v1/demote"),
        ("POST", "/v1/drain"),
        ("POST", "/v1/resume"),
        ("POST", "/v1/checksums"),
        ("POST", "/v1/resolve-split-brain"),
        ("GET", "/v1/promote"),
        ("POST", "/v1/no-such-route"),
    ];
    let huge = vec![b'['; 2 * MAX_BODY_BYTES + 1];
    let bodies: Vec<Option<(&str, Vec<u8>)>> = vec![
        None,
        Some(("application/json", b"{\"volume\": ".to_vec())),
        Some(("application/json", b"{\"volume\": 7, \"extents\": \"all\", \"bogus\": true}".to_vec())),
        Some(("text/plain", b"promote me".to_vec())),
        Some(("application/json", huge.clone())),
    ];
    let rt = runtime();
    rt.block_on(async {
        let strangers: Vec<(&str, AdminClient, u16)> = vec![
            ("anonymous", client(&dc2, dir, Credentials::Anonymous), 401),
            ("a wrong token", client(&dc2, dir, Credentials::Token("wrong-token-wrong-token".into())), 401),
            ("the metrics token", client(&dc2, dir, Credentials::Token(METRICS_TOKEN.into())), 401),
            (
                "a site certificate",
                client(&dc2, dir, Credentials::Certificate { cert: &certs.join("dc1.pem"), key: &certs.join("dc1.key") }),
                403,
            ),
        ];
        for (who, c, want) in &strangers {
            for (method, path) in routes {
                if *who == "the metrics token" && path == "/metrics" {
                    continue;
                }
                for body in &bodies {
                    let what = format!("{who}: {method} {path} with {:?}", body.as_ref().map(|(t, b)| (t, b.len())));
                    let a = send(c, method, path, body.clone()).await;
                    assert_eq!(a.status, *want, "{what}: {}", text(&a));
                    let said = text(&a).to_lowercase();
                    let error: serde_json::Value = serde_json::from_str(&said).unwrap_or_else(|_| panic!("{what}: not JSON: {said}"));
                    assert!(error["error"].is_string(), "{what}: {said}");
                    for word in TELLTALES {
                        assert!(!said.contains(word), "{what}: the refusal tells {word:?}: {said}");
                    }
                    assert_eq!(a.headers.get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]), "{what}: the connection stays open");
                }
            }
        }
        // The metrics token opens /metrics, and an admin certificate everything.
        let metrics = client(&dc2, dir, Credentials::Token(METRICS_TOKEN.into()));
        assert_eq!(send(&metrics, "GET", "/metrics", None).await.status, 200);
        let (cert, key) = admin_cert(dir);
        assert_eq!(
            send(&client(&dc2, dir, Credentials::Certificate { cert: &cert, key: &key }), "GET", "/v1/status", None).await.status,
            200
        );

        // Past authentication the bodies reach the routes, which say what is wrong.
        let admin = client(&dc2, dir, Credentials::Token(TOKEN.into()));
        for (body, want) in [(&bodies[1], 400), (&bodies[2], 422)] {
            let a = send(&admin, "POST", "/v1/checksums", body.clone()).await;
            assert_eq!(a.status, want, "{}", text(&a));
        }
        let a = send(&admin, "POST", "/v1/checksums", Some(("application/json", b"{\"volume\": \"vol0\"}".to_vec()))).await;
        assert!(a.status == 422 && text(&a).contains("extents"), "an admin is told which field is missing: {} {}", a.status, text(&a));
        // In the JSON every other error answer has.
        let j: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_else(|e| panic!("{e}: {}", text(&a)));
        assert!(j["error"].as_str().is_some_and(|e| e.contains("extents")), "{j}");
        // A body over the limit, declared or not, is refused as too large.
        let over = vec![b' '; MAX_BODY_BYTES + 1];
        let a = send(&admin, "POST", "/v1/checksums", Some(("application/json", over))).await;
        assert_eq!(a.status, 413, "{}", text(&a));
        assert!(text(&a).contains(&format!("larger than {MAX_BODY_BYTES} bytes")), "{}", text(&a));
        assert_eq!(send(&admin, "POST", "/v1/checksums", Some(("application/json", huge))).await.status, 413);
    });
}

/// `POST /v1/checksums` answers for the volume's extents only: the last one is served, the
/// one past the end is refused, and so are numbers that, multiplied by the extent size,
/// wrap around to an extent inside the volume. Each refusal says what is wrong and what the
/// volume has. Other inputs out of range are refused too, not changed.
#[test]
fn checksums_answer_for_extents_inside_the_volume_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_dc1, dc2, _a, _b) = sites(dir);
    // The volume: 64 MiB in extents of the default 1 MiB, numbered 0 to 63.
    const EXTENTS: u64 = 64;
    let wraps_to_5 = (1u64 << 44) + 5; // times 2^20 is 2^64 + 5 MiB
    let rt = runtime();
    rt.block_on(async {
        let admin = client(&dc2, dir, Credentials::Token(TOKEN.into()));
        let ask = |extents: Vec<u64>| {
            let body = serde_json::to_vec(&serde_json::json!({ "volume": "vol0", "extents": extents })).unwrap();
            let admin = &admin;
            async move { send(admin, "POST", "/v1/checksums", Some(("application/json", body))).await }
        };
        let a = ask(vec![0, 5, EXTENTS - 1]).await;
        assert_eq!(a.status, 200, "{}", text(&a));
        let sums: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(sums["crc32c"].as_array().map(Vec::len), Some(3), "{sums}");
        for bad in [EXTENTS, EXTENTS + 1, wraps_to_5, (1 << 44) + 255, u64::MAX / (1 << 20) + 1, u64::MAX] {
            for extents in [vec![bad], vec![0, bad]] {
                let a = ask(extents.clone()).await;
                assert_eq!(a.status, 400, "{extents:?}: {}", text(&a));
                let want =
                    format!("extent {bad} is past the end of volume vol0: it has {EXTENTS} extents of 1048576 bytes, numbered 0 to 63");
                assert!(text(&a).contains(&want), "{extents:?}: {}", text(&a));
            }
        }
        // Each extent once: repeating one would read it again per copy.
        let a = ask(vec![3, 7, 3]).await;
        assert_eq!(a.status, 400, "{}", text(&a));
        assert!(text(&a).contains("extent 3 is asked more than once"), "{}", text(&a));
        let a = ask(vec![0; MAX_CHECKSUM_EXTENTS + 1]).await;
        assert_eq!(a.status, 400, "{}", text(&a));
        assert!(text(&a).contains(&format!("at most {MAX_CHECKSUM_EXTENTS} per request")), "{}", text(&a));
        let body = serde_json::to_vec(&serde_json::json!({ "volume": "vol9", "extents": [0] })).unwrap();
        assert_eq!(send(&admin, "POST", "/v1/checksums", Some(("application/json", body))).await.status, 404);

        // A drain timeout out of range is refused, not changed: nothing is drained or demoted.
        for (path, secs) in [("/v1/demote", 0u64), ("/v1/demote", 3601), ("/v1/drain", 0), ("/v1/drain", u64::MAX)] {
            let body = serde_json::to_vec(&serde_json::json!({ "reason": "test", "drain_timeout_secs": secs })).unwrap();
            let a = send(&admin, "POST", path, Some(("application/json", body))).await;
            assert_eq!(a.status, 400, "{path} {secs}: {}", text(&a));
            assert!(text(&a).contains("between 1 and 3600"), "{}", text(&a));
        }
    });
}

/// How one slow connection ended.
#[derive(Debug)]
struct Ended {
    source: IpAddr,
    /// What the server wrote before closing (nothing, or a refusal).
    answer: String,
    /// Header lines sent after the first line.
    lines: usize,
}

/// A slowloris from `source`: connects, sends a request line and then one header line a
/// second, never ending the head, and reports how each connection ended. While `again`
/// holds it connects again, a second after the server closed the last one.
async fn trickle(c: Arc<AdminClient>, source: IpAddr, again: Arc<AtomicBool>, ended: tokio::sync::mpsc::UnboundedSender<Ended>) {
    let mut pace = tokio::time::interval(Duration::from_secs(1));
    loop {
        pace.tick().await;
        let Ok(mut tls) = c.connect().await else {
            if !again.load(Ordering::SeqCst) {
                return;
            }
            continue;
        };
        let (mut answer, mut lines) = (Vec::new(), 0);
        if tls.write_all(b"GET /v1/status HTTP/1.1\r\nhost: geomirror\r\n").await.is_ok() {
            pace.reset();
            loop {
                let mut buf = [0u8; 4096];
                tokio::select! {
                    r = tls.read(&mut buf) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                    },
                    _ = pace.tick() => {
                        lines += 1;
                        if tls.write_all(format!("x-slow-{lines}: {lines}\r\n").as_bytes()).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        let _ = ended.send(Ended { source, answer: String::from_utf8_lossy(&answer).into_owned(), lines });
        if !again.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// A sample of `name{..label..}` from Prometheus's text.
fn sample(metrics: &str, name: &str, label: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

struct Slots {
    general: f64,
    admin: f64,
    refused_address: f64,
    refused_full: f64,
    header_timeouts: f64,
}

/// The admin API's slots as `/metrics` shows them to `admin` (an admin certificate), at the
/// moment it answers.
async fn slots(admin: &AdminClient) -> Slots {
    let a = send(admin, "GET", "/metrics", None).await;
    assert_eq!(a.status, 200, "an admin certificate was refused: {}", text(&a));
    let m = text(&a);
    let get = |name: &str, label: &str| sample(&m, name, label).unwrap_or_else(|| panic!("no {name}{{{label}}} in the metrics"));
    Slots {
        general: get("geomirror_admin_connections", "pool=\"general\""),
        admin: get("geomirror_admin_connections", "pool=\"admin\""),
        refused_address: get("geomirror_admin_connections_refused_total", "reason=\"address_limit\""),
        refused_full: get("geomirror_admin_connections_refused_total", "reason=\"connection_limit\""),
        header_timeouts: get("geomirror_admin_timeouts_total", "kind=\"header\""),
    }
}

/// Polls the slots through `admin` until `done` holds, checking `never` on every sample.
async fn wait_for_slots(admin: &AdminClient, what: &str, done: impl Fn(&Slots) -> bool, never: impl Fn(&Slots) -> Option<String>) -> Slots {
    let (done, never) = (&done, &never);
    let found = geomirror_tests::wait::within_async(DEADLINE, geomirror_tests::wait::POLL, || async move {
        let s = slots(admin).await;
        if let Some(broken) = never(&s) {
            panic!("{broken}");
        }
        if done(&s) {
            Ok(s)
        } else {
            Err(s)
        }
    })
    .await;
    found.unwrap_or_else(|s| panic!("the slots never showed {what}: general {} admin {}", s.general, s.admin))
}

/// Waits for a slow connection's end that `matches`.
async fn wait_for_end(ends: &mut tokio::sync::mpsc::UnboundedReceiver<Ended>, what: &str, matches: impl Fn(&Ended) -> bool) -> Ended {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, ends.recv()).await {
            Ok(Some(e)) if matches(&e) => return e,
            Ok(Some(_)) => {}
            _ => panic!("no slow connection ended {what}"),
        }
    }
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Slowloris: connections that trickle their request head a line a second. One address
/// gets its share of the general slots and no more (the next is refused with a 503 that
/// says so, while another address is still served). Then enough addresses to fill the
/// general pool: an admin certificate is still answered, from its reserve, while the pool
/// is full; the others are refused with a 503 that says why and what to do. Every slow
/// connection is closed by the server once its head is late, and then a token caller is
/// served again.
#[test]
fn slow_connections_neither_lock_out_an_admin_certificate_nor_last() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_dc1, dc2, _a, _b) = sites(dir);
    let (cert, key) = admin_cert(dir);
    let rt = runtime();
    rt.block_on(async {
        let admin = client(&dc2, dir, Credentials::Certificate { cert: &cert, key: &key });
        let (ended_tx, mut ends) = tokio::sync::mpsc::unbounded_channel();
        let again = Arc::new(AtomicBool::new(true));
        let mut tricklers = Vec::new();
        let mut flood = |source: IpAddr, n: usize| {
            let c = Arc::new(client(&dc2, dir, Credentials::Anonymous).from_source(source));
            for _ in 0..n {
                tricklers.push(tokio::spawn(trickle(c.clone(), source, again.clone(), ended_tx.clone())));
            }
        };

        // One address: its share, and no more.
        let per = MAX_CONNECTIONS_PER_ADDRESS as f64;
        flood(loopback(2), MAX_CONNECTIONS_PER_ADDRESS + 3);
        wait_for_slots(
            &admin,
            "one address holding its share and refused beyond it",
            |s| s.general == per && s.refused_address >= 1.0,
            |s| (s.general > per).then(|| format!("one address holds {} general slots, over its {per}", s.general)),
        )
        .await;
        let refused = wait_for_end(&mut ends, "refused for its address", |e| e.answer.starts_with("HTTP/1.1 503")).await;
        assert_eq!(refused.source, loopback(2));
        assert!(refused.answer.contains("too many admin connections from 127.0.0.2"), "{}", refused.answer);
        // Another address is served (and refused only for want of credentials).
        let elsewhere = client(&dc2, dir, Credentials::Anonymous).from_source(loopback(3));
        assert_eq!(send(&elsewhere, "GET", "/v1/status", None).await.status, 401);

        // Enough addresses to fill the general pool: the admin certificate still gets in.
        let addresses = MAX_CONNECTIONS / MAX_CONNECTIONS_PER_ADDRESS + 1;
        for i in 0..addresses {
            flood(loopback(3 + i as u8), MAX_CONNECTIONS_PER_ADDRESS);
        }
        let full = wait_for_slots(
            &admin,
            "the general pool full while an admin certificate is served",
            |s| s.general == MAX_CONNECTIONS as f64 && s.admin >= 1.0,
            |s| {
                (s.general > MAX_CONNECTIONS as f64 || s.admin > ADMIN_RESERVED_CONNECTIONS as f64)
                    .then(|| format!("{} general and {} admin slots in use, over the limits", s.general, s.admin))
            },
        )
        .await;
        eprintln!("flood: {} general slots held, the admin's answer came from the reserve ({} in use)", full.general, full.admin);
        let status = send(&admin, "GET", "/v1/status", None).await;
        assert_eq!(status.status, 200, "{}", text(&status));
        let turned_away = wait_for_end(&mut ends, "refused for a full pool", |e| e.answer.contains("admin connections are in use")).await;
        assert!(
            turned_away.answer.starts_with("HTTP/1.1 503") && turned_away.answer.contains("use an admin certificate"),
            "{}",
            turned_away.answer
        );
        let s = slots(&admin).await;
        assert!(s.refused_full >= 1.0, "no refusal for a full pool was counted");

        // The flood stops reconnecting: every slow connection is closed by the server.
        again.store(false, Ordering::SeqCst);
        drop(ended_tx);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        for t in tricklers {
            tokio::time::timeout_at(deadline, t).await.expect("a slow connection is still open").unwrap();
        }
        let mut timed_out = 0;
        while let Some(e) = ends.recv().await {
            if e.answer.is_empty() {
                // Closed without an answer: its head was late.
                assert!(e.lines >= 1, "{e:?}");
                timed_out += 1;
            }
        }
        assert!(timed_out >= MAX_CONNECTIONS, "only {timed_out} slow connections were closed for a late head");
        let after = wait_for_slots(&admin, "every general slot free again", |s| s.general == 0.0, |_| None).await;
        assert!(after.header_timeouts >= MAX_CONNECTIONS as f64, "{} late heads counted", after.header_timeouts);
        let token = client(&dc2, dir, Credentials::Token(TOKEN.into()));
        let a = send(&token, "GET", "/v1/status", None).await;
        assert_eq!(a.status, 200, "{}", text(&a));
    });
}
