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

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::grpc::admit::{Admit, AdmitLayer};

pub use crate::config::Limits;

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
pub type CallLimitLayer = AdmitLayer<Arc<CallLimits>>;

impl Admit for Arc<CallLimits> {
    type Guard = OwnedSemaphorePermit;

    fn admit<B>(&self, req: &mut http::Request<B>) -> Result<OwnedSemaphorePermit, tonic::Status> {
        let (allowance, known) = self.allowance(req.headers());
        allowance.clone().try_acquire_owned().map_err(|_| {
            tonic::Status::resource_exhausted(if known {
                format!(
                    "this principal already has {} calls in progress ([limits] max_calls_per_principal); retry with backoff",
                    self.per_principal
                )
            } else {
                "too many calls without a valid token are in progress; retry with backoff"
                    .to_owned()
            })
        })
    }
}
