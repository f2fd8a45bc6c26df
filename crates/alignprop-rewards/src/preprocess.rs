//! AlignProp's differentiable image preprocessing for CLIP-based rewards:
//! `x / 2 + 0.5` clamped to `[0, 1]`, bilinear resize of the shorter side (no centre crop, no antialiasing, as the
//! AlignProp reference's torchvision pin did), then CLIP's per-channel normalisation.
//!
//! [`clip_preprocess_center_crop`] adds the centre crop of CLIP's own image processors (torchvision `CenterCrop`)
//! after the resize, so non-square images reach a square ViT input. For square images (what AlignProp trains on)
//! the crop is the identity and both functions give the same tensor.

use burn::tensor::backend::Backend;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Tensor, TensorData};

/// OpenAI CLIP's image mean.
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's image standard deviation.
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Decoder output in `[-1, 1]` to `[0, 1]`: `clamp(x / 2 + 0.5, 0, 1)`.
pub fn to_unit_range<B: Backend>(images: Tensor<B, 4>) -> Tensor<B, 4> {
    (images / 2.0 + 0.5).clamp(0.0, 1.0)
}

/// The size torchvision's `Resize(size)` gives an `h x w` image: the shorter side becomes `size`, the longer
/// `int(size * long / short)`.
pub fn shorter_side_size(h: usize, w: usize, size: usize) -> [usize; 2] {
    if h <= w {
        [size, size * w / h]
    } else {
        [size * h / w, size]
    }
}

/// Bilinear resize to `[out_h, out_w]` with half-pixel centres (`align_corners = False`), differentiable.
/// `images`: `[batch, channels, h, w]`.
pub fn resize_bilinear<B: Backend>(images: Tensor<B, 4>, size: [usize; 2]) -> Tensor<B, 4> {
    let [_, _, h, w] = images.dims();
    if [h, w] == size {
        return images;
    }
    let options = InterpolateOptions {
        mode: InterpolateMode::Bilinear,
        align_corners: false,
    };
    interpolate(images, size, options)
}

/// `(x - mean[c]) / std[c]` for `[batch, 3, h, w]`.
pub fn normalize<B: Backend>(images: Tensor<B, 4>, mean: [f64; 3], std: [f64; 3]) -> Tensor<B, 4> {
    let (device, dtype) = (images.device(), images.dtype());
    let dims = images.dims();
    let [b, c, h, w] = dims;
    // `x * (1 / std) + (-mean / std)` with one scalar per (image, channel) row of a `[b * c, h * w]` view: the
    // broadcast burn's CPU backend does fast (a `[1, 3, 1, 1]` operand takes a slow generic path).
    let rows = |f: &dyn Fn(usize) -> f64| {
        let v: Vec<f64> = (0..b * c).map(|i| f(i % c)).collect();
        Tensor::<B, 2>::from_data(TensorData::new(v, [b * c, 1]), (&device, dtype))
    };
    let scale = rows(&|ch| 1.0 / std[ch]);
    let shift = rows(&|ch| -mean[ch] / std[ch]);
    (images.reshape([b * c, h * w]) * scale + shift).reshape(dims)
}

/// The whole preprocessing: decoder output `[batch, 3, H, W]` in `[-1, 1]` to CLIP input with the shorter side
/// resized to `size`.
pub fn clip_preprocess<B: Backend>(
    images: Tensor<B, 4>,
    size: usize,
    mean: [f64; 3],
    std: [f64; 3],
) -> Tensor<B, 4> {
    let [_, _, h, w] = images.dims();
    let x = resize_bilinear(to_unit_range(images), shorter_side_size(h, w, size));
    normalize(x, mean, std)
}

/// torchvision's `CenterCrop(size)` of `[batch, channels, h, w]` with `h, w >= size`: rows from
/// `round((h - size) / 2)` (round half to even, as Python's `round`), likewise columns. Differentiable (a slice).
pub fn center_crop<B: Backend>(images: Tensor<B, 4>, size: usize) -> Tensor<B, 4> {
    let [_, _, h, w] = images.dims();
    assert!(
        h >= size && w >= size,
        "centre crop to {size}x{size} of a smaller {h}x{w} image"
    );
    if [h, w] == [size, size] {
        return images;
    }
    let start = |n: usize| ((n - size) as f64 / 2.0).round_ties_even() as usize;
    let (top, left) = (start(h), start(w));
    images.narrow(2, top, size).narrow(3, left, size)
}

/// [`clip_preprocess`] then a centre crop to `size x size`: decoder output `[batch, 3, H, W]` in `[-1, 1]` to
/// `[batch, 3, size, size]`, as CLIP's image processors (resize the shorter side, centre crop) but with AlignProp's
/// differentiable bilinear resize.
pub fn clip_preprocess_center_crop<B: Backend>(
    images: Tensor<B, 4>,
    size: usize,
    mean: [f64; 3],
    std: [f64; 3],
) -> Tensor<B, 4> {
    center_crop(clip_preprocess(images, size, mean, std), size)
}
