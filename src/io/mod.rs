//! The only place with sockets and the real clock: the UDP driver that moves
//! datagrams and time into the pure SIP core, the RTP sink, and the HTTP
//! accept loop.

pub mod http;
pub mod rtp;
pub mod udp;
