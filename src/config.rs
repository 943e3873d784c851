//! `flashcall.toml` -> a validated, typed [`Config`] (SPEC §2).
//!
//! Every key has a default, so a config names only what it changes; an
//! unknown key is an error naming it (serde's `deny_unknown_fields`, whose
//! message toml prefixes with the line and column). Checks that serde cannot
//! express (ranges, cross-key rules such as "sandbox with a real trunk") run
//! in [`Config::validate`] and name the key they reject.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

use crate::sip::CallerId;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config {0}: {1}")]
    Parse(PathBuf, String),
    #[error("config {file}: {key}: {problem}")]
    Invalid {
        file: PathBuf,
        key: String,
        problem: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub metrics: MetricsConfig,
    pub sip: SipConfig,
    pub trunks: Vec<TrunkConfig>,
    pub call: CallConfig,
    pub pool: PoolConfig,
    pub verification: VerificationConfig,
    pub limits: LimitsConfig,
    pub store: StoreConfig,
    pub projects: Vec<ProjectConfig>,
    pub sandbox: SandboxConfig,
    pub shutdown: ShutdownConfig,
    pub webhooks: WebhooksConfig,
    /// The config named no `[[projects]]` and got the built-in demo
    /// project ([`DEMO_LOGIN`], secret `demo-secret`); `serve` warns.
    #[serde(skip)]
    pub demo_project: bool,
}

/// The login of the built-in demo project (SPEC §2's example).
pub const DEMO_LOGIN: &str = "demo";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Requests whose body is larger get 413 (SPEC §5: 16 KiB).
    pub max_body_bytes: usize,
    /// Threads of the HTTP runtime; 0 (the default) is one per CPU core but
    /// one, and at least one: the store writer (and the SIP driver, when on
    /// a thread of its own) need the core left over, and at 4,000 creates/s on 2 cores one HTTP thread
    /// used ~7 µs less CPU per verification than two, with a lower create
    /// p99 (fewer wake-ups handing work between idle workers).
    pub workers: usize,
    /// A connection's next request head must arrive within this (an idle
    /// keep-alive connection is closed after it too), and a request's body
    /// within this once its head is in. Without it, a client that sends
    /// half a request holds its connection, and a file descriptor, for
    /// ever, and a shutdown waits for it. 30 s is hyper's own default.
    pub read_timeout_ms: u64,
    /// A response write that makes no progress for this long (the client
    /// stopped reading: its receive window and our send buffer are full)
    /// closes the connection. Without it, a client that stops reading a
    /// CSV export holds the connection, the export's blocking thread and
    /// its database read snapshot for ever.
    pub write_timeout_ms: u64,
}

impl Config {
    /// Whether the SIP driver runs on the HTTP runtime, which has
    /// `workers` worker threads (`sip.thread` resolved; see [`SipThread`]).
    pub fn sip_shares_http(&self, workers: usize) -> bool {
        match self.sip.thread {
            SipThread::Own => false,
            SipThread::Shared => true,
            SipThread::Auto => {
                workers == 1
                    && self.sip.realtime_priority == 0
                    && self.sip.batch_window_us <= SHARE_WINDOW_MAX_US
            }
        }
    }
}

impl HttpConfig {
    /// `workers`, with 0 resolved for this machine.
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_sub(1).max(1)
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: ([127, 0, 0, 1], 8080).into(),
            max_body_bytes: 16 * 1024,
            workers: 0,
            read_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: ([127, 0, 0, 1], 9100).into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SipConfig {
    pub listen: SocketAddr,
    pub public_host: String,
    pub user_agent: String,
    /// Under load, how long the SIP thread lets datagrams gather before it
    /// takes them in one go (src/io/udp.rs). Longer saves CPU, shorter cuts
    /// the 180 -> CANCEL delay; 0 handles every datagram as it arrives.
    ///
    /// Why 500 µs by default (1 ms until session 10): a 180 waits up to a
    /// window for its CANCEL, and the phone rings meanwhile (the longer it
    /// rings, the likelier a user answers, and an answered call is billed).
    /// Load bench, 4,000/s for 60 s, one run each on the session-10 VM:
    /// 180 -> CANCEL p99 0.69 ms with 500 µs, 1.87 ms with 1 ms (issue 5
    /// asks for 1 ms); the SIP thread's CPU 30.1 vs 31.0 µs per call there,
    /// and in 20 s runs 27–33 vs 23–24 µs; at 1,000/s 74.5 vs 52.0 µs (twice
    /// the wake-ups, each carrying fewer calls). `dial`, a load tool with
    /// no such target, keeps 1 ms (`io::udp::COALESCE`).
    pub batch_window_us: u32,
    /// 1-99 runs the SIP thread under SCHED_FIFO at that priority, so on a
    /// busy machine it gets a CPU as soon as a datagram or tick is due
    /// (needs CAP_SYS_NICE; without it the engine warns and runs normally).
    /// 0, the default, leaves it an ordinary thread.
    pub realtime_priority: u8,
    /// Where the SIP driver runs; see [`SipThread`].
    pub thread: SipThread,
}

/// `sip.thread`: the SIP driver on a thread of its own, or as a task of
/// the HTTP runtime.
///
/// Why sharing is the default on a small machine: on the 2-vCPU VM of the
/// load bench a thread's wake-up costs 15-30 µs of CPU when another CPU
/// does the waking, under 1 µs on the same one (`cargo bench --bench
/// wake`), and wake-ups were most of the engine's CPU. With one HTTP
/// worker the SIP driver's batch-window sleep then blocks that worker on
/// purpose: requests that arrive meanwhile wait for the same tick as the
/// datagrams, one wake-up serves both, and handing a call from a create to
/// the driver is a call within the thread. Measured (load bench, 20 s
/// runs, two alternating pairs): 137-138 µs of engine CPU per verification
/// at 1,000/s against 154-159 with a thread of its own, 58.9-63.0 against
/// 64.8-65.5 at 4,000/s; 180 -> CANCEL p99 0.75 against 0.71-0.72 ms,
/// create p99 6.4-6.5 against 6.1-6.3 ms. The price: HTTP handlers and the
/// driver take turns, so a burst of requests delays the next tick (and a
/// create waits up to a window more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SipThread {
    /// `shared` when the HTTP runtime has one worker, `realtime_priority`
    /// is 0 and `batch_window_us` at most [`SHARE_WINDOW_MAX_US`]; `own`
    /// otherwise (with several workers the driver would block one of them
    /// and its queued tasks a window at a time, SCHED_FIFO needs a thread
    /// of the driver's own, and a long window would hold every request,
    /// scrape and timer of the HTTP side that long under load).
    #[default]
    Auto,
    Shared,
    Own,
}

/// The longest `sip.batch_window_us` under which `sip.thread = "auto"`
/// shares the HTTP worker: 1 ms, the most a request should wait for a tick.
pub const SHARE_WINDOW_MAX_US: u32 = 1_000;

/// The most `limits.per_phone.max` may be.
pub const MAX_SENDS_PER_PHONE: u32 = 1_000;

impl Default for SipConfig {
    fn default() -> Self {
        SipConfig {
            listen: ([127, 0, 0, 1], 5060).into(),
            public_host: "127.0.0.1".into(),
            user_agent: "flashcall".into(),
            batch_window_us: 500,
            realtime_priority: 0,
            thread: SipThread::Auto,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrunkConfig {
    pub name: String,
    /// `host:port`, resolved once at start.
    pub address: String,
    /// INVITEs per second to this trunk.
    pub cps: u32,
    /// INVITEs allowed to wait for a CPS slot; past that, 503 `overloaded`.
    pub queue: u32,
    /// Share of new calls among healthy trunks.
    pub weight: u32,
    pub username: String,
    pub password: String,
    pub caller_id: CallerId,
}

impl Default for TrunkConfig {
    fn default() -> Self {
        // SPEC §2's own: a config may name only what it changes, and one
        // `[[trunks]]` with just its address is a whole trunk.
        TrunkConfig {
            name: "main".into(),
            address: "127.0.0.1:5070".into(),
            cps: 50,
            queue: 0,
            weight: 1,
            username: String::new(),
            password: String::new(),
            caller_id: CallerId::From,
        }
    }
}

impl TrunkConfig {
    /// Queue length: configured, or 10 s worth of CPS.
    pub fn queue_len(&self) -> usize {
        if self.queue > 0 {
            self.queue as usize
        } else {
            (self.cps as usize).saturating_mul(10)
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallConfig {
    pub ring_ms: u64,
    pub ring_timeout_ms: u64,
}

impl Default for CallConfig {
    fn default() -> Self {
        CallConfig {
            ring_ms: 0,
            ring_timeout_ms: 15_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub file: PathBuf,
    pub code_length: u8,
    pub number_cooldown_ms: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            file: "config/numbers.txt".into(),
            code_length: 4,
            number_cooldown_ms: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerificationConfig {
    pub ttl_secs: u64,
    /// The longest `ttl_secs` a create may ask for.
    pub max_ttl_secs: u64,
    pub max_attempts: u32,
    /// Destinations starting with one of these skip the per-country validity
    /// check (they still must be strict E.164). For number ranges reserved
    /// for tests and fiction, such as Ofcom's +447700900xxx, which the
    /// phone-number metadata rightly calls invalid.
    ///
    /// By default Ofcom's drama range ([`DRAMA_PREFIX`]): SPEC §5's own
    /// example create uses +447700900123, and a config that names only
    /// what it changes (SPEC §2) must still take it. Such numbers reach
    /// no real phone (a trunk answers 404, outcome `invalid_number`); an
    /// operator who wants them refused sets `allow_prefixes = []`.
    pub allow_prefixes: Vec<String>,
}

impl Default for VerificationConfig {
    fn default() -> Self {
        VerificationConfig {
            ttl_secs: 300,
            max_ttl_secs: 3600,
            max_attempts: 5,
            allow_prefixes: vec![DRAMA_PREFIX.to_string()],
        }
    }
}

/// The longest `verification.max_ttl_secs` (and so `ttl_secs`): a day.
pub const MAX_TTL_SECS: u64 = 86_400;

/// Ofcom's numbers for drama and examples: +44 7700 900000 to 900999.
pub const DRAMA_PREFIX: &str = "+447700900";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub per_phone: PerPhoneConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PerPhoneConfig {
    /// Sends to one destination allowed per `per_secs` (0 = no limit).
    pub max: u32,
    pub per_secs: u64,
    /// Most destinations tracked at once; idle ones are swept.
    pub max_tracked: usize,
}

impl Default for PerPhoneConfig {
    fn default() -> Self {
        PerPhoneConfig {
            max: 3,
            per_secs: 600,
            max_tracked: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// The SQLite database (its directory is created).
    pub path: PathBuf,
    /// Verifications older than this are pruned in the background.
    pub retention_days: u32,
    /// While the writer is busy (it committed less than this ago, and two
    /// or more creates waited for that commit), the longest a create waits
    /// so that others share its commit. A longer window saves CPU (each
    /// commit has a fixed cost), a shorter one cuts create latency; k
    /// clients in lock step get at most about k creates per window
    /// between them. Call-progress updates, which nobody waits for, are
    /// held up to 4 ms or this, whichever is longer. 0 commits every
    /// create at once. See `store::sqlite::COMMIT_WINDOW` for the figures
    /// behind the default.
    pub commit_window_us: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// Durable: SQLite in WAL mode at `path`.
    #[default]
    Sqlite,
    /// Nothing survives a restart (tests, benchmarks).
    Memory,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Sqlite,
            path: "data/flashcall.db".into(),
            retention_days: 30,
            commit_window_us: crate::store::sqlite::COMMIT_WINDOW.as_micros() as u32,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectConfig {
    pub login: String,
    pub secret: Option<String>,
    pub secret_sha256: Option<String>,
    pub rate: u32,
    pub burst: u32,
    pub senders: Vec<SenderConfig>,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
}

impl Default for ProjectConfig {
    fn default() -> Self {
        ProjectConfig {
            login: String::new(),
            secret: None,
            secret_sha256: None,
            rate: 20,
            burst: 40,
            senders: Vec::new(),
            webhook_url: None,
            webhook_secret: None,
        }
    }
}

impl ProjectConfig {
    /// SHA-256 of the secret: what requests are compared against, so a
    /// plain secret and a `secret_sha256` are checked the same way.
    pub fn secret_hash(&self) -> [u8; 32] {
        if let Some(s) = &self.secret {
            return Sha256::digest(s.as_bytes()).into();
        }
        let mut out = [0u8; 32];
        if let Some(h) = &self.secret_sha256 {
            // validate() proved it is 64 hex digits.
            let _ = hex::decode_to_slice(h, &mut out);
        }
        out
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderConfig {
    pub code: String,
    #[serde(default)]
    pub status: SenderStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SenderStatus {
    #[default]
    Active,
    Moderation,
    Inactive,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Resolved at parse: as written, else on exactly when the config
    /// names no `[[trunks]]` (then there is nothing real to call, so it
    /// cannot be on by accident beside a trunk: SPEC §9).
    #[serde(skip)]
    pub enabled: bool,
    /// `enabled` as the file wrote it.
    #[serde(rename = "enabled")]
    pub enabled_set: Option<bool>,
    /// Where the sandbox callee listens (loopback only).
    pub listen: SocketAddr,
    /// Delay before its 180 Ringing.
    pub ring_delay_ms: u64,
    /// CPS of the sandbox trunk.
    pub cps: u32,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            enabled: false,
            enabled_set: None,
            listen: ([127, 0, 0, 1], 0).into(),
            ring_delay_ms: 0,
            cps: 200,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long a SIGTERM waits for in-flight calls to be cancelled, and
    /// for HTTP requests in progress to be answered; connections still
    /// open after it are closed. 0 closes them at the signal; at most 10
    /// minutes.
    pub grace_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace_ms: 5_000 }
    }
}

/// Delivery of project webhooks (SPEC §7).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Per-request timeout; a receiver slower than this counts as failed.
    pub timeout_ms: u64,
    /// An event is retried until this long after it was written (the
    /// issue asks for at least 24 h).
    pub max_age_hours: u64,
    /// Deliveries in flight at once, over all endpoints.
    pub concurrency: usize,
    /// Back-off base: retry n waits a random time up to base * 2^n, capped
    /// at an hour. Small in tests.
    pub retry_base_ms: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            timeout_ms: 5_000,
            max_age_hours: 25,
            concurrency: 8,
            retry_base_ms: 5_000,
        }
    }
}

/// A TOML error as one line (toml's own Display spans several, with a
/// source excerpt): `line L, column C: table.key: message`. The key is read
/// from the line the error points at, under the nearest `[table]` header.
fn one_line(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    let Some(span) = e.span() else {
        return msg;
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('#') && !k.starts_with('['));
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| {
            let inner = l.trim_start_matches('[');
            inner.split(']').next().unwrap_or(inner).trim().to_string()
        });
    match (table, key) {
        (Some(t), Some(k)) => format!("line {line_no}, column {col}: {t}.{k}: {msg}"),
        (None, Some(k)) => format!("line {line_no}, column {col}: {k}: {msg}"),
        (_, None) if line.trim_start().starts_with('[') => {
            format!("line {line_no}, column {col}: {}: {msg}", line.trim())
        }
        _ => format!("line {line_no}, column {col}: {msg}"),
    }
}

/// E.164: `+` then 7 to 15 digits, first digit not 0.
pub fn is_e164(s: &str) -> bool {
    let Some(d) = s.strip_prefix('+') else {
        return false;
    };
    (7..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0')
}

/// `FLASHCALL_PROJECT_<LOGIN>_SECRET`: the login upper-cased, every
/// character outside A-Z0-9 turned into `_`.
pub fn secret_env_var(login: &str) -> String {
    let name: String = login
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("FLASHCALL_PROJECT_{name}_SECRET")
}

/// `FLASHCALL_PROJECT_<LOGIN>_WEBHOOK_SECRET`, named like [`secret_env_var`].
pub fn webhook_secret_env_var(login: &str) -> String {
    let var = secret_env_var(login);
    format!(
        "{}_WEBHOOK_SECRET",
        var.strip_suffix("_SECRET").unwrap_or(&var)
    )
}

/// An absolute http(s) URL with a host.
fn is_http_url(s: &str) -> bool {
    reqwest::Url::parse(s).is_ok_and(|u| {
        matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty())
    })
}

impl Config {
    /// Reads, parses, applies secrets from the environment and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        Self::parse(&text, path, |k| std::env::var(k).ok())
    }

    /// Parses `text` (named `path` in errors); `env` looks up secrets.
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse(path.to_path_buf(), one_line(text, &e)))?;
        cfg.sandbox.enabled = cfg.sandbox.enabled_set.unwrap_or(cfg.trunks.is_empty());
        // No `[[projects]]`: SPEC §2's demo project, so a config that names
        // only what it changes still serves; only with the sandbox (a
        // well-known secret must never place real, billed calls, and a
        // loopback listen may still sit behind a proxy) and on a loopback
        // listen; `serve` warns about it.
        if cfg.projects.is_empty() && cfg.http.listen.ip().is_loopback() && cfg.sandbox.enabled {
            cfg.projects.push(ProjectConfig {
                login: DEMO_LOGIN.into(),
                secret: Some("demo-secret".into()),
                senders: vec![SenderConfig {
                    code: "DEMO".into(),
                    status: SenderStatus::Active,
                }],
                ..ProjectConfig::default()
            });
            cfg.demo_project = true;
        }
        for p in &mut cfg.projects {
            if let Some(s) = env(&secret_env_var(&p.login)) {
                p.secret = Some(s);
                p.secret_sha256 = None;
            }
            if let Some(s) = env(&webhook_secret_env_var(&p.login)) {
                p.webhook_secret = Some(s);
            }
        }
        for t in &mut cfg.trunks {
            let var = format!(
                "FLASHCALL_TRUNK_{}_PASSWORD",
                secret_env_var(&t.name)
                    .trim_start_matches("FLASHCALL_PROJECT_")
                    .trim_end_matches("_SECRET")
            );
            if let Some(s) = env(&var) {
                t.password = s;
            }
        }
        cfg.validate()
            .map_err(|(key, problem)| ConfigError::Invalid {
                file: path.to_path_buf(),
                key,
                problem,
            })?;
        Ok(cfg)
    }

    /// Cross-key and range checks; the error names the key.
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, p: &str| Err((k.to_string(), p.to_string()));
        if self.http.max_body_bytes == 0 {
            return bad("http.max_body_bytes", "must be > 0");
        }
        if self.http.workers > 1024 {
            return bad("http.workers", "must be 0 (one per core but one) to 1024");
        }
        if self.shutdown.grace_ms > 600_000 {
            // It bounds how long a SIGTERM can take: calls and HTTP alike.
            return bad("shutdown.grace_ms", "must be 0 to 600000 (10 minutes)");
        }
        if !(100..=3_600_000).contains(&self.http.read_timeout_ms) {
            return bad("http.read_timeout_ms", "must be 100 to 3600000 (an hour)");
        }
        if !(100..=3_600_000).contains(&self.http.write_timeout_ms) {
            return bad("http.write_timeout_ms", "must be 100 to 3600000 (an hour)");
        }
        if self.sip.public_host.trim().is_empty() {
            return bad("sip.public_host", "must not be empty");
        }
        if self.sip.user_agent.contains(['\r', '\n']) {
            return bad("sip.user_agent", "must be one line");
        }
        if self.sip.batch_window_us > 100_000 {
            return bad("sip.batch_window_us", "must be 0 to 100000 (100 ms)");
        }
        if self.sip.realtime_priority > 99 {
            return bad("sip.realtime_priority", "must be 0 (off) or 1 to 99");
        }
        if self.sip.realtime_priority > 0 && self.sip.thread == SipThread::Shared {
            return bad(
                "sip.realtime_priority",
                "needs sip.thread = \"own\" or \"auto\": SCHED_FIFO is for a thread of the SIP driver's own",
            );
        }
        if self.sandbox.enabled {
            if !self.trunks.is_empty() {
                return bad(
                    "sandbox.enabled",
                    "the sandbox callee cannot run beside real [[trunks]]: remove the trunks or set sandbox.enabled = false",
                );
            }
            if !self.sandbox.listen.ip().is_loopback() {
                return bad("sandbox.listen", "must be a loopback address");
            }
            if self.sandbox.cps == 0 {
                return bad("sandbox.cps", "must be > 0");
            }
        } else if self.trunks.is_empty() {
            return bad(
                "trunks",
                "no [[trunks]] configured and sandbox.enabled is false: nothing to call through",
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.trunks.iter().enumerate() {
            let k = |f: &str| format!("trunks[{i}].{f}");
            if t.name.is_empty() || !t.name.bytes().all(|b| b.is_ascii_graphic()) {
                return bad(&k("name"), "must be a non-empty word");
            }
            if !names.insert(t.name.as_str()) {
                return bad(&k("name"), &format!("{:?} is used twice", t.name));
            }
            if t.name == "sandbox" {
                return bad(&k("name"), "\"sandbox\" is reserved for the sandbox callee");
            }
            if t.address
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return bad(
                    &k("address"),
                    &format!("{:?}: expected host:port", t.address),
                );
            }
            if t.cps == 0 {
                return bad(&k("cps"), "must be > 0");
            }
            if t.weight == 0 {
                return bad(&k("weight"), "must be > 0");
            }
            if t.username.is_empty() != t.password.is_empty() {
                return bad(&k("username"), "username and password go together");
            }
        }
        if !(1..=36_500).contains(&self.store.retention_days) {
            return bad("store.retention_days", "must be 1 to 36500 days");
        }
        if self.store.commit_window_us > 100_000 {
            return bad("store.commit_window_us", "must be 0 to 100000 (100 ms)");
        }
        if self.store.backend == StoreBackend::Sqlite && self.store.path.as_os_str().is_empty() {
            return bad("store.path", "must not be empty");
        }
        if self.call.ring_timeout_ms == 0 {
            return bad("call.ring_timeout_ms", "must be > 0");
        }
        if !(1..=8).contains(&self.pool.code_length) {
            return bad("pool.code_length", "must be 1 to 8 digits");
        }
        // The pool keeps cooldowns in 30 bits of milliseconds (about 12.4
        // days); a longer one was cut to that without a word.
        let max_cooldown = crate::pool::MAX_COOLDOWN.as_millis() as u64;
        if self.pool.number_cooldown_ms > max_cooldown {
            return bad(
                "pool.number_cooldown_ms",
                &format!("must be at most {max_cooldown} (about 12 days)"),
            );
        }
        let v = &self.verification;
        if v.ttl_secs == 0 {
            return bad("verification.ttl_secs", "must be > 0");
        }
        if v.max_ttl_secs < v.ttl_secs {
            return bad("verification.max_ttl_secs", "must be >= ttl_secs");
        }
        // A code that stays checkable for days is no longer a one-time
        // code, and an open verification stays in the store's cache until
        // it expires; the bound also keeps `now + ttl` far from overflow.
        if v.max_ttl_secs > MAX_TTL_SECS {
            return bad(
                "verification.max_ttl_secs",
                &format!("must be at most {MAX_TTL_SECS} (a day)"),
            );
        }
        if v.max_attempts == 0 {
            return bad("verification.max_attempts", "must be > 0");
        }
        for (i, p) in v.allow_prefixes.iter().enumerate() {
            let digits = p.strip_prefix('+').unwrap_or("");
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return bad(
                    &format!("verification.allow_prefixes[{i}]"),
                    &format!("{p:?}: expected '+' then digits"),
                );
            }
        }
        let pp = &self.limits.per_phone;
        if pp.max > 0 && pp.per_secs == 0 {
            return bad("limits.per_phone.per_secs", "must be > 0 when max > 0");
        }
        // A destination keeps the time of each send in its window (8
        // bytes each, limits.rs): `max` bounds what one phone can hold.
        if pp.max > MAX_SENDS_PER_PHONE {
            return bad(
                "limits.per_phone.max",
                &format!("must be at most {MAX_SENDS_PER_PHONE}"),
            );
        }
        if pp.per_secs > 366 * 86_400 {
            return bad(
                "limits.per_phone.per_secs",
                "must be at most 31622400 (a year)",
            );
        }
        if pp.max_tracked == 0 {
            return bad("limits.per_phone.max_tracked", "must be > 0");
        }
        if self.projects.is_empty() {
            return bad(
                "projects",
                "at least one [[projects]] entry is needed (the built-in demo project serves only the sandbox, on a loopback http.listen)",
            );
        }
        let mut logins = std::collections::HashSet::new();
        for (i, p) in self.projects.iter().enumerate() {
            let k = |f: &str| format!("projects[{i}].{f}");
            if p.login.is_empty() || p.login.contains(':') || p.login.chars().any(char::is_control)
            {
                return bad(&k("login"), "must be non-empty, without ':'");
            }
            if !logins.insert(p.login.as_str()) {
                return bad(&k("login"), &format!("{:?} is used twice", p.login));
            }
            match (&p.secret, &p.secret_sha256) {
                (Some(_), Some(_)) => {
                    return bad(&k("secret"), "give secret or secret_sha256, not both")
                }
                (None, None) => {
                    return bad(
                        &k("secret"),
                        &format!(
                            "missing: set secret, secret_sha256 or {}",
                            secret_env_var(&p.login)
                        ),
                    )
                }
                (Some(s), None) if s.is_empty() => return bad(&k("secret"), "must not be empty"),
                (None, Some(h)) if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    return bad(&k("secret_sha256"), "expected 64 hex digits")
                }
                _ => {}
            }
            if p.rate == 0 {
                return bad(&k("rate"), "must be > 0");
            }
            if p.burst == 0 {
                return bad(&k("burst"), "must be > 0");
            }
            match (&p.webhook_url, &p.webhook_secret) {
                (None, None) => {}
                (Some(_), None) => {
                    return bad(
                        &k("webhook_secret"),
                        &format!(
                            "missing: webhook_url needs webhook_secret (or {})",
                            webhook_secret_env_var(&p.login)
                        ),
                    )
                }
                (None, Some(_)) => {
                    return bad(
                        &k("webhook_url"),
                        "missing: webhook_secret needs webhook_url",
                    )
                }
                (Some(url), Some(secret)) => {
                    if !is_http_url(url) {
                        return bad(
                            &k("webhook_url"),
                            &format!("{url:?}: expected an http:// or https:// URL"),
                        );
                    }
                    // The secret itself never goes into the message.
                    if let Err(e) = crate::webhook::decode_secret(secret) {
                        return bad(&k("webhook_secret"), &e.to_string());
                    }
                }
            }
            let mut codes = std::collections::HashSet::new();
            for (j, s) in p.senders.iter().enumerate() {
                if s.code.is_empty() || s.code.len() > 64 {
                    return bad(
                        &k(&format!("senders[{j}].code")),
                        "must be 1 to 64 characters",
                    );
                }
                if !codes.insert(s.code.as_str()) {
                    return bad(
                        &k(&format!("senders[{j}].code")),
                        &format!("{:?} is used twice", s.code),
                    );
                }
            }
        }
        let w = &self.webhooks;
        if w.timeout_ms == 0 {
            return bad("webhooks.timeout_ms", "must be > 0");
        }
        if w.max_age_hours == 0 {
            return bad("webhooks.max_age_hours", "must be > 0");
        }
        if w.concurrency == 0 {
            return bad("webhooks.concurrency", "must be > 0");
        }
        if w.retry_base_ms == 0 {
            return bad("webhooks.retry_base_ms", "must be > 0");
        }
        Ok(())
    }

    /// The shipped default config path.
    pub fn default_path() -> PathBuf {
        PathBuf::from("config/flashcall.toml")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        [sandbox]
        enabled = true
        [[projects]]
        login = "demo"
        secret = "s"
        senders = [{ code = "DEMO", status = "active" }]
    "#;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("t.toml"), |_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.http.listen.port(), 8080);
        assert_eq!(c.verification.ttl_secs, 300);
        assert_eq!(c.pool.code_length, 4);
        assert_eq!(c.limits.per_phone.max, 3);
        assert_eq!(c.projects[0].rate, 20);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse(&format!("{MIN}\n[call]\nring_mss = 3\n")).unwrap_err();
        assert!(e.contains("call.ring_mss: unknown field"), "{e}");
        assert!(e.starts_with("config t.toml: line 10, column 1:"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        let e = parse(&format!("{MIN}\n[pool]\ncode_length = \"four\"\n")).unwrap_err();
        assert!(e.contains("pool.code_length: invalid type"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn store_section() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.store.backend, StoreBackend::Sqlite);
        assert_eq!(c.store.retention_days, 30);
        assert_eq!(c.store.path, PathBuf::from("data/flashcall.db"));
        assert_eq!(c.store.commit_window_us, 4_000);
        let c = parse(&format!("{MIN}\n[store]\ncommit_window_us = 0\n")).unwrap();
        assert_eq!(c.store.commit_window_us, 0);
        let c = parse(&format!("{MIN}\n[store]\nbackend = \"memory\"\n")).unwrap();
        assert_eq!(c.store.backend, StoreBackend::Memory);
        let e = parse(&format!("{MIN}\n[store]\nretention_days = 0\n")).unwrap_err();
        assert!(e.contains("store.retention_days"), "{e}");
        let e = parse(&format!("{MIN}\n[store]\nbackend = \"postgres\"\n")).unwrap_err();
        assert!(e.contains("store.backend"), "{e}");
    }

    /// SPEC §2: every key has a default, so a config names only what it
    /// changes. An empty config is the sandbox with the demo project; one
    /// `[[trunks]]` with only an address is a whole trunk, named `main`,
    /// and turns the sandbox off; the demo project never answers a
    /// non-loopback listen.
    #[test]
    fn a_config_names_only_what_it_changes() {
        let c = parse("").unwrap();
        assert!(c.sandbox.enabled, "no trunks: the sandbox");
        assert!(c.demo_project);
        assert_eq!(c.projects.len(), 1);
        assert_eq!(c.projects[0].login, DEMO_LOGIN);
        assert_eq!(c.projects[0].secret.as_deref(), Some("demo-secret"));
        assert_eq!(c.projects[0].senders[0].code, "DEMO");
        // Real trunks and no projects: no demo login that places real calls.
        let e = parse("[[trunks]]\naddress = \"127.0.0.1:15070\"\n").unwrap_err();
        assert!(e.contains("projects") && e.contains("sandbox"), "{e}");
        let p = "[[projects]]\nlogin = \"p\"\nsecret = \"s\"\n";
        let c = parse(&format!("{p}[[trunks]]\naddress = \"127.0.0.1:15070\"\n")).unwrap();
        assert!(!c.sandbox.enabled, "a trunk named: no sandbox");
        assert_eq!(c.trunks[0].name, "main");
        assert_eq!(c.trunks[0].cps, 50);
        let c = parse(&format!("{p}[[trunks]]\n")).unwrap();
        assert_eq!(c.trunks[0].address, "127.0.0.1:5070");
        // Two unnamed trunks: the default name twice, named as the problem.
        let e = parse(&format!(
            "{p}[[trunks]]\n[[trunks]]\naddress = \"127.0.0.1:5071\"\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("trunks[1].name") && e.contains("used twice"),
            "{e}"
        );
        // Projects named: no demo project beside them.
        let c = parse(MIN).unwrap();
        assert!(!c.demo_project);
        assert_eq!(c.projects.len(), 1);
        assert_eq!(c.projects[0].secret.as_deref(), Some("s"));
        // A listen off loopback and no projects: refused, naming the key.
        let e = parse("[http]\nlisten = \"0.0.0.0:8080\"\n").unwrap_err();
        assert!(e.contains("projects") && e.contains("loopback"), "{e}");
        // The sandbox asked for beside a trunk is still refused, and
        // turned off with no trunk is still "nothing to call through".
        let e = parse("[sandbox]\nenabled = false\n").unwrap_err();
        assert!(e.contains("nothing to call through"), "{e}");
    }

    #[test]
    fn sandbox_beside_a_real_trunk_is_refused() {
        let e = parse(&format!(
            "{MIN}\n[[trunks]]\nname = \"main\"\naddress = \"10.0.0.1:5060\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("sandbox.enabled"), "{e}");
    }

    #[test]
    fn sip_scheduling_keys() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.sip.batch_window_us, 500);
        assert_eq!(c.sip.realtime_priority, 0);
        let c = parse(&format!(
            "{MIN}\n[sip]\nbatch_window_us = 0\nrealtime_priority = 10\n"
        ))
        .unwrap();
        assert_eq!((c.sip.batch_window_us, c.sip.realtime_priority), (0, 10));
        // SCHED_FIFO keeps the driver on a thread of its own under `auto`.
        assert_eq!(c.sip.thread, SipThread::Auto);
        assert!(!c.sip_shares_http(1));
    }

    #[test]
    fn sip_thread_key() {
        let with = |extra: &str| parse(&format!("{MIN}\n{extra}"));
        let auto = with("").unwrap();
        assert!(auto.sip_shares_http(1), "auto with one worker shares it");
        assert!(
            !auto.sip_shares_http(2),
            "auto with two workers: own thread"
        );
        let long = with("[sip]\nbatch_window_us = 1001\n").unwrap();
        assert!(!long.sip_shares_http(1), "auto with a long window: own");
        let c = with("[sip]\nthread = \"shared\"\n").unwrap();
        assert!(c.sip_shares_http(2));
        let c = with("[sip]\nthread = \"own\"\n").unwrap();
        assert!(!c.sip_shares_http(1));
        let e = with("[sip]\nthread = \"shared\"\nrealtime_priority = 5\n").unwrap_err();
        assert!(e.contains("sip.realtime_priority: needs sip.thread"), "{e}");
        let e = with("[sip]\nthread = \"spare\"\n").unwrap_err();
        assert!(e.contains("sip.thread: unknown variant"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (extra, key) in [
            ("[sip]\nbatch_window_us = 100001", "sip.batch_window_us"),
            (
                "[store]\ncommit_window_us = 100001",
                "store.commit_window_us",
            ),
            ("[http]\nworkers = 1025", "http.workers"),
            ("[http]\nread_timeout_ms = 0", "http.read_timeout_ms"),
            ("[shutdown]\ngrace_ms = 600001", "shutdown.grace_ms"),
            ("[http]\nread_timeout_ms = 3600001", "http.read_timeout_ms"),
            ("[http]\nwrite_timeout_ms = 99", "http.write_timeout_ms"),
            (
                "[http]\nwrite_timeout_ms = 3600001",
                "http.write_timeout_ms",
            ),
            ("[sip]\nrealtime_priority = 100", "sip.realtime_priority"),
            ("[pool]\ncode_length = 0", "pool.code_length"),
            (
                "[verification]\nmax_attempts = 0",
                "verification.max_attempts",
            ),
            (
                "[verification]\nmax_ttl_secs = 86401",
                "verification.max_ttl_secs",
            ),
            (
                "[pool]\nnumber_cooldown_ms = 1073741825",
                "pool.number_cooldown_ms",
            ),
            (
                "[verification]\nallow_prefixes = [\"44\"]",
                "verification.allow_prefixes[0]",
            ),
            (
                "[limits.per_phone]\nper_secs = 0",
                "limits.per_phone.per_secs",
            ),
            ("[limits.per_phone]\nmax = 1001", "limits.per_phone.max"),
            (
                "[limits.per_phone]\nper_secs = 31622401",
                "limits.per_phone.per_secs",
            ),
        ] {
            let e = parse(&format!("{MIN}\n{extra}\n")).unwrap_err();
            assert!(e.contains(key), "{extra}: {e}");
        }
        let e = parse("[sandbox]\nenabled = false\n[[projects]]\nlogin=\"a\"\nsecret=\"b\"")
            .unwrap_err();
        assert!(e.contains(": trunks:"), "{e}");
        let e =
            parse("[[trunks]]\nname=\"a\"\naddress=\"x\"\n[[projects]]\nlogin=\"a\"\nsecret=\"b\"")
                .unwrap_err();
        assert!(e.contains("trunks[0].address"), "{e}");
        let e = parse("[sandbox]\nenabled = true\n[[projects]]\nlogin=\"a\"").unwrap_err();
        assert!(e.contains("FLASHCALL_PROJECT_A_SECRET"), "{e}");
    }

    #[test]
    fn secret_from_environment_wins() {
        let text = "[sandbox]\nenabled = true\n[[projects]]\nlogin=\"shop-1\"\n";
        let c = Config::parse(text, Path::new("t"), |k| {
            (k == "FLASHCALL_PROJECT_SHOP_1_SECRET").then(|| "env-secret".to_string())
        })
        .unwrap();
        assert_eq!(
            c.projects[0].secret_hash(),
            <[u8; 32]>::from(Sha256::digest(b"env-secret"))
        );
    }

    #[test]
    fn secret_sha256_is_used_as_is() {
        let h = hex::encode(Sha256::digest(b"pw"));
        let c = parse(&format!(
            "[sandbox]\nenabled = true\n[[projects]]\nlogin=\"a\"\nsecret_sha256=\"{h}\""
        ))
        .unwrap();
        assert_eq!(
            c.projects[0].secret_hash(),
            <[u8; 32]>::from(Sha256::digest(b"pw"))
        );
    }

    #[test]
    fn webhook_keys_are_checked() {
        let proj = "[sandbox]\nenabled = true\n[[projects]]\nlogin=\"shop-1\"\nsecret=\"s\"\n";
        let ok = "webhook_url = \"https://example.com/hook\"\nwebhook_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n";
        let c = parse(&format!("{proj}{ok}")).unwrap();
        assert_eq!(c.webhooks.timeout_ms, 5_000);
        assert_eq!(c.webhooks.max_age_hours, 25);
        assert_eq!(c.webhooks.concurrency, 8);
        assert_eq!(c.webhooks.retry_base_ms, 5_000);
        for (extra, key) in [
            (
                "webhook_url = \"ftp://x/y\"\nwebhook_secret = \"whsec_c2hvcnQ=\"",
                "projects[0].webhook_url",
            ),
            (
                "webhook_url = \"not a url\"\nwebhook_secret = \"whsec_c2hvcnQ=\"",
                "projects[0].webhook_url",
            ),
            (
                "webhook_url = \"http://h/\"\nwebhook_secret = \"c2hvcnQ=\"",
                "projects[0].webhook_secret",
            ),
            (
                "webhook_url = \"http://h/\"\nwebhook_secret = \"whsec_!!\"",
                "projects[0].webhook_secret",
            ),
            ("webhook_url = \"http://h/\"", "projects[0].webhook_secret"),
            (
                "webhook_secret = \"whsec_c2hvcnQ=\"",
                "projects[0].webhook_url",
            ),
            ("[webhooks]\nconcurrency = 0", "webhooks.concurrency"),
        ] {
            let e = parse(&format!("{proj}{extra}\n")).unwrap_err();
            assert!(e.contains(key), "{extra}: {e}");
            assert!(!e.contains("whsec_!!"), "secret echoed: {e}");
        }
        let e = parse(&format!("{proj}webhook_url = \"http://h/\"\n")).unwrap_err();
        assert!(e.contains("FLASHCALL_PROJECT_SHOP_1_WEBHOOK_SECRET"), "{e}");
        // The secret from the environment.
        let c = Config::parse(
            &format!("{proj}webhook_url = \"http://h/\"\n"),
            Path::new("t"),
            |k| (k == "FLASHCALL_PROJECT_SHOP_1_WEBHOOK_SECRET").then(|| "whsec_c2hvcnQ=".into()),
        )
        .unwrap();
        assert_eq!(
            c.projects[0].webhook_secret.as_deref(),
            Some("whsec_c2hvcnQ=")
        );
    }

    #[test]
    fn shipped_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/flashcall.toml");
        let c = Config::load(&path).unwrap();
        assert!(c.sandbox.enabled);
        assert!(c.trunks.is_empty());
    }
}
