//! The initial sync of a volume that holds data (`geomirror adopt`), over `geomirror wan-emu`.
//!
//! A sparse volume with a share of it allocated (runs of random data, the rest holes) is
//! adopted on dc1; dc2 starts with a new store over
//! - `blank` media: a new disk, so every allocated block crosses;
//! - `seeded` media: a copy of dc1's in which a share of the allocated 4 KiB blocks differ
//!   (an older copy, a restored backup), so only those should cross.
//!
//! The link starts cut and is restored once both sites are up; the clock runs from then until
//! both report clean. Wire bytes are the relay's forward counter (dc1 to dc2: QUIC headers,
//! frames, digests and data). The host is idle. The floor any copy meets is the bytes that
//! must cross divided by the link's rate: the "ideal" column (`nbdcopy` or `qemu-img convert`
//! over the same path cannot be measured here: wan-emu relays UDP only, and NBD runs on TCP).
//!
//! Targets (issue 19): blank, wire bytes at most 1.05 × the allocated bytes and the link at
//! least 90 % used; seeded, wire bytes at most 1.1 × the bytes that differ.

use anyhow::{bail, Context, Result};
use geomirror_tests::admin::{clean_primary, clean_secondary, Operator};
use geomirror_tests::pair::{site_config, two_sites_with_admin_prepared, PairOptions, WanEmu};
use geomirror_tests::site::noise;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// Allocated data comes in runs of this size, spread evenly over the volume.
const RUN: u64 = 4 * MIB;
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

pub struct Options {
    pub size_bytes: u64,
    pub allocated_percent: u64,
    pub seeded_diff_permille: u64,
    pub rtt_ms: u64,
    pub rate_mbps: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Case {
    Blank,
    Seeded,
}

pub struct Row {
    case: Case,
    allocated: u64,
    must_cross: u64,
    wire: u64,
    seconds: f64,
    copied: u64,
    rate_bytes_s: f64,
}

/// Writes the primary's image (and, seeded, the secondary's copy); returns the allocated
/// bytes and the bytes that must cross.
fn make_images(dir: &Path, o: &Options, case: Case) -> Result<(u64, u64)> {
    let runs = o.size_bytes / RUN;
    let every = (100 / o.allocated_percent.clamp(1, 100)).max(1);
    let img = std::fs::File::create(dir.join("dc1.img"))?;
    img.set_len(o.size_bytes)?;
    let copy = std::fs::File::create(dir.join("dc2.img"))?;
    copy.set_len(o.size_bytes)?;
    let mut allocated = 0;
    let mut differ = 0;
    let mut seed = 0x5eed_u64;
    for r in (0..runs).step_by(every as usize) {
        let data = noise(r + 1, RUN as usize);
        img.write_all_at(&data, r * RUN)?;
        allocated += RUN;
        if case == Case::Seeded {
            copy.write_all_at(&data, r * RUN)?;
            // Each block of the run differs with the chance asked, drawn deterministically.
            for b in 0..RUN / BLOCK {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                if seed % 1000 < o.seeded_diff_permille {
                    copy.write_all_at(&noise(seed, BLOCK as usize), r * RUN + b * BLOCK)?;
                    differ += BLOCK;
                }
            }
        }
    }
    img.sync_all()?;
    copy.sync_all()?;
    Ok((allocated, if case == Case::Seeded { differ } else { allocated }))
}

fn forward_bytes(emu: &WanEmu) -> Result<u64> {
    let status = emu.command("status");
    let forward = status.split("forward:").nth(1).context("no forward counters in wan-emu status")?;
    let bytes = forward.split_whitespace().find_map(|w| w.strip_prefix("bytes=")).context("no bytes= in wan-emu status")?;
    Ok(bytes.parse()?)
}

fn one(bin: &Path, o: &Options, case: Case) -> Result<Row> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let size = format!("{}M", o.size_bytes / MIB);
    let wan = ["--rtt-ms", &o.rtt_ms.to_string(), "--rate-mbps", &o.rate_mbps.to_string()].map(String::from).to_vec();
    let link = format!("rtt_ms = {}\nbandwidth_mbps = {}\nidle_timeout_ms = 5000\n", o.rtt_ms, o.rate_mbps);
    let opts = PairOptions { size, wan, link, start_cut: true, ..PairOptions::default() };
    let mut sizes = None;
    let mut made = Ok(());
    let (dc1, dc2, to_dc2, _to_dc1) = two_sites_with_admin_prepared(bin, dir, TOKEN, opts.clone(), |dir| {
        made = make_images(dir, o, case).map(|s| sizes = Some(s));
        let cfg = site_config(dir, "dc1", "dc2", "primary", 0, 9, &opts);
        let out = std::process::Command::new(bin).args(["adopt", "--config"]).arg(cfg).output().expect("run geomirror adopt");
        assert!(out.status.success(), "adopt: {}", String::from_utf8_lossy(&out.stderr));
    });
    made?;
    let (allocated, must_cross) = sizes.context("images not made")?;
    let op = Operator::new(bin, dir);
    let before = forward_bytes(&to_dc2)?;
    let t0 = Instant::now();
    to_dc2.set_cut(false);
    let limit = Duration::from_secs(3600);
    let v1 = op.wait_for(limit, "dc1", "clean once the copy ended", clean_primary);
    op.wait_for(limit, "dc2", "clean once the copy ended", clean_secondary);
    let seconds = t0.elapsed().as_secs_f64();
    let wire = forward_bytes(&to_dc2)? - before;
    let copied = v1["resync_bytes_copied"].as_u64().unwrap_or(0);
    geomirror_tests::pair::stop_both_and_compare(dir, dc1, dc2);
    let rate_bytes_s = o.rate_mbps as f64 * 1e6 / 8.0;
    Ok(Row { case, allocated, must_cross, wire, seconds, copied, rate_bytes_s })
}

pub fn run(bin: &Path, o: &Options, cases: &[Case]) -> Result<Vec<Row>> {
    if o.size_bytes < RUN || !o.size_bytes.is_multiple_of(RUN) {
        bail!("--size must be a multiple of 4 MiB");
    }
    let mut rows = Vec::new();
    for case in cases {
        eprintln!("sync: {case:?} secondary, {} MiB volume, {}% allocated", o.size_bytes / MIB, o.allocated_percent);
        rows.push(one(bin, o, *case)?);
    }
    Ok(rows)
}

pub fn markdown(rows: &[Row], o: &Options) -> String {
    let mib = |b: u64| b as f64 / MIB as f64;
    let mut t = String::from(
        "| secondary | allocated | must cross | wire bytes | wire / must cross | target | data copied | time | ideal time | link used |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ratio = r.wire as f64 / r.must_cross.max(1) as f64;
        let (target, met) = match r.case {
            Case::Blank => (1.05, ratio <= 1.05),
            Case::Seeded => (1.1, ratio <= 1.1),
        };
        let ideal = r.must_cross as f64 / r.rate_bytes_s;
        let used = r.wire as f64 / r.seconds / r.rate_bytes_s;
        t.push_str(&format!(
            "| {} | {:.0} MiB | {:.1} MiB | {:.1} MiB | {ratio:.3} | ≤ {target} {} | {:.1} MiB | {:.1} s | {ideal:.1} s | {:.0} %{} |\n",
            match r.case {
                Case::Blank => "blank",
                Case::Seeded => "seeded",
            },
            mib(r.allocated),
            mib(r.must_cross),
            mib(r.wire),
            if met { "met" } else { "**not met**" },
            mib(r.copied),
            r.seconds,
            used * 100.0,
            if r.case == Case::Blank {
                if used >= 0.9 {
                    " (≥ 90 %: met)"
                } else {
                    " (≥ 90 %: **not met**)"
                }
            } else {
                ""
            },
        ));
    }
    t.push_str(&format!(
        "\n{} MiB volume, {} % allocated in runs of 4 MiB; seeded: {:.1} % of the allocated 4 KiB blocks differ; {} ms RTT, {} Mbit/s; host idle.\n",
        o.size_bytes / MIB,
        o.allocated_percent,
        o.seeded_diff_permille as f64 / 10.0,
        o.rtt_ms,
        o.rate_mbps
    ));
    t
}
