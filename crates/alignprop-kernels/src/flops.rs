//! Counting the floating-point operations of the matrix products the networks run, for the benchmarks' GFLOP/s.
//!
//! Every convolution, linear layer and attention of the networks goes through this crate's free functions
//! ([`crate::conv2d`], [`crate::linear`], [`crate::multi_head_attention`], [`crate::scaled_dot_product_attention`]);
//! while counting is on ([`start`] .. [`stop`]) each call adds its multiply-adds times two, computed from the
//! shapes it is given, with the convention of PyTorch's `torch.utils.flop_counter.FlopCounterMode` (matrix products
//! and convolutions only; bias adds, norms, softmax and element-wise ops are not counted; attention counts both
//! products in full, masked or not). A call whose inputs are tracked by autodiff also adds the products of its
//! backward then, as if the backward runs (it does in every benchmark workload): one forward's worth per gradient
//! a convolution or linear layer needs (input, weight) and two for attention (`dP`, `dV`, `dQ`, `dK`).
//! Convolutions count as the direct sum whatever algorithm runs them (as PyTorch's counter does): the 3x3
//! convolutions that the CPU backend runs by Winograd's F(2x2, 3x3) ([`crate::flex_winograd`]) do 4/9 of those
//! multiplications, so GFLOP/s computed from this count are effective rates there.
//!
//! The counter is the calling thread's (the networks call these functions from the thread that runs them; the
//! kernels' own worker threads do not call them): a benchmark counts one iteration between [`start`] and
//! [`stop`] on its thread, and other threads (tests running beside it) do not disturb the count. Counting is off
//! by default and then costs one thread-local read per call.

use std::cell::Cell;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

thread_local! {
    /// The operations counted on this thread since [`start`]; `None` when not counting.
    static COUNT: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Clears the counter of the calling thread and starts counting there.
pub fn start() {
    COUNT.with(|c| c.set(Some(0)));
}

/// Stops counting on the calling thread; the floating-point operations counted there since [`start`] (0 when it
/// was not counting).
pub fn stop() -> u64 {
    COUNT.with(|c| c.take()).unwrap_or(0)
}

/// Whether the calling thread is counting.
pub fn counting() -> bool {
    COUNT.with(|c| c.get().is_some())
}

/// Adds `forward` operations and `backward_passes` times as many for the backward, when the calling thread is
/// counting (for products computed outside this crate's functions).
pub fn add(forward: u64, backward_passes: u64) {
    COUNT.with(|c| {
        if let Some(n) = c.get() {
            c.set(Some(n + forward * (1 + backward_passes)));
        }
    });
}

/// Counts a convolution `x` `[batch, c_in, h, w]` by `weight` `[c_out, c_in, kh, kw]` with square `stride` and
/// `padding` (when counting): its forward, and one backward product for each of `x` and `weight` that is tracked.
pub(crate) fn count_conv2d<B: Backend>(
    x: &Tensor<B, 4>,
    weight: &Tensor<B, 4>,
    stride: usize,
    padding: usize,
) {
    if !counting() {
        return;
    }
    let ([b, c_in, h, w], [c_out, _, kh, kw]) = (x.dims(), weight.dims());
    let out = |n: usize, k: usize| (n + 2 * padding).saturating_sub(k) / stride.max(1) + 1;
    let backward = tracked(x) as u64 + tracked(weight) as u64;
    add(
        conv2d(b, c_in, c_out, [kh, kw], [out(h, kh), out(w, kw)]),
        backward,
    );
}

/// Counts `x wᵀ`, `x` `[rows, in]`, `w` `[out, in]` (when counting): its forward, and one backward product for
/// each of `x` and `w` that is tracked.
pub(crate) fn count_linear<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) {
    if !counting() {
        return;
    }
    let ([rows, _], [out, inp]) = (x.dims(), w.dims());
    add(
        matmul(rows, out, inp),
        tracked(x) as u64 + tracked(w) as u64,
    );
}

/// Counts attention over `q` `[batch, n_q, heads * d]`, `k`, `v` `[batch, n_kv, heads * d]` (head-major
/// `[batch * heads, n, d]` with `heads = 1`) when counting: its two products, and twice that for the backward when
/// any input is tracked.
pub(crate) fn count_attention<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    heads: usize,
) {
    if !counting() {
        return;
    }
    let ([b, n_q, c], n_kv, heads) = (q.dims(), k.dims()[1], heads.max(1));
    let backward = tracked(q) || tracked(k) || tracked(v);
    add(
        attention(b * heads, n_q, n_kv, c / heads),
        2 * backward as u64,
    );
}

/// Whether `t` is tracked by autodiff (a parameter that requires its gradient, or computed from one): whether the
/// backward will differentiate through it. Intermediate tensors are seen as tracked on `Autodiff<Flex>` only (the
/// backend the CPU benchmarks run); elsewhere only tensors that require their gradient.
pub(crate) fn tracked<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    if t.is_require_grad() {
        return true;
    }
    #[cfg(feature = "flex")]
    if std::any::TypeId::of::<B>() == std::any::TypeId::of::<crate::flex::AdFlex>() {
        let p: crate::flex::AdPrimitive = crate::cast(t.clone().into_primitive().tensor());
        return !p.node.requirement.is_none();
    }
    false
}

/// Operations of a convolution: `2 * batch * c_out * h_out * w_out * c_in * kh * kw` (one group).
pub fn conv2d(batch: usize, c_in: usize, c_out: usize, kernel: [usize; 2], out: [usize; 2]) -> u64 {
    2 * (batch * c_out * out[0] * out[1]) as u64 * (c_in * kernel[0] * kernel[1]) as u64
}

/// Operations of a `[m, k] x [k, n]` matrix product: `2 * m * n * k`.
pub fn matmul(m: usize, n: usize, k: usize) -> u64 {
    2 * (m * n) as u64 * k as u64
}

/// Operations of attention's two products (`q kᵀ` and `p v`) over `batch_heads` heads of `d` values:
/// `4 * batch_heads * n_q * n_kv * d`.
pub fn attention(batch_heads: usize, n_q: usize, n_kv: usize, d: usize) -> u64 {
    2 * matmul(batch_heads * n_q, n_kv, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_count_two_operations_per_multiply_add() {
        // A 3x3 convolution of 2 x 320 x 32 x 32 to 320 channels: 2 * 2*320*32*32 outputs * 320*9 inputs each.
        assert_eq!(conv2d(2, 320, 320, [3, 3], [32, 32]), 3_774_873_600);
        assert_eq!(matmul(2048, 1280, 320), 2 * 2048 * 1280 * 320);
        // Attention: q kᵀ and p v, each 2 * n_q * n_kv * d per head.
        assert_eq!(attention(16, 1024, 1024, 40), 2 * 2 * 16 * 1024 * 1024 * 40);
    }

    #[cfg(feature = "flex")]
    #[test]
    fn calls_count_their_forward_and_the_backward_their_tracked_inputs_need() {
        use burn::backend::{Autodiff, Flex};
        use burn::tensor::Distribution;
        type A = Autodiff<Flex>;
        let d = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<A, 4>::random([2, 3, 5, 6], normal, &d);
        let w = Tensor::<A, 4>::random([4, 3, 3, 3], normal, &d);
        let fwd = conv2d(2, 3, 4, [3, 3], [5, 6]);
        let count = |f: &dyn Fn()| {
            start();
            f();
            stop()
        };
        // Nothing tracked: the forward only; input and weight tracked: two backward products more.
        assert_eq!(
            count(&|| drop(crate::conv2d(x.clone(), w.clone(), None, 1, 1))),
            fwd
        );
        let (xg, wg) = (x.clone().require_grad(), w.clone().require_grad());
        assert_eq!(
            count(&|| drop(crate::conv2d(xg.clone(), wg.clone(), None, 1, 1))),
            3 * fwd
        );
        // An intermediate computed from a tracked tensor is tracked; a frozen weight adds no backward product.
        let h = xg.clone() * 2.0;
        assert_eq!(
            count(&|| drop(crate::conv2d(h.clone(), w.clone(), None, 1, 1))),
            2 * fwd
        );
        // Stride 2, padding 1: 3 x 3 outputs.
        assert_eq!(
            count(&|| drop(crate::conv2d(x.clone(), w.clone(), None, 2, 1))),
            conv2d(2, 3, 4, [3, 3], [3, 3])
        );
        let rows = Tensor::<A, 2>::random([7, 5], normal, &d).require_grad();
        let lw = Tensor::<A, 2>::random([9, 5], normal, &d);
        assert_eq!(
            count(&|| drop(crate::linear(rows.clone(), lw.clone()))),
            2 * matmul(7, 9, 5)
        );
        // Attention: 2 heads of 4 over 3 queries and 6 keys; tracked: twice the forward for the backward.
        let q = Tensor::<A, 3>::random([1, 3, 8], normal, &d).require_grad();
        let kv = Tensor::<A, 3>::random([1, 6, 8], normal, &d);
        let att = attention(2, 3, 6, 4);
        let mha = || {
            drop(crate::multi_head_attention(
                q.clone(),
                kv.clone(),
                kv.clone(),
                2,
                false,
            ))
        };
        assert_eq!(count(&mha), 3 * att);
        // Off: nothing is counted.
        drop(crate::linear(rows.clone(), lw.clone()));
        assert_eq!(stop(), 0);
    }
}
