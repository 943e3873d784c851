//! The SIP core. PURE: nothing in here opens a socket, reads the clock or
//! touches a global RNG; time and randomness come in as arguments so every
//! RFC 3261 timer schedule can be tested with a virtual clock.

pub mod digest;
pub mod endpoint;
mod ids;
pub mod message;
pub mod render;
mod timers;

pub use endpoint::{
    CallHandle, CallReport, CallRequest, CallerId, Credentials, Endpoint, EndpointConfig, Event,
    Input, Outcome, Stats, TimerConfig, Transmit,
};
pub use message::{Message, ParseError};

#[cfg(test)]
mod endpoint_tests;
