//! The NBD server's I/O shell: accept loop, handshake, transmission.
//!
//! Every protocol decision (layouts, validation, which errno) lives in the
//! pure `protocol` module; this file only moves bytes and tasks around them.
//!
//! ```text
//!            serve(): accept loop ──spawn──► one task per connection
//!                                              │
//!   negotiate()  greeting, options, INFO/GO ◄──┤ (bounded by handshake_timeout_ms)
//!                                              ▼
//!   transmit():                       ┌───────────────────┐
//!     reader (this task) ──header──►  │ permits: requests │  at most
//!       parse, read WRITE payload     │ in flight, bytes  │  requests_in_flight_max
//!       spawn one task per request ─► │ in flight         │  and bytes_in_flight_max
//!                                     └─────────┬─────────┘
//!     request tasks (concurrent) ── backend ──► Reply + permits ─► mpsc
//!                                                                  │
//!     writer task: sole owner of the socket's write half  ◄────────┘
//!       encodes each Reply whole; permits are released once written
//! ```
//!
//! Invariants:
//! - Only the writer task writes to the socket during transmission, and it
//!   writes one `Reply` completely before the next, so replies never
//!   interleave bytes.
//! - Every request that reaches a request task gets exactly one reply
//!   (a panicking backend becomes `EIO`), unless the socket is gone.
//! - Memory per connection is bounded: at most `requests_in_flight_max`
//!   requests and `bytes_in_flight_max` payload bytes (write payloads read
//!   but not yet applied, read data not yet written) exist at once.
//! - A connection ends by closing only itself: protocol violations and I/O
//!   errors are logged and end that connection's tasks, never the server.
//! - On `NBD_CMD_DISC`, shutdown, or client EOF, the reader stops; requests
//!   already read still run and are answered; then the write half is shut
//!   down and the connection closes.
//!
//! TLS (next issue): `negotiate` and `transmit` are generic over the stream
//! halves so a TLS stream can replace the TCP halves; see `reply_starttls`.

use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    BufWriter,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::backend::{Export, ExportProvider};
use super::errno::Errno;
use super::protocol::*;
use super::stats::{ActiveConnection, NbdStats, add};

/// Default for [`NbdServerConfig::requests_in_flight_max`].
pub const NBD_REQUESTS_IN_FLIGHT_MAX_DEFAULT: usize = 64;
/// Default for [`NbdServerConfig::bytes_in_flight_max`]: eight maximum-size
/// requests per connection.
pub const NBD_BYTES_IN_FLIGHT_MAX_DEFAULT: usize = 256 << 20;
/// Default for [`NbdServerConfig::handshake_timeout_ms`]. Real clients finish
/// the handshake in milliseconds; this only reaps idle or stuck sockets.
pub const NBD_HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Largest `request_bytes_max` accepted: a READ reply chunk carries
/// 8 bytes of offset plus the data in a u32 length field.
pub const NBD_REQUEST_BYTES_LIMIT: u32 = u32::MAX - NBD_OFFSET_DATA_PREFIX_BYTES as u32;
/// Socket read and write buffer per connection. Payloads larger than this
/// bypass the buffer (tokio's `BufWriter` writes them directly).
const NBD_SOCKET_BUFFER_BYTES: usize = 128 << 10;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop
/// does not spin.
const NBD_ACCEPT_RETRY_MS: u64 = 100;

/// Server limits; [`Default`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdServerConfig {
    /// Requests one connection may have in flight (read, not yet answered).
    /// The reader stops reading the socket at this limit: TCP backpressure.
    pub requests_in_flight_max: usize,
    /// Largest READ or WRITE payload; advertised as the maximum payload in
    /// `NBD_INFO_BLOCK_SIZE`. Larger READs get `EINVAL` (`EOVERFLOW` with
    /// structured replies), larger WRITEs `EINVAL` after their payload is
    /// discarded, or a disconnect beyond `NBD_WRITE_DISCARD_BYTES_MAX`.
    pub request_bytes_max: u32,
    /// READ/WRITE payload bytes one connection may hold in memory at once
    /// (must be at least `request_bytes_max`).
    pub bytes_in_flight_max: usize,
    /// Time from accept to the end of option haggling.
    pub handshake_timeout_ms: u64,
}

impl Default for NbdServerConfig {
    fn default() -> NbdServerConfig {
        NbdServerConfig {
            requests_in_flight_max: NBD_REQUESTS_IN_FLIGHT_MAX_DEFAULT,
            request_bytes_max: NBD_REQUEST_BYTES_MAX,
            bytes_in_flight_max: NBD_BYTES_IN_FLIGHT_MAX_DEFAULT,
            handshake_timeout_ms: NBD_HANDSHAKE_TIMEOUT_MS_DEFAULT,
        }
    }
}

/// A configuration [`serve`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdConfigError {
    #[error("requests_in_flight_max must be between 1 and {max}, got {got}")]
    RequestsInFlight { got: usize, max: usize },
    #[error("request_bytes_max must be between {min} and {max}, got {got}")]
    RequestBytes { got: u32, min: u32, max: u32 },
    #[error("bytes_in_flight_max must be between request_bytes_max ({min}) and {max}, got {got}")]
    BytesInFlight { got: usize, min: usize, max: usize },
    #[error("handshake_timeout_ms must be positive")]
    HandshakeTimeout,
}

impl NbdServerConfig {
    pub fn validate(&self) -> Result<(), NbdConfigError> {
        let permits_max = Semaphore::MAX_PERMITS;
        if !(1..=permits_max).contains(&self.requests_in_flight_max) {
            return Err(NbdConfigError::RequestsInFlight {
                got: self.requests_in_flight_max,
                max: permits_max,
            });
        }
        // The spec: the maximum payload MUST be at least the preferred block size.
        let (min, max) = (NBD_BLOCK_SIZE_PREFERRED, NBD_REQUEST_BYTES_LIMIT);
        if !(min..=max).contains(&self.request_bytes_max) {
            return Err(NbdConfigError::RequestBytes {
                got: self.request_bytes_max,
                min,
                max,
            });
        }
        // A request needing more byte permits than exist would wait forever.
        let min = self.request_bytes_max as usize;
        if !(min..=permits_max).contains(&self.bytes_in_flight_max) {
            return Err(NbdConfigError::BytesInFlight {
                got: self.bytes_in_flight_max,
                min,
                max: permits_max,
            });
        }
        if self.handshake_timeout_ms == 0 {
            return Err(NbdConfigError::HandshakeTimeout);
        }
        Ok(())
    }
}

/// Where NBD TLS is required (with `NBD_OPT_STARTTLS` and a tenant client
/// certificate); elsewhere plain connections see every export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRequired {
    /// For clients not on a loopback address.
    OffLoopback,
    /// For every client.
    Always,
}

/// The server's TLS, if any: its configuration may appear while the server
/// runs (a node gets its certificate when it initialises or joins).
#[derive(Clone)]
pub struct NbdTls {
    source: Arc<dyn Fn() -> Option<Arc<rustls::ServerConfig>> + Send + Sync>,
    required: TlsRequired,
}

impl NbdTls {
    pub fn new(
        source: impl Fn() -> Option<Arc<rustls::ServerConfig>> + Send + Sync + 'static,
        required: TlsRequired,
    ) -> NbdTls {
        NbdTls {
            source: Arc::new(source),
            required,
        }
    }

    /// No TLS: STARTTLS is refused by policy and nothing requires it.
    pub fn none() -> NbdTls {
        NbdTls {
            source: Arc::new(|| None),
            required: TlsRequired::Always,
        }
    }

    fn config(&self) -> Option<Arc<rustls::ServerConfig>> {
        (self.source)()
    }

    /// Whether `peer` must use TLS (never when the server has none).
    fn required_for(&self, peer: SocketAddr) -> bool {
        self.config().is_some()
            && match self.required {
                TlsRequired::Always => true,
                TlsRequired::OffLoopback => !peer.ip().is_loopback(),
            }
    }
}

/// Who a connection is, for what LIST shows and what may be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Viewer {
    /// A plain connection where TLS is not required: every export.
    Anyone,
    /// A TLS connection with this tenant's certificate: `TENANT/…` only.
    Tenant(String),
}

impl Viewer {
    fn may_see(&self, export: &str) -> bool {
        match self {
            Viewer::Anyone => true,
            Viewer::Tenant(t) => export
                .split_once('/')
                .is_some_and(|(tenant, _)| tenant == t),
        }
    }
}

/// Where a connection is in its TLS life.
struct Haggle {
    /// TLS is required and not yet up: options but STARTTLS and ABORT get
    /// `NBD_REP_ERR_TLS_REQD`.
    tls_required: bool,
    /// TLS may be started (the server has a certificate, not started yet).
    tls_offered: bool,
    viewer: Viewer,
    /// The client's flags from the greeting (kept across STARTTLS).
    client: Option<ClientFlags>,
}

/// Serve NBD on `listener` until `shutdown` is cancelled.
///
/// On shutdown: stop accepting (the listener is dropped), close connections
/// still in the handshake, stop reading new requests, answer every request
/// already read, close, and return once every connection has closed. A
/// client that never reads its replies can delay this until TCP gives up;
/// wrap the call in a timeout if that matters.
///
/// Errors: only an invalid `config` (`InvalidInput`). Failures of single
/// connections, including `accept` errors, are logged, never returned.
pub async fn serve<P: ExportProvider>(
    listener: TcpListener,
    provider: Arc<P>,
    config: NbdServerConfig,
    stats: Arc<NbdStats>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    serve_with_tls(listener, provider, config, NbdTls::none(), stats, shutdown).await
}

/// [`serve`] with TLS: `NBD_OPT_STARTTLS` upgrades a connection, and a
/// client certificate of a tenant limits it to that tenant's exports.
pub async fn serve_with_tls<P: ExportProvider>(
    listener: TcpListener,
    provider: Arc<P>,
    config: NbdServerConfig,
    tls: NbdTls,
    stats: Arc<NbdStats>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    config
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let config = Arc::new(config);
    info!(local = ?listener.local_addr().ok(), "NBD server accepting connections");
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                log_connection_join(done);
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let connection = run_connection(
                        stream,
                        peer,
                        Arc::clone(&provider),
                        Arc::clone(&config),
                        tls.clone(),
                        Arc::clone(&stats),
                        shutdown.clone(),
                    );
                    connections.spawn(connection.instrument(info_span!("nbd", %peer)));
                }
                Err(e) => {
                    warn!(error = %e, "NBD accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(NBD_ACCEPT_RETRY_MS)).await;
                }
            },
        }
    }
    drop(listener);
    info!(
        connections = connections.len(),
        "NBD server stopped accepting; draining connections"
    );
    while let Some(done) = connections.join_next().await {
        log_connection_join(done);
    }
    info!("NBD server stopped");
    Ok(())
}

fn log_connection_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        error!(error = %e, "NBD connection task failed");
    }
}

async fn run_connection<P: ExportProvider>(
    stream: TcpStream,
    peer: SocketAddr,
    provider: Arc<P>,
    config: Arc<NbdServerConfig>,
    tls: NbdTls,
    stats: Arc<NbdStats>,
    shutdown: CancellationToken,
) {
    let _active = ActiveConnection::enter(&stats);
    debug!("NBD connection accepted");
    // Replies are small and latency-bound; Nagle would hold them back.
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(config.handshake_timeout_ms);
    let tls_config = tls.config();
    let tls_required = tls.required_for(peer);
    let (read_half, write_half) = stream.into_split();
    let reader = BufReader::with_capacity(NBD_SOCKET_BUFFER_BYTES, read_half);
    let writer = BufWriter::with_capacity(NBD_SOCKET_BUFFER_BYTES, write_half);
    let haggle = Haggle {
        tls_required,
        tls_offered: tls_config.is_some(),
        viewer: Viewer::Anyone,
        client: None,
    };
    let (reader, writer, client_flags) = match phase(
        reader, writer, true, haggle, peer, &*provider, &config, &stats, &shutdown, deadline,
    )
    .await
    {
        Some(halves) => halves,
        None => return,
    };

    // STARTTLS was acknowledged: the client sends its ClientHello next, so
    // nothing may be buffered (a client that pipelined past STARTTLS is
    // broken and is closed).
    if !reader.buffer().is_empty() {
        info!("NBD client sent data after STARTTLS before the TLS handshake; closing");
        return;
    }
    let Some(tls_config) = tls_config else {
        return;
    };
    let tcp = match reader.into_inner().reunite(writer.into_inner()) {
        Ok(tcp) => tcp,
        Err(e) => {
            error!(error = %e, "NBD: cannot reunite the socket for TLS");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_config);
    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            add(&stats.handshakes_failed, 1);
            info!(error = %e, "NBD TLS handshake failed: no valid tenant certificate of this cluster");
            return;
        }
        Err(_) => {
            add(&stats.handshakes_failed, 1);
            info!("NBD TLS handshake timed out; closing");
            return;
        }
    };
    let tenant = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|c| crate::pki::cert_role(c.as_ref()));
    let Some(crate::pki::CertRole::Tenant(tenant)) = tenant else {
        // The verifier admits tenant certificates only; never reached.
        error!("NBD TLS client without a tenant certificate; closing");
        return;
    };
    debug!(tenant, "NBD TLS established");
    let (read_half, write_half) = tokio::io::split(stream);
    let reader = BufReader::with_capacity(NBD_SOCKET_BUFFER_BYTES, read_half);
    let writer = BufWriter::with_capacity(NBD_SOCKET_BUFFER_BYTES, write_half);
    let haggle = Haggle {
        tls_required: false,
        tls_offered: false,
        viewer: Viewer::Tenant(tenant),
        client: client_flags,
    };
    // After TLS, negotiation starts again from the options (no greeting)
    // with nothing carried over; a second STARTTLS is refused.
    let _ = phase(
        reader, writer, false, haggle, peer, &*provider, &config, &stats, &shutdown, deadline,
    )
    .await;
}

/// Option haggling then, if it reaches it, the transmission phase. Returns
/// the socket halves when the client asked for TLS and was told yes.
#[allow(clippy::too_many_arguments)]
async fn phase<P, R, W>(
    mut reader: BufReader<R>,
    mut writer: BufWriter<W>,
    greet: bool,
    mut haggle: Haggle,
    peer: SocketAddr,
    provider: &P,
    config: &Arc<NbdServerConfig>,
    stats: &Arc<NbdStats>,
    shutdown: &CancellationToken,
    deadline: tokio::time::Instant,
) -> Option<(BufReader<R>, BufWriter<W>, Option<ClientFlags>)>
where
    P: ExportProvider,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let handshake = negotiate(
        &mut reader,
        &mut writer,
        provider,
        config,
        shutdown,
        greet,
        &mut haggle,
    );
    let session = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(Negotiated::Transmission(session))) => session,
        Ok(Ok(Negotiated::StartTls)) => return Some((reader, writer, haggle.client)),
        Ok(Ok(Negotiated::Aborted)) => {
            debug!("client aborted the handshake");
            return None;
        }
        Ok(Err(end)) => {
            add(&stats.handshakes_failed, 1);
            match end {
                HandshakeEnd::ClientClosed | HandshakeEnd::Shutdown | HandshakeEnd::Io(_) => {
                    debug!(reason = %end, "NBD handshake ended");
                }
                _ => info!(reason = %end, "NBD handshake failed; closing"),
            }
            return None;
        }
        Err(_elapsed) => {
            add(&stats.handshakes_failed, 1);
            info!(
                timeout_ms = config.handshake_timeout_ms,
                "NBD handshake timed out; closing"
            );
            return None;
        }
    };

    add(&stats.sessions_started, 1);
    info!(
        export = %session.name,
        structured_replies = session.structured_replies,
        tls = matches!(haggle.viewer, Viewer::Tenant(_)),
        %peer,
        "NBD session started"
    );
    let end = transmit(
        reader,
        writer,
        session,
        Arc::clone(config),
        Arc::clone(stats),
        shutdown,
    )
    .await;
    match end {
        SessionEnd::BadMagic(_) | SessionEnd::PayloadTooLarge { .. } => {
            info!(reason = %end, "NBD session closed by server: protocol violation")
        }
        _ => info!(reason = %end, "NBD session ended"),
    }
    None
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// What the transmission phase needs from the handshake.
struct Session<E> {
    export: E,
    name: String,
    structured_replies: bool,
}

enum Negotiated<E> {
    Transmission(Session<E>),
    /// `NBD_OPT_ABORT`: acknowledged, close quietly.
    Aborted,
    /// `NBD_OPT_STARTTLS` acknowledged: the TLS handshake comes next.
    StartTls,
}

/// Why a connection closed before transmission.
#[derive(Debug, thiserror::Error)]
enum HandshakeEnd {
    #[error("client closed the connection")]
    ClientClosed,
    #[error("socket error: {0}")]
    Io(#[source] io::Error),
    #[error("client sent unknown or unadvertised flags {0:#x}")]
    BadClientFlags(u32),
    #[error("client sent {0:#018x} where IHAVEOPT was expected (not an NBD client?)")]
    BadOptionMagic(u64),
    #[error("option {option} carries {length} bytes, over the {max}-byte limit")]
    OptionTooLong { option: u32, length: u32, max: u32 },
    #[error("NBD_OPT_EXPORT_NAME refused (the option cannot carry an error): {0}")]
    ExportNameRefused(String),
    #[error("server is shutting down")]
    Shutdown,
    #[error("NBD_OPT_EXPORT_NAME without TLS where TLS is required")]
    TlsRequired,
}

impl From<io::Error> for HandshakeEnd {
    fn from(e: io::Error) -> HandshakeEnd {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => HandshakeEnd::ClientClosed,
            _ => HandshakeEnd::Io(e),
        }
    }
}

/// Fixed newstyle negotiation, up to the transmission phase or a close.
///
/// After STARTTLS it runs again with `greet` false: the greeting and the
/// client flags were exchanged in plain text, and the spec has every other
/// state start over.
async fn negotiate<P, R, W>(
    reader: &mut R,
    writer: &mut W,
    provider: &P,
    config: &NbdServerConfig,
    shutdown: &CancellationToken,
    greet: bool,
    haggle: &mut Haggle,
) -> Result<Negotiated<P::Export>, HandshakeEnd>
where
    P: ExportProvider,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let client = match haggle.client {
        Some(flags) if !greet => flags,
        _ => {
            writer.write_all(&encode_greeting()).await?;
            writer.flush().await?;
            let flags = decode_client_flags(reader.read_u32().await?)
                .map_err(HandshakeEnd::BadClientFlags)?;
            haggle.client = Some(flags);
            flags
        }
    };
    let mut structured_replies = false;
    let mut out = BytesMut::new();
    loop {
        let mut raw = [0u8; NBD_OPTION_HEADER_BYTES];
        tokio::select! {
            read = reader.read_exact(&mut raw) => { read?; }
            () = shutdown.cancelled() => return Err(HandshakeEnd::Shutdown),
        }
        let header = decode_option_header(&raw).map_err(HandshakeEnd::BadOptionMagic)?;
        let option = header.option;
        if header.length > NBD_OPTION_BYTES_MAX {
            return Err(HandshakeEnd::OptionTooLong {
                option,
                length: header.length,
                max: NBD_OPTION_BYTES_MAX,
            });
        }
        // Read the data of every option, even one we refuse: the spec says a
        // server MUST NOT fail to parse the next message.
        let mut data = vec![0u8; header.length as usize];
        reader.read_exact(&mut data).await?;
        out.clear();

        // The spec: a server being shut down SHOULD answer every option but
        // ABORT with NBD_REP_ERR_SHUTDOWN.
        if shutdown.is_cancelled() && option != NBD_OPT_ABORT {
            if option == NBD_OPT_EXPORT_NAME {
                return Err(HandshakeEnd::Shutdown);
            }
            reply_error(
                &mut out,
                option,
                NBD_REP_ERR_SHUTDOWN,
                "server is shutting down",
            );
            send(writer, &out).await?;
            continue;
        }

        // Until TLS is up where it is required, only STARTTLS and ABORT
        // are answered; EXPORT_NAME cannot carry an error and closes.
        if haggle.tls_required && !matches!(option, NBD_OPT_STARTTLS | NBD_OPT_ABORT) {
            if option == NBD_OPT_EXPORT_NAME {
                return Err(HandshakeEnd::TlsRequired);
            }
            reply_error(
                &mut out,
                option,
                NBD_REP_ERR_TLS_REQD,
                "this server requires TLS (NBD_OPT_STARTTLS) with a tenant certificate",
            );
            send(writer, &out).await?;
            continue;
        }

        match option {
            NBD_OPT_EXPORT_NAME => {
                let refused =
                    |e: &dyn std::fmt::Display| HandshakeEnd::ExportNameRefused(e.to_string());
                let name = decode_name(&data).map_err(|e| refused(&e))?;
                let export = open_for(provider, &haggle.viewer, &name)
                    .await
                    .map_err(|e| refused(&e))?;
                let flags = transmission_flags(export.read_only(), structured_replies);
                let reply = encode_export_name_reply(export.size_bytes(), flags, client.no_zeroes);
                send(writer, &reply).await?;
                return Ok(Negotiated::Transmission(Session {
                    export,
                    name,
                    structured_replies,
                }));
            }
            NBD_OPT_ABORT => {
                // The spec: ignore any data; reply ACK; the client may already
                // be gone, which is fine.
                encode_option_reply(&mut out, option, NBD_REP_ACK, &[]);
                let _ = send(writer, &out).await;
                return Ok(Negotiated::Aborted);
            }
            NBD_OPT_LIST => {
                if data.is_empty() {
                    for export in provider.list().await {
                        if !haggle.viewer.may_see(&export.name) {
                            continue;
                        }
                        if export.name.len() > NBD_STRING_BYTES_MAX {
                            warn!(bytes = export.name.len(), "export name too long to list");
                            continue;
                        }
                        let description = truncate_utf8(&export.description, NBD_STRING_BYTES_MAX);
                        let entry = encode_rep_server(&export.name, description);
                        encode_option_reply(&mut out, option, NBD_REP_SERVER, &entry);
                    }
                    encode_option_reply(&mut out, option, NBD_REP_ACK, &[]);
                } else {
                    let error = OptionDataError::UnexpectedData { length: data.len() };
                    reply_error(&mut out, option, NBD_REP_ERR_INVALID, &error.to_string());
                }
            }
            NBD_OPT_STARTTLS if data.is_empty() && haggle.tls_offered => {
                encode_option_reply(&mut out, option, NBD_REP_ACK, &[]);
                send(writer, &out).await?;
                return Ok(Negotiated::StartTls);
            }
            NBD_OPT_STARTTLS => reply_starttls(&mut out, &data, haggle.viewer != Viewer::Anyone),
            NBD_OPT_INFO | NBD_OPT_GO => {
                let opened = match decode_info_request(&data) {
                    Err(e) => {
                        reply_error(&mut out, option, NBD_REP_ERR_INVALID, &e.to_string());
                        None
                    }
                    Ok(request) => match open_for(provider, &haggle.viewer, &request.name).await {
                        Err(e) => {
                            debug!(option, error = %e, "export refused");
                            reply_error(&mut out, option, e.reply_type(), &e.to_string());
                            None
                        }
                        Ok(export) => {
                            let flags = transmission_flags(export.read_only(), structured_replies);
                            reply_export_info(&mut out, option, &request, &export, flags, config);
                            Some((request.name, export))
                        }
                    },
                };
                if let (NBD_OPT_GO, Some((name, export))) = (option, opened) {
                    send(writer, &out).await?;
                    return Ok(Negotiated::Transmission(Session {
                        export,
                        name,
                        structured_replies,
                    }));
                }
            }
            NBD_OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    // Repeating it is harmless, so it is acknowledged again
                    // rather than refused (the spec allows either).
                    structured_replies = true;
                    encode_option_reply(&mut out, option, NBD_REP_ACK, &[]);
                } else {
                    let error = OptionDataError::UnexpectedData { length: data.len() };
                    reply_error(&mut out, option, NBD_REP_ERR_INVALID, &error.to_string());
                }
            }
            // META_CONTEXT (block status), EXTENDED_HEADERS and anything
            // unknown: the client falls back.
            _ => {
                debug!(option, "unsupported option");
                let message = format!("option {option} is not supported");
                reply_error(&mut out, option, NBD_REP_ERR_UNSUP, &message);
            }
        }
        send(writer, &out).await?;
    }
}

/// Opens `name` if `viewer` may see it; another tenant's export is "not
/// found", so a certificate reveals nothing about other tenants.
async fn open_for<P: ExportProvider>(
    provider: &P,
    viewer: &Viewer,
    name: &str,
) -> Result<P::Export, super::errno::OpenError> {
    if !viewer.may_see(name) {
        return Err(super::errno::OpenError::NotFound {
            name: name.to_owned(),
        });
    }
    provider.open(name).await
}

/// A refused `NBD_OPT_STARTTLS`: with data, or TLS already up
/// (`NBD_REP_ERR_INVALID`), or a server without TLS (`NBD_REP_ERR_POLICY`:
/// the client then continues in plain text or gives up).
fn reply_starttls(out: &mut BytesMut, data: &[u8], tls_up: bool) {
    if !data.is_empty() {
        let error = OptionDataError::UnexpectedData { length: data.len() };
        reply_error(
            out,
            NBD_OPT_STARTTLS,
            NBD_REP_ERR_INVALID,
            &error.to_string(),
        );
    } else if tls_up {
        reply_error(
            out,
            NBD_OPT_STARTTLS,
            NBD_REP_ERR_INVALID,
            "TLS is already established",
        );
    } else {
        reply_error(
            out,
            NBD_OPT_STARTTLS,
            NBD_REP_ERR_POLICY,
            "TLS is not configured on this server",
        );
    }
}

/// The `NBD_REP_INFO` replies and the final ACK of a successful INFO or GO.
fn reply_export_info<E: Export>(
    out: &mut BytesMut,
    option: u32,
    request: &InfoRequest,
    export: &E,
    flags: u16,
    config: &NbdServerConfig,
) {
    let info = encode_info_export(export.size_bytes(), flags);
    encode_option_reply(out, option, NBD_REP_INFO, &info);
    if request.wants(NBD_INFO_NAME) {
        let info = encode_info_string(NBD_INFO_NAME, &request.name);
        encode_option_reply(out, option, NBD_REP_INFO, &info);
    }
    let description = export.description();
    if request.wants(NBD_INFO_DESCRIPTION) && !description.is_empty() {
        let description = truncate_utf8(&description, NBD_STRING_BYTES_MAX);
        let info = encode_info_string(NBD_INFO_DESCRIPTION, description);
        encode_option_reply(out, option, NBD_REP_INFO, &info);
    }
    // Sent even when not requested (the spec allows unrequested items). With
    // the default config these are the spec's default constraints (minimum
    // 1, preferred 4096, maximum 32 MiB), so a client that ignores the item
    // loses nothing; a smaller configured maximum is still enforced per
    // request with a clean EINVAL / EOVERFLOW.
    let info = encode_info_block_size(
        NBD_BLOCK_SIZE_MIN,
        NBD_BLOCK_SIZE_PREFERRED,
        config.request_bytes_max,
    );
    encode_option_reply(out, option, NBD_REP_INFO, &info);
    encode_option_reply(out, option, NBD_REP_ACK, &[]);
}

fn reply_error(out: &mut BytesMut, option: u32, reply_type: u32, message: &str) {
    let message = truncate_utf8(message, NBD_STRING_BYTES_MAX);
    encode_option_reply(out, option, reply_type, message.as_bytes());
}

async fn send<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// Why the transmission phase ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("client sent NBD_CMD_DISC")]
    Disc,
    #[error("client closed the connection")]
    ClientClosed,
    #[error("client closed the connection in the middle of a request")]
    ClientClosedMidRequest,
    #[error("server is shutting down")]
    Shutdown,
    #[error("sending replies failed")]
    WriterFailed,
    #[error("socket error: {0}")]
    Io(#[source] io::Error),
    #[error("{}", bad_magic_reason(*.0))]
    BadMagic(u32),
    #[error("WRITE of {length} bytes is too large to skip (limit {max}); cannot stay in sync")]
    PayloadTooLarge { length: u32, max: u32 },
}

fn bad_magic_reason(magic: u32) -> String {
    if magic == NBD_EXTENDED_REQUEST_MAGIC {
        "client sent an extended-header request without negotiating it".to_owned()
    } else {
        format!("client sent request magic {magic:#010x}; stream out of sync")
    }
}

impl SessionEnd {
    fn from_io(e: io::Error, mid_request: bool) -> SessionEnd {
        match e.kind() {
            io::ErrorKind::UnexpectedEof if mid_request => SessionEnd::ClientClosedMidRequest,
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                SessionEnd::ClientClosed
            }
            _ => SessionEnd::Io(e),
        }
    }
}

/// Per-request permits. They travel with the reply to the writer and are
/// released when the reply is on the wire, so a slow reader of replies
/// throttles the requests it may send.
struct RequestPermits {
    _request: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// A reply on its way to the writer task.
struct Outgoing {
    reply: Reply,
    _permits: RequestPermits,
}

/// What every request task of a session shares.
struct RequestContext {
    request_bytes_max: u32,
    structured_replies: bool,
    stats: Arc<NbdStats>,
}

async fn transmit<E, R, W>(
    mut reader: R,
    writer: W,
    session: Session<E>,
    config: Arc<NbdServerConfig>,
    stats: Arc<NbdStats>,
    shutdown: &CancellationToken,
) -> SessionEnd
where
    E: Export,
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Cancelled by server shutdown (parent) or by the writer when the socket
    // fails, so the reader stops either way.
    let cancel = shutdown.child_token();
    let (replies, reply_queue) = mpsc::channel(config.requests_in_flight_max);
    let writer_task =
        tokio::spawn(write_replies(writer, reply_queue, cancel.clone()).in_current_span());
    let context = Arc::new(RequestContext {
        request_bytes_max: config.request_bytes_max,
        structured_replies: session.structured_replies,
        stats,
    });
    let end = read_requests(
        &mut reader,
        &session.export,
        &config,
        &context,
        &replies,
        &cancel,
    )
    .await;
    let end = match end {
        SessionEnd::Shutdown if !shutdown.is_cancelled() => SessionEnd::WriterFailed,
        end => end,
    };
    // Requests still running hold their own senders: the writer drains their
    // replies, then shuts the write half down.
    drop(replies);
    match writer_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "writing replies failed"),
        Err(e) => error!(error = %e, "NBD reply writer failed"),
    }
    end
}

/// The reader: parse requests, read WRITE payloads, spawn request tasks.
async fn read_requests<E, R>(
    reader: &mut R,
    export: &E,
    config: &NbdServerConfig,
    context: &Arc<RequestContext>,
    replies: &mpsc::Sender<Outgoing>,
    cancel: &CancellationToken,
) -> SessionEnd
where
    E: Export,
    R: AsyncBufRead + Unpin,
{
    let requests_in_flight = Arc::new(Semaphore::new(config.requests_in_flight_max));
    let bytes_in_flight = Arc::new(Semaphore::new(config.bytes_in_flight_max));
    loop {
        // Take the request permit before reading: at the limit, stop reading
        // the socket and let TCP push back on the client. Shutdown is checked
        // first, so a busy client cannot keep the server from stopping.
        // Every later wait prefers progress: a request whose header has been
        // read is dropped only if it cannot complete.
        let request_permit = tokio::select! {
            biased;
            () = cancel.cancelled() => return SessionEnd::Shutdown,
            permit = Arc::clone(&requests_in_flight).acquire_owned() => {
                permit.expect("request semaphore is never closed")
            }
        };
        let raw = tokio::select! {
            biased;
            read = read_request_header(reader) => match read {
                Ok(Some(raw)) => raw,
                Ok(None) => return SessionEnd::ClientClosed,
                Err(e) => return SessionEnd::from_io(e, true),
            },
            () = cancel.cancelled() => return SessionEnd::Shutdown,
        };
        let header = match decode_request_header(&raw) {
            Ok(header) => header,
            Err(magic) => {
                add(&context.stats.protocol_violations, 1);
                return SessionEnd::BadMagic(magic);
            }
        };
        context.stats.count_request(header.command);
        if header.command == Command::Disc {
            return SessionEnd::Disc;
        }

        let carries_data = matches!(header.command, Command::Read | Command::Write);
        let data_bytes = if carries_data && header.length <= config.request_bytes_max {
            header.length
        } else {
            0
        };
        let bytes_permit = tokio::select! {
            biased;
            permit = Arc::clone(&bytes_in_flight).acquire_many_owned(data_bytes) => {
                permit.expect("byte semaphore is never closed")
            }
            () = cancel.cancelled() => return SessionEnd::Shutdown,
        };

        let payload = match plan_payload(&header, config.request_bytes_max) {
            PayloadPlan::None => None,
            PayloadPlan::Read => {
                let mut payload = BytesMut::zeroed(header.length as usize);
                tokio::select! {
                    biased;
                    read = reader.read_exact(&mut payload[..]) => {
                        if let Err(e) = read {
                            return SessionEnd::from_io(e, true);
                        }
                    }
                    () = cancel.cancelled() => return SessionEnd::Shutdown,
                }
                Some(payload.freeze())
            }
            PayloadPlan::Discard => {
                // Validation answers EINVAL; the bytes only need skipping.
                let length = u64::from(header.length);
                let mut skipped = (&mut *reader).take(length);
                let mut sink = tokio::io::sink();
                tokio::select! {
                    biased;
                    copied = tokio::io::copy(&mut skipped, &mut sink) => match copied {
                        Ok(n) if n == length => {}
                        Ok(_) => return SessionEnd::ClientClosedMidRequest,
                        Err(e) => return SessionEnd::from_io(e, true),
                    },
                    () = cancel.cancelled() => return SessionEnd::Shutdown,
                }
                None
            }
            PayloadPlan::Disconnect => {
                add(&context.stats.protocol_violations, 1);
                return SessionEnd::PayloadTooLarge {
                    length: header.length,
                    max: NBD_WRITE_DISCARD_BYTES_MAX,
                };
            }
        };

        let permits = RequestPermits {
            _request: request_permit,
            _bytes: bytes_permit,
        };
        let task = run_request(
            export.clone(),
            header,
            payload,
            permits,
            Arc::clone(context),
            replies.clone(),
        );
        tokio::spawn(task.in_current_span());
    }
}

/// `Ok(None)` on a clean EOF between requests.
async fn read_request_header<R: AsyncBufRead + Unpin>(
    reader: &mut R,
) -> io::Result<Option<[u8; NBD_REQUEST_HEADER_BYTES]>> {
    if reader.fill_buf().await?.is_empty() {
        return Ok(None);
    }
    let mut raw = [0u8; NBD_REQUEST_HEADER_BYTES];
    reader.read_exact(&mut raw).await?;
    Ok(Some(raw))
}

/// One request: validate, call the backend, queue exactly one reply.
async fn run_request<E: Export>(
    export: E,
    header: RequestHeader,
    payload: Option<Bytes>,
    permits: RequestPermits,
    context: Arc<RequestContext>,
    replies: mpsc::Sender<Outgoing>,
) {
    let executed = AssertUnwindSafe(execute(&export, &header, payload, &context))
        .catch_unwind()
        .await;
    let result = executed.unwrap_or_else(|_panic| {
        error!(
            command = header.command.name(),
            "NBD backend panicked; replying EIO"
        );
        Err((Errno::Io, "internal server error".to_owned()))
    });
    let structured = context.structured_replies;
    let cookie = header.cookie;
    let reply = match result {
        Ok(data) => {
            let stats = &context.stats;
            match header.command {
                Command::Read => add(&stats.bytes_read, u64::from(header.length)),
                Command::Write => add(&stats.bytes_written, u64::from(header.length)),
                _ => {}
            }
            match (data, structured) {
                (Some(data), true) if data.is_empty() => Reply::Done { cookie },
                (Some(data), true) => Reply::OffsetData {
                    cookie,
                    offset: header.offset,
                    data,
                },
                (data, _) => Reply::Simple {
                    cookie,
                    errno: 0,
                    data,
                },
            }
        }
        Err((errno, message)) => {
            context.stats.count_error(errno);
            if structured {
                Reply::Error {
                    cookie,
                    errno,
                    message,
                }
            } else {
                Reply::Simple {
                    cookie,
                    errno: errno.wire(),
                    data: None,
                }
            }
        }
    };
    // Fails only when the writer is gone (socket closed): nobody to tell.
    let _ = replies
        .send(Outgoing {
            reply,
            _permits: permits,
        })
        .await;
}

/// Validate and run one request. `Ok(Some(data))` for a READ.
async fn execute<E: Export>(
    export: &E,
    header: &RequestHeader,
    payload: Option<Bytes>,
    context: &RequestContext,
) -> Result<Option<Bytes>, (Errno, String)> {
    let limits = RequestLimits {
        size_bytes: export.size_bytes(),
        read_only: export.read_only(),
        request_bytes_max: context.request_bytes_max,
        structured_replies: context.structured_replies,
    };
    if let Err((errno, message)) = validate_request(header, &limits) {
        debug!(command = header.command.name(), %errno, %message, "NBD request refused");
        return Err((errno, message));
    }
    let (offset, length, fua) = (header.offset, header.length, header.fua());
    let failed = |errno: Errno| {
        let command = header.command.name();
        warn!(command, offset, length, %errno, "NBD backend operation failed");
        (
            errno,
            format!("{command} of {length} bytes at offset {offset} failed: {errno}"),
        )
    };
    match header.command {
        // Zero-length requests succeed without touching the backend.
        Command::Read if length == 0 => Ok(Some(Bytes::new())),
        Command::Read => {
            let data = export.read(offset, length).await.map_err(failed)?;
            if data.len() != length as usize {
                // Sending it would desynchronise the client's stream.
                error!(
                    offset,
                    length,
                    returned = data.len(),
                    "NBD backend read returned the wrong length"
                );
                return Err((Errno::Io, "backend returned a short read".to_owned()));
            }
            Ok(Some(data))
        }
        Command::Write => {
            // Validation refuses every WRITE whose payload was not read.
            let Some(data) = payload else {
                return Err((Errno::Inval, "write payload was not accepted".to_owned()));
            };
            if length > 0 {
                export.write(offset, data, fua).await.map_err(failed)?;
            }
            Ok(None)
        }
        Command::Flush => export.flush().await.map(|()| None).map_err(failed),
        Command::Trim if length == 0 => Ok(None),
        Command::Trim => export
            .trim(offset, length, fua)
            .await
            .map(|()| None)
            .map_err(failed),
        Command::WriteZeroes if length == 0 => Ok(None),
        Command::WriteZeroes => export
            .write_zeroes(offset, length, fua)
            .await
            .map(|()| None)
            .map_err(failed),
        // DISC never reaches a request task; validation refuses the rest.
        Command::Disc | Command::Other(_) => Err((
            Errno::Inval,
            format!("unsupported command {}", header.command.wire()),
        )),
    }
}

/// The writer task: the only code that writes to the socket once
/// transmission starts. Batches replies that are already queued into one
/// flush.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: mpsc::Receiver<Outgoing>,
    cancel: CancellationToken,
) -> io::Result<()> {
    let result = async {
        let mut head = BytesMut::with_capacity(256);
        while let Some(first) = queue.recv().await {
            let mut next = Some(first);
            while let Some(outgoing) = next {
                head.clear();
                let body = outgoing.reply.encode(&mut head);
                writer.write_all(&head).await?;
                if let Some(body) = body {
                    writer.write_all(&body).await?;
                }
                // Release the request's permits: its bytes are in the socket or
                // the write buffer now.
                drop(outgoing);
                next = queue.try_recv().ok();
            }
            writer.flush().await?;
        }
        writer.shutdown().await
    }
    .await;
    if result.is_err() {
        cancel.cancel();
    }
    result
}

#[cfg(test)]
#[path = "server_test.rs"]
pub(super) mod tests;
