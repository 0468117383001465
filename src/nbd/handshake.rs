//! The fixed-newstyle handshake: greeting, client flags, then option haggling until
//! EXPORT_NAME or GO selects an export, or the client aborts.
//!
//! Every option is read whole (its length is bounded first) before it is answered, so an
//! option this server does not implement gets NBD_REP_ERR_UNSUP and the next option parses
//! cleanly. INFO leaves no state behind. A SET_META_CONTEXT selection is tied to the export
//! it named and is dropped if GO picks another export.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::consts::*;
use super::{ExportTable, NbdError};
use crate::engine::{AttachGuard, Export, MAX_PAYLOAD};

/// Bounds on what one handshake may consume, and what transmission advertises.
#[derive(Debug, Clone)]
pub struct HandshakeLimits {
    /// Options accepted before the server gives up on the client.
    pub max_options: u32,
    /// Largest option payload read; longer options end the connection.
    pub max_option_len: u32,
    /// Largest READ or WRITE payload advertised in NBD_INFO_BLOCK_SIZE (at most 32 MiB).
    pub max_payload: u32,
    /// Connections that may be in transmission on one export at once.
    pub max_connections_per_export: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        // An INFO or GO option holds at most a 4096-byte name and a short list of info
        // requests, and a meta context option a name and a few queries, so 64 KiB leaves
        // room for every valid option.
        HandshakeLimits {
            max_options: 64,
            max_option_len: 64 * 1024,
            max_payload: MAX_PAYLOAD,
            max_connections_per_export: 128,
        }
    }
}

/// Settings the handshake agreed on for the transmission phase.
#[derive(Debug)]
pub struct Session {
    pub export: Arc<Export>,
    /// The client negotiated NBD_OPT_STRUCTURED_REPLY.
    pub structured_replies: bool,
    /// The context id of `base:allocation`, when the client selected it for this export.
    pub base_allocation: Option<u32>,
    /// The transmission flags sent to the client.
    pub transmission_flags: u16,
    /// The largest payload advertised.
    pub max_payload: u32,
    /// Holds this connection's slot on the export until the session ends.
    pub attach_guard: AttachGuard,
}

/// Result of a completed handshake.
#[derive(Debug)]
pub enum HandshakeOutcome {
    /// Transmission starts with this session.
    Transmission(Session),
    /// The client sent NBD_OPT_ABORT.
    Aborted,
}

/// Context id given to `base:allocation` by SET_META_CONTEXT.
const BASE_ALLOCATION_ID: u32 = 1;

/// Most queries accepted in one meta context option.
const MAX_META_QUERIES: u32 = 128;

/// Negotiation state that options build up.
#[derive(Default)]
struct State {
    structured_replies: bool,
    /// The export and context id selected by the last SET_META_CONTEXT.
    meta_selection: Option<(Arc<Export>, u32)>,
}

/// Runs the server side of the handshake on `stream`.
pub async fn negotiate<S>(
    stream: &mut S,
    exports: &ExportTable,
    limits: &HandshakeLimits,
) -> Result<HandshakeOutcome, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let client_flags = read_u32(stream).await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let fixed = client_flags & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let max_payload = limits.max_payload.clamp(4096, MAX_PAYLOAD);
    let mut state = State::default();

    for _ in 0..limits.max_options {
        let magic = read_u64(stream).await?;
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!("option magic {magic:#x} is not IHAVEOPT")));
        }
        let option = read_u32(stream).await?;
        let len = read_u32(stream).await?;
        if len > limits.max_option_len {
            return Err(NbdError::Protocol(format!("option {option} has length {len}, above the limit")));
        }
        let mut payload = vec![0u8; len as usize];
        stream.read_exact(&mut payload).await.map_err(eof_is_disconnect)?;

        // A client without fixed newstyle cannot parse option replies, so only EXPORT_NAME
        // (which has no reply header) can be answered.
        if !fixed && option != OPT_EXPORT_NAME {
            return Err(NbdError::Protocol(format!("option {option} from a client without fixed newstyle")));
        }

        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8(payload)
                    .map_err(|_| NbdError::Protocol("export name is not UTF-8".into()))?;
                let export = exports.find(&name).ok_or_else(|| {
                    NbdError::Protocol(format!("EXPORT_NAME asked for unknown export {name:?}"))
                })?;
                let attach_guard = export.try_attach(limits.max_connections_per_export).ok_or_else(|| {
                    NbdError::Protocol(format!("export {name:?} has reached its connection limit"))
                })?;
                let flags = transmission_flags(export, false);
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&export.size().to_be_bytes());
                reply.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&reply).await?;
                stream.flush().await?;
                return Ok(HandshakeOutcome::Transmission(Session {
                    export: Arc::clone(export),
                    structured_replies: false,
                    base_allocation: None,
                    transmission_flags: flags,
                    max_payload,
                    attach_guard,
                }));
            }
            OPT_ABORT => {
                // The client may close without reading the ACK; that is not an error.
                let _ = send_reply(stream, option, REP_ACK, &[]).await;
                return Ok(HandshakeOutcome::Aborted);
            }
            OPT_LIST => {
                if !payload.is_empty() {
                    send_error(stream, option, REP_ERR_INVALID, "LIST takes no payload").await?;
                    continue;
                }
                for export in exports.iter() {
                    let mut body = Vec::with_capacity(4 + export.name().len());
                    body.extend_from_slice(&(export.name().len() as u32).to_be_bytes());
                    body.extend_from_slice(export.name().as_bytes());
                    send_reply(stream, option, REP_SERVER, &body).await?;
                }
                send_reply(stream, option, REP_ACK, &[]).await?;
            }
            OPT_STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    send_error(stream, option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no payload").await?;
                    continue;
                }
                // A repeated request is acknowledged again: the state is the same.
                state.structured_replies = true;
                send_reply(stream, option, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                handle_meta_context(stream, option, &payload, exports, &mut state).await?;
            }
            OPT_INFO | OPT_GO => {
                let request = match parse_info_request(&payload) {
                    Ok(request) => request,
                    Err(reason) => {
                        send_error(stream, option, REP_ERR_INVALID, &reason).await?;
                        continue;
                    }
                };
                let Some(export) = exports.find(&request.name) else {
                    let message = format!("no export named {:?}", request.name);
                    send_error(stream, option, REP_ERR_UNKNOWN, &message).await?;
                    continue;
                };
                let flags = transmission_flags(export, state.structured_replies);
                if option == OPT_INFO {
                    send_export_info(stream, option, export, flags, max_payload, &request.info_types).await?;
                    send_reply(stream, option, REP_ACK, &[]).await?;
                    continue;
                }

                let Some(attach_guard) = export.try_attach(limits.max_connections_per_export) else {
                    let message = format!("export {:?} has reached its connection limit", export.name());
                    tracing::warn!(
                        export = export.name(),
                        max_connections_per_export = limits.max_connections_per_export,
                        "rejected NBD_OPT_GO: the export has reached its connection limit"
                    );
                    send_error(stream, option, REP_ERR_POLICY, &message).await?;
                    continue;
                };
                send_export_info(stream, option, export, flags, max_payload, &request.info_types).await?;
                send_reply(stream, option, REP_ACK, &[]).await?;
                let base_allocation = match &state.meta_selection {
                    Some((selected, id)) if Arc::ptr_eq(selected, export) => Some(*id),
                    _ => None,
                };
                return Ok(HandshakeOutcome::Transmission(Session {
                    export: Arc::clone(export),
                    structured_replies: state.structured_replies,
                    base_allocation,
                    transmission_flags: flags,
                    max_payload,
                    attach_guard,
                }));
            }
            _ => {
                let message = format!("option {option} is not supported");
                send_error(stream, option, REP_ERR_UNSUP, &message).await?;
            }
        }
    }
    Err(NbdError::Protocol(format!("client sent more than {} options", limits.max_options)))
}

/// The transmission flags advertised for `export`. DF needs structured replies, so it is
/// only advertised when they were negotiated.
pub fn transmission_flags(export: &Export, structured_replies: bool) -> u16 {
    let mut flags =
        TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_CACHE;
    if structured_replies {
        flags |= TFLAG_SEND_DF;
    }
    if export.is_read_only() {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        if export.is_discard_enabled() {
            flags |= TFLAG_SEND_TRIM;
        }
    }
    flags
}

/// Answers LIST_META_CONTEXT and SET_META_CONTEXT. SET replaces the selection even when
/// it fails, as the protocol requires.
async fn handle_meta_context<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    payload: &[u8],
    exports: &ExportTable,
    state: &mut State,
) -> Result<(), NbdError> {
    let is_set = option == OPT_SET_META_CONTEXT;
    if is_set {
        state.meta_selection = None;
    }
    if !state.structured_replies {
        let message = "meta contexts need NBD_OPT_STRUCTURED_REPLY first";
        return send_error(stream, option, REP_ERR_INVALID, message).await;
    }
    let request = match parse_meta_request(payload) {
        Ok(request) => request,
        Err(reason) => return send_error(stream, option, REP_ERR_INVALID, &reason).await,
    };
    let Some(export) = exports.find(&request.export_name) else {
        let message = format!("no export named {:?}", request.export_name);
        return send_error(stream, option, REP_ERR_UNKNOWN, &message).await;
    };

    // Only `base:allocation` exists. LIST with no queries lists everything and treats a bare
    // `base:` as a wildcard; unknown namespaces and leaves are ignored.
    let matches = if is_set {
        request.queries.iter().any(|q| q == CONTEXT_BASE_ALLOCATION)
    } else {
        request.queries.is_empty()
            || request.queries.iter().any(|q| q == CONTEXT_BASE_ALLOCATION || q == "base:")
    };
    if matches {
        let id = if is_set { BASE_ALLOCATION_ID } else { 0 };
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
        send_reply(stream, option, REP_META_CONTEXT, &body).await?;
        if is_set {
            state.meta_selection = Some((Arc::clone(export), id));
        }
    }
    send_reply(stream, option, REP_ACK, &[]).await
}

struct InfoRequest {
    name: String,
    info_types: Vec<u16>,
}

/// Parses the payload of INFO and GO: name length, name, count, info types.
fn parse_info_request(payload: &[u8]) -> Result<InfoRequest, String> {
    let mut reader = PayloadReader::new(payload);
    let name = reader.string("export name")?;
    let count = reader.u16().ok_or("option ends before its info request count")? as usize;
    let types = reader.rest();
    if types.len() != count * 2 {
        return Err(format!("option holds {} bytes of info requests, expected {}", types.len(), count * 2));
    }
    let info_types = types.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Ok(InfoRequest { name, info_types })
}

struct MetaRequest {
    export_name: String,
    queries: Vec<String>,
}

/// Parses the payload of LIST_META_CONTEXT and SET_META_CONTEXT: export name, query
/// count, queries, each string with a 32-bit length.
fn parse_meta_request(payload: &[u8]) -> Result<MetaRequest, String> {
    let mut reader = PayloadReader::new(payload);
    let export_name = reader.string("export name")?;
    let count = reader.u32().ok_or("option ends before its query count")?;
    if count > MAX_META_QUERIES {
        return Err(format!("{count} queries is more than the {MAX_META_QUERIES} accepted"));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        queries.push(reader.string("query")?);
    }
    if !reader.rest().is_empty() {
        return Err("option has bytes after its last query".into());
    }
    Ok(MetaRequest { export_name, queries })
}

/// Reads length-prefixed fields from an option payload without ever reading past it.
struct PayloadReader<'a> {
    bytes: &'a [u8],
}

impl<'a> PayloadReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        PayloadReader { bytes }
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if len > self.bytes.len() {
            return None;
        }
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A UTF-8 string of at most 4096 bytes without NUL, preceded by its 32-bit length.
    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u32().ok_or_else(|| format!("option ends before the {what} length"))? as usize;
        if len > MAX_STRING_LEN {
            return Err(format!("{what} of {len} bytes is longer than {MAX_STRING_LEN}"));
        }
        let bytes = self.take(len).ok_or_else(|| format!("{what} length runs past the end of the option"))?;
        let text = std::str::from_utf8(bytes).map_err(|_| format!("{what} is not UTF-8"))?;
        if text.contains('\0') {
            return Err(format!("{what} contains NUL"));
        }
        Ok(text.to_string())
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
}

async fn send_export_info<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    export: &Export,
    flags: u16,
    max_payload: u32,
    requested: &[u16],
) -> Result<(), NbdError> {
    let mut body = Vec::with_capacity(12);
    body.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    body.extend_from_slice(&export.size().to_be_bytes());
    body.extend_from_slice(&flags.to_be_bytes());
    send_reply(stream, option, REP_INFO, &body).await?;

    // Block sizes are sent unasked: any alignment works (sub-sector writes are
    // read-modify-write), the encryption sector is the efficient size, and `max_payload`
    // is the largest READ or WRITE.
    let mut body = Vec::with_capacity(14);
    body.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    body.extend_from_slice(&1u32.to_be_bytes());
    body.extend_from_slice(&export.sector_size().bytes().to_be_bytes());
    body.extend_from_slice(&max_payload.to_be_bytes());
    send_reply(stream, option, REP_INFO, &body).await?;

    if requested.contains(&INFO_NAME) {
        let mut body = INFO_NAME.to_be_bytes().to_vec();
        body.extend_from_slice(export.name().as_bytes());
        send_reply(stream, option, REP_INFO, &body).await?;
    }
    if requested.contains(&INFO_DESCRIPTION) && !export.description().is_empty() {
        let mut body = INFO_DESCRIPTION.to_be_bytes().to_vec();
        body.extend_from_slice(export.description().as_bytes());
        send_reply(stream, option, REP_INFO, &body).await?;
    }
    Ok(())
}

async fn send_reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    reply_type: u32,
    body: &[u8],
) -> Result<(), NbdError> {
    let mut frame = Vec::with_capacity(20 + body.len());
    frame.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    frame.extend_from_slice(&option.to_be_bytes());
    frame.extend_from_slice(&reply_type.to_be_bytes());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame).await?;
    stream.flush().await?;
    Ok(())
}

async fn send_error<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    reply_type: u32,
    message: &str,
) -> Result<(), NbdError> {
    let message = &message.as_bytes()[..message.len().min(MAX_STRING_LEN)];
    send_reply(stream, option, reply_type, message).await
}

async fn read_u32<S: AsyncRead + Unpin>(stream: &mut S) -> Result<u32, NbdError> {
    stream.read_u32().await.map_err(eof_is_disconnect)
}

async fn read_u64<S: AsyncRead + Unpin>(stream: &mut S) -> Result<u64, NbdError> {
    stream.read_u64().await.map_err(eof_is_disconnect)
}

pub(super) fn eof_is_disconnect(e: std::io::Error) -> NbdError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe => NbdError::Disconnected,
        _ => NbdError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_payload(name: &[u8], declared_len: u32, types: &[u16]) -> Vec<u8> {
        let mut p = declared_len.to_be_bytes().to_vec();
        p.extend_from_slice(name);
        p.extend_from_slice(&(types.len() as u16).to_be_bytes());
        for t in types {
            p.extend_from_slice(&t.to_be_bytes());
        }
        p
    }

    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        p
    }

    #[test]
    fn info_request_parses() {
        let request = parse_info_request(&info_payload(b"disk", 4, &[INFO_BLOCK_SIZE])).unwrap();
        assert_eq!(request.name, "disk");
        assert_eq!(request.info_types, vec![INFO_BLOCK_SIZE]);
    }

    #[test]
    fn info_request_rejects_inconsistent_lengths() {
        assert!(parse_info_request(&info_payload(b"disk", 40, &[])).is_err());
        assert!(parse_info_request(&info_payload(b"disk", u32::MAX, &[])).is_err());
        assert!(parse_info_request(&[0, 0]).is_err());
        let mut extra = info_payload(b"disk", 4, &[1]);
        extra.push(0);
        assert!(parse_info_request(&extra).is_err());
        assert!(parse_info_request(&info_payload(&[0xff, 0xfe], 2, &[])).is_err());
    }

    #[test]
    fn name_of_4096_bytes_is_accepted() {
        let name = vec![b'a'; 4096];
        assert!(parse_info_request(&info_payload(&name, 4096, &[])).is_ok());
        let name = vec![b'a'; 4097];
        assert!(parse_info_request(&info_payload(&name, 4097, &[])).is_err());
    }

    #[test]
    fn meta_request_parses_and_rejects_overruns() {
        let request = parse_meta_request(&meta_payload("disk", &["base:allocation", "qemu:dirty"])).unwrap();
        assert_eq!(request.export_name, "disk");
        assert_eq!(request.queries, vec!["base:allocation", "qemu:dirty"]);

        let mut truncated = meta_payload("disk", &["base:allocation"]);
        truncated.pop();
        assert!(parse_meta_request(&truncated).is_err());
        let mut trailing = meta_payload("disk", &[]);
        trailing.push(1);
        assert!(parse_meta_request(&trailing).is_err());

        let mut huge_count = meta_payload("disk", &[]);
        let at = huge_count.len() - 4;
        huge_count[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&huge_count).is_err());
    }
}
