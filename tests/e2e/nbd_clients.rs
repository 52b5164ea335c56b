//! Real NBD clients against a real `geomirror run`: qemu-io, qemu-img, nbdinfo, nbdcopy and
//! fio's nbd engine. Each test keeps its own model of what the volume must hold and checks
//! it against what the clients read and against the media file itself once the site has
//! stopped.

use geomirror_tests::qemu::qemu_io;
use geomirror_tests::site::{run_ok, tool, Site};
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_geomirror");
const MIB: u64 = 1 << 20;

fn one_volume(size: &str) -> String {
    format!("[[volume]]\nname = \"vol0\"\nmedia = \"vol0.img\"\nsize = \"{size}\"\n")
}

/// A deterministic pseudo-random buffer (xorshift), so a failure can be reproduced.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {i}: {:#04x} != {:#04x}", a[i], b[i]);
    }
}

#[test]
fn qemu_io_patterns_at_many_offsets_sizes_with_fua_flush_zero_and_discard() {
    let mut site = Site::start(Path::new(BIN), &one_volume("64M"));
    let url = site.url("vol0").to_owned();
    let mut model = vec![0u8; 64 * MIB as usize];
    // (offset, length, pattern, FUA): aligned and unaligned, tiny to the maximum block size,
    // across extent boundaries and up to the last byte of the volume.
    let writes: &[(u64, u64, u8, bool)] = &[
        (0, 4096, 0x11, false),
        (512, 512, 0x22, true),
        (MIB - 4096, 8192, 0x33, false),
        (3 * MIB + 1, 65535, 0x44, true),
        (8 * MIB, 32 * MIB, 0x55, false),
        (64 * MIB - 4096, 4096, 0x66, true),
        (64 * MIB - 1, 1, 0x77, false),
    ];
    let mut commands = Vec::new();
    for (off, len, pat, fua) in writes {
        commands.push(format!("write {} -P {pat:#x} {off} {len}", if *fua { "-f" } else { "" }));
        model[*off as usize..(*off + *len) as usize].fill(*pat);
    }
    commands.push("flush".into());
    // Zeroing and discard read back as zeros.
    commands.push(format!("write -z {} {}", 8 * MIB + 4096, 64 << 10));
    commands.push(format!("discard {} {}", 20 * MIB, MIB));
    model[(8 * MIB + 4096) as usize..(8 * MIB + 4096 + (64 << 10)) as usize].fill(0);
    model[(20 * MIB) as usize..(21 * MIB) as usize].fill(0);
    qemu_io(&url, &commands);

    // Read back every range with pattern verification, in a second client.
    let mut reads = Vec::new();
    for (off, len, _, _) in writes {
        let (off, len) = (*off as usize, *len as usize);
        // Each maximal run of one byte value inside the written range, as the model has it.
        let mut i = off;
        while i < off + len {
            let j = (i..off + len).find(|k| model[*k] != model[i]).unwrap_or(off + len);
            reads.push(format!("read -P {:#x} {i} {}", model[i], j - i));
            i = j;
        }
    }
    reads.push("read -P 0 4096 4096".into());
    qemu_io(&url, &reads);

    // The media file holds exactly the model once the site has stopped.
    let (status, log) = site.stop();
    assert!(status.success(), "{log}");
    assert_same(&std::fs::read(site.path("vol0.img")).unwrap(), &model, "media file after stop");
}

#[test]
fn data_survives_a_restart() {
    let mut site = Site::start(Path::new(BIN), &one_volume("16M"));
    qemu_io(site.url("vol0"), &["write -P 0x5a 1048576 1048576"]);
    site.restart();
    qemu_io(site.url("vol0"), &["read -P 0x5a 1048576 1048576", "read -P 0 0 1048576"]);
}

#[test]
fn qemu_img_convert_of_a_filesystem_image_then_compare() {
    let site = Site::start(Path::new(BIN), &one_volume("64M"));
    let url = site.url("vol0");
    // A real ext4 image, populated from a directory of files of assorted sizes.
    let tree = site.path("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    for (i, size) in [0usize, 1, 4095, 4097, 100_000, 3 << 20].iter().enumerate() {
        std::fs::write(tree.join(format!("a/f{i}")), noise(*size, i as u64 + 1)).unwrap();
        std::fs::write(tree.join(format!("a/b/g{i}")), noise(*size / 2, i as u64 + 100)).unwrap();
    }
    let raw = site.path("fs.img");
    run_ok(tool("mkfs.ext4", "e2fsprogs").args(["-q", "-F", "-d"]).arg(&tree).arg(&raw).arg("64M"));
    // As qcow2 too, so that qemu-img finds and writes zero runs (WRITE_ZEROES) as well.
    let qcow = site.path("fs.qcow2");
    run_ok(tool("qemu-img", "qemu-utils").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow));
    run_ok(tool("qemu-img", "qemu-utils").args(["convert", "-n", "-f", "qcow2", "-O", "raw"]).arg(&qcow).arg(url));
    let out = run_ok(tool("qemu-img", "qemu-utils").args(["compare", "-f", "raw", "-F", "raw"]).arg(&raw).arg(url));
    assert!(out.contains("Images are identical"), "{out}");
    // And the filesystem on the export is sound.
    let copy = site.path("back.img");
    run_ok(tool("qemu-img", "qemu-utils").args(["convert", "-f", "raw", "-O", "raw", url]).arg(&copy));
    run_ok(tool("e2fsck", "e2fsprogs").args(["-f", "-n"]).arg(&copy));
}

#[test]
fn nbdinfo_lists_every_export_with_its_size_and_block_sizes() {
    let config =
        format!("{}[[volume]]\nname = \"logs\"\nmedia = \"logs.img\"\nsize = \"12M\"\ndescription = \"log volume\"\n", one_volume("64M"));
    let site = Site::start(Path::new(BIN), &config);
    let out = run_ok(tool("nbdinfo", "libnbd-bin").args(["--list", "--json", &format!("nbd://{}", site.addr)]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let exports = json["exports"].as_array().expect("exports");
    let found: Vec<(String, u64)> =
        exports.iter().map(|e| (e["export-name"].as_str().unwrap().to_owned(), e["export-size"].as_u64().unwrap())).collect();
    assert_eq!(found, vec![("vol0".to_owned(), 64 * MIB), ("logs".to_owned(), 12 * MIB)]);
    let logs = &exports[1];
    assert_eq!(logs["description"], "log volume");
    assert_eq!(logs["block_size_minimum"], 1);
    assert_eq!(logs["block_size_preferred"], 4096);
    assert_eq!(logs["block_size_maximum"], 32 * MIB);
    assert_eq!(logs["can_multi_conn"], true);
    assert_eq!(logs["can_fua"], true);
}

#[test]
fn nbdcopy_copies_in_and_out_over_several_connections() {
    let mut site = Site::start(Path::new(BIN), &one_volume("48M"));
    let url = site.url("vol0").to_owned();
    let input = site.path("in.bin");
    let data = noise(48 * MIB as usize, 7);
    std::fs::write(&input, &data).unwrap();
    // Four connections (the export advertises multi-conn), many requests in flight each.
    run_ok(tool("nbdcopy", "libnbd-bin").args(["--connections=4", "--requests=16", "--flush"]).arg(&input).arg(&url));
    let output = site.path("out.bin");
    run_ok(tool("nbdcopy", "libnbd-bin").args(["--connections=4"]).arg(&url).arg(&output));
    assert_same(&std::fs::read(&output).unwrap(), &data, "copied out");
    let (status, log) = site.stop();
    assert!(status.success(), "{log}");
    assert_same(&std::fs::read(site.path("vol0.img")).unwrap(), &data, "media file");
}

fn fio(site: &Site, url: &str, args: &[&str]) -> serde_json::Value {
    let mut cmd = tool("fio", "fio");
    // fio leaves a verify state file in its working directory.
    cmd.current_dir(&site.dir);
    cmd.args(["--name=verify", "--ioengine=nbd", &format!("--uri={url}"), "--output-format=json"]).args(args);
    let out = run_ok(&mut cmd);
    // The nbd engine may print a line before the JSON document.
    let json = &out[out.find('{').unwrap_or_else(|| panic!("no JSON from fio: {out}"))..];
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn fio_random_writes_at_queue_depth_32_verify_with_crc32c() {
    let site = Site::start(Path::new(BIN), &one_volume("64M"));
    for args in [
        ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=64m"],
        ["--rw=randwrite", "--bsrange=512-256k", "--iodepth=32", "--size=64m"],
        ["--rw=write", "--bs=1m", "--iodepth=8", "--size=64m"],
    ] {
        let mut all = args.to_vec();
        all.extend(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randrepeat=1"]);
        let job = &fio(&site, site.url("vol0"), &all)["jobs"][0];
        assert_eq!(job["error"], 0, "{args:?}: {job}");
        assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 64 * MIB, "{args:?}: wrote the whole volume");
        assert!(job["read"]["io_bytes"].as_u64().unwrap() >= 64 * MIB, "{args:?}: verified by reading it back");
    }
}
