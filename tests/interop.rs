//! Interoperability with real NBD clients over several connections and with the
//! structured-reply features. nbdcopy copies over four connections, fio verifies over four
//! connections, and qemu-io keeps requests in flight. `nbdinfo --json` lists the features,
//! and `nbdinfo --map` and `qemu-img map` must report zeros only where reads return zeros,
//! before and after writes, WRITE_ZEROES and TRIM.

mod common;

use std::fs;
use std::ops::Range;
use std::path::Path;
use std::process::Command;

use common::*;

/// Counts the connections that finished a handshake, from the server's log.
fn attached_clients(server: &Server) -> usize {
    server.log_text().matches("client attached").count()
}

/// Checks qemu-io's output for failed commands and pattern mismatches, which it reports
/// without a failing exit status.
fn assert_qemu_io_ok(output: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stdout.contains("Pattern verification failed"), "qemu-io read wrong data:\n{stdout}");
    assert!(
        !stdout.contains("failed") && !stderr.contains("failed"),
        "a qemu-io command failed:\n{stdout}\n{stderr}"
    );
}

/// Runs qemu-io on `uri` with one `-c` per command.
fn qemu_io(uri: &str, commands: &[&str]) {
    require_tool("qemu-io");
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for line in commands {
        command.args(["-c", line]);
    }
    command.arg(uri);
    assert_qemu_io_ok(&run(&mut command));
}

#[test]
fn nbdcopy_four_connections_round_trip() {
    require_tool("nbdcopy");
    let ws = Workspace::new();
    let volume = ws.create_volume("copy.img", "48M", &[]);
    let server = ws.serve(&["--name", "disk", volume.to_str().unwrap()]);
    let data = pseudo_random(32 << 20, 11);
    let input = ws.path("input.raw");
    fs::write(&input, &data).unwrap();

    // nbdcopy opens at most one connection per thread, and its default is one thread per
    // core, so --threads=4 keeps the four connections on a 2-core machine.
    let before_upload = attached_clients(&server);
    run(Command::new("nbdcopy").args([
        "--connections=4",
        "--threads=4",
        "--requests=16",
        input.to_str().unwrap(),
        &server.uri("disk"),
    ]));
    let upload_connections = attached_clients(&server) - before_upload;
    assert!(upload_connections >= 4, "nbdcopy used {upload_connections} connections to write, expected 4");

    // --no-extents reads every byte, so the copy does not depend on BLOCK_STATUS.
    let output = ws.path("output.raw");
    let before_download = attached_clients(&server);
    run(Command::new("nbdcopy").args([
        "--connections=4",
        "--threads=4",
        "--requests=16",
        "--no-extents",
        &server.uri("disk"),
        output.to_str().unwrap(),
    ]));
    let download_connections = attached_clients(&server) - before_download;
    assert!(download_connections >= 4, "nbdcopy used {download_connections} connections to read, expected 4");

    let copied = fs::read(&output).unwrap();
    assert_eq!(copied.len(), 48 << 20, "nbdcopy read {} bytes, expected the 48 MiB export", copied.len());
    assert!(copied[..data.len()] == data[..], "data read back differs from data written");
    assert!(copied[data.len()..].iter().all(|&b| b == 0), "the unwritten tail does not read as zeros");
    let status = server.stop();
    assert!(status.success(), "nbdcrypt serve exited with {status}");
}

/// Four fio jobs, each on its own connection and its own 8 MiB region, write and verify;
/// then a second fio run on new connections verifies what the first one wrote.
#[test]
fn fio_verify_over_four_connections() {
    require_tool("fio");
    let ws = Workspace::new();
    let volume = ws.create_volume("fio.img", "48M", &[]);
    let server = ws.serve(&["--name", "disk", volume.to_str().unwrap()]);
    let uri = format!("--uri={}", server.uri("disk"));
    let common_args = [
        "--name=multi",
        "--ioengine=nbd",
        uri.as_str(),
        "--numjobs=4",
        "--size=8M",
        "--offset_increment=8M",
        "--bsrange=512-128k",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randseed=4242",
        "--verify_state_save=0",
        "--output-format=json",
    ];

    let before = attached_clients(&server);
    let output =
        run(Command::new("fio").args(common_args).args(["--rw=randwrite", "--do_verify=1", "--end_fsync=1"]));
    let report = parse_json_output(&output.stdout);
    let jobs = report["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 4, "fio ran {} jobs, expected 4: {report}", jobs.len());
    for job in jobs {
        assert_eq!(job["error"], 0, "fio job failed: {job}");
        assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 8 << 20, "fio job wrote too little: {job}");
    }
    let connections = attached_clients(&server) - before;
    assert!(connections >= 4, "fio used {connections} connections, expected one per job");

    let output = run(Command::new("fio").args(common_args).args(["--rw=randwrite", "--verify_only"]));
    let report = parse_json_output(&output.stdout);
    for job in report["jobs"].as_array().unwrap() {
        assert_eq!(job["error"], 0, "fio verify-only job failed: {job}");
        assert!(job["read"]["io_bytes"].as_u64().unwrap() >= 8 << 20, "fio verified too little: {job}");
    }
    let status = server.stop();
    assert!(status.success(), "nbdcrypt serve exited with {status}");
}

/// qemu-io with asynchronous requests in flight at once, overlapping and unaligned.
#[test]
fn qemu_io_concurrent_requests() {
    let ws = Workspace::new();
    let volume = ws.create_volume("qio.img", "16M", &[]);
    let server = ws.serve(&["--name", "disk", "--discard", volume.to_str().unwrap()]);
    let uri = server.uri("disk");
    qemu_io(
        &uri,
        &[
            "aio_write -P 0x11 0 256k",
            "aio_write -P 0x22 256k 256k",
            "aio_write -P 0x33 1M 333333",
            "aio_write -z 2M 512k",
            "aio_flush",
            "read -P 0x11 0 256k",
            "read -P 0x22 256k 256k",
            "read -P 0x33 1M 333333",
            "read -P 0 2M 512k",
            "aio_read -P 0x11 0 128k",
            "aio_read -P 0x22 300k 100k",
            "aio_write -P 0x44 7M 4097",
            "aio_flush",
            "discard 8M 1M",
            "read -P 0x44 7M 4097",
            "read -P 0 8M 1M",
        ],
    );
    // A second qemu-io process sees the first one's data.
    qemu_io(&uri, &["read -P 0x33 1M 333333", "read -P 0x44 7M 4097"]);
    let status = server.stop();
    assert!(status.success(), "nbdcrypt serve exited with {status}");
}

#[test]
fn nbdinfo_json_lists_structured_features() {
    require_tool("nbdinfo");
    let ws = Workspace::new();
    let volume = ws.create_volume("info.img", "8M", &[]);
    let server = ws.serve(&["--name", "disk", "--discard", volume.to_str().unwrap()]);
    let output = run(Command::new("nbdinfo").args(["--json", &server.uri("disk")]));
    let info = parse_json_output(&output.stdout);
    assert_eq!(info["structured"], true, "structured replies not negotiated: {info}");
    let export = &info["exports"][0];
    let contexts: Vec<&str> =
        export["contexts"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert!(contexts.contains(&"base:allocation"), "base:allocation missing from {contexts:?}");
    for flag in [
        "can_multi_conn",
        "can_fast_zero",
        "can_cache",
        "can_df",
        "can_trim",
        "can_zero",
        "can_flush",
        "can_fua",
    ] {
        assert_eq!(export[flag], true, "{flag} is not true: {export}");
    }
    assert_eq!(export["is_read_only"], false, "{export}");
    let minimum = export["block_size_minimum"].as_u64().expect("no minimum block size");
    let preferred = export["block_size_preferred"].as_u64().expect("no preferred block size");
    let maximum = export["block_size_maximum"].as_u64().expect("no maximum block size");
    assert!(
        minimum >= 1 && minimum <= preferred && preferred <= maximum,
        "block sizes out of order: {export}"
    );
    assert_eq!(maximum, 32 << 20, "maximum block size: {export}");
    assert_eq!(export["export-size"], 8 << 20, "{export}");
}

/// One extent of a map: a byte range and whether the tool reports that it reads as zeros.
#[derive(Debug, Clone)]
struct Extent {
    range: Range<usize>,
    is_zero: bool,
}

/// Parses `nbdinfo --map` lines "OFFSET LENGTH TYPE DESCRIPTION", where TYPE bit 1 is
/// NBD_STATE_ZERO.
fn nbdinfo_map(uri: &str) -> Vec<Extent> {
    let output = run(Command::new("nbdinfo").args(["--map", uri]));
    let text = String::from_utf8(output.stdout).unwrap();
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert!(fields.len() >= 3, "unexpected nbdinfo --map line {line:?}");
            let offset: usize = fields[0].parse().unwrap();
            let len: usize = fields[1].parse().unwrap();
            let state: u32 = fields[2].parse().unwrap();
            Extent { range: offset..offset + len, is_zero: state & 2 != 0 }
        })
        .collect()
}

/// Parses `qemu-img map --output=json`.
fn qemu_img_map(uri: &str) -> Vec<Extent> {
    require_tool("qemu-img");
    let output = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", uri]));
    let entries: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    entries
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let start = entry["start"].as_u64().unwrap() as usize;
            let len = entry["length"].as_u64().unwrap() as usize;
            Extent { range: start..start + len, is_zero: entry["zero"].as_bool().unwrap() }
        })
        .collect()
}

/// Reads the whole export with nbdcopy --no-extents, which never asks for BLOCK_STATUS.
fn read_export(uri: &str, scratch: &Path) -> Vec<u8> {
    require_tool("nbdcopy");
    let _ = fs::remove_file(scratch);
    run(Command::new("nbdcopy").args(["--no-extents", uri, scratch.to_str().unwrap()]));
    fs::read(scratch).unwrap()
}

/// Checks both maps against the export's contents: the extents tile the export, every
/// range reported as zero reads as zeros, and each of `expect_zero` is reported as zero.
/// Returns the nbdinfo map, for comparing repeated queries.
fn check_maps(uri: &str, scratch: &Path, stage: &str, expect_zero: &[Range<usize>]) -> Vec<Extent> {
    let contents = read_export(uri, scratch);
    let nbdinfo = nbdinfo_map(uri);
    let qemu = qemu_img_map(uri);
    for (tool, extents) in [("nbdinfo --map", &nbdinfo), ("qemu-img map", &qemu)] {
        let mut next = 0;
        for extent in extents.iter() {
            assert_eq!(
                extent.range.start, next,
                "{stage}: {tool} leaves a gap or overlap at {next}: {extents:?}"
            );
            next = extent.range.end;
            if extent.is_zero {
                let bytes = &contents[extent.range.clone()];
                let first_nonzero = bytes.iter().position(|&b| b != 0);
                assert!(
                    first_nonzero.is_none(),
                    "{stage}: {tool} reports {:?} as zero, but byte {} reads as non-zero",
                    extent.range,
                    extent.range.start + first_nonzero.unwrap_or(0)
                );
            }
        }
        assert_eq!(next, contents.len(), "{stage}: {tool} covers {next} of {} bytes", contents.len());
        for expected in expect_zero {
            let covered = extents
                .iter()
                .filter(|extent| extent.is_zero)
                .map(|extent| {
                    extent.range.end.min(expected.end).saturating_sub(extent.range.start.max(expected.start))
                })
                .sum::<usize>();
            assert_eq!(
                covered,
                expected.len(),
                "{stage}: {tool} reports only {covered} of the {} bytes at {expected:?} as zero: {extents:?}",
                expected.len()
            );
        }
    }
    nbdinfo
}

#[test]
// Each check lists the ranges expected to read as zeros, sometimes only one.
#[allow(clippy::single_range_in_vec_init)]
fn maps_report_zero_only_where_reads_return_zeros() {
    require_tool("nbdinfo");
    let ws = Workspace::new();
    let volume = ws.create_volume("map.img", "16M", &[]);
    let server = ws.serve(&["--name", "disk", "--discard", volume.to_str().unwrap()]);
    let uri = server.uri("disk");
    let scratch = ws.path("contents.raw");
    const MIB: usize = 1 << 20;

    // A new volume reads as zeros everywhere.
    let first = check_maps(&uri, &scratch, "new volume", &[0..16 * MIB]);

    // Writes of data, aligned and unaligned, including data that is zero in part.
    qemu_io(
        &uri,
        &["write -P 0xab 0 1M", "write -P 0xcd 3M 5000", "write -P 0x5a 6291356 200", "write -P 0 12M 64k"],
    );
    check_maps(&uri, &scratch, "after writes", &[MIB..3 * MIB, 7 * MIB..12 * MIB, 13 * MIB..16 * MIB]);

    // WRITE_ZEROES over data, aligned and unaligned, with and without NO_HOLE (-u unmaps).
    qemu_io(&uri, &["write -z 0 256k", "write -z -u 512k 256k", "write -z 3146728 3000"]);
    check_maps(&uri, &scratch, "after WRITE_ZEROES", &[0..256 << 10, 512 << 10..768 << 10]);

    // TRIM of data, aligned and unaligned; the export is served with --discard.
    qemu_io(&uri, &["write -P 0x77 9M 2M", "discard 9M 1M", "discard 10489856 10000"]);
    let after_trim = check_maps(&uri, &scratch, "after TRIM", &[9 * MIB..10 * MIB]);

    // Repeated queries of an unchanged export give the same answer.
    let again = check_maps(&uri, &scratch, "repeated query", &[9 * MIB..10 * MIB]);
    let describe =
        |extents: &[Extent]| extents.iter().map(|e| (e.range.clone(), e.is_zero)).collect::<Vec<_>>();
    assert_eq!(describe(&after_trim), describe(&again), "nbdinfo --map changed without writes in between");
    assert_ne!(describe(&first), describe(&again), "the map never changed, so it does not reflect writes");

    let status = server.stop();
    assert!(status.success(), "nbdcrypt serve exited with {status}");
}
