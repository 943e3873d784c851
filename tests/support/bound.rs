//! Waiting for a freshly started peer (SIPp) to bind its UDP port, read
//! from /proc rather than by probing the port: a probe bind could take the
//! port in the instant the peer binds it. Shared by the tests and the SIPp
//! benchmarks (included by `#[path]`).

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// The socket inodes of UDP sockets bound to port `port` on 127.0.0.1 or
/// on every address, from /proc/net/udp.
fn udp_inodes(port: u16) -> Vec<String> {
    // Lines read "sl local_address rem_address st tx:rx tr:when retrnsmt
    // uid timeout inode ...": the address is printed as the raw
    // network-order word (127.0.0.1 is 0100007F on x86), the port in hex.
    let wanted = [
        format!("0100007F:{port:04X}"),
        format!("00000000:{port:04X}"),
    ];
    let Ok(table) = std::fs::read_to_string("/proc/net/udp") else {
        return Vec::new();
    };
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, inode) = (f.get(1)?, f.get(9)?);
            wanted.iter().any(|w| w == local).then(|| inode.to_string())
        })
        .collect()
}

/// Whether process `pid` holds one of the socket `inodes`.
fn holds(pid: u32, inodes: &[String]) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| {
            let t = target.to_string_lossy();
            inodes.iter().any(|i| t == format!("socket:[{i}]"))
        })
}

/// Waits (at most 10 s) until `child` itself has bound UDP port `port`
/// (on 127.0.0.1 or every address), so that what is sent next reaches it:
/// a connected socket such as `flashcall dial`'s gives up on the
/// port-unreachable a port nobody holds yet answers with. The socket must
/// be the child's, so a leftover process on the port is not mistaken for
/// it. `Some(status)` if the child exited first (bad scenario, port
/// taken); panics if the time runs out.
pub fn wait_udp_bound(child: &mut Child, port: u16) -> Option<ExitStatus> {
    let end = Instant::now() + Duration::from_secs(10);
    while !holds(child.id(), &udp_inodes(port)) {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        assert!(
            Instant::now() < end,
            "UDP port {port} not bound by process {} within 10 s of its start",
            child.id()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}
