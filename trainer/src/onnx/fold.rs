//! Folding inference-mode batch norm into the preceding (bias-free) convolution.

use super::OnnxError;
use crate::weights::Tensor;

/// The batch-norm parameters of one layer, by reference.
#[derive(Debug, Clone, Copy)]
pub struct BatchNorm<'a> {
    /// γ, `[C]`
    pub weight: &'a Tensor,
    /// β, `[C]`
    pub bias: &'a Tensor,
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
    pub eps: f32,
}

/// Folds `bn` into a convolution weight whose first dimension is the output channel (`[C, ...]`): returns
/// `(W', b')` with `W'[c] = W[c]·s[c]` and `b'[c] = β[c] − mean[c]·s[c]`, where `s[c] = γ[c]/√(var[c]+eps)`.
///
/// Arithmetic is done in f64 and rounded once to f32, so the folded layer is as close to the unfolded f32 pair as
/// f32 storage allows. `name` (e.g. `blocks.3.dw`) only labels errors.
pub fn fold_bn(name: &str, conv_weight: &Tensor, bn: BatchNorm<'_>) -> Result<(Tensor, Tensor), OnnxError> {
    let channels = conv_weight.shape.first().copied().unwrap_or(0);
    if channels == 0 || conv_weight.numel() != conv_weight.shape.iter().product::<usize>() {
        return Err(OnnxError::FoldShape {
            name: name.into(),
            detail: format!("weight shape {:?}", conv_weight.shape),
        });
    }
    for (what, t) in
        [("weight", bn.weight), ("bias", bn.bias), ("running_mean", bn.running_mean), ("running_var", bn.running_var)]
    {
        if t.shape != [channels] || t.data.len() != channels {
            return Err(OnnxError::FoldShape {
                name: name.into(),
                detail: format!("bn.{what} has shape {:?}, conv has {channels} output channels", t.shape),
            });
        }
    }
    let per_channel = conv_weight.numel() / channels;
    let eps = f64::from(bn.eps);
    let mut weight = Vec::with_capacity(conv_weight.numel());
    let mut bias = Vec::with_capacity(channels);
    for c in 0..channels {
        let denom = f64::from(bn.running_var.data[c]) + eps;
        // A non-positive denominator would make the scale NaN/∞ and silently poison every downstream value.
        if denom.is_nan() || denom <= 0.0 {
            return Err(OnnxError::NonPositiveVariance { name: name.into(), channel: c });
        }
        let scale = f64::from(bn.weight.data[c]) / denom.sqrt();
        weight.extend(
            conv_weight.data[c * per_channel..(c + 1) * per_channel].iter().map(|&w| (f64::from(w) * scale) as f32),
        );
        bias.push((f64::from(bn.bias.data[c]) - f64::from(bn.running_mean.data[c]) * scale) as f32);
    }
    let weight = Tensor::new(conv_weight.shape.clone(), weight);
    let bias = Tensor::new(vec![channels], bias);
    if !weight.data.iter().chain(&bias.data).all(|v| v.is_finite()) {
        return Err(OnnxError::NonFinite { name: format!("{name} (folded)") });
    }
    Ok((weight, bias))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], data: &[f32]) -> Tensor {
        Tensor::new(shape.to_vec(), data.to_vec())
    }

    #[test]
    fn folds_per_output_channel() {
        let w = t(&[2, 1, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
        let (g, b, m, v) = (t(&[2], &[2.0, 0.5]), t(&[2], &[0.1, -0.2]), t(&[2], &[1.0, -1.0]), t(&[2], &[3.0, 0.0]));
        let bn = BatchNorm { weight: &g, bias: &b, running_mean: &m, running_var: &v, eps: 1.0 };
        let (fw, fb) = fold_bn("x", &w, bn).expect("folds");
        // s = [2/√4, 0.5/√1] = [1, 0.5]
        assert_eq!(fw.shape, vec![2, 1, 1, 2]);
        assert_eq!(fw.data, vec![1.0, 2.0, 1.5, 2.0]);
        assert_eq!(fb.data, vec![0.1 - 1.0, -0.2 + 0.5]);
    }

    #[test]
    fn folded_conv_equals_conv_then_bn() {
        // y = BN(w·x) for a 1×1 conv on a single pixel, vs w'·x + b'.
        let w = t(&[3, 2, 1, 1], &[0.3, -1.2, 2.5, 0.7, -0.4, 0.05]);
        let (g, b) = (t(&[3], &[1.3, 0.2, -0.7]), t(&[3], &[0.01, -0.5, 0.9]));
        let (m, v) = (t(&[3], &[0.2, -0.3, 1.1]), t(&[3], &[0.04, 2.0, 0.9]));
        let eps = 1e-3;
        let (fw, fb) = fold_bn("x", &w, BatchNorm { weight: &g, bias: &b, running_mean: &m, running_var: &v, eps })
            .expect("folds");
        let x = [0.7f64, -1.9];
        for c in 0..3 {
            let z = f64::from(w.data[2 * c]) * x[0] + f64::from(w.data[2 * c + 1]) * x[1];
            let bn = (z - f64::from(m.data[c])) / (f64::from(v.data[c]) + f64::from(eps)).sqrt() * f64::from(g.data[c])
                + f64::from(b.data[c]);
            let folded =
                f64::from(fw.data[2 * c]) * x[0] + f64::from(fw.data[2 * c + 1]) * x[1] + f64::from(fb.data[c]);
            assert!((bn - folded).abs() < 1e-5, "channel {c}: {bn} vs {folded}");
        }
    }

    #[test]
    fn rejects_bad_shapes_and_variance() {
        let w = t(&[2, 1, 1, 1], &[1.0, 1.0]);
        let ok = t(&[2], &[1.0, 1.0]);
        let short = t(&[1], &[1.0]);
        let err =
            fold_bn("l", &w, BatchNorm { weight: &short, bias: &ok, running_mean: &ok, running_var: &ok, eps: 0.0 })
                .unwrap_err();
        assert!(matches!(err, OnnxError::FoldShape { .. }), "{err}");
        let neg = t(&[2], &[1.0, -1.0]);
        let err =
            fold_bn("l", &w, BatchNorm { weight: &ok, bias: &ok, running_mean: &ok, running_var: &neg, eps: 1e-3 })
                .unwrap_err();
        assert!(matches!(err, OnnxError::NonPositiveVariance { channel: 1, .. }), "{err}");
    }
}
