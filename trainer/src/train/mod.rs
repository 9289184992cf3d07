//! Training configuration, the in-memory training set and everything of a training run that does not need libtorch
//! (augmentation, batching through the shared preprocessing, the learning-rate schedule). The loop itself is
//! `crate::torch::fit` (`torch` feature).

pub mod data;
pub mod schedule;

use std::collections::BTreeMap;
use std::path::PathBuf;

use attrd::preprocess::{ChannelOrder, InputSpec, Interpolation, Layout, ResizeMode};
use serde::{Deserialize, Serialize};

use crate::effnet::Arch;

/// Why a training configuration or run cannot proceed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The configuration is inconsistent.
    #[error("training configuration: {0}")]
    Config(String),
    /// The dataset cannot be used as given.
    #[error("dataset: {0}")]
    Data(String),
    /// An image could not be read.
    #[error("image {path}")]
    Image {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: attrd::preprocess::PreprocessError,
    },
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// `trainer train`'s configuration (TOML). Every field has a default, so a file only states what differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Backbone: `lite0` or `b0`.
    pub arch: Arch,
    /// Canonical weights to start from (`trainer import-weights`); unset: random initialisation.
    pub init: Option<PathBuf>,
    /// Model input. Defaults suit the 60×80 catalogue photos: 96×128, letterboxed on white.
    pub input: InputConfig,
    /// Epochs to train (the run may stop earlier, see `early_stopping_patience`).
    pub epochs: usize,
    /// Images per optimiser step.
    pub batch_size: usize,
    /// Peak learning rate (AdamW) after warm-up.
    pub lr: f64,
    /// Learning-rate multiplier for the heads (fresh layers learn faster than pretrained ones).
    pub head_lr_mult: f64,
    /// Decoupled weight decay of AdamW, applied to conv and head weights only (not to norms and biases).
    pub weight_decay: f64,
    /// Linear warm-up from 0 to `lr`, in epochs (fractions allowed); cosine decay to `min_lr_ratio * lr` follows.
    pub warmup_epochs: f64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Label smoothing of the single-label heads' cross-entropy.
    pub label_smoothing: f64,
    /// Clip the global gradient norm to this (0 disables).
    pub clip_grad_norm: f64,
    /// Dropout before each head.
    pub dropout: f64,
    /// Stochastic depth rate of the backbone's residual blocks.
    pub drop_path: f64,
    /// Train only the heads for this many epochs first (the backbone is frozen, batch norms included).
    pub freeze_backbone_epochs: usize,
    /// During the frozen epochs, run the backbone once per image (without augmentation) and train the heads on
    /// those cached features: one backbone pass in all instead of one per epoch, which makes head-only training
    /// practical on a CPU. Needs `freeze_backbone_epochs > 0`.
    pub cache_frozen_features: bool,
    /// Exponential moving average of the weights with this decay (e.g. 0.999); evaluation and the saved model use
    /// the average. Unset: off.
    pub ema_decay: Option<f64>,
    /// Repeat-factor sampling threshold `t` (LVIS): items of classes rarer than `t` (fraction of the head's labelled
    /// items) are repeated `sqrt(t / f)` times per epoch, each time with fresh augmentation. 0 disables.
    pub repeat_factor_threshold: f64,
    /// Weight single-label heads' loss by inverse class frequency (clipped to [0.1, 10]).
    pub class_weighted_loss: bool,
    /// Per-head loss weights (default 1).
    pub head_weights: BTreeMap<String, f64>,
    /// Stop when the validation macro-F1 (mean over heads) has not improved for this many epochs (0: never).
    pub early_stopping_patience: usize,
    /// Mixed precision (fp16 autocast with dynamic loss scaling) on CUDA; ignored on the CPU.
    pub amp: bool,
    /// Channels-last memory format on CUDA (faster convolutions with tensor cores); ignored on the CPU.
    pub channels_last: bool,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).
    pub device: String,
    /// Threads preparing batches (decode is done once up front; this is augmentation and preprocessing).
    pub workers: usize,
    /// Seed of every random choice (sampling, augmentation, initialisation, dropout).
    pub seed: u64,
    /// Augmentation. Checked against the heads: no colour jitter when a head is a colour, no flips when one is
    /// left/right-specific.
    pub augment: AugmentConfig,
    /// Head properties that constrain augmentation, by head name.
    pub heads: BTreeMap<String, HeadTraits>,
    /// Use at most this many training items (a quick run); unset: all.
    pub max_train_items: Option<usize>,
    /// Use at most this many validation items; unset: all.
    pub max_val_items: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            arch: Arch::Lite0,
            init: None,
            input: InputConfig::default(),
            epochs: 10,
            batch_size: 128,
            lr: 2e-3,
            head_lr_mult: 5.0,
            weight_decay: 0.02,
            warmup_epochs: 1.0,
            min_lr_ratio: 0.01,
            label_smoothing: 0.1,
            clip_grad_norm: 2.0,
            dropout: 0.2,
            drop_path: 0.1,
            freeze_backbone_epochs: 0,
            cache_frozen_features: false,
            ema_decay: None,
            repeat_factor_threshold: 0.01,
            class_weighted_loss: false,
            head_weights: BTreeMap::new(),
            early_stopping_patience: 3,
            amp: true,
            channels_last: true,
            device: "auto".into(),
            workers: 0,
            seed: 42,
            augment: AugmentConfig::default(),
            heads: BTreeMap::new(),
            max_train_items: None,
            max_val_items: None,
        }
    }
}

/// Model input size and normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `letterbox` (keep everything, pad with white), `center_crop` or `stretch`.
    pub resize: ResizeMode,
    /// Per-channel mean; unset: the backbone's own (0.5 for Lite0, ImageNet's for B0).
    pub mean: Option<[f32; 3]>,
    /// Per-channel standard deviation; unset: the backbone's own.
    pub std: Option<[f32; 3]>,
}

impl Default for InputConfig {
    fn default() -> Self {
        Self { width: 96, height: 128, resize: ResizeMode::Letterbox, mean: None, std: None }
    }
}

/// Label-preserving augmentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Random crop keeping this range of the image's area (then resized as at inference). `[1, 1]` disables.
    pub crop_scale: [f32; 2],
    /// Random horizontal flips.
    pub hflip: bool,
    /// Brightness jitter: factor drawn from `[1 - b, 1 + b]`.
    pub brightness: f32,
    /// Contrast jitter: factor drawn from `[1 - c, 1 + c]`.
    pub contrast: f32,
    /// Saturation jitter; refused when a head is a colour.
    pub saturation: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self { crop_scale: [0.75, 1.0], hflip: true, brightness: 0.1, contrast: 0.1, saturation: 0.0 }
    }
}

/// What augmentation must not destroy in a head's labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadTraits {
    /// The head names a colour: no saturation (or hue) jitter.
    pub colour: bool,
    /// The head distinguishes left from right: no horizontal flips.
    pub handed: bool,
}

impl TrainConfig {
    /// Reads a TOML file.
    pub fn load(path: &std::path::Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))
    }

    /// Checks the numbers and that augmentation respects the heads' traits.
    pub fn validate(&self, head_names: &[String]) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.epochs == 0 || self.batch_size == 0 {
            return bad("epochs and batch_size must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) || self.head_lr_mult <= 0.0 {
            return bad(format!("lr ({}) and head_lr_mult ({}) must be positive", self.lr, self.head_lr_mult));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) || !(0.0..1.0).contains(&self.dropout) {
            return bad("label_smoothing and dropout must be in [0, 1)".into());
        }
        if let Some(d) = self.ema_decay
            && !(0.0..1.0).contains(&d)
        {
            return bad(format!("ema_decay {d} must be in [0, 1)"));
        }
        if self.cache_frozen_features && self.freeze_backbone_epochs == 0 {
            return bad(
                "cache_frozen_features needs freeze_backbone_epochs > 0 (it caches the frozen backbone's features)"
                    .into(),
            );
        }
        let [lo, hi] = self.augment.crop_scale;
        if !(0.0 < lo && lo <= hi && hi <= 1.0) {
            return bad(format!("augment.crop_scale {:?} must satisfy 0 < lo <= hi <= 1", self.augment.crop_scale));
        }
        for name in self.heads.keys().chain(self.head_weights.keys()) {
            if !head_names.contains(name) {
                return bad(format!(
                    "head {name:?} is configured but the dataset has no such attribute ({head_names:?})"
                ));
            }
        }
        for (name, t) in &self.heads {
            if t.colour && self.augment.saturation > 0.0 {
                return bad(format!("augment.saturation would change the labels of colour head {name:?}; set it to 0"));
            }
            if t.handed && self.augment.hflip {
                return bad(format!("augment.hflip would swap left and right for head {name:?}; set it to false"));
            }
        }
        if self.input.width < 16 || self.input.height < 16 {
            return bad("input width and height must be at least 16".into());
        }
        Ok(())
    }

    /// The input spec the model is trained with and the bundle will carry.
    pub fn input_spec(&self) -> InputSpec {
        let (mean, std) = match self.arch {
            // EfficientNet-Lite was trained on inputs scaled to [-1, 1].
            Arch::Lite0 => ([0.5; 3], [0.5; 3]),
            Arch::B0 => (attrd::preprocess::IMAGENET_MEAN, attrd::preprocess::IMAGENET_STD),
        };
        InputSpec {
            width: self.input.width,
            height: self.input.height,
            resize: self.input.resize,
            crop_fraction: 1.0,
            interpolation: Interpolation::Bilinear,
            fill: [255, 255, 255],
            mean: self.input.mean.unwrap_or(mean),
            std: self.input.std.unwrap_or(std),
            channel_order: ChannelOrder::Rgb,
            layout: Layout::Nchw,
        }
    }
}

/// The heads a curated dataset defines, in its attribute order.
pub fn heads_of(ds: &crate::curate::Dataset) -> Vec<data::HeadSpec> {
    ds.attributes
        .iter()
        .map(|a| data::HeadSpec {
            name: a.name.clone(),
            classes: a.classes.clone(),
            multi_label: a.kind == crate::curate::schema::Kind::Multi,
        })
        .collect()
}

/// The items of one split (at most `limit`, taken in id order) with their targets, ready for
/// [`data::load_examples`].
pub fn items_of(ds: &crate::curate::Dataset, split: crate::curate::Split, limit: Option<usize>) -> Vec<data::ItemSpec> {
    use crate::curate::Label;
    ds.items(split)
        .take(limit.unwrap_or(usize::MAX))
        .map(|it| {
            let targets = it
                .labels
                .iter()
                .map(|l| match l {
                    Label::Class(c) => data::Target::Class(*c as usize),
                    Label::Multi(v) => data::Target::Multi(v.iter().map(|&c| c as usize).collect()),
                    Label::Missing => data::Target::Missing,
                    Label::NotApplicable => data::Target::NotApplicable,
                })
                .collect();
            (it.id.clone(), ds.image_path(it), targets, it.group.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn augmentation_that_would_destroy_labels_is_refused() {
        let heads = vec!["baseColour".to_string(), "shoe_side".to_string()];
        let mut c = TrainConfig::default();
        c.heads.insert("baseColour".into(), HeadTraits { colour: true, handed: false });
        c.augment.saturation = 0.2;
        assert!(c.validate(&heads).unwrap_err().to_string().contains("colour head \"baseColour\""));
        c.augment.saturation = 0.0;
        c.validate(&heads).unwrap();
        c.heads.insert("shoe_side".into(), HeadTraits { colour: false, handed: true });
        assert!(c.validate(&heads).unwrap_err().to_string().contains("hflip"));
        c.augment.hflip = false;
        c.validate(&heads).unwrap();
        c.heads.insert("nope".into(), HeadTraits::default());
        assert!(c.validate(&heads).unwrap_err().to_string().contains("no such attribute"));
    }

    #[test]
    fn toml_rejects_unknown_keys_and_fills_defaults() {
        let c: TrainConfig = toml::from_str("epochs = 3\n[input]\nwidth = 64\nheight = 64\n").unwrap();
        assert_eq!((c.epochs, c.input.width, c.batch_size), (3, 64, 128));
        assert!(toml::from_str::<TrainConfig>("epoch = 3\n").unwrap_err().to_string().contains("epoch"));
        assert_eq!(c.input_spec().mean, [0.5; 3]);
    }
}
