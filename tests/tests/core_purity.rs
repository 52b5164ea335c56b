//! The replication core performs no I/O: its dependency list holds none of the I/O crates,
//! and its sources never touch the file system, the network, a clock, threads, unseeded
//! randomness or iteration-order-dependent hash maps. This is what makes the simulation's
//! seeds replayable; the check reads the files themselves, so it fails on the first slip.

use std::path::PathBuf;

fn core_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lib/core")
}

#[test]
fn the_core_depends_on_no_io_crate() {
    let manifest = std::fs::read_to_string(core_dir().join("Cargo.toml")).expect("lib/core/Cargo.toml");
    let deps = manifest.split("[dependencies]").nth(1).expect("a [dependencies] table").split("\n[").next().unwrap_or("");
    let names: Vec<&str> =
        deps.lines().filter_map(|l| l.split(['=', '.']).next()).map(str::trim).filter(|n| !n.is_empty() && !n.starts_with('#')).collect();
    assert!(!names.is_empty(), "parsed no dependencies from {deps:?}");
    for forbidden in ["tokio", "quinn", "rustls", "rocksdb", "axum", "mio", "socket2", "rand", "metrics", "tracing", "libc"] {
        assert!(!names.contains(&forbidden), "lib/core depends on {forbidden}: {names:?}");
    }
    let allowed = ["bytes", "serde", "postcard", "thiserror", "sha2"];
    for n in &names {
        assert!(allowed.contains(n), "lib/core gained a dependency {n}; if it does no I/O, add it to this list deliberately");
    }
}

#[test]
fn the_core_sources_do_no_io() {
    let forbidden = [
        "std::fs",
        "std::net",
        "std::process",
        "std::thread",
        "Instant::now",
        "SystemTime",
        "HashMap",
        "HashSet",
        "thread_rng",
        "tokio",
        "println!",
        "eprintln!",
        "std::io::stdin",
    ];
    let mut checked = 0;
    for entry in std::fs::read_dir(core_dir().join("src")).expect("lib/core/src") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("source file");
        for (no, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for f in forbidden {
                assert!(!code.contains(f), "{}:{}: the core must not use {f}: {line}", path.display(), no + 1);
            }
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} core source files found");
}
