//! `x wᵀ` as one autodiff op whose forward and backward products all take contiguous right operands.
//!
//! burn's autodiff differentiates `x.matmul(w.transpose())` with products whose right operand is a transposed view
//! (`dx = dy w`: fine; but the forward `x wᵀ` and, for a contiguous copy of `wᵀ`, the backward `dy (wᵀ)ᵀ`). On burn
//! 0.21's cube backend the autotuned double-buffered unit matmul returns wrong values for transposed right operands
//! with a short inner dimension (see [`crate::linear`]), so this op materialises what it multiplies:
//! forward `y = x T(w)`, backward `dx = dy w` and `dw = T(dy) x`, where `T` is a contiguous transposed copy.
//!
//! Shapes: `x` `[rows, in]`, `w` `[out, in]`, `y` `[rows, out]`.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

/// A contiguous copy of `t` transposed: `[a, b]` -> `[b, a]` (flattening the transposed view makes the backend
/// write it out in order).
pub fn transposed_copy<B: Backend>(t: Tensor<B, 2>) -> Tensor<B, 2> {
    let [a, b] = t.dims();
    t.transpose().reshape([a * b]).reshape([b, a])
}

#[derive(Debug)]
struct LinearBackward;

#[derive(Clone, Debug)]
struct LinearState<I: Backend> {
    x: I::FloatTensorPrimitive,
    w: I::FloatTensorPrimitive,
}

fn tensor<I: Backend>(p: I::FloatTensorPrimitive) -> Tensor<I, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

impl<I: Backend> Backward<I, 2> for LinearBackward {
    type State = LinearState<I>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w) = (tensor::<I>(ops.state.x), tensor::<I>(ops.state.w));
        let dy = tensor::<I>(grads.consume::<I>(&ops.node));
        let [px, pw] = ops.parents;
        if let Some(node) = pw {
            // dw = dyᵀ x: [out, rows] x [rows, in].
            let dw = transposed_copy(dy.clone()).matmul(x);
            grads.register::<I>(node.id, dw.into_primitive().tensor());
        }
        if let Some(node) = px {
            // dx = dy w: [rows, out] x [out, in], `w` contiguous as stored.
            grads.register::<I>(node.id, dy.matmul(w).into_primitive().tensor());
        }
    }
}

/// `x wᵀ` on `Autodiff<I, C>` with contiguous right operands in the forward and the backward (module docs).
pub fn linear<I: Backend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<I, C>, 2>,
    w: Tensor<Autodiff<I, C>, 2>,
) -> Tensor<Autodiff<I, C>, 2> {
    let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
    let y = tensor::<I>(x.primitive.clone())
        .matmul(transposed_copy(tensor::<I>(w.primitive.clone())))
        .into_primitive()
        .tensor();
    let result = match LinearBackward
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            LinearState::<I> {
                x: x.primitive,
                w: w.primitive,
            },
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{DType, Distribution};

    type A = Autodiff<Flex>;

    /// Value and both gradients equal burn's `x.matmul(w.transpose())` in f64, with either input frozen.
    #[test]
    fn equals_matmul_with_transposed_weight_in_value_and_gradient() {
        let d = Default::default();
        let r = |s: [usize; 2]| {
            Tensor::<A, 2>::random(s, Distribution::Normal(0.0, 1.0), (&d, DType::F64))
        };
        for (rows, inp, out) in [(7, 4, 5), (33, 16, 4), (1, 3, 1)] {
            for (x_grad, w_grad) in [(true, true), (true, false), (false, true)] {
                let (x0, w0) = (r([rows, inp]), r([out, inp]));
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
                    let y = if ours {
                        linear(x.clone(), w.clone())
                    } else {
                        x.clone().matmul(w.clone().transpose())
                    };
                    let grads = (y.clone() * g.clone()).sum().backward();
                    (y.inner(), x.grad(&grads), w.grad(&grads))
                };
                let (a, b) = (run(true), run(false));
                let close = |p: Tensor<Flex, 2>, q: Tensor<Flex, 2>| {
                    let e = (p - q.clone()).abs().max().into_scalar();
                    assert!(e < 1e-12, "{rows}x{inp}->{out}: {e}");
                };
                close(a.0, b.0);
                assert_eq!(a.1.is_some(), x_grad);
                assert_eq!(a.2.is_some(), w_grad);
                if let (Some(p), Some(q)) = (a.1, b.1) {
                    close(p, q);
                }
                if let (Some(p), Some(q)) = (a.2, b.2) {
                    close(p, q);
                }
            }
        }
    }
}
