//! A volume on a block device: a loop device over a file, which needs root to set up.
//! These tests are ignored by default; `scripts/test.sh` runs them when it runs as root.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use common::*;

/// A loop device over a file, detached on drop.
struct LoopDevice {
    device: PathBuf,
}

impl LoopDevice {
    fn attach(file: &std::path::Path) -> Self {
        require_tool("losetup");
        let output = run(Command::new("losetup").args(["--find", "--show", file.to_str().unwrap()]));
        let device = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        LoopDevice { device }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("--detach").arg(&self.device).status();
    }
}

#[test]
#[ignore = "needs root to attach a loop device; scripts/test.sh runs it as root"]
fn block_device_volume_serves_and_locks() {
    require_tool("nbdsh");
    let ws = Workspace::new();
    let image = ws.path("disk.raw");
    fs::File::create(&image).unwrap().set_len(48 * 1024 * 1024).unwrap();
    let loop_device = LoopDevice::attach(&image);
    let device = loop_device.device.to_str().unwrap();

    let output = ws.nbdcrypt(&["create", device]);
    assert!(output.status.success(), "create failed: {}", String::from_utf8_lossy(&output.stderr));
    // The whole device after the 16 MiB header is the data area.
    let info = run(Command::new(BIN).args(["info", "--json", device]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["export_bytes"], 32 * 1024 * 1024);

    let server = ws.serve(&["--name", "blk", "--discard", device]);
    // A second server cannot open the device: it is held with O_EXCL.
    let second = ws.nbdcrypt(&["serve", "--listen", "127.0.0.1:0", device]);
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );

    let script = r#"
import os
data = os.urandom(1048576)
h.pwrite(data, 4096 * 7 + 100)
assert h.pread(len(data), 4096 * 7 + 100) == data
h.zero(65536, 8 * 1048576)
assert h.pread(65536, 8 * 1048576) == bytes(65536)
h.trim(1048576, 16 * 1048576)
h.flush()
print("OK")
"#;
    let output = run(debian_tool("nbdsh").args(["-u", &server.uri("blk"), "-c", script]));
    assert!(String::from_utf8_lossy(&output.stdout).contains("OK"));
    assert!(server.stop().success());

    // The backing file behind the device holds ciphertext only.
    let output = run(Command::new("cryptsetup").args(["luksDump", device]));
    assert!(String::from_utf8_lossy(&output.stdout).contains("nbdcrypt-kms"));
}

#[test]
#[ignore = "needs root to attach a loop device; scripts/test.sh runs it as root"]
fn block_device_with_filesystem_needs_force() {
    require_tool("mkfs.ext4");
    let ws = Workspace::new();
    let image = ws.path("fs.raw");
    fs::File::create(&image).unwrap().set_len(40 * 1024 * 1024).unwrap();
    let loop_device = LoopDevice::attach(&image);
    let device = loop_device.device.to_str().unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F", device]));

    let output = ws.nbdcrypt(&["create", device]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("ext2/ext3/ext4"));
    let output = ws.nbdcrypt(&["create", device, "--force", "--size", "8M"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let info = run(Command::new(BIN).args(["info", "--json", device]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["export_bytes"], 8 * 1024 * 1024);
}
