//! Publishing a run: the machine it ran on, and the generated part of docs/benchmarks.md.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

pub const BEGIN: &str = "<!-- BEGIN modes: written by `tests/bench/run modes`; a run replaces everything up to END -->";
pub const END: &str = "<!-- END modes -->";

/// The machine, the tools and the code a run measured, as Markdown list items.
pub fn machine(scratch: &Path) -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map_or("unknown CPU", |m| m.trim_start_matches([' ', '\t', ':']));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = read("/proc/meminfo");
    let mem_kib: u64 =
        meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0);
    let first_line = |cmd: &mut Command| {
        cmd.output().ok().map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string()).unwrap_or_default()
    };
    let fs = first_line(Command::new("stat").args(["-f", "-c", "%T"]).arg(scratch));
    let commit = first_line(Command::new("git").args(["rev-parse", "--short", "HEAD"]));
    let dirty = !first_line(Command::new("git").args(["status", "--porcelain", "--untracked-files=no"])).is_empty();
    format!(
        "- {cores} vCPU ({cpu}), {:.0} GiB of memory, Linux {}, scratch files on {fs}\n\
         - {}, {}\n\
         - geomirror at commit {commit}{}\n",
        mem_kib as f64 / (1 << 20) as f64,
        read("/proc/sys/kernel/osrelease").trim(),
        first_line(Command::new("fio").arg("--version")),
        first_line(Command::new("qemu-img").arg("--version")),
        if dirty { " with uncommitted changes" } else { "" },
    )
}

/// Replaces the part of `doc` between the markers with `body`.
pub fn write_docs(doc: &Path, body: &str) -> Result<()> {
    let text = std::fs::read_to_string(doc).with_context(|| format!("reading {}", doc.display()))?;
    let (Some(begin), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        bail!("{} has no {BEGIN} ... {END} markers to write between", doc.display());
    };
    if end < begin {
        bail!("{}: the END marker comes before BEGIN", doc.display());
    }
    let out = format!("{}{BEGIN}\n{}\n{}", &text[..begin], body.trim_end(), &text[end..]);
    let tmp = doc.with_extension("md.new");
    std::fs::write(&tmp, out)?;
    std::fs::rename(&tmp, doc)?;
    Ok(())
}
