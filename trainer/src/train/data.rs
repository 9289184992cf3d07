//! The training set in memory and batches made from it. Images are decoded once with the shared decoder (the one
//! the daemon uses), kept as small RGB images, and turned into tensors per batch by the shared preprocessing after
//! label-preserving augmentation, so training sees exactly the pixels serving will see, give or take augmentation.

use std::path::PathBuf;
use std::sync::Arc;

use attrd::preprocess::{Limits, Preprocessor};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::{AugmentConfig, TrainError};

/// One head's label for one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A single-label head's class index.
    Class(usize),
    /// A multi-label head's class indices (possibly empty: known to have none).
    Multi(Vec<usize>),
    /// Unknown: excluded from the loss and the metrics.
    Missing,
    /// The attribute does not apply to this item: excluded likewise, but counted separately in reports.
    NotApplicable,
}

impl Target {
    /// Whether the label takes part in loss and metrics.
    pub fn is_known(&self) -> bool {
        matches!(self, Target::Class(_) | Target::Multi(_))
    }

    /// The class index of a single-label target.
    pub fn class(&self) -> Option<usize> {
        match self {
            Target::Class(c) => Some(*c),
            _ => None,
        }
    }
}

/// A head as the dataset defines it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeadSpec {
    /// Attribute name (the head's name in the model and the bundle).
    pub name: String,
    /// Class names, in index order.
    pub classes: Vec<String>,
    /// Several classes may apply at once (sigmoid head) instead of exactly one (softmax head).
    pub multi_label: bool,
}

/// One training or evaluation item.
#[derive(Debug, Clone)]
pub struct Example {
    /// The catalogue id.
    pub id: String,
    /// Where the image came from.
    pub path: PathBuf,
    /// The decoded image.
    pub image: Arc<RgbImage>,
    /// One target per head, in head order.
    pub targets: Vec<Target>,
    /// Duplicate group (for grouped folds).
    pub group: String,
}

/// Items to decode: id, image path, targets, group.
pub type ItemSpec = (String, PathBuf, Vec<Target>, String);

/// Decodes every item's image with the shared decoder, in parallel; items whose image fails are returned apart with
/// the error (curation should have removed them, so callers usually treat any as fatal).
pub fn load_examples(
    items: Vec<ItemSpec>,
    pre: &Preprocessor,
    progress: impl Fn(usize) + Sync,
) -> (Vec<Example>, Vec<(PathBuf, TrainError)>) {
    let done = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Result<Example, (PathBuf, TrainError)>> = items
        .into_par_iter()
        .map(|(id, path, targets, group)| {
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_multiple_of(1000) {
                progress(n);
            }
            let bytes =
                std::fs::read(&path).map_err(|source| (path.clone(), TrainError::Io { path: path.clone(), source }))?;
            let decoded = pre
                .decode(&bytes)
                .map_err(|source| (path.clone(), TrainError::Image { path: path.clone(), source }))?;
            Ok(Example { id, path, image: Arc::new(decoded.image), targets, group })
        })
        .collect();
    let mut ok = Vec::with_capacity(results.len());
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(e) => ok.push(e),
            Err(e) => failed.push(e),
        }
    }
    (ok, failed)
}

/// A preprocessor for `spec` with the daemon's default limits.
pub fn preprocessor(spec: attrd::preprocess::InputSpec) -> Result<Preprocessor, TrainError> {
    Preprocessor::new(spec, Limits::default()).map_err(|e| TrainError::Config(format!("input spec: {e}")))
}

/// Label-preserving random augmentation of a decoded image, before the shared resize/normalise.
#[derive(Debug, Clone)]
pub struct Augmenter {
    cfg: AugmentConfig,
}

impl Augmenter {
    pub fn new(cfg: AugmentConfig) -> Self {
        Self { cfg }
    }

    /// A randomly cropped, flipped and jittered copy of `img`.
    pub fn apply(&self, img: &RgbImage, rng: &mut impl Rng) -> RgbImage {
        let c = &self.cfg;
        let (w, h) = img.dimensions();
        let mut out = if c.crop_scale[0] < 1.0 && w > 1 && h > 1 {
            // Area fraction and a mild aspect change, as torchvision's RandomResizedCrop does.
            let area = rng.gen_range(c.crop_scale[0]..=c.crop_scale[1]) * (w * h) as f32;
            let ratio = (rng.gen_range((0.8f32).ln()..=(1.25f32).ln())).exp();
            let cw = ((area * ratio).sqrt().round() as u32).clamp(1, w);
            let ch = ((area / ratio).sqrt().round() as u32).clamp(1, h);
            let x = rng.gen_range(0..=w - cw);
            let y = rng.gen_range(0..=h - ch);
            image::imageops::crop_imm(img, x, y, cw, ch).to_image()
        } else {
            img.clone()
        };
        if c.hflip && rng.gen_bool(0.5) {
            image::imageops::flip_horizontal_in_place(&mut out);
        }
        let mut jitter = |amount: f32| if amount > 0.0 { 1.0 + rng.gen_range(-amount..=amount) } else { 1.0 };
        let b = jitter(c.brightness);
        let k = jitter(c.contrast);
        let s = jitter(c.saturation);
        if b != 1.0 || k != 1.0 || s != 1.0 {
            // Contrast around the image's mean grey, as torchvision does.
            let mean = out.pixels().map(|p| luma(p.0)).sum::<f32>() / (out.width() * out.height()).max(1) as f32;
            for p in out.pixels_mut() {
                let grey = luma(p.0);
                for ch in 0..3 {
                    let v = f32::from(p.0[ch]);
                    let v = grey + (v - grey) * s;
                    let v = mean + (v * b - mean) * k;
                    p.0[ch] = v.round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        out
    }
}

fn luma(p: [u8; 3]) -> f32 {
    0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2])
}

/// A batch ready for the model: images as one `[N, 3, H, W]` buffer, and per head the loss targets.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Number of items.
    pub n: usize,
    /// `n * 3 * H * W` values in the spec's layout.
    pub images: Vec<f32>,
    /// Per head: single-label class indices with `IGNORE` for unknown labels, or multi-label 0/1 targets with a
    /// 0/1 mask (`n * classes` each).
    pub targets: Vec<HeadTargets>,
    /// Dataset indices of the items, in batch order.
    pub indices: Vec<usize>,
}

/// Class index of an unknown label in single-label targets (PyTorch's `ignore_index` convention).
pub const IGNORE: i64 = -100;

/// One head's targets in a [`Batch`].
#[derive(Debug, Clone)]
pub enum HeadTargets {
    /// Class index per item, [`IGNORE`] when unknown.
    Single(Vec<i64>),
    /// 0/1 per item and class, and a mask that is 0 on rows with unknown labels.
    Multi { targets: Vec<f32>, mask: Vec<f32>, classes: usize },
}

impl HeadTargets {
    /// Items with a known label.
    pub fn known(&self) -> usize {
        match self {
            HeadTargets::Single(t) => t.iter().filter(|&&c| c != IGNORE).count(),
            HeadTargets::Multi { mask, classes, .. } => mask.chunks(*classes).filter(|r| r[0] > 0.0).count(),
        }
    }
}

/// Builds the batch of `indices` from `examples`. With `augment = Some((aug, seed))` every item gets its own
/// augmentation drawn from `seed` and its position, so a batch is reproducible whatever the thread scheduling.
pub fn make_batch(
    examples: &[Example],
    indices: &[usize],
    heads: &[HeadSpec],
    pre: &Preprocessor,
    augment: Option<(&Augmenter, u64)>,
) -> Batch {
    let images: Vec<Vec<f32>> = indices
        .par_iter()
        .enumerate()
        .map(|(pos, &i)| {
            let img = &examples[i].image;
            match augment {
                Some((aug, seed)) => {
                    let mut rng = StdRng::seed_from_u64(seed ^ (pos as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    pre.to_tensor(&aug.apply(img, &mut rng))
                }
                None => pre.to_tensor(img),
            }
        })
        .collect();
    Batch {
        n: indices.len(),
        images: images.concat(),
        targets: batch_targets(examples, indices, heads),
        indices: indices.to_vec(),
    }
}

/// The loss targets of `indices`, per head (what [`make_batch`] puts next to the images).
pub fn batch_targets(examples: &[Example], indices: &[usize], heads: &[HeadSpec]) -> Vec<HeadTargets> {
    heads
        .iter()
        .enumerate()
        .map(|(h, spec)| {
            if spec.multi_label {
                let c = spec.classes.len();
                let mut targets = vec![0f32; indices.len() * c];
                let mut mask = vec![0f32; indices.len() * c];
                for (row, &i) in indices.iter().enumerate() {
                    if let Target::Multi(on) = &examples[i].targets[h] {
                        mask[row * c..(row + 1) * c].fill(1.0);
                        for &k in on {
                            targets[row * c + k] = 1.0;
                        }
                    }
                }
                HeadTargets::Multi { targets, mask, classes: c }
            } else {
                HeadTargets::Single(
                    indices.iter().map(|&i| examples[i].targets[h].class().map_or(IGNORE, |c| c as i64)).collect(),
                )
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img() -> RgbImage {
        RgbImage::from_fn(60, 80, |x, y| image::Rgb([(x * 4) as u8, (y * 3) as u8, 128]))
    }

    #[test]
    fn augmentation_is_deterministic_by_seed_and_keeps_the_size_range() {
        let aug = Augmenter::new(AugmentConfig::default());
        let a = aug.apply(&img(), &mut StdRng::seed_from_u64(7));
        let b = aug.apply(&img(), &mut StdRng::seed_from_u64(7));
        let c = aug.apply(&img(), &mut StdRng::seed_from_u64(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        for seed in 0..50 {
            let o = aug.apply(&img(), &mut StdRng::seed_from_u64(seed));
            let area = (o.width() * o.height()) as f32 / (60.0 * 80.0);
            assert!((0.6..=1.0).contains(&area), "area fraction {area}");
        }
    }

    #[test]
    fn no_jitter_keeps_colours_exactly() {
        let cfg =
            AugmentConfig { crop_scale: [1.0, 1.0], hflip: false, brightness: 0.0, contrast: 0.0, saturation: 0.0 };
        let o = Augmenter::new(cfg).apply(&img(), &mut StdRng::seed_from_u64(1));
        assert_eq!(o, img());
        // Saturation 0 leaves hue and saturation alone whatever brightness does to a grey pixel's neighbours.
        let grey = RgbImage::from_pixel(4, 4, image::Rgb([100, 100, 100]));
        let cfg =
            AugmentConfig { crop_scale: [1.0, 1.0], hflip: false, brightness: 0.2, contrast: 0.2, saturation: 0.0 };
        let o = Augmenter::new(cfg).apply(&grey, &mut StdRng::seed_from_u64(3));
        assert!(o.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]), "grey stays grey");
    }

    #[test]
    fn batches_mask_unknown_labels() {
        let pre = preprocessor(crate::train::TrainConfig::default().input_spec()).unwrap();
        let heads = vec![
            HeadSpec { name: "a".into(), classes: vec!["x".into(), "y".into()], multi_label: false },
            HeadSpec { name: "m".into(), classes: vec!["p".into(), "q".into(), "r".into()], multi_label: true },
        ];
        let ex = |t: Vec<Target>| Example {
            id: "i".into(),
            path: "p".into(),
            image: Arc::new(img()),
            targets: t,
            group: "g".into(),
        };
        let examples = vec![
            ex(vec![Target::Class(1), Target::Multi(vec![0, 2])]),
            ex(vec![Target::Missing, Target::NotApplicable]),
        ];
        let b = make_batch(&examples, &[0, 1], &heads, &pre, None);
        assert_eq!(b.n, 2);
        assert_eq!(b.images.len(), 2 * 3 * 96 * 128);
        match &b.targets[0] {
            HeadTargets::Single(t) => assert_eq!(t, &vec![1, IGNORE]),
            other => panic!("{other:?}"),
        }
        match &b.targets[1] {
            HeadTargets::Multi { targets, mask, classes } => {
                assert_eq!(*classes, 3);
                assert_eq!(targets, &vec![1.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
                assert_eq!(mask, &vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.targets[0].known(), 1);
        assert_eq!(b.targets[1].known(), 1);
        // Without augmentation a batch is exactly what serving computes for the decoded image.
        assert_eq!(&b.images[..3 * 96 * 128], pre.to_tensor(&img()).as_slice());
    }
}
