//! The transmission phase with simple replies: many requests in flight per connection,
//! each handled by its own task, replies written in completion order by one writer task.
//!
//! A request's bytes count against the connection's in-flight budget from the moment its
//! header is read until its reply is queued, so a client that sends faster than the disk
//! absorbs is slowed by TCP backpressure instead of growing server memory.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, warn, Instrument};

use super::consts::*;
use super::handshake::eof_is_disconnect;
use super::{error_code, NbdError};
use crate::engine::{EngineError, Export, MAX_PAYLOAD};

/// Length of a request header on the wire.
const REQUEST_HEADER_LEN: usize = 28;

/// Granularity of the in-flight budget: one permit per 4 KiB, at least one per request.
const BUDGET_UNIT: u32 = 4096;

/// Bounds of one connection in the transmission phase.
#[derive(Debug, Clone)]
pub struct TransmissionLimits {
    /// Bytes of request payloads and read replies in flight per connection.
    pub max_in_flight_bytes: u32,
}

impl Default for TransmissionLimits {
    fn default() -> Self {
        // Two maximum-size requests, so a 32 MiB request never waits for itself.
        TransmissionLimits { max_in_flight_bytes: 2 * MAX_PAYLOAD }
    }
}

struct Reply {
    cookie: u64,
    error: u32,
    data: Vec<u8>,
}

/// Serves requests until the client disconnects, sends NBD_CMD_DISC, or `shutdown` turns
/// true; in every case the requests already read are completed and answered first.
pub async fn serve_transmission<R, W>(
    mut reader: R,
    writer: W,
    export: Arc<Export>,
    limits: &TransmissionLimits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let budget_permits = limits.max_in_flight_bytes.div_ceil(BUDGET_UNIT).max(1);
    let budget = Arc::new(Semaphore::new(budget_permits as usize));
    let (reply_tx, reply_rx) = mpsc::unbounded_channel::<Reply>();
    let writer_task = tokio::spawn(write_replies(writer, reply_rx));

    let result = loop {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        let read = tokio::select! {
            read = reader.read_exact(&mut header) => read,
            _ = shutdown.wait_for(|stop| *stop) => break Ok(()),
        };
        if let Err(e) = read {
            break match eof_is_disconnect(e) {
                NbdError::Disconnected => Ok(()),
                other => Err(other),
            };
        }
        let request = Request::decode(&header);
        if request.magic != REQUEST_MAGIC {
            break Err(NbdError::Protocol(format!("request magic {:#x} is wrong", request.magic)));
        }
        if request.command == CMD_DISC {
            debug!("client sent NBD_CMD_DISC");
            break Ok(());
        }

        // Budget: reads reserve their reply size, writes their payload.
        let carries_bytes = matches!(request.command, CMD_READ | CMD_WRITE) && request.len <= MAX_PAYLOAD;
        let units = if carries_bytes { request.len.div_ceil(BUDGET_UNIT).max(1) } else { 1 };
        let permit = Arc::clone(&budget)
            .acquire_many_owned(units.min(budget_permits))
            .await
            .expect("the budget semaphore is never closed");

        let payload = if request.command == CMD_WRITE {
            if request.len > MAX_PAYLOAD {
                // The payload cannot be skipped safely at this size; end the connection.
                break Err(NbdError::Protocol(format!(
                    "write payload of {} bytes exceeds {MAX_PAYLOAD}",
                    request.len
                )));
            }
            let mut payload = vec![0u8; request.len as usize];
            if let Err(e) = reader.read_exact(&mut payload).await {
                // A client that vanishes mid-payload gets nothing written.
                break match eof_is_disconnect(e) {
                    NbdError::Disconnected => Ok(()),
                    other => Err(other),
                };
            }
            payload
        } else {
            Vec::new()
        };

        let export = Arc::clone(&export);
        let reply_tx = reply_tx.clone();
        let span = tracing::debug_span!(
            "request",
            cookie = request.cookie,
            command = request.command,
            offset = request.offset,
            len = request.len
        );
        tokio::spawn(
            async move {
                let reply = execute(&export, &request, payload).await;
                // The writer may be gone if the client disconnected; the work is done anyway.
                let _ = reply_tx.send(reply);
                drop(permit);
            }
            .instrument(span),
        );
    };

    // Wait for every request already read: each holds at least one permit until answered.
    let _all = budget.acquire_many(budget_permits).await.expect("the budget semaphore is never closed");
    drop(reply_tx);
    match writer_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "writing replies stopped"),
        Err(e) => warn!(error = %e, "reply writer task failed"),
    }
    result
}

#[derive(Debug, Clone, Copy)]
struct Request {
    magic: u32,
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

impl Request {
    fn decode(b: &[u8; REQUEST_HEADER_LEN]) -> Self {
        Request {
            magic: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            flags: u16::from_be_bytes([b[4], b[5]]),
            command: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        }
    }
}

/// Runs one request and builds its reply.
async fn execute(export: &Arc<Export>, request: &Request, payload: Vec<u8>) -> Reply {
    let fail = |error: u32| Reply { cookie: request.cookie, error, data: Vec::new() };

    let allowed_flags = match request.command {
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => {
            debug!("unknown command");
            return fail(EINVAL);
        }
    };
    if request.flags & !allowed_flags != 0 {
        debug!(flags = request.flags, "unsupported command flags");
        return fail(EINVAL);
    }
    let fua = request.flags & CMD_FLAG_FUA != 0;

    let result: Result<Vec<u8>, EngineError> = match request.command {
        CMD_READ => {
            if request.len > MAX_PAYLOAD {
                return fail(EINVAL);
            }
            let data = export.read(request.offset, request.len).await;
            match data {
                Ok(data) if fua => export.flush().await.map(|()| data),
                other => other,
            }
        }
        CMD_WRITE => export.write(request.offset, payload, fua).await.map(|()| Vec::new()),
        CMD_FLUSH => export.flush().await.map(|()| Vec::new()),
        CMD_TRIM => export.trim(request.offset, request.len, fua).await.map(|()| Vec::new()),
        CMD_WRITE_ZEROES => {
            let no_hole = request.flags & CMD_FLAG_NO_HOLE != 0;
            export.write_zeroes(request.offset, request.len, no_hole, fua).await.map(|()| Vec::new())
        }
        _ => unreachable!("commands were filtered above"),
    };

    match result {
        Ok(data) => Reply { cookie: request.cookie, error: 0, data },
        Err(error) => {
            let code = error_code(&error, request.command);
            if code == EIO {
                warn!(error = %error, "request failed");
            } else {
                debug!(error = %error, code, "request rejected");
            }
            fail(code)
        }
    }
}

/// Writes replies in the order they complete, flushing when no more are queued.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut replies: mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    let mut writer = BufWriter::with_capacity(256 * 1024, writer);
    while let Some(reply) = replies.recv().await {
        write_one(&mut writer, &reply).await?;
        while let Ok(reply) = replies.try_recv() {
            write_one(&mut writer, &reply).await?;
        }
        writer.flush().await?;
    }
    writer.shutdown().await
}

async fn write_one<W: AsyncWrite + Unpin>(writer: &mut BufWriter<W>, reply: &Reply) -> std::io::Result<()> {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    header[4..8].copy_from_slice(&reply.error.to_be_bytes());
    header[8..].copy_from_slice(&reply.cookie.to_be_bytes());
    writer.write_all(&header).await?;
    if reply.error == 0 && !reply.data.is_empty() {
        writer.write_all(&reply.data).await?;
    }
    Ok(())
}
