//! Stride-1 "same" convolutions (SD's 3x3 and 1x1 convolutions) on the CPU backend: forward and backward as
//! GEMMs on the zero-padded grid.
//!
//! The input of each image is zero-padded once into `[c_in, (h + 2p) * (w + 2p)]` rows; on that padded grid every
//! kernel tap `(ky, kx)` is the same matrix shifted by `ky * (w + 2p) + kx` elements, and the output is computed on
//! the padded width (`h` rows of `w + 2p` positions, the `2p` extra columns cropped at the end).
//!
//! - Forward ([`forward`]): per block of grid positions, the im2col rows are contiguous runs of the padded input
//!   (row `(i, tap)` is `x_pad[i, shift(tap) + q0 ..]`: a `memcpy`, no gather, no channels-last copy), multiplied
//!   by the weight as it lies (`[c_out, c_in * k * k]`) in one GEMM with `K = c_in * k * k` straight into the
//!   output; the blocks (about 1 MiB of im2col each) run in parallel, one GEMM per task. burn-flex's forward
//!   (channels-last copy, per-element im2col gather into 512-position tiles of up to 12 MiB, a scatter back to
//!   channels-first) was measured 1.2-1.5x slower at SD shapes (AMD EPYC, 2 threads: 3x3 320 -> 320 at 32x32
//!   batch 2: 30 -> 26 ms; the SD1.5 VAE decode to 256x256: 7.6 -> 5.6 s).
//!   3x3 convolutions with 32+ channels on both sides and 256+ positions (every SD UNet level from 16x16 up, the
//!   whole VAE decoder but its first and last convolutions) take Winograd's F(2x2, 3x3) instead
//!   ([`crate::flex_winograd`]: 4/9 of the multiplications; 1.2-1.9x faster at those shapes).
//!   Maps too small for Winograd (8x8 and 4x4 in the UNet, and the 4-channel first and last convolutions) gather
//!   their im2col at the real positions of all images instead ([`forward_gathered`]: one GEMM, no padded-width
//!   positions to crop; 1.1-1.8x faster there).
//! - Input gradient: the forward (im2col or Winograd) on `dy` with the flipped, transposed weight
//!   (`W'[i, o, ky, kx] = W[o, i, k-1-ky, k-1-kx]`); on small maps ([`input_gradient_gathered`]) one GEMM with the
//!   weight as it lies, `T = Wᵀ dy`, and a col2im sum of `T`'s shifted rows (no flipped copy of the weight).
//! - Weight gradient ([`weight_gradient`]): `dW[:, :, ky, kx] = dy_pad · x_pad[:, shift..]ᵀ` with `K` = the
//!   positions, `dy` laid on the padded width with zeros in the extra columns; one task per (tap, block of output
//!   channels), each a single-threaded GEMM per image.
//!
//! - 1x1 convolutions (shortcuts, SD1.5's `proj_in` / `proj_out`, the VAE's quant convs): per image the GEMM they
//!   are, `y = W x + bias` with the bias as the starting value, `dx = Wᵀ dy`, `dW += dy xᵀ` (strided views, no
//!   copies), each split across threads. burn's 1x1 backward measured 165 ms for `[2, 320, 64, 64]` 320 -> 320
//!   (31 GFLOP/s, AMD EPYC 2 threads).
//!
//! Taken for `Flex` and `Autodiff<Flex>`, f32, stride 1, dilation 1, one group, odd square kernels with padding
//! `(k - 1) / 2`; everything else goes to burn's `conv2d` with burn's backward.

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
    AdFlex, SharedMut, View, f32_values, filled_later, flex_tensor, layer_with_bias, mm_strided,
    par_mm, with_scratch,
};
use crate::flex_winograd as winograd;

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
}

/// `conv2d(x, weight, bias)` with stride 1, dilation 1, one group and padding `(k - 1) / 2` on a `k x k` kernel:
/// the padded-grid GEMM forward and, under autodiff, its backward (see the module docs).
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
        && kh % 2 == 1
        && padding == (kh - 1) / 2
        && wc_in == c_in
        && bias.as_ref().is_none_or(|t| t.dims() == [c_out])
        && b * h * w > 0;
    let is_flex = TypeId::of::<B>() == TypeId::of::<Flex>();
    if !applies || !(is_flex || TypeId::of::<B>() == TypeId::of::<AdFlex>()) {
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
    let run = |xs: &[f32], ws: &[f32], bias: Option<&[f32]>| {
        let y = if g.k == 1 {
            forward_1x1(xs, ws, bias, &g)
        } else {
            forward(xs, ws, bias, &g)
        };
        flex_tensor(y, vec![b, c_out, h, w])
    };
    let state = |x, weight| ConvState { x, weight, g };
    Ok(layer_with_bias(
        (x, weight, bias),
        run,
        state,
        (ConvBackward::<2>, ConvBackward::<3>),
    ))
}

/// Grid positions per forward task: the im2col block (`c_in * k * k` rows of this many values) stays within
/// about 1 MiB, between 64 and 512 positions, a multiple of 16.
fn forward_tile(kdim: usize) -> usize {
    ((1 << 18) / kdim.max(1)).clamp(64, 512) / 16 * 16
}

/// The forward: `y[bi, o, :, :] = bias[o] + sum_(i, tap) W[o, i, tap] x_pad[bi, i, shift(tap) + q]` over the
/// padded-width grid positions `q`, cropped. Each task takes one image's block of grid positions, copies its
/// im2col rows (row `(i, tap)` is the contiguous run `x_pad[i, shift(tap) + q0 ..]`: a `memcpy`, no gather) and
/// multiplies them by the weight `[c_out, c_in * k * k]` as it lies, in one GEMM with `K = c_in * k * k`, straight
/// into the uncropped output; the crop adds the bias. 3x3 shapes where Winograd pays ([`winograd::pays`]) go to
/// [`winograd::forward`] instead, and those whose whole im2col matrix is small ([`GATHERED_MAX`]) to
/// [`forward_gathered`]. Returns `[b, c_out, h, w]` values.
fn forward(xs: &[f32], ws: &[f32], bias: Option<&[f32]>, g: &Geometry) -> Vec<f32> {
    if g.k == 3 {
        let shape = winograd_shape(g);
        if winograd::pays(&shape) {
            return winograd::forward(xs, ws, bias, &shape);
        }
    }
    if g.c_in * g.taps() * g.b * g.h * g.w <= GATHERED_MAX {
        return forward_gathered(xs, ws, bias, g);
    }
    forward_padded_grid(xs, ws, bias, g)
}

/// The Winograd view of a 3x3 geometry.
fn winograd_shape(g: &Geometry) -> winograd::Shape {
    winograd::Shape {
        b: g.b,
        c_in: g.c_in,
        c_out: g.c_out,
        h: g.h,
        w: g.w,
    }
}

/// [`forward`] on the padded grid (the module docs): per image and block of grid positions, the im2col rows are
/// contiguous runs of the padded input. Returns `[b, c_out, h, w]` values.
fn forward_padded_grid(xs: &[f32], ws: &[f32], bias: Option<&[f32]>, g: &Geometry) -> Vec<f32> {
    let (n, hw, wp, len, taps) = (g.n(), g.h * g.w, g.wp(), g.len(), g.taps());
    let kdim = g.c_in * taps;
    let tile = forward_tile(kdim);
    let tiles = n.div_ceil(tile);
    let xpad: Vec<Vec<f32>> = (0..g.b).map(|bi| pad_image(xs, bi, g.c_in, g)).collect();
    let mut grid = filled_later(g.b * g.c_out * n);
    let grid_ptr = SharedMut(grid.as_mut_ptr());
    (0..g.b * tiles).into_par_iter().for_each(|task| {
        let (bi, q0) = (task / tiles, (task % tiles) * tile);
        let cols = tile.min(n - q0);
        // Every one of the `kdim * cols` values is copied in below before the GEMM reads it.
        with_scratch(kdim * cols, |col| {
            let xp = &xpad[bi];
            for ci in 0..g.c_in {
                for tap in 0..taps {
                    let src = ci * len + g.shift(tap) + q0;
                    let row = (ci * taps + tap) * cols;
                    col[row..row + cols].copy_from_slice(&xp[src..src + cols]);
                }
            }
            let dst = View {
                // SAFETY (of the offset): image `bi`'s grid is `c_out x n` at `bi * c_out * n`; `q0 + cols <= n`.
                ptr: unsafe { grid_ptr.get().add(bi * g.c_out * n + q0) },
                rs: n as isize,
                cs: 1,
            };
            // SAFETY: `dst` is columns `q0 .. q0 + cols` of image `bi`'s `c_out x n` grid, written by this task
            // only; the weight is `c_out x kdim` row-major; `col` holds `kdim x cols` row-major.
            unsafe {
                mm_strided(
                    g.c_out,
                    cols,
                    kdim,
                    dst,
                    false,
                    View::rows(ws, 0, kdim),
                    View::rows(col, 0, cols),
                    1.0,
                    false,
                )
            };
        })
    });
    let mut y = filled_later(g.b * g.c_out * hw);
    y.par_chunks_mut(hw)
        .zip(grid.par_chunks(n))
        .enumerate()
        .for_each(|(row, (dst, src))| {
            let b = bias.map_or(0.0, |b| b[row % g.c_out]);
            for (drow, srow) in dst.chunks_mut(g.w).zip(src.chunks(wp)) {
                for (d, &s) in drow.iter_mut().zip(srow) {
                    *d = s + b;
                }
            }
        });
    y
}

/// Largest im2col matrix (floats) of [`forward_gathered`]: 8 MiB, every shape of the SD UNet below Winograd's
/// threshold at batch 2 (8x8 and 4x4 maps, the 4-channel first and last convolutions at 32x32 latents).
const GATHERED_MAX: usize = 1 << 21;

/// The forward for small maps, all images in one GEMM: `y = W · col` with `col` `[c_in * k * k, b * h * w]`
/// gathered at the real positions only (zeros where a tap falls in the padding), positions image-major.
///
/// On the padded grid a `w`-wide map computes `w + 2p` positions per row, the extra ones cropped: 1.5x the work at
/// 4x4, 1.25x at 8x8, and each image's GEMM is too thin to split. Measured (AMD EPYC, AVX-512, 2 threads, batch 2,
/// padded grid -> gathered): 256 -> 256 at 4x4 0.90 -> 0.49 ms, 512 -> 256 at 4x4 0.81 -> 0.52 ms, 512 -> 256 at
/// 8x8 1.83 -> 1.63 ms, 384 -> 256 at 8x8 1.42 -> 1.27 ms, 4 -> 64 at 32x32 0.19 -> 0.16 ms, 64 -> 4 at 32x32
/// 0.26 -> 0.24 ms; Winograd stays ahead where it applies at batch 2 (128 -> 128 at 16x16: 0.74 against 0.85 ms).
/// Returns `[b, c_out, h, w]` values.
fn forward_gathered(xs: &[f32], ws: &[f32], bias: Option<&[f32]>, g: &Geometry) -> Vec<f32> {
    let (hw, taps) = (g.h * g.w, g.taps());
    let (kdim, positions) = (g.c_in * taps, g.b * hw);
    let mut col = filled_later(kdim * positions);
    // Row `(ci, tap)` of `col`: for each image and output row `y`, the input row `y + ky - p` shifted by
    // `kx - p`, zeros outside the image. Every value is written.
    col.par_chunks_mut(taps * positions)
        .enumerate()
        .for_each(|(ci, rows)| {
            for (tap, row) in rows.chunks_mut(positions).enumerate() {
                let (ky, kx) = (tap / g.k, tap % g.k);
                // Output columns `x0 .. x1` read input columns `x0 + kx - p ..`.
                let x0 = g.p.saturating_sub(kx);
                let x1 = (g.w + g.p).saturating_sub(kx).min(g.w);
                for (bi, img) in row.chunks_mut(hw).enumerate() {
                    let src = &xs[(bi * g.c_in + ci) * hw..][..hw];
                    for (y, out) in img.chunks_mut(g.w).enumerate() {
                        let iy = (y + ky).wrapping_sub(g.p);
                        if iy >= g.h || x0 >= x1 {
                            out.fill(0.0);
                            continue;
                        }
                        out[..x0].fill(0.0);
                        out[x1..].fill(0.0);
                        let s = iy * g.w + x0 + kx - g.p;
                        out[x0..x1].copy_from_slice(&src[s..s + x1 - x0]);
                    }
                }
            }
        });
    let mut grid = filled_later(g.c_out * positions);
    par_mm(
        g.c_out,
        positions,
        kdim,
        &mut grid,
        false,
        View::rows(ws, 0, kdim),
        View::rows(&col, 0, positions),
    );
    let mut y = filled_later(g.b * g.c_out * hw);
    y.par_chunks_mut(hw).enumerate().for_each(|(row, dst)| {
        let (bi, o) = (row / g.c_out, row % g.c_out);
        let b = bias.map_or(0.0, |b| b[o]);
        for (d, &s) in dst.iter_mut().zip(&grid[o * positions + bi * hw..][..hw]) {
            *d = s + b;
        }
    });
    y
}

/// The 1x1 forward: per image `y = W x + bias` (`[c_out, c_in] x [c_in, h w]`), the bias as the GEMM's starting
/// value, the positions split across threads. Returns `[b, c_out, h, w]` values.
fn forward_1x1(xs: &[f32], ws: &[f32], bias: Option<&[f32]>, g: &Geometry) -> Vec<f32> {
    let hw = g.h * g.w;
    let mut y = filled_later(g.b * g.c_out * hw);
    if let Some(bias) = bias {
        y.par_chunks_mut(hw)
            .enumerate()
            .for_each(|(row, r)| r.fill(bias[row % g.c_out]));
    }
    for (yb, xb) in y.chunks_mut(g.c_out * hw).zip(xs.chunks(g.c_in * hw)) {
        let (w, x) = (View::rows(ws, 0, g.c_in), View::rows(xb, 0, hw));
        par_mm(g.c_out, hw, g.c_in, yb, bias.is_some(), w, x);
    }
    y
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

/// The weight of the input gradient's convolution: `W'[i, o, ky, kx] = W[o, i, k-1-ky, k-1-kx]`, so that
/// `dx = conv_same(dy, W')` (stride 1, "same" padding).
///
/// A task writes `TILE` rows `i` of `W'`, `TILE` kernels `o` at a time: it reads `TILE` runs of `TILE * taps`
/// floats (one per row `o` of `W`) and writes `TILE` runs of `TILE * taps` (one per row `i`), a few cache lines each
/// rather than one `taps`-long piece per row of either (the weight is usually not in cache when the backward runs).
/// Measured (AMD EPYC, 2 threads, weights out of cache): 512 -> 256 channels 0.97 -> 0.48 ms with the `o` blocks
/// against whole rows `o`.
fn flipped_transposed(ws: &[f32], g: &Geometry) -> Vec<f32> {
    const TILE: usize = 16;
    let taps = g.taps();
    let mut out = filled_later(ws.len());
    out.par_chunks_mut(TILE * g.c_out * taps)
        .enumerate()
        .for_each(|(t, dst)| {
            let (i0, n_i) = (t * TILE, dst.len() / (g.c_out * taps));
            for o0 in (0..g.c_out).step_by(TILE) {
                for ii in 0..n_i {
                    for o in o0..(o0 + TILE).min(g.c_out) {
                        let src = &ws[(o * g.c_in + i0 + ii) * taps..][..taps];
                        let d = &mut dst[(ii * g.c_out + o) * taps..][..taps];
                        for (d, s) in d.iter_mut().zip(src.iter().rev()) {
                            *d = *s;
                        }
                    }
                }
            }
        });
    out
}

/// The input gradient for small maps (the shapes whose forward is [`forward_gathered`]) without flipping the
/// weight: `T = Wᵀ · dy` with `W` read as it lies (`[c_out, c_in * k * k]`, a transposed view) and `dy` as
/// `[c_out, b * h * w]` (positions image-major), one GEMM with `K = c_out`; then the col2im sum
/// `dx[bi, i, y, x] = sum_tap T[(i, tap), (bi, y - ky + p, x - kx + p)]` over the taps that land inside the map.
///
/// The flipped, transposed weight ([`flipped_transposed`]) is as large as the weight (the UNet's 256- and 512-channel
/// weights sit on its 8x8 and 4x4 maps) and was written for one use; `T` holds `c_in * k * k` values per position,
/// a few hundred KiB there. Measured (AMD EPYC, AVX-512, 2 threads, batch 2, weights out of cache; flipped weight
/// and gathered forward -> this): 256 <- 256 channels at 8x8 1.01 -> 0.79 ms, 512 <- 256 at 8x8 1.96 -> 1.61,
/// 384 <- 256 at 8x8 1.52 -> 1.20, 256 <- 256 at 4x4 0.46 -> 0.39, 512 <- 256 at 4x4 1.62 -> 0.80, 4 <- 64 at
/// 32x32 0.13 -> 0.09; but 64 <- 4 at 32x32 0.08 -> 0.28 (`K = 4`, `T` 16x larger than `dx`): taken for
/// `c_in <= 2 c_out` only. Returns `[b, c_in, h, w]` values.
fn input_gradient_gathered(dys: &[f32], ws: &[f32], g: &Geometry) -> Vec<f32> {
    let (hw, taps) = (g.h * g.w, g.taps());
    let (kdim, positions) = (g.c_in * taps, g.b * hw);
    // dy as `[c_out, b * hw]`: image `bi`'s rows side by side (a view of `dy` itself for one image).
    let gathered;
    let dyc: &[f32] = if g.b == 1 {
        dys
    } else {
        let mut v = filled_later(g.c_out * positions);
        v.par_chunks_mut(positions)
            .enumerate()
            .for_each(|(o, row)| {
                for (bi, dst) in row.chunks_mut(hw).enumerate() {
                    dst.copy_from_slice(&dys[(bi * g.c_out + o) * hw..][..hw]);
                }
            });
        gathered = v;
        &gathered
    };
    let mut t = filled_later(kdim * positions);
    par_mm(
        kdim,
        positions,
        g.c_out,
        &mut t,
        false,
        View::rows(ws, 0, kdim).t(),
        View::rows(dyc, 0, positions),
    );
    let mut dx = vec![0f32; g.b * g.c_in * hw];
    dx.par_chunks_mut(hw).enumerate().for_each(|(row, dst)| {
        let (bi, i) = (row / g.c_in, row % g.c_in);
        for tap in 0..taps {
            let (ky, kx) = (tap / g.k, tap % g.k);
            // dx columns `x0 .. x1` read T columns `x0 + p - kx ..` (inside the map).
            let x0 = kx.saturating_sub(g.p);
            let x1 = (g.w + kx).saturating_sub(g.p).min(g.w);
            if x0 >= x1 {
                continue;
            }
            let src = &t[(i * taps + tap) * positions + bi * hw..][..hw];
            for (y, out) in dst.chunks_mut(g.w).enumerate() {
                let sy = (y + g.p).wrapping_sub(ky);
                if sy < g.h {
                    let s = sy * g.w + x0 + g.p - kx;
                    crate::flex::simd::add_into(&mut out[x0..x1], &src[s..s + x1 - x0]);
                }
            }
        }
    });
    dx
}

/// Gradients for the input, weight and bias (each only when asked for).
///
/// `dx` is the forward's convolution of `dy` with the flipped, transposed weight ([`flipped_transposed`]): one
/// GEMM per block of positions with `K = c_out * k * k`; or, on small maps, [`input_gradient_gathered`]. `dW` is
/// `k * k` GEMMs per image over all positions: `dW[:, :, tap] += dy_pad · x_pad[:, shift(tap)..]ᵀ` (`K` = the
/// positions; rayon's threads inside each GEMM).
fn backward(
    dy: &FlexTensor,
    st: &ConvState,
    want_dx: bool,
    want_dw: bool,
    want_db: bool,
) -> (Option<FlexTensor>, Option<FlexTensor>, Option<FlexTensor>) {
    let g = st.g;
    let (dys, xs, ws) = (f32_values(dy), f32_values(&st.x), f32_values(&st.weight));
    if g.k == 1 {
        return backward_1x1(&dys, &xs, &ws, &g, [want_dx, want_dw, want_db]);
    }
    let dx = want_dx.then(|| {
        let transposed = Geometry {
            c_in: g.c_out,
            c_out: g.c_in,
            ..g
        };
        let winograd = g.k == 3 && winograd::pays(&winograd_shape(&transposed));
        let small = g.c_in * g.taps() * g.b * g.h * g.w <= GATHERED_MAX;
        if !winograd && small && g.c_in <= 2 * g.c_out {
            return input_gradient_gathered(&dys, &ws, &g);
        }
        forward(&dys, &flipped_transposed(&ws, &g), None, &transposed)
    });
    let dw = want_dw.then(|| weight_gradient(&dys, &xs, &g));
    let db = want_db.then(|| bias_gradient(&dys, &g));
    gradients(dx, dw, db, &g)
}

/// `(dx, dw, db)` values as tensors of the input's, the weight's and the bias's shapes.
fn gradients(
    dx: Option<Vec<f32>>,
    dw: Option<Vec<f32>>,
    db: Option<Vec<f32>>,
    g: &Geometry,
) -> (Option<FlexTensor>, Option<FlexTensor>, Option<FlexTensor>) {
    (
        dx.map(|v| flex_tensor(v, vec![g.b, g.c_in, g.h, g.w])),
        dw.map(|v| flex_tensor(v, vec![g.c_out, g.c_in, g.k, g.k])),
        db.map(|v| flex_tensor(v, vec![g.c_out])),
    )
}

/// `db[o] = sum_(bi, position) dy[bi, o, position]`.
fn bias_gradient(dys: &[f32], g: &Geometry) -> Vec<f32> {
    let hw = g.h * g.w;
    let mut db = vec![0f32; g.c_out];
    db.par_iter_mut().enumerate().for_each(|(o, d)| {
        *d = (0..g.b)
            .map(|bi| crate::flex::simd::sum(&dys[(bi * g.c_out + o) * hw..][..hw]))
            .sum();
    });
    db
}

/// The 1x1 backward, per image: `dx = Wᵀ dy` (`[c_in, c_out] x [c_out, h w]`, `Wᵀ` a strided view) and
/// `dW += dy xᵀ` (`[c_out, h w] x [h w, c_in]`), each split across threads; `want` = `[dx, dW, db]`.
fn backward_1x1(
    dys: &[f32],
    xs: &[f32],
    ws: &[f32],
    g: &Geometry,
    want: [bool; 3],
) -> (Option<FlexTensor>, Option<FlexTensor>, Option<FlexTensor>) {
    let hw = g.h * g.w;
    let dx = want[0].then(|| {
        let mut dx = filled_later(g.b * g.c_in * hw);
        for (dxb, dyb) in dx.chunks_mut(g.c_in * hw).zip(dys.chunks(g.c_out * hw)) {
            let (wt, dy) = (View::rows(ws, 0, g.c_in).t(), View::rows(dyb, 0, hw));
            par_mm(g.c_in, hw, g.c_out, dxb, false, wt, dy);
        }
        dx
    });
    let dw = want[1].then(|| {
        let mut dw = filled_later(g.c_out * g.c_in);
        for (bi, (xb, dyb)) in xs
            .chunks(g.c_in * hw)
            .zip(dys.chunks(g.c_out * hw))
            .enumerate()
        {
            let (dy, xt) = (View::rows(dyb, 0, hw), View::rows(xb, 0, hw).t());
            par_mm(g.c_out, g.c_in, hw, &mut dw, bi > 0, dy, xt);
        }
        dw
    });
    let db = want[2].then(|| bias_gradient(dys, g));
    gradients(dx, dw, db, g)
}

/// `dW[o, i, tap] = sum_(bi, q) dy_pad[bi, o, q] x_pad[bi, i, shift(tap) + q]` over the padded-width grid
/// positions `q` (`dy` laid on the padded width with zeros in the extra columns, so they add nothing).
///
/// One task per (tap, block of output channels), each a single-threaded GEMM per image (`K` = the positions)
/// accumulating into its own `[c_out block, c_in]` slice of a tap-major buffer, reordered to `[c_out, c_in, k, k]`
/// at the end. Tasks are at least eight per thread (taps times channel blocks), so the threads stay balanced;
/// gemm's own rayon split of each thin `c_out x c_in` product measured 70-110 GFLOP/s against 140-200 for this
/// (AMD EPYC, 2 threads).
fn weight_gradient(dys: &[f32], xs: &[f32], g: &Geometry) -> Vec<f32> {
    let (n, hw, wp, len, taps) = (g.n(), g.h * g.w, g.wp(), g.len(), g.taps());
    // dy of every image on the padded-width grid.
    let mut grid = filled_later(g.b * g.c_out * n);
    grid.par_chunks_mut(n)
        .zip(dys.par_chunks(hw))
        .for_each(|(dst, src)| {
            for (drow, srow) in dst.chunks_mut(wp).zip(src.chunks(g.w)) {
                drow[..g.w].copy_from_slice(srow);
                drow[g.w..].fill(0.0);
            }
        });
    let xpad: Vec<Vec<f32>> = (0..g.b).map(|bi| pad_image(xs, bi, g.c_in, g)).collect();
    // Tap-major: `[taps, c_out, c_in]`.
    let mut by_tap = filled_later(taps * g.c_out * g.c_in);
    let dst = SharedMut(by_tap.as_mut_ptr());
    // Rows `o0 .. o0 + rows` of tap `tap`'s `c_out x c_in` block, summed over the images; `threaded`: gemm's
    // threads inside each product.
    let block = |tap: usize, o0: usize, rows: usize, threaded: bool| {
        let d = View {
            // SAFETY (of the offset): rows `o0 .. o0 + rows` of tap `tap`'s block lie within `by_tap`.
            ptr: unsafe { dst.get().add((tap * g.c_out + o0) * g.c_in) },
            rs: g.c_in as isize,
            cs: 1,
        };
        for (bi, xp) in xpad.iter().enumerate() {
            let dyv = View::rows(&grid, (bi * g.c_out + o0) * n, n);
            let xt = View::rows(xp, g.shift(tap), len).t();
            // SAFETY: `d` is written by this call only (the callers give each call its own tap and channel
            // block); `dyv` is `rows x n` within image `bi`'s grid; the shifted input rows lie within `len` (see
            // `Geometry::len`).
            unsafe { mm_strided(rows, g.c_in, n, d, bi > 0, dyv, xt, 1.0, threaded) };
        }
    };
    if n < SMALL_GRID {
        (0..taps).for_each(|tap| block(tap, 0, g.c_out, true));
    } else {
        let threads = rayon::current_num_threads();
        let parts = (8 * threads).div_ceil(taps).clamp(1, g.c_out.div_ceil(16));
        let step = g.c_out.div_ceil(parts);
        (0..taps * parts).into_par_iter().for_each(|task| {
            let (tap, o0) = (task / parts, (task % parts) * step);
            let rows = step.min(g.c_out.saturating_sub(o0));
            if rows > 0 {
                block(tap, o0, rows, false);
            }
        });
    }
    tap_major_to_weight(&by_tap, g)
}

/// Grids of fewer positions than this (16x16 maps and smaller) take the weight gradient tap by tap with gemm's
/// threads inside each product: there the per-task split's repeated packing of the wide `x_padᵀ` operand cost more
/// than it saved (measured 29 vs 35 ms at 640 channels 16x16, AMD EPYC 2 threads; 32x32 and larger: 5-40% faster).
const SMALL_GRID: usize = 512;

/// `[taps, c_out, c_in]` -> `[c_out, c_in, taps]` (the weight's layout).
fn tap_major_to_weight(by_tap: &[f32], g: &Geometry) -> Vec<f32> {
    let taps = g.taps();
    let mut dw = filled_later(g.c_out * g.c_in * taps);
    dw.par_chunks_mut(g.c_in * taps)
        .enumerate()
        .for_each(|(o, row)| {
            for (i, cell) in row.chunks_mut(taps).enumerate() {
                for (tap, v) in cell.iter_mut().enumerate() {
                    *v = by_tap[(tap * g.c_out + o) * g.c_in + i];
                }
            }
        });
    dw
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flex::rel_max_diff;
    use burn::tensor::Distribution;
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;

    #[test]
    fn padded_grid_conv_matches_burn_conv_forward_and_backward() {
        type A = AdFlex;
        let dev = Default::default();
        // (batch, c_in, c_out, h, w, k, bias): non-square images, 5x5 kernel, no bias; grids of 512+ positions
        // (the weight gradient's task split, channel blocks of unequal size).
        for (b, ci, co, h, w, k, with_bias) in [
            (2, 5, 7, 6, 9, 3, true),
            (2, 6, 37, 24, 22, 3, true),
            (1, 4, 20, 30, 17, 5, false),
            (2, 24, 40, 19, 21, 1, true),
            (1, 3, 5, 4, 6, 1, false),
            (1, 3, 4, 5, 5, 5, true),
            (2, 4, 3, 7, 4, 3, false),
            // 21 input channels: the flipped weight's tiles of 16 and a partial one (c_in > 2 c_out: the flipped
            // weight with the gathered forward; the small cases above take `input_gradient_gathered`).
            (1, 21, 6, 9, 7, 3, false),
            // Winograd F(2x2, 3x3) for the forward and the input gradient (32+ channels, 256+ positions).
            (1, 32, 40, 17, 19, 3, true),
            // An input gradient above `GATHERED_MAX` and without Winograd (20 < 32 channels): the flipped weight on
            // the padded grid (the 3x3 and 5x5 cases above with c_in <= 2 c_out take `input_gradient_gathered`).
            (1, 30, 20, 90, 90, 3, false),
        ] {
            const { assert!(30 * 9 * 90 * 90 > GATHERED_MAX) };
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
                        .unwrap_or_else(|_| panic!("the padded-grid kernel applies"))
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
        // stride 2 (downsampling), 1x1 with padding, 3x3 without, f64.
        assert!(conv2d_same(x.clone(), w3.clone(), None, 2, 1).is_err());
        assert!(conv2d_same(x.clone(), w1, None, 1, 1).is_err());
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
    }

    #[test]
    fn inference_forward_matches_burn_conv_over_tiles_and_images() {
        let dev = Default::default();
        // An im2col matrix above `GATHERED_MAX`: the padded grid, over more than one tile (45 x 70 positions on
        // the padded width, K = 9 * 30: tiles of 512 positions); small ones (gathered); 5x5 kernels; no bias.
        const { assert!(30 * 9 * 3 * 45 * 68 > GATHERED_MAX) };
        for (b, ci, co, h, w, k, with_bias) in [
            (3, 30, 17, 45, 68, 3, true),
            (1, 2, 5, 4, 3, 3, false),
            (2, 6, 4, 9, 11, 5, true),
        ] {
            let p = (k - 1) / 2;
            let x = Tensor::<Flex, 4>::random([b, ci, h, w], Distribution::Normal(0.0, 1.0), &dev);
            let wt =
                Tensor::<Flex, 4>::random([co, ci, k, k], Distribution::Normal(0.0, 0.3), &dev);
            let bias = with_bias
                .then(|| Tensor::<Flex, 1>::random([co], Distribution::Normal(0.0, 1.0), &dev));
            let ours = conv2d_same(x.clone(), wt.clone(), bias.clone(), 1, p)
                .unwrap_or_else(|_| panic!("the kernel applies"));
            let burn = conv2d(x, wt, bias, ConvOptions::new([1, 1], [p, p], [1, 1], 1));
            let case = format!("b{b} ci{ci} co{co} {h}x{w} k{k} bias {with_bias}");
            assert!(rel_max_diff(ours, burn) < 1e-5, "{case}");
        }
    }

    #[test]
    fn gathered_forward_matches_the_padded_grid() {
        // Maps narrower than the kernel (every tap of an edge column in the padding), 5x5 kernels, one row.
        for (b, ci, co, h, w, k) in [
            (2, 7, 9, 4, 4, 3),
            (1, 3, 5, 1, 1, 3),
            (3, 4, 6, 3, 2, 5),
            (2, 5, 3, 1, 7, 3),
            (1, 2, 4, 6, 1, 5),
        ] {
            let g = Geometry {
                b,
                c_in: ci,
                c_out: co,
                h,
                w,
                k,
                p: (k - 1) / 2,
            };
            let val = |i: usize, m: usize| ((i * m) % 997) as f32 / 997.0 - 0.5;
            let xs: Vec<f32> = (0..b * ci * h * w).map(|i| val(i, 7919)).collect();
            let ws: Vec<f32> = (0..co * ci * k * k).map(|i| val(i, 104729)).collect();
            let bias: Vec<f32> = (0..co).map(|i| val(i, 31)).collect();
            let gathered = forward_gathered(&xs, &ws, Some(&bias), &g);
            // (`forward` takes the padded grid above `GATHERED_MAX` only.)
            let grid = forward_padded_grid(&xs, &ws, Some(&bias), &g);
            let diff = gathered
                .iter()
                .zip(&grid)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "b{b} ci{ci} co{co} {h}x{w} k{k}: {diff}");
        }
    }
}
