//! The KMIP key provider against a real KMIP server: PyKMIP (Debian's python3-pykmip),
//! started by scripts/kms/start-pykmip.sh on 127.0.0.1 with throwaway ECDSA certificates.
//!
//! Covered: create, serve and I/O in both modes, and every KMIP version PyKMIP 0.10 speaks.
//! Failures: a two-server cluster with one server stopped, an outage of over 60 s under
//! fio load, a revoked KEK, a wrong CA, a wrong client certificate and an unreachable server.

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{parse_json_output, require_tool, run, Workspace, BIN};
use nbdcrypt::crypto::VolumeKey;
use nbdcrypt::keys::kmip::{KmipError, ProtocolVersion};
use nbdcrypt::keys::{KeyError, KeyProvider, KmipConfig, KmipProvider, WrappedKey};

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kms");

/// A PyKMIP server on 127.0.0.1, stopped on drop.
struct Kms {
    dir: PathBuf,
    port: u16,
    env: Vec<(String, String)>,
}

impl Kms {
    /// Starts a server with fresh certificates and its own object store in `dir`.
    fn start(dir: &Path) -> Kms {
        Kms::start_with(dir, Vec::new())
    }

    /// Starts a second server that shares `first`'s object store and certificates, so both
    /// hold the same keys like a replicated cluster.
    fn start_sharing(dir: &Path, first: &Kms) -> Kms {
        let env = vec![
            ("KMIP_DB".to_string(), first.dir.join("pykmip.db").display().to_string()),
            ("KMIP_CERTS".to_string(), first.dir.join("certs").display().to_string()),
        ];
        Kms::start_with(dir, env)
    }

    fn start_with(dir: &Path, env: Vec<(String, String)>) -> Kms {
        require_tool("openssl");
        let kms = Kms { dir: dir.to_path_buf(), port: free_port(), env };
        kms.run_start_script();
        kms
    }

    fn run_start_script(&self) {
        let mut command = Command::new(format!("{SCRIPTS}/start-pykmip.sh"));
        command.arg(&self.dir).arg(self.port.to_string());
        for (key, value) in &self.env {
            command.env(key, value);
        }
        run(&mut command);
    }

    /// Starts the server again on the same port with the same store.
    fn restart(&self) {
        self.run_start_script();
    }

    fn stop(&self) {
        run(Command::new(format!("{SCRIPTS}/stop-pykmip.sh")).arg(&self.dir));
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn cert(&self, name: &str) -> PathBuf {
        self.dir.join("certs").join(name)
    }
}

impl Drop for Kms {
    fn drop(&mut self) {
        let _ = Command::new(format!("{SCRIPTS}/stop-pykmip.sh")).arg(&self.dir).output();
    }
}

/// Returns a port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Returns the body of a `[key_providers.corp]` table for `servers`, with certificates from `kms`
/// and `extra` lines appended.
fn provider_table(kms: &Kms, servers: &[String], extra: &str) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "type = \"kmip\"\nservers = [{}]\nca = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n{extra}\n",
        servers.join(", "),
        kms.cert("ca.crt"),
        kms.cert("client.crt"),
        kms.cert("client.key"),
    )
}

/// Writes a configuration file whose default provider "corp" is `table`.
fn write_config(ws: &Workspace, name: &str, table: &str) -> PathBuf {
    let path = ws.path(name);
    fs::write(&path, format!("default_key_provider = \"corp\"\n[key_providers.corp]\n{table}")).unwrap();
    path
}

fn nbdcrypt(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN).arg("--config").arg(config).args(args).output().expect("running nbdcrypt failed")
}

fn create(config: &Path, volume: &Path) -> String {
    let output = nbdcrypt(config, &["create", volume.to_str().unwrap(), "--size", "16M"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "create failed: {}{stdout}", String::from_utf8_lossy(&output.stderr));
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("key id:"))
        .expect("create prints the key id")
        .trim()
        .to_string()
}

fn info(config: &Path, volume: &Path) -> String {
    String::from_utf8_lossy(
        &run(Command::new(BIN).arg("--config").arg(config).arg("info").arg(volume)).stdout,
    )
    .into_owned()
}

/// Writes `pattern` to the first MiB of `uri` and reads it back with qemu-io.
fn write_and_verify(uri: &str, pattern: u8) {
    require_tool("qemu-io");
    let write = format!("write -P {pattern} 0 1M");
    let read = format!("read -P {pattern} 0 1M");
    let output = run(Command::new("qemu-io").args(["-f", "raw", "-c", &write, "-c", &read, uri]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
    assert_eq!(stdout.matches("1 MiB, 1 ops").count(), 2, "{stdout}");
}

/// Runs `serve` for `volume` until it fails, returning its status, stderr and run time.
fn serve_expecting_failure(config: &Path, volume: &Path, timeout: Duration) -> (String, Duration) {
    let socket = volume.with_extension("sock");
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(["serve", "--unix", socket.to_str().unwrap(), volume.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!("serve still ran after {timeout:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success(), "serve started although it should not");
    (String::from_utf8_lossy(&output.stderr).into_owned(), elapsed)
}

/// Builds a provider in-process from a `provider_table` body.
fn provider(table: &str) -> KmipProvider {
    let config: KmipConfig = toml::from_str(&table.replace("type = \"kmip\"\n", "")).unwrap();
    KmipProvider::new("corp", &config).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

#[test]
fn get_mode_create_serve_io() {
    let ws = Workspace::new();
    let kms = Kms::start(&ws.path("kms"));
    let config = write_config(&ws, "kms.toml", &provider_table(&kms, &[kms.address()], "mode = \"get\""));

    let check = run(Command::new(BIN).arg("--config").arg(&config).args(["kms", "check", "corp"]));
    let check = String::from_utf8_lossy(&check.stdout);
    assert!(check.contains(&format!("{}  reachable  KMIP 2.0", kms.address())), "{check}");
    assert!(check.contains("PyKMIP"), "{check}");

    let volume = ws.path("get.img");
    let key_id = create(&config, &volume);
    let info = info(&config, &volume);
    assert!(info.contains("aes-kw"), "{info}");
    assert!(info.contains(&key_id), "{info}");

    let server = ws.serve(&["--config", config.to_str().unwrap(), volume.to_str().unwrap()]);
    write_and_verify(&server.uri("get"), 0x5a);
    let log = server.log_text();
    assert!(log.contains("KMIP server is reachable"), "{log}");
    assert!(server.stop().success());
}

#[test]
fn encrypt_mode_create_serve_io() {
    let ws = Workspace::new();
    let kms = Kms::start(&ws.path("kms"));
    let config = write_config(&ws, "kms.toml", &provider_table(&kms, &[kms.address()], "mode = \"encrypt\""));

    let volume = ws.path("enc.img");
    create(&config, &volume);
    let info = info(&config, &volume);
    assert!(info.contains("kmip-aes-cbc"), "{info}");

    let server = ws.serve(&["--config", config.to_str().unwrap(), volume.to_str().unwrap()]);
    write_and_verify(&server.uri("enc"), 0x21);
    assert!(server.stop().success());

    // Serving again unwraps through the KMS once more and reads the same data.
    let server = ws.serve(&["--config", config.to_str().unwrap(), volume.to_str().unwrap()]);
    let output =
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x21 0 1M", &server.uri("enc")]));
    assert!(!String::from_utf8_lossy(&output.stdout).contains("verification failed"));
    assert!(server.stop().success());
}

#[test]
fn tampered_encrypt_mode_key_is_wrong_or_rejected() {
    let ws = Workspace::new();
    let kms = Kms::start(&ws.path("kms"));
    let provider = provider(&provider_table(&kms, &[kms.address()], "mode = \"encrypt\""));
    runtime().block_on(async {
        let key_id = provider.create_key("tamper").await.unwrap();
        let key = VolumeKey::generate().unwrap();
        let wrapped = provider.wrap_volume_key(&key_id, &key).await.unwrap();
        // Flip one bit in each 16-byte block: the IV, then every ciphertext block.
        for block in 0..wrapped.bytes.len() / 16 {
            let mut bytes = wrapped.bytes.clone();
            bytes[block * 16 + 3] ^= 0x10;
            let tampered = WrappedKey { alg: wrapped.alg, bytes };
            match provider.unwrap_volume_key(&key_id, &tampered).await {
                Ok(back) => {
                    assert_ne!(back.as_bytes(), key.as_bytes(), "block {block} tampering went unnoticed")
                }
                Err(error) => assert!(error.to_string().contains("Decrypt"), "block {block}: {error}"),
            }
        }
    });
}

/// Every version PyKMIP 0.10 speaks, with the full key lifecycle; Encrypt and Decrypt exist
/// from KMIP 1.2 on.
#[test]
fn each_kmip_version_runs_key_lifecycle() {
    let ws = Workspace::new();
    let kms = Kms::start(&ws.path("kms"));
    let rt = runtime();
    for version in ProtocolVersion::SUPPORTED {
        let modes: &[&str] = if version >= ProtocolVersion::V1_2 { &["get", "encrypt"] } else { &["get"] };
        for mode in modes {
            let table = provider_table(
                &kms,
                &[kms.address()],
                &format!("mode = \"{mode}\"\nkmip_version = \"{version}\""),
            );
            let provider = provider(&table);
            rt.block_on(async {
                let reports = provider.check().await;
                let agreed = reports[0].result.as_ref().map(|i| i.version).map_err(|e| e.to_string());
                assert_eq!(agreed, Ok(version), "Discover Versions with KMIP {version}");

                let uuid = format!("v{version}-{mode}");
                let key_id = provider.create_key(&uuid).await.unwrap();
                let found = provider.locate(&KmipProvider::key_name(&uuid)).await.unwrap();
                assert_eq!(found, vec![key_id.clone()], "Locate in KMIP {version}");

                let key = VolumeKey::generate().unwrap();
                let wrapped = provider.wrap_volume_key(&key_id, &key).await.unwrap();
                let back = provider.unwrap_volume_key(&key_id, &wrapped).await.unwrap();
                assert_eq!(back.as_bytes(), key.as_bytes(), "round trip in KMIP {version} mode {mode}");

                provider.revoke_key(&key_id).await.unwrap();
                let error = provider.unwrap_volume_key(&key_id, &wrapped).await.unwrap_err();
                assert!(error.to_string().contains("Deactivated, not Active"), "KMIP {version}: {error}");
                provider.destroy_key(&key_id).await.unwrap();
                let error = provider.unwrap_volume_key(&key_id, &wrapped).await.unwrap_err();
                assert!(error.to_string().contains("Item Not Found"), "KMIP {version}: {error}");
            });
        }
    }
    // The CLI works at the oldest version too.
    let config =
        write_config(&ws, "v10.toml", &provider_table(&kms, &[kms.address()], "kmip_version = \"1.0\""));
    let volume = ws.path("v10.img");
    create(&config, &volume);
    let server = ws.serve(&["--config", config.to_str().unwrap(), volume.to_str().unwrap()]);
    write_and_verify(&server.uri("v10"), 0x10);
    assert!(server.stop().success());
}

#[test]
fn cluster_fails_over_to_running_server() {
    let ws = Workspace::new();
    let first = Kms::start(&ws.path("kms-a"));
    let second = Kms::start_sharing(&ws.path("kms-b"), &first);
    let table = provider_table(&first, &[first.address(), second.address()], "mode = \"encrypt\"");
    let config = write_config(&ws, "kms.toml", &table);

    let before = ws.path("before.img");
    create(&config, &before);
    first.stop();

    // A key created through the first server unlocks through the second.
    let started = Instant::now();
    let server = ws.serve(&["--config", config.to_str().unwrap(), before.to_str().unwrap()]);
    assert!(started.elapsed() < Duration::from_secs(5), "failover took {:?}", started.elapsed());
    write_and_verify(&server.uri("before"), 0x42);
    assert!(server.stop().success());

    // Create works with one server down as well.
    let after = ws.path("after.img");
    create(&config, &after);

    let output = nbdcrypt(&config, &["kms", "check"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "check must fail while a server is down: {stdout}");
    assert!(stdout.contains(&format!("{}  unreachable  connect failed", first.address())), "{stdout}");
    assert!(stdout.contains(&format!("{}  reachable", second.address())), "{stdout}");
}

/// fio keeps writing and verifying through an export while the only KMS is down for over
/// 60 s. A new attach fails fast during the outage and works once the KMS is back.
#[test]
fn outage_under_load_keeps_exports_running() {
    require_tool("fio");
    let ws = Workspace::new();
    let kms = Kms::start(&ws.path("kms"));
    let config = write_config(
        &ws,
        "kms.toml",
        &provider_table(
            &kms,
            &[kms.address()],
            "probe_interval_secs = 1\nconnect_timeout_ms = 3000\nrequest_timeout_ms = 3000",
        ),
    );
    let running = ws.path("running.img");
    let second = ws.path("second.img");
    create(&config, &running);
    create(&config, &second);
    let server = ws.serve(&["--config", config.to_str().unwrap(), running.to_str().unwrap()]);

    let outage = Duration::from_secs(62);
    let fio = Command::new("fio")
        .args([
            "--name=outage",
            "--ioengine=nbd",
            &format!("--uri={}", server.uri("running")),
            "--rw=randrw",
            "--bs=4k",
            "--size=8M",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_backlog=256",
            "--verify_state_save=0",
            "--verify_fatal=1",
            "--time_based",
            &format!("--runtime={}", outage.as_secs() + 8),
            "--output-format=json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting fio failed");

    std::thread::sleep(Duration::from_secs(2));
    kms.stop();
    let stopped_at = Instant::now();

    let (message, elapsed) = serve_expecting_failure(&config, &second, Duration::from_secs(10));
    assert!(elapsed < Duration::from_secs(5), "attach during the outage took {elapsed:?}: {message}");
    assert!(message.contains("key provider \"corp\""), "{message}");
    assert!(message.contains(&kms.address()), "{message}");
    assert!(message.contains("no KMIP server answered"), "{message}");

    std::thread::sleep(outage.saturating_sub(stopped_at.elapsed()));
    kms.restart();

    let fio = fio.wait_with_output().unwrap();
    assert!(fio.status.success(), "fio failed: {}", String::from_utf8_lossy(&fio.stderr));
    let report = parse_json_output(&fio.stdout);
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "fio reported an error: {job}");
    assert!(job["write"]["io_bytes"].as_u64().unwrap() > 0, "fio wrote nothing: {job}");
    assert!(job["read"]["io_bytes"].as_u64().unwrap() > 0, "fio read nothing: {job}");

    // The probe logged the outage once and the recovery once; it probes every second, so
    // the recovery shows within a few seconds of the restart.
    let recovered_by = Instant::now() + Duration::from_secs(15);
    while server.log_text().matches("KMIP server is reachable").count() < 2 && Instant::now() < recovered_by {
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = server.log_text();
    assert_eq!(log.matches("KMIP server is unreachable").count(), 1, "{log}");
    assert_eq!(log.matches("KMIP server is reachable").count(), 2, "{log}");
    assert!(server.stop().success());

    let other = Workspace::new();
    let server = other.serve(&["--config", config.to_str().unwrap(), second.to_str().unwrap()]);
    write_and_verify(&server.uri("second"), 0x77);
    assert!(server.stop().success());
}

#[test]
fn revoked_kek_refuses_attach_but_not_running_export() {
    let ws = Workspace::new();
    let kms = Kms::start(&ws.path("kms"));
    let table = provider_table(&kms, &[kms.address()], "");
    let config = write_config(&ws, "kms.toml", &table);
    let volume = ws.path("revoked.img");
    let key_id = create(&config, &volume);

    let server = ws.serve(&["--config", config.to_str().unwrap(), volume.to_str().unwrap()]);
    runtime().block_on(provider(&table).revoke_key(&key_id)).unwrap();
    write_and_verify(&server.uri("revoked"), 0x13);
    assert!(server.stop().success());

    let (message, _) = serve_expecting_failure(&config, &volume, Duration::from_secs(10));
    assert!(message.contains(&format!("key {key_id:?} is Deactivated, not Active")), "{message}");
}

#[test]
fn tls_and_address_errors_are_clear_and_fast() {
    let ws = Workspace::new();
    let kms = Kms::start(&ws.path("kms"));
    let good = provider_table(&kms, &[kms.address()], "");

    // A TCP listener that never responds plays a server that hangs.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_address = silent.local_addr().unwrap().to_string();
    let closed_address = format!("127.0.0.1:{}", free_port());

    let cases = [
        (
            "wrong CA",
            good.replace(kms.cert("ca.crt").to_str().unwrap(), kms.cert("other-ca.crt").to_str().unwrap()),
            "invalid peer certificate",
        ),
        (
            "client certificate from another CA",
            good.replace("client.crt", "other-client.crt").replace("client.key", "other-client.key"),
            "TLS handshake failed",
        ),
        (
            "client certificate without clientAuth",
            good.replace("client.crt", "client-noeku.crt").replace("client.key", "client-noeku.key"),
            "Authentication Not Successful",
        ),
        ("closed port", good.replace(&kms.address(), &closed_address), "connect failed"),
        ("silent server", good.replace(&kms.address(), &silent_address), "timed out"),
    ];
    for (case, table, expected) in cases {
        let config = write_config(&ws, "bad.toml", &table);
        let started = Instant::now();
        let output = nbdcrypt(&config, &["create", ws.path("bad.img").to_str().unwrap(), "--size", "1M"]);
        let elapsed = started.elapsed();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{case}: create succeeded");
        assert!(stderr.contains(expected), "{case}: expected {expected:?} in: {stderr}");
        assert!(elapsed < Duration::from_secs(5), "{case}: took {elapsed:?}");
        let _ = fs::remove_file(ws.path("bad.img"));
    }
    drop(silent);
}

#[test]
fn unavailable_error_names_every_server() {
    let ws = Workspace::new();
    let kms = Kms::start(&ws.path("kms"));
    let servers = [format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port())];
    let provider = provider(&provider_table(&kms, &servers, "deadline_ms = 1500"));
    let started = Instant::now();
    let error = runtime().block_on(provider.create_key("x")).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    let KeyError::Kmip(KmipError::Unavailable { attempts, .. }) = &error else {
        panic!("unexpected error {error}")
    };
    let named: Vec<&str> = attempts.iter().map(|(server, _)| server.as_str()).collect();
    assert_eq!(named, servers.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn outage_cache_unwraps_while_kms_down() {
    let ws = Workspace::new();
    let kms = Kms::start(&ws.path("kms"));
    let cached = provider(&provider_table(&kms, &[kms.address()], "cache_entries = 4\ndeadline_ms = 1000"));
    let uncached = provider(&provider_table(&kms, &[kms.address()], "deadline_ms = 1000"));
    runtime().block_on(async {
        let key_id = cached.create_key("cache").await.unwrap();
        let key = VolumeKey::generate().unwrap();
        let wrapped = cached.wrap_volume_key(&key_id, &key).await.unwrap();
        cached.unwrap_volume_key(&key_id, &wrapped).await.unwrap();
        kms.stop();

        let back = cached.unwrap_volume_key(&key_id, &wrapped).await.unwrap();
        assert_eq!(back.as_bytes(), key.as_bytes());
        let error = uncached.unwrap_volume_key(&key_id, &wrapped).await.unwrap_err();
        assert!(matches!(error, KeyError::Kmip(KmipError::Unavailable { .. })), "{error}");
    });
}

/// Runs create and serve with every log level on, then searches their logs for the KEK (read
/// from PyKMIP's object store) and the wrapped key (read from the header) in raw, hex and
/// base64 form.
#[test]
fn trace_logs_hold_no_key_material() {
    use base64::Engine as _;

    let ws = Workspace::new();
    let kms = Kms::start(&ws.path("kms"));
    let config = write_config(&ws, "kms.toml", &provider_table(&kms, &[kms.address()], "mode = \"get\""));
    let volume = ws.path("logs.img");
    let output = nbdcrypt(&config, &["--log", "trace", "create", volume.to_str().unwrap(), "--size", "16M"]);
    assert!(output.status.success(), "create failed: {}", String::from_utf8_lossy(&output.stderr));
    let key_id = String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("key id:").map(|id| id.trim().to_string()))
        .unwrap();
    let server =
        ws.serve(&["--log", "trace", "--config", config.to_str().unwrap(), volume.to_str().unwrap()]);
    write_and_verify(&server.uri("logs"), 0x66);
    let mut logs = server.log_text().into_bytes();
    assert!(server.stop().success());
    logs.extend_from_slice(&output.stderr);
    logs.extend_from_slice(&output.stdout);

    let query = format!(
        "import sqlite3,sys; row=sqlite3.connect(sys.argv[1]).execute('select value from managed_objects where uid=?', ({key_id},)).fetchone(); sys.stdout.write(row[0].hex())"
    );
    let kek_hex =
        run(Command::new("/usr/bin/python3").args(["-c", &query]).arg(kms.dir.join("pykmip.db"))).stdout;
    let kek_hex = String::from_utf8(kek_hex).unwrap();
    assert_eq!(kek_hex.len(), 64, "KEK from the object store: {kek_hex:?}");
    let kek: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&kek_hex[2 * i..2 * i + 2], 16).unwrap()).collect();

    let header = fs::read(&volume).unwrap();
    let marker = b"\"wrapped_key\":\"";
    let at =
        header.windows(marker.len()).position(|w| w == marker).expect("token in the header") + marker.len();
    let end = at + header[at..].iter().position(|&b| b == b'"').unwrap();
    let wrapped_base64 = String::from_utf8(header[at..end].to_vec()).unwrap();
    let wrapped = base64::engine::general_purpose::STANDARD.decode(&wrapped_base64).unwrap();

    let contains = |needle: &[u8]| logs.windows(needle.len()).any(|w| w == needle);
    let forms = |bytes: &[u8]| {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        vec![
            bytes.to_vec(),
            hex.clone().into_bytes(),
            hex.to_uppercase().into_bytes(),
            base64::engine::general_purpose::STANDARD.encode(bytes).into_bytes(),
            format!("{:?}", &bytes[..8]).into_bytes(),
        ]
    };
    assert!(logs.len() > 1000, "trace logging produced almost nothing");
    for form in forms(&kek) {
        assert!(!contains(&form), "a log contains the KEK");
    }
    for form in forms(&wrapped) {
        assert!(!contains(&form), "a log contains the wrapped key");
    }
}
