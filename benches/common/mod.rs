//! What the SIPp benchmarks (dial_vs_sipp, load) share: a SIPp callee on
//! loopback, killed and reaped when dropped.

#[path = "../../tests/support/bound.rs"]
mod bound;

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A child process, killed and reaped on drop.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIPp's ringing callee (../shared/sipp/uas_ring_cancel.xml) on
/// 127.0.0.1:`port`, expecting the CANCEL.
pub fn callee(port: u16) -> Kill {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let child = Command::new("sipp")
        .arg("-sf")
        .arg(root.join("../shared/sipp/uas_ring_cancel.xml"))
        .args(["-i", "127.0.0.1", "-p", &port.to_string()])
        // SIPp stops reading after 1,000 datagrams per loop by default,
        // far too few at thousands of calls per second.
        .args(["-max_recv_loops", "1000000"])
        // Both callers get 4 MiB socket buffers (flashcall asks the same):
        // with the default 64 KiB, a callee descheduled for a few ms by
        // other work on the machine drops datagrams, and SIPp's caller,
        // which does not retransmit a CANCEL, then waits forever.
        .args(["-buff_size", "4194304"])
        .args(["-nostdin", "-nd", "-timeout", "900s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sipp on PATH (apt-get install sip-tester)");
    let mut child = Kill(child);
    if let Some(status) = bound::wait_udp_bound(&mut child.0, port) {
        panic!("SIPp's callee exited at start: {status}");
    }
    child
}
