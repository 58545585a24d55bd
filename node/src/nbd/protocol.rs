//! NBD wire format: constants, byte layouts, and the pure decisions about
//! each message (parse, validate, encode). No I/O and no async here, so every
//! rule can be unit-tested byte for byte.
//!
//! The authority is the NBD protocol specification, `doc/proto.md` in
//! `NetworkBlockDevice/nbd` (fixed newstyle negotiation, the INFO extension
//! and structured replies are all in mainline). All integers on the wire are
//! big-endian. The layouts are fixed by that spec and have no version byte:
//! changing any of them breaks every NBD client (the kernel, qemu, libnbd).
//! New capabilities are negotiated with options, never by changing a layout.
//!
//! What this server speaks (see `mod.rs` for the full list): fixed newstyle
//! handshake, `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`,
//! `STRUCTURED_REPLY` (and a refused `STARTTLS`); compact (not extended)
//! request headers; simple and structured replies.
//!
//! Must not know: sockets, tasks, backends.

use bytes::{BufMut, Bytes, BytesMut};

use super::errno::Errno;

// ---------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, sent by the server once and by the client
/// before every option.
pub const NBD_IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended-header request; never negotiated here, recognised
/// only to log a precise reason when a client sends one anyway.
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------
// Handshake flags (server, 16 bits) and client flags (32 bits)
// ---------------------------------------------------------------------------

pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// The handshake flags this server always sends.
pub const NBD_HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------
// Transmission flags (16 bits)
// ---------------------------------------------------------------------------

pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------
// Options (client → server during the handshake)
// ---------------------------------------------------------------------------

pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------
// Option reply types
// ---------------------------------------------------------------------------

pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks every option error reply.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

// ---------------------------------------------------------------------------
// NBD_REP_INFO information types
// ---------------------------------------------------------------------------

pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Commands, command flags, structured reply flags and types
// ---------------------------------------------------------------------------

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
pub const NBD_CMD_RESIZE: u16 = 8;

pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks every error chunk type.
pub const NBD_REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 2;

// ---------------------------------------------------------------------------
// Error values (see `errno.rs` for the typed mapping)
// ---------------------------------------------------------------------------

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------
// Named limits
// ---------------------------------------------------------------------------

/// Default largest READ or WRITE payload, advertised as the maximum payload
/// size in `NBD_INFO_BLOCK_SIZE`. 32 MiB is the spec's interoperable default:
/// "any payload not exceeding 2^25 bytes SHOULD NOT be considered a denial of
/// service attack", and clients without size negotiation limit themselves to it.
pub const NBD_REQUEST_BYTES_MAX: u32 = 32 << 20;
/// Largest option data the server reads during the handshake. Real options
/// are a few hundred bytes (an export name is at most 4 KiB); anything longer
/// is treated as a denial-of-service attempt and disconnected, which the spec
/// allows ("if a server believes a client's behaviour constitutes a denial of
/// service, it MAY initiate a hard disconnect").
pub const NBD_OPTION_BYTES_MAX: u32 = 64 << 10;
/// Longest string (export name, error message) the spec allows.
pub const NBD_STRING_BYTES_MAX: usize = 4096;
/// An oversized WRITE (length over the maximum payload) up to this many bytes
/// is read and thrown away so the connection stays in sync and the client
/// gets `EINVAL`; beyond it the server disconnects instead of reading
/// an attacker-chosen amount (up to 4 GiB) of data.
pub const NBD_WRITE_DISCARD_BYTES_MAX: u32 = 64 << 20;
/// Advertised minimum block size: any byte offset works (read-modify-write
/// happens in the backend).
pub const NBD_BLOCK_SIZE_MIN: u32 = 1;
/// Advertised preferred block size: the volume block size.
pub const NBD_BLOCK_SIZE_PREFERRED: u32 = 4096;

// ---------------------------------------------------------------------------
// Handshake: greeting and client flags
// ---------------------------------------------------------------------------

/// Server greeting.
///
/// ```text
///  0               8               16    18
/// +---------------+---------------+-----+
/// | NBDMAGIC  u64 | IHAVEOPT  u64 |flags|  flags: u16 handshake flags
/// +---------------+---------------+-----+
/// ```
pub const NBD_GREETING_BYTES: usize = 18;
const _: () = assert!(NBD_GREETING_BYTES == 8 + 8 + 2);

/// Client flags sent in reply to the greeting: one big-endian u32.
pub const NBD_CLIENT_FLAGS_BYTES: usize = 4;

pub fn encode_greeting() -> [u8; NBD_GREETING_BYTES] {
    let mut out = [0u8; NBD_GREETING_BYTES];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&NBD_IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&NBD_HANDSHAKE_FLAGS.to_be_bytes());
    out
}

/// What the client announced in its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle. Clients that do not say so are
    /// served the same way (the spec allows it); only TLS depends on it.
    pub fixed_newstyle: bool,
    /// Omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// The server MUST drop the connection on a flag it does not know or did
/// not advertise; `Err` carries the raw value for the log.
pub fn decode_client_flags(raw: u32) -> Result<ClientFlags, u32> {
    let known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    if raw & !known != 0 {
        return Err(raw);
    }
    Ok(ClientFlags {
        fixed_newstyle: raw & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: raw & NBD_FLAG_C_NO_ZEROES != 0,
    })
}

// ---------------------------------------------------------------------------
// Handshake: options
// ---------------------------------------------------------------------------

/// Option request header; `length` bytes of option data follow.
///
/// ```text
///  0               8       12      16
/// +---------------+-------+-------+----------------+
/// | IHAVEOPT  u64 |option |length | data (length)  |
/// |               |  u32  |  u32  |                |
/// +---------------+-------+-------+----------------+
/// ```
pub const NBD_OPTION_HEADER_BYTES: usize = 16;
const _: () = assert!(NBD_OPTION_HEADER_BYTES == 8 + 4 + 4);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

/// `Err` carries the magic the client sent instead of `IHAVEOPT`: garbage,
/// or a protocol we do not speak. Nothing after it can be trusted.
pub fn decode_option_header(buf: &[u8; NBD_OPTION_HEADER_BYTES]) -> Result<OptionHeader, u64> {
    let magic = u64::from_be_bytes(array(&buf[0..8]));
    if magic != NBD_IHAVEOPT {
        return Err(magic);
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes(array(&buf[8..12])),
        length: u32::from_be_bytes(array(&buf[12..16])),
    })
}

/// Option reply (fixed newstyle); `length` bytes of reply data follow.
///
/// ```text
///  0               8       12      16      20
/// +---------------+-------+-------+-------+----------------+
/// | REP_MAGIC u64 |option | type  |length | data (length)  |
/// |               |  u32  |  u32  |  u32  |                |
/// +---------------+-------+-------+-------+----------------+
/// ```
pub const NBD_OPTION_REPLY_HEADER_BYTES: usize = 20;
const _: () = assert!(NBD_OPTION_REPLY_HEADER_BYTES == 8 + 4 + 4 + 4);

/// Append one option reply to `out`.
pub fn encode_option_reply(out: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    let length =
        u32::try_from(data.len()).expect("option reply data is built by us, far below 4 GiB");
    out.reserve(NBD_OPTION_REPLY_HEADER_BYTES + data.len());
    out.put_u64(NBD_REP_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(length);
    out.put_slice(data);
}

/// `NBD_REP_SERVER` data, one per export in answer to `NBD_OPT_LIST`.
///
/// ```text
///  0       4              4+n
/// +-------+--------------+---------------------------+
/// | n u32 | name (n)     | description (rest, text)  |
/// +-------+--------------+---------------------------+
/// ```
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
    out
}

/// `NBD_INFO_EXPORT`, the mandatory part of a successful INFO/GO.
///
/// ```text
///  0     2               10    12
/// +-----+---------------+-----+
/// |type | size u64      |flags|  type = NBD_INFO_EXPORT (0)
/// | u16 |               | u16 |  flags: transmission flags
/// +-----+---------------+-----+
/// ```
pub const NBD_INFO_EXPORT_BYTES: usize = 12;
const _: () = assert!(NBD_INFO_EXPORT_BYTES == 2 + 8 + 2);

pub fn encode_info_export(size_bytes: u64, transmission_flags: u16) -> [u8; NBD_INFO_EXPORT_BYTES] {
    let mut out = [0u8; NBD_INFO_EXPORT_BYTES];
    out[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size_bytes.to_be_bytes());
    out[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION`: a type and a string.
///
/// ```text
///  0     2
/// +-----+---------------------+
/// |type | string (length - 2) |
/// | u16 |                     |
/// +-----+---------------------+
/// ```
pub fn encode_info_string(info_type: u16, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + text.len());
    out.extend_from_slice(&info_type.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// `NBD_INFO_BLOCK_SIZE`: the size constraints.
///
/// ```text
///  0     2       6       10      14
/// +-----+-------+-------+-------+
/// |type |  min  | pref  |  max  |  type = NBD_INFO_BLOCK_SIZE (3)
/// | u16 |  u32  |  u32  |  u32  |  max = maximum payload
/// +-----+-------+-------+-------+
/// ```
pub const NBD_INFO_BLOCK_SIZE_BYTES: usize = 14;
const _: () = assert!(NBD_INFO_BLOCK_SIZE_BYTES == 2 + 4 + 4 + 4);

pub fn encode_info_block_size(
    minimum: u32,
    preferred: u32,
    maximum: u32,
) -> [u8; NBD_INFO_BLOCK_SIZE_BYTES] {
    let mut out = [0u8; NBD_INFO_BLOCK_SIZE_BYTES];
    out[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&minimum.to_be_bytes());
    out[6..10].copy_from_slice(&preferred.to_be_bytes());
    out[10..14].copy_from_slice(&maximum.to_be_bytes());
    out
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
///
/// ```text
///  0       4            4+n     6+n
/// +-------+------------+-------+-----------------+
/// | n u32 | name (n)   | k u16 | k × u16 info    |
/// +-------+------------+-------+-----------------+
///   total length = 4 + n + 2 + 2k, exactly
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// Requested `NBD_INFO_*` types, unknown ones included (they are ignored).
    pub info_types: Vec<u16>,
}

impl InfoRequest {
    pub fn wants(&self, info_type: u16) -> bool {
        self.info_types.contains(&info_type)
    }
}

/// Why option data was rejected with `NBD_REP_ERR_INVALID`; the text goes to
/// the client as the error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionDataError {
    #[error("option data of {length} bytes is too short")]
    TooShort { length: usize },
    #[error("name length {name_bytes} does not fit in option data of {length} bytes")]
    NameOverrun { name_bytes: usize, length: usize },
    #[error("{info_count} information requests need {needed} bytes, option has {present}")]
    InfoCountMismatch {
        info_count: usize,
        needed: usize,
        present: usize,
    },
    #[error("name of {name_bytes} bytes is longer than the {max} allowed")]
    NameTooLong { name_bytes: usize, max: usize },
    #[error("name is not UTF-8 or contains NUL")]
    NameNotText,
    #[error("option takes no data, got {length} bytes")]
    UnexpectedData { length: usize },
}

pub fn decode_info_request(data: &[u8]) -> Result<InfoRequest, OptionDataError> {
    let length = data.len();
    if length < 6 {
        return Err(OptionDataError::TooShort { length });
    }
    let name_bytes = u32::from_be_bytes(array(&data[0..4])) as usize;
    if name_bytes > length - 6 {
        return Err(OptionDataError::NameOverrun { name_bytes, length });
    }
    let name = decode_name(&data[4..4 + name_bytes])?;
    let rest = &data[4 + name_bytes..];
    let info_count = usize::from(u16::from_be_bytes(array(&rest[0..2])));
    let needed = 2 * info_count;
    let present = rest.len() - 2;
    if needed != present {
        return Err(OptionDataError::InfoCountMismatch {
            info_count,
            needed,
            present,
        });
    }
    let info_types = rest[2..]
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes(array(pair)))
        .collect();
    Ok(InfoRequest { name, info_types })
}

/// An export name as the spec defines strings: UTF-8, no NUL, at most
/// [`NBD_STRING_BYTES_MAX`] bytes.
pub fn decode_name(raw: &[u8]) -> Result<String, OptionDataError> {
    if raw.len() > NBD_STRING_BYTES_MAX {
        return Err(OptionDataError::NameTooLong {
            name_bytes: raw.len(),
            max: NBD_STRING_BYTES_MAX,
        });
    }
    match std::str::from_utf8(raw) {
        Ok(name) if !name.contains('\0') => Ok(name.to_owned()),
        _ => Err(OptionDataError::NameNotText),
    }
}

/// Reply to `NBD_OPT_EXPORT_NAME` (no option reply header: this option
/// predates them).
///
/// ```text
///  0               8     10                  134
/// +---------------+-----+--------------------+
/// | size u64      |flags| 124 zero bytes     |  zeroes omitted when the
/// |               | u16 | (reserved)         |  client set NO_ZEROES
/// +---------------+-----+--------------------+
/// ```
pub const NBD_EXPORT_NAME_REPLY_BYTES: usize = 10;
pub const NBD_EXPORT_NAME_ZEROES_BYTES: usize = 124;
const _: () = assert!(NBD_EXPORT_NAME_REPLY_BYTES + NBD_EXPORT_NAME_ZEROES_BYTES == 134);

pub fn encode_export_name_reply(
    size_bytes: u64,
    transmission_flags: u16,
    no_zeroes: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(NBD_EXPORT_NAME_REPLY_BYTES + NBD_EXPORT_NAME_ZEROES_BYTES);
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.resize(
            NBD_EXPORT_NAME_REPLY_BYTES + NBD_EXPORT_NAME_ZEROES_BYTES,
            0,
        );
    }
    out
}

/// Transmission flags for an export.
///
/// Every connection to an export sees the same backend with no per-connection
/// cache, so `CAN_MULTI_CONN` holds (the backend's `flush` contract says so).
/// `SEND_DF` is only legal with structured replies; this server always sends
/// a READ as a single data chunk, so "don't fragment" costs nothing.
pub fn transmission_flags(read_only: bool, structured_replies: bool) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_CAN_MULTI_CONN;
    if read_only {
        flags |= NBD_FLAG_READ_ONLY;
    }
    if structured_replies {
        flags |= NBD_FLAG_SEND_DF;
    }
    flags
}

// ---------------------------------------------------------------------------
// Transmission: requests
// ---------------------------------------------------------------------------

/// Compact request header; a WRITE is followed by `length` bytes of data.
///
/// ```text
///  0       4     6     8               16              24      28
/// +-------+-----+-----+---------------+---------------+-------+
/// | magic |flags|type | cookie u64    | offset u64    |length |
/// |  u32  | u16 | u16 | (opaque)      |               |  u32  |
/// +-------+-----+-----+---------------+---------------+-------+
/// ```
pub const NBD_REQUEST_HEADER_BYTES: usize = 28;
const _: () = assert!(NBD_REQUEST_HEADER_BYTES == 4 + 2 + 2 + 8 + 8 + 4);

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
    /// Anything else (CACHE, BLOCK_STATUS, RESIZE, unassigned): answered
    /// with `EINVAL`. Without extended headers only WRITE carries a payload,
    /// so an unknown command never leaves unread bytes behind.
    Other(u16),
}

impl Command {
    pub fn from_wire(value: u16) -> Command {
        match value {
            NBD_CMD_READ => Command::Read,
            NBD_CMD_WRITE => Command::Write,
            NBD_CMD_DISC => Command::Disc,
            NBD_CMD_FLUSH => Command::Flush,
            NBD_CMD_TRIM => Command::Trim,
            NBD_CMD_WRITE_ZEROES => Command::WriteZeroes,
            other => Command::Other(other),
        }
    }

    pub fn wire(self) -> u16 {
        match self {
            Command::Read => NBD_CMD_READ,
            Command::Write => NBD_CMD_WRITE,
            Command::Disc => NBD_CMD_DISC,
            Command::Flush => NBD_CMD_FLUSH,
            Command::Trim => NBD_CMD_TRIM,
            Command::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Command::Other(value) => value,
        }
    }

    /// Short lower-case name for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disc => "disc",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::WriteZeroes => "write_zeroes",
            Command::Other(_) => "other",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: Command,
    /// Opaque to the server; echoed in every reply to this request.
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub fn fua(&self) -> bool {
        self.flags & NBD_CMD_FLAG_FUA != 0
    }

    pub fn encode(&self) -> [u8; NBD_REQUEST_HEADER_BYTES] {
        let mut out = [0u8; NBD_REQUEST_HEADER_BYTES];
        out[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.wire().to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// `Err` carries the magic the client sent instead of `NBD_REQUEST_MAGIC`;
/// the stream cannot be resynchronised after that.
pub fn decode_request_header(buf: &[u8; NBD_REQUEST_HEADER_BYTES]) -> Result<RequestHeader, u32> {
    let magic = u32::from_be_bytes(array(&buf[0..4]));
    if magic != NBD_REQUEST_MAGIC {
        return Err(magic);
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes(array(&buf[4..6])),
        command: Command::from_wire(u16::from_be_bytes(array(&buf[6..8]))),
        cookie: u64::from_be_bytes(array(&buf[8..16])),
        offset: u64::from_be_bytes(array(&buf[16..24])),
        length: u32::from_be_bytes(array(&buf[24..28])),
    })
}

/// How the reader treats the bytes after a request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadPlan {
    /// No payload follows (every command but WRITE).
    None,
    /// Read `length` bytes into memory for the backend.
    Read,
    /// Oversized but bounded: read and drop the bytes, then answer with an
    /// error, keeping the stream in sync.
    Discard,
    /// Too large to skip safely: disconnect.
    Disconnect,
}

/// Decide what to do with a request's payload. Pure, so the limits are tested
/// without sockets.
pub fn plan_payload(header: &RequestHeader, request_bytes_max: u32) -> PayloadPlan {
    if header.command != Command::Write {
        return PayloadPlan::None;
    }
    if header.length <= request_bytes_max {
        PayloadPlan::Read
    } else if header.length <= NBD_WRITE_DISCARD_BYTES_MAX {
        PayloadPlan::Discard
    } else {
        PayloadPlan::Disconnect
    }
}

/// What a request is checked against. `size_bytes` and `read_only` are read
/// from the export for every request, so a volume that turns read-only (or
/// grows) mid-session is honoured immediately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub size_bytes: u64,
    pub read_only: bool,
    pub request_bytes_max: u32,
    pub structured_replies: bool,
}

/// Validate a request before it reaches the backend. Returns the errno and a
/// message for a human (sent in structured error chunks).
///
/// Follows "Error values" and "Size constraints" in the spec:
/// - unknown command, or a flag not documented for the command → `EINVAL`;
/// - WRITE / TRIM / WRITE_ZEROES on a read-only export → `EPERM`;
/// - READ longer than the maximum payload → `EOVERFLOW` with structured
///   replies (explicitly allowed for reads), `EINVAL` with simple replies
///   (where `EOVERFLOW` is discouraged); WRITE longer → `EINVAL`;
/// - past the end: READ and TRIM → `EINVAL`, WRITE and WRITE_ZEROES → `ENOSPC`.
///
/// TRIM and WRITE_ZEROES carry no payload, so their length is not capped by
/// the maximum payload ("the server SHOULD NOT disconnect" and the backend
/// handles them without a buffer). Zero-length requests are valid no-ops.
/// FLUSH ignores its reserved offset and length fields.
pub fn validate_request(
    header: &RequestHeader,
    limits: &RequestLimits,
) -> Result<(), (Errno, String)> {
    let allowed_flags = match header.command {
        Command::Read if limits.structured_replies => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
        Command::Read | Command::Write | Command::Flush | Command::Trim | Command::Disc => {
            NBD_CMD_FLAG_FUA
        }
        Command::WriteZeroes => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
        Command::Other(value) => {
            return Err((Errno::Inval, format!("unsupported command {value}")));
        }
    };
    let unexpected = header.flags & !allowed_flags;
    if unexpected != 0 {
        return Err((
            Errno::Inval,
            format!(
                "flags {unexpected:#06x} are not valid for {}",
                header.command.name()
            ),
        ));
    }
    let writes = matches!(
        header.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && limits.read_only {
        return Err((Errno::Perm, "export is read-only".to_owned()));
    }
    if header.length > limits.request_bytes_max {
        let max = limits.request_bytes_max;
        match header.command {
            Command::Read if limits.structured_replies => {
                return Err((Errno::Overflow, format!("read longer than {max} bytes")));
            }
            Command::Read | Command::Write => {
                let name = header.command.name();
                return Err((Errno::Inval, format!("{name} longer than {max} bytes")));
            }
            _ => {}
        }
    }
    let in_bounds = header
        .offset
        .checked_add(u64::from(header.length))
        .is_some_and(|end| end <= limits.size_bytes);
    if !in_bounds && header.command != Command::Flush {
        let errno = match header.command {
            Command::Write | Command::WriteZeroes => Errno::NoSpc,
            _ => Errno::Inval,
        };
        let message = format!(
            "{} of {} bytes at offset {} is past the end of the {}-byte export",
            header.command.name(),
            header.length,
            header.offset,
            limits.size_bytes
        );
        return Err((errno, message));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Transmission: replies
// ---------------------------------------------------------------------------

/// Simple reply; a successful READ is followed by `length` bytes of data.
///
/// ```text
///  0       4       8               16
/// +-------+-------+---------------+-------------------------+
/// | magic | error | cookie u64    | data (READ, error == 0) |
/// |  u32  |  u32  |               |                         |
/// +-------+-------+---------------+-------------------------+
/// ```
pub const NBD_SIMPLE_REPLY_HEADER_BYTES: usize = 16;
const _: () = assert!(NBD_SIMPLE_REPLY_HEADER_BYTES == 4 + 4 + 8);

/// Structured reply chunk header; `length` bytes of payload follow.
///
/// ```text
///  0       4     6     8               16      20
/// +-------+-----+-----+---------------+-------+-----------------+
/// | magic |flags|type | cookie u64    |length | payload(length) |
/// |  u32  | u16 | u16 |               |  u32  |                 |
/// +-------+-----+-----+---------------+-------+-----------------+
///
/// NBD_REPLY_TYPE_OFFSET_DATA payload:   NBD_REPLY_TYPE_ERROR payload:
/// +---------------+-----------+         +-------+-----+-----------+
/// | offset u64    | data      |         | error |mlen | message   |
/// +---------------+-----------+         |  u32  | u16 | (mlen)    |
///                                       +-------+-----+-----------+
/// ```
pub const NBD_STRUCTURED_REPLY_HEADER_BYTES: usize = 20;
const _: () = assert!(NBD_STRUCTURED_REPLY_HEADER_BYTES == 4 + 2 + 2 + 8 + 4);
pub const NBD_OFFSET_DATA_PREFIX_BYTES: usize = 8;
pub const NBD_ERROR_CHUNK_PREFIX_BYTES: usize = 6;

/// One complete reply to one request. The single writer task encodes each
/// `Reply` in one piece, so replies never interleave on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply: `errno` 0 for success; `data` only for a successful
    /// READ without structured replies.
    Simple {
        cookie: u64,
        errno: u32,
        data: Option<Bytes>,
    },
    /// A structured READ answered in one `NBD_REPLY_TYPE_OFFSET_DATA` chunk
    /// flagged DONE (at least one byte of data).
    OffsetData {
        cookie: u64,
        offset: u64,
        data: Bytes,
    },
    /// A structured `NBD_REPLY_TYPE_NONE` chunk flagged DONE: success with no
    /// data (a zero-length structured READ).
    Done { cookie: u64 },
    /// A structured `NBD_REPLY_TYPE_ERROR` chunk flagged DONE.
    Error {
        cookie: u64,
        errno: Errno,
        message: String,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. }
            | Reply::OffsetData { cookie, .. }
            | Reply::Done { cookie }
            | Reply::Error { cookie, .. } => *cookie,
        }
    }

    /// Encode the reply as a header (appended to `head`) and an optional body
    /// that follows it verbatim. The body is returned separately so a 32 MiB
    /// read is written straight from the backend's buffer, never copied.
    pub fn encode(&self, head: &mut BytesMut) -> Option<Bytes> {
        match self {
            Reply::Simple {
                cookie,
                errno,
                data,
            } => {
                head.reserve(NBD_SIMPLE_REPLY_HEADER_BYTES);
                head.put_u32(NBD_SIMPLE_REPLY_MAGIC);
                head.put_u32(*errno);
                head.put_u64(*cookie);
                data.clone()
            }
            Reply::OffsetData {
                cookie,
                offset,
                data,
            } => {
                let length = len_u32(NBD_OFFSET_DATA_PREFIX_BYTES + data.len());
                put_structured_header(head, NBD_REPLY_TYPE_OFFSET_DATA, *cookie, length);
                head.put_u64(*offset);
                Some(data.clone())
            }
            Reply::Done { cookie } => {
                put_structured_header(head, NBD_REPLY_TYPE_NONE, *cookie, 0);
                None
            }
            Reply::Error {
                cookie,
                errno,
                message,
            } => {
                let message = truncate_utf8(message, NBD_STRING_BYTES_MAX);
                let length = len_u32(NBD_ERROR_CHUNK_PREFIX_BYTES + message.len());
                put_structured_header(head, NBD_REPLY_TYPE_ERROR, *cookie, length);
                head.put_u32(errno.wire());
                head.put_u16(u16::try_from(message.len()).expect("truncated to 4096 bytes"));
                head.put_slice(message.as_bytes());
                None
            }
        }
    }
}

fn put_structured_header(head: &mut BytesMut, reply_type: u16, cookie: u64, length: u32) {
    head.reserve(NBD_STRUCTURED_REPLY_HEADER_BYTES + NBD_OFFSET_DATA_PREFIX_BYTES);
    head.put_u32(NBD_STRUCTURED_REPLY_MAGIC);
    // Every reply is a single chunk, so every chunk is the last one.
    head.put_u16(NBD_REPLY_FLAG_DONE);
    head.put_u16(reply_type);
    head.put_u64(cookie);
    head.put_u32(length);
}

/// The longest prefix of `text` that fits in `max` bytes without splitting a
/// character.
pub fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn len_u32(len: usize) -> u32 {
    // Lengths we encode are bounded by NBD_REQUEST_BYTES_MAX-sized buffers and
    // 4 KiB strings; exceeding u32 would be a bug in this module.
    u32::try_from(len).expect("encoded length fits in u32")
}

/// Copy a slice of known length into an array. Callers index with constant
/// ranges, so the length always matches.
fn array<const N: usize>(slice: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(slice);
    out
}

#[cfg(test)]
#[path = "protocol_test.rs"]
mod tests;
