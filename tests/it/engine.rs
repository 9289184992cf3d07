//! The ONNX Runtime engine on the real ImageNet Lite0 bundle and real product photos.

use crate::common::{fashion_rows, imagenet_bundle};
use attrd::bundle::{self, Bundle, NewBundle};
use attrd::engine::{Decision, Engine, EngineConfig, EngineError, Provider};
use attrd::preprocess::{Limits, Preprocessor};
use std::path::PathBuf;
use std::sync::OnceLock;

fn engine() -> &'static (Bundle, Engine) {
    static E: OnceLock<(Bundle, Engine)> = OnceLock::new();
    E.get_or_init(|| {
        let b = Bundle::open(imagenet_bundle()).unwrap();
        let e = Engine::load(&b, &EngineConfig::cpu()).unwrap();
        (b, e)
    })
}

/// ImageNet class indices that are a right answer for a catalog articleType.
fn imagenet_targets(article: &str) -> Option<&'static [usize]> {
    Some(match article {
        "Tshirts" => &[610],           // jersey, T-shirt
        "Backpacks" => &[414],         // backpack
        "Sandals" => &[774],           // sandal
        "Sports Shoes" => &[770],      // running shoe
        "Sunglasses" => &[836, 837],   // sunglass, sunglasses
        "Watches" => &[531, 826, 409], // digital watch, stopwatch, analog clock
        "Jeans" => &[608],             // jean
        _ => return None,
    })
}

/// The acceptance test: real product photos, real pretrained weights, our exporter's ONNX, ORT.
#[test]
fn imagenet_lite0_ranks_the_right_class_in_the_top5_for_real_product_photos() {
    let (bundle, engine) = engine();
    let pre = Preprocessor::new(bundle.manifest().input.clone(), Limits::default()).unwrap();
    // Deterministic sample: the first 8 photos of each mapped category, in labels.csv order.
    let mut per_cat = std::collections::HashMap::<String, usize>::new();
    let sample: Vec<(PathBuf, String)> = fashion_rows()
        .into_iter()
        .filter(|(_, _, art)| imagenet_targets(art).is_some())
        .filter(|(_, _, art)| {
            let n = per_cat.entry(art.clone()).or_default();
            *n += 1;
            *n <= 8
        })
        .map(|(_, f, art)| (f, art))
        .collect();
    assert_eq!(sample.len(), 56);
    let tensors: Vec<Vec<f32>> = sample.iter().map(|(f, _)| pre.prepare_path(f).unwrap()).collect();
    let mut hits = 0;
    let mut misses = Vec::new();
    for (chunk, items) in tensors.chunks(16).zip(sample.chunks(16)) {
        let out = engine.infer_blocking(pre.batch(chunk)).unwrap();
        let probs = out.probabilities(engine.manifest());
        for (p, (file, art)) in probs.iter().zip(items) {
            let top5 = attrd::engine::postprocess::top_k_indices(&p[0], 5);
            if top5.iter().any(|c| imagenet_targets(art).unwrap().contains(c)) {
                hits += 1;
            } else {
                misses.push(format!("{} ({art})", file.display()));
            }
        }
    }
    // Measured 39/56 (jeans are the weak class); a Pillow + PyTorch reference of the same network gets 38/56 on these
    // photos, so the margin below is for platform noise, not for a known gap. The issue asks for at least 20.
    assert!(hits >= 34, "only {hits}/56 photos had the right class in the top 5; misses: {misses:#?}");
}

#[test]
fn outputs_are_probabilities_with_topk_and_decisions() {
    let (bundle, engine) = engine();
    let pre = Preprocessor::new(bundle.manifest().input.clone(), Limits::default()).unwrap();
    let tshirt = fashion_rows().into_iter().find(|r| r.2 == "Tshirts").unwrap().1;
    let t = pre.prepare_path(&tshirt).unwrap();
    let out = engine.infer_blocking(pre.batch(&[t.clone(), t])).unwrap();
    assert_eq!(out.logits[0].shape(), &[2, 1000]);
    // Same image twice in one batch gives the same answer.
    assert_eq!(out.logits[0].row(0), out.logits[0].row(1));
    let attrs = out.attributes(engine.manifest());
    let a = &attrs[0]["imagenet"];
    assert_eq!(a.topk.len(), 5);
    assert!(a.topk.windows(2).all(|w| w[0].confidence >= w[1].confidence));
    assert_eq!(a.value.as_deref(), Some(a.topk[0].value.as_str()));
    let p = &out.probabilities(engine.manifest())[0][0];
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    assert_eq!(a.accepted, a.confidence >= 0.25);
    assert_eq!(a.decision, if a.accepted { Decision::Accepted } else { Decision::Abstain });
}

#[test]
fn missing_gpu_providers_fall_back_to_cpu_and_say_why() {
    let (bundle, _) = engine();
    let cfg =
        EngineConfig { providers: vec![Provider::Cuda, Provider::TensorRt, Provider::Cpu], ..EngineConfig::default() };
    let e = Engine::load(bundle, &cfg).unwrap();
    let r = e.providers();
    assert_eq!(r.active, Provider::Cpu);
    let failed: Vec<Provider> = r.fallbacks.iter().map(|f| f.provider).collect();
    assert_eq!(failed, vec![Provider::Cuda, Provider::TensorRt]);
    assert!(r.fallbacks.iter().all(|f| !f.reason.is_empty()));
}

#[test]
fn wrong_batch_shape_is_rejected() {
    let (_, engine) = engine();
    let err = engine.infer_blocking(ndarray::Array4::zeros((1, 3, 100, 100))).unwrap_err();
    assert!(matches!(err, EngineError::BadBatch { .. }), "{err}");
}

/// A manifest that disagrees with its graph is refused with a message naming the disagreement.
#[test]
fn manifest_and_graph_mismatches_are_refused() {
    let (src, _) = engine();
    let tmp = tempfile::tempdir().unwrap();
    type Edit = Box<dyn Fn(&mut attrd::bundle::Manifest)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("head renamed", Box::new(|m| m.heads[0].name = "colour".into()), "no graph output"),
        (
            "class count",
            Box::new(|m| {
                m.heads[0].classes.truncate(999);
                m.heads[0].thresholds.truncate(999);
            }),
            "[batch, 999]",
        ),
        ("input size", Box::new(|m| m.input.width = 192), "[batch, 3, 224, 192]"),
        ("input name", Box::new(|m| m.input_name = "pixels".into()), "\"pixels\""),
    ];
    for (i, (what, edit, expect)) in cases.into_iter().enumerate() {
        let mut m = src.manifest().clone();
        edit(&mut m);
        let dir = tmp.path().join(format!("case{i}"));
        let b = bundle::write(&dir, NewBundle { manifest: m, onnx: &src.onnx_path(), golden: None, signing_key: None })
            .unwrap();
        let err = Engine::load(&b, &EngineConfig::cpu()).expect_err(what);
        assert!(matches!(err, EngineError::Mismatch(_)), "{what}: {err}");
        assert!(err.to_string().contains(expect), "{what}: {err} does not mention {expect}");
    }
}

#[tokio::test]
async fn async_inference_matches_blocking() {
    let (bundle, engine) = engine();
    let pre = Preprocessor::new(bundle.manifest().input.clone(), Limits::default()).unwrap();
    let f = fashion_rows().into_iter().find(|r| r.2 == "Backpacks").unwrap().1;
    let batch = pre.batch(&[pre.prepare_path(&f).unwrap()]);
    let a = engine.infer(batch.clone()).await.unwrap();
    let b = tokio::task::spawn_blocking(move || engine.infer_blocking(batch)).await.unwrap().unwrap();
    assert_eq!(a.logits, b.logits);
}

/// The first four catalogue photos as one batch for `bundle`.
fn four_photos(bundle: &Bundle) -> ndarray::Array4<f32> {
    let pre = Preprocessor::new(bundle.manifest().input.clone(), Limits::default()).unwrap();
    let photos: Vec<_> = fashion_rows().into_iter().take(4).map(|r| pre.prepare_path(&r.1).unwrap()).collect();
    pre.batch(&photos)
}

/// Threads that sleep between operators (`intra_spinning = false`, for decode-bound boxes) compute the same logits,
/// with two intra-op threads so the setting has a pool to act on.
#[test]
fn intra_op_spinning_off_gives_the_same_results() {
    let (bundle, engine) = engine();
    let batch = four_photos(bundle);
    let sleepy =
        Engine::load(bundle, &EngineConfig { intra_threads: 2, intra_spinning: false, ..EngineConfig::cpu() }).unwrap();
    assert!(EngineConfig::default().intra_spinning, "ORT's default stays the default");
    let (a, b) = (engine.infer_blocking(batch.clone()).unwrap(), sleepy.infer_blocking(batch).unwrap());
    for (x, y) in a.logits.iter().zip(&b.logits) {
        let diff = x.iter().zip(y.iter()).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "max |Δlogit| {diff}");
    }
}

/// Two sessions run two batches at the same time (their runs overlap), each giving what one session gives alone.
#[test]
fn two_sessions_run_batches_at_the_same_time_with_the_same_results() {
    let (bundle, _) = engine();
    let batch = four_photos(bundle);
    let one = Engine::load(bundle, &EngineConfig { intra_threads: 1, ..EngineConfig::cpu() }).unwrap();
    let two = Engine::load(bundle, &EngineConfig { intra_threads: 1, sessions: 2, ..EngineConfig::cpu() }).unwrap();
    assert_eq!((one.parallelism(), two.parallelism()), (1, 2));
    let want = one.infer_blocking(batch.clone()).unwrap();
    let outs: Vec<_> = std::thread::scope(|scope| {
        let callers: Vec<_> = (0..2)
            .map(|_| scope.spawn(|| (0..6).map(|_| two.infer_blocking(batch.clone()).unwrap()).collect::<Vec<_>>()))
            .collect();
        callers.into_iter().flat_map(|c| c.join().unwrap()).collect()
    });
    for out in &outs {
        assert_eq!(out.logits, want.logits, "one thread per session in both engines: the same kernels");
    }
    let overlap = outs.iter().enumerate().any(|(i, a)| {
        outs[i + 1..].iter().any(|b| {
            let (a0, a1) = (a.run_started, a.run_started + a.run_time);
            let (b0, b1) = (b.run_started, b.run_started + b.run_time);
            a0 < b1 && b0 < a1
        })
    });
    assert!(overlap, "no two of 12 batches from two callers ran at the same time");
}

/// What a session runs is what was verified: a model file changed after the bundle was opened (and its hashes
/// checked) is refused when the session is built, and so is a changed golden image when it is read.
#[test]
fn files_changed_after_verification_are_refused_not_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    crate::common::copy_dir(&imagenet_bundle(), &dir);
    let b = Bundle::open(&dir).unwrap();
    let item = b.golden().unwrap().unwrap().items[0].clone();
    let mut onnx = std::fs::OpenOptions::new().append(true).open(b.onnx_path()).unwrap();
    std::io::Write::write_all(&mut onnx, b"swapped").unwrap();
    drop(onnx);
    match Engine::load(&b, &EngineConfig::default()) {
        Err(EngineError::Session { reason, .. }) => assert!(reason.contains("model.onnx"), "{reason}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a model changed after verification was loaded"),
    }
    std::fs::write(b.golden_image_path(&item), b"not the golden image").unwrap();
    let e = b.read_golden_image(&item).unwrap_err();
    assert!(matches!(e, bundle::BundleError::HashMismatch { .. }), "{e}");
}
