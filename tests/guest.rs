//! Tests that need a Linux kernel: the kernel NBD client and QEMU's NBD block driver inside
//! a QEMU guest build, mount and check ext4 on an nbdcrypt export, and dm-crypt in the guest
//! decrypts an nbdcrypt volume from its volume key, proving the XTS tweak numbering matches.
//!
//! The guest harness is scripts/vm/run-guest.sh (TCG, about 5 to 10 s per run here). The
//! runs are serialised: two TCG guests on a two-core machine only slow each other down.

mod common;

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use common::*;
use nbdcrypt::keys::{KeyProvider, LocalKeystore, WrappedKey};
use nbdcrypt::volume::VolumeHeader;
use sha2::{Digest, Sha256};

static GUEST: Mutex<()> = Mutex::new(());

fn run_guest(args: &[&str]) -> String {
    require_tool("qemu-system-x86_64");
    let _serial = GUEST.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/vm/run-guest.sh");
    let output = Command::new(&script).args(args).output().expect("running scripts/vm/run-guest.sh failed");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "guest run {args:?} did not pass ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Unwraps a volume's key through the local keystore and writes it to a 0600 file.
fn export_volume_key(ws: &Workspace, volume: &Path) -> PathBuf {
    let file = fs::File::open(volume).unwrap();
    let header = VolumeHeader::read(&file).unwrap();
    let token = header.kms_token().unwrap();
    let store = LocalKeystore::new("local", ws.keystore());
    let wrapped = WrappedKey { alg: token.wrap_alg, bytes: token.wrapped_key.clone() };
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let key = runtime.block_on(store.unwrap_volume_key(&token.key_id, &wrapped)).unwrap();
    header.verify_volume_key(&key).unwrap();

    let path = ws.path("volume.key");
    let mut out = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).unwrap();
    std::io::Write::write_all(&mut out, key.as_bytes()).unwrap();
    path
}

#[test]
fn kernel_nbd_client_builds_and_checks_ext4() {
    let ws = Workspace::new();
    let volume = ws.create_volume("kernel.img", "256M", &[]);
    let server = ws.serve(&[volume.to_str().unwrap(), "--discard"]);
    let socket = server.socket.to_str().unwrap().to_string();

    let stdout = run_guest(&["kernel-nbd-client", "--export", "kernel", "--size-mib", "8", &socket]);
    assert!(stdout.contains("run-guest: PASS"), "{stdout}");

    // Two connections (nbd-client -C 2) use CAN_MULTI_CONN; the file written above survives.
    let stdout =
        run_guest(&["kernel-nbd-client", "--export", "kernel", "--connections", "2", "--keep", &socket]);
    assert!(stdout.contains("run-guest: PASS"), "{stdout}");
    assert!(server.stop().success());
    assert!(!file_contains(&volume, b"lost+found"), "the backing file holds plaintext directory names");
}

#[test]
fn qemu_drive_ext4_survives_server_restart() {
    let ws = Workspace::new();
    let volume = ws.create_volume("drive.img", "256M", &["--sector-size", "512"]);
    let server = ws.serve(&[volume.to_str().unwrap()]);
    let stdout = run_guest(&["qemu-drive", "--export", "drive", server.socket.to_str().unwrap()]);
    assert!(stdout.contains("run-guest: PASS"), "{stdout}");
    let sha = stdout
        .lines()
        .find_map(|line| line.split("VMTEST: SHA256 ").nth(1))
        .map(|hex| hex.trim().to_string())
        .expect("the guest printed no SHA256 line");
    assert!(server.stop().success());

    let server = ws.serve(&[volume.to_str().unwrap()]);
    let stdout = run_guest(&[
        "qemu-drive",
        "--export",
        "drive",
        "--verify-only",
        "--expect-sha256",
        &sha,
        server.socket.to_str().unwrap(),
    ]);
    assert!(stdout.contains("run-guest: PASS"), "{stdout}");
}

/// dm-crypt must read the plaintext written through nbdcrypt, for both sector sizes: a
/// mismatch in the tweak numbering (sector n against 8·n) garbles every sector but the first.
#[test]
fn dm_crypt_reads_the_plaintext_nbdcrypt_wrote() {
    require_tool("nbdcopy");
    for sector_size in ["4096", "512"] {
        let ws = Workspace::new();
        let volume = ws.create_volume("dm.img", "16M", &["--sector-size", sector_size]);
        let plaintext = pseudo_random(16 * 1024 * 1024, 1234);
        let expected = hex(&Sha256::digest(&plaintext));
        let input = ws.path("plain.bin");
        fs::write(&input, &plaintext).unwrap();

        let server = ws.serve(&[volume.to_str().unwrap()]);
        run(Command::new("nbdcopy").args([input.to_str().unwrap(), &server.uri("dm")]));
        let key_file = export_volume_key(&ws, &volume);

        assert!(server.stop().success());

        // The export itself is plaintext, so dm-crypt opens the backing file.
        let stdout = run_guest(&[
            "dm-crypt",
            "--key-file",
            key_file.to_str().unwrap(),
            "--expect-sha256",
            &expected,
            volume.to_str().unwrap(),
        ]);
        assert!(stdout.contains("run-guest: PASS"), "sector size {sector_size}: {stdout}");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
