//! A real `flashcall serve` process for the API tests: its own config and
//! pool in cargo's test tmpdir, every listener on 127.0.0.1 port 0 (the
//! engine logs the bound addresses), killed and reaped on drop. Requests go
//! through ureq, a real HTTP client.
#![allow(dead_code)] // each test crate uses a different subset

pub mod bound;
pub mod sipp;

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const LOGIN: &str = "shop";
pub const SECRET: &str = "shop-secret";

/// A running engine.
pub struct Engine {
    child: Child,
    pub http: SocketAddr,
    pub metrics: SocketAddr,
    pub sip: SocketAddr,
    /// Everything the engine logged so far.
    pub log: Arc<Mutex<String>>,
    /// Set once the log reader has seen the end of the engine's stderr.
    log_done: Arc<AtomicBool>,
    agent: ureq::Agent,
    pub dir: PathBuf,
}

/// A response: status, headers we look at, body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub content_type: String,
    pub retry_after: Option<String>,
    /// Every response header, names lower-case, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    /// Asserts an RFC 9457 problem with this status and `type`.
    pub fn assert_problem(&self, status: u16, slug: &str) -> Value {
        assert_eq!(self.status, status, "status; body {}", self.body);
        assert_eq!(
            self.content_type, "application/problem+json",
            "content type; body {}",
            self.body
        );
        let v = self.json();
        assert_eq!(v["type"], slug, "{v}");
        assert_eq!(v["status"], status, "{v}");
        assert!(v["title"].is_string() && v["detail"].is_string(), "{v}");
        v
    }
}

/// Config text for a test engine. `trunks` is either the sandbox or
/// `[[trunks]]` tables; `extra` is appended (more sections).
pub fn config(dir: &Path, pool: &str, trunks: &str, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("test dir");
    let pool_path = dir.join("numbers.txt");
    std::fs::write(&pool_path, pool).expect("write pool");
    let text = format!(
        r#"
[http]
listen = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[sip]
listen = "127.0.0.1:0"
[pool]
file = "{pool}"
[verification]
allow_prefixes = ["+447700900"]
[shutdown]
grace_ms = 3000
[store]
path = "{db}"
{trunks}
[[projects]]
login = "{LOGIN}"
secret = "{SECRET}"
rate = 1000
burst = 1000
senders = [{{ code = "SHOP", status = "active" }}, {{ code = "NEW", status = "moderation" }}]
[[projects]]
login = "other"
secret = "other-secret"
senders = [{{ code = "OTHER", status = "active" }}]
{extra}
"#,
        pool = pool_path.display(),
        db = dir.join("flashcall.db").display()
    );
    let path = dir.join("flashcall.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// The config the harness writes, with `[http]` and `[shutdown]` keys set.
pub fn with_http_keys(cfg: &Path, http: &str, grace_ms: u64) {
    let text = std::fs::read_to_string(cfg).expect("read config");
    let (listen, grace) = ("[http]\nlisten = \"127.0.0.1:0\"\n", "grace_ms = 3000\n");
    assert!(text.contains(listen) && text.contains(grace), "{text}");
    let text = text
        .replacen(listen, &format!("{listen}{http}\n"), 1)
        .replacen(grace, &format!("grace_ms = {grace_ms}\n"), 1);
    std::fs::write(cfg, text).expect("write config");
}

/// `Basic …` for the test project.
pub fn basic_auth() -> String {
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{LOGIN}:{SECRET}"));
    format!("Basic {token}")
}

/// Two clients that stall mid-request, on connections of their own: one
/// sent half a request head; the other a create's whole head (as the test
/// project) and the first bytes of a body 100 bytes long.
pub fn stalled_requests(http: SocketAddr) -> (std::net::TcpStream, std::net::TcpStream) {
    use std::io::Write;
    let mut half_head = std::net::TcpStream::connect(http).expect("connect");
    half_head
        .write_all(b"POST /v1/verifications HTTP/1.1\r\nHost: flashcall\r\n")
        .expect("write");
    let mut short_body = std::net::TcpStream::connect(http).expect("connect");
    write!(short_body, "{}{{\"phone\":", create_head(100)).expect("write");
    (half_head, short_body)
}

/// The head of a create as the test project, announcing a JSON body of
/// `content_length` bytes.
pub fn create_head(content_length: usize) -> String {
    format!(
        "POST /v1/verifications HTTP/1.1\r\nHost: flashcall\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n",
        basic_auth()
    )
}

/// Bytes the kernel holds unread on the server's end of the TCP
/// connection from `client` (the client socket's local address) to
/// `server`, from /proc/net/tcp: 0 once the server has read all the client
/// sent. `None` if no such connection is listed. IPv4 only.
pub fn tcp_unread(server: SocketAddr, client: SocketAddr) -> Option<u64> {
    // "sl local_address rem_address st tx_queue:rx_queue ...", addresses as
    // the raw network-order word in hex (127.0.0.1 is 0100007F on x86).
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => String::new(),
    };
    let (local, remote) = (hex(server), hex(client));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(1) != Some(&local.as_str()) || f.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let rx = f.get(4)?.split(':').nth(1)?;
        u64::from_str_radix(rx, 16).ok()
    })
}

/// Waits (at most 10 s) until the engine at `server` has read everything
/// each of `clients` sent (so a stalled request is in the engine's hands,
/// not the kernel's).
pub fn wait_read_by_server(server: SocketAddr, clients: &[&std::net::TcpStream]) {
    let end = Instant::now() + Duration::from_secs(10);
    for c in clients {
        let local = c.local_addr().expect("local addr");
        while tcp_unread(server, local) != Some(0) {
            assert!(
                Instant::now() < end,
                "the engine has not read what {local} sent: {:?} bytes unread",
                tcp_unread(server, local)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

pub const SANDBOX: &str = "[sandbox]\nenabled = true\n";

/// A per-test directory under cargo's test tmpdir.
pub fn test_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("serve-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn addr_after(line: &str, key: &str) -> Option<SocketAddr> {
    let i = line.find(key)?;
    line[i + key.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Engine {
    /// Starts `flashcall serve --config <config>` and waits (at most 20 s)
    /// for the "flashcall serving" line.
    pub fn start(config: &Path) -> Engine {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Engine {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flashcall"))
            .args(["serve", "--config"])
            .arg(config)
            .env("FLASHCALL_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run flashcall serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let log_done = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        {
            let log = log.clone();
            let log_done = log_done.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stderr);
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    // The line goes into the log before `start` is told, so
                    // a test that reads the log once `start` returns sees
                    // every line up to and including "flashcall serving".
                    log.lock().unwrap().push_str(&line);
                    if line.contains("flashcall serving") {
                        let _ = tx.send(line.clone());
                    }
                    line.clear();
                }
                log_done.store(true, Ordering::Release);
            });
        }
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!("engine did not start; its log:\n{}", log.lock().unwrap());
            }
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Engine {
            child,
            http: addr_after(&line, "http=").expect("http= in the serving line"),
            metrics: addr_after(&line, "metrics=").expect("metrics= in the serving line"),
            sip: addr_after(&line, "sip=").expect("sip= in the serving line"),
            log,
            log_done,
            agent,
            dir: config.parent().unwrap_or(Path::new(".")).to_path_buf(),
        }
    }

    /// Any request. `auth` is (login, secret) for HTTP Basic.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        auth: Option<(&str, &str)>,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Resp {
        use base64::Engine as _;
        let url = format!("http://{}{}", self.http, path);
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        if let Some((l, s)) = auth {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{l}:{s}"));
            req = req.header("authorization", format!("Basic {token}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = match body {
            Some(b) => self.agent.run(req.body(b.to_vec()).expect("request")),
            None => self.agent.run(req.body(()).expect("request")),
        }
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let status = resp.status().as_u16();
        let content_type = header("content-type").unwrap_or_default();
        let retry_after = header("retry-after");
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut body = String::new();
        resp.into_body()
            .into_reader()
            .read_to_string(&mut body)
            .expect("response body");
        Resp {
            status,
            content_type,
            retry_after,
            headers,
            body,
        }
    }

    /// POST JSON as the test project.
    pub fn post(&self, path: &str, body: &Value) -> Resp {
        self.post_as((LOGIN, SECRET), path, body, &[])
    }

    pub fn post_as(
        &self,
        auth: (&str, &str),
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut h = vec![("content-type", "application/json")];
        h.extend_from_slice(headers);
        self.request(
            "POST",
            path,
            Some(auth),
            &h,
            Some(body.to_string().as_bytes()),
        )
    }

    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path, Some((LOGIN, SECRET)), &[], None)
    }

    /// Creates a verification; asserts 201 and returns the object.
    pub fn create(&self, body: Value) -> Value {
        let r = self.post("/v1/verifications", &body);
        assert_eq!(r.status, 201, "create {body}: {}", r.body);
        r.json()
    }

    /// Polls the verification until `done(status)` or `limit`.
    pub fn wait_status(&self, id: &str, limit: Duration, done: impl Fn(&str) -> bool) -> Value {
        let end = Instant::now() + limit;
        loop {
            let v = self.get(&format!("/v1/verifications/{id}")).json();
            if done(v["status"].as_str().unwrap_or("")) || Instant::now() >= end {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls until the call has an outcome (status left pending/calling).
    pub fn wait_call_done(&self, id: &str) -> Value {
        self.wait_status(id, Duration::from_secs(10), |s| {
            !matches!(s, "pending" | "calling")
        })
    }

    /// The Prometheus text of /metrics.
    pub fn metrics_text(&self) -> String {
        let url = format!("http://{}/metrics", self.metrics);
        let mut resp = self.agent.get(&url).call().expect("GET /metrics");
        assert_eq!(resp.status().as_u16(), 200);
        resp.body_mut().read_to_string().expect("metrics body")
    }

    /// Sends SIGTERM and waits (at most `limit`) for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        self.send_sigterm();
        self.wait_exit(limit)
    }

    /// Sends SIGTERM and returns at once.
    pub fn send_sigterm(&self) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Waits (at most `limit`) for the exit status, the log complete.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                // The process is gone, but its last lines may still be in
                // the pipe: wait (within `limit`) until the reader has
                // them, so the log a caller reads next is complete.
                while !self.log_done.load(Ordering::Acquire) && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The engine's process id (for /proc figures in the load benchmark).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `id` of a verification object.
pub fn id_of(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id: {v}"))
        .to_string()
}
