//! Waiting for a freshly started peer (SIPp) to bind its UDP port, read
//! from /proc/net/udp rather than by probing the port: a probe bind could
//! take the port in the instant the peer binds it. Shared by the tests and
//! the SIPp benchmarks (included by `#[path]`).

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Whether some socket is bound to UDP 127.0.0.1:`port`.
fn udp_bound(port: u16) -> bool {
    // Lines read "  sl  local_address rem_address ...": 127.0.0.1 is
    // 0100007F in the kernel's byte order, then the port in hex.
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/udp").is_ok_and(|t| {
        t.lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .any(|local| local == want)
    })
}

/// Waits (at most 10 s) until `child` has bound UDP 127.0.0.1:`port`, so
/// that what is sent next reaches it: a connected socket such as
/// `flashcall dial`'s gives up on the port-unreachable a port nobody
/// holds yet answers with. `Some(status)` if the child exited first (bad
/// scenario, port taken); panics if the time runs out.
pub fn wait_udp_bound(child: &mut Child, port: u16) -> Option<ExitStatus> {
    let end = Instant::now() + Duration::from_secs(10);
    while !udp_bound(port) {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        assert!(
            Instant::now() < end,
            "UDP 127.0.0.1:{port} not bound within 10 s of starting its peer"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}
