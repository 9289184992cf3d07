//! Model-independent evaluation math for `trainer eval` and `trainer audit`: classification metrics, calibration,
//! confident-learning label audits and class-balanced sampling.
//!
//! Everything here works on plain arrays so that the libtorch training code, the ONNX evaluation path and tests can
//! all feed it. Conventions shared by the submodules:
//! - A head's outputs for `N` items are an `N × C` array (`ArrayView2<f32>`), one row per item, one column per class
//!   in manifest order.
//! - Single-label targets are `&[Option<usize>]`; `None` is a masked label (missing, or the attribute does not apply
//!   to the item) and a masked item is left out of every statistic, as if it were not in the set.
//! - Multi-label targets are an `N × C` array of `Option<bool>`, masked per cell.
//! - The predicted class is the argmax with ties going to the lowest class index, and an item is accepted when its
//!   probability is `>=` its class threshold: the same rules as `attrd::engine::postprocess`, so that what is measured
//!   here is what the daemon will do.
//! - Sums and averages are computed in `f64`; inputs stay `f32` because that is what the models produce.

pub mod audit;
pub mod calibrate;
pub mod metrics;
pub mod sampling;

use ndarray::{ArrayView1, ArrayView2};

/// Why an evaluation could not be computed. All of these are caller errors (inconsistent inputs or parameters), so
/// none wraps a lower-level source.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error("{what} has {got} rows but there are {expected} items")]
    RowCount { what: &'static str, expected: usize, got: usize },
    #[error("{what} has {got} columns but the head has {expected} classes")]
    ColumnCount { what: &'static str, expected: usize, got: usize },
    #[error("{what} has no classes (zero columns)")]
    NoClasses { what: &'static str },
    #[error("label {label} of item {index} is out of range for {classes} classes")]
    LabelOutOfRange { index: usize, label: usize, classes: usize },
    #[error("{what} of item {index}, class {class} is not finite ({value})")]
    NonFinite { what: &'static str, index: usize, class: usize, value: f32 },
    #[error("no labelled items (all {total} labels are masked)")]
    NoLabelledItems { total: usize },
    #[error("invalid {name}: {reason}")]
    InvalidParameter { name: &'static str, reason: String },
}

/// Shorthand for results of this module.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

/// Checks that `scores` has one row per item, at least one class (exactly `classes` when given) and only finite
/// values; returns the number of classes.
pub(crate) fn check_scores(
    what: &'static str,
    scores: ArrayView2<'_, f32>,
    items: usize,
    classes: Option<usize>,
) -> Result<usize> {
    let (rows, cols) = scores.dim();
    if rows != items {
        return Err(EvalError::RowCount { what, expected: items, got: rows });
    }
    if let Some(expected) = classes
        && cols != expected
    {
        return Err(EvalError::ColumnCount { what, expected, got: cols });
    }
    if cols == 0 {
        return Err(EvalError::NoClasses { what });
    }
    // NaN would silently lose every comparison (argmax, thresholds), so it is rejected up front.
    if let Some(((index, class), &value)) = scores.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(EvalError::NonFinite { what, index, class, value });
    }
    Ok(cols)
}

/// Checks that every unmasked label is a valid class index.
pub(crate) fn check_labels(labels: &[Option<usize>], classes: usize) -> Result<()> {
    match labels.iter().enumerate().find_map(|(i, l)| l.filter(|&l| l >= classes).map(|l| (i, l))) {
        Some((index, label)) => Err(EvalError::LabelOutOfRange { index, label, classes }),
        None => Ok(()),
    }
}

/// Checks that a probability-like parameter lies in `[lo, hi]`.
pub(crate) fn check_range(name: &'static str, value: f64, lo: f64, hi: f64) -> Result<()> {
    if value.is_finite() && (lo..=hi).contains(&value) {
        Ok(())
    } else {
        Err(EvalError::InvalidParameter { name, reason: format!("{value} is not in [{lo}, {hi}]") })
    }
}

/// Index of the largest value; ties go to the lowest index (as in `attrd::engine::postprocess::top_k_indices`).
/// Returns 0 for an empty row; callers have checked that rows are non-empty and finite.
pub(crate) fn argmax(row: ArrayView1<'_, f32>) -> usize {
    let mut best = 0;
    for (c, &v) in row.iter().enumerate().skip(1) {
        if v > row[best] {
            best = c;
        }
    }
    best
}

/// `num / den`, or 0 when `den` is 0: scikit-learn's `zero_division=0` convention, used for every ratio whose
/// denominator can legitimately be empty (a class never predicted, a class without support).
pub(crate) fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 { num / den } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn argmax_ties_go_to_lowest_index() {
        assert_eq!(argmax(array![0.2f32, 0.4, 0.4].view()), 1);
        assert_eq!(argmax(array![0.5f32, 0.5].view()), 0);
        assert_eq!(argmax(array![-3.0f32].view()), 0);
    }

    #[test]
    fn check_scores_rejects_bad_shapes_and_nan() {
        let a = array![[0.1f32, 0.9], [f32::NAN, 0.0]];
        assert_eq!(check_scores("p", a.view(), 3, None), Err(EvalError::RowCount { what: "p", expected: 3, got: 2 }));
        assert_eq!(
            check_scores("p", a.view(), 2, Some(3)),
            Err(EvalError::ColumnCount { what: "p", expected: 3, got: 2 })
        );
        assert!(matches!(check_scores("p", a.view(), 2, None), Err(EvalError::NonFinite { index: 1, class: 0, .. })));
        assert_eq!(
            check_labels(&[Some(0), None, Some(2)], 2),
            Err(EvalError::LabelOutOfRange { index: 2, label: 2, classes: 2 })
        );
    }
}
