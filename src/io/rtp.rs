//! RTP sink on the SDP offer's port: early media (ringback, announcements)
//! arrives here and is counted, never played. Binding the port for real means
//! the far end's media does not bounce back as ICMP errors.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::UdpSocket;

/// Packet counters, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct RtpCounters {
    pub rtp_packets: AtomicU64,
    /// Datagrams on the media port that are not RTP version 2.
    pub non_rtp: AtomicU64,
}

/// The running sink: its counters, and its task, which stops (unbinding
/// the port) when this is dropped. Not left to the runtime's end: with
/// `sip.thread = "shared"` the SIP driver runs on the HTTP runtime, which
/// outlives it.
pub struct Sink {
    pub counters: Arc<RtpCounters>,
    task: tokio::task::AbortHandle,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds the sink and returns its address (the one to put in SDP).
pub async fn spawn_sink(bind: SocketAddr) -> std::io::Result<(SocketAddr, Sink)> {
    let socket = UdpSocket::bind(bind).await?;
    let local = socket.local_addr()?;
    let counters = Arc::new(RtpCounters::default());
    let c = counters.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            match socket.recv_from(&mut buf).await {
                Ok((n, _)) => {
                    let counter = match rtp_rs::RtpReader::new(&buf[..n]) {
                        Ok(_) => &c.rtp_packets,
                        Err(_) => &c.non_rtp,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                // ICMP errors from earlier sends surface here; nothing to do.
                Err(_) => continue,
            }
        }
    });
    Ok((
        local,
        Sink {
            counters,
            task: task.abort_handle(),
        },
    ))
}
