//! The server's transport edge: which connections it accepts, how long a
//! connection may take to say it speaks HTTP/2, and how many calls one
//! principal may have in flight.
//!
//! Guarantees:
//! - at most `max_connections` connections are served at once; a socket
//!   accepted beyond that is closed at once (and logged), so the server
//!   never runs out of file descriptors for its own files;
//! - a socket is handed to the HTTP/2 stack only once the client's first
//!   bytes have arrived (the 24-byte HTTP/2 preface in plaintext, a TLS
//!   record header with TLS) within `handshake_timeout_ms`; at most
//!   `max_handshaking` sockets wait for that at once, and a new one evicts
//!   the oldest, so silent or slow sockets churn each other and never hold
//!   a place a real client needs;
//! - established connections are pinged (HTTP/2 keepalive) and closed when
//!   the peer stops answering;
//! - each principal (by bearer token) has at most `max_calls_per_principal`
//!   calls being handled at once, and callers without a known token share
//!   one smaller allowance: one principal cannot starve the others. A call
//!   over its allowance is RESOURCE_EXHAUSTED at once.
//!
//! Does not guarantee: that a client which completed the preface and then
//! stalls is cut before the keepalive notices it, or fairness among the
//! calls of one principal. Streaming responses hold their principal's
//! allowance only until the stream starts; they are bounded per connection
//! by `max_streams_per_connection` instead.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Connection and call limits (`[limits]` in config.toml). The defaults
/// need no tuning for one server on a small machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Sockets waiting for their first bytes at once (the oldest is closed
    /// when another arrives).
    pub max_handshaking: usize,
    /// How long a new socket may take to send its first bytes, in ms.
    pub handshake_timeout_ms: u64,
    /// HTTP/2 keepalive: ping an established connection this often, in ms.
    pub keepalive_interval_ms: u64,
    /// HTTP/2 keepalive: close it if a ping is not answered within, in ms.
    pub keepalive_timeout_ms: u64,
    /// Concurrent calls (HTTP/2 streams) on one connection.
    pub max_streams_per_connection: u32,
    /// Calls one principal may have being handled at once.
    pub max_calls_per_principal: usize,
    /// Calls without a known token being handled at once, all together.
    pub max_calls_unauthenticated: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_handshaking: 256,
            handshake_timeout_ms: 5_000,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 10_000,
            max_streams_per_connection: 128,
            max_calls_per_principal: 256,
            max_calls_unauthenticated: 64,
        }
    }
}

impl Limits {
    /// Checks every limit is usable, naming the first that is not.
    pub fn validate(&self) -> crate::error::Result<()> {
        let bad = |name: &str, why: &str| {
            Err(crate::error::VaultError::config(
                format!("limits.{name}"),
                why.to_owned(),
            ))
        };
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            return bad("max_connections", "must be 1 to 1000000");
        }
        if self.max_handshaking == 0 || self.max_handshaking > self.max_connections {
            return bad("max_handshaking", "must be 1 to max_connections");
        }
        if !(100..=120_000).contains(&self.handshake_timeout_ms) {
            return bad("handshake_timeout_ms", "must be 100 to 120000");
        }
        if !(1_000..=3_600_000).contains(&self.keepalive_interval_ms) {
            return bad("keepalive_interval_ms", "must be 1000 to 3600000");
        }
        if !(1_000..=600_000).contains(&self.keepalive_timeout_ms) {
            return bad("keepalive_timeout_ms", "must be 1000 to 600000");
        }
        if self.max_streams_per_connection == 0 || self.max_streams_per_connection > 10_000 {
            return bad("max_streams_per_connection", "must be 1 to 10000");
        }
        if self.max_calls_per_principal == 0 {
            return bad("max_calls_per_principal", "must be at least 1");
        }
        if self.max_calls_unauthenticated == 0 {
            return bad("max_calls_unauthenticated", "must be at least 1");
        }
        Ok(())
    }
}

/// An accepted connection; it holds its place among `max_connections`
/// until it is dropped.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The sockets waiting for their first bytes, oldest first, each with the
/// means to close it.
#[derive(Default)]
struct Waiting {
    next: u64,
    queue: VecDeque<(u64, oneshot::Sender<()>)>,
}

/// Accepts on `listener` under `limits` and yields the connections that
/// sent their first bytes in time. `tls` says what those bytes are.
pub fn incoming(
    listener: TcpListener,
    limits: &Limits,
    tls: bool,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let places = Arc::new(Semaphore::new(limits.max_connections));
    let waiting = Arc::new(Mutex::new(Waiting::default()));
    let max_waiting = limits.max_handshaking;
    let timeout = Duration::from_millis(limits.handshake_timeout_ms);
    // Plaintext: the whole HTTP/2 client preface. TLS: a record header.
    let first_bytes = if tls { 5 } else { 24 };
    tokio::spawn(async move {
        // When a refusal was last logged: at most one line per 10 s.
        let mut refused_logged: Option<tokio::time::Instant> = None;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it
                    // was accepted: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let Ok(place) = places.clone().try_acquire_owned() else {
                if refused_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(%peer, "connection refused: the server is serving max_connections already ([limits] max_connections)");
                    refused_logged = Some(tokio::time::Instant::now());
                }
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (evict_tx, evict_rx) = oneshot::channel();
            let id = {
                let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
                let id = w.next;
                w.next += 1;
                w.queue.push_back((id, evict_tx));
                while w.queue.len() > max_waiting {
                    if let Some((_, oldest)) = w.queue.pop_front() {
                        let _ = oldest.send(());
                    }
                }
                id
            };
            let tx = tx.clone();
            let waiting = waiting.clone();
            tokio::spawn(async move {
                let outcome = tokio::select! {
                    r = first_bytes_arrived(&stream, first_bytes) => r,
                    () = tokio::time::sleep(timeout) => Err("sent too little within the handshake timeout"),
                    _ = evict_rx => Err("evicted by newer sockets while still silent"),
                };
                waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .queue
                    .retain(|(i, _)| *i != id);
                match outcome {
                    Ok(()) => {
                        let _ = tx
                            .send(Ok(Conn {
                                stream,
                                _place: place,
                            }))
                            .await;
                    }
                    Err(why) => tracing::debug!(%peer, why, "connection closed before HTTP/2"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Waits until `n` bytes can be read from `stream` without taking them.
async fn first_bytes_arrived(stream: &TcpStream, n: usize) -> Result<(), &'static str> {
    let mut buf = [0u8; 24];
    let n = n.min(buf.len());
    loop {
        stream
            .readable()
            .await
            .map_err(|_| "failed before sending anything")?;
        match stream.peek(&mut buf[..n]).await {
            Ok(0) => return Err("closed before sending anything"),
            Ok(got) if got >= n => return Ok(()),
            // Part of it: wait for the rest without spinning.
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Err("failed before sending its first bytes"),
        }
    }
}

/// Per-principal call allowances, by the SHA-256 of the bearer token.
#[derive(Debug)]
pub struct CallLimits {
    known: HashMap<[u8; 32], Arc<Semaphore>>,
    unknown: Arc<Semaphore>,
    per_principal: usize,
}

impl CallLimits {
    /// Allowances for the principals whose token hashes are `tokens`.
    pub fn new(tokens: impl IntoIterator<Item = [u8; 32]>, limits: &Limits) -> Self {
        CallLimits {
            known: tokens
                .into_iter()
                .map(|t| (t, Arc::new(Semaphore::new(limits.max_calls_per_principal))))
                .collect(),
            unknown: Arc::new(Semaphore::new(limits.max_calls_unauthenticated)),
            per_principal: limits.max_calls_per_principal,
        }
    }

    fn allowance(&self, headers: &http::HeaderMap) -> (&Arc<Semaphore>, bool) {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match token.and_then(|t| {
            let h: [u8; 32] = Sha256::digest(t.trim().as_bytes()).into();
            self.known.get(&h)
        }) {
            Some(s) => (s, true),
            None => (&self.unknown, false),
        }
    }
}

/// The tower layer that applies [`CallLimits`].
#[derive(Debug, Clone)]
pub struct CallLimitLayer(pub Arc<CallLimits>);

impl<S> tower::Layer<S> for CallLimitLayer {
    type Service = CallLimit<S>;
    fn layer(&self, inner: S) -> CallLimit<S> {
        CallLimit {
            inner,
            limits: self.0.clone(),
        }
    }
}

/// A service whose calls hold their principal's allowance while handled.
#[derive(Debug, Clone)]
pub struct CallLimit<S> {
    inner: S,
    limits: Arc<CallLimits>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for CallLimit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (allowance, known) = self.limits.allowance(req.headers());
        match allowance.clone().try_acquire_owned() {
            Ok(permit) => {
                // The clone that was made ready is the one that is called.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move {
                    let r = inner.call(req).await;
                    drop(permit);
                    r
                })
            }
            Err(_) => {
                let msg = if known {
                    format!(
                        "this principal already has {} calls in progress ([limits] max_calls_per_principal); retry with backoff",
                        self.limits.per_principal
                    )
                } else {
                    "too many calls without a valid token are in progress; retry with backoff"
                        .to_owned()
                };
                let resp = tonic::Status::resource_exhausted(msg).into_http();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}
