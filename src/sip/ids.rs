//! Compact identifiers of a call: what the core keeps per call instead of
//! pre-formatted header strings, and the hex codecs for them.
//!
//! Why: at a few thousand calls per second, formatting a call's Call-ID,
//! tags, branches and URIs with `format!` (growing `String`s, padding
//! machinery) was a quarter of the engine's user-space instructions, and
//! keeping those strings for the 32 s of Timer D cost more memory than the
//! calls in progress. A call now stores its two numbers inline, its Call-ID
//! as 32 ASCII hex digits, and derives every tag and branch from its slot.

/// Short text kept inline (an E.164 number is at most 16 bytes), so a call's
/// numbers cost no allocation; longer text, which the core accepts rather
/// than panic on, goes to the heap.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Text {
    Inline { len: u8, buf: [u8; INLINE] },
    Heap(Box<str>),
}

const INLINE: usize = 22;

impl Text {
    pub(crate) fn new(s: &str) -> Text {
        if s.len() <= INLINE {
            let mut buf = [0; INLINE];
            buf[..s.len()].copy_from_slice(s.as_bytes());
            Text::Inline {
                len: s.len() as u8,
                buf,
            }
        } else {
            Text::Heap(s.into())
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            // The bytes were copied from a &str whole, so they are UTF-8; the
            // checked conversion keeps this free of `unsafe` and costs a few
            // instructions on 16 bytes.
            Text::Inline { len, buf } => std::str::from_utf8(&buf[..*len as usize]).unwrap_or(""),
            Text::Heap(s) => s,
        }
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes `v` as 8 lowercase hex digits.
#[inline]
pub(crate) fn hex_u32(v: u32, out: &mut [u8]) {
    for (i, o) in out[..8].iter_mut().enumerate() {
        *o = HEX[((v >> (28 - 4 * i)) & 0xf) as usize];
    }
}

/// Reads exactly 8 hex digits (either case), as `u32::from_str_radix` did.
#[inline]
pub(crate) fn parse_hex_u32(s: &[u8]) -> Option<u32> {
    if s.len() != 8 {
        return None;
    }
    let mut v = 0u32;
    for &b in s {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | u32::from(d);
    }
    Some(v)
}

/// A Call-ID's random part: 128 bits as 32 hex digits (RFC 3261 §8.1.1.4
/// recommends cryptographically random Call-IDs; the host follows an `@`).
pub(crate) fn call_id_hex(a: u64, b: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex_u32((a >> 32) as u32, &mut out[0..]);
    hex_u32(a as u32, &mut out[8..]);
    hex_u32((b >> 32) as u32, &mut out[16..]);
    hex_u32(b as u32, &mut out[24..]);
    out
}

/// Whether `got` is the Call-ID `<hex>@<host>`.
pub(crate) fn call_id_is(hex: &[u8; 32], host: &str, got: &str) -> bool {
    let g = got.as_bytes();
    g.len() == 33 + host.len() && g[..32] == hex[..] && g[32] == b'@' && &g[33..] == host.as_bytes()
}

/// Length of a token: salt, slot and generation in hex, then a kind byte.
pub(crate) const TOKEN_LEN: usize = 25;
/// RFC 3261 §8.1.1.7 magic cookie that starts every branch we make.
pub(crate) const COOKIE: &[u8; 7] = b"z9hG4bK";
pub(crate) const BRANCH_LEN: usize = COOKIE.len() + TOKEN_LEN;

/// `salt + slot + generation + kind` in hex: unique per call and purpose,
/// and decodable back to the call without a lookup table.
pub(crate) fn token(salt: u32, slot: u32, gen: u32, kind: u8) -> [u8; TOKEN_LEN] {
    let mut out = [0u8; TOKEN_LEN];
    hex_u32(salt, &mut out[0..]);
    hex_u32(slot, &mut out[8..]);
    hex_u32(gen, &mut out[16..]);
    out[24] = kind;
    out
}

/// The branch of a transaction: the magic cookie, then its token.
pub(crate) fn branch(salt: u32, slot: u32, gen: u32, kind: u8) -> [u8; BRANCH_LEN] {
    let mut out = [0u8; BRANCH_LEN];
    out[..COOKIE.len()].copy_from_slice(COOKIE);
    out[COOKIE.len()..].copy_from_slice(&token(salt, slot, gen, kind));
    out
}

/// Decodes a token made with `salt`: `(slot, generation, kind)`.
pub(crate) fn parse_token(salt: u32, t: &[u8]) -> Option<(u32, u32, u8)> {
    if t.len() != TOKEN_LEN || parse_hex_u32(&t[0..8])? != salt {
        return None;
    }
    Some((parse_hex_u32(&t[8..16])?, parse_hex_u32(&t[16..24])?, t[24]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_match_the_old_format() {
        let t = token(0xdeadbeef, 7, 0x1234_5678, b'i');
        let old = format!("{:08x}{:08x}{:08x}{}", 0xdeadbeefu32, 7, 0x1234_5678, 'i');
        assert_eq!(&t[..], old.as_bytes());
        assert_eq!(parse_token(0xdeadbeef, &t), Some((7, 0x1234_5678, b'i')));
        assert_eq!(parse_token(0xdeadbeee, &t), None, "another salt");
        assert_eq!(parse_token(0xdeadbeef, &t[1..]), None, "short");
        let upper = old.to_uppercase();
        assert_eq!(parse_hex_u32(&upper.as_bytes()[..8]), Some(0xdeadbeef));
        assert_eq!(parse_hex_u32(b"0000000g"), None);
        assert_eq!(parse_hex_u32(b"+0000001"), None);
        let b = branch(1, 2, 3, b'j');
        assert_eq!(&b[..], b"z9hG4bK000000010000000200000003j");
    }

    #[test]
    fn call_id_hex_matches_format() {
        let (a, b) = (0x0123_4567_89ab_cdef_u64, 0xfedc_ba98_7654_3210_u64);
        let h = call_id_hex(a, b);
        assert_eq!(&h[..], format!("{a:016x}{b:016x}").as_bytes());
        let id = format!("{}@host.example", std::str::from_utf8(&h).unwrap());
        assert!(call_id_is(&h, "host.example", &id));
        assert!(!call_id_is(&h, "host.exampl", &id));
        assert!(!call_id_is(&h, "host.example", &id.replace('@', "!")));
    }

    #[test]
    fn text_inline_and_heap() {
        let short = Text::new("+447700900123");
        assert!(matches!(short, Text::Inline { .. }));
        assert_eq!(short.as_str(), "+447700900123");
        let long = "x".repeat(40);
        let t = Text::new(&long);
        assert!(matches!(t, Text::Heap(_)));
        assert_eq!(t.as_str(), long);
        assert_eq!(Text::new("").as_str(), "");
        assert_eq!(Text::new("é").as_str(), "é");
    }
}
