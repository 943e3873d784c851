//! Tolerant, zero-copy SIP message parsing.
//!
//! Why our own parser: rsip 0.4 rejects much of what real trunks send (compact
//! header names, folded lines, whitespace before `:`, bytes past
//! Content-Length; see ARCHITECTURE.md), and it allocates a full typed tree for
//! every datagram. A flash call only needs a handful of fields from each
//! response, so one pass over the bytes picks exactly those (status, top Via
//! branch, CSeq, Call-ID, To tag, Contact, Retry-After, Content-Length) and
//! keeps slices into the datagram. Rare fields (authentication challenges,
//! Record-Route, every Via for a reply) are found by re-scanning the headers on
//! demand with [`Message::headers`], so the common path never allocates.
//!
//! What is tolerated (RFC 3261 §7.3.1, RFC 4475 §3.1.1): any header-name case,
//! compact names, whitespace around `:`, `=` and `;`, line folding, several
//! values in one Via line, a bare LF line ending, an empty or UTF-8 reason
//! phrase, bytes past Content-Length. What is refused, as RFC 4475 §3.1.2
//! asks: a start line that is not one, a missing Via/From/To/Call-ID/CSeq,
//! conflicting duplicates of single-valued headers, a Content-Length that is
//! not a number or promises more body than arrived, a CSeq number of 2^31 or
//! more, a status code outside 100..=699, a CSeq method that differs from the
//! request method.

use memchr::memmem::Finder;
use std::sync::LazyLock;
use thiserror::Error;

/// Why a datagram was not accepted as a SIP message. Every variant is a
/// counted drop (`flashcall_sip_parse_errors_total`), never a panic.
#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum ParseError {
    #[error("empty datagram")]
    Empty,
    #[error("no blank line ends the header section")]
    Unterminated,
    #[error("malformed start line")]
    StartLine,
    #[error("unsupported SIP version")]
    Version,
    #[error("status code out of range")]
    StatusCode,
    #[error("malformed header line")]
    HeaderLine,
    #[error("missing required header {0}")]
    Missing(&'static str),
    #[error("conflicting values for single-valued header {0}")]
    Duplicate(&'static str),
    #[error("malformed {0} header")]
    BadHeader(&'static str),
    #[error("Content-Length larger than the body received")]
    Truncated,
    #[error("CSeq method does not match the request method")]
    CSeqMismatch,
}

/// Header names the engine cares about, after compact-form and case folding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    Via,
    From,
    To,
    CallId,
    CSeq,
    Contact,
    ContentLength,
    ContentType,
    MaxForwards,
    RecordRoute,
    Route,
    RetryAfter,
    WwwAuthenticate,
    ProxyAuthenticate,
    Other,
}

impl Name {
    /// Maps a raw header name (any case, compact or long form) to a [`Name`].
    pub fn from_bytes(raw: &[u8]) -> Name {
        if raw.len() == 1 {
            return match raw[0].to_ascii_lowercase() {
                b'v' => Name::Via,
                b'f' => Name::From,
                b't' => Name::To,
                b'i' => Name::CallId,
                b'm' => Name::Contact,
                b'l' => Name::ContentLength,
                b'c' => Name::ContentType,
                _ => Name::Other,
            };
        }
        // Dispatch on the length first: one comparison instead of a scan of
        // every long name (this runs for every header line of every datagram).
        let is = |long: &[u8]| raw.eq_ignore_ascii_case(long);
        match raw.len() {
            2 if is(b"to") => Name::To,
            3 if is(b"via") => Name::Via,
            4 if is(b"from") => Name::From,
            4 if is(b"cseq") => Name::CSeq,
            5 if is(b"route") => Name::Route,
            7 if is(b"call-id") => Name::CallId,
            7 if is(b"contact") => Name::Contact,
            11 if is(b"retry-after") => Name::RetryAfter,
            12 if is(b"content-type") => Name::ContentType,
            12 if is(b"max-forwards") => Name::MaxForwards,
            12 if is(b"record-route") => Name::RecordRoute,
            14 if is(b"content-length") => Name::ContentLength,
            16 if is(b"www-authenticate") => Name::WwwAuthenticate,
            18 if is(b"proxy-authenticate") => Name::ProxyAuthenticate,
            _ => Name::Other,
        }
    }
}

/// The first line of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartLine<'a> {
    Request { method: &'a str, uri: &'a str },
    Response { code: u16, reason: &'a [u8] },
}

/// `CSeq: <number> <method>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CSeq<'a> {
    pub number: u32,
    pub method: &'a str,
}

/// A parsed message: the hot-path fields, plus the raw header block for
/// on-demand lookups. Every slice borrows from the datagram.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    pub start: StartLine<'a>,
    /// The `branch` parameter of the topmost Via value, if it has one.
    pub top_via_branch: Option<&'a str>,
    pub call_id: &'a str,
    pub cseq: CSeq<'a>,
    /// Raw From / To values (may contain folding; see [`unfold`]).
    pub from: &'a [u8],
    pub to: &'a [u8],
    pub from_tag: Option<&'a str>,
    pub to_tag: Option<&'a str>,
    /// URI of the first Contact value (without angle brackets).
    pub contact_uri: Option<&'a str>,
    /// Retry-After in seconds (saturating), when present.
    pub retry_after: Option<u32>,
    /// Message body, cut at Content-Length.
    pub body: &'a [u8],
    /// The header block (everything between the start line and the blank line).
    header_block: &'a [u8],
}

/// Iterator over `(name, raw name, value)` of a header block, joining folded
/// continuation lines into one value.
pub struct Headers<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Headers<'a> {
    type Item = Result<(Name, &'a [u8], &'a [u8]), ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let (line, rest) = split_line(self.rest);
        self.rest = rest.unwrap_or_default();
        Some(header_line(line))
    }
}

/// One logical header line from the start of `buf` (folded continuation
/// lines included, its own line break not): the line, and what follows its
/// line break, or `None` when no line break ends it.
fn split_line(buf: &[u8]) -> (&[u8], Option<&[u8]>) {
    // A logical header line ends at a line break not followed by SP/HT.
    let mut from = 0;
    while let Some(off) = memchr(b'\n', &buf[from..]) {
        let nl = from + off;
        match buf.get(nl + 1) {
            Some(b' ') | Some(b'\t') => from = nl + 1,
            _ => {
                let end = if nl > 0 && buf[nl - 1] == b'\r' {
                    nl - 1
                } else {
                    nl
                };
                return (&buf[..end], Some(&buf[nl + 1..]));
            }
        }
    }
    (buf, None)
}

/// `(name, raw name, trimmed value)` of one logical header line.
fn header_line(line: &[u8]) -> Result<(Name, &[u8], &[u8]), ParseError> {
    // `ws* token ws* ':'` in one pass: the same lines as "trim what is
    // before the first colon and check it is a token", without a separate
    // colon search and name scan for every line.
    let mut i = 0;
    while i < line.len() && line[i].is_ascii_whitespace() {
        i += 1;
    }
    let start = i;
    while i < line.len() && is_token(line[i]) {
        i += 1;
    }
    let raw_name = &line[start..i];
    while i < line.len() && line[i].is_ascii_whitespace() {
        i += 1;
    }
    if raw_name.is_empty() || line.get(i) != Some(&b':') {
        return Err(ParseError::HeaderLine);
    }
    let value = trim(&line[i + 1..]);
    Ok((Name::from_bytes(raw_name), raw_name, value))
}

/// The hot-path fields, gathered while the header lines go by.
#[derive(Default)]
struct Fields<'a> {
    top_via_branch: Option<&'a str>,
    seen_via: bool,
    call_id: Option<&'a str>,
    cseq: Option<CSeq<'a>>,
    from: Option<&'a [u8]>,
    to: Option<&'a [u8]>,
    contact_uri: Option<&'a str>,
    content_length: Option<usize>,
    retry_after: Option<u32>,
}

impl<'a> Fields<'a> {
    fn take(&mut self, name: Name, value: &'a [u8]) -> Result<(), ParseError> {
        match name {
            Name::Via if !self.seen_via => {
                self.seen_via = true;
                let first = split_top(value).next().unwrap_or(value);
                self.top_via_branch = via_branch(first)?;
            }
            Name::CallId => {
                let v = utf8(value).ok_or(ParseError::BadHeader("Call-ID"))?;
                if v.is_empty() || v.bytes().any(|b| b.is_ascii_whitespace()) {
                    return Err(ParseError::BadHeader("Call-ID"));
                }
                set_once(&mut self.call_id, v, "Call-ID")?;
            }
            Name::CSeq => {
                let c = parse_cseq(value)?;
                set_once(&mut self.cseq, c, "CSeq")?;
            }
            Name::From => set_once(&mut self.from, value, "From")?,
            Name::To => set_once(&mut self.to, value, "To")?,
            Name::Contact if self.contact_uri.is_none() => {
                let first = split_top(value).next().unwrap_or(value);
                self.contact_uri = addr_uri(first);
            }
            Name::ContentLength => {
                let n = parse_uint(value, usize::MAX as u64)
                    .ok_or(ParseError::BadHeader("Content-Length"))?
                    as usize;
                set_once(&mut self.content_length, n, "Content-Length")?;
            }
            Name::RetryAfter => {
                let digits = value
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .fold(0u32, |acc, &b| {
                        acc.saturating_mul(10).saturating_add(u32::from(b - b'0'))
                    });
                if value.first().is_some_and(|b| b.is_ascii_digit()) {
                    self.retry_after = Some(digits);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl<'a> Message<'a> {
    /// Parses one datagram. Bytes past Content-Length are ignored (RFC 3261
    /// §18.3); a datagram shorter than its Content-Length is refused.
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, ParseError> {
        // RFC 3261 §7.5: tolerate leading CRLFs (keep-alives, stray line ends).
        let mut buf = buf;
        while let [b'\r' | b'\n', rest @ ..] = buf {
            buf = rest;
        }
        if buf.is_empty() {
            return Err(ParseError::Empty);
        }
        let first_nl = memchr(b'\n', buf).ok_or(ParseError::Unterminated)?;
        // A message with no blank line is Unterminated whatever else is
        // wrong with it; the blank line is found by the header scan below,
        // so only an error path searches for it separately.
        let fail = |e: ParseError| match find_head_end(buf) {
            Some(_) => e,
            None => ParseError::Unterminated,
        };
        let start_raw = strip_cr(&buf[..first_nl]);
        let start = parse_start_line(start_raw).map_err(fail)?;

        // Header lines up to the blank line (CRLF or bare LF), in one pass:
        // finding the blank line first with a substring search cost more
        // than the scan, '\n' and '\r' being the commonest bytes in SIP.
        let mut f = Fields::default();
        let mut rest = &buf[first_nl + 1..];
        let (head_end, body_start) = loop {
            let at = buf.len() - rest.len();
            match rest {
                [b'\r', b'\n', ..] => break (at, at + 2),
                [b'\n', ..] => break (at, at + 1),
                [] => return Err(ParseError::Unterminated),
                _ => {}
            }
            let (line, next) = split_line(rest);
            let Some(next) = next else {
                return Err(ParseError::Unterminated);
            };
            let (name, _, value) = header_line(line).map_err(fail)?;
            f.take(name, value).map_err(fail)?;
            rest = next;
        };
        let header_block = &buf[first_nl + 1..head_end];
        let Fields {
            top_via_branch,
            seen_via,
            call_id,
            cseq,
            from,
            to,
            contact_uri,
            content_length,
            retry_after,
        } = f;

        if !seen_via {
            return Err(ParseError::Missing("Via"));
        }
        let call_id = call_id.ok_or(ParseError::Missing("Call-ID"))?;
        let cseq = cseq.ok_or(ParseError::Missing("CSeq"))?;
        let from = from.ok_or(ParseError::Missing("From"))?;
        let to = to.ok_or(ParseError::Missing("To"))?;
        if let StartLine::Request { method, .. } = start {
            if cseq.method != method {
                return Err(ParseError::CSeqMismatch);
            }
        }
        let rest = &buf[body_start..];
        let body = match content_length {
            Some(n) if n > rest.len() => return Err(ParseError::Truncated),
            Some(n) => &rest[..n],
            None => rest,
        };
        Ok(Message {
            start,
            top_via_branch,
            call_id,
            cseq,
            from,
            to,
            from_tag: param(header_params(from), "tag"),
            to_tag: param(header_params(to), "tag"),
            contact_uri,
            retry_after,
            body,
            header_block,
        })
    }

    /// Every header line, in order, folded lines joined.
    pub fn headers(&self) -> impl Iterator<Item = (Name, &'a [u8], &'a [u8])> {
        // The block was fully validated by `parse`, so errors cannot recur.
        Headers {
            rest: self.header_block,
        }
        .filter_map(Result::ok)
    }

    /// Every value of a header, split at top-level commas for list headers
    /// (Via, Contact, Route, Record-Route). Challenges are not comma-split:
    /// their parameters are comma-separated.
    pub fn values(&self, wanted: Name) -> impl Iterator<Item = &'a [u8]> {
        let split = matches!(
            wanted,
            Name::Via | Name::Contact | Name::Route | Name::RecordRoute
        );
        self.headers()
            .filter(move |(n, _, _)| *n == wanted)
            .flat_map(move |(_, _, v)| {
                let parts: Box<dyn Iterator<Item = &'a [u8]>> = if split {
                    Box::new(split_top(v))
                } else {
                    Box::new(std::iter::once(v))
                };
                parts
            })
    }

    /// The status code for a response, `None` for a request.
    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code, .. } => Some(code),
            StartLine::Request { .. } => None,
        }
    }
}

fn set_once<T: PartialEq>(
    slot: &mut Option<T>,
    v: T,
    name: &'static str,
) -> Result<(), ParseError> {
    match slot {
        Some(old) if *old != v => Err(ParseError::Duplicate(name)),
        _ => {
            *slot = Some(v);
            Ok(())
        }
    }
}

fn parse_start_line(line: &[u8]) -> Result<StartLine<'_>, ParseError> {
    if line.len() >= 8 && line[..8].eq_ignore_ascii_case(b"SIP/2.0 ") {
        // Status-Line = SIP-Version SP Status-Code SP Reason-Phrase. The
        // reason may hold UTF-8 or stray octets (%x80-FF), so it stays bytes.
        let bytes = &line[8..];
        if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) {
            return Err(ParseError::StatusCode);
        }
        if bytes.len() > 3 && bytes[3] != b' ' {
            return Err(ParseError::StatusCode);
        }
        let code = (u16::from(bytes[0] - b'0')) * 100
            + u16::from(bytes[1] - b'0') * 10
            + u16::from(bytes[2] - b'0');
        if !(100..=699).contains(&code) {
            return Err(ParseError::StatusCode);
        }
        let reason = bytes.get(4..).unwrap_or_default();
        return Ok(StartLine::Response { code, reason });
    }
    if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"SIP/") {
        return Err(ParseError::Version);
    }
    // A request line holds no raw non-ASCII (URIs escape it), so refusing
    // non-UTF-8 here is safe.
    let line = utf8(line).ok_or(ParseError::StartLine)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::StartLine);
    };
    if method.is_empty() || !method.bytes().all(is_token) || uri.is_empty() {
        return Err(ParseError::StartLine);
    }
    if !uri.contains(':') || uri.bytes().any(|b| b.is_ascii_control()) {
        return Err(ParseError::StartLine);
    }
    if !version.eq_ignore_ascii_case("SIP/2.0") {
        return Err(ParseError::Version);
    }
    Ok(StartLine::Request { method, uri })
}

fn parse_cseq(value: &[u8]) -> Result<CSeq<'_>, ParseError> {
    let bad = ParseError::BadHeader("CSeq");
    let digits_end = value.iter().position(|b| !b.is_ascii_digit()).ok_or(bad)?;
    // RFC 3261 §8.1.1.5: the sequence number MUST be less than 2^31.
    let number = parse_uint(&value[..digits_end], (1 << 31) - 1).ok_or(bad)? as u32;
    let method = trim(&value[digits_end..]);
    if digits_end == 0 || method.is_empty() || !method.iter().all(|&b| is_token(b)) {
        return Err(bad);
    }
    if !matches!(value[digits_end], b' ' | b'\t' | b'\r' | b'\n') {
        return Err(bad);
    }
    let method = utf8(method).ok_or(bad)?;
    Ok(CSeq { number, method })
}

/// Parses a run of ASCII digits (surrounding whitespace allowed) no larger
/// than `max`; leading zeros are fine, overflow is refused, not wrapped.
fn parse_uint(value: &[u8], max: u64) -> Option<u64> {
    let value = trim(value);
    if value.is_empty() {
        return None;
    }
    // Leading zeros carry no value; past them, more than 20 digits overflow.
    let zeros = value.iter().take_while(|&&b| b == b'0').count();
    let value = if zeros == value.len() {
        &value[zeros - 1..]
    } else {
        &value[zeros..]
    };
    if value.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    (n <= max).then_some(n)
}

/// The `branch` of one Via value. The sent-protocol must be SIP/2.0/x
/// (whitespace allowed around `/`); a Via without a branch (RFC 2543 peers)
/// is legal and yields `None`.
fn via_branch(value: &[u8]) -> Result<Option<&str>, ParseError> {
    let bad = ParseError::BadHeader("Via");
    let compact: Vec<u8>;
    let head_end = value.iter().position(|&b| b == b';').unwrap_or(value.len());
    // Cheap check of "SIP/2.0/" without allocating in the common no-space case.
    let head = &value[..head_end];
    let proto_ok = if head.len() >= 8 && head[..8].eq_ignore_ascii_case(b"SIP/2.0/") {
        true
    } else {
        compact = head
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        compact.len() >= 8 && compact[..8].eq_ignore_ascii_case(b"SIP/2.0/")
    };
    if !proto_ok {
        return Err(bad);
    }
    let params = &value[head_end..];
    Ok(param(params, "branch"))
}

/// The `;param` section of a From/To/Contact value: after `>` in name-addr
/// form, after the URI in addr-spec form (where params belong to the header).
pub fn header_params(value: &[u8]) -> &[u8] {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, &b) in value.iter().enumerate() {
        if in_quotes {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_quotes = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_quotes = true,
            b'<' => {
                return match memchr(b'>', &value[i..]) {
                    Some(end) => &value[i + end + 1..],
                    None => &[],
                }
            }
            b';' => return &value[i..],
            _ => {}
        }
    }
    &[]
}

/// The URI of a name-addr / addr-spec value (inside `<>` when present).
pub fn addr_uri(value: &[u8]) -> Option<&str> {
    let uri = if let Some(lt) = find_unquoted(value, b'<') {
        let inner = &value[lt + 1..];
        &inner[..memchr(b'>', inner)?]
    } else {
        let end = value.iter().position(|&b| b == b';').unwrap_or(value.len());
        trim(&value[..end])
    };
    let uri = utf8(trim(uri))?;
    (!uri.is_empty()).then_some(uri)
}

fn find_unquoted(value: &[u8], needle: u8) -> Option<usize> {
    // Fast path: no quote before the first needle means no quoting applies.
    let hit = memchr(needle, value)?;
    if memchr(b'"', &value[..hit]).is_none() {
        return Some(hit);
    }
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, &b) in value.iter().enumerate() {
        if in_quotes {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_quotes = false,
                _ => {}
            }
        } else if b == b'"' {
            in_quotes = true;
        } else if b == needle {
            return Some(i);
        }
    }
    None
}

/// Finds `name` among `;name=value` parameters, whitespace (and folding)
/// allowed around `;` and `=`. Returns the trimmed value, unquoted.
pub fn param<'a>(params: &'a [u8], name: &str) -> Option<&'a str> {
    if memchr(b'"', params).is_none() {
        return param_unquoted(params, name);
    }
    param_quoted(params, name)
}

/// [`param`] for any list, quotes included.
fn param_quoted<'a>(params: &'a [u8], name: &str) -> Option<&'a str> {
    let mut rest = params;
    while let Some(semi) = find_unquoted(rest, b';') {
        rest = &rest[semi + 1..];
        // The item ends at the next unquoted `;` or `,` (a `,` ends the value
        // list entry, so the search stops there).
        let end = unquoted_end(rest);
        let item = &rest[..end];
        let (key, val) = match find_unquoted(item, b'=') {
            Some(eq) => (trim(&item[..eq]), Some(trim(&item[eq + 1..]))),
            None => (trim(item), None),
        };
        if key.eq_ignore_ascii_case(name.as_bytes()) {
            let val = val?;
            let val = val
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(val);
            return utf8(val).filter(|v| !v.is_empty());
        }
        if rest.get(end) == Some(&b',') {
            return None;
        }
        rest = &rest[end..];
    }
    None
}

/// [`param`] for a parameter list without quotes (nearly all of them): the
/// same result with less scanning. Each item's end is one SIMD search (the
/// values, 25- to 40-byte branches and tags, are most of the bytes), and `=`
/// is looked for by a byte loop, as it comes right after a short key.
fn param_unquoted<'a>(params: &'a [u8], name: &str) -> Option<&'a str> {
    let first = memchr(b';', params)?;
    let mut rest = &params[first + 1..];
    loop {
        let end = memchr::memchr2(b';', b',', rest).unwrap_or(rest.len());
        let item = &rest[..end];
        let (key, val) = match item.iter().position(|&b| b == b'=') {
            Some(eq) => (trim(&item[..eq]), Some(trim(&item[eq + 1..]))),
            None => (trim(item), None),
        };
        if key.eq_ignore_ascii_case(name.as_bytes()) {
            return utf8(val?).filter(|v| !v.is_empty());
        }
        // A `,` ends this value's parameters.
        match rest.get(end) {
            Some(b';') => rest = &rest[end + 1..],
            _ => return None,
        }
    }
}

/// Index of the first `;` or `,` outside quotes, or the length.
fn unquoted_end(v: &[u8]) -> usize {
    // One pass for both delimiters; quotes are rare, so look for them too
    // and fall back to the careful scan only when one comes first.
    match memchr::memchr3(b';', b',', b'"', v) {
        None => v.len(),
        Some(i) if v[i] != b'"' => i,
        Some(_) => match (find_unquoted(v, b';'), find_unquoted(v, b',')) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => v.len(),
        },
    }
}

/// Splits a header value at commas that are outside quotes and `<>`.
pub fn split_top(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let v = rest?;
        // Fast path: a value without commas or quotes is one element.
        if memchr::memchr2(b',', b'"', v).is_none() {
            rest = None;
            return Some(trim(v));
        }
        let mut in_quotes = false;
        let mut escaped = false;
        let mut in_angle = false;
        for (i, &b) in v.iter().enumerate() {
            if in_quotes {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_quotes = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => in_quotes = true,
                b'<' => in_angle = true,
                b'>' => in_angle = false,
                b',' if !in_angle => {
                    rest = Some(&v[i + 1..]);
                    return Some(trim(&v[..i]));
                }
                _ => {}
            }
        }
        rest = None;
        Some(trim(v))
    })
    .filter(|v| !v.is_empty())
}

/// Replaces each folded line break (CRLF + whitespace) with one space, for
/// copying a received value into a message we send.
pub fn unfold(value: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < value.len() {
        let b = value[i];
        if b == b'\r' || b == b'\n' {
            while i < value.len() && value[i].is_ascii_whitespace() {
                i += 1;
            }
            out.push(b' ');
            continue;
        }
        out.push(b);
        i += 1;
    }
}

/// Finds the end of the header section: returns (end of headers, body start).
/// The blank line is the first line break followed by another (CRLF or bare
/// LF), found with two SIMD substring searches instead of a walk over every
/// line.
fn find_head_end(buf: &[u8]) -> Option<(usize, usize)> {
    // Built once: `memmem::find` builds its searcher on every call, which
    // cost more than the search itself on a 300-byte datagram.
    static CRLF: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\r\n"));
    static LF: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
    let crlf = CRLF.find(buf);
    // A bare-LF blank line counts only if it comes first.
    let lf_limit = crlf.map_or(buf.len(), |c| c + 1);
    if let Some(l) = LF.find(&buf[..lf_limit]) {
        return Some((l + 1, l + 2));
    }
    crlf.map(|c| (c + 1, c + 3))
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Trims SP, HT, CR and LF at both ends (folding counts as whitespace).
pub fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// RFC 3261 `token` characters.
#[inline]
fn is_token(b: u8) -> bool {
    TOKEN[b as usize]
}

/// [`is_token`] as a table: one load per byte of every header name.
static TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            );
        b += 1;
    }
    t
};

/// The bytes as `&str` when they are UTF-8. Header fields are nearly always
/// ASCII, and `is_ascii` checks a word at a time where the UTF-8 decoder
/// goes byte by byte: on the 20- to 50-byte Call-IDs, tags and branches of
/// every response that was 2% of the engine's CPU.
#[inline]
fn utf8(b: &[u8]) -> Option<&str> {
    if b.is_ascii() {
        // SAFETY: every ASCII byte sequence is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(b) })
    } else {
        std::str::from_utf8(b).ok()
    }
}

/// SIMD byte search (the `memchr` crate): line ends and delimiters are most
/// of what the parser looks for, and a byte-at-a-time loop was the hot spot.
#[inline]
fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    memchr::memchr(needle, hay)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RINGING: &[u8] = b"SIP/2.0 180 Ringing\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5060;rport=5060;branch=z9hG4bKabc\r\n\
From: <sip:+447700900123@127.0.0.1>;tag=f1\r\n\
To: <sip:+447700900999@127.0.0.1>;tag=t9\r\n\
Call-ID: c1@h\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:callee@127.0.0.1:5070>\r\n\
Content-Length: 0\r\n\r\n";

    #[test]
    fn parses_hot_fields() {
        let m = Message::parse(RINGING).expect("parse");
        assert_eq!(m.status(), Some(180));
        assert_eq!(m.top_via_branch, Some("z9hG4bKabc"));
        assert_eq!(m.call_id, "c1@h");
        assert_eq!(
            m.cseq,
            CSeq {
                number: 1,
                method: "INVITE"
            }
        );
        assert_eq!(m.to_tag, Some("t9"));
        assert_eq!(m.from_tag, Some("f1"));
        assert_eq!(m.contact_uri, Some("sip:callee@127.0.0.1:5070"));
        assert!(m.body.is_empty());
    }

    #[test]
    fn params_with_odd_whitespace() {
        assert_eq!(
            param(b";  tag    = 1918181833n", "tag"),
            Some("1918181833n")
        );
        assert_eq!(param(b"\r\n  ;\r\n  tag = 98asjd8", "TAG"), Some("98asjd8"));
        assert_eq!(param(b";lr;branch=z9hG4bKx", "branch"), Some("z9hG4bKx"));
        assert_eq!(param(b";lr, ;branch=z9", "branch"), None);
    }

    #[test]
    fn to_tag_in_quoted_display_name_is_ignored() {
        let v = b"\"a;tag=no <x>\" <sip:a@b;tag=uri>;tag=yes";
        assert_eq!(param(header_params(v), "tag"), Some("yes"));
    }

    use proptest::prelude::*;

    /// Pieces that SIP parsing hinges on, for random SIP-shaped inputs.
    const PIECES: &[&[u8]] = &[
        b"\r\n",
        b"\n",
        b"\r",
        b" ",
        b"\t",
        b";",
        b",",
        b"=",
        b"\"",
        b"<",
        b">",
        b":",
        b"tag",
        b"TAG",
        b"branch",
        b"z9hG4bKx1",
        b"lr",
        b"a",
        b"\\",
        b"SIP/2.0 180 Ringing\r\n",
        b"INVITE sip:a@b SIP/2.0\r\n",
        b"Via: SIP/2.0/UDP h:5060;branch=z9hG4bKb1",
        b"v: SIP/2.0/UDP h",
        b"From: <sip:a@b>;tag=f",
        b"To: <sip:c@d>",
        b"t: x;tag=y",
        b"Call-ID: c1",
        b"CSeq: 1 INVITE",
        b"Content-Length: 3",
        b"Contact: <sip:c@1.2.3.4>",
        b"X-Other: 1",
    ];

    fn shaped() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(proptest::sample::select(PIECES), 0..40)
            .prop_map(|parts| parts.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

        /// The quote-free fast path gives what the general path gives.
        #[test]
        fn unquoted_param_fast_path_agrees(params in shaped(), name in "(tag|branch|lr|a|TAG)") {
            let params: Vec<u8> = params.into_iter().filter(|&b| b != b'"').collect();
            prop_assert_eq!(param_unquoted(&params, &name), param_quoted(&params, &name));
        }

        /// The blank line found during the header scan is the one the
        /// substring search finds, and a message without one is refused as
        /// Unterminated whatever else is wrong with it.
        #[test]
        fn head_end_agrees_with_substring_search(input in shaped()) {
            let mut buf = &input[..];
            while let [b'\r' | b'\n', rest @ ..] = buf {
                buf = rest;
            }
            let head = find_head_end(buf);
            match Message::parse(&input) {
                Err(ParseError::Empty) => prop_assert!(buf.is_empty()),
                Err(ParseError::Unterminated) => prop_assert!(head.is_none()),
                Err(_) => prop_assert!(head.is_some()),
                Ok(m) => {
                    let (head_end, body_start) = head.expect("parsed without a blank line");
                    let block_end = offset(buf, m.header_block) + m.header_block.len();
                    // An empty block sits right after the start line.
                    if !m.header_block.is_empty() {
                        prop_assert_eq!(block_end, head_end);
                    }
                    prop_assert_eq!(offset(buf, m.body), body_start);
                }
            }
        }
    }

    #[test]
    fn utf8_accepts_ascii_and_utf8_refuses_the_rest() {
        assert_eq!(utf8(b"abc@h"), Some("abc@h"));
        assert_eq!(utf8(b""), Some(""));
        assert_eq!(utf8("é@ü".as_bytes()), Some("é@ü"));
        assert_eq!(utf8(b"a\xffb"), None);
        assert_eq!(utf8(b"\xc3"), None);
    }

    fn offset(whole: &[u8], part: &[u8]) -> usize {
        part.as_ptr() as usize - whole.as_ptr() as usize
    }
}
