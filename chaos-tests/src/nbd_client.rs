//! A small NBD client for tests and load generators: fixed newstyle
//! handshake with `NBD_OPT_GO`, simple replies, many requests in flight on
//! one connection with replies matched by handle.
//!
//! It is deliberately independent of the server's code (it is written from
//! the protocol, not from `node::nbd`), so that tests compare two readings
//! of the spec as well as behaviour.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::oneshot;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const FLAG_FIXED_NEWSTYLE: u32 = 1;
const FLAG_NO_ZEROES: u32 = 2;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1;

/// An NBD error reply: the errno value the server sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdErrno(pub u32);

impl NbdErrno {
    pub const EPERM: NbdErrno = NbdErrno(1);
    pub const EIO: NbdErrno = NbdErrno(5);
    pub const EINVAL: NbdErrno = NbdErrno(22);
    pub const ENOSPC: NbdErrno = NbdErrno(28);
    pub const ESHUTDOWN: NbdErrno = NbdErrno(108);
}

impl std::fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            1 => "EPERM",
            5 => "EIO",
            12 => "ENOMEM",
            22 => "EINVAL",
            28 => "ENOSPC",
            75 => "EOVERFLOW",
            95 => "ENOTSUP",
            108 => "ESHUTDOWN",
            _ => "unknown",
        };
        write!(f, "NBD error {} ({name})", self.0)
    }
}

impl std::error::Error for NbdErrno {}

type Pending = Arc<Mutex<HashMap<u64, (u32, oneshot::Sender<Result<Vec<u8>, NbdErrno>>)>>>;

pub struct NbdClient {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_handle: AtomicU64,
    size_bytes: u64,
    reader: tokio::task::JoinHandle<()>,
}

impl NbdClient {
    /// Connects and opens `export` with `NBD_OPT_GO`.
    pub async fn connect(addr: std::net::SocketAddr, export: &str) -> Result<NbdClient> {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        if s.read_u64().await? != NBDMAGIC || s.read_u64().await? != IHAVEOPT {
            bail!("not a newstyle NBD server");
        }
        let _server_flags = s.read_u16().await?;
        s.write_u32(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).await?;
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        s.write_u64(IHAVEOPT).await?;
        s.write_u32(OPT_GO).await?;
        s.write_u32(data.len() as u32).await?;
        s.write_all(&data).await?;
        let mut size_bytes = None;
        loop {
            if s.read_u64().await? != OPT_REPLY_MAGIC {
                bail!("bad option reply magic");
            }
            let _opt = s.read_u32().await?;
            let kind = s.read_u32().await?;
            let len = s.read_u32().await? as usize;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).await?;
            match kind {
                REP_ACK => break,
                REP_INFO
                    if body.len() >= 12
                        && u16::from_be_bytes([body[0], body[1]]) == INFO_EXPORT =>
                {
                    size_bytes = Some(u64::from_be_bytes(body[2..10].try_into()?));
                }
                REP_INFO => {}
                k if k & 0x8000_0000 != 0 => {
                    bail!(
                        "export {export:?} refused: reply type {k:#x}: {}",
                        String::from_utf8_lossy(&body)
                    )
                }
                k => bail!("unexpected option reply {k}"),
            }
        }
        let size_bytes = size_bytes.context("server sent no NBD_INFO_EXPORT")?;
        let (mut r, w) = s.into_split();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let reader_pending = pending.clone();
        let reader = tokio::spawn(async move {
            loop {
                let header = async {
                    let magic = r.read_u32().await?;
                    let error = r.read_u32().await?;
                    let handle = r.read_u64().await?;
                    Ok::<_, std::io::Error>((magic, error, handle))
                };
                let Ok((magic, error, handle)) = header.await else {
                    break;
                };
                if magic != SIMPLE_REPLY_MAGIC {
                    break;
                }
                let Some((read_len, tx)) =
                    reader_pending.lock().expect("pending lock").remove(&handle)
                else {
                    break;
                };
                if error != 0 {
                    let _ = tx.send(Err(NbdErrno(error)));
                    continue;
                }
                let mut data = vec![0u8; read_len as usize];
                if r.read_exact(&mut data).await.is_err() {
                    break;
                }
                let _ = tx.send(Ok(data));
            }
            // Connection gone: every waiter sees its sender dropped.
            reader_pending.lock().expect("pending lock").clear();
        });
        Ok(NbdClient {
            writer: tokio::sync::Mutex::new(w),
            pending,
            next_handle: AtomicU64::new(1),
            size_bytes,
            reader,
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Sends one request and waits for its reply. `Ok(Err(errno))` is an
    /// NBD error reply; `Err` a broken connection.
    pub async fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
    ) -> Result<Result<Vec<u8>, NbdErrno>> {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let read_len = if cmd == CMD_READ { len } else { 0 };
        self.pending
            .lock()
            .expect("pending lock")
            .insert(handle, (read_len, tx));
        let mut header = Vec::with_capacity(28 + payload.map_or(0, |p| p.len()));
        header.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&cmd.to_be_bytes());
        header.extend_from_slice(&handle.to_be_bytes());
        header.extend_from_slice(&offset.to_be_bytes());
        header.extend_from_slice(&len.to_be_bytes());
        if let Some(p) = payload {
            header.extend_from_slice(p);
        }
        {
            let mut w = self.writer.lock().await;
            w.write_all(&header).await.context("send NBD request")?;
        }
        rx.await.context("connection closed before the reply")
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Result<Vec<u8>, NbdErrno>> {
        self.request(CMD_READ, 0, offset, len, None).await
    }

    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<Result<(), NbdErrno>> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        Ok(self
            .request(CMD_WRITE, flags, offset, data.len() as u32, Some(data))
            .await?
            .map(|_| ()))
    }

    pub async fn flush(&self) -> Result<Result<(), NbdErrno>> {
        Ok(self.request(CMD_FLUSH, 0, 0, 0, None).await?.map(|_| ()))
    }

    pub async fn trim(&self, offset: u64, len: u32) -> Result<Result<(), NbdErrno>> {
        Ok(self
            .request(CMD_TRIM, 0, offset, len, None)
            .await?
            .map(|_| ()))
    }

    pub async fn write_zeroes(&self, offset: u64, len: u32) -> Result<Result<(), NbdErrno>> {
        Ok(self
            .request(CMD_WRITE_ZEROES, 0, offset, len, None)
            .await?
            .map(|_| ()))
    }

    /// Sends NBD_CMD_DISC and closes.
    pub async fn disconnect(self) -> Result<()> {
        let mut header = Vec::with_capacity(28);
        header.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&CMD_DISC.to_be_bytes());
        header.extend_from_slice(&0u64.to_be_bytes());
        header.extend_from_slice(&0u64.to_be_bytes());
        header.extend_from_slice(&0u32.to_be_bytes());
        let mut w = self.writer.lock().await;
        w.write_all(&header).await?;
        w.shutdown().await?;
        drop(w);
        self.reader.abort();
        Ok(())
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
