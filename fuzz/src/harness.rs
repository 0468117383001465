//! Feeds untrusted bytes to nbdcrypt's public entry points: one client connection through
//! `daemon::handle_connection`, whose reads come from the input, and the LUKS2 header parser.
//!
//! The fuzz targets and the property tests in the product's `tests/fuzz_properties.rs` both
//! use this file, so a corpus entry that passes one passes the other.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use nbdcrypt::backend::MemoryBackend;
use nbdcrypt::crypto::{SectorCipher, SectorSize, VolumeKey};
use nbdcrypt::daemon::{handle_connection, ServerLimits};
use nbdcrypt::engine::{Export, ExportOptions};
use nbdcrypt::nbd::consts::{FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, OPT_GO};
use nbdcrypt::nbd::ExportTable;
use nbdcrypt::volume::{BinaryHeader, HeaderCopy, Metadata, VolumeHeader, HEADER_AREA_SIZE, SALT_LEN};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// Name of the writable export that the transmission prefix attaches to.
pub const EXPORT_NAME: &str = "disk";
/// Name of a second, read-only export, so that option handling has more than one export
/// to choose from.
pub const READ_ONLY_EXPORT_NAME: &str = "ro";
/// Size of each in-memory export in bytes.
pub const EXPORT_SIZE: u64 = 256 << 10;
const DATA_OFFSET: u64 = 4096;

/// NBD_OPT_STRUCTURED_REPLY and NBD_OPT_SET_META_CONTEXT (NBD `doc/proto.md`), spelled out
/// here because the product may not define them.
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

/// Time a connection gets to finish after the client's bytes run out. The mock stream
/// never blocks, so a connection still running after this has hung.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// A client stream: reads return the input and then end of file, and writes are discarded.
pub struct ScriptedStream {
    input: Vec<u8>,
    position: usize,
}

impl ScriptedStream {
    pub fn new(input: Vec<u8>) -> Self {
        ScriptedStream { input, position: 0 }
    }
}

impl AsyncRead for ScriptedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let rest = &self.input[self.position..];
        let len = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..len]);
        self.position += len;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ScriptedStream {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A current-thread runtime and two in-memory exports, built once per process and shared
/// by every connection it runs. Export contents persist from one input to the next.
pub struct ConnectionHarness {
    runtime: tokio::runtime::Runtime,
    exports: Arc<ExportTable>,
    limits: ServerLimits,
    stop_rx: watch::Receiver<bool>,
    // The sender stays alive so that `handle_connection` never sees the stop channel close,
    // which it would take as a shutdown.
    _stop_tx: watch::Sender<bool>,
}

impl ConnectionHarness {
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let exports = Arc::new(
            ExportTable::new(vec![
                memory_export(EXPORT_NAME, false),
                memory_export(READ_ONLY_EXPORT_NAME, true),
            ])
            .unwrap(),
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        ConnectionHarness { runtime, exports, limits: ServerLimits::default(), stop_rx, _stop_tx: stop_tx }
    }

    /// Runs one connection whose client sends `input` and then hangs up. Panics when the
    /// connection has not ended within `CONNECTION_DEADLINE`.
    pub fn run(&self, input: Vec<u8>) {
        let connection = handle_connection(
            ScriptedStream::new(input),
            Arc::clone(&self.exports),
            self.limits.clone(),
            self.stop_rx.clone(),
        );
        let finished =
            self.runtime.block_on(async { tokio::time::timeout(CONNECTION_DEADLINE, connection).await });
        assert!(
            finished.is_ok(),
            "connection still running {CONNECTION_DEADLINE:?} after the client hung up"
        );
    }

    /// Runs one connection for the handshake target: `input` is everything the client sends
    /// after reading the server's greeting.
    pub fn run_handshake(&self, input: &[u8]) {
        self.run(input.to_vec());
    }

    /// Runs one connection for the transmission target. The first input byte selects the
    /// options sent before NBD_OPT_GO (see [`handshake_prefix`]); the rest is sent once the
    /// handshake is done.
    pub fn run_transmission(&self, input: &[u8]) {
        let Some((&options, requests)) = input.split_first() else {
            return;
        };
        let mut bytes = handshake_prefix(options);
        bytes.extend_from_slice(requests);
        self.run(bytes);
    }
}

impl Default for ConnectionHarness {
    fn default() -> Self {
        Self::new()
    }
}

fn memory_export(name: &str, read_only: bool) -> Arc<Export> {
    let backend = Arc::new(MemoryBackend::new_inline((DATA_OFFSET + EXPORT_SIZE) as usize));
    let key = VolumeKey::generate().unwrap();
    let options = ExportOptions { name: name.into(), description: "fuzz".into(), discard: true, read_only };
    Arc::new(Export::new(
        options,
        backend,
        SectorCipher::new(&key, SectorSize::S4096),
        DATA_OFFSET,
        EXPORT_SIZE,
    ))
}

/// Client bytes of a complete fixed-newstyle handshake that ends with NBD_OPT_GO on
/// [`EXPORT_NAME`]. Bit 0 of `options` sends NBD_OPT_STRUCTURED_REPLY first and bit 1
/// NBD_OPT_SET_META_CONTEXT for `base:allocation`. A server that rejects either option
/// still reaches transmission through GO.
pub fn handshake_prefix(options: u8) -> Vec<u8> {
    let mut bytes = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    if options & 1 != 0 {
        push_option(&mut bytes, OPT_STRUCTURED_REPLY, &[]);
    }
    if options & 2 != 0 {
        let context = b"base:allocation";
        let mut payload = name_payload(EXPORT_NAME.as_bytes());
        payload.extend_from_slice(&1u32.to_be_bytes());
        payload.extend_from_slice(&(context.len() as u32).to_be_bytes());
        payload.extend_from_slice(context);
        push_option(&mut bytes, OPT_SET_META_CONTEXT, &payload);
    }
    let mut go = name_payload(EXPORT_NAME.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    push_option(&mut bytes, OPT_GO, &go);
    bytes
}

fn name_payload(name: &[u8]) -> Vec<u8> {
    let mut payload = (name.len() as u32).to_be_bytes().to_vec();
    payload.extend_from_slice(name);
    payload
}

fn push_option(bytes: &mut Vec<u8>, option: u32, payload: &[u8]) {
    bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&option.to_be_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(payload);
}

/// Parses `input` as LUKS2 header material. The first byte selects the entry point:
/// - 0: `VolumeHeader::read_from` on the rest as a whole device;
/// - 1: `Metadata::parse` on the rest as JSON text of a 16 KiB header area, and when that
///   succeeds, `to_json` must give text that parses again;
/// - 2: the rest as JSON text inside two header areas with valid checksums, so the fuzzer
///   reaches metadata validation through `read_from` without forging SHA-256 sums.
pub fn parse_luks2_header(input: &[u8]) {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    match mode % 3 {
        0 => read_device(data),
        1 => parse_metadata(data),
        _ => {
            if let Some(device) = wrap_in_header_areas(data) {
                read_device(&device);
            }
        }
    }
}

fn read_device(device: &[u8]) {
    let Ok(header) = VolumeHeader::read_from(device) else {
        return;
    };
    let _ = header.kms_token();
    let _ = header.data_area(device.len() as u64);
    let _ = header.data_area(u64::MAX);
}

fn parse_metadata(json: &[u8]) {
    let Ok(metadata) = Metadata::parse(json, HEADER_AREA_SIZE) else {
        return;
    };
    let text = metadata.to_json().expect("metadata that parsed must serialize");
    if let Err(e) = Metadata::parse(&text, HEADER_AREA_SIZE) {
        panic!("serialized metadata no longer parses: {e}");
    }
}

/// Builds a primary and a secondary header area around `json`, or returns None when the
/// JSON does not fit in a 16 KiB area.
pub fn wrap_in_header_areas(json: &[u8]) -> Option<Vec<u8>> {
    let mut device = Vec::with_capacity(2 * HEADER_AREA_SIZE as usize);
    for (copy, offset) in [(HeaderCopy::Primary, 0), (HeaderCopy::Secondary, HEADER_AREA_SIZE)] {
        let header = BinaryHeader {
            copy,
            header_area_size: HEADER_AREA_SIZE,
            seqid: 1,
            label: String::new(),
            salt: [0u8; SALT_LEN],
            uuid: "5f6d1a3e-4c1b-4d8e-9a8e-2b7c5d3f1e90".into(),
            subsystem: String::new(),
            header_offset: offset,
        };
        device.extend_from_slice(&header.encode_area(json).ok()?);
    }
    Some(device)
}
