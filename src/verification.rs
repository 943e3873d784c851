//! The verification lifecycle, PURE: no clock (times are Unix milliseconds
//! passed in), no I/O. The HTTP layer and the SIP driver both move a
//! [`Verification`] through these methods, so the rules live in one place.
//!
//! ```text
//! pending --INVITE sent--> calling --rang+cancelled--> delivered
//!                                  \--other outcome--> failed
//! pending|calling|delivered|failed --right code--> verified
//!                                  --wrong code, none left--> attempts_exhausted
//!                                  --ttl passed--> expired
//! ```
//! A code can be checked before the call has ended (the user may type it
//! while the CANCEL is on its way), and after a `failed` call too: an
//! `answered` call did show the caller number.

use serde::Serialize;
use serde_json::Value;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use crate::sip::Outcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Calling,
    Delivered,
    Failed,
    Verified,
    Expired,
    AttemptsExhausted,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Pending,
        Status::Calling,
        Status::Delivered,
        Status::Failed,
        Status::Verified,
        Status::Expired,
        Status::AttemptsExhausted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Calling => "calling",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
            Status::Verified => "verified",
            Status::Expired => "expired",
            Status::AttemptsExhausted => "attempts_exhausted",
        }
    }

    /// The inverse of [`Status::as_str`] (reading the store back).
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// No transition leaves these.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Verified | Status::Expired | Status::AttemptsExhausted
        )
    }
}

/// The call placed for a verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallRecord {
    pub trunk: String,
    pub outcome: Option<Outcome>,
    pub sip_code: Option<u16>,
    pub invited_at_ms: Option<i64>,
    pub ringing_at_ms: Option<i64>,
    pub cancel_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub id: String,
    pub project: String,
    pub phone: String,
    pub sender: String,
    /// The one-time code: the caller number's last `code_length` digits.
    pub code: String,
    /// Whether the client chose the code (then it is echoed back).
    pub client_code: bool,
    /// The full caller number the call presents.
    pub caller: String,
    pub reference: Option<String>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub attempts_left: u32,
    pub status: Status,
    pub call: CallRecord,
}

/// What the client presented to `check`.
#[derive(Debug, Clone, Copy)]
pub enum Guess<'a> {
    Code(&'a str),
    /// The full caller number as the app read it.
    Cli(&'a str),
}

/// Result of a check, for the response and `flashcall_checks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    Verified,
    /// Verified before; a repeat of the right code says so again.
    AlreadyVerified,
    WrongCode,
    /// Wrong, and that was the last attempt.
    Exhausted,
    /// No attempts were left already.
    NoAttemptsLeft,
    Expired,
}

impl CheckResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckResult::Verified => "verified",
            CheckResult::AlreadyVerified => "already_verified",
            CheckResult::WrongCode => "wrong_code",
            CheckResult::Exhausted => "attempts_exhausted",
            CheckResult::NoAttemptsLeft => "no_attempts_left",
            CheckResult::Expired => "expired",
        }
    }

    pub fn verified(self) -> bool {
        matches!(self, CheckResult::Verified | CheckResult::AlreadyVerified)
    }
}

/// Constant-time equality; a length mismatch is a plain `false` (lengths
/// are public: the code length is in every response).
fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A new verification id: 32 hex digits, the creation time in
/// milliseconds (48 bits, UUIDv7's layout) then 80 random bits. Ids that
/// grow with time append to the end of the store's primary-key index: a
/// fully random id dirtied a random page of it per insert, which was the
/// largest part of the WAL written per verification. 80 bits from a CSPRNG
/// keep ids unguessable (and every lookup is scoped to the caller's
/// project).
pub fn new_id(now_ms: i64, rng: &mut impl rand::RngCore) -> String {
    let mut b = [0u8; 16];
    let t = u64::try_from(now_ms).unwrap_or(0).to_be_bytes();
    b[..6].copy_from_slice(&t[2..]);
    rng.fill_bytes(&mut b[6..]);
    hex::encode(b)
}

impl Verification {
    /// The prefix the caller number shows before the code.
    pub fn caller_prefix(&self) -> &str {
        &self.caller[..self.caller.len().saturating_sub(self.code.len())]
    }

    /// The caller number with the code's digits as `X` (the pool's range
    /// notation): what an app reading the call log matches against.
    pub fn cli_filter(&self) -> String {
        format!("{}{}", self.caller_prefix(), "X".repeat(self.code.len()))
    }

    /// Moves to `expired` when the TTL has passed; returns whether it did.
    pub fn expire_if_due(&mut self, now_ms: i64) -> bool {
        if !self.status.is_final() && now_ms >= self.expires_at_ms {
            self.status = Status::Expired;
            return true;
        }
        false
    }

    /// The INVITE went out.
    pub fn call_started(&mut self, trunk: &str, at_ms: i64) {
        self.call.trunk = trunk.to_string();
        self.call.invited_at_ms = Some(at_ms);
        if self.status == Status::Pending {
            self.status = Status::Calling;
        }
    }

    /// The call's outcome is known. A verification already checked keeps
    /// its status; the call record is filled in either way.
    pub fn call_ended(&mut self, outcome: Outcome, call: CallRecord) {
        self.call = CallRecord {
            outcome: Some(outcome),
            ..call
        };
        if matches!(self.status, Status::Pending | Status::Calling) {
            self.status = if outcome == Outcome::Delivered {
                Status::Delivered
            } else {
                Status::Failed
            };
        }
    }

    /// Checks a code or caller number at `now_ms`.
    pub fn check(&mut self, now_ms: i64, guess: Guess<'_>) -> CheckResult {
        let right = match guess {
            Guess::Code(c) => ct_eq(c, &self.code),
            Guess::Cli(n) => ct_eq(n, &self.caller),
        };
        match self.status {
            Status::Verified => {
                return if right {
                    CheckResult::AlreadyVerified
                } else {
                    CheckResult::WrongCode
                }
            }
            Status::Expired => return CheckResult::Expired,
            Status::AttemptsExhausted => return CheckResult::NoAttemptsLeft,
            _ => {}
        }
        if self.expire_if_due(now_ms) {
            return CheckResult::Expired;
        }
        if right {
            self.status = Status::Verified;
            return CheckResult::Verified;
        }
        self.attempts_left = self.attempts_left.saturating_sub(1);
        if self.attempts_left == 0 {
            self.status = Status::AttemptsExhausted;
            CheckResult::Exhausted
        } else {
            CheckResult::WrongCode
        }
    }
}

/// RFC 3339 in UTC with milliseconds, always three digits so the strings
/// sort as the times do. `None` outside the years 0000-9999.
pub fn rfc3339_string(ms: i64) -> Option<String> {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    // Written by hand into 24 bytes: `time`'s formatter walks a format
    // description per call, and every response carries two to five of these.
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut n: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, u32::from(u8::from(t.month())));
    put(8, 2, u32::from(t.day()));
    put(11, 2, u32::from(t.hour()));
    put(14, 2, u32::from(t.minute()));
    put(17, 2, u32::from(t.second()));
    put(20, 3, u32::from(t.millisecond()));
    Some(b.iter().map(|&c| char::from(c)).collect())
}

/// [`rfc3339_string`] as a JSON value (`null` when out of range).
pub fn rfc3339(ms: i64) -> Value {
    rfc3339_string(ms).map_or(Value::Null, Value::String)
}

/// A timestamp field: serialized as [`rfc3339_string`], or `null`.
struct Ts(Option<i64>);

impl Serialize for Ts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.and_then(rfc3339_string) {
            Some(t) => s.serialize_str(&t),
            None => s.serialize_none(),
        }
    }
}

/// The verification object of SPEC §5, borrowed from a [`Verification`]
/// and serialized straight to text (no `serde_json::Value` tree: building
/// one was a map allocation per field on every create, GET and event).
#[derive(Serialize)]
pub struct View<'a> {
    id: &'a str,
    status: Status,
    phone: &'a str,
    sender: &'a str,
    caller_prefix: &'a str,
    code_length: usize,
    cli_filter: String,
    created_at: Ts,
    expires_at: Ts,
    reference: &'a Option<String>,
    /// Echoed only when the client chose the code.
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    /// The GET form only.
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts_left: Option<u32>,
    /// The GET form only: `null` until the INVITE went out.
    #[serde(skip_serializing_if = "Option::is_none")]
    call: Option<Option<CallView<'a>>>,
}

#[derive(Serialize)]
struct CallView<'a> {
    outcome: Option<Outcome>,
    sip_code: Option<u16>,
    trunk: &'a str,
    caller: &'a str,
    invited_at: Ts,
    ringing_at: Ts,
    ended_at: Ts,
}

#[derive(Serialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: String,
    timestamp: Ts,
    data: View<'a>,
}

/// The JSON body of a webhook event for `v`'s current status (Standard
/// Webhooks shape: `type`, `timestamp`, `data`).
pub fn event_payload(v: &Verification, at_ms: i64) -> String {
    to_text(&Event {
        kind: format!("verification.{}", v.status.as_str()),
        timestamp: Ts(Some(at_ms)),
        data: v.view(true),
    })
}

/// Serializes one of our own views. They hold only strings, numbers and
/// options, which cannot fail to serialize; `null` is the unreachable
/// fallback rather than a panic.
fn to_text(x: &impl Serialize) -> String {
    serde_json::to_string(x).unwrap_or_else(|_| "null".to_string())
}

impl Verification {
    /// The verification object of SPEC §5; `full` adds `call` and
    /// `attempts_left` (the GET form).
    pub fn view(&self, full: bool) -> View<'_> {
        let c = &self.call;
        View {
            id: &self.id,
            status: self.status,
            phone: &self.phone,
            sender: &self.sender,
            caller_prefix: self.caller_prefix(),
            code_length: self.code.len(),
            cli_filter: self.cli_filter(),
            created_at: Ts(Some(self.created_at_ms)),
            expires_at: Ts(Some(self.expires_at_ms)),
            reference: &self.reference,
            code: self.client_code.then_some(self.code.as_str()),
            attempts_left: full.then_some(self.attempts_left),
            call: full.then(|| {
                // Once invited, or closed without an INVITE (a shutdown, a
                // trunk resting after 503): the outcome says why.
                (c.invited_at_ms.is_some() || c.outcome.is_some()).then(|| CallView {
                    outcome: c.outcome,
                    sip_code: c.sip_code,
                    trunk: &c.trunk,
                    caller: &self.caller,
                    invited_at: Ts(c.invited_at_ms),
                    ringing_at: Ts(c.ringing_at_ms),
                    ended_at: Ts(c.ended_at_ms),
                })
            }),
        }
    }

    /// [`Self::view`] as JSON text.
    pub fn to_json_string(&self, full: bool) -> String {
        to_text(&self.view(full))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v() -> Verification {
        Verification {
            id: "id".into(),
            project: "p".into(),
            phone: "+447911123456".into(),
            sender: "DEMO".into(),
            code: "0123".into(),
            client_code: false,
            caller: "+447700900123".into(),
            reference: None,
            created_at_ms: 1_000,
            expires_at_ms: 301_000,
            attempts_left: 3,
            status: Status::Pending,
            call: CallRecord::default(),
        }
    }

    #[test]
    fn prefix_and_filter() {
        let v = v();
        assert_eq!(v.caller_prefix(), "+44770090");
        assert_eq!(v.cli_filter(), "+44770090XXXX");
    }

    #[test]
    fn delivered_then_wrong_then_right() {
        let mut v = v();
        v.call_started("main", 2_000);
        assert_eq!(v.status, Status::Calling);
        v.call_ended(Outcome::Delivered, CallRecord::default());
        assert_eq!(v.status, Status::Delivered);
        assert_eq!(v.check(3_000, Guess::Code("9999")), CheckResult::WrongCode);
        assert_eq!(v.attempts_left, 2);
        assert_eq!(v.check(3_000, Guess::Code("0123")), CheckResult::Verified);
        assert_eq!(v.status, Status::Verified);
        assert_eq!(v.attempts_left, 2);
        assert_eq!(
            v.check(3_000, Guess::Code("0123")),
            CheckResult::AlreadyVerified
        );
        assert_eq!(v.check(3_000, Guess::Code("1111")), CheckResult::WrongCode);
        assert_eq!(v.status, Status::Verified);
    }

    #[test]
    fn check_by_cli() {
        let mut v = v();
        assert_eq!(
            v.check(2_000, Guess::Cli("+447700900124")),
            CheckResult::WrongCode
        );
        assert_eq!(
            v.check(2_000, Guess::Cli("+447700900123")),
            CheckResult::Verified
        );
    }

    #[test]
    fn verified_while_calling_keeps_status_when_call_ends() {
        let mut v = v();
        v.call_started("main", 2_000);
        assert_eq!(v.check(2_500, Guess::Code("0123")), CheckResult::Verified);
        v.call_ended(Outcome::Delivered, CallRecord::default());
        assert_eq!(v.status, Status::Verified);
        assert_eq!(v.call.outcome, Some(Outcome::Delivered));
    }

    #[test]
    fn failed_call_sets_failed() {
        let mut v = v();
        v.call_started("main", 2_000);
        v.call_ended(Outcome::Busy, CallRecord::default());
        assert_eq!(v.status, Status::Failed);
    }

    #[test]
    fn attempts_exhaust() {
        let mut v = v();
        assert_eq!(v.check(2_000, Guess::Code("1")), CheckResult::WrongCode);
        assert_eq!(v.check(2_000, Guess::Code("2")), CheckResult::WrongCode);
        assert_eq!(v.check(2_000, Guess::Code("3")), CheckResult::Exhausted);
        assert_eq!(v.status, Status::AttemptsExhausted);
        assert_eq!(
            v.check(2_000, Guess::Code("0123")),
            CheckResult::NoAttemptsLeft
        );
        assert!(!v.check(2_000, Guess::Code("0123")).verified());
    }

    #[test]
    fn expires_at_exactly_ttl() {
        let mut v = v();
        assert!(!v.expire_if_due(300_999));
        assert_eq!(v.check(301_000, Guess::Code("0123")), CheckResult::Expired);
        assert_eq!(v.status, Status::Expired);
        // A verified one never expires.
        let mut w = self::v();
        w.check(2_000, Guess::Code("0123"));
        assert!(!w.expire_if_due(1_000_000));
    }

    #[test]
    fn rfc3339_matches_the_time_crate_formatter() {
        const FMT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        // Epoch, a leap day, the last millisecond of 9999, and a spread of
        // times in between, stepping by an odd number of milliseconds.
        let mut samples = vec![0, 951_782_400_000, 253_402_300_799_999];
        samples.extend((0..20_000).map(|i| i * 12_653_483_117));
        for ms in samples {
            let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
            assert_eq!(rfc3339_string(ms), Some(t.format(FMT).unwrap()), "{ms}");
        }
        assert_eq!(rfc3339_string(-1), Some("1969-12-31T23:59:59.999Z".into()));
        assert!(rfc3339_string(-62_167_219_200_000).is_some(), "0000-01-01");
        assert_eq!(rfc3339_string(-62_167_219_200_001), None, "year -1");
        assert_eq!(rfc3339_string(253_402_300_800_000), None, "year 10000");
        assert_eq!(rfc3339(1_000), json!("1970-01-01T00:00:01.000Z"));
    }

    #[test]
    fn the_view_serializes_the_spec_object() {
        let mut v = self::v();
        let short: Value = serde_json::from_str(&v.to_json_string(false)).unwrap();
        assert_eq!(
            short,
            json!({
                "id": "id", "status": "pending", "phone": "+447911123456",
                "sender": "DEMO", "caller_prefix": "+44770090", "code_length": 4,
                "cli_filter": "+44770090XXXX",
                "created_at": "1970-01-01T00:00:01.000Z",
                "expires_at": "1970-01-01T00:05:01.000Z", "reference": null,
            })
        );
        let full: Value = serde_json::from_str(&v.to_json_string(true)).unwrap();
        assert_eq!(full["attempts_left"], 3);
        assert_eq!(full["call"], Value::Null);
        assert!(full.as_object().unwrap().contains_key("call"));

        v.client_code = true;
        v.reference = Some("order-7".into());
        v.call_started("main", 2_000);
        v.call_ended(
            Outcome::Delivered,
            CallRecord {
                trunk: "main".into(),
                sip_code: Some(487),
                invited_at_ms: Some(2_000),
                ringing_at_ms: Some(2_250),
                ..Default::default()
            },
        );
        let full: Value = serde_json::from_str(&v.to_json_string(true)).unwrap();
        assert_eq!(full["code"], "0123");
        assert_eq!(full["reference"], "order-7");
        assert_eq!(full["status"], "delivered");
        assert_eq!(
            full["call"],
            json!({
                "outcome": "delivered", "sip_code": 487, "trunk": "main",
                "caller": "+447700900123", "invited_at": "1970-01-01T00:00:02.000Z",
                "ringing_at": "1970-01-01T00:00:02.250Z", "ended_at": null,
            })
        );
        let event: Value = serde_json::from_str(&event_payload(&v, 3_000)).unwrap();
        assert_eq!(event["type"], "verification.delivered");
        assert_eq!(event["timestamp"], "1970-01-01T00:00:03.000Z");
        assert_eq!(event["data"], full);
    }

    #[test]
    fn ids_sort_by_creation_time_and_stay_random() {
        let mut rng = rand::thread_rng();
        let a = new_id(1_764_000_000_000, &mut rng);
        let b = new_id(1_764_000_000_000, &mut rng);
        let c = new_id(1_764_000_000_001, &mut rng);
        for id in [&a, &b, &c] {
            assert_eq!(id.len(), 32);
            assert!(id.bytes().all(|x| x.is_ascii_hexdigit()));
        }
        // Same millisecond: same 12-digit time prefix, different random part.
        assert_eq!(a[..12], b[..12]);
        assert_eq!(&a[..12], "019ab697e800");
        assert_ne!(a, b);
        // A later millisecond sorts after both.
        assert!(c > a && c > b);
    }
}
