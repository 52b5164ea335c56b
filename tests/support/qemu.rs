//! qemu-io, the NBD client the end-to-end tests write and read patterns with.
//!
//! Owns: running qemu-io's commands against an NBD URL or an image file and failing the test
//! on any failed command or pattern check. Must not: skip when qemu-io is absent (`tool`
//! fails loudly, naming the Debian package).

use crate::site::{run_ok, tool};
use std::ffi::OsStr;
use std::process::Command;

/// Runs qemu-io's `commands` (each one `-c`) against `target` (an `nbd://` URL or a raw
/// image) and returns its output; fails the test if qemu-io fails or any command reports a
/// failure (a pattern that does not verify, a write refused).
pub fn qemu_io<S: AsRef<str>>(target: impl AsRef<OsStr>, commands: &[S]) -> String {
    let out = run_ok(&mut qemu_io_command(target, commands));
    assert!(!out.contains("failed"), "qemu-io {:?}: {out}", commands.iter().map(AsRef::as_ref).collect::<Vec<_>>());
    out
}

/// qemu-io with `commands` against `target`, not yet run: for a test that expects a refusal,
/// or adds options (`-t writeback`).
pub fn qemu_io_command<S: AsRef<str>>(target: impl AsRef<OsStr>, commands: &[S]) -> Command {
    let mut cmd = tool("qemu-io", "qemu-utils");
    cmd.args(["-f", "raw"]).arg(target);
    for c in commands {
        cmd.args(["-c", c.as_ref()]);
    }
    cmd
}
