//! NBD conformance tests that speak raw protocol bytes to an in-process server on
//! 127.0.0.1:0 backed by memory, covering the handshake, transmission and bad input.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use nbdcrypt::backend::MemoryBackend;
use nbdcrypt::crypto::{SectorCipher, SectorSize, VolumeKey};
use nbdcrypt::daemon::{self, ListenAddr, Listener, ServerLimits};
use nbdcrypt::engine::{Export, ExportOptions, STATE_ZERO};
use nbdcrypt::nbd::consts::*;
use nbdcrypt::nbd::ExportTable;
use proptest::prelude::*;

const EXPORT_SIZE: u64 = 1024 * 1024;
const DATA_OFFSET: u64 = 4096;

/// An in-process server running on its own runtime thread until dropped.
struct TestServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    fn start(discard: bool) -> Self {
        Self::start_with(discard, ServerLimits::default())
    }

    fn start_with(discard: bool, limits: ServerLimits) -> Self {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let backend = Arc::new(MemoryBackend::new((DATA_OFFSET + EXPORT_SIZE) as usize));
                let key = VolumeKey::generate().unwrap();
                let options = ExportOptions {
                    name: "disk".into(),
                    description: "test".into(),
                    discard,
                    read_only: false,
                };
                let export = Export::new(
                    options,
                    backend,
                    SectorCipher::new(&key, SectorSize::S4096),
                    DATA_OFFSET,
                    EXPORT_SIZE,
                );
                let table = Arc::new(ExportTable::new(vec![Arc::new(export)]).unwrap());
                let listener =
                    Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())).await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let limits = ServerLimits { shutdown_timeout: Duration::from_secs(2), ..limits };
                daemon::serve(vec![listener], table, limits, async {
                    let _ = stop_rx.await;
                })
                .await;
            });
        });
        let addr = addr_rx.recv().unwrap();
        TestServer { addr, stop: Some(stop_tx), thread: Some(thread) }
    }

    fn connect(&self) -> Client {
        let stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client { stream }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
    }
}

struct Client {
    stream: TcpStream,
}

struct OptionReply {
    option: u32,
    reply_type: u32,
    data: Vec<u8>,
}

impl Client {
    fn read_exact(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.stream.read_exact(&mut buf).unwrap();
        buf
    }

    fn read_u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_exact(4).try_into().unwrap())
    }

    fn read_u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_exact(8).try_into().unwrap())
    }

    /// Reads the greeting and sends client flags.
    fn greet(&mut self, client_flags: u32) -> u16 {
        assert_eq!(self.read_u64(), NBDMAGIC);
        assert_eq!(self.read_u64(), IHAVEOPT);
        let flags = u16::from_be_bytes(self.read_exact(2).try_into().unwrap());
        self.stream.write_all(&client_flags.to_be_bytes()).unwrap();
        flags
    }

    fn send_option(&mut self, option: u32, payload: &[u8]) {
        let mut frame = IHAVEOPT.to_be_bytes().to_vec();
        frame.extend_from_slice(&option.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).unwrap();
    }

    fn read_option_reply(&mut self) -> OptionReply {
        assert_eq!(self.read_u64(), OPTION_REPLY_MAGIC);
        let option = self.read_u32();
        let reply_type = self.read_u32();
        let len = self.read_u32();
        let data = self.read_exact(len as usize);
        OptionReply { option, reply_type, data }
    }

    /// Sends GO for `name` and reads replies up to the final one, returning all of them.
    fn go(&mut self, name: &str) -> Vec<OptionReply> {
        self.send_option(OPT_GO, &info_payload(name.as_bytes(), &[]));
        let mut replies = Vec::new();
        loop {
            let reply = self.read_option_reply();
            let done = reply.reply_type != REP_INFO;
            replies.push(reply);
            if done {
                return replies;
            }
        }
    }

    /// Completes a handshake with GO on "disk".
    fn attach(server: &TestServer) -> Client {
        let mut client = server.connect();
        client.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        let replies = client.go("disk");
        assert_eq!(replies.last().unwrap().reply_type, REP_ACK);
        client
    }

    fn send_request(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut frame = REQUEST_MAGIC.to_be_bytes().to_vec();
        frame.extend_from_slice(&flags.to_be_bytes());
        frame.extend_from_slice(&command.to_be_bytes());
        frame.extend_from_slice(&cookie.to_be_bytes());
        frame.extend_from_slice(&offset.to_be_bytes());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).unwrap();
    }

    /// Reads one simple reply header: (error, cookie).
    fn read_reply(&mut self) -> (u32, u64) {
        assert_eq!(self.read_u32(), SIMPLE_REPLY_MAGIC);
        let error = self.read_u32();
        let cookie = self.read_u64();
        (error, cookie)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.send_request(0, CMD_WRITE, 1, offset, data.len() as u32, data);
        self.read_reply().0
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send_request(0, CMD_READ, 2, offset, len, &[]);
        let (error, _) = self.read_reply();
        if error != 0 {
            return Err(error);
        }
        Ok(self.read_exact(len as usize))
    }

    /// True when the server has closed the connection.
    fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0) | Err(_))
    }
}

fn info_payload(name: &[u8], info_types: &[u16]) -> Vec<u8> {
    let mut payload = (name.len() as u32).to_be_bytes().to_vec();
    payload.extend_from_slice(name);
    payload.extend_from_slice(&(info_types.len() as u16).to_be_bytes());
    for info in info_types {
        payload.extend_from_slice(&info.to_be_bytes());
    }
    payload
}

#[test]
fn greeting_advertises_fixed_newstyle_and_no_zeroes() {
    let server = TestServer::start(false);
    let mut client = server.connect();
    assert_eq!(client.greet(FLAG_C_FIXED_NEWSTYLE), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

#[test]
fn unknown_client_flags_end_the_connection() {
    let server = TestServer::start(false);
    let mut client = server.connect();
    client.greet(FLAG_C_FIXED_NEWSTYLE | 0x8);
    assert!(client.is_closed());
}

#[test]
fn unsupported_options_get_err_unsup_and_negotiation_continues() {
    let server = TestServer::start(false);
    let mut client = server.connect();
    client.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);

    // STARTTLS (no TLS configured), PEEK_EXPORT (withdrawn), EXTENDED_HEADERS, unknown.
    for (option, payload) in [(5u32, vec![]), (4, vec![1, 2, 3]), (11, vec![]), (99, vec![7u8; 100])] {
        client.send_option(option, &payload);
        let reply = client.read_option_reply();
        assert_eq!(reply.option, option);
        assert_eq!(reply.reply_type, REP_ERR_UNSUP);
    }

    let replies = client.go("disk");
    let export_info = replies
        .iter()
        .find(|r| r.reply_type == REP_INFO && r.data[..2] == INFO_EXPORT.to_be_bytes())
        .unwrap();
    assert_eq!(export_info.data.len(), 12);
    assert_eq!(u64::from_be_bytes(export_info.data[2..10].try_into().unwrap()), EXPORT_SIZE);
    let flags = u16::from_be_bytes(export_info.data[10..12].try_into().unwrap());
    assert_ne!(flags & TFLAG_HAS_FLAGS, 0);
    assert_ne!(flags & TFLAG_SEND_FLUSH, 0);
    assert_ne!(flags & TFLAG_SEND_FUA, 0);
    assert_eq!(flags & TFLAG_SEND_TRIM, 0, "TRIM advertised without discard");
    assert_eq!(replies.last().unwrap().reply_type, REP_ACK);
}

#[test]
fn list_names_every_export() {
    let server = TestServer::start(false);
    let mut client = server.connect();
    client.greet(FLAG_C_FIXED_NEWSTYLE);
    client.send_option(OPT_LIST, &[]);
    let reply = client.read_option_reply();
    assert_eq!(reply.reply_type, REP_SERVER);
    assert_eq!(reply.data, [&4u32.to_be_bytes()[..], b"disk"].concat());
    assert_eq!(client.read_option_reply().reply_type, REP_ACK);

    client.send_option(OPT_LIST, b"junk");
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_INVALID);
}

#[test]
fn info_and_go_handle_unknown_and_malformed_names() {
    let server = TestServer::start(false);
    let mut client = server.connect();
    client.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);

    client.send_option(OPT_INFO, &info_payload(b"nope", &[]));
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_UNKNOWN);

    client.send_option(OPT_INFO, &info_payload(&[b'x'; 4096], &[INFO_NAME]));
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_UNKNOWN);

    client.send_option(OPT_GO, &info_payload(&[b'x'; 4097], &[]));
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_INVALID);

    // Name length larger than the option itself.
    let mut bad = u32::MAX.to_be_bytes().to_vec();
    bad.extend_from_slice(b"disk\0\0");
    client.send_option(OPT_GO, &bad);
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_INVALID);

    // INFO leaves no state behind; the following GO still works.
    client.send_option(OPT_INFO, &info_payload(b"disk", &[INFO_BLOCK_SIZE]));
    loop {
        if client.read_option_reply().reply_type == REP_ACK {
            break;
        }
    }
    assert_eq!(client.go("disk").last().unwrap().reply_type, REP_ACK);
    assert_eq!(client.write(0, b"still works"), 0);
}

#[test]
fn export_name_reply_honours_no_zeroes() {
    let server = TestServer::start(false);
    for (flags, expected_len) in
        [(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10), (FLAG_C_FIXED_NEWSTYLE, 134)]
    {
        let mut client = server.connect();
        client.greet(flags);
        client.send_option(OPT_EXPORT_NAME, b"disk");
        let reply = client.read_exact(expected_len);
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), EXPORT_SIZE);
        assert_eq!(client.write(4096, &[1u8; 512]), 0);
    }

    let mut client = server.connect();
    client.greet(FLAG_C_FIXED_NEWSTYLE);
    client.send_option(OPT_EXPORT_NAME, b"missing");
    assert!(client.is_closed(), "EXPORT_NAME for a missing export must disconnect");
}

#[test]
fn abort_is_acknowledged() {
    let server = TestServer::start(false);
    let mut client = server.connect();
    client.greet(FLAG_C_FIXED_NEWSTYLE);
    client.send_option(OPT_ABORT, &[]);
    assert_eq!(client.read_option_reply().reply_type, REP_ACK);
    assert!(client.is_closed());
}

#[test]
fn garbage_option_magic_disconnects() {
    let server = TestServer::start(false);
    let mut client = server.connect();
    client.greet(FLAG_C_FIXED_NEWSTYLE);
    client.stream.write_all(&[0xde; 16]).unwrap();
    assert!(client.is_closed());
}

#[test]
fn absurd_option_length_disconnects_without_allocating() {
    let server = TestServer::start(false);
    let mut client = server.connect();
    client.greet(FLAG_C_FIXED_NEWSTYLE);
    let mut frame = IHAVEOPT.to_be_bytes().to_vec();
    frame.extend_from_slice(&OPT_GO.to_be_bytes());
    frame.extend_from_slice(&u32::MAX.to_be_bytes());
    client.stream.write_all(&frame).unwrap();
    assert!(client.is_closed());
}

#[test]
fn read_write_flush_and_errors_keep_the_connection() {
    let server = TestServer::start(false);
    let mut client = Client::attach(&server);

    assert_eq!(client.write(1000, b"hello, encrypted world"), 0);
    assert_eq!(client.read(1000, 22).unwrap(), b"hello, encrypted world");
    client.send_request(0, CMD_FLUSH, 9, 0, 0, &[]);
    assert_eq!(client.read_reply(), (0, 9));

    assert_eq!(client.read(EXPORT_SIZE - 10, 11), Err(EINVAL));
    assert_eq!(client.read(u64::MAX - 1, 4), Err(EINVAL));
    // The payload of a rejected write is consumed: the next request still parses.
    assert_eq!(client.write(EXPORT_SIZE - 2, b"abcd"), ENOSPC);
    client.send_request(0, CMD_TRIM, 3, 0, 4096, &[]);
    assert_eq!(client.read_reply(), (EINVAL, 3), "TRIM must fail without discard");
    client.send_request(0, 42, 4, 0, 0, &[]);
    assert_eq!(client.read_reply(), (EINVAL, 4), "unknown command");
    client.send_request(1 << 7, CMD_READ, 5, 0, 16, &[]);
    assert_eq!(client.read_reply(), (EINVAL, 5), "unknown flag");
    client.send_request(CMD_FLAG_NO_HOLE, CMD_WRITE, 6, 0, 3, b"xyz");
    assert_eq!(client.read_reply(), (EINVAL, 6), "NO_HOLE on WRITE");

    assert_eq!(client.read(0, 0).unwrap(), b"");
    assert_eq!(client.write(0, b""), 0);
    assert_eq!(client.read(1000, 22).unwrap(), b"hello, encrypted world");

    client.send_request(0, CMD_WRITE_ZEROES, 7, 1005, 10, &[]);
    assert_eq!(client.read_reply(), (0, 7));
    assert_eq!(client.read(1000, 22).unwrap(), b"hello\0\0\0\0\0\0\0\0\0\0d world");

    client.send_request(0, CMD_DISC, 8, 0, 0, &[]);
    assert!(client.is_closed());
}

#[test]
fn many_requests_in_flight_all_get_answers() {
    let server = TestServer::start(true);
    let mut client = Client::attach(&server);
    let mut batch = Vec::new();
    for i in 0..200u64 {
        let mut frame = REQUEST_MAGIC.to_be_bytes().to_vec();
        frame.extend_from_slice(&0u16.to_be_bytes());
        frame.extend_from_slice(&CMD_WRITE.to_be_bytes());
        frame.extend_from_slice(&(1000 + i).to_be_bytes());
        frame.extend_from_slice(&(i * 4096).to_be_bytes());
        frame.extend_from_slice(&4096u32.to_be_bytes());
        frame.extend_from_slice(&[i as u8; 4096]);
        batch.extend_from_slice(&frame);
    }
    client.stream.write_all(&batch).unwrap();
    let mut cookies: Vec<u64> = (0..200)
        .map(|_| {
            let (error, cookie) = client.read_reply();
            assert_eq!(error, 0);
            cookie
        })
        .collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (1000..1200).collect::<Vec<_>>());

    for i in [0u64, 57, 199] {
        assert_eq!(client.read(i * 4096, 4096).unwrap(), vec![i as u8; 4096]);
    }
}

#[test]
fn client_vanishing_mid_write_changes_nothing() {
    let server = TestServer::start(false);
    let mut client = Client::attach(&server);
    assert_eq!(client.write(8192, &[0x42; 8192]), 0);

    let mut frame = REQUEST_MAGIC.to_be_bytes().to_vec();
    frame.extend_from_slice(&0u16.to_be_bytes());
    frame.extend_from_slice(&CMD_WRITE.to_be_bytes());
    frame.extend_from_slice(&77u64.to_be_bytes());
    frame.extend_from_slice(&8192u64.to_be_bytes());
    frame.extend_from_slice(&8192u32.to_be_bytes());
    frame.extend_from_slice(&[0x99; 5000]);
    client.stream.write_all(&frame).unwrap();
    drop(client);

    let mut client = Client::attach(&server);
    assert_eq!(client.read(8192, 8192).unwrap(), vec![0x42; 8192]);
}

#[test]
fn oversized_write_payload_disconnects() {
    let server = TestServer::start(false);
    let mut client = Client::attach(&server);
    client.send_request(0, CMD_WRITE, 1, 0, 64 * 1024 * 1024, &[]);
    assert!(client.is_closed());
    // Other clients are unaffected.
    let mut other = Client::attach(&server);
    assert_eq!(other.write(0, b"ok"), 0);
}

#[test]
fn wrong_request_magic_disconnects() {
    let server = TestServer::start(false);
    let mut client = Client::attach(&server);
    client.stream.write_all(&[0x11; 28]).unwrap();
    assert!(client.is_closed());
}

#[test]
fn trim_on_discard_export_reads_back_zeros() {
    let server = TestServer::start(true);
    let mut client = Client::attach(&server);
    assert_eq!(client.write(0, &[7u8; 16384]), 0);
    client.send_request(0, CMD_TRIM, 3, 4096, 8192, &[]);
    assert_eq!(client.read_reply(), (0, 3));
    let data = client.read(0, 16384).unwrap();
    assert_eq!(data[..4096], [7u8; 4096]);
    assert_eq!(data[4096..12288], [0u8; 8192]);
    assert_eq!(data[12288..], [7u8; 4096]);
}

/// A structured reply chunk: (flags, type, cookie, payload).
type ChunkFrame = (u16, u16, u64, Vec<u8>);

impl Client {
    fn read_chunk(&mut self) -> ChunkFrame {
        assert_eq!(self.read_u32(), STRUCTURED_REPLY_MAGIC);
        let flags = u16::from_be_bytes(self.read_exact(2).try_into().unwrap());
        let kind = u16::from_be_bytes(self.read_exact(2).try_into().unwrap());
        let cookie = self.read_u64();
        let len = self.read_u32();
        (flags, kind, cookie, self.read_exact(len as usize))
    }

    /// Reads chunks up to and including the one marked DONE.
    fn read_chunks(&mut self) -> Vec<ChunkFrame> {
        let mut chunks = Vec::new();
        loop {
            let chunk = self.read_chunk();
            let done = chunk.0 & REPLY_FLAG_DONE != 0;
            chunks.push(chunk);
            if done {
                return chunks;
            }
        }
    }

    /// Negotiates structured replies and, optionally, base:allocation on `meta_export`,
    /// then GO on "disk". Returns the transmission flags.
    fn attach_structured(&mut self, meta_export: Option<&str>) -> u16 {
        self.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        self.send_option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(self.read_option_reply().reply_type, REP_ACK);
        if let Some(name) = meta_export {
            self.send_option(OPT_SET_META_CONTEXT, &meta_payload(name, &["base:allocation"]));
            let reply = self.read_option_reply();
            assert_eq!(reply.reply_type, REP_META_CONTEXT);
            assert_eq!(&reply.data[4..], b"base:allocation");
            assert_eq!(self.read_option_reply().reply_type, REP_ACK);
        }
        let replies = self.go("disk");
        assert_eq!(replies.last().unwrap().reply_type, REP_ACK);
        let export = replies
            .iter()
            .find(|r| r.reply_type == REP_INFO && r.data[..2] == INFO_EXPORT.to_be_bytes())
            .unwrap();
        u16::from_be_bytes(export.data[10..12].try_into().unwrap())
    }

    /// Sends BLOCK_STATUS and returns (context id, [(length, flags)]).
    fn block_status(&mut self, flags: u16, offset: u64, len: u32) -> Result<(u32, Vec<(u32, u32)>), u32> {
        self.send_request(flags, CMD_BLOCK_STATUS, 50, offset, len, &[]);
        let chunks = self.read_chunks();
        assert_eq!(chunks.len(), 1);
        let (_, kind, cookie, payload) = &chunks[0];
        assert_eq!(*cookie, 50);
        if *kind == REPLY_TYPE_ERROR {
            return Err(u32::from_be_bytes(payload[..4].try_into().unwrap()));
        }
        assert_eq!(*kind, REPLY_TYPE_BLOCK_STATUS);
        let id = u32::from_be_bytes(payload[..4].try_into().unwrap());
        let extents = payload[4..]
            .chunks_exact(8)
            .map(|e| {
                (
                    u32::from_be_bytes(e[..4].try_into().unwrap()),
                    u32::from_be_bytes(e[4..].try_into().unwrap()),
                )
            })
            .collect();
        Ok((id, extents))
    }
}

fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut payload = (export.len() as u32).to_be_bytes().to_vec();
    payload.extend_from_slice(export.as_bytes());
    payload.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        payload.extend_from_slice(&(query.len() as u32).to_be_bytes());
        payload.extend_from_slice(query.as_bytes());
    }
    payload
}

#[test]
fn structured_read_reports_holes_and_data() {
    let server = TestServer::start(false);
    let mut client = server.connect();
    let flags = client.attach_structured(None);
    assert_ne!(flags & TFLAG_SEND_DF, 0);
    assert_eq!(client.write(4096, &[9u8; 4096]), 0);

    client.send_request(0, CMD_READ, 20, 0, 3 * 4096, &[]);
    let chunks = client.read_chunks();
    let kinds: Vec<u16> = chunks.iter().map(|c| c.1).collect();
    assert_eq!(kinds, vec![REPLY_TYPE_OFFSET_HOLE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE]);
    assert_eq!(chunks[0].3, [&0u64.to_be_bytes()[..], &4096u32.to_be_bytes()].concat());
    assert_eq!(chunks[1].3[..8], 4096u64.to_be_bytes());
    assert_eq!(chunks[1].3[8..], [9u8; 4096]);
    assert_eq!(chunks[2].3, [&8192u64.to_be_bytes()[..], &4096u32.to_be_bytes()].concat());
    assert!(chunks.iter().all(|c| c.2 == 20));

    // DF: one data chunk, zeros included.
    client.send_request(CMD_FLAG_DF, CMD_READ, 21, 0, 3 * 4096, &[]);
    let chunks = client.read_chunks();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].1, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(chunks[0].3.len(), 8 + 3 * 4096);

    // Errors are ERROR chunks with a message.
    client.send_request(0, CMD_READ, 22, EXPORT_SIZE, 1, &[]);
    let chunks = client.read_chunks();
    assert_eq!(chunks[0].1, REPLY_TYPE_ERROR);
    assert_eq!(u32::from_be_bytes(chunks[0].3[..4].try_into().unwrap()), EINVAL);
    let message_len = u16::from_be_bytes(chunks[0].3[4..6].try_into().unwrap()) as usize;
    assert_eq!(chunks[0].3.len(), 6 + message_len);
    assert!(message_len > 0);

    // Zero-length read: a lone NONE chunk.
    client.send_request(0, CMD_READ, 23, 0, 0, &[]);
    let chunks = client.read_chunks();
    assert_eq!((chunks[0].0, chunks[0].1), (REPLY_FLAG_DONE, REPLY_TYPE_NONE));
}

#[test]
fn block_status_agrees_with_reads() {
    let server = TestServer::start(true);
    let mut client = server.connect();
    client.attach_structured(Some("disk"));

    let (id, extents) = client.block_status(0, 0, EXPORT_SIZE as u32).unwrap();
    assert_eq!(id, 1);
    assert_eq!(extents, vec![(EXPORT_SIZE as u32, STATE_ZERO)]);

    assert_eq!(client.write(8192, &[5u8; 8192]), 0);
    let (_, extents) = client.block_status(0, 0, 65536).unwrap();
    assert_eq!(extents, vec![(8192, STATE_ZERO), (8192, 0), (65536 - 16384, STATE_ZERO)]);
    // The same query of an unchanged range gives the same answer.
    assert_eq!(client.block_status(0, 0, 65536).unwrap().1, extents);

    // REQ_ONE: exactly one extent, not beyond the request.
    let (_, one) = client.block_status(CMD_FLAG_REQ_ONE, 100, 65536).unwrap();
    assert_eq!(one, vec![(8092, STATE_ZERO)]);

    client.send_request(0, CMD_WRITE_ZEROES, 30, 8192, 4096, &[]);
    assert_eq!(client.read_reply(), (0, 30));
    client.send_request(0, CMD_TRIM, 31, 12288, 4096, &[]);
    assert_eq!(client.read_reply(), (0, 31));
    let (_, extents) = client.block_status(0, 0, 65536).unwrap();
    assert_eq!(extents, vec![(65536, STATE_ZERO)]);

    assert_eq!(client.block_status(0, EXPORT_SIZE, 1), Err(EINVAL));
}

#[test]
fn block_status_needs_a_context_for_this_export() {
    let server = TestServer::start(false);
    let mut client = server.connect();
    client.attach_structured(None);
    assert_eq!(client.block_status(0, 0, 4096), Err(EINVAL));
}

#[test]
fn meta_context_negotiation_rules() {
    let server = TestServer::start(false);
    let mut client = server.connect();
    client.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);

    // Before STRUCTURED_REPLY: invalid.
    client.send_option(OPT_SET_META_CONTEXT, &meta_payload("disk", &["base:allocation"]));
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_INVALID);

    client.send_option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_INVALID);
    client.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(client.read_option_reply().reply_type, REP_ACK);

    // LIST with no queries lists everything, `base:` is a wildcard, unknown namespaces are ignored.
    for queries in [&[][..], &["base:"][..], &["qemu:dirty-bitmap:x", "base:allocation"][..]] {
        client.send_option(OPT_LIST_META_CONTEXT, &meta_payload("disk", queries));
        let reply = client.read_option_reply();
        assert_eq!(reply.reply_type, REP_META_CONTEXT, "{queries:?}");
        assert_eq!(reply.data, [&0u32.to_be_bytes()[..], b"base:allocation"].concat());
        assert_eq!(client.read_option_reply().reply_type, REP_ACK);
    }
    client.send_option(OPT_LIST_META_CONTEXT, &meta_payload("disk", &["other:thing"]));
    assert_eq!(client.read_option_reply().reply_type, REP_ACK);

    // Malformed: a query length running past the option.
    let mut bad = meta_payload("disk", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    client.send_option(OPT_SET_META_CONTEXT, &bad);
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_INVALID);
    client.send_option(OPT_SET_META_CONTEXT, &meta_payload("nope", &["base:allocation"]));
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_UNKNOWN);
}

#[test]
fn meta_context_of_another_export_does_not_apply() {
    let server = TestServer::start(false);
    let mut client = server.connect();
    client.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    client.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(client.read_option_reply().reply_type, REP_ACK);
    client.send_option(OPT_SET_META_CONTEXT, &meta_payload("disk", &["base:allocation"]));
    assert_eq!(client.read_option_reply().reply_type, REP_META_CONTEXT);
    assert_eq!(client.read_option_reply().reply_type, REP_ACK);
    // A failed SET replaces the selection with nothing.
    client.send_option(OPT_SET_META_CONTEXT, &meta_payload("nope", &["base:allocation"]));
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_UNKNOWN);
    assert_eq!(client.go("disk").last().unwrap().reply_type, REP_ACK);
    assert_eq!(client.block_status(0, 0, 4096), Err(EINVAL));
}

#[test]
fn fast_zero_and_cache_are_supported() {
    let server = TestServer::start(false);
    let mut client = Client::attach(&server);
    assert_eq!(client.write(0, &[3u8; 16384]), 0);
    client.send_request(CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 40, 100, 10000, &[]);
    assert_eq!(client.read_reply(), (0, 40));
    let data = client.read(0, 16384).unwrap();
    assert_eq!(data[..100], [3u8; 100]);
    assert!(data[100..10100].iter().all(|&b| b == 0));
    assert!(data[10100..].iter().all(|&b| b == 3));

    client.send_request(0, CMD_CACHE, 41, 0, 65536, &[]);
    assert_eq!(client.read_reply(), (0, 41));
    client.send_request(0, CMD_CACHE, 42, EXPORT_SIZE, 1, &[]);
    assert_eq!(client.read_reply(), (EINVAL, 42));
    client.send_request(CMD_FLAG_DF, CMD_READ, 43, 0, 16, &[]);
    assert_eq!(client.read_reply(), (EINVAL, 43), "DF without structured replies");
}

#[test]
fn payload_above_advertised_maximum_is_drained_and_rejected() {
    let mut limits = ServerLimits::default();
    limits.handshake.max_payload = 1024 * 1024;
    let server = TestServer::start_with(false, limits);
    let mut client = server.connect();
    client.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    let replies = client.go("disk");
    let block = replies
        .iter()
        .find(|r| r.reply_type == REP_INFO && r.data[..2] == INFO_BLOCK_SIZE.to_be_bytes())
        .unwrap();
    assert_eq!(
        block.data[2..],
        [&1u32.to_be_bytes()[..], &4096u32.to_be_bytes(), &(1024u32 * 1024).to_be_bytes()].concat()
    );

    let big = vec![1u8; 2 * 1024 * 1024];
    assert_eq!(client.write(0, &big), EINVAL);
    assert_eq!(client.read(0, 2 * 1024 * 1024), Err(EINVAL));
    assert_eq!(client.write(0, b"fine"), 0);
    assert_eq!(client.read(0, 4).unwrap(), b"fine");
}

#[test]
fn connections_per_export_are_limited() {
    let mut limits = ServerLimits::default();
    limits.handshake.max_connections_per_export = 2;
    let server = TestServer::start_with(false, limits);
    let first = Client::attach(&server);
    let _second = Client::attach(&server);
    let mut third = server.connect();
    third.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    assert_eq!(third.go("disk").last().unwrap().reply_type, REP_ERR_POLICY);
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(third.go("disk").last().unwrap().reply_type, REP_ACK);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Arbitrary bytes after a successful GO never take the server down.
    #[test]
    fn random_transmission_bytes_do_not_hurt_the_server(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let server = TestServer::start(true);
        {
            let mut client = Client::attach(&server);
            let _ = client.stream.write_all(&bytes);
            let _ = client.stream.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = client.stream.read_to_end(&mut sink);
        }
        let mut client = Client::attach(&server);
        prop_assert_eq!(client.write(0, b"alive"), 0);
        prop_assert_eq!(client.read(0, 5).unwrap(), b"alive".to_vec());
    }

    /// Arbitrary option bytes never take the server down.
    #[test]
    fn random_option_bytes_do_not_hurt_the_server(option in any::<u32>(), payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let server = TestServer::start(false);
        {
            let mut client = server.connect();
            client.greet(FLAG_C_FIXED_NEWSTYLE);
            client.send_option(option, &payload);
            let _ = client.stream.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = client.stream.read_to_end(&mut sink);
        }
        let mut client = Client::attach(&server);
        prop_assert_eq!(client.write(0, b"alive"), 0);
    }
}
