//! flashcall: a self-hosted Flash Call phone-verification engine.
//!
//! # Layout
//!
//! - `sip/` — PURE SIP core (no sockets, no clock, no global RNG):
//!   `message` (tolerant zero-copy parser), `render` (request templates),
//!   `endpoint` (the UAC: INVITE/CANCEL/ACK/BYE transactions and RFC 3261
//!   timers in one slab + timer heap), `digest` (MD5 / SHA-256 / SHA-512-256).
//! - `io/` — the only code with sockets and real time: `udp` (the driver
//!   loop feeding the core) and `rtp` (early-media sink on the SDP port).
//! - `dial` — the `flashcall dial` command.
//! - `sandbox` — the in-process sandbox callee (SPEC §9): a pure UAS core
//!   (100/180, CANCEL -> 200 + 487, magic failure numbers) and its small
//!   loopback UDP driver.
//! - `main.rs` — CLI and logging.

pub mod dial;
pub mod io;
pub mod sandbox;
pub mod sip;
