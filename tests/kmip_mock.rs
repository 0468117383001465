//! The KMIP client against a scripted mock server over mutual TLS, for responses a real
//! server does not send: no Discover Versions, reordered fields with unknown tags, and
//! truncated, malformed or oversized responses. None may panic or hang.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::run;
use nbdcrypt::keys::kmip::ttlv::{self, Item, Value};
use nbdcrypt::keys::{KeyProvider, KmipConfig, KmipProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const MAKE_CERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kms/make-certs.sh");

const RESPONSE_MESSAGE: u32 = 0x42007B;
const RESPONSE_HEADER: u32 = 0x42007A;
const PROTOCOL_VERSION: u32 = 0x420069;
const PROTOCOL_VERSION_MAJOR: u32 = 0x42006A;
const PROTOCOL_VERSION_MINOR: u32 = 0x42006B;
const REQUEST_HEADER: u32 = 0x420077;
const BATCH_COUNT: u32 = 0x42000D;
const BATCH_ITEM: u32 = 0x42000F;
const OPERATION: u32 = 0x42005C;
const RESULT_STATUS: u32 = 0x42007F;
const RESULT_REASON: u32 = 0x42007E;
const RESPONSE_PAYLOAD: u32 = 0x42007C;
const OPERATION_DISCOVER_VERSIONS: u32 = 30;
const OPERATION_QUERY: u32 = 24;

/// What the mock server sends back for each request.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Rejects Discover Versions (a KMIP 1.0 server) and returns a Query result.
    NoDiscoverVersions,
    /// Responds with batch item fields in reverse order and an unknown tag among them.
    ReorderedFields,
    /// Sends half of a response and then nothing, keeping the connection open.
    TruncatedThenSilent,
    /// Sends a complete response whose Result Status has a non-zero padding byte.
    BadPadding,
    /// Announces a 16 MiB response.
    Oversized,
}

/// Requests the mock received: operation and header protocol version.
type Seen = Arc<Mutex<Vec<(u32, i32, i32)>>>;

struct Mock {
    address: String,
    certs: PathBuf,
    seen: Seen,
    _dir: tempfile::TempDir,
}

impl Mock {
    async fn start(behaviour: Behaviour) -> Mock {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        run(Command::new(MAKE_CERTS).arg(&certs));
        let acceptor = TlsAcceptor::from(server_config(&certs));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let seen: Seen = Arc::default();
        let seen_by_server = seen.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                let seen = seen_by_server.clone();
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        serve_connection(stream, behaviour, seen).await;
                    }
                });
            }
        });
        Mock { address, certs, seen, _dir: dir }
    }

    fn provider(&self, extra: &str) -> KmipProvider {
        let table = format!(
            "servers = [{:?}]\nca = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n{extra}",
            self.address,
            self.certs.join("ca.crt"),
            self.certs.join("client.crt"),
            self.certs.join("client.key"),
        );
        let config: KmipConfig = toml::from_str(&table).unwrap();
        KmipProvider::new("mock", &config).unwrap()
    }
}

fn server_config(certs: &Path) -> Arc<ServerConfig> {
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(certs.join("ca.crt")).unwrap()).unwrap();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let chain = vec![CertificateDer::from_pem_file(certs.join("server.crt")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(certs.join("server.key")).unwrap();
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    Arc::new(config)
}

async fn serve_connection(
    mut stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    behaviour: Behaviour,
    seen: Seen,
) {
    loop {
        let mut header = [0u8; 8];
        if stream.read_exact(&mut header).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes(header[4..8].try_into().unwrap()) as usize;
        let mut request = header.to_vec();
        request.resize(8 + len, 0);
        if stream.read_exact(&mut request[8..]).await.is_err() {
            return;
        }
        let request = ttlv::decode(&request).expect("the client sent malformed TTLV");
        let version = request.child(REQUEST_HEADER).unwrap().child(PROTOCOL_VERSION).unwrap();
        let (major, minor) =
            (integer(version, PROTOCOL_VERSION_MAJOR), integer(version, PROTOCOL_VERSION_MINOR));
        let Value::Enumeration(op) = request.child(BATCH_ITEM).unwrap().child(OPERATION).unwrap().value
        else {
            panic!("Operation is not an Enumeration")
        };
        seen.lock().unwrap().push((op, major, minor));

        let response = match behaviour {
            Behaviour::NoDiscoverVersions if op == OPERATION_DISCOVER_VERSIONS => failure(op, 5),
            Behaviour::NoDiscoverVersions => success(op, query_payload(), false),
            Behaviour::ReorderedFields => success(op, versions_payload(), true),
            Behaviour::TruncatedThenSilent => {
                let bytes = success(op, versions_payload(), false);
                stream.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
            Behaviour::BadPadding => {
                let mut bytes = success(op, versions_payload(), false);
                let at = find_tag(&bytes, RESULT_STATUS) + 15;
                bytes[at] = 0xEE;
                bytes
            }
            Behaviour::Oversized => {
                let mut bytes = success(op, versions_payload(), false);
                bytes[4..8].copy_from_slice(&(16u32 << 20).to_be_bytes());
                bytes
            }
        };
        if stream.write_all(&response).await.is_err() {
            return;
        }
    }
}

fn integer(item: &Item, tag: u32) -> i32 {
    match item.child(tag).unwrap().value {
        Value::Integer(v) => v,
        _ => panic!("{tag:06X} is not an Integer"),
    }
}

fn find_tag(bytes: &[u8], tag: u32) -> usize {
    let needle = &tag.to_be_bytes()[1..];
    bytes.windows(3).position(|w| w == needle).unwrap()
}

fn header() -> Item {
    Item::structure(
        RESPONSE_HEADER,
        vec![
            Item::structure(
                PROTOCOL_VERSION,
                vec![Item::integer(PROTOCOL_VERSION_MAJOR, 1), Item::integer(PROTOCOL_VERSION_MINOR, 0)],
            ),
            Item::new(0x420092, Value::DateTime(1_700_000_000)),
            Item::integer(BATCH_COUNT, 1),
        ],
    )
}

fn success(op: u32, payload: Vec<Item>, reorder: bool) -> Vec<u8> {
    let mut fields = vec![
        Item::enumeration(OPERATION, op),
        Item::enumeration(RESULT_STATUS, 0),
        Item::structure(RESPONSE_PAYLOAD, payload),
    ];
    if reorder {
        fields.reverse();
        fields.insert(1, Item::text(0x540001, "vendor extension the client does not know"));
    }
    Item::structure(RESPONSE_MESSAGE, vec![header(), Item::structure(BATCH_ITEM, fields)]).encode().to_vec()
}

fn failure(op: u32, reason: u32) -> Vec<u8> {
    let fields = vec![
        Item::enumeration(OPERATION, op),
        Item::enumeration(RESULT_STATUS, 1),
        Item::enumeration(RESULT_REASON, reason),
        Item::text(0x42007D, "not supported here"),
    ];
    Item::structure(RESPONSE_MESSAGE, vec![header(), Item::structure(BATCH_ITEM, fields)]).encode().to_vec()
}

fn versions_payload() -> Vec<Item> {
    vec![Item::structure(
        PROTOCOL_VERSION,
        vec![Item::integer(PROTOCOL_VERSION_MAJOR, 1), Item::integer(PROTOCOL_VERSION_MINOR, 4)],
    )]
}

fn query_payload() -> Vec<Item> {
    vec![Item::enumeration(OPERATION, 1), Item::enumeration(OPERATION, 10), Item::text(0x42009D, "mock KMS")]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn server_without_discover_versions_gets_kmip_1_0() {
    runtime().block_on(async {
        let mock = Mock::start(Behaviour::NoDiscoverVersions).await;
        let reports = mock.provider("").check().await;
        let info = reports[0].result.as_ref().unwrap_or_else(|e| panic!("check failed: {e}"));
        assert_eq!(info.version.to_string(), "1.0");
        assert_eq!(info.operations, 2);
        assert_eq!(info.vendor.as_deref(), Some("mock KMS"));

        // Discover Versions was tried under the 1.4, 1.2 and 1.1 headers, then Query ran as 1.0.
        let seen = mock.seen.lock().unwrap().clone();
        let discover: Vec<(i32, i32)> =
            seen.iter().filter(|s| s.0 == OPERATION_DISCOVER_VERSIONS).map(|s| (s.1, s.2)).collect();
        assert_eq!(discover, vec![(1, 4), (1, 2), (1, 1)]);
        assert_eq!(seen.last(), Some(&(OPERATION_QUERY, 1, 0)));
    });
}

#[test]
fn reordered_fields_and_unknown_tags_are_accepted() {
    runtime().block_on(async {
        let mock = Mock::start(Behaviour::ReorderedFields).await;
        let provider = mock.provider("");
        let reports = provider.check().await;
        let info = reports[0].result.as_ref().unwrap_or_else(|e| panic!("check failed: {e}"));
        assert_eq!(info.version.to_string(), "1.4");
    });
}

#[test]
fn truncated_response_times_out() {
    runtime().block_on(async {
        let mock = Mock::start(Behaviour::TruncatedThenSilent).await;
        let provider = mock.provider("request_timeout_ms = 300\ndeadline_ms = 2000");
        let started = Instant::now();
        let error = provider.create_key("uuid").await.unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
        assert!(error.contains("request timed out after 300 ms"), "{error}");
        assert!(error.contains(&mock.address), "{error}");
    });
}

#[test]
fn malformed_response_names_offset_and_tag_path() {
    runtime().block_on(async {
        let mock = Mock::start(Behaviour::BadPadding).await;
        let error = mock.provider("deadline_ms = 1000").create_key("uuid").await.unwrap_err().to_string();
        assert!(error.contains("malformed TTLV at byte"), "{error}");
        assert!(error.contains("tag path 42007B/42000F"), "{error}");
        assert!(error.contains("padding byte is 0xee"), "{error}");
    });
}

#[test]
fn oversized_response_is_rejected_unread() {
    runtime().block_on(async {
        let mock = Mock::start(Behaviour::Oversized).await;
        let error = mock.provider("deadline_ms = 1000").create_key("uuid").await.unwrap_err().to_string();
        assert!(error.contains("response header is invalid"), "{error}");
        assert!(error.contains("length 16777216"), "{error}");
    });
}
