//! End-to-end tests with real NBD clients against the built `nbdcrypt` binary: qemu-io,
//! qemu-img, nbdinfo, nbdcopy, nbdsh (python3-libnbd), fio's nbd engine, and cryptsetup as
//! the LUKS2 oracle.

mod common;

use std::fs;
use std::process::Command;

use common::*;

#[test]
fn qemu_io_unaligned_writes_and_zeroing() {
    require_tool("qemu-io");
    let ws = Workspace::new();
    ws.create_volume("vol.img", "64M", &[]);
    let server = ws.serve(&[ws.path("vol.img").to_str().unwrap()]);

    let output = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 1M",
        "-c",
        "write -P 0x22 1000 7777",
        "-c",
        "write -P 0x33 4095 2",
        "-c",
        "write -z 100000 50000",
        "-c",
        "read -P 0x11 0 1000",
        "-c",
        "read -P 0x22 1000 3095",
        "-c",
        "read -P 0x33 4095 2",
        "-c",
        "read -P 0x22 4097 4680",
        "-c",
        "read -P 0x11 8777 91223",
        "-c",
        "read -P 0 100000 50000",
        "-c",
        "read -P 0x11 150000 898576",
        "-c",
        "read -P 0 1M 63M",
        &server.uri("vol"),
    ]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
    assert!(!stdout.contains("failed"), "{stdout}");
}

#[test]
fn nbdinfo_reports_size_and_capabilities() {
    require_tool("nbdinfo");
    let ws = Workspace::new();
    ws.create_volume("disk.img", "10M", &["--sector-size", "512"]);
    let server = ws.serve(&[ws.path("disk.img").to_str().unwrap(), "--discard"]);

    let output = run(Command::new("nbdinfo").args(["--json", &server.uri("disk")]));
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 10 * 1024 * 1024);
    assert_eq!(export["can_flush"], true);
    assert_eq!(export["can_fua"], true);
    assert_eq!(export["can_trim"], true);
    assert_eq!(export["can_zero"], true);
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["block_size_minimum"], 1);
    assert_eq!(export["block_size_preferred"], 512);

    // The empty export name selects the only export.
    let output =
        run(Command::new("nbdinfo")
            .args(["--size", &format!("nbd+unix:///?socket={}", server.socket.display())]));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "10485760");
}

#[test]
fn nbdcopy_round_trip_survives_restart_and_stores_no_plaintext() {
    require_tool("nbdcopy");
    let ws = Workspace::new();
    let volume = ws.create_volume("data.img", "32M", &[]);

    // Recognisable plaintext: random data with a marker string repeated through it.
    let marker = b"NBDCRYPT-PLAINTEXT-MARKER-0123456789";
    let mut plaintext = pseudo_random(20 * 1024 * 1024 + 123, 7);
    for chunk in plaintext.chunks_mut(65536) {
        let n = marker.len().min(chunk.len());
        chunk[..n].copy_from_slice(&marker[..n]);
    }
    let input = ws.path("input.bin");
    fs::write(&input, &plaintext).unwrap();

    let server = ws.serve(&[volume.to_str().unwrap()]);
    run(Command::new("nbdcopy").args([input.to_str().unwrap(), &server.uri("data")]));
    assert!(server.stop().success());

    assert!(!file_contains(&volume, marker), "the backing file holds plaintext");
    assert!(!file_contains(&volume, &plaintext[4096..4096 + 64]), "the backing file holds plaintext");

    let server = ws.serve(&[volume.to_str().unwrap()]);
    let output = ws.path("output.bin");
    run(Command::new("nbdcopy").args([&server.uri("data"), output.to_str().unwrap()]));
    let copied = fs::read(&output).unwrap();
    assert_eq!(copied.len(), 32 * 1024 * 1024);
    assert!(copied[..plaintext.len()] == plaintext[..], "data read back after restart differs");
    assert!(copied[plaintext.len()..].iter().all(|&b| b == 0), "never-written sectors are not zeros");
}

#[test]
fn qemu_img_convert_and_compare() {
    require_tool("qemu-img");
    let ws = Workspace::new();
    ws.create_volume("img.img", "16M", &[]);
    let server = ws.serve(&[ws.path("img.img").to_str().unwrap()]);

    let source = ws.path("source.raw");
    let mut data = pseudo_random(16 * 1024 * 1024, 11);
    data[4 * 1024 * 1024..8 * 1024 * 1024].fill(0);
    fs::write(&source, &data).unwrap();

    run(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        source.to_str().unwrap(),
        &server.uri("img"),
    ]));
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        source.to_str().unwrap(),
        &server.uri("img"),
    ]));
}

#[test]
fn nbdsh_many_requests_in_flight() {
    require_tool("nbdsh");
    let ws = Workspace::new();
    ws.create_volume("aio.img", "8M", &[]);
    let server = ws.serve(&[ws.path("aio.img").to_str().unwrap(), "--discard"]);

    // 64 overlapping-free writes issued without waiting, then reads checked, then a trim.
    let script = r#"
import os
size = h.get_size()
bufs = []
for i in range(64):
    data = bytes([(i * 7 + 1) % 256]) * 4096 + os.urandom(3000)
    off = i * 131072 + (i % 5) * 1000
    buf = nbd.Buffer.from_bytearray(bytearray(data))
    bufs.append((off, data, buf, h.aio_pwrite(buf, off)))
while h.aio_in_flight() > 0:
    h.poll(-1)
for off, data, buf, cookie in bufs:
    assert h.aio_command_completed(cookie), cookie
h.flush()
for off, data, buf, cookie in bufs:
    assert h.pread(len(data), off) == data, off
h.trim(4096, 131072)
assert h.pread(4096, 131072) == bytes(4096), "trimmed whole sector does not read as zeros"
h.zero(65536, 1)
assert h.pread(65536, 1) == bytes(65536)
h.set_strict_mode(0)
try:
    h.pread(4096, size)
    raise SystemExit("read past the end succeeded")
except nbd.Error as e:
    assert "command failed" in str(e), e
    assert "EINVAL" in str(e), e
print("OK")
"#;
    let output = run(debian_tool("nbdsh").args(["-u", &server.uri("aio"), "-c", script]));
    assert!(String::from_utf8_lossy(&output.stdout).contains("OK"));
}

#[test]
fn fio_nbd_engine_verify() {
    require_tool("fio");
    let ws = Workspace::new();
    ws.create_volume("fio.img", "64M", &[]);
    let server = ws.serve(&[ws.path("fio.img").to_str().unwrap()]);

    let output = run(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", server.uri("fio")),
        "--rw=randwrite",
        "--bs=4k",
        "--bsrange=512-64k",
        "--size=32M",
        "--iodepth=32",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]));
    let report = parse_json_output(&output.stdout);
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "fio reported an error: {job}");
    assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 32 * 1024 * 1024);
}

#[test]
fn cryptsetup_reads_header_and_token() {
    require_tool("cryptsetup");
    let ws = Workspace::new();
    let volume = ws.create_volume("luks.img", "20M", &[]);

    let dump = run(Command::new("cryptsetup").args(["luksDump", volume.to_str().unwrap()]));
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("Version:       \t2"), "{dump}");
    assert!(dump.contains("nbdcrypt-kms"), "{dump}");
    assert!(dump.contains("aes-xts-plain64"), "{dump}");
    assert!(dump.contains("sector: 4096"), "{dump}");

    let info = run(Command::new(BIN).args(["info", "--json", volume.to_str().unwrap()]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();

    let token = run(Command::new("cryptsetup").args([
        "token",
        "export",
        "--token-id",
        "0",
        volume.to_str().unwrap(),
    ]));
    let token: serde_json::Value = serde_json::from_slice(&token.stdout).unwrap();
    assert_eq!(token["type"], "nbdcrypt-kms");
    assert_eq!(token["key_provider"], "local");
    assert_eq!(token["key_id"], info["key_id"]);
    assert_eq!(token["wrap_alg"], "aes-kw");
    assert_eq!(token["keyslots"], serde_json::json!([]));

    let uuid = run(Command::new("cryptsetup").args(["luksUUID", volume.to_str().unwrap()]));
    assert_eq!(String::from_utf8_lossy(&uuid.stdout).trim(), info["uuid"].as_str().unwrap());
}

#[test]
fn create_refuses_existing_filesystem_without_force() {
    require_tool("mkfs.ext4");
    let ws = Workspace::new();
    let path = ws.path("fs.img");
    fs::File::create(&path).unwrap().set_len(32 * 1024 * 1024).unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F", path.to_str().unwrap()]));

    let output = ws.nbdcrypt(&["create", path.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ext2/ext3/ext4"), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");

    let output = ws.nbdcrypt(&["create", path.to_str().unwrap(), "--force"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // An existing LUKS header is protected too.
    let output = ws.nbdcrypt(&["create", path.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("LUKS"));

    // So is a virtual disk image, whatever size --size requests.
    require_tool("qemu-img");
    let image = ws.path("disk.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "64M"]));
    let before = fs::read(&image).unwrap();
    let output = ws.nbdcrypt(&["create", image.to_str().unwrap(), "--size", "16M"]);
    assert!(!output.status.success(), "create overwrote a qcow2 image without --force");
    assert!(String::from_utf8_lossy(&output.stderr).contains("qcow2"));
    assert!(fs::read(&image).unwrap() == before, "a refused create changed the qcow2 image");
}

#[test]
fn wipe_writes_encrypted_zeros_over_old_contents() {
    let ws = Workspace::new();
    let path = ws.path("old.img");
    fs::write(&path, vec![0x5a; 17 * 1024 * 1024]).unwrap();
    let output = ws.nbdcrypt(&["create", path.to_str().unwrap(), "--wipe"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let server = ws.serve(&[path.to_str().unwrap()]);
    require_tool("nbdsh");
    let output = run(debian_tool("nbdsh").args([
        "-u",
        &server.uri("old"),
        "-c",
        "assert h.get_size() == 1048576\nassert h.pread(1048576, 0) == bytes(1048576)\nprint('OK')",
    ]));
    assert!(String::from_utf8_lossy(&output.stdout).contains("OK"));
    drop(server);
    assert!(!file_contains(&path, &[0x5a; 64]), "old contents survived the wipe");
}

#[test]
fn second_server_cannot_open_a_served_volume() {
    let ws = Workspace::new();
    let volume = ws.create_volume("locked.img", "1M", &[]);
    let _server = ws.serve(&[volume.to_str().unwrap()]);
    let output = ws.nbdcrypt(&["serve", "--listen", "127.0.0.1:0", volume.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("locked by another process"), "{stderr}");
}

#[test]
fn duplicate_export_names_are_rejected() {
    let ws = Workspace::new();
    fs::create_dir(ws.path("a")).unwrap();
    fs::create_dir(ws.path("b")).unwrap();
    let first = ws.create_volume("a/disk.img", "1M", &[]);
    let second = ws.create_volume("b/disk.img", "1M", &[]);
    let output =
        ws.nbdcrypt(&["serve", "--listen", "127.0.0.1:0", first.to_str().unwrap(), second.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("two exports are named \"disk\""));
}

#[test]
fn wrong_kek_is_refused_at_serve() {
    let ws = Workspace::new();
    let volume = ws.create_volume("k.img", "1M", &[]);
    let info = run(Command::new(BIN).args(["info", "--json", volume.to_str().unwrap()]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let key_path = ws.keystore().join(info["key_id"].as_str().unwrap());
    fs::write(&key_path, [9u8; 32]).unwrap();

    let output = ws.nbdcrypt(&["serve", "--listen", "127.0.0.1:0", volume.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("wrong key-encryption key or corrupt wrapped key"), "{stderr}");
}

#[test]
fn sigterm_finishes_in_flight_requests() {
    require_tool("nbdsh");
    let ws = Workspace::new();
    ws.create_volume("term.img", "64M", &[]);
    let server = ws.serve(&[ws.path("term.img").to_str().unwrap()]);
    let uri = server.uri("term");

    // A client writes in a loop; SIGTERM arrives while it runs. Every acknowledged write must
    // be on disk after the server stops.
    let script = r#"
import sys
n = 0
try:
    while True:
        h.pwrite(bytes([n % 250 + 1]) * 65536, (n % 1000) * 65536)
        n += 1
        print(n, flush=True)
except nbd.Error:
    pass
"#;
    let client = debian_tool("nbdsh")
        .args(["-u", &uri, "-c", script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let status = server.stop();
    assert!(status.success(), "serve exited with {status}");
    let output = client.wait_with_output().unwrap();
    let acked: u64 =
        String::from_utf8_lossy(&output.stdout).lines().last().and_then(|l| l.parse().ok()).unwrap_or(0);
    assert!(acked > 0, "client made no progress before SIGTERM");

    let server = ws.serve(&[ws.path("term.img").to_str().unwrap()]);
    let last = acked - 1;
    let check = format!(
        "assert h.pread(65536, {}) == bytes([{}]) * 65536\nprint('OK')",
        (last % 1000) * 65536,
        last % 250 + 1
    );
    let output = run(debian_tool("nbdsh").args(["-u", &server.uri("term"), "-c", &check]));
    assert!(String::from_utf8_lossy(&output.stdout).contains("OK"));
}

#[test]
fn cryptsetup_accepts_the_volume_key_and_its_header_edits() {
    require_tool("cryptsetup");
    require_tool("nbdsh");
    let ws = Workspace::new();
    let volume = ws.create_volume("oracle.img", "20M", &[]);
    let server = ws.serve(&[volume.to_str().unwrap()]);
    run(debian_tool("nbdsh").args(["-u", &server.uri("oracle"), "-c", "h.pwrite(b'persist' * 1000, 12345)"]));
    assert!(server.stop().success());

    // Unwrap the volume key the way docs/format.md describes, with Python's cryptography.
    let token = run(Command::new("cryptsetup").args([
        "token",
        "export",
        "--token-id",
        "0",
        volume.to_str().unwrap(),
    ]));
    fs::write(ws.path("token.json"), &token.stdout).unwrap();
    let recipe = r#"
import base64, json, os, sys
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
token = json.load(open(sys.argv[1]))
kek = open(os.path.join(sys.argv[2], token["key_id"]), "rb").read()
key = aes_key_unwrap(kek, base64.b64decode(token["wrapped_key"]))
fd = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, key)
"#;
    let key_file = ws.path("volume.key");
    run(Command::new("/usr/bin/python3").args([
        "-c",
        recipe,
        ws.path("token.json").to_str().unwrap(),
        ws.keystore().to_str().unwrap(),
        key_file.to_str().unwrap(),
    ]));

    // luksAddKey checks the key against the digest, so it succeeds only with the right key.
    let passphrase = ws.path("passphrase");
    fs::write(&passphrase, "correct horse").unwrap();
    run(Command::new("cryptsetup").args([
        "luksAddKey",
        "--batch-mode",
        "--volume-key-file",
        key_file.to_str().unwrap(),
        "--key-size",
        "512",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        volume.to_str().unwrap(),
        passphrase.to_str().unwrap(),
    ]));
    run(Command::new("cryptsetup").args([
        "open",
        "--test-passphrase",
        "--key-file",
        passphrase.to_str().unwrap(),
        volume.to_str().unwrap(),
    ]));

    // nbdcrypt still opens the header cryptsetup rewrote, keyslot and all, with the same data.
    let info = run(Command::new(BIN).args(["info", "--json", volume.to_str().unwrap()]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["header_needs_repair"], false);
    let server = ws.serve(&[volume.to_str().unwrap()]);
    let output = run(debian_tool("nbdsh").args([
        "-u",
        &server.uri("oracle"),
        "-c",
        "assert h.pread(7000, 12345) == b'persist' * 1000\nprint('OK')",
    ]));
    assert!(String::from_utf8_lossy(&output.stdout).contains("OK"));
}

/// Overwrites `len` bytes at `offset` of `path` with 0x5a.
fn damage(path: &std::path::Path, offset: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&vec![0x5a; len], offset).unwrap();
    file.sync_all().unwrap();
}

fn header_state(volume: &std::path::Path) -> (bool, u64) {
    let info = run(Command::new(BIN).args(["info", "--json", volume.to_str().unwrap()]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    (info["header_needs_repair"].as_bool().unwrap(), info["seqid"].as_u64().unwrap())
}

#[test]
fn repair_rewrites_a_damaged_header_copy() {
    require_tool("cryptsetup");
    let ws = Workspace::new();
    let volume = ws.create_volume("repair.img", "16M", &[]);
    let path = volume.to_str().unwrap();
    let server = ws.serve(&["--name", "disk", path]);
    run(debian_tool("nbdsh").args(["-u", &server.uri("disk"), "-c", "h.pwrite(b'survives' * 512, 65536)"]));
    assert!(server.stop().success());

    // A copy that is valid and current needs no repair.
    let output = run(Command::new(BIN).args(["repair", path]));
    assert!(String::from_utf8_lossy(&output.stdout).contains("nothing to repair"));

    // Damage the primary copy's JSON area; the secondary copy still opens the volume.
    damage(&volume, 4096 + 100, 64);
    let (damaged, seqid) = header_state(&volume);
    assert!(damaged, "info does not report the damaged primary copy");
    let text = run(Command::new(BIN).args(["info", path]));
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("nbdcrypt repair"),
        "info does not suggest repair"
    );

    // repair takes the same lock as serve, so it cannot rewrite a served volume.
    let server = ws.serve(&["--name", "disk", path]);
    let locked = ws.nbdcrypt(&["repair", path]);
    assert!(!locked.status.success(), "repair rewrote the header of a served volume");
    assert!(String::from_utf8_lossy(&locked.stderr).contains("locked by another process"));
    assert!(server.stop().success());

    let output = run(Command::new(BIN).args(["repair", path]));
    assert!(String::from_utf8_lossy(&output.stdout).contains("rewrote both header copies"));
    let (damaged, repaired_seqid) = header_state(&volume);
    assert!(!damaged, "a header copy is still damaged after repair");
    assert_eq!(repaired_seqid, seqid + 1);
    run(Command::new("cryptsetup").args(["isLuks", path]));
    let dump = run(Command::new("cryptsetup").args(["luksDump", path]));
    assert!(String::from_utf8_lossy(&dump.stdout).contains("nbdcrypt-kms"));

    // The data written before the damage reads back.
    let server = ws.serve(&["--name", "disk", path]);
    let output = run(debian_tool("nbdsh").args([
        "-u",
        &server.uri("disk"),
        "-c",
        "assert h.pread(4096, 65536) == b'survives' * 512\nprint('OK')",
    ]));
    assert!(String::from_utf8_lossy(&output.stdout).contains("OK"));
    assert!(server.stop().success());

    // With both copies damaged there is nothing to repair from, and nothing is written.
    damage(&volume, 4096 + 100, 64);
    damage(&volume, 16384 + 4096 + 100, 64);
    let before = fs::read(&volume).unwrap();
    let failed = ws.nbdcrypt(&["repair", path]);
    assert!(!failed.status.success(), "repair succeeded without a valid copy");
    assert!(String::from_utf8_lossy(&failed.stderr).contains("no valid header copy"));
    assert!(fs::read(&volume).unwrap() == before, "a failed repair changed the volume");
}

/// Returns the access mode (`O_ACCMODE` bits of the open flags) of every descriptor of process
/// `pid` that refers to `path`.
fn access_modes(pid: u32, path: &std::path::Path) -> Vec<u32> {
    let path = fs::canonicalize(path).unwrap();
    let mut modes = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        if fs::read_link(entry.path()).ok().as_deref() != Some(path.as_path()) {
            continue;
        }
        let fdinfo =
            fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy()))
                .unwrap();
        let flags = fdinfo.lines().find_map(|line| line.strip_prefix("flags:")).unwrap().trim();
        modes.push(u32::from_str_radix(flags, 8).unwrap() & libc::O_ACCMODE as u32);
    }
    modes
}

#[test]
fn read_only_export_opens_the_file_read_only() {
    let ws = Workspace::new();
    let volume = ws.create_volume("ro.img", "16M", &[]);
    let path = volume.to_str().unwrap();
    let server = ws.serve(&["--name", "disk", path]);
    run(debian_tool("nbdsh").args(["-u", &server.uri("disk"), "-c", "h.pwrite(b'kept' * 1024, 8192)"]));
    assert!(server.stop().success());

    let first = ws.serve(&["--read-only", "--name", "disk", path]);
    let modes = access_modes(first.pid(), &volume);
    assert!(!modes.is_empty(), "the server has no descriptor of the volume open");
    assert!(
        modes.iter().all(|&mode| mode == libc::O_RDONLY as u32),
        "a read-only export opened its volume with access modes {modes:?}"
    );

    // Read-only servers share the volume; a read-write server is locked out.
    let second = ws.serve_named("second", &["--read-only", "--name", "disk", path]);
    let writer = ws.nbdcrypt(&["serve", "--listen", "127.0.0.1:0", path]);
    assert!(!writer.status.success(), "a read-write server opened a volume served read-only");
    assert!(String::from_utf8_lossy(&writer.stderr).contains("locked by another process"));

    let output = run(debian_tool("nbdsh").args([
        "-u",
        &second.uri("disk"),
        "-c",
        "assert h.is_read_only()\n\
         assert h.pread(4096, 8192) == b'kept' * 1024\n\
         try:\n    h.pwrite(b'x' * 4096, 0)\n    print('WROTE')\nexcept nbd.Error:\n    print('REJECTED')",
    ]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("REJECTED"), "a write to a read-only export was not rejected: {stdout}");
    assert!(first.stop().success());
    assert!(second.stop().success());
}

#[test]
fn info_exits_cleanly_when_stdout_is_closed() {
    let ws = Workspace::new();
    let volume = ws.create_volume("pipe.img", "1M", &[]);
    // A pipe whose read end is already closed, like `nbdcrypt info vol.img | true`.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(BIN)
        .args(["info", volume.to_str().unwrap()])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "info failed on a closed stdout: {}\n{stderr}", output.status);
    assert!(!stderr.contains("panicked"), "info panicked on a closed stdout: {stderr}");
}

#[test]
fn failed_create_leaves_no_file_behind() {
    use std::os::unix::fs::PermissionsExt;
    let ws = Workspace::new();
    ws.create_volume("first.img", "1M", &[]);

    // A size beyond the largest file is rejected before anything is created.
    let huge = ws.path("huge.img");
    let output = ws.nbdcrypt(&["create", huge.to_str().unwrap(), "--size", "9999999T"]);
    assert!(!output.status.success(), "create accepted a 9999999T volume");
    assert!(String::from_utf8_lossy(&output.stderr).contains("too large"));
    assert!(!huge.exists(), "a rejected create left {} behind", huge.display());

    // A keystore with loose permissions fails after the file was made; the file goes away.
    fs::set_permissions(ws.keystore(), fs::Permissions::from_mode(0o755)).unwrap();
    let second = ws.path("second.img");
    let output = ws.nbdcrypt(&["create", second.to_str().unwrap(), "--size", "16M"]);
    assert!(!output.status.success(), "create succeeded with a 0755 keystore");
    assert!(!second.exists(), "a failed create left {} behind", second.display());

    // A failed --force over an existing volume leaves that volume as it was: the key is
    // made before anything is written.
    let first = ws.path("first.img");
    let before = fs::read(&first).unwrap();
    let output = ws.nbdcrypt(&["create", "--force", first.to_str().unwrap()]);
    assert!(!output.status.success(), "create --force succeeded with a 0755 keystore");
    assert!(fs::read(&first).unwrap() == before, "a failed create --force changed the existing volume");

    // A dangling symbolic link is reported, not replaced or removed.
    let link = ws.path("dangling.img");
    std::os::unix::fs::symlink(ws.path("missing-target.img"), &link).unwrap();
    fs::set_permissions(ws.keystore(), fs::Permissions::from_mode(0o700)).unwrap();
    let output = ws.nbdcrypt(&["create", link.to_str().unwrap(), "--size", "1M"]);
    assert!(!output.status.success(), "create wrote through a dangling symlink");
    assert!(String::from_utf8_lossy(&output.stderr).contains("symbolic link to a missing file"));
    assert!(fs::symlink_metadata(&link).is_ok(), "a failed create removed a symlink it did not make");

    // After the keystore is fixed, the same command works without --force, and no
    // temporary file is left in the directory.
    ws.create_volume("second.img", "16M", &[]);
    let leftovers: Vec<_> = fs::read_dir(ws.dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

#[test]
fn concurrent_creates_of_one_path_let_one_win() {
    let ws = Workspace::new();
    ws.create_volume("warmup.img", "1M", &[]);
    for round in 0..10 {
        let path = ws.path(&format!("race{round}.img"));
        let spawn = || {
            Command::new(BIN)
                .arg("--keystore")
                .arg(ws.keystore())
                .args(["create", path.to_str().unwrap(), "--size", "1M"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (first, second) = (spawn(), spawn());
        let outputs = [first.wait_with_output().unwrap(), second.wait_with_output().unwrap()];
        let winners = outputs.iter().filter(|output| output.status.success()).count();
        assert_eq!(winners, 1, "round {round}: {winners} of two creates of one path succeeded");
        run(Command::new(BIN).args(["info", path.to_str().unwrap()]));
    }
}

#[test]
fn serve_rejects_limits_that_refuse_every_client() {
    let ws = Workspace::new();
    let volume = ws.create_volume("limits.img", "1M", &[]);
    let cases = [
        ("max_connections = 0", "max_connections must be at least 1"),
        ("max_connections_per_export = 0", "max_connections_per_export must be at least 1"),
        ("max_options = 0", "max_options must be at least 1"),
        ("stall_timeout_secs = 0", "stall_timeout_secs must be at least 1"),
        ("max_total_in_flight_bytes = 1000", "max_total_in_flight_bytes 1000 is below"),
    ];
    for (line, expected) in cases {
        let config = ws.path("limits.toml");
        fs::write(&config, format!("[server]\n{line}\n")).unwrap();
        let output = ws.nbdcrypt(&[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--unix",
            ws.path("limits.sock").to_str().unwrap(),
            volume.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "serve started with `{line}`");
        assert!(stderr.contains(expected), "`{line}` gave: {stderr}");
    }
}

#[test]
fn truncated_volume_file_is_rejected() {
    let ws = Workspace::new();
    let volume = ws.create_volume("short.img", "8M", &[]);
    let file = fs::OpenOptions::new().write(true).open(&volume).unwrap();
    file.set_len(file.metadata().unwrap().len() - (4 << 20)).unwrap();
    drop(file);

    let output = ws.nbdcrypt(&["serve", "--listen", "127.0.0.1:0", volume.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a truncated volume was served");
    assert!(stderr.contains("data segment needs 8388608 bytes"), "{stderr}");

    // repair has nothing to rewrite in the header, but reports that the volume is unusable.
    let output = ws.nbdcrypt(&["repair", volume.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("the volume cannot be served"), "repair did not warn: {stderr}");
}
