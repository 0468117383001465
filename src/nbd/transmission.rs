//! The transmission phase: many requests in flight per connection, each handled by its own
//! task, replies written in completion order by one writer task. Clients that negotiated
//! structured replies get READ data as data and hole chunks, BLOCK_STATUS, and errors as
//! error chunks with a message; the others get simple replies.
//!
//! A request's bytes count against the connection's in-flight budget and the server's
//! shared budget from the moment its header is read until its reply has been written to the
//! socket. A client that sends faster than the disk absorbs, or reads replies slower than
//! the server produces them, is slowed by TCP backpressure instead of growing server memory.
//!
//! Idle connections may stay open indefinitely, but a client that stops in the middle of a
//! write payload, or stops reading while a reply is being written, is disconnected once it
//! has made no progress for the stall timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tracing::{debug, warn, Instrument};

use super::consts::*;
use super::handshake::{eof_is_disconnect, Session};
use super::{error_code, NbdError};
use crate::backend::IoBuffer;
use crate::engine::{EngineError, Export, ReadOutput, ZeroOptions, BLOCK_STATUS_SCAN_BUDGET, MAX_PAYLOAD};

/// Length of a request header on the wire.
const REQUEST_HEADER_LEN: usize = 28;

/// Granularity of the in-flight budget: one permit per 4 KiB, at least one per request.
const BUDGET_UNIT: u32 = 4096;

/// Default bound on the bytes in flight across all connections of a server.
pub const DEFAULT_MAX_TOTAL_IN_FLIGHT_BYTES: u64 = 1 << 30;

/// Default time a client may make no progress inside a write payload or while a reply is
/// written to it.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Default slowest rate, in bytes per second, at which a client may send a write payload
/// or read a reply, beyond the stall timeout's grace.
pub const DEFAULT_MIN_TRANSFER_RATE: u64 = 1024 * 1024;

/// Bounds of the transmission phase. Clones share one server-wide budget.
#[derive(Debug, Clone)]
pub struct TransmissionLimits {
    /// Bytes of request payloads and read replies in flight per connection.
    pub max_in_flight_bytes: u32,
    /// Time without progress after which a client stalled inside a write payload, or one
    /// that does not read a reply being written, is disconnected.
    pub stall_timeout: Duration,
    /// Slowest rate in bytes per second at which a payload or reply may move: a transfer of `len`
    /// bytes must finish within `stall_timeout + len / min_transfer_rate`. Zero turns the
    /// check off. Without it, a client trickling one byte per interval would keep the
    /// request's share of the in-flight budgets indefinitely.
    pub min_transfer_rate: u64,
    /// Permits of [`BUDGET_UNIT`] bytes shared by every connection of the server.
    server_budget: Arc<Semaphore>,
    server_budget_units: u32,
}

impl TransmissionLimits {
    /// Sets the bound on bytes in flight across all connections that share these limits.
    /// Values below two maximum-size requests are raised to that.
    pub fn set_max_total_in_flight_bytes(&mut self, bytes: u64) {
        let units = bytes
            .div_ceil(u64::from(BUDGET_UNIT))
            .clamp(u64::from(2 * MAX_PAYLOAD / BUDGET_UNIT), u64::from(u32::MAX >> 3))
            as u32;
        self.server_budget = Arc::new(Semaphore::new(units as usize));
        self.server_budget_units = units;
    }

    /// Returns the bound on bytes in flight across all connections.
    pub fn max_total_in_flight_bytes(&self) -> u64 {
        u64::from(self.server_budget_units) * u64::from(BUDGET_UNIT)
    }

    /// Returns the time a transfer of `len` bytes may take, or None when the rate check is
    /// off or the time is too large to represent.
    fn transfer_deadline(&self, len: usize) -> Option<Duration> {
        if self.min_transfer_rate == 0 {
            return None;
        }
        let transfer = Duration::try_from_secs_f64(len as f64 / self.min_transfer_rate as f64).ok()?;
        self.stall_timeout.checked_add(transfer)
    }
}

impl Default for TransmissionLimits {
    fn default() -> Self {
        let mut limits = TransmissionLimits {
            // Two maximum-size requests, so a 32 MiB request never waits for itself.
            max_in_flight_bytes: 2 * MAX_PAYLOAD,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            min_transfer_rate: DEFAULT_MIN_TRANSFER_RATE,
            server_budget: Arc::new(Semaphore::new(0)),
            server_budget_units: 0,
        };
        limits.set_max_total_in_flight_bytes(DEFAULT_MAX_TOTAL_IN_FLIGHT_BYTES);
        limits
    }
}

/// Permits that a request keeps until its reply is written or dropped.
struct Permits {
    _connection: OwnedSemaphorePermit,
    _server: OwnedSemaphorePermit,
}

/// A reply ready to be written. Read data stays in the buffer it was decrypted in.
enum Reply {
    Simple {
        cookie: u64,
        error: u32,
        data: Option<ReadOutput>,
    },
    /// Structured chunks whose bulk bytes are ranges of `data`.
    Structured {
        cookie: u64,
        chunks: Vec<Chunk>,
        data: Option<ReadOutput>,
    },
    /// A structured read reply of one OFFSET_DATA chunk with the DONE flag: the common
    /// case, written without building a chunk list.
    DataChunk {
        cookie: u64,
        offset: u64,
        data: ReadOutput,
    },
}

impl Reply {
    /// Returns the bytes of read data the reply carries.
    fn data_len(&self) -> usize {
        match self {
            Reply::Simple { data, .. } | Reply::Structured { data, .. } => {
                data.as_ref().map_or(0, |data| data.data().len())
            }
            Reply::DataChunk { data, .. } => data.data().len(),
        }
    }
}

/// One structured reply chunk: fixed fields in `fields`, then `data` bytes of the reply.
struct Chunk {
    flags: u16,
    kind: u16,
    fields: Vec<u8>,
    data: std::ops::Range<usize>,
}

/// Session settings shared by the request tasks of one connection.
struct Context {
    export: Arc<Export>,
    structured_replies: bool,
    base_allocation: Option<u32>,
    max_payload: u32,
}

/// Serves requests until the client disconnects, sends NBD_CMD_DISC, or `shutdown` turns
/// true; in every case the requests already read are completed and answered first.
pub async fn serve_transmission<R, W>(
    mut reader: R,
    writer: W,
    session: Session,
    limits: &TransmissionLimits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Session { export, structured_replies, base_allocation, max_payload, attach_guard, .. } = session;
    let context = Arc::new(Context { export, structured_replies, base_allocation, max_payload });
    let budget_permits = limits.max_in_flight_bytes.div_ceil(BUDGET_UNIT).max(1);
    let budget = Arc::new(Semaphore::new(budget_permits as usize));
    // Replies carry their permits: a reply's memory counts until it has been written.
    let (reply_tx, reply_rx) = mpsc::unbounded_channel::<(Reply, Permits)>();
    let writer = StallGuard::new(writer, limits.stall_timeout);
    let writer_task = tokio::spawn(write_replies(writer, reply_rx, limits.clone()));

    let result = loop {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        // The reply writer ends only when the client stopped reading or hung up; its error
        // is reported below.
        let read = tokio::select! {
            read = reader.read_exact(&mut header) => read,
            _ = shutdown.wait_for(|stop| *stop) => break Ok(()),
            _ = reply_tx.closed() => break Ok(()),
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

        let units = budget_units(&request, &context);
        let reserve = async {
            let connection = Arc::clone(&budget)
                .acquire_many_owned(units.min(budget_permits))
                .await
                .expect("the budget semaphore is never closed");
            let server = Arc::clone(&limits.server_budget)
                .acquire_many_owned(units.min(limits.server_budget_units))
                .await
                .expect("the budget semaphore is never closed");
            Permits { _connection: connection, _server: server }
        };
        let permits = tokio::select! {
            permits = reserve => permits,
            _ = reply_tx.closed() => break Ok(()),
        };

        let mut payload = None;
        if request.command == CMD_WRITE {
            if request.len > MAX_PAYLOAD {
                // The payload cannot be skipped safely at this size; end the connection.
                break Err(NbdError::Protocol(format!(
                    "write payload of {} bytes exceeds {MAX_PAYLOAD}",
                    request.len
                )));
            }
            let len = request.len as usize;
            let read = if request.len > context.max_payload {
                // Above the advertised maximum but within 32 MiB: consume and reject it, so
                // the connection stays usable.
                within(limits.transfer_deadline(len), skip_payload(&mut reader, len, limits.stall_timeout))
                    .await
            } else {
                let buffer = payload.insert(context.export.buffer_pool().take(len));
                within(limits.transfer_deadline(len), read_payload(&mut reader, buffer, limits.stall_timeout))
                    .await
            };
            if let Err(e) = read {
                // A client that vanishes mid-payload gets nothing written.
                break match eof_is_disconnect(e) {
                    NbdError::Disconnected => Ok(()),
                    other => Err(other),
                };
            }
        }

        let context = Arc::clone(&context);
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
                let reply = execute(&context, &request, payload).await;
                // The writer may be gone if the client disconnected; the work is done anyway,
                // and the reply and its permits are dropped here.
                let _ = reply_tx.send((reply, permits));
            }
            .instrument(span),
        );
    };

    // Wait for every request already read: each holds at least one permit until answered.
    let _all = budget.acquire_many(budget_permits).await.expect("the budget semaphore is never closed");
    drop(reply_tx);
    let written = writer_task.await;
    drop(attach_guard);
    match written {
        Ok(Ok(())) => result,
        // A failed reply write is the connection's error unless reading failed first.
        Ok(Err(e)) => result.and_then(|()| match eof_is_disconnect(e) {
            NbdError::Disconnected => Ok(()),
            other => Err(other),
        }),
        Err(e) => {
            warn!(error = %e, "reply writer task failed");
            result
        }
    }
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

/// Returns the budget units a request reserves: its payload or reply size for READ and
/// for a WRITE whose payload is kept, the largest reply it can produce for BLOCK_STATUS,
/// and one unit otherwise.
fn budget_units(request: &Request, context: &Context) -> u32 {
    let bytes = match request.command {
        CMD_READ | CMD_WRITE if request.len <= context.max_payload => u64::from(request.len),
        CMD_BLOCK_STATUS => {
            // One scanned sector can add a data extent and a hole extent after it, 8 bytes
            // each, and the scan stops after BLOCK_STATUS_SCAN_BUDGET bytes of sectors.
            let sector = context.export.sector_size().len_u64();
            let sectors = u64::from(request.len).min(BLOCK_STATUS_SCAN_BUDGET).div_ceil(sector);
            (2 * sectors + 1) * 8 + 4
        }
        _ => 0,
    };
    (bytes.div_ceil(u64::from(BUDGET_UNIT)) as u32).max(1)
}

/// Runs one request and builds its reply.
async fn execute(context: &Context, request: &Request, payload: Option<IoBuffer>) -> Reply {
    let export = &context.export;
    let allowed_flags = match request.command {
        CMD_READ if context.structured_replies => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => {
            debug!("unknown command");
            return error_reply(context, request, EINVAL, "unknown command");
        }
    };
    if request.flags & !allowed_flags != 0 {
        debug!(flags = request.flags, "unsupported command flags");
        return error_reply(context, request, EINVAL, "flags not valid for this command");
    }
    let fua = request.flags & CMD_FLAG_FUA != 0;

    let outcome = match request.command {
        CMD_READ => return execute_read(context, request, fua).await,
        CMD_BLOCK_STATUS => return execute_block_status(context, request, fua).await,
        CMD_WRITE if request.len > context.max_payload => {
            return error_reply(context, request, EINVAL, "payload exceeds the advertised maximum")
        }
        CMD_WRITE => match payload {
            Some(payload) => export.write(request.offset, payload, fua).await,
            None => return error_reply(context, request, EINVAL, "write payload was not received"),
        },
        CMD_FLUSH => export.flush().await,
        CMD_TRIM => export.trim(request.offset, request.len, fua).await,
        CMD_CACHE => export.cache(request.offset, request.len),
        CMD_WRITE_ZEROES => {
            let options = ZeroOptions {
                no_hole: request.flags & CMD_FLAG_NO_HOLE != 0,
                fast_only: request.flags & CMD_FLAG_FAST_ZERO != 0,
                fua,
            };
            export.write_zeroes(request.offset, request.len, options).await
        }
        _ => unreachable!("commands were filtered above"),
    };
    match outcome {
        Ok(()) => Reply::Simple { cookie: request.cookie, error: 0, data: None },
        Err(error) => engine_error_reply(context, request, &error),
    }
}

async fn execute_read(context: &Context, request: &Request, fua: bool) -> Reply {
    if request.len > context.max_payload {
        return error_reply(context, request, EINVAL, "read exceeds the advertised maximum payload");
    }
    let export = &context.export;
    let mut result = export.read_detailed(request.offset, request.len).await;
    if fua && result.is_ok() {
        if let Err(e) = export.flush().await {
            result = Err(e);
        }
    }
    let mut output = match result {
        Ok(output) => output,
        Err(error) => return engine_error_reply(context, request, &error),
    };
    if !context.structured_replies {
        return Reply::Simple { cookie: request.cookie, error: 0, data: Some(output) };
    }

    // Data chunks for the plaintext, hole chunks where the ciphertext was zeros. A DF read
    // (no fragmentation) gets one data chunk.
    let len = output.data().len();
    let holes =
        if request.flags & CMD_FLAG_DF != 0 { Vec::new() } else { std::mem::take(&mut output.zero_runs) };
    if holes.is_empty() && len > 0 {
        return Reply::DataChunk { cookie: request.cookie, offset: request.offset, data: output };
    }
    let mut chunks = Vec::new();
    let mut position = 0usize;
    let data_chunk = |start: usize, end: usize| Chunk {
        flags: 0,
        kind: REPLY_TYPE_OFFSET_DATA,
        fields: (request.offset + start as u64).to_be_bytes().to_vec(),
        data: start..end,
    };
    for hole in holes {
        if hole.start > position {
            chunks.push(data_chunk(position, hole.start));
        }
        let mut fields = (request.offset + hole.start as u64).to_be_bytes().to_vec();
        fields.extend_from_slice(&((hole.end - hole.start) as u32).to_be_bytes());
        chunks.push(Chunk { flags: 0, kind: REPLY_TYPE_OFFSET_HOLE, fields, data: 0..0 });
        position = hole.end;
    }
    if position < len {
        chunks.push(data_chunk(position, len));
    }
    finish_chunks(request.cookie, chunks, Some(output))
}

async fn execute_block_status(context: &Context, request: &Request, fua: bool) -> Reply {
    let Some(context_id) = context.base_allocation.filter(|_| context.structured_replies) else {
        return error_reply(context, request, EINVAL, "no metadata context was selected for this export");
    };
    let export = &context.export;
    let mut extents = match export.block_status(request.offset, request.len).await {
        Ok(extents) => extents,
        Err(error) => return engine_error_reply(context, request, &error),
    };
    if fua {
        if let Err(error) = export.flush().await {
            return engine_error_reply(context, request, &error);
        }
    }
    if request.flags & CMD_FLAG_REQ_ONE != 0 {
        extents.truncate(1);
    }

    let mut fields = Vec::with_capacity(4 + 8 * extents.len());
    fields.extend_from_slice(&context_id.to_be_bytes());
    for extent in &extents {
        fields.extend_from_slice(&extent.len.to_be_bytes());
        fields.extend_from_slice(&extent.flags.to_be_bytes());
    }
    let chunk = Chunk { flags: 0, kind: REPLY_TYPE_BLOCK_STATUS, fields, data: 0..0 };
    finish_chunks(request.cookie, vec![chunk], None)
}

/// Marks the last chunk DONE (adding a NONE chunk when there is none) and builds the reply.
fn finish_chunks(cookie: u64, mut chunks: Vec<Chunk>, data: Option<ReadOutput>) -> Reply {
    match chunks.last_mut() {
        Some(last) => last.flags |= REPLY_FLAG_DONE,
        None => chunks.push(Chunk {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_NONE,
            fields: Vec::new(),
            data: 0..0,
        }),
    }
    Reply::Structured { cookie, chunks, data }
}

fn engine_error_reply(context: &Context, request: &Request, error: &EngineError) -> Reply {
    let code = error_code(error, request.command);
    if code == EIO {
        warn!(error = %error, "request failed");
    } else {
        debug!(error = %error, code, "request rejected");
    }
    error_reply(context, request, code, &error.to_string())
}

/// Builds an error reply: an ERROR chunk with a message under structured replies, else a
/// simple reply.
fn error_reply(context: &Context, request: &Request, code: u32, message: &str) -> Reply {
    if !context.structured_replies {
        return Reply::Simple { cookie: request.cookie, error: code, data: None };
    }
    let message = &message.as_bytes()[..message.len().min(MAX_STRING_LEN)];
    let mut fields = Vec::with_capacity(6 + message.len());
    fields.extend_from_slice(&code.to_be_bytes());
    fields.extend_from_slice(&(message.len() as u16).to_be_bytes());
    fields.extend_from_slice(message);
    let chunk = Chunk { flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_ERROR, fields, data: 0..0 };
    Reply::Structured { cookie: request.cookie, chunks: vec![chunk], data: None }
}

/// Writes replies in the order they complete, flushing when no more are queued. Each
/// reply's permits are released once its bytes are in the socket or the write buffer.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut replies: mpsc::UnboundedReceiver<(Reply, Permits)>,
    limits: TransmissionLimits,
) -> std::io::Result<()> {
    let mut writer = BufWriter::with_capacity(256 * 1024, writer);
    while let Some(first) = replies.recv().await {
        let mut next = Some(first);
        while let Some((reply, permits)) = next {
            within(limits.transfer_deadline(reply.data_len()), write_one(&mut writer, &reply)).await?;
            drop((reply, permits));
            next = replies.try_recv().ok();
        }
        writer.flush().await?;
    }
    writer.shutdown().await
}

/// Runs the transfer `io`, failing with `TimedOut` when it has not finished by `deadline`.
async fn within<T>(deadline: Option<Duration>, io: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    let Some(deadline) = deadline else {
        return io.await;
    };
    match tokio::time::timeout(deadline, io).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "client moved data slower than the minimum transfer rate ({} s allowed)",
                deadline.as_secs()
            ),
        )),
    }
}

/// Reads a write payload into `buffer`, failing when no byte arrives for `stall`.
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut [u8],
    stall: Duration,
) -> io::Result<()> {
    let mut filled = 0;
    while filled < buffer.len() {
        filled += read_some(reader, &mut buffer[filled..], stall).await?;
    }
    Ok(())
}

/// Reads and discards a `len`-byte payload, failing when no byte arrives for `stall`.
async fn skip_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    mut len: usize,
    stall: Duration,
) -> io::Result<()> {
    let mut scratch = vec![0u8; len.min(64 * 1024)];
    while len > 0 {
        let want = len.min(scratch.len());
        len -= read_some(reader, &mut scratch[..want], stall).await?;
    }
    Ok(())
}

/// Reads at least one byte. End of file is an error, because a payload was promised.
async fn read_some<R: AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut [u8],
    stall: Duration,
) -> io::Result<usize> {
    match tokio::time::timeout(stall, reader.read(buffer)).await {
        Ok(Ok(0)) => Err(io::ErrorKind::UnexpectedEof.into()),
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("client sent no payload bytes for {} s", stall.as_secs()),
        )),
    }
}

/// A writer that fails with `TimedOut` when a write, flush or shutdown stays pending for
/// longer than its limit, that is, when the client stops reading.
struct StallGuard<W> {
    inner: W,
    limit: Duration,
    timer: Pin<Box<Sleep>>,
    waiting: bool,
}

impl<W> StallGuard<W> {
    fn new(inner: W, limit: Duration) -> Self {
        StallGuard { inner, limit, timer: Box::pin(tokio::time::sleep(limit)), waiting: false }
    }

    /// Passes a ready result through; on pending, starts the timer or checks it.
    fn check<T>(&mut self, cx: &mut TaskContext<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.waiting = false;
            return poll;
        }
        if !self.waiting {
            // A limit too large to add to the clock never fires.
            let Some(deadline) = Instant::now().checked_add(self.limit) else {
                return Poll::Pending;
            };
            self.waiting = true;
            self.timer.as_mut().reset(deadline);
        }
        ready!(self.timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("client read no reply bytes for {} s", self.limit.as_secs()),
        )))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for StallGuard<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, poll)
    }
}

async fn write_one<W: AsyncWrite + Unpin>(writer: &mut BufWriter<W>, reply: &Reply) -> std::io::Result<()> {
    match reply {
        Reply::Simple { cookie, error, data } => {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            header[4..8].copy_from_slice(&error.to_be_bytes());
            header[8..].copy_from_slice(&cookie.to_be_bytes());
            writer.write_all(&header).await?;
            if let (0, Some(data)) = (*error, data) {
                writer.write_all(data.data()).await?;
            }
        }
        Reply::Structured { cookie, chunks, data } => {
            let data = data.as_ref().map_or(&[][..], ReadOutput::data);
            for chunk in chunks {
                let len = chunk.fields.len() + chunk.data.len();
                write_chunk_header(writer, *cookie, chunk.flags, chunk.kind, len).await?;
                writer.write_all(&chunk.fields).await?;
                writer.write_all(&data[chunk.data.clone()]).await?;
            }
        }
        Reply::DataChunk { cookie, offset, data } => {
            let data = data.data();
            write_chunk_header(writer, *cookie, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8 + data.len())
                .await?;
            writer.write_all(&offset.to_be_bytes()).await?;
            writer.write_all(data).await?;
        }
    }
    Ok(())
}

async fn write_chunk_header<W: AsyncWrite + Unpin>(
    writer: &mut BufWriter<W>,
    cookie: u64,
    flags: u16,
    kind: u16,
    len: usize,
) -> std::io::Result<()> {
    let mut header = [0u8; 20];
    header[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&kind.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    header[16..20].copy_from_slice(&(len as u32).to_be_bytes());
    writer.write_all(&header).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes 4 KiB through a guard with `limit` to a peer that never reads, so the write
    /// stays pending beyond the 64-byte pipe, and gives up after 300 ms.
    async fn write_to_stuck_peer(limit: Duration) -> Result<io::Result<()>, tokio::time::error::Elapsed> {
        let (client, _server) = tokio::io::duplex(64);
        let mut guard = StallGuard::new(client, limit);
        tokio::time::timeout(Duration::from_millis(300), guard.write_all(&[7u8; 4096])).await
    }

    #[tokio::test]
    async fn stall_guard_fails_a_stuck_write() {
        let outcome = write_to_stuck_peer(Duration::from_millis(50)).await;
        let error = outcome.expect("the guard did not fire within 300 ms").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn stall_guard_with_a_huge_limit_waits() {
        // Adding Duration::MAX to the clock overflows; the guard then never fires.
        let outcome = write_to_stuck_peer(Duration::MAX).await;
        assert!(outcome.is_err(), "the write finished or failed: {outcome:?}");
    }

    #[test]
    fn transfer_deadline_handles_extremes() {
        let mut limits = TransmissionLimits { min_transfer_rate: 1 << 20, ..TransmissionLimits::default() };
        assert_eq!(limits.transfer_deadline(32 << 20), Some(DEFAULT_STALL_TIMEOUT + Duration::from_secs(32)));
        limits.stall_timeout = Duration::MAX;
        assert_eq!(limits.transfer_deadline(32 << 20), None);
        limits.min_transfer_rate = 0;
        assert_eq!(limits.transfer_deadline(1), None);
    }
}
