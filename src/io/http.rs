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
//! as long as it liked.
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
    /// After the shutdown signal, how long requests in progress have to
    /// finish before their connections are closed.
    pub drain: Duration,
}

/// A connection whose writes fail with `TimedOut` once one has been
/// blocked (the socket's send buffer full) for `limit`. Hyper then drops
/// the connection and the response body with it. The timer exists only
/// while a write is blocked: a write that goes through at once, nearly
/// every one, costs a branch.
struct WriteLimit<T> {
    io: T,
    limit: Duration,
    blocked: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteLimit<T> {
    fn new(io: T, limit: Duration) -> Self {
        WriteLimit {
            io,
            limit,
            blocked: None,
        }
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
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
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
                    TokioIo::new(WriteLimit::new(tcp, limits.write_timeout)),
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
}
