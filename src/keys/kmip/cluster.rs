//! A KMIP cluster: servers that hold the same keys. Requests go to a reachable server and
//! fail over on connect errors, TLS errors, timeouts and garbled responses, in bounded
//! rounds with backoff, all under one deadline. A failure the server reports (for example
//! Item Not Found) is final and not retried elsewhere.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tracing::{debug, info, warn};

use super::message::{decode_response, encode_request, ResponseError};
use super::ops;
use super::spec::{self, Operation, ProtocolVersion};
use super::transport::{Connection, TransportError};
use super::ttlv::Item;
use super::KmipError;

/// Rounds over all servers before a request gives up, if the deadline has not ended it.
const MAX_ROUNDS: u32 = 3;
/// Time after which a kept connection is closed rather than reused, so a daemon that only
/// unlocked volumes at start does not hold a server connection for its whole life.
const MAX_IDLE: Duration = Duration::from_secs(30);
/// Pause after the first failed round; it doubles each round.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// A failure talking to one server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Response(#[from] ResponseError),
    #[error("invalid {op} response: {reason}")]
    Payload { op: &'static str, reason: String },
    #[error("the server speaks none of the KMIP versions offered ({offered})")]
    NoCommonVersion { offered: String },
}

impl ServerError {
    /// Returns whether another server may succeed where this one failed.
    fn is_failover(&self) -> bool {
        matches!(self, ServerError::Transport(_) | ServerError::Response(ResponseError::Malformed(_)))
    }
}

/// Time limits of a request.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect plus TLS handshake, per attempt.
    pub connect: Duration,
    /// Sending a request and reading its response, per attempt.
    pub request: Duration,
    /// Everything one provider operation may take, failover and backoff included.
    pub deadline: Duration,
}

struct Server {
    address: String,
    server_name: ServerName<'static>,
    /// Version agreed by Discover Versions on the first connection.
    version: Mutex<Option<ProtocolVersion>>,
    /// A connection kept open between requests, and when it was last used.
    idle: Mutex<Option<(Connection, Instant)>>,
    /// Last known reachability; reachable servers are tried first.
    reachable: AtomicBool,
}

impl Server {
    /// Takes the kept connection unless it has been idle longer than [`MAX_IDLE`].
    fn take_idle(&self) -> Option<Connection> {
        let idle = self.idle.lock().expect("idle connection lock").take();
        idle.filter(|(_, since)| since.elapsed() <= MAX_IDLE).map(|(connection, _)| connection)
    }

    fn keep_idle(&self, connection: Connection) {
        *self.idle.lock().expect("idle connection lock") = Some((connection, Instant::now()));
    }

    /// Closes the kept connection if it has been idle longer than [`MAX_IDLE`].
    fn close_stale_idle(&self) {
        let mut idle = self.idle.lock().expect("idle connection lock");
        if idle.as_ref().is_some_and(|(_, since)| since.elapsed() > MAX_IDLE) {
            *idle = None;
        }
    }
}

/// Result of `check` for one server.
pub struct ServerReport {
    pub address: String,
    pub result: Result<ServerInfo, ServerError>,
}

pub struct ServerInfo {
    pub version: ProtocolVersion,
    pub latency: Duration,
    pub vendor: Option<String>,
    pub operations: usize,
}

pub struct Cluster {
    provider: String,
    servers: Vec<Server>,
    tls: Arc<ClientConfig>,
    timeouts: Timeouts,
    pinned_version: Option<ProtocolVersion>,
    preferred: AtomicUsize,
}

impl Cluster {
    pub fn new(
        provider: String,
        addresses: Vec<(String, ServerName<'static>)>,
        tls: Arc<ClientConfig>,
        timeouts: Timeouts,
        pinned_version: Option<ProtocolVersion>,
    ) -> Self {
        let servers = addresses
            .into_iter()
            .map(|(address, server_name)| Server {
                address,
                server_name,
                version: Mutex::new(None),
                idle: Mutex::new(None),
                reachable: AtomicBool::new(true),
            })
            .collect();
        Cluster { provider, servers, tls, timeouts, pinned_version, preferred: AtomicUsize::new(0) }
    }

    pub fn deadline(&self) -> Instant {
        Instant::now() + self.timeouts.deadline
    }

    /// Sends `op` with the payload `build` makes for the agreed version, to the first
    /// server that responds before `deadline`. Returns the version used and the payload.
    pub async fn call(
        &self,
        op: Operation,
        build: impl Fn(ProtocolVersion) -> Vec<Item>,
        deadline: Instant,
    ) -> Result<(ProtocolVersion, Item), KmipError> {
        let started = Instant::now();
        let mut last_errors: Vec<Option<ServerError>> = self.servers.iter().map(|_| None).collect();
        let mut backoff = FIRST_BACKOFF;

        for round in 0..MAX_ROUNDS {
            for index in self.attempt_order() {
                if Instant::now() >= deadline {
                    break;
                }
                let server = &self.servers[index];
                match self.attempt(server, op, &build, deadline).await {
                    Ok(result) => {
                        self.preferred.store(index, Ordering::Relaxed);
                        server.reachable.store(true, Ordering::Relaxed);
                        return Ok(result);
                    }
                    Err(error) if error.is_failover() => {
                        debug!(provider = %self.provider, server = %server.address, round, error = %error, "KMIP request failed; trying the next server");
                        server.reachable.store(false, Ordering::Relaxed);
                        last_errors[index] = Some(error);
                    }
                    Err(source) => {
                        return Err(KmipError::Server {
                            provider: self.provider.clone(),
                            server: server.address.clone(),
                            source,
                        })
                    }
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() || round + 1 == MAX_ROUNDS {
                break;
            }
            tokio::time::sleep(backoff.min(remaining)).await;
            backoff *= 2;
        }

        let attempts = self
            .servers
            .iter()
            .zip(last_errors)
            .map(|(server, error)| {
                let error =
                    error.map_or_else(|| "not tried before the deadline".to_string(), |e| e.to_string());
                (server.address.clone(), error)
            })
            .collect();
        Err(KmipError::Unavailable { provider: self.provider.clone(), elapsed: started.elapsed(), attempts })
    }

    /// Server indexes: reachable ones first, starting with the last that responded.
    fn attempt_order(&self) -> Vec<usize> {
        let n = self.servers.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let rotated = (0..n).map(|i| (start + i) % n);
        let (mut up, down): (Vec<usize>, Vec<usize>) =
            rotated.partition(|&i| self.servers[i].reachable.load(Ordering::Relaxed));
        up.extend(down);
        up
    }

    async fn attempt(
        &self,
        server: &Server,
        op: Operation,
        build: &impl Fn(ProtocolVersion) -> Vec<Item>,
        deadline: Instant,
    ) -> Result<(ProtocolVersion, Item), ServerError> {
        // A kept connection may have been closed by the server since; a transport error on
        // it earns one retry on a fresh connection.
        let idle = server.take_idle();
        if let Some(mut connection) = idle {
            let version = (*server.version.lock().expect("version lock")).unwrap_or(ProtocolVersion::V1_0);
            match self.send(&mut connection, version, op, build, deadline).await {
                Ok(payload) => {
                    server.keep_idle(connection);
                    return Ok((version, payload));
                }
                Err(ServerError::Transport(_)) => {}
                Err(error) => {
                    server.keep_idle(connection);
                    return Err(error);
                }
            }
        }

        let mut connection = self.connect(server, deadline).await?;
        let known = *server.version.lock().expect("version lock");
        let version = match known {
            Some(version) => version,
            None => {
                let version = self.negotiate(&mut connection, deadline).await?;
                *server.version.lock().expect("version lock") = Some(version);
                version
            }
        };
        let result = self.send(&mut connection, version, op, build, deadline).await;
        if !matches!(result, Err(ServerError::Transport(_))) {
            server.keep_idle(connection);
        }
        result.map(|payload| (version, payload))
    }

    async fn connect(&self, server: &Server, deadline: Instant) -> Result<Connection, ServerError> {
        let timeout = self.timeouts.connect.min(deadline.saturating_duration_since(Instant::now()));
        Ok(Connection::open(&server.address, server.server_name.clone(), self.tls.clone(), timeout).await?)
    }

    async fn send(
        &self,
        connection: &mut Connection,
        version: ProtocolVersion,
        op: Operation,
        build: &impl Fn(ProtocolVersion) -> Vec<Item>,
        deadline: Instant,
    ) -> Result<Item, ServerError> {
        let request = encode_request(version, op, build(version));
        let timeout = self.timeouts.request.min(deadline.saturating_duration_since(Instant::now()));
        let response = connection.exchange(&request, timeout).await?;
        Ok(decode_response(&response, op)?)
    }

    /// Agrees on a protocol version with Discover Versions: the server's first choice among
    /// the versions offered. A server that rejects Discover Versions in every header
    /// version tried speaks only KMIP 1.0, which lacks the operation.
    async fn negotiate(
        &self,
        connection: &mut Connection,
        deadline: Instant,
    ) -> Result<ProtocolVersion, ServerError> {
        let offered: Vec<ProtocolVersion> = match self.pinned_version {
            Some(version) => vec![version],
            None => ProtocolVersion::SUPPORTED.to_vec(),
        };
        let header_versions: Vec<ProtocolVersion> = match self.pinned_version {
            Some(version) => vec![version.max(ProtocolVersion::V1_1)],
            None => vec![ProtocolVersion::V1_4, ProtocolVersion::V1_2, ProtocolVersion::V1_1],
        };
        let offered_text = || offered.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");

        for header_version in header_versions {
            let build = |_| ops::discover_versions(&offered);
            match self.send(connection, header_version, Operation::DiscoverVersions, &build, deadline).await {
                Ok(payload) => {
                    let versions = ops::parse_discover_versions(&payload).map_err(|reason| {
                        ServerError::Payload { op: Operation::DiscoverVersions.name(), reason }
                    })?;
                    return versions
                        .into_iter()
                        .find(|v| offered.contains(v))
                        .ok_or_else(|| ServerError::NoCommonVersion { offered: offered_text() });
                }
                // A server rejects the header version (Invalid Message or Invalid Field) or the
                // operation itself; anything else, such as failed authentication, is final.
                Err(ServerError::Response(ResponseError::Failed {
                    reason:
                        spec::RESULT_REASON_INVALID_MESSAGE
                        | spec::RESULT_REASON_OPERATION_NOT_SUPPORTED
                        | spec::RESULT_REASON_INVALID_FIELD,
                    ..
                })) => continue,
                Err(error) => return Err(error),
            }
        }
        if offered.contains(&ProtocolVersion::V1_0) {
            return Ok(ProtocolVersion::V1_0);
        }
        Err(ServerError::NoCommonVersion { offered: offered_text() })
    }

    /// Connects to every server on a fresh connection and runs Discover Versions and Query.
    pub async fn check(&self) -> Vec<ServerReport> {
        let mut reports = Vec::new();
        for server in &self.servers {
            let started = Instant::now();
            let deadline = started + self.timeouts.connect + self.timeouts.request * 2;
            let result = async {
                let mut connection = self.connect(server, deadline).await?;
                let version = self.negotiate(&mut connection, deadline).await?;
                let latency = started.elapsed();
                let payload = self
                    .send(&mut connection, version, Operation::Query, &|_| ops::query(), deadline)
                    .await?;
                let query = ops::parse_query(&payload);
                Ok(ServerInfo { version, latency, vendor: query.vendor, operations: query.operations.len() })
            }
            .await;
            reports.push(ServerReport { address: server.address.clone(), result });
        }
        reports
    }

    /// Probes one server with Discover Versions on a fresh connection.
    async fn probe(&self, server: &Server) -> Result<ProtocolVersion, ServerError> {
        let deadline = Instant::now() + self.timeouts.connect + self.timeouts.request;
        let mut connection = self.connect(server, deadline).await?;
        self.negotiate(&mut connection, deadline).await
    }

    /// Returns Ok when any server responds to a probe now, else every server's error.
    pub async fn is_any_reachable(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        for server in &self.servers {
            match self.probe(server).await {
                Ok(_) => return Ok(()),
                Err(e) => errors.push(format!("{}: {e}", server.address)),
            }
        }
        Err(errors.join("; "))
    }

    /// Probes every server each `interval` and logs each change of reachability once:
    /// the first result, then every reachable/unreachable transition.
    pub fn spawn_probe(self: Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut known: Vec<Option<bool>> = self.servers.iter().map(|_| None).collect();
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                for (index, server) in self.servers.iter().enumerate() {
                    server.close_stale_idle();
                    let result = self.probe(server).await;
                    let reachable = result.is_ok();
                    server.reachable.store(reachable, Ordering::Relaxed);
                    if known[index] == Some(reachable) {
                        continue;
                    }
                    known[index] = Some(reachable);
                    match result {
                        Ok(version) => {
                            info!(provider = %self.provider, server = %server.address, kmip_version = %version, "KMIP server is reachable")
                        }
                        Err(error) => {
                            warn!(provider = %self.provider, server = %server.address, error = %error, "KMIP server is unreachable")
                        }
                    }
                }
            }
        })
    }
}
