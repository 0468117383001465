//! The KMIP key provider: the KEK lives in the customer's KMIP server (or a cluster of them).
//!
//! Two modes sit behind the same wrap and unwrap operations:
//! - `get`: nbdcrypt fetches the KEK (Get, Key Format Type Raw) and wraps the volume key
//!   locally with AES key wrap (RFC 3394). The token records `aes-kw`.
//! - `encrypt`: the KEK never leaves the KMS. The KMS encrypts the volume key with
//!   AES-256-CBC, PKCS#5 padding and a random IV that nbdcrypt sends; the token records
//!   `kmip-aes-cbc` and stores the IV followed by the ciphertext. CBC has no integrity of
//!   its own: a tampered blob decrypts to a wrong key, which the LUKS2 digest check rejects.
//!
//! Unwrapping follows the token's algorithm, not the configured mode, so changing `mode`
//! only affects volumes created afterwards. Before any use of a KEK its State is read with
//! Get Attributes, because some servers (PyKMIP 0.10 among them) return revoked keys on Get.
//!
//! Modules: `ttlv` (the encoding), `spec` (tags and enumerations), `message` (request and
//! response messages), `ops` (payloads per operation), `transport` (mutual TLS),
//! `cluster` (failover, version negotiation and the health probe).

mod cache;
mod cluster;
mod message;
mod ops;
mod spec;
mod transport;
pub mod ttlv;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{Health, KeyError, KeyProvider, WrappedKey};
use crate::crypto::{self, Kek, VolumeKey};
use crate::volume::WrapAlgorithm;
use cache::KeyCache;
pub use cluster::{ServerError, ServerReport, Timeouts};
use spec::Operation;
pub use spec::ProtocolVersion;

/// IV length of AES-CBC in `encrypt` mode.
const CBC_IV_LEN: usize = 16;
/// A 64-byte volume key with PKCS#5 padding encrypts to 80 bytes.
const CBC_CIPHERTEXT_LEN: usize = 80;

/// Errors of the KMIP key provider. Messages name the provider, the server and the key id,
/// never key material.
#[derive(Debug, thiserror::Error)]
pub enum KmipError {
    #[error("key provider {provider:?} is misconfigured: {reason}")]
    Config { provider: String, reason: String },
    #[error("key provider {provider:?}: no KMIP server answered within {} ms: {}", .elapsed.as_millis(), format_attempts(.attempts))]
    Unavailable { provider: String, elapsed: Duration, attempts: Vec<(String, String)> },
    #[error("key provider {provider:?}: KMIP server {server}: {source}")]
    Server { provider: String, server: String, source: ServerError },
    #[error("key provider {provider:?}: key {key_id:?} is {state}, not Active; it cannot be used (was it revoked?)")]
    NotActive { provider: String, key_id: String, state: &'static str },
    #[error("key provider {provider:?}: key {key_id:?}: {reason}")]
    InvalidKey { provider: String, key_id: String, reason: String },
    #[error(
        "key provider {provider:?}: wrapped key for key {key_id:?} has {actual} bytes, expected {expected}"
    )]
    WrappedKeyLength { provider: String, key_id: String, expected: usize, actual: usize },
}

fn format_attempts(attempts: &[(String, String)]) -> String {
    attempts.iter().map(|(server, error)| format!("{server}: {error}")).collect::<Vec<_>>().join("; ")
}

/// Wrapping mode of new volume keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Fetch the KEK and wrap locally with AES key wrap.
    #[default]
    Get,
    /// Ask the KMS to encrypt and decrypt the volume key; the KEK never leaves it.
    Encrypt,
}

/// A `[key_providers.NAME]` table with `type = "kmip"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmipConfig {
    /// Servers holding the same keys, `HOST:PORT` each (KMIP's port is 5696).
    pub servers: Vec<String>,
    /// PEM bundle of the CAs that issue server certificates.
    pub ca: PathBuf,
    /// PEM client certificate (chain) presented to the servers.
    pub client_cert: PathBuf,
    /// PEM private key of the client certificate (PKCS#8, PKCS#1 or SEC1).
    pub client_key: PathBuf,
    /// Name the server certificates must carry; default: each server's host.
    pub server_name: Option<String>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Time one provider operation (such as unlocking a volume) may take in all,
    /// failover and retries included.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    #[serde(default)]
    pub mode: Mode,
    /// Protocol version to use, such as "1.2"; default: the highest both sides speak.
    pub kmip_version: Option<String>,
    /// Seconds between health probes of each server while serving.
    #[serde(default = "default_probe_interval_secs")]
    pub probe_interval_secs: u64,
    /// Unwrapped volume keys kept in memory for attaches during an outage; 0 disables.
    #[serde(default)]
    pub cache_entries: usize,
    /// Seconds a cached volume key stays usable.
    #[serde(default = "default_cache_ttl_secs")]
    pub cache_ttl_secs: u64,
}

fn default_connect_timeout_ms() -> u64 {
    1000
}
fn default_request_timeout_ms() -> u64 {
    2000
}
fn default_deadline_ms() -> u64 {
    4000
}
fn default_probe_interval_secs() -> u64 {
    10
}
fn default_cache_ttl_secs() -> u64 {
    300
}

/// A key provider backed by a KMIP server or cluster.
pub struct KmipProvider {
    name: String,
    mode: Mode,
    cluster: Arc<cluster::Cluster>,
    probe_interval: Duration,
    cache: Option<KeyCache>,
}

impl KmipProvider {
    /// Checks the configuration and loads the TLS files; connects to nothing yet.
    pub fn new(name: &str, config: &KmipConfig) -> Result<Self, KmipError> {
        let misconfigured = |reason: String| KmipError::Config { provider: name.to_string(), reason };
        if config.servers.is_empty() {
            return Err(misconfigured("servers is empty: list at least one HOST:PORT".into()));
        }
        let mut addresses = Vec::new();
        for address in &config.servers {
            transport::split_host_port(address).map_err(misconfigured)?;
            let server_name =
                transport::server_name_for(address, config.server_name.as_deref()).map_err(misconfigured)?;
            addresses.push((address.clone(), server_name));
        }
        for (field, value) in [
            ("connect_timeout_ms", config.connect_timeout_ms),
            ("request_timeout_ms", config.request_timeout_ms),
            ("deadline_ms", config.deadline_ms),
            ("probe_interval_secs", config.probe_interval_secs),
        ] {
            if value == 0 {
                return Err(misconfigured(format!("{field} must be greater than 0")));
            }
        }
        let pinned_version = match &config.kmip_version {
            Some(text) => Some(ProtocolVersion::parse(text).ok_or_else(|| {
                misconfigured(format!(
                    "kmip_version {text:?} is not supported: use 1.0, 1.1, 1.2, 1.3, 1.4 or 2.0"
                ))
            })?),
            None => None,
        };
        if config.mode == Mode::Encrypt && pinned_version.is_some_and(|v| v < ProtocolVersion::V1_2) {
            return Err(misconfigured("mode \"encrypt\" needs kmip_version 1.2 or later".into()));
        }
        let files = transport::TlsFiles {
            ca: &config.ca,
            client_cert: &config.client_cert,
            client_key: &config.client_key,
        };
        let tls = transport::client_config(&files).map_err(misconfigured)?;

        let timeouts = Timeouts {
            connect: Duration::from_millis(config.connect_timeout_ms),
            request: Duration::from_millis(config.request_timeout_ms),
            deadline: Duration::from_millis(config.deadline_ms),
        };
        let cluster = cluster::Cluster::new(name.to_string(), addresses, tls, timeouts, pinned_version);
        let cache = (config.cache_entries > 0)
            .then(|| KeyCache::new(config.cache_entries, Duration::from_secs(config.cache_ttl_secs)));
        Ok(KmipProvider {
            name: name.to_string(),
            mode: config.mode,
            cluster: Arc::new(cluster),
            probe_interval: Duration::from_secs(config.probe_interval_secs),
            cache,
        })
    }

    /// Connects to every server and reports reachability, protocol version and latency.
    pub async fn check(&self) -> Vec<ServerReport> {
        self.cluster.check().await
    }

    /// Starts the background probe that logs each server's reachability transitions.
    pub fn spawn_health_probe(&self) -> tokio::task::JoinHandle<()> {
        self.cluster.clone().spawn_probe(self.probe_interval)
    }

    /// Reads the State of `key_id` and rejects any state but Active.
    pub async fn ensure_active(&self, key_id: &str, deadline: Instant) -> Result<(), KmipError> {
        let (_, payload) =
            self.cluster.call(Operation::GetAttributes, |v| ops::get_state(v, key_id), deadline).await?;
        let state = ops::parse_state(&payload).map_err(|reason| self.invalid_key(key_id, reason))?;
        if state != spec::STATE_ACTIVE {
            return Err(KmipError::NotActive {
                provider: self.name.clone(),
                key_id: key_id.to_string(),
                state: spec::state_name(state),
            });
        }
        Ok(())
    }

    /// Revokes `key_id` (reason Cessation of Operation), so it can no longer unlock volumes.
    pub async fn revoke_key(&self, key_id: &str) -> Result<(), KmipError> {
        self.cluster.call(Operation::Revoke, |_| ops::revoke(key_id), self.cluster.deadline()).await?;
        Ok(())
    }

    /// Destroys `key_id`; servers require it to be revoked or never activated first.
    pub async fn destroy_key(&self, key_id: &str) -> Result<(), KmipError> {
        self.cluster
            .call(Operation::Destroy, |_| ops::unique_identifier(key_id), self.cluster.deadline())
            .await?;
        Ok(())
    }

    /// Unique identifiers of the objects named `name`.
    pub async fn locate(&self, name: &str) -> Result<Vec<String>, KmipError> {
        let (_, payload) = self
            .cluster
            .call(Operation::Locate, |v| ops::locate_by_name(v, name), self.cluster.deadline())
            .await?;
        ops::parse_locate(&payload).map_err(|reason| self.invalid_key(name, reason))
    }

    /// Returns the KMIP Name given to the KEK of a volume.
    pub fn key_name(volume_uuid: &str) -> String {
        format!("nbdcrypt-{volume_uuid}")
    }

    fn invalid_key(&self, key_id: &str, reason: String) -> KmipError {
        KmipError::InvalidKey { provider: self.name.clone(), key_id: key_id.to_string(), reason }
    }

    async fn fetch_kek(&self, key_id: &str, deadline: Instant) -> Result<Kek, KeyError> {
        self.ensure_active(key_id, deadline).await?;
        let (_, payload) = self.cluster.call(Operation::Get, |_| ops::get_raw(key_id), deadline).await?;
        let material =
            ops::parse_get_aes256(&payload, key_id).map_err(|reason| self.invalid_key(key_id, reason))?;
        Ok(Kek::from_bytes(&material)?)
    }

    async fn kms_crypt(
        &self,
        op: Operation,
        key_id: &str,
        data: &[u8],
        iv: &[u8],
        deadline: Instant,
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.ensure_active(key_id, deadline).await?;
        let (_, payload) = self.cluster.call(op, |_| ops::cbc_crypt(key_id, data, iv), deadline).await?;
        Ok(ops::parse_data(&payload).map_err(|reason| self.invalid_key(key_id, reason))?)
    }

    async fn unwrap_uncached(&self, key_id: &str, wrapped: &WrappedKey) -> Result<VolumeKey, KeyError> {
        let deadline = self.cluster.deadline();
        match wrapped.alg {
            WrapAlgorithm::AesKw => {
                let kek = self.fetch_kek(key_id, deadline).await?;
                Ok(crypto::unwrap_volume_key(&kek, &wrapped.bytes)?)
            }
            WrapAlgorithm::KmipAesCbc => {
                let expected = CBC_IV_LEN + CBC_CIPHERTEXT_LEN;
                if wrapped.bytes.len() != expected {
                    return Err(KmipError::WrappedKeyLength {
                        provider: self.name.clone(),
                        key_id: key_id.to_string(),
                        expected,
                        actual: wrapped.bytes.len(),
                    }
                    .into());
                }
                let (iv, ciphertext) = wrapped.bytes.split_at(CBC_IV_LEN);
                let plain = self.kms_crypt(Operation::Decrypt, key_id, ciphertext, iv, deadline).await?;
                Ok(VolumeKey::from_bytes(&plain)?)
            }
        }
    }
}

#[async_trait]
impl KeyProvider for KmipProvider {
    fn name(&self) -> &str {
        &self.name
    }

    /// Creates an AES-256 KEK named after the volume and activates it. A key whose
    /// activation fails is destroyed again, so no unusable key is left behind.
    async fn create_key(&self, volume_uuid: &str) -> Result<String, KeyError> {
        let deadline = self.cluster.deadline();
        let name = Self::key_name(volume_uuid);
        let mask = ops::usage_mask(self.mode == Mode::Encrypt);
        let (_, payload) =
            self.cluster.call(Operation::Create, |v| ops::create_aes256(v, &name, mask), deadline).await?;
        let key_id =
            ops::parse_unique_identifier(&payload).map_err(|reason| self.invalid_key(&name, reason))?;

        if let Err(error) =
            self.cluster.call(Operation::Activate, |_| ops::unique_identifier(&key_id), deadline).await
        {
            if let Err(cleanup) = self.destroy_key(&key_id).await {
                tracing::warn!(provider = %self.name, key_id = %key_id, error = %cleanup, "destroying the key that could not be activated failed");
            }
            return Err(error.into());
        }
        tracing::info!(provider = %self.name, key_id = %key_id, key_name = %name, "created and activated KEK");
        Ok(key_id)
    }

    async fn wrap_volume_key(&self, key_id: &str, key: &VolumeKey) -> Result<WrappedKey, KeyError> {
        let deadline = self.cluster.deadline();
        let wrapped = match self.mode {
            Mode::Get => {
                let kek = self.fetch_kek(key_id, deadline).await?;
                WrappedKey {
                    alg: WrapAlgorithm::AesKw,
                    bytes: Zeroizing::new(crypto::wrap_volume_key(&kek, key)?),
                }
            }
            Mode::Encrypt => {
                let mut iv = [0u8; CBC_IV_LEN];
                getrandom::getrandom(&mut iv).map_err(crypto::CryptoError::Random)?;
                let ciphertext =
                    self.kms_crypt(Operation::Encrypt, key_id, key.as_bytes(), &iv, deadline).await?;
                if ciphertext.len() != CBC_CIPHERTEXT_LEN {
                    return Err(self
                        .invalid_key(
                            key_id,
                            format!(
                                "Encrypt returned {} bytes, expected {CBC_CIPHERTEXT_LEN}",
                                ciphertext.len()
                            ),
                        )
                        .into());
                }
                let mut bytes = Zeroizing::new(Vec::with_capacity(CBC_IV_LEN + CBC_CIPHERTEXT_LEN));
                bytes.extend_from_slice(&iv);
                bytes.extend_from_slice(&ciphertext);
                WrappedKey { alg: WrapAlgorithm::KmipAesCbc, bytes }
            }
        };
        if let Some(cache) = &self.cache {
            cache.insert(key_id, &wrapped.bytes, key);
        }
        Ok(wrapped)
    }

    async fn unwrap_volume_key(&self, key_id: &str, wrapped: &WrappedKey) -> Result<VolumeKey, KeyError> {
        let result = self.unwrap_uncached(key_id, wrapped).await;
        let Some(cache) = &self.cache else {
            return result;
        };
        match result {
            Ok(key) => {
                cache.insert(key_id, &wrapped.bytes, &key);
                Ok(key)
            }
            // Only an outage falls back to the cache: a reachable KMS that refuses the key
            // (revoked, destroyed) is obeyed.
            Err(KeyError::Kmip(error @ KmipError::Unavailable { .. })) => {
                match cache.get(key_id, &wrapped.bytes) {
                    Some(key) => {
                        tracing::warn!(provider = %self.name, key_id = %key_id, error = %error, "KMS unreachable; using the cached volume key");
                        Ok(key)
                    }
                    None => Err(error.into()),
                }
            }
            Err(other) => Err(other),
        }
    }

    async fn health(&self) -> Health {
        match self.cluster.is_any_reachable().await {
            Ok(()) => Health::Available,
            Err(reason) => Health::Unavailable(reason),
        }
    }
}
