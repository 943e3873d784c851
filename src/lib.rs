//! flashcall: a self-hosted Flash Call phone-verification engine.
//!
//! # Layout
//!
//! - `sip/` — PURE SIP core (no sockets, no clock, no global RNG):
//!   `message` (tolerant zero-copy parser), `render` (requests written from
//!   a call's parts), `endpoint` (the UAC: INVITE/CANCEL/ACK/BYE
//!   transactions and RFC 3261 timers in one slab; a finished call shrinks
//!   to a 128-byte tombstone for Timer D), `ids` (inline numbers, tokens,
//!   Call-ID digits), `timers` (FIFO lanes + heap fallback, one entry per
//!   call), `digest` (MD5 / SHA-256 / SHA-512-256).
//! - `io/` — the only code with sockets and real time: `udp` (the driver
//!   loop feeding the core), `rtp` (early-media sink on the SDP port) and
//!   `http` (the accept loop: read time limit, bounded drain at shutdown).
//! - `config` — `flashcall.toml` into a validated typed `Config`.
//! - `phone` — is a number valid for its country: the `phonenumber`
//!   crate's answer, replayed on its metadata without its general parser
//!   (fast path for strict E.164, the crate itself for anything else).
//! - `pool` — PURE number pool: suffix index, LRU pick, cooldown, coverage.
//! - `limits` — per-project GCRA limits (governor) and per-phone sliding
//!   windows with refunds, swept.
//! - `verification` — PURE verification lifecycle: statuses, check, expiry.
//! - `store/` — the `Store` trait, the in-memory store and the durable
//!   SQLite store (cache + group-commit writer, and `sqlite/queue.rs`, the
//!   writer's job queue).
//! - `report` — PURE statistics and CSV rows: query ranges, per-period
//!   counts, rates and median post-dial delay (`/v1/stats`, the CSV export).
//! - `engine` — the SIP side of `serve`: trunk queues paced by CPS, the
//!   driver (a thread of its own or a task on the HTTP worker:
//!   `sip.thread`), outcomes into the store.
//! - `http` — the API router, handlers, problem+json errors.
//! - `metrics` — every metric name, the recorder, the handles the SIP
//!   driver and the store writer keep.
//! - `sandbox` — the loopback callee behind the default config.
//! - `serve` — wires it all up; graceful shutdown; `check-config`.
//! - `webhook` — Standard Webhooks signing and the outbox delivery worker.
//! - `dial` — the `flashcall dial` command.
//! - `main.rs` — CLI and logging.

pub mod config;
pub mod dial;
pub mod engine;
pub mod http;
pub mod io;
pub mod limits;
pub mod metrics;
pub mod phone;
pub mod pool;
pub mod report;
pub mod sandbox;
pub mod serve;
pub mod sip;
pub mod store;
pub mod verification;
pub mod webhook;
