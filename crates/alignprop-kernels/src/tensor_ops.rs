//! The tensor-op versions of every kernel: what runs on a backend (or dtype, or shape) no fused kernel covers.
//! Written with burn's tensor API only, so every backend runs and differentiates them; the fused kernels are tested
//! against these.

use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d as burn_conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Bool, DType, Tensor, activation};

/// Longest axis one reduction runs over in [`sum_last`], [`mean_last`] and the norms: longer axes are split in
/// two levels. burn 0.21's cube backend (wgpu, measured on llvmpipe) sums axes of 65,536+ values wrongly (`[2,
/// 262144]` ones summed to 0 for one row) and loses ~5e-5 to sequential float32 rounding at 65,535; at most 4,096
/// values per level it is exact to float32 rounding, and every backend's result improves.
pub const REDUCE_CHUNK: usize = 4096;

/// `(outer, inner)` with `outer * inner == n`, `inner <= REDUCE_CHUNK` the largest such divisor, or `None` when
/// `n` needs no split (`n <= REDUCE_CHUNK`) or has no divisor that keeps `outer <= REDUCE_CHUNK * 16`.
pub fn reduce_split(n: usize) -> Option<(usize, usize)> {
    if n <= REDUCE_CHUNK {
        return None;
    }
    (1..=REDUCE_CHUNK)
        .rev()
        .find(|c| n % c == 0)
        .map(|c| (n / c, c))
        .filter(|&(outer, _)| outer <= REDUCE_CHUNK * 16)
}

/// Sum over the last dimension of `x` `[rows, n]` -> `[rows, 1]`, in two levels for long rows ([`REDUCE_CHUNK`]);
/// a long row of prime length is padded with zeros to a multiple of the chunk.
pub fn sum_last<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let [rows, n] = x.dims();
    if n <= REDUCE_CHUNK {
        return x.sum_dim(1);
    }
    let (x, (outer, inner)) = match reduce_split(n) {
        Some(split) => (x, split),
        None => {
            let padded = n.div_ceil(REDUCE_CHUNK) * REDUCE_CHUNK;
            let zeros = Tensor::zeros([rows, padded - n], (&x.device(), x.dtype()));
            (
                Tensor::cat(vec![x, zeros], 1),
                (padded / REDUCE_CHUNK, REDUCE_CHUNK),
            )
        }
    };
    let partial: Tensor<B, 2> = x
        .reshape([rows, outer, inner])
        .sum_dim(2)
        .reshape([rows, outer]);
    sum_last(partial)
}

/// Sum of all values of `x` -> `[1]`, in two levels for long tensors (as [`sum_last`]).
pub fn sum_all<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, 1> {
    let n = x.shape().num_elements();
    sum_last(x.reshape([1, n])).reshape([1])
}

/// Mean over the last dimension of `x` `[rows, n]` -> `[rows, 1]` ([`sum_last`] times `1 / n`).
///
/// A product with the reciprocal, not a division: burn-autodiff 0.21's `div_scalar` backward rounds the divisor to
/// f32, which put a ~1e-8 relative error into float64 gradients through every LayerNorm and GroupNorm whose `n` is
/// not a power of two (measured: OWL-ViT's image gradient 3.3e-9 -> see `count_parity.rs`).
pub fn mean_last<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let n = x.dims()[1];
    sum_last(x) * (1.0 / n as f64)
}

/// Group normalisation of `x` `[batch, channels, spatial]` with per-channel `gamma`, `beta` `[channels]`.
///
/// Statistics per `(batch, group)` on a `[batch * groups, n]` view ([`mean_last`]: long groups reduce in two
/// levels); the normalisation and the affine are folded into one scale and shift per `(batch, channel)`, applied on
/// a `[batch * channels, outer, inner]` view of each channel's `spatial` values (one scalar per channel). The view
/// keeps every reduction short in the backward too: the gradient of a broadcast sums over the broadcast axes, one
/// axis at a time. Two full-size passes (centred square for the variance, then `x * scale + shift`) instead of five,
/// and a smaller autodiff graph. Half-precision inputs (f16, bf16) are normalised in f32 and the result cast back:
/// their squared deviations would overflow f16 once `|x - mean| > 256`, and bf16 sums lose most of their digits.
pub fn group_norm<B: Backend>(
    x: Tensor<B, 3>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    groups: usize,
    eps: f64,
) -> Tensor<B, 3> {
    let dtype = x.dtype();
    if is_half(dtype) {
        let f32 = |t: Tensor<B, 1>| t.cast(DType::F32);
        return group_norm(x.cast(DType::F32), f32(gamma), f32(beta), groups, eps).cast(dtype);
    }
    let [b, c, spatial] = x.dims();
    let per_group = c / groups;
    let (outer, inner) = reduce_split(spatial).unwrap_or((1, spatial));
    // [b * G, per_group, outer, inner]: the group statistics reduce inner, outer, then the group's channels.
    let g: Tensor<B, 4> = x.reshape([b * groups, per_group, outer, inner]);
    let stat = |t: Tensor<B, 4>| -> Tensor<B, 4> {
        let n = (per_group * outer * inner) as f64;
        t.sum_dim(3).sum_dim(2).sum_dim(1) / n
    };
    let mean = stat(g.clone()); // [b * G, 1, 1, 1]
    let var = stat((g.clone() - mean.clone()).square());
    let rstd = (var + eps).sqrt().recip();
    // Per (batch, channel): scale = gamma * rstd, shift = beta - mean * scale.
    let per_channel = |t: Tensor<B, 4>| -> Tensor<B, 2> {
        t.reshape([b, groups, 1])
            .expand([b, groups, per_group])
            .reshape([b, c])
    };
    let scale = per_channel(rstd) * gamma.unsqueeze::<2>(); // [b, c]
    let shift = beta.unsqueeze::<2>() - per_channel(mean) * scale.clone();
    let rows: Tensor<B, 3> = g.reshape([b * c, outer, inner]);
    (rows * scale.reshape([b * c, 1, 1]) + shift.reshape([b * c, 1, 1])).reshape([b, c, spatial])
}

/// Whether `dtype` is a 16-bit float, whose statistics are computed in f32.
pub fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
}

/// Layer normalisation of `x` `[rows, features]` over the features, with `weight`, `bias` `[features]`. Half-precision
/// inputs are normalised in f32 and cast back (as [`group_norm`]).
pub fn layer_norm<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    bias: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, 2> {
    let dtype = x.dtype();
    if is_half(dtype) {
        let f32 = |t: Tensor<B, 1>| t.cast(DType::F32);
        return layer_norm(x.cast(DType::F32), f32(weight), f32(bias), eps).cast(dtype);
    }
    let mean = mean_last(x.clone());
    let centred = x - mean;
    let var = mean_last(centred.clone().square());
    let normed = centred / (var + eps).sqrt();
    normed * weight.unsqueeze::<2>() + bias.unsqueeze::<2>()
}

/// Softmax over the last dimension.
pub fn softmax_last<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    activation::softmax(x, D - 1)
}

/// GEGLU on `h` `[rows, 2 * inner]`: `h[:, :inner] * gelu(h[:, inner:])` -> `[rows, inner]`.
pub fn geglu<B: Backend>(h: Tensor<B, 2>) -> Tensor<B, 2> {
    let inner = h.dims()[1] / 2;
    let gate = h.clone().narrow(1, inner, inner);
    h.narrow(1, 0, inner) * activation::gelu(gate)
}

/// `conv2d(x, weight, bias)` with square `stride` and `padding`, dilation 1, one group.
///
/// `x`: `[batch, c_in, h, w]`, `weight`: `[c_out, c_in, k, k]`, `bias`: `[c_out]` -> `[batch, c_out, h', w']`.
pub fn conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    stride: usize,
    padding: usize,
) -> Tensor<B, 4> {
    burn_conv2d(
        x,
        weight,
        bias,
        ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1),
    )
}

/// Largest score matrix (bytes) one attention call materialises on the CPU (on cube backends:
/// [`crate::GPU_BLOCK_BYTES`]); longer query sequences are processed in chunks of queries (the softmax is per query
/// row, so chunks are independent).
const ATTENTION_CHUNK_BYTES: usize = 16 << 20;

/// Scaled dot-product attention on head-major tensors: `softmax(q k^T * scale) v`.
///
/// `q`: `[batch * heads, n_q, d]`, `k`, `v`: `[batch * heads, n_kv, d]` -> `[batch * heads, n_q, d]`. `causal`
/// masks keys after each query (requires `n_q == n_kv`). The scale is applied to `q` (the smaller tensor) before
/// the product, and queries are split into chunks so that no score matrix exceeds 16 MiB: at 64x64 latents SD's
/// self-attention would otherwise materialise `[16, 4096, 4096]` scores (1 GiB) at once. The row softmax is
/// [`crate::softmax`] (fused where a kernel applies).
pub fn attention_head_major<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    scale: f64,
    causal: bool,
) -> Tensor<B, 3> {
    let [bh, n_q, d] = q.dims();
    let n_kv = k.dims()[1];
    let q = q * scale;
    let kt = crate::contiguous_on_cube(k.swap_dims(1, 2));
    let elem = q.dtype().size();
    let row_bytes = bh * n_kv * elem;
    // Cache-sized chunks on the CPU; on a GPU few large launches (each launch costs more than a cache miss).
    let budget = if crate::is_cube_backend::<B>() {
        crate::GPU_BLOCK_BYTES
    } else {
        ATTENTION_CHUNK_BYTES
    };
    let chunk = (budget / row_bytes.max(1)).clamp(1, n_q);
    let block = |q: Tensor<B, 3>, start: usize| {
        let rows = q.dims()[1];
        let mut scores = q.matmul(kt.clone());
        if causal {
            // Key j is hidden from query i when j > i (offset by the chunk's first query).
            let mask =
                Tensor::<B, 2, Bool>::tril_mask([rows, n_kv], start as i64, &scores.device());
            scores = scores.mask_fill(mask.unsqueeze::<3>(), f32::NEG_INFINITY);
        }
        crate::softmax(scores).matmul(v.clone())
    };
    if chunk >= n_q {
        return block(q, 0);
    }
    let parts: Vec<Tensor<B, 3>> = (0..n_q)
        .step_by(chunk)
        .map(|start| {
            let end = (start + chunk).min(n_q);
            block(q.clone().slice([0..bh, start..end, 0..d]), start)
        })
        .collect();
    Tensor::cat(parts, 1)
}

/// Multi-head attention on token sequences through [`attention_head_major`], scale `1 / sqrt(d)`.
///
/// `q`: `[batch, n_q, heads * d]`, `k`, `v`: `[batch, n_kv, heads * d]` -> `[batch, n_q, heads * d]`.
pub fn multi_head_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    causal: bool,
) -> Tensor<B, 3> {
    let [b, n_q, c] = q.dims();
    let n_kv = k.dims()[1];
    let d = c / heads;
    let split = |t: Tensor<B, 3>, n: usize| {
        t.reshape([b, n, heads, d])
            .swap_dims(1, 2)
            .reshape([b * heads, n, d])
    };
    let out = attention_head_major(
        split(q, n_q),
        split(k, n_kv),
        split(v, n_kv),
        1.0 / (d as f64).sqrt(),
        causal,
    );
    out.reshape([b, heads, n_q, d])
        .swap_dims(1, 2)
        .reshape([b, n_q, c])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    /// Half-precision norms keep their statistics in f32: activations whose deviations from the mean exceed 256
    /// (squares beyond f16's 65504) normalise to what f32 gives on the same (half-rounded) inputs, within the
    /// half type's rounding of the output. The inputs are a fixed pattern, not random draws, so the check cannot
    /// pass or fail by chance.
    #[test]
    fn half_precision_norms_compute_statistics_in_f32() {
        let device = Default::default();
        // Deterministic values: a hash-like pattern in [-1, 1); x spans 1000 +- 700.
        let pattern = |n: usize, salt: u32| -> Vec<f32> {
            (0..n as u32)
                .map(|i| {
                    let h = (i.wrapping_mul(2654435761) ^ salt.wrapping_mul(40503))
                        .wrapping_mul(2246822519);
                    (h >> 8) as f32 / (1u32 << 23) as f32 - 1.0
                })
                .collect()
        };
        let x: Vec<f32> = pattern(2 * 4 * 64, 1)
            .iter()
            .map(|u| 1000.0 + 700.0 * u)
            .collect();
        let g: Vec<f32> = pattern(4, 2).iter().map(|u| 1.0 + 0.3 * u).collect();
        let b: Vec<f32> = pattern(4, 3).iter().map(|u| 0.3 * u).collect();
        let x32 = Tensor::<Flex, 1>::from_floats(x.as_slice(), &device).reshape([2, 4, 64]);
        let gamma = Tensor::<Flex, 1>::from_floats(g.as_slice(), &device);
        let beta = Tensor::<Flex, 1>::from_floats(b.as_slice(), &device);
        for (dtype, tol) in [(DType::F16, 2e-3), (DType::BF16, 1.5e-2)] {
            let x = x32.clone().cast(dtype);
            let (g, b) = (gamma.clone().cast(dtype), beta.clone().cast(dtype));
            // The reference: f32 statistics of exactly the values the half tensors hold.
            let f32_of = |t: Tensor<Flex, 1>| t.cast(DType::F32);
            let expected = group_norm(
                x.clone().cast(DType::F32),
                f32_of(g.clone()),
                f32_of(b.clone()),
                2,
                1e-5,
            );
            let y = group_norm(x.clone(), g.clone(), b.clone(), 2, 1e-5);
            assert_eq!(y.dtype(), dtype);
            let err: f32 = (y.cast(DType::F32) - expected).abs().max().into_scalar();
            assert!(err < tol, "{dtype:?} group norm off by {err}");
            let (x, g, b) = (x.reshape([8, 64]), g.repeat_dim(0, 16), b.repeat_dim(0, 16));
            let expected = layer_norm(
                x.clone().cast(DType::F32),
                f32_of(g.clone()),
                f32_of(b.clone()),
                1e-5,
            );
            let y = layer_norm(x, g, b, 1e-5);
            let err: f32 = (y.cast(DType::F32) - expected).abs().max().into_scalar();
            assert!(err < tol, "{dtype:?} layer norm off by {err}");
        }
        // The same statistics in f16 itself overflow: what the f32 path avoids.
        let x16 = Tensor::<Flex, 2>::from_data(TensorData::from([[0.0f32, 600.0]]), &device)
            .cast(DType::F16);
        let sq: f32 = (x16.clone() - x16.mean_dim(1))
            .square()
            .sum()
            .cast(DType::F32)
            .into_scalar();
        assert!(
            !sq.is_finite(),
            "f16 squares of 300 should overflow, got {sq}"
        );
    }
}
