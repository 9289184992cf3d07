//! Static post-training INT8 quantization of an fp32 graph into ONNX's **QDQ** form.
//!
//! QDQ keeps the fp32 operators and wraps the tensors they exchange in `QuantizeLinear` → `DequantizeLinear` pairs;
//! runtimes recognise `DQ → Conv → Q` (and the same around `Gemm`, `GlobalAveragePool`, `Add`) and run their INT8
//! kernels instead (ONNX Runtime's `QLinearConv`/`QGemm`/…, TensorRT's explicit-precision INT8). One file therefore
//! serves every execution provider, and a layer left out of the set simply stays fp32.
//!
//! Conventions, chosen for TensorRT as much as for ONNX Runtime's CPU kernels:
//! - activations: int8, **symmetric** (zero point 0, which TensorRT requires), one scale per tensor, `threshold/127`;
//! - weights: int8, symmetric, **per output channel** (axis 0 for `Conv` and for `Gemm` with `transB = 1`);
//! - biases: int32 with scale `input_scale × weight_scale[c]`, which is what the fused integer kernels accumulate in.
//!
//! ReLU-style activations (`Relu`, `Clip(0, hi)` such as ReLU6) after a quantized layer:
//! - uint8 storage (ONNX Runtime's CPU provider): only the clip's output is quantized, on the unsigned grid
//!   `q · threshold/255` with zero point 0 and `threshold ≤ hi`. That grid lies inside the clip's range, so ORT
//!   removes the clip and `DQ → Conv → Clip → Q` becomes one `QLinearConv`; every tensor that cannot be negative
//!   (these outputs and their pools) gets the extra bit. Quantizing the layer's output as well, as before, left 30
//!   clips and 60 requantizations per image running in fp32 on Lite0 (a third of the INT8 run time, measured with
//!   ORT 1.32).
//! - int8 storage (TensorRT): the layer's output takes the clipped range too: `Clip(DQ(Q(x)))` with that scale is
//!   exactly the quantized ReLU6 output, and TensorRT fuses the chain itself.
//!
//! The transform is pure: ranges come from [`Calibrator`], which sees activations the caller collected by running the
//! graph returned by [`with_outputs`] (see `trainer::quantize`).

use super::proto::{
    AttributeProto, DataType, GraphProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto, TypeProto,
    TypeProtoTensor, ValueInfoProto, type_proto,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Operators with INT8 kernels that this quantizer wraps.
pub const QUANTIZABLE_OPS: &[&str] = &["Conv", "Gemm", "GlobalAveragePool", "Add"];

/// Histogram resolution of the percentile and entropy calibrators.
const HIST_BINS: usize = 2048;
/// Quantization levels on one side of zero for symmetric int8.
const QMAX: f32 = 127.0;
/// Quantization levels of the unsigned grid that uint8 storage gives tensors that cannot be negative.
const U8_LEVELS: f32 = 255.0;

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("the model has no graph")]
    NoGraph,
    #[error("no calibrated range for tensor {0:?} (was it among the calibration outputs?)")]
    MissingRange(String),
    #[error("calibrated range of tensor {name:?} is {threshold}, not a positive finite number")]
    BadRange { name: String, threshold: f32 },
    #[error("node {node:?} ({op}) cannot be quantized: {reason}")]
    Unsupported { node: String, op: String, reason: String },
    #[error("no node named {0:?} in the graph")]
    UnknownNode(String),
    #[error("initializer {0:?} is not a float32 tensor")]
    NotFloat(String),
    #[error("unknown calibration method {0:?} (expected minmax, percentile or entropy)")]
    UnknownMethod(String),
}

/// How a tensor's clipping threshold is chosen from what calibration saw.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CalibrationMethod {
    /// The largest magnitude seen: no clipping, coarsest steps.
    MinMax,
    /// The given percentile (e.g. 99.999) of the magnitudes: outliers clip, the bulk gets finer steps.
    Percentile(f64),
    /// The threshold minimising the KL divergence between the clipped-and-quantized distribution and the original
    /// (TensorRT's calibrator).
    Entropy,
}

impl std::str::FromStr for CalibrationMethod {
    type Err = QuantError;
    fn from_str(s: &str) -> Result<Self, QuantError> {
        match s {
            "minmax" => Ok(Self::MinMax),
            "percentile" => Ok(Self::Percentile(99.999)),
            "entropy" => Ok(Self::Entropy),
            other => match other.strip_prefix("percentile:").and_then(|p| p.parse::<f64>().ok()) {
                Some(p) if p > 0.0 && p <= 100.0 => Ok(Self::Percentile(p)),
                _ => Err(QuantError::UnknownMethod(other.into())),
            },
        }
    }
}

impl std::fmt::Display for CalibrationMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MinMax => f.write_str("minmax"),
            Self::Percentile(p) => write!(f, "percentile:{p}"),
            Self::Entropy => f.write_str("entropy"),
        }
    }
}

fn graph(model: &ModelProto) -> Result<&GraphProto, QuantError> {
    model.graph.as_ref().ok_or(QuantError::NoGraph)
}

/// Names of the nodes this quantizer can quantize, in graph order: every `Conv`, `Gemm` and `GlobalAveragePool`,
/// and every `Add` of two activations.
pub fn quantizable_nodes(model: &ModelProto) -> Result<Vec<String>, QuantError> {
    let g = graph(model)?;
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    Ok(g.node
        .iter()
        .filter(|n| QUANTIZABLE_OPS.contains(&n.op_type.as_str()) && n.domain.is_empty())
        .filter(|n| n.op_type != "Add" || n.input.iter().all(|i| !inits.contains(i.as_str())))
        .map(|n| n.name.clone())
        .collect())
}

/// The float activations a quantization of any subset of nodes may need ranges for: the graph inputs and every node
/// output.
pub fn activation_tensors(model: &ModelProto) -> Result<Vec<String>, QuantError> {
    let g = graph(model)?;
    let outputs: HashSet<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    let mut names: Vec<String> = g.input.iter().map(|i| i.name.clone()).collect();
    names.extend(g.node.iter().flat_map(|n| n.output.iter()).filter(|o| !outputs.contains(o.as_str())).cloned());
    Ok(names)
}

/// A copy of `model` that also returns `tensors` (float32, shape left to the runtime), for collecting calibration
/// statistics in one run.
pub fn with_outputs(model: &ModelProto, tensors: &[String]) -> Result<ModelProto, QuantError> {
    let mut m = model.clone();
    let g = m.graph.as_mut().ok_or(QuantError::NoGraph)?;
    let existing: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    for t in tensors.iter().filter(|t| !existing.contains(*t)) {
        g.output.push(ValueInfoProto {
            name: t.clone(),
            r#type: Some(TypeProto {
                denotation: String::new(),
                value: Some(type_proto::Value::TensorType(TypeProtoTensor {
                    elem_type: DataType::Float as i32,
                    shape: None,
                })),
            }),
            doc_string: String::new(),
        });
    }
    Ok(m)
}

/// Per-tensor statistics over a calibration set, gathered in two passes: magnitudes first (which fixes each
/// histogram's range), then histograms (only needed by the percentile and entropy methods).
#[derive(Debug, Clone, Default)]
pub struct Calibrator {
    absmax: BTreeMap<String, f32>,
    hist: BTreeMap<String, Vec<u64>>,
}

impl Calibrator {
    /// Pass 1: records the largest magnitude of a batch of `name`. Non-finite values are ignored (they would make
    /// every scale useless; the fp32 model producing them is refused elsewhere).
    pub fn observe_range(&mut self, name: &str, data: &[f32]) {
        let m = data.iter().filter(|v| v.is_finite()).fold(0f32, |m, v| m.max(v.abs()));
        let e = self.absmax.entry(name.to_owned()).or_insert(0.0);
        *e = e.max(m);
    }

    /// Pass 2: adds a batch of `name` to its histogram of magnitudes over `[0, absmax]`.
    pub fn observe_histogram(&mut self, name: &str, data: &[f32]) {
        let max = self.absmax.get(name).copied().unwrap_or(0.0);
        let h = self.hist.entry(name.to_owned()).or_insert_with(|| vec![0; HIST_BINS]);
        if max <= 0.0 {
            h[0] += data.len() as u64;
            return;
        }
        let per_bin = HIST_BINS as f32 / max;
        for v in data.iter().filter(|v| v.is_finite()) {
            let b = ((v.abs() * per_bin) as usize).min(HIST_BINS - 1);
            h[b] += 1;
        }
    }

    /// Tensors with statistics.
    pub fn tensors(&self) -> impl Iterator<Item = &str> {
        self.absmax.keys().map(String::as_str)
    }

    /// The clipping threshold of `name` by `method`; `None` without statistics (or, for the histogram methods,
    /// without a second pass).
    pub fn threshold(&self, name: &str, method: CalibrationMethod) -> Option<f32> {
        let max = *self.absmax.get(name)?;
        if max <= 0.0 {
            return Some(max);
        }
        let width = max / HIST_BINS as f32;
        match method {
            CalibrationMethod::MinMax => Some(max),
            CalibrationMethod::Percentile(p) => Some(percentile_threshold(self.hist.get(name)?, p) * width),
            CalibrationMethod::Entropy => Some(entropy_threshold(self.hist.get(name)?) * width),
        }
    }

    /// Thresholds of every observed tensor.
    pub fn thresholds(&self, method: CalibrationMethod) -> BTreeMap<String, f32> {
        self.absmax.keys().filter_map(|n| Some((n.clone(), self.threshold(n, method)?))).collect()
    }
}

/// Upper edge (in bins) below which `p` percent of the histogram's mass lies.
fn percentile_threshold(h: &[u64], p: f64) -> f32 {
    let total: u64 = h.iter().sum();
    if total == 0 {
        return h.len() as f32;
    }
    let want = (total as f64 * p / 100.0).ceil() as u64;
    let mut acc = 0;
    for (i, &c) in h.iter().enumerate() {
        acc += c;
        if acc >= want {
            return (i + 1) as f32;
        }
    }
    h.len() as f32
}

/// TensorRT's entropy calibration: for each candidate clip point `i` (in bins), the reference distribution is the
/// histogram up to `i` with everything beyond folded into the last bin, and the candidate is that histogram merged
/// into 128 levels and spread back; the `i` with the smallest KL(reference ‖ candidate) wins.
fn entropy_threshold(h: &[u64]) -> f32 {
    let levels = (QMAX as usize) + 1;
    let n = h.len();
    if n <= levels {
        return n as f32;
    }
    // The zero bin holds every value a ReLU cut off, often most of the tensor. Counted as it is, it swamps the
    // divergence of the rest, and the smallest clip point wins whatever it does to the tail (measured: −52 points
    // of macro-F1 on the fashion model). Rounding keeps zeros exact anyway, so the zero bin is weighted like its
    // neighbour, as pytorch-quantization does.
    let mut owned = h.to_vec();
    owned[0] = owned[1];
    let h = owned.as_slice();
    let mut best = (f64::INFINITY, n);
    let mut i = levels;
    while i <= n {
        let mut reference: Vec<f64> = h[..i].iter().map(|&c| c as f64).collect();
        let outliers: u64 = h[i..].iter().sum();
        reference[i - 1] += outliers as f64;
        let mut candidate = vec![0f64; i];
        for j in 0..levels {
            let (start, end) = (j * i / levels, ((j + 1) * i / levels).max(j * i / levels + 1).min(i));
            let sum: f64 = h[start..end].iter().map(|&c| c as f64).sum();
            let nonzero = h[start..end].iter().filter(|&&c| c > 0).count();
            if nonzero > 0 {
                for k in start..end {
                    if h[k] > 0 {
                        candidate[k] = sum / nonzero as f64;
                    }
                }
            }
        }
        let (ps, qs) = (reference.iter().sum::<f64>(), candidate.iter().sum::<f64>());
        if ps > 0.0 && qs > 0.0 {
            let mut kl = 0.0;
            for (p, q) in reference.iter().zip(&candidate) {
                if *p > 0.0 {
                    let p = p / ps;
                    // An empty candidate bin where the reference has mass: smoothed rather than infinite, as TensorRT.
                    let q = (q / qs).max(1e-12);
                    kl += p * (p / q).ln();
                }
            }
            if kl < best.0 {
                best = (kl, i);
            }
        }
        i += 8;
    }
    best.1 as f32
}

/// Storage type of quantized activations. Both use the symmetric grid (`q · threshold/127`, q in −128..=127) for
/// tensors that can be negative; uint8 gives tensors that cannot the unsigned grid (module documentation). They
/// differ in which runtimes fuse them into integer kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationType {
    /// uint8 with zero point 128: ONNX Runtime's CPU provider fuses every group (QLinearConv, QLinearAdd, …).
    #[default]
    U8,
    /// int8 with zero point 0: what TensorRT requires; ORT's CPU provider then leaves residual `Add`s and the
    /// convolutions around them in fp32 (measured with ORT 1.32).
    S8,
}

/// How much of the int8 range quantized weights use.
///
/// x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) multiply u8 activations by s8 weights with
/// `vpmaddubsw`, which adds two neighbouring products along the reduction axis into an i16 and saturates:
/// 255 × 127 × 2 overflows it. ONNX Runtime runs int8 activations through the same kernels (shifted to uint8), so
/// every storage type is exposed. Measured under `qemu-x86_64 -cpu Haswell` (`scripts/check-int8-portability`):
/// unconstrained 8-bit weights changed the top-1 of 15–45 % of the fashion model's test images, while `Safe` and
/// `Reduced` bundles give bit-identical logits on that CPU and on a VNNI one. A bundle must be right on every
/// provider it may fall back to, the CPU included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightRange {
    /// 8 bits (±127) wherever no i16 pair can overflow (the default, right on every CPU):
    /// - depthwise convolutions: ORT's depthwise kernel widens both operands and accumulates in i32, so all 8 bits;
    /// - 1×1 convolutions and `Gemm`s, whose reduction axis is the input channel in every layout: 8 bits, with each
    ///   neighbouring pair (channels 2j, 2j+1) rounded so that |q₂ⱼ| + |q₂ⱼ₊₁| ≤ 128 (255 × 128 < 2¹⁵);
    /// - other convolutions, whose reduction order depends on the layout ORT picks: a channel scale at which any two
    ///   weights sum to at most 128 (between 7 and 8 bits).
    ///
    /// On the fashion model this gives the accuracy of unconstrained 8-bit weights and the speed of either.
    #[default]
    Safe,
    /// 7 bits (±63) everywhere: ONNX Runtime's `reduce_range`. Costs about 0.9 points of macro-F1 on the fashion
    /// model against `Safe`.
    Reduced,
    /// 8 bits everywhere, unconstrained: only for bundles that never run on x86 CPUs without VNNI (VNNI or AMX CPUs,
    /// TensorRT).
    Full,
}

impl std::str::FromStr for WeightRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "safe" => Ok(Self::Safe),
            "reduced" | "7" => Ok(Self::Reduced),
            "full" | "8" => Ok(Self::Full),
            other => Err(format!("unknown weight range {other:?} (expected safe, reduced or full)")),
        }
    }
}

impl std::fmt::Display for WeightRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Safe => "safe",
            Self::Reduced => "reduced",
            Self::Full => "full",
        })
    }
}

/// How ONNX Runtime's integer kernel reduces one output channel's weights, which decides how much of the int8 range
/// [`WeightRange::Safe`] can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reduction {
    /// Products widened and accumulated in i32: no limit.
    Wide,
    /// Neighbouring products along the reduction axis summed in i16 first, the reduction axis being the weight's
    /// input-channel axis.
    Pairs,
    /// An order that depends on the layout: any two weights may meet.
    AnyPair,
}

impl std::str::FromStr for ActivationType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "u8" | "uint8" => Ok(Self::U8),
            "s8" | "int8" => Ok(Self::S8),
            other => Err(format!("unknown activation type {other:?} (expected u8 or s8)")),
        }
    }
}

/// What [`quantize_qdq`] did, for the report.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QdqSummary {
    /// Quantized nodes by operator.
    pub nodes: BTreeMap<String, usize>,
    /// Activations wrapped in Q/DQ pairs.
    pub activations: usize,
    /// Weight tensors stored as int8.
    pub weights: usize,
}

/// Rewrites `model` so that the nodes named in `quantize` run in INT8, using `thresholds` (clipping magnitudes per
/// activation tensor, e.g. from [`Calibrator::thresholds`]). Nodes outside the set stay fp32.
pub fn quantize_qdq(
    model: &ModelProto,
    quantize: &BTreeSet<String>,
    thresholds: &BTreeMap<String, f32>,
    activations: ActivationType,
) -> Result<(ModelProto, QdqSummary), QuantError> {
    quantize_qdq_with(model, quantize, thresholds, activations, WeightRange::default())
}

/// [`quantize_qdq`] with weights in `range`.
pub fn quantize_qdq_with(
    model: &ModelProto,
    quantize: &BTreeSet<String>,
    thresholds: &BTreeMap<String, f32>,
    activations: ActivationType,
    range: WeightRange,
) -> Result<(ModelProto, QdqSummary), QuantError> {
    let g = graph(model)?;
    let inits: HashMap<&str, &TensorProto> = g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let graph_outputs: HashSet<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    let mut consumers: HashMap<&str, Vec<&NodeProto>> = HashMap::new();
    for n in &g.node {
        for i in &n.input {
            consumers.entry(i.as_str()).or_default().push(n);
        }
    }
    let known: HashSet<&str> = g.node.iter().map(|n| n.name.as_str()).collect();
    if let Some(missing) = quantize.iter().find(|n| !known.contains(n.as_str())) {
        return Err(QuantError::UnknownNode(missing.clone()));
    }

    // The (lo, hi) bounds of a ReLU-style node: `Clip(x, lo, hi)` with constant bounds, or `Relu`.
    let clip_bounds = |c: &NodeProto| -> Option<(f32, f32)> {
        match c.op_type.as_str() {
            "Relu" => Some((0.0, f32::INFINITY)),
            "Clip" if c.input.len() == 3 => {
                let lo = inits.get(c.input[1].as_str())?.to_f32()?.first().copied()?;
                let hi = inits.get(c.input[2].as_str())?.to_f32()?.first().copied()?;
                Some((lo, hi))
            }
            _ => None,
        }
    };
    // The output of the single `Relu`/`Clip(0, hi)` that reads `t`, if that is `t`'s only reader.
    let relu_after = |t: &str| -> Option<&str> {
        match consumers.get(t).map(Vec::as_slice) {
            Some([c]) if clip_bounds(c).is_some_and(|(lo, _)| lo == 0.0) => Some(c.output[0].as_str()),
            _ => None,
        }
    };
    // Tensors that cannot be negative: ReLU-style outputs and what pooling or reshaping makes of them. With uint8
    // storage they take the unsigned grid `q · threshold/255` (zero point 0), one more bit than the symmetric one.
    let mut non_negative: HashMap<&str, f32> = HashMap::new();
    for n in &g.node {
        let bound = match n.op_type.as_str() {
            "Relu" | "Clip" => clip_bounds(n).filter(|&(lo, _)| lo >= 0.0).map(|(_, hi)| hi),
            "GlobalAveragePool" | "MaxPool" | "AveragePool" | "Flatten" | "Reshape" => {
                n.input.first().and_then(|i| non_negative.get(i.as_str()).copied())
            }
            _ => None,
        };
        if let (Some(hi), Some(o)) = (bound, n.output.first()) {
            non_negative.insert(o.as_str(), hi);
        }
    }

    // Which activations get Q/DQ, and which weights become int8.
    let mut q_tensors: BTreeSet<String> = BTreeSet::new();
    let mut summary = QdqSummary::default();
    for n in g.node.iter().filter(|n| quantize.contains(&n.name)) {
        let unsupported = |reason: &str| QuantError::Unsupported {
            node: n.name.clone(),
            op: n.op_type.clone(),
            reason: reason.into(),
        };
        match n.op_type.as_str() {
            "Conv" | "Gemm" => {
                if n.input.len() < 2 || !inits.contains_key(n.input[1].as_str()) {
                    return Err(unsupported("its weight is not an initializer"));
                }
                if n.input.get(2).is_some_and(|b| !b.is_empty() && !inits.contains_key(b.as_str())) {
                    return Err(unsupported("its bias is not an initializer"));
                }
                q_tensors.insert(n.input[0].clone());
                // With uint8 storage a ReLU/ReLU6 after the layer is quantized on its output alone: the unsigned
                // grid [0, threshold] lies inside the clip's range, so ONNX Runtime drops the clip and fuses
                // `DQ → Conv → Clip → Q` into one integer kernel. A Q/DQ pair between the two (the s8 form, which
                // TensorRT fuses on its own) leaves the clip and two requantizations in fp32 on ORT's CPU provider.
                let out = match (activations, relu_after(&n.output[0])) {
                    (ActivationType::U8, Some(clip)) => clip,
                    _ => n.output[0].as_str(),
                };
                if !graph_outputs.contains(out) {
                    q_tensors.insert(out.to_owned());
                }
            }
            "GlobalAveragePool" | "Add" => {
                for i in &n.input {
                    if inits.contains_key(i.as_str()) {
                        return Err(unsupported("one of its inputs is a constant"));
                    }
                    q_tensors.insert(i.clone());
                }
                if !graph_outputs.contains(n.output[0].as_str()) {
                    q_tensors.insert(n.output[0].clone());
                }
            }
            _ => return Err(unsupported("no INT8 kernel for this operator")),
        }
        *summary.nodes.entry(n.op_type.clone()).or_default() += 1;
    }

    // Scales.
    let mut scales: HashMap<String, f32> = HashMap::new();
    for t in &q_tensors {
        // (s8 form) A tensor read only by ReLU-style clips takes the clipped range: see the module documentation.
        let clip_range = consumers.get(t.as_str()).and_then(|cs| {
            let mut hi = None;
            for c in cs {
                match clip_bounds(c) {
                    Some((0.0, h)) => hi = Some((h, c.output[0].as_str())),
                    _ => return None,
                }
            }
            hi
        });
        let threshold = match clip_range {
            Some((hi, clipped)) => thresholds.get(clipped).copied().map(|th| th.min(hi)),
            None => thresholds.get(t).copied(),
        }
        .ok_or_else(|| QuantError::MissingRange(t.clone()))?;
        if !(threshold.is_finite() && threshold >= 0.0) {
            return Err(QuantError::BadRange { name: t.clone(), threshold });
        }
        // An all-zero tensor (a dead channel group, say) still needs a valid positive scale.
        let threshold = if threshold > 0.0 { threshold } else { 1.0 };
        let scale = match (activations, non_negative.get(t.as_str())) {
            (ActivationType::U8, Some(&hi)) => {
                // ORT drops a clip before the Q only if 255 · scale ≤ hi holds in f32, so round the scale down.
                let threshold = threshold.min(hi);
                let mut scale = threshold / U8_LEVELS;
                while scale * U8_LEVELS > threshold {
                    scale = f32::from_bits(scale.to_bits() - 1);
                }
                scale
            }
            _ => threshold / QMAX,
        };
        scales.insert(t.clone(), scale);
    }
    summary.activations = q_tensors.len();

    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut replaced_inits: HashSet<String> = HashSet::new();
    let mut nodes: Vec<NodeProto> = Vec::with_capacity(g.node.len() * 3);
    let dq_name = |t: &str| format!("{t}_dequantized");
    // One DequantizeLinear per reading node, so that every QDQ group owns its DQ (what ONNX Runtime's selectors
    // require; ORT would otherwise have to duplicate shared DQs itself).
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (idx, n) in g.node.iter().enumerate() {
        for i in n.input.iter().filter(|i| q_tensors.contains(*i)) {
            let r = readers.entry(i.as_str()).or_default();
            if r.last() != Some(&idx) {
                r.push(idx);
            }
        }
    }
    let reader_dq = |t: &str, reader: usize| -> String {
        let r = readers.get(t).map(Vec::as_slice).unwrap_or_default();
        match r.iter().position(|&x| x == reader) {
            Some(k) if r.len() > 1 => format!("{t}_dequantized_{k}"),
            _ => dq_name(t),
        }
    };
    let emit_qdq = |t: &str, nodes: &mut Vec<NodeProto>, new_inits: &mut Vec<TensorProto>| {
        let scale = scales[t];
        new_inits.push(TensorProto::from_f32(&format!("{t}_scale"), &[], &[scale]));
        new_inits.push(match activations {
            ActivationType::S8 => int8_tensor(&format!("{t}_zero_point"), &[], &[0]),
            ActivationType::U8 => TensorProto {
                name: format!("{t}_zero_point"),
                data_type: DataType::Uint8 as i32,
                raw_data: vec![if non_negative.contains_key(t) { 0 } else { 128 }],
                ..Default::default()
            },
        });
        nodes.push(qdq_node(
            "QuantizeLinear",
            &format!("{t}_QuantizeLinear"),
            [t.to_owned(), format!("{t}_scale"), format!("{t}_zero_point")],
            &format!("{t}_quantized"),
            None,
        ));
        let r = readers.get(t).map(Vec::as_slice).unwrap_or_default();
        for (k, &reader) in r.iter().enumerate() {
            let suffix = if r.len() > 1 { format!("_{k}") } else { String::new() };
            nodes.push(qdq_node(
                "DequantizeLinear",
                &format!("{t}_DequantizeLinear{suffix}"),
                [format!("{t}_quantized"), format!("{t}_scale"), format!("{t}_zero_point")],
                &reader_dq(t, reader),
                None,
            ));
        }
    };
    for input in &g.input {
        if q_tensors.contains(&input.name) {
            emit_qdq(&input.name, &mut nodes, &mut new_inits);
        }
    }
    for (idx, n) in g.node.iter().enumerate() {
        let mut node = n.clone();
        for i in node.input.iter_mut() {
            if q_tensors.contains(i) {
                *i = reader_dq(i, idx);
            }
        }
        if quantize.contains(&n.name) && (n.op_type == "Conv" || n.op_type == "Gemm") {
            let in_scale = scales[&n.input[0]];
            let weight = inits[n.input[1].as_str()];
            let w = weight.to_f32().ok_or_else(|| QuantError::NotFloat(weight.name.clone()))?;
            // Output channels are axis 0 of a Conv weight and of a transposed Gemm weight, axis 1 otherwise.
            let trans_b = n.attribute.iter().any(|a| a.name == "transB" && a.i == 1);
            let axis = if n.op_type == "Gemm" && !trans_b { 1 } else { 0 };
            let dims: Vec<usize> = weight.dims.iter().map(|&d| d.max(0) as usize).collect();
            let bias = match n.input.get(2).filter(|b| !b.is_empty()) {
                Some(b) => {
                    let t = inits[b.as_str()];
                    Some((t, t.to_f32().ok_or_else(|| QuantError::NotFloat(t.name.clone()))?))
                }
                None => None,
            };
            let (q, w_scales) = quantize_weight(
                &w,
                &dims,
                axis,
                in_scale,
                bias.as_ref().map(|(_, b)| b.as_slice()),
                range,
                reduction(n, &dims),
            );
            let wn = &weight.name;
            new_inits.push(int8_tensor(&format!("{wn}_quantized"), &dims, &q));
            new_inits.push(TensorProto::from_f32(&format!("{wn}_scale"), &[w_scales.len()], &w_scales));
            new_inits.push(int8_tensor(&format!("{wn}_zero_point"), &[w_scales.len()], &vec![0; w_scales.len()]));
            nodes.push(qdq_node(
                "DequantizeLinear",
                &format!("{wn}_DequantizeLinear"),
                [format!("{wn}_quantized"), format!("{wn}_scale"), format!("{wn}_zero_point")],
                &dq_name(wn),
                Some(axis as i64),
            ));
            replaced_inits.insert(wn.clone());
            node.input[1] = dq_name(wn);
            summary.weights += 1;
            if let Some((bt, b)) = bias {
                let bn = &bt.name;
                let b_scales: Vec<f32> = w_scales.iter().map(|s| s * in_scale).collect();
                let bq: Vec<i32> = b
                    .iter()
                    .zip(&b_scales)
                    .map(|(v, s)| (v / s).round().clamp(-(i32::MAX as f32), i32::MAX as f32) as i32)
                    .collect();
                new_inits.push(int32_tensor(&format!("{bn}_quantized"), &[bq.len()], &bq));
                new_inits.push(TensorProto::from_f32(&format!("{bn}_scale"), &[b_scales.len()], &b_scales));
                new_inits.push(int32_tensor(&format!("{bn}_zero_point"), &[bq.len()], &vec![0; bq.len()]));
                nodes.push(qdq_node(
                    "DequantizeLinear",
                    &format!("{bn}_DequantizeLinear"),
                    [format!("{bn}_quantized"), format!("{bn}_scale"), format!("{bn}_zero_point")],
                    &dq_name(bn),
                    Some(0),
                ));
                replaced_inits.insert(bn.clone());
                node.input[2] = dq_name(bn);
            }
        }
        let outputs = node.output.clone();
        nodes.push(node);
        for o in &outputs {
            if q_tensors.contains(o) {
                emit_qdq(o, &mut nodes, &mut new_inits);
            }
        }
    }

    // Every weight feeds exactly one node in our graphs, but check rather than assume before dropping the fp32 copy.
    let still_read: HashSet<&str> = nodes.iter().flat_map(|n| n.input.iter().map(String::as_str)).collect();
    let mut initializer: Vec<TensorProto> = g
        .initializer
        .iter()
        .filter(|t| !replaced_inits.contains(&t.name) || still_read.contains(t.name.as_str()))
        .cloned()
        .collect();
    initializer.extend(new_inits);
    let mut out = model.clone();
    let og = out.graph.as_mut().ok_or(QuantError::NoGraph)?;
    og.node = nodes;
    og.initializer = initializer;
    // The daemon refuses `full` weights on CPUs whose kernels saturate on them (`attrd::engine`).
    out.metadata_props.retain(|p| p.key != attrd::engine::INT8_WEIGHT_RANGE_KEY);
    if summary.weights > 0 {
        out.metadata_props.push(StringStringEntryProto {
            key: attrd::engine::INT8_WEIGHT_RANGE_KEY.into(),
            value: range.to_string(),
        });
    }
    Ok((out, summary))
}

/// The [`Reduction`] of node `n` with weight `dims`.
fn reduction(n: &NodeProto, dims: &[usize]) -> Reduction {
    let group = n.attribute.iter().find(|a| a.name == "group").map_or(1, |a| a.i);
    match n.op_type.as_str() {
        // One input and one output channel per group is what sends ORT to `MlasConvDepthwise*`, whose kernels widen
        // both operands to i16 and add full products in i32.
        "Conv" if dims.len() == 4 && dims[1] == 1 && group > 1 && dims[0] as i64 == group => Reduction::Wide,
        // A 1×1 kernel reduces over input channels alone, whatever the layout: [out, in, 1, 1].
        "Conv" if dims.len() == 4 && dims[2] * dims[3] == 1 => Reduction::Pairs,
        // [N, K] with transB, [K, N] without: the reduction axis is the other one.
        "Gemm" if dims.len() == 2 => Reduction::Pairs,
        _ => Reduction::AnyPair,
    }
}

/// Symmetric per-channel int8 weights along `axis` (0 or 1 of a ≥2-D tensor) within `range` for a kernel that
/// reduces as `reduction` says; returns the values and the channel scales. When a bias is given, a channel's scale is
/// raised if needed so that its int32 bias cannot overflow.
fn quantize_weight(
    w: &[f32],
    dims: &[usize],
    axis: usize,
    in_scale: f32,
    bias: Option<&[f32]>,
    range: WeightRange,
    reduction: Reduction,
) -> (Vec<i8>, Vec<f32>) {
    let channels = dims.get(axis).copied().unwrap_or(1).max(1);
    let inner: usize = dims.iter().skip(axis + 1).product::<usize>().max(1);
    let outer = w.len() / (channels * inner);
    // Only `Safe` limits pairs; the other ranges treat every kernel as if it could not saturate.
    let limit = if range == WeightRange::Safe { reduction } else { Reduction::Wide };
    let qmax = if range == WeightRange::Reduced { 63.0 } else { QMAX };
    let mut q = vec![0i8; w.len()];
    let mut scales = Vec::with_capacity(channels);
    for c in 0..channels {
        // A channel's elements in increasing index order, which is the reduction order for `Pairs` layers (1×1
        // convolutions: [out, in]; `Gemm`: [N, K] or [K, N]).
        let idx: Vec<usize> =
            (0..outer).flat_map(|o| (0..inner).map(move |t| (o * channels + c) * inner + t)).collect();
        let vals: Vec<f32> = idx.iter().map(|&i| w[i]).collect();
        let floor = bias.and_then(|b| b.get(c)).map_or(0.0, |b| b.abs() / (in_scale * (i32::MAX as f32 / 2.0)));
        let (cq, scale) = quantize_channel(&vals, floor, qmax, limit);
        for (&i, v) in idx.iter().zip(cq) {
            q[i] = v;
        }
        scales.push(scale);
    }
    (q, scales)
}

/// Largest |q₀| + |q₁| of a weight pair that `vpmaddubsw` cannot saturate on: 255 × 128 = 32640 ≤ 32767.
const SAFE_PAIR: f32 = 128.0;

/// One channel (`vals` in reduction order): symmetric int8 values and their scale (at least `floor`), within ±`qmax`
/// and with the pairs that `limit` names within [`SAFE_PAIR`].
fn quantize_channel(vals: &[f32], floor: f32, qmax: f32, limit: Reduction) -> (Vec<i8>, f32) {
    let absmax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
    if absmax == 0.0 {
        return (vec![0; vals.len()], floor.max(1.0));
    }
    let round = |s: f32| -> Vec<i8> { vals.iter().map(|v| (v / s).round().clamp(-qmax, qmax) as i8).collect() };
    let lo = (absmax / qmax).max(floor);
    match limit {
        Reduction::Wide => (round(lo), lo),
        Reduction::AnyPair => {
            // round(a) + round(b) ≤ a + b + 1, so the two largest magnitudes at ≤ 127 steps keep every pair ≤ 128.
            let (first, second) =
                vals.iter().map(|v| v.abs()).fold((0f32, 0f32), |(a, b), v| if v > a { (v, a) } else { (a, b.max(v)) });
            let s = lo.max((first + second) / (SAFE_PAIR - 1.0));
            (round(s), s)
        }
        Reduction::Pairs => {
            // At `hi` no pair needs limiting; at `lo` the grid is finest but large pairs must be pulled in. Take the
            // scale between them with the least squared error after limiting.
            let widest = vals.chunks(2).map(|p| p.iter().map(|v| v.abs()).sum::<f32>()).fold(0f32, f32::max);
            let hi = lo.max(widest / (SAFE_PAIR - 1.0));
            const STEPS: i32 = 24;
            let steps = if hi > lo { STEPS } else { 0 };
            let candidates = (0..=steps).map(|k| {
                let s = lo * (hi / lo).powf(k as f32 / STEPS as f32);
                let mut q = round(s);
                for j in (0..vals.len().saturating_sub(1)).step_by(2) {
                    limit_pair(&mut q, j, j + 1, vals[j] / s, vals[j + 1] / s);
                }
                let err: f64 = q.iter().zip(vals).map(|(&q, &v)| f64::from(f32::from(q) * s - v).powi(2)).sum();
                (err, s, q)
            });
            // Invariant: the range 0..=steps is never empty.
            let (_, s, q) = candidates.min_by(|a, b| a.0.total_cmp(&b.0)).expect("at least one candidate scale");
            (q, s)
        }
    }
}

/// Moves `q[a]` and `q[b]` (rounded from `xa`, `xb`) towards zero, one step at a time on whichever step adds the
/// least squared error, until |q[a]| + |q[b]| ≤ 128.
fn limit_pair(q: &mut [i8], a: usize, b: usize, xa: f32, xb: f32) {
    let cost = |q: i8, x: f32| {
        let stepped = f32::from(q - q.signum());
        (stepped - x).powi(2) - (f32::from(q) - x).powi(2)
    };
    while f32::from(q[a].unsigned_abs()) + f32::from(q[b].unsigned_abs()) > SAFE_PAIR {
        if q[b] == 0 || (q[a] != 0 && cost(q[a], xa) <= cost(q[b], xb)) {
            q[a] -= q[a].signum();
        } else {
            q[b] -= q[b].signum();
        }
    }
}

fn qdq_node(op: &str, name: &str, inputs: [String; 3], output: &str, axis: Option<i64>) -> NodeProto {
    NodeProto {
        input: inputs.to_vec(),
        output: vec![output.to_owned()],
        name: name.to_owned(),
        op_type: op.to_owned(),
        attribute: axis.map(|a| vec![AttributeProto::int("axis", a)]).unwrap_or_default(),
        ..Default::default()
    }
}

fn int8_tensor(name: &str, dims: &[usize], data: &[i8]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Int8 as i32,
        raw_data: data.iter().map(|&v| v as u8).collect(),
        ..Default::default()
    }
}

fn int32_tensor(name: &str, dims: &[usize], data: &[i32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Int32 as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// Whether a graph is quantized (holds `QuantizeLinear`/`DequantizeLinear` or integer-kernel nodes).
pub fn is_quantized(model: &ModelProto) -> bool {
    model.graph.as_ref().is_some_and(|g| {
        g.node.iter().any(|n| {
            matches!(n.op_type.as_str(), "QuantizeLinear" | "DequantizeLinear") || n.op_type.starts_with("QLinear")
        })
    })
}

/// Operator counts of a graph, keyed `domain:op` for non-default domains (e.g. `com.microsoft:QGemm`).
pub fn op_counts(model: &ModelProto) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    if let Some(g) = &model.graph {
        for n in &g.node {
            let key = if n.domain.is_empty() || n.domain == "ai.onnx" {
                n.op_type.clone()
            } else {
                format!("{}:{}", n.domain, n.op_type)
            };
            *counts.entry(key).or_default() += 1;
        }
    }
    counts
}

/// Nodes of an ORT-optimized graph that run integer kernels (QLinearConv, QGemm, QLinearAdd, … in any domain,
/// including layout-transformed NHWC variants).
pub fn integer_kernel_count(counts: &BTreeMap<String, usize>) -> usize {
    counts
        .iter()
        .filter(|(k, _)| {
            let op = k.rsplit(':').next().unwrap_or(k);
            op.starts_with("QLinear") || op.starts_with("NhwcQLinear") || op == "QGemm" || op.ends_with("Integer")
        })
        .map(|(_, c)| c)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_and_minmax_thresholds() {
        let mut c = Calibrator::default();
        // 10_000 values in [0, 1) plus one outlier at 100.
        let mut data: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0).collect();
        data.push(-100.0);
        c.observe_range("t", &data);
        c.observe_histogram("t", &data);
        assert_eq!(c.threshold("t", CalibrationMethod::MinMax), Some(100.0));
        let p = c.threshold("t", CalibrationMethod::Percentile(99.9)).unwrap();
        assert!((0.95..=1.1).contains(&p), "99.9th percentile of ~U(0,1) with one outlier: {p}");
        let e = c.threshold("t", CalibrationMethod::Entropy).unwrap();
        assert!(e < 10.0, "entropy calibration clips a single far outlier: {e}");
        assert_eq!(c.threshold("missing", CalibrationMethod::MinMax), None);
    }

    #[test]
    fn entropy_threshold_keeps_the_tail_of_a_relu_output() {
        // What a ReLU6 leaves: 70 % exact zeros, the rest spread over (0, 4] with a thinning tail, and a few 6s.
        let mut data = vec![0f32; 70_000];
        data.extend((0..30_000).map(|i| 4.0 * (i as f32 / 30_000.0).powi(2)));
        data.extend([6.0; 3]);
        let mut c = Calibrator::default();
        c.observe_range("t", &data);
        c.observe_histogram("t", &data);
        let e = c.threshold("t", CalibrationMethod::Entropy).unwrap();
        // The zero bin used to swamp the divergence and pick the smallest candidate (128 of 2048 bins: 0.375).
        assert!((2.0..=6.0).contains(&e), "entropy threshold {e} cuts into the bulk of (0, 4]");
    }

    #[test]
    fn per_channel_weights_round_trip_within_half_a_step() {
        let w: Vec<f32> = vec![0.5, -1.0, 0.25, 0.0, 10.0, -2.5, 0.0, 0.0];
        let (q, s) = quantize_weight(&w, &[2, 4], 0, 1.0, None, WeightRange::Full, Reduction::Pairs);
        assert_eq!(s.len(), 2);
        assert!((s[0] - 1.0 / 127.0).abs() < 1e-9 && (s[1] - 10.0 / 127.0).abs() < 1e-9);
        for (i, (v, q)) in w.iter().zip(&q).enumerate() {
            assert!((v - *q as f32 * s[i / 4]).abs() <= s[i / 4] / 2.0 + 1e-7);
        }
        assert_eq!((q[1], q[4]), (-127, 127));
        // An all-zero channel keeps a valid scale.
        let (_, s) = quantize_weight(&[0.0, 0.0], &[1, 2], 0, 1.0, None, WeightRange::Safe, Reduction::Pairs);
        assert_eq!(s, vec![1.0]);
    }

    /// Deterministic weights with a heavy tail, like a trained layer's.
    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                u * u.abs() * 4.0
            })
            .collect()
    }

    fn squared_error(w: &[f32], q: &[i8], scale_of: impl Fn(usize) -> f32) -> f64 {
        w.iter().zip(q).enumerate().map(|(i, (v, q))| f64::from(f32::from(*q) * scale_of(i) - v).powi(2)).sum()
    }

    #[test]
    fn safe_weights_keep_every_i16_pair_in_range_and_beat_seven_bits() {
        // [out 32, in 48, 1, 1]: channel c's input channels are indices c*48 .. c*48+47.
        let (cout, cin) = (32, 48);
        let w = weights(cout * cin, 7);
        let (q, s) = quantize_weight(&w, &[cout, cin, 1, 1], 0, 1.0, None, WeightRange::Safe, Reduction::Pairs);
        for c in 0..cout {
            for j in (0..cin).step_by(2) {
                let pair = q[c * cin + j].unsigned_abs() as u32 + q[c * cin + j + 1].unsigned_abs() as u32;
                assert!(pair <= 128, "channel {c} pair {j}: {pair}");
            }
        }
        assert!(q.iter().any(|v| v.unsigned_abs() > 64), "the 8th bit is used");
        let (q7, s7) = quantize_weight(&w, &[cout, cin, 1, 1], 0, 1.0, None, WeightRange::Reduced, Reduction::Pairs);
        assert!(q7.iter().all(|v| v.unsigned_abs() <= 63));
        let (safe, reduced) = (squared_error(&w, &q, |i| s[i / cin]), squared_error(&w, &q7, |i| s7[i / cin]));
        assert!(safe < 0.75 * reduced, "safe error {safe} vs 7-bit {reduced}");
        // Unconstrained 8 bits break the pair limit on the same weights: the check above can fail.
        let (q8, _) = quantize_weight(&w, &[cout, cin, 1, 1], 0, 1.0, None, WeightRange::Full, Reduction::Pairs);
        assert!(q8.chunks(2).any(|p| p[0].unsigned_abs() as u32 + p[1].unsigned_abs() as u32 > 128));
    }

    #[test]
    fn safe_gemm_pairs_run_along_the_reduction_axis() {
        // Gemm without transB: [K 6, N 3], output channels on axis 1, so channel c reads indices c, c+3, c+6, …
        let (k, n) = (6, 3);
        let mut w = vec![0f32; k * n];
        // Column 1's K entries 0 and 1 form a pair, both at full range: one of them must give way.
        w[1] = 1.0;
        w[n + 1] = -1.0;
        // Column 2's K entries 0 and 3 are in different pairs: both keep the full range.
        w[2] = 0.5;
        w[3 * n + 2] = 0.5;
        let (q, s) = quantize_weight(&w, &[k, n], 1, 1.0, None, WeightRange::Safe, Reduction::Pairs);
        assert!(q[1].unsigned_abs() as u32 + q[n + 1].unsigned_abs() as u32 <= 128, "{q:?}");
        assert!((q[1] as f32 * s[1] - 1.0).abs() < 0.5 && (q[n + 1] as f32 * s[1] + 1.0).abs() < 0.5, "{q:?} {s:?}");
        assert_eq!((q[2], q[3 * n + 2]), (127, 127), "{q:?}");
        assert!((s[2] - 0.5 / 127.0).abs() < 1e-9);
    }

    #[test]
    fn safe_weights_of_other_kernels_keep_any_two_within_range() {
        let w = weights(16 * 27, 11);
        let (q, _) = quantize_weight(&w, &[16, 3, 3, 3], 0, 1.0, None, WeightRange::Safe, Reduction::AnyPair);
        for ch in q.chunks(27) {
            let mut m: Vec<u32> = ch.iter().map(|v| v.unsigned_abs() as u32).collect();
            m.sort_unstable();
            assert!(m[26] + m[25] <= 128, "{m:?}");
        }
        // Depthwise kernels accumulate in i32: the full range.
        let (q, _) = quantize_weight(&w, &[16, 1, 3, 9], 0, 1.0, None, WeightRange::Safe, Reduction::Wide);
        assert!(q.chunks(27).all(|ch| ch.iter().any(|v| v.unsigned_abs() == 127)));
    }

    #[test]
    fn kernels_are_classified_by_how_ort_reduces_them() {
        let conv = |group: i64| NodeProto {
            op_type: "Conv".into(),
            attribute: vec![AttributeProto::int("group", group)],
            ..Default::default()
        };
        assert_eq!(reduction(&conv(32), &[32, 1, 3, 3]), Reduction::Wide);
        assert_eq!(reduction(&conv(1), &[64, 32, 1, 1]), Reduction::Pairs);
        assert_eq!(reduction(&conv(1), &[32, 3, 3, 3]), Reduction::AnyPair);
        // Grouped but not depthwise: ORT runs per-group GEMMs over a layout-dependent order.
        assert_eq!(reduction(&conv(2), &[32, 16, 3, 3]), Reduction::AnyPair);
        let gemm = NodeProto { op_type: "Gemm".into(), ..Default::default() };
        assert_eq!(reduction(&gemm, &[10, 1280]), Reduction::Pairs);
    }

    #[test]
    fn weight_ranges_parse() {
        assert_eq!("safe".parse::<WeightRange>().unwrap(), WeightRange::Safe);
        assert_eq!("7".parse::<WeightRange>().unwrap(), WeightRange::Reduced);
        assert_eq!("full".parse::<WeightRange>().unwrap(), WeightRange::Full);
        assert!("9".parse::<WeightRange>().unwrap_err().contains("safe, reduced or full"));
        assert_eq!(WeightRange::default().to_string(), "safe");
    }

    #[test]
    fn method_names_parse() {
        assert_eq!("entropy".parse::<CalibrationMethod>().unwrap(), CalibrationMethod::Entropy);
        assert_eq!("percentile:99.9".parse::<CalibrationMethod>().unwrap(), CalibrationMethod::Percentile(99.9));
        assert!("percentile:0".parse::<CalibrationMethod>().is_err());
        assert!("kl".parse::<CalibrationMethod>().unwrap_err().to_string().contains("minmax, percentile or entropy"));
    }
}
