//! Label-noise audit in the style of confident learning (Northcutt, Jiang & Chuang, "Confident Learning: Estimating
//! Uncertainty in Dataset Labels", JAIR 2021), plus what the audit experiment needs around it: deterministic label
//! flipping to plant known errors, scoring the audit against them, and grouped K-fold assignment for producing the
//! out-of-fold probabilities the audit must be fed (probabilities from a model that saw the item's label in training
//! are useless here: it has memorised the noise).

use super::{EvalError, Result, check_labels, check_range, check_scores};
use ndarray::ArrayView2;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// Slack on the per-class thresholds, as in cleanlab's `compute_confident_joint`: an item whose probability equals
/// its class mean (e.g. the only item of a class) must count as confident despite rounding.
const THRESHOLD_SLACK: f64 = 1e-6;

/// How label-issue candidates are ranked. Both are label-quality scores in `[0, 1]` where lower means more likely
/// mislabelled, and candidates are listed lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RankBy {
    /// `p[given]`.
    SelfConfidence,
    /// `(p[given] − max_{k ≠ given} p[k] + 1) / 2`: also accounts for how strongly another class is preferred.
    NormalizedMargin,
}

/// One item whose given label is probably wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelIssue {
    /// Row in the audited arrays.
    pub index: usize,
    pub given: usize,
    /// The confident class: the most probable class among those whose probability reaches their threshold.
    pub suggested: usize,
    /// `p[given]`.
    pub self_confidence: f64,
    /// The ranking score (see [`RankBy`]); lower is more suspicious.
    pub score: f64,
}

/// Which items count as label issues (cleanlab's `filter_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// Off-diagonal items of the confident joint: the item's confident class differs from its given label. Precise,
    /// but misses mislabelled items whose probabilities clear no class threshold.
    ConfidentLearning,
    /// For each (given `g`, other `k`) pair, the `round(C̃[g][k])` items labelled `g` with the smallest margin
    /// `p_g − p_k`, where `C̃` is the calibrated confident joint (each row rescaled so that it sums to the number of
    /// items given that label). Estimates how many errors there are first, so it also finds items without a
    /// confident class; cleanlab's default.
    PruneByNoiseRate,
    /// Items flagged by both of the above: the most precise.
    Both,
}

/// Result of a confident-learning audit of one head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    /// Per-class thresholds `t_j`: mean predicted `p_j` over items labelled `j`; `None` for a class without labelled
    /// items (such a class can never be an item's confident class).
    pub thresholds: Vec<Option<f64>>,
    /// `confident_joint[given][confident]`: items with at least one class over its threshold, counted by their
    /// given label and confident class. Items with no confident class are not counted.
    pub confident_joint: Vec<Vec<u64>>,
    /// Estimated number of label errors: the off-diagonal sum of the calibrated confident joint, each cell rounded.
    pub estimated_errors: u64,
    /// Labelled (audited) items.
    pub labelled: u64,
    pub filter: Filter,
    pub rank_by: RankBy,
    /// Flagged items, most suspicious first (ties by index).
    pub issues: Vec<LabelIssue>,
}

impl AuditReport {
    /// Indices of the issues in rank order, the input [`measure_audit`] takes.
    pub fn ranked_indices(&self) -> Vec<usize> {
        self.issues.iter().map(|i| i.index).collect()
    }
}

/// Confident-learning audit: from out-of-fold probabilities (`N × C`) and given labels (masked items skipped),
/// computes per-class thresholds and the confident joint, flags items according to `filter` and ranks them by
/// `rank_by`. The suggested label is the item's confident class when it has one, otherwise (only possible with
/// [`Filter::PruneByNoiseRate`]) the most probable class the item was pruned towards.
pub fn find_label_issues(
    probs: ArrayView2<'_, f32>,
    labels: &[Option<usize>],
    filter: Filter,
    rank_by: RankBy,
) -> Result<AuditReport> {
    let classes = check_scores("probabilities", probs, labels.len(), None)?;
    check_labels(labels, classes)?;
    let mut sums = vec![0.0f64; classes];
    let mut counts = vec![0u64; classes];
    for (row, label) in probs.outer_iter().zip(labels) {
        if let Some(y) = *label {
            sums[y] += f64::from(row[y]);
            counts[y] += 1;
        }
    }
    let labelled: u64 = counts.iter().sum();
    if labelled == 0 {
        return Err(EvalError::NoLabelledItems { total: labels.len() });
    }
    let thresholds: Vec<Option<f64>> = sums.iter().zip(&counts).map(|(&s, &n)| (n > 0).then(|| s / n as f64)).collect();

    // The confident class of every labelled item, and the joint they add up to.
    let mut joint = vec![vec![0u64; classes]; classes];
    let confident: Vec<Option<usize>> = probs
        .outer_iter()
        .zip(labels)
        .map(|(row, label)| {
            let given = (*label)?;
            let best = (0..classes)
                .filter(|&j| thresholds[j].is_some_and(|t| f64::from(row[j]) >= t - THRESHOLD_SLACK))
                // Among confident classes the most probable; ties to the lowest index like everywhere else.
                .fold(None, |best: Option<usize>, j| match best {
                    Some(b) if row[b] >= row[j] => Some(b),
                    _ => Some(j),
                })?;
            joint[given][best] += 1;
            Some(best)
        })
        .collect();

    // Calibrated joint, rounded per cell: how many items given `g` are estimated to really be `k`.
    let prune_counts: Vec<Vec<usize>> = joint
        .iter()
        .zip(&counts)
        .enumerate()
        .map(|(g, (row, &n_g))| {
            let row_sum: u64 = row.iter().sum();
            (0..classes)
                .map(|k| {
                    if k == g || row_sum == 0 {
                        0
                    } else {
                        (row[k] as f64 * n_g as f64 / row_sum as f64).round() as usize
                    }
                })
                .collect()
        })
        .collect();
    let estimated_errors = prune_counts.iter().flatten().map(|&n| n as u64).sum();

    // Items pruned by noise rate, with the class each was pruned towards (the most probable one if several).
    let mut pruned: Vec<Option<usize>> = vec![None; labels.len()];
    if filter != Filter::ConfidentLearning {
        let mut by_given: Vec<Vec<usize>> = vec![Vec::new(); classes];
        for (i, label) in labels.iter().enumerate() {
            if let Some(g) = *label {
                by_given[g].push(i);
            }
        }
        for (g, items) in by_given.iter().enumerate() {
            for (k, &n) in prune_counts[g].iter().enumerate() {
                if n == 0 {
                    continue;
                }
                let margin = |i: usize| probs[[i, g]] - probs[[i, k]];
                let mut order = items.clone();
                order.sort_by(|&a, &b| margin(a).total_cmp(&margin(b)).then(a.cmp(&b)));
                for &i in order.iter().take(n) {
                    pruned[i] = match pruned[i] {
                        Some(prev) if probs[[i, prev]] >= probs[[i, k]] => Some(prev),
                        _ => Some(k),
                    };
                }
            }
        }
    }

    let mut issues = Vec::new();
    for (index, (row, label)) in probs.outer_iter().zip(labels).enumerate() {
        let Some(given) = *label else { continue };
        let off_diagonal = confident[index].filter(|&c| c != given);
        let suggested = match filter {
            Filter::ConfidentLearning => off_diagonal,
            Filter::PruneByNoiseRate => pruned[index].map(|k| off_diagonal.unwrap_or(k)),
            Filter::Both => off_diagonal.filter(|_| pruned[index].is_some()),
        };
        let Some(suggested) = suggested else { continue };
        let self_confidence = f64::from(row[given]);
        let score = match rank_by {
            RankBy::SelfConfidence => self_confidence,
            RankBy::NormalizedMargin => {
                let other = row.iter().enumerate().filter(|&(k, _)| k != given).map(|(_, &p)| p);
                // A one-class head has no other class; its items are never flagged anyway.
                let best_other = f64::from(other.fold(0.0f32, f32::max));
                (self_confidence - best_other + 1.0) / 2.0
            }
        };
        issues.push(LabelIssue { index, given, suggested, self_confidence, score });
    }
    issues.sort_by(|a, b| a.score.total_cmp(&b.score).then(a.index.cmp(&b.index)));
    Ok(AuditReport { thresholds, confident_joint: joint, estimated_errors, labelled, filter, rank_by, issues })
}

/// Precision and recall of the first `k` ranked issues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditAtK {
    pub k: usize,
    /// Issues actually considered: `min(k, flagged)`.
    pub considered: usize,
    pub hits: usize,
    /// `hits / considered` (0 when nothing was flagged).
    pub precision: f64,
    /// `hits / planted`.
    pub recall: f64,
}

/// How well an audit found deliberately planted label errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditScore {
    pub flagged: usize,
    pub planted: usize,
    /// Flagged items that were planted.
    pub hits: usize,
    /// `hits / flagged` (0 when nothing was flagged).
    pub precision: f64,
    /// `hits / planted` (0 when nothing was planted).
    pub recall: f64,
    pub f1: f64,
    pub at_k: Vec<AuditAtK>,
}

/// Scores an audit: `ranked` are the flagged indices, most suspicious first; `planted` the indices whose labels were
/// flipped on purpose; `ks` the cut-offs to report precision/recall at. Duplicate indices count once.
pub fn measure_audit(ranked: &[usize], planted: &[usize], ks: &[usize]) -> AuditScore {
    let planted: HashSet<usize> = planted.iter().copied().collect();
    let mut seen = HashSet::new();
    let ranked: Vec<usize> = ranked.iter().copied().filter(|i| seen.insert(*i)).collect();
    let ratio = super::ratio;
    let hits_in = |items: &[usize]| items.iter().filter(|i| planted.contains(i)).count();
    let hits = hits_in(&ranked);
    let precision = ratio(hits as f64, ranked.len() as f64);
    let recall = ratio(hits as f64, planted.len() as f64);
    let at_k = ks
        .iter()
        .map(|&k| {
            let top = &ranked[..k.min(ranked.len())];
            let h = hits_in(top);
            AuditAtK {
                k,
                considered: top.len(),
                hits: h,
                precision: ratio(h as f64, top.len() as f64),
                recall: ratio(h as f64, planted.len() as f64),
            }
        })
        .collect();
    AuditScore {
        flagged: ranked.len(),
        planted: planted.len(),
        hits,
        precision,
        recall,
        f1: ratio(2.0 * precision * recall, precision + recall),
        at_k,
    }
}

/// One planted label error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flip {
    pub index: usize,
    pub from: usize,
    pub to: usize,
}

/// A copy of the labels with some flipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlippedLabels {
    pub labels: Vec<Option<usize>>,
    /// Sorted by index.
    pub flips: Vec<Flip>,
}

impl FlippedLabels {
    /// The flipped indices, the `planted` input of [`measure_audit`].
    pub fn indices(&self) -> Vec<usize> {
        self.flips.iter().map(|f| f.index).collect()
    }
}

/// Flips exactly `round(rate · L)` of the `L` labelled items (masked ones are never touched), chosen uniformly
/// without replacement, each to a class drawn uniformly from the other `classes − 1`. Deterministic for a given
/// seed (with `rand` 0.8's `StdRng`, which the lock file pins).
pub fn flip_labels(labels: &[Option<usize>], classes: usize, rate: f64, seed: u64) -> Result<FlippedLabels> {
    check_labels(labels, classes)?;
    check_range("flip rate", rate, 0.0, 1.0)?;
    if classes < 2 {
        return Err(EvalError::InvalidParameter {
            name: "classes",
            reason: format!("flipping needs at least 2 classes, got {classes}"),
        });
    }
    let labelled: Vec<usize> = labels.iter().enumerate().filter(|(_, l)| l.is_some()).map(|(i, _)| i).collect();
    let count = (rate * labelled.len() as f64).round() as usize;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut chosen: Vec<usize> =
        rand::seq::index::sample(&mut rng, labelled.len(), count).into_iter().map(|k| labelled[k]).collect();
    chosen.sort_unstable();
    let mut out = labels.to_vec();
    let mut flips = Vec::with_capacity(count);
    for index in chosen {
        let Some(from) = labels[index] else { continue };
        // Uniform over the other classes: draw from C − 1 slots and skip over the original.
        let r = rng.gen_range(0..classes - 1);
        let to = if r >= from { r + 1 } else { r };
        out[index] = Some(to);
        flips.push(Flip { index, from, to });
    }
    Ok(FlippedLabels { labels: out, flips })
}

/// Assigns each item to one of `k` folds so that items sharing a group key (the same SKU, the same photo shoot, …)
/// land in the same fold, keeping fold sizes balanced: groups are shuffled by `seed`, then placed largest first into
/// the currently smallest fold (ties to the lowest fold). Returns the fold of each item.
///
/// Fold sizes then differ by at most the size of the largest group. Deterministic for a given seed and input order.
pub fn group_k_fold<G: Hash + Eq>(groups: &[G], k: usize, seed: u64) -> Result<Vec<usize>> {
    if k < 2 {
        return Err(EvalError::InvalidParameter { name: "k", reason: format!("K-fold needs k >= 2, got {k}") });
    }
    // Group ids in order of first appearance: a HashMap's own order is randomised per process.
    let mut ids: HashMap<&G, usize> = HashMap::new();
    let mut sizes: Vec<usize> = Vec::new();
    let item_group: Vec<usize> = groups
        .iter()
        .map(|g| {
            let id = *ids.entry(g).or_insert_with(|| {
                sizes.push(0);
                sizes.len() - 1
            });
            sizes[id] += 1;
            id
        })
        .collect();
    if sizes.len() < k {
        return Err(EvalError::InvalidParameter {
            name: "k",
            reason: format!("{} distinct groups cannot fill {k} folds", sizes.len()),
        });
    }
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    // Stable sort: equal-sized groups keep their shuffled order, which is what makes folds differ by seed.
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]));
    let mut fold_size = vec![0usize; k];
    let mut group_fold = vec![0usize; sizes.len()];
    for g in order {
        let (fold, _) = fold_size.iter().enumerate().min_by_key(|&(f, &s)| (s, f)).unwrap_or((0, &0));
        group_fold[g] = fold;
        fold_size[fold] += sizes[g];
    }
    Ok(item_group.into_iter().map(|g| group_fold[g]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, array};

    /// Hand-worked audit. Given labels and probabilities:
    /// ```text
    /// item  given  p                    note
    ///  0    0      [0.80, 0.10, 0.10]
    ///  1    0      [0.70, 0.20, 0.10]
    ///  2    0      [0.10, 0.80, 0.10]   really class 1
    ///  3    1      [0.20, 0.70, 0.10]
    ///  4    1      [0.10, 0.90, 0.00]
    ///  5    2      [0.10, 0.10, 0.80]
    ///  6    2      [0.20, 0.20, 0.60]
    ///  7    2      [0.60, 0.25, 0.15]   really class 0
    ///  8    1      [0.55, 0.00, 0.45]   really class 0
    ///  9    -      [0.90, 0.05, 0.05]   masked
    /// 10    0      [0.34, 0.33, 0.33]   nothing confident
    /// 11    0      [0.40, 0.35, 0.25]   nothing confident
    /// ```
    /// Thresholds: t0 = (0.8 + 0.7 + 0.1 + 0.34 + 0.4) / 5 = 0.468, t1 = (0.7 + 0.9 + 0.0) / 3 = 0.5333,
    /// t2 = (0.8 + 0.6 + 0.15) / 3 = 0.51667.
    /// Confident classes: 0→0, 1→0, 2→1, 3→1, 4→1, 5→2, 6→2, 7→0, 8→0, 10 and 11→none.
    /// Joint [[2, 1, 0], [1, 2, 0], [1, 0, 2]]; label counts 5, 3, 3. Calibrated off-diagonal:
    /// C̃[0][1] = 1 · 5/3 = 1.67 → 2, C̃[1][0] = 1 · 3/3 = 1, C̃[2][0] = 1 · 3/3 = 1 → 4 estimated errors.
    /// Prune by noise rate: given 0 towards 1, margins p0 − p1 of items 0, 1, 2, 10, 11 = 0.7, 0.5, −0.7, 0.01, 0.05
    /// → items 2 and 10; given 1 towards 0: items 3, 4, 8 → 0.5, 0.8, −0.55 → item 8; given 2 towards 0: items
    /// 5, 6, 7 → 0.7, 0.4, −0.45 → item 7.
    fn example() -> (Array2<f32>, Vec<Option<usize>>) {
        let probs = array![
            [0.80f32, 0.10, 0.10],
            [0.70, 0.20, 0.10],
            [0.10, 0.80, 0.10],
            [0.20, 0.70, 0.10],
            [0.10, 0.90, 0.00],
            [0.10, 0.10, 0.80],
            [0.20, 0.20, 0.60],
            [0.60, 0.25, 0.15],
            [0.55, 0.00, 0.45],
            [0.90, 0.05, 0.05],
            [0.34, 0.33, 0.33],
            [0.40, 0.35, 0.25],
        ];
        let labels = vec![
            Some(0),
            Some(0),
            Some(0),
            Some(1),
            Some(1),
            Some(2),
            Some(2),
            Some(2),
            Some(1),
            None,
            Some(0),
            Some(0),
        ];
        (probs, labels)
    }

    #[test]
    fn confident_joint_and_issues_by_hand() {
        let (probs, labels) = example();
        let r =
            find_label_issues(probs.view(), &labels, Filter::ConfidentLearning, RankBy::SelfConfidence).expect("audit");
        let t: Vec<f64> = r.thresholds.iter().map(|t| t.expect("every class labelled")).collect();
        assert!((t[0] - 0.468).abs() < 1e-6 && (t[1] - 1.6 / 3.0).abs() < 1e-6 && (t[2] - 1.55 / 3.0).abs() < 1e-6);
        assert_eq!(r.confident_joint, vec![vec![2, 1, 0], vec![1, 2, 0], vec![1, 0, 2]]);
        assert_eq!((r.labelled, r.estimated_errors), (11, 4));
        // Self-confidence: item 8 → 0.0, item 2 → 0.1, item 7 → 0.15.
        let got: Vec<(usize, usize, usize)> = r.issues.iter().map(|i| (i.index, i.given, i.suggested)).collect();
        assert_eq!(got, vec![(8, 1, 0), (2, 0, 1), (7, 2, 0)]);
        // Normalized margin: item 2 → (0.1 − 0.8 + 1) / 2 = 0.15, item 8 → (0 − 0.55 + 1) / 2 = 0.225,
        // item 7 → (0.15 − 0.6 + 1) / 2 = 0.275.
        let r = find_label_issues(probs.view(), &labels, Filter::ConfidentLearning, RankBy::NormalizedMargin)
            .expect("audit");
        assert_eq!(r.ranked_indices(), vec![2, 8, 7]);
        let scores: Vec<f64> = r.issues.iter().map(|i| i.score).collect();
        for (s, e) in scores.iter().zip([0.15, 0.225, 0.275]) {
            assert!((s - e).abs() < 1e-6, "{scores:?}");
        }
    }

    #[test]
    fn prune_by_noise_rate_and_both_by_hand() {
        let (probs, labels) = example();
        // Pruning also takes item 10, which has no confident class; it is pruned towards class 1.
        let r =
            find_label_issues(probs.view(), &labels, Filter::PruneByNoiseRate, RankBy::SelfConfidence).expect("audit");
        let got: Vec<(usize, usize)> = r.issues.iter().map(|i| (i.index, i.suggested)).collect();
        assert_eq!(got, vec![(8, 0), (2, 1), (7, 0), (10, 1)]);
        let r = find_label_issues(probs.view(), &labels, Filter::Both, RankBy::SelfConfidence).expect("audit");
        assert_eq!(r.ranked_indices(), vec![8, 2, 7]);
    }

    #[test]
    fn a_class_without_labels_is_never_suggested() {
        // Class 2 is never given, so it has no threshold even though item 1 is sure of it.
        let probs = array![[0.9f32, 0.05, 0.05], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]];
        let labels = [Some(0), Some(0), Some(1)];
        let r =
            find_label_issues(probs.view(), &labels, Filter::PruneByNoiseRate, RankBy::SelfConfidence).expect("audit");
        assert_eq!(r.thresholds[2], None);
        assert!(r.issues.is_empty(), "{:?}", r.issues);
    }

    /// A synthetic out-of-fold model: the true class gets a logit boost of varying strength (some items are hard),
    /// plus unit Gaussian noise on every class.
    fn synthetic(n: usize, classes: usize, seed: u64) -> (Array2<f32>, Vec<Option<usize>>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut probs = Array2::zeros((n, classes));
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let y = rng.gen_range(0..classes);
            let boost = rng.gen_range(2.0..6.0);
            let z: Vec<f64> = (0..classes)
                .map(|c| {
                    // Box–Muller: rand 0.8 has no normal distribution without `rand_distr`.
                    let (u1, u2) = (1.0 - rng.r#gen::<f64>(), rng.r#gen::<f64>());
                    let noise = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                    noise + if c == y { boost } else { 0.0 }
                })
                .collect();
            let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
            for (c, v) in z.iter().enumerate() {
                probs[[i, c]] = ((v - max).exp() / sum) as f32;
            }
            labels.push(Some(y));
        }
        (probs, labels)
    }

    #[test]
    fn planted_flips_are_found() {
        let (probs, clean) = synthetic(4000, 5, 21);
        let flipped = flip_labels(&clean, 5, 0.05, 99).expect("flip");
        assert_eq!(flipped.flips.len(), 200);
        // (filter, minimum precision, minimum recall). Measured with this seed: confident learning and both
        // P = 1.0, R = 0.775; prune by noise rate P = 0.86, R = 0.935 (it estimates 219 errors for 200 planted).
        // Items the synthetic model gets confidently wrong would look exactly like label errors to any of them;
        // with a weaker model (boost 1..5) precision drops to ~0.6–0.8.
        let expect =
            [(Filter::ConfidentLearning, 0.95, 0.7), (Filter::PruneByNoiseRate, 0.8, 0.9), (Filter::Both, 0.95, 0.7)];
        for (filter, min_precision, min_recall) in expect {
            for rank_by in [RankBy::SelfConfidence, RankBy::NormalizedMargin] {
                let r = find_label_issues(probs.view(), &flipped.labels, filter, rank_by).expect("audit");
                assert!((170..=240).contains(&r.estimated_errors), "estimated {}", r.estimated_errors);
                let s = measure_audit(&r.ranked_indices(), &flipped.indices(), &[100]);
                let ok = s.precision >= min_precision && s.recall >= min_recall;
                assert!(ok, "{filter:?} {rank_by:?}: {s:?}");
                // The most suspicious half of the planted count is nearly all real.
                assert!(s.at_k[0].precision >= 0.95, "{filter:?} {rank_by:?}: {s:?}");
                // Suggestions for real hits point back at the original label.
                let original: HashMap<usize, usize> = flipped.flips.iter().map(|f| (f.index, f.from)).collect();
                let right = r.issues.iter().filter(|i| original.get(&i.index) == Some(&i.suggested)).count();
                assert!(right as f64 >= 0.9 * s.hits as f64, "{filter:?}: {right} of {} suggestions right", s.hits);
            }
        }
        // On clean labels the audit flags (almost) nothing.
        for filter in [Filter::ConfidentLearning, Filter::PruneByNoiseRate] {
            let r = find_label_issues(probs.view(), &clean, filter, RankBy::SelfConfidence).expect("audit");
            assert!(r.issues.len() <= 10, "{filter:?} flags {} clean items", r.issues.len());
        }
    }

    #[test]
    fn measure_audit_by_hand() {
        // Ranked [5, 1, 9, 3, 5(dup)], planted {1, 3, 4, 7}: hits 1 and 3 → P = 2/4, R = 2/4.
        // Top-2 [5, 1]: 1 hit → P = 1/2, R = 1/4. Top-10 considers all 4.
        let s = measure_audit(&[5, 1, 9, 3, 5], &[1, 3, 4, 7], &[2, 10]);
        assert_eq!((s.flagged, s.planted, s.hits), (4, 4, 2));
        assert_eq!((s.precision, s.recall, s.f1), (0.5, 0.5, 0.5));
        assert_eq!(s.at_k[0], AuditAtK { k: 2, considered: 2, hits: 1, precision: 0.5, recall: 0.25 });
        assert_eq!((s.at_k[1].considered, s.at_k[1].hits), (4, 2));
        let empty = measure_audit(&[], &[1], &[5]);
        assert_eq!((empty.precision, empty.recall, empty.at_k[0].precision), (0.0, 0.0, 0.0));
    }

    #[test]
    fn flip_labels_is_exact_and_deterministic() {
        let classes = 4;
        // 1000 items, every tenth masked → 900 labelled; 5 % → round(45.0) = 45 flips.
        let labels: Vec<Option<usize>> = (0..1000).map(|i| (i % 10 != 0).then_some(i % classes)).collect();
        let a = flip_labels(&labels, classes, 0.05, 42).expect("flip");
        assert_eq!(a.flips.len(), 45);
        assert_eq!(a, flip_labels(&labels, classes, 0.05, 42).expect("flip"));
        assert_ne!(a.indices(), flip_labels(&labels, classes, 0.05, 43).expect("flip").indices());
        let flipped: HashSet<usize> = a.indices().into_iter().collect();
        assert_eq!(flipped.len(), 45, "indices are distinct");
        for (i, (before, after)) in labels.iter().zip(&a.labels).enumerate() {
            if flipped.contains(&i) {
                assert!(before.is_some() && after.is_some() && before != after, "item {i}");
            } else {
                assert_eq!(before, after, "item {i} changed without being listed");
            }
        }
        for f in &a.flips {
            assert_eq!((labels[f.index], a.labels[f.index]), (Some(f.from), Some(f.to)));
        }
        // round(0.0333 · 900) = 30; rate 0.0055 · 900 = 4.95 → 5.
        assert_eq!(flip_labels(&labels, classes, 1.0 / 30.0, 1).expect("flip").flips.len(), 30);
        assert_eq!(flip_labels(&labels, classes, 0.0055, 1).expect("flip").flips.len(), 5);
        assert!(flip_labels(&labels, 1, 0.05, 1).is_err());
        assert!(flip_labels(&labels, classes, 1.5, 1).is_err());
    }

    #[test]
    fn flips_are_uniform_over_the_other_classes() {
        // All 3000 items of class 0, all flipped: each of classes 1, 2, 3 should get about 1000 (sd ≈ 26).
        let labels = vec![Some(0); 3000];
        let f = flip_labels(&labels, 4, 1.0, 5).expect("flip");
        let mut counts = [0usize; 4];
        for l in f.labels.iter().flatten() {
            counts[*l] += 1;
        }
        assert_eq!(counts[0], 0);
        for &c in &counts[1..] {
            assert!((880..=1120).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn group_k_fold_keeps_groups_together_and_balances() {
        // 60 groups of sizes 1..=5 (180 items), in scrambled item order (7 is coprime to 180).
        let sorted: Vec<String> = (0..60).flat_map(|g| std::iter::repeat_n(format!("sku-{g}"), 1 + g % 5)).collect();
        let groups: Vec<String> = (0..sorted.len()).map(|i| sorted[(i * 7) % sorted.len()].clone()).collect();
        let sizes = {
            let mut m: HashMap<&str, usize> = HashMap::new();
            for g in &groups {
                *m.entry(g.as_str()).or_default() += 1;
            }
            m
        };
        let folds = group_k_fold(&groups, 5, 1).expect("folds");
        assert_eq!(folds, group_k_fold(&groups, 5, 1).expect("folds"), "deterministic");
        let mut fold_of: HashMap<&str, usize> = HashMap::new();
        for (g, &f) in groups.iter().zip(&folds) {
            assert_eq!(*fold_of.entry(g.as_str()).or_insert(f), f, "group {g} split across folds");
        }
        let mut fold_size = [0usize; 5];
        for &f in &folds {
            fold_size[f] += 1;
        }
        let largest_group = sizes.values().copied().max().unwrap_or(0);
        let (min, max) = (fold_size.iter().min().copied(), fold_size.iter().max().copied());
        assert!(max.zip(min).is_some_and(|(a, b)| a - b <= largest_group), "{fold_size:?}");

        // Uneven groups: sizes 10, 1, 1, …: the big group fills one fold, the rest spread over the others.
        let mut uneven: Vec<u32> = vec![0; 10];
        uneven.extend(1..=30);
        let folds = group_k_fold(&uneven, 4, 3).expect("folds");
        let mut fold_size = [0usize; 4];
        for &f in &folds {
            fold_size[f] += 1;
        }
        assert_eq!(
            {
                let mut s = fold_size;
                s.sort_unstable();
                s
            },
            [10, 10, 10, 10]
        );

        assert_ne!(group_k_fold(&groups, 5, 1).expect("f"), group_k_fold(&groups, 5, 2).expect("f"));
        assert!(group_k_fold(&["a", "b"], 3, 0).is_err());
        assert!(group_k_fold(&groups, 1, 0).is_err());
    }
}
