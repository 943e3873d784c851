//! The HTTP accept loop: hyper's HTTP/1.1 connections with a read time
//! limit, and a shutdown that waits a bounded time for them.
//!
//! Why not `axum::serve`: it gives hyper no timer, which turns hyper's
//! header read timeout off. A client that opened a connection and sent
//! half a request head then held that connection (and a file descriptor of
//! the engine's) for ever, and a graceful shutdown waited for it for ever:
//! SIGTERM never ended the process. Here every connection has a timer,
//! and after the shutdown signal connections get a bounded drain, after
//! which the ones still open are closed.
//!
//! The write side has a limit too ([`WriteLimit`]): a client that stops
//! reading a response (a large CSV export, say) is cut off once a write
//! has made no progress for `http.write_timeout_ms`; before, it held the
//! connection, the export's blocking thread and its database cursor for
//! as long as it liked. A client that reads a trickle, enough to unblock
//! a write within each such span but next to nothing overall, is cut off
//! too: once the client is what holds the writes back, the response must
//! move [`Limits::min_send_bytes`] per `write_timeout`.
//!
//! HTTP/1.1 only, and no upgrades (axum::serve allowed them): no route
//! here upgrades a connection; a WebSocket route would need
//! `serve_connection_with_upgrades`.

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// How a listener serves its connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A connection's next request head (idle keep-alive included) must
    /// arrive within this; hyper closes the connection otherwise.
    pub header_timeout: Duration,
    /// A write to the client that makes no progress for this long (the
    /// client stopped reading) closes the connection.
    pub write_timeout: Duration,
    /// Once a write has been blocked (the client is the bottleneck), at
    /// least this many bytes must go out per `write_timeout`, else the
    /// connection is closed; measured from that first block to the next
    /// request read on the connection.
    pub min_send_bytes: usize,
    /// After the shutdown signal, how long requests in progress have to
    /// finish before their connections are closed.
    pub drain: Duration,
}

/// The slowest a client may read a response once it holds the writes
/// back: 1 KiB/s, a fraction of what the slowest mobile link carries
/// (Apache's `mod_reqtimeout` asks 500 bytes/s of a request body).
pub const MIN_SEND_BYTES_PER_SEC: u64 = 1024;

/// [`Limits::min_send_bytes`] for a `write_timeout_ms` span at
/// [`MIN_SEND_BYTES_PER_SEC`].
pub fn min_send_bytes(write_timeout_ms: u64) -> usize {
    usize::try_from(MIN_SEND_BYTES_PER_SEC.saturating_mul(write_timeout_ms) / 1000)
        .unwrap_or(usize::MAX)
}

/// A connection whose writes fail with `TimedOut` once one has been
/// blocked (the socket's send buffer full) for `limit`, or once its
/// writes have been blocked for `limit` in all and moved fewer than
/// `min_bytes` per `limit` of that blocked time. Only time a write spent
/// blocked counts, never time the server had nothing to write (a slow
/// export query, an idle keep-alive gap): a client is judged only while it
/// is what holds the writes back. Hyper then drops the connection and the
/// response body with it. The timer and the clock reads exist only from a
/// write's first block on: a write that goes through at once on a
/// connection that never blocked, nearly every one, costs a branch.
///
/// Why a rate and not only the blocked timer: any read that frees enough
/// of the server's send buffer unblocks its write, so how slowly a client
/// could read and never be cut off was up to the kernel's buffer sizing
/// (Linux wakes a TCP writer once half its queued bytes are gone: with a
/// send buffer of ~46 KB, a client reading ~800 bytes a second kept an
/// export's thread for as long as it liked). The rate makes it a floor
/// of our own.
struct WriteLimit<T> {
    io: T,
    limit: Duration,
    min_bytes: usize,
    blocked: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// When the write now blocked first returned Pending.
    pending_since: Option<std::time::Instant>,
    /// Blocked time summed over this span's writes, and the bytes written
    /// since the span's first block.
    stalled: Duration,
    slow_bytes: usize,
}

impl<T> WriteLimit<T> {
    fn new(io: T, limit: Duration, min_bytes: usize) -> Self {
        WriteLimit {
            io,
            limit,
            min_bytes,
            blocked: None,
            pending_since: None,
            stalled: Duration::ZERO,
            slow_bytes: 0,
        }
    }

    /// After a write that went through: adds the time it was blocked,
    /// counts its bytes once any write of the span blocked, and when the
    /// span's blocked time reaches `limit`, fails the write if the bytes
    /// fell short of `min_bytes` per `limit` of it (scaled: a verdict that
    /// comes late is judged on the time that really passed), or starts the
    /// next span.
    fn progress(&mut self, n: usize) -> std::io::Result<usize> {
        if let Some(p) = self.pending_since.take() {
            self.stalled += p.elapsed();
        }
        if self.stalled.is_zero() {
            return Ok(n);
        }
        self.slow_bytes = self.slow_bytes.saturating_add(n);
        if self.stalled < self.limit {
            return Ok(n);
        }
        let moved = self.slow_bytes as u128 * self.limit.as_nanos();
        let asked = self.min_bytes as u128 * self.stalled.as_nanos();
        if moved < asked {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client read {} bytes while holding the writes back for {:?}, \
                     under the {} per {:?} required",
                    self.slow_bytes, self.stalled, self.min_bytes, self.limit
                ),
            ));
        }
        self.stalled = Duration::ZERO;
        self.slow_bytes = 0;
        Ok(n)
    }

    /// After a write-side poll of the inner stream: on progress the timer
    /// goes; while blocked it runs, and when it fires the write fails.
    fn watch<R>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: std::task::Poll<std::io::Result<R>>,
    ) -> std::task::Poll<std::io::Result<R>> {
        use std::task::Poll;
        match r {
            Poll::Ready(r) => {
                self.blocked = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                if self.pending_since.is_none() {
                    self.pending_since = Some(std::time::Instant::now());
                }
                let limit = self.limit;
                let timer = self
                    .blocked
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the client read nothing for {limit:?}"),
                    ))),
                }
            }
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteLimit<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteLimit<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        match self.watch(cx, r) {
            std::task::Poll::Ready(Ok(n)) => std::task::Poll::Ready(self.progress(n)),
            other => other,
        }
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        match self.watch(cx, r) {
            std::task::Poll::Ready(Ok(n)) => std::task::Poll::Ready(self.progress(n)),
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, r)
    }
}

/// Serves `app` on `listener` until `signal` resolves; then stops
/// accepting, lets each connection finish the request it is in (keep-alive
/// is turned off), and waits up to `limits.drain` for that. Returns how
/// many connections were still open at the end of the drain and were
/// closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    signal: impl Future<Output = ()>,
) -> usize {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    let mut signal = std::pin::pin!(signal);
    loop {
        tokio::select! {
            biased;
            () = &mut signal => break,
            // Reap finished connections so the set holds only open ones.
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!(error = %e, "http: a connection's task panicked");
                    }
                }
            }
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _peer)) => tcp,
                    Err(e) => {
                        if accept_failed(&e) {
                            // The pause still hears the signal: a shutdown
                            // is not held up by it.
                            tokio::select! {
                                () = &mut signal => break,
                                () = tokio::time::sleep(ACCEPT_PAUSE) => {}
                            }
                        }
                        continue;
                    }
                };
                // TCP_NODELAY: a response goes out as it is written. With
                // Nagle on, a write smaller than a segment while earlier
                // data is unacknowledged waits for the peer's ACK, which a
                // delayed ACK holds back 40-200 ms on Linux (a response
                // written in more than one write, or pipelined).
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "http: cannot set TCP_NODELAY");
                }
                let conn = builder.serve_connection(
                    TokioIo::new(WriteLimit::new(
                        tcp,
                        limits.write_timeout,
                        limits.min_send_bytes,
                    )),
                    TowerToHyperService::new(app.clone()),
                );
                let conn = graceful.watch(conn);
                conns.spawn(async move {
                    // A reset, a malformed request or a header timeout:
                    // the client's doing, and hyper has answered what it
                    // could (400, 431...).
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "http: connection ended with an error");
                    }
                });
            }
        }
    }
    // No new connections from here: the listener closes now, so a client
    // is refused at once rather than left in the accept queue.
    drop(listener);
    let drained = tokio::select! {
        () = graceful.shutdown() => true,
        () = tokio::time::sleep(limits.drain) => false,
    };
    if drained {
        // Every connection has ended (a task may not have noticed yet).
        return 0;
    }
    // Connections whose tasks ended after the last reap are not counted.
    while conns.try_join_next().is_some() {}
    let open = conns.len();
    conns.abort_all();
    open
}

/// How long the loop stops accepting after an accept failed for want of
/// file descriptors or memory.
const ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// An accept that failed; true if the loop should pause. Errors of one
/// connection (reset or aborted before it was taken) leave the listener
/// fine. Running out of file descriptors or memory does not go away by
/// retrying at once: a retry loop would spin a core and flood the log, so
/// pause, as hyper's and axum's servers do.
fn accept_failed(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    ) {
        tracing::debug!(error = %e, "http: accept");
        return false;
    }
    tracing::error!(error = %e, "http: cannot accept a connection; pausing 1 s");
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body, Bytes};
    use axum::routing::get;
    use std::io::{Read, Write};

    /// Reads until the server closes the connection; panics if it is
    /// still open after `limit`.
    fn read_until_closed(s: &mut std::net::TcpStream, limit: Duration) -> usize {
        s.set_read_timeout(Some(limit)).expect("read timeout");
        let (mut got, mut buf) = (0usize, vec![0u8; 65_536]);
        let started = std::time::Instant::now();
        loop {
            // An endless response that still flows never times a read out.
            assert!(
                started.elapsed() < limit,
                "still open after {limit:?}, {got} bytes read"
            );
            match s.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
                Err(e) => panic!("still open after {limit:?} ({e}), {got} bytes read"),
            }
        }
    }

    /// A client that stops reading an endless response is cut off once a
    /// write has been blocked for `write_timeout`: reading afterwards, it
    /// gets what was buffered and then the end of the connection (without
    /// the limit the response would go on for as long as it read). The
    /// server meanwhile answers others.
    #[test]
    fn a_client_that_stops_reading_is_cut_off() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new()
            .route(
                "/endless",
                get(|| async {
                    let chunk = Bytes::from(vec![b'x'; 65_536]);
                    let s = futures_util::stream::repeat_with(move || {
                        Ok::<_, std::io::Error>(chunk.clone())
                    });
                    Body::from_stream(s)
                }),
            )
            .route("/ok", get(|| async { "ok" }));
        let limits = Limits {
            header_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_millis(300),
            // The rate rule off: this is the blocked timer's test.
            min_send_bytes: 0,
            drain: Duration::from_secs(1),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(serve(listener, app, limits, async {
            let _ = stopped.await;
        }));

        let mut stalled = std::net::TcpStream::connect(addr).expect("connect");
        stalled
            .write_all(b"GET /endless HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("write");
        // Far past the limit without reading: the server's writes block.
        std::thread::sleep(Duration::from_secs(2));
        let mut other = std::net::TcpStream::connect(addr).expect("connect");
        other
            .write_all(b"GET /ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut answer = String::new();
        other.read_to_string(&mut answer).expect("read");
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        // A bound on the wait, not a measure of speed.
        let got = read_until_closed(&mut stalled, Duration::from_secs(10));
        assert!(got > 0, "the response had started");

        let _ = stop.send(());
        let open = rt.block_on(server).expect("serve");
        assert_eq!(open, 0, "no connection left to cut at shutdown");
    }

    /// The rate rule on its own, over an in-memory pipe of 64 bytes,
    /// which (unlike TCP, whose sender wakes only once half its buffer is
    /// free) lets a write through as soon as any byte is read: a reader
    /// that takes 16 bytes every 5 ms unblocks every write far within the
    /// 200 ms limit, so only the rate (10,000 bytes per span asked, ~640
    /// moved) can end it. A reader that drains the pipe is not cut off by
    /// the same limit; time with nothing to write is not counted; and a
    /// reader freeing large chunks too rarely is judged on its real rate.
    #[test]
    fn a_reader_that_takes_a_trickle_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let limit = Duration::from_millis(200);
            let endless = |w: tokio::io::DuplexStream| async move {
                let mut w = WriteLimit::new(w, limit, 10_000);
                let chunk = [b'x'; 1024];
                let mut sent = 0usize;
                loop {
                    match w.write(&chunk).await {
                        Ok(n) => sent += n,
                        Err(e) => return (sent, e),
                    }
                }
            };

            let (w, mut r) = tokio::io::duplex(64);
            let writer = tokio::spawn(endless(w));
            let mut buf = [0u8; 16];
            let mut got = 0usize;
            let cut = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
            assert!(cut.is_ok(), "still writing after 5 s ({got} bytes read)");
            let (sent, e) = writer.await.expect("writer");
            assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
            assert!(e.to_string().contains("under the 10000 per"), "{e}");
            assert!(sent > 64, "writes went through before the cut: {sent}");

            // Draining as fast as it comes: same limits, never cut.
            let (w, mut r) = tokio::io::duplex(64);
            let writer = tokio::spawn(endless(w));
            let mut big = vec![0u8; 64];
            let started = tokio::time::Instant::now();
            let mut got = 0usize;
            while started.elapsed() < 3 * limit {
                got += r.read(&mut big).await.expect("the writer goes on");
            }
            assert!(got > 10_000, "{got}");
            assert!(!writer.is_finished(), "a reader that keeps up was cut off");
            writer.abort();

            // A write blocked ~20 ms, then the server has nothing to write
            // for twice the limit (an idle keep-alive gap, a slow query):
            // that gap is not the client's, the next write goes through.
            let (w, mut peer) = tokio::io::duplex(64);
            let mut w = WriteLimit::new(w, limit, 10_000);
            w.write_all(&[b'x'; 64]).await.expect("fills the pipe");
            let drain = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let mut drained = [0u8; 64];
                peer.read_exact(&mut drained).await.expect("drain");
                peer
            });
            assert_eq!(w.write(b"y").await.expect("once drained"), 1);
            let _peer = drain.await.expect("drain");
            tokio::time::sleep(2 * limit).await;
            assert_eq!(w.write(b"z").await.expect("after an idle gap"), 1);

            // Large wakes: 6,000 bytes freed every 150 ms of a 12,000-byte
            // pipe is 40 KB/s where 10,000 per 200 ms (50 KB/s) is asked.
            // (Measured on blocked time this is cut by an unscaled byte
            // count too; the case guards the large-wake pattern.)
            let (w, mut r) = tokio::io::duplex(12_000);
            let writer = tokio::spawn(endless(w));
            let mut buf = vec![0u8; 6_000];
            let cut = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    match r.read_exact(&mut buf).await {
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            })
            .await;
            assert!(cut.is_ok(), "a 40 KB/s reader is still served after 5 s");
            let (_, e) = writer.await.expect("writer");
            assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        });
    }
}
