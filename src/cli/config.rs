//! The TOML configuration file and the key provider registry built from it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::backend::CacheMode;
use crate::keys::{KeyProvider, KmipConfig, KmipProvider, LocalKeystore};
use crate::volume::is_valid_provider_name;

/// Name of the local keystore provider that exists when the configuration names none.
pub const DEFAULT_PROVIDER: &str = "local";

/// The whole configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Provider used by `create` when `--key-provider` is not given.
    pub default_key_provider: Option<String>,
    #[serde(default)]
    pub key_providers: BTreeMap<String, ProviderConfig>,
    #[serde(default)]
    pub exports: Vec<ExportConfig>,
    #[serde(default)]
    pub server: ServerConfig,
}

/// One `[key_providers.NAME]` table.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ProviderConfig {
    /// A local keystore directory.
    Local { path: Option<PathBuf> },
    /// A KMIP server or a cluster of servers holding the same keys.
    Kmip(KmipConfig),
}

/// One `[[exports]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub path: PathBuf,
    pub name: Option<String>,
    #[serde(default)]
    pub discard: bool,
    #[serde(default)]
    pub read_only: bool,
    /// Page cache use for the data area: "none" (O_DIRECT) or "writeback".
    pub cache: Option<CacheMode>,
}

/// The `[server]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// TCP listen address, `HOST:PORT`.
    pub listen: Option<String>,
    /// Unix socket path.
    pub unix: Option<PathBuf>,
    /// Seconds in-flight requests get to finish after SIGTERM.
    pub shutdown_timeout_secs: Option<u64>,
    /// Seconds a client gets to finish the handshake.
    pub handshake_timeout_secs: Option<u64>,
    /// Options a client may send in one handshake.
    pub max_options: Option<u32>,
    /// Connections served at once, in total.
    pub max_connections: Option<usize>,
    /// Connections in transmission on one export at once.
    pub max_connections_per_export: Option<usize>,
    /// Bytes of request payloads and read replies in flight per connection.
    pub max_in_flight_bytes: Option<u32>,
    /// Bytes of request payloads and read replies in flight across all connections.
    pub max_total_in_flight_bytes: Option<u64>,
    /// Seconds a client may make no progress inside a write payload or while a reply is
    /// written to it before it is disconnected.
    pub stall_timeout_secs: Option<u64>,
    /// Slowest rate, in bytes per second, at which a client may send a write payload or read
    /// a reply, beyond the stall timeout; 0 turns the check off.
    pub min_transfer_rate: Option<u64>,
    /// Largest READ or WRITE payload advertised, in bytes (at most 32 MiB).
    pub max_payload: Option<u32>,
    /// I/O backend of every export: "uring" or "threads"; by default io_uring when the
    /// kernel allows it.
    pub backend: Option<BackendKind>,
}

/// The I/O path of the exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// io_uring, one ring thread per export.
    Uring,
    /// pread/pwrite on tokio's blocking thread pool.
    Threads,
}

impl std::str::FromStr for BackendKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "uring" => Ok(BackendKind::Uring),
            "threads" => Ok(BackendKind::Threads),
            other => Err(format!("backend {other:?} is invalid: expected uring or threads")),
        }
    }
}

impl Config {
    /// Loads `path`, or returns the empty configuration when no file is given.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading configuration file {} failed", path.display()))?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("configuration file {} is invalid", path.display()))?;
        for name in config.key_providers.keys() {
            if !is_valid_provider_name(name) {
                bail!("key provider name {name:?} is invalid: use letters, digits, '-' and '_' (at most 64)");
            }
        }
        Ok(config)
    }
}

/// The configured key providers, by name.
pub struct Providers {
    providers: BTreeMap<String, Arc<dyn KeyProvider>>,
    kmip: BTreeMap<String, Arc<KmipProvider>>,
    default: String,
}

impl Providers {
    /// Builds the providers of `config`. `keystore` (the `--keystore` flag) overrides the
    /// path of every local provider; without any configured provider, a local provider
    /// named "local" uses `keystore` or the default directory.
    pub fn from_config(config: &Config, keystore: Option<&Path>) -> Result<Self> {
        let mut providers: BTreeMap<String, Arc<dyn KeyProvider>> = BTreeMap::new();
        let mut kmip = BTreeMap::new();
        for (name, provider) in &config.key_providers {
            match provider {
                ProviderConfig::Local { path } => {
                    let dir = keystore
                        .map(Path::to_path_buf)
                        .or_else(|| path.clone())
                        .map_or_else(LocalKeystore::default_dir, Ok)?;
                    providers.insert(name.clone(), Arc::new(LocalKeystore::new(name.clone(), dir)));
                }
                ProviderConfig::Kmip(settings) => {
                    let provider = Arc::new(KmipProvider::new(name, settings)?);
                    kmip.insert(name.clone(), provider.clone());
                    providers.insert(name.clone(), provider);
                }
            }
        }
        if !providers.contains_key(DEFAULT_PROVIDER) && config.key_providers.is_empty() {
            let dir = keystore.map(Path::to_path_buf).map_or_else(LocalKeystore::default_dir, Ok)?;
            providers
                .insert(DEFAULT_PROVIDER.to_string(), Arc::new(LocalKeystore::new(DEFAULT_PROVIDER, dir)));
        }

        let default = config.default_key_provider.clone().unwrap_or_else(|| {
            if providers.len() == 1 {
                providers.keys().next().cloned().unwrap_or_default()
            } else {
                DEFAULT_PROVIDER.to_string()
            }
        });
        if !providers.contains_key(&default) {
            bail!("default_key_provider {default:?} is not defined in [key_providers]");
        }
        Ok(Providers { providers, kmip, default })
    }

    /// The KMIP providers, by name.
    pub fn kmip(&self) -> &BTreeMap<String, Arc<KmipProvider>> {
        &self.kmip
    }

    /// Starts the background reachability probe of every KMIP provider.
    pub fn spawn_health_probes(&self) {
        for provider in self.kmip.values() {
            provider.spawn_health_probe();
        }
    }

    /// Finds a provider by name, or the default one.
    pub fn get(&self, name: Option<&str>) -> Result<Arc<dyn KeyProvider>> {
        let name = name.unwrap_or(&self.default);
        self.providers.get(name).cloned().with_context(|| {
            let known: Vec<&str> = self.providers.keys().map(String::as_str).collect();
            format!("key provider {name:?} is not configured (configured: {})", known.join(", "))
        })
    }
}

/// Parses a size with an optional IEC suffix: K, M, G, T (powers of 1024), also written
/// KiB, MiB, GiB, TiB. A bare number is bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    if digits.is_empty() {
        bail!("size {text:?} is invalid: expected a number with an optional K, M, G or T suffix");
    }
    let number: u64 = digits.parse().with_context(|| format!("size {text:?} is too large"))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KIB" => 10,
        "M" | "MIB" => 20,
        "G" | "GIB" => 30,
        "T" | "TIB" => 40,
        _ => bail!("size {text:?} has an unknown suffix {suffix:?}: use K, M, G or T (powers of 1024)"),
    };
    number.checked_mul(1u64 << shift).with_context(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_iec_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1K").unwrap(), 1024);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn config_file_parses() {
        let text = r#"
            default_key_provider = "vault"
            [key_providers.vault]
            type = "local"
            path = "/tmp/keys"
            [[exports]]
            path = "/srv/a.img"
            name = "a"
            discard = true
            cache = "writeback"
            [server]
            backend = "threads"
        "#;
        let config: Config = toml::from_str(text).unwrap();
        assert_eq!(config.exports.len(), 1);
        assert!(config.exports[0].discard);
        assert_eq!(config.exports[0].cache, Some(CacheMode::Writeback));
        assert_eq!(config.server.backend, Some(BackendKind::Threads));
        let providers = Providers::from_config(&config, None).unwrap();
        assert_eq!(providers.get(None).unwrap().name(), "vault");
        assert!(providers.get(Some("missing")).is_err());
    }

    #[test]
    fn unknown_config_keys_are_rejected() {
        assert!(toml::from_str::<Config>("defualt_key_provider = \"x\"").is_err());
    }
}
