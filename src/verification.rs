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
use serde_json::{json, Value};
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
/// sort as the times do.
pub fn rfc3339(ms: i64) -> Value {
    const FMT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(FMT).ok())
        .map_or(Value::Null, Value::String)
}

/// The JSON body of a webhook event for `v`'s current status (Standard
/// Webhooks shape: `type`, `timestamp`, `data`).
pub fn event_payload(v: &Verification, at_ms: i64) -> String {
    json!({
        "type": format!("verification.{}", v.status.as_str()),
        "timestamp": rfc3339(at_ms),
        "data": v.to_json(true),
    })
    .to_string()
}

impl Verification {
    /// The verification object of SPEC §5; `full` adds `call` and
    /// `attempts_left` (the GET form).
    pub fn to_json(&self, full: bool) -> Value {
        let v = self;
        let mut o = json!({
            "id": v.id,
            "status": v.status,
            "phone": v.phone,
            "sender": v.sender,
            "caller_prefix": v.caller_prefix(),
            "code_length": v.code.len(),
            "cli_filter": v.cli_filter(),
            "created_at": rfc3339(v.created_at_ms),
            "expires_at": rfc3339(v.expires_at_ms),
            "reference": v.reference,
        });
        if v.client_code {
            o["code"] = json!(v.code);
        }
        if full {
            let c = &v.call;
            o["attempts_left"] = json!(v.attempts_left);
            o["call"] = if c.invited_at_ms.is_some() {
                json!({
                    "outcome": c.outcome,
                    "sip_code": c.sip_code,
                    "trunk": c.trunk,
                    "caller": v.caller,
                    "invited_at": c.invited_at_ms.map_or(Value::Null, rfc3339),
                    "ringing_at": c.ringing_at_ms.map_or(Value::Null, rfc3339),
                    "ended_at": c.ended_at_ms.map_or(Value::Null, rfc3339),
                })
            } else {
                Value::Null
            };
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
