//! Publishing a run: the machine it ran on, and the generated part of docs/benchmarks.md.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// The opening of a section's begin marker; the marker runs on to its `-->`.
fn begin_prefix(section: &str) -> String {
    format!("<!-- BEGIN {section}:")
}

fn end_marker(section: &str) -> String {
    format!("<!-- END {section} -->")
}

/// Where the generated part of `section` starts and ends in `text`.
fn span(text: &str, section: &str) -> Option<(usize, usize)> {
    let begin = text.find(&begin_prefix(section))?;
    let body = begin + text[begin..].find("-->")? + "-->".len();
    let end = body + text[body..].find(&end_marker(section))?;
    Some((body, end))
}

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

/// Checks, before a long run, that `doc` has `section`'s markers and can be written, without
/// touching it (a rewrite would mark the tree the run measures as changed).
pub fn check_docs(doc: &Path, section: &str) -> Result<()> {
    let text = std::fs::read_to_string(doc).with_context(|| format!("reading {}", doc.display()))?;
    if span(&text, section).is_none() {
        bail!("{} has no `{} ... -->` ... `{}` markers to write between", doc.display(), begin_prefix(section), end_marker(section));
    }
    std::fs::OpenOptions::new().append(true).open(doc).with_context(|| format!("{} cannot be written", doc.display()))?;
    Ok(())
}

/// Replaces what `section` of `doc` holds (between `<!-- BEGIN section: ... -->` and
/// `<!-- END section -->`) with `body`.
pub fn write_docs(doc: &Path, section: &str, body: &str) -> Result<()> {
    let text = std::fs::read_to_string(doc).with_context(|| format!("reading {}", doc.display()))?;
    let Some((begin, end)) = span(&text, section) else {
        bail!("{} has no `{} ... -->` ... `{}` markers to write between", doc.display(), begin_prefix(section), end_marker(section));
    };
    let out = format!("{}\n{}\n{}", &text[..begin], body.trim_end(), &text[end..]);
    let tmp = doc.with_extension("md.new");
    std::fs::write(&tmp, out)?;
    std::fs::rename(&tmp, doc)?;
    Ok(())
}

/// Writes a run's table into `section` of `doc`, headed by when it ran, the command, how
/// long it took, `setup` (what the run measured under; may be empty) and the machine.
pub fn publish(doc: &Path, section: &str, started: std::time::Instant, setup: &str, machine: &str, table: &str) -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let when = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output()?;
    let body = format!(
        "Run of {} (`tests/bench/run {}`, {:.0} min){setup}:\n\n{machine}\n{table}",
        String::from_utf8_lossy(&when.stdout).trim(),
        args.join(" "),
        started.elapsed().as_secs_f64() / 60.0,
    );
    write_docs(doc, section, &body)?;
    eprintln!("wrote {}", doc.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_is_replaced_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let doc = dir.path().join("b.md");
        let page = "# B\n<!-- BEGIN modes: a note -->\nold\n<!-- END modes -->\nmid\n<!-- BEGIN warm: x -->\nw\n<!-- END warm -->\ntail\n";
        std::fs::write(&doc, page).unwrap();
        write_docs(&doc, "warm", "new warm").unwrap();
        let text = std::fs::read_to_string(&doc).unwrap();
        assert_eq!(text, page.replace("\nw\n", "\nnew warm\n"));
        assert_eq!(span(&text, "modes").map(|(b, e)| &text[b..e]), Some("\nold\n"));
        assert!(write_docs(&doc, "cold", "x").unwrap_err().to_string().contains("BEGIN cold:"));
        assert!(check_docs(&doc, "cold").is_err());
        check_docs(&doc, "modes").unwrap();
        assert_eq!(std::fs::read_to_string(&doc).unwrap(), text, "a check leaves the page as it was");
    }
}
