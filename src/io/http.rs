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
    /// After the shutdown signal, how long requests in progress have to
    /// finish before their connections are closed.
    pub drain: Duration,
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
                    TokioIo::new(tcp),
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
