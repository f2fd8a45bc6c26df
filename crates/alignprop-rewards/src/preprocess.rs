//! AlignProp's differentiable image preprocessing for CLIP-based rewards:
//! `x / 2 + 0.5` clamped to `[0, 1]`, bilinear resize of the shorter side (no centre crop, no antialiasing, as the
//! AlignProp reference's torchvision pin did), then CLIP's per-channel normalisation.
//!
//! [`clip_preprocess_center_crop`] adds the centre crop of CLIP's own image processors (torchvision `CenterCrop`)
//! after the resize, so non-square images reach a square ViT input. For square images (what AlignProp trains on)
//! the crop is the identity and both functions give the same tensor.

use burn::tensor::backend::Backend;
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

/// The `[out, len]` matrix of 1-D linear interpolation as torch's bilinear `interpolate` computes it
/// (`align_corners = False`, no antialiasing): output `o` reads source position `(o + 0.5) * len / out - 0.5`,
/// clamped below at 0, from its two neighbours with weights `1 - frac` and `frac` (the right neighbour clamped at
/// the edge). Each row sums to 1.
pub fn linear_interpolation_matrix(len: usize, out: usize) -> Vec<f64> {
    let mut m = vec![0.0; out * len];
    let scale = len as f64 / out as f64;
    for o in 0..out {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src as usize).min(len - 1);
        let i1 = (i0 + 1).min(len - 1);
        let frac = src - i0 as f64;
        m[o * len + i0] += 1.0 - frac;
        m[o * len + i1] += frac;
    }
    m
}

/// Bilinear resize to `[out_h, out_w]` with half-pixel centres (`align_corners = False`, no antialiasing), as
/// torch's `F.interpolate(mode="bilinear")`, differentiable on every backend.
///
/// `images`: `[batch, channels, h, w]` -> `[batch, channels, out_h, out_w]`. Computed as two matrix products with the
/// interpolation matrices ([`linear_interpolation_matrix`]): `R_h x R_wᵀ` per image and channel, so the gradient is
/// the transposed products, which every backend differentiates (the cube backends have no backward for burn's
/// bilinear `interpolate`).
pub fn resize_bilinear<B: Backend>(images: Tensor<B, 4>, size: [usize; 2]) -> Tensor<B, 4> {
    let [b, c, h, w] = images.dims();
    let [out_h, out_w] = size;
    if [h, w] == size {
        return images;
    }
    let (device, dtype) = (images.device(), images.dtype());
    let tensor = |values: Vec<f64>, shape: [usize; 2]| {
        Tensor::<B, 2>::from_data(TensorData::new(values, shape), (&device, dtype))
    };
    // Along the width: `[b * c * h, w] x [w, out_w]`, the right operand stored contiguous (not a transposed view).
    let x = images.reshape([b * c * h, w]);
    let x = if out_w == w {
        x
    } else {
        let r = linear_interpolation_matrix(w, out_w);
        let rt: Vec<f64> = (0..w * out_w)
            .map(|k| r[(k % out_w) * w + k / out_w])
            .collect();
        x.matmul(tensor(rt, [w, out_w]))
    };
    // Along the height: `[out_h, h] x [h, out_w]` for each of the `b * c` planes.
    let x = x.reshape([b * c, h, out_w]);
    let x = if out_h == h {
        x
    } else {
        let r = tensor(linear_interpolation_matrix(h, out_h), [out_h, h]);
        r.unsqueeze::<3>().expand([b * c, out_h, h]).matmul(x)
    };
    x.reshape([b, c, out_h, out_w])
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

    type A = Autodiff<Flex>;

    fn max_abs<const D: usize>(a: Tensor<A, D>, b: Tensor<A, D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// The matrix form equals burn's bilinear `interpolate` (which matches torch's on the CPU backend), in value
    /// and in the gradient of a weighted sum, downsampling and upsampling, square and not.
    #[test]
    fn resize_matches_bilinear_interpolate_in_value_and_gradient() {
        let device = Default::default();
        for ([h, w], size) in [
            ([7, 5], [3, 4]),
            ([5, 6], [11, 13]),
            ([64, 48], [24, 24]),
            ([9, 9], [9, 4]),
            ([2, 3], [1, 1]),
        ] {
            let x = Tensor::<A, 4>::random([2, 3, h, w], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            let g =
                Tensor::<A, 4>::random([2, 3, size[0], size[1]], Distribution::Default, &device);
            let ours = resize_bilinear(x.clone(), size);
            let options = InterpolateOptions {
                mode: InterpolateMode::Bilinear,
                align_corners: false,
            };
            let theirs = interpolate(x.clone(), size, options);
            assert!(
                max_abs(ours.clone(), theirs.clone()) < 1e-5,
                "{h}x{w} -> {size:?} values"
            );
            let gx_ours = x.grad(&(ours * g.clone()).sum().backward()).unwrap();
            let gx_theirs = x.grad(&(theirs * g).sum().backward()).unwrap();
            let d = (gx_ours - gx_theirs).abs().max().into_scalar();
            assert!(d < 1e-5, "{h}x{w} -> {size:?} gradient off by {d}");
        }
    }

    #[test]
    fn interpolation_rows_sum_to_one_and_identity_at_the_same_size() {
        for (len, out) in [(7, 3), (3, 7), (224, 512), (5, 5)] {
            let m = linear_interpolation_matrix(len, out);
            for o in 0..out {
                let s: f64 = m[o * len..(o + 1) * len].iter().sum();
                assert!((s - 1.0).abs() < 1e-12);
            }
            if len == out {
                for o in 0..out {
                    assert_eq!(m[o * len + o], 1.0);
                }
            }
        }
    }
}
