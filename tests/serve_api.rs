//! The HTTP API of SPEC §5 through a real `flashcall serve` process whose
//! calls go to the in-process sandbox callee (SPEC §9): real HTTP in, real
//! SIP over loopback UDP out, no SIPp needed.
//!
//! Each test starts its own engine (every listener on port 0) in its own
//! directory. Tests assert behaviour, never timing: every wait is a bounded
//! poll for a condition, and nothing waits more than a few seconds.

mod support;

use serde_json::{json, Value};
use std::time::Duration;
use support::{config, id_of, test_dir, with_http_keys, Engine, Resp, LOGIN, SANDBOX, SECRET};

const POOL: &str = "+44770090XXXX\n";
const CREATE: &str = "/v1/verifications";
const OTHER: (&str, &str) = ("other", "other-secret");

/// An engine on the sandbox with the harness's default config.
fn engine(name: &str) -> Engine {
    engine_with(name, POOL, SANDBOX, "")
}

fn engine_with(name: &str, pool: &str, trunks: &str, extra: &str) -> Engine {
    let dir = test_dir(&format!("api-{name}"));
    Engine::start(&config(&dir, pool, trunks, extra))
}

/// An engine on the sandbox with `pool` whose numbers each cool down for
/// `cooldown_ms` after a use.
fn engine_with_cooldown(dir: &str, pool: &str, cooldown_ms: u64, extra: &str) -> Engine {
    let cfg = config(&test_dir(dir), pool, SANDBOX, extra);
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(
        &cfg,
        text.replacen(
            "[pool]\n",
            &format!("[pool]\nnumber_cooldown_ms = {cooldown_ms}\n"),
            1,
        ),
    )
    .expect("config");
    Engine::start(&cfg)
}

/// POST raw bytes with this content type as the test project.
fn post_raw(e: &Engine, path: &str, content_type: &str, body: &[u8]) -> Resp {
    e.request(
        "POST",
        path,
        Some((LOGIN, SECRET)),
        &[("content-type", content_type)],
        Some(body),
    )
}

fn check(e: &Engine, id: &str, body: Value) -> Resp {
    e.post(&format!("/v1/verifications/{id}/check"), &body)
}

/// `Retry-After` as whole seconds; asserts it is there and >= 1.
fn retry_after(r: &Resp) -> u64 {
    let s = r
        .retry_after
        .as_deref()
        .unwrap_or_else(|| panic!("no Retry-After on {} {}", r.status, r.body));
    let n: u64 = s.parse().unwrap_or_else(|_| panic!("Retry-After {s:?}"));
    assert!(n >= 1, "Retry-After {n}");
    n
}

/// The value of the sample `name{labels}` in Prometheus text, where every
/// `k="v"` in `labels` must be among the sample's labels; 0 when absent.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: Vec<&str> = l.split(',').collect();
        if labels
            .iter()
            .all(|(k, v)| have.contains(&format!("{k}=\"{v}\"").as_str()))
        {
            return value.parse().unwrap_or_else(|_| panic!("{line}"));
        }
    }
    0.0
}

/// Parses an RFC 3339 timestamp in UTC (`Z`), such as
/// `2024-01-02T03:04:05.678Z`.
fn rfc3339_utc(v: &Value) -> time::OffsetDateTime {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    assert!(s.ends_with('Z'), "not UTC: {s}");
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("not RFC 3339 ({e}): {s}"))
}

// ---------------------------------------------------------------- 400s

/// "flashcall serving" means full speed: the phone metadata (~120 ms to
/// decode) is ready before it, so the first creates do not wait for it
/// (they did, up to ~110 ms at 4,000/s, when it was decoded beside them).
#[test]
fn phone_metadata_is_ready_before_serving() {
    let e = engine("metadata_first");
    let log = e.log_text();
    let ready = log.find("phone metadata ready");
    let serving = log.find("flashcall serving");
    assert!(
        matches!((ready, serving), (Some(r), Some(s)) if r < s),
        "expected the metadata before serving; log:\n{log}"
    );
    let r = e.post(CREATE, &json!({"phone": "+447911123456", "sender": "SHOP"}));
    assert_eq!(r.status, 201, "{}", r.body);
}

#[test]
fn invalid_phone_is_400() {
    let e = engine("invalid-phone");
    for phone in [
        "447700900123",      // no '+'
        "+44 7700 900123",   // spaces
        "+44-7700-900123",   // dashes
        "+123456",           // 6 digits: too short
        "+44123",            // too short
        "+1234567890123456", // 16 digits: too long
        "+0447700900123",    // country code cannot start with 0
        "+4400000000000",    // E.164 shape, but not a valid GB number
        "+441000000000",     // E.164 shape, no GB number starts 010
        "+449999999999",     // nor 099
        "+4412345",          // 7 digits: E.164 shape, too short for GB
        "+10000000000",      // NANP shape, invalid area code
        "",
        "++447700900123",
    ] {
        let r = e.post(CREATE, &json!({"phone": phone, "sender": "SHOP"}));
        r.assert_problem(400, "invalid_phone");
    }
    // A real, valid number outside the allowed test prefix passes the
    // country check, and so does the allowed prefix.
    for phone in ["+447911123456", "+4915123456789", "+447700900123"] {
        let r = e.post(CREATE, &json!({"phone": phone, "sender": "SHOP"}));
        assert_eq!(r.status, 201, "{phone}: {}", r.body);
    }
    // check by CLI: the CLI must be E.164 too.
    let v = e.create(json!({"phone": "+447700900124", "sender": "SHOP"}));
    let id = id_of(&v);
    for cli in ["447700901234", "+44", "+4477009012345678", "caller"] {
        check(&e, &id, json!({ "cli": cli })).assert_problem(400, "invalid_phone");
    }
    // Nothing was counted against the verification.
    let got = e.get(&format!("/v1/verifications/{id}")).json();
    assert_eq!(got["attempts_left"], 5, "{got}");
}

#[test]
fn invalid_code_is_400_on_create_and_check() {
    let e = engine("invalid-code");
    for code in ["123", "12345", "12a4", "", " 123", "１２３４", "-123"] {
        let r = e.post(
            CREATE,
            &json!({"phone": "+447700900123", "sender": "SHOP", "code": code}),
        );
        r.assert_problem(400, "invalid_code");
    }
    let v = e.create(json!({"phone": "+447700900123", "sender": "SHOP"}));
    let id = id_of(&v);
    for code in ["123", "12345", "abcd", "", "12.4"] {
        check(&e, &id, json!({ "code": code })).assert_problem(400, "invalid_code");
    }
    let got = e.get(&format!("/v1/verifications/{id}")).json();
    assert_eq!(
        got["attempts_left"], 5,
        "a malformed code costs no attempt: {got}"
    );
}

#[test]
fn invalid_request_is_400() {
    let e = engine("invalid-request");
    let ok = json!({"phone": "+447700900123", "sender": "SHOP"});
    // Bodies that are not the create object.
    for body in [
        &b"{"[..],
        b"not json",
        b"",
        b"[]",
        b"null",
        br#"{"phone": "+447700900123"}"#,
        br#"{"sender": "SHOP"}"#,
        br#"{"phone": 447700900123, "sender": "SHOP"}"#,
        br#"{"phone": "+447700900123", "sender": "SHOP", "colour": "red"}"#,
        br#"{"phone": "+447700900123", "sender": "SHOP", "ttl_secs": -1}"#,
        br#"{"phone": "+447700900123", "sender": "SHOP", "ttl_secs": "60"}"#,
        br#"{"phone": "+447700900123", "sender": "SHOP"} trailing"#,
    ] {
        let r = post_raw(&e, CREATE, "application/json", body);
        assert_eq!(
            r.status,
            400,
            "{}: {}",
            String::from_utf8_lossy(body),
            r.body
        );
        r.assert_problem(400, "invalid_request");
    }
    // ttl_secs outside 1..=max_ttl_secs (default 3600).
    for ttl in [0, 3601, 86_400] {
        let r = e.post(
            CREATE,
            &json!({"phone": "+447700900123", "sender": "SHOP", "ttl_secs": ttl}),
        );
        r.assert_problem(400, "invalid_request");
    }
    // A reference over 256 bytes.
    let r = e.post(
        CREATE,
        &json!({"phone": "+447700900123", "sender": "SHOP", "reference": "r".repeat(257)}),
    );
    r.assert_problem(400, "invalid_request");
    // A bad Idempotency-Key: empty, or longer than 255 characters.
    let long = "k".repeat(256);
    for key in ["", long.as_str()] {
        let r = e.post_as((LOGIN, SECRET), CREATE, &ok, &[("idempotency-key", key)]);
        r.assert_problem(400, "invalid_request");
    }
    // The edges that are fine.
    for ttl in [1, 3600] {
        let r = e.post(
            CREATE,
            &json!({"phone": "+447700900125", "sender": "SHOP", "ttl_secs": ttl}),
        );
        assert_eq!(r.status, 201, "ttl {ttl}: {}", r.body);
    }
    let k255 = "k".repeat(255);
    let r = e.post_as(
        (LOGIN, SECRET),
        CREATE,
        &json!({"phone": "+447700900126", "sender": "SHOP"}),
        &[("idempotency-key", &k255)],
    );
    assert_eq!(r.status, 201, "{}", r.body);

    // check: exactly one of code and cli; no other field; valid JSON.
    let id = id_of(&e.create(json!({"phone": "+447700900127", "sender": "SHOP"})));
    let path = format!("/v1/verifications/{id}/check");
    for body in [
        json!({"code": "1234", "cli": "+447700901234"}),
        json!({}),
        json!({"code": null}),
        json!({"code": "1234", "extra": 1}),
    ] {
        e.post(&path, &body).assert_problem(400, "invalid_request");
    }
    for body in [&b"{"[..], b"", b"\"1234\""] {
        post_raw(&e, &path, "application/json", body).assert_problem(400, "invalid_request");
    }
    let got = e.get(&format!("/v1/verifications/{id}")).json();
    assert_eq!(got["attempts_left"], 5, "{got}");
}

// ---------------------------------------------------------------- 401, 403, 404

#[test]
fn unauthorized_is_401_with_www_authenticate() {
    use base64::Engine as _;
    let e = engine("unauthorized");
    let v = e.create(json!({"phone": "+447700900123", "sender": "SHOP"}));
    let id = id_of(&v);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let body = json!({"phone": "+447700900124", "sender": "SHOP"}).to_string();
    let basic_shop = format!("Basic {}", b64("shop-secret"));
    let wrong_secret = format!("Basic {}", b64("shop:wrong"));
    let unknown_login = format!("Basic {}", b64("nobody:shop-secret"));
    let other_secret = format!("Basic {}", b64("shop:other-secret"));
    let empty_secret = format!("Basic {}", b64("shop:"));
    let bearer = format!("Bearer {}", b64("shop:shop-secret"));
    let authorizations: Vec<Option<&str>> = vec![
        None,
        Some(wrong_secret.as_str()),
        Some(unknown_login.as_str()),
        Some(other_secret.as_str()),
        Some(empty_secret.as_str()),
        Some(bearer.as_str()),
        Some(basic_shop.as_str()), // no ':' at all
        Some("Basic !!!not-base64!!!"),
        Some("Basic"),
        Some(""),
    ];
    let routes = [
        ("POST", CREATE.to_string()),
        ("GET", format!("/v1/verifications/{id}")),
        ("POST", format!("/v1/verifications/{id}/check")),
    ];
    for auth in &authorizations {
        for (method, path) in &routes {
            let mut headers = vec![("content-type", "application/json")];
            if let Some(a) = auth {
                headers.push(("authorization", a));
            }
            let body = if path.ends_with("check") {
                json!({"code": "1234"}).to_string()
            } else {
                body.clone()
            };
            let send = (*method == "POST").then_some(body.as_bytes());
            let r = e.request(method, path, None, &headers, send);
            r.assert_problem(401, "unauthorized");
            let www = r
                .header("www-authenticate")
                .unwrap_or_else(|| panic!("{method} {path} {auth:?}: no WWW-Authenticate"));
            assert!(www.starts_with("Basic"), "{www}");
        }
    }
    // Nothing was checked: the real verification still has every attempt.
    let got = e.get(&format!("/v1/verifications/{id}")).json();
    assert_eq!(got["attempts_left"], 5, "{got}");
    // The scheme name is case-insensitive (RFC 9110 §11.1).
    let lower = format!("basic {}", b64("shop:shop-secret"));
    let r = e.request(
        "GET",
        &format!("/v1/verifications/{id}"),
        None,
        &[("authorization", &lower)],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn inactive_or_unknown_sender_is_403() {
    let e = engine("sender");
    for sender in ["NEW", "NOPE", "shop", "OTHER", ""] {
        let r = e.post(CREATE, &json!({"phone": "+447700900123", "sender": sender}));
        r.assert_problem(403, "sender_not_active");
    }
    // The other project's own sender is fine for it.
    let r = e.post_as(
        OTHER,
        CREATE,
        &json!({"phone": "+447700900123", "sender": "OTHER"}),
        &[],
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

#[test]
fn ids_are_invisible_across_projects() {
    let e = engine("not-found");
    // Unknown ids, including ones that look like ours.
    for id in ["nope", "00000000000000000000000000000000", "%2e%2e"] {
        e.get(&format!("/v1/verifications/{id}"))
            .assert_problem(404, "not_found");
        check(&e, id, json!({"code": "1234"})).assert_problem(404, "not_found");
    }
    let v = e.create(json!({"phone": "+447700900123", "sender": "SHOP", "code": "1234"}));
    let id = id_of(&v);
    e.wait_call_done(&id);
    // The other project: 404 on GET and on check, by code and by CLI,
    // even with the right code.
    let get = e.request(
        "GET",
        &format!("/v1/verifications/{id}"),
        Some(OTHER),
        &[],
        None,
    );
    get.assert_problem(404, "not_found");
    for body in [json!({"code": "1234"}), json!({"cli": "+447700901234"})] {
        let r = e.post_as(OTHER, &format!("/v1/verifications/{id}/check"), &body, &[]);
        r.assert_problem(404, "not_found");
    }
    // The owner still sees it untouched.
    let got = e.get(&format!("/v1/verifications/{id}")).json();
    assert_eq!(got["status"], "delivered", "{got}");
    assert_eq!(got["attempts_left"], 5, "{got}");
    // And the other project's ids are invisible the other way round.
    let r = e.post_as(
        OTHER,
        CREATE,
        &json!({"phone": "+447700900124", "sender": "OTHER"}),
        &[],
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let oid = id_of(&r.json());
    e.get(&format!("/v1/verifications/{oid}"))
        .assert_problem(404, "not_found");
    check(&e, &oid, json!({"code": "1234"})).assert_problem(404, "not_found");
}

// ---------------------------------------------------------------- 409, 410

#[test]
fn code_no_number_serves_is_409() {
    let e = engine_with("no-number", "+4477009001XX\n", SANDBOX, "");
    for code in ["5555", "0200", "9999"] {
        let r = e.post(
            CREATE,
            &json!({"phone": "+447700900123", "sender": "SHOP", "code": code}),
        );
        r.assert_problem(409, "no_number_for_code");
    }
    // A code the pool covers is served with that number.
    let v = e.create(json!({"phone": "+447700900124", "sender": "SHOP", "code": "0142"}));
    assert_eq!(v["code"], "0142", "{v}");
    assert_eq!(v["caller_prefix"], "+44770090", "{v}");
    let got = e.wait_call_done(&id_of(&v));
    assert_eq!(got["call"]["caller"], "+447700900142", "{got}");
}

#[test]
fn expired_verification_is_410_on_check() {
    let e = engine("expired");
    // `b` first: by the time `a` has expired, so has `b`.
    let b = e
        .create(json!({"phone": "+447700900124", "sender": "SHOP", "code": "4322", "ttl_secs": 1}));
    let a = e
        .create(json!({"phone": "+447700900123", "sender": "SHOP", "code": "4321", "ttl_secs": 1}));
    let (a, b) = (id_of(&a), id_of(&b));
    // GET shows it expired once the TTL has passed.
    let got = e.wait_status(&a, Duration::from_secs(4), |s| s == "expired");
    assert_eq!(got["status"], "expired", "{got}");
    // Checking it, even with the right code, is 410 and never verifies.
    check(&e, &a, json!({"code": "4321"})).assert_problem(410, "expired");
    check(&e, &a, json!({"code": "0000"})).assert_problem(410, "expired");
    check(&e, &a, json!({"cli": "+447700904321"})).assert_problem(410, "expired");
    // `b` is checked with no GET first: 410 as well.
    check(&e, &b, json!({"code": "4322"})).assert_problem(410, "expired");
    for id in [&a, &b] {
        let got = e.get(&format!("/v1/verifications/{id}")).json();
        assert_eq!(got["status"], "expired", "{got}");
        assert_eq!(got["attempts_left"], 5, "{got}");
    }
}

// ---------------------------------------------------------------- 413, 415, 405, 404 route

#[test]
fn body_limit_and_content_type() {
    let e = engine("body");
    // 413: a syntactically fine body over 16 KiB.
    let big =
        json!({"phone": "+447700900123", "sender": "SHOP", "reference": "r".repeat(17 * 1024)})
            .to_string();
    let r = post_raw(&e, CREATE, "application/json", big.as_bytes());
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.content_type, "application/problem+json", "{}", r.body);
    assert_eq!(r.json()["type"], "payload_too_large", "{}", r.body);
    // Just under the limit is read (and refused for its reference length).
    let body = json!({"phone": "+447700900123", "sender": "SHOP", "reference": "r".repeat(16 * 1024 - 100)})
        .to_string();
    assert!(body.len() < 16 * 1024);
    post_raw(&e, CREATE, "application/json", body.as_bytes())
        .assert_problem(400, "invalid_request");

    // 415: anything but application/json, on create and on check.
    let ok = json!({"phone": "+447700900123", "sender": "SHOP"}).to_string();
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonp",
        "",
    ] {
        let r = post_raw(&e, CREATE, ct, ok.as_bytes());
        assert_eq!(r.status, 415, "{ct:?}: {}", r.body);
        assert_eq!(r.content_type, "application/problem+json");
        assert_eq!(r.json()["type"], "unsupported_media_type");
    }
    let r = e.request(
        "POST",
        CREATE,
        Some((LOGIN, SECRET)),
        &[],
        Some(ok.as_bytes()),
    );
    assert_eq!(r.status, 415, "no content type: {}", r.body);
    // Parameters and case are fine.
    for ct in ["application/json; charset=utf-8", "Application/JSON"] {
        let r = post_raw(&e, CREATE, ct, ok.as_bytes());
        assert_eq!(r.status, 201, "{ct:?}: {}", r.body);
    }
    let id = id_of(&e.create(json!({"phone": "+447700900124", "sender": "SHOP"})));
    let r = post_raw(
        &e,
        &format!("/v1/verifications/{id}/check"),
        "text/plain",
        br#"{"code":"1234"}"#,
    );
    assert_eq!(r.status, 415, "{}", r.body);
    assert_eq!(r.content_type, "application/problem+json");
}

#[test]
fn healthz_unknown_route_and_wrong_method() {
    let e = engine("routes");
    let r = e.request("GET", "/healthz", None, &[], None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.content_type, "application/json");
    assert_eq!(r.json()["status"], "ok");

    for path in [
        "/",
        "/nope",
        "/v1",
        "/v1/verifications/a/b/c",
        "/v2/verifications",
    ] {
        let r = e.request("GET", path, Some((LOGIN, SECRET)), &[], None);
        r.assert_problem(404, "not_found");
    }
    for (method, path) in [
        ("GET", "/v1/verifications"),
        ("DELETE", "/v1/verifications"),
        ("POST", "/healthz"),
        ("DELETE", "/v1/verifications/abc"),
        ("PUT", "/v1/verifications/abc"),
        ("GET", "/v1/verifications/abc/check"),
    ] {
        let r = e.request(method, path, Some((LOGIN, SECRET)), &[], None);
        r.assert_problem(405, "method_not_allowed");
    }
    // Requests are counted by route template, never by raw path.
    let id = id_of(&e.create(json!({"phone": "+447700900123", "sender": "SHOP"})));
    e.get(&format!("/v1/verifications/{id}"));
    let m = e.metrics_text();
    assert!(!m.contains(&id), "an id in a label:\n{m}");
    assert!(!m.contains("447700900123"), "a phone in a label:\n{m}");
    let created = metric(
        &m,
        "flashcall_http_requests_total",
        &[("route", "/v1/verifications"), ("status", "201")],
    );
    assert_eq!(created, 1.0, "{m}");
    let got = metric(
        &m,
        "flashcall_http_requests_total",
        &[("route", "/v1/verifications/{id}"), ("status", "200")],
    );
    assert_eq!(got, 1.0, "{m}");
}

// ---------------------------------------------------------------- Idempotency-Key

#[test]
fn idempotency_key_replays_and_refuses_other_bodies() {
    let e = engine("idempotency");
    let body = json!({"phone": "+447700900123", "sender": "SHOP", "reference": "order-7"});
    let first = e.post_as(
        (LOGIN, SECRET),
        CREATE,
        &body,
        &[("idempotency-key", "k-1")],
    );
    assert_eq!(first.status, 201, "{}", first.body);
    let id = id_of(&first.json());
    e.wait_call_done(&id);

    // Same key, same body: the very same response, no second verification.
    for _ in 0..3 {
        let again = e.post_as(
            (LOGIN, SECRET),
            CREATE,
            &body,
            &[("idempotency-key", "k-1")],
        );
        assert_eq!(again.status, 201, "{}", again.body);
        assert_eq!(again.content_type, "application/json");
        assert_eq!(again.body, first.body);
    }
    // Same key, another body: 422, and still nothing new.
    for other in [
        json!({"phone": "+447700900124", "sender": "SHOP", "reference": "order-7"}),
        json!({"phone": "+447700900123", "sender": "SHOP", "reference": "order-8"}),
        json!({"phone": "+447700900123", "sender": "SHOP"}),
    ] {
        let r = e.post_as(
            (LOGIN, SECRET),
            CREATE,
            &other,
            &[("idempotency-key", "k-1")],
        );
        r.assert_problem(422, "idempotency_key_reused");
    }
    // The key is the project's own: the other project may use it too.
    let theirs = e.post_as(
        OTHER,
        CREATE,
        &json!({"phone": "+447700900123", "sender": "OTHER"}),
        &[("idempotency-key", "k-1")],
    );
    assert_eq!(theirs.status, 201, "{}", theirs.body);
    let their_id = id_of(&theirs.json());
    assert_ne!(their_id, id);
    // And a new key makes a new verification.
    let fresh = e.post_as(
        (LOGIN, SECRET),
        CREATE,
        &body,
        &[("idempotency-key", "k-2")],
    );
    assert_eq!(fresh.status, 201, "{}", fresh.body);
    assert_ne!(id_of(&fresh.json()), id);
    e.wait_call_done(&id_of(&fresh.json()));
    e.wait_call_done(&their_id);

    // One call per verification: three in all, one for "shop" + k-1.
    let m = e.metrics_text();
    let created = |p: &str| {
        metric(
            &m,
            "flashcall_verifications_total",
            &[("project", p), ("status", "pending")],
        )
    };
    assert_eq!(created("shop"), 2.0, "{m}");
    assert_eq!(created("other"), 1.0, "{m}");
    let calls = metric(
        &m,
        "flashcall_calls_total",
        &[("trunk", "sandbox"), ("outcome", "delivered")],
    );
    assert_eq!(calls, 3.0, "{m}");
    // The replayed id is the original, still in its own state.
    let got = e.get(&format!("/v1/verifications/{id}")).json();
    assert_eq!(got["status"], "delivered", "{got}");
}

/// Concurrent creates with one key: one verification whatever the
/// interleaving; each answer is the replayed 201 or 409 "in progress".
#[test]
fn concurrent_creates_with_one_key_make_one_verification() {
    let e = engine("idempotency-race");
    let rounds = 10;
    for round in 0..rounds {
        let key = format!("race-{round}");
        let body = json!({"phone": format!("+4477009003{round:02}"), "sender": "SHOP"});
        let barrier = std::sync::Barrier::new(6);
        let answers: Vec<Resp> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        e.post_as((LOGIN, SECRET), CREATE, &body, &[("idempotency-key", &key)])
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let created: Vec<&Resp> = answers.iter().filter(|r| r.status == 201).collect();
        assert!(!created.is_empty(), "round {round}: no 201: {answers:?}");
        for r in &answers {
            if r.status != 201 {
                r.assert_problem(409, "idempotency_key_in_progress");
            }
        }
        assert!(
            created.iter().all(|r| r.body == created[0].body),
            "round {round}: different responses: {created:?}"
        );
    }
    let m = e.metrics_text();
    assert_eq!(
        metric(
            &m,
            "flashcall_verifications_total",
            &[("project", "shop"), ("status", "pending")]
        ),
        f64::from(rounds),
        "{m}"
    );
}

// ---------------------------------------------------------------- 429, 503

#[test]
fn project_burst_then_429_with_retry_after() {
    let extra = r#"
[[projects]]
login = "slow"
secret = "slow-secret"
rate = 1
burst = 3
senders = [{ code = "SLOW", status = "active" }]
"#;
    let e = engine_with("project-burst", POOL, SANDBOX, extra);
    let slow = ("slow", "slow-secret");
    let mut statuses = Vec::new();
    let mut limited = None;
    for i in 0..4 {
        let r = e.post_as(
            slow,
            CREATE,
            &json!({"phone": format!("+44770090013{i}"), "sender": "SLOW"}),
            &[],
        );
        statuses.push(r.status);
        if r.status == 429 {
            limited = Some(r);
        }
    }
    assert_eq!(statuses, [201, 201, 201, 429]);
    let r = limited.unwrap();
    r.assert_problem(429, "rate_limited");
    assert!(retry_after(&r) >= 1);
    // Another project is not affected.
    let v = e.create(json!({"phone": "+447700900140", "sender": "SHOP"}));
    assert_eq!(v["status"], "pending", "{v}");
    let m = e.metrics_text();
    assert_eq!(
        metric(&m, "flashcall_rate_limited_total", &[("scope", "project")]),
        1.0,
        "{m}"
    );
}

#[test]
fn per_phone_limit_is_429_and_counted() {
    let extra = "[limits.per_phone]\nmax = 2\nper_secs = 600\n";
    let e = engine_with("per-phone", POOL, SANDBOX, extra);
    let to = |p: &str| json!({"phone": p, "sender": "SHOP"});
    e.create(to("+447700900123"));
    e.create(to("+447700900123"));
    let r = e.post(CREATE, &to("+447700900123"));
    r.assert_problem(429, "rate_limited");
    // A window of 600 s from the first of the two: ~600 s away (a GCRA,
    // before session 13, said 300 s, and let a send through then).
    let secs = retry_after(&r);
    assert!((590..=600).contains(&secs), "Retry-After {secs}");
    // Another destination still passes, and the other project shares the
    // destination's limit (it is per phone, not per project).
    e.create(to("+447700900124"));
    let r = e.post_as(
        OTHER,
        CREATE,
        &json!({"phone": "+447700900123", "sender": "OTHER"}),
        &[],
    );
    r.assert_problem(429, "rate_limited");
    let m = e.metrics_text();
    assert_eq!(
        metric(&m, "flashcall_rate_limited_total", &[("scope", "phone")]),
        2.0,
        "{m}"
    );
}

/// A retry with the same Idempotency-Key is told by its insert (no
/// look-up first, session 16) and by the limit that refuses it; either
/// way it answers the stored 201, uses none of the phone's allowance, and
/// counts no 429 (nobody was refused).
#[test]
fn idempotent_retries_use_no_per_phone_allowance_and_count_no_429() {
    let extra = "[limits.per_phone]\nmax = 2\nper_secs = 600\n";
    idempotent_retries_use_nothing(&engine_with("idem-allowance", POOL, SANDBOX, extra));
}

/// The same with a number cooldown, where a retry looks its key up first
/// so it picks no number: three numbers, each cooling 60 s after a use,
/// are enough for the two creates and the final refusal only if the
/// three retries took none (one that did would leave the second create
/// a 503, every number cooling down).
#[test]
fn idempotent_retries_with_a_number_cooldown_use_no_number() {
    let e = engine_with_cooldown(
        "api-idem-cooldown",
        "+447700900001\n+447700900002\n+447700900003\n",
        60_000,
        "[limits.per_phone]\nmax = 2\nper_secs = 600\n",
    );
    idempotent_retries_use_nothing(&e);
}

fn idempotent_retries_use_nothing(e: &Engine) {
    let body = json!({"phone": "+447700900123", "sender": "SHOP"});
    let keyed = || {
        e.post_as(
            (LOGIN, SECRET),
            CREATE,
            &body,
            &[("idempotency-key", "k-9")],
        )
    };
    let first = keyed();
    assert_eq!(first.status, 201, "{}", first.body);
    // Retries while the phone has a send left: each insert finds the key
    // stored and gives its send back.
    for _ in 0..3 {
        let again = keyed();
        assert_eq!(again.status, 201, "{}", again.body);
        assert_eq!(again.body, first.body);
    }
    // So the phone's second send is still there.
    let second = e.create(body.clone());
    // Now at its limit: the retry is refused by the limit, and answered
    // from the store all the same.
    let again = keyed();
    assert_eq!(again.status, 201, "{}", again.body);
    assert_eq!(again.body, first.body);
    e.post(CREATE, &body).assert_problem(429, "rate_limited");
    e.wait_call_done(&id_of(&first.json()));
    e.wait_call_done(&id_of(&second));
    let m = e.metrics_text();
    assert_eq!(
        metric(&m, "flashcall_rate_limited_total", &[("scope", "phone")]),
        1.0,
        "only the create without a key was refused: {m}"
    );
    assert_eq!(
        metric(
            &m,
            "flashcall_verifications_total",
            &[("project", "shop"), ("status", "pending")]
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "flashcall_calls_total",
            &[("trunk", "sandbox"), ("outcome", "delivered")]
        ),
        2.0,
        "{m}"
    );
}

#[test]
fn full_trunk_queue_is_503_overloaded() {
    // cps = 1: one INVITE a second, a queue of 10 waiting.
    let trunks = "[sandbox]\nenabled = true\ncps = 1\n";
    let e = engine_with("queue-full", POOL, trunks, "");
    let mut created = Vec::new();
    let mut overloaded = Vec::new();
    for i in 0..20 {
        let r = e.post(
            CREATE,
            &json!({"phone": format!("+4477009001{i:02}"), "sender": "SHOP"}),
        );
        match r.status {
            201 => created.push(id_of(&r.json())),
            _ => {
                r.assert_problem(503, "overloaded");
                assert!(retry_after(&r) >= 1);
                overloaded.push(i);
            }
        }
    }
    // At least the queue's 10 plus the first are accepted; the rest are
    // refused, and once refused, every later one too (within the second).
    assert!(created.len() >= 11, "created {}", created.len());
    assert!(!overloaded.is_empty(), "no 503 in 20 quick creates");
    assert!(
        created.len() <= 15,
        "created {}: the queue is not bounded",
        created.len()
    );
    // Those accepted are really waiting: the first is being called, the
    // last is still pending.
    let last = e
        .get(&format!("/v1/verifications/{}", created.last().unwrap()))
        .json();
    assert_eq!(last["status"], "pending", "{last}");
    let m = e.metrics_text();
    assert_eq!(
        metric(&m, "flashcall_rate_limited_total", &[("scope", "trunk")]),
        overloaded.len() as f64,
        "{m}"
    );
}

/// A create refused with 503 places no call, so it must not use up the
/// destination's per-phone allowance: a client retrying as told by
/// Retry-After would otherwise be locked out for many minutes.
#[test]
fn overloaded_creates_do_not_use_the_per_phone_allowance() {
    let trunks = "[sandbox]\nenabled = true\ncps = 1\n";
    let extra = "[limits.per_phone]\nmax = 2\nper_secs = 600\n";
    let e = engine_with("overloaded-phone", POOL, trunks, extra);
    // Fill the queue with other destinations.
    let mut filled = false;
    for i in 0..20 {
        let r = e.post(
            CREATE,
            &json!({"phone": format!("+4477009002{i:02}"), "sender": "SHOP"}),
        );
        if r.status == 503 {
            filled = true;
            break;
        }
        assert_eq!(r.status, 201, "{}", r.body);
    }
    assert!(filled, "the queue never filled");
    // Retry one destination until a queue place frees (one a second): every
    // answer is 503 or the final 201, never 429.
    let to = json!({"phone": "+447700900123", "sender": "SHOP"});
    let end = std::time::Instant::now() + Duration::from_secs(4);
    let mut refused = 0;
    loop {
        let r = e.post(CREATE, &to);
        if r.status == 201 {
            break;
        }
        r.assert_problem(503, "overloaded");
        refused += 1;
        assert!(std::time::Instant::now() < end, "no queue place in 4 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(refused >= 1, "the queue was not full");
    let m = e.metrics_text();
    assert_eq!(
        metric(&m, "flashcall_rate_limited_total", &[("scope", "phone")]),
        0.0,
        "{m}"
    );
}

/// The pool's refusals (409 no number for the code, 503 every number
/// cooling down) come before the per-phone limit, so they use none of the
/// destination's allowance; and a 429 from that limit uses no number.
/// Before, the limit counted first: one 409 or 503 locked a destination
/// with `max = 1` out for its whole window. (Taking the number before the
/// limit, the other way round, would let a client sending to a phone at
/// its limit block a number per refused request.)
#[test]
fn pool_refusals_and_phone_limits_use_nothing_of_each_other() {
    // Two numbers, 0001 and 0002, each cooling 5 s after a use.
    let e = engine_with_cooldown(
        "api-pool-vs-phone",
        "+447700900001\n+447700900002\n",
        5_000,
        "[limits.per_phone]\nmax = 1\nper_secs = 600\n",
    );
    let to = |phone: &str, code: Option<&str>| match code {
        Some(c) => json!({"phone": phone, "sender": "SHOP", "code": c}),
        None => json!({"phone": phone, "sender": "SHOP"}),
    };
    for _ in 0..3 {
        e.post(CREATE, &to("+447700900123", Some("1234")))
            .assert_problem(409, "no_number_for_code");
    }
    // The destination still has its one send.
    let v = e.create(to("+447700900123", Some("0001")));
    assert_eq!(v["code"], "0001", "{v}");
    // Now at its limit: refused three times, with no number used ...
    for _ in 0..3 {
        e.post(CREATE, &to("+447700900123", None))
            .assert_problem(429, "rate_limited");
    }
    // ... so 0002 is still free for another destination (`create` asserts
    // the 201; had a 429 taken 0002, this would be a 503); then the pool is
    // out (both cool for 5 s): 503.
    e.create(to("+447700900124", None));
    e.post(CREATE, &to("+447700900125", None))
        .assert_problem(503, "overloaded");
    // Retried until a number is free again: 503s, then 201. Had the 503s
    // counted, the retry would be a 429 (max = 1).
    let end = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = e.post(CREATE, &to("+447700900125", None));
        if r.status == 201 {
            break;
        }
        r.assert_problem(503, "overloaded");
        assert!(std::time::Instant::now() < end, "no number free in 15 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = e.metrics_text();
    assert_eq!(
        metric(&m, "flashcall_rate_limited_total", &[("scope", "phone")]),
        3.0,
        "{m}"
    );
}

// ---------------------------------------------------------------- lifecycle

#[test]
fn delivered_wrong_code_then_right_code_verified() {
    let e = engine("lifecycle");
    let v = e.create(json!({"phone": "+447700900123", "sender": "SHOP", "code": "4821"}));
    let id = id_of(&v);
    let got = e.wait_call_done(&id);
    assert_eq!(got["status"], "delivered", "{got}");
    assert_eq!(got["call"]["outcome"], "delivered", "{got}");
    assert_eq!(got["call"]["sip_code"], 487, "{got}");
    assert_eq!(got["call"]["trunk"], "sandbox", "{got}");
    assert_eq!(got["call"]["caller"], "+447700904821", "{got}");
    assert_eq!(got["attempts_left"], 5);

    let w = check(&e, &id, json!({"code": "4822"}));
    assert_eq!(w.status, 200, "{}", w.body);
    assert_eq!(w.content_type, "application/json");
    let w = w.json();
    assert_eq!(w["id"], id.as_str());
    assert_eq!(w["verified"], false, "{w}");
    assert_eq!(w["attempts_left"], 4, "{w}");
    assert_eq!(w["status"], "delivered", "{w}");
    // A wrong full CLI counts too.
    let w = check(&e, &id, json!({"cli": "+447700904822"})).json();
    assert_eq!(
        (w["verified"].clone(), w["attempts_left"].clone()),
        (json!(false), json!(3))
    );

    let r = check(&e, &id, json!({"code": "4821"})).json();
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["status"], "verified", "{r}");
    assert_eq!(r["attempts_left"], 3, "{r}");
    // Checking the right code again says verified again; GET agrees.
    let r = check(&e, &id, json!({"code": "4821"})).json();
    assert_eq!(
        (r["verified"].clone(), r["status"].clone()),
        (json!(true), json!("verified"))
    );
    let got = e.get(&format!("/v1/verifications/{id}")).json();
    assert_eq!(got["status"], "verified", "{got}");

    // The engine-chosen code, checked by the full caller number.
    let v = e.create(json!({"phone": "+447700900124", "sender": "SHOP"}));
    let id2 = id_of(&v);
    let got = e.wait_call_done(&id2);
    assert_eq!(got["status"], "delivered", "{got}");
    let caller = got["call"]["caller"].as_str().unwrap().to_string();
    assert!(
        caller.starts_with("+44770090") && caller.len() == 13,
        "{caller}"
    );
    let r = check(&e, &id2, json!({ "cli": caller })).json();
    assert_eq!(r["verified"], true, "{r}");

    let m = e.metrics_text();
    assert_eq!(
        metric(&m, "flashcall_checks_total", &[("result", "wrong_code")]),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "flashcall_checks_total", &[("result", "verified")]),
        2.0,
        "{m}"
    );
}

#[test]
fn attempts_exhausted_after_max_wrong_codes() {
    let e = engine("exhausted");
    let v = e.create(json!({"phone": "+447700900123", "sender": "SHOP", "code": "1111"}));
    let id = id_of(&v);
    e.wait_call_done(&id);
    for left in (0..5).rev() {
        let r = check(&e, &id, json!({"code": "2222"}));
        assert_eq!(r.status, 200, "{}", r.body);
        let r = r.json();
        assert_eq!(r["verified"], false, "{r}");
        assert_eq!(r["attempts_left"], left, "{r}");
        let want = if left == 0 {
            "attempts_exhausted"
        } else {
            "delivered"
        };
        assert_eq!(r["status"], want, "{r}");
    }
    // Even the right code does not verify now, by code or by CLI.
    for body in [json!({"code": "1111"}), json!({"cli": "+447700901111"})] {
        let r = check(&e, &id, body);
        assert_eq!(r.status, 200, "{}", r.body);
        let r = r.json();
        assert_eq!(r["verified"], false, "{r}");
        assert_eq!(r["status"], "attempts_exhausted", "{r}");
        assert_eq!(r["attempts_left"], 0, "{r}");
    }
    let got = e.get(&format!("/v1/verifications/{id}")).json();
    assert_eq!(got["status"], "attempts_exhausted", "{got}");
    assert_eq!(got["attempts_left"], 0, "{got}");
}

#[test]
fn check_while_calling_is_allowed() {
    // The sandbox waits 3 s before its 180: the call stays `calling`.
    let trunks = "[sandbox]\nenabled = true\nring_delay_ms = 3000\n";
    let e = engine_with("calling", POOL, trunks, "");
    let v = e.create(json!({"phone": "+447700900123", "sender": "SHOP", "code": "5678"}));
    let id = id_of(&v);
    let got = e.wait_status(&id, Duration::from_secs(2), |s| s != "pending");
    assert_eq!(got["status"], "calling", "{got}");
    assert!(got["call"]["invited_at"].is_string(), "{got}");
    assert!(got["call"]["outcome"].is_null(), "{got}");
    let w = check(&e, &id, json!({"code": "5679"})).json();
    assert_eq!(
        (w["verified"].clone(), w["status"].clone()),
        (json!(false), json!("calling")),
        "{w}"
    );
    let r = check(&e, &id, json!({"code": "5678"})).json();
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["status"], "verified", "{r}");
    assert_eq!(r["attempts_left"], 4, "{r}");
}

#[test]
fn magic_destinations_give_their_outcomes() {
    let e = engine("magic");
    let cases = [
        ("+447700900486", "busy", 486),
        ("+447700900200", "answered", 200),
        ("+447700900404", "invalid_number", 404),
        ("+447700900480", "unavailable", 480),
    ];
    let ids: Vec<String> = cases
        .iter()
        .map(|(phone, _, _)| {
            id_of(&e.create(json!({"phone": phone, "sender": "SHOP", "code": "7777"})))
        })
        .collect();
    for ((phone, outcome, code), id) in cases.iter().zip(&ids) {
        let got = e.wait_call_done(id);
        assert_eq!(got["status"], "failed", "{phone}: {got}");
        assert_eq!(got["call"]["outcome"], *outcome, "{phone}: {got}");
        assert_eq!(got["call"]["sip_code"], *code, "{phone}: {got}");
        assert!(got["call"]["ended_at"].is_string(), "{phone}: {got}");
    }
    // A failed call can still be checked: an answered call did show the
    // caller number.
    let r = check(&e, &ids[1], json!({"code": "7777"})).json();
    assert_eq!(r["verified"], true, "{r}");
    let m = e.metrics_text();
    for (_, outcome, _) in cases {
        assert_eq!(
            metric(
                &m,
                "flashcall_calls_total",
                &[("trunk", "sandbox"), ("outcome", outcome)]
            ),
            1.0,
            "{outcome}: {m}"
        );
    }
}

#[test]
fn trunk_503_backs_off_and_creates_get_503() {
    let e = engine("trunk-503");
    let v = e.create(json!({"phone": "+447700900503", "sender": "SHOP"}));
    let got = e.wait_call_done(&id_of(&v));
    assert_eq!(got["status"], "failed", "{got}");
    assert_eq!(got["call"]["outcome"], "trunk_error", "{got}");
    assert_eq!(got["call"]["sip_code"], 503, "{got}");
    // The only trunk honours the sandbox's Retry-After: 5.
    let r = e.post(CREATE, &json!({"phone": "+447700900123", "sender": "SHOP"}));
    r.assert_problem(503, "overloaded");
    let first = retry_after(&r);
    assert!(first <= 5, "Retry-After {first}");
    // Retry-After is the back-off still left, not a fixed figure.
    std::thread::sleep(Duration::from_millis(1100));
    let r = e.post(CREATE, &json!({"phone": "+447700900124", "sender": "SHOP"}));
    r.assert_problem(503, "overloaded");
    let later = retry_after(&r);
    assert!(later < first, "Retry-After {later} after {first}");
}

// ---------------------------------------------------------------- shape

#[test]
fn response_shape() {
    let e = engine("shape");
    let before = std::time::SystemTime::now();
    let r = e.post(
        CREATE,
        &json!({"phone": "+447700900123", "sender": "SHOP", "code": "2468", "reference": "order-1", "ttl_secs": 120}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.content_type, "application/json");
    let v = r.json();
    let id = id_of(&v);
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{id}"
    );
    assert_eq!(v["status"], "pending", "{v}");
    assert_eq!(v["phone"], "+447700900123");
    assert_eq!(v["sender"], "SHOP");
    assert_eq!(v["caller_prefix"], "+44770090");
    assert_eq!(v["code_length"], 4);
    assert_eq!(v["cli_filter"], "+44770090XXXX");
    assert_eq!(v["reference"], "order-1");
    assert_eq!(v["code"], "2468");
    assert!(
        v.get("call").is_none() && v.get("attempts_left").is_none(),
        "{v}"
    );
    // expires_at is ttl_secs after the request (loosely: not a timing test).
    let ahead = rfc3339_utc(&v["expires_at"]) - time::OffsetDateTime::from(before);
    assert!(
        (60..=180).contains(&ahead.whole_seconds()),
        "expires_at {} is {ahead} after the request",
        v["expires_at"]
    );

    // No client code: no `code`, and reference is null when not given.
    let w = e.create(json!({"phone": "+447700900124", "sender": "SHOP"}));
    assert!(w.get("code").is_none(), "engine code echoed: {w}");
    assert!(w["reference"].is_null(), "{w}");
    assert_eq!(w["code_length"], 4);
    assert_ne!(id_of(&w), id);

    // GET: the same object plus `call` and `attempts_left`.
    let got = e.wait_call_done(&id);
    for k in [
        "id",
        "status",
        "phone",
        "sender",
        "caller_prefix",
        "code_length",
        "cli_filter",
        "expires_at",
        "reference",
        "code",
    ] {
        if k != "status" {
            assert_eq!(got[k], v[k], "{k}: {got}");
        }
    }
    assert_eq!(got["attempts_left"], 5, "{got}");
    let call = &got["call"];
    for k in [
        "outcome",
        "sip_code",
        "trunk",
        "caller",
        "invited_at",
        "ringing_at",
        "ended_at",
    ] {
        assert!(call.get(k).is_some(), "call.{k}: {got}");
    }
    let invited = rfc3339_utc(&call["invited_at"]);
    let ringing = rfc3339_utc(&call["ringing_at"]);
    let ended = rfc3339_utc(&call["ended_at"]);
    assert!(invited <= ringing && ringing <= ended, "{call}");
    assert_eq!(call["caller"], "+447700902468", "{got}");
    let got_w = e.get(&format!("/v1/verifications/{}", id_of(&w))).json();
    assert!(
        got_w.get("code").is_none(),
        "engine code shown by GET: {got_w}"
    );

    // Check: exactly id, status, verified, attempts_left.
    let c = check(&e, &id, json!({"code": "2468"})).json();
    let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
    let mut keys: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["attempts_left", "id", "status", "verified"], "{c}");

    // Problems carry type, title, status and detail.
    let p = e
        .post(CREATE, &json!({"phone": "nope", "sender": "SHOP"}))
        .assert_problem(400, "invalid_phone");
    assert!(p["detail"].as_str().unwrap().contains("nope"), "{p}");
}

/// Reads until the server closes the connection (or `limit`, which fails
/// the test): what it sent before closing.
fn read_until_closed(s: &mut std::net::TcpStream, limit: Duration, what: &str) -> String {
    use std::io::Read;
    s.set_read_timeout(Some(limit)).expect("read timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "{what}: still open after {limit:?} ({e}); read so far: {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A client that stalls mid-request is cut off after `http.read_timeout_ms`
/// (before, such a connection stayed open for ever): half a request head,
/// closed without an answer; a head whose body stops short, 408
/// `request_timeout`; an idle keep-alive connection, closed. The engine
/// answers others meanwhile.
#[test]
fn clients_that_stall_mid_request_are_cut_off() {
    use std::io::Write;
    use std::net::TcpStream;
    let dir = test_dir("api-read-timeout");
    let cfg = config(&dir, POOL, SANDBOX, "");
    with_http_keys(&cfg, "read_timeout_ms = 300", 3000);
    let e = Engine::start(&cfg);
    let (mut half_head, mut short_body) = support::stalled_requests(e.http);
    let mut idle = TcpStream::connect(e.http).expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: flashcall\r\n\r\n")
        .expect("write");

    // Meanwhile the engine serves: the stalled ones hold nothing up.
    let v = e.create(json!({"phone": "+447911123499", "sender": "SHOP"}));
    assert_eq!(v["status"], "pending", "{v}");

    // Ten times the limit: a bound on the wait, not a measure of speed.
    let limit = Duration::from_secs(3);
    let got = read_until_closed(&mut half_head, limit, "half a request head");
    assert_eq!(got, "", "half a request head: answered {got:?}");
    let got = read_until_closed(&mut short_body, limit, "a body that stops short");
    assert!(got.starts_with("HTTP/1.1 408 "), "{got}");
    assert!(got.contains("request_timeout"), "{got}");
    let got = read_until_closed(&mut idle, limit, "an idle keep-alive connection");
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");

    // The 408 is counted like any answer.
    let m = e.metrics_text();
    assert!(
        m.lines().any(
            |l| l.starts_with("flashcall_http_requests_total{") && l.contains("status=\"408\"")
        ),
        "no 408 counted:\n{m}"
    );
    // Still serving, on a fresh connection (a pooled one of the harness's
    // client may be just at its own idle timeout).
    let mut fresh = TcpStream::connect(e.http).expect("connect");
    fresh
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: flashcall\r\nConnection: close\r\n\r\n")
        .expect("write");
    let got = read_until_closed(&mut fresh, limit, "a fresh request");
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
}
