//! The only place with sockets and the real clock: the UDP driver that moves
//! datagrams and time into the pure SIP core, and the RTP sink.

pub mod rtp;
pub mod udp;
