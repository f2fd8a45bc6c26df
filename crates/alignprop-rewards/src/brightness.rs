//! Mean brightness: the simplest differentiable image reward, for demos and tests of the training loop.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::preprocess::to_unit_range;

/// Mean of `clamp(x / 2 + 0.5, 0, 1)` over channels and pixels: `[b, 3, H, W]` -> `[b]`, in `[0, 1]`.
pub fn brightness<B: Backend>(images: Tensor<B, 4>) -> Tensor<B, 1> {
    let [b, c, h, w] = images.dims();
    // A long axis (786,432 values at 512x512): reduced in two levels (see `alignprop_kernels::REDUCE_CHUNK`).
    alignprop_kernels::mean_last(to_unit_range(images).reshape([b, c * h * w])).reshape([b])
}
