//! Logits → attributes: temperature, softmax/sigmoid, top-k, per-class thresholds, category conditions.
//!
//! Pure functions over the manifest's heads, so that `attrd infer`, the daemon, the golden-set self-test and the
//! trainer's evaluation all read a model's outputs the same way.

use crate::bundle::{Head, HeadKind, Manifest};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One class and its probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub value: String,
    pub confidence: f32,
}

/// Whether a head's answer should be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The top class reached its threshold.
    Accepted,
    /// The model is not sure enough; a person or a rule should decide.
    Abstain,
    /// The attribute does not apply to this item's category (e.g. sleeve length of a watch).
    NotApplicable,
}

/// One attribute of one image, as published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attribute {
    /// Most probable class; `null` when not applicable.
    pub value: Option<String>,
    /// Probability of `value` (after temperature scaling).
    pub confidence: f32,
    /// `value` reached its class threshold (and the attribute applies).
    pub accepted: bool,
    pub decision: Decision,
    /// Multi-label heads: every class over its threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    /// The `top_k` most probable classes, best first.
    pub topk: Vec<Scored>,
}

/// Attribute name → result, in a stable (sorted) order for JSON.
pub type Attributes = BTreeMap<String, Attribute>;

/// Probabilities of one head for one image, after temperature scaling.
pub fn probabilities(head: &Head, logits: &[f32]) -> Vec<f32> {
    let t = head.temperature;
    match head.kind {
        HeadKind::Single => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = logits.iter().map(|&l| ((l - max) / t).exp()).collect();
            let sum: f32 = exps.iter().sum();
            exps.into_iter().map(|e| e / sum).collect()
        }
        HeadKind::Multi => logits.iter().map(|&l| 1.0 / (1.0 + (-l / t).exp())).collect(),
    }
}

/// Indices of the `k` largest values, largest first; ties keep class order so results are deterministic.
pub fn top_k_indices(p: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Turns one image's probabilities (head name → class probabilities, in manifest head order) into attributes.
/// `probs[i]` belongs to `manifest.heads[i]`.
pub fn attributes(manifest: &Manifest, probs: &[Vec<f32>]) -> Attributes {
    debug_assert_eq!(probs.len(), manifest.heads.len());
    let mut out = Attributes::new();
    // Unconditional heads first, so a conditional head can look at the value of the head it depends on.
    let mut order: Vec<usize> = (0..manifest.heads.len()).collect();
    order.sort_by_key(|&i| manifest.heads[i].applies_to.is_some());
    for i in order {
        let head = &manifest.heads[i];
        let p = &probs[i];
        let topk: Vec<Scored> = top_k_indices(p, head.top_k)
            .into_iter()
            .map(|c| Scored { value: head.classes[c].clone(), confidence: p[c] })
            .collect();
        let applies = match &head.applies_to {
            None => true,
            Some(cond) => out
                .get(&cond.attribute)
                .and_then(|parent| parent.value.as_ref())
                .is_some_and(|v| cond.values.contains(v)),
        };
        let best = top_k_indices(p, 1)[0];
        let attr = if !applies {
            Attribute {
                value: None,
                confidence: 0.0,
                accepted: false,
                decision: Decision::NotApplicable,
                values: None,
                topk,
            }
        } else {
            let accepted = p[best] >= head.thresholds[best];
            let values = match head.kind {
                HeadKind::Single => None,
                HeadKind::Multi => Some(
                    top_k_indices(p, p.len())
                        .into_iter()
                        .filter(|&c| p[c] >= head.thresholds[c])
                        .map(|c| head.classes[c].clone())
                        .collect(),
                ),
            };
            Attribute {
                value: Some(head.classes[best].clone()),
                confidence: p[best],
                accepted,
                decision: if accepted { Decision::Accepted } else { Decision::Abstain },
                values,
                topk,
            }
        };
        out.insert(head.name.clone(), attr);
    }
    out
}

/// Element-wise mean of several views' probabilities (multi-view fusion of one SKU).
pub fn mean_probabilities(views: &[Vec<Vec<f32>>]) -> Option<Vec<Vec<f32>>> {
    let first = views.first()?;
    let mut acc: Vec<Vec<f32>> = first.iter().map(|h| vec![0.0; h.len()]).collect();
    for v in views {
        for (a, h) in acc.iter_mut().zip(v) {
            for (x, y) in a.iter_mut().zip(h) {
                *x += *y;
            }
        }
    }
    let n = views.len() as f32;
    acc.iter_mut().flatten().for_each(|x| *x /= n);
    Some(acc)
}
