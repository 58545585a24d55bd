//! A TCP proxy for one directed link between two nodes, so that a test can
//! cut, delay or heal that link while the nodes run. Node A dials node B
//! through the proxy of link A→B (the node's `[raft.dial]` map), so cutting
//! every link between two sites partitions them, both ways.
//!
//! A cut behaves like a dead WAN, not like a refused port: connections in
//! flight are torn down and new ones are accepted but never answered (they
//! hang until the peer's own timeouts fire), and at heal the parked ones
//! are closed so that the peer reconnects.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Default)]
struct LinkState {
    cut: AtomicBool,
    /// Added before each forwarded chunk, in milliseconds.
    delay_ms: AtomicU64,
    /// Forwarding tasks of the connections in flight.
    active: Mutex<Vec<JoinHandle<()>>>,
    /// Connections accepted while cut: held, never answered.
    parked: Mutex<Vec<TcpStream>>,
    /// Bytes forwarded, both directions.
    bytes: AtomicU64,
}

/// One directed link. Dropping it stops the proxy.
pub struct LinkProxy {
    addr: SocketAddr,
    target: SocketAddr,
    state: Arc<LinkState>,
    accept: JoinHandle<()>,
}

impl LinkProxy {
    /// Listens on a free loopback port and forwards to `target`. Must be
    /// called within a tokio runtime, which then runs the proxy.
    pub async fn start(target: SocketAddr) -> std::io::Result<LinkProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(LinkState::default());
        let accept = tokio::spawn(accept_loop(listener, target, state.clone()));
        Ok(LinkProxy {
            addr,
            target,
            state,
            accept,
        })
    }

    /// Where the dialling node connects.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Tears down connections in flight and black-holes new ones.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        for task in self.state.active.lock().expect("active lock").drain(..) {
            task.abort();
        }
    }

    /// Forwards again; connections parked during the cut are closed.
    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
        self.state.parked.lock().expect("parked lock").clear();
    }

    /// Adds `delay` before every forwarded chunk (zero to stop).
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.state.cut.load(Ordering::SeqCst)
    }

    /// Bytes forwarded so far, both directions.
    pub fn bytes_forwarded(&self) -> u64 {
        self.state.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, state: Arc<LinkState>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        if state.cut.load(Ordering::SeqCst) {
            state.parked.lock().expect("parked lock").push(inbound);
            continue;
        }
        let conn_state = state.clone();
        let task = tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            let up = pump(ri, wo, conn_state.clone());
            let down = pump(ro, wi, conn_state);
            // Either direction ending ends the connection: a half-open
            // link is not a state a WAN cut leaves behind.
            tokio::select! {
                _ = up => {}
                _ = down => {}
            }
        });
        let mut active = state.active.lock().expect("active lock");
        active.retain(|t| !t.is_finished());
        active.push(task);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<LinkState>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = state.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if state.cut.load(Ordering::SeqCst) || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        state.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn echo(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn forwards_cuts_black_holes_and_heals() {
        let proxy = LinkProxy::start(echo_server().await).await.unwrap();
        assert_eq!(echo(proxy.addr()).await.unwrap(), b"ping");
        assert_eq!(proxy.bytes_forwarded(), 8);

        // A connection in flight dies at the cut.
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        open.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        open.read_exact(&mut buf).await.unwrap();
        proxy.cut();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(2), open.read_to_end(&mut rest))
            .await
            .expect("the cut closes the connection");
        assert!(n.is_err() || rest.is_empty());

        // New connections are accepted but never answered.
        let e = echo(proxy.addr()).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);

        proxy.heal();
        assert_eq!(echo(proxy.addr()).await.unwrap(), b"ping");
    }
}
