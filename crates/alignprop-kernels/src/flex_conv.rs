//! The backward of stride-1 "same" convolutions (SD's 3x3 convolutions) on the CPU backend as shifted GEMMs,
//! with no im2col buffer.
//!
//! burn's convolution backward (through its autodiff: a transposed convolution for the input gradient and a
//! convolution for the weight gradient) made a 3x3 convolution's forward + backward 1.9x PyTorch's at SD shapes.
//! Here the input of each image is zero-padded once into `[c_in, (h + 2p) * (w + 2p)]` rows; on that padded grid
//! every kernel tap `(ky, kx)` is the same matrix shifted by `ky * (w + 2p) + kx` elements, and `dout` is laid on
//! the padded width with zeros in the `2p` extra columns of each row. Then
//! `dW[:, :, ky, kx] = dout_pad · x_pad[:, shift..]ᵀ` and `dx_pad[:, shift..] += W[:, :, ky, kx]ᵀ · dout_pad`:
//! `k * k` GEMMs each (all of rayon's threads inside), then `dx` is cropped out of `dx_pad`.
//!
//! The forward is burn's own kernel (measured faster than the forward as shifted GEMMs: `k * k` GEMMs with
//! `K = c_in` that each read and write the whole output, against burn's one GEMM per tile with `K = k * k * c_in`).
//! Taken for `Autodiff<Flex>`, f32, stride 1, dilation 1, one group, odd square kernels of at least 3 with padding
//! `(k - 1) / 2`; everything else (and inference) goes to burn's `conv2d` with burn's backward.

use std::any::TypeId;

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use rayon::prelude::*;

use crate::flex::{AdFlex, AdPrimitive, View, cast, f32_values, flex_tensor, mm_strided};

#[derive(Clone, Copy, Debug)]
struct Geometry {
    b: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    k: usize,
    p: usize,
}

impl Geometry {
    /// Width of the padded grid (also the row pitch of the uncropped output).
    fn wp(&self) -> usize {
        self.w + 2 * self.p
    }
    /// Floats per padded input row (one channel): the padded image plus `k` spare zeros that the last tap's
    /// shifted view reads past the end.
    fn len(&self) -> usize {
        (self.h + 2 * self.p) * self.wp() + self.k
    }
    /// Positions of the uncropped output (`h` rows of the padded width).
    fn n(&self) -> usize {
        self.h * self.wp()
    }
    fn taps(&self) -> usize {
        self.k * self.k
    }
    fn shift(&self, tap: usize) -> usize {
        (tap / self.k) * self.wp() + tap % self.k
    }
    /// View of tap `tap` of the weight `[c_out, c_in, k, k]` as a `c_out x c_in` matrix.
    fn weight_tap(&self, w: &[f32], tap: usize) -> View {
        View {
            ptr: w[tap..].as_ptr(),
            rs: (self.c_in * self.taps()) as isize,
            cs: self.taps() as isize,
        }
    }
}

/// `conv2d(x, weight, bias)` with stride 1, dilation 1, one group and padding `(k - 1) / 2` on a `k x k` kernel,
/// with the shifted-GEMM backward.
///
/// `x`: `[batch, c_in, h, w]`, `weight`: `[c_out, c_in, k, k]`, `bias`: `[c_out]` -> `[batch, c_out, h, w]`.
/// Returns the inputs back when this kernel does not apply (see the module docs).
#[allow(clippy::type_complexity)]
pub fn conv2d_same<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    stride: usize,
    padding: usize,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 1>>)> {
    let [b, c_in, h, w] = x.dims();
    let [c_out, wc_in, kh, kw] = weight.dims();
    let f32s = x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.as_ref().is_none_or(|t| t.dtype() == DType::F32);
    let applies = f32s
        && stride == 1
        && kh == kw
        && kh >= 3
        && kh % 2 == 1
        && padding == (kh - 1) / 2
        && wc_in == c_in
        && bias.as_ref().is_none_or(|t| t.dims() == [c_out])
        && b * h * w > 0;
    // Inference (`Flex`) keeps burn's forward kernel: measured at SD shapes it is faster than the shifted GEMMs
    // (k * k GEMMs with K = c_in each read and write the whole output; burn's one GEMM per tile has
    // K = k * k * c_in). Under autodiff the forward is burn's too and the backward is ours.
    if !applies || TypeId::of::<B>() != TypeId::of::<AdFlex>() {
        return Err((x, weight, bias));
    }
    let g = Geometry {
        b,
        c_in,
        c_out,
        h,
        w,
        k: kh,
        p: padding,
    };
    let prim4 = |t: Tensor<B, 4>| t.into_primitive().tensor();
    let prim1 = |t: Tensor<B, 1>| t.into_primitive().tensor();
    let wrap =
        |p: B::FloatTensorPrimitive| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p));
    let (x, wt): (AdPrimitive, AdPrimitive) = (cast(prim4(x)), cast(prim4(weight)));
    let bias: Option<AdPrimitive> = bias.map(|t| cast(prim1(t)));
    let inner4 =
        |p: &FlexTensor| Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(p.clone()));
    let inner_bias = bias
        .as_ref()
        .map(|t| Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(t.primitive.clone())));
    let y: FlexTensor = conv2d(
        inner4(&x.primitive),
        inner4(&wt.primitive),
        inner_bias,
        ConvOptions::new([1, 1], [padding, padding], [1, 1], 1),
    )
    .into_primitive()
    .tensor();
    let state = ConvState {
        x: x.primitive.clone(),
        weight: wt.primitive.clone(),
        g,
    };
    let out = match bias {
        Some(bias) => match ConvBackward::<3>
            .prepare::<NoCheckpointing>([x.node.clone(), wt.node.clone(), bias.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
        None => match ConvBackward::<2>
            .prepare::<NoCheckpointing>([x.node.clone(), wt.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
    };
    Ok(wrap(cast(out)))
}

/// Image `bi` of `x` `[b, c, h, w]` zero-padded into `[c, len]` rows.
fn pad_image(xs: &[f32], bi: usize, c: usize, g: &Geometry) -> Vec<f32> {
    let (hw, len, wp) = (g.h * g.w, g.len(), g.wp());
    let mut out = vec![0f32; c * len];
    out.par_chunks_mut(len).enumerate().for_each(|(ch, dst)| {
        let src = &xs[(bi * c + ch) * hw..(bi * c + ch + 1) * hw];
        for (y, row) in src.chunks(g.w).enumerate() {
            let o = (y + g.p) * wp + g.p;
            dst[o..o + g.w].copy_from_slice(row);
        }
    });
    out
}

/// `N` parents: input, weight and, when the convolution has one, bias.
#[derive(Debug)]
struct ConvBackward<const N: usize>;

#[derive(Clone, Debug)]
struct ConvState {
    x: FlexTensor,
    weight: FlexTensor,
    g: Geometry,
}

impl<const N: usize> Backward<Flex, N> for ConvBackward<N> {
    type State = ConvState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
        let st = ops.state;
        let wants = |i: usize| ops.parents.get(i).is_some_and(|p| p.is_some());
        let (dx, dw, db) = backward(&dy, &st, wants(0), wants(1), N == 3 && wants(2));
        for (i, grad) in [dx, dw, db].into_iter().enumerate() {
            if let (Some(Some(node)), Some(grad)) = (ops.parents.get(i), grad) {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

/// Gradients for the input, weight and bias (each only when asked for).
fn backward(
    dy: &FlexTensor,
    st: &ConvState,
    want_dx: bool,
    want_dw: bool,
    want_db: bool,
) -> (Option<FlexTensor>, Option<FlexTensor>, Option<FlexTensor>) {
    let g = st.g;
    let (dys, xs, ws) = (f32_values(dy), f32_values(&st.x), f32_values(&st.weight));
    let (n, hw, wp, len) = (g.n(), g.h * g.w, g.wp(), g.len());
    let mut dx = want_dx.then(|| vec![0f32; g.b * g.c_in * hw]);
    let mut dw = want_dw.then(|| vec![0f32; g.c_out * g.c_in * g.taps()]);
    // dy of one image on the padded-width grid, zeros in the extra columns (they must not contribute).
    let mut grid = vec![0f32; g.c_out * n];
    let mut dxpad = vec![0f32; if want_dx { g.c_in * len } else { 0 }];
    for bi in 0..g.b {
        grid.par_chunks_mut(n)
            .zip(dys[bi * g.c_out * hw..(bi + 1) * g.c_out * hw].par_chunks(hw))
            .for_each(|(dst, src)| {
                for (drow, srow) in dst.chunks_mut(wp).zip(src.chunks(g.w)) {
                    drow[..g.w].copy_from_slice(srow);
                }
            });
        let dyv = View::rows(&grid, 0, n);
        if let Some(dw) = dw.as_mut() {
            let xpad = pad_image(&xs, bi, g.c_in, &g);
            for tap in 0..g.taps() {
                let dst = View {
                    ptr: dw[tap..].as_mut_ptr(),
                    rs: (g.c_in * g.taps()) as isize,
                    cs: g.taps() as isize,
                };
                let xt = View::rows(&xpad, g.shift(tap), len).t();
                // SAFETY: dst is tap `tap` of dw (`c_out x c_in`, strided inside dw); `grid` is `c_out x n`; the
                // shifted input rows lie within `len` (see the forward).
                unsafe { mm_strided(g.c_out, g.c_in, n, dst, bi > 0, dyv, xt, 1.0, true) };
            }
        }
        if let Some(dx) = dx.as_mut() {
            dxpad.fill(0.0);
            for tap in 0..g.taps() {
                let dst = View {
                    ptr: dxpad[g.shift(tap)..].as_mut_ptr(),
                    rs: len as isize,
                    cs: 1,
                };
                // SAFETY: dst rows of `n` floats from `shift` lie within `len`; the transposed weight tap spans
                // `c_in x c_out` inside the weight; `grid` is `c_out x n`. Taps run one after another.
                unsafe {
                    mm_strided(
                        g.c_in,
                        n,
                        g.c_out,
                        dst,
                        true,
                        g.weight_tap(&ws, tap).t(),
                        dyv,
                        1.0,
                        true,
                    )
                };
            }
            dx[bi * g.c_in * hw..(bi + 1) * g.c_in * hw]
                .par_chunks_mut(hw)
                .zip(dxpad.par_chunks(len))
                .for_each(|(dst, src)| {
                    for (y, drow) in dst.chunks_mut(g.w).enumerate() {
                        let o = (y + g.p) * wp + g.p;
                        drow.copy_from_slice(&src[o..o + g.w]);
                    }
                });
        }
    }
    let db = want_db.then(|| {
        let mut db = vec![0f32; g.c_out];
        for bi in 0..g.b {
            for (o, d) in db.iter_mut().enumerate() {
                let start = (bi * g.c_out + o) * hw;
                *d += dys[start..start + hw].iter().sum::<f32>();
            }
        }
        flex_tensor(db, vec![g.c_out])
    });
    (
        dx.map(|v| flex_tensor(v, vec![g.b, g.c_in, g.h, g.w])),
        dw.map(|v| flex_tensor(v, vec![g.c_out, g.c_in, g.k, g.k])),
        db,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flex::rel_max_diff;
    use burn::tensor::Distribution;

    #[test]
    fn shifted_gemm_conv_matches_burn_conv_forward_and_backward() {
        type A = AdFlex;
        let dev = Default::default();
        // (batch, c_in, c_out, h, w, k, bias): non-square images, 5x5 kernel, no bias.
        for (b, ci, co, h, w, k, with_bias) in [
            (2, 5, 7, 6, 9, 3, true),
            (1, 3, 4, 5, 5, 5, true),
            (2, 4, 3, 7, 4, 3, false),
        ] {
            let p = (k - 1) / 2;
            let x = Tensor::<A, 4>::random([b, ci, h, w], Distribution::Normal(0.0, 1.0), &dev);
            let wt = Tensor::<A, 4>::random([co, ci, k, k], Distribution::Normal(0.0, 0.3), &dev);
            let bias = Tensor::<A, 1>::random([co], Distribution::Normal(0.0, 1.0), &dev);
            let dy = Tensor::<A, 4>::random([b, co, h, w], Distribution::Normal(0.0, 1.0), &dev);
            let run = |fused: bool| {
                let (x, wt, bias) = (
                    x.clone().require_grad(),
                    wt.clone().require_grad(),
                    bias.clone().require_grad(),
                );
                let bias_in = with_bias.then(|| bias.clone());
                let y = if fused {
                    conv2d_same(x.clone(), wt.clone(), bias_in, 1, p)
                        .unwrap_or_else(|_| panic!("shifted-GEMM path taken"))
                } else {
                    conv2d(
                        x.clone(),
                        wt.clone(),
                        bias_in,
                        ConvOptions::new([1, 1], [p, p], [1, 1], 1),
                    )
                };
                let grads = (y.clone() * dy.clone()).sum().backward();
                (
                    y.inner(),
                    x.grad(&grads).unwrap(),
                    wt.grad(&grads).unwrap(),
                    bias.grad(&grads),
                )
            };
            let (y1, dx1, dw1, db1) = run(true);
            let (y0, dx0, dw0, db0) = run(false);
            let case = format!("b{b} ci{ci} co{co} {h}x{w} k{k} bias {with_bias}");
            assert!(rel_max_diff(y1, y0) < 1e-5, "output, {case}");
            assert!(rel_max_diff(dx1, dx0) < 1e-5, "dx, {case}");
            assert!(rel_max_diff(dw1, dw0) < 1e-5, "dw, {case}");
            assert_eq!(db1.is_some(), with_bias, "{case}");
            if let (Some(db1), Some(db0)) = (db1, db0) {
                assert!(rel_max_diff(db1, db0) < 1e-5, "db, {case}");
            }
        }
    }

    #[test]
    fn other_convolutions_fall_back() {
        let dev = Default::default();
        let x = Tensor::<Flex, 4>::random([1, 2, 6, 6], Distribution::Normal(0.0, 1.0), &dev);
        let w3 = Tensor::<Flex, 4>::random([3, 2, 3, 3], Distribution::Normal(0.0, 1.0), &dev);
        let w1 = Tensor::<Flex, 4>::random([3, 2, 1, 1], Distribution::Normal(0.0, 1.0), &dev);
        // stride 2 (downsampling), 1x1, padding 0, f64.
        assert!(conv2d_same(x.clone(), w3.clone(), None, 2, 1).is_err());
        assert!(conv2d_same(x.clone(), w1, None, 1, 0).is_err());
        assert!(conv2d_same(x.clone(), w3.clone(), None, 1, 0).is_err());
        assert!(
            conv2d_same(
                x.clone().cast(DType::F64),
                w3.clone().cast(DType::F64),
                None,
                1,
                1
            )
            .is_err()
        );
        // The inference backend keeps burn's forward.
        assert!(conv2d_same(x, w3, None, 1, 1).is_err());
    }
}
