//! A TCP proxy in front of the broker, so a scenario can cut the network without losing the
//! broker's memory storage.
//!
//! The chaos broker advertises the proxy's address, so every client connection, bootstrap and
//! partition leaders alike, passes through here. [`Proxy::cut`] drops every open connection and
//! refuses new ones until [`Proxy::restore`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A running proxy.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

struct State {
    cut: AtomicBool,
    generation: Mutex<CancellationToken>,
    refused: AtomicU64,
    accepted: AtomicU64,
}

impl Proxy {
    /// Listens on `listen` and forwards every connection to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            cut: AtomicBool::new(false),
            generation: Mutex::new(CancellationToken::new()),
            refused: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let (st, stop2) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop2.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else { continue };
                if st.cut.load(Ordering::SeqCst) {
                    st.refused.fetch_add(1, Ordering::Relaxed);
                    drop(client);
                    continue;
                }
                st.accepted.fetch_add(1, Ordering::Relaxed);
                let token = match st.generation.lock() {
                    Ok(g) => g.child_token(),
                    Err(_) => return,
                };
                tokio::spawn(forward(client, upstream, token));
            }
        });
        Ok(Self { addr, state, stop })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        if let Ok(mut g) = self.state.generation.lock() {
            g.cancel();
            *g = CancellationToken::new();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Connections refused while cut.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

async fn forward(mut client: TcpStream, upstream: SocketAddr, cancel: CancellationToken) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn proxy_forwards_then_cut_drops_connections_and_restore_accepts_again() {
        let upstream = echo_server().await;
        let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), upstream)
            .await
            .unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        proxy.cut();
        let mut rest = Vec::new();
        // The open connection is closed by the cut: the read ends.
        let n = c.read_to_end(&mut rest).await.unwrap_or(0);
        assert_eq!(n, 0);
        // New connections are accepted by the kernel, then dropped at once.
        let mut c2 = TcpStream::connect(proxy.addr()).await.unwrap();
        let n = c2.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0);

        proxy.restore();
        let mut c3 = TcpStream::connect(proxy.addr()).await.unwrap();
        c3.write_all(b"pong").await.unwrap();
        c3.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        assert!(proxy.refused() >= 1);
    }
}
