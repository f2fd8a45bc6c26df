//! Backend kernels for the ops the networks spend their time in, each with its autodiff backward, and the
//! tensor-op version beside it for every backend no kernel covers.
//!
//! The networks (`alignprop-diffusion`, `alignprop-rewards`) call the free functions of this crate: [`group_norm`],
//! [`layer_norm`], [`softmax`], [`multi_head_attention`] / [`scaled_dot_product_attention`], [`geglu`], the
//! activations ([`silu`], [`quick_gelu`], [`gelu`]), [`conv2d`], [`linear`] / [`linear_with_bias`] and
//! [`cat_channels`]. Each asks the kernel set for a fused kernel ([`Kernels`], one method per op: it gives its inputs
//! back in `Err` when it does not apply to the backend, dtype or shape) and otherwise runs the tensor-op version of
//! [`tensor_ops`] (or burn's own op). Dispatch is by backend type at run time, so model code stays generic over
//! `B: Backend` with no extra trait bound on users' code.
//!
//! - [`FlexKernels`] (feature `flex`, on by default): burn's pure-Rust CPU backend `Flex` and `Autodiff<Flex>` in
//!   f32 — vectorised GroupNorm, softmax, GEGLU and the activations ([`flex`]), LayerNorm ([`flex_layer_norm`]),
//!   FlashAttention-style attention that never stores the score matrix ([`flex_attention`]), stride-1 3x3 and 1x1
//!   convolutions forward and backward as GEMMs on the zero-padded grid ([`flex_conv`]; the larger 3x3 ones by
//!   Winograd's F(2x2, 3x3), [`flex_winograd`]), linear layers with the bias as the GEMM's starting value
//!   ([`flex_linear`]); opt-in bf16 products with f32 accumulation for the linear layers on CPUs with
//!   AVX512_BF16 ([`flex_bf16`]).
//! - [`AutodiffKernels`]: memory-efficient attention under autodiff ([`blockwise_attention`]: query blocks, only
//!   the output and each row's log-sum-exp kept, probabilities recomputed in the backward) for `Autodiff<Flex>` in
//!   other dtypes, `Autodiff<Cuda>` (feature `cuda`) and `Autodiff<Wgpu>` (feature `wgpu`).
//! - [`CubeKernels`] (feature `cuda`): attention without autodiff on CUDA through burn's own `module::attention`
//!   (flash-attention kernels on matrix cores), in query blocks of bounded score memory.
//! - [`in_pool`]: runs a whole job on a worker of the kernels' thread pool (no hand-off to the pool per operation).
//! - [`flops`]: counts the floating-point operations of the products these functions run (benchmarks' GFLOP/s).
//! - [`tensor_ops`]: the same ops in burn tensor ops, run and differentiated by every backend (CUDA, wgpu, f64,
//!   half precision); long reductions in two levels ([`sum_last`], [`mean_last`], [`sum_all`]: burn 0.21's cube
//!   backend sums axes of 65,536+ values wrongly). [`linear`] is the one matrix product of every linear layer.
//!
//! Shapes: activations are `[batch, channels, spatial]` (GroupNorm), token sequences `[batch, tokens, heads * d]`
//! (attention), images `[batch, channels, height, width]` (convolution).

pub mod blockwise_attention;
#[cfg(feature = "flex")]
pub mod flex;
#[cfg(feature = "flex")]
pub mod flex_attention;
#[cfg(feature = "flex")]
pub mod flex_bf16;
#[cfg(feature = "flex")]
pub mod flex_conv;
#[cfg(feature = "flex")]
pub mod flex_layer_norm;
#[cfg(feature = "flex")]
pub mod flex_linear;
#[cfg(feature = "flex")]
pub mod flex_winograd;
pub mod flops;
pub mod linear_op;
pub mod tensor_ops;

use std::any::{Any, TypeId};

use burn::backend::Autodiff;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// Moves `t` into type `U` when `T` is `U` (checked by the caller with `TypeId`).
#[cfg_attr(
    not(any(feature = "flex", feature = "cuda", feature = "wgpu")),
    allow(dead_code)
)]
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

/// [`attention_shapes_ok`] and the scale `1 / sqrt(d)` (what every caller of this crate passes; the blockwise and
/// fused attentions compute with it).
pub(crate) fn attention_applies<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    heads: usize,
    scale: f32,
    causal: bool,
) -> bool {
    let c = q.dims()[2];
    attention_shapes_ok(q, k, v, heads, causal)
        && (scale as f64 - 1.0 / ((c / heads) as f64).sqrt()).abs() < 1e-6
}

/// The inputs of [`Kernels::conv2d_same`], given back when the kernel does not apply.
pub type ConvInputs<B> = (Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 1>>);
/// The inputs of [`Kernels::layer_norm`], given back when the kernel does not apply.
pub type LayerNormInputs<B> = (Tensor<B, 2>, Tensor<B, 1>, Tensor<B, 1>);
/// The inputs of [`Kernels::linear`], given back when the kernel does not apply.
pub type LinearInputs<B> = (Tensor<B, 2>, Tensor<B, 2>, Option<Tensor<B, 1>>);
/// The inputs of [`Kernels::vjp_scalar`], given back when the kernel does not apply.
pub type VjpInputs<B, const D: usize> = (Tensor<B, D>, Tensor<B, D>);

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

    /// LayerNorm of `x` `[rows, features]` over the features, `weight`, `bias` `[features]`.
    fn layer_norm<B: Backend>(
        x: Tensor<B, 2>,
        weight: Tensor<B, 1>,
        bias: Tensor<B, 1>,
        _eps: f64,
    ) -> Result<Tensor<B, 2>, LayerNormInputs<B>> {
        Err((x, weight, bias))
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

    /// `x` `[batch, m, n]` -> `[batch, n, m]`, contiguous.
    fn swap_last2<B: Backend>(x: Tensor<B, 3>) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
        Err(x)
    }

    /// `cat([a, b], 1)` of `[batch, channels, h, w]` tensors, contiguous, with a contiguous backward.
    #[allow(clippy::type_complexity)]
    fn cat_channels<B: Backend>(
        a: Tensor<B, 4>,
        b: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>)> {
        Err((a, b))
    }

    /// An element-wise [`Activation`].
    fn activation<B: Backend, const D: usize>(
        x: Tensor<B, D>,
        _act: Activation,
    ) -> Result<Tensor<B, D>, Tensor<B, D>> {
        Err(x)
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

    /// A linear layer `x wᵀ + bias`: `x` `[rows, in]`, `w` `[out, in]`, `bias` `[out]` -> `[rows, out]`.
    fn linear<B: Backend>(
        x: Tensor<B, 2>,
        w: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<Tensor<B, 2>, LinearInputs<B>> {
        Err((x, w, bias))
    }

    /// `sum(out * g)` -> `[1]` with `g` (same shape as `out`) a constant: see [`vjp_scalar`].
    fn vjp_scalar<B: Backend, const D: usize>(
        out: Tensor<B, D>,
        g: Tensor<B, D>,
    ) -> Result<Tensor<B, 1>, VjpInputs<B, D>> {
        Err((out, g))
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
    fn layer_norm<B: Backend>(
        x: Tensor<B, 2>,
        weight: Tensor<B, 1>,
        bias: Tensor<B, 1>,
        eps: f64,
    ) -> Result<Tensor<B, 2>, LayerNormInputs<B>> {
        flex_layer_norm::layer_norm(x, weight, bias, eps)
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
    fn swap_last2<B: Backend>(x: Tensor<B, 3>) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
        flex::swap_last2(x)
    }
    fn cat_channels<B: Backend>(
        a: Tensor<B, 4>,
        b: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>)> {
        flex::cat_channels(a, b)
    }
    fn activation<B: Backend, const D: usize>(
        x: Tensor<B, D>,
        act: Activation,
    ) -> Result<Tensor<B, D>, Tensor<B, D>> {
        flex::activation(x, act)
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
    fn linear<B: Backend>(
        x: Tensor<B, 2>,
        w: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<Tensor<B, 2>, LinearInputs<B>> {
        flex_linear::linear(x, w, bias)
    }
    fn vjp_scalar<B: Backend, const D: usize>(
        out: Tensor<B, D>,
        g: Tensor<B, D>,
    ) -> Result<Tensor<B, 1>, VjpInputs<B, D>> {
        flex::vjp_scalar(out, g)
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
    fn layer_norm<B: Backend>(
        x: Tensor<B, 2>,
        weight: Tensor<B, 1>,
        bias: Tensor<B, 1>,
        eps: f64,
    ) -> Result<Tensor<B, 2>, LayerNormInputs<B>> {
        K1::layer_norm(x, weight, bias, eps).or_else(|(x, w, b)| K2::layer_norm(x, w, b, eps))
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
    fn swap_last2<B: Backend>(x: Tensor<B, 3>) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
        K1::swap_last2(x).or_else(K2::swap_last2)
    }
    fn cat_channels<B: Backend>(
        a: Tensor<B, 4>,
        b: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>)> {
        K1::cat_channels(a, b).or_else(|(a, b)| K2::cat_channels(a, b))
    }
    fn activation<B: Backend, const D: usize>(
        x: Tensor<B, D>,
        act: Activation,
    ) -> Result<Tensor<B, D>, Tensor<B, D>> {
        K1::activation(x, act).or_else(|x| K2::activation(x, act))
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
    fn linear<B: Backend>(
        x: Tensor<B, 2>,
        w: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<Tensor<B, 2>, LinearInputs<B>> {
        K1::linear(x, w, bias).or_else(|(x, w, b)| K2::linear(x, w, b))
    }
    fn vjp_scalar<B: Backend, const D: usize>(
        out: Tensor<B, D>,
        g: Tensor<B, D>,
    ) -> Result<Tensor<B, 1>, VjpInputs<B, D>> {
        K1::vjp_scalar(out, g).or_else(|(out, g)| K2::vjp_scalar(out, g))
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
#[cfg_attr(
    not(any(feature = "flex", feature = "cuda", feature = "wgpu")),
    allow(dead_code)
)]
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
        if !attention_applies(&q, &k, &v, heads, scale, causal) {
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

/// Attention without autodiff on CUDA (sampling, evaluation, the trainer's forward pass) through burn's own
/// `module::attention`, whose cube implementation autotunes between flash-attention kernels on the GPU's matrix
/// cores and burn's reference decomposition. Queries are split in blocks so that no call holds more than
/// [`GPU_BLOCK_BYTES`] of scores (non-causal calls only; causal ones are CLIP's 77 tokens).
///
/// Not on wgpu: WGSL has no matrix-core instructions, so burn has no fused kernel there, and its fallback measured
/// 3.3e-4 (relative L2) off a float64 reference at 4096 tokens on llvmpipe where the tensor-op version
/// ([`tensor_ops::multi_head_attention`]) is within 1.2e-6: wgpu keeps the tensor-op version.
pub struct CubeKernels;

/// Whether `B` is a backend whose `module::attention` has fused kernels (`Cuda`, with feature `cuda`).
fn has_fused_attention<B: Backend>() -> bool {
    #[cfg(feature = "cuda")]
    if TypeId::of::<B>() == TypeId::of::<burn::backend::Cuda>() {
        return true;
    }
    false
}

impl Kernels for CubeKernels {
    fn attention<B: Backend>(
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        heads: usize,
        scale: f32,
        causal: bool,
    ) -> Result<Tensor<B, 3>, AttentionInputs<B>> {
        let [b, n_q, c] = q.dims();
        if !has_fused_attention::<B>() || !attention_applies(&q, &k, &v, heads, scale, causal) {
            return Err((q, k, v));
        }
        let n_kv = k.dims()[1];
        let d = c / heads;
        let split = |t: Tensor<B, 3>, n: usize| -> Tensor<B, 4> {
            t.reshape([b, n, heads, d]).swap_dims(1, 2)
        };
        let (q, k, v) = (split(q, n_q), split(k, n_kv), split(v, n_kv));
        // The default scale (None) is 1 / sqrt(d): a given scale would send burn to its unfused path.
        let options = burn::tensor::ops::AttentionModuleOptions {
            is_causal: causal,
            ..Default::default()
        };
        let attend = |q: Tensor<B, 4>| {
            burn::tensor::module::attention(q, k.clone(), v.clone(), None, None, options)
        };
        let rows = if causal {
            n_q
        } else {
            blockwise_attention::block_rows(b * heads, n_q, n_kv, q.dtype().size(), GPU_BLOCK_BYTES)
        };
        let out = if rows >= n_q {
            attend(q)
        } else {
            let blocks: Vec<Tensor<B, 4>> = (0..n_q)
                .step_by(rows)
                .map(|s| attend(q.clone().narrow(2, s, rows.min(n_q - s))))
                .collect();
            Tensor::cat(blocks, 2)
        };
        Ok(out.swap_dims(1, 2).reshape([b, n_q, c]))
    }
}

/// The kernel sets the free functions of this crate try, in order, before the tensor-op versions.
#[cfg(feature = "flex")]
pub type Active = ((FlexKernels, AutodiffKernels), CubeKernels);
/// The kernel sets the free functions of this crate try, in order, before the tensor-op versions.
#[cfg(not(feature = "flex"))]
pub type Active = (AutodiffKernels, CubeKernels);

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
    Active::layer_norm(x, weight, bias, eps)
        .unwrap_or_else(|(x, w, b)| tensor_ops::layer_norm(x, w, b, eps))
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
    flops::count_attention(&q, &k, &v, heads);
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
    flops::count_attention(&q, &k, &v, 1);
    // Each of the `batch * heads` rows is one head: the kernel's token layout with one head.
    Active::attention(q, k, v, 1, scale as f32, causal)
        .unwrap_or_else(|(q, k, v)| tensor_ops::attention_head_major(q, k, v, scale, causal))
}

/// GEGLU of `h` `[rows, 2 * inner]`: `h[:, :inner] * gelu(h[:, inner:])` -> `[rows, inner]`.
pub fn geglu<B: Backend>(h: Tensor<B, 2>) -> Tensor<B, 2> {
    Active::geglu(h).unwrap_or_else(tensor_ops::geglu)
}

/// `x` `[batch, m, n]` -> `[batch, n, m]` (`swap_dims(1, 2)`), e.g. `[b, channels, h w]` <-> `[b, h w, channels]`
/// around a transformer block. On the CPU backend the result is a contiguous copy made by register transposes (burn's
/// own copy of the swapped view walks it one element at a time); elsewhere it is burn's strided view.
pub fn swap_last2<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    Active::swap_last2(x).unwrap_or_else(|x| x.swap_dims(1, 2))
}

/// `cat([a, b], 1)`: `[batch, c_a, h, w]`, `[batch, c_b, h, w]` -> `[batch, c_a + c_b, h, w]` (the UNet's skip
/// connections). On the CPU backend a contiguous copy whose backward hands each input a contiguous part of the
/// gradient; elsewhere burn's `cat`.
pub fn cat_channels<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
    Active::cat_channels(a, b).unwrap_or_else(|(a, b)| Tensor::cat(vec![a, b], 1))
}

/// An element-wise activation of the networks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// `x * sigmoid(beta * x)`: SiLU with `beta = 1` (SD's ResNet, time-embedding and VAE activation), CLIP's
    /// `quick_gelu` with `beta = 1.702`.
    Swish(f64),
    /// The exact (erf) GELU `x * Phi(x)`, as `torch.nn.functional.gelu` (OpenCLIP's MLPs).
    Gelu,
}

/// `act(x)` element-wise, any shape: the fused kernel where it applies, else burn's tensor ops.
pub fn activation<B: Backend, const D: usize>(x: Tensor<B, D>, act: Activation) -> Tensor<B, D> {
    Active::activation(x, act).unwrap_or_else(|x| match act {
        Activation::Swish(beta) if beta == 1.0 => burn::tensor::activation::silu(x),
        Activation::Swish(beta) => x.clone() * burn::tensor::activation::sigmoid(x * beta),
        Activation::Gelu => burn::tensor::activation::gelu(x),
    })
}

/// SiLU `x * sigmoid(x)` (`swish`), element-wise, any shape.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    activation(x, Activation::Swish(1.0))
}

/// CLIP's `quick_gelu` `x * sigmoid(1.702 x)`, element-wise, any shape.
pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    activation(x, Activation::Swish(1.702))
}

/// The exact (erf) GELU, element-wise, any shape.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    activation(x, Activation::Gelu)
}

/// `conv2d(x, weight, bias)` with square `stride` and `padding`, dilation 1, one group.
///
/// `x`: `[batch, c_in, h, w]`, `weight`: `[c_out, c_in, k, k]`, `bias`: `[c_out]` -> `[batch, c_out, h', w']`.
///
/// On cube backends a 1x1 convolution (stride 1, no padding: shortcuts, `proj_in` / `proj_out`, the VAE's quant
/// convs) is computed as the linear layer it is ([`conv1x1_as_linear`]): burn 0.21's autotuned `conv_im2col_1x1`
/// multiplies by a transposed view of the weight and so meets the matmul fault [`linear`] works around (measured on
/// llvmpipe when autotune picked it: the tiny VAE's encoding 0.37 off).
pub fn conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    stride: usize,
    padding: usize,
) -> Tensor<B, 4> {
    let [_, _, kh, kw] = weight.dims();
    if kh == 1 && kw == 1 && stride == 1 && padding == 0 && is_cube_backend::<B>() {
        return conv1x1_as_linear(x, weight, bias); // counted by `linear`
    }
    flops::count_conv2d(&x, &weight, stride, padding);
    Active::conv2d_same(x, weight, bias, stride, padding)
        .unwrap_or_else(|(x, w, b)| tensor_ops::conv2d(x, w, b, stride, padding))
}

/// A 1x1 convolution (stride 1, no padding) as a linear layer over the pixels, through [`linear`].
///
/// `x`: `[batch, c_in, h, w]`, `weight`: `[c_out, c_in, 1, 1]`, `bias`: `[c_out]` -> `[batch, c_out, h, w]` (a
/// permuted view of a channels-last result).
pub fn conv1x1_as_linear<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 4> {
    let [b, c_in, h, w] = x.dims();
    let [c_out, wc_in, kh, kw] = weight.dims();
    assert!(
        kh == 1 && kw == 1 && wc_in == c_in,
        "conv1x1_as_linear: weight {:?} for input {:?}",
        weight.dims(),
        x.dims()
    );
    let rows = x.permute([0, 2, 3, 1]).reshape([b * h * w, c_in]);
    let mut y = linear(rows, weight.reshape([c_out, c_in]));
    if let Some(bias) = bias {
        y = y + bias.unsqueeze_dim(0);
    }
    y.reshape([b, h, w, c_out]).permute([0, 3, 1, 2])
}

/// `t` written out in order on cube backends (a flatten and back, which makes the backend materialise a view), `t`
/// itself elsewhere. For the transposed right operands of attention's products (`k ᵀ`, `v ᵀ`: inner dimension the
/// head size, 8 to 160), which would otherwise meet burn 0.21's matmul fault with transposed right operands (see
/// [`linear`]); the copy is small beside the score matrix.
pub fn contiguous_on_cube<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    if !is_cube_backend::<B>() {
        return t;
    }
    let dims = t.dims();
    t.reshape([dims.iter().product::<usize>()]).reshape(dims)
}

/// Whether `B` is one of burn's cube backends this build has (`Cuda`, `Wgpu`, with or without autodiff).
#[allow(unused_variables)]
pub fn is_cube_backend<B: Backend>() -> bool {
    let id = TypeId::of::<B>();
    #[cfg(feature = "cuda")]
    if id == TypeId::of::<burn::backend::Cuda>()
        || id == TypeId::of::<Autodiff<burn::backend::Cuda>>()
    {
        return true;
    }
    #[cfg(feature = "wgpu")]
    if id == TypeId::of::<burn::backend::Wgpu>()
        || id == TypeId::of::<Autodiff<burn::backend::Wgpu>>()
    {
        return true;
    }
    false
}

/// Weights with a side at most this long get a contiguous transposed copy before the product on cube backends.
pub const SMALL_LINEAR_SIDE: usize = 64;

/// `x wᵀ` for a linear layer: `x` `[rows, in]`, `w` `[out, in]` (PyTorch's layout) -> `[rows, out]`.
///
/// Every linear layer of the networks and their LoRA adapters multiplies here. On burn 0.21's cube backend the
/// autotuned double-buffered unit matmul (`matmul_double_unit_*`, chosen by timing) returns wrong values for a
/// transposed-view right operand with a short inner dimension (measured on llvmpipe: `[2048, 8] x [8, 8]ᵀ` 0.94
/// relative error; LoRA's `[rows, 4] x up[out, 4]ᵀ` made the LoRA UNet 4e-2 off). So on cube backends a weight with
/// a side of at most [`SMALL_LINEAR_SIDE`] (LoRA factors, small models) is multiplied as a contiguous transposed
/// copy (a flatten of the view, which the backend must materialise), and under autodiff through [`linear_op`],
/// whose backward multiplies contiguous operands too (`dx = dy w`, `dw = T(dy) x`). Large weights keep
/// the view (a copy of every SD1.5 weight per call would cost more than it is worth where the fault was not seen);
/// `alignprop-gpucheck`'s `ops/matmul` sweep checks both at the models' shapes on every CI run.
pub fn linear<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    linear_with_bias(x, w, None)
}

/// `x wᵀ + bias` for a linear layer: `x` `[rows, in]`, `w` `[out, in]`, `bias` `[out]` -> `[rows, out]`.
///
/// On the CPU backend in f32 one kernel ([`flex_linear`]: the bias as the GEMM's starting value, one GEMM per
/// thread, the backward's products on strided views); elsewhere the product of [`linear`] and a broadcast add.
pub fn linear_with_bias<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    flops::count_linear(&x, &w);
    match Active::linear(x, w, bias) {
        Ok(y) => y,
        Err((x, w, bias)) => {
            let y = product(x, w);
            match bias {
                Some(b) => y + b.unsqueeze_dim(0),
                None => y,
            }
        }
    }
}

/// `x wᵀ` with burn's matmul, the cube backends' workaround of [`linear`] included.
fn product<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    let [out, inp] = w.dims();
    if out.min(inp) > SMALL_LINEAR_SIDE || !is_cube_backend::<B>() {
        return x.matmul(w.transpose());
    }
    // Under autodiff: one op whose backward products take contiguous right operands too ([`linear_op`]).
    let result = Err((x, w));
    #[cfg(feature = "cuda")]
    let result = result.or_else(|(x, w)| linear_on::<burn::backend::Cuda, B>(x, w));
    #[cfg(feature = "wgpu")]
    let result = result.or_else(|(x, w)| linear_on::<burn::backend::Wgpu, B>(x, w));
    result.unwrap_or_else(|(x, w)| x.matmul(linear_op::transposed_copy(w)))
}

/// [`linear_op::linear`] when `B` is `Autodiff<I>`; the inputs back otherwise.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
fn linear_on<I: Backend, B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I>>() {
        return Err((x, w));
    }
    let y = linear_op::linear::<I, _>(cast::<_, Tensor<Autodiff<I>, 2>>(x), cast(w));
    Ok(cast(y))
}

/// `sum(out * g)` -> `[1]`, with `g` a constant cotangent of `out`'s shape: `.backward()` on it gives every tensor
/// upstream of `out` its vector-Jacobian product with `g`, as torch's `out.backward(g)` does (the trainer's
/// step-by-step backward and the benchmarks' backward passes). The fused kernel (f32 `Flex` / `Autodiff<Flex>`, `g`
/// not requiring a gradient) reads the two tensors once and hands `g` itself to `out` as its gradient; elsewhere it
/// is [`sum_all`]`(out * g)`, whose backward also multiplies `g` by the ones of the sum's gradient.
pub fn vjp_scalar<B: Backend, const D: usize>(out: Tensor<B, D>, g: Tensor<B, D>) -> Tensor<B, 1> {
    Active::vjp_scalar(out, g).unwrap_or_else(|(out, g)| sum_all(out * g))
}

pub use tensor_ops::{REDUCE_CHUNK, mean_last, sum_all, sum_last};

/// Stack size of the worker threads of rayon's global pool when [`in_pool`] builds it: a main thread's (8 MiB),
/// since whole jobs run there.
pub const POOL_STACK_BYTES: usize = 8 << 20;

/// Runs `f` on a worker thread of rayon's global pool, the pool the CPU kernels split their loops over, and
/// returns its result (a panic in `f` resumes on the caller).
///
/// A kernel's parallel loop called from a thread outside the pool is handed to the pool and the caller sleeps
/// until the workers finish: every operation pays that hand-off and wake-up, and the caller's core does none of
/// the work (an OpenMP program's main thread, by contrast, is one of its team). Called from a worker, the loop
/// starts on that worker and the others take parts of it. Measured (AMD EPYC, 2 threads): the mid UNet's forward
/// and backward 388-392 -> 363-367 ms, the tiny test UNet's forward about 3x faster. Run a whole single-device job
/// this way (the CLI does for `train` on one device, `sample` and `eval`), after `alignprop_device::one_heap()`
/// (with glibc's per-thread heaps a pool worker gets its large tensors as fresh pages every time); not code that
/// blocks on other threads which use the pool themselves, such as data-parallel workers waiting for each other.
/// The first call builds the global pool (if nothing has yet) with [`POOL_STACK_BYTES`] per thread;
/// `RAYON_NUM_THREADS` still sets its size. Without the `flex` feature, calls `f` on this thread.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "flex")]
    {
        static BUILD: std::sync::Once = std::sync::Once::new();
        BUILD.call_once(|| {
            // An error means the global pool exists already (built by its first user): keep it.
            let _ = rayon::ThreadPoolBuilder::new()
                .stack_size(POOL_STACK_BYTES)
                .build_global();
        });
        rayon::scope(|_| f())
    }
    #[cfg(not(feature = "flex"))]
    {
        f()
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{DType, Distribution, Tensor};

    type A = Autodiff<Flex>;

    /// The 1x1 convolution as a linear layer equals burn's convolution in value and in every gradient (float64).
    #[test]
    fn conv1x1_as_linear_equals_conv2d_in_value_and_gradient() {
        let d = Default::default();
        let r = |s: &[usize]| {
            Tensor::<A, 1>::random(
                [s.iter().product::<usize>()],
                Distribution::Normal(0.0, 1.0),
                (&d, DType::F64),
            )
        };
        for (b, c_in, c_out, h, w, with_bias) in [
            (2, 8, 8, 5, 7, true),
            (1, 3, 16, 4, 4, false),
            (3, 16, 4, 1, 9, true),
        ] {
            let x0: Tensor<A, 4> = r(&[b, c_in, h, w]).reshape([b, c_in, h, w]);
            let w0: Tensor<A, 4> = r(&[c_out, c_in]).reshape([c_out, c_in, 1, 1]);
            let b0 = r(&[c_out]);
            let g: Tensor<A, 4> = r(&[b, c_out, h, w]).reshape([b, c_out, h, w]);
            let run = |ours: bool| {
                let (x, wt, bi) = (
                    x0.clone().require_grad(),
                    w0.clone().require_grad(),
                    b0.clone().require_grad(),
                );
                let bias = with_bias.then(|| bi.clone());
                let y = if ours {
                    super::conv1x1_as_linear(x.clone(), wt.clone(), bias)
                } else {
                    super::tensor_ops::conv2d(x.clone(), wt.clone(), bias, 1, 0)
                };
                let grads = (y.clone() * g.clone()).sum().backward();
                let gb = with_bias.then(|| bi.grad(&grads).unwrap().into_data());
                (
                    y.inner().into_data(),
                    x.grad(&grads).unwrap().into_data(),
                    wt.grad(&grads).unwrap().into_data(),
                    gb,
                )
            };
            let (ours, reference) = (run(true), run(false));
            let tol = burn::tensor::Tolerance::<f64>::absolute(1e-12);
            ours.0.assert_approx_eq::<f64>(&reference.0, tol);
            ours.1.assert_approx_eq::<f64>(&reference.1, tol);
            ours.2.assert_approx_eq::<f64>(&reference.2, tol);
            if let (Some(a), Some(e)) = (ours.3, reference.3) {
                a.assert_approx_eq::<f64>(&e, tol);
            }
        }
    }
    /// `vjp_scalar(out, g)` equals `sum(out * g)` in value, and its backward gives what `sum(out * g)`'s does: on
    /// f32 `Autodiff<Flex>` (the fused kernel, scalar gradient 1 and 2.5), plain `Flex` (value only), f64 (the
    /// tensor-op fallback) and with a `g` that requires a gradient (the fallback: `g` gets `out` as its gradient).
    #[test]
    fn vjp_scalar_is_the_vector_jacobian_product() {
        let d = Default::default();
        for dtype in [DType::F32, DType::F64] {
            // 70,001 values: several parallel blocks and a tail shorter than eight lanes.
            let shape = [7, 10, 1000 + 1];
            let n = 7 * 10 * 1001;
            let x0 = Tensor::<A, 3>::random(shape, Distribution::Normal(0.0, 1.0), (&d, dtype));
            let g = Tensor::<A, 3>::random(shape, Distribution::Normal(0.0, 1.0), (&d, dtype));
            for scale in [1.0, 2.5] {
                let run = |ours: bool| {
                    let x = x0.clone().require_grad();
                    let y = super::silu(x.clone());
                    let v = if ours {
                        super::vjp_scalar(y, g.clone())
                    } else {
                        (y * g.clone()).sum()
                    };
                    let grads = (v.clone() * scale).backward();
                    (v.into_scalar(), x.grad(&grads).unwrap().into_data())
                };
                let ((v, gx), (v_ref, gx_ref)) = (run(true), run(false));
                let (v, v_ref) = (v as f64, v_ref as f64);
                assert!(
                    (v - v_ref).abs() <= 1e-4 * v_ref.abs().max(n as f64).sqrt(),
                    "{dtype:?}: {v} vs {v_ref}"
                );
                gx.assert_approx_eq::<f64>(&gx_ref, burn::tensor::Tolerance::absolute(1e-6));
            }
        }
        // Without autodiff: the value.
        let a = Tensor::<Flex, 2>::random([300, 301], Distribution::Normal(0.0, 1.0), &d);
        let b = Tensor::<Flex, 2>::random([300, 301], Distribution::Normal(0.0, 1.0), &d);
        let v: f64 = super::vjp_scalar(a.clone(), b.clone()).into_scalar() as f64;
        let v_ref: f64 = (a.cast(DType::F64) * b.cast(DType::F64))
            .sum()
            .into_scalar() as f64;
        assert!((v - v_ref).abs() < 1e-3, "{v} vs {v_ref}");
        // A cotangent that requires a gradient gets `out` as its gradient (the fallback).
        let x = Tensor::<A, 1>::from_floats([1.0, -2.0, 3.0], &d).require_grad();
        let g = Tensor::<A, 1>::from_floats([0.5, 0.25, -1.0], &d).require_grad();
        let grads = super::vjp_scalar(x.clone() * 2.0, g.clone()).backward();
        g.grad(&grads).unwrap().into_data().assert_eq(
            &Tensor::<Flex, 1>::from_floats([2.0, -4.0, 6.0], &d).into_data(),
            false,
        );
        x.grad(&grads).unwrap().into_data().assert_eq(
            &Tensor::<Flex, 1>::from_floats([1.0, 0.5, -2.0], &d).into_data(),
            false,
        );
    }

    /// `in_pool` runs its closure on a worker of rayon's global pool (where the kernels' loops start without a
    /// hand-off), returns its value, and resumes its panic on the caller.
    #[cfg(feature = "flex")]
    #[test]
    fn in_pool_runs_on_a_pool_worker_and_resumes_panics() {
        assert_eq!(rayon::current_thread_index(), None);
        let (on_worker, value) = super::in_pool(|| (rayon::current_thread_index().is_some(), 42));
        assert!(on_worker && value == 42);
        let caught = std::panic::catch_unwind(|| super::in_pool(|| panic!("inside the pool")));
        let msg = caught.expect_err("the panic reaches the caller");
        assert_eq!(msg.downcast_ref::<&str>(), Some(&"inside the pool"));
    }
}
