//! Calibration of a head's confidences: temperature scaling (Guo et al. 2017), reliability diagrams with ECE / MCE,
//! and per-class acceptance thresholds for a target precision.
//!
//! Temperatures mean what they mean in the daemon (`attrd::engine::postprocess::probabilities`):
//! `softmax(logits / T)` for single-label heads and `sigmoid(logits / T)` for multi-label heads.

use super::{EvalError, Result, argmax, check_labels, check_range, check_scores};
use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

/// Smallest temperature the fit will return. Below it the fit hits the bound (`TemperatureFit::at_bound`): the
/// validation set is (nearly) separable and the likelihood keeps improving as `T → 0`, which says nothing useful.
pub const MIN_TEMPERATURE: f64 = 0.01;
/// Largest temperature the fit will return; reached when the logits carry (almost) no information about the labels.
pub const MAX_TEMPERATURE: f64 = 100.0;

/// Result of fitting one head's temperature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemperatureFit {
    /// The fitted `T > 0`; divide logits by it.
    pub temperature: f64,
    /// Mean negative log-likelihood at `T = 1` (uncalibrated).
    pub nll_before: f64,
    /// Mean negative log-likelihood at the fitted `T`.
    pub nll_after: f64,
    /// Labelled items (single-label) or known cells (multi-label) the fit used.
    pub items: u64,
    /// Objective evaluations used by the optimiser.
    pub evaluations: u32,
    /// The optimum lies at or beyond [`MIN_TEMPERATURE`] / [`MAX_TEMPERATURE`] and was clamped.
    pub at_bound: bool,
}

/// Minimises a function of `β = 1/T` whose derivative `g` is non-decreasing (the NLL is convex in `β`), given
/// `derivs(β) = (g, g')`, over `β ∈ [1/MAX_TEMPERATURE, 1/MIN_TEMPERATURE]`. Returns `(β, evaluations, at_bound)`.
///
/// Working in `β` rather than `log T` makes the objective convex, so there is exactly one minimum and the sign of
/// `g` brackets it. Each step is a Newton step when it stays strictly inside the bracket and a bisection in
/// `log β` otherwise (the bracket spans four orders of magnitude), so it converges quadratically near the optimum
/// and can never diverge.
fn minimise_in_beta(derivs: impl Fn(f64) -> (f64, f64)) -> (f64, u32, bool) {
    let (mut lo, mut hi) = (1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE);
    let (g_lo, _) = derivs(lo);
    if g_lo >= 0.0 {
        return (lo, 1, true);
    }
    let (g_hi, _) = derivs(hi);
    if g_hi <= 0.0 {
        return (hi, 2, true);
    }
    let mut beta = 1.0;
    let mut evaluations = 2;
    // 200 steps is far more than needed: bisection alone shrinks the log-bracket 2^-200-fold.
    for _ in 0..200 {
        let (g, h) = derivs(beta);
        evaluations += 1;
        if g == 0.0 {
            break;
        }
        if g < 0.0 {
            lo = beta;
        } else {
            hi = beta;
        }
        let step = g / h;
        // Converged: the Newton step is negligible. Checked before the bracket test because near the optimum the
        // step can land exactly on a bracket end, which would otherwise trigger a pointless bisection.
        if h > 0.0 && step.abs() <= 1e-10 * beta {
            beta = (beta - step).clamp(lo, hi);
            break;
        }
        let newton = beta - step;
        beta = if h > 0.0 && newton > lo && newton < hi { newton } else { (lo * hi).sqrt() };
        if hi / lo - 1.0 <= 1e-12 {
            break;
        }
    }
    (beta, evaluations, false)
}

/// The fit of `objective(β) = (NLL, g, g')` over `items` labelled items or known cells, by [`minimise_in_beta`].
fn fit_objective(objective: impl Fn(f64) -> (f64, f64, f64), items: usize) -> TemperatureFit {
    let (beta, evaluations, at_bound) = minimise_in_beta(|beta| {
        let (_, g, h) = objective(beta);
        (g, h)
    });
    TemperatureFit {
        temperature: 1.0 / beta,
        nll_before: objective(1.0).0,
        nll_after: objective(beta).0,
        items: items as u64,
        evaluations,
        at_bound,
    }
}

/// Per-item NLL of `softmax(β z)` for label `y`, its first and second derivative in `β`.
fn softmax_nll_terms(z: ndarray::ArrayView1<'_, f32>, y: usize, beta: f64) -> (f64, f64, f64) {
    let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(beta * f64::from(v)));
    let (mut sum, mut ez, mut ez2) = (0.0, 0.0, 0.0);
    for &v in z {
        let v = f64::from(v);
        let e = (beta * v - max).exp();
        sum += e;
        ez += e * v;
        ez2 += e * v * v;
    }
    let (mean, mean_sq) = (ez / sum, ez2 / sum);
    let nll = max + sum.ln() - beta * f64::from(z[y]);
    // d/dβ = E_p[z] − z_y and d²/dβ² = Var_p[z] ≥ 0: the convexity the optimiser relies on.
    (nll, mean - f64::from(z[y]), (mean_sq - mean * mean).max(0.0))
}

/// Per-cell binary NLL of `sigmoid(β l)` for target `y`, its first and second derivative in `β`.
fn sigmoid_nll_terms(l: f32, y: bool, beta: f64) -> (f64, f64, f64) {
    let l = f64::from(l);
    let s = beta * l;
    // softplus(s) − y·s, written so that neither branch overflows.
    let softplus = if s > 0.0 { s + (-s).exp().ln_1p() } else { s.exp().ln_1p() };
    let y = if y { 1.0 } else { 0.0 };
    let p = 1.0 / (1.0 + (-s).exp());
    (softplus - y * s, (p - y) * l, p * (1.0 - p) * l * l)
}

/// Sums `terms(β)` over all items, returning `(mean NLL, mean g, mean g')`.
fn mean_terms(n: usize, terms: impl Iterator<Item = (f64, f64, f64)>) -> (f64, f64, f64) {
    let (a, b, c) = terms.fold((0.0, 0.0, 0.0), |(a, b, c), (x, y, z)| (a + x, b + y, c + z));
    let n = n as f64;
    (a / n, b / n, c / n)
}

/// Mean negative log-likelihood of `softmax(logits / temperature)` over labelled items.
pub fn nll(logits: ArrayView2<'_, f32>, labels: &[Option<usize>], temperature: f64) -> Result<f64> {
    let classes = check_scores("logits", logits, labels.len(), None)?;
    check_labels(labels, classes)?;
    check_temperature(temperature)?;
    let n = labels.iter().flatten().count();
    if n == 0 {
        return Err(EvalError::NoLabelledItems { total: labels.len() });
    }
    Ok(softmax_objective(logits, labels, n, 1.0 / temperature).0)
}

fn softmax_objective(logits: ArrayView2<'_, f32>, labels: &[Option<usize>], n: usize, beta: f64) -> (f64, f64, f64) {
    let terms = logits.outer_iter().zip(labels).filter_map(|(z, l)| l.map(|y| softmax_nll_terms(z, y, beta)));
    mean_terms(n, terms)
}

/// Mean binary negative log-likelihood of `sigmoid(logits / temperature)` over known cells.
pub fn binary_nll(logits: ArrayView2<'_, f32>, targets: ArrayView2<'_, Option<bool>>, temperature: f64) -> Result<f64> {
    let (items, classes) = targets.dim();
    check_scores("logits", logits, items, Some(classes))?;
    check_temperature(temperature)?;
    let n = targets.iter().flatten().count();
    if n == 0 {
        return Err(EvalError::NoLabelledItems { total: items * classes });
    }
    Ok(sigmoid_objective(logits, targets, n, 1.0 / temperature).0)
}

fn sigmoid_objective(
    logits: ArrayView2<'_, f32>,
    targets: ArrayView2<'_, Option<bool>>,
    n: usize,
    beta: f64,
) -> (f64, f64, f64) {
    let terms = logits.iter().zip(targets).filter_map(|(&l, t)| t.map(|y| sigmoid_nll_terms(l, y, beta)));
    mean_terms(n, terms)
}

fn check_temperature(temperature: f64) -> Result<()> {
    if temperature.is_finite() && temperature > 0.0 {
        Ok(())
    } else {
        Err(EvalError::InvalidParameter { name: "temperature", reason: format!("{temperature} is not > 0") })
    }
}

/// Fits the temperature of a single-label head: the `T` in `[MIN_TEMPERATURE, MAX_TEMPERATURE]` minimising the
/// mean NLL of `softmax(logits / T)` on validation logits (`N × C`) and labels (masked items skipped). Costs
/// `O(N·C)` per objective evaluation and about ten evaluations.
pub fn fit_temperature(logits: ArrayView2<'_, f32>, labels: &[Option<usize>]) -> Result<TemperatureFit> {
    let classes = check_scores("logits", logits, labels.len(), None)?;
    check_labels(labels, classes)?;
    let n = labels.iter().flatten().count();
    if n == 0 {
        return Err(EvalError::NoLabelledItems { total: labels.len() });
    }
    Ok(fit_objective(|beta| softmax_objective(logits, labels, n, beta), n))
}

/// Fits the temperature of a multi-label head: one `T` for all its classes, minimising the mean binary NLL of
/// `sigmoid(logits / T)` over known cells of `targets` (`N × C`).
pub fn fit_temperature_multi_label(
    logits: ArrayView2<'_, f32>,
    targets: ArrayView2<'_, Option<bool>>,
) -> Result<TemperatureFit> {
    let (items, classes) = targets.dim();
    check_scores("logits", logits, items, Some(classes))?;
    let n = targets.iter().flatten().count();
    if n == 0 {
        return Err(EvalError::NoLabelledItems { total: items * classes });
    }
    Ok(fit_objective(|beta| sigmoid_objective(logits, targets, n, beta), n))
}

/// Row-wise `softmax(logits / temperature)`, computed as the daemon does (max-shifted, in `f32` at the end).
pub fn softmax(logits: ArrayView2<'_, f32>, temperature: f64) -> Result<Array2<f32>> {
    check_temperature(temperature)?;
    let mut out = logits.mapv(f64::from);
    for mut row in out.outer_iter_mut() {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        row.mapv_inplace(|v| ((v - max) / temperature).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    Ok(out.mapv(|v| v as f32))
}

/// Element-wise `sigmoid(logits / temperature)`.
pub fn sigmoid(logits: ArrayView2<'_, f32>, temperature: f64) -> Result<Array2<f32>> {
    check_temperature(temperature)?;
    Ok(logits.mapv(|l| (1.0 / (1.0 + (-f64::from(l) / temperature).exp())) as f32))
}

/// One equal-width confidence bin of a reliability diagram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// The bin holds confidences in `[lower, upper)`; the last bin also holds `upper` (= 1).
    pub lower: f64,
    pub upper: f64,
    pub count: u64,
    /// Mean top probability of the bin's items; `None` for an empty bin.
    pub mean_confidence: Option<f64>,
    /// Fraction of the bin's items whose argmax is their label; `None` for an empty bin.
    pub accuracy: Option<f64>,
}

/// Reliability diagram data and calibration errors of a single-label head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reliability {
    /// Labelled items.
    pub items: u64,
    pub bins: Vec<ReliabilityBin>,
    /// Expected calibration error: `Σ_b (n_b / N) · |accuracy_b − confidence_b|`.
    pub ece: f64,
    /// Maximum calibration error: the largest `|accuracy_b − confidence_b|` over non-empty bins.
    pub mce: f64,
    pub accuracy: f64,
    pub mean_confidence: f64,
}

/// Reliability diagram over `bins` equal-width bins of the top probability (confidence) of each labelled item.
pub fn reliability(probs: ArrayView2<'_, f32>, labels: &[Option<usize>], bins: usize) -> Result<Reliability> {
    let classes = check_scores("probabilities", probs, labels.len(), None)?;
    check_labels(labels, classes)?;
    if bins == 0 {
        return Err(EvalError::InvalidParameter { name: "bins", reason: "at least one bin is needed".into() });
    }
    let mut count = vec![0u64; bins];
    let mut conf_sum = vec![0.0f64; bins];
    let mut correct = vec![0u64; bins];
    for (row, label) in probs.outer_iter().zip(labels) {
        let Some(y) = *label else { continue };
        let best = argmax(row);
        let conf = f64::from(row[best]);
        // Clamp so that confidence 1 (and any value a hair outside [0, 1] from rounding) lands in an edge bin.
        let b = ((conf * bins as f64).floor().max(0.0) as usize).min(bins - 1);
        count[b] += 1;
        conf_sum[b] += conf;
        correct[b] += u64::from(best == y);
    }
    let items: u64 = count.iter().sum();
    if items == 0 {
        return Err(EvalError::NoLabelledItems { total: labels.len() });
    }
    let (mut ece, mut mce) = (0.0f64, 0.0f64);
    let mut out = Vec::with_capacity(bins);
    for b in 0..bins {
        let n = count[b];
        let (mean_confidence, accuracy) = if n > 0 {
            let (c, a) = (conf_sum[b] / n as f64, correct[b] as f64 / n as f64);
            let gap = (a - c).abs();
            ece += n as f64 / items as f64 * gap;
            mce = mce.max(gap);
            (Some(c), Some(a))
        } else {
            (None, None)
        };
        out.push(ReliabilityBin {
            lower: b as f64 / bins as f64,
            upper: (b + 1) as f64 / bins as f64,
            count: n,
            mean_confidence,
            accuracy,
        });
    }
    Ok(Reliability {
        items,
        bins: out,
        ece,
        mce,
        accuracy: correct.iter().sum::<u64>() as f64 / items as f64,
        mean_confidence: conf_sum.iter().sum::<f64>() / items as f64,
    })
}

/// The acceptance threshold chosen for one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassThreshold {
    /// Accept a prediction of this class when its probability is `>=` this; 1.0 when `always_abstain`.
    pub threshold: f32,
    /// No threshold reaches the target precision with enough accepted items: the class should never be accepted
    /// automatically. Consumers must honour this flag rather than rely on `threshold = 1.0`, because an `f32`
    /// probability can round to exactly 1.
    pub always_abstain: bool,
    /// Labelled validation items whose argmax is this class.
    pub predicted: u64,
    /// Of those, the ones the threshold accepts (0 when `always_abstain`).
    pub accepted: u64,
    /// Validation precision among accepted items; `None` when `always_abstain`.
    pub precision: Option<f64>,
}

impl ClassThreshold {
    /// The smallest of the observed probabilities that, as a threshold on `cells` (probability, right), accepts at
    /// least `min_support` cells (values below 1 count as 1) with precision `>= target_precision`; ties are never
    /// split. `always_abstain` with threshold 1.0 when none does. `predicted` counts all the cells.
    pub fn smallest_reaching(mut cells: Vec<(f32, bool)>, target_precision: f64, min_support: u64) -> Self {
        let need = min_support.max(1);
        cells.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut best: Option<(f32, u64, u64)> = None;
        let (mut accepted, mut right) = (0u64, 0u64);
        for (k, &(p, ok)) in cells.iter().enumerate() {
            accepted += 1;
            right += u64::from(ok);
            // Only at the end of a run of equal probabilities: a threshold cannot split ties.
            let run_ends = cells.get(k + 1).is_none_or(|next| next.0 < p);
            // Divide rather than multiply the target: a correctly rounded k/n equals a target literal that
            // is mathematically k/n (9/10 vs 0.9), whereas 0.9 · 10 need not be exactly 9.
            if run_ends && accepted >= need && right as f64 / accepted as f64 >= target_precision {
                // Scanning downwards, a later hit is a smaller threshold.
                best = Some((p, accepted, right));
            }
        }
        let predicted = cells.len() as u64;
        match best {
            Some((threshold, accepted, right)) => ClassThreshold {
                threshold,
                always_abstain: false,
                predicted,
                accepted,
                precision: Some(right as f64 / accepted as f64),
            },
            None => ClassThreshold { threshold: 1.0, always_abstain: true, predicted, accepted: 0, precision: None },
        }
    }
}

/// Per-class thresholds reaching a target precision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrecisionThresholds {
    pub target_precision: f64,
    pub min_support: u64,
    pub classes: Vec<ClassThreshold>,
}

impl PrecisionThresholds {
    /// The thresholds in class order, as the manifest's `thresholds` wants them.
    pub fn thresholds(&self) -> Vec<f32> {
        self.classes.iter().map(|c| c.threshold).collect()
    }
}

/// For each class `j`, the smallest threshold `t` on the (calibrated) probability `p_j` of items whose argmax is
/// `j` such that, on these validation items, the accepted ones (`p_j >= t`) have precision `>= target_precision`
/// and number at least `min_support` (values below 1 count as 1). Candidate thresholds are the observed
/// probabilities, so the chosen one accepts exactly the items counted here.
///
/// Precision is not monotone in `t`; the smallest qualifying `t` is taken (largest coverage), so a slightly higher
/// threshold may measure below the target on the same data. Classes where no `t` qualifies get threshold 1.0 and
/// `always_abstain`.
pub fn thresholds_for_precision(
    probs: ArrayView2<'_, f32>,
    labels: &[Option<usize>],
    target_precision: f64,
    min_support: u64,
) -> Result<PrecisionThresholds> {
    let classes = check_scores("probabilities", probs, labels.len(), None)?;
    check_labels(labels, classes)?;
    check_range("target precision", target_precision, 0.0, 1.0)?;
    // (probability of the predicted class, whether it is right), grouped by predicted class.
    let mut by_class: Vec<Vec<(f32, bool)>> = vec![Vec::new(); classes];
    for (row, label) in probs.outer_iter().zip(labels) {
        let Some(y) = *label else { continue };
        let best = argmax(row);
        by_class[best].push((row[best], best == y));
    }
    let per_class = by_class
        .into_iter()
        .map(|items| ClassThreshold::smallest_reaching(items, target_precision, min_support))
        .collect();
    Ok(PrecisionThresholds { target_precision, min_support, classes: per_class })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::metrics::abstention_report;
    use ndarray::array;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Standard normal by Box–Muller (rand 0.8 has no normal distribution without `rand_distr`).
    fn normal(rng: &mut StdRng) -> f64 {
        let u1: f64 = 1.0 - rng.r#gen::<f64>();
        let u2: f64 = rng.r#gen();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Index drawn from the categorical distribution `p`.
    fn draw(rng: &mut StdRng, p: &[f64]) -> usize {
        let mut u: f64 = rng.r#gen();
        for (c, &q) in p.iter().enumerate() {
            if u < q {
                return c;
            }
            u -= q;
        }
        p.len() - 1
    }

    fn softmax_row(z: &[f64]) -> Vec<f64> {
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - max).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect()
    }

    /// `n` items with `classes` classes: true logits `z ~ N(0, σ²)` per class, labels drawn from `softmax(z)`, and
    /// the presented logits are `scale · z`, so the correct temperature is exactly `scale`.
    fn over_confident(n: usize, classes: usize, scale: f64, seed: u64) -> (Array2<f32>, Vec<Option<usize>>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut logits = Array2::zeros((n, classes));
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let z: Vec<f64> = (0..classes).map(|_| 1.5 * normal(&mut rng)).collect();
            labels.push(Some(draw(&mut rng, &softmax_row(&z))));
            for (c, v) in z.iter().enumerate() {
                logits[[i, c]] = (scale * v) as f32;
            }
        }
        (logits, labels)
    }

    #[test]
    fn temperature_is_recovered() {
        let (logits, labels) = over_confident(20_000, 5, 3.0, 7);
        let fit = fit_temperature(logits.view(), &labels).expect("fit");
        assert!((fit.temperature - 3.0).abs() < 0.15, "fitted T = {}", fit.temperature);
        assert!(!fit.at_bound);
        // Safeguarded Newton needs about ten objective evaluations (9 with this seed), not dozens.
        assert!(fit.evaluations <= 15, "{} evaluations", fit.evaluations);
        // The fitted T is a minimum: no worse than T = 1 and than its neighbours.
        let at = |t: f64| nll(logits.view(), &labels, t).expect("nll");
        assert!((fit.nll_after - at(fit.temperature)).abs() < 1e-12);
        assert!((fit.nll_before - at(1.0)).abs() < 1e-12);
        assert!(fit.nll_after < fit.nll_before);
        for t in [0.9, 0.99, 1.01, 1.1] {
            assert!(fit.nll_after <= at(fit.temperature * t), "NLL at {t}·T is lower");
        }
    }

    #[test]
    fn temperature_below_one_for_under_confident_logits() {
        let (logits, labels) = over_confident(20_000, 3, 0.5, 8);
        let fit = fit_temperature(logits.view(), &labels).expect("fit");
        assert!((fit.temperature - 0.5).abs() < 0.03, "fitted T = {}", fit.temperature);
    }

    #[test]
    fn temperature_fit_handles_a_hundred_thousand_items() {
        let (logits, labels) = over_confident(100_000, 4, 2.0, 9);
        let start = std::time::Instant::now();
        let fit = fit_temperature(logits.view(), &labels).expect("fit");
        assert!((fit.temperature - 2.0).abs() < 0.05, "fitted T = {}", fit.temperature);
        // Generous even for a debug build on a busy machine; a pathological optimiser would take minutes.
        assert!(start.elapsed().as_secs() < 30, "took {:?}", start.elapsed());
    }

    #[test]
    fn temperature_clamps_at_the_bounds() {
        // Separable data: every label is the argmax with a margin, so NLL keeps falling as T → 0.
        let logits = array![[5.0f32, 0.0], [0.0, 5.0], [4.0, -1.0]];
        let labels = [Some(0), Some(1), Some(0)];
        let fit = fit_temperature(logits.view(), &labels).expect("fit");
        assert!(fit.at_bound);
        assert!((fit.temperature - MIN_TEMPERATURE).abs() < 1e-12);
        // Logits that are exactly wrong on average: the best is as flat as allowed.
        let labels = [Some(1), Some(0), Some(1)];
        let fit = fit_temperature(logits.view(), &labels).expect("fit");
        assert!(fit.at_bound);
        assert!((fit.temperature - MAX_TEMPERATURE).abs() < 1e-9);
    }

    #[test]
    fn nll_by_hand() {
        // Logits [ln 3, 0] → p = [3/4, 1/4]; label 0 → −ln(3/4). At T = 2: p = [√3, 1] / (√3 + 1).
        let logits = array![[3f32.ln(), 0.0]];
        let n1 = nll(logits.view(), &[Some(0)], 1.0).expect("nll");
        assert!((n1 - (4.0f64 / 3.0).ln()).abs() < 1e-6);
        let s3 = 3f64.sqrt();
        let n2 = nll(logits.view(), &[Some(0)], 2.0).expect("nll");
        assert!((n2 - ((s3 + 1.0) / s3).ln()).abs() < 1e-6);
        assert!(matches!(nll(logits.view(), &[Some(0)], 0.0), Err(EvalError::InvalidParameter { .. })));
    }

    #[test]
    fn multi_label_temperature_is_recovered() {
        let mut rng = StdRng::seed_from_u64(11);
        let (n, classes) = (10_000, 3);
        let mut logits = Array2::zeros((n, classes));
        let mut targets = Array2::from_elem((n, classes), None);
        for i in 0..n {
            for c in 0..classes {
                let z = 2.0 * normal(&mut rng);
                let y = rng.r#gen::<f64>() < 1.0 / (1.0 + (-z).exp());
                logits[[i, c]] = (2.5 * z) as f32;
                // Every seventh cell unknown: masked cells must not matter.
                targets[[i, c]] = if (i + c) % 7 == 0 { None } else { Some(y) };
            }
        }
        let fit = fit_temperature_multi_label(logits.view(), targets.view()).expect("fit");
        assert!((fit.temperature - 2.5).abs() < 0.15, "fitted T = {}", fit.temperature);
        let at = |t: f64| binary_nll(logits.view(), targets.view(), t).expect("nll");
        assert!(fit.nll_after <= at(fit.temperature * 1.05) && fit.nll_after <= at(fit.temperature / 1.05));
        assert!(fit.nll_after < at(1.0));
    }

    #[test]
    fn softmax_and_sigmoid_apply_the_temperature() {
        let logits = array![[2f32.ln() * 2.0, 0.0]];
        // T = 2: logits/T = [ln 2, 0] → [2/3, 1/3].
        let p = softmax(logits.view(), 2.0).expect("softmax");
        assert!((p[[0, 0]] - 2.0 / 3.0).abs() < 1e-6 && (p[[0, 1]] - 1.0 / 3.0).abs() < 1e-6);
        // sigmoid(2 ln 2 / 2) = 2/3.
        let s = sigmoid(logits.view(), 2.0).expect("sigmoid");
        assert!((s[[0, 0]] - 2.0 / 3.0).abs() < 1e-6 && (s[[0, 1]] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn reliability_by_hand() {
        // Confidence / correct: 0.55 ✓, 0.65 ✗, 0.9 ✓, 0.95 ✓, 0.85 ✗, 1.0 ✓ (plus a masked item).
        let probs =
            array![[0.55f32, 0.45], [0.65, 0.35], [0.9, 0.1], [0.95, 0.05], [0.85, 0.15], [1.0, 0.0], [0.5, 0.5]];
        let labels = [Some(0), Some(1), Some(0), Some(0), Some(1), Some(0), None];
        let r = reliability(probs.view(), &labels, 5).expect("reliability");
        // Bins of width 0.2: [0.4, 0.6) holds 0.55 (acc 1, gap 0.45); [0.6, 0.8) holds 0.65 (acc 0, gap 0.65);
        // [0.8, 1] holds 0.9, 0.95, 0.85, 1.0 (mean 3.7/4 = 0.925, acc 3/4, gap 0.175).
        // ECE = (0.45 + 0.65 + 4 · 0.175) / 6 = 0.3, MCE = 0.65.
        let counts: Vec<u64> = r.bins.iter().map(|b| b.count).collect();
        assert_eq!(counts, vec![0, 0, 1, 1, 4]);
        assert_eq!(r.bins[0].accuracy, None);
        let last = &r.bins[4];
        assert!((last.mean_confidence.expect("non-empty") - 0.925).abs() < 1e-6);
        assert_eq!(last.accuracy, Some(0.75));
        assert!((r.ece - 0.3).abs() < 1e-6, "ECE {}", r.ece);
        assert!((r.mce - 0.65).abs() < 1e-6, "MCE {}", r.mce);
        assert_eq!(r.items, 6);
        assert!((r.accuracy - 4.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn ece_is_small_when_calibrated_and_large_when_over_confident() {
        let mut rng = StdRng::seed_from_u64(3);
        let n = 20_000;
        let mut calibrated = Array2::zeros((n, 2));
        let mut over = Array2::zeros((n, 2));
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            // The item is right with probability c; the over-confident model claims (1 + c) / 2 instead.
            let c = 0.5 + 0.5 * rng.r#gen::<f64>();
            labels.push(Some(if rng.r#gen::<f64>() < c { 0 } else { 1 }));
            calibrated[[i, 0]] = c as f32;
            calibrated[[i, 1]] = (1.0 - c) as f32;
            over[[i, 0]] = ((1.0 + c) / 2.0) as f32;
            over[[i, 1]] = ((1.0 - c) / 2.0) as f32;
        }
        let good = reliability(calibrated.view(), &labels, 10).expect("reliability");
        assert!(good.ece < 0.02, "calibrated ECE {}", good.ece);
        // Expected gap: E[(1 − c) / 2] for c ~ U(0.5, 1) = 0.125.
        let bad = reliability(over.view(), &labels, 10).expect("reliability");
        assert!((bad.ece - 0.125).abs() < 0.02, "over-confident ECE {}", bad.ece);
    }

    #[test]
    fn temperature_scaling_reduces_ece() {
        let (logits, labels) = over_confident(20_000, 5, 3.0, 5);
        let before = reliability(softmax(logits.view(), 1.0).expect("p").view(), &labels, 15).expect("r");
        let fit = fit_temperature(logits.view(), &labels).expect("fit");
        let after = reliability(softmax(logits.view(), fit.temperature).expect("p").view(), &labels, 15).expect("r");
        assert!(before.ece > 0.1, "ECE before {}", before.ece);
        assert!(after.ece < 0.02, "ECE after {}", after.ece);
    }

    #[test]
    fn thresholds_for_precision_by_hand() {
        // Predicted class 0 with p = 0.95 ✓, 0.9 ✓, 0.8 ✗, 0.7 ✓, 0.6 ✗, 0.55 ✓ (✓ = label 0, ✗ = label 1).
        // Predicted class 1 with p = 0.9 ✓, 0.6 ✓. Class 2 never predicted.
        let probs = array![
            [0.95f32, 0.05, 0.0],
            [0.9, 0.1, 0.0],
            [0.8, 0.2, 0.0],
            [0.7, 0.3, 0.0],
            [0.6, 0.4, 0.0],
            [0.55, 0.45, 0.0],
            [0.1, 0.9, 0.0],
            [0.4, 0.6, 0.0],
            [0.05, 0.95, 0.0], // masked
        ];
        let labels = [Some(0), Some(0), Some(1), Some(0), Some(1), Some(0), Some(1), Some(1), None];
        // Class 0, accepting p ≥ t: t = 0.55 → 4/6; 0.6 → 3/5; 0.7 → 3/4 = 0.75; 0.8 → 2/3; 0.9 → 2/2.
        // Target 0.75 with min support 2: the smallest qualifying t is 0.7 (even though 0.8 falls below again).
        let r = thresholds_for_precision(probs.view(), &labels, 0.75, 2).expect("thresholds");
        let c0 = &r.classes[0];
        assert_eq!((c0.threshold, c0.always_abstain, c0.predicted, c0.accepted), (0.7, false, 6, 4));
        assert_eq!(c0.precision, Some(0.75));
        // Class 1 is always right: the smallest observed probability, 0.6, already qualifies.
        assert_eq!((r.classes[1].threshold, r.classes[1].accepted), (0.6, 2));
        assert!(r.classes[2].always_abstain && r.classes[2].threshold == 1.0);
        assert_eq!(r.thresholds(), vec![0.7, 0.6, 1.0]);

        // Min support 5: only t ≤ 0.6 accept 5 items, and those reach 3/5 at best → class 0 always abstains.
        let r = thresholds_for_precision(probs.view(), &labels, 0.75, 5).expect("thresholds");
        assert!(r.classes[0].always_abstain);
        assert_eq!(r.classes[0].threshold, 1.0);
        // Target 1.0 with min support 2: t = 0.9 (2/2).
        let r = thresholds_for_precision(probs.view(), &labels, 1.0, 2).expect("thresholds");
        assert_eq!(r.classes[0].threshold, 0.9);

        // The thresholds do what they promise when applied the daemon's way.
        let r = thresholds_for_precision(probs.view(), &labels, 0.75, 2).expect("thresholds");
        let a = abstention_report(probs.view(), &labels, &r.thresholds()).expect("abstention");
        assert_eq!(a.per_class[0].precision, Some(0.75));
        assert_eq!(a.per_class[0].accepted, 4);
        assert!(matches!(
            thresholds_for_precision(probs.view(), &labels, 1.5, 2),
            Err(EvalError::InvalidParameter { .. })
        ));
    }

    #[test]
    fn thresholds_do_not_split_ties() {
        // Three items at p = 0.8 (two right) and one at 0.9 (right). Target 0.8, min support 1:
        // t = 0.8 accepts all four (3/4 < 0.8) and cannot accept only part of the tie, so t = 0.9.
        let probs = array![[0.9f32, 0.1], [0.8, 0.2], [0.8, 0.2], [0.8, 0.2]];
        let labels = [Some(0), Some(0), Some(1), Some(0)];
        let r = thresholds_for_precision(probs.view(), &labels, 0.8, 1).expect("thresholds");
        assert_eq!((r.classes[0].threshold, r.classes[0].accepted), (0.9, 1));
    }
}
