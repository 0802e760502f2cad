use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use squall_lattices::entry::now_ms;
use squall_lattices::{LatticeValue, Lww, Max, Min, SetLattice, Timestamp};
use squall_proto::call::{
    Artifact, CallResult, Consistency, Failure, FailureCode, InvokeOptions, LimitsRequest, Target,
    MAX_DECLARED_KEYS,
};
use squall_proto::keys;
use squall_proto::poll::Poll;
use squall_scheduler::SchedulerClient;
use squall_state::activations::RecordedError;
use squall_state::activations::{Filter, Status};
use squall_state::api_keys::{ApiKeyRecord, ApiKeys, Refusal, Role};
use squall_state::audit::{AuditEntry, AuditTrail};
use squall_state::calls::{
    check_idempotency_key, Calls, ConcurrencyLimit, DeadLetter, PendingCall, RetryPolicy,
};
use squall_state::dag::dag_key;
use squall_state::namespaces::{Created, NamespaceRecord, Namespaces, Quotas};
use squall_state::registry::record_key;
use squall_state::stored_bytes::{self, StoredBytesGuard};
use squall_state::triggers::{Firing, Trigger, TriggerSpec, Triggers};
use squall_state::{
    Activation, ActivationId, Activations, ClientPool, DagRecord, DagRegistry, DagSpec,
    FunctionRecord, Registry,
};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::auth::{KeyCheck, Verdict};
use crate::cron::CronFirer;
use crate::feed::ChangeFeed;
use crate::limits::ConcurrencyLimits;
use crate::metrics::Metrics;
use crate::namespace::{Existing, Namespace};
use crate::quotas::NamespaceQuotas;
use crate::runner::{record_of, Runner};

/// How the gateway behaves.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Required as a bearer token on every request but `/healthz`, if set.
    pub token: Option<String>,
    /// Largest request body (a function's component is the largest).
    pub max_body_bytes: usize,
    /// How long a registration may take (the executor compiles the component).
    pub register_timeout: Duration,
    /// A call's deadline unless the request sets one (`?timeout_ms=`).
    pub default_timeout: Duration,
    /// Whether every call's activation record is written (see
    /// [`squall_state::activations`]); off only to measure what records cost.
    pub record_activations: bool,
    /// How long activation records are kept.
    pub activation_retention: Duration,
    /// How many bytes of activation records are kept (the oldest go first).
    pub activation_retention_bytes: u64,
    /// The id this gateway's runner of asynchronous calls leases calls under (see
    /// [`crate::runner`]): unique among gateways running at once, the same across restarts
    /// of one gateway, so that a restarted gateway takes back its calls at once.
    pub runner_id: String,
    /// The deepest chain of `kv-change` trigger calls delivered (see [`crate::feed`]).
    pub max_trigger_chain: u32,
    /// How long audit entries are kept (see [`squall_state::audit`]).
    pub audit_retention: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            token: None,
            max_body_bytes: 64 << 20,
            register_timeout: Duration::from_secs(300),
            default_timeout: Duration::from_secs(30),
            record_activations: true,
            activation_retention: squall_state::activations::DEFAULT_RETENTION,
            activation_retention_bytes: squall_state::activations::DEFAULT_RETENTION_BYTES,
            runner_id: format!("gateway-{:016x}", rand::random::<u64>()),
            max_trigger_chain: crate::feed::DEFAULT_MAX_CHAIN,
            audit_retention: squall_state::audit::DEFAULT_RETENTION,
        }
    }
}

/// How often records past the byte cap are looked for.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// What the handlers share.
pub struct Gateway {
    client: Arc<SchedulerClient>,
    functions: Registry,
    models: Registry,
    dags: DagRegistry,
    kvs: ClientPool,
    metrics: Arc<Metrics>,
    activations: Activations,
    calls: Calls,
    /// Runs asynchronous calls; `None` until first used (it needs the runtime).
    runner: std::sync::OnceLock<Runner>,
    limits: ConcurrencyLimits,
    triggers: Triggers,
    /// Writes synchronous calls' records in batches; `None` until the first call (it needs
    /// the runtime the gateway serves on).
    recorder: std::sync::OnceLock<squall_state::activations::Recorder>,
    config: GatewayConfig,
    writer: u64,
    key_check: Arc<KeyCheck>,
    audit: AuditTrail,
    namespaces: Existing,
    quotas: Arc<NamespaceQuotas>,
    /// Refuses `/v1/kv` writes of a namespace measured at its `max_stored_bytes`.
    stored_bytes: StoredBytesGuard,
    /// One on-demand measurement (`GET /v1/usage`) at a time.
    measuring: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway over the store behind `kvs`, sending calls through `client`.
    pub fn new(client: SchedulerClient, kvs: ClientPool, config: GatewayConfig) -> Arc<Self> {
        Arc::new(Self {
            client: Arc::new(client),
            functions: Registry::direct(kvs.clone()),
            models: Registry::direct(kvs.clone()).models(),
            dags: DagRegistry::new(kvs.clone(), None),
            activations: Activations::new(kvs.clone(), config.activation_retention),
            audit: AuditTrail::new(kvs.clone(), config.audit_retention),
            namespaces: Existing::new(Namespaces::new(kvs.clone())),
            quotas: NamespaceQuotas::new(Namespaces::new(kvs.clone())),
            stored_bytes: StoredBytesGuard::new(kvs.clone()),
            measuring: tokio::sync::Mutex::new(()),
            calls: Calls::new(kvs.clone()).with_result_retention(config.activation_retention),
            runner: std::sync::OnceLock::new(),
            limits: ConcurrencyLimits::default(),
            triggers: Triggers::new(kvs.clone()),
            recorder: std::sync::OnceLock::new(),
            key_check: Arc::new(KeyCheck::new(
                ApiKeys::new(kvs.clone()),
                config.token.as_deref(),
            )),
            kvs,
            metrics: Arc::new(Metrics::new()),
            config,
            writer: rand::random(),
        })
    }

    /// The background writer of activation records, started on first use (on the runtime
    /// the gateway serves on).
    fn recorder(&self) -> &squall_state::activations::Recorder {
        self.recorder.get_or_init(|| self.activations.recorder())
    }

    /// Waits (at most `within`) until the activation records of the calls answered so far
    /// are written; whether they all were. For a gateway that stops: after its last answer,
    /// before the process ends.
    pub async fn flush_records(&self, within: Duration) -> bool {
        match self.recorder.get() {
            Some(recorder) => recorder.flush(within).await,
            None => true,
        }
    }

    /// The runner of asynchronous calls, started on first use.
    fn runner(&self) -> &Runner {
        self.runner.get_or_init(|| {
            let records = self
                .config
                .record_activations
                .then(|| (self.recorder().clone(), self.activations.clone()));
            Runner::new(
                self.config.runner_id.clone(),
                self.calls.clone(),
                self.client.clone(),
                records,
                self.metrics.clone(),
                self.limits.clone(),
                self.quotas.clone(),
            )
        })
    }

    /// Starts looking for asynchronous calls nobody runs (at once, then every second):
    /// calls this gateway's id held before a restart, and calls whose runner died. Call
    /// once, inside the runtime the gateway serves on.
    pub fn start(self: &Arc<Self>) {
        self.runner().start_scanning();
        if self.config.token.is_some() {
            self.key_check.keep_fresh();
        }
        CronFirer::new(
            self.triggers.clone(),
            self.calls.clone(),
            self.runner().clone(),
            self.config.default_timeout,
        )
        .start();
        ChangeFeed::new(
            self.kvs.clone(),
            self.triggers.clone(),
            self.calls.clone(),
            self.runner().clone(),
            self.config.runner_id.clone(),
            self.config.default_timeout,
        )
        .with_max_chain(self.config.max_trigger_chain)
        .start();
        // What the namespaces with a stored-bytes quota store (one gateway at a time).
        let (kvs, owner) = (self.kvs.clone(), self.config.runner_id.clone());
        let namespaces = self.namespaces.namespaces().clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(stored_bytes::MEASURE_EVERY).await;
                if let Err(e) = stored_bytes::measure_quota_holders(&kvs, &namespaces, &owner).await
                {
                    tracing::warn!(cause = %e, "measuring what namespaces store");
                }
            }
        });
        if self.config.record_activations {
            // Records past the byte cap go, oldest first, in each namespace (each has the
            // cap).
            let (activations, cap, owner) = (
                self.activations.clone(),
                self.config.activation_retention_bytes,
                self.config.runner_id.clone(),
            );
            let namespaces = self.namespaces.namespaces().clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(TRIM_EVERY).await;
                    let names = match namespaces.names().await {
                        Ok(names) => names,
                        Err(e) => {
                            tracing::warn!(cause = %e, "listing namespaces to trim records");
                            continue;
                        }
                    };
                    for namespace in names {
                        let records = activations.in_namespace(&namespace);
                        match records.trim(cap, &owner).await {
                            Ok(Some(trimmed)) if trimmed.records > 0 => tracing::info!(
                                namespace,
                                records = trimmed.records,
                                bytes = trimmed.bytes,
                                "activation records past the byte cap deleted"
                            ),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(cause = %e, "trimming activation records")
                            }
                        }
                    }
                }
            });
        }
        // Concurrency limits set through other gateways.
        let (calls, limits) = (self.calls.clone(), self.limits.clone());
        let namespaces = self.namespaces.namespaces().clone();
        tokio::spawn(async move {
            loop {
                let generation = limits.generation();
                match concurrency_limits(&calls, &namespaces).await {
                    Ok(stored) => limits.replace(stored.into_iter().collect(), generation),
                    Err(e) => tracing::warn!(cause = %e, "reading concurrency limits"),
                }
                tokio::time::sleep(crate::limits::REFRESH_EVERY).await;
            }
        });
    }

    /// The namespaces, as this gateway knows them.
    pub fn namespaces(&self) -> &Existing {
        &self.namespaces
    }

    fn registry(&self, kind: Artifact) -> &Registry {
        match kind {
            Artifact::Function => &self.functions,
            Artifact::Model => &self.models,
        }
    }

    /// The HTTP routes, `/v1/ns/{ns}/...` included (see [`crate::namespace`]).
    pub fn router(self: &Arc<Self>) -> Router {
        use tower::ServiceExt;
        let routes = self.routes().map_request(crate::namespace::scope);
        Router::new().fallback_service(routes)
    }

    fn routes(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics))
            .route("/v1/openapi.json", get(openapi))
            .route("/v1/executors", get(executors))
            .route("/v1/functions", get(list_functions))
            .route(
                "/v1/functions/{name}",
                put(register_function)
                    .get(get_function)
                    .delete(delete_function),
            )
            .route("/v1/functions/{name}/invoke", post(invoke_function))
            .route(
                "/v1/functions/{name}/retries",
                get(get_function_retries).put(put_function_retries),
            )
            .route("/v1/models", get(list_models))
            .route(
                "/v1/models/{name}",
                put(register_model).get(get_model).delete(delete_model),
            )
            .route("/v1/dags", get(list_dags))
            .route(
                "/v1/dags/{name}",
                put(put_dag).get(get_dag).delete(delete_dag),
            )
            .route("/v1/dags/{name}/invoke", post(invoke_dag))
            .route(
                "/v1/dags/{name}/retries",
                get(get_dag_retries).put(put_dag_retries),
            )
            .route(
                "/v1/functions/{name}/concurrency",
                get(get_function_concurrency)
                    .put(put_function_concurrency)
                    .delete(delete_function_concurrency),
            )
            .route(
                "/v1/dags/{name}/concurrency",
                get(get_dag_concurrency)
                    .put(put_dag_concurrency)
                    .delete(delete_dag_concurrency),
            )
            .route("/v1/calls/{id}", axum::routing::delete(cancel_call))
            .route("/v1/triggers", get(list_triggers))
            .route(
                "/v1/triggers/{name}",
                put(put_trigger).get(get_trigger).delete(delete_trigger),
            )
            .route("/v1/triggers/{name}/pause", post(pause_trigger))
            .route("/v1/triggers/{name}/resume", post(resume_trigger))
            .route("/v1/triggers/{name}/fire", post(fire_trigger))
            .route(
                "/v1/dead-letters/{kind}/{name}",
                get(list_dead_letters).delete(delete_dead_letters),
            )
            .route(
                "/v1/dead-letters/{kind}/{name}/redrive",
                post(redrive_dead_letters),
            )
            .route(
                "/v1/dead-letters/{kind}/{name}/{id}",
                get(get_dead_letter).delete(delete_dead_letter),
            )
            .route(
                "/v1/dead-letters/{kind}/{name}/{id}/redrive",
                post(redrive_dead_letter),
            )
            .route("/v1/results/{id}", get(get_result))
            .route("/v1/activations", get(list_activations))
            .route("/v1/activations/{id}", get(get_activation))
            .route("/v1/activations/{id}/logs", get(activation_logs))
            .route("/v1/keys", get(list_api_keys).post(create_api_key))
            .route("/v1/keys/{id}", axum::routing::delete(revoke_api_key))
            .route("/v1/audit", get(list_audit))
            .route(
                "/v1/namespaces",
                get(list_namespaces).post(create_namespace),
            )
            .route(
                "/v1/namespaces/{name}",
                get(get_namespace).delete(delete_namespace),
            )
            .route(
                "/v1/namespaces/{name}/quotas",
                get(get_quotas).put(put_quotas),
            )
            .route("/v1/kv", get(list_kv))
            .route("/v1/usage", get(get_usage))
            .route("/v1/kv/{*key}", get(get_kv).put(put_kv).delete(delete_kv))
            .fallback(|| async {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
            })
            .method_not_allowed_fallback(|| async {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "this endpoint does not take that method",
                )
            })
            .layer(middleware::from_fn_with_state(self.clone(), audit))
            .layer(middleware::from_fn_with_state(self.clone(), authorize))
            .layer(DefaultBodyLimit::max(self.config.max_body_bytes))
            .with_state(self.clone())
    }
}

/// Every concurrency limit of every namespace, its target qualified.
async fn concurrency_limits(
    calls: &Calls,
    namespaces: &Namespaces,
) -> squall_state::Result<Vec<(Target, u32)>> {
    let mut all = Vec::new();
    for namespace in namespaces.names().await? {
        let stored = calls.in_namespace(&namespace).concurrency_limits().await?;
        all.extend(
            stored
                .into_iter()
                .map(|(target, limit)| (target, limit.max_concurrency)),
        );
    }
    Ok(all)
}

/// The namespace a request addresses, as a handler's argument.
#[derive(Debug, Clone)]
pub struct Ns(pub String);

impl Ns {
    /// `name` (checked) as the fabric knows it in this namespace.
    pub fn qualify(&self, name: &str) -> Result<String, ApiError> {
        keys::validate_name(name).map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(keys::qualify(&self.0, name))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Ns {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Ns(crate::namespace::of(parts).to_string()))
    }
}

/// The `{name}` of a request's path, checked (no `/`, however it was encoded) and qualified
/// with the request's namespace: what registries, the scheduler and records take.
#[derive(Debug, Clone)]
pub struct Named(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Named {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        let namespace = Ns(crate::namespace::of(parts).to_string());
        Ok(Named(namespace.qualify(&name)?))
    }
}

/// An error as the API returns it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

/// `{"error": {...}}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable code: `not_found`, `bad_request`, `unauthorized`, `forbidden`,
    /// `quota_exceeded`, `conflict`, `too_large`,
    /// `invalid_component`, `function_failed`, `trap`, `timeout`, `out_of_memory`,
    /// `no_capacity`, `executor_lost`, `unavailable`, `internal`.
    pub code: String,
    /// For people.
    pub message: String,
    /// The DAG step (function) that failed, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

impl ApiError {
    /// The error as an activation record keeps it.
    fn recorded(&self) -> squall_state::activations::RecordedError {
        squall_state::activations::RecordedError {
            code: self.body.error.code.clone(),
            message: self.body.error.message.clone(),
            step: self.body.error.step.clone(),
        }
    }

    pub(crate) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    code: code.to_string(),
                    message: message.into(),
                    step: None,
                },
            },
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

/// The HTTP status of each kind of failure.
pub fn status_of(code: FailureCode) -> StatusCode {
    match code {
        FailureCode::NotFound => StatusCode::NOT_FOUND,
        FailureCode::BadRequest => StatusCode::BAD_REQUEST,
        FailureCode::InvalidComponent => StatusCode::UNPROCESSABLE_ENTITY,
        FailureCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        FailureCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        FailureCode::NoCapacity | FailureCode::ExecutorLost | FailureCode::Unavailable => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        FailureCode::FunctionFailed
        | FailureCode::Trap
        | FailureCode::OutOfMemory
        | FailureCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        FailureCode::Cancelled => StatusCode::GONE,
        FailureCode::ChainTooDeep => StatusCode::LOOP_DETECTED,
    }
}

impl From<Failure> for ApiError {
    fn from(failure: Failure) -> Self {
        Self {
            status: status_of(failure.code),
            body: ErrorBody {
                error: ErrorDetail {
                    code: failure.code.as_str().to_string(),
                    message: failure.message,
                    step: failure.step,
                },
            },
        }
    }
}

impl From<squall_state::Error> for ApiError {
    fn from(error: squall_state::Error) -> Self {
        error.failure().into()
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_request"
        };
        Self::new(status, code, rejection.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// When a token is set, lets a request in only with a bearer key whose role allows it (see
/// [`crate::auth`]): 401 without one or with one not known, expired or revoked, 403 with one
/// too weak for the request. `GET /healthz` needs none.
async fn authorize(State(gateway): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let limit = gateway.config.max_body_bytes;
    let (request, refusal) = match admit(&gateway, request).await {
        Ok(request) => return next.run(request).await,
        Err(refused) => refused,
    };
    drain(request, limit).await;
    refusal
}

/// Who a request came from, once let in: what the audit trail names.
#[derive(Debug, Clone)]
struct Actor {
    /// The key's id, `token`, or `open` (a gateway without a token).
    by: String,
    /// The role it acts with.
    role: Role,
}

/// What an administrative answer adds to its audit entry, beyond its method and path.
#[derive(Debug, Clone)]
struct AuditDetail(String);

/// Writes an audit entry (see [`squall_state::audit`]) for each administrative request let in
/// on a route (not the fallbacks' 404 and 405), once it is answered and before the answer
/// leaves. Handler and entry run in a task of their own, so a client that hangs up midway
/// (which drops the request's future) cannot leave an action without its entry. An entry the
/// store refuses is logged as an error; the action it describes stands.
async fn audit(State(gateway): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let actor = request.extensions().get::<Actor>().cloned();
    let routed = request.extensions().get::<MatchedPath>().is_some();
    let needs = crate::auth::required_role(&method, request.uri().path());
    let (Some(actor), Some(needs), true) = (actor, needs, routed) else {
        return next.run(request).await;
    };
    if !squall_state::audit::audited(method.as_str(), needs) {
        return next.run(request).await;
    }
    let path = match request.extensions().get::<Namespace>() {
        Some(Namespace(namespace)) => squall_state::audit::recorded_path(&format!(
            "{}{namespace}{}",
            crate::namespace::PREFIX,
            request.uri().path().strip_prefix("/v1").unwrap_or_default()
        )),
        None => squall_state::audit::recorded_path(request.uri().path()),
    };
    let task = tokio::spawn(async move {
        let response = next.run(request).await;
        let at_us = Timestamp::now(0).time;
        let entry = AuditEntry {
            id: AuditTrail::new_id(at_us),
            at_ms: at_us / 1000,
            by: actor.by,
            role: actor.role.to_string(),
            method: method.to_string(),
            path,
            status: response.status().as_u16(),
            detail: response
                .extensions()
                .get::<AuditDetail>()
                .map(|detail| detail.0.clone()),
            gateway: gateway.config.runner_id.clone(),
        };
        if let Err(e) = gateway.audit.record(&entry).await {
            tracing::error!(cause = %e, by = %entry.by, method = %entry.method,
                path = %entry.path, status = entry.status, "an audit entry could not be written");
        }
        response
    });
    match task.await {
        Ok(response) => response,
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the request failed: {e}"),
        )
        .into_response(),
    }
}

/// Reads and drops what is left of a refused request's body, at most `limit` bytes and for at
/// most [`DRAIN_FOR`], before the refusal goes out (not when the client waits for `100
/// Continue`, nor for a body declared larger than `limit`). A client still sending a large
/// body (a component on `PUT /v1/functions/...`) when the answer came and the connection
/// closed would see a broken pipe instead of the 401 or 403 that tells it why; what is read
/// is dropped chunk by chunk, so a refused request costs bandwidth, never memory.
async fn drain(request: Request, limit: usize) {
    use axum::body::HttpBody;
    // A client that asked before sending (`Expect: 100-continue`) sends nothing unless told
    // to, which reading would do; a body larger than the limit is not read whole anyway.
    let headers = request.headers();
    let expects = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let too_large = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|length| length > limit as u64);
    if expects || too_large {
        return;
    }
    let mut body = request.into_body();
    let mut read = 0usize;
    let _ = tokio::time::timeout(DRAIN_FOR, async {
        while read <= limit {
            match std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |data| data.len()),
                Some(Err(_)) | None => break,
            }
        }
    })
    .await;
}

/// How long a refused request's body is read before the refusal goes out regardless.
const DRAIN_FOR: Duration = Duration::from_secs(2);

/// The request back if it may go on, else the request with the answer that refuses it.
async fn admit(gateway: &Gateway, request: Request) -> Result<Request, (Request, Response)> {
    if gateway.config.token.is_none() {
        // Keys and namespaces work on every gateway of the cluster: an open gateway must not
        // make them.
        if crate::auth::required_role(request.method(), request.uri().path()) == Some(Role::Admin) {
            let refusal = ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this gateway has no --token: API keys, namespaces and the audit trail are \
                 managed only through a gateway that requires keys",
            )
            .into_response();
            return Err((request, refusal));
        }
        let mut request = request;
        request.extensions_mut().insert(Actor {
            by: "open".into(),
            role: Role::Admin,
        });
        return in_existing_namespace(gateway, request).await;
    }
    let Some(needed) = crate::auth::required_role(request.method(), request.uri().path()) else {
        return Ok(request);
    };
    let unauthorized = |message: &str| {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response()
    };
    // The scheme's name is case-insensitive (RFC 9110).
    let Some(given) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .and_then(|(scheme, key)| scheme.eq_ignore_ascii_case("bearer").then_some(key.trim()))
    else {
        let refusal = unauthorized(
            "this endpoint needs `Authorization: Bearer <key>` with an API key or the gateway's token",
        );
        return Err((request, refusal));
    };
    let addressed = request
        .extensions()
        .get::<Namespace>()
        .map_or(keys::DEFAULT_NAMESPACE, |n| n.0.as_str());
    let refusal = match gateway.key_check.check(given).await {
        Ok(Verdict::Admitted {
            namespace: Some(own),
            ..
        }) if own != addressed => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this key acts in namespace {own:?} only"),
        )
        .into_response(),
        Ok(Verdict::Admitted { role, by, .. }) if role >= needed => {
            let mut request = request;
            request.extensions_mut().insert(Actor { by, role });
            return in_existing_namespace(gateway, request).await;
        }
        Ok(Verdict::Admitted { role, .. }) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this key's role is {role}; this request needs {needed} or above"),
        )
        .into_response(),
        // Expired and revoked are told only to whoever holds the key's secret.
        Ok(Verdict::Refused(Refusal::Expired)) => unauthorized("this API key has expired"),
        Ok(Verdict::Refused(Refusal::Revoked)) => unauthorized("this API key was revoked"),
        Ok(Verdict::Refused(Refusal::Unknown)) => {
            unauthorized("the key is neither an API key of this cluster nor the gateway's token")
        }
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the key could not be checked: {e}"),
        )
        .into_response(),
    };
    Err((request, refusal))
}

/// The request back if the namespace it addresses exists, else a 404 that says so (told only
/// to a key that may act there, so namespaces cannot be probed without one).
async fn in_existing_namespace(
    gateway: &Gateway,
    request: Request,
) -> Result<Request, (Request, Response)> {
    let Some(Namespace(namespace)) = request.extensions().get::<Namespace>().cloned() else {
        return Ok(request);
    };
    match gateway.namespaces.exists(&namespace).await {
        Ok(true) => Ok(request),
        Ok(false) => {
            let shown: String = namespace.chars().take(keys::MAX_NAME_LEN).collect();
            let refusal = ApiError::not_found(format!("no namespace {shown:?}")).into_response();
            Err((request, refusal))
        }
        Err(e) => {
            let refusal = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("whether the namespace exists could not be read: {e}"),
            )
            .into_response();
            Err((request, refusal))
        }
    }
}

/// `GET /healthz` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// Executors the scheduler knows.
    pub executors: usize,
}

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, body = Health), (status = 503, body = ErrorBody)))]
async fn healthz(State(gateway): State<Arc<Gateway>>) -> ApiResult<Json<Health>> {
    let executors = gateway.client.status(Duration::from_secs(2)).await?;
    Ok(Json(Health {
        status: "ok".into(),
        executors: executors.len(),
    }))
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(
    State(gateway): State<Arc<Gateway>>,
    actor: Option<axum::Extension<Actor>>,
) -> Response {
    let executors = gateway
        .client
        .status(Duration::from_secs(2))
        .await
        .unwrap_or_default();
    let dropped = gateway.recorder.get().map_or(0, |r| r.dropped());
    let mut text = gateway.metrics.render(&executors, dropped);
    // A key of the default namespace (the only one /metrics lets in but admin keys) reads
    // the default namespace's series; the token and admin keys read every namespace's.
    if actor.is_none_or(|actor| actor.role != Role::Admin) {
        text = crate::metrics::only_namespace(&text, keys::DEFAULT_NAMESPACE);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "This API's OpenAPI document")))]
async fn openapi() -> Response {
    Json(ApiDoc::openapi()).into_response()
}

/// An executor, as `GET /v1/executors` lists it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ExecutorInfo {
    /// Its id.
    pub id: String,
    /// Its mailbox.
    pub addr: String,
    /// Steps running now.
    pub running: u32,
    /// Steps waiting for their inputs.
    pub waiting: u32,
    /// Steps it takes before it counts as busy.
    pub capacity: u32,
    /// Functions it serves (empty: all).
    pub serves: Vec<String>,
    /// Functions warm there.
    pub warm: Vec<String>,
    /// Steps run.
    pub steps: u64,
    /// Steps failed.
    pub failures: u64,
    /// Whether it is stopping (finishing its steps; nothing new is placed on it).
    #[serde(default)]
    pub draining: bool,
}

#[utoipa::path(get, path = "/v1/executors", tag = "operations",
    responses((status = 200, body = Vec<ExecutorInfo>), (status = 503, body = ErrorBody)))]
async fn executors(
    State(gateway): State<Arc<Gateway>>,
    Ns(namespace): Ns,
) -> ApiResult<Json<Vec<ExecutorInfo>>> {
    // Each namespace sees its own functions only, named as it names them.
    let own = |names: Vec<String>| -> Vec<String> {
        names
            .iter()
            .map(|name| keys::split(name))
            .filter(|(owner, _)| *owner == namespace)
            .map(|(_, name)| name.to_string())
            .collect()
    };
    let mut executors: Vec<ExecutorInfo> = gateway
        .client
        .status(Duration::from_secs(2))
        .await?
        .into_iter()
        // An executor that serves only other namespaces' functions is none of this one's.
        .filter(|s| s.serves.is_empty() || s.serves.iter().any(|n| keys::split(n).0 == namespace))
        .map(|s| ExecutorInfo {
            id: s.id,
            addr: s.addr,
            running: s.running,
            waiting: s.waiting,
            capacity: s.capacity,
            serves: own(s.serves),
            warm: own(s.warm),
            steps: s.steps,
            failures: s.failures,
            draining: s.draining,
        })
        .collect();
    executors.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(executors))
}

/// A function version.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FunctionInfo {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: u64,
    /// SHA-256 of its component, hex.
    pub sha256: String,
    /// Its component's size in bytes.
    pub size: u64,
    /// When it was registered (ms since the Unix epoch; 0 if not known).
    pub registered_ms: u64,
}

impl From<FunctionRecord> for FunctionInfo {
    fn from(r: FunctionRecord) -> Self {
        Self {
            name: r.name,
            version: r.version,
            sha256: r.sha256,
            size: r.size,
            registered_ms: r.registered_ms,
        }
    }
}

/// A function and its versions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FunctionDetail {
    /// Its name.
    pub name: String,
    /// Its versions since it was last deleted, oldest first.
    pub versions: Vec<FunctionInfo>,
}

/// Limits of a function's calls, set at registration.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RegisterParams {
    /// Deadline of one call, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Linear memory limit, in MiB.
    pub memory_mb: Option<u64>,
    /// Whether an instance may serve more than one call (default true).
    pub reuse: Option<bool>,
}

/// Checks a name given by a client (in a body), before it is qualified with a namespace.
fn checked_name(name: &str) -> ApiResult<()> {
    keys::validate_name(name).map_err(|e| ApiError::bad_request(e.to_string()))
}

#[utoipa::path(put, path = "/v1/functions/{name}", tag = "functions",
    params(("name" = String, Path, description = "Function name"), RegisterParams),
    request_body(content = Vec<u8>, content_type = "application/wasm", description = "The component"),
    responses((status = 201, body = FunctionInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn register_function(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
    Query(params): Query<RegisterParams>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<FunctionInfo>)> {
    let code = body?;
    if code.is_empty() {
        return Err(ApiError::bad_request(
            "the body must be the function's component",
        ));
    }
    // The namespace's quotas: how many functions, how much memory and time each may ask for
    // (asking for nothing gets the defaults, capped to them).
    let (namespace, plain) = keys::split(&name);
    let quotas = gateway.quotas.of(namespace).await?;
    // (The functions are counted only under a quota on their number, one registration of
    // the namespace at a time, until this one is in the store.)
    let turn = match quotas.max_functions {
        Some(_) => Some(gateway.quotas.registration_turn(namespace).await),
        None => None,
    };
    let live: Vec<String> = match quotas.max_functions {
        Some(_) => gateway
            .functions
            .list(namespace)
            .await?
            .into_iter()
            .map(|f| f.name)
            .collect(),
        None => Vec::new(),
    };
    let new_name = !live.iter().any(|n| n == plain);
    crate::quotas::check_registration(
        &quotas,
        live.len(),
        new_name,
        params.memory_mb,
        params.timeout_ms,
    )
    .map_err(|e| over_quota(namespace, e, StatusCode::FORBIDDEN))?;
    let defaults = squall_state::Limits::default();
    let limits = LimitsRequest {
        timeout_ms: params.timeout_ms.or(quotas
            .max_timeout_ms
            .map(|max| max.min(defaults.timeout_ms))),
        memory_bytes: params.memory_mb.or(quotas.max_memory_mb).map(|mb| {
            let asked = mb.saturating_mul(1 << 20);
            match params.memory_mb {
                Some(_) => asked,
                None => asked.min(defaults.memory_bytes),
            }
        }),
        reuse_instances: params.reuse,
    };
    // In a task of its own, holding the turn until the record is in the store even if the
    // client hangs up meanwhile.
    let registering = tokio::spawn(async move {
        let _turn = turn;
        register(&gateway, Artifact::Function, &name, code, limits).await
    });
    registering.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the registration's task failed: {e}"),
        )
    })?
}

/// Registers through an executor, then has the schedulers and executors re-read the record.
async fn register(
    gateway: &Gateway,
    kind: Artifact,
    name: &str,
    code: Bytes,
    limits: LimitsRequest,
) -> ApiResult<(StatusCode, Json<FunctionInfo>)> {
    let version = gateway
        .client
        .register(kind, name, code, limits, gateway.config.register_timeout)
        .await?;
    gateway.client.refresh(vec![record_key(kind, name)]);
    Ok((
        StatusCode::CREATED,
        Json(FunctionInfo {
            name: version.name,
            version: version.version,
            sha256: version.sha256,
            size: version.size,
            registered_ms: squall_lattices::Timestamp::now(0).time / 1000,
        }),
    ))
}

/// The newest version of every function (or model).
async fn list(
    gateway: &Gateway,
    kind: Artifact,
    namespace: &str,
) -> ApiResult<Json<Vec<FunctionInfo>>> {
    let list = gateway.registry(kind).list(namespace).await?;
    Ok(Json(list.into_iter().map(FunctionInfo::from).collect()))
}

/// A function's (or model's) versions.
async fn detail(
    gateway: &Gateway,
    kind: Artifact,
    name: String,
) -> ApiResult<Json<FunctionDetail>> {
    let registry = gateway.registry(kind);
    let versions = registry.versions(&name).await?;
    if versions.is_empty() {
        return Err(ApiError::not_found(format!(
            "{} {name:?} is not registered",
            keys::Kind::from(registry.kind()).noun()
        )));
    }
    Ok(Json(FunctionDetail {
        name: keys::split(&name).1.to_string(),
        versions: versions.into_iter().map(FunctionInfo::from).collect(),
    }))
}

/// Deletes a function (or model), then has the schedulers and executors re-read the record.
async fn delete(gateway: &Gateway, kind: Artifact, name: &str) -> ApiResult<StatusCode> {
    let registry = gateway.registry(kind);
    let existed = registry.delete(name).await?;
    gateway
        .client
        .refresh(vec![record_key(registry.kind(), name)]);
    deleted(existed, keys::Kind::from(registry.kind()).noun(), name)
}

#[utoipa::path(get, path = "/v1/functions", tag = "functions",
    responses((status = 200, body = Vec<FunctionInfo>)))]
async fn list_functions(
    State(gateway): State<Arc<Gateway>>,
    Ns(namespace): Ns,
) -> ApiResult<Json<Vec<FunctionInfo>>> {
    list(&gateway, Artifact::Function, &namespace).await
}

#[utoipa::path(get, path = "/v1/functions/{name}", tag = "functions",
    params(("name" = String, Path, description = "Function name")),
    responses((status = 200, body = FunctionDetail), (status = 404, body = ErrorBody)))]
async fn get_function(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
) -> ApiResult<Json<FunctionDetail>> {
    detail(&gateway, Artifact::Function, name).await
}

#[utoipa::path(delete, path = "/v1/functions/{name}", tag = "functions",
    params(("name" = String, Path, description = "Function name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_function(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
) -> ApiResult<StatusCode> {
    let answer = delete(&gateway, Artifact::Function, &name).await?;
    forget_settings_of(&gateway, Target::Function(name)).await?;
    Ok(answer)
}

/// What a deleted function or DAG leaves: its retry policy and concurrency limit are
/// deleted (they do not pass to the next one registered under its name), and the triggers
/// that call it are paused with the reason: they would only fill its dead letters (resuming
/// one after the target is registered again works).
async fn forget_settings_of(gateway: &Gateway, target: Target) -> ApiResult<()> {
    gateway.calls.forget(&target).await?;
    gateway.limits.set(target.clone(), None);
    let (kind, name) = crate::runner::kind_and_name(&target);
    let reason = format!("its {kind} {name:?} was deleted");
    let paused = gateway
        .triggers
        .in_namespace(keys::split(target.name()).0)
        .pause_calling(&target, &reason)
        .await?;
    if !paused.is_empty() {
        tracing::info!(?paused, "paused triggers: {reason}");
    }
    Ok(())
}

#[utoipa::path(put, path = "/v1/models/{name}", tag = "models",
    params(("name" = String, Path, description = "Model name, as functions load it (wasi:nn load-by-name)")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The ONNX file"),
    responses((status = 201, body = FunctionInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 413, body = ErrorBody)))]
async fn register_model(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<FunctionInfo>)> {
    let model = body?;
    if model.is_empty() {
        return Err(ApiError::bad_request("the body must be the ONNX file"));
    }
    register(
        &gateway,
        Artifact::Model,
        &name,
        model,
        LimitsRequest::default(),
    )
    .await
}

#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses((status = 200, body = Vec<FunctionInfo>)))]
async fn list_models(
    State(gateway): State<Arc<Gateway>>,
    Ns(namespace): Ns,
) -> ApiResult<Json<Vec<FunctionInfo>>> {
    list(&gateway, Artifact::Model, &namespace).await
}

#[utoipa::path(get, path = "/v1/models/{name}", tag = "models",
    params(("name" = String, Path, description = "Model name")),
    responses((status = 200, body = FunctionDetail), (status = 404, body = ErrorBody)))]
async fn get_model(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
) -> ApiResult<Json<FunctionDetail>> {
    detail(&gateway, Artifact::Model, name).await
}

#[utoipa::path(delete, path = "/v1/models/{name}", tag = "models",
    params(("name" = String, Path, description = "Model name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_model(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
) -> ApiResult<StatusCode> {
    delete(&gateway, Artifact::Model, &name).await
}

/// The answer to a DELETE: 204, or 404 if there was nothing to delete.
fn deleted(existed: bool, what: &str, name: &str) -> ApiResult<StatusCode> {
    if existed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "{what} {name:?} is not registered"
        )))
    }
}

/// How to invoke.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InvokeParams {
    /// Answer 202 with a result id at once; fetch the output from `/v1/results/{id}`.
    #[serde(rename = "async")]
    pub asynchronous: Option<bool>,
    /// The call's deadline in milliseconds.
    pub timeout_ms: Option<u64>,
}

/// The answer to an asynchronous invocation.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    /// The result's id.
    pub id: String,
    /// Where the result will be.
    pub result: String,
}

/// The header naming the consistency mode of a call: `lww` (the default), `repeatable-read`
/// or `causal`.
pub const CONSISTENCY_HEADER: &str = "squall-consistency";
/// The header listing store keys a call will read (comma-separated): for placement, and a
/// causal call pins them as one causal cut before its first step.
pub const KEYS_HEADER: &str = "squall-keys";
/// The header naming a causal call's client session: the session's calls read versions no
/// older than what its earlier calls read and wrote.
pub const SESSION_HEADER: &str = "squall-session";
/// The longest session id accepted.
pub const MAX_SESSION_ID: usize = 256;
/// The response header telling where each step ran: `function@executor,...`.
pub const PLACEMENT_HEADER: &str = "squall-placement";
/// The header naming an invocation's activation record (`GET /v1/activations/{id}`).
pub const ACTIVATION_HEADER: &str = "squall-activation";
/// The header making an invocation idempotent: while the first call's record is kept, a
/// repeat with the same key (same function or DAG) answers the first call's id or outcome
/// without running it again.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// The header marking an answer that repeats an earlier call's (`true`).
pub const REPLAY_HEADER: &str = "squall-idempotent-replay";

#[utoipa::path(post, path = "/v1/functions/{name}/invoke", tag = "calls",
    params(("name" = String, Path, description = "Function name"), InvokeParams,
        ("squall-consistency" = Option<String>, Header, description = "Consistency mode: lww (default), repeatable-read or causal"),
        ("squall-keys" = Option<String>, Header, description = "Store keys the call reads, comma-separated (causal: pinned as one cut before the first step)"),
        ("squall-session" = Option<String>, Header, description = "Causal: the client session the call belongs to")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "The function's output", content_type = "application/octet-stream"),
        (status = 202, body = Accepted), (status = 404, body = ErrorBody), (status = 500, body = ErrorBody),
        (status = 503, body = ErrorBody), (status = 504, body = ErrorBody)))]
async fn invoke_function(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
    Query(params): Query<InvokeParams>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    invoke_owned(gateway, Target::Function(name), params, headers, body?).await
}

#[utoipa::path(post, path = "/v1/dags/{name}/invoke", tag = "calls",
    params(("name" = String, Path, description = "DAG name"), InvokeParams,
        ("squall-consistency" = Option<String>, Header, description = "Consistency mode: lww (default), repeatable-read or causal"),
        ("squall-keys" = Option<String>, Header, description = "Store keys the call reads, comma-separated (causal: pinned as one cut before the first step)"),
        ("squall-session" = Option<String>, Header, description = "Causal: the client session the call belongs to")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "The sink's output", content_type = "application/octet-stream"),
        (status = 202, body = Accepted), (status = 404, body = ErrorBody), (status = 500, body = ErrorBody),
        (status = 503, body = ErrorBody), (status = 504, body = ErrorBody)))]
async fn invoke_dag(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
    Query(params): Query<InvokeParams>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    invoke_owned(gateway, Target::Dag(name), params, headers, body?).await
}

/// [`invoke`] in a task of its own: a client that hangs up (which drops the request's
/// future) leaves the call running to its end, holding its slots under the namespace's
/// quota and the target's limit until then, so hanging up cannot free a slot whose call
/// still runs.
async fn invoke_owned(
    gateway: Arc<Gateway>,
    target: Target,
    params: InvokeParams,
    headers: HeaderMap,
    input: Bytes,
) -> ApiResult<Response> {
    let task = tokio::spawn(async move { invoke(&gateway, target, params, &headers, input).await });
    task.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the call failed: {e}"),
        )
    })?
}

async fn invoke(
    gateway: &Gateway,
    target: Target,
    params: InvokeParams,
    headers: &HeaderMap,
    input: Bytes,
) -> ApiResult<Response> {
    let start_us = Timestamp::now(0).time;
    let id = ActivationId::new(start_us);
    let (kind, name) = crate::runner::kind_and_name(&target);
    let (kind, name) = (kind.to_string(), name.to_string());
    let input_bytes = input.len() as u64;
    let asynchronous = params.asynchronous.unwrap_or(false);
    match run_invocation(gateway, target, params, headers, input, &id, start_us).await {
        Ok(response) => Ok(response),
        // Refused before it ran (a bad header, the store unavailable for an asynchronous
        // call's acceptance): answered with an id and a record all the same.
        Err(refused) => {
            if gateway.config.record_activations {
                let took = Duration::from_micros(Timestamp::now(0).time.saturating_sub(start_us));
                let mut record = Activation {
                    id: id.to_string(),
                    kind,
                    name,
                    cause: if asynchronous { "http-async" } else { "http" }.into(),
                    status: Status::Failed,
                    start_ms: start_us / 1000,
                    end_ms: Some(start_us / 1000 + took.as_millis() as u64),
                    duration_us: Some(took.as_micros() as u64),
                    placement: Vec::new(),
                    input_bytes,
                    output_bytes: None,
                    error: Some(refused.recorded()),
                    attempt: 1,
                    attempts: Vec::new(),
                    idempotency_key: None,
                    steps: Vec::new(),
                    chain: 0,
                };
                record.idempotency_key = headers
                    .get(IDEMPOTENCY_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .filter(|k| !k.is_empty() && check_idempotency_key(k).is_ok())
                    .map(str::to_string);
                gateway.recorder().record(record);
            }
            let mut response = refused.into_response();
            with_activation(&mut response, &id);
            Ok(response)
        }
    }
}

/// The body of [`invoke`] for the call `id`, started at `start_us`: its errors are the
/// refusals [`invoke`] records.
async fn run_invocation(
    gateway: &Gateway,
    target: Target,
    params: InvokeParams,
    headers: &HeaderMap,
    input: Bytes,
    id: &ActivationId,
    start_us: u64,
) -> ApiResult<Response> {
    let text = |name: &str| -> ApiResult<Option<String>> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map(|s| s.trim().to_string())
                    .map_err(|_| ApiError::bad_request(format!("header {name} is not text")))
            })
            .transpose()
    };
    // Everything the call touches is in its target's namespace.
    let namespace = keys::split(target.name()).0.to_string();
    let calls = gateway.calls.of(&target);
    let consistency = match text(CONSISTENCY_HEADER)? {
        None => Consistency::default(),
        Some(name) => name.parse().map_err(ApiError::bad_request)?,
    };
    let keys: Vec<String> = text(KEYS_HEADER)?
        .map(|k| {
            k.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if keys.len() > MAX_DECLARED_KEYS {
        return Err(ApiError::bad_request(format!(
            "header {KEYS_HEADER} names {} keys (at most {MAX_DECLARED_KEYS})",
            keys.len()
        )));
    }
    // The keys as the call's functions will name them: mapped into its namespace.
    let keys = keys
        .iter()
        .map(|key| {
            writable_key(key)?;
            Ok(keys::user(&namespace, key))
        })
        .collect::<ApiResult<Vec<String>>>()?;
    let session = text(SESSION_HEADER)?.filter(|s| !s.is_empty());
    // Sessions are a namespace's own: the scheduler keeps them by this name, so that no
    // tenant reads from (or raises) another's causal floors by naming its session.
    let session_key = session.as_ref().map(|s| format!("{namespace}/{s}"));
    if let Some(session) = &session {
        if session.len() > MAX_SESSION_ID {
            return Err(ApiError::bad_request(format!(
                "header {SESSION_HEADER} is longer than {MAX_SESSION_ID} bytes"
            )));
        }
        if consistency != Consistency::Causal {
            return Err(ApiError::bad_request(format!(
                "header {SESSION_HEADER} needs {CONSISTENCY_HEADER}: causal (sessions are causal)"
            )));
        }
    }
    // The namespace's quotas: the deadline asked for here; its rate and calls in flight
    // below, once the call is known to run.
    let quotas = gateway.quotas.of(&namespace).await?;
    crate::quotas::check_timeout(&quotas, params.timeout_ms)
        .map_err(|e| over_quota(&namespace, e, StatusCode::FORBIDDEN))?;
    let timeout = params
        .timeout_ms
        .map_or(gateway.config.default_timeout, Duration::from_millis);
    let timeout = quotas
        .max_timeout_ms
        .map_or(timeout, |max| timeout.min(Duration::from_millis(max)));
    let options = InvokeOptions {
        consistency,
        timeout_ms: Some(timeout.as_millis().try_into().unwrap_or(u64::MAX)),
        keys,
        result_key: None,
        session: session_key,
        report: gateway.config.record_activations,
        attempt: 1,
        chain: 0,
        depth: 0,
    };
    let idempotency_key = text(IDEMPOTENCY_HEADER)?.filter(|k| !k.is_empty());
    if let Some(key) = &idempotency_key {
        check_idempotency_key(key).map_err(ApiError::bad_request)?;
        if let Some(prior) = calls.idempotent(&target, key).await? {
            // A key whose call left no result (its acceptance failed midway) is stale.
            if calls.result_exists(&prior).await? {
                return replay(
                    gateway,
                    &namespace,
                    &prior,
                    params.asynchronous.unwrap_or(false),
                    timeout,
                )
                .await;
            }
        }
    }
    let kind = match &target {
        Target::Function(_) => "function",
        Target::Dag(_) => "dag",
    };
    let name = target.name().to_string();
    let result_key = keys::result(&namespace, id.as_str());
    let mut record = Activation {
        id: id.to_string(),
        kind: kind.to_string(),
        name: name.clone(),
        cause: "http".into(),
        status: Status::Running,
        start_ms: start_us / 1000,
        end_ms: None,
        duration_us: None,
        placement: Vec::new(),
        input_bytes: input.len() as u64,
        output_bytes: None,
        error: None,
        attempt: 1,
        attempts: Vec::new(),
        idempotency_key: idempotency_key.clone(),
        steps: Vec::new(),
        chain: 0,
    };
    // What is written before the call runs, in one round trip: an asynchronous call itself,
    // and, under an idempotency key, the key's claim and a running result for repeats to
    // wait on.
    let mut writes = Vec::new();
    if let Some(key) = &idempotency_key {
        // Kept while the record and the result are.
        let retention = gateway.config.activation_retention;
        writes.push(calls.idempotency_write(&target, key, id.as_str(), retention));
    }
    if params.asynchronous.unwrap_or(false) {
        let mut call = PendingCall::new(
            id.to_string(),
            target.clone(),
            input,
            options,
            "http-async",
            now_ms(),
        );
        call.idempotency_key = idempotency_key;
        if let Err(exceeded) = gateway.quotas.admit(&namespace, false).await? {
            gateway.metrics.throttled(kind, &name);
            return Err(over_quota(
                &namespace,
                exceeded,
                StatusCode::TOO_MANY_REQUESTS,
            ));
        }
        // The 202 promises the call is in the store.
        gateway
            .runner()
            .accept(call, writes)
            .await
            .map_err(|e| Failure::new(FailureCode::Unavailable, e.to_string()))?;
        gateway.metrics.accepted(kind, &name);
        return Ok(accepted(&namespace, &id.to_string()));
    }
    // The target's limit first, then the namespace's quota: a call refused by the limit
    // spends none of the namespace's rate (a slot taken under the limit goes back if the
    // quota refuses).
    let admitted = match gateway.limits.try_acquire(&target) {
        Ok(slot) => match gateway.quotas.admit(&namespace, true).await? {
            Ok(in_flight) => Ok((in_flight, slot)),
            Err(exceeded) => Err(over_quota(
                &namespace,
                exceeded,
                StatusCode::TOO_MANY_REQUESTS,
            )),
        },
        Err(max) => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            format!(
                "{kind} {:?} runs at most {max} calls at once through this gateway",
                keys::split(&name).1
            ),
        )),
    };
    let _slots = match admitted {
        Ok(slots) => slots,
        Err(refused) => {
            gateway.metrics.throttled(kind, &name);
            if gateway.config.record_activations {
                record.status = Status::Failed;
                record.end_ms = Some(now_ms());
                record.duration_us = Some(Timestamp::now(0).time.saturating_sub(start_us).max(1));
                record.error = Some(refused.recorded());
                gateway.recorder().record(record);
            }
            // 429s carry `Retry-After` (see `ApiError::into_response`).
            let mut response = refused.into_response();
            with_activation(&mut response, id);
            return Ok(response);
        }
    };
    let idempotency_keys: Vec<String> = writes.iter().map(|(key, _)| key.clone()).collect();
    if !writes.is_empty() {
        writes.push(calls.result_write(id.as_str(), &CallResult::Running, 1)?);
        if let Err(e) = calls.write_all(writes).await {
            // Some may have landed: let the key go, so that a repeat runs the call.
            let mut keys = idempotency_keys.clone();
            keys.push(result_key.clone());
            if let Err(cleanup) = calls.delete(keys).await {
                tracing::warn!(id = %id, cause = %cleanup, "letting an idempotency key go");
            }
            return Err(Failure::new(FailureCode::Unavailable, e.to_string()).into());
        }
    }
    let stores_result = record.idempotency_key.is_some();
    let started = Instant::now();
    // The scheduler answers by the deadline; the margin covers its report.
    let wait = timeout + Duration::from_secs(2);
    let (outcome, steps) = gateway
        .client
        .invoke_reported(target, input, options, wait)
        .await;
    let took = started.elapsed();
    record.steps = steps;
    gateway
        .metrics
        .observe(kind, &name, took, outcome.as_ref().err().map(|f| f.code));
    record.end_ms = Some(record.start_ms + took.as_millis() as u64);
    record.duration_us = Some(took.as_micros() as u64);
    if stores_result {
        match &outcome {
            // The call never ran: the key is let go, so that a repeat runs it.
            Err(failure)
                if matches!(
                    failure.code,
                    FailureCode::NoCapacity | FailureCode::Unavailable
                ) =>
            {
                let mut keys = idempotency_keys;
                keys.push(result_key.clone());
                if let Err(e) = calls.delete(keys).await {
                    tracing::warn!(id = %id, cause = %e, "letting an idempotency key go");
                }
            }
            // Repeats under the idempotency key answer from here.
            done => {
                let result = match done {
                    Ok(invocation) => {
                        CallResult::Succeeded(invocation.output.clone().unwrap_or_default())
                    }
                    Err(failure) => CallResult::Failed(failure.clone()),
                };
                // Kept as long as the idempotency key's claim and the record.
                let stored = match calls.result_write(id.as_str(), &result, 1) {
                    Ok(write) => calls.write_all(vec![write]).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = stored {
                    tracing::warn!(id = %id, cause = %e, "storing an idempotent call's result");
                }
            }
        }
    }
    let mut response = match outcome {
        Ok(invocation) => {
            record.status = Status::Succeeded;
            record.output_bytes = invocation.output.as_ref().map(|o| o.len() as u64);
            record.placement = invocation.placement.clone();
            let placement: Vec<String> = invocation
                .placement
                .iter()
                .map(|(function, executor)| format!("{function}@{executor}"))
                .collect();
            let mut response = invocation.output.unwrap_or_default().into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            if let Ok(value) = HeaderValue::from_str(&placement.join(",")) {
                headers.insert(PLACEMENT_HEADER, value);
            }
            response
        }
        Err(failure) => {
            record.status = Status::Failed;
            record.error = Some((&failure).into());
            ApiError::from(failure).into_response()
        }
    };
    with_activation(&mut response, id);
    if gateway.config.record_activations {
        // Off the answer's path, batched: a record that cannot be written is logged and
        // counted, the answer stands.
        gateway.recorder().record(record);
    }
    Ok(response)
}

/// The refusal of a call or registration over `namespace`'s quota, naming it.
fn over_quota(namespace: &str, exceeded: crate::quotas::Exceeded, status: StatusCode) -> ApiError {
    ApiError::new(
        status,
        "quota_exceeded",
        format!(
            "namespace {namespace:?} is over its quota {} ({})",
            exceeded.quota, exceeded.limit
        ),
    )
}

/// The 202 answer naming asynchronous call `id`.
fn accepted(namespace: &str, id: &str) -> Response {
    let mut response = (
        StatusCode::ACCEPTED,
        Json(Accepted {
            id: id.to_string(),
            result: if namespace == keys::DEFAULT_NAMESPACE {
                format!("/v1/results/{id}")
            } else {
                format!("{}{namespace}/results/{id}", crate::namespace::PREFIX)
            },
        }),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert(ACTIVATION_HEADER, value);
    }
    response
}

/// The answer to a repeat of a call made under the same idempotency key: the first call's
/// id (asynchronous), or its outcome once it has one (synchronous; 409 if it has none by
/// the deadline). The function does not run again.
async fn replay(
    gateway: &Gateway,
    namespace: &str,
    prior: &str,
    asynchronous: bool,
    timeout: Duration,
) -> ApiResult<Response> {
    let mut response = if asynchronous {
        accepted(namespace, prior)
    } else {
        let key = keys::result(namespace, prior);
        let kvs = gateway.kvs.clone();
        let finished = Poll::within(timeout)
            .every(Duration::from_millis(20))
            .until_async(|| {
                let kvs = kvs.clone();
                let key = key.clone();
                async move {
                    match kvs.with(move |c| c.get(&key)).await {
                        Ok(Some(LatticeValue::Lww(register))) => {
                            match CallResult::decode(&register.value) {
                                Ok(CallResult::Running) | Err(_) => None,
                                Ok(done) => Some(done),
                            }
                        }
                        _ => None,
                    }
                }
            })
            .await;
        match finished {
            Ok(CallResult::Succeeded(output)) => {
                ([(header::CONTENT_TYPE, "application/octet-stream")], output).into_response()
            }
            Ok(CallResult::Failed(failure)) => ApiError::from(failure).into_response(),
            Ok(CallResult::Running) | Err(_) => ApiError::new(
                StatusCode::CONFLICT,
                "in_progress",
                format!("the call made with this idempotency key ({prior}) has not finished"),
            )
            .into_response(),
        }
    };
    if let Ok(value) = HeaderValue::from_str(prior) {
        response.headers_mut().insert(ACTIVATION_HEADER, value);
    }
    response
        .headers_mut()
        .insert(REPLAY_HEADER, HeaderValue::from_static("true"));
    Ok(response)
}

/// Adds the `squall-activation` header naming the call's record.
fn with_activation(response: &mut Response, id: &ActivationId) {
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert(ACTIVATION_HEADER, value);
    }
}

/// Which activation records `GET /v1/activations` lists.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ActivationParams {
    /// Only calls of this function.
    pub function: Option<String>,
    /// Only runs of this DAG.
    pub dag: Option<String>,
    /// Only calls in this status: `running`, `succeeded` or `failed`.
    pub status: Option<String>,
    /// Only calls started at or after this time (ms since the Unix epoch).
    pub since: Option<u64>,
    /// The most records answered (1 to 200, default 50).
    pub limit: Option<u32>,
    /// Resume after this id: the `next` of the previous page.
    pub after: Option<String>,
    /// Whether the records keep their steps' log lines (left out unless `true`, since they
    /// make pages large; `GET /v1/activations/{id}` and its `/logs` always have them).
    pub logs: Option<bool>,
}

/// A page of activation records, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActivationPage {
    /// The records.
    #[schema(value_type = Vec<Object>)]
    pub activations: Vec<Activation>,
    /// Where the next page starts (pass it as `after`); absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Records looked at per listing, whatever the filter: a filter that matches little answers
/// a short page with `next` rather than reading every record.
const ACTIVATION_SCAN: u32 = 2_000;

#[utoipa::path(get, path = "/v1/activations", tag = "activations", params(ActivationParams),
    responses((status = 200, body = ActivationPage), (status = 400, body = ErrorBody)))]
async fn list_activations(
    State(gateway): State<Arc<Gateway>>,
    namespace: Ns,
    Query(params): Query<ActivationParams>,
) -> ApiResult<Json<ActivationPage>> {
    let limit = params.limit.unwrap_or(50);
    if !(1..=squall_state::activations::MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit is between 1 and {}",
            squall_state::activations::MAX_PAGE
        )));
    }
    let after = params
        .after
        .as_deref()
        .map(|a| {
            ActivationId::parse(a)
                .ok_or_else(|| ApiError::bad_request(format!("{a:?} is not an activation id")))
        })
        .transpose()?;
    let status = params
        .status
        .as_deref()
        .map(|s| s.parse::<Status>().map_err(ApiError::bad_request))
        .transpose()?;
    if params.function.is_some() && params.dag.is_some() {
        return Err(ApiError::bad_request(
            "a record is of a function or of a DAG: give function= or dag=, not both",
        ));
    }
    let filter = Filter {
        function: params.function.map(|f| namespace.qualify(&f)).transpose()?,
        dag: params.dag.map(|d| namespace.qualify(&d)).transpose()?,
        status,
        since_ms: params.since,
    };
    let (activations, next) = gateway
        .activations
        .in_namespace(&namespace.0)
        .list(&filter, after.as_ref(), limit, ACTIVATION_SCAN)
        .await?;
    let mut activations: Vec<Activation> = activations.into_iter().map(shown).collect();
    if params.logs != Some(true) {
        for step in activations.iter_mut().flat_map(|a| a.steps.iter_mut()) {
            step.logs = Vec::new();
        }
    }
    Ok(Json(ActivationPage { activations, next }))
}

/// One line of a call's logs, as `GET /v1/activations/{id}/logs` answers it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LogEntry {
    /// When it was logged (ms since the Unix epoch).
    pub ms: u64,
    /// The index of the step (in the DAG's plan) whose run logged it.
    pub step: u16,
    /// The function that logged it (a step's nested calls log under their own names).
    pub function: String,
    /// `stdout`, `stderr`, or the level of a `log` call (`trace` to `error`).
    pub stream: String,
    /// The line.
    pub text: String,
}

/// A call's log lines, in the order its steps ran.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ActivationLogs {
    /// The activation.
    pub id: String,
    /// Where the call is in its life (`running` records may gain lines).
    pub status: String,
    /// The lines, by step in start order, each step's oldest first.
    pub logs: Vec<LogEntry>,
    /// Lines (or parts of lines) left out because a step's bounds were reached.
    pub dropped: u64,
}

#[utoipa::path(get, path = "/v1/activations/{id}/logs", tag = "activations",
    params(("id" = String, Path, description = "The activation id (the squall-activation header)")),
    responses((status = 200, body = ActivationLogs), (status = 404, body = ErrorBody)))]
async fn activation_logs(
    State(gateway): State<Arc<Gateway>>,
    Ns(namespace): Ns,
    Path(id): Path<String>,
) -> ApiResult<Json<ActivationLogs>> {
    Ok(Json(logs_of(
        activation_named(&gateway, &namespace, &id).await?,
    )))
}

/// A record as its namespace sees it: names without the namespace ([`keys::split`]).
fn shown(mut record: Activation) -> Activation {
    let plain = |name: &mut String| {
        let (_, bare) = keys::split(name);
        *name = bare.to_string();
    };
    plain(&mut record.name);
    for (function, _) in &mut record.placement {
        plain(function);
    }
    for step in &mut record.steps {
        plain(&mut step.function);
        for line in &mut step.logs {
            plain(&mut line.function);
        }
    }
    record
}

/// A record's log lines, by step in start order.
fn logs_of(record: Activation) -> ActivationLogs {
    let mut steps = record.steps;
    steps.sort_by_key(|s| (s.start_us, s.step));
    let dropped = steps.iter().map(|s| u64::from(s.logs_dropped)).sum();
    let logs = steps
        .into_iter()
        .flat_map(|step| {
            let index = step.step;
            step.logs.into_iter().map(move |line| LogEntry {
                ms: line.ms,
                step: index,
                function: line.function,
                stream: line.stream,
                text: line.text,
            })
        })
        .collect();
    ActivationLogs {
        id: record.id,
        status: record.status.as_str().to_string(),
        logs,
        dropped,
    }
}

#[utoipa::path(get, path = "/v1/activations/{id}", tag = "activations",
    params(("id" = String, Path, description = "The activation id (the squall-activation header)")),
    responses((status = 200, description = "The record"), (status = 404, body = ErrorBody)))]
async fn get_activation(
    State(gateway): State<Arc<Gateway>>,
    Ns(namespace): Ns,
    Path(id): Path<String>,
) -> ApiResult<Json<Activation>> {
    Ok(Json(activation_named(&gateway, &namespace, &id).await?))
}

/// The record `id` of `namespace` as the namespace sees it, or 404.
async fn activation_named(gateway: &Gateway, namespace: &str, id: &str) -> ApiResult<Activation> {
    let not_found = || ApiError::not_found(format!("no activation {id:?}"));
    let parsed = ActivationId::parse(id).ok_or_else(not_found)?;
    gateway
        .activations
        .in_namespace(namespace)
        .get(&parsed)
        .await?
        .map(shown)
        .ok_or_else(not_found)
}

/// A DAG, as registered.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DagInfo {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: u64,
    /// Its functions.
    pub functions: Vec<String>,
    /// Its edges, `[from, to]`.
    #[schema(value_type = Vec<Vec<String>>)]
    pub edges: Vec<(String, String)>,
    /// When it was registered (ms since the Unix epoch).
    pub registered_ms: u64,
}

impl From<DagRecord> for DagInfo {
    fn from(r: DagRecord) -> Self {
        Self {
            name: r.name,
            version: r.version,
            functions: r.spec.functions,
            edges: r.spec.edges,
            registered_ms: r.registered_ms,
        }
    }
}

#[utoipa::path(put, path = "/v1/dags/{name}", tag = "dags",
    params(("name" = String, Path, description = "DAG name")),
    request_body(content = DagSpec, content_type = "application/json"),
    responses((status = 201, body = DagInfo), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn put_dag(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<DagInfo>)> {
    let spec: DagSpec = serde_json::from_slice(&body?).map_err(|e| {
        ApiError::bad_request(format!(
            "the body must be a DAG, {{\"functions\":[...],\"edges\":[[from,to],...]}}: {e}"
        ))
    })?;
    let record = gateway.dags.store(&name, spec).await?;
    gateway.client.refresh(vec![dag_key(&name)]);
    Ok((StatusCode::CREATED, Json(record.into())))
}

#[utoipa::path(get, path = "/v1/dags", tag = "dags", responses((status = 200, body = Vec<DagInfo>)))]
async fn list_dags(
    State(gateway): State<Arc<Gateway>>,
    Ns(namespace): Ns,
) -> ApiResult<Json<Vec<DagInfo>>> {
    let list = gateway.dags.list(&namespace).await?;
    Ok(Json(list.into_iter().map(DagInfo::from).collect()))
}

#[utoipa::path(get, path = "/v1/dags/{name}", tag = "dags",
    params(("name" = String, Path, description = "DAG name")),
    responses((status = 200, body = DagInfo), (status = 404, body = ErrorBody)))]
async fn get_dag(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
) -> ApiResult<Json<DagInfo>> {
    match gateway.dags.get(&name).await? {
        Some(record) => Ok(Json(record.into())),
        None => Err(ApiError::not_found(format!(
            "DAG {name:?} is not registered"
        ))),
    }
}

#[utoipa::path(delete, path = "/v1/dags/{name}", tag = "dags",
    params(("name" = String, Path, description = "DAG name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_dag(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
) -> ApiResult<StatusCode> {
    let existed = gateway.dags.delete(&name).await?;
    gateway.client.refresh(vec![dag_key(&name)]);
    let answer = deleted(existed, "DAG", &name)?;
    forget_settings_of(&gateway, Target::Dag(name)).await?;
    Ok(answer)
}

/// A result that is not ready.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Running {
    /// `running`.
    pub status: String,
}

#[utoipa::path(get, path = "/v1/results/{id}", tag = "calls",
    params(("id" = String, Path, description = "The id an asynchronous invocation returned")),
    responses((status = 200, description = "The output", content_type = "application/octet-stream"),
        (status = 202, body = Running), (status = 404, body = ErrorBody), (status = 500, body = ErrorBody)))]
async fn get_result(
    State(gateway): State<Arc<Gateway>>,
    Ns(namespace): Ns,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(ApiError::not_found(format!("no result {id:?}")));
    }
    let key = keys::result(&namespace, &id);
    let value = gateway.kvs.with(move |c| c.get(&key)).await?;
    let Some(LatticeValue::Lww(register)) = value else {
        return Err(ApiError::not_found(format!("no result {id:?}")));
    };
    let result = CallResult::decode(&register.value)
        .map_err(|e| Failure::new(FailureCode::Internal, format!("result record: {e}")))?;
    match result {
        CallResult::Running => Ok((
            StatusCode::ACCEPTED,
            Json(Running {
                status: "running".into(),
            }),
        )
            .into_response()),
        CallResult::Succeeded(output) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], output).into_response())
        }
        CallResult::Failed(failure) => Err(failure.into()),
    }
}

/// The lattice type of a key written over HTTP.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KvParams {
    /// `lww` (default: the body is the value), `set` (adds the body as an element), `max` or
    /// `min` (the body is an integer).
    #[serde(rename = "type")]
    pub lattice: Option<String>,
    /// Seconds until the key expires (fractions allowed); it then reads as absent and leaves
    /// the store. A new `lww` value without it never expires.
    pub ttl: Option<f64>,
}

/// Which keys `GET /v1/kv` lists.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// The keys' common start (default: every key outside Squall's own).
    #[serde(default)]
    pub prefix: String,
    /// List the keys after this one: the `next` of the previous page.
    pub after: Option<String>,
    /// The most keys answered (1 to 1000, default 100).
    pub limit: Option<u32>,
}

/// A page of keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    /// The keys, in order.
    pub keys: Vec<String>,
    /// Where the next page starts (pass it as `after`); absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Refuses writes to Squall's own keys.
fn writable_key(key: &str) -> ApiResult<()> {
    checked_key(key)?;
    if keys::is_reserved(key) {
        return Err(ApiError::bad_request(format!(
            "keys under {} belong to Squall",
            keys::RESERVED_PREFIX
        )));
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/kv", tag = "kv", params(ListParams),
    responses((status = 200, body = KeyList), (status = 400, body = ErrorBody)))]
async fn list_kv(
    State(gateway): State<Arc<Gateway>>,
    Ns(namespace): Ns,
    Query(params): Query<ListParams>,
) -> ApiResult<Json<KeyList>> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit is between 1 and 1000"));
    }
    if params.prefix.len() > keys::MAX_KEY_BYTES {
        return Err(ApiError::bad_request("the prefix is longer than any key"));
    }
    if keys::is_reserved(&params.prefix) {
        return Err(ApiError::bad_request(format!(
            "keys under {} belong to Squall; list them with squall fn ls, dag ls, model ls",
            keys::RESERVED_PREFIX
        )));
    }
    // The namespace's keys only: its prefix mapped, the keys listed unmapped.
    let prefix = keys::user(&namespace, &params.prefix);
    let after = params.after.as_deref().map(|a| keys::user(&namespace, a));
    let (listed, next) = gateway
        .kvs
        .with(move |c| c.list(&prefix, after.as_deref(), limit))
        .await?;
    let tenant = |stored: String| {
        keys::tenant_key(&stored)
            .filter(|(owner, _)| *owner == namespace)
            .map(|(_, key)| key.to_string())
    };
    let keys = listed.into_iter().filter_map(tenant).collect();
    Ok(Json(KeyList {
        keys,
        next: next.and_then(tenant),
    }))
}

#[utoipa::path(delete, path = "/v1/kv/{key}", tag = "kv",
    params(("key" = String, Path, description = "The key (may contain '/')")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn delete_kv(
    State(gateway): State<Arc<Gateway>>,
    Ns(namespace): Ns,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    writable_key(&key)?;
    let key = keys::user(&namespace, &key);
    gateway.kvs.with(move |c| c.delete(&key)).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn checked_key(key: &str) -> ApiResult<()> {
    if key.is_empty() || key.len() > keys::MAX_KEY_BYTES {
        return Err(ApiError::bad_request(format!(
            "a key has 1 to {} bytes",
            keys::MAX_KEY_BYTES
        )));
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/kv/{key}", tag = "kv",
    params(("key" = String, Path, description = "The key (may contain '/')")),
    responses((status = 200, description = "lww: the bytes; set: a JSON array of strings; max/min: the number"),
        (status = 404, body = ErrorBody)))]
async fn get_kv(
    State(gateway): State<Arc<Gateway>>,
    Ns(namespace): Ns,
    Path(key): Path<String>,
) -> ApiResult<Response> {
    // Squall's own keys (results, records, registries) are read through their endpoints.
    writable_key(&key)?;
    let owned = keys::user(&namespace, &key);
    let value = gateway.kvs.with(move |c| c.get(&owned)).await?;
    let Some(value) = value else {
        return Err(ApiError::not_found(format!("key {key:?} does not exist")));
    };
    let kind = value.lattice_type().name();
    let mut response = match value {
        LatticeValue::Lww(register) => register.value.into_response(),
        LatticeValue::Set(set) => Json(
            set.0
                .iter()
                .map(|e| String::from_utf8_lossy(e).into_owned())
                .collect::<Vec<_>>(),
        )
        .into_response(),
        LatticeValue::Max(Max(n)) | LatticeValue::Min(Min(n)) => n.to_string().into_response(),
        LatticeValue::Counter(counter) => counter.value().to_string().into_response(),
        _ => {
            return Err(ApiError::bad_request(format!(
                "key {key:?} holds a {kind} value; read it with `squall kv get`"
            )))
        }
    };
    if let Ok(kind) = HeaderValue::from_str(kind) {
        response.headers_mut().insert("squall-lattice", kind);
    }
    Ok(response)
}

#[utoipa::path(put, path = "/v1/kv/{key}", tag = "kv",
    params(("key" = String, Path, description = "The key (may contain '/')"), KvParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn put_kv(
    State(gateway): State<Arc<Gateway>>,
    Ns(namespace): Ns,
    Path(key): Path<String>,
    Query(params): Query<KvParams>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    writable_key(&key)?;
    gateway
        .stored_bytes
        .check(&namespace)
        .await
        .map_err(|over| ApiError::new(StatusCode::FORBIDDEN, "quota_exceeded", over.to_string()))?;
    let key = keys::user(&namespace, &key);
    let ttl = params
        .ttl
        .map(|seconds| {
            Duration::try_from_secs_f64(seconds)
                .ok()
                .filter(|d| !d.is_zero() && *d <= Duration::from_secs(10 * 365 * 86_400))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "ttl is a number of seconds, above 0 and at most ten years",
                    )
                })
        })
        .transpose()?;
    let body = body?;
    let integer = || -> ApiResult<i64> {
        std::str::from_utf8(&body)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| ApiError::bad_request("the body must be an integer"))
    };
    let value = match params.lattice.as_deref().unwrap_or("lww") {
        "lww" => LatticeValue::Lww(Lww::new(Timestamp::now(gateway.writer), body.clone())),
        "set" => LatticeValue::Set(SetLattice::from_iter([body.clone()])),
        "max" => LatticeValue::Max(Max(integer()?)),
        "min" => LatticeValue::Min(Min(integer()?)),
        other => {
            return Err(ApiError::bad_request(format!(
                "type {other:?} is not written over HTTP (lww, set, max, min); use `squall kv put`"
            )))
        }
    };
    match ttl {
        Some(ttl) => {
            gateway
                .kvs
                .with(move |c| c.put_expiring(&key, value, Some(ttl)))
                .await?
        }
        None => gateway.kvs.with(move |c| c.put(&key, value)).await?,
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The function or DAG a path names: `function` or `dag`, and a name, checked and qualified
/// with the request's namespace.
fn target_of(namespace: &Ns, kind: &str, name: String) -> ApiResult<Target> {
    let name = namespace.qualify(&name)?;
    match kind {
        "function" => Ok(Target::Function(name)),
        "dag" => Ok(Target::Dag(name)),
        other => Err(ApiError::not_found(format!(
            "no kind {other:?} of dead letters (function or dag)"
        ))),
    }
}

/// Fails with 404 unless `target` is registered.
async fn registered(gateway: &Gateway, target: &Target) -> ApiResult<()> {
    let exists = match target {
        Target::Function(name) => gateway
            .functions
            .newest(name)
            .await?
            .is_some_and(|r| !r.deleted),
        Target::Dag(name) => gateway.dags.get(name).await?.is_some_and(|r| !r.deleted),
    };
    if exists {
        Ok(())
    } else {
        let (kind, name) = crate::runner::kind_and_name(target);
        Err(ApiError::not_found(format!(
            "{kind} {name:?} is not registered"
        )))
    }
}

async fn get_retries(gateway: &Gateway, target: Target) -> ApiResult<Json<RetryPolicy>> {
    registered(gateway, &target).await?;
    Ok(Json(gateway.calls.policy(&target).await?))
}

async fn put_retries(
    gateway: &Gateway,
    target: Target,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<RetryPolicy>> {
    let body = body?;
    let policy: RetryPolicy = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("not a retry policy: {e}")))?;
    policy.check().map_err(ApiError::bad_request)?;
    registered(gateway, &target).await?;
    gateway.calls.set_policy(&target, &policy).await?;
    Ok(Json(policy))
}

#[utoipa::path(get, path = "/v1/functions/{name}/retries", tag = "calls",
    params(("name" = String, Path, description = "Function name")),
    responses((status = 200, body = RetryPolicy), (status = 404, body = ErrorBody)))]
async fn get_function_retries(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
) -> ApiResult<Json<RetryPolicy>> {
    get_retries(&gateway, Target::Function(name)).await
}

#[utoipa::path(put, path = "/v1/functions/{name}/retries", tag = "calls",
    params(("name" = String, Path, description = "Function name")),
    request_body = RetryPolicy,
    responses((status = 200, body = RetryPolicy), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn put_function_retries(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<RetryPolicy>> {
    put_retries(&gateway, Target::Function(name), body).await
}

#[utoipa::path(get, path = "/v1/dags/{name}/retries", tag = "calls",
    params(("name" = String, Path, description = "DAG name")),
    responses((status = 200, body = RetryPolicy), (status = 404, body = ErrorBody)))]
async fn get_dag_retries(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
) -> ApiResult<Json<RetryPolicy>> {
    get_retries(&gateway, Target::Dag(name)).await
}

#[utoipa::path(put, path = "/v1/dags/{name}/retries", tag = "calls",
    params(("name" = String, Path, description = "DAG name")),
    request_body = RetryPolicy,
    responses((status = 200, body = RetryPolicy), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn put_dag_retries(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<RetryPolicy>> {
    put_retries(&gateway, Target::Dag(name), body).await
}

async fn get_concurrency(gateway: &Gateway, target: Target) -> ApiResult<Json<ConcurrencyLimit>> {
    registered(gateway, &target).await?;
    let (kind, name) = crate::runner::kind_and_name(&target);
    gateway
        .calls
        .of(&target)
        .concurrency_limits()
        .await?
        .into_iter()
        .find(|(t, _)| t == &target)
        .map(|(_, limit)| Json(limit))
        .ok_or_else(|| ApiError::not_found(format!("{kind} {name:?} has no concurrency limit")))
}

async fn put_concurrency(
    gateway: &Gateway,
    target: Target,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ConcurrencyLimit>> {
    let body = body?;
    let limit: ConcurrencyLimit = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("not a concurrency limit: {e}")))?;
    limit.check().map_err(ApiError::bad_request)?;
    registered(gateway, &target).await?;
    gateway.calls.set_concurrency(&target, Some(limit)).await?;
    gateway.limits.set(target, Some(limit.max_concurrency));
    Ok(Json(limit))
}

async fn delete_concurrency(gateway: &Gateway, target: Target) -> ApiResult<StatusCode> {
    gateway.calls.set_concurrency(&target, None).await?;
    gateway.limits.set(target, None);
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/functions/{name}/concurrency", tag = "calls",
    params(("name" = String, Path, description = "Function name")),
    responses((status = 200, body = ConcurrencyLimit), (status = 404, body = ErrorBody)))]
async fn get_function_concurrency(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
) -> ApiResult<Json<ConcurrencyLimit>> {
    get_concurrency(&gateway, Target::Function(name)).await
}

#[utoipa::path(put, path = "/v1/functions/{name}/concurrency", tag = "calls",
    params(("name" = String, Path, description = "Function name")),
    request_body = ConcurrencyLimit,
    responses((status = 200, body = ConcurrencyLimit), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn put_function_concurrency(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ConcurrencyLimit>> {
    put_concurrency(&gateway, Target::Function(name), body).await
}

#[utoipa::path(delete, path = "/v1/functions/{name}/concurrency", tag = "calls",
    params(("name" = String, Path, description = "Function name")),
    responses((status = 204, description = "The limit is lifted")))]
async fn delete_function_concurrency(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
) -> ApiResult<StatusCode> {
    delete_concurrency(&gateway, Target::Function(name)).await
}

#[utoipa::path(get, path = "/v1/dags/{name}/concurrency", tag = "calls",
    params(("name" = String, Path, description = "DAG name")),
    responses((status = 200, body = ConcurrencyLimit), (status = 404, body = ErrorBody)))]
async fn get_dag_concurrency(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
) -> ApiResult<Json<ConcurrencyLimit>> {
    get_concurrency(&gateway, Target::Dag(name)).await
}

#[utoipa::path(put, path = "/v1/dags/{name}/concurrency", tag = "calls",
    params(("name" = String, Path, description = "DAG name")),
    request_body = ConcurrencyLimit,
    responses((status = 200, body = ConcurrencyLimit), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn put_dag_concurrency(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ConcurrencyLimit>> {
    put_concurrency(&gateway, Target::Dag(name), body).await
}

#[utoipa::path(delete, path = "/v1/dags/{name}/concurrency", tag = "calls",
    params(("name" = String, Path, description = "DAG name")),
    responses((status = 204, description = "The limit is lifted")))]
async fn delete_dag_concurrency(
    State(gateway): State<Arc<Gateway>>,
    Named(name): Named,
) -> ApiResult<StatusCode> {
    delete_concurrency(&gateway, Target::Dag(name)).await
}

/// A trigger, as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TriggerInfo {
    /// Its name.
    pub name: String,
    /// What it does.
    pub spec: TriggerSpec,
    /// Whether it is paused.
    pub paused: bool,
    /// Why Squall paused it, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused_reason: Option<String>,
    /// Its next tick (ms since the Unix epoch), unless paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_ms: Option<u64>,
}

impl From<Trigger> for TriggerInfo {
    fn from(trigger: Trigger) -> Self {
        let next_ms = match (&trigger.paused, trigger.spec.check()) {
            (false, Ok((_, Firing::Cron(schedule)))) => schedule
                .upcoming(chrono::Utc)
                .next()
                .and_then(|t| u64::try_from(t.timestamp_millis()).ok()),
            _ => None,
        };
        Self {
            name: trigger.name,
            spec: trigger.spec,
            paused: trigger.paused,
            paused_reason: trigger.paused_reason,
            next_ms,
        }
    }
}

/// The triggers of the request's namespace, and `name` checked.
fn triggers_of(gateway: &Gateway, namespace: &Ns, name: &str) -> ApiResult<Triggers> {
    checked_name(name)?;
    Ok(gateway.triggers.in_namespace(&namespace.0))
}

async fn trigger_named(triggers: &Triggers, name: &str) -> ApiResult<Trigger> {
    triggers
        .get(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no trigger {name:?}")))
}

#[utoipa::path(put, path = "/v1/triggers/{name}", tag = "triggers",
    params(("name" = String, Path, description = "Trigger name")),
    request_body = TriggerSpec,
    responses((status = 200, body = TriggerInfo), (status = 400, body = ErrorBody)))]
async fn put_trigger(
    State(gateway): State<Arc<Gateway>>,
    namespace: Ns,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<TriggerInfo>> {
    let triggers = triggers_of(&gateway, &namespace, &name)?;
    let body = body?;
    let spec: TriggerSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("not a trigger: {e}")))?;
    // Its target is looked for in its own namespace only.
    let (target, firing) = triggers.check(&spec).map_err(ApiError::bad_request)?;
    match registered(&gateway, &target).await {
        Err(e) if e.status == StatusCode::NOT_FOUND => {
            return Err(ApiError::bad_request(e.body.error.message));
        }
        other => other?,
    }
    if let Firing::KvChange(_) = firing {
        // Every shard journals clients' writes from here on, before the trigger exists: no
        // write acknowledged after this answer escapes it.
        gateway
            .kvs
            .with(|client| client.journal(true))
            .await
            .map_err(|e| Failure::new(FailureCode::Unavailable, e.to_string()))?;
    }
    let mut trigger = Trigger {
        name,
        spec,
        paused: false,
        paused_reason: None,
        updated_ms: 0,
        updated_us: 0,
        salt: rand::random(),
    };
    trigger.touch();
    triggers.put(&trigger).await?;
    Ok(Json(trigger.into()))
}

#[utoipa::path(get, path = "/v1/triggers", tag = "triggers",
    responses((status = 200, body = Vec<TriggerInfo>)))]
async fn list_triggers(
    State(gateway): State<Arc<Gateway>>,
    Ns(namespace): Ns,
) -> ApiResult<Json<Vec<TriggerInfo>>> {
    let triggers = gateway.triggers.in_namespace(&namespace).list().await?;
    Ok(Json(triggers.into_iter().map(TriggerInfo::from).collect()))
}

#[utoipa::path(get, path = "/v1/triggers/{name}", tag = "triggers",
    params(("name" = String, Path, description = "Trigger name")),
    responses((status = 200, body = TriggerInfo), (status = 404, body = ErrorBody)))]
async fn get_trigger(
    State(gateway): State<Arc<Gateway>>,
    namespace: Ns,
    Path(name): Path<String>,
) -> ApiResult<Json<TriggerInfo>> {
    let triggers = triggers_of(&gateway, &namespace, &name)?;
    Ok(Json(trigger_named(&triggers, &name).await?.into()))
}

#[utoipa::path(delete, path = "/v1/triggers/{name}", tag = "triggers",
    params(("name" = String, Path, description = "Trigger name")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)))]
async fn delete_trigger(
    State(gateway): State<Arc<Gateway>>,
    namespace: Ns,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let triggers = triggers_of(&gateway, &namespace, &name)?;
    trigger_named(&triggers, &name).await?;
    triggers.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_paused(
    gateway: &Gateway,
    namespace: &Ns,
    name: &str,
    paused: bool,
) -> ApiResult<Json<TriggerInfo>> {
    let triggers = triggers_of(gateway, namespace, name)?;
    let mut trigger = trigger_named(&triggers, name).await?;
    if trigger.paused != paused {
        trigger.paused = paused;
        trigger.paused_reason = None;
        // Ticks passed (and writes made) while paused never fire: it goes on from now.
        trigger.touch();
        triggers.put(&trigger).await?;
    }
    Ok(Json(trigger.into()))
}

#[utoipa::path(post, path = "/v1/triggers/{name}/pause", tag = "triggers",
    params(("name" = String, Path, description = "Trigger name")),
    responses((status = 200, body = TriggerInfo), (status = 404, body = ErrorBody)))]
async fn pause_trigger(
    State(gateway): State<Arc<Gateway>>,
    namespace: Ns,
    Path(name): Path<String>,
) -> ApiResult<Json<TriggerInfo>> {
    set_paused(&gateway, &namespace, &name, true).await
}

#[utoipa::path(post, path = "/v1/triggers/{name}/resume", tag = "triggers",
    params(("name" = String, Path, description = "Trigger name")),
    responses((status = 200, body = TriggerInfo), (status = 404, body = ErrorBody)))]
async fn resume_trigger(
    State(gateway): State<Arc<Gateway>>,
    namespace: Ns,
    Path(name): Path<String>,
) -> ApiResult<Json<TriggerInfo>> {
    set_paused(&gateway, &namespace, &name, false).await
}

#[utoipa::path(post, path = "/v1/triggers/{name}/fire", tag = "triggers",
    params(("name" = String, Path, description = "Trigger name")),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody)))]
async fn fire_trigger(
    State(gateway): State<Arc<Gateway>>,
    namespace: Ns,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let triggers = triggers_of(&gateway, &namespace, &name)?;
    let trigger = trigger_named(&triggers, &name).await?;
    let (target, _) = triggers
        .check(&trigger.spec)
        .map_err(ApiError::bad_request)?;
    // A call made over HTTP: under the namespace's rate, as an invocation is.
    if let Err(exceeded) = gateway.quotas.admit(&namespace.0, false).await? {
        return Err(over_quota(
            &namespace.0,
            exceeded,
            StatusCode::TOO_MANY_REQUESTS,
        ));
    }
    let id = ActivationId::new(Timestamp::now(0).time);
    let call = PendingCall::new(
        id.to_string(),
        target,
        squall_state::triggers::input_of(&trigger),
        InvokeOptions {
            timeout_ms: Some(
                gateway
                    .config
                    .default_timeout
                    .as_millis()
                    .try_into()
                    .unwrap_or(u64::MAX),
            ),
            ..InvokeOptions::default()
        },
        "trigger-fire",
        now_ms(),
    );
    gateway
        .runner()
        .accept(call, Vec::new())
        .await
        .map_err(|e| Failure::new(FailureCode::Unavailable, e.to_string()))?;
    Ok(accepted(&namespace.0, id.as_str()))
}

#[utoipa::path(delete, path = "/v1/calls/{id}", tag = "calls",
    params(("id" = String, Path, description = "The asynchronous call's id")),
    responses((status = 204, description = "Cancelled: no attempt starts after this"),
        (status = 404, body = ErrorBody)))]
async fn cancel_call(
    State(gateway): State<Arc<Gateway>>,
    Ns(namespace): Ns,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let not_pending = || ApiError::not_found(format!("no pending call {id:?}"));
    let parsed = ActivationId::parse(&id).ok_or_else(not_pending)?;
    let calls = gateway.calls.in_namespace(&namespace);
    let Some(call) = calls.cancel(parsed.as_str()).await? else {
        return Err(not_pending());
    };
    gateway.runner().cancel(parsed.as_str());
    if gateway.config.record_activations {
        let cancelled = Failure::new(FailureCode::Cancelled, "cancelled");
        let record = record_of(&call, Status::Failed, Some((&cancelled).into()), None);
        gateway.activations.put(&record).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A dead letter as the API shows it: the call, its attempts, and why it was given up.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterInfo {
    /// The call's id (its activation's and result's).
    pub id: String,
    /// How the call was made.
    pub cause: String,
    /// When it was given up (ms since the Unix epoch).
    pub failed_ms: u64,
    /// The last attempt's error: `{code, message, step}`.
    #[schema(value_type = Object)]
    pub error: RecordedError,
    /// Its attempts, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub attempts: Vec<squall_state::activations::Attempt>,
    /// Its input's size in bytes.
    pub input_bytes: u64,
    /// The `Idempotency-Key` it was made with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl From<DeadLetter> for DeadLetterInfo {
    fn from(letter: DeadLetter) -> Self {
        Self {
            id: letter.call.id,
            cause: letter.call.cause,
            failed_ms: letter.failed_ms,
            error: letter.error,
            attempts: letter.call.attempts,
            input_bytes: letter.call.input.len() as u64,
            idempotency_key: letter.call.idempotency_key,
        }
    }
}

/// A page of dead letters, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterPage {
    /// The dead letters.
    pub dead_letters: Vec<DeadLetterInfo>,
    /// Where the next page starts (pass it as `after`); absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Which dead letters a listing answers.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterParams {
    /// The most answered (1 to 1000, default 100).
    pub limit: Option<u32>,
    /// List those after this id: the `next` of the previous page.
    pub after: Option<String>,
}

/// How many dead letters a bulk request handled.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Handled {
    /// Their number.
    pub count: u64,
}

#[utoipa::path(get, path = "/v1/dead-letters/{kind}/{name}", tag = "calls",
    params(("kind" = String, Path, description = "function or dag"),
        ("name" = String, Path, description = "Its name"), DeadLetterParams),
    responses((status = 200, body = DeadLetterPage), (status = 400, body = ErrorBody)))]
async fn list_dead_letters(
    State(gateway): State<Arc<Gateway>>,
    namespace: Ns,
    Path((kind, name)): Path<(String, String)>,
    Query(params): Query<DeadLetterParams>,
) -> ApiResult<Json<DeadLetterPage>> {
    let target = target_of(&namespace, &kind, name)?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit is between 1 and 1000"));
    }
    if let Some(after) = &params.after {
        ActivationId::parse(after)
            .ok_or_else(|| ApiError::bad_request(format!("{after:?} is not a call id")))?;
    }
    let (letters, next) = gateway
        .calls
        .dead_letters(&target, params.after.as_deref(), limit)
        .await?;
    Ok(Json(DeadLetterPage {
        dead_letters: letters.into_iter().map(DeadLetterInfo::from).collect(),
        next,
    }))
}

#[utoipa::path(delete, path = "/v1/dead-letters/{kind}/{name}", tag = "calls",
    params(("kind" = String, Path, description = "function or dag"),
        ("name" = String, Path, description = "Its name")),
    responses((status = 200, body = Handled)))]
async fn delete_dead_letters(
    State(gateway): State<Arc<Gateway>>,
    namespace: Ns,
    Path((kind, name)): Path<(String, String)>,
) -> ApiResult<Json<Handled>> {
    let target = target_of(&namespace, &kind, name)?;
    let ids = gateway.calls.dead_letter_ids(&target).await?;
    gateway.calls.delete_dead_letters(&target, &ids).await?;
    Ok(Json(Handled {
        count: ids.len() as u64,
    }))
}

#[utoipa::path(post, path = "/v1/dead-letters/{kind}/{name}/redrive", tag = "calls",
    params(("kind" = String, Path, description = "function or dag"),
        ("name" = String, Path, description = "Its name")),
    responses((status = 200, body = Handled)))]
async fn redrive_dead_letters(
    State(gateway): State<Arc<Gateway>>,
    namespace: Ns,
    Path((kind, name)): Path<(String, String)>,
) -> ApiResult<Json<Handled>> {
    let target = target_of(&namespace, &kind, name)?;
    let mut count = 0;
    for id in gateway.calls.dead_letter_ids(&target).await? {
        if redrive(&gateway, &target, &id).await? {
            count += 1;
        }
    }
    Ok(Json(Handled { count }))
}

/// Puts dead letter `id` of `target` back to run, here; whether it was there.
async fn redrive(gateway: &Gateway, target: &Target, id: &str) -> ApiResult<bool> {
    let Some(call) = gateway.calls.redrive(target, id).await? else {
        return Ok(false);
    };
    if gateway.config.record_activations {
        gateway
            .recorder()
            .record(record_of(&call, Status::Running, None, None));
    }
    // Held by nobody in the store: if this runner's lease loses, another runner's scan has it.
    gateway.runner().adopt_when_free(call).await?;
    Ok(true)
}

async fn dead_letter(
    gateway: &Gateway,
    namespace: &Ns,
    kind: &str,
    name: String,
    id: &str,
) -> ApiResult<DeadLetter> {
    let target = target_of(namespace, kind, name)?;
    let not_found = || ApiError::not_found(format!("no dead letter {id:?}"));
    let id = ActivationId::parse(id).ok_or_else(not_found)?;
    gateway
        .calls
        .dead_letter_of(&target, id.as_str())
        .await?
        .ok_or_else(not_found)
}

#[utoipa::path(get, path = "/v1/dead-letters/{kind}/{name}/{id}", tag = "calls",
    params(("kind" = String, Path, description = "function or dag"),
        ("name" = String, Path, description = "Its name"),
        ("id" = String, Path, description = "The call's id")),
    responses((status = 200, body = DeadLetterInfo), (status = 404, body = ErrorBody)))]
async fn get_dead_letter(
    State(gateway): State<Arc<Gateway>>,
    namespace: Ns,
    Path((kind, name, id)): Path<(String, String, String)>,
) -> ApiResult<Json<DeadLetterInfo>> {
    Ok(Json(
        dead_letter(&gateway, &namespace, &kind, name, &id)
            .await?
            .into(),
    ))
}

#[utoipa::path(delete, path = "/v1/dead-letters/{kind}/{name}/{id}", tag = "calls",
    params(("kind" = String, Path, description = "function or dag"),
        ("name" = String, Path, description = "Its name"),
        ("id" = String, Path, description = "The call's id")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)))]
async fn delete_dead_letter(
    State(gateway): State<Arc<Gateway>>,
    namespace: Ns,
    Path((kind, name, id)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let letter = dead_letter(&gateway, &namespace, &kind, name, &id).await?;
    gateway
        .calls
        .delete_dead_letters(&letter.call.target, &[letter.call.id])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/dead-letters/{kind}/{name}/{id}/redrive", tag = "calls",
    params(("kind" = String, Path, description = "function or dag"),
        ("name" = String, Path, description = "Its name"),
        ("id" = String, Path, description = "The call's id")),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody)))]
async fn redrive_dead_letter(
    State(gateway): State<Arc<Gateway>>,
    namespace: Ns,
    Path((kind, name, id)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let letter = dead_letter(&gateway, &namespace, &kind, name, &id).await?;
    let id = letter.call.id.clone();
    if !redrive(&gateway, &letter.call.target, &id).await? {
        return Err(ApiError::not_found(format!("no dead letter {id:?}")));
    }
    Ok(accepted(keys::split(letter.call.target.name()).0, &id))
}

/// `POST /v1/keys` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    /// What the key is for (a name: letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// `read`, `invoke`, `deploy` or `admin`.
    pub role: String,
    /// Seconds until it stops working (default: never).
    #[serde(default)]
    pub expires_in_s: Option<u64>,
    /// The namespace it acts in (default: the one the request addresses); an `admin` key
    /// acts in every namespace.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// An API key as listed: never its secret, nor the secret's hash.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiKeyInfo {
    /// Its public id (the part of the key after `sqk_`, before the secret).
    pub id: String,
    /// What it is for.
    pub name: String,
    /// `read`, `invoke`, `deploy` or `admin`.
    pub role: String,
    /// The namespace it acts in.
    pub namespace: String,
    /// When it was made (ms since the Unix epoch).
    pub created_ms: u64,
    /// When it stops working, if ever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// When it was revoked, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
    /// The key itself: only in the answer that made it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl From<ApiKeyRecord> for ApiKeyInfo {
    fn from(record: ApiKeyRecord) -> Self {
        Self {
            id: record.id,
            name: record.name,
            role: record.role.to_string(),
            namespace: record.namespace,
            created_ms: record.created_ms,
            expires_ms: record.expires_ms,
            revoked_ms: record.revoked_ms,
            key: None,
        }
    }
}

/// `GET /v1/keys` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiKeyList {
    /// Every key, oldest first (revoked and expired ones included).
    pub keys: Vec<ApiKeyInfo>,
}

#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = NewApiKey,
    responses((status = 201, body = ApiKeyInfo), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
async fn create_api_key(
    State(gateway): State<Arc<Gateway>>,
    Ns(addressed): Ns,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let asked: NewApiKey = serde_json::from_slice(&body?).map_err(|e| {
        ApiError::bad_request(format!(
            "the body must be {{\"name\":...,\"role\":...,\"expires_in_s\":...}}: {e}"
        ))
    })?;
    checked_name(&asked.name)?;
    let role: Role = asked.role.parse().map_err(ApiError::bad_request)?;
    let expires_ms = match asked.expires_in_s {
        Some(0) => return Err(ApiError::bad_request("expires_in_s must be at least 1")),
        Some(s) => Some(now_ms().saturating_add(s.saturating_mul(1000))),
        None => None,
    };
    let namespace = asked.namespace.unwrap_or(addressed);
    if !gateway.namespaces.exists(&namespace).await? {
        return Err(ApiError::not_found(format!(
            "no namespace {:?}",
            namespace
                .chars()
                .take(keys::MAX_NAME_LEN)
                .collect::<String>()
        )));
    }
    let issued = gateway
        .key_check
        .keys()
        .create(&asked.name, role, &namespace, expires_ms)
        .await?;
    tracing::info!(id = %issued.record.id, name = %issued.record.name, %role, "API key made");
    gateway.key_check.learn(issued.record.clone());
    let detail = AuditDetail(format!("made key {} ({role})", issued.record.id));
    let mut info = ApiKeyInfo::from(issued.record);
    info.key = Some(issued.key);
    let mut response = (StatusCode::CREATED, Json(info)).into_response();
    response.extensions_mut().insert(detail);
    Ok(response)
}

/// `POST /v1/namespaces` body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewNamespace {
    /// Its name (letters, digits, `-`, `_`, `.`; not dots alone).
    pub name: String,
}

/// `DELETE /v1/namespaces/{name}` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NamespaceDeleted {
    /// The namespace.
    pub name: String,
    /// How many of its keys were deleted (records, results, its tenants' keys).
    pub keys_deleted: u64,
    /// The ids of its API keys, revoked.
    pub keys_revoked: Vec<String>,
}

#[utoipa::path(get, path = "/v1/namespaces", tag = "namespaces",
    responses((status = 200, body = Vec<NamespaceRecord>), (status = 403, body = ErrorBody)))]
async fn list_namespaces(
    State(gateway): State<Arc<Gateway>>,
) -> ApiResult<Json<Vec<NamespaceRecord>>> {
    Ok(Json(gateway.namespaces.namespaces().list().await?))
}

#[utoipa::path(post, path = "/v1/namespaces", tag = "namespaces", request_body = NewNamespace,
    responses((status = 201, body = NamespaceRecord), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn create_namespace(
    State(gateway): State<Arc<Gateway>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let asked: NewNamespace = serde_json::from_slice(&body?)
        .map_err(|e| ApiError::bad_request(format!("the body must be {{\"name\":...}}: {e}")))?;
    keys::validate_namespace(&asked.name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    match gateway.namespaces.namespaces().create(&asked.name).await? {
        Created::New => {}
        Created::Exists => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("namespace {:?} exists", asked.name),
            ))
        }
        Created::Deleted => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "namespace {:?} was deleted; a deleted namespace's name is not used again",
                    asked.name
                ),
            ))
        }
    }
    gateway.namespaces.learn(&asked.name, true);
    let record = NamespaceRecord {
        name: asked.name.clone(),
        created_ms: now_ms(),
        deleted: false,
    };
    let mut response = (StatusCode::CREATED, Json(record)).into_response();
    response
        .extensions_mut()
        .insert(AuditDetail(format!("created namespace {}", asked.name)));
    Ok(response)
}

#[utoipa::path(get, path = "/v1/namespaces/{name}", tag = "namespaces",
    params(("name" = String, Path, description = "The namespace")),
    responses((status = 200, body = NamespaceRecord), (status = 404, body = ErrorBody)))]
async fn get_namespace(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
) -> ApiResult<Json<NamespaceRecord>> {
    let listed = gateway.namespaces.namespaces().list().await?;
    listed
        .into_iter()
        .find(|n| n.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no namespace {name:?}")))
}

#[utoipa::path(delete, path = "/v1/namespaces/{name}", tag = "namespaces",
    params(("name" = String, Path, description = "The namespace")),
    responses((status = 200, body = NamespaceDeleted), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn delete_namespace(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    keys::validate_namespace(&name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if name == keys::DEFAULT_NAMESPACE {
        return Err(ApiError::bad_request(
            "the default namespace cannot be deleted",
        ));
    }
    // Its keys first: from here on nothing of it is let in, on any gateway within a second.
    let mut revoked = Vec::new();
    for record in gateway.key_check.keys().list().await? {
        if record.namespace == name && record.revoked_ms.is_none() {
            if let Some(record) = gateway.key_check.keys().revoke(&record.id).await? {
                revoked.push(record.id.clone());
                gateway.key_check.learn(record);
            }
        }
    }
    let Some(keys_deleted) = gateway.namespaces.namespaces().delete(&name).await? else {
        return Err(ApiError::not_found(format!("no namespace {name:?}")));
    };
    gateway.namespaces.learn(&name, false);
    let detail = AuditDetail(format!(
        "deleted namespace {name}: {keys_deleted} keys, {} API keys revoked",
        revoked.len()
    ));
    let mut response = Json(NamespaceDeleted {
        name,
        keys_deleted,
        keys_revoked: revoked,
    })
    .into_response();
    response.extensions_mut().insert(detail);
    Ok(response)
}

/// The namespace `name` of a path, which must exist.
async fn existing_namespace(gateway: &Gateway, name: &str) -> ApiResult<()> {
    keys::validate_namespace(name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if gateway.namespaces.namespaces().exists(name).await? {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no namespace {name:?}")))
    }
}

#[utoipa::path(get, path = "/v1/namespaces/{name}/quotas", tag = "namespaces",
    params(("name" = String, Path, description = "The namespace")),
    responses((status = 200, body = Quotas), (status = 404, body = ErrorBody)))]
async fn get_quotas(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Quotas>> {
    existing_namespace(&gateway, &name).await?;
    Ok(Json(gateway.namespaces.namespaces().quotas(&name).await?))
}

#[utoipa::path(put, path = "/v1/namespaces/{name}/quotas", tag = "namespaces",
    params(("name" = String, Path, description = "The namespace")), request_body = Quotas,
    responses((status = 200, body = Quotas), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn put_quotas(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    existing_namespace(&gateway, &name).await?;
    let quotas: Quotas = serde_json::from_slice(&body?).map_err(|e| {
        ApiError::bad_request(format!(
            "the body must be {{\"max_in_flight\":...,\"max_calls_per_s\":...,\"max_functions\":...,\"max_memory_mb\":...,\"max_timeout_ms\":...,\"max_stored_bytes\":...}} (each optional): {e}"
        ))
    })?;
    quotas.check().map_err(ApiError::bad_request)?;
    gateway
        .namespaces
        .namespaces()
        .set_quotas(&name, &quotas)
        .await?;
    gateway.quotas.learn(&name, quotas.clone());
    gateway.stored_bytes.forget(&name);
    let detail = AuditDetail(format!(
        "quotas of {name}: {}",
        serde_json::to_string(&quotas).unwrap_or_default()
    ));
    let mut response = Json(quotas).into_response();
    response.extensions_mut().insert(detail);
    Ok(response)
}

/// What a namespace stores, and its quota on it.
#[derive(Debug, Serialize, ToSchema)]
struct StoredUsage {
    /// The namespace.
    namespace: String,
    /// What it stored when measured.
    #[serde(flatten)]
    usage: stored_bytes::Usage,
    /// Its quota on the bytes (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    max_stored_bytes: Option<u64>,
}

#[utoipa::path(get, path = "/v1/usage", tag = "namespaces",
    responses((status = 200, body = StoredUsage)))]
/// What the namespace's keys take in the store: measured now, or at most a few seconds ago.
async fn get_usage(
    State(gateway): State<Arc<Gateway>>,
    Ns(namespace): Ns,
) -> ApiResult<Json<StoredUsage>> {
    // One measurement at a time per gateway: requests meanwhile find it recent.
    let usage = {
        let _one = gateway.measuring.lock().await;
        stored_bytes::recent(&gateway.kvs, &namespace).await?
    };
    let quotas = gateway.namespaces.namespaces().quotas(&namespace).await?;
    Ok(Json(StoredUsage {
        namespace,
        usage,
        max_stored_bytes: quotas.max_stored_bytes,
    }))
}

/// Which audit entries `GET /v1/audit` lists.
#[derive(Debug, Deserialize, IntoParams)]
struct AuditQuery {
    /// Entries older than this one: the `next` of the previous page.
    after: Option<String>,
    /// The most entries answered (1 to 500, default 100).
    limit: Option<u32>,
}

/// A page of audit entries, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    /// The entries.
    #[schema(value_type = Vec<Object>)]
    pub entries: Vec<AuditEntry>,
    /// Where the next page starts (`?after=`), if there is one.
    pub next: Option<String>,
}

#[utoipa::path(get, path = "/v1/audit", tag = "keys", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 403, body = ErrorBody)))]
async fn list_audit(
    State(gateway): State<Arc<Gateway>>,
    Query(query): Query<AuditQuery>,
) -> ApiResult<Json<AuditPage>> {
    if let Some(after) = &query.after {
        if ActivationId::parse(after).is_none() {
            return Err(ApiError::bad_request(
                "after is an entry's id: 32 lowercase hex digits",
            ));
        }
    }
    let (entries, next) = gateway
        .audit
        .list(query.after.as_deref(), query.limit.unwrap_or(100))
        .await?;
    Ok(Json(AuditPage { entries, next }))
}

#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses((status = 200, body = ApiKeyList), (status = 403, body = ErrorBody)))]
async fn list_api_keys(State(gateway): State<Arc<Gateway>>) -> ApiResult<Json<ApiKeyList>> {
    let mut records = gateway.key_check.keys().list().await?;
    records.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    Ok(Json(ApiKeyList {
        keys: records.into_iter().map(ApiKeyInfo::from).collect(),
    }))
}

#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "The key's id")),
    responses((status = 200, body = ApiKeyInfo), (status = 404, body = ErrorBody)))]
async fn revoke_api_key(
    State(gateway): State<Arc<Gateway>>,
    Path(id): Path<String>,
) -> ApiResult<Json<ApiKeyInfo>> {
    if !squall_state::api_keys::is_id(&id) {
        return Err(ApiError::bad_request(
            "a key's id is 16 lowercase hex digits",
        ));
    }
    let revoked = gateway
        .key_check
        .keys()
        .revoke(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no API key {id}")))?;
    gateway.key_check.learn(revoked.clone());
    tracing::info!(%id, "API key revoked");
    Ok(Json(revoked.into()))
}

/// The OpenAPI document, generated from the handlers above.
#[derive(OpenApi)]
#[openapi(
    info(title = "Squall", description = "Stateful functions and DAGs of functions over a lattice key-value store. Every `/v1/...` path is also served as `/v1/ns/{ns}/...`, in namespace `ns` (the plain path: the `default` namespace); keys made under `/v1/ns/{ns}/keys` act in `ns` unless the body names another."),
    paths(healthz, metrics, openapi, executors, register_function, list_functions, get_function,
        delete_function, invoke_function, register_model, list_models, get_model, delete_model,
        invoke_dag, put_dag, list_dags, get_dag, delete_dag,
        get_result, list_activations, get_activation, activation_logs, list_kv, get_kv, put_kv, delete_kv,
        get_function_retries, put_function_retries, get_dag_retries, put_dag_retries, cancel_call,
        get_function_concurrency, put_function_concurrency, delete_function_concurrency,
        get_dag_concurrency, put_dag_concurrency, delete_dag_concurrency,
        put_trigger, list_triggers, get_trigger, delete_trigger, pause_trigger, resume_trigger,
        fire_trigger,
        list_dead_letters, delete_dead_letters, redrive_dead_letters, get_dead_letter,
        delete_dead_letter, redrive_dead_letter, create_api_key, list_api_keys, revoke_api_key,
        list_audit, list_namespaces, create_namespace, get_namespace, delete_namespace,
        get_quotas, put_quotas, get_usage),
    components(schemas(ErrorBody, ErrorDetail, Health, ExecutorInfo, FunctionInfo, FunctionDetail,
        Accepted, DagInfo, DagSpec, Running, KeyList, ActivationPage, RetryPolicy, DeadLetterInfo,
        DeadLetterPage, Handled, ConcurrencyLimit, TriggerSpec, TriggerInfo, ActivationLogs,
        LogEntry, NewApiKey, ApiKeyInfo, ApiKeyList, AuditPage, NewNamespace, NamespaceDeleted,
        NamespaceRecord, Quotas, StoredUsage)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}
