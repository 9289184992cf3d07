//! `fit` on real catalogue photos: a short run from the real ImageNet Lite0 weights must lower the loss, write its
//! checkpoints and metrics, and continue with `resume`.

use crate::common::{fashion_dir, lite0_checkpoint};

use std::path::Path;
use trainer::torch::fit::{self, FitInput, RunState};
use trainer::train::TrainConfig;
use trainer::train::data::{self, HeadSpec, ItemSpec, Target};
use trainer::weights::{self, ImportOptions};

/// The first `n` rows of labels.csv as items with `masterCategory` and `gender` heads (every 7th gender unknown).
fn items(dir: &Path, n: usize) -> (Vec<HeadSpec>, Vec<ItemSpec>) {
    let mut rdr = csv::Reader::from_path(dir.join("labels.csv")).unwrap();
    let headers = rdr.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let (id, file, master, gender) = (col("id"), col("file"), col("masterCategory"), col("gender"));
    let rows: Vec<csv::StringRecord> = rdr.records().take(n).map(Result::unwrap).collect();
    let classes = |c: usize| {
        let mut v: Vec<String> = rows.iter().map(|r| r[c].to_string()).collect();
        v.sort();
        v.dedup();
        v
    };
    let heads = vec![
        HeadSpec { name: "masterCategory".into(), classes: classes(master), multi_label: false },
        HeadSpec { name: "gender".into(), classes: classes(gender), multi_label: false },
    ];
    let items = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let m = heads[0].classes.iter().position(|c| c == &r[master]).unwrap();
            let g = heads[1].classes.iter().position(|c| c == &r[gender]).unwrap();
            let g = if i % 7 == 3 { Target::Missing } else { Target::Class(g) };
            (r[id].to_string(), dir.join(&r[file]), vec![Target::Class(m), g], r[id].to_string())
        })
        .collect();
    (heads, items)
}

/// The model `fit` starts from: the backbone with fresh heads.
fn untrained_model(backbone: &weights::Backbone, heads: &[HeadSpec]) -> trainer::torch::EffNet {
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let specs: Vec<(String, usize)> = heads.iter().map(|h| (h.name.clone(), h.classes.len())).collect();
    trainer::torch::EffNet::from_backbone(&mut vs, backbone, &specs, 0.2).unwrap()
}

fn config(epochs: usize) -> TrainConfig {
    let mut cfg: TrainConfig = toml::from_str(
        r#"
        epochs = 2
        batch_size = 32
        lr = 0.001
        warmup_epochs = 0.25
        device = "cpu"
        repeat_factor_threshold = 0.0
        early_stopping_patience = 0
        [input]
        width = 64
        height = 64
        "#,
    )
    .unwrap();
    cfg.epochs = epochs;
    cfg
}

#[test]
fn a_short_fine_tune_lowers_the_loss_writes_checkpoints_and_resumes() {
    let lite0 = lite0_checkpoint();
    let (backbone, _) = weights::import(&lite0, &ImportOptions::default()).unwrap();
    let (heads, specs) = items(&fashion_dir(), 320);
    let pre = data::preprocessor(config(2).input_spec()).unwrap();
    let (examples, failed) = data::load_examples(specs, &pre, |_| {});
    assert!(failed.is_empty(), "{failed:?}");
    let (train, val) = examples.split_at(256);
    let out = tempfile::tempdir().unwrap();

    // One epoch, then resume for the second.
    let run = |epochs: usize, resume: bool| {
        fit::fit(FitInput {
            cfg: &config(epochs),
            heads: &heads,
            train,
            val,
            out_dir: out.path(),
            resume,
            backbone: Some(&backbone),
            dataset_fingerprint: Some("sha256:test".into()),
            progress: false,
        })
        .unwrap()
    };
    let first = run(1, false);
    assert_eq!(first.state.epochs_done, 1);
    let second = run(2, true);
    let s: &RunState = &second.state;
    assert_eq!(s.epochs_done, 2);
    assert_eq!(s.log.len(), 2);
    // Fresh heads are zero, so the untrained model predicts the uniform distribution and its loss is ln(classes)
    // per head (label smoothing keeps that value). Each head, the gender head with one label in seven masked out
    // included, must end well below it. Epoch-to-epoch differences are no signal here: after warm-up both short
    // epochs sit within a few percent of each other, and which one is lower changed with the CPU thread count.
    let ln_k: Vec<f64> = heads.iter().map(|h| (h.classes.len() as f64).ln()).collect();
    let untrained =
        fit::predict(&untrained_model(&backbone, &heads), val, &heads, &pre, tch::Device::Cpu, 32, false, false)
            .unwrap();
    for (h, p) in untrained.iter().enumerate() {
        let uniform = 1.0 / heads[h].classes.len() as f32;
        assert!(p.iter().all(|&v| (v - uniform).abs() < 1e-6), "untrained head {h} is not uniform");
    }
    assert_eq!(s.log[1].head_loss.len(), ln_k.len());
    for (h, (&last, &ln)) in s.log[1].head_loss.iter().zip(&ln_k).enumerate() {
        assert!(
            last.is_finite() && last < 0.8 * ln,
            "head {h} loss {last} not below 0.8 ln k = {}; {:?}",
            0.8 * ln,
            s.log
        );
    }
    let total = s.log[1].train_loss;
    assert!(total < 0.8 * ln_k.iter().sum::<f64>(), "training loss {total} vs untrained {}", ln_k.iter().sum::<f64>());
    for f in [fit::RUN_FILE, fit::LAST_WEIGHTS, fit::BEST_WEIGHTS, fit::METRICS_CSV] {
        assert!(out.path().join(f).is_file(), "{f} missing");
    }
    let csv = std::fs::read_to_string(out.path().join(fit::METRICS_CSV)).unwrap();
    assert_eq!(csv.lines().count(), 3, "header and two epochs:\n{csv}");
    assert!(csv.lines().next().unwrap().contains("val_macro_f1_gender"));

    // The saved run loads back and predicts what the training run measured.
    let (state, _vs, model) = fit::load_run(out.path(), tch::Device::Cpu).unwrap();
    assert_eq!(state.heads, heads);
    let probs = fit::predict(&model, val, &heads, &pre, tch::Device::Cpu, 32, false, false).unwrap();
    let (f1, _) = fit::head_scores(&heads, val, &probs).unwrap();
    let best = &s.log[s.best_epoch - 1];
    assert!((f1[0] - best.val_macro_f1[0]).abs() < 1e-9, "{f1:?} vs {:?}", best.val_macro_f1);
}

/// Missing and not-applicable labels contribute nothing: the masked loss equals the loss computed by hand over the
/// known labels only, for softmax and for sigmoid heads.
#[test]
fn unknown_labels_are_masked_out_of_the_loss() {
    use tch::{Device, Tensor};
    use trainer::train::data::{HeadTargets, IGNORE};
    let logits = Tensor::from_slice(&[2.0f32, 0.5, -1.0, 9.0, 9.0, 9.0, 0.1, 0.2, 3.0, -5.0, 7.0, 1.0]).view([4, 3]);
    let t = HeadTargets::Single(vec![0, IGNORE, 2, IGNORE]);
    let got = fit::head_loss(&logits, &t, 0.0, None, Device::Cpu).unwrap().unwrap().double_value(&[]);
    let nll = |row: [f64; 3], c: usize| {
        let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
        lse - row[c]
    };
    let want = (nll([2.0, 0.5, -1.0], 0) + nll([0.1, 0.2, 3.0], 2)) / 2.0;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    assert!(fit::head_loss(&logits, &HeadTargets::Single(vec![IGNORE; 4]), 0.0, None, Device::Cpu).unwrap().is_none());

    let logits = Tensor::from_slice(&[1.0f32, -2.0, 50.0, -50.0]).view([2, 2]);
    let t = HeadTargets::Multi { targets: vec![1.0, 0.0, 0.0, 0.0], mask: vec![1.0, 1.0, 0.0, 0.0], classes: 2 };
    let got = fit::head_loss(&logits, &t, 0.0, None, Device::Cpu).unwrap().unwrap().double_value(&[]);
    let bce =
        |x: f64, y: f64| -(y * (1.0 / (1.0 + (-x).exp())).ln() + (1.0 - y) * (1.0 - 1.0 / (1.0 + (-x).exp())).ln());
    let want = (bce(1.0, 1.0) + bce(-2.0, 0.0)) / 2.0;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

/// Head-only training on cached features: the backbone runs once, the heads learn, the backbone's weights (batch
/// norm statistics included) stay exactly the pretrained ones, and the validation score measured on the cache is
/// what a full forward pass of the saved model gives.
#[test]
fn cached_frozen_features_train_the_heads_and_leave_the_backbone_untouched() {
    let lite0 = lite0_checkpoint();
    let (backbone, _) = weights::import(&lite0, &ImportOptions::default()).unwrap();
    let (heads, specs) = items(&fashion_dir(), 480);
    let mut cfg = config(4);
    cfg.freeze_backbone_epochs = 4;
    cfg.cache_frozen_features = true;
    cfg.lr = 0.01;
    let pre = data::preprocessor(cfg.input_spec()).unwrap();
    let (examples, failed) = data::load_examples(specs, &pre, |_| {});
    assert!(failed.is_empty(), "{failed:?}");
    let (train, val) = examples.split_at(384);
    let out = tempfile::tempdir().unwrap();
    let summary = fit::fit(FitInput {
        cfg: &cfg,
        heads: &heads,
        train,
        val,
        out_dir: out.path(),
        resume: false,
        backbone: Some(&backbone),
        dataset_fingerprint: None,
        progress: false,
    })
    .unwrap();
    let s = &summary.state;
    assert_eq!(s.epochs_done, 4);
    let (first, last) = (s.log[0].train_loss, s.log[3].train_loss);
    assert!(last < first, "training loss did not fall: {first} -> {last}");
    assert!(s.log.iter().any(|l| l.val_accuracy[1] > 0.6), "gender accuracy {:?}", s.log);

    let (state, vs, model) = fit::load_run(out.path(), tch::Device::Cpu).unwrap();
    let mut fresh_vs = tch::nn::VarStore::new(tch::Device::Cpu);
    fit::build_model(&mut fresh_vs, &state, Some(&backbone)).unwrap();
    let fresh = fresh_vs.variables();
    let mut compared = 0;
    for (name, v) in vs.variables() {
        if name.starts_with("heads") {
            continue;
        }
        let want = &fresh[&name];
        assert!(v.equal(want), "backbone variable {name} changed");
        compared += 1;
    }
    assert!(compared > 100, "only {compared} backbone variables compared");

    let probs = fit::predict(&model, val, &heads, &pre, tch::Device::Cpu, 32, false, false).unwrap();
    let (f1, _) = fit::head_scores(&heads, val, &probs).unwrap();
    let best = &s.log[s.best_epoch - 1];
    for (got, want) in f1.iter().zip(&best.val_macro_f1) {
        assert!((got - want).abs() < 1e-6, "full forward {f1:?} vs cached {:?}", best.val_macro_f1);
    }

    cfg.freeze_backbone_epochs = 0;
    let err = cfg.validate(&["masterCategory".into(), "gender".into()]).unwrap_err();
    assert!(err.to_string().contains("cache_frozen_features needs freeze_backbone_epochs"), "{err}");
}
