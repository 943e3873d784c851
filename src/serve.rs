//! `flashcall serve`: loads the config and the pool, binds every listener
//! (so a port in use is one clear error before anything runs), starts the
//! SIP driver (its own thread or a task on the HTTP worker: `sip.thread`),
//! serves HTTP and metrics, and shuts down
//! gracefully on SIGTERM / SIGINT.

use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

use crate::config::Config;
use crate::config::StoreBackend;
use crate::engine::{self, CallSettings, EngineShared, Trunk};
use crate::http::{self, AppState};
use crate::pool::{Pool, PoolError};
use crate::sip::Credentials;
use crate::store::memory::MemoryStore;
use crate::store::sqlite::{OpenError, SqliteStore};
use crate::store::Store;
use crate::webhook::Endpoint;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("pool: {0}")]
    Pool(#[from] PoolError),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{key} {addr}: cannot listen: {err}")]
    Listen {
        key: &'static str,
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error("trunks[{index}].address {address:?}: cannot resolve: {err}")]
    Resolve {
        index: usize,
        address: String,
        err: String,
    },
    #[error("metrics recorder: {0}")]
    Metrics(String),
    #[error("SIP driver: {0}")]
    Sip(String),
    #[error(transparent)]
    Store(#[from] OpenError),
    #[error("store: {0}")]
    StoreTask(String),
}

fn listen_err(key: &'static str, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> ServeError {
    move |err| ServeError::Listen { key, addr, err }
}

/// Loads the pool named by the config and reports its coverage.
pub fn load_pool(cfg: &Config) -> Result<Pool, PoolError> {
    let mut rng = rand::thread_rng();
    let mut pool = Pool::load(&cfg.pool.file, cfg.pool.code_length, &mut rng)?;
    pool.set_cooldown(Duration::from_millis(cfg.pool.number_cooldown_ms));
    Ok(pool)
}

/// Resolves the configured trunks (or the sandbox's) for the engine.
fn trunks(cfg: &Config, sandbox: Option<SocketAddr>) -> Result<Vec<Trunk>, ServeError> {
    if let Some(addr) = sandbox {
        return Ok(vec![Trunk {
            name: "sandbox".into(),
            addr,
            host: addr.to_string(),
            cps: cfg.sandbox.cps,
            queue_cap: (cfg.sandbox.cps as usize).saturating_mul(10),
            weight: 1,
            credentials: None,
            caller_id: Default::default(),
        }]);
    }
    cfg.trunks
        .iter()
        .enumerate()
        .map(|(index, t)| {
            let addr = t
                .address
                .to_socket_addrs()
                .map_err(|e| e.to_string())
                .and_then(|mut a| a.next().ok_or_else(|| "no address".to_string()))
                .map_err(|err| ServeError::Resolve {
                    index,
                    address: t.address.clone(),
                    err,
                })?;
            Ok(Trunk {
                name: t.name.clone(),
                addr,
                host: t.address.clone(),
                cps: t.cps,
                queue_cap: t.queue_len(),
                weight: t.weight,
                credentials: (!t.username.is_empty()).then(|| Credentials {
                    username: t.username.clone(),
                    password: t.password.clone(),
                }),
                caller_id: t.caller_id,
            })
        })
        .collect()
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Where the SIP driver runs (`sip.thread`, config::SipThread).
enum SipRunner {
    Thread(std::thread::JoinHandle<std::io::Result<usize>>),
    Task(tokio::task::JoinHandle<std::io::Result<usize>>),
}

/// Scheduling of the SIP thread, called on it. The timer slack drops from
/// Linux's default 50 µs to 1 µs, so a batch-window sleep ends when asked:
/// the window is the latency budget of every 180 -> CANCEL. With
/// `realtime_priority` set, SCHED_FIFO: on a machine whose cores are all
/// busy, an ordinary thread whose tick is due can wait milliseconds in the
/// run queue (measured at 4,000 calls/s on 2 cores: 180 -> CANCEL p99
/// 2.4 ms with a 1 ms window, 1.4 ms under SCHED_FIFO). Under load the
/// thread sleeps out each window, leaving the CPU to the rest; with window
/// 0, or when a turn's work outlasts the window, only the kernel's
/// real-time throttling (95% of each second by default) bounds it.
/// SCHED_RESET_ON_FORK: a thread it spawns (its runtime's blocking pool)
/// starts as an ordinary thread.
fn sip_thread_scheduling(priority: u8) {
    // SAFETY: prctl(PR_SET_TIMERSLACK) changes only the calling thread's
    // timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong);
    }
    if priority == 0 {
        return;
    }
    // SAFETY: sched_param is plain data; zeroed, then the one field set
    // (libcs differ in its other fields).
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    param.sched_priority = i32::from(priority);
    let policy = libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK;
    // SAFETY: sched_setscheduler(0, ..) changes only the calling thread's
    // scheduling; `param` outlives the call.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc == 0 {
        tracing::info!(priority, "SIP thread runs under SCHED_FIFO");
    } else {
        tracing::warn!(
            priority,
            error = %std::io::Error::last_os_error(),
            "sip.realtime_priority: the OS refused SCHED_FIFO (it needs CAP_SYS_NICE or an RLIMIT_RTPRIO that allows the priority); the SIP thread runs as an ordinary thread"
        );
    }
}

/// Loads the config, builds the HTTP runtime with `http.workers` threads
/// and runs the engine on it until SIGTERM / SIGINT.
pub fn run_blocking(config_path: &Path) -> Result<(), ServeError> {
    let cfg = Config::load(config_path)?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // `workers = 0` leaves an operator's TOKIO_WORKER_THREADS in charge.
    if cfg.http.workers > 0 || std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(cfg.http.worker_threads());
    }
    let runtime = builder.enable_all().build().map_err(ServeError::Runtime)?;
    runtime.block_on(run(cfg))
}

/// Runs the engine until SIGTERM / SIGINT.
pub async fn run(cfg: Config) -> Result<(), ServeError> {
    let pool = load_pool(&cfg)?;
    let covered = pool.covered_suffixes();
    let total = 10usize.pow(u32::from(cfg.pool.code_length));
    if covered < total {
        tracing::warn!(
            covered,
            total,
            "the pool covers only part of the code suffixes: codes are easier to guess"
        );
    }
    tracing::info!(
        numbers = pool.len(),
        covered,
        total,
        file = %cfg.pool.file.display(),
        "number pool loaded"
    );

    let prom = crate::metrics::install().map_err(|e| ServeError::Metrics(e.to_string()))?;

    let http_listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .map_err(listen_err("http.listen", cfg.http.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(cfg.metrics.listen)
        .await
        .map_err(listen_err("metrics.listen", cfg.metrics.listen))?;
    let sip_socket = std::net::UdpSocket::bind(cfg.sip.listen)
        .map_err(listen_err("sip.listen", cfg.sip.listen))?;
    sip_socket
        .set_nonblocking(true)
        .map_err(listen_err("sip.listen", cfg.sip.listen))?;
    let sip_addr = sip_socket
        .local_addr()
        .map_err(listen_err("sip.listen", cfg.sip.listen))?;

    let sandbox = if cfg.sandbox.enabled {
        let sb = crate::sandbox::spawn(crate::sandbox::SandboxConfig {
            bind: cfg.sandbox.listen,
            ring_delay: Duration::from_millis(cfg.sandbox.ring_delay_ms),
        })
        .await
        .map_err(listen_err("sandbox.listen", cfg.sandbox.listen))?;
        tracing::warn!(
            addr = %sb.addr,
            "SANDBOX: calls go to the built-in loopback callee, no phone rings; \
             configure [[trunks]] (and no sandbox.enabled = true) for real calls"
        );
        Some(sb)
    } else {
        None
    };
    let trunks = trunks(&cfg, sandbox.as_ref().map(|s| s.addr))?;

    if cfg.demo_project {
        tracing::warn!(
            "no [[projects]] configured: the built-in demo project is on (login \"demo\", \
             secret \"demo-secret\", sender DEMO), beside the sandbox on this loopback \
             listen only; name your own [[projects]] for real clients"
        );
    }
    let projects: Vec<String> = cfg.projects.iter().map(|p| p.login.clone()).collect();
    let trunk_names: Vec<String> = trunks.iter().map(|t| t.name.clone()).collect();
    crate::metrics::describe(&projects, &trunk_names);
    crate::metrics::pool(pool.len(), pool.coverage_ratio());

    // Opened before any listener serves: a database we refuse (not
    // SQLite, corrupt, newer schema) stops serve with one line.
    let endpoints = webhook_endpoints(&cfg);
    let hooks: std::collections::HashSet<String> = endpoints.keys().cloned().collect();
    let (store, wake): (Arc<dyn Store>, _) = match cfg.store.backend {
        StoreBackend::Sqlite => {
            let path = cfg.store.path.clone();
            let window = Duration::from_micros(cfg.store.commit_window_us.into());
            // Loading the live records reads the disk: off the async workers.
            let s = tokio::task::spawn_blocking(move || {
                SqliteStore::open_with_window(&path, hooks, window)
            })
            .await
            .map_err(|e| ServeError::StoreTask(format!("opening panicked: {e}")))??;
            let wake = s.outbox_wake();
            (Arc::new(s), wake)
        }
        // Memory: records are kept an hour past their TTL.
        StoreBackend::Memory => {
            let m = MemoryStore::new(3_600_000, hooks);
            let wake = m.outbox_wake();
            (Arc::new(m), wake)
        }
    };
    let webhooks = (!endpoints.is_empty()).then(|| {
        tracing::info!(
            projects = endpoints.len(),
            "webhook delivery worker started"
        );
        tokio::spawn(crate::webhook::run(
            store.clone(),
            endpoints,
            webhook_settings(&cfg),
            wake,
        ))
    });
    let shared = Arc::new(EngineShared::new(trunks));
    let settings = CallSettings {
        ring: Duration::from_millis(cfg.call.ring_ms),
        ring_timeout: Duration::from_millis(cfg.call.ring_timeout_ms),
        shutdown_grace: Duration::from_millis(cfg.shutdown.grace_ms),
        batch_window: Duration::from_micros(u64::from(cfg.sip.batch_window_us)),
    };
    let realtime = cfg.sip.realtime_priority;
    let sip_thread = {
        let shared = shared.clone();
        let store = store.clone();
        let public_host = cfg.sip.public_host.clone();
        let user_agent = cfg.sip.user_agent.clone();
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        if cfg.sip_shares_http(workers) {
            tracing::info!("the SIP driver runs on the HTTP worker (sip.thread)");
            SipRunner::Task(tokio::spawn(async move {
                // Linux's default timer slack (50 µs) here, not the own
                // thread's 1 µs: with 1 µs the worker woke more often, 126
                // / 62.6 µs of engine CPU per verification at 1,000 /
                // 4,000/s against 117.5-118.5 / 59.0-60.9 (load bench, 20 s
                // runs, with the store writer's tick of the same commit),
                // for the same 180 -> CANCEL p99 (0.74-0.75 ms).
                let socket = tokio::net::UdpSocket::from_std(sip_socket)?;
                engine::run(socket, &public_host, &user_agent, shared, store, settings).await
            }))
        } else {
            SipRunner::Thread(
                std::thread::Builder::new()
                    .name("flashcall-sip".into())
                    .spawn(move || -> std::io::Result<usize> {
                        sip_thread_scheduling(realtime);
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()?;
                        rt.block_on(async move {
                            let socket = tokio::net::UdpSocket::from_std(sip_socket)?;
                            engine::run(socket, &public_host, &user_agent, shared, store, settings)
                                .await
                        })
                    })
                    .map_err(|e| ServeError::Sip(e.to_string()))?,
            )
        }
    };

    let state = Arc::new(AppState::new(&cfg, pool, store.clone(), shared.clone()));
    // The phone metadata before the first request, not in it: "flashcall
    // serving" (below) must mean full speed. Decoded beside the first
    // requests (~120 ms on the bench machine), it held up every create of
    // the first ~100 ms after start: at 4,000/s each took over 10 ms, up
    // to 111 ms (load bench). On a blocking thread, so the SIP thread and
    // the store, already running, are not held up.
    let t0 = std::time::Instant::now();
    match tokio::task::spawn_blocking(crate::phone::init).await {
        Ok(()) => tracing::info!(ms = t0.elapsed().as_millis() as u64, "phone metadata ready"),
        Err(e) => tracing::warn!(
            error = %e,
            "phone metadata: initialisation failed; the first create will retry it"
        ),
    }

    let retention_ms = i64::from(cfg.store.retention_days) * 86_400_000;
    let housekeeping = tokio::spawn(housekeeping(state.clone(), prom.clone(), retention_ms));
    let metrics_addr = local(&metrics_listener, cfg.metrics.listen);
    let metrics_app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let prom = prom.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    prom.render(),
                )
            }
        }),
    );
    let limits = crate::io::http::Limits {
        header_timeout: Duration::from_millis(cfg.http.read_timeout_ms),
        write_timeout: Duration::from_millis(cfg.http.write_timeout_ms),
        min_send_bytes: crate::io::http::min_send_bytes(cfg.http.write_timeout_ms),
        drain: Duration::from_millis(cfg.shutdown.grace_ms),
    };
    // Scrapes are not drained: the task is aborted at exit.
    let metrics_server = tokio::spawn(crate::io::http::serve(
        metrics_listener,
        metrics_app,
        limits,
        std::future::pending(),
    ));

    // The bound addresses (a port of 0 in the config is resolved here):
    // tests and scripts read this line to find the engine.
    tracing::info!(
        http = %local(&http_listener, cfg.http.listen),
        metrics = %metrics_addr,
        sip = %sip_addr,
        "flashcall serving"
    );
    let stop = shared.clone();
    // The drain and the SIP driver's grace both start at the signal, so a
    // shutdown takes at most the grace (and the last commit) in all.
    let cut = crate::io::http::serve(http_listener, http::router(state), limits, async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested: no new requests");
        stop.shutdown();
    })
    .await;
    if cut > 0 {
        tracing::warn!(
            connections = cut,
            "shutdown grace ended with HTTP connections still open (a request in progress, or half of one); closed them"
        );
    }
    shared.shutdown();
    let left = match sip_thread {
        SipRunner::Thread(t) => tokio::task::spawn_blocking(move || t.join())
            .await
            .map_err(|e| ServeError::Sip(e.to_string()))?
            .map_err(|_| ServeError::Sip("the SIP thread panicked".into()))?,
        SipRunner::Task(t) => t.await.map_err(|e| ServeError::Sip(e.to_string()))?,
    }
    .map_err(|e| ServeError::Sip(e.to_string()))?;
    if left > 0 {
        tracing::warn!(
            calls = left,
            "shutdown grace ended with calls still in flight"
        );
    } else {
        tracing::info!("every call in flight was closed");
    }
    housekeeping.abort();
    if let Some(w) = webhooks {
        // Undelivered events stay in the store's outbox: the durable store
        // resumes them on the next start.
        w.abort();
    }
    metrics_server.abort();
    // The SIP driver's last outcomes are queued: commit them before exit.
    if let Err(e) = store.flush().await {
        tracing::error!(error = %e, "store: final flush failed");
    }
    drop(sandbox);
    Ok(())
}

/// The projects with a webhook, keyed by login. validate() proved each
/// has a URL and a decodable secret.
fn webhook_endpoints(cfg: &Config) -> HashMap<String, Arc<Endpoint>> {
    cfg.projects
        .iter()
        .filter_map(|p| {
            let url = p.webhook_url.clone()?;
            let key = crate::webhook::decode_secret(p.webhook_secret.as_deref()?).ok()?;
            Some((
                p.login.clone(),
                Arc::new(Endpoint {
                    url,
                    key,
                    disabled: AtomicBool::new(false),
                }),
            ))
        })
        .collect()
}

fn webhook_settings(cfg: &Config) -> crate::webhook::Settings {
    let w = &cfg.webhooks;
    crate::webhook::Settings {
        timeout: Duration::from_millis(w.timeout_ms),
        max_age_ms: i64::try_from(w.max_age_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX),
        concurrency: w.concurrency,
        retry_base_ms: w.retry_base_ms,
        // The "5 s * 2^n capped at 1 h".
        retry_cap_ms: 3_600_000,
        poll: Duration::from_millis(200),
    }
}

fn local(l: &tokio::net::TcpListener, configured: SocketAddr) -> SocketAddr {
    l.local_addr().unwrap_or(configured)
}

/// Rows deleted per prune transaction: small enough that the writer (and
/// the creates waiting on it) is never held for long.
const PRUNE_BATCH: usize = 1_000;

/// Once a second: expire verifications past their TTL; every 10 s, and
/// every second while `limits.per_phone.max_tracked` is reached: forget
/// idle limiter keys; every second: report how many are tracked; every
/// 10 s: run the metrics exporter's upkeep; every 60 s: prune records
/// older than the retention.
async fn housekeeping(st: Arc<AppState>, prom: PrometheusHandle, retention_ms: i64) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        // Off the async workers: on the durable store most due records are
        // no longer in memory, so the sweep reads each one from SQLite
        // (thousands a second at high rates) and must not hold up HTTP.
        let store = st.store.clone();
        match tokio::task::spawn_blocking(move || store.expire_due(engine::now_ms())).await {
            Ok(Ok(expired)) => {
                for v in expired {
                    crate::metrics::verification(&v.project, v.status);
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "expiry sweep failed"),
            Err(e) => tracing::error!(error = %e, "expiry sweep panicked"),
        }
        if n % 10 == 0 || st.limits.at_cap() {
            // Also off the async workers: the sweep visits every tracked
            // destination (240,000 after a minute at 4,000/s: 0.74 ms warm
            // in `cargo bench --bench serve`, more with cold caches; up to
            // the cap, a million by default), and the one HTTP thread
            // would answer nothing meanwhile.
            let sweeper = st.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || sweeper.limits.sweep()).await {
                tracing::error!(error = %e, "per-phone limiter sweep panicked");
            }
        }
        crate::metrics::limiter_tracked(st.limits.tracked_phones());
        if n % 10 == 0 {
            prom.run_upkeep();
        }
        if n % 60 == 1 {
            prune(&st, engine::now_ms().saturating_sub(retention_ms)).await;
        }
    }
}

/// Deletes everything created before `before_ms`, one batch per
/// transaction, yielding between batches.
async fn prune(st: &Arc<AppState>, before_ms: i64) {
    let mut total = 0usize;
    loop {
        let store = st.store.clone();
        // prune blocks until its batch is committed: not on a worker.
        let r = tokio::task::spawn_blocking(move || store.prune(before_ms, PRUNE_BATCH)).await;
        match r {
            Ok(Ok(n)) => {
                total += n;
                if n < PRUNE_BATCH {
                    break;
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "retention prune failed");
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, "retention prune panicked");
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    if total > 0 {
        tracing::info!(deleted = total, "retention: old verifications pruned");
    }
}

/// `flashcall check-config`: the config and the pool, with coverage.
pub fn check_config(path: &Path) -> Result<String, ServeError> {
    let cfg = Config::load(path)?;
    let pool = load_pool(&cfg)?;
    let total = 10usize.pow(u32::from(cfg.pool.code_length));
    let mut out = format!(
        "config {} is valid\npool {}: {} numbers, {} of {} code suffixes covered ({:.1}%)\n",
        path.display(),
        cfg.pool.file.display(),
        pool.len(),
        pool.covered_suffixes(),
        total,
        pool.coverage_ratio() * 100.0
    );
    if pool.covered_suffixes() < total {
        out.push_str("warning: not every code can be served; engine-chosen codes are drawn from the covered ones only\n");
    }
    if cfg.sandbox.enabled {
        out.push_str("sandbox: ON (calls go to the built-in loopback callee; no phone rings)\n");
    } else {
        for t in &cfg.trunks {
            out.push_str(&format!(
                "trunk {}: {} at {} CPS\n",
                t.name, t.address, t.cps
            ));
        }
    }
    Ok(out)
}
