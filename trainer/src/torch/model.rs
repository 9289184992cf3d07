//! EfficientNet-B0 / -Lite0 on libtorch with any number of linear attribute heads.

use super::{TchContext, TorchError};
use crate::effnet::{Activation, Arch, BlockSpec, FEATURE_DIM, HEAD_CHANNELS, Padding, STEM_CHANNELS};
use crate::weights::Backbone;
use std::collections::HashSet;
use tch::nn::{self, Init};
use tch::{Kind, TchError, Tensor};

/// Batch-norm momentum in PyTorch's convention (weight of the *new* batch statistic in the running average).
///
/// PyTorch's default of 0.1 lets the running statistics follow roughly the last ten batches. Fine-tuning runs use
/// small batches of one catalog's images, so a few unrepresentative batches would drag the ImageNet-calibrated
/// statistics around and eval-mode accuracy would jump from epoch to epoch. 0.01 averages over ~100 batches and is
/// also what EfficientNet was trained with (TensorFlow's `decay = 0.99` is PyTorch's `momentum = 0.01`).
pub const BN_MOMENTUM: f64 = 0.01;

/// Optimizer group of backbone conv weights (weight decay applies). Groups let a training loop give the backbone and
/// the heads different learning rates and exempt norms and biases from decay via tch's `set_*_group` calls.
pub const GROUP_BACKBONE_DECAY: usize = 0;
/// Optimizer group of backbone batch-norm affine parameters and biases (conventionally no weight decay).
pub const GROUP_BACKBONE_NO_DECAY: usize = 1;
/// Optimizer group of head weight matrices.
pub const GROUP_HEAD_DECAY: usize = 2;
/// Optimizer group of head biases.
pub const GROUP_HEAD_NO_DECAY: usize = 3;

type TchResult<T> = Result<T, TchError>;

/// Kaiming-normal with fan-out, as torchvision initialises EfficientNet convolutions; only matters for layers that
/// are trained from scratch, since pretrained weights are loaded over it.
const CONV_INIT: Init = Init::Kaiming {
    dist: nn::init::NormalOrUniform::Normal,
    fan: nn::init::FanInOut::FanOut,
    non_linearity: nn::init::NonLinearity::ReLU,
};

/// A bias-free convolution with the model's padding convention applied at run time.
#[derive(Debug)]
struct Conv {
    weight: Tensor,
    kernel: i64,
    stride: i64,
    groups: i64,
}

impl Conv {
    fn new(p: &nn::Path, in_ch: usize, out_ch: usize, kernel: usize, stride: usize, groups: usize) -> TchResult<Self> {
        let (in_ch, out_ch, kernel, stride, groups) =
            (in_ch as i64, out_ch as i64, kernel as i64, stride as i64, groups as i64);
        let weight =
            p.set_group(GROUP_BACKBONE_DECAY).f_var("weight", &[out_ch, in_ch / groups, kernel, kernel], CONV_INIT)?;
        Ok(Self { weight, kernel, stride, groups })
    }

    fn forward(&self, xs: &Tensor, padding: Padding) -> TchResult<Tensor> {
        let s = [self.stride, self.stride];
        match padding {
            Padding::Symmetric => {
                let pad = self.kernel / 2;
                xs.f_conv2d(&self.weight, None::<Tensor>, s, [pad, pad], [1, 1], self.groups)
            }
            Padding::TfSame => {
                let size = xs.size();
                let (top, bottom) = tf_same_pad(size[2], self.kernel, self.stride);
                let (left, right) = tf_same_pad(size[3], self.kernel, self.stride);
                if top + bottom + left + right == 0 {
                    xs.f_conv2d(&self.weight, None::<Tensor>, s, [0, 0], [1, 1], self.groups)
                } else {
                    // constant_pad_nd lists the last dimension first: [left, right, top, bottom].
                    xs.f_constant_pad_nd([left, right, top, bottom])?.f_conv2d(
                        &self.weight,
                        None::<Tensor>,
                        s,
                        [0, 0],
                        [1, 1],
                        self.groups,
                    )
                }
            }
        }
    }
}

/// TensorFlow "SAME" padding for one spatial dimension: the output has `ceil(size / stride)` positions and any odd
/// padding goes after (bottom/right), which is what TF-trained weights expect.
fn tf_same_pad(size: i64, kernel: i64, stride: i64) -> (i64, i64) {
    let out = (size + stride - 1) / stride;
    let total = ((out - 1) * stride + kernel - size).max(0);
    (total / 2, total - total / 2)
}

#[derive(Debug)]
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
}

impl BatchNorm {
    fn new(p: &nn::Path, channels: usize, eps: f64) -> TchResult<Self> {
        let c = [channels as i64];
        let g = p.set_group(GROUP_BACKBONE_NO_DECAY);
        Ok(Self {
            weight: g.f_var("weight", &c, Init::Const(1.0))?,
            bias: g.f_var("bias", &c, Init::Const(0.0))?,
            running_mean: p.f_zeros_no_train("running_mean", &c)?,
            running_var: p.f_ones_no_train("running_var", &c)?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor, train: bool) -> TchResult<Tensor> {
        xs.f_batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            BN_MOMENTUM,
            self.eps,
            true,
        )
    }
}

fn activate(xs: &Tensor, act: Activation) -> TchResult<Tensor> {
    match act {
        Activation::Silu => xs.f_silu(),
        Activation::Relu6 => xs.f_relu6(),
    }
}

/// `{prefix}.conv.weight` + `{prefix}.bn.*`, optionally followed by the activation.
#[derive(Debug)]
struct ConvBn {
    conv: Conv,
    bn: BatchNorm,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        p: &nn::Path,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
        eps: f64,
    ) -> TchResult<Self> {
        Ok(Self {
            conv: Conv::new(&p.sub("conv"), in_ch, out_ch, kernel, stride, groups)?,
            bn: BatchNorm::new(&p.sub("bn"), out_ch, eps)?,
        })
    }

    fn forward(&self, xs: &Tensor, padding: Padding, train: bool, act: Option<Activation>) -> TchResult<Tensor> {
        let ys = self.bn.forward(&self.conv.forward(xs, padding)?, train)?;
        match act {
            Some(act) => activate(&ys, act),
            None => Ok(ys),
        }
    }
}

/// Squeeze-excite as in torchvision: global average → 1×1 conv (bias) → SiLU → 1×1 conv (bias) → sigmoid → scale.
#[derive(Debug)]
struct SqueezeExcite {
    reduce_w: Tensor,
    reduce_b: Tensor,
    expand_w: Tensor,
    expand_b: Tensor,
}

impl SqueezeExcite {
    fn new(p: &nn::Path, channels: usize, squeeze: usize) -> TchResult<Self> {
        let (c, s) = (channels as i64, squeeze as i64);
        let (r, e) = (p.sub("reduce"), p.sub("expand"));
        Ok(Self {
            reduce_w: r.set_group(GROUP_BACKBONE_DECAY).f_var("weight", &[s, c, 1, 1], CONV_INIT)?,
            reduce_b: r.set_group(GROUP_BACKBONE_NO_DECAY).f_var("bias", &[s], Init::Const(0.0))?,
            expand_w: e.set_group(GROUP_BACKBONE_DECAY).f_var("weight", &[c, s, 1, 1], CONV_INIT)?,
            expand_b: e.set_group(GROUP_BACKBONE_NO_DECAY).f_var("bias", &[c], Init::Const(0.0))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> TchResult<Tensor> {
        let one = [1i64, 1];
        let zero = [0i64, 0];
        let scale = xs
            .f_mean_dim([2i64, 3].as_slice(), true, None::<Kind>)?
            .f_conv2d(&self.reduce_w, Some(&self.reduce_b), one, zero, one, 1)?
            .f_silu()?
            .f_conv2d(&self.expand_w, Some(&self.expand_b), one, zero, one, 1)?
            .f_sigmoid()?;
        xs.f_mul(&scale)
    }
}

#[derive(Debug)]
struct MbConv {
    spec: BlockSpec,
    expand: Option<ConvBn>,
    dw: ConvBn,
    se: Option<SqueezeExcite>,
    project: ConvBn,
}

impl MbConv {
    fn new(p: &nn::Path, spec: BlockSpec, eps: f64) -> TchResult<Self> {
        let expand = if spec.expand_ratio != 1 {
            Some(ConvBn::new(&p.sub("expand"), spec.in_ch, spec.expanded, 1, 1, 1, eps)?)
        } else {
            None
        };
        let dw = ConvBn::new(&p.sub("dw"), spec.expanded, spec.expanded, spec.kernel, spec.stride, spec.expanded, eps)?;
        let se = match spec.se_channels {
            Some(s) => Some(SqueezeExcite::new(&p.sub("se"), spec.expanded, s)?),
            None => None,
        };
        let project = ConvBn::new(&p.sub("project"), spec.expanded, spec.out_ch, 1, 1, 1, eps)?;
        Ok(Self { spec, expand, dw, se, project })
    }

    fn forward(
        &self,
        xs: &Tensor,
        padding: Padding,
        act: Activation,
        train: bool,
        drop_path: f64,
    ) -> TchResult<Tensor> {
        let mut h = match &self.expand {
            Some(e) => e.forward(xs, padding, train, Some(act))?,
            None => xs.shallow_clone(),
        };
        h = self.dw.forward(&h, padding, train, Some(act))?;
        if let Some(se) = &self.se {
            h = se.forward(&h)?;
        }
        h = self.project.forward(&h, padding, train, None)?;
        if !self.spec.has_residual() {
            return Ok(h);
        }
        if train && drop_path > 0.0 {
            // Stochastic depth ("row" mode, as torchvision): drop the whole residual branch per sample, rescale the
            // survivors so the expectation matches eval mode.
            let keep = 1.0 - drop_path;
            let n = h.size()[0];
            let mask = Tensor::f_rand([n, 1, 1, 1], (h.f_kind()?, h.device()))?
                .f_lt(keep)?
                .f_to_kind(h.f_kind()?)?
                .f_div_scalar(keep)?;
            h = h.f_mul(&mask)?;
        }
        h.f_add(xs)
    }
}

#[derive(Debug)]
struct Head {
    name: String,
    classes: usize,
    weight: Tensor,
    bias: Tensor,
}

/// The head conv's activation map together with the logits computed from it, for Grad-CAM style explanations:
/// differentiate a logit with respect to `activation` (it is part of the logits' autograd graph).
#[derive(Debug)]
pub struct LastConv {
    /// `[N, 1280, h, w]`: output of the head 1×1 conv after batch norm and activation, before pooling.
    pub activation: Tensor,
    /// One `[N, classes]` tensor per head, in head order.
    pub logits: Vec<Tensor>,
}

/// EfficientNet-B0 or -Lite0 backbone with linear attribute heads on the pooled 1280-d features.
#[derive(Debug)]
pub struct EffNet {
    arch: Arch,
    padding: Padding,
    bn_eps: f64,
    act: Activation,
    stem: ConvBn,
    blocks: Vec<MbConv>,
    head: ConvBn,
    heads: Vec<Head>,
    dropout: f64,
    drop_path: f64,
}

impl EffNet {
    /// Builds the model with its variables under `vs`; pass `vs.root()` so the names are exactly the canonical ones
    /// that [`super::load_backbone`] and [`super::export_backbone`] use. Heads are `heads.{name}.{weight,bias}`
    /// with weight `[classes, 1280]`, in the given order; `dropout` is applied independently before each head.
    ///
    /// Fresh variables are initialised as torchvision does (Kaiming-normal fan-out convs, unit/zero batch norm,
    /// zero head weights and biases, so an untrained model predicts the uniform distribution).
    pub fn new(
        vs: &nn::Path,
        arch: Arch,
        padding: Padding,
        bn_eps: f64,
        heads: &[(String, usize)],
        dropout: f64,
    ) -> Result<Self, TorchError> {
        check_probability("dropout", dropout)?;
        let mut seen = HashSet::new();
        for (name, classes) in heads {
            // tch's Path::sub panics on '.', and a dot would also make the name ambiguous in the flat namespace.
            if name.is_empty() || name.contains('.') {
                return Err(TorchError::BadHeadName(name.clone()));
            }
            if !seen.insert(name.as_str()) {
                return Err(TorchError::DuplicateHead(name.clone()));
            }
            if *classes == 0 {
                return Err(TorchError::EmptyHead(name.clone()));
            }
        }

        let stem =
            ConvBn::new(&vs.sub("stem"), 3, STEM_CHANNELS, 3, 2, 1, bn_eps).ctx(|| "creating the stem".into())?;
        let blocks_path = vs.sub("blocks");
        let blocks = arch
            .blocks()
            .into_iter()
            .enumerate()
            .map(|(i, spec)| MbConv::new(&blocks_path.sub(i), spec, bn_eps).ctx(|| format!("creating block {i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let last_ch = blocks.last().map_or(STEM_CHANNELS, |b| b.spec.out_ch);
        let head = ConvBn::new(&vs.sub("head"), last_ch, HEAD_CHANNELS, 1, 1, 1, bn_eps)
            .ctx(|| "creating the head conv".into())?;

        let heads_path = vs.sub("heads");
        let heads = heads
            .iter()
            .map(|(name, classes)| {
                let p = heads_path.sub(name);
                let c = *classes as i64;
                // Zero, not torchvision's ±1/√classes: pooled features are large (1280 values up to 6), so a random
                // head starts with logits of several units and a loss of 4-7 where ln(classes) is due. That first
                // shock went back into the pretrained backbone and made short fine-tunes unstable (BiT zero-inits
                // its heads for the same reason). A linear layer has no symmetry to break, so zero is safe.
                let weight = p.set_group(GROUP_HEAD_DECAY).f_var("weight", &[c, FEATURE_DIM as i64], Init::Const(0.0));
                let bias = p.set_group(GROUP_HEAD_NO_DECAY).f_var("bias", &[c], Init::Const(0.0));
                Ok(Head { name: name.clone(), classes: *classes, weight: weight?, bias: bias? })
            })
            .collect::<Result<Vec<_>, TchError>>()
            .ctx(|| "creating the heads".into())?;

        Ok(Self { arch, padding, bn_eps, act: arch.activation(), stem, blocks, head, heads, dropout, drop_path: 0.0 })
    }

    /// Builds the model on `vs.root()` with the backbone's own architecture, padding and batch-norm epsilon (which
    /// is what keeps the loaded weights computing what they were trained to) and loads the backbone into it.
    /// Heads start freshly initialised; see [`super::load_heads`] and [`super::classifier_as_head`].
    pub fn from_backbone(
        vs: &mut nn::VarStore,
        backbone: &Backbone,
        heads: &[(String, usize)],
        dropout: f64,
    ) -> Result<Self, TorchError> {
        let eps = f64::from(backbone.bn_eps);
        let model = Self::new(&vs.root(), backbone.arch, backbone.padding, eps, heads, dropout)?;
        super::load_backbone(vs, backbone)?;
        Ok(model)
    }

    /// Enables stochastic depth in training mode: residual block `i` of 16 drops its branch with probability
    /// `rate * i / 16` (torchvision's schedule; EfficientNet-B0 was trained with 0.2). Off (0) by default.
    pub fn with_drop_path(mut self, rate: f64) -> Result<Self, TorchError> {
        check_probability("stochastic depth", rate)?;
        self.drop_path = rate;
        Ok(self)
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    pub fn padding(&self) -> Padding {
        self.padding
    }

    pub fn bn_eps(&self) -> f64 {
        self.bn_eps
    }

    /// `(name, classes)` per head, in output order; what [`super::export_heads`] takes.
    pub fn head_specs(&self) -> Vec<(String, usize)> {
        self.heads.iter().map(|h| (h.name.clone(), h.classes)).collect()
    }

    /// The activation map after the head conv, `[N, 1280, ceil(H/32), ceil(W/32)]` (exact for TF-same padding).
    fn f_head_map(&self, xs: &Tensor, train: bool) -> Result<Tensor, TorchError> {
        let size = xs.size();
        if size.len() != 4 || size[1] != 3 || size[0] == 0 || size[2] == 0 || size[3] == 0 {
            return Err(TorchError::BadInput(size));
        }
        let (pad, act) = (self.padding, self.act);
        let mut x = self.stem.forward(xs, pad, train, Some(act)).ctx(|| "running the stem".into())?;
        let n = self.blocks.len() as f64;
        for (i, b) in self.blocks.iter().enumerate() {
            let rate = self.drop_path * i as f64 / n;
            x = b.forward(&x, pad, act, train, rate).ctx(|| format!("running block {i}"))?;
        }
        self.head.forward(&x, pad, train, Some(act)).ctx(|| "running the head conv".into())
    }

    /// Pooled `[N, 1280]` features of a `[N, 3, H, W]` float batch (already normalised).
    pub fn f_features_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, TorchError> {
        pool(&self.f_head_map(xs, train)?)
    }

    /// Logits per head, in head order, from pooled features (e.g. cached ones when only the heads train).
    pub fn f_heads_from_features_t(&self, features: &Tensor, train: bool) -> Result<Vec<Tensor>, TorchError> {
        self.heads
            .iter()
            .map(|h| {
                features
                    .f_dropout(self.dropout, train)
                    .and_then(|f| f.f_linear(&h.weight, Some(&h.bias)))
                    .ctx(|| format!("running head {:?}", h.name))
            })
            .collect()
    }

    /// Logits per head, in head order: `[N, classes]` each.
    pub fn f_forward_heads_t(&self, xs: &Tensor, train: bool) -> Result<Vec<Tensor>, TorchError> {
        self.f_heads_from_features_t(&self.f_features_t(xs, train)?, train)
    }

    /// The head conv activation map and the logits computed from it; see [`LastConv`].
    pub fn f_last_conv_t(&self, xs: &Tensor, train: bool) -> Result<LastConv, TorchError> {
        let activation = self.f_head_map(xs, train)?;
        let logits = self.f_heads_from_features_t(&pool(&activation)?, train)?;
        Ok(LastConv { activation, logits })
    }

    /// [`Self::f_features_t`] for callers that treat a malformed batch as a bug.
    ///
    /// # Panics
    /// On a malformed input or a libtorch failure, like tch's own non-`f_` methods.
    pub fn features_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.f_features_t(xs, train).unwrap_or_else(|e| panic!("EffNet::features_t: {e}"))
    }

    /// [`Self::f_forward_heads_t`]; panics where that errors.
    ///
    /// # Panics
    /// On a malformed input or a libtorch failure, like tch's own non-`f_` methods.
    pub fn forward_heads_t(&self, xs: &Tensor, train: bool) -> Vec<Tensor> {
        self.f_forward_heads_t(xs, train).unwrap_or_else(|e| panic!("EffNet::forward_heads_t: {e}"))
    }

    /// [`Self::f_last_conv_t`]; panics where that errors.
    ///
    /// # Panics
    /// On a malformed input or a libtorch failure, like tch's own non-`f_` methods.
    pub fn last_conv_t(&self, xs: &Tensor, train: bool) -> LastConv {
        self.f_last_conv_t(xs, train).unwrap_or_else(|e| panic!("EffNet::last_conv_t: {e}"))
    }
}

fn pool(map: &Tensor) -> Result<Tensor, TorchError> {
    map.f_mean_dim([2i64, 3].as_slice(), false, None::<Kind>).ctx(|| "pooling the head activation map".into())
}

fn check_probability(what: &'static str, value: f64) -> Result<(), TorchError> {
    if (0.0..1.0).contains(&value) { Ok(()) } else { Err(TorchError::BadProbability { what, value }) }
}

#[cfg(test)]
mod tests {
    use super::tf_same_pad;

    #[test]
    fn tf_same_padding_puts_the_odd_pixel_after() {
        // 224 → 112 with a 3×3 stride-2 kernel needs one pixel in total: TF puts it at the bottom/right.
        assert_eq!(tf_same_pad(224, 3, 2), (0, 1));
        assert_eq!(tf_same_pad(225, 3, 2), (1, 1));
        assert_eq!(tf_same_pad(14, 5, 2), (1, 2));
        assert_eq!(tf_same_pad(7, 5, 1), (2, 2));
        assert_eq!(tf_same_pad(7, 1, 1), (0, 0));
    }
}
