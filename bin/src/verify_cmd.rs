//! `geomirror verify` (an online comparison of the two sites' images) and `geomirror rebuild`
//! (the full sync a rebuilt peer waits for), from the command line.
//!
//! Owns: starting a verify through the admin API, following it with a progress bar, and
//! telling the operator what differs (and the exit code scripts read: 0 when the range is
//! equal on both sites, 3 when differences were found, 1 on any error (2: a usage error, from clap)).
//! Must not: compare anything itself; the primary's core does, ordered against host writes.

use crate::admin_cmd::{request, runtime, AdminArgs};
use anyhow::{bail, Result};
use geomirror_node::admin::{StatusReport, VerifyReport, VerifyStarted};
use geomirror_sim::replay::format_bytes;
use std::time::Duration;

/// What `verify` was asked.
pub struct VerifyArgs {
    pub volume: Option<String>,
    pub offset: Option<u64>,
    pub length: Option<u64>,
    pub repair: bool,
    pub no_wait: bool,
    pub cancel: bool,
    pub reason: String,
}

/// The exit code when a verify found differences, and when it was cancelled before it
/// compared the whole range (and found none in what it did).
pub const EXIT_DIFFERENT: i32 = 3;
pub const EXIT_INCOMPLETE: i32 = 4;

pub fn verify(a: AdminArgs, v: VerifyArgs) -> Result<i32> {
    let client = a.client()?;
    let rt = runtime()?;
    if v.cancel {
        let json = request(&rt, &client, "POST", "/v1/verify/cancel", Some(serde_json::json!({ "volume": v.volume })))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&json)?);
        } else if json["cancelled"].as_bool() == Some(true) {
            println!("volume {}: verify cancelled; what it found so far stays in the status", json["volume"].as_str().unwrap_or("?"));
        } else {
            println!("volume {}: no verify was running", json["volume"].as_str().unwrap_or("?"));
        }
        return Ok(0);
    }
    let before: StatusReport = serde_json::from_value(request(&rt, &client, "GET", "/v1/status", None)?)?;
    let unrepaired = before
        .volumes
        .iter()
        .find(|x| v.volume.as_ref().is_none_or(|n| *n == x.name))
        .and_then(|x| x.verify.as_ref())
        .map_or(0, |r| r.unrepaired_extents);
    let body = serde_json::json!({
        "volume": v.volume, "offset": v.offset, "length": v.length, "repair": v.repair, "reason": v.reason,
    });
    let started: VerifyStarted = serde_json::from_value(request(&rt, &client, "POST", "/v1/verify", Some(body))?)?;
    if !a.json {
        println!(
            "volume {}: verifying {} from offset {} (extents {}..{}){}",
            started.volume,
            format_bytes(started.length),
            started.offset,
            started.first_extent,
            started.end_extent,
            if started.repair { ", repairing what differs from this (the primary's) image" } else { "" }
        );
        if started.repair && unrepaired > 0 {
            println!("copying the {unrepaired} extents an earlier verify found different first (a resync), then comparing");
        }
    }
    if v.no_wait {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&started)?);
        } else {
            println!("started; follow it with `geomirror status` (or the geomirror_verify_* metrics)");
        }
        return Ok(0);
    }
    let report = |s: &StatusReport| -> Result<VerifyReport> {
        match s.volumes.iter().find(|x| x.name == started.volume).and_then(|x| x.verify.clone()) {
            Some(r) => Ok(r),
            None => bail!("volume {}: the site shows no verify any more (did it restart? a verify does not survive one)", started.volume),
        }
    };
    let bar = indicatif::ProgressBar::new(started.length.max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let r = loop {
        let s: StatusReport = serde_json::from_value(request(&rt, &client, "GET", "/v1/status", None)?)?;
        let r = report(&s)?;
        if r.done {
            break r;
        }
        bar.set_position(r.checked_bytes);
        let found = if r.out_of_sync_extents > 0 { format!(", {} extents differ", r.out_of_sync_extents) } else { String::new() };
        bar.set_message(match &r.waiting {
            Some(w) => format!("waiting: {w}{found}"),
            None => format!("verifying{found}"),
        });
        std::thread::sleep(Duration::from_millis(300));
    };
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_result(&started.volume, &r);
    }
    Ok(if r.out_of_sync_extents > 0 {
        EXIT_DIFFERENT
    } else if r.cancelled {
        EXIT_INCOMPLETE
    } else {
        0
    })
}

fn print_result(volume: &str, r: &VerifyReport) {
    if r.cancelled {
        println!(
            "volume {volume}: CANCELLED after {} of {} extents: the rest of the range was not compared",
            r.checked_extents, r.total_extents
        );
    }
    if r.out_of_sync_extents == 0 {
        let what = if r.cancelled { "no difference in the part compared" } else { "identical on both sites" };
        println!("volume {volume}: {} compared, {what}", format_bytes(r.checked_bytes));
        return;
    }
    println!(
        "volume {volume}: OUT OF SYNC: {} extent{} ({} block{} of 4 KiB) differ on the peer, in {} compared:",
        r.out_of_sync_extents,
        if r.out_of_sync_extents == 1 { "" } else { "s" },
        r.out_of_sync_blocks,
        if r.out_of_sync_blocks == 1 { "" } else { "s" },
        format_bytes(r.checked_bytes)
    );
    for [offset, len] in &r.out_of_sync_ranges {
        println!("  offset {offset}, length {len}");
    }
    if r.out_of_sync_ranges.len() >= geomirror_node::admin::MAX_LISTED_RANGES {
        println!("  (the first {} ranges only)", r.out_of_sync_ranges.len());
    }
    if r.repair {
        println!("repairing: the primary copies these extents to the peer now (follow it with `geomirror status`)");
    } else {
        println!(
            "the peer now calls its image inconsistent; run `geomirror verify --repair` to copy these extents from the primary (a reconnect or restart copies them too)"
        );
    }
}

/// `geomirror rebuild`: shows the full sync a rebuilt peer waits for, or approves it.
pub fn rebuild(a: AdminArgs, volume: Option<String>, approve: Option<String>, reason: String) -> Result<()> {
    let client = a.client()?;
    let rt = runtime()?;
    if let Some(store) = approve {
        let body = serde_json::json!({ "volume": volume, "peer_store": store, "reason": reason });
        let json = request(&rt, &client, "POST", "/v1/rebuild/approve", Some(body))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&json)?);
        } else {
            println!(
                "volume {}: approved; the full sync onto the peer's store {} starts (follow it with `geomirror status`)",
                json["volume"].as_str().unwrap_or("?"),
                json["approved"].as_str().unwrap_or("?")
            );
        }
        return Ok(());
    }
    let s: StatusReport = serde_json::from_value(request(&rt, &client, "GET", "/v1/status", None)?)?;
    if a.json {
        let plan: Vec<_> = s
            .volumes
            .iter()
            .map(|v| {
                serde_json::json!({
                    "volume": v.name, "pending_store": v.rebuild_pending_store,
                    "bytes": v.rebuild_estimate_bytes, "estimated_seconds": v.rebuild_estimated_seconds,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "site": s.site, "rebuild": plan }))?);
        return Ok(());
    }
    for v in s.volumes.iter().filter(|v| volume.as_ref().is_none_or(|n| *n == v.name)) {
        match &v.rebuild_pending_store {
            None if v.role != "primary" => println!("volume {}: this site is {}; run rebuild against the primary", v.name, v.role),
            None => println!("volume {}: no rebuild waits for approval", v.name),
            Some(store) => {
                let eta = v.rebuild_estimated_seconds.map_or(String::new(), |t| format!(", about {t:.1} s at the paced link rate"));
                println!(
                    "volume {}: the peer came back with a new store {store} (a rebuilt site). A full sync of the whole volume waits: \
                     it reads {} here and copies what differs{eta}. Meanwhile the peer is not trusted (promoting it needs --force).",
                    v.name,
                    v.rebuild_estimate_bytes.map_or("the volume".to_owned(), format_bytes)
                );
                println!("approve it with: geomirror rebuild --config <this site's config> --volume {} --approve {store}", v.name);
            }
        }
    }
    Ok(())
}
