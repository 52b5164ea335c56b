//! `geomirror status|promote|demote`: the admin API from the command line.
//!
//! Owns: finding the site (from its config file or from flags), the credentials, and the
//! human-readable rendering of the API's JSON (`--json` prints it as is).

use anyhow::{bail, Context, Result};
use clap::Args;
use geomirror_node::admin::{StatusReport, TransitionReport};
use geomirror_node::admin_client::{AdminClient, Credentials};
use geomirror_sim::replay::format_bytes;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Which site to talk to, and as whom.
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The site's config file: the admin address ([admin] listen), the CA ([tls] ca) and the
    /// site's name come from it. Without it, give --address, --site and --ca.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The admin API's address, host:port (default: [admin] listen of --config).
    #[arg(long)]
    address: Option<SocketAddr>,
    /// The site's name, which its certificate carries (default: [site] name of --config).
    #[arg(long)]
    site: Option<String>,
    /// The deployment's CA certificate (default: [tls] ca of --config).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// An admin certificate (from `geomirror certs --admin NAME`), with --key.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The admin certificate's private key.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// A file holding the bearer token of the site's [admin] token_file, instead of a
    /// certificate. Default with --config and no --cert: that token_file itself, if
    /// readable.
    #[arg(long, conflicts_with = "cert")]
    token_file: Option<PathBuf>,
    /// Print the API's JSON answer instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

impl AdminArgs {
    pub(crate) fn client(&self) -> Result<AdminClient> {
        let cfg = match &self.config {
            Some(path) => Some(geomirror_node::config::SiteConfig::load(path)?),
            None => None,
        };
        let address = match (self.address, cfg.as_ref().and_then(|c| c.admin.as_ref())) {
            (Some(a), _) => a,
            (None, Some(a)) => a.listen,
            (None, None) => bail!("which site? give --config (a site with a [peer] has an admin API) or --address"),
        };
        let site = match (&self.site, &cfg) {
            (Some(s), _) => s.clone(),
            (None, Some(c)) => c.name.clone(),
            (None, None) => bail!("give --site: the name the site's certificate carries"),
        };
        let ca = match (&self.ca, cfg.as_ref().and_then(|c| c.peer.as_ref())) {
            (Some(c), _) => c.clone(),
            (None, Some(p)) => p.ca.clone(),
            (None, None) => bail!("give --ca: the deployment's CA certificate"),
        };
        // Without credentials, an operator on the site's host may use the site's own token file.
        let site_token = cfg.as_ref().and_then(|c| c.admin.as_ref()).and_then(|a| a.token_file.clone());
        let credentials = match (&self.cert, &self.key, self.token_file.as_ref().or(site_token.as_ref())) {
            (Some(cert), Some(key), _) => Credentials::Certificate { cert, key },
            (_, _, Some(t)) => {
                let token = std::fs::read_to_string(t).with_context(|| format!("reading the token file {}", t.display()))?;
                Credentials::Token(token.trim().to_owned())
            }
            _ => bail!(
                "who are you? give --cert and --key (an admin certificate) or --token-file (or --config of a site whose [admin] token_file you can read)"
            ),
        };
        AdminClient::new(address, &site, &ca, credentials)
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("start the async runtime")
}

/// Makes one call with `client`; an error answer becomes an error with the API's sentence.
pub(crate) fn request(
    rt: &tokio::runtime::Runtime,
    client: &AdminClient,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value> {
    let (status, json) = rt.block_on(client.call(method, path, body))?;
    if !(200..300).contains(&status) {
        let why = json.get("error").and_then(|e| e.as_str()).map_or_else(|| json.to_string(), str::to_owned);
        bail!("the site refused ({status}): {why}");
    }
    Ok(json)
}

/// One call to the site `a` names.
fn call(a: &AdminArgs, method: &str, path: &str, body: Option<serde_json::Value>) -> Result<serde_json::Value> {
    request(&runtime()?, &a.client()?, method, path, body)
}

/// Prints the API's JSON with --json, else the sentence `text` makes of it.
fn answer(a: &AdminArgs, json: &serde_json::Value, text: impl FnOnce(&serde_json::Value) -> String) -> Result<()> {
    if a.json {
        println!("{}", serde_json::to_string_pretty(json)?);
    } else {
        println!("{}", text(json));
    }
    Ok(())
}

pub fn status(a: AdminArgs) -> Result<()> {
    let json = call(&a, "GET", "/v1/status", None)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    let s: StatusReport = serde_json::from_value(json)?;
    println!("site {}{}", s.site, s.peer.map_or(String::new(), |p| format!(" (peer {p})")));
    for v in &s.volumes {
        println!("volume {}: {} of epoch {}, {}", v.name, v.role, v.epoch, v.phase);
        println!("  store: {}{}", v.store_id, v.peer_store.as_deref().map_or(String::new(), |p| format!(" (its peer's: {p})")));
        if v.role == "primary" {
            println!("  link: {}", if v.link_up { "up" } else { "DOWN" });
            let sync = if v.writes > 0 { 100.0 * v.misses as f64 / v.writes as f64 } else { 0.0 };
            println!("  writes: {} ({} hits, {} misses: {sync:.1}% waited for a record update)", v.writes, v.hits, v.misses);
            println!(
                "  record: {} extents ({}), round trip {:.1} ms on average",
                v.record_extents,
                format_bytes(v.record_bytes),
                v.record_rtt_avg_ms
            );
            println!(
                "  lag: {} not yet applied on the peer, the oldest written {:.1} s ago{}",
                format_bytes(v.lag_bytes),
                v.lag_seconds,
                if v.drained { " (drained)" } else { "" }
            );
            println!("  failback debt: {} would be copied back after a failover now", format_bytes(v.failback_debt_bytes));
            if v.amnesiac {
                println!(
                    "  THE PEER IS AN AMNESIAC: {}",
                    v.amnesia_reason
                        .as_deref()
                        .unwrap_or("this site owes it a full verified resync (an adopted volume, or its store is not trusted)")
                );
                match (v.full_resync_checked_extents, v.full_resync_total_extents) {
                    (Some(c), Some(t)) => {
                        let resumed = v.sync_cursor_extent.map_or(String::new(), |r| format!(" (resumed at extent {r})"));
                        let left = v.full_resync_remaining_bytes.map_or(String::new(), |b| {
                            let eta = v.full_resync_eta_seconds.map_or(String::new(), |s| format!(", about {s:.0} s at its rate so far"));
                            format!("; {} left to check or copy{eta}", format_bytes(b))
                        });
                        println!(
                            "  full verified resync: {c} of {t} extents checked{resumed}{left}; its record is not trusted until it ends"
                        )
                    }
                    _ if v.rebuild_pending_store.is_some() => {}
                    _ if v.link_up => println!("  a full verified resync is owed to it and starts at once"),
                    _ => println!("  a full verified resync is owed to it and starts once the link is up"),
                }
            }
            if let Some(store) = &v.rebuild_pending_store {
                println!(
                    "  REBUILD WAITS FOR APPROVAL: the peer came back with a new store {store}; its full sync starts once approved (geomirror rebuild --config <this site's config> --approve {store})"
                );
            }
            if let Some(r) = &v.verify {
                let what = match (r.done, r.cancelled) {
                    (true, true) => "last verify (cancelled)",
                    (true, false) => "last verify",
                    (false, true) => "verify (cancelling: answering the checks already sent)",
                    (false, false) => "verify",
                };
                let waiting = r.waiting.as_deref().map_or(String::new(), |w| format!(" (waiting: {w})"));
                println!(
                    "  {what}: {} of {} extents compared{}, {} differ ({} blocks of 4 KiB){waiting}",
                    r.checked_extents,
                    r.total_extents,
                    if r.repair { " with repair" } else { "" },
                    r.out_of_sync_extents,
                    r.out_of_sync_blocks
                );
            }
            if v.verify.as_ref().is_some_and(|r| r.unrepaired_extents > 0) {
                let n = v.verify.as_ref().map_or(0, |r| r.unrepaired_extents);
                println!(
                    "  OUT OF SYNC: {n} extents a verify found different wait for a resync (geomirror verify --repair copies them now)"
                );
            }
            if v.resync_in_progress {
                println!(
                    "  resync: {} copied, {} checked by digest ({} of {} extents found different), {} to go",
                    format_bytes(v.resync_bytes_copied),
                    format_bytes(v.resync_bytes_verified),
                    v.resync_extents_mismatched,
                    v.resync_extents_verified,
                    format_bytes(v.resync_remaining_bytes)
                );
            }
        } else {
            println!("  link: {}", if v.link_up { "a primary is connected" } else { "no primary connected" });
            println!("  record: {} extents ({}), applied through {}", v.record_extents, format_bytes(v.record_bytes), v.applied);
            println!(
                "  image: {}",
                match (v.consistent && !v.amnesiac, v.authoritative && !v.amnesiac) {
                    (true, true) => "consistent, record authoritative: in sync with its primary up to what it applied",
                    (true, false) => "consistent, record NOT authoritative",
                    (false, _) if v.amnesiac => "inconsistent (syncing): not trusted until its primary's full verified resync ends (a rebuild may first wait for an operator's approval on the primary)",
                    (false, _) =>
                        "inconsistent: a resync is under way, or a verify found extents that differ (the next resync copies them)",
                }
            );
            if v.amnesiac {
                println!(
                    "  AMNESIAC: {}. Nothing it says about its image is trusted until its primary's full verified resync ends; \
                     promote refuses without --force (docs/operations.md, \"Amnesia\")",
                    v.amnesia_reason
                        .as_deref()
                        .unwrap_or("this store lost state it had acknowledged, or was created over media that held data")
                );
                if let Some(c) = v.sync_cursor_extent {
                    println!("  sync cursor: extents below {c} are synced (durable: a resync resumed after a restart or a link loss starts there)");
                }
            } else if !v.authoritative {
                println!(
                    "  THE RECORD IS NOT AUTHORITATIVE: it may not name every extent that differs from the primary (a failback or \
                     resync under way, a degrade or a link loss under on_link_loss = \"degrade\", or no primary has vouched \
                     for this store yet); it becomes so once its primary's dirty map is empty"
                );
            }
            if !v.consistent {
                println!("  the image is not a prefix of the primary's history until that resync ends; a promotion now says so loudly");
            }
            if v.extents_saved_aside > 0 {
                println!("  {} extent(s) saved aside before a resync overwrote them", v.extents_saved_aside);
            }
        }
        for f in &v.aside_files {
            println!("  saved aside: {} extent(s) in {}", f.extents, f.path);
        }
        if v.split_brain {
            println!("  SPLIT BRAIN: both sites accepted writes under different epochs; see docs/operations.md");
        }
        if v.failed {
            println!("  FAILED: a media or store error stopped this volume; restart the site");
        }
    }
    Ok(())
}

fn print_transition(a: &AdminArgs, json: serde_json::Value, verb: &str) -> Result<()> {
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    let r: TransitionReport = serde_json::from_value(json)?;
    for v in &r.volumes {
        if v.changed {
            println!("site {} volume {}: {verb}: now {} of epoch {}", r.site, v.name, v.role, v.epoch);
        } else {
            println!("site {} volume {}: already {} of epoch {}; nothing changed", r.site, v.name, v.role, v.epoch);
        }
        if let Some(n) = v.record_extents {
            println!("  the failback set starts as the record: {n} extent(s)");
        }
        if let Some(w) = &v.warning {
            eprintln!("  WARNING: {w}");
        }
    }
    Ok(())
}

pub fn promote(a: AdminArgs, force: bool, reason: String) -> Result<()> {
    let body = serde_json::json!({ "force": force, "reason": reason });
    let json = call(&a, "POST", "/v1/promote", Some(body))?;
    print_transition(&a, json, "promoted")
}

pub fn resolve_split_brain(a: AdminArgs, reason: String) -> Result<()> {
    let json = call(&a, "POST", "/v1/resolve-split-brain", Some(serde_json::json!({ "reason": reason })))?;
    answer(&a, &json, |j| {
        format!("split brain resolved: {} keeps its data; its peer saves its own aside and is resynced", j["site"].as_str().unwrap_or("?"))
    })
}

pub fn resume(a: AdminArgs, reason: String) -> Result<()> {
    let json = call(&a, "POST", "/v1/resume", Some(serde_json::json!({ "reason": reason })))?;
    answer(&a, &json, |j| format!("{} takes writes again", j["site"].as_str().unwrap_or("the site")))
}

pub fn demote(a: AdminArgs, reason: String, drain_timeout_secs: u64) -> Result<()> {
    let body = serde_json::json!({ "reason": reason, "drain_timeout_secs": drain_timeout_secs });
    let json = call(&a, "POST", "/v1/demote", Some(body))?;
    print_transition(&a, json, "demoted")
}

pub fn failback(a: AdminArgs, dry_run: bool) -> Result<()> {
    let client = a.client()?;
    let rt = runtime()?;
    let status = |c: &AdminClient| -> Result<StatusReport> { Ok(serde_json::from_value(request(&rt, c, "GET", "/v1/status", None)?)?) };
    let s = status(&client)?;
    if s.volumes.iter().any(|v| v.role != "primary") {
        bail!("{} is not the primary: run failback against the site that was promoted (the old primary rejoins as its secondary)", s.site);
    }
    if dry_run {
        if a.json {
            let plan: Vec<_> = s
                .volumes
                .iter()
                .map(|v| serde_json::json!({ "volume": v.name, "bytes": v.resync_remaining_bytes, "estimated_seconds": v.resync_estimated_seconds }))
                .collect();
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "site": s.site, "failback": plan }))?);
            return Ok(());
        }
        for v in &s.volumes {
            let eta = v.resync_estimated_seconds.map_or(String::new(), |t| format!(", about {t:.0} s at the paced link rate"));
            println!(
                "volume {}: a failback now copies at most {}{eta}; with verify_failback (the default) it reads that much on both sites and copies only the extents that differ",
                v.name,
                format_bytes(v.resync_remaining_bytes)
            );
        }
        return Ok(());
    }
    // The failback itself runs in the site as soon as the old primary is connected as a
    // secondary; this follows it until every volume is drained onto the peer.
    // Progress counts extents checked by digest (equal ones cross the WAN as 32 bytes) as
    // well as those copied. The site counts bytes as it queues them for the peer, so the
    // bar's position is what was queued and "to go" what the peer has yet to apply.
    let queued = |s: &StatusReport| s.volumes.iter().map(|v| v.resync_bytes_copied + v.resync_bytes_verified).sum::<u64>();
    let finished = |s: &StatusReport| s.volumes.iter().all(|v| v.link_up && v.drained && !v.resync_in_progress);
    let already = finished(&s);
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let start = queued(&s);
    let mut s = s;
    while !finished(&s) {
        let progressed = queued(&s) - start;
        let remaining: u64 = s.volumes.iter().map(|v| v.resync_remaining_bytes).sum();
        bar.set_length((progressed + remaining).max(1));
        bar.set_position(progressed);
        let linked = s.volumes.iter().all(|v| v.link_up);
        bar.set_message(if linked { "failing back" } else { "waiting for the old primary to connect" });
        std::thread::sleep(std::time::Duration::from_millis(500));
        s = status(&client)?;
    }
    bar.finish_and_clear();
    // Totals since this site started: a failback that ended before this command ran (it
    // starts by itself) is reported too, and nothing is subtracted.
    let copied: u64 = s.volumes.iter().map(|v| v.resync_bytes_copied).sum();
    let checked: u64 = s.volumes.iter().map(|v| v.resync_bytes_verified).sum();
    let differed: u64 = s.volumes.iter().map(|v| v.resync_extents_mismatched).sum();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "site": s.site, "done": true, "already_done": already,
                "copied_bytes": copied, "checked_bytes": checked, "extents_found_different": differed,
            }))?
        );
    } else if copied + checked == 0 {
        println!("nothing to fail back: the peer is connected and has applied every write of this site; both sites hold the same data");
    } else {
        println!(
            "failback {}done: since {} started it copied {}, and checked {} by digest on both sites ({differed} extent(s) found different); \
             the peer has applied all of it, so both sites hold the same data",
            if already { "already " } else { "" },
            s.site,
            format_bytes(copied),
            format_bytes(checked),
        );
    }
    Ok(())
}

/// The peer of a switchover: its config file (for its admin address, name and CA).
#[derive(Args, Debug)]
pub struct PeerArgs {
    /// The other site's config file (the one to become primary).
    #[arg(long)]
    peer_config: Option<PathBuf>,
    /// The other site's admin address (default: [admin] listen of --peer-config).
    #[arg(long)]
    peer_address: Option<SocketAddr>,
    /// The other site's name (default: [site] name of --peer-config).
    #[arg(long)]
    peer_site: Option<String>,
}

pub fn switchover(a: AdminArgs, peer: PeerArgs, reason: String, drain_timeout: u64) -> Result<()> {
    let primary = a.client()?;
    let peer_args = AdminArgs {
        config: peer.peer_config,
        address: peer.peer_address,
        site: peer.peer_site,
        ca: a.ca.clone(),
        cert: a.cert.clone(),
        key: a.key.clone(),
        token_file: a.token_file.clone(),
        json: a.json,
    };
    let secondary = peer_args.client()?;
    let rt = runtime()?;
    let call = |c: &AdminClient, method: &str, path: &str, body: Option<serde_json::Value>| request(&rt, c, method, path, body);
    let body = serde_json::json!({ "reason": reason, "drain_timeout_secs": drain_timeout });
    eprintln!("1/4 draining the primary (writes wait) until its peer holds every write");
    let drained: geomirror_node::admin::DrainReport =
        serde_json::from_value(call(&primary, "POST", "/v1/drain", Some(body.clone())).context("drain")?)?;
    eprintln!("2/4 comparing the recorded extents on both sites");
    for v in &drained.volumes {
        let mut differ = Vec::new();
        for chunk in v.record.chunks(geomirror_node::admin::limits::MAX_CHECKSUM_EXTENTS) {
            let req = serde_json::json!({ "volume": v.name, "extents": chunk });
            let here = call(&primary, "POST", "/v1/checksums", Some(req.clone()))?;
            let there = call(&secondary, "POST", "/v1/checksums", Some(req))?;
            for (i, (x, y)) in
                here["crc32c"].as_array().into_iter().flatten().zip(there["crc32c"].as_array().into_iter().flatten()).enumerate()
            {
                if x != y {
                    differ.push(chunk[i]);
                }
            }
        }
        if !differ.is_empty() {
            let _ = call(&primary, "POST", "/v1/resume", Some(body.clone()));
            bail!(
                "volume {}: {} recorded extent(s) differ between the sites ({:?}...); switchover abandoned, the primary serves again",
                v.name,
                differ.len(),
                &differ[..differ.len().min(8)]
            );
        }
        eprintln!("    volume {}: {} recorded extent(s) equal", v.name, v.record.len());
    }
    eprintln!("3/4 demoting the primary");
    call(&primary, "POST", "/v1/demote", Some(body.clone())).context("demote")?;
    eprintln!("4/4 promoting its peer");
    // The old primary was just demoted by this command, so its session may still look alive
    // to the peer for a moment: that is not two writers.
    let promote = serde_json::json!({ "reason": reason, "force": true });
    let json = call(&secondary, "POST", "/v1/promote", Some(promote)).context("promote")?;
    let r: TransitionReport = serde_json::from_value(json.clone())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        for v in &r.volumes {
            println!("switchover done: site {} volume {} is primary of epoch {}", r.site, v.name, v.epoch);
        }
    }
    Ok(())
}
