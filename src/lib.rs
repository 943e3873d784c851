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
//! - `pool` — PURE number pool (SPEC §3): parses `numbers.txt`, indexes
//!   numbers by their last `code_length` digits, picks a caller per code
//!   (LRU with cooldown) or draws a uniform code among available suffixes.
//! - `dial` — the `flashcall dial` command.
//! - `main.rs` — CLI and logging.

pub mod dial;
pub mod io;
pub mod pool;
pub mod sip;
