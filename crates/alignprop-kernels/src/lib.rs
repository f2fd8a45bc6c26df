//! Backend kernels for the ops the networks spend their time in, each with its autodiff backward, and the
//! tensor-op version beside it for every backend no kernel covers.
//!
//! The networks (`alignprop-diffusion`, `alignprop-rewards`) call the free functions of this crate: [`group_norm`],
//! [`layer_norm`], [`softmax`], [`multi_head_attention`] / [`scaled_dot_product_attention`], [`geglu`] and [`conv2d`]. Each asks the
//! kernel set for a fused kernel ([`Kernels`], one method per op: it gives its inputs back in `Err` when it does not
//! apply to the backend, dtype or shape) and otherwise runs the tensor-op version of [`tensor_ops`]. Dispatch is by
//! backend type at run time, so model code stays generic over `B: Backend` with no extra trait bound on users' code.
//!
//! - [`FlexKernels`] (feature `flex`, on by default): burn's pure-Rust CPU backend `Flex` and `Autodiff<Flex>` in
//!   f32 — vectorised GroupNorm, softmax and GEGLU ([`flex`]), FlashAttention-style attention that never stores the
//!   score matrix ([`flex_attention`]), the shifted-GEMM backward of stride-1 convolutions ([`flex_conv`]).
//! - [`tensor_ops`]: the same ops in burn tensor ops, run and differentiated by every backend (CUDA, wgpu, f64,
//!   half precision). Kernels for the cube backends are to be added as another [`Kernels`] implementation.
//!
//! Shapes: activations are `[batch, channels, spatial]` (GroupNorm), token sequences `[batch, tokens, heads * d]`
//! (attention), images `[batch, channels, height, width]` (convolution).

pub mod blockwise_attention;
#[cfg(feature = "flex")]
pub mod flex;
#[cfg(feature = "flex")]
pub mod flex_attention;
#[cfg(feature = "flex")]
pub mod flex_conv;
pub mod tensor_ops;

use std::any::{Any, TypeId};

use burn::backend::Autodiff;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// Moves `t` into type `U` when `T` is `U` (checked by the caller with `TypeId`).
#[cfg_attr(not(any(feature = "flex", feature = "cuda", feature = "wgpu")), allow(dead_code))]
pub(crate) fn cast<T: 'static, U: 'static>(t: T) -> U {
    let boxed: Box<dyn Any> = Box::new(t);
    *boxed
        .downcast::<U>()
        .expect("kernels: backend type checked before the cast")
}

/// The inputs of [`Kernels::group_norm`], given back when the kernel does not apply.
pub type GroupNormInputs<B> = (Tensor<B, 3>, Tensor<B, 1>, Tensor<B, 1>);
/// The inputs of [`Kernels::attention`], given back when the kernel does not apply.
pub type AttentionInputs<B> = (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>);
/// Whether `q` `[batch, n_q, heads * d]`, `k`, `v` `[batch, n_kv, heads * d]` are shapes the attention kernels
/// take: `heads` divides the width, keys and values agree, at least one key, `n_q == n_kv` when causal.
pub(crate) fn attention_shapes_ok<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    heads: usize,
    causal: bool,
) -> bool {
    let [b, n_q, c] = q.dims();
    let [bk, n_kv, ck] = k.dims();
    heads > 0
        && c % heads == 0
        && bk == b
        && ck == c
        && v.dims() == k.dims()
        && n_kv > 0
        && (!causal || n_q == n_kv)
}

/// The inputs of [`Kernels::conv2d_same`], given back when the kernel does not apply.
pub type ConvInputs<B> = (Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 1>>);

/// A set of fused kernels. Each method computes its op when it applies to the backend `B`, the dtypes and the
/// shapes, and gives its inputs back in `Err` otherwise (the default: a set covers only some ops).
pub trait Kernels {
    /// GroupNorm of `x` `[batch, channels, spatial]`, per-channel `gamma`, `beta` `[channels]`.
    fn group_norm<B: Backend>(
        x: Tensor<B, 3>,
        gamma: Tensor<B, 1>,
        beta: Tensor<B, 1>,
        _groups: usize,
        _eps: f64,
    ) -> Result<Tensor<B, 3>, GroupNormInputs<B>> {
        Err((x, gamma, beta))
    }

    /// Softmax over the last dimension.
    fn softmax_last<B: Backend, const D: usize>(
        x: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, Tensor<B, D>> {
        Err(x)
    }

    /// `softmax(q kᵀ * scale) v` per head: `q` `[batch, n_q, heads * d]`, `k`, `v` `[batch, n_kv, heads * d]` ->
    /// `[batch, n_q, heads * d]`; `causal` hides key `j` from query `i` when `j > i`.
    fn attention<B: Backend>(
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        _heads: usize,
        _scale: f32,
        _causal: bool,
    ) -> Result<Tensor<B, 3>, AttentionInputs<B>> {
        Err((q, k, v))
    }

    /// GEGLU of `h` `[rows, 2 * inner]` -> `[rows, inner]`.
    fn geglu<B: Backend>(h: Tensor<B, 2>) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
        Err(h)
    }

    /// A `k x k` convolution with stride 1 and "same" padding `(k - 1) / 2`: `x` `[batch, c_in, h, w]`, `weight`
    /// `[c_out, c_in, k, k]`, `bias` `[c_out]` -> `[batch, c_out, h, w]`.
    fn conv2d_same<B: Backend>(
        x: Tensor<B, 4>,
        weight: Tensor<B, 4>,
        bias: Option<Tensor<B, 1>>,
        _stride: usize,
        _padding: usize,
    ) -> Result<Tensor<B, 4>, ConvInputs<B>> {
        Err((x, weight, bias))
    }
}

/// The fused kernels of burn's CPU backend (`Flex`, `Autodiff<Flex>`, f32).
#[cfg(feature = "flex")]
pub struct FlexKernels;

#[cfg(feature = "flex")]
impl Kernels for FlexKernels {
    fn group_norm<B: Backend>(
        x: Tensor<B, 3>,
        gamma: Tensor<B, 1>,
        beta: Tensor<B, 1>,
        groups: usize,
        eps: f64,
    ) -> Result<Tensor<B, 3>, GroupNormInputs<B>> {
        flex::group_norm(x, gamma, beta, groups, eps)
    }
    fn softmax_last<B: Backend, const D: usize>(
        x: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, Tensor<B, D>> {
        flex::softmax_last(x)
    }
    fn attention<B: Backend>(
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        heads: usize,
        scale: f32,
        causal: bool,
    ) -> Result<Tensor<B, 3>, AttentionInputs<B>> {
        flex_attention::attention(q, k, v, heads, scale, causal)
    }
    fn geglu<B: Backend>(h: Tensor<B, 2>) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
        flex::geglu(h)
    }
    fn conv2d_same<B: Backend>(
        x: Tensor<B, 4>,
        weight: Tensor<B, 4>,
        bias: Option<Tensor<B, 1>>,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor<B, 4>, ConvInputs<B>> {
        flex_conv::conv2d_same(x, weight, bias, stride, padding)
    }
}

/// Two kernel sets: the first where it applies, else the second.
impl<K1: Kernels, K2: Kernels> Kernels for (K1, K2) {
    fn group_norm<B: Backend>(
        x: Tensor<B, 3>,
        gamma: Tensor<B, 1>,
        beta: Tensor<B, 1>,
        groups: usize,
        eps: f64,
    ) -> Result<Tensor<B, 3>, GroupNormInputs<B>> {
        K1::group_norm(x, gamma, beta, groups, eps)
            .or_else(|(x, g, b)| K2::group_norm(x, g, b, groups, eps))
    }
    fn softmax_last<B: Backend, const D: usize>(
        x: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, Tensor<B, D>> {
        K1::softmax_last(x).or_else(K2::softmax_last)
    }
    fn attention<B: Backend>(
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        heads: usize,
        scale: f32,
        causal: bool,
    ) -> Result<Tensor<B, 3>, AttentionInputs<B>> {
        K1::attention(q, k, v, heads, scale, causal)
            .or_else(|(q, k, v)| K2::attention(q, k, v, heads, scale, causal))
    }
    fn geglu<B: Backend>(h: Tensor<B, 2>) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
        K1::geglu(h).or_else(K2::geglu)
    }
    fn conv2d_same<B: Backend>(
        x: Tensor<B, 4>,
        weight: Tensor<B, 4>,
        bias: Option<Tensor<B, 1>>,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor<B, 4>, ConvInputs<B>> {
        K1::conv2d_same(x, weight, bias, stride, padding)
            .or_else(|(x, w, b)| K2::conv2d_same(x, w, b, stride, padding))
    }
}

/// Memory-efficient attention under autodiff ([`blockwise_attention`]) for the autodiff backends this build knows
/// by type: `Autodiff<Flex>` (feature `flex`; its f32 case is taken by [`FlexKernels`] first), `Autodiff<Cuda>`
/// (feature `cuda`) and `Autodiff<Wgpu>` (feature `wgpu`). Query blocks are sized so one block's scores take at
/// most [`CPU_BLOCK_BYTES`] on the CPU, [`GPU_BLOCK_BYTES`] on a GPU.
pub struct AutodiffKernels;

/// Score bytes of one query block of the blockwise attention on the CPU (cache-sized).
pub const CPU_BLOCK_BYTES: usize = 16 << 20;
/// Score bytes of one query block of the blockwise attention on a GPU (few, large launches).
pub const GPU_BLOCK_BYTES: usize = 256 << 20;

/// `q`, `k`, `v` `[batch, n, heads * d]` through [`blockwise_attention::attention`] when `B` is `Autodiff<I>`, in
/// query blocks whose scores take at most `budget` bytes; the inputs back for any other `B`.
#[cfg_attr(not(any(feature = "flex", feature = "cuda", feature = "wgpu")), allow(dead_code))]
fn blockwise_on<I: Backend, B: Backend>(
    (q, k, v): AttentionInputs<B>,
    heads: usize,
    causal: bool,
    budget: usize,
) -> Result<Tensor<B, 3>, AttentionInputs<B>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I>>() {
        return Err((q, k, v));
    }
    let [b, n_q, c] = q.dims();
    let n_kv = k.dims()[1];
    let d = c / heads;
    let elem = q.dtype().size();
    let split = |t: Tensor<B, 3>, n: usize| -> Tensor<Autodiff<I>, 3> {
        cast(
            t.reshape([b, n, heads, d])
                .swap_dims(1, 2)
                .reshape([b * heads, n, d]),
        )
    };
    let rows = blockwise_attention::block_rows(b * heads, n_q, n_kv, elem, budget);
    let out = blockwise_attention::attention(
        split(q, n_q),
        split(k, n_kv),
        split(v, n_kv),
        1.0 / (d as f64).sqrt(),
        causal,
        rows,
    );
    let out: Tensor<B, 3> = cast(out);
    Ok(out
        .reshape([b, heads, n_q, d])
        .swap_dims(1, 2)
        .reshape([b, n_q, c]))
}

impl Kernels for AutodiffKernels {
    fn attention<B: Backend>(
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        heads: usize,
        scale: f32,
        causal: bool,
    ) -> Result<Tensor<B, 3>, AttentionInputs<B>> {
        let c = q.dims()[2];
        // The scale these ops use is 1 / sqrt(d), what every caller of this crate passes.
        let shapes_ok = attention_shapes_ok(&q, &k, &v, heads, causal)
            && (scale as f64 - 1.0 / ((c / heads) as f64).sqrt()).abs() < 1e-6;
        if !shapes_ok {
            return Err((q, k, v));
        }
        // Each backend in turn: the one `B` is runs the op, the others give the inputs back.
        let result = Err((q, k, v));
        #[cfg(feature = "flex")]
        let result = result.or_else(|qkv| {
            blockwise_on::<burn::backend::Flex, B>(qkv, heads, causal, CPU_BLOCK_BYTES)
        });
        #[cfg(feature = "cuda")]
        let result = result.or_else(|qkv| {
            blockwise_on::<burn::backend::Cuda, B>(qkv, heads, causal, GPU_BLOCK_BYTES)
        });
        #[cfg(feature = "wgpu")]
        let result = result.or_else(|qkv| {
            blockwise_on::<burn::backend::Wgpu, B>(qkv, heads, causal, GPU_BLOCK_BYTES)
        });
        result
    }
}

/// The kernel sets the free functions of this crate try, in order, before the tensor-op versions.
#[cfg(feature = "flex")]
pub type Active = (FlexKernels, AutodiffKernels);
/// The kernel sets the free functions of this crate try, in order, before the tensor-op versions.
#[cfg(not(feature = "flex"))]
pub type Active = AutodiffKernels;

/// GroupNorm of `x` `[batch, channels, spatial]` with per-channel `gamma`, `beta` `[channels]`, same shape out.
pub fn group_norm<B: Backend>(
    x: Tensor<B, 3>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    groups: usize,
    eps: f64,
) -> Tensor<B, 3> {
    Active::group_norm(x, gamma, beta, groups, eps)
        .unwrap_or_else(|(x, g, b)| tensor_ops::group_norm(x, g, b, groups, eps))
}

/// Layer normalisation of `x` `[rows, features]` over the features, with `weight`, `bias` `[features]`.
pub fn layer_norm<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    bias: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, 2> {
    tensor_ops::layer_norm(x, weight, bias, eps)
}

/// Softmax over the last dimension.
pub fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    Active::softmax_last(x).unwrap_or_else(tensor_ops::softmax_last)
}

/// Multi-head scaled dot-product attention on token sequences, scale `1 / sqrt(d)`.
///
/// `q`: `[batch, n_q, heads * d]`, `k`, `v`: `[batch, n_kv, heads * d]` -> `[batch, n_q, heads * d]`; `causal`
/// masks keys after each query (CLIP text encoder).
pub fn multi_head_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    causal: bool,
) -> Tensor<B, 3> {
    let d = q.dims()[2] / heads.max(1);
    let scale = 1.0 / (d as f32).sqrt();
    Active::attention(q, k, v, heads, scale, causal)
        .unwrap_or_else(|(q, k, v)| tensor_ops::multi_head_attention(q, k, v, heads, causal))
}

/// Scaled dot-product attention on head-major tensors: `softmax(q kᵀ / sqrt(d)) v`.
///
/// `q`: `[batch * heads, n_q, d]`, `k`, `v`: `[batch * heads, n_kv, d]` -> `[batch * heads, n_q, d]`; `causal`
/// masks keys after each query (requires `n_q == n_kv`).
pub fn scaled_dot_product_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    causal: bool,
) -> Tensor<B, 3> {
    let scale = 1.0 / (q.dims()[2] as f64).sqrt();
    // Each of the `batch * heads` rows is one head: the kernel's token layout with one head.
    Active::attention(q, k, v, 1, scale as f32, causal)
        .unwrap_or_else(|(q, k, v)| tensor_ops::attention_head_major(q, k, v, scale, causal))
}

/// GEGLU of `h` `[rows, 2 * inner]`: `h[:, :inner] * gelu(h[:, inner:])` -> `[rows, inner]`.
pub fn geglu<B: Backend>(h: Tensor<B, 2>) -> Tensor<B, 2> {
    Active::geglu(h).unwrap_or_else(tensor_ops::geglu)
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
    Active::conv2d_same(x, weight, bias, stride, padding)
        .unwrap_or_else(|(x, w, b)| tensor_ops::conv2d(x, w, b, stride, padding))
}
