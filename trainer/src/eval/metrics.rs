//! Classification metrics for single-label and multi-label heads, and the effect of abstention thresholds.
//!
//! Zero-division and averaging follow scikit-learn's `precision_recall_fscore_support` with `zero_division=0`, so
//! numbers can be cross-checked against it:
//! - precision is 0 for a class that was never predicted, recall is 0 for a class without support, F1 is 0 when
//!   precision + recall is 0;
//! - the **macro** average is the unweighted mean over the classes that occur among the labels *or* the predictions
//!   (sklearn's default `labels=None`): a class the model predicts but that never occurs counts with F1 = 0 (the model
//!   is wrong every time it says so), while a class that neither occurs nor is predicted is left out rather than
//!   dragging the mean down with a meaningless 0. [`Averages::classes`] says how many classes were averaged;
//! - the **micro** average pools true/false positives over classes (for single-label heads precision = recall =
//!   F1 = accuracy);
//! - the **weighted** average weights each class by its support (classes without support weigh nothing).

use super::{EvalError, Result, argmax, check_labels, check_scores, ratio};
use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

/// Precision, recall and F1 of one class, with the counts they come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Items whose (unmasked) label is this class.
    pub support: u64,
    /// Items predicted as this class.
    pub predicted: u64,
    /// Items both labelled and predicted as this class.
    pub true_positives: u64,
}

impl ClassMetrics {
    /// Metrics from counts, with the zero-division rules of the module documentation.
    pub fn from_counts(true_positives: u64, predicted: u64, support: u64) -> Self {
        let precision = ratio(true_positives as f64, predicted as f64);
        let recall = ratio(true_positives as f64, support as f64);
        let f1 = ratio(2.0 * precision * recall, precision + recall);
        Self { precision, recall, f1, support, predicted, true_positives }
    }
}

/// One kind of average of per-class precision, recall and F1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Averages {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// How many classes entered the average (see the module documentation).
    pub classes: usize,
}

/// Macro, micro and support-weighted averages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AveragedMetrics {
    #[serde(rename = "macro")]
    pub macro_avg: Averages,
    #[serde(rename = "micro")]
    pub micro_avg: Averages,
    #[serde(rename = "weighted")]
    pub weighted_avg: Averages,
}

impl AveragedMetrics {
    /// Averages of `per_class`, following the module documentation.
    pub fn of(per_class: &[ClassMetrics]) -> Self {
        let present: Vec<&ClassMetrics> = per_class.iter().filter(|m| m.support > 0 || m.predicted > 0).collect();
        let n = present.len() as f64;
        let macro_avg = Averages {
            precision: ratio(present.iter().map(|m| m.precision).sum(), n),
            recall: ratio(present.iter().map(|m| m.recall).sum(), n),
            f1: ratio(present.iter().map(|m| m.f1).sum(), n),
            classes: present.len(),
        };

        let tp: u64 = per_class.iter().map(|m| m.true_positives).sum();
        let predicted: u64 = per_class.iter().map(|m| m.predicted).sum();
        let support: u64 = per_class.iter().map(|m| m.support).sum();
        let micro = ClassMetrics::from_counts(tp, predicted, support);
        let micro_avg =
            Averages { precision: micro.precision, recall: micro.recall, f1: micro.f1, classes: present.len() };

        let total = support as f64;
        let weighted =
            |f: fn(&ClassMetrics) -> f64| ratio(per_class.iter().map(|m| m.support as f64 * f(m)).sum(), total);
        let weighted_avg = Averages {
            precision: weighted(|m| m.precision),
            recall: weighted(|m| m.recall),
            f1: weighted(|m| m.f1),
            classes: per_class.iter().filter(|m| m.support > 0).count(),
        };
        Self { macro_avg, micro_avg, weighted_avg }
    }
}

/// Top-k accuracy for one `k`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopKAccuracy {
    pub k: usize,
    pub accuracy: f64,
}

/// Evaluation of a single-label head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SingleLabelReport {
    /// Items with a label (the ones evaluated).
    pub evaluated: u64,
    /// Items left out because their label is masked.
    pub masked: u64,
    /// Fraction of evaluated items whose argmax is their label.
    pub accuracy: f64,
    /// `confusion[true][predicted]` counts over evaluated items.
    pub confusion: Vec<Vec<u64>>,
    pub per_class: Vec<ClassMetrics>,
    pub averages: AveragedMetrics,
    /// One entry per requested `k`, in request order.
    pub top_k: Vec<TopKAccuracy>,
}

/// `confusion[true][predicted]` over items with an unmasked label; the prediction is the argmax of each row of
/// `probs` (`N × C`).
pub fn confusion_matrix(probs: ArrayView2<'_, f32>, labels: &[Option<usize>]) -> Result<Vec<Vec<u64>>> {
    let classes = check_scores("probabilities", probs, labels.len(), None)?;
    check_labels(labels, classes)?;
    Ok(confusion_unchecked(probs, labels, classes, |_| true))
}

/// Confusion matrix over the unmasked items that `keep` accepts; inputs already checked.
fn confusion_unchecked(
    probs: ArrayView2<'_, f32>,
    labels: &[Option<usize>],
    classes: usize,
    keep: impl Fn(usize) -> bool,
) -> Vec<Vec<u64>> {
    let mut confusion = vec![vec![0u64; classes]; classes];
    for (i, (row, label)) in probs.outer_iter().zip(labels).enumerate() {
        if let Some(y) = *label
            && keep(i)
        {
            confusion[y][argmax(row)] += 1;
        }
    }
    confusion
}

/// Per-class metrics from a confusion matrix (`confusion[true][predicted]`).
pub fn per_class_from_confusion(confusion: &[Vec<u64>]) -> Vec<ClassMetrics> {
    (0..confusion.len())
        .map(|c| {
            let support = confusion[c].iter().sum();
            let predicted = confusion.iter().map(|row| row[c]).sum();
            ClassMetrics::from_counts(confusion[c][c], predicted, support)
        })
        .collect()
}

/// Whether `label` is among the `k` highest-ranked classes of `row`, ranking ties by class index as
/// `attrd::engine::postprocess::top_k_indices` does.
fn in_top_k(row: ndarray::ArrayView1<'_, f32>, label: usize, k: usize) -> bool {
    let p = row[label];
    // Counting the classes ranked ahead is O(C) per item instead of a sort.
    let ahead = row.iter().enumerate().filter(|&(c, &v)| v > p || (v == p && c < label)).count();
    ahead < k
}

/// Fraction of labelled items whose label is among the `k` most probable classes (`k` larger than the number of
/// classes counts every item as a hit).
pub fn top_k_accuracy(probs: ArrayView2<'_, f32>, labels: &[Option<usize>], k: usize) -> Result<f64> {
    let classes = check_scores("probabilities", probs, labels.len(), None)?;
    check_labels(labels, classes)?;
    if k == 0 {
        return Err(EvalError::InvalidParameter { name: "k", reason: "top-k needs k >= 1".into() });
    }
    let evaluated = labels.iter().flatten().count();
    if evaluated == 0 {
        return Err(EvalError::NoLabelledItems { total: labels.len() });
    }
    let hits = probs.outer_iter().zip(labels).filter(|(row, l)| l.is_some_and(|y| in_top_k(*row, y, k))).count();
    Ok(hits as f64 / evaluated as f64)
}

/// Full evaluation of a single-label head from its probabilities (`N × C`, any monotone score works too) and
/// labels; `top_ks` lists the `k`s to report top-k accuracy for. Fails when every label is masked, because no
/// number would mean anything.
pub fn single_label_report(
    probs: ArrayView2<'_, f32>,
    labels: &[Option<usize>],
    top_ks: &[usize],
) -> Result<SingleLabelReport> {
    let classes = check_scores("probabilities", probs, labels.len(), None)?;
    check_labels(labels, classes)?;
    let evaluated = labels.iter().flatten().count() as u64;
    if evaluated == 0 {
        return Err(EvalError::NoLabelledItems { total: labels.len() });
    }
    let confusion = confusion_unchecked(probs, labels, classes, |_| true);
    let per_class = per_class_from_confusion(&confusion);
    let correct: u64 = (0..classes).map(|c| confusion[c][c]).sum();
    let top_k = top_ks
        .iter()
        .map(|&k| Ok(TopKAccuracy { k, accuracy: top_k_accuracy(probs, labels, k)? }))
        .collect::<Result<Vec<_>>>()?;
    Ok(SingleLabelReport {
        evaluated,
        masked: labels.len() as u64 - evaluated,
        accuracy: correct as f64 / evaluated as f64,
        averages: AveragedMetrics::of(&per_class),
        confusion,
        per_class,
        top_k,
    })
}

/// One class of a multi-label head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiLabelClass {
    /// The class is predicted present when its probability is `>=` this.
    pub threshold: f32,
    /// Items whose target for this class is known (masked cells excluded); `metrics.support` counts the positives.
    pub known: u64,
    /// Items whose target for this class is masked.
    pub masked: u64,
    #[serde(flatten)]
    pub metrics: ClassMetrics,
}

/// Evaluation of a multi-label head: every class is its own binary problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiLabelReport {
    pub items: u64,
    /// Known (unmasked) item × class cells.
    pub known_cells: u64,
    pub masked_cells: u64,
    pub per_class: Vec<MultiLabelClass>,
    /// Micro pools true/false positives of all classes; macro and weighted as in the module documentation.
    pub averages: AveragedMetrics,
}

/// Evaluation of a multi-label head from per-class probabilities (`N × C`, sigmoid outputs), targets (`N × C`,
/// `None` = unknown) and one threshold per class.
pub fn multi_label_report(
    probs: ArrayView2<'_, f32>,
    targets: ArrayView2<'_, Option<bool>>,
    thresholds: &[f32],
) -> Result<MultiLabelReport> {
    let (items, classes) = targets.dim();
    check_scores("probabilities", probs, items, Some(classes))?;
    if thresholds.len() != classes {
        return Err(EvalError::InvalidParameter {
            name: "thresholds",
            reason: format!("{} thresholds for {classes} classes", thresholds.len()),
        });
    }
    let mut per_class = Vec::with_capacity(classes);
    for (c, &threshold) in thresholds.iter().enumerate() {
        let (mut tp, mut predicted, mut support, mut known) = (0u64, 0u64, 0u64, 0u64);
        for (&p, target) in probs.column(c).iter().zip(targets.column(c)) {
            let Some(positive) = *target else { continue };
            let hit = p >= threshold;
            known += 1;
            support += u64::from(positive);
            predicted += u64::from(hit);
            tp += u64::from(positive && hit);
        }
        per_class.push(MultiLabelClass {
            threshold,
            known,
            masked: items as u64 - known,
            metrics: ClassMetrics::from_counts(tp, predicted, support),
        });
    }
    let known_cells = per_class.iter().map(|c| c.known).sum();
    let metrics: Vec<ClassMetrics> = per_class.iter().map(|c| c.metrics.clone()).collect();
    Ok(MultiLabelReport {
        items: items as u64,
        known_cells,
        masked_cells: (items * classes) as u64 - known_cells,
        averages: AveragedMetrics::of(&metrics),
        per_class,
    })
}

/// What abstention does to the items predicted as one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassAbstention {
    pub threshold: f32,
    /// Labelled items whose argmax is this class.
    pub predicted: u64,
    /// Of those, the ones whose probability reached the threshold.
    pub accepted: u64,
    /// `accepted / predicted`; `None` when the class was never predicted.
    pub coverage: Option<f64>,
    /// Fraction of accepted items whose label is this class; `None` when none was accepted.
    pub precision: Option<f64>,
}

/// Coverage and quality of a single-label head when it abstains below per-class thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbstentionReport {
    /// Labelled items.
    pub evaluated: u64,
    /// Labelled items whose top probability reached its class threshold.
    pub accepted: u64,
    /// `accepted / evaluated`.
    pub coverage: f64,
    /// Accuracy on accepted items; `None` when nothing was accepted.
    pub accepted_accuracy: Option<f64>,
    /// Per-class metrics and averages over accepted items only (recall is relative to accepted items, not to all
    /// items of the class); `None` when nothing was accepted.
    pub accepted_averages: Option<AveragedMetrics>,
    /// Indexed by predicted class, because that is what a threshold acts on.
    pub per_class: Vec<ClassAbstention>,
}

/// Coverage and accuracy/F1 on accepted items when an item is accepted iff its top probability is `>=` the threshold
/// of its top class (the daemon's rule; thresholds typically come from
/// [`thresholds_for_precision`](super::calibrate::thresholds_for_precision)).
pub fn abstention_report(
    probs: ArrayView2<'_, f32>,
    labels: &[Option<usize>],
    thresholds: &[f32],
) -> Result<AbstentionReport> {
    let classes = check_scores("probabilities", probs, labels.len(), None)?;
    check_labels(labels, classes)?;
    if thresholds.len() != classes {
        return Err(EvalError::InvalidParameter {
            name: "thresholds",
            reason: format!("{} thresholds for {classes} classes", thresholds.len()),
        });
    }
    let evaluated = labels.iter().flatten().count() as u64;
    if evaluated == 0 {
        return Err(EvalError::NoLabelledItems { total: labels.len() });
    }
    let accepted_item = |i: usize| {
        let row = probs.row(i);
        let best = argmax(row);
        row[best] >= thresholds[best]
    };
    let confusion = confusion_unchecked(probs, labels, classes, accepted_item);
    let accepted: u64 = confusion.iter().flatten().sum();
    let correct: u64 = (0..classes).map(|c| confusion[c][c]).sum();

    let mut predicted = vec![0u64; classes];
    for (row, label) in probs.outer_iter().zip(labels) {
        if label.is_some() {
            predicted[argmax(row)] += 1;
        }
    }
    let per_class = (0..classes)
        .map(|c| {
            let acc: u64 = confusion.iter().map(|row| row[c]).sum();
            ClassAbstention {
                threshold: thresholds[c],
                predicted: predicted[c],
                accepted: acc,
                coverage: (predicted[c] > 0).then(|| acc as f64 / predicted[c] as f64),
                precision: (acc > 0).then(|| confusion[c][c] as f64 / acc as f64),
            }
        })
        .collect();
    let any = accepted > 0;
    Ok(AbstentionReport {
        evaluated,
        accepted,
        coverage: accepted as f64 / evaluated as f64,
        accepted_accuracy: any.then(|| correct as f64 / accepted as f64),
        accepted_averages: any.then(|| AveragedMetrics::of(&per_class_from_confusion(&confusion))),
        per_class,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, array};

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    macro_rules! assert_close {
        ($a:expr, $b:expr) => {
            assert!(close($a, $b), "{} = {} but expected {}", stringify!($a), $a, $b)
        };
    }

    /// 5 classes, 10 labelled items and 2 masked ones. Argmax predictions (true → predicted):
    /// ```text
    /// item  0  1  2  3  4  5  6  7  8  9 | 10 11 (masked)
    /// true  0  0  0  0  1  1  1  2  2  2 |  -  -
    /// pred  0  0  1  0  1  2  1  2  3  0 |  2  1
    /// ```
    /// Class 3 is predicted once but never true (zero support); class 4 neither occurs nor is predicted.
    fn example() -> (Array2<f32>, Vec<Option<usize>>) {
        let probs = array![
            [0.7f32, 0.1, 0.1, 0.05, 0.05],
            [0.6, 0.2, 0.1, 0.05, 0.05],
            [0.3, 0.5, 0.1, 0.05, 0.05], // true 0 ranks 2nd
            [0.8, 0.05, 0.05, 0.05, 0.05],
            [0.1, 0.6, 0.1, 0.1, 0.1],
            [0.3, 0.1, 0.4, 0.1, 0.1], // true 1 ranks 3rd: ties with 3 and 4 at 0.1, which it beats by index
            [0.2, 0.5, 0.1, 0.1, 0.1],
            [0.1, 0.1, 0.6, 0.1, 0.1],
            [0.1, 0.1, 0.35, 0.4, 0.05], // true 2 ranks 2nd
            [0.4, 0.25, 0.2, 0.1, 0.05], // true 2 ranks 3rd
            [0.1, 0.1, 0.6, 0.1, 0.1],
            [0.1, 0.6, 0.1, 0.1, 0.1],
        ];
        let mut labels: Vec<Option<usize>> = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2].into_iter().map(Some).collect();
        labels.extend([None, None]);
        (probs, labels)
    }

    #[test]
    fn single_label_report_matches_hand_computation() {
        let (probs, labels) = example();
        let r = single_label_report(probs.view(), &labels, &[1, 2, 3, 7]).expect("report");
        assert_eq!((r.evaluated, r.masked), (10, 2));
        assert_eq!(
            r.confusion,
            vec![
                vec![3, 1, 0, 0, 0],
                vec![0, 2, 1, 0, 0],
                vec![1, 0, 1, 1, 0],
                vec![0, 0, 0, 0, 0],
                vec![0, 0, 0, 0, 0],
            ]
        );
        // Column sums (predicted): 4, 3, 2, 1, 0; row sums (support): 4, 3, 3, 0, 0; diagonal: 3, 2, 1, 0, 0.
        // P = 3/4, 2/3, 1/2, 0/1 = 0, 0/0 → 0
        // R = 3/4, 2/3, 1/3, 0/0 → 0, 0/0 → 0
        // F1 = 3/4, 2/3, 2·(1/2)(1/3)/(5/6) = 2/5, 0, 0
        let expect = [
            (3.0 / 4.0, 3.0 / 4.0, 3.0 / 4.0, 4, 4),
            (2.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0, 3, 3),
            (1.0 / 2.0, 1.0 / 3.0, 2.0 / 5.0, 3, 2),
            (0.0, 0.0, 0.0, 0, 1),
            (0.0, 0.0, 0.0, 0, 0),
        ];
        for (m, &(p, rc, f1, support, predicted)) in r.per_class.iter().zip(&expect) {
            assert_close!(m.precision, p);
            assert_close!(m.recall, rc);
            assert_close!(m.f1, f1);
            assert_eq!((m.support, m.predicted), (support, predicted));
        }
        // Accuracy = (3 + 2 + 1) / 10; micro P = R = F1 = accuracy for a single-label head.
        assert_close!(r.accuracy, 0.6);
        let a = &r.averages;
        assert_close!(a.micro_avg.precision, 0.6);
        assert_close!(a.micro_avg.recall, 0.6);
        assert_close!(a.micro_avg.f1, 0.6);
        // Macro over classes {0, 1, 2, 3} (true ∪ predicted, as sklearn's labels=None):
        // P = (3/4 + 2/3 + 1/2 + 0) / 4 = 23/48, R = (3/4 + 2/3 + 1/3 + 0) / 4 = 7/16,
        // F1 = (3/4 + 2/3 + 2/5 + 0) / 4 = 109/240.
        assert_eq!(a.macro_avg.classes, 4);
        assert_close!(a.macro_avg.precision, 23.0 / 48.0);
        assert_close!(a.macro_avg.recall, 7.0 / 16.0);
        assert_close!(a.macro_avg.f1, 109.0 / 240.0);
        // Weighted by support 4, 3, 3: P = (3 + 2 + 1.5) / 10, R = (3 + 2 + 1) / 10, F1 = (3 + 2 + 1.2) / 10.
        assert_eq!(a.weighted_avg.classes, 3);
        assert_close!(a.weighted_avg.precision, 0.65);
        assert_close!(a.weighted_avg.recall, 0.6);
        assert_close!(a.weighted_avg.f1, 0.62);
        // Top-2 adds items 2 and 8; top-3 adds 5 and 9; k beyond C counts everything.
        let topk: Vec<(usize, f64)> = r.top_k.iter().map(|t| (t.k, t.accuracy)).collect();
        assert_eq!(topk, vec![(1, 0.6), (2, 0.8), (3, 1.0), (7, 1.0)]);
    }

    #[test]
    fn masked_items_change_nothing() {
        let (probs, labels) = example();
        let r = single_label_report(probs.view(), &labels, &[1]).expect("report");
        let clean = single_label_report(probs.slice(ndarray::s![..10, ..]), &labels[..10], &[1]).expect("report");
        assert_eq!(r.confusion, clean.confusion);
        assert_eq!(r.averages, clean.averages);
        assert_eq!(clean.masked, 0);
        // Unmasking them (both are correct predictions) changes the result, so the mask did something.
        let mut unmasked = labels.clone();
        unmasked[10] = Some(2);
        unmasked[11] = Some(1);
        let u = single_label_report(probs.view(), &unmasked, &[1]).expect("report");
        assert_close!(u.accuracy, 8.0 / 12.0);
    }

    #[test]
    fn all_masked_or_bad_input_is_an_error() {
        let (probs, _) = example();
        let none = vec![None; 12];
        assert_eq!(single_label_report(probs.view(), &none, &[]), Err(EvalError::NoLabelledItems { total: 12 }));
        let (_, labels) = example();
        assert!(matches!(top_k_accuracy(probs.view(), &labels, 0), Err(EvalError::InvalidParameter { .. })));
        assert!(matches!(
            single_label_report(probs.view(), &labels[..5], &[]),
            Err(EvalError::RowCount { expected: 5, got: 12, .. })
        ));
    }

    #[test]
    fn sklearn_zero_division_and_macro_on_two_classes() {
        // y_true = [0, 0, 0], y_pred = [0, 0, 1]: sklearn's precision_recall_fscore_support(zero_division=0) gives
        // P = [1, 0], R = [2/3, 0], F1 = [0.8, 0], support = [3, 0]; macro F1 over labels {0, 1} = 0.4,
        // weighted F1 = 0.8.
        let probs = array![[0.9f32, 0.1], [0.6, 0.4], [0.3, 0.7]];
        let r = single_label_report(probs.view(), &[Some(0), Some(0), Some(0)], &[]).expect("report");
        assert_close!(r.per_class[0].f1, 0.8);
        assert_close!(r.per_class[1].precision, 0.0);
        assert_close!(r.averages.macro_avg.f1, 0.4);
        assert_close!(r.averages.weighted_avg.f1, 0.8);
    }

    #[test]
    fn multi_label_report_matches_hand_computation() {
        let probs =
            array![[0.9f32, 0.2, 0.8], [0.4, 0.35, 0.6], [0.6, 0.1, 0.75], [0.2, 0.5, 0.1], [0.55, 0.05, 0.95],];
        let (t, f) = (Some(true), Some(false));
        let targets = array![[t, f, t], [t, t, f], [f, None, t], [f, f, None], [None, f, f]];
        let r = multi_label_report(probs.view(), targets.view(), &[0.5, 0.3, 0.7]).expect("report");
        // Class 0 (≥ 0.5): item0 TP, item1 FN, item2 FP, item3 TN, item4 masked → P = R = F1 = 1/2.
        // Class 1 (≥ 0.3): item0 TN, item1 TP, item2 masked, item3 FP, item4 TN → P = 1/2, R = 1, F1 = 2/3.
        // Class 2 (≥ 0.7): item0 TP, item1 TN, item2 TP, item3 masked, item4 FP → P = 2/3, R = 1, F1 = 4/5.
        let expect = [(0.5, 0.5, 0.5, 2, 2), (0.5, 1.0, 2.0 / 3.0, 1, 2), (2.0 / 3.0, 1.0, 0.8, 2, 3)];
        for (c, &(p, rc, f1, support, predicted)) in r.per_class.iter().zip(&expect) {
            assert_close!(c.metrics.precision, p);
            assert_close!(c.metrics.recall, rc);
            assert_close!(c.metrics.f1, f1);
            assert_eq!((c.metrics.support, c.metrics.predicted, c.known, c.masked), (support, predicted, 4, 1));
        }
        assert_eq!((r.items, r.known_cells, r.masked_cells), (5, 12, 3));
        let a = &r.averages;
        // Micro: TP = 1 + 1 + 2 = 4, FP = 1 + 1 + 1 = 3, FN = 1 + 0 + 0 = 1 → P = 4/7, R = 4/5, F1 = 8/12.
        assert_close!(a.micro_avg.precision, 4.0 / 7.0);
        assert_close!(a.micro_avg.recall, 0.8);
        assert_close!(a.micro_avg.f1, 2.0 / 3.0);
        // Macro: P = (1/2 + 1/2 + 2/3) / 3 = 5/9, R = (1/2 + 1 + 1) / 3 = 5/6, F1 = (1/2 + 2/3 + 4/5) / 3 = 59/90.
        assert_close!(a.macro_avg.precision, 5.0 / 9.0);
        assert_close!(a.macro_avg.recall, 5.0 / 6.0);
        assert_close!(a.macro_avg.f1, 59.0 / 90.0);
        // Weighted by support 2, 1, 2: P = (1 + 1/2 + 4/3) / 5 = 17/30, R = 4/5, F1 = (1 + 2/3 + 8/5) / 5 = 49/75.
        assert_close!(a.weighted_avg.precision, 17.0 / 30.0);
        assert_close!(a.weighted_avg.recall, 0.8);
        assert_close!(a.weighted_avg.f1, 49.0 / 75.0);

        assert!(matches!(
            multi_label_report(probs.view(), targets.view(), &[0.5, 0.5]),
            Err(EvalError::InvalidParameter { name: "thresholds", .. })
        ));
    }

    #[test]
    fn abstention_report_matches_hand_computation() {
        let (probs, labels) = example();
        // Thresholds 0.5 everywhere: top probabilities of items 0..10 are
        // 0.7 0.6 0.5 0.8 0.6 0.4 0.5 0.6 0.4 0.4 → items 5, 8, 9 abstain (masked items 10, 11 do not count).
        let r = abstention_report(probs.view(), &labels, &[0.5; 5]).expect("report");
        assert_eq!((r.evaluated, r.accepted), (10, 7));
        assert_close!(r.coverage, 0.7);
        // Accepted: 0, 1, 3 (0→0), 2 (0→1), 4, 6 (1→1), 7 (2→2): 6 of 7 correct.
        assert_close!(r.accepted_accuracy.expect("some accepted"), 6.0 / 7.0);
        // On accepted items: class 0 P = 3/3, R = 3/4, F1 = 6/7; class 1 P = 2/3, R = 2/2, F1 = 4/5; class 2 all 1.
        // Macro F1 = (6/7 + 4/5 + 1) / 3 = 31/35.
        let avg = r.accepted_averages.expect("some accepted");
        assert_close!(avg.macro_avg.f1, 31.0 / 35.0);
        // By predicted class: 0 predicted {0,1,3,9}, accepted 3, all right; 1 predicted {2,4,6}, accepted 3, 2 right;
        // 2 predicted {5,7}, accepted 1, right; 3 predicted {8}, none accepted; 4 never predicted.
        let got: Vec<(u64, u64, Option<f64>)> =
            r.per_class.iter().map(|c| (c.predicted, c.accepted, c.precision)).collect();
        assert_eq!(
            got,
            vec![(4, 3, Some(1.0)), (3, 3, Some(2.0 / 3.0)), (2, 1, Some(1.0)), (1, 0, None), (0, 0, None)]
        );
        assert_eq!(r.per_class[0].coverage, Some(0.75));
        assert_eq!(r.per_class[4].coverage, None);

        let none = abstention_report(probs.view(), &labels, &[1.0; 5]).expect("report");
        assert_eq!((none.accepted, none.accepted_accuracy, none.accepted_averages), (0, None, None));
    }

    #[test]
    fn reports_serialize_to_json() {
        let (probs, labels) = example();
        let r = single_label_report(probs.view(), &labels, &[1, 5]).expect("report");
        let json = serde_json::to_value(&r).expect("serializes");
        assert_eq!(json["averages"]["macro"]["classes"], 4);
        assert_eq!(json["top_k"][1]["k"], 5);
        let back: SingleLabelReport = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, r);
    }
}
