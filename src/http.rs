//! The HTTP API (SPEC §5): `router(state)`, its handlers, and one
//! [`ApiError`] that renders every failure as RFC 9457 problem+json with a
//! stable `type` slug.
//!
//! A create goes: auth -> project limit -> body -> Idempotency-Key ->
//! validation -> trunk queue -> per-phone limit -> pool pick -> durable
//! insert -> queue the call -> 201. Cheap refusals come first, and nothing
//! that consumes a shared resource (a queue place, a pool number) happens
//! before every check that could still refuse the request.

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use dashmap::DashMap;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use subtle::ConstantTimeEq;

use crate::config::{is_e164, SenderStatus, VerificationConfig};
use crate::engine::{now_ms, CallCmd, EngineShared, Reservation, Unavailable};
use crate::limits::{Limited, Limits, Scope};
use crate::metrics as m;
use crate::pool::{PickError, Pool};
use crate::report::{self, GroupBy, ReportError, Stats};
use crate::store::{Idempotent, Store, StoreError, StoreFuture};
use crate::verification::{CheckResult, Guess, Status, Verification};

/// A project as the API authenticates it.
pub struct Project {
    pub login: String,
    pub secret_sha256: [u8; 32],
    pub senders: HashMap<String, SenderStatus>,
}

pub struct AppState {
    pub projects: HashMap<String, Project>,
    pub store: Arc<dyn Store>,
    pub limits: Limits,
    pub pool: Mutex<Pool>,
    pub engine: Arc<EngineShared>,
    pub verification: VerificationConfig,
    pub code_length: u8,
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive once its head is in.
    pub read_timeout: std::time::Duration,
    /// Idempotency keys whose first request is still being handled.
    pub idem_in_flight: DashMap<(String, String), ()>,
    /// Look an Idempotency-Key up before creating: only with a number
    /// cooldown (see `create`).
    keys_first: bool,
}

impl AppState {
    pub fn new(
        cfg: &crate::config::Config,
        pool: Pool,
        store: Arc<dyn Store>,
        engine: Arc<EngineShared>,
    ) -> Self {
        let keys_first = pool.cooldown() > std::time::Duration::ZERO;
        AppState {
            projects: cfg
                .projects
                .iter()
                .map(|p| {
                    let project = Project {
                        login: p.login.clone(),
                        secret_sha256: p.secret_hash(),
                        senders: p
                            .senders
                            .iter()
                            .map(|s| (s.code.clone(), s.status))
                            .collect(),
                    };
                    (p.login.clone(), project)
                })
                .collect(),
            store,
            limits: Limits::new(&cfg.projects, &cfg.limits.per_phone),
            pool: Mutex::new(pool),
            engine,
            verification: cfg.verification.clone(),
            code_length: cfg.pool.code_length,
            max_body_bytes: cfg.http.max_body_bytes,
            read_timeout: std::time::Duration::from_millis(cfg.http.read_timeout_ms),
            idem_in_flight: DashMap::new(),
            keys_first,
        }
    }
}

/// A problem+json error.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub slug: &'static str,
    pub detail: String,
    pub retry_after: Option<u64>,
    /// The limit that refused the request, counted in
    /// `flashcall_rate_limited_total` when this is answered (not when it
    /// is made: a keyed create refused by a limit may turn out to be a
    /// retry, answered with its stored 201).
    pub limited: Option<Scope>,
    /// The store failure behind a 503, logged at error level when this is
    /// answered (not when it is made: a keyed create the store refused may
    /// turn out to be a retry, answered with its stored 201, and an outage
    /// would otherwise log "request failed" for a request that succeeded).
    pub failure: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            slug,
            detail: detail.into(),
            retry_after: None,
            limited: None,
            failure: None,
        }
    }
    fn bad(slug: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, slug, detail)
    }
    fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such verification")
    }
    fn overloaded(detail: impl Into<String>, retry_after: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", detail)
        }
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        // The store refusing to write is "try again", not a bug of ours.
        ApiError {
            failure: Some(e.to_string()),
            ..Self::overloaded(format!("the store could not take the request: {e}"), 1)
        }
    }
}

impl From<Limited> for ApiError {
    fn from(l: Limited) -> Self {
        let what = match l.scope {
            Scope::Project => "this project's request rate",
            Scope::Phone => "sends to this phone number",
            Scope::Trunk => "the trunk's call rate",
        };
        ApiError {
            retry_after: Some(l.retry_after_secs()),
            limited: Some(l.scope),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "limit reached for {what}; retry after {} s",
                    l.retry_after_secs()
                ),
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let body = json!({
            "type": self.slug,
            "title": title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some(scope) = self.limited {
            m::rate_limited(scope);
        }
        if let Some(e) = &self.failure {
            tracing::error!(error = %e, "request failed");
        }
        let mut resp = (self.status, body.to_string()).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                h.insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"flashcall\""),
            );
        }
        resp
    }
}

type ApiResult = Result<Response, ApiError>;

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/verifications", post(create))
        .route("/v1/verifications/{id}", get(get_one))
        .route("/v1/verifications/{id}/check", post(check))
        .route("/v1/stats", get(stats))
        .route("/v1/reports/verifications.csv", get(verifications_csv))
        .route("/healthz", get(healthz))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(track))
        .with_state(state)
}

/// Counts every request by route template (never the raw path: it holds
/// IDs) and status, and times it.
async fn track(req: Request<axum::body::Body>, next: Next) -> Response {
    // The template is shared with the request (an Arc inside MatchedPath):
    // a clone of the handle, not of the text.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let t0 = Instant::now();
    let resp = next.run(req).await;
    m::http_request(
        route.as_ref().map_or("unmatched", |p| p.as_str()),
        resp.status().as_u16(),
        t0.elapsed().as_secs_f64(),
    );
    resp
}

async fn healthz(State(st): State<Arc<AppState>>) -> Response {
    let _ = &st;
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"ok"}"#,
    )
        .into_response()
}

/// HTTP Basic auth against the project's SHA-256 secret, compared in
/// constant time. An unknown login costs the same hash and compare so
/// timing does not tell which logins exist.
fn auth<'a>(st: &'a AppState, headers: &HeaderMap) -> Result<&'a Project, ApiError> {
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "HTTP Basic credentials of a project are required",
        )
    };
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unauthorized)?;
    let (scheme, b64) = value.trim().split_once(' ').ok_or_else(unauthorized)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(unauthorized());
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| unauthorized())?;
    let raw = String::from_utf8(raw).map_err(|_| unauthorized())?;
    let (login, secret) = raw.split_once(':').ok_or_else(unauthorized)?;
    let given: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    let project = st.projects.get(login);
    let expected = project.map_or([0u8; 32], |p| p.secret_sha256);
    let ok: bool = given.ct_eq(&expected).into();
    match project {
        Some(p) if ok => Ok(p),
        _ => Err(unauthorized()),
    }
}

/// A request body, read within `http.read_timeout_ms` (413 over the size
/// limit, 408 too slow). hyper's header timeout ends with the head: without
/// this, a client that announced a body and sent part of it held the
/// handler, its connection and a shutdown's drain for as long as it liked.
pub struct TimedBody(Result<Bytes, ApiError>);

impl FromRequest<Arc<AppState>> for TimedBody {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: Request<Body>, st: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let limit = st.read_timeout;
        // Where the body came with the head (nearly always), the read is
        // ready at its first poll and the timer is never armed.
        let read = match tokio::time::timeout(limit, Bytes::from_request(req, st)).await {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is over the size limit",
            )),
            Ok(Err(e)) => Err(ApiError::bad(
                "invalid_request",
                format!("cannot read the body: {e}"),
            )),
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} ms (http.read_timeout_ms)",
                    limit.as_millis()
                ),
            )),
        };
        Ok(TimedBody(read))
    }
}

/// The JSON body, with the errors SPEC §5 names: 415 without a JSON
/// content type, 413 over the size limit (and 408 too slow: see
/// [`TimedBody`]), 400 for anything unparsable.
fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: TimedBody,
) -> Result<(T, Bytes), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("expected Content-Type: application/json, got {ct:?}"),
        ));
    }
    let body = body.0?;
    let v = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad("invalid_request", format!("invalid JSON body: {e}")))?;
    Ok((v, body))
}

/// Strict E.164, then valid for its country (unless an allowed test
/// prefix); returns the digits as a number for the per-phone limiter.
fn validate_phone(phone: &str, cfg: &VerificationConfig) -> Result<u64, ApiError> {
    let invalid = |why: &str| ApiError::bad("invalid_phone", format!("phone {phone:?}: {why}"));
    if !is_e164(phone) {
        return Err(invalid("expected E.164, '+' then 7 to 15 digits"));
    }
    let allowed = cfg.allow_prefixes.iter().any(|p| phone.starts_with(p));
    if !allowed {
        // Same answer as phonenumber's parse + is_valid, in ~1 µs, not ~23.
        if !crate::phone::is_valid(phone) {
            return Err(invalid("not a valid number for its country"));
        }
    }
    phone[1..]
        .parse()
        .map_err(|_| invalid("expected E.164, '+' then 7 to 15 digits"))
}

fn validate_code(code: &str, len: u8) -> Result<(), ApiError> {
    if code.len() == usize::from(len) && code.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(ApiError::bad(
            "invalid_code",
            format!("code {code:?}: expected exactly {len} digits"),
        ))
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    phone: String,
    sender: String,
    code: Option<String>,
    reference: Option<String>,
    ttl_secs: Option<u64>,
}

/// Removes the in-flight mark of an Idempotency-Key however the request
/// ends. It owns its state handle so that a create dropped before its
/// commit keeps the key marked until the insert is done (see [`Accepted`]):
/// a retry meanwhile gets 409 `idempotency_key_in_progress`, not a second
/// verification.
struct IdemGuard {
    st: Arc<AppState>,
    key: (String, String),
}

impl Drop for IdemGuard {
    fn drop(&mut self) {
        self.st.idem_in_flight.remove(&self.key);
    }
}

async fn create(State(st): State<Arc<AppState>>, headers: HeaderMap, body: TimedBody) -> ApiResult {
    let project = auth(&st, &headers)?;
    st.limits.check_project(&project.login)?;
    let (req, raw): (CreateBody, Bytes) = json_body(&headers, body)?;

    let idem_key = match headers.get("idempotency-key") {
        None => return create_new(&st, project, req, None).await,
        Some(v) => v
            .to_str()
            .ok()
            .filter(|k| !k.is_empty() && k.len() <= 255)
            .ok_or_else(|| {
                ApiError::bad(
                    "invalid_request",
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                )
            })?
            .to_string(),
    };
    let body_sha256: [u8; 32] = Sha256::digest(&raw).into();
    // Mark the key in flight before anything is stored: a retry while this
    // request is handled gets 409, never a second verification, and the
    // mark is released only after the insert committed or failed.
    let key = (project.login.clone(), idem_key.clone());
    if st.idem_in_flight.insert(key.clone(), ()).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_key_in_progress",
            "a request with this Idempotency-Key is still being handled",
        ));
    }
    let guard = IdemGuard {
        st: Arc::clone(&st),
        key,
    };
    // No look-up first: nearly every key is new, and the point read of
    // the `idempotency` table was ~15 µs of a keyed create's ~20 µs extra
    // CPU at 4,000/s (session 16). A retry of a stored create is told by
    // its insert instead (the key's row is there: `KeyTaken`, nothing
    // written, the phone's send given back), and by any refusal on the way
    // (the phone now at its limit, a number for its code cooling down): a
    // keyed create that fails looks the key up, and a stored one answers.
    // A retry told by its insert has picked a caller number; with a number
    // cooldown that number would then cool down unused (giving it back
    // would have to restore the pool's rotation), so a retry storm could
    // leave the pool, or the few numbers for a client's code, cooling
    // down. With a cooldown the key is looked up first, as a read costs
    // no number.
    if st.keys_first {
        if let Some(answer) = stored_answer(&st, &project.login, &idem_key, &body_sha256)
            .map_err(ApiError::internal)?
        {
            return answer;
        }
    }
    let answer = create_new(
        &st,
        project,
        req,
        Some(IdemCreate {
            key: idem_key.clone(),
            body_sha256,
            guard,
        }),
    )
    .await;
    let Err(refused) = answer else {
        return answer;
    };
    match stored_answer(&st, &project.login, &idem_key, &body_sha256) {
        Ok(Some(answer)) => answer,
        // Not a retry (or the store cannot say): this request's own answer.
        Ok(None) => Err(refused),
        Err(e) => {
            tracing::warn!(error = %e, "create: an Idempotency-Key look-up failed");
            Err(refused)
        }
    }
}

/// The stored answer to a retry of `(login, key)`: its 201 replayed for
/// the same body, 422 for another; `None` if the key is not stored.
fn stored_answer(
    st: &AppState,
    login: &str,
    key: &str,
    body_sha256: &[u8; 32],
) -> Result<Option<ApiResult>, StoreError> {
    Ok(st.store.idempotent(login, key)?.map(|prev| {
        if prev.body_sha256 != *body_sha256 {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request body",
            ));
        }
        let mut r = json_response(StatusCode::CREATED, prev.response);
        r.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        Ok(r)
    }))
}

/// A keyed create's key, its body's digest and its in-flight mark.
struct IdemCreate {
    key: String,
    body_sha256: [u8; 32],
    guard: IdemGuard,
}

/// A create as if it were new: validation, limits, pool, the durable
/// record (with its Idempotency-Key's, if `idem`) and the call.
async fn create_new(
    st: &Arc<AppState>,
    project: &Project,
    req: CreateBody,
    idem: Option<IdemCreate>,
) -> ApiResult {
    let phone_num = validate_phone(&req.phone, &st.verification)?;
    if let Some(c) = &req.code {
        validate_code(c, st.code_length)?;
    }
    match project.senders.get(&req.sender) {
        Some(SenderStatus::Active) => {}
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "sender_not_active",
                format!("sender {:?} is not active", req.sender),
            ))
        }
        None => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "sender_not_active",
                format!("sender {:?} is not registered for this project", req.sender),
            ))
        }
    }
    let ttl = req.ttl_secs.unwrap_or(st.verification.ttl_secs);
    if ttl == 0 || ttl > st.verification.max_ttl_secs {
        return Err(ApiError::bad(
            "invalid_request",
            format!("ttl_secs must be 1 to {}", st.verification.max_ttl_secs),
        ));
    }
    if req.reference.as_ref().is_some_and(|r| r.len() > 256) {
        return Err(ApiError::bad(
            "invalid_request",
            "reference must be at most 256 bytes",
        ));
    }

    let now = now_ms();
    // The trunk queue place first: it is given back if anything below
    // refuses the request; a per-phone send is given back only when the
    // store insert fails, so pool and trunk refusals must come before it.
    let reservation = {
        let mut rng = rand::thread_rng();
        st.engine.reserve(now, &mut rng)
    }
    .map_err(|u| match u {
        Unavailable::QueueFull => ApiError {
            limited: Some(Scope::Trunk),
            ..ApiError::overloaded("every trunk's call queue is full", 1)
        },
        Unavailable::BackingOff { retry_after_secs } => ApiError::overloaded(
            "every trunk is backing off after 503 Service Unavailable",
            retry_after_secs,
        ),
        Unavailable::ShuttingDown => ApiError::overloaded("the engine is shutting down", 5),
    })?;
    // ThreadRng is not Send: it lives only in this block, never across an
    // await. It is a CSPRNG (ChaCha, seeded from the OS), as codes need.
    let (picked, id, phone_send) = {
        let mut rng = rand::thread_rng();
        let (picked, send) = {
            let mut pool = match st.pool.lock() {
                Ok(p) => p,
                Err(p) => p.into_inner(),
            };
            // The number first, used only once the destination's limit
            // passes: a 409 or 503 from the pool must not count a send to
            // the destination, and a 429 must use no number
            // (with a cooldown, a client sending to a phone at its limit
            // would block numbers it never called).
            let choice = pool
                .choose(req.code.as_deref(), Instant::now(), &mut rng)
                .map_err(|e| match e {
                    PickError::NoNumberForCode(c) => ApiError::new(
                        StatusCode::CONFLICT,
                        "no_number_for_code",
                        format!("no caller number ending in {c} is available now"),
                    ),
                    PickError::Exhausted => {
                        ApiError::overloaded("every caller number is cooling down", 1)
                    }
                })?;
            // Under the pool's lock: the check is ~0.5 µs, but it waits
            // while housekeeping's sweep holds the key's shard (an eighth or
            // so of a sweep that takes ~1 ms at 240,000 keys), and creates
            // behind it wait for the pool meanwhile. A give-back to the pool
            // instead would have to restore its rotation and stamp.
            let send = st.limits.check_phone(phone_num)?;
            (choice.take(), send)
        };
        (picked, crate::verification::new_id(now, &mut rng), send)
    };
    let v = Verification {
        id,
        project: project.login.clone(),
        phone: req.phone.clone(),
        sender: req.sender.clone(),
        code: picked.code,
        client_code: req.code.is_some(),
        caller: picked.number,
        reference: req.reference.clone(),
        created_at_ms: now,
        expires_at_ms: now + (ttl as i64) * 1000,
        attempts_left: st.verification.max_attempts,
        status: Status::Pending,
        call: Default::default(),
    };
    let body = v.to_json_string(false);
    let (idem, idem_guard) = match idem {
        None => (None, None),
        Some(IdemCreate {
            key,
            body_sha256,
            guard,
        }) => (
            Some((
                key,
                Idempotent {
                    body_sha256,
                    verification_id: v.id.clone(),
                    response: body.clone(),
                },
            )),
            Some(guard),
        ),
    };
    let cmd = CallCmd {
        id: v.id.clone(),
        project: v.project.clone(),
        trunk: reservation.trunk(),
        to: v.phone.clone(),
        caller: v.caller.clone(),
    };
    Accepted {
        insert: Some(st.store.insert(v, idem)),
        call: Some((reservation, cmd)),
        refund: Refund {
            st: Arc::clone(st),
            send: phone_send,
        },
        _idem: idem_guard,
    }
    .finish()
    .await
    .map_err(|e| match e {
        // A retry of a stored create: `create` answers it from the stored
        // record. A client sees this only if that record could not be
        // read back (or went meanwhile, say pruned).
        StoreError::KeyTaken(_) => ApiError::overloaded(
            "this Idempotency-Key's create is stored but could not be read back",
            1,
        ),
        e => ApiError::internal(e),
    })?;
    Ok(json_response(StatusCode::CREATED, body))
}

/// A create between queueing its insert and sending its call. hyper drops
/// a request's handler when the client hangs up mid-request (say after the
/// client's own timeout), and a create waits here for the group commit: milliseconds
/// under load, seconds on a stalled disk. Dropped there, the insert still
/// committed, so the verification was stored as `pending` and never called
/// (expired at its TTL), and a retry with the same Idempotency-Key was
/// answered a replayed 201 for a call that never came. Now a drop hands
/// the rest to a task of its own: once the insert commits the call is
/// queued to the engine, as if the 201 had been read (and, as for any
/// create, not placed if the engine is shutting down by then: the record
/// is durable and closed as `interrupted` at the next start). The task
/// exists only for a dropped request; the normal path awaits in place.
struct Accepted {
    insert: Option<StoreFuture<'static, ()>>,
    call: Option<(Reservation, CallCmd)>,
    /// Given back if the insert fails.
    refund: Refund,
    /// Released when this is done, in whichever task finishes it.
    _idem: Option<IdemGuard>,
}

impl Accepted {
    async fn finish(mut self) -> Result<(), StoreError> {
        let stored = match self.insert.as_mut() {
            Some(f) => f.await,
            None => Ok(()),
        };
        // Disarm `drop` before anything else happens.
        self.insert = None;
        match (&stored, self.call.take()) {
            (Ok(()), Some((reservation, cmd))) => send_call(reservation, cmd),
            (Err(_), _) => self.refund.give_back(),
            (Ok(()), None) => {}
        }
        stored
    }
}

/// The destination's send a create counted, to give back when its insert
/// fails: nothing was stored and no call goes out, so the 503 must not use
/// up the phone's allowance (a full disk for a minute would otherwise
/// leave every phone tried meanwhile at its limit for `per_secs`), and
/// neither must a retry whose Idempotency-Key was stored (`KeyTaken`).
#[derive(Clone)]
struct Refund {
    st: Arc<AppState>,
    send: crate::limits::PhoneSend,
}

impl Refund {
    fn give_back(&self) {
        self.st.limits.refund(self.send);
    }
}

fn send_call(reservation: Reservation, cmd: CallCmd) {
    m::verification(&cmd.project, Status::Pending);
    reservation.send(cmd);
}

impl Drop for Accepted {
    fn drop(&mut self) {
        let (Some(insert), Some((reservation, cmd))) = (self.insert.take(), self.call.take())
        else {
            return;
        };
        let id = cmd.id.clone();
        let idem = self._idem.take();
        let refund = self.refund.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                tracing::debug!(%id, "create: request dropped before its commit; the call goes ahead once stored");
                rt.spawn(async move {
                    let _idem = idem;
                    match insert.await {
                        Ok(()) => send_call(reservation, cmd),
                        // A retry of a stored create: nothing to tell.
                        Err(StoreError::KeyTaken(_)) => refund.give_back(),
                        // The client heard nothing either way, and nothing
                        // was stored: no call.
                        Err(e) => {
                            refund.give_back();
                            tracing::warn!(%id, error = %e, "create: a dropped request's insert failed")
                        }
                    }
                });
            }
            // Only outside any runtime (a test dropping the handler on a
            // plain thread): say so rather than lose the call silently.
            // The record is stored all the same (the writer commits what
            // was queued) and stays `pending` until its TTL.
            Err(_) => {
                tracing::error!(%id, "create dropped outside a runtime: its call is not sent")
            }
        }
    }
}

/// The verification `id` of the calling project, expired if its TTL passed.
fn load(st: &AppState, project: &Project, id: &str) -> Result<Verification, ApiError> {
    let v = st
        .store
        .get(id)
        .map_err(ApiError::internal)?
        .filter(|v| v.project == project.login)
        .ok_or_else(ApiError::not_found)?;
    if !v.status.is_final() && now_ms() >= v.expires_at_ms {
        let mut changed = false;
        let v = st
            .store
            .update(id, &mut |v| changed = v.expire_if_due(now_ms()))
            .map_err(ApiError::internal)?
            .ok_or_else(ApiError::not_found)?;
        if changed {
            m::verification(&v.project, Status::Expired);
        }
        return Ok(v);
    }
    Ok(v)
}

async fn get_one(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let project = auth(&st, &headers)?;
    let v = load(&st, project, &id)?;
    Ok(json_response(StatusCode::OK, v.to_json_string(true)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    code: Option<String>,
    cli: Option<String>,
}

async fn check(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: TimedBody,
) -> ApiResult {
    let project = auth(&st, &headers)?;
    let (req, _): (CheckBody, Bytes) = json_body(&headers, body)?;
    match (&req.code, &req.cli) {
        (Some(c), None) => validate_code(c, st.code_length)?,
        (None, Some(n)) => {
            if !is_e164(n) {
                return Err(ApiError::bad(
                    "invalid_phone",
                    format!("cli {n:?}: expected E.164, '+' then 7 to 15 digits"),
                ));
            }
        }
        _ => {
            return Err(ApiError::bad(
                "invalid_request",
                "give exactly one of \"code\" or \"cli\"",
            ))
        }
    }
    // 404 for another project's id before anything is counted.
    load(&st, project, &id)?;
    let mut result = CheckResult::WrongCode;
    let mut before = Status::Pending;
    let now = now_ms();
    let v = st
        .store
        .update(&id, &mut |v| {
            before = v.status;
            let guess = match (&req.code, &req.cli) {
                (Some(c), _) => Guess::Code(c),
                (_, Some(n)) => Guess::Cli(n),
                _ => Guess::Code(""),
            };
            result = v.check(now, guess);
        })
        .map_err(ApiError::internal)?
        .ok_or_else(ApiError::not_found)?;
    st.store.record_check(&id, now, result);
    // Counted before the wait below: the change is made (and queued, and
    // retried if a commit fails) whether or not this request lives to see
    // the commit; a client hanging up there must not hide it.
    m::check(result);
    if v.status != before {
        m::verification(&v.project, v.status);
    }
    // A `verified` (or a spent attempt) is durable before it is answered.
    st.store.flush().await.map_err(ApiError::internal)?;
    if result == CheckResult::Expired {
        return Err(ApiError::new(
            StatusCode::GONE,
            "expired",
            "this verification has expired",
        ));
    }
    let body = json!({
        "id": v.id,
        "status": v.status,
        "verified": result.verified(),
        "attempts_left": v.attempts_left,
    });
    Ok(json_response(StatusCode::OK, body.to_string()))
}

impl From<ReportError> for ApiError {
    fn from(e: ReportError) -> Self {
        ApiError::bad("invalid_request", e.to_string())
    }
}

/// The query of `/v1/stats` and the CSV export. Unknown parameters are
/// ignored, as browsers and BI tools like to add their own.
#[derive(Deserialize)]
struct ReportParams {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
    sender: Option<String>,
}

fn report_params(
    q: Result<Query<ReportParams>, QueryRejection>,
) -> Result<(ReportParams, i64, i64, i64), ApiError> {
    let Query(mut q) = q.map_err(|e| ApiError::bad("invalid_request", e.body_text()))?;
    // An empty value is the parameter's default, as for `sender=`: a
    // client or BI tool that fills in a URL template
    // (`?from=&to=&group_by=&sender=`, SPEC §7's own spelling) sends every
    // parameter, the unset ones empty.
    for p in [&mut q.from, &mut q.to, &mut q.group_by] {
        if p.as_deref() == Some("") {
            *p = None;
        }
    }
    let now = now_ms();
    let (from, to) = report::resolve_range(q.from.as_deref(), q.to.as_deref(), now)?;
    Ok((q, from, to, now))
}

/// An empty `sender=` means every sender, as no parameter does.
fn sender_filter(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// `GET /v1/stats` (SPEC §7): counts of the calling project's
/// verifications created in the range, per UTC day or month.
async fn stats(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    q: Result<Query<ReportParams>, QueryRejection>,
) -> ApiResult {
    let project = auth(&st, &headers)?;
    let (q, from, to, now) = report_params(q)?;
    let group_by = GroupBy::parse(q.group_by.as_deref())?;
    let sender = sender_filter(q.sender);
    let store = st.store.clone();
    let login = project.login.clone();
    // A durable store reads from disk: off the async workers.
    let stats = tokio::task::spawn_blocking(move || {
        let mut s = Stats::new(from, to, group_by, sender, now);
        store.scan(&login, from, to, &mut |v| {
            s.add(v);
            true
        })?;
        Ok::<_, StoreError>(s)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    Ok(json_response(StatusCode::OK, stats.to_json().to_string()))
}

/// `GET /v1/reports/verifications.csv` (SPEC §7): one row per verification
/// of the calling project created in the range, streamed.
async fn verifications_csv(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    q: Result<Query<ReportParams>, QueryRejection>,
) -> ApiResult {
    let project = auth(&st, &headers)?;
    let (q, from, to, now) = report_params(q)?;
    let sender = sender_filter(q.sender);
    let body = csv_export(
        st.store.clone(),
        project.login.clone(),
        from,
        to,
        sender,
        now,
    )
    .await?;
    let disposition = format!(
        "attachment; filename=\"verifications-{}-{}.csv\"",
        report::file_stamp(from),
        report::file_stamp(to)
    );
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// Bytes per body chunk of the CSV export: big enough that framing costs
/// nothing, small enough that a slow client holds little memory.
pub const CSV_CHUNK: usize = 64 * 1024;
/// Chunks buffered between the scan and the client: with [`CSV_CHUNK`],
/// at most ~320 KiB per export however many rows it has.
const CSV_CHANNEL: usize = 4;

type Chunk = Result<Bytes, std::io::Error>;

/// The csv writer's output: collects rows and hands each full chunk to the
/// response body. A failed send means the client went away; the write
/// error then stops the scan.
struct ChunkWriter {
    /// Sent once it reaches CSV_CHUNK; the csv writer hands over up to
    /// 8 KiB at a time, hence the capacity of CSV_CHUNK + 8 KiB.
    buf: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<Chunk>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CSV_CHUNK + 8192));
        self.tx.blocking_send(Ok(Bytes::from(chunk))).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
        })
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CSV_CHUNK {
            self.send()?;
        }
        Ok(b.len())
    }

    /// Chunks go out by size, and the tail once at the end; a flush from
    /// the csv writer must not send a tiny chunk.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The CSV export of `project`'s verifications created in `[from, to)`
/// (of `sender` only, if given) as a streamed body. `store.scan` runs on a
/// blocking thread and feeds a bounded channel, so rows are never all in
/// memory and a slow client slows the scan instead of growing a buffer.
///
/// The first chunk is awaited before answering: a store that fails at once
/// gets a 503 problem. A failure later, after the 200 went out, aborts the
/// body, so the client sees a broken transfer rather than a CSV that looks
/// complete.
pub async fn csv_export(
    store: Arc<dyn Store>,
    project: String,
    from: i64,
    to: i64,
    sender: Option<String>,
    now: i64,
) -> Result<Body, ApiError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(CSV_CHANNEL);
    let err_tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        let mut w = csv::WriterBuilder::new()
            .terminator(csv::Terminator::CRLF) // RFC 4180 line breaks
            .from_writer(ChunkWriter {
                buf: Vec::with_capacity(CSV_CHUNK + 8192),
                tx,
            });
        let mut failed: Option<csv::Error> = None;
        let scanned = match w.write_record(report::CSV_HEADER) {
            Err(e) => {
                failed = Some(e);
                Ok(())
            }
            Ok(()) => store.scan(&project, from, to, &mut |v| {
                if sender.as_ref().is_some_and(|s| *s != v.sender) {
                    return true;
                }
                match w.write_record(report::csv_row(v, now)) {
                    Ok(()) => true,
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                }
            }),
        };
        if let Err(e) = scanned {
            tracing::error!(error = %e, "CSV export: the store scan failed");
            let _ = err_tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            return;
        }
        if let Some(e) = failed {
            // Nearly always the client hanging up; nothing to tell it.
            tracing::debug!(error = %e, "CSV export stopped");
            return;
        }
        match w.into_inner() {
            Ok(mut cw) => {
                if !cw.buf.is_empty() {
                    let _ = cw.send();
                }
            }
            Err(e) => tracing::debug!(error = %e.error(), "CSV export stopped"),
        }
    });
    let first = match rx.recv().await {
        Some(Ok(b)) => b,
        Some(Err(e)) => return Err(ApiError::internal(e)),
        // The producer always sends at least the header row, unless it
        // panicked.
        None => return Err(ApiError::internal("the CSV export task ended early")),
    };
    let rest = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let stream = futures_util::StreamExt::chain(
        futures_util::stream::iter([Ok::<_, std::io::Error>(first)]),
        rest,
    );
    Ok(Body::from_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default config takes SPEC §5's example number (Ofcom's drama
    /// range, invalid by the metadata); `allow_prefixes = []` refuses it,
    /// and a number outside the prefix is still checked either way.
    #[test]
    fn the_drama_range_passes_by_default_and_is_refused_with_no_prefixes() {
        let default = VerificationConfig::default();
        assert!(validate_phone("+447700900123", &default).is_ok());
        assert_eq!(
            validate_phone("+4400000000000", &default).map_err(|e| e.slug),
            Err("invalid_phone")
        );
        let none = VerificationConfig {
            allow_prefixes: Vec::new(),
            ..VerificationConfig::default()
        };
        assert_eq!(
            validate_phone("+447700900123", &none).map_err(|e| e.slug),
            Err("invalid_phone")
        );
        assert!(validate_phone("+447911123456", &none).is_ok());
    }
}
