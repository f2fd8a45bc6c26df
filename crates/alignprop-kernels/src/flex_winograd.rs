//! The 3x3 stride-1 "same" convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, arXiv
//! 1509.09308): each 2x2 output tile costs 16 multiplications per (input, output) channel pair instead of 36, so
//! the matrix products do 4/9 of the direct convolution's work.
//!
//! For an output tile `Y` (2x2) at rows `2ty ..`, columns `2tx ..` and the 4x4 input patch `d` around it (rows
//! `2ty - 1 .. 2ty + 3` of the input, zero outside):
//!
//! `Y = Aᵀ [ sum_i (G g_(o,i) Gᵀ) ⊙ (Bᵀ d_i B) ] A`
//!
//! with `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`, `G = [[1, 0, 0], [1/2, 1/2, 1/2],
//! [1/2, -1/2, 1/2], [0, 0, 1]]`, `Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]`. The sum over input channels `i` of the 16
//! elementwise products is 16 independent matrix products, one per element `ξ` of the 4x4 transformed tile:
//! `M_ξ [c_out, tiles] = U_ξ [c_out, c_in] · V_ξ [c_in, tiles]`.
//!
//! - The weight is transformed once per call into `U` `[16, c_out, c_in]` ([`transform_weight`]).
//! - Each task takes one image's block of consecutive tiles (row-major over the tile grid): it transforms the
//!   block's input patches into `V` `[16, c_in, tiles]` (additions only), runs the 16 products (gemm reads `Vᵀ`
//!   and `Uᵀ` column-major, so it packs neither), and transforms `M` `[16, c_out, tiles]` back into the output
//!   tiles with the bias added, straight into `y`. `V` and `M` live in the thread's scratch buffer.
//!
//! The transforms use the factors 1 and 1/2 only, so the rounding error stays that of the direct sum (checked
//! against burn's convolution in the tests below and in `flex_conv`'s).

use rayon::prelude::*;

use crate::flex::{SharedMut, View, filled_later, mm_strided, with_scratch};

/// Elements of a transformed tile (4 x 4).
const XI: usize = 16;

/// Shapes of one call: `x` `[b, c_in, h, w]`, weight `[c_out, c_in, 3, 3]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub b: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    /// Tile rows and columns (2x2 output tiles; a last half tile when `h` or `w` is odd).
    fn tiles(&self) -> (usize, usize) {
        (self.h.div_ceil(2), self.w.div_ceil(2))
    }
    /// Width of the zero-padded input: one zero column left, the rest right (`2 * tile columns + 2`).
    fn pw(&self) -> usize {
        2 * self.tiles().1 + 2
    }
    /// Floats per padded input channel: `2 * tile rows + 2` rows of [`Shape::pw`].
    fn plen(&self) -> usize {
        (2 * self.tiles().0 + 2) * self.pw()
    }
}

/// Whether F(2x2, 3x3) beats the padded-grid im2col GEMM of `flex_conv` for this shape: at least 32 input and
/// output channels and 256 positions. Measured (AMD EPYC, 2 threads, forward with bias, im2col -> Winograd):
/// `[2, 320, 32, 32]` 320 -> 320 23.8 -> 15.0 ms, `[1, 512, 64, 64]` 512 -> 512 121 -> 64 ms, `[1, 256, 128, 128]`
/// 122 -> 71 ms, `[1, 128, 256, 256]` 128 -> 128 128 -> 81 ms, `[2, 128, 16, 16]` 1.08 -> 0.87 ms, `[2, 64, 32, 32]`
/// 1.14 -> 0.97 ms; and where it loses: 8x8 maps (`[1, 256, 8, 8]` 1.12 -> 1.42 ms), 3 or 4 channels on either side
/// (`conv_in`, `conv_out`: 0.4-0.5x).
pub(crate) fn pays(s: &Shape) -> bool {
    s.c_in >= 32 && s.c_out >= 32 && s.h * s.w >= 256
}

/// Tiles per task: about 128-256, so that `V` and `M` (`16 * (c_in + c_out)` floats a tile) stay within 8 MiB
/// and each task reuses the transformed weight over enough tiles (measured: 64-tile blocks at 512 channels and
/// 512-tile blocks at 128 channels were 15-30% slower); the image's tiles split evenly, at least one task per
/// thread, a multiple of 16 (gemm's micro-kernel rows).
fn block_tiles(s: &Shape) -> usize {
    let tmax = ((1 << 21) / (XI * (s.c_in + s.c_out))).clamp(16, 256);
    let (th, tw) = s.tiles();
    let per_image = th * tw;
    let threads = rayon::current_num_threads();
    let mut blocks = per_image.div_ceil(tmax);
    if s.b * blocks < threads {
        blocks = threads.div_ceil(s.b);
    }
    per_image.div_ceil(blocks).div_ceil(16) * 16
}

/// `y = conv2d(x, weight, bias)` (3x3, stride 1, padding 1) by F(2x2, 3x3); see the module docs.
///
/// `xs`: `[b, c_in, h, w]`, `ws`: `[c_out, c_in, 3, 3]`, `bias`: `[c_out]`. Returns `[b, c_out, h, w]` values.
pub(crate) fn forward(xs: &[f32], ws: &[f32], bias: Option<&[f32]>, s: &Shape) -> Vec<f32> {
    let u = transform_weight(ws, s.c_out, s.c_in);
    let (th, tw) = s.tiles();
    let per_image = th * tw;
    let block = block_tiles(s);
    let blocks = per_image.div_ceil(block);
    let (plen, hw) = (s.plen(), s.h * s.w);
    let xpad = pad(xs, s);
    let mut y = filled_later(s.b * s.c_out * hw);
    let y_ptr = SharedMut(y.as_mut_ptr());
    (0..s.b * blocks).into_par_iter().for_each(|task| {
        let (bi, t0) = (task / blocks, (task % blocks) * block);
        let cols = block.min(per_image - t0);
        let (v_len, m_len) = (XI * s.c_in * cols, XI * s.c_out * cols);
        // Every value of `V` and `M` is written (transform, then GEMM without accumulation) before it is read.
        with_scratch(v_len + m_len, |scratch| {
            let (v, m) = scratch.split_at_mut(v_len);
            let image = &xpad[bi * s.c_in * plen..][..s.c_in * plen];
            transform_input(image, v, t0, cols, s);
            for xi in 0..XI {
                let dst = View {
                    ptr: m[xi * s.c_out * cols..].as_mut_ptr(),
                    rs: 1,
                    cs: cols as isize,
                };
                // SAFETY: `M_ξᵀ [cols, c_out] = V_ξᵀ [cols, c_in] · U_ξᵀ [c_in, c_out]`, each view column-major
                // within its slice (`V_ξ` is `c_in x cols`, `U_ξ` `c_out x c_in`, `M_ξ` `c_out x cols`, all
                // row-major); `dst` is this task's scratch.
                unsafe {
                    mm_strided(
                        cols,
                        s.c_out,
                        s.c_in,
                        dst,
                        false,
                        View::rows(v, xi * s.c_in * cols, cols).t(),
                        View::rows(&u, xi * s.c_out * s.c_in, s.c_in).t(),
                        1.0,
                        false,
                    )
                };
            }
            // This task writes only the output tiles `t0 .. t0 + cols` of image `bi` (tiles partition the output),
            // and the pointer covers the whole `y`.
            transform_output(m, y_ptr, bias, bi, t0, cols, s);
        })
    });
    y
}

/// `U[ξ, o, i] = (G g_(o,i) Gᵀ)_ξ` for the weight `[c_out, c_in, 3, 3]`: `[16, c_out, c_in]` values.
fn transform_weight(ws: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let mut u = filled_later(XI * c_out * c_in);
    let u_ptr = SharedMut(u.as_mut_ptr());
    ws.par_chunks(c_in * 9)
        .enumerate()
        .for_each(|(o, row)| transform_weight_row(row, u_ptr, o, c_out, c_in));
    u
}

crate::flex::simd::multiversion!(
    /// Row `o` of [`transform_weight`]: the kernels `row` `[c_in, 3, 3]`, `LANES` input channels at a time.
    transform_weight_row => transform_weight_row_impl(
        row: &[f32],
        u: SharedMut,
        o: usize,
        c_out: usize,
        c_in: usize
    )
);

#[inline(always)]
fn transform_weight_row_impl<const FMA: bool>(
    row: &[f32],
    u: SharedMut,
    o: usize,
    c_out: usize,
    c_in: usize,
) {
    // SAFETY: elements `(xi, o, i)` of `u` for `i < c_in`, written by the task of row `o` only.
    let at = |xi: usize, i: usize| unsafe { u.get().add((xi * c_out + o) * c_in + i) };
    let mut i0 = 0;
    while i0 + LANES <= c_in {
        let g: [[f32; LANES]; 9] =
            std::array::from_fn(|tap| std::array::from_fn(|l| row[(i0 + l) * 9 + tap]));
        for (xi, vals) in weight_tiles(g).iter().enumerate() {
            // SAFETY: `i0 + LANES <= c_in` (see `at`).
            unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), at(xi, i0), LANES) };
        }
        i0 += LANES;
    }
    for i in i0..c_in {
        let g: [[f32; 1]; 9] = std::array::from_fn(|tap| [row[i * 9 + tap]]);
        for (xi, [val]) in weight_tiles(g).into_iter().enumerate() {
            // SAFETY: `i < c_in` (see `at`).
            unsafe { *at(xi, i) = val };
        }
    }
}

/// `G g Gᵀ` for `L` kernels: `g[tap]` holds tap `3 ky + kx` of each; the 4x4 transformed tiles, row-major.
#[inline(always)]
fn weight_tiles<const L: usize>(g: [[f32; L]; 9]) -> [[f32; L]; XI] {
    let half = |a: [f32; L]| -> [f32; L] { std::array::from_fn(|i| 0.5 * a[i]) };
    // `G (a, b, c)ᵀ` = `(a, (a + b + c) / 2, (a - b + c) / 2, c)`.
    let four = |a: [f32; L], b: [f32; L], c: [f32; L]| {
        let ac = add(a, c);
        [a, half(add(ac, b)), half(sub(ac, b)), c]
    };
    // `G g`: per kernel column.
    let cols: [[[f32; L]; 4]; 3] = std::array::from_fn(|c| four(g[c], g[3 + c], g[6 + c]));
    let mut t = [[0f32; L]; XI];
    for r in 0..4 {
        let [a, b, c, d] = four(cols[0][r], cols[1][r], cols[2][r]);
        t[4 * r] = a;
        t[4 * r + 1] = b;
        t[4 * r + 2] = c;
        t[4 * r + 3] = d;
    }
    t
}

/// `x` `[b, c, h, w]` zero-padded per channel into [`Shape::plen`] floats: image at row 1, column 1 of a
/// `(2 * tile rows + 2) x (2 * tile columns + 2)` grid, each padded row stored as its even columns then its odd
/// columns (`tile columns + 1` each), so that every tile's four input columns are unit-stride streams.
fn pad(xs: &[f32], s: &Shape) -> Vec<f32> {
    let (pw, plen) = (s.pw(), s.plen());
    let (tw, half) = (s.tiles().1, pw / 2);
    let mut out = filled_later(s.b * s.c_in * plen);
    out.par_chunks_mut(plen)
        .zip(xs.par_chunks(s.h * s.w))
        .for_each(|(dst, src)| {
            let (top, rest) = dst.split_at_mut(pw);
            top.fill(0.0);
            let (rows, bottom) = rest.split_at_mut(s.h * pw);
            bottom.fill(0.0);
            for (prow, row) in rows.chunks_exact_mut(pw).zip(src.chunks_exact(s.w)) {
                let (even, odd) = prow.split_at_mut(half);
                // Input column `x` is padded column `x + 1`: even `x` -> odd column `x / 2`, odd `x` -> even column
                // `(x + 1) / 2`; padded column 0 and those past `w` are zero.
                even[0] = 0.0;
                even[tw] = 0.0;
                odd[tw] = 0.0;
                let pairs = row.chunks_exact(2);
                if let [last] = pairs.remainder() {
                    odd[s.w / 2] = *last;
                }
                for ((o, e), p) in odd.iter_mut().zip(&mut even[1..]).zip(pairs) {
                    *o = p[0];
                    *e = p[1];
                }
            }
        });
    out
}

#[inline(always)]
fn add<const L: usize>(a: [f32; L], b: [f32; L]) -> [f32; L] {
    std::array::from_fn(|i| a[i] + b[i])
}

#[inline(always)]
fn sub<const L: usize>(a: [f32; L], b: [f32; L]) -> [f32; L] {
    std::array::from_fn(|i| a[i] - b[i])
}

/// The tiles `t0 .. t0 + cols` (row-major over a grid `tw` tiles wide) as runs within one tile row: `(ty, tx0, n,
/// offset)` for tiles `tx0 .. tx0 + n` of tile row `ty`, the run's first tile at `offset` from `t0`.
fn tile_runs(
    t0: usize,
    cols: usize,
    tw: usize,
) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let mut t = t0;
    std::iter::from_fn(move || {
        (t < t0 + cols).then(|| {
            let (ty, tx0) = (t / tw, t % tw);
            let n = (tw - tx0).min(t0 + cols - t);
            let run = (ty, tx0, n, t - t0);
            t += n;
            run
        })
    })
}

/// `L` values of `s` from `at`.
#[inline(always)]
fn load<const L: usize>(s: &[f32], at: usize) -> [f32; L] {
    s[at..at + L].try_into().expect("L values")
}

/// `Bᵀ d B` for `L` consecutive tiles: `d[r][c]` holds column `c` (0..4) of padded row `r` for each tile.
#[inline(always)]
fn input_tiles<const L: usize>(d: [[[f32; L]; 4]; 4]) -> [[f32; L]; XI] {
    // `Bᵀ d`: rows combined.
    let col = |c: usize| {
        let (r0, r1, r2, r3) = (d[0][c], d[1][c], d[2][c], d[3][c]);
        [sub(r0, r2), add(r1, r2), sub(r2, r1), sub(r1, r3)]
    };
    let cols = [col(0), col(1), col(2), col(3)];
    let mut out = [[0f32; L]; XI];
    for r in 0..4 {
        let (c0, c1, c2, c3) = (cols[0][r], cols[1][r], cols[2][r], cols[3][r]);
        out[4 * r] = sub(c0, c2);
        out[4 * r + 1] = add(c1, c2);
        out[4 * r + 2] = sub(c2, c1);
        out[4 * r + 3] = sub(c1, c3);
    }
    out
}

/// Tiles per vectorised step of the transforms.
const LANES: usize = 8;

crate::flex::simd::multiversion!(
    /// `V[ξ, i, t - t0] = (Bᵀ d_(i, t) B)_ξ` for the tiles `t0 .. t0 + cols` of one padded image `[c_in, plen]`
    /// (see [`pad`] for its layout), `LANES` tiles at a time.
    transform_input => transform_input_impl(image: &[f32], v: &mut [f32], t0: usize, cols: usize, s: &Shape)
);

#[inline(always)]
fn transform_input_impl<const FMA: bool>(
    image: &[f32],
    v: &mut [f32],
    t0: usize,
    cols: usize,
    s: &Shape,
) {
    let (_, tw) = s.tiles();
    let (pw, plen) = (s.pw(), s.plen());
    let half = pw / 2;
    let plane = s.c_in * cols;
    for (ty, tx0, n, offset) in tile_runs(t0, cols, tw) {
        for i in 0..s.c_in {
            let ch = &image[i * plen..][..plen];
            // Padded rows `2 ty .. 2 ty + 4`: even and odd columns from tile `tx0` on.
            let rows: [(&[f32], &[f32]); 4] = std::array::from_fn(|r| {
                let (e, o) = ch[(2 * ty + r) * pw..][..pw].split_at(half);
                (&e[tx0..], &o[tx0..])
            });
            let base = i * cols + offset;
            let mut j = 0;
            while j + LANES <= n {
                let d = std::array::from_fn(|r| {
                    let (e, o) = rows[r];
                    [load(e, j), load(o, j), load(e, j + 1), load(o, j + 1)]
                });
                for (xi, vals) in input_tiles::<LANES>(d).iter().enumerate() {
                    v[xi * plane + base + j..][..LANES].copy_from_slice(vals);
                }
                j += LANES;
            }
            for j in j..n {
                let d = std::array::from_fn(|r| {
                    let (e, o) = rows[r];
                    [[e[j]], [o[j]], [e[j + 1]], [o[j + 1]]]
                });
                for (xi, [val]) in input_tiles::<1>(d).into_iter().enumerate() {
                    v[xi * plane + base + j] = val;
                }
            }
        }
    }
}

/// `Aᵀ M A` for `L` consecutive tiles: `[[Y00, Y01], [Y10, Y11]]`, each `L` values.
#[inline(always)]
fn output_tiles<const L: usize>(m: [[f32; L]; XI]) -> [[[f32; L]; 2]; 2] {
    let at = |r: usize, c: usize| m[4 * r + c];
    let s0: [[f32; L]; 4] = std::array::from_fn(|c| add(add(at(0, c), at(1, c)), at(2, c)));
    let s1: [[f32; L]; 4] = std::array::from_fn(|c| sub(sub(at(1, c), at(2, c)), at(3, c)));
    let row = |s: [[f32; L]; 4]| [add(add(s[0], s[1]), s[2]), sub(sub(s[1], s[2]), s[3])];
    [row(s0), row(s1)]
}

crate::flex::simd::multiversion!(
    /// `y[bi, o, 2ty + a, 2tx + b] = bias[o] + (Aᵀ M_(o, t) A)_(a, b)` for the tiles `t0 .. t0 + cols` of image
    /// `bi` (the parts of the last half tiles that fall outside `h x w` are dropped), `LANES` tiles at a time.
    ///
    /// Safety (of the caller): `y` points to the whole `[b, c_out, h, w]` output and no other thread writes
    /// these tiles.
    transform_output => transform_output_impl(
        m: &[f32],
        y: SharedMut,
        bias: Option<&[f32]>,
        bi: usize,
        t0: usize,
        cols: usize,
        s: &Shape
    )
);

#[inline(always)]
fn transform_output_impl<const FMA: bool>(
    m: &[f32],
    y: SharedMut,
    bias: Option<&[f32]>,
    bi: usize,
    t0: usize,
    cols: usize,
    s: &Shape,
) {
    let (_, tw) = s.tiles();
    let plane = s.c_out * cols;
    // Tiles wholly inside the columns: `2 tx + 1 < w`.
    let full_x = s.w / 2;
    for (ty, tx0, n, offset) in tile_runs(t0, cols, tw) {
        let two_rows = 2 * ty + 1 < s.h;
        let n_full = full_x.saturating_sub(tx0).min(n);
        for o in 0..s.c_out {
            let b = bias.map_or(0.0, |b| b[o]);
            let base = o * cols + offset;
            let ms: [&[f32]; XI] = std::array::from_fn(|xi| &m[xi * plane + base..][..n]);
            // SAFETY: rows `2 ty` and (when inside) `2 ty + 1`, columns `2 tx0 .. 2 (tx0 + n)` (cut at `w`) of
            // channel `o` of image `bi`: inside the output and written by this task only (see the caller).
            let (row0, mut row1) = unsafe {
                let at = y
                    .get()
                    .add(((bi * s.c_out + o) * s.h + 2 * ty) * s.w + 2 * tx0);
                let len = (2 * n).min(s.w - 2 * tx0);
                let row1 = two_rows.then(|| std::slice::from_raw_parts_mut(at.add(s.w), len));
                (std::slice::from_raw_parts_mut(at, len), row1)
            };
            let mut j = 0;
            while j + LANES <= n_full {
                let [[y00, y01], [y10, y11]] =
                    output_tiles::<LANES>(std::array::from_fn(|xi| load(ms[xi], j)));
                let r0 = &mut row0[2 * j..2 * j + 2 * LANES];
                for l in 0..LANES {
                    r0[2 * l] = y00[l] + b;
                    r0[2 * l + 1] = y01[l] + b;
                }
                if let Some(row1) = row1.as_deref_mut() {
                    let r1 = &mut row1[2 * j..2 * j + 2 * LANES];
                    for l in 0..LANES {
                        r1[2 * l] = y10[l] + b;
                        r1[2 * l + 1] = y11[l] + b;
                    }
                }
                j += LANES;
            }
            for jj in j..n {
                let [[y00, y01], [y10, y11]] =
                    output_tiles::<1>(std::array::from_fn(|xi| [ms[xi][jj]]));
                let wide = 2 * jj + 1 < row0.len();
                row0[2 * jj] = y00[0] + b;
                if wide {
                    row0[2 * jj + 1] = y01[0] + b;
                }
                if let Some(row1) = row1.as_deref_mut() {
                    row1[2 * jj] = y10[0] + b;
                    if wide {
                        row1[2 * jj + 1] = y11[0] + b;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flex::rel_max_diff;
    use burn::backend::Flex;
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{Distribution, Tensor, TensorData};

    #[test]
    fn winograd_matches_burn_conv() {
        let dev = Default::default();
        // (batch, c_in, c_out, h, w, bias): odd heights and widths (half tiles), one pixel, channel counts that
        // are not multiples of the 8-lane steps, tile rows longer than 8 tiles with a remainder, and images of
        // several blocks whose blocks start and end inside tile rows (33 x 70: 17 x 35 tiles, blocks of 208).
        for (b, ci, co, h, w, with_bias) in [
            (1, 3, 5, 4, 6, true),
            (2, 9, 7, 7, 5, false),
            (1, 17, 12, 1, 1, true),
            (2, 8, 16, 33, 70, true),
            (1, 33, 40, 18, 37, false),
        ] {
            let x = Tensor::<Flex, 4>::random([b, ci, h, w], Distribution::Normal(0.0, 1.0), &dev);
            let wt =
                Tensor::<Flex, 4>::random([co, ci, 3, 3], Distribution::Normal(0.0, 0.3), &dev);
            let bias = with_bias
                .then(|| Tensor::<Flex, 1>::random([co], Distribution::Normal(0.0, 1.0), &dev));
            let s = Shape {
                b,
                c_in: ci,
                c_out: co,
                h,
                w,
            };
            let values = |t: TensorData| t.to_vec::<f32>().expect("f32 values");
            let bias_values = bias.as_ref().map(|t| values(t.to_data()));
            let ours = forward(
                &values(x.to_data()),
                &values(wt.to_data()),
                bias_values.as_deref(),
                &s,
            );
            let ours = Tensor::<Flex, 4>::from_data(TensorData::new(ours, [b, co, h, w]), &dev);
            let burn = conv2d(x, wt, bias, ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
            let case = format!("b{b} ci{ci} co{co} {h}x{w} bias {with_bias}");
            assert!(rel_max_diff(ours, burn) < 1e-5, "{case}");
        }
    }

    #[test]
    fn weight_transform_is_g_g_gt() {
        // One kernel with distinct taps, one output and input channel: `U = G g Gᵀ` written out by hand.
        let g: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let u = transform_weight(&g, 1, 1);
        let gm = [
            [1.0, 0.0, 0.0],
            [0.5, 0.5, 0.5],
            [0.5, -0.5, 0.5],
            [0.0, 0.0, 1.0],
        ];
        for r in 0..4 {
            for c in 0..4 {
                let mut want = 0.0;
                for i in 0..3 {
                    for j in 0..3 {
                        want += gm[r][i] * g[3 * i + j] * gm[c][j];
                    }
                }
                assert_eq!(u[4 * r + c], want, "U[{r}][{c}]");
            }
        }
    }
}
