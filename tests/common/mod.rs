//! Helpers shared by the integration tests: temporary volumes, a daemon started from the
//! built binary, and checks for the external tools the tests drive.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_nbdcrypt");

/// Fails the test with an install hint when `tool` is not on PATH. Tests never skip.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "required tool {tool:?} is not installed; run scripts/install-deps.sh as root");
}

/// A command for `tool` that finds Debian's Python modules: nbdsh runs `python3` from
/// PATH, which may be a separate interpreter without python3-libnbd, so /usr/bin comes first.
pub fn debian_tool(tool: &str) -> Command {
    require_tool(tool);
    let path = std::env::var("PATH").unwrap_or_default();
    let mut command = Command::new(tool);
    command.env("PATH", format!("/usr/bin:/bin:{path}"));
    command
}

/// Parses the JSON document in `output`, skipping any text lines before it (fio prints
/// "fio: connected to NBD server" first).
pub fn parse_json_output(output: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(output);
    let start = text.find('{').unwrap_or_else(|| panic!("no JSON in output:\n{text}"));
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("invalid JSON ({e}) in output:\n{text}"))
}

/// A scratch directory with a keystore, removed on drop.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        Workspace { dir: tempfile::Builder::new().prefix("nbdcrypt-test").tempdir().unwrap() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn keystore(&self) -> PathBuf {
        self.path("keys")
    }

    /// Runs `nbdcrypt --keystore KEYS ARGS...` and returns its output.
    pub fn nbdcrypt(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--keystore")
            .arg(self.keystore())
            .args(args)
            .output()
            .expect("running nbdcrypt failed")
    }

    /// Creates a volume and panics with nbdcrypt's message if that fails.
    pub fn create_volume(&self, name: &str, size: &str, extra: &[&str]) -> PathBuf {
        let path = self.path(name);
        let mut args = vec!["create", path.to_str().unwrap(), "--size", size];
        args.extend_from_slice(extra);
        let output = self.nbdcrypt(&args);
        assert!(output.status.success(), "create failed: {}", String::from_utf8_lossy(&output.stderr));
        path
    }

    /// Starts `nbdcrypt serve` on a unix socket in the workspace.
    pub fn serve(&self, args: &[&str]) -> Server {
        Server::start(self, "nbd", args)
    }

    /// Starts a second server beside the one `serve` starts, with socket `NAME.sock` and log
    /// `NAME.log`.
    pub fn serve_named(&self, name: &str, args: &[&str]) -> Server {
        Server::start(self, name, args)
    }
}

/// A running `nbdcrypt serve`, stopped (SIGKILL) on drop if still running.
pub struct Server {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Server {
    fn start(workspace: &Workspace, name: &str, args: &[&str]) -> Server {
        let socket = workspace.path(&format!("{name}.sock"));
        let log = workspace.path(&format!("{name}.log"));
        let log_file = fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .arg("--keystore")
            .arg(workspace.keystore())
            .arg("serve")
            .arg("--unix")
            .arg(&socket)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("starting nbdcrypt serve failed");
        let mut server = Server { child: Some(child), socket, log };
        server.wait_until_listening();
        server
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if fs::read_to_string(&self.log).unwrap_or_default().contains("listening") && self.socket.exists()
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nbdcrypt serve exited with {status} before listening:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "nbdcrypt serve did not listen within 20 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The libnbd/qemu URI of `export` on this server.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill only sends a signal to the child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("nbdcrypt serve did not stop within 20 s of SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a command and panics with its output unless it succeeds.
pub fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("running {command:?} failed: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Whether `needle` occurs anywhere in the file at `path`.
pub fn file_contains(path: &Path, needle: &[u8]) -> bool {
    let haystack = fs::read(path).unwrap();
    haystack.windows(needle.len()).any(|window| window == needle)
}

impl Server {
    /// The process id of the running server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }
}
