//! The libtorch EfficientNet (`trainer::torch`): variable names and shapes, weight round trips, numerical agreement
//! with an independent PyTorch reference, gradient flow, and real ImageNet weights on real product photos.

use crate::common::{fashion_dir, lite0_checkpoint, manifest_dir};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use trainer::effnet::{Arch, Padding};
use trainer::torch::{
    EffNet, TorchError, classifier_as_head, export_backbone, export_heads, load_backbone, load_heads,
};
use trainer::weights::{self, Backbone, ImportOptions, LinearHead, Provenance, Tensor as Canon};

fn heads(spec: &[(&str, usize)]) -> Vec<(String, usize)> {
    spec.iter().map(|(n, c)| (n.to_string(), *c)).collect()
}

fn build(arch: Arch, padding: Padding, bn_eps: f64, h: &[(String, usize)]) -> (nn::VarStore, EffNet) {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = EffNet::new(&vs.root(), arch, padding, bn_eps, h, 0.2).unwrap();
    (vs, model)
}

fn shapes(vs: &nn::VarStore) -> BTreeMap<String, Vec<usize>> {
    vs.variables().into_iter().map(|(n, t)| (n, t.size().iter().map(|&d| d as usize).collect())).collect()
}

// ---- the closed-form weights shared with fixtures/torch/make_reference.py ----------------------------------------

/// `noise(j, k)`: splitmix64 of `k * 2^32 + j`, top 24 bits mapped to [-1, 1) (exact in f32). Mirrors `noise` in
/// make_reference.py bit for bit, which is why it is integer hashing rather than a transcendental formula.
fn noise(n: usize, k: usize) -> impl Iterator<Item = f64> {
    (0..n as u64).map(move |j| {
        let mut z = ((k as u64) << 32).wrapping_add(j).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f64 / f64::from(1u32 << 24) * 2.0 - 1.0
    })
}

/// Mirrors `formula_value` in make_reference.py.
fn formula_value(name: &str, shape: &[usize], k: usize) -> Canon {
    let n = shape.iter().product();
    let f: Box<dyn Fn(f64) -> f64> = if name.ends_with("running_var") {
        Box::new(|w| 0.5 + 0.25 * (1.0 + w))
    } else if name.contains(".bn.weight") {
        Box::new(|w| 1.0 + 0.2 * w)
    } else if name.ends_with("bias") || name.ends_with("running_mean") {
        Box::new(|w| 0.1 * w)
    } else if shape.len() == 4 {
        let scale = (6.0 / (shape[1] * shape[2] * shape[3]) as f64).sqrt();
        Box::new(move |w| scale * w)
    } else {
        let scale = (3.0 / shape[1] as f64).sqrt();
        Box::new(move |w| scale * w)
    };
    Canon::new(shape.to_vec(), noise(n, k).map(|w| f(w) as f32).collect())
}

/// Backbone and heads from the formula: tensor numbers run over the backbone tensors in `backbone_tensors` order,
/// then each head's weight and bias.
fn formula_weights(arch: Arch, padding: Padding, bn_eps: f32, h: &[(String, usize)]) -> (Backbone, Vec<LinearHead>) {
    let specs = arch.backbone_tensors();
    let tensors = specs.iter().enumerate().map(|(k, (n, s))| (n.clone(), formula_value(n, s, k))).collect();
    let backbone = Backbone { arch, padding, bn_eps, tensors, provenance: Provenance::default() };
    let heads = h
        .iter()
        .enumerate()
        .map(|(i, (name, classes))| {
            let k = specs.len() + 2 * i;
            LinearHead {
                name: name.clone(),
                weight: formula_value(&format!("heads.{name}.weight"), &[*classes, 1280], k),
                bias: formula_value(&format!("heads.{name}.bias"), &[*classes], k + 1),
            }
        })
        .collect();
    (backbone, heads)
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).reshape([-1])).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

// ---- names, shapes, parameter counts --------------------------------------------------------------------------

fn assert_canonical_variables(arch: Arch, expected_params: usize) {
    let h = heads(&[("imagenet", 1000)]);
    let (vs, _) = build(arch, Padding::Symmetric, 1e-3, &h);
    let mut expected: BTreeMap<String, Vec<usize>> = arch.backbone_tensors().into_iter().collect();
    expected.insert("heads.imagenet.weight".into(), vec![1000, 1280]);
    expected.insert("heads.imagenet.bias".into(), vec![1000]);
    let got = shapes(&vs);
    let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{arch}: missing {missing:?}, unexpected {extra:?}");
    assert_eq!(got, expected, "{arch}: shapes differ");

    // Running statistics are buffers, everything else trains.
    let params: usize = vs.trainable_variables().iter().map(|t| t.numel()).sum();
    assert_eq!(params, expected_params, "{arch}: trainable parameter count");
    let buffers = got.keys().filter(|n| n.ends_with("running_mean") || n.ends_with("running_var")).count();
    assert_eq!(vs.trainable_variables().len() + buffers, got.len());
}

#[test]
fn b0_variables_are_exactly_the_canonical_tensors_plus_heads() {
    // torchvision's efficientnet_b0 has 5,288,548 parameters with its 1000-class classifier.
    assert_canonical_variables(Arch::B0, 5_288_548);
}

#[test]
fn lite0_variables_are_exactly_the_canonical_tensors_plus_heads() {
    assert_canonical_variables(Arch::Lite0, 4_652_008);
}

#[test]
fn bad_configurations_are_rejected() {
    let vs = nn::VarStore::new(Device::Cpu);
    let new = |h: &[(&str, usize)], dropout| {
        EffNet::new(&vs.root(), Arch::Lite0, Padding::Symmetric, 1e-3, &heads(h), dropout).map(|_| ())
    };
    assert!(matches!(new(&[("a.b", 2)], 0.2), Err(TorchError::BadHeadName(_))));
    assert!(matches!(new(&[("", 2)], 0.2), Err(TorchError::BadHeadName(_))));
    assert!(matches!(new(&[("a", 2), ("a", 3)], 0.2), Err(TorchError::DuplicateHead(_))));
    assert!(matches!(new(&[("a", 0)], 0.2), Err(TorchError::EmptyHead(_))));
    assert!(matches!(new(&[("a", 2)], 1.0), Err(TorchError::BadProbability { .. })));

    let (_vs, model) = build(Arch::Lite0, Padding::Symmetric, 1e-3, &heads(&[("a", 2)]));
    let gray = Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu));
    assert!(matches!(model.f_forward_heads_t(&gray, false), Err(TorchError::BadInput(s)) if s == [1, 1, 32, 32]));
    let flat = Tensor::zeros([3, 32, 32], (Kind::Float, Device::Cpu));
    assert!(matches!(model.f_features_t(&flat, false), Err(TorchError::BadInput(_))));
}

// ---- load / export ----------------------------------------------------------------------------------------------

#[test]
fn load_then_export_round_trips_exactly() {
    for arch in [Arch::B0, Arch::Lite0] {
        let h = heads(&[("color", 5), ("sleeve", 3)]);
        let (backbone, head_weights) = formula_weights(arch, Padding::TfSame, 1e-3, &h);
        let (mut vs, model) = build(arch, Padding::TfSame, 1e-3, &h);
        load_backbone(&mut vs, &backbone).unwrap();
        load_heads(&mut vs, &head_weights).unwrap();

        let back = export_backbone(&vs, arch, Padding::TfSame, 1e-3).unwrap();
        assert_eq!((back.arch, back.padding, back.bn_eps), (arch, Padding::TfSame, 1e-3));
        assert_eq!(back.tensors.len(), backbone.tensors.len());
        for (name, t) in &backbone.tensors {
            // Exact: f32 in, f32 out, no arithmetic in between.
            assert!(back.tensors[name] == *t, "{arch}: {name} changed in the round trip");
        }
        let hb = export_heads(&vs, &model.head_specs()).unwrap();
        for (a, b) in hb.iter().zip(&head_weights) {
            assert_eq!((&a.name, &a.weight, &a.bias), (&b.name, &b.weight, &b.bias));
        }
    }
}

#[test]
fn load_rejects_missing_misshaped_and_foreign_tensors_and_leaves_the_store_untouched() {
    let h = heads(&[("a", 2)]);
    let (lite, _) = formula_weights(Arch::Lite0, Padding::Symmetric, 1e-3, &h);
    let (b0, _) = formula_weights(Arch::B0, Padding::Symmetric, 1e-3, &h);
    let (mut vs, _model) = build(Arch::Lite0, Padding::Symmetric, 1e-3, &h);
    let before = to_vec(&vs.variables()["stem.conv.weight"]);

    let mut missing = lite.clone();
    missing.tensors.remove("blocks.7.dw.bn.running_var");
    match load_backbone(&mut vs, &missing) {
        Err(TorchError::Missing { name, from: "backbone" }) => assert_eq!(name, "blocks.7.dw.bn.running_var"),
        other => panic!("expected Missing, got {other:?}"),
    }

    let mut misshaped = lite.clone();
    let t = misshaped.tensors.get_mut("head.conv.weight").unwrap();
    t.shape = vec![1280, 320];
    match load_backbone(&mut vs, &misshaped) {
        Err(TorchError::Shape { name, .. }) => assert_eq!(name, "head.conv.weight"),
        other => panic!("expected Shape, got {other:?}"),
    }

    let mut extra = lite.clone();
    extra.tensors.insert("blocks.0.se.reduce.weight".into(), Canon::new(vec![1], vec![0.0]));
    assert!(matches!(load_backbone(&mut vs, &extra), Err(TorchError::UnexpectedTensor { .. })));

    // A B0 backbone into a Lite0 model: the squeeze-excite tensors have nowhere to go.
    assert!(matches!(load_backbone(&mut vs, &b0), Err(TorchError::Missing { from: "var store", .. })));
    // A Lite0 backbone into a B0 model: the model's squeeze-excite variables would stay random.
    let (mut vs_b0, _m) = build(Arch::B0, Padding::Symmetric, 1e-3, &h);
    assert!(matches!(load_backbone(&mut vs_b0, &lite), Err(TorchError::UnexpectedVariable { .. })));

    assert_eq!(to_vec(&vs.variables()["stem.conv.weight"]), before, "a failed load wrote into the store");

    // A classifier in the backbone is not a backbone tensor: ignored by load_backbone, offered as a head.
    let mut with_classifier = lite.clone();
    with_classifier.tensors.insert("classifier.weight".into(), Canon::new(vec![2, 1280], vec![0.5; 2560]));
    with_classifier.tensors.insert("classifier.bias".into(), Canon::new(vec![2], vec![0.25, -0.25]));
    load_backbone(&mut vs, &with_classifier).unwrap();
    let head = classifier_as_head(&with_classifier, "a").unwrap().unwrap();
    load_heads(&mut vs, &[head]).unwrap();
    assert_eq!(to_vec(&vs.variables()["heads.a.bias"]), [0.25, -0.25]);
    assert!(classifier_as_head(&lite, "a").unwrap().is_none());
}

// ---- numerical agreement with PyTorch ---------------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct Reference {
    input_shape: Vec<i64>,
    heads: Vec<(String, usize)>,
    cases: HashMap<String, Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    arch: String,
    padding: String,
    bn_eps: f64,
    logits: HashMap<String, Vec<Vec<f32>>>,
}

fn reference() -> Reference {
    let path = manifest_dir().join("tests/fixtures/torch/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Logits of the formula model for the formula input, plus the flattened PyTorch reference, per head.
fn run_case(r: &Reference, case: &Case, padding: Padding) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    let arch: Arch = case.arch.parse().unwrap();
    let (backbone, head_weights) = formula_weights(arch, padding, case.bn_eps as f32, &r.heads);
    let mut vs = nn::VarStore::new(Device::Cpu);
    // bn_eps straight from the fixture (f64), not through Backbone's f32.
    let model = EffNet::new(&vs.root(), arch, padding, case.bn_eps, &r.heads, 0.5).unwrap();
    load_backbone(&mut vs, &backbone).unwrap();
    load_heads(&mut vs, &head_weights).unwrap();

    let n: i64 = r.input_shape.iter().product();
    let input: Vec<f32> = noise(n as usize, 1000).map(|w| w as f32).collect();
    let xs = Tensor::from_slice(&input).reshape(&r.input_shape);
    let logits = tch::no_grad(|| model.forward_heads_t(&xs, false));
    r.heads
        .iter()
        .zip(&logits)
        .map(|((name, classes), l)| {
            assert_eq!(l.size(), [r.input_shape[0], *classes as i64]);
            (name.clone(), to_vec(l), case.logits[name].concat())
        })
        .collect()
}

fn assert_matches_reference(case_name: &str, padding: Padding, other: Padding) {
    let r = reference();
    let case = &r.cases[case_name];
    assert_eq!(case.padding.parse::<Padding>().unwrap(), padding);
    let mut worst = 0.0f32;
    for (name, got, want) in run_case(&r, case, padding) {
        let d = max_abs_diff(&got, &want);
        assert!(d <= 1e-4, "{case_name}: head {name} differs from PyTorch by {d}: {got:?} vs {want:?}");
        worst = worst.max(d);
    }
    eprintln!("{case_name}: max |Δlogit| vs PyTorch = {worst:e}");
    // The comparison is sharp enough to tell the padding conventions apart, so it would catch a padding bug.
    let wrong = run_case(&r, case, other).iter().map(|(_, g, w)| max_abs_diff(g, w)).fold(0.0, f32::max);
    assert!(wrong > 1e-2, "{case_name}: {other:?} padding also matches ({wrong}); the fixture cannot see padding");
}

#[test]
fn lite0_symmetric_forward_matches_pytorch() {
    assert_matches_reference("lite0_symmetric", Padding::Symmetric, Padding::TfSame);
}

#[test]
fn b0_tf_same_forward_matches_pytorch() {
    assert_matches_reference("b0_tf_same", Padding::TfSame, Padding::Symmetric);
}

#[test]
fn last_conv_map_pools_to_the_features_and_carries_gradients() {
    let h = heads(&[("color", 4), ("kind", 3)]);
    let (backbone, head_weights) = formula_weights(Arch::B0, Padding::Symmetric, 1e-3, &h);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = EffNet::from_backbone(&mut vs, &backbone, &h, 0.2).unwrap();
    load_heads(&mut vs, &head_weights).unwrap();
    let xs = Tensor::randn([2, 3, 70, 64], (Kind::Float, Device::Cpu));

    let lc = model.last_conv_t(&xs, false);
    assert_eq!(lc.activation.size(), [2, 1280, 3, 2]);
    let direct = model.forward_heads_t(&xs, false);
    for (a, b) in lc.logits.iter().zip(&direct) {
        assert!(max_abs_diff(&to_vec(a), &to_vec(b)) < 1e-5);
    }
    // Grad-CAM needs d logit / d activation map.
    let grads = Tensor::run_backward(&[lc.logits[0].get(0).get(1)], &[&lc.activation], false, false);
    assert_eq!(grads[0].size(), [2, 1280, 3, 2]);
    assert!(grads[0].abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

// ---- training ---------------------------------------------------------------------------------------------------

#[test]
fn adamw_steps_reduce_the_loss_on_a_fixed_batch() {
    // Deterministic start (formula weights, formula batch) and no dropout, so the loss curve is reproducible; the
    // batch norms run in training mode on the batch of 4, as in fine-tuning.
    let h = heads(&[("color", 5), ("kind", 3)]);
    let (backbone, head_weights) = formula_weights(Arch::B0, Padding::Symmetric, 1e-3, &h);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = EffNet::from_backbone(&mut vs, &backbone, &h, 0.0).unwrap();
    load_heads(&mut vs, &head_weights).unwrap();
    let mut opt = nn::AdamW::default().build(&vs, 3e-4).unwrap();
    let input: Vec<f32> = noise(4 * 3 * 64 * 64, 2000).map(|w| w as f32).collect();
    let xs = Tensor::from_slice(&input).reshape([4, 3, 64, 64]);
    let targets = [Tensor::from_slice(&[0i64, 1, 2, 4]), Tensor::from_slice(&[2i64, 0, 1, 1])];

    let mut losses = Vec::new();
    for step in 0..6 {
        let logits = model.forward_heads_t(&xs, true);
        let loss =
            logits.iter().zip(&targets).map(|(l, t)| l.cross_entropy_for_logits(t)).reduce(|a, b| a + b).unwrap();
        opt.zero_grad();
        loss.backward();
        if step == 0 {
            // Gradients reach the stem through every block, squeeze-excite and batch norm included.
            let vars = vs.variables();
            for name in ["stem.conv.weight", "stem.bn.weight", "blocks.3.se.reduce.weight", "blocks.3.se.expand.bias"] {
                let g = vars[name].grad();
                assert!(g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0, "no gradient for {name}");
            }
            assert!(!vars["stem.bn.running_var"].requires_grad());
        }
        opt.step();
        losses.push(loss.double_value(&[]));
    }
    eprintln!("training losses: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(losses[5] < 0.5 * losses[0], "loss did not drop: {losses:?}");
    // The running statistics moved in training mode, by about 1% of the batch statistic per step (momentum 0.01).
    let before = &backbone.tensors["stem.bn.running_var"].data;
    let after = to_vec(&vs.variables()["stem.bn.running_var"]);
    let moved = max_abs_diff(before, &after);
    assert!(moved > 1e-4 && moved < 0.5, "running_var moved by {moved}");
}

#[test]
fn stochastic_depth_and_dropout_act_only_in_training() {
    let h = heads(&[("a", 4)]);
    let vs = nn::VarStore::new(Device::Cpu);
    let model =
        EffNet::new(&vs.root(), Arch::B0, Padding::Symmetric, 1e-3, &h, 0.0).unwrap().with_drop_path(0.5).unwrap();
    let xs = Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu));
    // The features, not the logits: fresh heads are zero and would hide any difference.
    let run = |train| to_vec(&tch::no_grad(|| model.features_t(&xs, train)));
    assert_eq!(run(false), run(false));
    // Training-mode batch norm is deterministic too, so any difference comes from dropped residual branches.
    assert!(max_abs_diff(&run(true), &run(true)) > 1e-6);
    assert!(EffNet::new(&vs.root(), Arch::B0, Padding::Symmetric, 1e-3, &h, 0.0).unwrap().with_drop_path(1.0).is_err());
}

// ---- the real ImageNet weights ----------------------------------------------------------------------------------

/// The first `n` photos whose articleType is `article`.
fn photos_of(dir: &Path, article: &str, n: usize) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(dir.join("labels.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (file, art) = (col("file"), col("articleType"));
    // productDisplayName may contain quoted commas, but the columns we read come before it.
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f[art] == article)
        .take(n)
        .map(|f| dir.join(f[file]))
        .collect()
}

#[test]
fn imported_lite0_imagenet_weights_recognise_t_shirts() {
    use attrd::preprocess::{ChannelOrder, InputSpec, Interpolation, Layout, Limits, Preprocessor, ResizeMode};

    let path = lite0_checkpoint();
    let (backbone, _) = weights::import(&path, &ImportOptions { keep_classifier: true, ..Default::default() }).unwrap();
    assert_eq!((backbone.arch, backbone.padding), (Arch::Lite0, Padding::Symmetric));
    let h = heads(&[("imagenet", 1000)]);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = EffNet::from_backbone(&mut vs, &backbone, &h, 0.2).unwrap();
    load_heads(&mut vs, &[classifier_as_head(&backbone, "imagenet").unwrap().unwrap()]).unwrap();

    // EfficientNet-Lite was trained on (v - 127) / 128, i.e. mean = std = 0.5 on 0..1.
    let spec = InputSpec {
        width: 224,
        height: 224,
        resize: ResizeMode::Letterbox,
        crop_fraction: 1.0,
        interpolation: Interpolation::Bilinear,
        fill: [128, 128, 128],
        mean: [0.5; 3],
        std: [0.5; 3],
        channel_order: ChannelOrder::Rgb,
        layout: Layout::Nchw,
    };
    let pre = Preprocessor::new(spec, Limits::default()).unwrap();
    let photos = photos_of(&fashion_dir(), "Tshirts", 10);
    let batch: Vec<f32> = photos.iter().flat_map(|p| pre.prepare_path(p).unwrap()).collect();
    let xs = Tensor::from_slice(&batch).reshape([photos.len() as i64, 3, 224, 224]);
    let logits = tch::no_grad(|| model.forward_heads_t(&xs, false)).remove(0);
    let (_, top5) = logits.topk(5, 1, true, true);
    let hits: Vec<bool> = (0..photos.len() as i64)
        .map(|i| Vec::<i64>::try_from(&top5.get(i)).unwrap().contains(&610)) // 610: "jersey, T-shirt, tee shirt"
        .collect();
    let n = hits.iter().filter(|h| **h).count();
    eprintln!("T-shirts with class 610 in the top 5: {n}/{}", photos.len());
    // The PyTorch twin (make_reference.py --imagenet) gets 9/10 on these photos.
    assert!(n >= 8, "only {n}/10 T-shirts had class 610 in the top 5: {hits:?} for {photos:?}");
}
