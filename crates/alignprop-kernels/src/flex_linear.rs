//! Linear layers `y = x wᵀ + b` on the CPU backend: one GEMM per thread straight into the output, the bias as the
//! GEMM's starting value, and the backward's three products the same way.
//!
//! burn's `x.matmul(w.transpose()) + b` on `Flex` runs burn-flex's matmul (an output buffer, a GEMM with rayon
//! inside it), then the broadcast add: a second full pass over the output and a second buffer; under autodiff the
//! bias's gradient is a separate sum. Here:
//!
//! - Forward: the output rows start as copies of the bias (no zeroed buffer: every value is written once before the
//!   GEMM accumulates into it), then the product is split across rayon's threads along the output's longer side
//!   (rows of `x` or features of `w`), each part one single-threaded GEMM on a strided view: `wᵀ` is `w` read with
//!   swapped strides, never copied.
//! - Backward: `dx = dy w` (`[rows, out] x [out, in]`) and `dw = dyᵀ x` (`[out, rows] x [rows, in]`, `dyᵀ` a
//!   view) split the same way; `db` is the column sums of `dy`, in parallel over blocks of rows.
//!
//! - bf16 (opt-in, [`crate::flex_bf16`]): the forward's and the input gradient's products with both operands rounded
//!   to bf16 and f32 sums, on CPUs with AVX512_BF16; `dw` and `db` stay f32.
//!
//! Taken for `Flex` and `Autodiff<Flex>` with f32 `x`, `w`, `b`; every other backend or dtype gets the inputs back.
//! Shapes: `x` `[rows, in]`, `w` `[out, in]` (PyTorch's layout), `b` `[out]`, `y` `[rows, out]`.

use std::any::TypeId;

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use crate::flex::{
    AdFlex, View, f32_values, filled_later, flex_tensor, layer_with_bias, par_mm, simd,
};
use crate::flex_bf16;

/// The inputs of [`linear`], given back when the kernel does not apply.
pub type LinearInputs<B> = (Tensor<B, 2>, Tensor<B, 2>, Option<Tensor<B, 1>>);

/// `x wᵀ + b` for `x` `[rows, in]`, `w` `[out, in]`, `b` `[out]` -> `[rows, out]` on `Flex` / `Autodiff<Flex>`
/// in f32 (module docs); the inputs back otherwise.
pub fn linear<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Result<Tensor<B, 2>, LinearInputs<B>> {
    let [rows, inp] = x.dims();
    let [out, w_in] = w.dims();
    let applies = x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && bias
            .as_ref()
            .is_none_or(|b| b.dtype() == DType::F32 && b.dims() == [out])
        && w_in == inp
        && rows * inp * out > 0;
    let is_flex = TypeId::of::<B>() == TypeId::of::<Flex>();
    if !applies || !(is_flex || TypeId::of::<B>() == TypeId::of::<AdFlex>()) {
        return Err((x, w, bias));
    }
    let dims = Dims { rows, inp, out };
    let run = |xs: &[f32], ws: &[f32], bias: Option<&[f32]>| {
        flex_tensor(forward(xs, ws, bias, dims), vec![rows, out])
    };
    let state = |x, w| LinearState { x, w, dims };
    Ok(layer_with_bias(
        (x, w, bias),
        run,
        state,
        (LinearBackward::<2>, LinearBackward::<3>),
    ))
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    rows: usize,
    inp: usize,
    out: usize,
}

/// `y = x wᵀ + b`: the rows of `y` start as the bias (or the GEMM overwrites them when there is none).
fn forward(xs: &[f32], ws: &[f32], bias: Option<&[f32]>, d: Dims) -> Vec<f32> {
    let mut y = filled_later(d.rows * d.out);
    if let Some(b) = bias {
        y.par_chunks_mut(d.out * 64)
            .for_each(|rows| rows.chunks_mut(d.out).for_each(|r| r.copy_from_slice(b)));
    }
    let x = View::rows(xs, 0, d.inp);
    let wt = View::rows(ws, 0, d.inp).t();
    product(d.rows, d.out, d.inp, &mut y, bias.is_some(), x, wt);
    y
}

/// [`par_mm`], or its bf16 version when switched on and the shape and CPU allow ([`crate::flex_bf16`]): the
/// forward's `x wᵀ` and the input gradient's `dy w` (the weight gradient stays f32).
fn product(m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, a: View, b: View) {
    if !(flex_bf16::wants(m, n, k) && flex_bf16::par_mm_bf16(m, n, k, dst, accumulate, a, b)) {
        par_mm(m, n, k, dst, accumulate, a, b);
    }
}

/// `N` parents: input, weight and, when the layer has one, bias.
#[derive(Debug)]
struct LinearBackward<const N: usize>;

#[derive(Clone, Debug)]
struct LinearState {
    x: FlexTensor,
    w: FlexTensor,
    dims: Dims,
}

impl<const N: usize> Backward<Flex, N> for LinearBackward<N> {
    type State = LinearState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
        let st = ops.state;
        let d = st.dims;
        let dys = f32_values(&dy);
        let dyv = View::rows(&dys, 0, d.out);
        let parent = |i: usize| ops.parents.get(i).and_then(|p| p.as_ref());
        if let Some(node) = parent(0) {
            // dx = dy w: [rows, out] x [out, in].
            let ws = f32_values(&st.w);
            let mut dx = filled_later(d.rows * d.inp);
            product(
                d.rows,
                d.inp,
                d.out,
                &mut dx,
                false,
                dyv,
                View::rows(&ws, 0, d.inp),
            );
            grads.register::<Flex>(node.id, flex_tensor(dx, vec![d.rows, d.inp]));
        }
        if let Some(node) = parent(1) {
            // dw = dyᵀ x: [out, rows] x [rows, in].
            let xs = f32_values(&st.x);
            let mut dw = filled_later(d.out * d.inp);
            par_mm(
                d.out,
                d.inp,
                d.rows,
                &mut dw,
                false,
                dyv.t(),
                View::rows(&xs, 0, d.inp),
            );
            grads.register::<Flex>(node.id, flex_tensor(dw, vec![d.out, d.inp]));
        }
        if N == 3
            && let Some(node) = parent(2)
        {
            grads.register::<Flex>(node.id, flex_tensor(column_sums(&dys, d), vec![d.out]));
        }
    }
}

/// `db[o] = sum_r dy[r, o]`: blocks of [`SUM_ROWS`] whole rows in parallel, each summed row by row into its own
/// partial (vectorised, contiguous), then the partials added in block order: the same sums in the same order
/// whatever the thread count. (Column blocks summed down the rows read `dy` in strided pieces and split unevenly
/// across two threads: `[2048, 1280]` 0.26-0.49 ms, this 0.09-0.11; AMD EPYC, AVX-512, 2 threads.)
fn column_sums(dys: &[f32], d: Dims) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = dys
        .par_chunks(SUM_ROWS * d.out)
        .map(|block| {
            let mut acc = block[..d.out].to_vec();
            for row in block.chunks_exact(d.out).skip(1) {
                simd::add_into(&mut acc, row);
            }
            acc
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut db = parts.next().unwrap_or_else(|| vec![0.0; d.out]);
    for p in parts {
        simd::add_into(&mut db, &p);
    }
    db
}

/// Rows per partial sum of [`column_sums`].
const SUM_ROWS: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flex::rel_max_diff;
    use burn::tensor::Distribution;

    /// Value and the gradients of `x`, `w` and `b` equal burn's `x.matmul(w.transpose()) + b`, with and without
    /// the bias, with either input frozen, over shapes that split by rows, by columns, and run serially.
    #[test]
    fn equals_matmul_plus_bias_in_value_and_gradient() {
        type A = AdFlex;
        let dev = Default::default();
        let r = |s: [usize; 2]| Tensor::<A, 2>::random(s, Distribution::Normal(0.0, 1.0), &dev);
        for (rows, inp, out) in [(300, 40, 70), (9, 33, 500), (3, 4, 5), (77, 64, 2)] {
            for (with_bias, x_grad, w_grad) in [
                (true, true, true),
                (false, true, true),
                (true, false, true),
                (true, true, false),
            ] {
                let (x0, w0) = (r([rows, inp]), r([out, inp]));
                let b0 = r([1, out]).reshape([out]);
                let g = r([rows, out]);
                let run = |ours: bool| {
                    let x = if x_grad {
                        x0.clone().require_grad()
                    } else {
                        x0.clone()
                    };
                    let w = if w_grad {
                        w0.clone().require_grad()
                    } else {
                        w0.clone()
                    };
                    let b = b0.clone().require_grad();
                    let bias = with_bias.then(|| b.clone());
                    let y = if ours {
                        linear(x.clone(), w.clone(), bias)
                            .unwrap_or_else(|_| panic!("the kernel applies"))
                    } else {
                        let y = x.clone().matmul(w.clone().transpose());
                        match bias {
                            Some(b) => y + b.unsqueeze::<2>(),
                            None => y,
                        }
                    };
                    let grads = (y.clone() * g.clone()).sum().backward();
                    (y.inner(), x.grad(&grads), w.grad(&grads), b.grad(&grads))
                };
                let (a, e) = (run(true), run(false));
                let case = format!("{rows}x{inp}->{out} bias {with_bias} dx {x_grad} dw {w_grad}");
                assert!(rel_max_diff(a.0, e.0) < 1e-5, "y, {case}");
                assert_eq!(a.1.is_some(), x_grad, "{case}");
                assert_eq!(a.2.is_some(), w_grad, "{case}");
                assert_eq!(a.3.is_some(), with_bias, "{case}");
                if let (Some(p), Some(q)) = (a.1, e.1) {
                    assert!(rel_max_diff(p, q) < 1e-5, "dx, {case}");
                }
                if let (Some(p), Some(q)) = (a.2, e.2) {
                    assert!(rel_max_diff(p, q) < 1e-5, "dw, {case}");
                }
                if let (Some(p), Some(q)) = (a.3, e.3) {
                    assert!(rel_max_diff(p, q) < 1e-5, "db, {case}");
                }
            }
        }
    }

    /// On `Flex` the inference path gives burn's value on a strided (transposed) input; f64 falls back.
    #[test]
    fn inference_on_a_view_and_fallbacks() {
        let dev = Default::default();
        // `[64, 700]` as a transposed view of a `[700, 64]` buffer.
        let x =
            Tensor::<Flex, 2>::random([700, 64], Distribution::Normal(0.0, 1.0), &dev).transpose();
        let w = Tensor::<Flex, 2>::random([96, 700], Distribution::Normal(0.0, 1.0), &dev);
        let b = Tensor::<Flex, 1>::random([96], Distribution::Normal(0.0, 1.0), &dev);
        let ours =
            linear(x.clone(), w.clone(), Some(b.clone())).unwrap_or_else(|_| panic!("applies"));
        let burn = x.clone().matmul(w.clone().transpose()) + b.clone().unsqueeze::<2>();
        assert!(rel_max_diff(ours, burn) < 1e-5);
        let f64s = linear(
            x.cast(DType::F64),
            w.cast(DType::F64),
            Some(b.cast(DType::F64)),
        );
        assert!(f64s.is_err());
    }
}
