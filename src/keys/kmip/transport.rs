//! KMIP over mutual TLS: the rustls client configuration and one connection that sends a
//! request message and reads the response message.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use super::message::MAX_RESPONSE_LEN;
use super::spec::tag;
use super::ttlv::{self, HEADER_LEN};

/// A transport failure; every variant is worth trying another server for.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connect timed out after {0} ms")]
    ConnectTimeout(u128),
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("request timed out after {0} ms")]
    RequestTimeout(u128),
    #[error("connection failed: {0}")]
    Io(std::io::Error),
    #[error("server closed the connection")]
    Closed,
    #[error("response header is invalid: tag {tag:06X}, type {item_type:#04x}, length {len} (at most {MAX_RESPONSE_LEN} accepted)")]
    BadFrame { tag: u32, item_type: u8, len: u32 },
}

/// Files that configure mutual TLS.
pub struct TlsFiles<'a> {
    pub ca: &'a Path,
    pub client_cert: &'a Path,
    pub client_key: &'a Path,
}

/// Builds the client configuration: trust only the CA bundle, present the client
/// certificate, and allow TLS 1.2 and 1.3 (many KMS servers, PyKMIP among them, speak
/// TLS 1.2 only).
pub fn client_config(files: &TlsFiles<'_>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(files.ca)
        .map_err(|e| format!("reading CA bundle {} failed: {e}", files.ca.display()))?;
    for ca in cas {
        let ca = ca.map_err(|e| format!("CA bundle {} is invalid: {e}", files.ca.display()))?;
        roots
            .add(ca)
            .map_err(|e| format!("CA bundle {} has an unusable certificate: {e}", files.ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("CA bundle {} contains no certificate", files.ca.display()));
    }

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(files.client_cert)
        .map_err(|e| format!("reading client certificate {} failed: {e}", files.client_cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("client certificate {} is invalid: {e}", files.client_cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "client certificate file {} contains no certificate",
            files.client_cert.display()
        ));
    }
    // The PEM parse error of the key contains only the position where parsing stopped,
    // never key bytes.
    let key = PrivateKeyDer::from_pem_file(files.client_key)
        .map_err(|e| format!("client key {} is missing or invalid: {e}", files.client_key.display()))?;

    // rustls 0.23.48 deprecates the ring provider only for lacking post-quantum key
    // exchange, which TLS 1.2 peers such as PyKMIP cannot use anyway.
    // TODO: move to the aws-lc-rs provider so TLS 1.3 servers get post-quantum key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("client certificate and key do not fit together: {e}"))?;
    Ok(Arc::new(config))
}

/// One TLS connection to a KMIP server.
pub struct Connection {
    stream: TlsStream<TcpStream>,
}

impl Connection {
    /// Connects to `address` (HOST:PORT) and completes the TLS handshake within `timeout`.
    pub async fn open(
        address: &str,
        server_name: ServerName<'static>,
        config: Arc<ClientConfig>,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        let connect = async {
            let tcp = TcpStream::connect(address).await.map_err(TransportError::Connect)?;
            let _ = tcp.set_nodelay(true);
            let stream = TlsConnector::from(config).connect(server_name, tcp).await.map_err(tls_error)?;
            Ok(Connection { stream })
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| TransportError::ConnectTimeout(timeout.as_millis()))?
    }

    /// Sends one request message and reads one response message within `timeout`. The
    /// response may hold key material and is zeroized on drop.
    /// NOTE: rustls keeps its own copies of records in its buffers, which nbdcrypt does not
    /// wipe.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        timeout: Duration,
    ) -> Result<Zeroizing<Vec<u8>>, TransportError> {
        let exchange = async {
            self.stream.write_all(request).await.map_err(TransportError::Io)?;
            self.stream.flush().await.map_err(TransportError::Io)?;

            let mut header = [0u8; HEADER_LEN];
            match self.stream.read_exact(&mut header).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(TransportError::Closed)
                }
                Err(e) => return Err(TransportError::Io(e)),
            }
            // Check the frame before allocating for it: a peer cannot make us buffer more
            // than MAX_RESPONSE_LEN.
            let (tag, item_type, len) = ttlv::decode_header(&header);
            if tag != tag::RESPONSE_MESSAGE
                || item_type != 0x01
                || len as usize > MAX_RESPONSE_LEN
                || len % 8 != 0
            {
                return Err(TransportError::BadFrame { tag, item_type, len });
            }
            let mut response = Zeroizing::new(vec![0u8; HEADER_LEN + len as usize]);
            response[..HEADER_LEN].copy_from_slice(&header);
            self.stream.read_exact(&mut response[HEADER_LEN..]).await.map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => TransportError::Closed,
                _ => TransportError::Io(e),
            })?;
            Ok(response)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| TransportError::RequestTimeout(timeout.as_millis()))?
    }
}

/// Names the TLS failure (for example an unknown issuer or a fatal alert from the server)
/// rather than the generic I/O error that wraps it.
fn tls_error(error: std::io::Error) -> TransportError {
    match error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(tls) => TransportError::Tls(tls.to_string()),
        None if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            TransportError::Tls("the server closed the connection during the handshake".into())
        }
        None => TransportError::Tls(error.to_string()),
    }
}

/// The name the server certificate must carry: `server_name` if configured, else the host
/// part of `address` (an IP address is checked against the certificate's IP SANs).
pub fn server_name_for(address: &str, server_name: Option<&str>) -> Result<ServerName<'static>, String> {
    let host = match server_name {
        Some(name) => name.to_string(),
        None => {
            let (host, _port) = split_host_port(address)?;
            host.to_string()
        }
    };
    ServerName::try_from(host.clone()).map_err(|_| format!("{host:?} is not a valid TLS server name"))
}

/// Splits `HOST:PORT` or `[IPv6]:PORT`.
pub fn split_host_port(address: &str) -> Result<(&str, u16), String> {
    let invalid = || {
        format!("server address {address:?} is invalid: expected HOST:PORT, for example kms.example.com:5696")
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(invalid)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port = port.parse::<u16>().map_err(|_| invalid())?;
    if host.is_empty() || port == 0 {
        return Err(invalid());
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms_parse() {
        assert_eq!(split_host_port("kms:5696").unwrap(), ("kms", 5696));
        assert_eq!(split_host_port("[::1]:5696").unwrap(), ("::1", 5696));
        assert!(split_host_port("kms").is_err());
        assert!(split_host_port(":5696").is_err());
        assert!(split_host_port("kms:0").is_err());
    }

    #[test]
    fn server_name_defaults_to_host() {
        assert!(server_name_for("127.0.0.1:5696", None).is_ok());
        assert!(server_name_for("10.0.0.1:5696", Some("kms.example.com")).is_ok());
        assert!(server_name_for("kms:5696", Some("bad name!")).is_err());
    }
}
