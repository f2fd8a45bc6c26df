//! LayerNorm over the last dimension on the CPU backend, fused, with its backward.
//!
//! With tensor ops LayerNorm is five passes over the activation (mean, centring, variance, normalisation, affine)
//! and, under autodiff, as many graph nodes with their saved tensors. Here the forward is one task per block of
//! rows: per row a two-pass mean / variance (16-lane partial sums) and `y = (x - mean) * rstd * gamma + beta` in
//! one vectorised pass; the backward recomputes `xhat` from the saved input and per-row statistics, writes `dx` and
//! accumulates `dgamma`, `dbeta` per task in one more pass, the tasks' partial sums added at the end.
//!
//! Taken for `Flex` and `Autodiff<Flex>` with f32 `x` `[rows, features]`, `weight`, `bias` `[features]`.

use std::any::TypeId;

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use rayon::prelude::*;

use crate::flex::{AdFlex, AdPrimitive, cast, f32_values, filled_later, flex_tensor, simd};

/// The inputs of [`layer_norm`], given back when the kernel does not apply.
pub type LayerNormInputs<B> = (Tensor<B, 2>, Tensor<B, 1>, Tensor<B, 1>);

/// Rows per rayon task (rows are 320 to 1280 features in the networks).
const ROWS_PER_TASK: usize = 16;

/// LayerNorm of `x` `[rows, features]` over the features with `weight`, `bias` `[features]`, fused (module docs);
/// the inputs back unless the backend is `Flex` or `Autodiff<Flex>` and every tensor is f32.
pub fn layer_norm<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    bias: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, 2>, LayerNormInputs<B>> {
    let [rows, f] = x.dims();
    let applies = [x.dtype(), weight.dtype(), bias.dtype()] == [DType::F32; 3]
        && weight.dims() == [f]
        && bias.dims() == [f]
        && rows * f > 0;
    let is_flex = TypeId::of::<B>() == TypeId::of::<Flex>();
    if !applies || !(is_flex || TypeId::of::<B>() == TypeId::of::<AdFlex>()) {
        return Err((x, weight, bias));
    }
    let prim2 = |t: Tensor<B, 2>| t.into_primitive().tensor();
    let prim1 = |t: Tensor<B, 1>| t.into_primitive().tensor();
    let wrap =
        |p: B::FloatTensorPrimitive| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p));
    if is_flex {
        let (x, g, b): (FlexTensor, FlexTensor, FlexTensor) =
            (cast(prim2(x)), cast(prim1(weight)), cast(prim1(bias)));
        let (y, _) = forward(&x, &g, &b, eps);
        return Ok(wrap(cast(y)));
    }
    let (x, g, b): (AdPrimitive, AdPrimitive, AdPrimitive) =
        (cast(prim2(x)), cast(prim1(weight)), cast(prim1(bias)));
    let (y, stats) = forward(&x.primitive, &g.primitive, &b.primitive, eps);
    let out = match LayerNormBackward
        .prepare::<NoCheckpointing>([x.node.clone(), g.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            LayerNormState {
                x: x.primitive.clone(),
                gamma: g.primitive.clone(),
                stats,
            },
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Ok(wrap(cast(out)))
}

/// `y` and per row `(mean, 1 / sqrt(var + eps))`.
fn forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    eps: f64,
) -> (FlexTensor, Vec<(f32, f32)>) {
    let shape = x.layout().shape().to_vec();
    let (rows, f) = (shape[0], shape[1]);
    let xs = f32_values(x);
    let (gs, bs) = (f32_values(gamma), f32_values(beta));
    let mut y = filled_later(rows * f);
    let mut stats = vec![(0f32, 0f32); rows];
    y.par_chunks_mut(f * ROWS_PER_TASK)
        .zip(xs.par_chunks(f * ROWS_PER_TASK))
        .zip(stats.par_chunks_mut(ROWS_PER_TASK))
        .for_each(|((yb, xb), sb)| {
            for ((yr, xr), st) in yb.chunks_mut(f).zip(xb.chunks(f)).zip(sb) {
                let mean = simd::sum(xr) / f as f32;
                let var = simd::centred_square_sum(xr, mean) / f as f32;
                let rstd = 1.0 / (var + eps as f32).sqrt();
                simd::layer_norm_row(xr, &gs, &bs, mean, rstd, yr);
                *st = (mean, rstd);
            }
        });
    (flex_tensor(y, shape), stats)
}

#[derive(Debug)]
struct LayerNormBackward;

#[derive(Clone, Debug)]
struct LayerNormState {
    x: FlexTensor,
    gamma: FlexTensor,
    stats: Vec<(f32, f32)>,
}

impl Backward<Flex, 3> for LayerNormBackward {
    type State = LayerNormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
        let (dx, dgamma, dbeta) = backward(&dy, &ops.state);
        let [px, pg, pb] = ops.parents;
        for (parent, grad) in [(px, dx), (pg, dgamma), (pb, dbeta)] {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

/// With `xhat = (x - mean) * rstd` per row and `f` features: `dbeta = sum_rows dy`, `dgamma = sum_rows dy * xhat`,
/// `dx = rstd * (dy * gamma - mean_f(dy * gamma) - xhat * mean_f(dy * gamma * xhat))`.
fn backward(dy: &FlexTensor, st: &LayerNormState) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = st.x.layout().shape().to_vec();
    let (rows, f) = (shape[0], shape[1]);
    let (xs, dys, gs) = (f32_values(&st.x), f32_values(dy), f32_values(&st.gamma));
    let mut dx = filled_later(rows * f);
    // Per task: its rows' share of dgamma and dbeta, added up afterwards.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(f * ROWS_PER_TASK)
        .zip(xs.par_chunks(f * ROWS_PER_TASK))
        .zip(dys.par_chunks(f * ROWS_PER_TASK))
        .zip(st.stats.par_chunks(ROWS_PER_TASK))
        .map(|(((dxb, xb), dyb), sb)| {
            let (mut dg, mut db) = (vec![0f32; f], vec![0f32; f]);
            for (((dxr, xr), dyr), &(mean, rstd)) in dxb
                .chunks_mut(f)
                .zip(xb.chunks(f))
                .zip(dyb.chunks(f))
                .zip(sb)
            {
                let (s1, s2) = simd::layer_norm_grad_sums(xr, dyr, &gs, mean, rstd);
                let p = [mean, rstd, s1 / f as f32, s2 / f as f32];
                simd::layer_norm_dx(xr, dyr, &gs, p, dxr, &mut dg, &mut db);
            }
            (dg, db)
        })
        .collect();
    let (mut dgamma, mut dbeta) = (vec![0f32; f], vec![0f32; f]);
    for (dg, db) in &partials {
        simd::add_into(&mut dgamma, dg);
        simd::add_into(&mut dbeta, db);
    }
    (
        flex_tensor(dx, shape),
        flex_tensor(dgamma, vec![f]),
        flex_tensor(dbeta, vec![f]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flex::rel_max_diff;
    use burn::tensor::Distribution;

    /// Value and the gradients of the input, weight and bias equal the tensor-op LayerNorm, over row counts that
    /// are and are not multiples of the task size and feature counts off the lane width; f64 falls back.
    #[test]
    fn fused_layer_norm_matches_tensor_ops_forward_and_backward() {
        type A = AdFlex;
        let d = Default::default();
        for (rows, f) in [(77, 768), (33, 37), (1, 5)] {
            let x = Tensor::<A, 2>::random([rows, f], Distribution::Normal(0.5, 3.0), &d);
            let g0 =
                Tensor::<A, 2>::random([1, f], Distribution::Normal(1.0, 0.5), &d).reshape([f]);
            let b0 =
                Tensor::<A, 2>::random([1, f], Distribution::Normal(0.0, 0.5), &d).reshape([f]);
            let dy = Tensor::<A, 2>::random([rows, f], Distribution::Normal(0.0, 1.0), &d);
            let run = |fused: bool| {
                let (x, g, b) = (
                    x.clone().require_grad(),
                    g0.clone().require_grad(),
                    b0.clone().require_grad(),
                );
                let y = if fused {
                    layer_norm(x.clone(), g.clone(), b.clone(), 1e-5)
                        .unwrap_or_else(|_| panic!("the kernel applies"))
                } else {
                    crate::tensor_ops::layer_norm(x.clone(), g.clone(), b.clone(), 1e-5)
                };
                let grads = (y.clone() * dy.clone()).sum().backward();
                (
                    y.inner(),
                    x.grad(&grads).unwrap(),
                    g.grad(&grads).unwrap(),
                    b.grad(&grads).unwrap(),
                )
            };
            let (a, e) = (run(true), run(false));
            assert!(rel_max_diff(a.0, e.0) < 1e-5, "y {rows}x{f}");
            assert!(rel_max_diff(a.1, e.1) < 1e-4, "dx {rows}x{f}");
            assert!(rel_max_diff(a.2, e.2) < 1e-5, "dgamma {rows}x{f}");
            assert!(rel_max_diff(a.3, e.3) < 1e-5, "dbeta {rows}x{f}");
            let inference = layer_norm(
                x.clone().inner(),
                g0.clone().inner(),
                b0.clone().inner(),
                1e-5,
            )
            .unwrap_or_else(|_| panic!("the kernel applies"));
            let reference = crate::tensor_ops::layer_norm(
                x.inner(),
                g0.clone().inner(),
                b0.clone().inner(),
                1e-5,
            );
            assert!(
                rel_max_diff(inference, reference) < 1e-5,
                "inference {rows}x{f}"
            );
        }
        let x = Tensor::<Flex, 2>::ones([2, 3], &d).cast(DType::F64);
        let w = Tensor::<Flex, 1>::ones([3], &d).cast(DType::F64);
        assert!(layer_norm(x, w.clone(), w, 1e-5).is_err());
    }
}
