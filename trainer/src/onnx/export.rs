//! EfficientNet-B0 / Lite0 → ONNX graph construction.

use super::fold::{BatchNorm, fold_bn};
use super::graph::GraphBuilder;
use super::proto::{
    AttributeProto, DataType, Dim, GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto, ValueInfoProto,
};
use super::{BATCH_DIM, ExportOptions, FEATURES, IR_VERSION, OPSET, OnnxError, PRODUCER};
use crate::effnet::{Activation, FEATURE_DIM, Padding};
use crate::weights::{Backbone, LinearHead, Tensor};
use std::collections::{BTreeSet, HashSet};

/// Spatial `pads` for a `kernel`×`kernel` convolution with the given stride on an `in_hw` input, in ONNX order
/// `[top, left, bottom, right]`, together with the output size.
///
/// `Symmetric` pads `k/2` on every side (PyTorch). `TfSame` reproduces TensorFlow's "SAME": the output is
/// `ceil(in/stride)` and the total padding `max((out−1)·stride + k − in, 0)` is split with the odd pixel at the
/// bottom/right. Because it depends on the input size, TF-SAME padding is only static for a fixed input size, which is
/// why export needs the height and width.
pub fn conv_padding(
    padding: Padding,
    kernel: usize,
    stride: usize,
    in_hw: (usize, usize),
) -> ([usize; 4], (usize, usize)) {
    match padding {
        Padding::Symmetric => {
            let p = kernel / 2;
            let out = |i: usize| (i + 2 * p).saturating_sub(kernel) / stride + 1;
            ([p, p, p, p], (out(in_hw.0), out(in_hw.1)))
        }
        Padding::TfSame => {
            let axis = |i: usize| {
                let out = i.div_ceil(stride);
                let total = ((out.max(1) - 1) * stride + kernel).saturating_sub(i);
                (total / 2, total - total / 2, out)
            };
            let (top, bottom, oh) = axis(in_hw.0);
            let (left, right, ow) = axis(in_hw.1);
            ([top, left, bottom, right], (oh, ow))
        }
    }
}

pub(super) fn export_effnet(
    backbone: &Backbone,
    heads: &[LinearHead],
    opts: &ExportOptions,
) -> Result<ModelProto, OnnxError> {
    if opts.height == 0 || opts.width == 0 {
        return Err(OnnxError::InvalidInputSize { height: opts.height, width: opts.width });
    }
    if opts.input_name.is_empty() {
        return Err(OnnxError::EmptyInputName);
    }
    let mut keys = HashSet::new();
    for (k, _) in &opts.metadata {
        if !keys.insert(k.as_str()) {
            return Err(OnnxError::DuplicateMetadataKey { key: k.clone() });
        }
    }
    validate_backbone(backbone)?;
    validate_heads(heads, &opts.input_name)?;

    let mut ex = Exporter { g: GraphBuilder::default(), b: backbone, relu6_bounds: None };
    ex.g.claim_value(&opts.input_name)?;
    let hw = (opts.height as usize, opts.width as usize);
    let features = ex.backbone(&opts.input_name, hw)?;

    let mut outputs = Vec::with_capacity(heads.len());
    for head in heads {
        // Checked before adding anything for this head so that the error names the head rather than whichever
        // internal value it happens to shadow.
        if ex.g.has_value(&head.name) {
            return Err(OnnxError::HeadNameReserved { name: head.name.clone() });
        }
        let node = format!("heads.{}", head.name);
        let w = ex.g.initializer(&format!("{node}.weight"), &head.weight.shape, &head.weight.data)?;
        let b = ex.g.initializer(&format!("{node}.bias"), &head.bias.shape, &head.bias.data)?;
        ex.g.node_to("Gemm", &node, &[&features, &w, &b], &head.name, vec![AttributeProto::int("transB", 1)])?;
        outputs.push(ValueInfoProto::tensor(
            &head.name,
            DataType::Float,
            vec![Dim::Param(BATCH_DIM.into()), Dim::Fixed(head.weight.shape[0] as i64)],
        ));
    }

    let input = ValueInfoProto::tensor(
        &opts.input_name,
        DataType::Float,
        vec![
            Dim::Param(BATCH_DIM.into()),
            Dim::Fixed(3),
            Dim::Fixed(i64::from(opts.height)),
            Dim::Fixed(i64::from(opts.width)),
        ],
    );
    let graph = GraphProto {
        node: ex.g.nodes,
        name: backbone.arch.as_str().into(),
        initializer: ex.g.initializers,
        input: vec![input],
        output: outputs,
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        producer_name: PRODUCER.into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: opts.doc.clone().unwrap_or_default(),
        graph: Some(graph),
        metadata_props: opts
            .metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto { key: k.clone(), value: v.clone() })
            .collect(),
        ..Default::default()
    })
}

pub(super) fn classifier_head(backbone: &Backbone, name: &str) -> Result<LinearHead, OnnxError> {
    let get = |n: &str| {
        backbone.tensors.get(n).cloned().ok_or_else(|| OnnxError::MissingTensor { arch: backbone.arch, name: n.into() })
    };
    let head = LinearHead { name: name.into(), weight: get("classifier.weight")?, bias: get("classifier.bias")? };
    validate_head(&head)?;
    Ok(head)
}

fn check_tensor(name: &str, t: &Tensor, expected: &[usize]) -> Result<(), OnnxError> {
    if t.shape != expected {
        return Err(OnnxError::TensorShape { name: name.into(), expected: expected.to_vec(), actual: t.shape.clone() });
    }
    check_data(name, t)
}

/// `Tensor::new` only debug-asserts the length, and every index computation downstream trusts it.
fn check_data(name: &str, t: &Tensor) -> Result<(), OnnxError> {
    let numel = t.shape.iter().product::<usize>();
    if t.data.len() != numel {
        return Err(OnnxError::TensorLength { name: name.into(), len: t.data.len(), shape: t.shape.clone() });
    }
    if !t.data.iter().all(|v| v.is_finite()) {
        return Err(OnnxError::NonFinite { name: name.into() });
    }
    Ok(())
}

fn validate_backbone(b: &Backbone) -> Result<(), OnnxError> {
    if !(b.bn_eps.is_finite() && b.bn_eps >= 0.0) {
        return Err(OnnxError::InvalidBnEps { eps: b.bn_eps });
    }
    let expected = b.arch.backbone_tensors();
    for (name, shape) in &expected {
        let t = b.tensors.get(name).ok_or_else(|| OnnxError::MissingTensor { arch: b.arch, name: name.clone() })?;
        check_tensor(name, t, shape)?;
    }
    // Extra tensors usually mean weights of the other architecture (B0's SE tensors under a Lite0 label); exporting
    // would silently drop them, so refuse.
    let known: BTreeSet<&str> =
        expected.iter().map(|(n, _)| n.as_str()).chain(["classifier.weight", "classifier.bias"]).collect();
    if let Some(extra) = b.tensors.keys().find(|n| !known.contains(n.as_str())) {
        return Err(OnnxError::UnexpectedTensor { arch: b.arch, name: extra.clone() });
    }
    Ok(())
}

fn validate_head(h: &LinearHead) -> Result<(), OnnxError> {
    let classes = match h.weight.shape[..] {
        [c, FEATURE_DIM] if c > 0 => c,
        _ => return Err(OnnxError::HeadWeightShape { name: h.name.clone(), actual: h.weight.shape.clone() }),
    };
    if h.bias.shape != [classes] {
        return Err(OnnxError::HeadBiasShape { name: h.name.clone(), classes, actual: h.bias.shape.clone() });
    }
    check_data(&format!("heads.{}.weight", h.name), &h.weight)?;
    check_data(&format!("heads.{}.bias", h.name), &h.bias)
}

fn validate_heads(heads: &[LinearHead], input_name: &str) -> Result<(), OnnxError> {
    if heads.is_empty() {
        return Err(OnnxError::NoHeads);
    }
    let mut seen = HashSet::new();
    for (index, h) in heads.iter().enumerate() {
        if h.name.is_empty() {
            return Err(OnnxError::EmptyHeadName { index });
        }
        if h.name == input_name {
            return Err(OnnxError::HeadNameIsInput { name: h.name.clone() });
        }
        if !seen.insert(h.name.as_str()) {
            return Err(OnnxError::DuplicateHeadName { name: h.name.clone() });
        }
        validate_head(h)?;
    }
    Ok(())
}

struct Exporter<'a> {
    g: GraphBuilder,
    b: &'a Backbone,
    /// Names of the shared scalar `Clip` bounds, created on first use.
    relu6_bounds: Option<(String, String)>,
}

impl<'a> Exporter<'a> {
    /// A backbone tensor, borrowed for the backbone's lifetime rather than `self`'s so that it can be passed to
    /// `&mut self` methods. Presence and shape were checked by `validate_backbone`; the error path is kept anyway so
    /// that a future caller skipping validation fails cleanly instead of panicking.
    fn tensor(&self, name: &str) -> Result<&'a Tensor, OnnxError> {
        let b: &'a Backbone = self.b;
        b.tensors.get(name).ok_or_else(|| OnnxError::MissingTensor { arch: b.arch, name: name.into() })
    }

    /// Stem → 16 MBConv blocks → head conv → global pool → flatten; returns the `[batch, 1280]` feature value name.
    fn backbone(&mut self, input: &str, mut hw: (usize, usize)) -> Result<String, OnnxError> {
        let mut x = self.conv_bn("stem", input, 2, 1, &mut hw)?;
        x = self.activation("stem.act", &x)?;
        for (i, spec) in self.b.arch.blocks().iter().enumerate() {
            let p = format!("blocks.{i}");
            let block_in = x.clone();
            if spec.expand_ratio != 1 {
                x = self.conv_bn(&format!("{p}.expand"), &x, 1, 1, &mut hw)?;
                x = self.activation(&format!("{p}.expand.act"), &x)?;
            }
            x = self.conv_bn(&format!("{p}.dw"), &x, spec.stride, spec.expanded, &mut hw)?;
            x = self.activation(&format!("{p}.dw.act"), &x)?;
            if spec.se_channels.is_some() {
                x = self.squeeze_excite(&format!("{p}.se"), &x)?;
            }
            x = self.conv_bn(&format!("{p}.project"), &x, 1, 1, &mut hw)?;
            if spec.has_residual() {
                // Inference graph: drop-connect is the identity.
                x = self.g.node("Add", &format!("{p}.add"), &[&block_in, &x], vec![])?;
            }
        }
        x = self.conv_bn("head", &x, 1, 1, &mut hw)?;
        x = self.activation("head.act", &x)?;
        let pooled = self.g.node("GlobalAveragePool", "pool", &[&x], vec![])?;
        self.g.node_to("Flatten", "flatten", &[&pooled], FEATURES, vec![AttributeProto::int("axis", 1)])
    }

    /// A bias-free convolution `{prefix}.conv.weight` with batch norm `{prefix}.bn.*` folded in, emitted as one `Conv`
    /// node `{prefix}.conv` with initializers `{prefix}.conv.{weight,bias}` (the folded values). Updates `hw`.
    fn conv_bn(
        &mut self,
        prefix: &str,
        input: &str,
        stride: usize,
        group: usize,
        hw: &mut (usize, usize),
    ) -> Result<String, OnnxError> {
        let bn = |s: &str| self.tensor(&format!("{prefix}.bn.{s}"));
        let bn = BatchNorm {
            weight: bn("weight")?,
            bias: bn("bias")?,
            running_mean: bn("running_mean")?,
            running_var: bn("running_var")?,
            eps: self.b.bn_eps,
        };
        let (w, b) = fold_bn(prefix, self.tensor(&format!("{prefix}.conv.weight"))?, bn)?;
        self.conv(&format!("{prefix}.conv"), input, &w, &b, stride, group, hw)
    }

    /// One `Conv` node `name` with initializers `{name}.weight`, `{name}.bias`.
    #[allow(clippy::too_many_arguments)] // Mirrors the Conv operator's own parameters; a struct would only rename them.
    fn conv(
        &mut self,
        name: &str,
        input: &str,
        weight: &Tensor,
        bias: &Tensor,
        stride: usize,
        group: usize,
        hw: &mut (usize, usize),
    ) -> Result<String, OnnxError> {
        let k = weight.shape[2];
        let (pads, out_hw) = conv_padding(self.b.padding, k, stride, *hw);
        *hw = out_hw;
        let w = self.g.initializer(&format!("{name}.weight"), &weight.shape, &weight.data)?;
        let b = self.g.initializer(&format!("{name}.bias"), &bias.shape, &bias.data)?;
        let i = |v: usize| v as i64;
        let attrs = vec![
            AttributeProto::ints("kernel_shape", &[i(k), i(k)]),
            AttributeProto::ints("strides", &[i(stride), i(stride)]),
            AttributeProto::ints("pads", &pads.map(i)),
            AttributeProto::ints("dilations", &[1, 1]),
            AttributeProto::int("group", i(group)),
        ];
        self.g.node("Conv", name, &[input, &w, &b], attrs)
    }

    /// Squeeze-excite: x · σ(expand(SiLU(reduce(mean_hw(x))))). The 1×1 convs carry their own biases and no BN.
    fn squeeze_excite(&mut self, p: &str, x: &str) -> Result<String, OnnxError> {
        let pooled = self.g.node("GlobalAveragePool", &format!("{p}.pool"), &[x], vec![])?;
        // 1×1 convs on a 1×1 map: padding and spatial bookkeeping are irrelevant, but `conv` wants a size to update.
        let mut one = (1, 1);
        let (rw, rb) = (self.tensor(&format!("{p}.reduce.weight"))?, self.tensor(&format!("{p}.reduce.bias"))?);
        let r = self.conv(&format!("{p}.reduce"), &pooled, rw, rb, 1, 1, &mut one)?;
        // SE's inner activation is SiLU in B0 regardless of the block activation (only B0 has SE).
        let r = self.silu(&format!("{p}.act"), &r)?;
        let (ew, eb) = (self.tensor(&format!("{p}.expand.weight"))?, self.tensor(&format!("{p}.expand.bias"))?);
        let e = self.conv(&format!("{p}.expand"), &r, ew, eb, 1, 1, &mut one)?;
        let gate = self.g.node("Sigmoid", &format!("{p}.gate"), &[&e], vec![])?;
        self.g.node("Mul", &format!("{p}.scale"), &[x, &gate], vec![])
    }

    fn activation(&mut self, name: &str, x: &str) -> Result<String, OnnxError> {
        match self.b.arch.activation() {
            Activation::Silu => self.silu(name, x),
            Activation::Relu6 => self.relu6(name, x),
        }
    }

    /// Opset 17 has no SiLU operator: `x · σ(x)` as `{name}.sigmoid` + `{name}` (Mul).
    fn silu(&mut self, name: &str, x: &str) -> Result<String, OnnxError> {
        let s = self.g.node("Sigmoid", &format!("{name}.sigmoid"), &[x], vec![])?;
        self.g.node("Mul", name, &[x, &s], vec![])
    }

    /// `Clip(x, 0, 6)`; since opset 11 the bounds are inputs, shared by every ReLU6 as the scalar initializers
    /// `relu6.min` / `relu6.max`.
    fn relu6(&mut self, name: &str, x: &str) -> Result<String, OnnxError> {
        let (lo, hi) = match &self.relu6_bounds {
            Some(b) => b.clone(),
            None => {
                let b = (self.g.initializer("relu6.min", &[], &[0.0])?, self.g.initializer("relu6.max", &[], &[6.0])?);
                self.relu6_bounds = Some(b.clone());
                b
            }
        };
        self.g.node("Clip", name, &[x, &lo, &hi], vec![])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_padding_is_k_over_2() {
        assert_eq!(conv_padding(Padding::Symmetric, 3, 2, (224, 224)), ([1, 1, 1, 1], (112, 112)));
        assert_eq!(conv_padding(Padding::Symmetric, 5, 2, (7, 14)), ([2, 2, 2, 2], (4, 7)));
        assert_eq!(conv_padding(Padding::Symmetric, 1, 1, (7, 7)), ([0, 0, 0, 0], (7, 7)));
    }

    #[test]
    fn tf_same_padding_puts_the_odd_pixel_bottom_right() {
        // TF: 224 → 112 with k3 s2 needs one pixel, all of it at the end.
        assert_eq!(conv_padding(Padding::TfSame, 3, 2, (224, 224)), ([0, 0, 1, 1], (112, 112)));
        // Odd input: 7 → 4 with k3 s2: total (4−1)·2+3−7 = 2 → 1/1.
        assert_eq!(conv_padding(Padding::TfSame, 3, 2, (7, 7)), ([1, 1, 1, 1], (4, 4)));
        // k5 s2 on 14: total 6·2+5−14 = 3 → 1 top/left, 2 bottom/right; and k5 s1 on 14: 4 → 2/2.
        assert_eq!(conv_padding(Padding::TfSame, 5, 2, (14, 14)), ([1, 1, 2, 2], (7, 7)));
        assert_eq!(conv_padding(Padding::TfSame, 5, 1, (14, 14)), ([2, 2, 2, 2], (14, 14)));
        // Height and width are independent.
        assert_eq!(conv_padding(Padding::TfSame, 5, 2, (16, 14)), ([1, 1, 2, 2], (8, 7)));
        assert_eq!(conv_padding(Padding::TfSame, 3, 2, (16, 7)), ([0, 1, 1, 1], (8, 4)));
        // 1×1 stride-1 convs never pad.
        assert_eq!(conv_padding(Padding::TfSame, 1, 1, (9, 9)), ([0, 0, 0, 0], (9, 9)));
    }
}
