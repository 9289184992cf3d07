//! EfficientNet-B0 / EfficientNet-Lite0 architecture description and the canonical tensor names every other part of
//! the trainer (weight import, ONNX export, libtorch model) agrees on.
//!
//! Canonical names (BN tensors are `{weight, bias, running_mean, running_var}` under the given prefix):
//! - `stem.conv.weight`, `stem.bn.*`
//! - `blocks.{i}.expand.conv.weight`, `blocks.{i}.expand.bn.*` (only when the expand ratio is not 1)
//! - `blocks.{i}.dw.conv.weight`, `blocks.{i}.dw.bn.*`
//! - `blocks.{i}.se.reduce.{weight,bias}`, `blocks.{i}.se.expand.{weight,bias}` (B0 only; 1×1 conv weights)
//! - `blocks.{i}.project.conv.weight`, `blocks.{i}.project.bn.*`
//! - `head.conv.weight`, `head.bn.*`
//! - `classifier.{weight,bias}` (optional ImageNet-style single head, `[classes, 1280]`)
//!
//! `i` runs over all 16 MBConv blocks in order, flattened across stages.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The two backbones the trainer supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Arch {
    #[serde(rename = "efficientnet-b0")]
    B0,
    #[serde(rename = "efficientnet-lite0")]
    Lite0,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::B0 => "efficientnet-b0",
            Arch::Lite0 => "efficientnet-lite0",
        }
    }

    /// Lite variants drop squeeze-excite and use ReLU6 so that they quantize well; B0 uses SiLU and SE.
    pub fn activation(self) -> Activation {
        match self {
            Arch::B0 => Activation::Silu,
            Arch::Lite0 => Activation::Relu6,
        }
    }

    /// Padding for a model trained from scratch: symmetric (torchvision's convention, what ONNX and TensorRT run
    /// fastest).
    pub fn default_padding(self) -> Padding {
        Padding::Symmetric
    }

    /// Batch-norm epsilon for a model trained from scratch (torchvision's EfficientNet uses 1e-3 for both).
    pub fn default_bn_eps(self) -> f64 {
        1e-3
    }

    pub fn has_se(self) -> bool {
        matches!(self, Arch::B0)
    }

    /// All 16 MBConv blocks, flattened across stages.
    pub fn blocks(self) -> Vec<BlockSpec> {
        let mut out = Vec::with_capacity(16);
        let mut in_ch = STEM_CHANNELS;
        for stage in STAGES {
            for r in 0..stage.repeats {
                let stride = if r == 0 { stage.stride } else { 1 };
                let expanded = in_ch * stage.expand;
                let se_channels = if self.has_se() { Some((in_ch / 4).max(1)) } else { None };
                out.push(BlockSpec {
                    in_ch,
                    out_ch: stage.out_ch,
                    expand_ratio: stage.expand,
                    expanded,
                    kernel: stage.kernel,
                    stride,
                    se_channels,
                });
                in_ch = stage.out_ch;
            }
        }
        out
    }

    /// Every parameter and buffer tensor the backbone needs (no classifier), with its shape, in a stable order.
    pub fn backbone_tensors(self) -> Vec<(String, Vec<usize>)> {
        let mut t = Vec::new();
        let bn = |t: &mut Vec<(String, Vec<usize>)>, prefix: &str, c: usize| {
            for s in ["weight", "bias", "running_mean", "running_var"] {
                t.push((format!("{prefix}.bn.{s}"), vec![c]));
            }
        };
        t.push(("stem.conv.weight".into(), vec![STEM_CHANNELS, 3, 3, 3]));
        bn(&mut t, "stem", STEM_CHANNELS);
        for (i, b) in self.blocks().iter().enumerate() {
            let p = format!("blocks.{i}");
            if b.expand_ratio != 1 {
                t.push((format!("{p}.expand.conv.weight"), vec![b.expanded, b.in_ch, 1, 1]));
                bn(&mut t, &format!("{p}.expand"), b.expanded);
            }
            t.push((format!("{p}.dw.conv.weight"), vec![b.expanded, 1, b.kernel, b.kernel]));
            bn(&mut t, &format!("{p}.dw"), b.expanded);
            if let Some(se) = b.se_channels {
                t.push((format!("{p}.se.reduce.weight"), vec![se, b.expanded, 1, 1]));
                t.push((format!("{p}.se.reduce.bias"), vec![se]));
                t.push((format!("{p}.se.expand.weight"), vec![b.expanded, se, 1, 1]));
                t.push((format!("{p}.se.expand.bias"), vec![b.expanded]));
            }
            t.push((format!("{p}.project.conv.weight"), vec![b.out_ch, b.expanded, 1, 1]));
            bn(&mut t, &format!("{p}.project"), b.out_ch);
        }
        t.push(("head.conv.weight".into(), vec![HEAD_CHANNELS, 320, 1, 1]));
        bn(&mut t, "head", HEAD_CHANNELS);
        t
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "efficientnet-b0" | "b0" | "efficientnet_b0" => Ok(Arch::B0),
            "efficientnet-lite0" | "lite0" | "efficientnet_lite0" => Ok(Arch::Lite0),
            other => Err(format!("unknown architecture {other:?} (expected efficientnet-b0 or efficientnet-lite0)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Relu6,
}

/// How convolutions pad. TF-ported checkpoints were trained with TensorFlow's asymmetric "SAME" padding; PyTorch-native
/// ones with symmetric `k/2` padding. Using the wrong one costs accuracy silently, so it travels with the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    Symmetric,
    TfSame,
}

impl Padding {
    pub fn as_str(self) -> &'static str {
        match self {
            Padding::Symmetric => "symmetric",
            Padding::TfSame => "tf_same",
        }
    }
}

impl FromStr for Padding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "symmetric" => Ok(Padding::Symmetric),
            "tf_same" => Ok(Padding::TfSame),
            other => Err(format!("unknown padding {other:?} (expected symmetric or tf_same)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpec {
    pub in_ch: usize,
    pub out_ch: usize,
    pub expand_ratio: usize,
    /// Channels after the expand 1×1 conv (= `in_ch` when the ratio is 1).
    pub expanded: usize,
    pub kernel: usize,
    pub stride: usize,
    /// Squeeze-excite bottleneck width (B0: a quarter of the block's input channels).
    pub se_channels: Option<usize>,
}

impl BlockSpec {
    /// Residual connections exist only where shapes match.
    pub fn has_residual(&self) -> bool {
        self.stride == 1 && self.in_ch == self.out_ch
    }
}

struct Stage {
    expand: usize,
    kernel: usize,
    stride: usize,
    out_ch: usize,
    repeats: usize,
}

pub const STEM_CHANNELS: usize = 32;
pub const HEAD_CHANNELS: usize = 1280;
/// Width of the pooled feature vector the attribute heads read.
pub const FEATURE_DIM: usize = HEAD_CHANNELS;

/// Width and depth multipliers are 1.0 for both B0 and Lite0, so one table serves both.
const STAGES: [Stage; 7] = [
    Stage { expand: 1, kernel: 3, stride: 1, out_ch: 16, repeats: 1 },
    Stage { expand: 6, kernel: 3, stride: 2, out_ch: 24, repeats: 2 },
    Stage { expand: 6, kernel: 5, stride: 2, out_ch: 40, repeats: 2 },
    Stage { expand: 6, kernel: 3, stride: 2, out_ch: 80, repeats: 3 },
    Stage { expand: 6, kernel: 5, stride: 1, out_ch: 112, repeats: 3 },
    Stage { expand: 6, kernel: 5, stride: 2, out_ch: 192, repeats: 4 },
    Stage { expand: 6, kernel: 3, stride: 1, out_ch: 320, repeats: 1 },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_table_matches_the_paper() {
        let b = Arch::B0.blocks();
        assert_eq!(b.len(), 16);
        assert_eq!(b[0].expanded, 32);
        assert_eq!(b[0].se_channels, Some(8));
        assert_eq!(b[1].expanded, 96);
        assert_eq!(b[1].se_channels, Some(4));
        assert_eq!(b[15].out_ch, 320);
        assert!(Arch::Lite0.blocks().iter().all(|b| b.se_channels.is_none()));
    }

    #[test]
    fn parameter_counts_match_published_sizes() {
        let count = |a: Arch| -> usize {
            a.backbone_tensors()
                .iter()
                .filter(|(n, _)| !n.ends_with("running_mean") && !n.ends_with("running_var"))
                .map(|(_, s)| s.iter().product::<usize>())
                .sum::<usize>()
                + 1000 * 1280
                + 1000
        };
        // torchvision efficientnet_b0: 5,288,548 parameters; EfficientNet-Lite0: 4,652,008.
        assert_eq!(count(Arch::B0), 5_288_548);
        assert_eq!(count(Arch::Lite0), 4_652_008);
    }
}
