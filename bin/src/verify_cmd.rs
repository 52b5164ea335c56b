//! `geomirror verify`: an online comparison of the two sites' images, from the command line.
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

/// The exit code when a verify found differences.
pub const EXIT_DIFFERENT: i32 = 3;

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
    Ok(if r.out_of_sync_extents > 0 { EXIT_DIFFERENT } else { 0 })
}

fn print_result(volume: &str, r: &VerifyReport) {
    if r.checked_extents < r.total_extents {
        println!("volume {volume}: the verify stopped after {} of {} extents (cancelled)", r.checked_extents, r.total_extents);
    }
    if r.out_of_sync_extents == 0 {
        println!("volume {volume}: {} compared, identical on both sites", format_bytes(r.checked_bytes));
        return;
    }
    println!(
        "volume {volume}: OUT OF SYNC: {} extents ({} blocks of 4 KiB) differ on the peer, in {} compared:",
        r.out_of_sync_extents,
        r.out_of_sync_blocks,
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
