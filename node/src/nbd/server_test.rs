//! Socket-level tests: `serve` on 127.0.0.1:0 with the in-memory provider,
//! driven by a raw TCP client that checks every byte the server sends.
//! Every client step runs under a timeout so a server bug fails the test
//! instead of hanging it.

use std::collections::BTreeMap;
use std::future::Future;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use super::*;
use crate::nbd::test_provider::{Call, MemoryExport, MemoryProvider};

const STEP_TIMEOUT: Duration = Duration::from_secs(20);
const EXPORT_BYTES: usize = 1 << 20;
const MIB: u32 = 1 << 20;

pub(crate) async fn step<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP_TIMEOUT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out: {what}"),
    }
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8 ^ (i >> 12) as u8
}

pub(crate) fn test_provider() -> MemoryProvider {
    MemoryProvider::default()
        .with_export(
            "t/v",
            MemoryExport::new(EXPORT_BYTES)
                .with_description("test volume")
                .with_data(pattern),
        )
        .with_export("t/ro", MemoryExport::new(65536).read_only())
}

pub(crate) struct TestServer {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub stats: Arc<NbdStats>,
    pub provider: Arc<MemoryProvider>,
    task: JoinHandle<io::Result<()>>,
}

impl TestServer {
    pub async fn start(provider: MemoryProvider) -> TestServer {
        TestServer::start_with(provider, NbdServerConfig::default()).await
    }

    pub async fn start_with(provider: MemoryProvider, config: NbdServerConfig) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let provider = Arc::new(provider);
        let stats = Arc::new(NbdStats::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            Arc::clone(&provider),
            config,
            Arc::clone(&stats),
            shutdown.clone(),
        ));
        TestServer {
            addr,
            shutdown,
            stats,
            provider,
            task,
        }
    }

    pub async fn must_stop(self) {
        self.shutdown.cancel();
        let result = step("server stops", self.task).await;
        result.expect("serve task").expect("serve result");
    }
}

#[derive(Debug)]
struct Chunk {
    flags: u16,
    reply_type: u16,
    cookie: u64,
    payload: Vec<u8>,
}

struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> RawClient {
        let stream = step("connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        RawClient { stream }
    }

    /// Connect, check the greeting, send client flags.
    async fn greeted(addr: SocketAddr, client_flags: u32) -> RawClient {
        let mut client = RawClient::connect(addr).await;
        let greeting = client.must_read(NBD_GREETING_BYTES).await;
        assert_eq!(&greeting[0..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([greeting[16], greeting[17]]),
            NBD_HANDSHAKE_FLAGS
        );
        client.must_write(&client_flags.to_be_bytes()).await;
        client
    }

    async fn fixed(addr: SocketAddr) -> RawClient {
        RawClient::greeted(addr, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).await
    }

    /// Handshake with GO; optionally negotiate structured replies first.
    async fn session(addr: SocketAddr, name: &str, structured: bool) -> (RawClient, u64, u16) {
        let mut client = RawClient::fixed(addr).await;
        if structured {
            client.send_option(NBD_OPT_STRUCTURED_REPLY, &[]).await;
            let (option, reply_type, _) = client.read_option_reply().await;
            assert_eq!(
                (option, reply_type),
                (NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK)
            );
        }
        let (size, flags) = client.must_go(name).await;
        (client, size, flags)
    }

    async fn must_write(&mut self, bytes: &[u8]) {
        step("client write", self.stream.write_all(bytes))
            .await
            .expect("client write");
    }

    async fn must_read(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        step("client read", self.stream.read_exact(&mut buf))
            .await
            .expect("client read");
        buf
    }

    async fn must_read_u16(&mut self) -> u16 {
        let raw = self.must_read(2).await;
        u16::from_be_bytes([raw[0], raw[1]])
    }

    async fn must_read_u32(&mut self) -> u32 {
        let raw = self.must_read(4).await;
        u32::from_be_bytes(raw.try_into().expect("4 bytes"))
    }

    async fn must_read_u64(&mut self) -> u64 {
        let raw = self.must_read(8).await;
        u64::from_be_bytes(raw.try_into().expect("8 bytes"))
    }

    /// The server closed the connection (EOF, or a reset if it closed with
    /// unread data).
    async fn must_be_closed(&mut self) {
        let mut buf = [0u8; 4096];
        match step("server closes", self.stream.read(&mut buf)).await {
            Ok(0) => {}
            Ok(n) => panic!(
                "expected close, got {n} more bytes: {:?}",
                &buf[..n.min(32)]
            ),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected close, got {e}"),
        }
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut raw = NBD_IHAVEOPT.to_be_bytes().to_vec();
        raw.extend_from_slice(&option.to_be_bytes());
        raw.extend_from_slice(&(data.len() as u32).to_be_bytes());
        raw.extend_from_slice(data);
        self.must_write(&raw).await;
    }

    async fn read_option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.must_read_u64().await, NBD_REP_MAGIC);
        let option = self.must_read_u32().await;
        let reply_type = self.must_read_u32().await;
        let length = self.must_read_u32().await;
        let data = self.must_read(length as usize).await;
        (option, reply_type, data)
    }

    /// GO asking for NBD_INFO_BLOCK_SIZE; returns size and transmission flags.
    async fn must_go(&mut self, name: &str) -> (u64, u16) {
        self.send_option(NBD_OPT_GO, &info_data(name, &[NBD_INFO_BLOCK_SIZE]))
            .await;
        let mut export = None;
        loop {
            let (option, reply_type, data) = self.read_option_reply().await;
            assert_eq!(option, NBD_OPT_GO);
            match reply_type {
                NBD_REP_INFO if data[0..2] == NBD_INFO_EXPORT.to_be_bytes() => {
                    let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    export = Some((size, flags));
                }
                NBD_REP_INFO => {}
                NBD_REP_ACK => return export.expect("NBD_INFO_EXPORT before ACK"),
                other => panic!(
                    "GO {name} failed: {other:#x} {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    async fn send_request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let header = RequestHeader {
            flags,
            command: Command::from_wire(command),
            cookie,
            offset,
            length,
        };
        let mut raw = header.encode().to_vec();
        raw.extend_from_slice(payload);
        self.must_write(&raw).await;
    }

    /// A simple reply header: (errno, cookie).
    async fn read_simple_reply(&mut self) -> (u32, u64) {
        assert_eq!(self.must_read_u32().await, NBD_SIMPLE_REPLY_MAGIC);
        let errno = self.must_read_u32().await;
        let cookie = self.must_read_u64().await;
        (errno, cookie)
    }

    async fn read_chunk(&mut self) -> Chunk {
        assert_eq!(self.must_read_u32().await, NBD_STRUCTURED_REPLY_MAGIC);
        let flags = self.must_read_u16().await;
        let reply_type = self.must_read_u16().await;
        let cookie = self.must_read_u64().await;
        let length = self.must_read_u32().await;
        let payload = self.must_read(length as usize).await;
        Chunk {
            flags,
            reply_type,
            cookie,
            payload,
        }
    }

    /// Simple-reply WRITE then READ back, checking the data.
    async fn must_round_trip(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u32;
        self.send_request(NBD_CMD_WRITE, 0, 0xaaaa, offset, len, data)
            .await;
        assert_eq!(self.read_simple_reply().await, (0, 0xaaaa));
        self.send_request(NBD_CMD_READ, 0, 0xbbbb, offset, len, &[])
            .await;
        assert_eq!(self.read_simple_reply().await, (0, 0xbbbb));
        assert_eq!(self.must_read(data.len()).await, data);
    }

    async fn must_errno(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u32 {
        self.send_request(command, flags, 77, offset, length, payload)
            .await;
        let (errno, cookie) = self.read_simple_reply().await;
        assert_eq!(cookie, 77);
        errno
    }
}

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        data.extend_from_slice(&info.to_be_bytes());
    }
    data
}

#[tokio::test]
async fn garbage_instead_of_a_handshake_is_closed_and_harms_no_one() {
    let server = TestServer::start(test_provider()).await;

    // An HTTP client: its first four bytes are unknown client flags.
    let mut http = RawClient::connect(server.addr).await;
    http.must_read(NBD_GREETING_BYTES).await;
    http.must_write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    http.must_be_closed().await;

    // Valid flags, then garbage where IHAVEOPT belongs.
    let mut garbage = RawClient::fixed(server.addr).await;
    garbage.must_write(&[0x5a; 64]).await;
    garbage.must_be_closed().await;

    // Connect and leave without a word.
    drop(RawClient::connect(server.addr).await);

    // The server still serves.
    let (mut client, size, _) = RawClient::session(server.addr, "t/v", false).await;
    assert_eq!(size, EXPORT_BYTES as u64);
    client.must_round_trip(4096, &[1, 2, 3]).await;
    assert!(server.stats.snapshot().handshakes_failed >= 2);
    server.must_stop().await;
}

#[tokio::test]
async fn unknown_and_refused_options_get_errors_and_the_session_continues() {
    let server = TestServer::start(test_provider()).await;
    let mut client = RawClient::fixed(server.addr).await;

    client.send_option(0x1234, &[9; 100]).await;
    let (option, reply_type, message) = client.read_option_reply().await;
    assert_eq!((option, reply_type), (0x1234, NBD_REP_ERR_UNSUP));
    assert!(!message.is_empty());

    for option in [
        NBD_OPT_SET_META_CONTEXT,
        NBD_OPT_LIST_META_CONTEXT,
        NBD_OPT_EXTENDED_HEADERS,
    ] {
        client.send_option(option, &[0; 8]).await;
        assert_eq!(client.read_option_reply().await.1, NBD_REP_ERR_UNSUP);
    }

    // NOTLS mode: STARTTLS is refused by policy, and the session goes on.
    client.send_option(NBD_OPT_STARTTLS, &[]).await;
    assert_eq!(client.read_option_reply().await.1, NBD_REP_ERR_POLICY);
    client.send_option(NBD_OPT_STARTTLS, &[1]).await;
    assert_eq!(client.read_option_reply().await.1, NBD_REP_ERR_INVALID);

    // Bad lengths are NBD_REP_ERR_INVALID.
    client.send_option(NBD_OPT_LIST, &[1]).await;
    assert_eq!(client.read_option_reply().await.1, NBD_REP_ERR_INVALID);
    client.send_option(NBD_OPT_STRUCTURED_REPLY, &[1, 2]).await;
    assert_eq!(client.read_option_reply().await.1, NBD_REP_ERR_INVALID);
    let mut bad_go = info_data("t/v", &[NBD_INFO_NAME]);
    bad_go.pop();
    client.send_option(NBD_OPT_GO, &bad_go).await;
    assert_eq!(client.read_option_reply().await.1, NBD_REP_ERR_INVALID);
    client.send_option(NBD_OPT_INFO, &[0, 0, 0]).await;
    assert_eq!(client.read_option_reply().await.1, NBD_REP_ERR_INVALID);

    let (size, _) = client.must_go("t/v").await;
    assert_eq!(size, EXPORT_BYTES as u64);
    client.must_round_trip(0, b"still fine").await;
    server.must_stop().await;
}

#[tokio::test]
async fn list_returns_every_export_with_its_description() {
    let server = TestServer::start(test_provider()).await;
    let mut client = RawClient::fixed(server.addr).await;
    client.send_option(NBD_OPT_LIST, &[]).await;
    let mut listed = Vec::new();
    loop {
        let (option, reply_type, data) = client.read_option_reply().await;
        assert_eq!(option, NBD_OPT_LIST);
        if reply_type == NBD_REP_ACK {
            break;
        }
        assert_eq!(reply_type, NBD_REP_SERVER);
        let name_bytes = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        let name = String::from_utf8(data[4..4 + name_bytes].to_vec()).expect("utf-8");
        let description = String::from_utf8(data[4 + name_bytes..].to_vec()).expect("utf-8");
        listed.push((name, description));
    }
    assert_eq!(
        listed,
        [
            ("t/ro".to_owned(), String::new()),
            ("t/v".to_owned(), "test volume".to_owned())
        ]
    );
    // ABORT is acknowledged, then the server closes.
    client.send_option(NBD_OPT_ABORT, &[]).await;
    assert_eq!(client.read_option_reply().await.1, NBD_REP_ACK);
    client.must_be_closed().await;
    server.must_stop().await;
}

#[tokio::test]
async fn go_on_a_missing_export_is_err_unknown_and_the_client_may_retry() {
    let server = TestServer::start(test_provider()).await;
    let mut client = RawClient::fixed(server.addr).await;
    client
        .send_option(NBD_OPT_GO, &info_data("t/missing", &[]))
        .await;
    let (option, reply_type, message) = client.read_option_reply().await;
    assert_eq!((option, reply_type), (NBD_OPT_GO, NBD_REP_ERR_UNKNOWN));
    assert!(String::from_utf8_lossy(&message).contains("t/missing"));
    client.send_option(NBD_OPT_INFO, &info_data("", &[])).await;
    assert_eq!(client.read_option_reply().await.1, NBD_REP_ERR_UNKNOWN);
    let (size, flags) = client.must_go("t/ro").await;
    assert_eq!(size, 65536);
    assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
    server.must_stop().await;
}

#[tokio::test]
async fn info_answers_every_requested_item_then_go_enters_transmission() {
    let server = TestServer::start(test_provider()).await;
    let mut client = RawClient::fixed(server.addr).await;
    let wanted = [
        NBD_INFO_NAME,
        NBD_INFO_DESCRIPTION,
        NBD_INFO_BLOCK_SIZE,
        999,
    ];
    client
        .send_option(NBD_OPT_INFO, &info_data("t/v", &wanted))
        .await;
    let mut infos = BTreeMap::new();
    loop {
        let (option, reply_type, data) = client.read_option_reply().await;
        assert_eq!(option, NBD_OPT_INFO);
        if reply_type == NBD_REP_ACK {
            break;
        }
        assert_eq!(reply_type, NBD_REP_INFO);
        let info_type = u16::from_be_bytes([data[0], data[1]]);
        assert!(
            infos.insert(info_type, data[2..].to_vec()).is_none(),
            "info {info_type} twice"
        );
    }
    let export = &infos[&NBD_INFO_EXPORT];
    assert_eq!(export.len(), 10);
    assert_eq!(
        u64::from_be_bytes(export[0..8].try_into().expect("8")),
        EXPORT_BYTES as u64
    );
    let flags = u16::from_be_bytes([export[8], export[9]]);
    assert_eq!(flags, transmission_flags(false, false));
    assert_eq!(infos[&NBD_INFO_NAME], b"t/v");
    assert_eq!(infos[&NBD_INFO_DESCRIPTION], b"test volume");
    let block = &infos[&NBD_INFO_BLOCK_SIZE];
    let field = |i: usize| u32::from_be_bytes(block[i..i + 4].try_into().expect("4"));
    assert_eq!(
        (field(0), field(4), field(8)),
        (1, 4096, NBD_REQUEST_BYTES_MAX)
    );
    assert!(!infos.contains_key(&999));

    // GO after structured replies advertises DF too.
    client.send_option(NBD_OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(client.read_option_reply().await.1, NBD_REP_ACK);
    let (_, flags) = client.must_go("t/v").await;
    assert_eq!(flags, transmission_flags(false, true));
    server.must_stop().await;
}

#[tokio::test]
async fn export_name_enters_transmission_with_or_without_zeroes() {
    let server = TestServer::start(test_provider()).await;
    for (client_flags, reply_bytes) in [
        (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, 10),
        (NBD_FLAG_C_FIXED_NEWSTYLE, 134),
        (0, 134), // non-fixed newstyle, like very old clients
    ] {
        let mut client = RawClient::greeted(server.addr, client_flags).await;
        client.send_option(NBD_OPT_EXPORT_NAME, b"t/v").await;
        let reply = client.must_read(reply_bytes).await;
        assert_eq!(
            u64::from_be_bytes(reply[0..8].try_into().expect("8")),
            EXPORT_BYTES as u64
        );
        let flags = u16::from_be_bytes([reply[8], reply[9]]);
        assert_eq!(flags, transmission_flags(false, false));
        assert!(reply[10..].iter().all(|&b| b == 0));
        client.must_round_trip(1 << 19, b"export name path").await;
        client.send_request(NBD_CMD_DISC, 0, 1, 0, 0, &[]).await;
        client.must_be_closed().await;
    }
    // Unknown export after EXPORT_NAME: the option cannot carry an error.
    let mut client = RawClient::fixed(server.addr).await;
    client.send_option(NBD_OPT_EXPORT_NAME, b"t/missing").await;
    client.must_be_closed().await;
    server.must_stop().await;
}

#[tokio::test]
async fn oversized_option_data_is_a_disconnect() {
    let server = TestServer::start(test_provider()).await;
    let mut client = RawClient::fixed(server.addr).await;
    let mut header = NBD_IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&NBD_OPT_LIST.to_be_bytes());
    header.extend_from_slice(&(NBD_OPTION_BYTES_MAX + 1).to_be_bytes());
    client.must_write(&header).await;
    client.must_be_closed().await;
    server.must_stop().await;
}

#[tokio::test]
async fn handshake_timeout_closes_idle_connections() {
    let config = NbdServerConfig {
        handshake_timeout_ms: 200,
        ..NbdServerConfig::default()
    };
    let server = TestServer::start_with(test_provider(), config).await;
    let mut client = RawClient::fixed(server.addr).await;
    client.must_be_closed().await;
    assert_eq!(server.stats.snapshot().handshakes_failed, 1);
    server.must_stop().await;
}

#[tokio::test]
async fn a_33_mib_read_is_refused_and_the_connection_stays_usable() {
    let server = TestServer::start(test_provider()).await;
    let big = 33 * MIB;

    // Simple replies: EINVAL, no payload.
    let (mut client, _, _) = RawClient::session(server.addr, "t/v", false).await;
    assert_eq!(
        client.must_errno(NBD_CMD_READ, 0, 0, big, &[]).await,
        NBD_EINVAL
    );
    client.must_round_trip(0, b"after big read").await;

    // Structured replies: an EOVERFLOW error chunk.
    let (mut client, _, _) = RawClient::session(server.addr, "t/v", true).await;
    client.send_request(NBD_CMD_READ, 0, 5, 0, big, &[]).await;
    let chunk = client.read_chunk().await;
    assert_eq!(
        (chunk.flags, chunk.reply_type, chunk.cookie),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 5)
    );
    assert_eq!(&chunk.payload[0..4], &NBD_EOVERFLOW.to_be_bytes());
    client.send_request(NBD_CMD_READ, 0, 6, 0, 16, &[]).await;
    let chunk = client.read_chunk().await;
    assert_eq!(
        (chunk.reply_type, chunk.cookie),
        (NBD_REPLY_TYPE_OFFSET_DATA, 6)
    );
    server.must_stop().await;
}

#[tokio::test]
async fn a_33_mib_write_is_discarded_with_einval_and_a_huge_one_disconnects() {
    let server = TestServer::start(test_provider()).await;
    let (mut client, _, _) = RawClient::session(server.addr, "t/v", false).await;
    let big = 33 * MIB;
    let payload = vec![0xee; big as usize];
    assert_eq!(
        client.must_errno(NBD_CMD_WRITE, 0, 0, big, &payload).await,
        NBD_EINVAL
    );
    client
        .must_round_trip(100, b"in sync after the discard")
        .await;
    let data = server.provider.export("t/v").snapshot();
    assert_eq!(
        data[..100],
        (0..100).map(pattern).collect::<Vec<_>>()[..],
        "oversized write landed"
    );

    // Past the discard bound the server will not read the payload: it closes.
    client
        .send_request(NBD_CMD_WRITE, 0, 9, 0, NBD_WRITE_DISCARD_BYTES_MAX + 1, &[])
        .await;
    client.must_be_closed().await;
    assert_eq!(server.stats.snapshot().protocol_violations, 1);
    server.must_stop().await;
}

#[tokio::test]
async fn bounds_permissions_and_bad_requests_get_the_spec_errnos() {
    let server = TestServer::start(test_provider()).await;
    let (mut client, size, _) = RawClient::session(server.addr, "t/v", false).await;
    let end = size - 512;

    assert_eq!(
        client.must_errno(NBD_CMD_READ, 0, end, 1024, &[]).await,
        NBD_EINVAL
    );
    assert_eq!(
        client
            .must_errno(NBD_CMD_WRITE, 0, end, 1024, &[7; 1024])
            .await,
        NBD_ENOSPC
    );
    assert_eq!(
        client.must_errno(NBD_CMD_TRIM, 0, end, 1024, &[]).await,
        NBD_EINVAL
    );
    assert_eq!(
        client
            .must_errno(NBD_CMD_WRITE_ZEROES, 0, end, 1024, &[])
            .await,
        NBD_ENOSPC
    );
    assert_eq!(
        client.must_errno(NBD_CMD_READ, 0, u64::MAX, 1, &[]).await,
        NBD_EINVAL
    );
    // Unknown commands and flags.
    assert_eq!(
        client
            .must_errno(NBD_CMD_BLOCK_STATUS, 0, 0, 512, &[])
            .await,
        NBD_EINVAL
    );
    assert_eq!(
        client.must_errno(NBD_CMD_CACHE, 0, 0, 512, &[]).await,
        NBD_EINVAL
    );
    assert_eq!(client.must_errno(200, 0, 0, 0, &[]).await, NBD_EINVAL);
    assert_eq!(
        client
            .must_errno(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512, &[])
            .await,
        NBD_EINVAL
    );
    assert_eq!(
        client
            .must_errno(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 1, &[1])
            .await,
        NBD_EINVAL
    );
    // Zero-length requests are no-ops that succeed; a zero-length read has no data.
    for command in [
        NBD_CMD_READ,
        NBD_CMD_WRITE,
        NBD_CMD_TRIM,
        NBD_CMD_WRITE_ZEROES,
    ] {
        assert_eq!(
            client.must_errno(command, 0, size, 0, &[]).await,
            0,
            "command {command}"
        );
    }
    // Nothing past the end was written, and the stream is still in sync.
    assert_eq!(
        server.provider.export("t/v").snapshot()[end as usize..],
        (end as usize..EXPORT_BYTES)
            .map(pattern)
            .collect::<Vec<_>>()[..]
    );
    client.must_round_trip(end, &[3; 512]).await;

    // Read-only export: every kind of write is EPERM, reads work.
    let (mut client, _, _) = RawClient::session(server.addr, "t/ro", false).await;
    assert_eq!(
        client.must_errno(NBD_CMD_WRITE, 0, 0, 4, b"nope").await,
        NBD_EPERM
    );
    assert_eq!(
        client.must_errno(NBD_CMD_TRIM, 0, 0, 4096, &[]).await,
        NBD_EPERM
    );
    assert_eq!(
        client
            .must_errno(NBD_CMD_WRITE_ZEROES, 0, 0, 4096, &[])
            .await,
        NBD_EPERM
    );
    assert_eq!(client.must_errno(NBD_CMD_FLUSH, 0, 0, 0, &[]).await, 0);
    client.send_request(NBD_CMD_READ, 0, 1, 0, 4, &[]).await;
    assert_eq!(client.read_simple_reply().await, (0, 1));
    assert_eq!(client.must_read(4).await, [0; 4]);

    let snapshot = server.stats.snapshot();
    assert_eq!(snapshot.errors_for(Errno::Perm), 3);
    assert_eq!(snapshot.errors_for(Errno::NoSpc), 2);
    server.must_stop().await;
}

#[tokio::test]
async fn structured_errors_carry_a_message_and_reads_are_single_chunks() {
    let server = TestServer::start(test_provider()).await;
    let (mut client, size, _) = RawClient::session(server.addr, "t/v", true).await;

    client
        .send_request(NBD_CMD_WRITE, 0, 1, size, 1, &[1])
        .await;
    let chunk = client.read_chunk().await;
    assert_eq!(
        (chunk.flags, chunk.reply_type, chunk.cookie),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 1)
    );
    assert_eq!(&chunk.payload[0..4], &NBD_ENOSPC.to_be_bytes());
    let message_bytes = u16::from_be_bytes([chunk.payload[4], chunk.payload[5]]) as usize;
    assert_eq!(chunk.payload.len(), 6 + message_bytes);
    assert!(String::from_utf8_lossy(&chunk.payload[6..]).contains("past the end"));

    // A successful write is a simple reply even in structured mode.
    client
        .send_request(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 2, 8192, 4, b"abcd")
        .await;
    assert_eq!(client.read_simple_reply().await, (0, 2));

    client
        .send_request(NBD_CMD_READ, NBD_CMD_FLAG_DF, 3, 8190, 8, &[])
        .await;
    let chunk = client.read_chunk().await;
    assert_eq!(
        (chunk.flags, chunk.reply_type, chunk.cookie),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 3)
    );
    assert_eq!(&chunk.payload[0..8], &8190u64.to_be_bytes());
    assert_eq!(
        &chunk.payload[8..],
        &[
            pattern(8190),
            pattern(8191),
            b'a',
            b'b',
            b'c',
            b'd',
            pattern(8196),
            pattern(8197)
        ]
    );

    // A zero-length structured read is a lone NONE chunk.
    client.send_request(NBD_CMD_READ, 0, 4, 0, 0, &[]).await;
    let chunk = client.read_chunk().await;
    assert_eq!(
        (chunk.flags, chunk.reply_type, chunk.cookie),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 4)
    );
    assert!(chunk.payload.is_empty());
    server.must_stop().await;
}

#[tokio::test]
async fn fua_no_hole_trim_and_flush_reach_the_backend() {
    let server = TestServer::start(test_provider()).await;
    let (mut client, _, _) = RawClient::session(server.addr, "t/v", false).await;
    assert_eq!(
        client
            .must_errno(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 0, 4, b"fua!")
            .await,
        0
    );
    assert_eq!(client.must_errno(NBD_CMD_WRITE, 0, 4, 4, b"lazy").await, 0);
    let no_hole = NBD_CMD_FLAG_NO_HOLE;
    assert_eq!(
        client
            .must_errno(NBD_CMD_WRITE_ZEROES, no_hole, 4096, 4096, &[])
            .await,
        0
    );
    assert_eq!(
        client
            .must_errno(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FUA, 8192, 10, &[])
            .await,
        0
    );
    assert_eq!(
        client
            .must_errno(NBD_CMD_TRIM, NBD_CMD_FLAG_FUA, 65536, 4096, &[])
            .await,
        0
    );
    assert_eq!(
        client
            .must_errno(NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0, 0, &[])
            .await,
        0
    );
    let calls = server.provider.export("t/v").calls();
    assert_eq!(
        calls,
        [
            Call::Write {
                offset: 0,
                len: 4,
                fua: true
            },
            Call::Write {
                offset: 4,
                len: 4,
                fua: false
            },
            Call::WriteZeroes {
                offset: 4096,
                len: 4096,
                fua: false
            },
            Call::WriteZeroes {
                offset: 8192,
                len: 10,
                fua: true
            },
            Call::Trim {
                offset: 65536,
                len: 4096,
                fua: true
            },
            Call::Flush,
        ]
    );
    let data = server.provider.export("t/v").snapshot();
    assert_eq!(&data[0..8], b"fua!lazy");
    assert!(data[4096..8202].iter().all(|&b| b == 0));
    server.must_stop().await;
}

#[tokio::test]
async fn backend_failures_become_eio() {
    let provider = MemoryProvider::default()
        .with_export("t/bad", MemoryExport::new(65536).failing_with(Errno::Io));
    let server = TestServer::start(provider).await;
    let (mut client, _, _) = RawClient::session(server.addr, "t/bad", false).await;
    assert_eq!(
        client.must_errno(NBD_CMD_READ, 0, 0, 512, &[]).await,
        NBD_EIO
    );
    assert_eq!(
        client.must_errno(NBD_CMD_WRITE, 0, 0, 2, b"xx").await,
        NBD_EIO
    );
    assert_eq!(
        client.must_errno(NBD_CMD_FLUSH, 0, 0, 0, &[]).await,
        NBD_EIO
    );
    assert_eq!(server.stats.snapshot().errors_for(Errno::Io), 3);
    server.must_stop().await;
}

/// Reads in the first 64 KiB are slow, the rest fast.
fn slow_start(offset: u64) -> Duration {
    if offset < 65536 {
        Duration::from_millis(300)
    } else {
        Duration::ZERO
    }
}

fn slow_provider() -> MemoryProvider {
    MemoryProvider::default().with_export(
        "t/slow",
        MemoryExport::new(EXPORT_BYTES)
            .with_data(pattern)
            .with_read_delay(slow_start),
    )
}

/// Send 48 reads (every third slow) without waiting, then collect replies
/// and check each one's data by cookie.
async fn must_serve_out_of_order(structured: bool) {
    let server = TestServer::start(slow_provider()).await;
    let (mut client, _, _) = RawClient::session(server.addr, "t/slow", structured).await;
    let mut expected = BTreeMap::new();
    for i in 0..48u64 {
        let offset = if i % 3 == 0 {
            i * 1000 % 60_000
        } else {
            65536 + i * 4099
        };
        let length = 512 + (i as u32 * 97) % 8000;
        client
            .send_request(NBD_CMD_READ, 0, 1000 + i, offset, length, &[])
            .await;
        expected.insert(1000 + i, (offset, length));
    }
    let mut order = Vec::new();
    for _ in 0..expected.len() {
        let (cookie, offset, data) = if structured {
            let chunk = client.read_chunk().await;
            assert_eq!(
                (chunk.flags, chunk.reply_type),
                (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA)
            );
            let offset = u64::from_be_bytes(chunk.payload[0..8].try_into().expect("8"));
            (chunk.cookie, offset, chunk.payload[8..].to_vec())
        } else {
            let (errno, cookie) = client.read_simple_reply().await;
            assert_eq!(errno, 0);
            let (offset, length) = expected[&cookie];
            (cookie, offset, client.must_read(length as usize).await)
        };
        let (want_offset, length) = expected[&cookie];
        assert_eq!(offset, want_offset);
        let want: Vec<u8> = (offset as usize..offset as usize + length as usize)
            .map(pattern)
            .collect();
        assert_eq!(data, want, "cookie {cookie}");
        order.push(cookie);
    }
    let mut sorted = order.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        expected.len(),
        "every cookie answered exactly once"
    );
    assert_ne!(order, sorted, "slow reads were overtaken by fast ones");
    // The fast reads all finished before the first slow one.
    assert!(order[..32].iter().all(|cookie| (cookie - 1000) % 3 != 0));
    server.must_stop().await;
}

#[tokio::test]
async fn many_requests_in_flight_complete_out_of_order_simple() {
    must_serve_out_of_order(false).await;
}

#[tokio::test]
async fn many_requests_in_flight_complete_out_of_order_structured() {
    must_serve_out_of_order(true).await;
}

#[tokio::test]
async fn the_in_flight_limit_applies_backpressure_without_losing_requests() {
    let config = NbdServerConfig {
        requests_in_flight_max: 2,
        request_bytes_max: 8192,
        bytes_in_flight_max: 8192,
        ..NbdServerConfig::default()
    };
    let server = TestServer::start_with(slow_provider(), config).await;
    let (mut client, _, _) = RawClient::session(server.addr, "t/slow", false).await;
    for cookie in 0..6u64 {
        client
            .send_request(NBD_CMD_READ, 0, cookie, cookie * 8192, 8192, &[])
            .await;
    }
    let mut seen = Vec::new();
    for _ in 0..6 {
        let (errno, cookie) = client.read_simple_reply().await;
        assert_eq!(errno, 0);
        let data = client.must_read(8192).await;
        let offset = cookie as usize * 8192;
        assert_eq!(
            data,
            (offset..offset + 8192).map(pattern).collect::<Vec<_>>()
        );
        seen.push(cookie);
    }
    seen.sort_unstable();
    assert_eq!(seen, [0, 1, 2, 3, 4, 5]);
    server.must_stop().await;
}

#[tokio::test]
async fn a_client_vanishing_mid_write_does_not_disturb_another_connection() {
    let server = TestServer::start(slow_provider()).await;
    let (mut steady, _, _) = RawClient::session(server.addr, "t/slow", false).await;
    let (mut vanishing, _, _) = RawClient::session(server.addr, "t/slow", false).await;

    // A slow read in flight on the steady connection while the other dies.
    steady.send_request(NBD_CMD_READ, 0, 1, 0, 4096, &[]).await;
    vanishing
        .send_request(NBD_CMD_WRITE, 0, 2, 0, MIB, &[0xcc; 1000])
        .await;
    drop(vanishing);

    assert_eq!(steady.read_simple_reply().await, (0, 1));
    assert_eq!(
        steady.must_read(4096).await,
        (0..4096).map(pattern).collect::<Vec<_>>()
    );
    steady.must_round_trip(200_000, b"unaffected").await;
    let data = server.provider.export("t/slow").snapshot();
    assert_eq!(
        data[..1000],
        (0..1000).map(pattern).collect::<Vec<_>>()[..],
        "partial write landed"
    );

    // Same with a request header cut in half.
    let (mut half, _, _) = RawClient::session(server.addr, "t/slow", false).await;
    half.must_write(
        &RequestHeader {
            flags: 0,
            command: Command::Read,
            cookie: 3,
            offset: 0,
            length: 1,
        }
        .encode()[..11],
    )
    .await;
    drop(half);
    steady.must_round_trip(300_000, b"still unaffected").await;

    // A request with the wrong magic closes only that connection.
    let (mut garbage, _, _) = RawClient::session(server.addr, "t/slow", false).await;
    garbage.must_write(&[0x42; NBD_REQUEST_HEADER_BYTES]).await;
    garbage.must_be_closed().await;
    steady.must_round_trip(400_000, b"and again").await;
    server.must_stop().await;
}

#[tokio::test]
async fn disc_answers_requests_in_flight_then_closes() {
    let server = TestServer::start(slow_provider()).await;
    let (mut client, _, _) = RawClient::session(server.addr, "t/slow", false).await;
    client.send_request(NBD_CMD_READ, 0, 1, 0, 100, &[]).await;
    client
        .send_request(NBD_CMD_WRITE, 0, 2, 70_000, 3, b"xyz")
        .await;
    client
        .send_request(NBD_CMD_READ, 0, 3, 4096, 100, &[])
        .await;
    client.send_request(NBD_CMD_DISC, 0, 4, 0, 0, &[]).await;
    let mut answered = Vec::new();
    for _ in 0..3 {
        let (errno, cookie) = client.read_simple_reply().await;
        assert_eq!(errno, 0);
        if cookie != 2 {
            client.must_read(100).await;
        }
        answered.push(cookie);
    }
    answered.sort_unstable();
    assert_eq!(answered, [1, 2, 3]);
    client.must_be_closed().await;
    assert_eq!(
        &server.provider.export("t/slow").snapshot()[70_000..70_003],
        b"xyz"
    );
    assert_eq!(server.stats.snapshot().requests_disc, 1);
    server.must_stop().await;
}

#[tokio::test]
async fn shutdown_answers_in_flight_requests_then_closes_everything() {
    let server = TestServer::start(slow_provider()).await;
    let (mut client, _, _) = RawClient::session(server.addr, "t/slow", false).await;
    let mut idle = RawClient::fixed(server.addr).await;
    client.send_request(NBD_CMD_READ, 0, 1, 0, 64, &[]).await;
    // Shut down once the server has read the request (on this single-thread
    // runtime the reader spawns the request in the same poll it counts it).
    step("request read", async {
        while server.stats.snapshot().requests_read == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    server.shutdown.cancel();
    assert_eq!(client.read_simple_reply().await, (0, 1));
    assert_eq!(
        client.must_read(64).await,
        (0..64).map(pattern).collect::<Vec<_>>()
    );
    client.must_be_closed().await;
    idle.must_be_closed().await;
    let addr = server.addr;
    let stats = Arc::clone(&server.stats);
    server.must_stop().await;
    assert_eq!(stats.snapshot().connections_active, 0);
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
}

#[tokio::test]
async fn invalid_config_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = NbdServerConfig {
        bytes_in_flight_max: 1,
        ..NbdServerConfig::default()
    };
    let result = serve(
        listener,
        Arc::new(test_provider()),
        config,
        Arc::new(NbdStats::default()),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(
        result.expect_err("invalid").kind(),
        io::ErrorKind::InvalidInput
    );
    assert!(NbdServerConfig::default().validate().is_ok());
    let tiny = NbdServerConfig {
        request_bytes_max: 512,
        ..NbdServerConfig::default()
    };
    assert!(matches!(
        tiny.validate(),
        Err(NbdConfigError::RequestBytes { .. })
    ));
}
