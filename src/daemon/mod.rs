//! The daemon: listeners, one task per connection, and graceful shutdown.
//!
//! On shutdown the listeners close, connections still in the handshake are dropped, and
//! connections in transmission stop reading new requests, finish the ones already read and
//! answer them. Connections that have not finished by the deadline are aborted.

#![allow(unsafe_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::nbd::{self, ExportTable, HandshakeLimits, HandshakeOutcome, NbdError, TransmissionLimits};

/// Limits and timeouts of a running server.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub handshake: HandshakeLimits,
    pub transmission: TransmissionLimits,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Time in-flight requests get to finish once shutdown starts.
    pub shutdown_timeout: Duration,
    /// Connections served at once across all listeners; more are closed on accept.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            handshake: HandshakeLimits::default(),
            transmission: TransmissionLimits::default(),
            handshake_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// A listen address.
#[derive(Debug, Clone)]
pub enum ListenAddr {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(address) => write!(f, "{address}"),
            ListenAddr::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A bound listener, ready to accept.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A unix socket is created with mode 0600; a stale socket file left by
    /// an earlier run is replaced.
    pub async fn bind(addr: &ListenAddr) -> std::io::Result<Self> {
        match addr {
            ListenAddr::Tcp(socket_addr) => {
                if !socket_addr.ip().is_loopback() {
                    warn!(
                        address = %socket_addr,
                        "listening beyond loopback: NBD traffic is unauthenticated plaintext, \
                         so anyone who can reach this address can read and write the exported data"
                    );
                }
                Ok(Listener::Tcp(TcpListener::bind(socket_addr).await?))
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                // Create the socket with no group or other bits, then make sure of it.
                // SAFETY: umask only swaps the process file mode mask.
                let old = unsafe { libc::umask(0o177) };
                let bound = UnixListener::bind(path);
                // SAFETY: as above; restores the previous mask.
                unsafe { libc::umask(old) };
                let listener = bound?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                Ok(Listener::Unix(listener, path.clone()))
            }
        }
    }

    /// The bound TCP address, for listeners bound to port 0.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(listener) => listener.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }
}

fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Serves `exports` on `listeners` until `shutdown` resolves, then drains connections.
pub async fn serve(
    listeners: Vec<Listener>,
    exports: Arc<ExportTable>,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut accept_tasks = JoinSet::new();
    let connections = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
    let slots = Arc::new(Semaphore::new(limits.max_connections));

    for listener in listeners {
        let exports = Arc::clone(&exports);
        let limits = limits.clone();
        let stop_rx = stop_rx.clone();
        let connections = Arc::clone(&connections);
        let slots = Arc::clone(&slots);
        accept_tasks.spawn(accept_loop(listener, exports, limits, stop_rx, connections, slots));
    }

    shutdown.await;
    info!("shutting down: no new connections; finishing in-flight requests");
    let _ = stop_tx.send(true);
    accept_tasks.abort_all();
    while accept_tasks.join_next().await.is_some() {}

    let mut connections = connections.lock().await;
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            remaining = connections.len(),
            timeout_secs = limits.shutdown_timeout.as_secs(),
            "connections did not finish before the shutdown deadline; closing them"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    info!("stopped");
}

async fn accept_loop(
    listener: Listener,
    exports: Arc<ExportTable>,
    limits: ServerLimits,
    stop_rx: watch::Receiver<bool>,
    connections: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    slots: Arc<Semaphore>,
) {
    let over_limit_log = RateLimitedLog::new(Duration::from_secs(10));
    loop {
        let accepted = match &listener {
            Listener::Tcp(tcp) => tcp.accept().await.map(|(stream, peer)| {
                let _ = stream.set_nodelay(true);
                (Connection::Tcp(stream), peer.to_string())
            }),
            Listener::Unix(unix, path) => {
                unix.accept().await.map(|(stream, _)| (Connection::Unix(stream), path.display().to_string()))
            }
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };

        // Over the connection limit the socket closes at once; the client sees EOF.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            if let Some(suppressed) = over_limit_log.should_log() {
                warn!(peer = %peer, max_connections = limits.max_connections, suppressed,
                    "connection limit reached; closing new connections");
            }
            drop(stream);
            continue;
        };

        let exports = Arc::clone(&exports);
        let limits = limits.clone();
        let stop_rx = stop_rx.clone();
        let span = tracing::info_span!("connection", peer = %peer);
        let mut set = connections.lock().await;
        // Reap finished connections so the set does not grow with every client.
        while set.try_join_next().is_some() {}
        set.spawn(
            async move {
                match stream {
                    Connection::Tcp(s) => handle_connection(s, exports, limits, stop_rx).await,
                    Connection::Unix(s) => handle_connection(s, exports, limits, stop_rx).await,
                }
                drop(slot);
            }
            .instrument(span),
        );
    }
}

enum Connection {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Runs one client connection: the handshake, then transmission until the client leaves or
/// `stop_rx` turns true. Never panics on client input; errors end only this connection.
pub async fn handle_connection<S>(
    mut stream: S,
    exports: Arc<ExportTable>,
    limits: ServerLimits,
    mut stop_rx: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    debug!("connected");
    let negotiated = tokio::select! {
        outcome = tokio::time::timeout(limits.handshake_timeout,
            nbd::negotiate(&mut stream, &exports, &limits.handshake)) => {
            outcome.unwrap_or(Err(NbdError::HandshakeTimeout))
        }
        _ = stop_rx.wait_for(|stop| *stop) => return,
    };

    let session = match negotiated {
        Ok(HandshakeOutcome::Transmission(session)) => session,
        Ok(HandshakeOutcome::Aborted) => {
            debug!("client aborted the handshake");
            return;
        }
        Err(NbdError::Disconnected) => {
            debug!("client disconnected during the handshake");
            return;
        }
        // A client that hangs up before reading the greeting, such as a liveness probe.
        Err(NbdError::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) =>
        {
            debug!(error = %e, "client disconnected during the handshake");
            return;
        }
        Err(e) => {
            info!(error = %e, "handshake failed");
            return;
        }
    };

    let span = tracing::info_span!("export", name = %session.export.name());
    async move {
        info!(structured_replies = session.structured_replies, "client attached");
        let (reader, writer) = tokio::io::split(stream);
        match nbd::serve_transmission(reader, writer, session, &limits.transmission, stop_rx).await {
            Ok(()) => info!("client detached"),
            Err(e) => info!(error = %e, "connection closed"),
        }
    }
    .instrument(span)
    .await
}

/// Lets a repeated warning through at most once per interval, counting what it held back.
pub struct RateLimitedLog {
    interval: Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl RateLimitedLog {
    pub fn new(interval: Duration) -> Self {
        RateLimitedLog { interval, state: std::sync::Mutex::new((None, 0)) }
    }

    /// Returns `Some(suppressed count)` when the caller should log now.
    pub fn should_log(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = std::time::Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.interval => {
                state.1 += 1;
                None
            }
            _ => {
                let suppressed = state.1;
                *state = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// Marks the process non-dumpable, so core dumps and ptrace by other users cannot read keys
/// or plaintext buffers from its memory.
pub fn disable_core_dumps() -> std::io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes an integer argument and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit reads the struct behind the pointer, which lives for the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &limit) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).expect("installing a SIGTERM handler succeeds in a tokio runtime");
    let mut int =
        signal(SignalKind::interrupt()).expect("installing a SIGINT handler succeeds in a tokio runtime");
    tokio::select! {
        _ = term.recv() => info!("received SIGTERM"),
        _ = int.recv() => info!("received SIGINT"),
    }
}
