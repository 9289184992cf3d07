//! Grad-CAM (Selvaraju et al., 2017) on the last convolution: where in the picture the evidence for a class was.

use super::{EffNet, TchContext, TorchError};
use attrd::preprocess::InputSpec;
use image::RgbImage;
use ndarray::Array2;
use tch::{Kind, Tensor};

/// Heat maps in `[0, 1]`, one `[h, w]` map per image at the last convolution's resolution, for class
/// `classes[i]` of head `head`. The model runs in evaluation mode; gradients flow to the activation only.
pub fn grad_cam(model: &EffNet, xs: &Tensor, head: usize, classes: &[i64]) -> Result<Vec<Array2<f32>>, TorchError> {
    let lc = model.f_last_conv_t(xs, false)?;
    let logits =
        lc.logits.get(head).ok_or_else(|| TorchError::Missing { name: format!("head {head}"), from: "model" })?;
    let idx = Tensor::from_slice(classes).view([-1, 1]).to_device(logits.device());
    let score = logits.f_gather(1, &idx, false).ctx(|| "selecting the explained classes".into())?.sum(Kind::Float);
    let grads = Tensor::f_run_backward(&[&score], &[&lc.activation], false, false)
        .ctx(|| "back-propagating to the last convolution".into())?;
    let weights = grads[0].mean_dim([2i64, 3].as_slice(), true, Kind::Float);
    let cam = (weights * &lc.activation).sum_dim_intlist([1i64].as_slice(), false, Kind::Float).relu();
    let cam = cam.to_device(tch::Device::Cpu).contiguous();
    let size = cam.size();
    let (n, h, w) = (size[0] as usize, size[1] as usize, size[2] as usize);
    let flat: Vec<f32> = Vec::<f32>::try_from(cam.view([-1])).ctx(|| "reading the heat maps".into())?;
    Ok((0..n)
        .map(|i| {
            let mut m = Array2::from_shape_vec((h, w), flat[i * h * w..(i + 1) * h * w].to_vec())
                .unwrap_or_else(|_| Array2::zeros((h, w)));
            let max = m.iter().copied().fold(0f32, f32::max);
            if max > 0.0 {
                m.mapv_inplace(|v| v / max);
            }
            m
        })
        .collect())
}

/// The network's view of one preprocessed image (NCHW values of `spec`) as RGB, with `cam` blended over it as a
/// blue-to-red heat map (bilinear upsampling), so the overlay shows exactly the pixels the model saw.
pub fn overlay(tensor: &[f32], spec: &InputSpec, cam: &Array2<f32>, alpha: f32) -> RgbImage {
    let (w, h) = (spec.width as usize, spec.height as usize);
    let (ch, cw) = cam.dim();
    RgbImage::from_fn(spec.width, spec.height, |x, y| {
        let (x, y) = (x as usize, y as usize);
        let px = |c: usize| {
            let v = tensor[c * w * h + y * w + x] * spec.std[c] + spec.mean[c];
            (v * 255.0).clamp(0.0, 255.0)
        };
        // Sample the coarse map at this pixel's centre.
        let fy = ((y as f32 + 0.5) * ch as f32 / h as f32 - 0.5).clamp(0.0, (ch - 1) as f32);
        let fx = ((x as f32 + 0.5) * cw as f32 / w as f32 - 0.5).clamp(0.0, (cw - 1) as f32);
        let (y0, x0) = (fy.floor() as usize, fx.floor() as usize);
        let (y1, x1) = ((y0 + 1).min(ch - 1), (x0 + 1).min(cw - 1));
        let (ty, tx) = (fy - y0 as f32, fx - x0 as f32);
        let v = cam[[y0, x0]] * (1.0 - ty) * (1.0 - tx)
            + cam[[y0, x1]] * (1.0 - ty) * tx
            + cam[[y1, x0]] * ty * (1.0 - tx)
            + cam[[y1, x1]] * ty * tx;
        let heat = heat_colour(v);
        let a = alpha * v.sqrt();
        image::Rgb([0, 1, 2].map(|c| (px(c) * (1.0 - a) + heat[c] * a).round() as u8))
    })
}

/// Blue (cold) through green to red (hot).
fn heat_colour(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    let r = (1.5 - (4.0 * v - 3.0).abs()).clamp(0.0, 1.0);
    let g = (1.5 - (4.0 * v - 2.0).abs()).clamp(0.0, 1.0);
    let b = (1.5 - (4.0 * v - 1.0).abs()).clamp(0.0, 1.0);
    [r * 255.0, g * 255.0, b * 255.0]
}
