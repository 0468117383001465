//! The fixed-newstyle handshake: greeting, client flags, then option haggling until
//! EXPORT_NAME or GO selects an export, or the client aborts.
//!
//! Every option is read whole (its length is bounded first) before it is answered, so an
//! option this server does not implement gets NBD_REP_ERR_UNSUP and the next option parses
//! cleanly. Nothing from one option carries into another: INFO leaves no state behind.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::consts::*;
use super::{ExportTable, NbdError};
use crate::engine::{Export, MAX_PAYLOAD};

/// Bounds on what one handshake may consume.
#[derive(Debug, Clone)]
pub struct HandshakeLimits {
    /// Options accepted before the server gives up on the client.
    pub max_options: u32,
    /// Largest option payload read; longer options end the connection.
    pub max_option_len: u32,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        // An INFO or GO option holds at most a 4096-byte name and a short list of info
        // requests, so 64 KiB leaves room for every valid option.
        HandshakeLimits { max_options: 64, max_option_len: 64 * 1024 }
    }
}

/// How the handshake ended.
#[derive(Debug)]
pub enum HandshakeOutcome {
    /// Transmission starts on this export.
    Transmission(Arc<Export>),
    /// The client sent NBD_OPT_ABORT.
    Aborted,
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
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&export.size().to_be_bytes());
                reply.extend_from_slice(&transmission_flags(export).to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&reply).await?;
                stream.flush().await?;
                return Ok(HandshakeOutcome::Transmission(Arc::clone(export)));
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
                send_export_info(stream, option, export, &request.info_types).await?;
                send_reply(stream, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    return Ok(HandshakeOutcome::Transmission(Arc::clone(export)));
                }
            }
            _ => {
                let message = format!("option {option} is not supported");
                send_error(stream, option, REP_ERR_UNSUP, &message).await?;
            }
        }
    }
    Err(NbdError::Protocol(format!("client sent more than {} options", limits.max_options)))
}

/// The transmission flags advertised for `export`.
pub fn transmission_flags(export: &Export) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    if export.is_read_only() {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_WRITE_ZEROES;
        if export.is_discard_enabled() {
            flags |= TFLAG_SEND_TRIM;
        }
    }
    flags
}

struct InfoRequest {
    name: String,
    info_types: Vec<u16>,
}

/// Parses the payload of INFO and GO: name length, name, count, info types.
fn parse_info_request(payload: &[u8]) -> Result<InfoRequest, String> {
    let name_len = payload
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("payload is shorter than its name length field")?;
    if name_len > MAX_STRING_LEN {
        return Err(format!("export name of {name_len} bytes is longer than {MAX_STRING_LEN}"));
    }
    let rest = &payload[4..];
    if name_len.checked_add(2).is_none_or(|needed| needed > rest.len()) {
        return Err("name length runs past the end of the option".into());
    }
    let name = std::str::from_utf8(&rest[..name_len]).map_err(|_| "export name is not UTF-8")?.to_string();
    if name.contains('\0') {
        return Err("export name contains NUL".into());
    }

    let rest = &rest[name_len..];
    let count = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let types = &rest[2..];
    if types.len() != count * 2 {
        return Err(format!("option holds {} bytes of info requests, expected {}", types.len(), count * 2));
    }
    let info_types = types.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Ok(InfoRequest { name, info_types })
}

async fn send_export_info<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    export: &Export,
    requested: &[u16],
) -> Result<(), NbdError> {
    let mut body = Vec::with_capacity(12);
    body.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    body.extend_from_slice(&export.size().to_be_bytes());
    body.extend_from_slice(&transmission_flags(export).to_be_bytes());
    send_reply(stream, option, REP_INFO, &body).await?;

    // Block sizes are sent unasked: any alignment works (sub-sector writes are
    // read-modify-write), the encryption sector is the efficient size, and 32 MiB is the
    // largest payload.
    let mut body = Vec::with_capacity(14);
    body.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    body.extend_from_slice(&1u32.to_be_bytes());
    body.extend_from_slice(&export.sector_size().bytes().to_be_bytes());
    body.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
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
}
