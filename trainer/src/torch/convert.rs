//! Copying canonical weights into and out of a `VarStore` built by [`super::EffNet::new`] on `vs.root()`.

use super::{TchContext, TorchError};
use crate::effnet::{Arch, FEATURE_DIM, Padding};
use crate::weights::{Backbone, LinearHead, Provenance, Tensor as Canon};
use std::collections::{BTreeMap, HashMap, HashSet};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Prefix of head variables; everything else in the store must be a backbone tensor.
const HEADS_PREFIX: &str = "heads.";

/// Copies every backbone tensor of `backbone` into the store (without recording gradients), converting to the
/// store's device and dtype. Everything is validated before anything is written, so on error the store is unchanged.
///
/// Errors on a tensor missing from either side, any shape mismatch, backbone tensors that are not part of the
/// architecture, and store variables that are neither backbone tensors nor `heads.*` (which catches a model built
/// for the other architecture). An ImageNet `classifier.*` in the backbone is ignored; see [`classifier_as_head`].
///
/// Padding and batch-norm epsilon are not stored in variables: build the model with `backbone.padding` and
/// `backbone.bn_eps`, or the loaded weights compute something else.
pub fn load_backbone(vs: &mut VarStore, backbone: &Backbone) -> Result<(), TorchError> {
    let arch = backbone.arch;
    let expected = arch.backbone_tensors();
    let expected_names: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let vars = vs.variables();
    if let Some(name) = vars.keys().find(|n| !n.starts_with(HEADS_PREFIX) && !expected_names.contains(n.as_str())) {
        return Err(TorchError::UnexpectedVariable { name: name.clone(), arch });
    }
    if let Some(name) =
        backbone.tensors.keys().find(|n| !n.starts_with("classifier.") && !expected_names.contains(n.as_str()))
    {
        return Err(TorchError::UnexpectedTensor { name: name.clone(), arch });
    }
    let mut pairs = Vec::with_capacity(expected.len());
    for (name, shape) in &expected {
        let src = canonical(&backbone.tensors, name, shape, "backbone")?;
        let dst = variable(&vars, name, shape)?;
        pairs.push((name, src, dst));
    }
    tch::no_grad(|| {
        pairs.into_iter().try_for_each(|(name, src, dst)| copy_into(dst, src).ctx(|| format!("loading {name}")))
    })
}

/// Copies attribute heads (e.g. from a previous run, or [`classifier_as_head`]) into `heads.{name}.*`, with the same
/// validate-then-write behaviour as [`load_backbone`].
pub fn load_heads(vs: &mut VarStore, heads: &[LinearHead]) -> Result<(), TorchError> {
    let vars = vs.variables();
    let mut pairs = Vec::with_capacity(2 * heads.len());
    for h in heads {
        let classes = h.bias.shape.first().copied().unwrap_or(0);
        let (wn, bn) = head_names(&h.name);
        for (name, t, shape) in [(wn, &h.weight, vec![classes, FEATURE_DIM]), (bn, &h.bias, vec![classes])] {
            check_canonical(&name, t, &shape, "head")?;
            let dst = variable(&vars, &name, &shape)?;
            pairs.push((name, t, dst));
        }
    }
    tch::no_grad(|| {
        pairs.into_iter().try_for_each(|(name, src, dst)| copy_into(dst, src).ctx(|| format!("loading {name}")))
    })
}

/// Reads the backbone back out of the store (e.g. to ONNX-export a fine-tuned model) as f32 on the CPU.
/// `padding` and `bn_eps` are recorded as given: they are properties of the model, not of any variable. The
/// provenance is left empty for the caller, who knows where the weights started and how they were trained.
pub fn export_backbone(vs: &VarStore, arch: Arch, padding: Padding, bn_eps: f32) -> Result<Backbone, TorchError> {
    let vars = vs.variables();
    let tensors = arch
        .backbone_tensors()
        .into_iter()
        .map(|(name, shape)| {
            let t = to_canonical(variable(&vars, &name, &shape)?, &shape).ctx(|| format!("exporting {name}"))?;
            Ok((name, t))
        })
        .collect::<Result<BTreeMap<_, _>, TorchError>>()?;
    Ok(Backbone { arch, padding, bn_eps, tensors, provenance: Provenance::default() })
}

/// Reads the given heads (`(name, classes)` as passed to [`super::EffNet::new`]) back out of the store.
pub fn export_heads(vs: &VarStore, heads: &[(String, usize)]) -> Result<Vec<LinearHead>, TorchError> {
    let vars = vs.variables();
    heads
        .iter()
        .map(|(name, classes)| {
            let (wn, bn) = head_names(name);
            let (ws, bs) = (vec![*classes, FEATURE_DIM], vec![*classes]);
            let weight = to_canonical(variable(&vars, &wn, &ws)?, &ws).ctx(|| format!("exporting {wn}"))?;
            let bias = to_canonical(variable(&vars, &bn, &bs)?, &bs).ctx(|| format!("exporting {bn}"))?;
            Ok(LinearHead { name: name.clone(), weight, bias })
        })
        .collect()
}

/// The backbone's ImageNet-style `classifier.{weight,bias}` as a head called `name` (to load with [`load_heads`]
/// into a model built with a `(name, classes)` head), or `None` if the backbone has no classifier.
pub fn classifier_as_head(backbone: &Backbone, name: &str) -> Result<Option<LinearHead>, TorchError> {
    let (w, b) = (backbone.tensors.get("classifier.weight"), backbone.tensors.get("classifier.bias"));
    if w.is_none() && b.is_none() {
        return Ok(None);
    }
    let missing = |n: &str| TorchError::Missing { name: n.into(), from: "backbone" };
    let weight = w.ok_or_else(|| missing("classifier.weight"))?;
    let bias = b.ok_or_else(|| missing("classifier.bias"))?;
    let classes = bias.shape.first().copied().unwrap_or(0);
    check_canonical("classifier.weight", weight, &[classes, FEATURE_DIM], "backbone")?;
    check_canonical("classifier.bias", bias, &[classes], "backbone")?;
    Ok(Some(LinearHead { name: name.to_owned(), weight: weight.clone(), bias: bias.clone() }))
}

fn head_names(name: &str) -> (String, String) {
    (format!("{HEADS_PREFIX}{name}.weight"), format!("{HEADS_PREFIX}{name}.bias"))
}

fn canonical<'a>(
    tensors: &'a BTreeMap<String, Canon>,
    name: &str,
    shape: &[usize],
    from: &'static str,
) -> Result<&'a Canon, TorchError> {
    let t = tensors.get(name).ok_or_else(|| TorchError::Missing { name: name.into(), from })?;
    check_canonical(name, t, shape, from)?;
    Ok(t)
}

fn check_canonical(name: &str, t: &Canon, shape: &[usize], from: &'static str) -> Result<(), TorchError> {
    if t.shape != shape {
        return Err(TorchError::Shape { name: name.into(), from, got: t.shape.clone(), expected: shape.to_vec() });
    }
    let expected = shape.iter().product::<usize>();
    if t.data.len() != expected {
        return Err(TorchError::DataLength { name: name.into(), shape: t.shape.clone(), len: t.data.len(), expected });
    }
    Ok(())
}

fn variable<'a>(vars: &'a HashMap<String, Tensor>, name: &str, shape: &[usize]) -> Result<&'a Tensor, TorchError> {
    let v = vars.get(name).ok_or_else(|| TorchError::Missing { name: name.into(), from: "var store" })?;
    let got = v.size();
    if !got.iter().map(|&d| usize::try_from(d).ok()).eq(shape.iter().map(|&d| Some(d))) {
        let got = got.iter().map(|&d| d.max(0) as usize).collect();
        return Err(TorchError::Shape { name: name.into(), from: "var store", got, expected: shape.to_vec() });
    }
    Ok(v)
}

/// Caller holds `no_grad`: the destination is a leaf that may require grad, which in-place writes otherwise reject.
fn copy_into(dst: &Tensor, src: &Canon) -> Result<(), tch::TchError> {
    let shape: Vec<i64> = src.shape.iter().map(|&d| d as i64).collect();
    let src = Tensor::f_from_slice(&src.data)?.f_reshape(&shape)?;
    // A shallow clone shares storage with the store's variable, so this writes the variable itself.
    dst.shallow_clone().f_copy_(&src)
}

fn to_canonical(v: &Tensor, shape: &[usize]) -> Result<Canon, tch::TchError> {
    let flat = v.f_detach()?.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?.f_reshape([-1])?;
    Ok(Canon::new(shape.to_vec(), Vec::<f32>::try_from(&flat)?))
}
