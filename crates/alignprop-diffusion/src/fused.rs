//! Fused CPU kernels for ops that burn's tensor API cannot make fast, with their autodiff backward.
//!
//! GroupNorm written with tensor ops takes several full passes over the activation (mean, centring, variance,
//! normalisation, affine) and, under autodiff, a graph of as many nodes. Here it is one kernel on the CPU backend
//! (`Flex`): per `(batch, group)` a two-pass mean/variance, then `y = x * scale + shift` with the affine folded
//! in, in parallel over rayon's pool; and one backward kernel registered as a custom autodiff op for
//! `Autodiff<Flex>` (gradients for the input, gamma and beta).
//!
//! Dispatch is by backend type at run time ([`group_norm`] returns `None` for any other backend, dtype or
//! checkpointing strategy, and callers fall back to the tensor-op version), so model code stays generic over
//! `B: Backend` with no extra trait bound on users' code, and every backend keeps working unchanged.

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

type AdFlex = Autodiff<Flex, NoCheckpointing>;
type AdPrimitive = <AdFlex as BackendTypes>::FloatTensorPrimitive;

/// Moves `t` into type `U` when `T` is `U` (checked by the caller with `TypeId`).
fn cast<T: 'static, U: 'static>(t: T) -> U {
    let boxed: Box<dyn Any> = Box::new(t);
    *boxed
        .downcast::<U>()
        .expect("fused: backend type checked before the cast")
}

fn f32_values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().unwrap().to_vec()),
    }
}

fn flex_tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Group normalisation of `x` `[batch, channels, spatial]` with per-channel `gamma`, `beta` `[channels]`, fused.
///
/// Returns `None` (and gives the inputs back) unless the backend is `Flex` or `Autodiff<Flex>` and every tensor
/// is f32; the caller then computes it with tensor ops.
#[allow(clippy::type_complexity)]
pub fn group_norm<B: Backend>(
    x: Tensor<B, 3>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    groups: usize,
    eps: f64,
) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 1>, Tensor<B, 1>)> {
    let f32s = x.dtype() == DType::F32 && gamma.dtype() == DType::F32 && beta.dtype() == DType::F32;
    let [_, c, _] = x.dims();
    if !f32s || groups == 0 || c % groups != 0 {
        return Err((x, gamma, beta));
    }
    let prim = |t: Tensor<B, 3>| t.into_primitive().tensor();
    let prim1 = |t: Tensor<B, 1>| t.into_primitive().tensor();
    let wrap =
        |p: B::FloatTensorPrimitive| Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(p));
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        let (x, g, b): (FlexTensor, FlexTensor, FlexTensor) =
            (cast(prim(x)), cast(prim1(gamma)), cast(prim1(beta)));
        let (y, _, _) = forward(&x, &g, &b, groups, eps);
        return Ok(wrap(cast(y)));
    }
    if TypeId::of::<B>() == TypeId::of::<AdFlex>() {
        let (x, g, b): (AdPrimitive, AdPrimitive, AdPrimitive) =
            (cast(prim(x)), cast(prim1(gamma)), cast(prim1(beta)));
        let (y, mean, rstd) = forward(&x.primitive, &g.primitive, &b.primitive, groups, eps);
        let out = match GroupNormBackward
            .prepare::<NoCheckpointing>([x.node.clone(), g.node.clone(), b.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                GroupNormState {
                    x: x.primitive.clone(),
                    gamma: g.primitive.clone(),
                    mean,
                    rstd,
                    groups,
                },
                y,
            ),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        return Ok(wrap(cast(out)));
    }
    Err((x, gamma, beta))
}

/// Forward kernel: `y`, and per `(batch, group)` the mean and `1 / sqrt(var + eps)`.
fn forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    groups: usize,
    eps: f64,
) -> (FlexTensor, Vec<f32>, Vec<f32>) {
    let shape = x.layout().shape().to_vec();
    let (b, c, s) = (shape[0], shape[1], shape[2]);
    let cpg = c / groups;
    let n = cpg * s;
    let xs = f32_values(x);
    let (gs, bs) = (f32_values(gamma), f32_values(beta));
    let mut y = vec![0f32; b * c * s];
    let mut stats = vec![(0f32, 0f32); b * groups];
    y.par_chunks_mut(n)
        .zip(xs.par_chunks(n))
        .zip(stats.par_iter_mut())
        .enumerate()
        .for_each(|(bg, ((yg, xg), st))| {
            let mean = xg.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = xg
                .iter()
                .map(|&v| {
                    let d = v as f64 - mean;
                    d * d
                })
                .sum::<f64>()
                / n as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            let g0 = (bg % groups) * cpg;
            for ch in 0..cpg {
                let scale = gs[g0 + ch] as f64 * rstd;
                let shift = bs[g0 + ch] as f64 - mean * scale;
                let (scale, shift) = (scale as f32, shift as f32);
                let (yc, xc) = (&mut yg[ch * s..(ch + 1) * s], &xg[ch * s..(ch + 1) * s]);
                for (o, &v) in yc.iter_mut().zip(xc) {
                    *o = v * scale + shift;
                }
            }
            *st = (mean as f32, rstd as f32);
        });
    let (mean, rstd) = stats.into_iter().unzip();
    (flex_tensor(y, shape), mean, rstd)
}

#[derive(Debug)]
struct GroupNormBackward;

#[derive(Clone, Debug)]
struct GroupNormState {
    x: FlexTensor,
    gamma: FlexTensor,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    groups: usize,
}

impl Backward<Flex, 3> for GroupNormBackward {
    type State = GroupNormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
        let st = ops.state;
        let (dx, dgamma, dbeta) = backward(&dy, &st);
        let [px, pg, pb] = ops.parents;
        if let Some(node) = px {
            grads.register::<Flex>(node.id, dx);
        }
        if let Some(node) = pg {
            grads.register::<Flex>(node.id, dgamma);
        }
        if let Some(node) = pb {
            grads.register::<Flex>(node.id, dbeta);
        }
    }
}

/// Backward kernel. With `xhat = (x - mean) * rstd` per group and `n` elements per group:
/// `dbeta_c = sum dy`, `dgamma_c = sum dy * xhat` (over batch and spatial), and
/// `dx = rstd * (dy * gamma_c - mean_g(dy * gamma) - xhat * mean_g(dy * gamma * xhat))`.
fn backward(dy: &FlexTensor, st: &GroupNormState) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = st.x.layout().shape().to_vec();
    let (b, c, s) = (shape[0], shape[1], shape[2]);
    let groups = st.groups;
    let cpg = c / groups;
    let n = cpg * s;
    let xs = f32_values(&st.x);
    let dys = f32_values(dy);
    let gs = f32_values(&st.gamma);
    let mut dx = vec![0f32; b * c * s];
    // Per (batch, channel): sum dy * xhat and sum dy, reduced over the batch afterwards.
    let mut partial = vec![(0f64, 0f64); b * c];
    dx.par_chunks_mut(n)
        .zip(xs.par_chunks(n).zip(dys.par_chunks(n)))
        .zip(partial.par_chunks_mut(cpg))
        .enumerate()
        .for_each(|(bg, ((dxg, (xg, dyg)), part))| {
            let (mean, rstd) = (st.mean[bg], st.rstd[bg]);
            let g0 = (bg % groups) * cpg;
            let (mut sum_dyg, mut sum_dyg_xhat) = (0f64, 0f64);
            for ch in 0..cpg {
                let gamma = gs[g0 + ch] as f64;
                let (mut sdy, mut sdy_xhat) = (0f64, 0f64);
                for (&v, &d) in xg[ch * s..(ch + 1) * s]
                    .iter()
                    .zip(&dyg[ch * s..(ch + 1) * s])
                {
                    let xhat = ((v - mean) * rstd) as f64;
                    sdy += d as f64;
                    sdy_xhat += d as f64 * xhat;
                }
                part[ch] = (sdy_xhat, sdy);
                sum_dyg += gamma * sdy;
                sum_dyg_xhat += gamma * sdy_xhat;
            }
            let (a, bb) = (
                (sum_dyg / n as f64) as f32,
                (sum_dyg_xhat / n as f64) as f32,
            );
            for ch in 0..cpg {
                let gamma = gs[g0 + ch];
                let range = ch * s..(ch + 1) * s;
                for ((o, &v), &d) in dxg[range.clone()]
                    .iter_mut()
                    .zip(&xg[range.clone()])
                    .zip(&dyg[range])
                {
                    let xhat = (v - mean) * rstd;
                    *o = rstd * (d * gamma - a - xhat * bb);
                }
            }
        });
    let mut dgamma = vec![0f32; c];
    let mut dbeta = vec![0f32; c];
    for bi in 0..b {
        for ch in 0..c {
            let (g, bt) = partial[bi * c + ch];
            dgamma[ch] += g as f32;
            dbeta[ch] += bt as f32;
        }
    }
    (
        flex_tensor(dx, shape),
        flex_tensor(dgamma, vec![c]),
        flex_tensor(dbeta, vec![c]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// The composed (tensor-op) group norm the fused kernel replaces.
    fn reference<B: Backend>(
        x: Tensor<B, 3>,
        g: Tensor<B, 1>,
        b: Tensor<B, 1>,
        groups: usize,
    ) -> Tensor<B, 3> {
        let [bs, c, s] = x.dims();
        let xg = x.reshape([bs, groups, c / groups * s]);
        let mean = xg.clone().mean_dim(2);
        let centred = xg - mean;
        let var = centred.clone().square().mean_dim(2);
        let y = (centred / (var + 1e-5).sqrt()).reshape([bs, c, s]);
        y * g.reshape([1, c, 1]) + b.reshape([1, c, 1])
    }

    fn max_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
        (a - b)
            .abs()
            .max()
            .into_scalar()
            .to_string()
            .parse()
            .unwrap()
    }

    #[test]
    fn fused_group_norm_matches_tensor_ops_forward_and_backward() {
        type A = AdFlex;
        let d = Default::default();
        let x = Tensor::<A, 3>::random([2, 8, 10], Distribution::Normal(0.5, 2.0), &d);
        let g = Tensor::<A, 1>::random([8], Distribution::Normal(1.0, 0.5), &d);
        let b = Tensor::<A, 1>::random([8], Distribution::Normal(0.0, 0.5), &d);
        let dy = Tensor::<A, 3>::random([2, 8, 10], Distribution::Normal(0.0, 1.0), &d);
        let run = |fused: bool| {
            let (x, g, b) = (
                x.clone().require_grad(),
                g.clone().require_grad(),
                b.clone().require_grad(),
            );
            let y = if fused {
                group_norm(x.clone(), g.clone(), b.clone(), 4, 1e-5).unwrap()
            } else {
                reference(x.clone(), g.clone(), b.clone(), 4)
            };
            let grads = (y.clone() * dy.clone()).sum().backward();
            (
                y.inner(),
                x.grad(&grads).unwrap(),
                g.grad(&grads).unwrap(),
                b.grad(&grads).unwrap(),
            )
        };
        let (y1, dx1, dg1, db1) = run(true);
        let (y0, dx0, dg0, db0) = run(false);
        assert!(max_diff(y1, y0) < 1e-5);
        assert!(max_diff(dx1, dx0) < 1e-4);
        assert!(max_diff(dg1, dg0) < 1e-4);
        assert!(max_diff(db1, db0) < 1e-4);
        // The inner backend takes the fused path too; f64 and other backends fall back.
        let xi = x.inner();
        assert!(group_norm(xi.clone(), g.clone().inner(), b.clone().inner(), 4, 1e-5).is_ok());
        let x64 = xi.cast(DType::F64);
        assert!(
            group_norm(
                x64,
                g.inner().cast(DType::F64),
                b.inner().cast(DType::F64),
                4,
                1e-5
            )
            .is_err()
        );
    }
}
