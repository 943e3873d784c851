//! Digest authentication for the UAC side (RFC 3261 §22, RFC 7616, RFC 8760).
//!
//! A flash call is a single short INVITE whose caller ID is the payload: if
//! the trunk's 401/407 cannot be answered, the call never leaves and the
//! verification fails. The parser therefore accepts what deployed SIP
//! trunks send (odd case, folded lines, unquoted values, several
//! challenges in one value) rather than only what the grammars allow, and
//! it must never panic, whatever the bytes, since they come off the wire.
//!
//! Only `qop=auth` is implemented: `auth-int` hashes the message body into
//! HA2, which would tie this module to the message layer. A server that
//! offers nothing but `auth-int` gets [`DigestError::UnsupportedQop`] so the
//! caller can report the trunk rather than retry blindly.
//!
//! Strings are hashed as their UTF-8 bytes. RFC 7616 only guarantees that
//! when the server says `charset=UTF-8`, but SIP (RFC 3261 §25) is UTF-8
//! throughout, so there is no other encoding to fall back to.

use std::fmt::Write as _;

use md5::Md5;
use sha2::{Digest, Sha256, Sha512_256};

/// The hash algorithms a SIP server may ask for; anything else (notably
/// 3GPP's `AKAv1-MD5`, which needs a SIM) is refused at parse time so the
/// caller can move on to another challenge or give up early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Md5,
    Md5Sess,
    Sha256,
    Sha256Sess,
    Sha512_256,
    Sha512_256Sess,
}

impl Algorithm {
    /// The registered spelling (IANA "Hash Algorithms for HTTP Digest Authentication"), sent
    /// back whatever case the server used, since it is the one spelling
    /// every server must accept.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Md5Sess => "MD5-sess",
            Algorithm::Sha256 => "SHA-256",
            Algorithm::Sha256Sess => "SHA-256-sess",
            Algorithm::Sha512_256 => "SHA-512-256",
            Algorithm::Sha512_256Sess => "SHA-512-256-sess",
        }
    }

    /// Case-insensitive because the algorithm literals of RFC 2617/3261 are
    /// ABNF strings, which are (RFC 5234 §2.3), and stacks do send `md5`;
    /// surrounding whitespace is forgiven as it can carry no meaning.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Algorithm> {
        let name = trim_lws(name);
        [
            Algorithm::Md5,
            Algorithm::Md5Sess,
            Algorithm::Sha256,
            Algorithm::Sha256Sess,
            Algorithm::Sha512_256,
            Algorithm::Sha512_256Sess,
        ]
        .into_iter()
        .find(|a| a.name().eq_ignore_ascii_case(name))
    }

    /// Session variants fold the nonce and cnonce into HA1, which is what
    /// lets a server hand HA1 to a third party without the password.
    #[must_use]
    pub fn is_session(self) -> bool {
        matches!(
            self,
            Algorithm::Md5Sess | Algorithm::Sha256Sess | Algorithm::Sha512_256Sess
        )
    }

    /// Ranking for [`choose`]: only the hash matters, a `-sess` variant is
    /// no stronger against an attacker than its plain form.
    fn strength(self) -> u8 {
        match self {
            Algorithm::Md5 | Algorithm::Md5Sess => 1,
            Algorithm::Sha256 | Algorithm::Sha256Sess => 2,
            Algorithm::Sha512_256 | Algorithm::Sha512_256Sess => 3,
        }
    }

    /// Every value in Digest is `H(a ":" b ":" ...)` in lowercase hex, so
    /// the join is done here, streamed into the hasher, instead of
    /// allocating the joined string at every call site.
    fn hash(self, parts: &[&[u8]]) -> String {
        match self {
            Algorithm::Md5 | Algorithm::Md5Sess => hex_hash::<Md5>(parts),
            Algorithm::Sha256 | Algorithm::Sha256Sess => hex_hash::<Sha256>(parts),
            // SHA-512/256 is its own function (distinct initial values, FIPS
            // 180-4 §5.3.6), not SHA-512 cut to 32 bytes: the RFC 7616
            // §3.9.2 example was computed with the truncation and is wrong
            // for that reason (erratum 4897).
            Algorithm::Sha512_256 | Algorithm::Sha512_256Sess => hex_hash::<Sha512_256>(parts),
        }
    }
}

fn hex_hash<D: Digest>(parts: &[&[u8]]) -> String {
    let mut hasher = D::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            hasher.update(b":");
        }
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// What a UAC needs to remember from one 401/407 challenge to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    /// Echoed verbatim: the server may keep its state in it.
    pub opaque: Option<String>,
    /// `MD5` when the server did not say, as RFC 2617 requires.
    pub algorithm: Algorithm,
    /// False means an RFC 2069 server: no cnonce, nc or qop may be sent.
    pub qop_auth: bool,
    /// True means the credentials were right and only the nonce had
    /// expired, so the UAC should retry at once with the new nonce instead
    /// of treating the 401/407 as a wrong password.
    pub stale: bool,
    /// The server wants `H(username ":" realm)` instead of the user name,
    /// so that the name does not travel in clear (RFC 7616 §3.4.4).
    pub userhash: bool,
}

/// Why a header value could not be used; each case calls for a different
/// reaction (try another challenge, report a misconfigured trunk, ...).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("no Digest challenge in the header value")]
    NotDigest,
    #[error("Digest challenge lacks the required `{0}` parameter")]
    MissingParam(&'static str),
    #[error("unsupported Digest algorithm `{0}`")]
    UnsupportedAlgorithm(String),
    #[error("unsupported qop `{0}`: only `auth` is implemented")]
    UnsupportedQop(String),
    #[error("malformed Digest challenge: {0}")]
    Malformed(&'static str),
}

impl Challenge {
    /// Parses one WWW-Authenticate / Proxy-Authenticate value.
    ///
    /// SIP forbids combining challenges into one value (RFC 3261 §7.3.1),
    /// but HTTP-minded proxies do it anyway, so the first `Digest` challenge
    /// in the value is used and any other scheme around it is ignored.
    /// Parameters we do not use (`domain`, `charset`, vendor extensions) are
    /// ignored rather than rejected, because trunks add their own; a
    /// repeated parameter keeps its first value.
    ///
    /// # Errors
    ///
    /// [`DigestError::NotDigest`] when the value holds no Digest challenge;
    /// otherwise the first problem found in that challenge, so the caller
    /// can tell a trunk we cannot serve from a garbled header.
    pub fn parse(value: &str) -> Result<Challenge, DigestError> {
        parse_raw(value)
            .into_iter()
            .find(RawChallenge::is_digest)
            .map_or(Err(DigestError::NotDigest), |raw| Challenge::from_raw(&raw))
    }

    fn from_raw(raw: &RawChallenge<'_>) -> Result<Challenge, DigestError> {
        if let Some(why) = raw.error {
            return Err(DigestError::Malformed(why));
        }
        let realm = raw.get("realm").ok_or(DigestError::MissingParam("realm"))?;
        let nonce = raw.get("nonce").ok_or(DigestError::MissingParam("nonce"))?;
        let algorithm = match raw.get("algorithm") {
            None => Algorithm::Md5,
            Some(name) => Algorithm::from_name(name)
                .ok_or_else(|| DigestError::UnsupportedAlgorithm(name.to_string()))?,
        };
        let qop_auth = match raw.get("qop") {
            None => false,
            Some(list) => {
                let mut any = false;
                let mut auth = false;
                for token in list.split(',').map(trim_lws).filter(|t| !t.is_empty()) {
                    any = true;
                    auth |= token.eq_ignore_ascii_case("auth");
                }
                // An empty qop list is read as no qop at all: answering in
                // RFC 2069 style is the only answer such a server can check.
                if any && !auth {
                    return Err(DigestError::UnsupportedQop(list.to_string()));
                }
                auth
            }
        };
        let flag = |name| {
            raw.get(name)
                .is_some_and(|v| trim_lws(v).eq_ignore_ascii_case("true"))
        };
        Ok(Challenge {
            realm: realm.to_string(),
            nonce: nonce.to_string(),
            opaque: raw.get("opaque").map(str::to_string),
            algorithm,
            qop_auth,
            stale: flag("stale"),
            userhash: flag("userhash"),
        })
    }
}

/// Picks the challenge to answer when a 401/407 carries several: a server
/// offering several algorithms sends one challenge per algorithm, so that
/// UACs that only know MD5 can still get in.
///
/// The strongest hash wins rather than the first listed, so that a
/// downgrade to MD5 needs the attacker to remove headers, not reorder
/// them; among equals the first wins, which is the server's preference.
/// Values that are not Digest, or that we cannot answer, are skipped
/// because another value may still be usable.
#[must_use]
pub fn choose<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Challenge> {
    let mut best: Option<Challenge> = None;
    for value in values {
        for raw in parse_raw(value) {
            if !raw.is_digest() {
                continue;
            }
            if let Ok(ch) = Challenge::from_raw(&raw) {
                if best
                    .as_ref()
                    .is_none_or(|b| ch.algorithm.strength() > b.algorithm.strength())
                {
                    best = Some(ch);
                }
            }
        }
    }
    best
}

/// The `response` value. Exposed on its own because it is what the
/// published test vectors pin down, and what a server-side check needs.
///
/// `nc` must grow by one for every request sent with the same nonce: a
/// server that enforces replay protection rejects a repeated one.
#[must_use]
pub fn response(
    ch: &Challenge,
    username: &str,
    password: &str,
    method: &str,
    uri: &str,
    cnonce: &str,
    nc: u32,
) -> String {
    let alg = ch.algorithm;
    // The user name inside HA1 is the real one even with userhash: the
    // server looks its stored HA1 up by the hash, it does not recompute it.
    let mut ha1 = alg.hash(&[
        username.as_bytes(),
        ch.realm.as_bytes(),
        password.as_bytes(),
    ]);
    if alg.is_session() {
        ha1 = alg.hash(&[ha1.as_bytes(), ch.nonce.as_bytes(), cnonce.as_bytes()]);
    }
    let ha2 = alg.hash(&[method.as_bytes(), uri.as_bytes()]);
    if ch.qop_auth {
        let nc = format!("{nc:08x}");
        alg.hash(&[
            ha1.as_bytes(),
            ch.nonce.as_bytes(),
            nc.as_bytes(),
            cnonce.as_bytes(),
            b"auth",
            ha2.as_bytes(),
        ])
    } else {
        alg.hash(&[ha1.as_bytes(), ch.nonce.as_bytes(), ha2.as_bytes()])
    }
}

/// The Authorization / Proxy-Authorization value answering `ch`.
///
/// Without qop the output is RFC 2069 shaped (no cnonce, nc or qop),
/// because RFC 2617 §3.2.2 forbids cnonce and nc when the server sent no
/// qop. The one exception is a `-sess` algorithm without qop, a pairing no
/// RFC defines: cnonce is still sent there, since the server cannot
/// compute HA1 without it.
///
/// A non-ASCII user name is sent as UTF-8 inside the quoted string (SIP
/// allows it) rather than as RFC 7616's `username*`, which SIP stacks do
/// not parse. CR and LF are dropped from quoted values because no escape
/// can carry them and letting them through would let a crafted user name
/// or URI inject header lines.
#[must_use]
pub fn authorization(
    ch: &Challenge,
    username: &str,
    password: &str,
    method: &str,
    uri: &str,
    cnonce: &str,
    nc: u32,
) -> String {
    let user_field = if ch.userhash {
        ch.algorithm
            .hash(&[username.as_bytes(), ch.realm.as_bytes()])
    } else {
        username.to_string()
    };
    let resp = response(ch, username, password, method, uri, cnonce, nc);

    let mut out = String::from("Digest ");
    push_quoted(&mut out, "username", &user_field);
    out.push_str(", ");
    push_quoted(&mut out, "realm", &ch.realm);
    out.push_str(", ");
    push_quoted(&mut out, "nonce", &ch.nonce);
    out.push_str(", ");
    push_quoted(&mut out, "uri", uri);
    out.push_str(", ");
    push_quoted(&mut out, "response", &resp);
    out.push_str(", algorithm=");
    out.push_str(ch.algorithm.name());
    if ch.qop_auth || ch.algorithm.is_session() {
        out.push_str(", ");
        push_quoted(&mut out, "cnonce", cnonce);
    }
    if let Some(opaque) = &ch.opaque {
        out.push_str(", ");
        push_quoted(&mut out, "opaque", opaque);
    }
    if ch.qop_auth {
        // Writing to a String cannot fail.
        let _ = write!(out, ", qop=auth, nc={nc:08x}");
    }
    if ch.userhash {
        out.push_str(", userhash=true");
    }
    out
}

fn push_quoted(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push_str("=\"");
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\r' | '\n' => {}
            _ => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------
// Parsing.
//
// The grammar (RFC 7235 §2.1 / RFC 3261 §25) is tokenised by hand: the
// value may hold several challenges whose parameter lists are also
// comma-separated, so a challenge ends only where a token is not followed
// by `=`. Working on bytes and cutting only at ASCII delimiters keeps every
// slice on a char boundary; `slice` still refuses to panic should that
// reasoning ever be wrong.
// ---------------------------------------------------------------------------

/// SIP folds lines as CRLF + SP (RFC 3261 §7.3.1); treating CR and LF as
/// plain whitespace accepts folding, and bare CR or LF from sloppy stacks.
fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn trim_lws(s: &str) -> &str {
    s.trim_matches(|c| matches!(c, ' ' | '\t' | '\r' | '\n'))
}

/// RFC 7230 tchar.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One challenge before interpretation; errors are recorded, not returned,
/// so that a broken challenge does not hide a good one after it.
struct RawChallenge<'a> {
    scheme: &'a str,
    /// (name, value, was quoted)
    params: Vec<(&'a str, String, bool)>,
    error: Option<&'static str>,
}

impl RawChallenge<'_> {
    fn is_digest(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("Digest")
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v, _)| v.as_str())
    }
}

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    fn slice(&self, from: usize, to: usize) -> &'a str {
        self.s.get(from..to).unwrap_or_default()
    }

    fn skip_lws(&mut self) {
        while self.peek().is_some_and(is_lws) {
            self.pos += 1;
        }
    }

    fn take_while(&mut self, keep: impl Fn(u8) -> bool) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(&keep) {
            self.pos += 1;
        }
        self.slice(start, self.pos)
    }

    fn token(&mut self) -> &'a str {
        self.take_while(is_tchar)
    }

    /// Unquoted values are read up to whitespace or a comma, not just as a
    /// token, so that a base64 nonce sent unquoted (`/`, `+`, `=`) survives
    /// whole instead of turning into a parse error.
    fn bare_value(&mut self) -> &'a str {
        self.take_while(|b| !is_lws(b) && b != b',' && b != b'"')
    }

    /// Reads a quoted-string starting at its opening quote and unescapes
    /// it, since the hash covers the unescaped value (RFC 7616 `unq()`).
    fn quoted(&mut self) -> Result<String, &'static str> {
        const UNTERMINATED: &str = "unterminated quoted-string";
        self.pos += 1;
        let mut out = String::new();
        let mut run = self.pos;
        loop {
            match self.peek() {
                None => return Err(UNTERMINATED),
                Some(b'"') => {
                    out.push_str(self.slice(run, self.pos));
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    out.push_str(self.slice(run, self.pos));
                    self.pos += 1;
                    let escaped = self.s.get(self.pos..).and_then(|rest| rest.chars().next());
                    let Some(c) = escaped else {
                        return Err(UNTERMINATED);
                    };
                    out.push(c);
                    self.pos += c.len_utf8();
                    run = self.pos;
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    /// Recovers from junk by jumping to the next list element, stepping
    /// over quoted strings so that a comma inside one does not count.
    fn skip_to_comma(&mut self) {
        while let Some(b) = self.peek() {
            match b {
                b',' => return,
                b'"' => {
                    if self.quoted().is_err() {
                        self.pos = self.s.len();
                    }
                }
                _ => self.pos += 1,
            }
        }
    }
}

fn parse_raw(value: &str) -> Vec<RawChallenge<'_>> {
    let mut c = Cursor { s: value, pos: 0 };
    let mut out = Vec::new();
    loop {
        c.skip_lws();
        match c.peek() {
            None => return out,
            Some(b',') => c.pos += 1,
            Some(b) if is_tchar(b) => {
                let scheme = c.token();
                out.push(parse_params(&mut c, scheme));
            }
            Some(_) => c.skip_to_comma(),
        }
    }
}

/// Reads auth-params until the input ends or a token that is not followed
/// by `=` starts the next challenge. A missing comma between params is
/// forgiven, since nothing else could have been meant.
fn parse_params<'a>(c: &mut Cursor<'a>, scheme: &'a str) -> RawChallenge<'a> {
    let mut ch = RawChallenge {
        scheme,
        params: Vec::new(),
        error: None,
    };
    loop {
        c.skip_lws();
        match c.peek() {
            None => return ch,
            Some(b',') => c.pos += 1,
            Some(b) if is_tchar(b) => {
                let start = c.pos;
                let name = c.token();
                c.skip_lws();
                if c.peek() != Some(b'=') {
                    // A scheme is followed by whitespace, a comma or the end;
                    // `name"x"` or `name;x` is a broken parameter instead.
                    if c.pos == start + name.len() && !matches!(c.peek(), None | Some(b',')) {
                        ch.error.get_or_insert("parameter name without `=`");
                        c.skip_to_comma();
                        continue;
                    }
                    let ends_item = matches!(c.peek(), None | Some(b','));
                    // `qop=auth,auth-int` sent unquoted would otherwise read
                    // as a parameter `qop=auth` followed by a new challenge
                    // whose scheme is `auth-int`.
                    if ends_item {
                        if let Some((last, v, false)) = ch.params.last_mut() {
                            if last.eq_ignore_ascii_case("qop") {
                                v.push(',');
                                v.push_str(name);
                                continue;
                            }
                        }
                    }
                    c.pos = start;
                    return ch;
                }
                c.pos += 1;
                c.skip_lws();
                let (value, quoted) = if c.peek() == Some(b'"') {
                    match c.quoted() {
                        Ok(v) => (v, true),
                        Err(why) => {
                            ch.error.get_or_insert(why);
                            return ch;
                        }
                    }
                } else {
                    (c.bare_value().to_string(), false)
                };
                ch.params.push((name, value, quoted));
                c.skip_lws();
                if !matches!(c.peek(), None | Some(b',')) && !c.peek().is_some_and(is_tchar) {
                    ch.error
                        .get_or_insert("unexpected characters after a parameter value");
                    c.skip_to_comma();
                }
            }
            Some(_) => {
                ch.error
                    .get_or_insert("unexpected character in parameter list");
                c.skip_to_comma();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pulls one parameter out of an authorization value with the module's
    /// own parser (it reads credentials as well as challenges).
    fn param(value: &str, name: &str) -> Option<String> {
        parse_raw(value)
            .into_iter()
            .next()
            .and_then(|raw| raw.get(name).map(str::to_string))
    }

    // RFC 2617 §3.5.
    const RFC2617_CHALLENGE: &str = "Digest\r\n                 realm=\"testrealm@host.com\",\r\n                 qop=\"auth,auth-int\",\r\n                 nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\",\r\n                 opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"";

    // RFC 7616 §3.9.1, both challenges of the example.
    const RFC7616_SHA256: &str = "Digest\r\n       realm=\"http-auth@example.org\",\r\n       qop=\"auth, auth-int\",\r\n       algorithm=SHA-256,\r\n       nonce=\"7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v\",\r\n       opaque=\"FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\"";
    const RFC7616_MD5: &str = "Digest\r\n       realm=\"http-auth@example.org\",\r\n       qop=\"auth, auth-int\",\r\n       algorithm=MD5,\r\n       nonce=\"7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v\",\r\n       opaque=\"FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\"";
    const RFC7616_CNONCE: &str = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";

    // RFC 7616 §3.9.2 challenge.
    const RFC7616_SHA512_256: &str = "Digest\r\n       realm=\"api@example.org\",\r\n       qop=\"auth\",\r\n       algorithm=SHA-512-256,\r\n       nonce=\"5TsQWLVdgBdmrQ0XsxbDODV+57QdFR34I9HAbC/RVvkK\",\r\n       opaque=\"HRPCssKJSGjCrkzDg8OhwpzCiGPChXYjwrI2QmXDnsOS\",\r\n       charset=UTF-8,\r\n       userhash=true";
    const JASON: &str = "J\u{e4}s\u{f8}n Doe";
    const JASON_PASSWORD: &str = "Secret, or not?";
    const RFC7616_SHA512_CNONCE: &str = "NTg6RKcb9boFIAS3KrFK9BGeh+iDa/sm6jUMp2wds69v";

    #[test]
    fn rfc2617_md5_qop_auth() {
        let ch = Challenge::parse(RFC2617_CHALLENGE).expect("RFC 2617 challenge parses");
        assert_eq!(ch.algorithm, Algorithm::Md5);
        assert!(ch.qop_auth);
        let r = response(
            &ch,
            "Mufasa",
            "Circle Of Life",
            "GET",
            "/dir/index.html",
            "0a4f113b",
            1,
        );
        assert_eq!(r, "6629fae49393a05397450978507c4ef1");
    }

    #[test]
    fn rfc2617_authorization_has_every_parameter() {
        let ch = Challenge::parse(RFC2617_CHALLENGE).expect("parses");
        let auth = authorization(
            &ch,
            "Mufasa",
            "Circle Of Life",
            "GET",
            "/dir/index.html",
            "0a4f113b",
            1,
        );
        assert!(auth.starts_with("Digest "), "{auth}");
        for expected in [
            "username=\"Mufasa\"",
            "realm=\"testrealm@host.com\"",
            "nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\"",
            "uri=\"/dir/index.html\"",
            "qop=auth",
            "nc=00000001",
            "cnonce=\"0a4f113b\"",
            "response=\"6629fae49393a05397450978507c4ef1\"",
            "opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"",
            "algorithm=MD5",
        ] {
            assert!(auth.contains(expected), "{expected} missing from {auth}");
        }
        assert!(!auth.contains("userhash"), "{auth}");
    }

    #[test]
    fn rfc7616_md5() {
        let ch = Challenge::parse(RFC7616_MD5).expect("parses");
        assert_eq!(ch.algorithm, Algorithm::Md5);
        let r = response(
            &ch,
            "Mufasa",
            "Circle of Life",
            "GET",
            "/dir/index.html",
            RFC7616_CNONCE,
            1,
        );
        assert_eq!(r, "8ca523f5e9506fed4657c9700eebdbec");
    }

    #[test]
    fn rfc7616_sha256() {
        let ch = Challenge::parse(RFC7616_SHA256).expect("parses");
        assert_eq!(ch.algorithm, Algorithm::Sha256);
        assert_eq!(
            ch.opaque.as_deref(),
            Some("FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS")
        );
        let r = response(
            &ch,
            "Mufasa",
            "Circle of Life",
            "GET",
            "/dir/index.html",
            RFC7616_CNONCE,
            1,
        );
        assert_eq!(
            r,
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
    }

    /// The values printed in RFC 7616 §3.9.2 (username 488869…, response
    /// ae66e6…) were computed with SHA-512 truncated to 256 bits; erratum
    /// 4897 gives the SHA-512/256 values asserted here.
    #[test]
    fn rfc7616_sha512_256_userhash_erratum_4897() {
        let ch = Challenge::parse(RFC7616_SHA512_256).expect("parses");
        assert_eq!(ch.algorithm, Algorithm::Sha512_256);
        assert!(ch.userhash);
        assert!(ch.qop_auth);
        let auth = authorization(
            &ch,
            JASON,
            JASON_PASSWORD,
            "GET",
            "/doe.json",
            RFC7616_SHA512_CNONCE,
            1,
        );
        assert_eq!(
            param(&auth, "username").as_deref(),
            Some("793263caabb707a56211940d90411ea4a575adeccb7e360aeb624ed06ece9b0b")
        );
        assert_eq!(
            param(&auth, "response").as_deref(),
            Some("3798d4131c277846293534c3edc11bd8a5e4cdcbff78b05db9d95eeb1cec68a5")
        );
        assert!(auth.ends_with(", userhash=true"), "{auth}");
        assert!(auth.contains("algorithm=SHA-512-256,"), "{auth}");
        assert!(
            auth.contains("opaque=\"HRPCssKJSGjCrkzDg8OhwpzCiGPChXYjwrI2QmXDnsOS\""),
            "{auth}"
        );
    }

    /// Pins down why the RFC's own §3.9.2 numbers are not used above: they
    /// are reproduced exactly by truncated SHA-512, which is not
    /// SHA-512/256.
    #[test]
    fn rfc7616_printed_sha512_256_values_are_truncated_sha512() {
        fn truncated_sha512(s: &str) -> String {
            let mut h = hex::encode(sha2::Sha512::digest(s.as_bytes()));
            h.truncate(64);
            h
        }
        assert_eq!(
            truncated_sha512(&format!("{JASON}:api@example.org")),
            "488869477bf257147b804c45308cd62ac4e25eb717b12b298c79e62dcea254ec"
        );
        let ch = Challenge::parse(RFC7616_SHA512_256).expect("parses");
        let ours = response(
            &ch,
            JASON,
            JASON_PASSWORD,
            "GET",
            "/doe.json",
            RFC7616_SHA512_CNONCE,
            1,
        );
        assert_ne!(
            ours,
            "ae66e67d6b427bd3f120414a82e4acff38e8ecd9101d6c861229025f607a79dd"
        );
    }

    /// FIPS 180-4 example digests of SHA-512/256, to pin the primitive
    /// independently of any Digest vector.
    #[test]
    fn sha512_256_primitive_matches_nist() {
        assert_eq!(
            Algorithm::Sha512_256.hash(&[b""]),
            "c672b8d1ef56ed28ab87c3622c5114069bdd3ad7b8f9737498d0c01ecef0967a"
        );
        assert_eq!(
            Algorithm::Sha512_256.hash(&[b"abc"]),
            "53048e2681941ef99b2e29b76b4c7dabe4c2d0c634fc6d46e0e2f13107e7af23"
        );
    }

    /// RFC 2069 §2.4 with the response of its erratum 749 (the printed
    /// e966c932… does not match the example's inputs).
    #[test]
    fn rfc2069_no_qop() {
        let ch = Challenge::parse(
            "Digest realm=\"testrealm@host.com\", nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"",
        )
        .expect("parses");
        assert!(!ch.qop_auth);
        let auth = authorization(
            &ch,
            "Mufasa",
            "CircleOfLife",
            "GET",
            "/dir/index.html",
            "ignored",
            1,
        );
        assert!(
            auth.contains("response=\"1949323746fe6a43ef61f9606e7febea\""),
            "{auth}"
        );
        for absent in ["cnonce", "nc=", "qop"] {
            assert!(!auth.contains(absent), "{absent} in {auth}");
        }
        assert!(
            auth.contains("opaque=\"5ccc069c403ebaf9f0171e9517f40e41\""),
            "{auth}"
        );
    }

    /// No published vector exists for the -sess variants; this assembles
    /// RFC 7616 §3.4.1-3.4.3 by hand with the hash crates directly.
    #[test]
    fn sess_variants_follow_rfc7616_formula() {
        fn md5(s: &str) -> String {
            hex::encode(Md5::digest(s.as_bytes()))
        }
        fn sha256(s: &str) -> String {
            hex::encode(Sha256::digest(s.as_bytes()))
        }
        fn sha512_256(s: &str) -> String {
            hex::encode(Sha512_256::digest(s.as_bytes()))
        }
        for (alg, h) in [
            (Algorithm::Md5Sess, md5 as fn(&str) -> String),
            (Algorithm::Sha256Sess, sha256),
            (Algorithm::Sha512_256Sess, sha512_256),
        ] {
            let value = format!(
                "Digest realm=\"sip.example.net\", nonce=\"n0nce\", qop=auth, algorithm={}",
                alg.name()
            );
            let ch = Challenge::parse(&value).expect("parses");
            assert_eq!(ch.algorithm, alg);
            let ha1 = h(&format!("{}:n0nce:cn", h("alice:sip.example.net:pw")));
            let ha2 = h("REGISTER:sip:sip.example.net");
            let expected = h(&format!("{ha1}:n0nce:0000002a:cn:auth:{ha2}"));
            assert_eq!(
                response(
                    &ch,
                    "alice",
                    "pw",
                    "REGISTER",
                    "sip:sip.example.net",
                    "cn",
                    42
                ),
                expected,
                "{alg:?}"
            );
        }
    }

    #[test]
    fn sess_without_qop_still_sends_cnonce() {
        let ch = Challenge::parse("Digest realm=\"r\", nonce=\"n\", algorithm=MD5-sess")
            .expect("parses");
        let auth = authorization(&ch, "u", "p", "INVITE", "sip:x@y", "abc", 1);
        assert!(auth.contains("cnonce=\"abc\""), "{auth}");
        assert!(!auth.contains("qop"), "{auth}");
        assert!(!auth.contains("nc="), "{auth}");
    }

    #[test]
    fn parse_minimal_defaults() {
        let ch = Challenge::parse("Digest realm=\"r\", nonce=\"n\"").expect("parses");
        assert_eq!(
            ch,
            Challenge {
                realm: "r".into(),
                nonce: "n".into(),
                opaque: None,
                algorithm: Algorithm::Md5,
                qop_auth: false,
                stale: false,
                userhash: false,
            }
        );
    }

    #[test]
    fn parse_odd_case_whitespace_and_unquoted() {
        let ch = Challenge::parse(
            "dIgEsT   REALM = \"a b\" ,NONCE=abc/+d== , Algorithm = sha-256 ,\tQOP = \" Auth-Int , AUTH \" ,opaque = xyz",
        )
        .expect("parses");
        assert_eq!(ch.realm, "a b");
        assert_eq!(ch.nonce, "abc/+d==");
        assert_eq!(ch.algorithm, Algorithm::Sha256);
        assert!(ch.qop_auth);
        assert_eq!(ch.opaque.as_deref(), Some("xyz"));
    }

    #[test]
    fn parse_folded_lines() {
        let ch = Challenge::parse(
            "Digest realm=\"sip.example.com\",\r\n nonce=\"4f2b\"\r\n\t,\r\n  algorithm=md5-SESS,\r\n qop=\"auth\"",
        )
        .expect("parses");
        assert_eq!(ch.realm, "sip.example.com");
        assert_eq!(ch.nonce, "4f2b");
        assert_eq!(ch.algorithm, Algorithm::Md5Sess);
        assert!(ch.qop_auth);
    }

    #[test]
    fn parse_tolerates_missing_commas() {
        let ch = Challenge::parse("Digest realm=\"r\" nonce=\"n\"algorithm=SHA-256 qop=auth")
            .expect("parses");
        assert_eq!((ch.realm.as_str(), ch.nonce.as_str()), ("r", "n"));
        assert_eq!(ch.algorithm, Algorithm::Sha256);
        assert!(ch.qop_auth);
    }

    #[test]
    fn parse_stale_and_userhash_flags() {
        let p = |extra: &str| {
            Challenge::parse(&format!("Digest realm=\"r\", nonce=\"n\", {extra}")).expect("parses")
        };
        assert!(p("stale=TRUE").stale);
        assert!(p("stale=\"true\"").stale);
        assert!(!p("stale=false").stale);
        assert!(!p("stale=yes").stale);
        assert!(p("userhash=True").userhash);
        assert!(!p("userhash=false").userhash);
    }

    #[test]
    fn parse_qop_lists() {
        let p =
            |qop: &str| Challenge::parse(&format!("Digest realm=\"r\", nonce=\"n\", qop={qop}"));
        assert!(p("\"auth-int,auth\"").expect("parses").qop_auth);
        assert!(p("auth").expect("parses").qop_auth);
        // Unquoted list: must not be read as a second challenge `auth-int`.
        assert!(p("auth-int,auth").expect("parses").qop_auth);
        assert!(p("auth,auth-int, opaque=\"o\"").expect("parses").qop_auth);
        assert_eq!(
            p("\"auth-int\""),
            Err(DigestError::UnsupportedQop("auth-int".into()))
        );
        assert_eq!(
            p("\"auth-conf, auth-int\""),
            Err(DigestError::UnsupportedQop("auth-conf, auth-int".into()))
        );
        assert!(!p("\"\"").expect("empty list is no qop").qop_auth);
    }

    #[test]
    fn parse_quoted_string_escapes() {
        let ch =
            Challenge::parse(r#"Digest realm="a \"b\" \\ c, d", nonce="\n\o""#).expect("parses");
        assert_eq!(ch.realm, r#"a "b" \ c, d"#);
        assert_eq!(ch.nonce, "no");
    }

    #[test]
    fn parse_ignores_unknown_params() {
        let ch = Challenge::parse(
            "Digest realm=\"r\", domain=\"sip:a sip:b\", x-vendor=\"q,\\\"w\", charset=UTF-8, nonce=\"n\", foo=bar",
        )
        .expect("parses");
        assert_eq!((ch.realm.as_str(), ch.nonce.as_str()), ("r", "n"));
    }

    #[test]
    fn parse_errors() {
        assert_eq!(
            Challenge::parse("Digest realm=\"r\", qop=\"auth\""),
            Err(DigestError::MissingParam("nonce"))
        );
        assert_eq!(
            Challenge::parse("Digest nonce=\"n\""),
            Err(DigestError::MissingParam("realm"))
        );
        assert_eq!(
            Challenge::parse("Digest realm=\"r\", nonce=\"n\", algorithm=AKAv1-MD5"),
            Err(DigestError::UnsupportedAlgorithm("AKAv1-MD5".into()))
        );
        assert_eq!(
            Challenge::parse("Digest realm=\"r\", nonce=\"n\", algorithm=SHA-1"),
            Err(DigestError::UnsupportedAlgorithm("SHA-1".into()))
        );
        assert_eq!(
            Challenge::parse("Basic realm=\"r\""),
            Err(DigestError::NotDigest)
        );
        assert_eq!(Challenge::parse(""), Err(DigestError::NotDigest));
        assert_eq!(Challenge::parse(" \r\n "), Err(DigestError::NotDigest));
        assert_eq!(
            Challenge::parse("DigestAuth realm=\"r\", nonce=\"n\""),
            Err(DigestError::NotDigest)
        );
        assert_eq!(
            Challenge::parse("Digest realm=\"r, nonce=\"n\"x"),
            Err(DigestError::Malformed("parameter name without `=`"))
        );
        assert_eq!(
            Challenge::parse("Digest realm=\"r\"\"x\", nonce=\"n\""),
            Err(DigestError::Malformed(
                "unexpected characters after a parameter value"
            ))
        );
        assert_eq!(
            Challenge::parse("Digest realm=\"r\", nonce=\"n"),
            Err(DigestError::Malformed("unterminated quoted-string"))
        );
        assert_eq!(
            Challenge::parse("Digest realm=\"r\", nonce=\"n\\"),
            Err(DigestError::Malformed("unterminated quoted-string"))
        );
        assert_eq!(
            Challenge::parse("Digest realm=\"r\", @@, nonce=\"n\""),
            Err(DigestError::Malformed(
                "unexpected character in parameter list"
            ))
        );
    }

    #[test]
    fn parse_finds_digest_among_other_schemes() {
        let ch = Challenge::parse(
            "Negotiate YIIB==, Basic realm=\"b\", Digest realm=\"d\", nonce=\"n\", algorithm=SHA-256, Bearer realm=\"x\"",
        )
        .expect("parses");
        assert_eq!(ch.realm, "d");
        assert_eq!(ch.algorithm, Algorithm::Sha256);
    }

    #[test]
    fn algorithm_names_round_trip() {
        for alg in [
            Algorithm::Md5,
            Algorithm::Md5Sess,
            Algorithm::Sha256,
            Algorithm::Sha256Sess,
            Algorithm::Sha512_256,
            Algorithm::Sha512_256Sess,
        ] {
            assert_eq!(Algorithm::from_name(alg.name()), Some(alg));
            assert_eq!(
                Algorithm::from_name(&alg.name().to_ascii_lowercase()),
                Some(alg)
            );
        }
        assert_eq!(Algorithm::from_name("\"MD5\""), None);
    }

    #[test]
    fn choose_prefers_strongest() {
        let ch = choose([RFC7616_MD5, RFC7616_SHA256]).expect("one is usable");
        assert_eq!(ch.algorithm, Algorithm::Sha256);
        let ch = choose([RFC7616_SHA256, RFC7616_MD5]).expect("one is usable");
        assert_eq!(ch.algorithm, Algorithm::Sha256);
        let ch = choose([RFC7616_MD5, RFC7616_SHA512_256, RFC7616_SHA256]).expect("one is usable");
        assert_eq!(ch.algorithm, Algorithm::Sha512_256);
    }

    #[test]
    fn choose_skips_unusable_values() {
        let values = [
            "Basic realm=\"x\"",
            "Digest realm=\"r\", nonce=\"n\", algorithm=AKAv1-MD5",
            "Digest realm=\"r\", nonce=\"n\", qop=\"auth-int\", algorithm=SHA-512-256",
            "Digest realm=\"r\", nonce=\"broken",
            "garbage \u{0} \"",
            "Digest realm=\"ok\", nonce=\"n\"",
        ];
        let ch = choose(values).expect("the last one is usable");
        assert_eq!(ch.realm, "ok");
        assert_eq!(ch.algorithm, Algorithm::Md5);
        assert_eq!(choose(values[..5].iter().copied()), None);
        assert_eq!(choose(std::iter::empty()), None);
    }

    #[test]
    fn choose_first_wins_among_equals() {
        let ch = choose([
            "Digest realm=\"first\", nonce=\"1\", algorithm=SHA-256",
            "Digest realm=\"second\", nonce=\"2\", algorithm=SHA-256-sess",
        ])
        .expect("usable");
        assert_eq!(ch.realm, "first");
    }

    #[test]
    fn choose_reads_combined_values() {
        let ch = choose([
            "Digest realm=\"a\", nonce=\"1\", algorithm=MD5, Digest realm=\"b\", nonce=\"2\", algorithm=SHA-256",
        ])
        .expect("usable");
        assert_eq!(ch.realm, "b");
    }

    #[test]
    fn authorization_escapes_and_round_trips() {
        let ch = Challenge {
            realm: "we \"quote\" \\ stuff".into(),
            nonce: "n,o\"nce".into(),
            opaque: Some("o\\p".into()),
            algorithm: Algorithm::Sha256,
            qop_auth: true,
            stale: true,
            userhash: false,
        };
        let auth = authorization(
            &ch,
            "bo\"b",
            "pw",
            "INVITE",
            "sip:+15551234567@example.com",
            "c",
            0xabc,
        );
        assert_eq!(param(&auth, "realm").as_deref(), Some(ch.realm.as_str()));
        assert_eq!(param(&auth, "nonce").as_deref(), Some(ch.nonce.as_str()));
        assert_eq!(param(&auth, "opaque").as_deref(), Some("o\\p"));
        assert_eq!(param(&auth, "username").as_deref(), Some("bo\"b"));
        assert_eq!(param(&auth, "nc").as_deref(), Some("00000abc"));
        assert_eq!(param(&auth, "qop").as_deref(), Some("auth"));
        assert_eq!(param(&auth, "algorithm").as_deref(), Some("SHA-256"));
        assert_eq!(
            param(&auth, "response"),
            Some(response(
                &ch,
                "bo\"b",
                "pw",
                "INVITE",
                "sip:+15551234567@example.com",
                "c",
                0xabc
            ))
        );
    }

    #[test]
    fn authorization_drops_cr_lf() {
        let ch = Challenge::parse("Digest realm=\"r\", nonce=\"n\", qop=auth").expect("parses");
        let auth = authorization(&ch, "u\r\nX-Evil: 1", "p", "REGISTER", "sip:r\n", "c\r", 1);
        assert!(!auth.contains('\r') && !auth.contains('\n'), "{auth:?}");
    }

    /// Tiny deterministic LCG (Knuth's MMIX constants) so the fuzz loop is
    /// reproducible without extra dependencies.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) as u32
        }

        fn below(&mut self, n: usize) -> usize {
            self.next() as usize % n
        }
    }

    fn exercise(value: &str) {
        if let Ok(ch) = Challenge::parse(value) {
            let auth = authorization(&ch, "user", "pw", "INVITE", "sip:x@y", "cn", 7);
            assert!(!auth.contains(['\r', '\n']), "{auth:?}");
            // Our own output must read back to what we parsed, unless CR/LF
            // had to be dropped from it.
            for (name, v) in [("realm", &ch.realm), ("nonce", &ch.nonce)] {
                if !v.contains(['\r', '\n']) {
                    assert_eq!(param(&auth, name).as_deref(), Some(v.as_str()), "{value:?}");
                }
            }
        }
        let _ = choose([value, value]);
    }

    fn boundary_at_or_after(s: &str, mut i: usize) -> usize {
        while !s.is_char_boundary(i) {
            i += 1;
        }
        i
    }

    #[test]
    fn fuzz_random_bytes_never_panic() {
        let mut rng = Lcg(0x5eed);
        for _ in 0..20_000 {
            let len = rng.below(96);
            let bytes: Vec<u8> = (0..len).map(|_| rng.next().to_le_bytes()[0]).collect();
            exercise(&String::from_utf8_lossy(&bytes));
        }
    }

    /// Random bytes almost never get past the scheme, so this mutates real
    /// challenges with grammar fragments to reach the deeper paths.
    #[test]
    fn fuzz_mutated_challenges_never_panic() {
        const SEEDS: &[&str] = &[
            RFC2617_CHALLENGE,
            RFC7616_SHA256,
            RFC7616_SHA512_256,
            "Digest realm=\"r\", nonce=n, qop=auth,auth-int, stale=TRUE",
            "Basic realm=\"b\", Digest realm=\"a \\\"q\\\"\", nonce=\"x\"",
        ];
        const PIECES: &[&str] = &[
            "Digest",
            "digest ",
            "Basic",
            " ",
            "\r\n ",
            "\t",
            ",",
            "=",
            "\"",
            "\\",
            "\\\"",
            "realm",
            "nonce",
            "qop",
            "auth",
            "auth-int",
            "algorithm",
            "SHA-256",
            "MD5-sess",
            "SHA-512-256-sess",
            "stale",
            "TRUE",
            "userhash",
            "opaque",
            "x",
            "\u{e4}",
            "\u{1F4DE}",
            "==",
            "/",
            "@",
            "\0",
        ];
        let mut rng = Lcg(42);
        let (mut ok, mut err) = (0, 0);
        for _ in 0..30_000 {
            let mut value = SEEDS[rng.below(SEEDS.len())].to_string();
            for _ in 0..=rng.below(4) {
                let at = boundary_at_or_after(&value, rng.below(value.len() + 1));
                match rng.below(3) {
                    0 => value.insert_str(at, PIECES[rng.below(PIECES.len())]),
                    1 => {
                        let to = boundary_at_or_after(&value, (at + rng.below(8)).min(value.len()));
                        value.replace_range(at..to, "");
                    }
                    _ => {
                        let to = boundary_at_or_after(&value, (at + rng.below(4)).min(value.len()));
                        value.replace_range(at..to, PIECES[rng.below(PIECES.len())]);
                    }
                }
            }
            exercise(&value);
            match Challenge::parse(&value) {
                Ok(_) => ok += 1,
                Err(_) => err += 1,
            }
        }
        // Both outcomes must be reached, or the loop is testing nothing.
        assert!(ok > 1000 && err > 1000, "ok={ok} err={err}");
    }

    #[test]
    fn errors_have_messages() {
        assert_eq!(
            DigestError::MissingParam("nonce").to_string(),
            "Digest challenge lacks the required `nonce` parameter"
        );
        assert_eq!(
            DigestError::UnsupportedAlgorithm("AKAv1-MD5".into()).to_string(),
            "unsupported Digest algorithm `AKAv1-MD5`"
        );
    }
}
