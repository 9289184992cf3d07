//! Class-imbalance handling across several heads: repeat-factor sampling (Gupta et al., "LVIS", CVPR 2019) and
//! inverse-frequency loss weights.

use super::{EvalError, Result, check_labels};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// One single-label head's labels for every item of the training set (`None` = missing or not applicable).
#[derive(Debug, Clone, Copy)]
pub struct HeadLabels<'a> {
    pub labels: &'a [Option<usize>],
    pub classes: usize,
}

/// Repeat factors of a training set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepeatFactors {
    /// The frequency threshold `t` they were computed with.
    pub threshold: f64,
    /// `per_class[head][class]`: `r_c = max(1, sqrt(t / f_c))`; 1 for a class no item carries.
    pub per_class: Vec<Vec<f64>>,
    /// Per item: the largest `r_c` over the classes of its labelled heads; 1 for an item without any label.
    pub per_item: Vec<f64>,
}

impl RepeatFactors {
    /// Expected number of samples per epoch: `Σ_i r_i`.
    pub fn expected_epoch_len(&self) -> f64 {
        self.per_item.iter().sum()
    }
}

/// LVIS-style repeat factors over several heads. In each head, `f_c` is the fraction of the items *labelled in that
/// head* that carry class `c`; a head labelled only for some items (sleeve length only for garments) then balances
/// its own classes without making all of those items look rare, which is the article-type head's business.
/// `threshold` (`t`, in `(0, 1]`) is the frequency below which a class gets oversampled; LVIS used 0.001.
pub fn repeat_factors(heads: &[HeadLabels<'_>], threshold: f64) -> Result<RepeatFactors> {
    if !(threshold > 0.0 && threshold <= 1.0) {
        return Err(EvalError::InvalidParameter { name: "threshold", reason: format!("{threshold} is not in (0, 1]") });
    }
    let items = heads.first().map_or(0, |h| h.labels.len());
    let mut per_class = Vec::with_capacity(heads.len());
    for head in heads {
        if head.labels.len() != items {
            return Err(EvalError::RowCount { what: "head labels", expected: items, got: head.labels.len() });
        }
        check_labels(head.labels, head.classes)?;
        let mut counts = vec![0u64; head.classes];
        for &y in head.labels.iter().flatten() {
            counts[y] += 1;
        }
        let labelled: u64 = counts.iter().sum();
        per_class.push(
            counts
                .iter()
                .map(|&n| if n == 0 { 1.0 } else { (threshold * labelled as f64 / n as f64).sqrt().max(1.0) })
                .collect::<Vec<f64>>(),
        );
    }
    let per_item = (0..items)
        .map(|i| heads.iter().zip(&per_class).filter_map(|(head, r)| head.labels[i].map(|y| r[y])).fold(1.0, f64::max))
        .collect();
    Ok(RepeatFactors { threshold, per_class, per_item })
}

/// Turns per-item repeat factors into epochs: item `i` appears `⌊r_i⌋` times plus once more with probability
/// `r_i − ⌊r_i⌋`, and the epoch is shuffled. Each epoch is a deterministic function of `(seed, epoch)`, so a
/// resumed run sees the same data order.
#[derive(Debug, Clone)]
pub struct RepeatFactorSampler {
    factors: Vec<f64>,
    seed: u64,
}

impl RepeatFactorSampler {
    /// A sampler over `factors` (each finite and `>= 0`; 0 drops an item).
    pub fn new(factors: Vec<f64>, seed: u64) -> Result<Self> {
        if let Some((i, r)) = factors.iter().enumerate().find(|(_, r)| !(r.is_finite() && **r >= 0.0)) {
            return Err(EvalError::InvalidParameter {
                name: "repeat factor",
                reason: format!("item {i} has {r}, expected a finite value >= 0"),
            });
        }
        Ok(Self { factors, seed })
    }

    /// Expected epoch length, `Σ_i r_i`.
    pub fn expected_len(&self) -> f64 {
        self.factors.iter().sum()
    }

    /// The item indices of epoch `epoch`, shuffled.
    pub fn epoch(&self, epoch: u64) -> Vec<usize> {
        // Golden-ratio stride: consecutive epochs map to well-separated seeds (seed_from_u64 mixes them further).
        let mut rng = StdRng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut out = Vec::with_capacity(self.expected_len().ceil() as usize);
        for (i, &r) in self.factors.iter().enumerate() {
            let whole = r.floor();
            let extra = rng.r#gen::<f64>() < r - whole;
            // Factors are finite and non-negative (checked in `new`), so the cast is exact for any sane size.
            let times = whole as usize + usize::from(extra);
            out.extend(std::iter::repeat_n(i, times));
        }
        out.shuffle(&mut rng);
        out
    }
}

/// How [`class_weights`] turns class counts into loss weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassWeightOptions {
    /// `w_c ∝ n_c^-power`: 1 is inverse frequency, 0.5 inverse square root (gentler), 0 uniform.
    pub power: f64,
    /// Lower clip, applied after normalisation.
    pub min: f64,
    /// Upper clip, applied after normalisation; keeps a class with a handful of items from dominating the loss.
    pub max: f64,
}

impl Default for ClassWeightOptions {
    fn default() -> Self {
        Self { power: 1.0, min: 0.1, max: 10.0 }
    }
}

/// Loss weights for one single-label head: `w_c ∝ n_c^-power`, normalised so that the mean weight over labelled
/// items is 1 (the loss keeps its scale; with `power = 1` this is scikit-learn's `class_weight="balanced"`,
/// `N / (C_present · n_c)`), then clipped to `[min, max]` (so after clipping the mean is only approximately 1).
/// Classes without items get weight 1; they never appear in the loss.
pub fn class_weights(labels: &[Option<usize>], classes: usize, options: &ClassWeightOptions) -> Result<Vec<f32>> {
    check_labels(labels, classes)?;
    let ClassWeightOptions { power, min, max } = *options;
    if !(power.is_finite() && power >= 0.0) {
        return Err(EvalError::InvalidParameter { name: "power", reason: format!("{power} is not >= 0") });
    }
    if !(min.is_finite() && max.is_finite() && 0.0 < min && min <= max) {
        return Err(EvalError::InvalidParameter { name: "clip", reason: format!("[{min}, {max}] is not in (0, ∞)") });
    }
    let mut counts = vec![0u64; classes];
    for &y in labels.iter().flatten() {
        counts[y] += 1;
    }
    let labelled: u64 = counts.iter().sum();
    if labelled == 0 {
        return Err(EvalError::NoLabelledItems { total: labels.len() });
    }
    let raw: Vec<f64> = counts.iter().map(|&n| if n == 0 { 0.0 } else { (n as f64).powf(-power) }).collect();
    let weighted_sum: f64 = counts.iter().zip(&raw).map(|(&n, &w)| n as f64 * w).sum();
    let scale = labelled as f64 / weighted_sum;
    Ok(counts.iter().zip(&raw).map(|(&n, &w)| if n == 0 { 1.0 } else { (w * scale).clamp(min, max) as f32 }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 11 items, two heads, t = 0.45.
    /// ```text
    /// item     0  1  2  3  4  5  6  7  8  9 10
    /// gender   0  0  0  0  0  0  0  0  1  1  -     10 labelled: f0 = 0.8, f1 = 0.2
    /// type     0  0  1  1  2  -  0  0  3  -  -      8 labelled: f0 = 0.5, f1 = 0.25, f2 = f3 = 0.125, f4 = 0
    /// ```
    /// gender: r0 = max(1, √(0.45/0.8) = 0.75) = 1, r1 = √(0.45/0.2) = √2.25 = 1.5
    /// type:   r0 = max(1, √0.9) = 1, r1 = √1.8 = 1.341641, r2 = r3 = √3.6 = 1.897367, r4 = 1 (no items)
    /// items:  1 1 1.341641 1.341641 1.897367 1 1 1 max(1.5, 1.897367) 1.5 1
    fn example() -> (Vec<Option<usize>>, Vec<Option<usize>>) {
        let gender = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1].into_iter().map(Some).chain([None]).collect();
        let kind = vec![Some(0), Some(0), Some(1), Some(1), Some(2), None, Some(0), Some(0), Some(3), None, None];
        (gender, kind)
    }

    #[test]
    fn repeat_factors_by_hand() {
        let (gender, kind) = example();
        let heads = [HeadLabels { labels: &gender, classes: 2 }, HeadLabels { labels: &kind, classes: 5 }];
        let rf = repeat_factors(&heads, 0.45).expect("factors");
        let (s18, s36) = (1.8f64.sqrt(), 3.6f64.sqrt());
        let close = |a: &[f64], b: &[f64]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        assert!(close(&rf.per_class[0], &[1.0, 1.5]), "{:?}", rf.per_class[0]);
        assert!(close(&rf.per_class[1], &[1.0, s18, s36, s36, 1.0]), "{:?}", rf.per_class[1]);
        let expect = [1.0, 1.0, s18, s18, s36, 1.0, 1.0, 1.0, s36, 1.5, 1.0];
        assert!(close(&rf.per_item, &expect), "{:?}", rf.per_item);
        // Σ = 6 + 2·1.341641 + 2·1.897367 + 1.5 = 13.978015.
        assert!((rf.expected_epoch_len() - 13.978_014_765).abs() < 1e-8);

        // A threshold above every frequency oversamples everything; t = 1 gives r_c = 1 / √f_c.
        let rf = repeat_factors(&heads, 1.0).expect("factors");
        assert!((rf.per_class[0][0] - 1.0 / 0.8f64.sqrt()).abs() < 1e-12);
        assert!(repeat_factors(&heads, 0.0).is_err());
        let short = [HeadLabels { labels: &gender, classes: 2 }, HeadLabels { labels: &kind[..5], classes: 5 }];
        assert!(matches!(repeat_factors(&short, 0.1), Err(EvalError::RowCount { .. })));
    }

    #[test]
    fn epochs_have_the_expected_size_and_are_deterministic() {
        let (gender, kind) = example();
        let heads = [HeadLabels { labels: &gender, classes: 2 }, HeadLabels { labels: &kind, classes: 5 }];
        let rf = repeat_factors(&heads, 0.45).expect("factors");
        let sampler = RepeatFactorSampler::new(rf.per_item.clone(), 7).expect("sampler");
        assert_eq!(sampler.epoch(3), sampler.epoch(3));
        assert_eq!(
            RepeatFactorSampler::new(rf.per_item.clone(), 7).expect("sampler").epoch(0),
            sampler.epoch(0),
            "same seed, same epoch"
        );
        // Each item appears ⌊r⌋ or ⌈r⌉ times.
        let mut total = 0usize;
        let epochs = 2000;
        for e in 0..epochs {
            let idx = sampler.epoch(e);
            total += idx.len();
            for (i, &r) in rf.per_item.iter().enumerate() {
                let n = idx.iter().filter(|&&j| j == i).count() as f64;
                assert!(n == r.floor() || n == r.ceil(), "item {i} appears {n} times with r = {r}");
            }
        }
        // Mean epoch size ≈ 13.978; per-epoch variance ≤ 5 · 0.25 (five fractional items), so the mean of 2000
        // epochs has sd ≤ 0.025.
        let mean = total as f64 / epochs as f64;
        assert!((mean - 13.978).abs() < 0.1, "mean epoch size {mean}");
    }

    #[test]
    fn epochs_differ_by_seed_and_epoch_and_are_shuffled() {
        let factors: Vec<f64> = (0..1000).map(|i| 1.0 + (i % 4) as f64 * 0.3).collect();
        let expected: f64 = factors.iter().sum();
        let s = RepeatFactorSampler::new(factors.clone(), 1).expect("sampler");
        let (a, b) = (s.epoch(0), s.epoch(1));
        assert_ne!(a, b);
        assert_ne!(a, RepeatFactorSampler::new(factors, 2).expect("sampler").epoch(0));
        // Σ r = 1000 + 0.3·(0+1+2+3)·250 = 1450; sd of the size ≤ √(750 · 0.25) ≈ 13.7.
        assert!((expected - 1450.0).abs() < 1e-9);
        assert!((a.len() as f64 - expected).abs() < 70.0, "{} vs {expected}", a.len());
        assert!(a.windows(2).any(|w| w[0] > w[1]), "not shuffled");
        assert!(RepeatFactorSampler::new(vec![1.0, f64::NAN], 0).is_err());
        assert!(RepeatFactorSampler::new(vec![-1.0], 0).is_err());
    }

    #[test]
    fn class_weights_by_hand() {
        // Counts [6, 3, 1, 0], N = 10, 3 classes present.
        let labels: Vec<Option<usize>> =
            [0, 0, 0, 0, 0, 0, 1, 1, 1, 2].into_iter().map(Some).chain([None, None]).collect();
        // power 1 (sklearn "balanced"): N / (3 n_c) = 10/18, 10/9, 10/3; mean over items (6·10/18 + 3·10/9 + 10/3)/10 = 1.
        let w = class_weights(&labels, 4, &ClassWeightOptions { power: 1.0, min: 0.01, max: 100.0 }).expect("w");
        let expect = [10.0 / 18.0, 10.0 / 9.0, 10.0 / 3.0, 1.0];
        assert!(w.iter().zip(expect).all(|(a, b)| (f64::from(*a) - b).abs() < 1e-6), "{w:?}");
        // Clipped at 3.
        let w = class_weights(&labels, 4, &ClassWeightOptions { power: 1.0, min: 0.01, max: 3.0 }).expect("w");
        assert_eq!(w[2], 3.0);
        // power 0.5: raw 1/√6, 1/√3, 1; Σ n·raw = √6 + √3 + 1 = 5.181541; scale = 10 / 5.181541 = 1.929928
        // → 0.787890, 1.114244, 1.929928.
        let w = class_weights(&labels, 4, &ClassWeightOptions { power: 0.5, min: 0.01, max: 100.0 }).expect("w");
        let expect = [0.787_890, 1.114_244, 1.929_928, 1.0];
        assert!(w.iter().zip(expect).all(|(a, b)| (f64::from(*a) - b).abs() < 1e-5), "{w:?}");
        // power 0: uniform.
        let w = class_weights(&labels, 4, &ClassWeightOptions { power: 0.0, ..Default::default() }).expect("w");
        assert_eq!(w, vec![1.0; 4]);
        assert!(class_weights(&[None], 2, &ClassWeightOptions::default()).is_err());
        let bad = ClassWeightOptions { min: 2.0, max: 1.0, ..Default::default() };
        assert!(class_weights(&labels, 4, &bad).is_err());
    }
}
