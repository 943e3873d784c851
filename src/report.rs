//! PURE reporting (SPEC §7, the "Sender details" / "Statistics" of the
//! Messaggio guide): query parameters into a time range, verifications into
//! per-period statistics, and a verification into one CSV row. No clock
//! (the time "now" is passed in), no I/O: the HTTP layer streams
//! `Store::scan` into these.

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use thiserror::Error;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

use crate::sip::Outcome;
use crate::verification::{rfc3339, Status, Verification};

const DAY_MS: i64 = 86_400_000;
/// The range a request gets without `from`.
pub const DEFAULT_RANGE_MS: i64 = 30 * DAY_MS;
/// The longest range: a leap year. Bounds the work of one request and the
/// number of periods in one answer (367 days at most).
pub const MAX_RANGE_MS: i64 = 366 * DAY_MS;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("{param} {value:?}: expected an RFC 3339 timestamp or a date YYYY-MM-DD (UTC)")]
    BadTime { param: &'static str, value: String },
    #[error("group_by {0:?}: expected \"day\" or \"month\"")]
    BadGroupBy(String),
    #[error("`to` must be after `from`")]
    EmptyRange,
    #[error("the range is over 366 days; ask for a shorter one")]
    RangeTooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Day,
    Month,
}

impl GroupBy {
    /// `None` (parameter absent) is `day`.
    pub fn parse(s: Option<&str>) -> Result<GroupBy, ReportError> {
        match s {
            None | Some("day") => Ok(GroupBy::Day),
            Some("month") => Ok(GroupBy::Month),
            Some(other) => Err(ReportError::BadGroupBy(other.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Day => "day",
            GroupBy::Month => "month",
        }
    }
}

/// An RFC 3339 timestamp (any offset) or a plain date, which means its
/// midnight UTC; Unix milliseconds.
pub fn parse_bound(param: &'static str, value: &str) -> Result<i64, ReportError> {
    let bad = || ReportError::BadTime {
        param,
        value: value.to_string(),
    };
    let t = if value.len() == 10 {
        let d =
            Date::parse(value, format_description!("[year]-[month]-[day]")).map_err(|_| bad())?;
        PrimitiveDateTime::new(d, Time::MIDNIGHT).assume_utc()
    } else {
        OffsetDateTime::parse(value, &Rfc3339).map_err(|_| bad())?
    };
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| bad())
}

/// `[from, to)` in Unix ms from the optional parameters: `to` defaults to
/// now, `from` to 30 days before `to`.
pub fn resolve_range(
    from: Option<&str>,
    to: Option<&str>,
    now_ms: i64,
) -> Result<(i64, i64), ReportError> {
    let to_ms = match to {
        Some(s) => parse_bound("to", s)?,
        None => now_ms,
    };
    let from_ms = match from {
        Some(s) => parse_bound("from", s)?,
        None => to_ms.saturating_sub(DEFAULT_RANGE_MS),
    };
    if to_ms <= from_ms {
        return Err(ReportError::EmptyRange);
    }
    if to_ms - from_ms > MAX_RANGE_MS {
        return Err(ReportError::RangeTooLong);
    }
    Ok((from_ms, to_ms))
}

fn utc(ms: i64) -> OffsetDateTime {
    // Every ms that reaches here came from parse_bound or the store, both
    // well inside time's range; the epoch is a harmless fallback.
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn day_key(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

fn month_key(year: i32, month: Month) -> String {
    format!("{:04}-{:02}", year, u8::from(month))
}

/// The UTC period `ms` falls in: `2026-11-25` or `2026-11`.
pub fn period_of(ms: i64, g: GroupBy) -> String {
    let d = utc(ms).date();
    match g {
        GroupBy::Day => day_key(d),
        GroupBy::Month => month_key(d.year(), d.month()),
    }
}

/// Every period that overlaps `[from, to)`, in order: a chart gets its
/// empty days too, and the answer has the same periods whatever the data.
pub fn periods_between(from_ms: i64, to_ms: i64, g: GroupBy) -> Vec<String> {
    let mut out = Vec::new();
    if to_ms <= from_ms {
        return out;
    }
    let last = utc(to_ms - 1).date();
    let mut d = utc(from_ms).date();
    match g {
        GroupBy::Day => {
            while d <= last {
                out.push(day_key(d));
                match d.next_day() {
                    Some(n) => d = n,
                    None => break,
                }
            }
        }
        GroupBy::Month => {
            let (mut y, mut m) = (d.year(), d.month());
            while (y, u8::from(m)) <= (last.year(), u8::from(last.month())) {
                out.push(month_key(y, m));
                if m == Month::December {
                    y += 1;
                }
                m = m.next();
            }
        }
    }
    out
}

/// The status a reader should see: one whose TTL has passed is expired
/// even if the once-a-second sweep has not stored that yet (GET does the
/// same), so the report agrees with GET of each id.
pub fn effective_status(v: &Verification, now_ms: i64) -> Status {
    if !v.status.is_final() && now_ms >= v.expires_at_ms {
        Status::Expired
    } else {
        v.status
    }
}

/// INVITE -> first 180/183, when the phone rang.
pub fn post_dial_delay_ms(v: &Verification) -> Option<i64> {
    let d = v.call.ringing_at_ms? - v.call.invited_at_ms?;
    (d >= 0).then_some(d)
}

/// Counters of one period (or of the whole range).
struct Counts {
    total: u64,
    by_status: [u64; Status::ALL.len()],
    by_outcome: [u64; Outcome::ALL.len()],
    /// Post-dial delays in ms. A histogram, not a Vec: a period may hold a
    /// million calls; 3 significant digits make the median exact below
    /// 2 s and within 0.1% above.
    pdd: Histogram<u64>,
}

impl Counts {
    fn new() -> Counts {
        Counts {
            total: 0,
            by_status: [0; Status::ALL.len()],
            by_outcome: [0; Outcome::ALL.len()],
            // 3 significant digits is always a valid precision (0..=5),
            // and auto-resizing has no upper bound to get wrong.
            pdd: Histogram::new(3).unwrap_or_else(|_| unreachable!("sigfig 3 is valid")),
        }
    }

    fn add(&mut self, status: Status, v: &Verification) {
        self.total += 1;
        if let Some(i) = Status::ALL.iter().position(|s| *s == status) {
            self.by_status[i] += 1;
        }
        if let Some(o) = v.call.outcome {
            if let Some(i) = Outcome::ALL.iter().position(|x| *x == o) {
                self.by_outcome[i] += 1;
            }
        }
        if let Some(d) = post_dial_delay_ms(v) {
            self.pdd.saturating_record(d.unsigned_abs());
        }
    }

    fn count_status(&self, s: Status) -> u64 {
        Status::ALL
            .iter()
            .position(|x| *x == s)
            .map_or(0, |i| self.by_status[i])
    }

    fn count_outcome(&self, o: Outcome) -> u64 {
        Outcome::ALL
            .iter()
            .position(|x| *x == o)
            .map_or(0, |i| self.by_outcome[i])
    }

    fn to_json(&self) -> Value {
        let ratio = |n: u64, d: u64| {
            if d == 0 {
                Value::Null
            } else {
                json!(n as f64 / d as f64)
            }
        };
        let by_status: Map<String, Value> = Status::ALL
            .iter()
            .zip(self.by_status)
            .map(|(s, n)| (s.as_str().to_string(), json!(n)))
            .collect();
        let by_outcome: Map<String, Value> = Outcome::ALL
            .iter()
            .zip(self.by_outcome)
            .map(|(o, n)| (o.as_str().to_string(), json!(n)))
            .collect();
        let with_outcome: u64 = self.by_outcome.iter().sum();
        json!({
            "total": self.total,
            "by_status": by_status,
            "by_outcome": by_outcome,
            "delivery_rate": ratio(self.count_outcome(Outcome::Delivered), with_outcome),
            "verification_rate": ratio(self.count_status(Status::Verified), self.total),
            "median_post_dial_delay_ms": if self.pdd.is_empty() {
                Value::Null
            } else {
                json!(self.pdd.value_at_quantile(0.5))
            },
        })
    }
}

/// The statistics of one request, fed one verification at a time (from
/// `Store::scan`), so memory is per period, never per verification.
pub struct Stats {
    from_ms: i64,
    to_ms: i64,
    group_by: GroupBy,
    sender: Option<String>,
    now_ms: i64,
    totals: Counts,
    periods: BTreeMap<String, Counts>,
}

impl Stats {
    pub fn new(
        from_ms: i64,
        to_ms: i64,
        group_by: GroupBy,
        sender: Option<String>,
        now_ms: i64,
    ) -> Stats {
        let periods = periods_between(from_ms, to_ms, group_by)
            .into_iter()
            .map(|p| (p, Counts::new()))
            .collect();
        Stats {
            from_ms,
            to_ms,
            group_by,
            sender,
            now_ms,
            totals: Counts::new(),
            periods,
        }
    }

    /// Counts `v` if it is in the range and of the sender asked for.
    pub fn add(&mut self, v: &Verification) {
        if !(self.from_ms..self.to_ms).contains(&v.created_at_ms) {
            return;
        }
        if self.sender.as_ref().is_some_and(|s| *s != v.sender) {
            return;
        }
        let status = effective_status(v, self.now_ms);
        self.totals.add(status, v);
        // Keys (ISO dates) sort as the periods do, so a BTreeMap keeps
        // them in order; a key outside the precomputed list cannot happen
        // for a ts in range, but would just be added.
        self.periods
            .entry(period_of(v.created_at_ms, self.group_by))
            .or_insert_with(Counts::new)
            .add(status, v);
    }

    /// The `GET /v1/stats` body.
    pub fn to_json(&self) -> Value {
        let periods: Vec<Value> = self
            .periods
            .iter()
            .map(|(p, c)| {
                let mut o = c.to_json();
                o["period"] = json!(p);
                o
            })
            .collect();
        json!({
            "from": rfc3339(self.from_ms),
            "to": rfc3339(self.to_ms),
            "group_by": self.group_by.as_str(),
            "sender": self.sender,
            "totals": self.totals.to_json(),
            "periods": periods,
        })
    }
}

/// The CSV columns, in order.
pub const CSV_HEADER: [&str; 17] = [
    "id",
    "created_at",
    "status",
    "phone",
    "sender",
    "reference",
    "caller",
    "code_length",
    "attempts_left",
    "expires_at",
    "call_outcome",
    "sip_code",
    "trunk",
    "invited_at",
    "ringing_at",
    "ended_at",
    "post_dial_delay_ms",
];

fn time_field(ms: Option<i64>) -> String {
    match ms.map(rfc3339) {
        Some(Value::String(s)) => s,
        _ => String::new(),
    }
}

fn opt<T: ToString>(x: Option<T>) -> String {
    x.map_or_else(String::new, |x| x.to_string())
}

/// One CSV row for `v`, fields as in [`CSV_HEADER`]; absent values are
/// empty fields. Quoting is the csv writer's job (RFC 4180).
pub fn csv_row(v: &Verification, now_ms: i64) -> [String; 17] {
    let c = &v.call;
    // The trunk is set when the INVITE goes out; before, there is no call.
    let called = c.invited_at_ms.is_some();
    [
        v.id.clone(),
        time_field(Some(v.created_at_ms)),
        effective_status(v, now_ms).as_str().to_string(),
        v.phone.clone(),
        v.sender.clone(),
        v.reference.clone().unwrap_or_default(),
        v.caller.clone(),
        v.code.len().to_string(),
        v.attempts_left.to_string(),
        time_field(Some(v.expires_at_ms)),
        opt(c.outcome.map(Outcome::as_str)),
        opt(c.sip_code),
        if called {
            c.trunk.clone()
        } else {
            String::new()
        },
        time_field(c.invited_at_ms),
        time_field(c.ringing_at_ms),
        time_field(c.ended_at_ms),
        opt(post_dial_delay_ms(v)),
    ]
}

/// A range bound for a file name: the date at midnight, else a compact
/// UTC timestamp (no ':' — not allowed in Windows file names).
pub fn file_stamp(ms: i64) -> String {
    let t = utc(ms);
    if t.time() == Time::MIDNIGHT {
        day_key(t.date())
    } else {
        format!(
            "{}T{:02}{:02}{:02}Z",
            day_key(t.date()),
            t.hour(),
            t.minute(),
            t.second()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verification::CallRecord;

    const NOV25: i64 = 1_795_564_800_000; // 2026-11-25T00:00:00Z

    fn v(id: &str, created: i64, status: Status, outcome: Option<Outcome>) -> Verification {
        Verification {
            id: id.into(),
            project: "p".into(),
            phone: "+447700900123".into(),
            sender: "SHOP".into(),
            code: "1234".into(),
            client_code: false,
            caller: "+447700901234".into(),
            reference: None,
            created_at_ms: created,
            expires_at_ms: created + 300_000,
            attempts_left: 3,
            status,
            call: CallRecord {
                trunk: "main".into(),
                outcome,
                sip_code: outcome.map(|_| 487),
                invited_at_ms: outcome.map(|_| created + 10),
                ringing_at_ms: outcome.map(|_| created + 110),
                cancel_at_ms: None,
                ended_at_ms: outcome.map(|_| created + 200),
            },
        }
    }

    #[test]
    fn bounds_parse_dates_and_rfc3339() {
        assert_eq!(parse_bound("from", "2026-11-25"), Ok(NOV25));
        assert_eq!(parse_bound("from", "2026-11-25T00:00:00Z"), Ok(NOV25));
        assert_eq!(
            parse_bound("from", "2026-11-25T01:00:00+01:00"),
            Ok(NOV25),
            "an offset is converted to UTC"
        );
        assert_eq!(parse_bound("to", "2026-11-25T00:00:00.5Z"), Ok(NOV25 + 500));
        for bad in [
            "",
            "yesterday",
            "2026-13-01",
            "2026-11-25T00:00:00",
            "1795564800000",
        ] {
            assert!(
                matches!(parse_bound("from", bad), Err(ReportError::BadTime { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn range_defaults_and_limits() {
        let now = NOV25 + 12 * 3_600_000;
        assert_eq!(
            resolve_range(None, None, now),
            Ok((now - DEFAULT_RANGE_MS, now))
        );
        assert_eq!(
            resolve_range(None, Some("2026-11-25"), now),
            Ok((NOV25 - DEFAULT_RANGE_MS, NOV25))
        );
        assert_eq!(
            resolve_range(Some("2026-11-25"), Some("2026-11-25"), now),
            Err(ReportError::EmptyRange)
        );
        assert_eq!(
            resolve_range(Some("2026-11-26"), Some("2026-11-25"), now),
            Err(ReportError::EmptyRange)
        );
        assert!(resolve_range(Some("2024-01-01"), Some("2025-01-01"), now).is_ok());
        assert_eq!(
            resolve_range(Some("2024-01-01"), Some("2025-01-02"), now),
            Err(ReportError::RangeTooLong)
        );
        assert_eq!(GroupBy::parse(None), Ok(GroupBy::Day));
        assert_eq!(GroupBy::parse(Some("month")), Ok(GroupBy::Month));
        assert!(GroupBy::parse(Some("week")).is_err());
    }

    #[test]
    fn periods_by_utc_day_and_month() {
        assert_eq!(period_of(NOV25 - 1, GroupBy::Day), "2026-11-24");
        assert_eq!(period_of(NOV25, GroupBy::Day), "2026-11-25");
        assert_eq!(period_of(NOV25, GroupBy::Month), "2026-11");
        assert_eq!(
            periods_between(NOV25 - 1, NOV25 + DAY_MS, GroupBy::Day),
            ["2026-11-24", "2026-11-25"]
        );
        // `to` is exclusive: midnight of the 26th adds no day.
        assert_eq!(
            periods_between(NOV25, NOV25 + DAY_MS, GroupBy::Day),
            ["2026-11-25"]
        );
        assert_eq!(
            periods_between(NOV25, NOV25 + 40 * DAY_MS, GroupBy::Month),
            ["2026-11", "2026-12", "2027-01"]
        );
        let (f, t) = resolve_range(Some("2024-01-01"), Some("2025-01-01"), 0).unwrap();
        assert_eq!(periods_between(f, t, GroupBy::Day).len(), 366);
        assert_eq!(periods_between(f, t, GroupBy::Month).len(), 12);
    }

    #[test]
    fn counts_rates_median_and_periods() {
        let from = NOV25 - DAY_MS;
        let to = NOV25 + DAY_MS;
        let mut s = Stats::new(from, to, GroupBy::Day, None, NOV25 + 1_000);
        // The 24th: one delivered and verified, one busy.
        s.add(&v(
            "a",
            NOV25 - 5_000,
            Status::Verified,
            Some(Outcome::Delivered),
        ));
        s.add(&v("b", NOV25 - 4_000, Status::Failed, Some(Outcome::Busy)));
        // The 25th: delivered, with a longer PDD; pending without a call.
        let mut c = v("c", NOV25, Status::Delivered, Some(Outcome::Delivered));
        c.call.ringing_at_ms = Some(NOV25 + 10 + 1_500);
        s.add(&c);
        s.add(&v("d", NOV25 + 500, Status::Pending, None));
        // Outside the range: ignored.
        s.add(&v("e", to, Status::Pending, None));
        s.add(&v("f", from - 1, Status::Pending, None));
        let j = s.to_json();
        let t = &j["totals"];
        assert_eq!(t["total"], 4);
        assert_eq!(t["by_status"]["verified"], 1);
        assert_eq!(t["by_status"]["failed"], 1);
        assert_eq!(t["by_status"]["pending"], 1);
        assert_eq!(t["by_status"]["attempts_exhausted"], 0);
        assert_eq!(t["by_status"].as_object().unwrap().len(), 7);
        assert_eq!(t["by_outcome"]["delivered"], 2);
        assert_eq!(t["by_outcome"]["busy"], 1);
        assert_eq!(t["by_outcome"]["no_ringing"], 0);
        // Every outcome, interrupted (a restart closed the call) included.
        assert_eq!(t["by_outcome"].as_object().unwrap().len(), 11);
        assert_eq!(t["by_outcome"]["interrupted"], 0);
        assert_eq!(t["delivery_rate"], json!(2.0 / 3.0));
        assert_eq!(t["verification_rate"], json!(0.25));
        // Delays 100, 100, 1500: the median is 100.
        assert_eq!(t["median_post_dial_delay_ms"], 100);
        let p = j["periods"].as_array().unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0]["period"], "2026-11-24");
        assert_eq!(p[0]["total"], 2);
        assert_eq!(p[0]["delivery_rate"], json!(0.5));
        assert_eq!(p[0]["verification_rate"], json!(0.5));
        assert_eq!(p[1]["period"], "2026-11-25");
        assert_eq!(p[1]["total"], 2);
        assert_eq!(p[1]["delivery_rate"], json!(1.0));
        assert_eq!(p[1]["median_post_dial_delay_ms"], 1_500);
        assert_eq!(j["group_by"], "day");
        assert_eq!(j["from"], "2026-11-24T00:00:00.000Z");
        assert_eq!(j["to"], "2026-11-26T00:00:00.000Z");
    }

    #[test]
    fn pending_past_ttl_counts_as_expired() {
        let mut s = Stats::new(NOV25, NOV25 + DAY_MS, GroupBy::Day, None, NOV25 + 400_000);
        s.add(&v("a", NOV25, Status::Delivered, Some(Outcome::Delivered)));
        assert_eq!(s.to_json()["totals"]["by_status"]["expired"], 1);
        assert_eq!(
            csv_row(&v("a", NOV25, Status::Pending, None), NOV25 + 400_000)[2],
            "expired"
        );
    }

    #[test]
    fn sender_filter() {
        let mut s = Stats::new(
            NOV25,
            NOV25 + DAY_MS,
            GroupBy::Month,
            Some("OTHER".into()),
            NOV25,
        );
        s.add(&v("a", NOV25, Status::Pending, None));
        let mut b = v("b", NOV25, Status::Pending, None);
        b.sender = "OTHER".into();
        s.add(&b);
        let j = s.to_json();
        assert_eq!(j["sender"], "OTHER");
        assert_eq!(j["totals"]["total"], 1);
        assert_eq!(j["periods"][0]["period"], "2026-11");
    }

    #[test]
    fn empty_range_has_zero_periods_and_null_rates() {
        let s = Stats::new(NOV25, NOV25 + 2 * DAY_MS, GroupBy::Day, None, NOV25);
        let j = s.to_json();
        assert_eq!(j["totals"]["total"], 0);
        assert_eq!(j["totals"]["by_status"]["pending"], 0);
        assert_eq!(j["totals"]["by_outcome"]["delivered"], 0);
        assert!(j["totals"]["delivery_rate"].is_null());
        assert!(j["totals"]["verification_rate"].is_null());
        assert!(j["totals"]["median_post_dial_delay_ms"].is_null());
        let p = j["periods"].as_array().unwrap();
        assert_eq!(p.len(), 2);
        assert!(p
            .iter()
            .all(|p| p["total"] == 0 && p["delivery_rate"].is_null()));
        assert!(j["sender"].is_null());
    }

    #[test]
    fn csv_row_fields() {
        let mut a = v("a", NOV25, Status::Failed, Some(Outcome::Busy));
        a.reference = Some("x,\"y\"\nz".into());
        let r = csv_row(&a, NOV25);
        assert_eq!(r.len(), CSV_HEADER.len());
        assert_eq!(r[1], "2026-11-25T00:00:00.000Z");
        assert_eq!(r[2], "failed");
        assert_eq!(r[5], "x,\"y\"\nz");
        assert_eq!(r[10], "busy");
        assert_eq!(r[11], "487");
        assert_eq!(r[16], "100");
        let b = csv_row(&v("b", NOV25, Status::Pending, None), NOV25);
        assert_eq!(&b[10..], ["", "", "", "", "", "", ""]);
        assert_eq!(file_stamp(NOV25), "2026-11-25");
        assert_eq!(file_stamp(NOV25 + 3_723_000), "2026-11-25T010203Z");
    }
}
