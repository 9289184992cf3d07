//! The HTTP API: synchronous inference on an uploaded image, capture triggers, health, readiness and metrics.
//!
//! | route | auth | what |
//! |---|---|---|
//! | `POST /v1/infer[?sku=…]` | token | body = image bytes (JPEG/PNG/WebP) → attributes as JSON |
//! | `POST /v1/capture` | token | `{"sku": "…", "cameras": ["front"]}` → 202, cameras triggered |
//! | `GET /metrics` | token | Prometheus text 0.0.4, or OpenMetrics when the scraper asks for it |
//! | `GET /healthz`, `GET /v2/health/live` | open | the process is alive |
//! | `GET /readyz`, `GET /v2/health/ready` | open | a model is loaded and passed its self-test |
//!
//! Every error is JSON `{"error": "<specific message>", "kind": "<machine-readable kind>"}` with a matching status.
//! The module knows nothing about the rest of the daemon: it gets the current engine from a closure, readiness from a
//! `watch` channel, and hands capture requests to whoever holds the other end of an `mpsc` channel.

use crate::bundle::sha256_bytes;
use crate::engine::{Attributes, Engine, EngineError};
use crate::metrics::{ErrorKind, Metrics, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE, Stage};
use crate::preprocess::{Limits, PreprocessError, Preprocessor};
use crate::sources::{Origin, Shot, ShotOutcome};
use crate::util::error_chain;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

/// Largest accepted `/v1/capture` body; the request is a few names.
const MAX_CAPTURE_BODY: usize = 64 * 1024;

/// `[http]` section of the daemon configuration.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve the HTTP API at all. Default `true`.
    pub enabled: bool,
    /// Address and port to listen on. Default `127.0.0.1:8080`: only local clients (and a reverse proxy) can reach
    /// the API unless this is changed deliberately; set a token before binding to another address.
    pub listen: SocketAddr,
    /// Bearer token required on every route except the health/readiness probes (`Authorization: Bearer <token>`).
    /// Prefer `token_file`, which keeps the secret out of the configuration file. Unset with `token_file` unset: no
    /// authentication.
    pub token: Option<String>,
    /// File whose content (surrounding whitespace trimmed) is the bearer token, e.g. a systemd credential
    /// (`$CREDENTIALS_DIRECTORY/http-token`). Mutually exclusive with `token`.
    pub token_file: Option<PathBuf>,
    /// Largest accepted request body (an uploaded image), in bytes; larger uploads get 413. Default 64 MiB.
    pub max_body_bytes: usize,
    /// `/v1/infer` requests processed at once; further ones wait (bounding the memory held by uploads). Default 4.
    pub max_concurrent_infer: usize,
    /// How long `/v1/capture` waits for the capture side to accept a trigger before answering 503. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub capture_timeout: Duration,
    /// How long an upload may take to arrive once its turn has come; slower ones get 408. An upload holds one of the
    /// `max_concurrent_infer` slots while it arrives, so without this a few stalled clients would block `/v1/infer`.
    /// Default 60 s (64 MiB at 10 Mbit/s takes 54 s).
    #[serde(with = "humantime_serde")]
    pub upload_timeout: Duration,
    /// Connections held open at once; further clients wait to be accepted. Clients that connect and send nothing,
    /// or a header a byte at a time, use these up instead of the process's file descriptors, which the outbox,
    /// MQTT, the hot folders and the watchdog need. Default 256.
    pub max_connections: usize,
    /// A connection on which nothing is read or written for this long is closed, and its place among
    /// `max_connections` freed: clients that vanished without closing (a rebooted station, a NAT that forgot the
    /// flow) and idle keep-alive connections would otherwise hold their places for good. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a client may take to send a request's line and headers, counted from when attrd starts waiting for
    /// them: a new connection, or the end of the previous response on a kept-alive one (which is therefore closed
    /// after this long without a new request). Slower clients are disconnected. Without it a client that sends a
    /// header a byte at a time, each inside `idle_timeout`, would hold its place among `max_connections` for as
    /// long as it liked. An upload's body has `upload_timeout`. Default 30 s (hyper's own default).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            token: None,
            token_file: None,
            max_body_bytes: 64 * 1024 * 1024,
            max_concurrent_infer: 4,
            capture_timeout: Duration::from_secs(10),
            upload_timeout: Duration::from_secs(60),
            max_connections: 256,
            idle_timeout: Duration::from_secs(300),
            header_timeout: Duration::from_secs(30),
        }
    }
}

// The token must never reach a log line through `{:?}`.
impl fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConfig")
            .field("enabled", &self.enabled)
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_concurrent_infer", &self.max_concurrent_infer)
            .field("capture_timeout", &self.capture_timeout)
            .field("upload_timeout", &self.upload_timeout)
            .field("max_connections", &self.max_connections)
            .field("idle_timeout", &self.idle_timeout)
            .field("header_timeout", &self.header_timeout)
            .finish()
    }
}

impl HttpConfig {
    /// Checks the numeric fields and returns the bearer token, if any (read from `token_file` when set).
    pub fn resolve_token(&self) -> Result<Option<String>, HttpError> {
        if self.max_body_bytes == 0 {
            return Err(HttpError::Config("http.max_body_bytes is 0, must be at least 1".into()));
        }
        if self.max_concurrent_infer == 0 {
            return Err(HttpError::Config("http.max_concurrent_infer is 0, must be at least 1".into()));
        }
        if self.upload_timeout.is_zero() {
            return Err(HttpError::Config("http.upload_timeout is 0, must be greater".into()));
        }
        if self.idle_timeout.is_zero() {
            return Err(HttpError::Config("http.idle_timeout is 0, must be greater".into()));
        }
        if self.header_timeout.is_zero() {
            return Err(HttpError::Config("http.header_timeout is 0, must be greater".into()));
        }
        if self.max_connections == 0 {
            return Err(HttpError::Config("http.max_connections is 0, must be at least 1".into()));
        }
        if self.capture_timeout.is_zero() {
            // Every trigger would be answered 503 whether or not it was taken, and clients would capture twice.
            return Err(HttpError::Config("http.capture_timeout is 0, must be greater".into()));
        }
        let (token, origin) = match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                return Err(HttpError::Config("http.token and http.token_file are both set; use one".into()));
            }
            (None, None) => return Ok(None),
            (Some(t), None) => (t.trim().to_string(), "http.token".to_string()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| HttpError::TokenFile { path: path.clone(), source })?;
                (text.trim().to_string(), format!("http.token_file {}", path.display()))
            }
        };
        if token.is_empty() {
            return Err(HttpError::Config(format!("the HTTP token ({origin}) is empty")));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(HttpError::Config(format!(
                "the HTTP token ({origin}) must be printable ASCII without spaces (it travels in a header)"
            )));
        }
        Ok(Some(token))
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    #[error("invalid HTTP configuration: {0}")]
    Config(String),
    #[error("cannot read the HTTP token file {}", .path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// The engine serving right now; `None` while no model is loaded.
pub type EngineSource = Arc<dyn Fn() -> Option<Arc<Engine>> + Send + Sync>;

/// A capture trigger handed to the capture side.
#[derive(Debug)]
pub struct CaptureRequest {
    /// Validated SKU the captured images belong to.
    pub sku: String,
    /// Camera names to trigger; empty means every configured camera.
    pub cameras: Vec<String>,
    /// Where to say what was triggered (or why not). Dropping it answers 503.
    pub reply: oneshot::Sender<Result<CaptureAccepted, CaptureRefusal>>,
}

/// What a capture trigger started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureAccepted {
    /// Cameras that were triggered.
    pub cameras: Vec<String>,
}

/// Why the capture side refused a trigger.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureRefusal {
    /// No camera is configured (503).
    #[error("no cameras are configured")]
    NoCameras,
    /// Some requested cameras do not exist (400).
    #[error("unknown camera(s): {}; configured: {}", .unknown.join(", "), .configured.join(", "))]
    UnknownCameras { unknown: Vec<String>, configured: Vec<String> },
    /// The cameras exist but cannot capture now (503), e.g. a device is gone.
    #[error("capture unavailable: {0}")]
    Unavailable(String),
}

/// Everything the routes need. Build with [`HttpState::new`], then the `with_*` methods.
#[derive(Clone)]
pub struct HttpState {
    engine: EngineSource,
    metrics: Metrics,
    ready: watch::Receiver<bool>,
    capture: Option<mpsc::Sender<CaptureRequest>>,
    /// Weak, so that the daemon's drain (which drops its own sender and waits for the pipeline to finish) does not
    /// wait for the HTTP server too: an upload after that is told to come back.
    pipeline: Option<mpsc::WeakSender<Shot>>,
    limits: Limits,
    token: Option<Arc<str>>,
    max_body_bytes: usize,
    capture_timeout: Duration,
    upload_timeout: Duration,
    infer_slots: Arc<Semaphore>,
    preprocessor: Arc<Mutex<Option<Preprocessor>>>,
}

impl HttpState {
    /// `ready` is the daemon's readiness (the model passed its self-test); `/readyz` and `/v1/infer` also require
    /// `engine` to return one. Reads `cfg.token_file` now, so a missing token file fails start-up.
    pub fn new(
        cfg: &HttpConfig,
        engine: EngineSource,
        metrics: Metrics,
        ready: watch::Receiver<bool>,
    ) -> Result<Self, HttpError> {
        let token = cfg.resolve_token()?.map(Arc::from);
        Ok(HttpState {
            engine,
            metrics,
            ready,
            capture: None,
            pipeline: None,
            limits: Limits::default(),
            token,
            max_body_bytes: cfg.max_body_bytes,
            capture_timeout: cfg.capture_timeout,
            upload_timeout: cfg.upload_timeout,
            infer_slots: Arc::new(Semaphore::new(cfg.max_concurrent_infer)),
            preprocessor: Arc::new(Mutex::new(None)),
        })
    }

    /// Where `/v1/capture` sends triggers; without it (no cameras), `/v1/capture` answers 503.
    pub fn with_capture(mut self, tx: mpsc::Sender<CaptureRequest>) -> Self {
        self.capture = Some(tx);
        self
    }

    /// Where `POST /v1/photos` hands its uploads: the daemon's pipeline, whose results go through the outbox to MQTT.
    pub fn with_pipeline(mut self, shots: &mpsc::Sender<Shot>) -> Self {
        self.pipeline = Some(shots.downgrade());
        self
    }

    /// Size and pixel limits for uploaded images (default [`Limits::default`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    fn ready_engine(&self) -> Option<Arc<Engine>> {
        if *self.ready.borrow() { (self.engine)() } else { None }
    }

    /// The preprocessor for `engine`'s input spec, rebuilt only when a swapped-in model has a different spec.
    fn preprocessor(&self, engine: &Engine) -> Result<Preprocessor, PreprocessError> {
        let spec = &engine.manifest().input;
        // The cache is a plain value; a panic elsewhere cannot leave it inconsistent.
        let mut cached = self.preprocessor.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = cached.as_ref().filter(|p| p.spec() == spec && *p.limits() == self.limits) {
            return Ok(p.clone());
        }
        let p = Preprocessor::new(spec.clone(), self.limits)?;
        *cached = Some(p.clone());
        Ok(p)
    }
}

/// The API's routes. Health and readiness probes stay open; the rest requires the bearer token when one is set.
pub fn router(state: HttpState) -> Router {
    let max_body = state.max_body_bytes;
    let state = Arc::new(state);
    let protected = Router::new()
        .route("/v1/infer", post(infer))
        .route("/v1/photos", post(photos))
        .route("/v1/capture", post(capture).layer(DefaultBodyLimit::max(MAX_CAPTURE_BODY)))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let open = Router::new()
        .route("/healthz", get(healthz))
        .route("/v2/health/live", get(live))
        .route("/readyz", get(readyz))
        .route("/v2/health/ready", get(v2_ready));
    Router::new()
        .merge(protected)
        .merge(open)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Binds `cfg.listen`. Separate from [`serve_on`] so the daemon can fail start-up on a taken port before it reports
/// ready.
pub async fn bind(cfg: &HttpConfig) -> Result<HttpListener, HttpError> {
    let listener =
        TcpListener::bind(cfg.listen).await.map_err(|source| HttpError::Bind { addr: cfg.listen, source })?;
    if !cfg.listen.ip().is_loopback() && cfg.token.is_none() && cfg.token_file.is_none() {
        tracing::warn!(listen = %cfg.listen, "HTTP API reachable from the network without a token (set http.token_file)");
    }
    Ok(HttpListener {
        inner: listener,
        open: Arc::new(Semaphore::new(cfg.max_connections.max(1))),
        idle_timeout: cfg.idle_timeout,
        header_timeout: cfg.header_timeout,
    })
}
/// The HTTP API's listening socket, with a bound on the connections it holds open at once
/// ([`HttpConfig::max_connections`]). Clients that open connections and send nothing, or a header a byte at a time,
/// then use up these, and further clients wait for one, rather than the process's file descriptors, which the
/// outbox, MQTT, the hot folders and the watchdog's notifications need too.
#[derive(Debug)]
pub struct HttpListener {
    inner: TcpListener,
    open: Arc<Semaphore>,
    idle_timeout: Duration,
    header_timeout: Duration,
}

impl HttpListener {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The next connection, once one of `max_connections` is free.
    async fn accept(&mut self) -> (CountedStream, SocketAddr) {
        // Invariant: nothing closes this semaphore, so acquiring can only wait, never fail.
        let Ok(permit) = self.open.clone().acquire_owned().await else {
            unreachable!("the connection semaphore is never closed")
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let idle = Box::pin(tokio::time::sleep(self.idle_timeout));
                    return (CountedStream { stream, _permit: permit, idle, idle_timeout: self.idle_timeout }, addr);
                }
                // One client's connection failed before it was accepted: nothing to wait for.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => {
                    // EMFILE and friends: the next accept may succeed once something was closed.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// An accepted connection, holding its place among [`HttpConfig::max_connections`] until it closes.
#[derive(Debug)]
pub struct CountedStream {
    stream: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// Fires `idle_timeout` after the last byte read or written (see [`HttpConfig::idle_timeout`]).
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    idle_timeout: Duration,
}

impl CountedStream {
    fn active(&mut self) {
        self.idle.as_mut().reset(tokio::time::Instant::now() + self.idle_timeout);
    }
}

impl tokio::io::AsyncRead for CountedStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.active();
                }
                Poll::Ready(Ok(()))
            }
            // Waiting for the client: the connection's reader is what hyper polls while it is idle.
            Poll::Pending if this.idle.as_mut().poll(cx).is_ready() => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "nothing read or written for longer than http.idle_timeout",
            ))),
            other => other,
        }
    }
}

impl tokio::io::AsyncWrite for CountedStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            this.active();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            this.active();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Binds `cfg.listen` and serves `router` until `shutdown` completes, then finishes the requests in flight.
pub async fn serve(
    cfg: &HttpConfig,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    let listener = bind(cfg).await?;
    serve_on(listener, router, shutdown).await
}

/// Serves `router` on an already bound listener until `shutdown` completes (graceful: requests in flight finish).
///
/// Connections are served by hyper directly rather than through `axum::serve`, which gives hyper no timer, and so no
/// header-read timeout ([`HttpConfig::header_timeout`]).
pub async fn serve_on(
    mut listener: HttpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let addr = listener.local_addr().map_err(HttpError::Serve)?;
    tracing::info!(%addr, "HTTP API listening");
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(listener.header_timeout);
    // Closed once the API stops accepting: every connection then finishes the request it is in and closes.
    let (stopping_tx, stopping_rx) = watch::channel(());
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, remote) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(tower::ServiceExt::map_request(
            router.clone(),
            |req: Request<hyper::body::Incoming>| req.map(axum::body::Body::new),
        ));
        let conn = http1.serve_connection(TokioIo::new(io), service).with_upgrades();
        let mut stopping = stopping_rx.clone();
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stopping.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // A client that went away or was too slow is its own business, not the daemon's.
                tracing::debug!(%remote, error = %error_chain(&e), "HTTP connection ended with an error");
            }
        });
        // Reap finished connections so the set holds only open ones.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    drop(stopping_tx);
    while connections.join_next().await.is_some() {}
    tracing::info!(%addr, "HTTP API stopped");
    Ok(())
}

/// Checks a SKU from a client: not blank, and usable as the segment of its result topic
/// ([`crate::mqtt::topics::check_sku`]: 1–128 bytes, no `/`, `+`, `#` or control characters, not starting with `$`).
pub fn validate_sku(sku: &str) -> Result<(), String> {
    if sku.trim().is_empty() {
        return Err("sku is empty".into());
    }
    crate::mqtt::topics::check_sku(sku).map_err(|e| e.to_string())
}

// ----- errors ----------------------------------------------------------------------------------------------------

/// An error answer: status, machine-readable kind, specific message.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    kind: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn not_ready(state: &HttpState) -> Self {
        let why = if (state.engine)().is_none() {
            "no model is loaded yet"
        } else {
            "the model has not passed its self-test yet"
        };
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", why)
    }

    fn from_preprocess(e: &PreprocessError) -> Self {
        let (status, kind) = match e {
            PreprocessError::Empty => (StatusCode::BAD_REQUEST, "empty"),
            PreprocessError::FileTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            PreprocessError::TooManyPixels { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_many_pixels"),
            PreprocessError::UnknownFormat { .. } | PreprocessError::UnsupportedFormat { .. } => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_format")
            }
            PreprocessError::Decode { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "decode"),
            PreprocessError::Truncated { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "truncated"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self::new(status, kind, error_chain(e))
    }

    fn from_engine(e: &EngineError) -> Self {
        match e {
            EngineError::Stopped => Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", error_chain(e)),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "infer", error_chain(e)),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), kind = self.kind, error = %self.message, "HTTP request failed");
        } else {
            tracing::info!(status = self.status.as_u16(), kind = self.kind, error = %self.message, "HTTP request refused");
        }
        let body = ErrorBody { error: &self.message, kind: self.kind };
        let mut resp = (self.status, axum::Json(body)).into_response();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(r#"Bearer realm="attrd""#));
            }
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        resp
    }
}

fn body_error(e: BytesRejection, limit: usize) -> ApiError {
    match e {
        BytesRejection::FailedToBufferBody(axum::extract::rejection::FailedToBufferBody::LengthLimitError(_)) => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request body is over the {limit}-byte limit (http.max_body_bytes)"),
            )
        }
        other => ApiError::bad_request(format!("could not read the request body: {}", other.body_text())),
    }
}

// ----- auth ------------------------------------------------------------------------------------------------------

async fn require_token(State(state): State<Arc<HttpState>>, req: Request, next: Next) -> Response {
    let Some(token) = state.token.as_deref() else {
        return next.run(req).await;
    };
    match bearer(req.headers()) {
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this endpoint requires an `Authorization: Bearer <token>` header",
        )
        .into_response(),
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid bearer token").into_response(),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares without an early exit, so response timing does not reveal how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

// ----- /v1/infer -------------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InferQuery {
    sku: Option<String>,
}

pub use crate::payload::ModelInfo;

/// `POST /v1/infer` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    /// SHA-256 of the uploaded bytes.
    pub image_sha256: String,
    pub model: ModelInfo,
    /// From the request being accepted to the answer, in milliseconds (waiting for a slot included).
    pub latency_ms: f64,
    pub attributes: Attributes,
}

async fn infer(
    State(state): State<Arc<HttpState>>,
    query: Result<Query<InferQuery>, QueryRejection>,
    req: Request,
) -> Result<axum::Json<InferResponse>, ApiError> {
    let received = Instant::now();
    let result = infer_inner(&state, query, req, received).await;
    let kind = match &result {
        Err(e) => match e.kind {
            "empty" | "decode" | "truncated" => Some(ErrorKind::Decode),
            "too_large" | "too_many_pixels" => Some(ErrorKind::Limit),
            "unsupported_format" => Some(ErrorKind::UnsupportedFormat),
            "infer" => Some(ErrorKind::Infer),
            "internal" => Some(ErrorKind::Internal),
            // Client mistakes and "not ready" are not daemon errors.
            _ => None,
        },
        Ok(_) => None,
    };
    if let Some(kind) = kind {
        state.metrics.error(kind);
    }
    result
}

async fn infer_inner(
    state: &HttpState,
    query: Result<Query<InferQuery>, QueryRejection>,
    req: Request,
    received: Instant,
) -> Result<axum::Json<InferResponse>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if let Some(sku) = &query.sku {
        validate_sku(sku).map_err(ApiError::bad_request)?;
    }
    let (engine, _slot) = upload_slot(state).await?;
    state.metrics.observe_stage(Stage::Queue, received.elapsed());
    let body = read_upload(state, req).await?;
    state.metrics.image("http");
    let pre = state.preprocessor(&engine).map_err(|e| ApiError::from_preprocess(&e))?;

    let started = Instant::now();
    let image = body.clone();
    let prepared = tokio::task::spawn_blocking(move || (pre.prepare(&image), pre, sha256_bytes(&image)))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("preprocessing: {e}")))?;
    let (tensor, pre, image_sha256) = prepared;
    let tensor = tensor.map_err(|e| ApiError::from_preprocess(&e))?;
    state.metrics.observe_stage(Stage::Preprocess, started.elapsed());

    let started = Instant::now();
    let out = engine.infer(pre.batch(&[tensor])).await.map_err(|e| ApiError::from_engine(&e))?;
    state.metrics.observe_stage(Stage::Infer, started.elapsed());
    state.metrics.observe_batch(1);
    let attributes = out.attributes(engine.manifest()).into_iter().next().ok_or_else(|| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the engine returned no result for the image")
    })?;
    let latency = received.elapsed();
    state.metrics.observe_stage(Stage::Total, latency);
    tracing::debug!(
        sku = query.sku.as_deref().unwrap_or(""),
        image_sha256 = %image_sha256,
        bytes = body.len(),
        latency_ms = latency.as_millis() as u64,
        "HTTP inference"
    );
    Ok(axum::Json(InferResponse {
        sku: query.sku,
        image_sha256,
        model: ModelInfo::of(&engine),
        latency_ms: latency.as_secs_f64() * 1000.0,
        attributes,
    }))
}

/// The serving engine and one of the `http.max_concurrent_infer` slots, taken before an upload is read: refusing
/// comes before reading a possibly large body, and holding a slot while buffering bounds the memory uploads take.
async fn upload_slot(state: &HttpState) -> Result<(Arc<Engine>, tokio::sync::SemaphorePermit<'_>), ApiError> {
    let engine = state.ready_engine().ok_or_else(|| ApiError::not_ready(state))?;
    let slot =
        state.infer_slots.acquire().await.map_err(|_| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the HTTP API is shutting down")
        })?;
    Ok((engine, slot))
}

/// The request body, within `http.max_body_bytes` and `http.upload_timeout`.
async fn read_upload(state: &HttpState, req: Request) -> Result<Bytes, ApiError> {
    tokio::time::timeout(state.upload_timeout, Bytes::from_request(req, &()))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "upload_timeout",
                format!("the upload did not arrive within {:?} (http.upload_timeout)", state.upload_timeout),
            )
        })?
        .map_err(|e| body_error(e, state.max_body_bytes))
}

// ----- /v1/photos ------------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PhotoQuery {
    sku: Option<String>,
}

/// `POST /v1/photos` answer (202): the photo's result is stored durably in the outbox and will be published on
/// `<prefix>/<node>/results/<sku>`, like a hot-folder photo's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhotoAccepted {
    pub sku: String,
    /// SHA-256 of the uploaded bytes, as the result's `source.image_sha256` will say.
    pub image_sha256: String,
}

/// Takes a photo into the pipeline and answers once its result is stored, so a 202 means the same as a hot-folder
/// file reaching `done/`: it will reach the broker, across restarts and outages. Sending the same photo again after
/// an error or a lost answer is safe: its result carries the same `message_id`, unless fusion is on or the model
/// changed meanwhile (docs/reliability.md, "Known limits").
async fn photos(
    State(state): State<Arc<HttpState>>,
    query: Result<Query<PhotoQuery>, QueryRejection>,
    req: Request,
) -> Result<(StatusCode, axum::Json<PhotoAccepted>), ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let sku = query.sku.ok_or_else(|| ApiError::bad_request("sku is missing: POST /v1/photos?sku=<SKU>"))?;
    validate_sku(&sku).map_err(ApiError::bad_request)?;
    let Some(weak) = &state.pipeline else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_pipeline",
            "this server does not publish results",
        ));
    };
    let stopping = || ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "retry_later", "attrd is stopping; send it again");
    // Held until the result is stored.
    let (_, _slot) = upload_slot(&state).await?;
    let body = read_upload(&state, req).await?;
    let image_sha256 = sha256_bytes(&body);
    let (shot, outcome) =
        Shot::new(sku.clone(), body.to_vec(), OffsetDateTime::now_utc(), Origin::Http { client: None });
    // The strong sender lives for this statement only, so it never holds a drain up.
    weak.upgrade().ok_or_else(stopping)?.send(shot).await.map_err(|_| stopping())?;
    match outcome.await.map_err(|_| stopping())? {
        ShotOutcome::Durable => {
            tracing::info!(%sku, %image_sha256, "photo uploaded; result stored");
            Ok((StatusCode::ACCEPTED, axum::Json(PhotoAccepted { sku, image_sha256 })))
        }
        ShotOutcome::Failed(reason) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "failed", reason)),
        ShotOutcome::RetryLater(reason) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "retry_later", reason)),
    }
}

// ----- /v1/capture -----------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptureBody {
    sku: String,
    #[serde(default)]
    cameras: Vec<String>,
}

/// `POST /v1/capture` answer (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureResponse {
    pub sku: String,
    /// Cameras that were triggered.
    pub cameras: Vec<String>,
}

async fn capture(
    State(state): State<Arc<HttpState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, axum::Json<CaptureResponse>), ApiError> {
    let body = body.map_err(|e| body_error(e, MAX_CAPTURE_BODY))?;
    let req: CaptureBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            r#"invalid capture request ({e}); expected JSON like {{"sku": "ABC-123", "cameras": ["front"]}}"#
        ))
    })?;
    validate_sku(&req.sku).map_err(ApiError::bad_request)?;
    if let Some(bad) = req.cameras.iter().find(|c| c.trim().is_empty() || c.chars().any(char::is_control)) {
        return Err(ApiError::bad_request(format!("invalid camera name {bad:?}")));
    }
    let no_cameras = || ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_cameras", "no cameras are configured");
    let tx = state.capture.as_ref().ok_or_else(no_cameras)?;
    let (reply, answer) = oneshot::channel();
    let sku = req.sku.clone();
    tx.try_send(CaptureRequest { sku: req.sku, cameras: req.cameras, reply }).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "busy", "capture queue is full; retry shortly")
        }
        mpsc::error::TrySendError::Closed(_) => no_cameras(),
    })?;
    let unavailable = |msg: &str| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "capture_unavailable", msg);
    let answer = tokio::time::timeout(state.capture_timeout, answer)
        .await
        .map_err(|_| unavailable("the capture side did not answer in time"))?
        .map_err(|_| unavailable("the capture side dropped the request"))?;
    match answer {
        Ok(accepted) => {
            tracing::info!(%sku, cameras = ?accepted.cameras, "capture triggered over HTTP");
            Ok((StatusCode::ACCEPTED, axum::Json(CaptureResponse { sku, cameras: accepted.cameras })))
        }
        Err(refusal @ CaptureRefusal::NoCameras) => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_cameras", refusal.to_string()))
        }
        Err(refusal @ CaptureRefusal::UnknownCameras { .. }) => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, "unknown_camera", refusal.to_string()))
        }
        Err(refusal) => Err(unavailable(&refusal.to_string())),
    }
}

// ----- probes and metrics ----------------------------------------------------------------------------------------

async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn live() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "live": true }))
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let engine = state.ready_engine().ok_or_else(|| ApiError::not_ready(&state))?;
    Ok(axum::Json(serde_json::json!({ "ready": true, "model": ModelInfo::of(&engine) })))
}

async fn v2_ready(State(state): State<Arc<HttpState>>) -> Response {
    let ready = state.ready_engine().is_some();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(serde_json::json!({ "ready": ready }))).into_response()
}

async fn metrics(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (content_type, text) = if wants_openmetrics {
        (OPENMETRICS_CONTENT_TYPE, state.metrics.encode())
    } else {
        (PROMETHEUS_CONTENT_TYPE, state.metrics.encode_prometheus())
    };
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no such endpoint: {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_are_local_and_documented_fields_parse() {
        let c = HttpConfig::default();
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.max_body_bytes, 64 << 20);
        let c: HttpConfig = serde_json::from_str(r#"{"listen": "0.0.0.0:9000", "capture_timeout": "3s"}"#).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.capture_timeout, Duration::from_secs(3));
        let e = serde_json::from_str::<HttpConfig>(r#"{"listen_addr": "0.0.0.0:9000"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `listen_addr`"), "{e}");
    }

    #[test]
    fn debug_redacts_the_token() {
        let c = HttpConfig { token: Some("s3cret-token".into()), ..HttpConfig::default() };
        let d = format!("{c:?}");
        assert!(!d.contains("s3cret"), "{d}");
        assert!(d.contains("<redacted>"));
    }

    #[test]
    fn token_resolution() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("token");
        std::fs::write(&file, "abc123\n").unwrap();
        let from_file = HttpConfig { token_file: Some(file.clone()), ..HttpConfig::default() };
        assert_eq!(from_file.resolve_token().unwrap().as_deref(), Some("abc123"));
        let both = HttpConfig { token: Some("x".into()), token_file: Some(file), ..HttpConfig::default() };
        assert!(both.resolve_token().unwrap_err().to_string().contains("both set"));
        let missing = HttpConfig { token_file: Some(tmp.path().join("nope")), ..HttpConfig::default() };
        assert!(matches!(missing.resolve_token(), Err(HttpError::TokenFile { .. })));
        let blank = HttpConfig { token: Some("  ".into()), ..HttpConfig::default() };
        assert!(blank.resolve_token().unwrap_err().to_string().contains("empty"));
        let spaced = HttpConfig { token: Some("a b".into()), ..HttpConfig::default() };
        assert!(spaced.resolve_token().unwrap_err().to_string().contains("printable ASCII"));
        assert_eq!(HttpConfig::default().resolve_token().unwrap(), None);
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer tok"));
        assert_eq!(bearer(&h), Some("tok"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic dXNlcjpwYXNz"));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn sku_validation() {
        validate_sku("ABC-123.red").unwrap();
        validate_sku(&"x".repeat(128)).unwrap();
        assert!(validate_sku("").is_err());
        assert!(validate_sku("  ").is_err());
        assert!(validate_sku("a\nb").unwrap_err().contains("'\\n'"), "{}", validate_sku("a\nb").unwrap_err());
        // Not a topic segment: a separator, a wildcard, a broker-reserved name.
        assert!(validate_sku("ABC-123/red").unwrap_err().contains("'/'"));
        assert!(validate_sku("A+B").unwrap_err().contains("'+'"));
        assert!(validate_sku("$SYS").unwrap_err().contains("must not start with '$'"));
        // The limit is the topic's, in bytes: 43 three-byte characters are 129 bytes.
        assert!(validate_sku(&"x".repeat(129)).unwrap_err().contains("129 bytes"));
        assert!(validate_sku(&"品".repeat(43)).unwrap_err().contains("129 bytes"));
    }
}
