//! Mean brightness: the simplest differentiable image reward, for demos and tests of the training loop.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::preprocess::to_unit_range;

/// Mean of `clamp(x / 2 + 0.5, 0, 1)` over channels and pixels: `[b, 3, H, W]` -> `[b]`, in `[0, 1]`.
pub fn brightness<B: Backend>(images: Tensor<B, 4>) -> Tensor<B, 1> {
    let [b, c, h, w] = images.dims();
    to_unit_range(images)
        .reshape([b, c * h * w])
        .mean_dim(1)
        .reshape([b])
}
