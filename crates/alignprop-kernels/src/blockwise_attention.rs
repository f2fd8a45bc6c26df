//! Memory-efficient attention for any backend under autodiff: FlashAttention's algorithm in burn tensor ops.
//!
//! The forward runs in blocks of queries and keeps only the output and each query row's log-sum-exp; the backward
//! recomputes each block's probabilities from them (`P = exp(S - lse)`), so no score or probability matrix outlives
//! its block. Memory is linear in the token count where the tensor-op attention of [`crate::tensor_ops`] (and
//! burn-autodiff's own `attention`, which falls back to it) keeps every probability for the backward: at SD1.5's
//! 64x64 latents with CFG that is ~2 GiB per first-level self-attention.
//!
//! It is a custom autodiff op registered for `Autodiff<I>` with any inner backend `I` ([`attention`]); the
//! [`crate::AutodiffKernels`] set calls it for the autodiff backends the build knows by type. Shapes are head-major:
//! `q` `[batch * heads, n_q, d]`, `k`, `v` `[batch * heads, n_kv, d]`.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorPrimitive};

/// Query rows per block so that one block's `[batch * heads, rows, n_kv]` scores take at most `budget_bytes`.
pub fn block_rows(
    bh: usize,
    n_q: usize,
    n_kv: usize,
    elem_bytes: usize,
    budget_bytes: usize,
) -> usize {
    (budget_bytes / (bh * n_kv * elem_bytes).max(1)).clamp(1, n_q.max(1))
}

/// Scaled scores of the query rows `start..start + rows` against every key, with the causal mask applied:
/// `[bh, rows, n_kv]`.
fn block_scores<I: Backend>(
    q_block: Tensor<I, 3>,
    kt: &Tensor<I, 3>,
    scale: f64,
    causal: bool,
    start: usize,
) -> Tensor<I, 3> {
    let [_, rows, _] = q_block.dims();
    let n_kv = kt.dims()[2];
    let s = (q_block * scale).matmul(kt.clone());
    if causal {
        let mask = Tensor::<I, 2, Bool>::tril_mask([rows, n_kv], start as i64, &s.device());
        s.mask_fill(mask.unsqueeze::<3>(), f32::NEG_INFINITY)
    } else {
        s
    }
}

/// Forward: `softmax(q kᵀ * scale) v` `[bh, n_q, d]` and the log-sum-exp of each score row `[bh, n_q, 1]`.
pub fn forward<I: Backend>(
    q: Tensor<I, 3>,
    k: Tensor<I, 3>,
    v: Tensor<I, 3>,
    scale: f64,
    causal: bool,
    rows: usize,
) -> (Tensor<I, 3>, Tensor<I, 3>) {
    let [bh, n_q, d] = q.dims();
    let kt = crate::contiguous_on_cube(k.swap_dims(1, 2));
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for start in (0..n_q).step_by(rows) {
        let end = (start + rows).min(n_q);
        let s = block_scores(
            q.clone().slice([0..bh, start..end, 0..d]),
            &kt,
            scale,
            causal,
            start,
        );
        let m = s.clone().max_dim(2);
        let p = (s - m.clone()).exp();
        let l = p.clone().sum_dim(2);
        outs.push(p.matmul(v.clone()) / l.clone());
        lses.push(m + l.log());
    }
    (Tensor::cat(outs, 1), Tensor::cat(lses, 1))
}

/// Backward from `dout` `[bh, n_q, d]`: `(dq, dk, dv)`. Per query block, with `P = exp(S - lse)` and
/// `D = rowsum(dout * out)`: `dv += Pᵀ dout`, `dS = P * (dout vᵀ - D)`, `dq = scale dS k`, `dk += scale dSᵀ q`.
#[allow(clippy::too_many_arguments)]
pub fn backward<I: Backend>(
    dout: Tensor<I, 3>,
    q: Tensor<I, 3>,
    k: Tensor<I, 3>,
    v: Tensor<I, 3>,
    out: Tensor<I, 3>,
    lse: Tensor<I, 3>,
    scale: f64,
    causal: bool,
    rows: usize,
) -> (Tensor<I, 3>, Tensor<I, 3>, Tensor<I, 3>) {
    let [bh, n_q, d] = q.dims();
    let kt = crate::contiguous_on_cube(k.clone().swap_dims(1, 2));
    let vt = crate::contiguous_on_cube(v.swap_dims(1, 2));
    let dd = (dout.clone() * out).sum_dim(2); // [bh, n_q, 1]
    let mut dq = Vec::new();
    let mut dk = k.zeros_like();
    let mut dv = k.zeros_like();
    for start in (0..n_q).step_by(rows) {
        let end = (start + rows).min(n_q);
        let range = [0..bh, start..end, 0..d];
        let q_block = q.clone().slice(range.clone());
        let g = dout.clone().slice(range);
        let s = block_scores(q_block.clone(), &kt, scale, causal, start);
        let p = (s - lse.clone().slice([0..bh, start..end, 0..1])).exp();
        dv = dv + p.clone().swap_dims(1, 2).matmul(g.clone());
        let dp = g.matmul(vt.clone());
        let ds = p * (dp - dd.clone().slice([0..bh, start..end, 0..1]));
        dq.push(ds.clone().matmul(k.clone()) * scale);
        dk = dk + ds.swap_dims(1, 2).matmul(q_block) * scale;
    }
    (Tensor::cat(dq, 1), dk, dv)
}

#[derive(Debug)]
struct AttentionBackward;

#[derive(Clone, Debug)]
struct AttentionState<I: Backend> {
    q: I::FloatTensorPrimitive,
    k: I::FloatTensorPrimitive,
    v: I::FloatTensorPrimitive,
    out: I::FloatTensorPrimitive,
    lse: I::FloatTensorPrimitive,
    scale: f64,
    causal: bool,
    rows: usize,
}

fn tensor<I: Backend>(p: I::FloatTensorPrimitive) -> Tensor<I, 3> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

impl<I: Backend> Backward<I, 3> for AttentionBackward {
    type State = AttentionState<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let st = ops.state;
        let dout = tensor::<I>(grads.consume::<I>(&ops.node));
        let (dq, dk, dv) = backward(
            dout,
            tensor(st.q),
            tensor(st.k),
            tensor(st.v),
            tensor(st.out),
            tensor(st.lse),
            st.scale,
            st.causal,
            st.rows,
        );
        let [pq, pk, pv] = ops.parents;
        for (parent, grad) in [(pq, dq), (pk, dk), (pv, dv)] {
            if let Some(node) = parent {
                grads.register::<I>(node.id, grad.into_primitive().tensor());
            }
        }
    }
}

/// `softmax(q kᵀ * scale) v` on `Autodiff<I, C>` as one autodiff op that keeps only `q`, `k`, `v`, the output and
/// the row log-sum-exps for its backward. `q`: `[bh, n_q, d]`, `k`, `v`: `[bh, n_kv, d]` -> `[bh, n_q, d]`; query
/// blocks of `rows` rows.
pub fn attention<I: Backend, C: CheckpointStrategy>(
    q: Tensor<Autodiff<I, C>, 3>,
    k: Tensor<Autodiff<I, C>, 3>,
    v: Tensor<Autodiff<I, C>, 3>,
    scale: f64,
    causal: bool,
    rows: usize,
) -> Tensor<Autodiff<I, C>, 3> {
    let (q, k, v) = (
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    let (out, lse) = forward::<I>(
        tensor(q.primitive.clone()),
        tensor(k.primitive.clone()),
        tensor(v.primitive.clone()),
        scale,
        causal,
        rows,
    );
    let out = out.into_primitive().tensor();
    let result = match AttentionBackward
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            AttentionState::<I> {
                q: q.primitive,
                k: k.primitive,
                v: v.primitive,
                out: out.clone(),
                lse: lse.into_primitive().tensor(),
                scale,
                causal,
                rows,
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{DType, Distribution};

    type A = Autodiff<Flex>;

    /// Blockwise values and gradients equal the tensor-op attention's in f64, for one block and several (with a
    /// ragged last block), causal or not, self- and cross-attention.
    #[test]
    fn blockwise_equals_tensor_op_attention_in_value_and_gradient() {
        let device = Default::default();
        for (n_q, n_kv, causal, rows) in [
            (13, 13, false, 13),
            (13, 13, false, 4),
            (13, 13, true, 5),
            (17, 7, false, 3),
            (1, 9, false, 1),
        ] {
            let t = |n: usize| {
                Tensor::<A, 3>::random(
                    [3, n, 8],
                    Distribution::Normal(0.0, 1.0),
                    (&device, DType::F64),
                )
                .require_grad()
            };
            let (q, k, v) = (t(n_q), t(n_kv), t(n_kv));
            let g =
                Tensor::<A, 3>::random([3, n_q, 8], Distribution::Default, (&device, DType::F64));
            let scale = 1.0 / 8f64.sqrt();
            let ours = attention(q.clone(), k.clone(), v.clone(), scale, causal, rows);
            let reference = crate::tensor_ops::attention_head_major(
                q.clone(),
                k.clone(),
                v.clone(),
                scale,
                causal,
            );
            let diff = |a: Tensor<A, 3>, b: Tensor<A, 3>| -> f64 {
                f64::from((a - b).abs().max().into_scalar())
            };
            assert!(
                diff(ours.clone(), reference.clone()) < 1e-12,
                "values {n_q} {n_kv} {causal} {rows}"
            );
            let ga = (ours * g.clone()).sum().backward();
            let gb = (reference * g).sum().backward();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, b) = (x.grad(&ga).unwrap(), x.grad(&gb).unwrap());
                let d = f64::from((a - b).abs().max().into_scalar());
                assert!(
                    d < 1e-12,
                    "d{name} off by {d} ({n_q} {n_kv} {causal} {rows})"
                );
            }
        }
    }

    #[test]
    fn block_rows_keep_a_block_within_the_budget() {
        assert_eq!(block_rows(16, 4096, 4096, 4, 256 << 20), 1024);
        assert_eq!(block_rows(1, 10, 10, 8, 1 << 30), 10);
        assert_eq!(block_rows(64, 4096, 4096, 4, 1), 1);
    }
}
