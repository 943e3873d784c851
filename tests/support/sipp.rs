//! A SIPp callee for the serve tests: message trace and statistics files
//! in the test's own directory; killed and reaped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A SIPp callee; killed and reaped on drop.
pub struct Sipp {
    child: Child,
    messages: PathBuf,
    stats: PathBuf,
}

impl Drop for Sipp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sipp {
    pub fn start(dir: &Path, scenario: &Path, port: u16, calls: u32) -> Sipp {
        std::fs::create_dir_all(dir).unwrap();
        let messages = dir.join("sipp-messages.log");
        let stats = dir.join("sipp-stat.csv");
        let child = Command::new("sipp")
            .arg("-sf")
            .arg(scenario)
            .args(["-i", "127.0.0.1", "-mi", "127.0.0.1"])
            .args(["-p", &port.to_string(), "-m", &calls.to_string()])
            .args(["-nostdin", "-timeout", "60s"])
            .args(["-trace_msg", "-message_file"])
            .arg(&messages)
            .args(["-trace_stat", "-stf"])
            .arg(&stats)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sipp on PATH (apt-get install sip-tester)");
        let mut s = Sipp {
            child,
            messages,
            stats,
        };
        if let Some(status) = super::bound::wait_udp_bound(&mut s.child, port) {
            panic!("SIPp exited at start: {status}");
        }
        s
    }

    /// The INVITEs SIPp received: (To user, From user) pairs.
    pub fn invites(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(&self.messages).unwrap_or_default();
        let user = |line: &str| -> String {
            let start = line.find("sip:").map_or(0, |i| i + 4);
            line[start..]
                .split(['@', ';', '>'])
                .next()
                .unwrap_or("")
                .to_string()
        };
        let mut out = Vec::new();
        for block in text.split("\n\n") {
            let mut lines = block.lines().skip_while(|l| !l.starts_with("INVITE "));
            if lines.next().is_none() {
                continue;
            }
            let mut to = None;
            let mut from = None;
            for l in lines {
                let lower = l.to_ascii_lowercase();
                if lower.starts_with("to:") {
                    to = Some(user(l));
                } else if lower.starts_with("from:") {
                    from = Some(user(l));
                }
            }
            if let (Some(t), Some(f)) = (to, from) {
                out.push((t, f));
            }
        }
        out
    }

    /// Waits for SIPp to stop by itself after its `-m` calls; returns its
    /// successful and failed call counts.
    pub fn finish(&mut self, limit: Duration) -> (u64, u64) {
        let end = Instant::now() + limit;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < end, "SIPp still running");
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&self.stats).expect("SIPp stat file");
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header: Vec<&str> = lines.next().unwrap().split(';').collect();
        let last: Vec<&str> = lines.next_back().unwrap().split(';').collect();
        let col = |n: &str| -> u64 {
            let i = header.iter().position(|h| *h == n).unwrap();
            last[i].trim().parse().unwrap()
        };
        (col("SuccessfulCall(C)"), col("FailedCall(C)"))
    }
}

/// A scenario of ../shared/sipp.
pub fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/sipp")
        .join(name)
}

impl Sipp {
    /// Whether SIPp is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}
