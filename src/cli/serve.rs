//! `nbdcrypt serve`: unlock volumes and serve them over NBD.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tracing::{info, warn};

use super::config::{BackendKind, Config, ExportConfig, Providers};
use super::Cli;
use crate::backend::{uring, Backend, CacheMode, FileBackend, UringBackend};
use crate::crypto::SectorCipher;
use crate::daemon::{self, ListenAddr, Listener, ServerLimits};
use crate::engine::{Export, ExportOptions};
use crate::keys::WrappedKey;
use crate::nbd::ExportTable;
use crate::volume::VolumeHeader;

/// The IANA port for NBD.
const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Volumes to serve; without any, the configuration's [[exports]] are served.
    pub volumes: Vec<PathBuf>,
    /// TCP address to listen on, HOST:PORT [default: 127.0.0.1:10809 unless only --unix is given].
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Unix socket to listen on (created with mode 0600).
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// Export name of a single volume [default: the file name without extension].
    #[arg(long, value_name = "EXPORT")]
    pub name: Option<String>,
    /// Accept TRIM and discard the trimmed sectors on the backing store.
    #[arg(long)]
    pub discard: bool,
    /// Serve read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Seconds in-flight requests get to finish after SIGTERM or SIGINT.
    #[arg(long, value_name = "SECONDS")]
    pub shutdown_timeout: Option<u64>,
    /// Page cache use for the data area of every export: none (O_DIRECT) or writeback
    /// [default: the export's `cache` setting, else none].
    #[arg(long, value_name = "MODE")]
    pub cache: Option<CacheMode>,
    /// I/O backend: uring or threads [default: uring when the kernel allows io_uring, else
    /// threads].
    #[arg(long, value_name = "BACKEND")]
    pub backend: Option<BackendKind>,
}

/// Cache mode of an export that sets none. O_DIRECT keeps memory use flat and the latency
/// of writes and FLUSH steady. Writeback measured faster on most workloads of
/// docs/benchmarks.md, where the 1 GiB test volume fit in the page cache and writes waited
/// for the next FLUSH; a volume larger than memory under steady writes gets neither.
const DEFAULT_CACHE: CacheMode = CacheMode::None;

pub async fn run(cli: &Cli, args: &ServeArgs) -> Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    let providers = Providers::from_config(&config, cli.keystore.as_deref())?;

    let export_configs = export_configs(&config, args)?;
    let backend = choose_backend(args.backend.or(config.server.backend))?;
    let mut exports = Vec::with_capacity(export_configs.len());
    for export_config in &export_configs {
        let export = open_export(export_config, &providers, backend)
            .await
            .with_context(|| format!("cannot serve {}", export_config.path.display()))?;
        exports.push(Arc::new(export));
    }
    let table = Arc::new(ExportTable::new(exports).map_err(anyhow::Error::msg)?);

    let mut addresses = Vec::new();
    let unix = args.unix.clone().or(config.server.unix.clone());
    let listen = args.listen.clone().or(config.server.listen.clone());
    if let Some(path) = unix {
        addresses.push(ListenAddr::Unix(path));
    }
    if listen.is_some() || addresses.is_empty() {
        let text = listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let addr: SocketAddr = tokio::net::lookup_host(text)
            .await
            .with_context(|| format!("listen address {text:?} is invalid: expected HOST:PORT"))?
            .next()
            .with_context(|| format!("listen address {text:?} resolved to nothing"))?;
        addresses.push(ListenAddr::Tcp(addr));
    }

    let mut listeners = Vec::new();
    for address in &addresses {
        let listener =
            Listener::bind(address).await.with_context(|| format!("listening on {address} failed"))?;
        match (&listener, address) {
            (_, ListenAddr::Unix(path)) => info!(socket = %path.display(), "listening"),
            (listener, ListenAddr::Tcp(_)) => {
                info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening")
            }
        }
        listeners.push(listener);
    }

    let mut limits = ServerLimits::default();
    if let Some(secs) = args.shutdown_timeout.or(config.server.shutdown_timeout_secs) {
        limits.shutdown_timeout = Duration::from_secs(secs);
    }
    let server = &config.server;
    // A zero in any of these makes the server reject every client, so it is a mistake.
    let nonzero = [
        ("handshake_timeout_secs", server.handshake_timeout_secs),
        ("max_options", server.max_options.map(u64::from)),
        ("max_connections", server.max_connections.map(|n| n as u64)),
        ("max_connections_per_export", server.max_connections_per_export.map(|n| n as u64)),
        ("max_in_flight_bytes", server.max_in_flight_bytes.map(u64::from)),
        ("stall_timeout_secs", server.stall_timeout_secs),
    ];
    for (key, value) in nonzero {
        if value == Some(0) {
            bail!("[server] {key} must be at least 1");
        }
    }
    if let Some(secs) = server.handshake_timeout_secs {
        limits.handshake_timeout = Duration::from_secs(secs);
    }
    if let Some(max) = server.max_options {
        limits.handshake.max_options = max;
    }
    if let Some(max) = server.max_connections {
        limits.max_connections = max;
    }
    if let Some(max) = server.max_connections_per_export {
        limits.handshake.max_connections_per_export = max;
    }
    if let Some(bytes) = server.max_in_flight_bytes {
        limits.transmission.max_in_flight_bytes = bytes;
    }
    if let Some(bytes) = server.max_total_in_flight_bytes {
        let minimum = 2 * u64::from(crate::engine::MAX_PAYLOAD);
        if bytes < minimum {
            bail!("[server] max_total_in_flight_bytes {bytes} is below {minimum}, two maximum-size requests");
        }
        limits.transmission.set_max_total_in_flight_bytes(bytes);
    }
    if let Some(secs) = server.stall_timeout_secs {
        limits.transmission.stall_timeout = Duration::from_secs(secs);
    }
    if let Some(rate) = server.min_transfer_rate {
        limits.transmission.min_transfer_rate = rate;
    }
    if let Some(bytes) = server.max_payload {
        if !(4096..=crate::engine::MAX_PAYLOAD).contains(&bytes) {
            bail!("[server] max_payload {bytes} is outside 4096..=33554432");
        }
        limits.handshake.max_payload = bytes;
    }

    // Running exports hold their keys and never call the KMS; the probe only logs
    // reachability changes, so an outage is visible before the next attach needs the KMS.
    providers.spawn_health_probes();
    notify_systemd_ready();
    daemon::serve(listeners, table, limits, daemon::termination_signal()).await;
    for address in &addresses {
        if let ListenAddr::Unix(path) = address {
            let _ = std::fs::remove_file(path);
        }
    }
    Ok(())
}

/// Merges command-line volumes and configured exports into one list.
fn export_configs(config: &Config, args: &ServeArgs) -> Result<Vec<ExportConfig>> {
    if args.volumes.is_empty() {
        if config.exports.is_empty() {
            bail!("nothing to serve: give VOLUME paths or [[exports]] in the configuration file");
        }
        if args.name.is_some() {
            bail!("--name applies to a single VOLUME given on the command line");
        }
        return Ok(config
            .exports
            .iter()
            .map(|e| ExportConfig {
                discard: e.discard || args.discard,
                read_only: e.read_only || args.read_only,
                cache: args.cache.or(e.cache),
                ..e.clone()
            })
            .collect());
    }
    if args.name.is_some() && args.volumes.len() != 1 {
        bail!("--name sets the export name of a single volume, but {} were given", args.volumes.len());
    }
    Ok(args
        .volumes
        .iter()
        .map(|path| ExportConfig {
            path: path.clone(),
            name: args.name.clone(),
            discard: args.discard,
            read_only: args.read_only,
            cache: args.cache,
        })
        .collect())
}

/// Settles the backend of every export: the one asked for, or io_uring when the probe
/// passes. Asking for io_uring where it is unavailable is an error.
fn choose_backend(requested: Option<BackendKind>) -> Result<BackendKind> {
    match requested {
        Some(BackendKind::Threads) => Ok(BackendKind::Threads),
        Some(BackendKind::Uring) => {
            uring::probe().context("the io_uring backend was requested, but io_uring is unavailable")?;
            Ok(BackendKind::Uring)
        }
        None => match uring::probe() {
            Ok(()) => Ok(BackendKind::Uring),
            Err(error) => {
                warn!(%error, "io_uring is unavailable; using the thread-pool backend");
                Ok(BackendKind::Threads)
            }
        },
    }
}

/// Opens, locks and unlocks one volume.
async fn open_export(
    config: &ExportConfig,
    providers: &Providers,
    backend_kind: BackendKind,
) -> Result<Export> {
    let name = match &config.name {
        Some(name) => name.clone(),
        None => default_export_name(&config.path)?,
    };
    if name.len() > 4096 || name.contains('\0') {
        bail!("export name is longer than 4096 bytes or contains NUL");
    }

    // A read-only export opens its store read-only, so it works on files without write
    // permission and can never write to them.
    let opened = if config.read_only {
        FileBackend::open_read_only(&config.path)
    } else {
        FileBackend::open_exclusive(&config.path)
    };
    let mut file = opened.with_context(|| format!("opening {} failed", config.path.display()))?;
    let header = VolumeHeader::read(file.file())?;
    let token = header.kms_token()?;
    let provider = providers.get(Some(&token.key_provider))?;

    let wrapped = WrappedKey { alg: token.wrap_alg, bytes: token.wrapped_key.clone() };
    let volume_key = provider.unwrap_volume_key(&token.key_id, &wrapped).await.with_context(|| {
        format!("unlocking with key {:?} of provider {:?} failed", token.key_id, token.key_provider)
    })?;
    header.verify_volume_key(&volume_key)?;
    if header.needs_repair {
        tracing::warn!(
            path = %config.path.display(),
            "one LUKS2 header copy is damaged or stale; stop serving it and run `nbdcrypt repair` to rewrite it"
        );
    }

    let (data_offset, size) = header.data_area(file.len_bytes())?;
    let sector_size = header.metadata.segment.sector_size;
    let cipher = SectorCipher::new(&volume_key, sector_size);
    drop(volume_key);

    let cache = config.cache.unwrap_or(DEFAULT_CACHE);
    if let Err(error) = file.set_cache_mode(cache, sector_size.len()) {
        warn!(path = %config.path.display(), %error, "O_DIRECT is unavailable; using cache mode writeback");
    }
    let cache = file.cache_mode();
    let backend: Arc<dyn Backend> = match backend_kind {
        BackendKind::Threads => Arc::new(file),
        BackendKind::Uring => Arc::new(
            UringBackend::with_defaults(file)
                .with_context(|| format!("setting up io_uring for {} failed", config.path.display()))?,
        ),
    };

    info!(
        export = %name,
        path = %config.path.display(),
        uuid = %header.uuid,
        size,
        sector_size = sector_size.bytes(),
        key_provider = %token.key_provider,
        discard = config.discard,
        read_only = config.read_only,
        backend = ?backend_kind,
        cache = cache.name(),
        xts = cipher.implementation().name(),
        "volume unlocked"
    );
    let options = ExportOptions {
        name,
        description: format!("nbdcrypt LUKS2 volume {}", header.uuid),
        discard: config.discard,
        read_only: config.read_only,
    };
    Ok(Export::new(options, backend, cipher, data_offset, size))
}

fn default_export_name(path: &Path) -> Result<String> {
    path.file_stem().and_then(|stem| stem.to_str()).map(str::to_string).with_context(|| {
        format!("{} has no UTF-8 file name to use as export name; give --name", path.display())
    })
}

/// Tells systemd (Type=notify) that the daemon is ready, when NOTIFY_SOCKET is set.
fn notify_systemd_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let path = PathBuf::from(path);
    let sent = if let Some(abstract_name) = path.to_str().and_then(|p| p.strip_prefix('@')) {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|addr| socket.send_to_addr(b"READY=1", &addr))
    } else {
        socket.send_to(b"READY=1", &path)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "notifying systemd of readiness failed");
    }
}
