//! The HTTP API against the real ImageNet bundle on ONNX Runtime (CPU), real photos and broken uploads.

use crate::common::{fashion_rows, imagenet_bundle, repo};
use arc_swap::ArcSwapOption;
use attrd::bundle::{Bundle, sha256_bytes};
use attrd::engine::{Engine, EngineConfig};
use attrd::http::{
    CaptureAccepted, CaptureRefusal, CaptureRequest, HttpConfig, HttpState, InferResponse, bind, router, serve_on,
};
use attrd::metrics::Metrics;
use attrd::preprocess::{Limits, Preprocessor};
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use http_body_util::BodyExt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tower::ServiceExt;

/// One CPU engine for the whole test binary: loading a session per test would only test ORT's loader.
fn engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let bundle = Bundle::open(imagenet_bundle()).unwrap();
            Arc::new(Engine::load(&bundle, &EngineConfig::cpu()).unwrap())
        })
        .clone()
}

struct App {
    router: Router,
    ready: watch::Sender<bool>,
    slot: Arc<ArcSwapOption<Engine>>,
    metrics: Metrics,
}

fn app_with(cfg: HttpConfig, loaded: bool, ready: bool, capture: Option<mpsc::Sender<CaptureRequest>>) -> App {
    let slot = Arc::new(ArcSwapOption::<Engine>::empty());
    if loaded {
        slot.store(Some(engine()));
    }
    let (ready_tx, ready_rx) = watch::channel(ready);
    let metrics = Metrics::new();
    let source = slot.clone();
    let mut state = HttpState::new(&cfg, Arc::new(move || source.load_full()), metrics.clone(), ready_rx).unwrap();
    if let Some(tx) = capture {
        state = state.with_capture(tx);
    }
    App { router: router(state), ready: ready_tx, slot, metrics }
}

fn app() -> App {
    app_with(HttpConfig::default(), true, true, None)
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }

    /// Asserts an error answer: status, `kind`, and a message containing `needle`.
    #[track_caller]
    fn assert_error(&self, status: StatusCode, kind: &str, needle: &str) {
        let j = self.json();
        assert_eq!(self.status, status, "{j}");
        assert_eq!(j["kind"], kind, "{j}");
        let msg = j["error"].as_str().unwrap();
        assert!(msg.contains(needle), "error {msg:?} does not mention {needle:?}");
        assert_eq!(self.headers[header::CONTENT_TYPE], "application/json");
    }
}

async fn send(router: &Router, req: Request<Body>) -> Answer {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    Answer { status, headers, body }
}

fn post(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri).body(body.into()).unwrap()
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn with_token(mut req: Request<Body>, token: &str) -> Request<Body> {
    req.headers_mut().insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    req
}

fn photo(article_type: &str) -> Vec<u8> {
    let rows = fashion_rows();
    let row = rows.iter().find(|r| r.2 == article_type).unwrap_or_else(|| panic!("no {article_type} in labels.csv"));
    std::fs::read(&row.1).unwrap()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(repo().join("tests/fixtures/images").join(name)).unwrap()
}

fn top5(resp: &InferResponse) -> Vec<String> {
    resp.attributes["imagenet"].topk.iter().take(5).map(|s| s.value.clone()).collect()
}

#[tokio::test]
async fn infer_classifies_real_photos_exactly_like_the_engine() {
    let app = app();
    for (article, class) in [("Tshirts", "jersey"), ("Sunglasses", "sunglass")] {
        let bytes = photo(article);
        let a = send(&app.router, post("/v1/infer?sku=SKU-42%20red", bytes.clone())).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(a.headers[header::CONTENT_TYPE], "application/json");
        let r: InferResponse = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(r.sku.as_deref(), Some("SKU-42 red"));
        assert_eq!(r.image_sha256, sha256_bytes(&bytes));
        assert_eq!(r.model.name, "imagenet-lite0");
        assert_eq!(r.model.version, "1.0.0");
        assert_eq!(r.model.execution_provider, "cpu");
        assert_eq!(r.model.sha256, engine().model_sha256());
        assert!(r.latency_ms > 0.0);
        assert!(top5(&r).iter().any(|v| v.contains(class)), "{article}: {:?}", top5(&r));
        // The same bytes through the library directly give the same attributes: HTTP adds nothing of its own.
        let e = engine();
        let pre = Preprocessor::new(e.manifest().input.clone(), Limits::default()).unwrap();
        let direct = e.infer(pre.batch(&[pre.prepare(&bytes).unwrap()])).await.unwrap().attributes(e.manifest());
        assert_eq!(r.attributes, direct[0]);
    }
    // Without a SKU the field is absent rather than null.
    let a = send(&app.router, post("/v1/infer", photo("Tshirts"))).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.json().get("sku").is_none(), "{}", a.text());
}

#[tokio::test]
async fn broken_uploads_get_specific_client_errors_and_are_counted() {
    let app = app();
    let mut corrupt = fixture("photo.jpg");
    let dht = corrupt.windows(2).position(|w| w == [0xff, 0xc4]).unwrap();
    corrupt[dht + 1] = 0x00;
    let cases: Vec<(&str, Vec<u8>, StatusCode, &str, &str)> = vec![
        ("empty", vec![], StatusCode::BAD_REQUEST, "empty", "image data is empty"),
        (
            "truncated",
            fixture("truncated.jpg"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "truncated",
            "JPEG image is truncated",
        ),
        (
            "truncated png",
            fixture("truncated.png"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "truncated",
            "PNG image is truncated",
        ),
        ("corrupt", corrupt, StatusCode::UNPROCESSABLE_ENTITY, "decode", "could not decode JPEG image: "),
        ("html", fixture("html-error.jpg"), StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_format", "<!DOCTYPE ht"),
        ("garbage", fixture("garbage.bin"), StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_format", "unrecognised"),
        (
            "gif",
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_format",
            "GIF images are not supported",
        ),
        ("bomb", fixture("bomb.jpg"), StatusCode::PAYLOAD_TOO_LARGE, "too_many_pixels", "30000x30000 = 900.0 MP"),
    ];
    for (name, body, status, kind, needle) in &cases {
        let a = send(&app.router, post("/v1/infer", body.clone())).await;
        assert_eq!(a.status, *status, "{name}: {}", a.text());
        a.assert_error(*status, kind, needle);
    }
    // The decoder's own reason is part of the message, not just "could not decode".
    let a = send(&app.router, post("/v1/infer", fixture("truncated.jpg"))).await;
    assert!(a.json()["error"].as_str().unwrap().contains("1015 bytes"), "{}", a.text());

    let m = app.metrics.encode();
    for (kind, n) in [("decode", 5), ("unsupported_format", 3), ("limit", 1)] {
        let want = format!("attrd_errors_total{{kind=\"{kind}\"}} {n}");
        assert!(m.contains(&want), "{want} not in\n{m}");
    }
    // Nothing broke: a good photo still goes through.
    assert_eq!(send(&app.router, post("/v1/infer", photo("Tshirts"))).await.status, StatusCode::OK);
}

#[tokio::test]
async fn oversized_bodies_get_413_naming_the_limit() {
    let cfg = HttpConfig { max_body_bytes: 4000, ..HttpConfig::default() };
    let app = app_with(cfg, true, true, None);
    let big = fixture("photo.png");
    assert!(big.len() > 4000, "{}", big.len());
    let a = send(&app.router, post("/v1/infer", big.clone())).await;
    a.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "over the 4000-byte limit (http.max_body_bytes)");
    // Also for a streamed body of unknown length (a chunked upload): the limit applies while reading.
    let stream = Body::from_stream(Body::from(big).into_data_stream());
    let a = send(&app.router, post("/v1/infer", stream)).await;
    a.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "4000-byte limit");
    // A body under the limit is fine, streamed too.
    let small = fixture("photo.jpg");
    assert!(small.len() < 4000, "{}", small.len());
    assert_eq!(send(&app.router, post("/v1/infer", small.clone())).await.status, StatusCode::OK);
    let stream = Body::from_stream(Body::from(small).into_data_stream());
    assert_eq!(send(&app.router, post("/v1/infer", stream)).await.status, StatusCode::OK);
    assert!(app.metrics.encode().contains("attrd_errors_total{kind=\"limit\"} 2"));
}

#[tokio::test]
async fn bad_query_parameters_are_refused() {
    let app = app();
    let a = send(&app.router, post("/v1/infer?skuu=x", photo("Tshirts"))).await;
    a.assert_error(StatusCode::BAD_REQUEST, "bad_request", "unknown field `skuu`");
    let a = send(&app.router, post("/v1/infer?sku=", photo("Tshirts"))).await;
    a.assert_error(StatusCode::BAD_REQUEST, "bad_request", "sku is empty");
    let a = send(&app.router, post(&format!("/v1/infer?sku={}", "x".repeat(200)), photo("Tshirts"))).await;
    a.assert_error(StatusCode::BAD_REQUEST, "bad_request", "200 bytes long");
    // A SKU is what names its result topic, whichever way it comes in.
    let a = send(&app.router, post("/v1/infer?sku=SKU-42%2Fred", photo("Tshirts"))).await;
    a.assert_error(StatusCode::BAD_REQUEST, "bad_request", "contains '/'");
}

#[tokio::test]
async fn token_protects_everything_but_the_probes() {
    let cfg = HttpConfig { token: Some("t0k-en".into()), ..HttpConfig::default() };
    let app = app_with(cfg, true, true, None);
    let a = send(&app.router, post("/v1/infer", photo("Tshirts"))).await;
    a.assert_error(StatusCode::UNAUTHORIZED, "unauthorized", "Authorization: Bearer");
    assert_eq!(a.headers[header::WWW_AUTHENTICATE], r#"Bearer realm="attrd""#);
    let a = send(&app.router, with_token(post("/v1/infer", photo("Tshirts")), "t0k-em")).await;
    a.assert_error(StatusCode::UNAUTHORIZED, "unauthorized", "invalid bearer token");
    let a = send(&app.router, with_token(post("/v1/infer", photo("Tshirts")), "t0k-en")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    // Basic auth with the right secret is still not a bearer token.
    let mut req = get("/metrics");
    req.headers_mut().insert(header::AUTHORIZATION, "Basic t0k-en".parse().unwrap());
    send(&app.router, req).await.assert_error(StatusCode::UNAUTHORIZED, "unauthorized", "Bearer");
    assert_eq!(send(&app.router, get("/metrics")).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(send(&app.router, with_token(get("/metrics"), "t0k-en")).await.status, StatusCode::OK);
    let a = send(&app.router, post("/v1/capture", r#"{"sku":"A"}"#)).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    for probe in ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"] {
        assert_eq!(send(&app.router, get(probe)).await.status, StatusCode::OK, "{probe}");
    }
}

#[tokio::test]
async fn token_file_is_read_at_start_and_a_missing_one_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("token");
    std::fs::write(&file, "from-file\n").unwrap();
    let cfg = HttpConfig { token_file: Some(file), ..HttpConfig::default() };
    let app = app_with(cfg, true, true, None);
    assert_eq!(send(&app.router, with_token(get("/metrics"), "from-file")).await.status, StatusCode::OK);
    assert_eq!(send(&app.router, with_token(get("/metrics"), "from-fil")).await.status, StatusCode::UNAUTHORIZED);
    let cfg = HttpConfig { token_file: Some(tmp.path().join("missing")), ..HttpConfig::default() };
    let (_tx, rx) = watch::channel(true);
    let err = HttpState::new(&cfg, Arc::new(|| None), Metrics::new(), rx).err().unwrap();
    assert!(err.to_string().contains("cannot read the HTTP token file"), "{err}");
}

#[tokio::test]
async fn readiness_follows_the_model_and_the_ready_flag() {
    let app = app_with(HttpConfig::default(), false, false, None);
    assert_eq!(send(&app.router, get("/healthz")).await.status, StatusCode::OK);
    assert_eq!(send(&app.router, get("/v2/health/live")).await.json()["live"], true);
    send(&app.router, get("/readyz")).await.assert_error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "no model");
    let a = send(&app.router, get("/v2/health/ready")).await;
    assert_eq!((a.status, a.json()["ready"].clone()), (StatusCode::SERVICE_UNAVAILABLE, false.into()));
    let a = send(&app.router, post("/v1/infer", photo("Tshirts"))).await;
    a.assert_error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "no model is loaded");
    assert_eq!(a.headers[header::RETRY_AFTER], "5");

    // Loaded but not yet self-tested: still not ready, and the reason says so.
    app.slot.store(Some(engine()));
    send(&app.router, get("/readyz")).await.assert_error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "self-test");
    let a = send(&app.router, post("/v1/infer", photo("Tshirts"))).await;
    a.assert_error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "self-test");

    app.ready.send(true).unwrap();
    let a = send(&app.router, get("/readyz")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["model"]["name"], "imagenet-lite0");
    assert_eq!(a.json()["model"]["execution_provider"], "cpu");
    assert_eq!(send(&app.router, get("/v2/health/ready")).await.json()["ready"], true);
    assert_eq!(send(&app.router, post("/v1/infer", photo("Tshirts"))).await.status, StatusCode::OK);

    // Model unloaded again (e.g. a failed swap): back to 503.
    app.slot.store(None);
    assert_eq!(send(&app.router, get("/readyz")).await.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn metrics_expose_the_request_in_both_formats() {
    let app = app();
    app.metrics.set_model(&engine());
    assert_eq!(send(&app.router, post("/v1/infer", photo("Tshirts"))).await.status, StatusCode::OK);
    assert_eq!(send(&app.router, post("/v1/infer", b"nope".to_vec())).await.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let a = send(&app.router, get("/metrics")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers[header::CONTENT_TYPE], "text/plain; version=0.0.4; charset=utf-8");
    let text = a.text();
    for want in [
        "attrd_images_total{source=\"http\"} 2",
        "attrd_stage_seconds_count{stage=\"preprocess\"} 1",
        "attrd_stage_seconds_count{stage=\"infer\"} 1",
        "attrd_stage_seconds_count{stage=\"total\"} 1",
        "attrd_stage_seconds_count{stage=\"queue\"} 2",
        "attrd_batch_size_count 1",
        "attrd_errors_total{kind=\"unsupported_format\"} 1",
        "attrd_outbox_depth 0",
        "attrd_mqtt_connected 0",
        "attrd_active_provider{provider=\"cpu\"} 1",
    ] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
    let info = format!(
        "attrd_model_info{{name=\"imagenet-lite0\",version=\"1.0.0\",sha256=\"{}\",provider=\"cpu\"}} 1",
        engine().model_sha256()
    );
    assert!(text.contains(&info), "{info} missing from\n{text}");
    // The infer stage really measured the model run (Lite0 on CPU takes milliseconds, not nanoseconds).
    let sum: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("attrd_stage_seconds_sum{stage=\"infer\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(sum > 1e-4 && sum < 30.0, "{sum}");

    let mut req = get("/metrics");
    req.headers_mut().insert(header::ACCEPT, "application/openmetrics-text; version=1.0.0".parse().unwrap());
    let a = send(&app.router, req).await;
    assert_eq!(a.headers[header::CONTENT_TYPE], "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert!(a.text().ends_with("# EOF\n"));
    assert!(a.text().contains("attrd_images_total{source=\"http\"} 2"));
}

#[tokio::test]
async fn capture_validates_the_request_and_reports_what_was_triggered() {
    let (tx, mut rx) = mpsc::channel::<CaptureRequest>(4);
    let app = app_with(HttpConfig::default(), true, true, Some(tx));
    // The capture side: knows cameras front and side.
    let capture = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(req) = rx.recv().await {
            let known = ["front", "side"];
            let unknown: Vec<String> = req.cameras.iter().filter(|c| !known.contains(&c.as_str())).cloned().collect();
            let answer = if !unknown.is_empty() {
                Err(CaptureRefusal::UnknownCameras { unknown, configured: known.map(String::from).to_vec() })
            } else if req.cameras.is_empty() {
                Ok(CaptureAccepted { cameras: known.map(String::from).to_vec() })
            } else {
                Ok(CaptureAccepted { cameras: req.cameras.clone() })
            };
            seen.push((req.sku.clone(), req.cameras.clone()));
            req.reply.send(answer).unwrap();
        }
        seen
    });

    for (body, needle) in [
        ("{\"sku\": \"A\",", "invalid capture request (EOF while parsing"),
        ("not json", "invalid capture request (expected ident"),
        ("{\"cameras\": [\"front\"]}", "missing field `sku`"),
        ("{\"sku\": \"A\", \"camera\": \"front\"}", "unknown field `camera`"),
        ("{\"sku\": 42}", "invalid type: integer `42`, expected a string"),
        ("{\"sku\": \"   \"}", "sku is empty"),
        ("{\"sku\": \"$SYS\"}", "must not start with '$'"),
        ("{\"sku\": \"A#1\"}", "contains '#'"),
        ("{\"sku\": \"A\", \"cameras\": [\"\"]}", "invalid camera name \"\""),
        ("", "EOF while parsing"),
    ] {
        let a = send(&app.router, post("/v1/capture", body)).await;
        a.assert_error(StatusCode::BAD_REQUEST, "bad_request", needle);
    }
    let a = send(&app.router, post("/v1/capture", r#"{"sku": "SKU-1", "cameras": ["front"]}"#)).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text());
    assert_eq!(a.json(), serde_json::json!({"sku": "SKU-1", "cameras": ["front"]}));
    let a = send(&app.router, post("/v1/capture", r#"{"sku": "SKU-2"}"#)).await;
    assert_eq!(a.json(), serde_json::json!({"sku": "SKU-2", "cameras": ["front", "side"]}));
    let a = send(&app.router, post("/v1/capture", r#"{"sku": "SKU-3", "cameras": ["top"]}"#)).await;
    a.assert_error(StatusCode::BAD_REQUEST, "unknown_camera", "unknown camera(s): top; configured: front, side");

    drop(app);
    let seen = capture.await.unwrap();
    assert_eq!(
        seen,
        [
            ("SKU-1".to_string(), vec!["front".to_string()]),
            ("SKU-2".to_string(), vec![]),
            ("SKU-3".to_string(), vec!["top".to_string()]),
        ]
    );
}

#[tokio::test]
async fn capture_without_cameras_is_503() {
    let app = app();
    let a = send(&app.router, post("/v1/capture", r#"{"sku": "A"}"#)).await;
    a.assert_error(StatusCode::SERVICE_UNAVAILABLE, "no_cameras", "no cameras are configured");
    // A capture side that has stopped, and one that says it has no cameras.
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let app = app_with(HttpConfig::default(), true, true, Some(tx));
    let a = send(&app.router, post("/v1/capture", r#"{"sku": "A"}"#)).await;
    a.assert_error(StatusCode::SERVICE_UNAVAILABLE, "no_cameras", "no cameras");
    let (tx, mut rx) = mpsc::channel::<CaptureRequest>(1);
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            let _ = req.reply.send(Err(CaptureRefusal::NoCameras));
        }
    });
    let app = app_with(HttpConfig::default(), true, true, Some(tx));
    let a = send(&app.router, post("/v1/capture", r#"{"sku": "A"}"#)).await;
    a.assert_error(StatusCode::SERVICE_UNAVAILABLE, "no_cameras", "no cameras are configured");
}

#[tokio::test]
async fn capture_side_that_never_answers_times_out() {
    let (tx, mut rx) = mpsc::channel::<CaptureRequest>(1);
    let held = tokio::spawn(async move { rx.recv().await });
    let cfg = HttpConfig { capture_timeout: Duration::from_millis(200), ..HttpConfig::default() };
    let app = app_with(cfg, true, true, Some(tx));
    let a = send(&app.router, post("/v1/capture", r#"{"sku": "A"}"#)).await;
    a.assert_error(StatusCode::SERVICE_UNAVAILABLE, "capture_unavailable", "did not answer in time");
    // The request itself was delivered.
    assert_eq!(held.await.unwrap().unwrap().sku, "A");
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let app = app();
    send(&app.router, get("/v1/nope")).await.assert_error(StatusCode::NOT_FOUND, "not_found", "/v1/nope");
    let a = send(&app.router, get("/v1/infer")).await;
    a.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "GET is not allowed on /v1/infer");
}

#[tokio::test]
async fn concurrent_uploads_beyond_the_slot_count_all_complete() {
    let cfg = HttpConfig { max_concurrent_infer: 1, ..HttpConfig::default() };
    let app = app_with(cfg, true, true, None);
    let bytes = photo("Sunglasses");
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (router, bytes) = (app.router.clone(), bytes.clone());
            tokio::spawn(async move { send(&router, post("/v1/infer", bytes)).await })
        })
        .collect();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    }
    assert!(app.metrics.encode().contains("attrd_stage_seconds_count{stage=\"infer\"} 4"));
}

/// One raw HTTP/1.1 exchange on a fresh connection (`Connection: close`), returning status line, headers, body.
pub(crate) async fn raw_http(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").expect("no end of headers");
    let head = String::from_utf8(out[..split].to_vec()).unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, out[split + 4..].to_vec())
}

#[tokio::test]
async fn serves_over_tcp_and_shuts_down_gracefully() {
    let cfg = HttpConfig { listen: "127.0.0.1:0".parse().unwrap(), ..HttpConfig::default() };
    let listener = bind(&cfg).await.unwrap();
    let addr = listener.local_addr().unwrap();
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    let app = app_with(cfg.clone(), true, true, None);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_on(listener, app.router.clone(), async move { drop(stop_rx.await) }));

    // A second bind to the same port fails with the address in the message.
    let taken = HttpConfig { listen: addr, ..HttpConfig::default() };
    let err = bind(&taken).await.unwrap_err();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");

    let (status, _, body) = raw_http(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"").await;
    assert_eq!(
        (status, serde_json::from_slice::<serde_json::Value>(&body).unwrap()["status"].clone()),
        (200, "ok".into())
    );

    let img = photo("Tshirts");
    let head = format!(
        "POST /v1/infer?sku=tcp HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        img.len()
    );
    let (status, headers, body) = raw_http(addr, &head, &img).await;
    assert_eq!(status, 200, "{headers}\n{}", String::from_utf8_lossy(&body));
    let r: InferResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(r.sku.as_deref(), Some("tcp"));
    assert!(top5(&r).iter().any(|v| v.contains("jersey")), "{:?}", top5(&r));

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("server did not stop").unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
}

/// Binds `cfg.listen` and serves a loaded, ready app on it until the returned task is aborted: the bound address,
/// the app (kept alive with the server) and the server task.
async fn serve_until_aborted(
    cfg: HttpConfig,
) -> (std::net::SocketAddr, App, tokio::task::JoinHandle<Result<(), attrd::http::HttpError>>) {
    let listener = bind(&cfg).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = app_with(cfg, true, true, None);
    let server = tokio::spawn(serve_on(listener, app.router.clone(), std::future::pending()));
    (addr, app, server)
}

/// Clients that connect and never finish a request (slowloris) hold at most `max_connections`: the next client
/// waits to be accepted instead of the daemon running out of file descriptors (which the outbox, MQTT, the hot
/// folders and the watchdog's notifications need), and is served once one of them goes.
#[tokio::test]
async fn connections_beyond_max_connections_wait_instead_of_using_up_the_process() {
    use tokio::io::AsyncWriteExt;
    let cfg = HttpConfig { listen: "127.0.0.1:0".parse().unwrap(), max_connections: 3, ..HttpConfig::default() };
    let (addr, _app, server) = serve_until_aborted(cfg).await;
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap(); // and never the blank line
        stalled.push(s);
    }
    let probe = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    // The kernel completes the handshake (the listen backlog), but attrd does not take the connection.
    let waiting = tokio::spawn(raw_http(addr, probe, b""));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!waiting.is_finished(), "a fourth connection was served while three were held");
    drop(stalled.pop());
    let (status, _, _) = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("served").unwrap();
    assert_eq!(status, 200);
    server.abort();
}

/// A connection on which nothing happens for `idle_timeout` is closed and frees its place: a client that vanished
/// without closing, or an idle keep-alive connection, does not hold one of `max_connections` for good.
#[tokio::test]
async fn an_idle_connection_is_closed_and_frees_its_place() {
    use tokio::io::AsyncReadExt;
    let cfg = HttpConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_connections: 1,
        idle_timeout: Duration::from_millis(400),
        ..HttpConfig::default()
    };
    let (addr, _app, server) = serve_until_aborted(cfg).await;
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let probe = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let waiting = tokio::spawn(raw_http(addr, probe, b""));
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut byte)).await.expect("closed by attrd");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let (status, _, _) = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("served").unwrap();
    assert_eq!(status, 200);
    server.abort();
}

#[tokio::test]
async fn a_stalled_upload_gets_408_and_frees_its_slot() {
    let cfg = HttpConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_concurrent_infer: 1,
        upload_timeout: Duration::from_millis(500),
        ..HttpConfig::default()
    };
    let (addr, _app, server) = serve_until_aborted(cfg).await;
    // Announces 100 kB and sends 7 bytes, then waits: it holds the only slot until the timeout.
    let head = "POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n";
    let (status, _, body) = raw_http(addr, head, b"partial").await;
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("http.upload_timeout"), "{}", String::from_utf8_lossy(&body));
    // The slot is free again: a whole upload is served.
    let img = photo("Tshirts");
    let head =
        format!("POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", img.len());
    let (status, _, body) = raw_http(addr, &head, &img).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    server.abort();
}

/// A client that sends its request's headers a byte at a time, each byte well inside `idle_timeout`, is
/// disconnected once `header_timeout` has passed, and frees its place for the next client (slowloris).
#[tokio::test]
async fn a_client_dribbling_its_headers_is_disconnected_after_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cfg = HttpConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_connections: 1,
        idle_timeout: Duration::from_secs(60),
        header_timeout: Duration::from_millis(800),
        ..HttpConfig::default()
    };
    let (addr, _app, server) = serve_until_aborted(cfg).await;
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let probe = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let waiting = tokio::spawn(raw_http(addr, probe, b""));
    let started = std::time::Instant::now();
    let header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = false;
    for b in header {
        assert!(!waiting.is_finished(), "a second client was served while the slow one held the only place");
        if slow.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut byte = [0u8; 1];
        // A closed connection reads as EOF (or a reset) at once; an open one has nothing to read yet.
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(1), slow.read(&mut byte)).await {
            assert!(matches!(r, Ok(0) | Err(_)), "attrd answered a request it has not received: {r:?}");
            closed = true;
            break;
        }
    }
    let took = started.elapsed();
    assert!(closed, "still connected after {took:?} of dribbled headers");
    assert!(took >= Duration::from_millis(500), "closed after {took:?}, well before header_timeout");
    let (status, _, _) = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("served").unwrap();
    assert_eq!(status, 200);
    server.abort();
}
