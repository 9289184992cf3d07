//! Naming schemes of EfficientNet checkpoints and their mapping onto the canonical names of [`crate::effnet`].
//!
//! | scheme      | stem                          | block (flattened `i` / stage `s`, repeat `j`)                      | head                      | classifier            |
//! |-------------|-------------------------------|--------------------------------------------------------------------|---------------------------|-----------------------|
//! | lukemelas   | `_conv_stem`, `_bn0`          | `_blocks.{i}._expand_conv/_bn0/_depthwise_conv/_bn1/_se_reduce/_se_expand/_project_conv/_bn2` | `_conv_head`, `_bn1` | `_fc` |
//! | torchvision | `features.0.0`, `features.0.1`| `features.{s+1}.{j}.block.{k}` — k runs over [expand], dw, [SE `fc1`/`fc2`], project; conv parts are `.0` conv / `.1` bn | `features.8.0/.1` | `classifier.1` |
//! | timm        | `conv_stem`, `bn1`            | `blocks.{s}.{j}.` DS (expand 1): `conv_dw/bn1/se.conv_reduce/se.conv_expand/conv_pw/bn2`; IR: `conv_pw/bn1/conv_dw/bn2/se.*/conv_pwl/bn3` | `conv_head`, `bn2` | `classifier` |
//! | canonical   | `stem.conv`, `stem.bn`        | `blocks.{i}.expand/dw/se/project`                                  | `head.conv`, `head.bn`    | `classifier`          |

use crate::effnet::Arch;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// The naming scheme a checkpoint uses, detected from its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// `lukemelas/EfficientNet-PyTorch` and ports built on it (the TF-converted Lite0 file).
    Lukemelas,
    /// `torchvision.models.efficientnet_b0`.
    Torchvision,
    /// `timm` (`efficientnet_b0`, `efficientnet_lite0`, `tf_efficientnet_*`).
    Timm,
    /// Our own names.
    Canonical,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Lukemelas => "lukemelas",
            Source::Torchvision => "torchvision",
            Source::Timm => "timm",
            Source::Canonical => "canonical",
        }
    }

    /// Detects the scheme from tensor names: by the stem convolution's name, else by the block prefix.
    pub fn detect<'a>(keys: impl IntoIterator<Item = &'a str> + Clone) -> Option<Source> {
        let has = |k: &str| keys.clone().into_iter().any(|x| x == k);
        if has("_conv_stem.weight") {
            return Some(Source::Lukemelas);
        }
        if has("features.0.0.weight") {
            return Some(Source::Torchvision);
        }
        if has("conv_stem.weight") {
            return Some(Source::Timm);
        }
        if has("stem.conv.weight") {
            return Some(Source::Canonical);
        }
        // No stem (a partial or broken file): fall back on how blocks are named, so the error can be specific.
        for k in keys {
            if k.starts_with("_blocks.") {
                return Some(Source::Lukemelas);
            }
            if k.starts_with("features.") && k.contains(".block.") {
                return Some(Source::Torchvision);
            }
            let parts: Vec<&str> = k.split('.').collect();
            if parts.len() > 3 && parts[0] == "blocks" && parts[1].parse::<usize>().is_ok() {
                if parts[2].parse::<usize>().is_ok() {
                    return Some(Source::Timm);
                }
                if matches!(parts[2], "expand" | "dw" | "se" | "project") {
                    return Some(Source::Canonical);
                }
            }
        }
        None
    }

    /// B0 has squeeze-excite tensors, Lite0 has none; that is the only difference in the key sets.
    pub fn detect_arch<'a>(self, keys: impl IntoIterator<Item = &'a str>) -> Arch {
        let marker = match self {
            Source::Lukemelas => "._se_reduce.",
            Source::Torchvision => ".fc1.",
            Source::Timm => ".se.conv_reduce.",
            Source::Canonical => ".se.reduce.",
        };
        if keys.into_iter().any(|k| k.contains(marker)) { Arch::B0 } else { Arch::Lite0 }
    }

    /// Whether a (wrapper-stripped) name belongs to the scheme's classifier, including classifiers other than
    /// the single linear layer we can keep (e.g. a custom `classifier.4` MLP).
    pub fn is_classifier(self, key: &str) -> bool {
        match self {
            Source::Lukemelas => key.starts_with("_fc."),
            Source::Torchvision | Source::Timm | Source::Canonical => key.starts_with("classifier."),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lukemelas" => Ok(Source::Lukemelas),
            "torchvision" => Ok(Source::Torchvision),
            "timm" => Ok(Source::Timm),
            "canonical" => Ok(Source::Canonical),
            other => {
                Err(format!("unknown weight source {other:?} (expected lukemelas, torchvision, timm or canonical)"))
            }
        }
    }
}

const BN_FIELDS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Expand,
    Dw,
    Se,
    Project,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Expand => "expand",
            Part::Dw => "dw",
            Part::Se => "se",
            Part::Project => "project",
        }
    }
}

/// Maps foreign names to canonical ones for one architecture.
#[derive(Debug, Clone)]
pub struct NameMapper {
    source: Source,
    /// (stage, repeat) → flattened block index.
    by_stage: HashMap<(usize, usize), usize>,
    /// Per flattened block: the parts in module order, which is how torchvision numbers them.
    parts: Vec<Vec<Part>>,
}

impl NameMapper {
    pub fn new(source: Source, arch: Arch) -> Self {
        let blocks = arch.blocks();
        let mut by_stage = HashMap::new();
        let (mut stage, mut j) = (0usize, 0usize);
        for (i, b) in blocks.iter().enumerate() {
            // Every stage has its own output width, so a width change marks a stage boundary.
            if i > 0 && b.out_ch != blocks[i - 1].out_ch {
                stage += 1;
                j = 0;
            }
            by_stage.insert((stage, j), i);
            j += 1;
        }
        let parts = blocks
            .iter()
            .map(|b| {
                let mut p = Vec::with_capacity(4);
                if b.expand_ratio != 1 {
                    p.push(Part::Expand);
                }
                p.push(Part::Dw);
                if b.se_channels.is_some() {
                    p.push(Part::Se);
                }
                p.push(Part::Project);
                p
            })
            .collect();
        Self { source, by_stage, parts }
    }

    /// The canonical name for `key`, or `None` when it has no place in the architecture.
    pub fn map(&self, key: &str) -> Option<String> {
        match self.source {
            Source::Lukemelas => self.lukemelas(key),
            Source::Torchvision => self.torchvision(key),
            Source::Timm => self.timm(key),
            Source::Canonical => Some(key.to_owned()),
        }
    }

    fn block(&self, stage: usize, j: &str) -> Option<usize> {
        self.by_stage.get(&(stage, j.parse().ok()?)).copied()
    }

    fn lukemelas(&self, key: &str) -> Option<String> {
        if let Some(rest) = key.strip_prefix("_blocks.") {
            let (i, rest) = rest.split_once('.')?;
            let i: usize = i.parse().ok().filter(|&i| i < self.parts.len())?;
            let (module, field) = rest.split_once('.')?;
            let (part, kind) = match module {
                "_expand_conv" => ("expand", "conv"),
                "_bn0" => ("expand", "bn"),
                "_depthwise_conv" => ("dw", "conv"),
                "_bn1" => ("dw", "bn"),
                "_se_reduce" => ("se", "reduce"),
                "_se_expand" => ("se", "expand"),
                "_project_conv" => ("project", "conv"),
                "_bn2" => ("project", "bn"),
                _ => return None,
            };
            return leaf(&format!("blocks.{i}.{part}.{kind}"), kind, field);
        }
        let (module, field) = key.split_once('.')?;
        match module {
            "_conv_stem" => leaf("stem.conv", "conv", field),
            "_bn0" => leaf("stem.bn", "bn", field),
            "_conv_head" => leaf("head.conv", "conv", field),
            "_bn1" => leaf("head.bn", "bn", field),
            "_fc" => leaf("classifier", "linear", field),
            _ => None,
        }
    }

    fn torchvision(&self, key: &str) -> Option<String> {
        let p: Vec<&str> = key.split('.').collect();
        match p.as_slice() {
            ["features", "0", "0", f] => leaf("stem.conv", "conv", f),
            ["features", "0", "1", f] => leaf("stem.bn", "bn", f),
            ["features", "8", "0", f] => leaf("head.conv", "conv", f),
            ["features", "8", "1", f] => leaf("head.bn", "bn", f),
            ["classifier", "1", f] | ["classifier", f] => leaf("classifier", "linear", f),
            ["features", s, j, "block", k, rest @ ..] => {
                let stage = s.parse::<usize>().ok()?.checked_sub(1)?;
                let i = self.block(stage, j)?;
                let part = *self.parts[i].get(k.parse::<usize>().ok()?)?;
                let prefix = format!("blocks.{i}.{}", part.name());
                match (part, rest) {
                    (Part::Se, ["fc1", f]) => leaf(&format!("{prefix}.reduce"), "reduce", f),
                    (Part::Se, ["fc2", f]) => leaf(&format!("{prefix}.expand"), "expand", f),
                    (Part::Se, _) => None,
                    (_, ["0", f]) => leaf(&format!("{prefix}.conv"), "conv", f),
                    (_, ["1", f]) => leaf(&format!("{prefix}.bn"), "bn", f),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn timm(&self, key: &str) -> Option<String> {
        let p: Vec<&str> = key.split('.').collect();
        match p.as_slice() {
            ["conv_stem", f] => leaf("stem.conv", "conv", f),
            ["bn1", f] => leaf("stem.bn", "bn", f),
            ["conv_head", f] => leaf("head.conv", "conv", f),
            ["bn2", f] => leaf("head.bn", "bn", f),
            ["classifier", f] => leaf("classifier", "linear", f),
            ["blocks", s, j, rest @ ..] => {
                let i = self.block(s.parse().ok()?, j)?;
                let ds = !self.parts[i].contains(&Part::Expand);
                let b = format!("blocks.{i}");
                match (ds, rest) {
                    (_, ["se", "conv_reduce", f]) => leaf(&format!("{b}.se.reduce"), "reduce", f),
                    (_, ["se", "conv_expand", f]) => leaf(&format!("{b}.se.expand"), "expand", f),
                    (_, ["conv_dw", f]) => leaf(&format!("{b}.dw.conv"), "conv", f),
                    (true, ["bn1", f]) => leaf(&format!("{b}.dw.bn"), "bn", f),
                    (true, ["conv_pw", f]) => leaf(&format!("{b}.project.conv"), "conv", f),
                    (true, ["bn2", f]) => leaf(&format!("{b}.project.bn"), "bn", f),
                    (false, ["conv_pw", f]) => leaf(&format!("{b}.expand.conv"), "conv", f),
                    (false, ["bn1", f]) => leaf(&format!("{b}.expand.bn"), "bn", f),
                    (false, ["bn2", f]) => leaf(&format!("{b}.dw.bn"), "bn", f),
                    (false, ["conv_pwl", f]) => leaf(&format!("{b}.project.conv"), "conv", f),
                    (false, ["bn3", f]) => leaf(&format!("{b}.project.bn"), "bn", f),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// Appends a field to a module prefix if the field exists on that kind of module: convolutions have only a
/// weight (all EfficientNet convs are bias-free), SE convs and linears a weight and bias, BNs four tensors.
fn leaf(prefix: &str, kind: &str, field: &str) -> Option<String> {
    let ok = match kind {
        "conv" => field == "weight",
        "bn" => BN_FIELDS.contains(&field),
        _ => field == "weight" || field == "bias",
    };
    ok.then(|| format!("{prefix}.{field}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_representative_names() {
        let tv = NameMapper::new(Source::Torchvision, Arch::B0);
        assert_eq!(tv.map("features.1.0.block.0.0.weight").as_deref(), Some("blocks.0.dw.conv.weight"));
        assert_eq!(tv.map("features.1.0.block.1.fc2.bias").as_deref(), Some("blocks.0.se.expand.bias"));
        assert_eq!(tv.map("features.1.0.block.2.1.running_var").as_deref(), Some("blocks.0.project.bn.running_var"));
        assert_eq!(tv.map("features.2.1.block.0.0.weight").as_deref(), Some("blocks.2.expand.conv.weight"));
        assert_eq!(tv.map("features.7.0.block.3.0.weight").as_deref(), Some("blocks.15.project.conv.weight"));
        assert_eq!(tv.map("features.7.1.block.3.0.weight"), None);
        assert_eq!(tv.map("features.0.0.bias"), None);

        let timm = NameMapper::new(Source::Timm, Arch::Lite0);
        assert_eq!(timm.map("blocks.0.0.conv_pw.weight").as_deref(), Some("blocks.0.project.conv.weight"));
        assert_eq!(timm.map("blocks.1.0.conv_pw.weight").as_deref(), Some("blocks.1.expand.conv.weight"));
        assert_eq!(timm.map("blocks.5.3.bn3.bias").as_deref(), Some("blocks.14.project.bn.bias"));
        assert_eq!(timm.map("bn2.running_mean").as_deref(), Some("head.bn.running_mean"));

        let lm = NameMapper::new(Source::Lukemelas, Arch::B0);
        assert_eq!(lm.map("_blocks.3._se_reduce.bias").as_deref(), Some("blocks.3.se.reduce.bias"));
        assert_eq!(lm.map("_bn1.weight").as_deref(), Some("head.bn.weight"));
        assert_eq!(lm.map("_blocks.3._bn1.weight").as_deref(), Some("blocks.3.dw.bn.weight"));
        assert_eq!(lm.map("_blocks.16._bn1.weight"), None);
        assert_eq!(lm.map("_fc.weight").as_deref(), Some("classifier.weight"));
    }

    #[test]
    fn detects_scheme_and_arch() {
        let keys = ["features.0.0.weight", "features.1.0.block.1.fc1.weight"];
        let s = Source::detect(keys.iter().copied()).unwrap();
        assert_eq!(s, Source::Torchvision);
        assert_eq!(s.detect_arch(keys.iter().copied()), Arch::B0);
        assert_eq!(Source::detect(["blocks.3.1.conv_pwl.weight"].iter().copied()), Some(Source::Timm));
        assert_eq!(Source::detect(["blocks.3.dw.conv.weight"].iter().copied()), Some(Source::Canonical));
        assert_eq!(Source::detect(["fc.weight", "layer1.0.conv1.weight"].iter().copied()), None);
    }
}
