//! The inference pipeline on the real ImageNet Lite0 bundle (ONNX Runtime, CPU) and real product photos: micro-batching,
//! bad images, multi-view fusion, the durable handshake, backpressure, model swaps, and the payload's JSON Schema.

use crate::common::{fashion_rows, imagenet_bundle, repo};
use arc_swap::ArcSwap;
use attrd::bundle::{self, Bundle, NewBundle};
use attrd::engine::{Engine, EngineConfig, postprocess};
use attrd::metrics::Metrics;
use attrd::payload::{ResultPayload, SourceKind};
use attrd::pipeline::{Finished, NotStored, Pipeline, PipelineConfig};
use attrd::preprocess::{Limits, Preprocessor};
use attrd::sources::{Origin, Shot, ShotOutcome};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

/// One CPU engine for the whole test binary (clones share its session thread).
pub fn engine() -> Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| Engine::load(&Bundle::open(imagenet_bundle()).unwrap(), &EngineConfig::cpu()).unwrap()).clone()
}

pub fn engine_cell() -> Arc<ArcSwap<Engine>> {
    Arc::new(ArcSwap::from_pointee(engine()))
}

/// `n` distinct real product photos.
pub fn photos(n: usize) -> Vec<PathBuf> {
    let p: Vec<PathBuf> = fashion_rows().into_iter().map(|r| r.1).filter(|p| p.is_file()).take(n).collect();
    assert_eq!(p.len(), n, "not enough photos");
    p
}

pub fn cfg() -> PipelineConfig {
    PipelineConfig { max_batch: 8, max_wait: Duration::from_millis(50), decode_workers: 2, ..PipelineConfig::default() }
}

/// A fake outbox writer that answers every result durable and collects the payloads.
pub fn ack_all(mut rx: mpsc::Receiver<Finished>) -> tokio::task::JoinHandle<Vec<ResultPayload>> {
    tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(f) = rx.recv().await {
            f.durable.send(Ok(())).unwrap();
            got.push(f.payload);
        }
        got
    })
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

fn shot(sku: &str, path: &Path) -> (Shot, oneshot::Receiver<ShotOutcome>) {
    Shot::new(
        sku,
        std::fs::read(path).unwrap(),
        OffsetDateTime::now_utc(),
        Origin::Hotfolder { source: "studio-a".into(), path: path.to_path_buf(), version: None },
    )
}

/// Per-head probabilities of one image, run alone through the engine (the reference for batching and fusion).
pub async fn reference_probs(path: &Path) -> Vec<Vec<f32>> {
    let e = engine();
    let pre = Preprocessor::new(e.manifest().input.clone(), Limits::default()).unwrap();
    let t = pre.prepare_path(path).unwrap();
    e.infer(pre.batch(&[t])).await.unwrap().probabilities(e.manifest()).remove(0)
}

pub fn top1(a: &attrd::engine::Attributes) -> (String, f32) {
    let x = &a["imagenet"];
    (x.value.clone().unwrap(), x.confidence)
}

/// With `engine.sessions = 2` the pipeline keeps two batches in the engine at once, and every result is still what
/// its photo gives alone; with one session it never has two in at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_infer_two_batches_at_once_with_the_same_results() {
    let cpu2 = EngineConfig { sessions: 2, ..EngineConfig::cpu() };
    let two = Engine::load(&Bundle::open(imagenet_bundle()).unwrap(), &cpu2).unwrap();
    assert_eq!((two.parallelism(), engine().parallelism()), (2, 1));
    let files = photos(24);
    for (eng, sessions) in [(two, 2), (engine(), 1)] {
        let (out, out_rx) = mpsc::channel(64);
        // Batches of up to 4 take long enough on one thread for the decoders to prepare the next one meanwhile.
        let cfg = PipelineConfig { max_batch: 4, max_wait: Duration::from_millis(1), ..cfg() };
        let p = Pipeline::spawn(Arc::new(ArcSwap::from_pointee(eng)), cfg, "node-s", out).unwrap();
        let consumer = ack_all(out_rx);
        for rx in send_all(&p, &files, |_, _| {}).await {
            assert_eq!(rx.await.unwrap(), ShotOutcome::Durable);
        }
        drop(p.shots);
        p.task.await.unwrap();
        let got = consumer.await.unwrap();
        let st = p.stats.snapshot();
        assert_eq!((st.inferred, st.results, st.max_batches_running), (24, 24, sessions), "{st:?}");
        for (i, f) in files.iter().enumerate() {
            let r = got.iter().find(|r| r.sku == format!("SKU{i}")).unwrap();
            assert_same_as_alone(r, f).await;
        }
    }
}

/// Sends `files` as shots `SKU0`, `SKU1`, … (each changed by `edit` first); returns their outcome receivers.
async fn send_all(
    p: &Pipeline,
    files: &[PathBuf],
    edit: impl Fn(usize, &mut Shot),
) -> Vec<oneshot::Receiver<ShotOutcome>> {
    let mut waits = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let (mut s, rx) = shot(&format!("SKU{i}"), f);
        edit(i, &mut s);
        p.shots.send(s).await.unwrap();
        waits.push(rx);
    }
    waits
}

/// Batching must not mix images up: a result's top value and confidence are those of its photo run alone.
async fn assert_same_as_alone(r: &ResultPayload, f: &Path) {
    let want = postprocess::attributes(engine().manifest(), &reference_probs(f).await);
    let ((wv, wc), (gv, gc)) = (top1(&want), top1(&r.attributes));
    assert_eq!(gv, wv, "{}", f.display());
    assert!((gc - wc).abs() < 1e-4, "{gc} vs {wc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shots_from_several_sources_are_micro_batched_and_each_gets_its_own_result() {
    let (out, out_rx) = mpsc::channel(16);
    let cfg = PipelineConfig { max_batch: 4, max_wait: Duration::from_millis(400), ..cfg() };
    let p = Pipeline::spawn(engine_cell(), cfg, "node-a", out).unwrap();
    let consumer = ack_all(out_rx);
    let files = photos(8);
    // Half from a "hot folder", half from a "camera": batching does not care where shots come from.
    let waits = send_all(&p, &files, |i, s| {
        if i % 2 == 1 {
            s.origin = Origin::Fake { camera: "cam0".into() };
        }
    })
    .await;
    for rx in waits {
        assert_eq!(rx.await.unwrap(), ShotOutcome::Durable);
    }
    drop(p.shots);
    p.task.await.unwrap();
    let got = consumer.await.unwrap();
    assert_eq!(got.len(), 8);
    let st = p.stats.snapshot();
    assert_eq!((st.received, st.inferred, st.durable, st.results), (8, 8, 8, 8));
    assert!(st.max_batch_seen >= 2 && st.max_batch_seen <= 4, "{st:?}");
    assert!(st.batches < 8, "8 shots should need fewer than 8 inference calls with max_batch 4: {st:?}");
    for (i, f) in files.iter().enumerate() {
        let r = got.iter().find(|r| r.sku == format!("SKU{i}")).unwrap();
        assert_same_as_alone(r, f).await;
        assert_eq!(r.node, "node-a");
        assert_eq!(r.source.kind, if i % 2 == 1 { SourceKind::Fake } else { SourceKind::Hotfolder });
        assert_eq!(r.source.image_sha256, bundle::sha256_bytes(&std::fs::read(f).unwrap()));
        assert!(r.views.is_empty());
        assert_eq!(r.model.name, "imagenet-lite0");
        assert_eq!(r.model.execution_provider, "cpu");
        let l = r.latency_ms;
        assert!(l.decode_preprocess > 0.0 && l.infer > 0.0 && l.total >= l.infer, "{l:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_image_fails_alone_and_at_once_and_is_counted() {
    let (out, out_rx) = mpsc::channel(16);
    let metrics = Metrics::new();
    let p = Pipeline::spawn_with_metrics(engine_cell(), cfg(), "n", out, metrics.clone()).unwrap();
    let consumer = ack_all(out_rx);
    let good = photos(2);
    let (a, ra) = shot("A", &good[0]);
    let garbage = std::fs::read(repo().join("tests/fixtures/images/truncated.jpg")).unwrap();
    let (bad, rbad) =
        Shot::new("BAD", garbage, OffsetDateTime::now_utc(), Origin::Http { client: Some("10.0.0.9".into()) });
    let (empty, rempty) = Shot::new("EMPTY", Vec::new(), OffsetDateTime::now_utc(), Origin::Http { client: None });
    let (b, rb) = shot("B", &good[1]);
    for s in [a, bad, empty, b] {
        p.shots.send(s).await.unwrap();
    }
    match rbad.await.unwrap() {
        ShotOutcome::Failed(reason) => assert!(reason.contains("truncated"), "{reason}"),
        other => panic!("{other:?}"),
    }
    match rempty.await.unwrap() {
        ShotOutcome::Failed(reason) => assert!(reason.contains("empty"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(ra.await.unwrap(), ShotOutcome::Durable);
    assert_eq!(rb.await.unwrap(), ShotOutcome::Durable);
    drop(p.shots);
    p.task.await.unwrap();
    let got = consumer.await.unwrap();
    let mut skus: Vec<_> = got.iter().map(|r| r.sku.as_str()).collect();
    skus.sort();
    assert_eq!(skus, ["A", "B"]);
    let st = p.stats.snapshot();
    assert_eq!((st.decode_failed, st.failed, st.durable), (2, 2, 2));
    // The daemon's metrics see the same: images by source, both failures by kind, and every engine run's size.
    let text = metrics.encode();
    let value = |series: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("{series}:\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value(r#"attrd_images_total{source="studio-a"}"#), 2.0);
    assert_eq!(value(r#"attrd_images_total{source="http"}"#), 2.0);
    assert_eq!(value(r#"attrd_errors_total{kind="decode"}"#), 2.0);
    assert_eq!(value("attrd_batch_size_sum"), 2.0);
    assert_eq!(value("attrd_batch_size_count"), st.batches as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_views_of_one_sku_fuse_into_one_result_with_mean_probabilities() {
    let (out, mut out_rx) = mpsc::channel(16);
    let cfg = PipelineConfig { fusion_window: Duration::from_millis(600), ..cfg() };
    let p = Pipeline::spawn(engine_cell(), cfg, "n", out).unwrap();
    let files = photos(4);
    let mut views = Vec::new();
    for f in &files[..3] {
        let (s, rx) = shot("TRIPLE", f);
        p.shots.send(s).await.unwrap();
        views.push(rx);
    }
    let (single, rsingle) = shot("SINGLE", &files[3]);
    p.shots.send(single).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(tokio::time::timeout(Duration::from_secs(60), out_rx.recv()).await.unwrap().unwrap());
    }
    let i = got.iter().position(|f| f.payload.sku == "TRIPLE").unwrap();
    let triple = got.remove(i);
    let single_f = got.remove(0);
    assert_eq!(single_f.payload.sku, "SINGLE");
    assert!(single_f.payload.views.is_empty());
    let fused = &triple.payload;
    assert_eq!(fused.views.len(), 3);
    // The shots learn nothing until the outbox says the fused result is durable.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for rx in &mut views {
        assert!(matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
    }
    // Fused probabilities are the mean of the three views' probabilities.
    let mut refs = Vec::new();
    for f in &files[..3] {
        refs.push(reference_probs(f).await);
    }
    let mean = postprocess::mean_probabilities(&refs).unwrap();
    let want = postprocess::attributes(engine().manifest(), &mean);
    let (w, g) = (&want["imagenet"], &fused.attributes["imagenet"]);
    assert_eq!(g.value, w.value);
    for (a, b) in g.topk.iter().zip(&w.topk) {
        assert_eq!(a.value, b.value);
        assert!((a.confidence - b.confidence).abs() < 1e-4, "{} vs {}", a.confidence, b.confidence);
    }
    // Each view keeps its own result and source.
    let mut shas: Vec<_> = fused.views.iter().map(|v| v.source.image_sha256.clone()).collect();
    shas.sort();
    let mut want_shas: Vec<_> = files[..3].iter().map(|f| bundle::sha256_bytes(&std::fs::read(f).unwrap())).collect();
    want_shas.sort();
    assert_eq!(shas, want_shas);
    for v in &fused.views {
        let f = files[..3].iter().find(|f| v.source.path.as_deref() == Some(&f.display().to_string())).unwrap();
        let own = postprocess::attributes(engine().manifest(), &reference_probs(f).await);
        assert_eq!(top1(&v.attributes).0, top1(&own).0);
    }
    assert!(fused.latency_ms.total >= 600.0 - 50.0, "the fusion window is part of the latency: {:?}", fused.latency_ms);
    triple.durable.send(Ok(())).unwrap();
    single_f.durable.send(Ok(())).unwrap();
    for rx in views {
        assert_eq!(rx.await.unwrap(), ShotOutcome::Durable);
    }
    assert_eq!(rsingle.await.unwrap(), ShotOutcome::Durable);
    assert_eq!(p.stats.snapshot().results, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_that_cannot_store_means_retry_later_and_one_that_never_will_means_failed() {
    let (out, mut out_rx) = mpsc::channel(4);
    let p = Pipeline::spawn(engine_cell(), cfg(), "n", out).unwrap();
    let f = photos(2);
    let (s1, r1) = shot("FULL", &f[0]);
    p.shots.send(s1).await.unwrap();
    let fin = out_rx.recv().await.unwrap();
    fin.durable.send(Err(NotStored::Later("outbox full (10000 messages)".into()))).unwrap();
    match r1.await.unwrap() {
        ShotOutcome::RetryLater(reason) => assert!(reason.contains("outbox full"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let (s2, r2) = shot("DROPPED", &f[1]);
    p.shots.send(s2).await.unwrap();
    drop(out_rx.recv().await.unwrap());
    assert!(matches!(r2.await.unwrap(), ShotOutcome::RetryLater(_)));
    // With the outbox gone entirely, shots are still answered.
    drop(out_rx);
    let (s3, r3) = shot("NOOUTBOX", &f[0]);
    p.shots.send(s3).await.unwrap();
    assert!(matches!(r3.await.unwrap(), ShotOutcome::RetryLater(_)));
    drop(p.shots);
    p.task.await.unwrap();
    assert_eq!(p.stats.snapshot().retry_later, 3);

    // A result the outbox can never take fails its photo at once instead of being computed again forever.
    let (out, mut out_rx) = mpsc::channel(4);
    let p = Pipeline::spawn(engine_cell(), cfg(), "n", out).unwrap();
    let (s4, r4) = shot("NEVER", &f[0]);
    p.shots.send(s4).await.unwrap();
    let fin = out_rx.recv().await.unwrap();
    fin.durable.send(Err(NotStored::Never("message of 9000 bytes exceeds the outbox limit".into()))).unwrap();
    match r4.await.unwrap() {
        ShotOutcome::Failed(reason) => assert!(reason.contains("exceeds the outbox limit"), "{reason}"),
        other => panic!("{other:?}"),
    }
    drop(p.shots);
    p.task.await.unwrap();
    let s = p.stats.snapshot();
    assert_eq!((s.failed, s.retry_later), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_consumer_stops_intake_and_everything_completes_when_it_resumes() {
    const N: usize = 40;
    let (out, mut out_rx) = mpsc::channel(1);
    let cfg = PipelineConfig { max_batch: 2, queue: 2, decode_workers: 1, max_wait: Duration::from_millis(5), ..cfg() };
    let p = Pipeline::spawn(engine_cell(), cfg, "n", out).unwrap();
    let files = photos(4);
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tx = p.shots.clone();
    let counter = sent.clone();
    let producer = tokio::spawn(async move {
        let mut rxs = Vec::new();
        for i in 0..N {
            let (s, rx) = shot(&format!("S{i}"), &files[i % files.len()]);
            tx.send(s).await.unwrap();
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            rxs.push(rx);
        }
        rxs
    });
    // Let the pipeline fill up while nobody consumes `out`.
    let stats = p.stats.clone();
    let mut last = u64::MAX;
    assert!(
        eventually(Duration::from_secs(30), || {
            let r = stats.snapshot().received;
            let settled = r == last && r > 0;
            last = r;
            settled
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = p.stats.snapshot();
    // What may be inside: one per decode worker, the prepared channel (max_batch), the batch being collected or run
    // (max_batch) plus one carried over, the view channel (max_batch), the view the emitter is sending, and `out`.
    let bound = 1 + 2 + 2 + 1 + 2 + 1 + 1;
    assert!(st.received <= bound, "intake did not stop: {st:?} (bound {bound})");
    assert!(st.results <= 2, "{st:?}");
    let s = sent.load(std::sync::atomic::Ordering::SeqCst);
    assert!(s < N && s as u64 <= st.received + 2 + 1, "sources were not held back: sent {s}, {st:?}");
    assert_eq!(st.durable, 0);
    // Resume: everything completes.
    let consumer = tokio::spawn(async move {
        let mut n = 0;
        while let Some(f) = out_rx.recv().await {
            f.durable.send(Ok(())).unwrap();
            n += 1;
        }
        n
    });
    let rxs = producer.await.unwrap();
    for rx in rxs {
        assert_eq!(rx.await.unwrap(), ShotOutcome::Durable);
    }
    drop(p.shots);
    p.task.await.unwrap();
    assert_eq!(consumer.await.unwrap(), N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_model_serves_the_next_shots() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Bundle::open(imagenet_bundle()).unwrap();
    let mut m = src.manifest().clone();
    m.name = "imagenet-lite0-b".into();
    m.version = semver::Version::new(2, 0, 0);
    let b = bundle::write(
        &tmp.path().join("b"),
        NewBundle { manifest: m, onnx: &src.onnx_path(), golden: None, signing_key: None },
    )
    .unwrap();
    let second = Engine::load(&b, &EngineConfig::cpu()).unwrap();
    let cell = engine_cell();
    let (out, out_rx) = mpsc::channel(8);
    let p = Pipeline::spawn(cell.clone(), cfg(), "n", out).unwrap();
    let consumer = ack_all(out_rx);
    let f = photos(1);
    let (s, r) = shot("BEFORE", &f[0]);
    p.shots.send(s).await.unwrap();
    assert_eq!(r.await.unwrap(), ShotOutcome::Durable);
    cell.store(Arc::new(second));
    let (s, r) = shot("AFTER", &f[0]);
    p.shots.send(s).await.unwrap();
    assert_eq!(r.await.unwrap(), ShotOutcome::Durable);
    drop(p.shots);
    p.task.await.unwrap();
    let got = consumer.await.unwrap();
    assert_eq!(got[0].model.name, "imagenet-lite0");
    assert_eq!((got[1].model.name.as_str(), got[1].model.version.as_str()), ("imagenet-lite0-b", "2.0.0"));
    assert_eq!(top1(&got[0].attributes), top1(&got[1].attributes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_payloads_validate_against_the_result_schema() {
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("docs/schemas/result.schema.json")).unwrap())
            .unwrap();
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let (out, out_rx) = mpsc::channel(8);
    let cfg = PipelineConfig { fusion_window: Duration::from_millis(300), ..cfg() };
    let p = Pipeline::spawn(engine_cell(), cfg, "edge-01", out).unwrap();
    let consumer = ack_all(out_rx);
    let f = photos(3);
    let mut rxs = Vec::new();
    for (sku, file) in [("FUSED", &f[0]), ("FUSED", &f[1]), ("ALONE", &f[2])] {
        let (s, r) = shot(sku, file);
        p.shots.send(s).await.unwrap();
        rxs.push(r);
    }
    let (cam, rcam) = Shot::new(
        "CAM",
        std::fs::read(&f[2]).unwrap(),
        OffsetDateTime::now_utc(),
        Origin::V4l2 { camera: "video0".into() },
    );
    p.shots.send(cam).await.unwrap();
    rxs.push(rcam);
    for r in rxs {
        assert_eq!(r.await.unwrap(), ShotOutcome::Durable);
    }
    drop(p.shots);
    p.task.await.unwrap();
    let got = consumer.await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(got.iter().any(|r| r.views.len() == 2));
    for r in &got {
        // As the pipeline hands it over, and as the outbox/publisher complete it.
        let mut v = r.to_value().unwrap();
        let errors: Vec<String> = validator.iter_errors(&v).map(|e| format!("{e} at {}", e.instance_path)).collect();
        assert!(errors.is_empty(), "{errors:?}\n{v:#}");
        v["message_id"] = "0190a5c8-7a7e-7c3e-9f00-000000000001".into();
        v["seq"] = 42.into();
        v["published_at"] = "2026-01-01T00:00:00.123Z".into();
        assert!(validator.is_valid(&v));
        let back: ResultPayload = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back.seq, 42);
        // The schema rejects what the Rust side would never write.
        let mut bad = v.clone();
        bad["surprise"] = 1.into();
        assert!(!validator.is_valid(&bad));
        let mut bad = v.clone();
        bad["source"]["type"] = "ftp".into();
        assert!(!validator.is_valid(&bad));
        let mut bad = v.clone();
        bad["schema_version"] = 2.into();
        assert!(!validator.is_valid(&bad));
        let mut bad = v;
        bad["attributes"]["imagenet"]["decision"] = "maybe".into();
        assert!(!validator.is_valid(&bad));
    }
    let cam = got.iter().find(|r| r.sku == "CAM").unwrap().to_value().unwrap();
    assert_eq!(cam["source"]["type"], "v4l2");
    assert_eq!(cam["source"]["camera"], "video0");
    assert_eq!(cam["source"]["path"], serde_json::Value::Null);
}
