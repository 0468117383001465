//! The NBD project's own integrity test against nbdcrypt. nbd-tester-client, built from
//! Debian's nbd source package by scripts/build-nbd-tester.sh, replays a transaction log of
//! reads, writes, FUA writes and flushes with many requests in flight. It checks every
//! block it reads against what it last wrote there. It attaches with NBD_OPT_EXPORT_NAME
//! and expects a fresh export that reads as zeros.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::Workspace;
use nbdcrypt::nbd::consts::{REQUEST_MAGIC, SIMPLE_REPLY_MAGIC};

/// Largest request nbdcrypt serves; larger ones get EINVAL, which nbd-tester-client treats
/// as a failed test.
const MAX_REQUEST_LEN: u32 = 32 << 20;

/// Runs scripts/build-nbd-tester.sh once per test process and returns the directory holding
/// nbd-tester-client and its transaction logs. Fails the test when the tool cannot be built.
fn build_tester() -> PathBuf {
    static TESTER: OnceLock<PathBuf> = OnceLock::new();
    TESTER.get_or_init(run_build_script).clone()
}

fn run_build_script() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-nbd-tester.sh");
    let output =
        Command::new(&script).output().unwrap_or_else(|e| panic!("running {} failed: {e}", script.display()));
    assert!(
        output.status.success(),
        "nbd-tester-client could not be built ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let dir = PathBuf::from(stdout.lines().last().expect("build-nbd-tester.sh printed no directory"));
    assert!(dir.join("nbd-tester-client").is_file(), "nbd-tester-client missing from {}", dir.display());
    dir
}

/// Runs nbd-tester-client's integrity test with `transaction_log` against a fresh 64 MiB
/// volume served on a unix socket.
fn run_integrity_test(tester: &Path, transaction_log: &Path) {
    let workspace = Workspace::new();
    let volume = workspace.create_volume("tester.img", "64M", &[]);
    let server = workspace.serve(&["--name", "disk", volume.to_str().unwrap()]);

    let output = Command::new(tester.join("nbd-tester-client"))
        .args(["-N", "disk", "-i", "-t"])
        .arg(transaction_log)
        .arg("-u")
        .arg(&server.socket)
        .env("NBD_TEST_SILENT", "1")
        .output()
        .expect("running nbd-tester-client failed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "nbd-tester-client -i with {} failed ({}):\n{stderr}\nserver log:\n{}",
        transaction_log.display(),
        output.status,
        server.log_text()
    );
    assert!(
        stderr.contains("Integrity read test complete"),
        "nbd-tester-client did not report completion:\n{stderr}"
    );

    let log = server.log_text();
    let status = server.stop();
    assert!(status.success(), "nbdcrypt serve exited with {status}:\n{log}");
}

/// Copies a transaction log without the requests longer than `max_len` and their replies.
/// The log holds 28-byte request headers and 16-byte reply headers, big-endian, matched
/// by cookie; the tester computes write data itself, so dropping a request only drops
/// the blocks it would have written. Returns the requests (kept, dropped).
fn drop_long_requests(input: &[u8], output: &Path, max_len: u32) -> (usize, usize) {
    let u32_at = |at: usize| u32::from_be_bytes(input[at..at + 4].try_into().unwrap());
    let mut dropped_cookies = HashSet::new();
    let mut kept_requests = 0;
    let mut kept = Vec::with_capacity(input.len());
    let mut at = 0;
    while at < input.len() {
        match u32_at(at) {
            REQUEST_MAGIC => {
                let record = &input[at..at + 28];
                let cookie = u64::from_be_bytes(record[8..16].try_into().unwrap());
                if u32_at(at + 24) > max_len {
                    dropped_cookies.insert(cookie);
                } else {
                    kept.extend_from_slice(record);
                    kept_requests += 1;
                }
                at += 28;
            }
            SIMPLE_REPLY_MAGIC => {
                let record = &input[at..at + 16];
                let cookie = u64::from_be_bytes(record[8..16].try_into().unwrap());
                if !dropped_cookies.contains(&cookie) {
                    kept.extend_from_slice(record);
                }
                at += 16;
            }
            magic => panic!("unknown record magic {magic:#010x} at byte {at} of the transaction log"),
        }
    }
    std::fs::write(output, kept).unwrap();
    (kept_requests, dropped_cookies.len())
}

#[test]
fn nbd_tester_integrity() {
    let tester = build_tester();
    run_integrity_test(&tester, &tester.join("integrity-test.tr"));
}

/// integrityhuge-test.tr (nbd 3.26.1) holds 251 requests of up to 47.6 MiB. The 66 above
/// nbdcrypt's 32 MiB maximum are left out, and 105 of the rest are between 16 and 32 MiB.
#[test]
fn nbd_tester_integrity_huge_requests() {
    let tester = build_tester();
    let original = std::fs::read(tester.join("integrityhuge-test.tr")).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let filtered = scratch.path().join("integrityhuge-32mib.tr");
    let (kept, dropped) = drop_long_requests(&original, &filtered, MAX_REQUEST_LEN);
    assert!(
        kept >= 150,
        "only {kept} requests of integrityhuge-test.tr are at most 32 MiB ({dropped} dropped)"
    );
    run_integrity_test(&tester, &filtered);
}
