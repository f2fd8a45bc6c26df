//! Matrix products in bf16 with f32 accumulation on CPUs with AVX512_BF16 (AMD Zen 4 and later, Intel Cooper
//! Lake, Sapphire Rapids and later): an opt-in precision for the linear layers, as PyTorch's CPU autocast to
//! bfloat16 is.
//!
//! When switched on ([`set_bf16_products`]; the training config's `model.bf16_products`), the linear layers' forward
//! product `x wᵀ` and input gradient `dy w` round both operands to bf16 (round to nearest even, 8 significant bits)
//! and accumulate in f32: one `VDPBF16PS` multiplies 16 pairs of bf16 values and adds them into 16 f32 sums, twice the
//! multiply-adds of an f32 FMA of the same width (measured, AMD EPYC Zen 4, 2 threads: 366-392 GFLOP/s at UNet
//! and CLIP linear shapes against a measured f32 FMA peak of 234). Everything else stays f32: the weight gradients
//! (what LoRA adapters learn from), the bias, the products with a side under [`MIN_SIDE`] (a LoRA adapter's
//! rank-r products), the convolutions, attention and normalisations. Off by default; parity tests run f32.
//!
//! Layout: `a` (`[m, k]`, rows at unit stride) becomes rows of bf16 pairs (`k / 2` 32-bit words, an odd `k`'s last
//! word padded with a zero); `b` (`[k, n]`, stored by rows or by columns) becomes panels of 64 columns,
//! `[k / 2][64]` words, each word the pair `(b[2p, j], b[2p + 1, j])`. The kernel keeps a 6 x 64 block of `dst`
//! in 24 registers: per pair of `k`, four panel vectors times six broadcast pairs of `a`.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::flex::View;

static ON: AtomicBool = AtomicBool::new(false);

/// Products with a side shorter than this stay f32 (a LoRA adapter's rank-r products, the time embedding's
/// batch-row products).
pub const MIN_SIDE: usize = 16;

/// Switches the bf16 products on or off for the whole process (off at start).
pub fn set_bf16_products(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether [`set_bf16_products`] switched the bf16 products on.
pub fn bf16_products() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Whether this CPU runs the bf16 kernel (AVX-512F and AVX512_BF16).
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether a product `[m, k] x [k, n]` is to be taken in bf16: switched on and every side at least [`MIN_SIDE`]
/// ([`par_mm_bf16`] then checks the CPU and the layouts).
pub(crate) fn wants(m: usize, n: usize, k: usize) -> bool {
    bf16_products() && m.min(n).min(k) >= MIN_SIDE
}

/// `dst (m x n, row-major) = [dst +] a (m x k) b (k x n)` with `a` and `b` rounded to bf16, summed in f32, across
/// rayon's threads. Returns `false` (nothing written) unless the CPU has AVX512_BF16, `a`'s rows are at unit
/// stride and `b` is stored by rows or by columns.
pub(crate) fn par_mm_bf16(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: View,
    b: View,
) -> bool {
    debug_assert_eq!(dst.len(), m * n);
    #[cfg(target_arch = "x86_64")]
    if a.cs == 1 && (b.rs == 1 || b.cs == 1) && bf16_supported() && m * n * k > 0 {
        // SAFETY: the CPU has AVX-512F and AVX512_BF16; the views address `m x k` and `k x n` values (the
        // caller's contract, as for `par_mm`).
        unsafe { imp::par_mm(m, n, k, dst, accumulate, a, b) };
        return true;
    }
    let _ = (m, n, k, dst, accumulate, a, b);
    false
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use crate::flex::{SharedMut, View, transpose_strip};

    /// Columns of `b` per panel (four 16-lane vectors).
    const PANEL: usize = 64;
    /// Rows of `dst` per kernel call.
    const ROWS: usize = 6;
    /// Rows of `dst` per task (16 kernel calls).
    const ROW_BLOCK: usize = 96;

    /// The low `n` bits set (`n <= 16`).
    fn mask(n: usize) -> __mmask16 {
        ((1u32 << n.min(16)) - 1) as __mmask16
    }

    /// `dst[i] = bf16(src[2 i]) | bf16(src[2 i + 1]) << 16` for the `len.div_ceil(2)` pairs of `len` values (an odd
    /// `len`'s last high half 0).
    ///
    /// # Safety
    /// `src` holds `len` values, `dst` `len.div_ceil(2)`; AVX-512F and AVX512_BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn to_pairs(src: *const f32, len: usize, dst: *mut u32) {
        // SAFETY: every load and store stays inside the caller's `len` values and `len.div_ceil(2)` words.
        unsafe {
            let mut i = 0;
            while i + 32 <= len {
                let lo = _mm512_loadu_ps(src.add(i));
                let hi = _mm512_loadu_ps(src.add(i + 16));
                let r: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.add(i / 2) as *mut __m512i, r);
                i += 32;
            }
            if i < len {
                let rest = len - i;
                let lo = _mm512_maskz_loadu_ps(mask(rest), src.add(i));
                let hi = _mm512_maskz_loadu_ps(mask(rest.saturating_sub(16)), src.add(i + 16));
                let r: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_mask_storeu_epi32(dst.add(i / 2) as *mut i32, mask(rest.div_ceil(2)), r);
            }
        }
    }

    /// Panel `panel` of `b` (columns `64 panel ..`, zeros past `n`) as `[kp][64]` pair words into `out`.
    ///
    /// # Safety
    /// `b` addresses `k x n` values; `out` holds `kp * 64` words; `scratch` as many; AVX-512F and AVX512_BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pack_panel(b: View, k: usize, n: usize, panel: usize, out: &mut [u32]) {
        let kp = k.div_ceil(2);
        let j0 = panel * PANEL;
        let width = PANEL.min(n - j0);
        // SAFETY (this block): reads stay inside `b`'s `k x n` values (masked to `width` columns, rows below `k`),
        // writes inside `out`'s `kp * 64` words.
        unsafe {
            if b.rs == 1 {
                // Column `j` is `k` values at unit stride: its pairs, then a 64 x kp -> kp x 64 transpose.
                let mut cols = vec![0u32; PANEL * kp];
                for l in 0..width {
                    let col = b.ptr.offset((j0 + l) as isize * b.cs);
                    to_pairs(col, k, cols.as_mut_ptr().add(l * kp));
                }
                // 32-bit words moved as f32 bit patterns (no arithmetic).
                let out_f = std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut f32, out.len());
                transpose_strip::<false>(cols.as_ptr() as *const f32, PANEL, kp, kp, out_f);
            } else {
                // Rows `2 p`, `2 p + 1` at unit stride: 16 columns of each rounded, then interleaved by
                // widening to 32 bits (the second row's values in the high halves).
                for p in 0..kp {
                    let r0 = b.ptr.offset((2 * p) as isize * b.rs + j0 as isize);
                    let has_r1 = 2 * p + 1 < k;
                    for q in 0..PANEL / 16 {
                        let w = width.saturating_sub(16 * q);
                        let mk = mask(w);
                        let lo = _mm512_maskz_loadu_ps(mk, r0.add(16 * q));
                        let hi = if has_r1 {
                            _mm512_maskz_loadu_ps(mk, r0.offset(b.rs).add(16 * q))
                        } else {
                            _mm512_setzero_ps()
                        };
                        let lo: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(lo));
                        let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(hi));
                        let word = _mm512_or_si512(
                            _mm512_cvtepu16_epi32(lo),
                            _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)),
                        );
                        _mm512_storeu_si512(
                            out.as_mut_ptr().add(p * PANEL + 16 * q) as *mut __m512i,
                            word,
                        );
                    }
                }
            }
        }
    }

    /// `R` rows of `dst` (from `dst`, row stride `dst_rs`), `width <= 64` columns: `[dst +] sum_p a_pair(r, p) .
    /// panel(p)`.
    ///
    /// # Safety
    /// `a` holds `R` rows of `kp` words (stride `kp`), `panel` `kp * 64` words, `dst` `R` rows of `width` values;
    /// AVX-512F and AVX512_BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn kernel<const R: usize>(
        kp: usize,
        a: *const u32,
        panel: *const u32,
        dst: *mut f32,
        dst_rs: usize,
        width: usize,
        accumulate: bool,
    ) {
        // SAFETY: the caller's contract bounds every read and (masked) write.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); R]; 4];
            for p in 0..kp {
                let w: [__m512bh; 4] = std::array::from_fn(|q| {
                    std::mem::transmute(_mm512_loadu_si512(
                        panel.add(p * PANEL + 16 * q) as *const __m512i
                    ))
                });
                for r in 0..R {
                    let x: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*a.add(r * kp + p) as i32));
                    for q in 0..4 {
                        acc[q][r] = _mm512_dpbf16_ps(acc[q][r], w[q], x);
                    }
                }
            }
            for (q, acc) in acc.iter().enumerate() {
                let mk = mask(width.saturating_sub(16 * q));
                if mk == 0 {
                    continue;
                }
                for (r, &v) in acc.iter().enumerate() {
                    let d = dst.add(r * dst_rs + 16 * q);
                    let v = if accumulate {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(mk, d), v)
                    } else {
                        v
                    };
                    _mm512_mask_storeu_ps(d, mk, v);
                }
            }
        }
    }

    /// [`super::par_mm_bf16`] on a CPU with AVX-512F and AVX512_BF16, `a.cs == 1`, `b` stored by rows or columns.
    ///
    /// # Safety
    /// As [`super::par_mm_bf16`], with the CPU features above.
    pub(super) unsafe fn par_mm(
        m: usize,
        n: usize,
        k: usize,
        dst: &mut [f32],
        accumulate: bool,
        a: View,
        b: View,
    ) {
        let kp = k.div_ceil(2);
        let mut ab = vec![0u32; m * kp];
        ab.par_chunks_mut(kp).enumerate().for_each(|(i, row)| {
            let a: View = a;
            // SAFETY: row `i < m` of `a` holds `k` values at unit stride; `row` holds `kp` words.
            unsafe { to_pairs(a.ptr.offset(i as isize * a.rs), k, row.as_mut_ptr()) };
        });
        let panels = n.div_ceil(PANEL);
        let mut bp = vec![0u32; panels * kp * PANEL];
        bp.par_chunks_mut(kp * PANEL)
            .enumerate()
            // SAFETY: panel `j < panels` of `b`'s `k x n` values into its own `kp * 64` words.
            .for_each(|(j, out)| unsafe { pack_panel(b, k, n, j, out) });
        let d = SharedMut(dst.as_mut_ptr());
        let blocks = m.div_ceil(ROW_BLOCK);
        (0..blocks * panels).into_par_iter().for_each(|task| {
            let (blk, j) = (task / panels, task % panels);
            let (i0, i1) = (blk * ROW_BLOCK, ((blk + 1) * ROW_BLOCK).min(m));
            let (j0, width) = (j * PANEL, PANEL.min(n - j * PANEL));
            let panel = bp[j * kp * PANEL..].as_ptr();
            let mut i = i0;
            while i < i1 {
                let rows = ROWS.min(i1 - i);
                let (ai, di) = (ab[i * kp..].as_ptr(), d.get().wrapping_add(i * n + j0));
                // SAFETY: rows `i .. i + rows` and columns `j0 .. j0 + width` of `dst`, written by this task
                // only; `ab` holds those rows' `kp` words, `panel` `kp * 64`.
                unsafe {
                    match rows {
                        6 => kernel::<6>(kp, ai, panel, di, n, width, accumulate),
                        5 => kernel::<5>(kp, ai, panel, di, n, width, accumulate),
                        4 => kernel::<4>(kp, ai, panel, di, n, width, accumulate),
                        3 => kernel::<3>(kp, ai, panel, di, n, width, accumulate),
                        2 => kernel::<2>(kp, ai, panel, di, n, width, accumulate),
                        _ => kernel::<1>(kp, ai, panel, di, n, width, accumulate),
                    }
                }
                i += rows;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flex::par_mm;

    /// Values with at most 8 significant bits (exact in bf16) and products whose sums are exact in f32: the bf16
    /// product must then equal the f32 one exactly, for `b` stored by rows and by columns, odd `k`, partial
    /// panels and row groups, adding to `dst` and overwriting it.
    #[test]
    fn bf16_product_is_exact_on_bf16_values_and_close_on_others() {
        if !bf16_supported() {
            eprintln!("no AVX512_BF16 on this CPU: nothing to check");
            return;
        }
        let exact = |i: usize| ((i * 37) % 17) as f32 - 8.0;
        for (m, n, k) in [(1, 1, 1), (7, 65, 33), (100, 130, 64), (13, 200, 301)] {
            for by_columns in [false, true] {
                for accumulate in [false, true] {
                    let a: Vec<f32> = (0..m * k).map(exact).collect();
                    let bs: Vec<f32> = (0..k * n).map(|i| exact(i + 5)).collect();
                    let b = if by_columns {
                        View::rows(&bs, 0, k).t()
                    } else {
                        View::rows(&bs, 0, n)
                    };
                    let start: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32).collect();
                    let (mut want, mut got) = (start.clone(), start.clone());
                    par_mm(m, n, k, &mut want, accumulate, View::rows(&a, 0, k), b);
                    assert!(par_mm_bf16(
                        m,
                        n,
                        k,
                        &mut got,
                        accumulate,
                        View::rows(&a, 0, k),
                        b
                    ));
                    assert_eq!(got, want, "{m}x{n}x{k} by columns {by_columns}");
                }
            }
        }
        // Arbitrary values: within bf16's rounding of the operands (relative 2^-9 each), far from f32's 1e-7.
        let (m, n, k) = (50, 70, 256);
        let v = |i: usize| ((i * 7919) % 1000) as f32 / 500.0 - 1.0;
        let a: Vec<f32> = (0..m * k).map(v).collect();
        let bs: Vec<f32> = (0..k * n).map(|i| v(i + 3)).collect();
        let (mut want, mut got) = (vec![0.0; m * n], vec![0.0; m * n]);
        par_mm(
            m,
            n,
            k,
            &mut want,
            false,
            View::rows(&a, 0, k),
            View::rows(&bs, 0, n),
        );
        assert!(par_mm_bf16(
            m,
            n,
            k,
            &mut got,
            false,
            View::rows(&a, 0, k),
            View::rows(&bs, 0, n)
        ));
        let scale = want.iter().fold(0f32, |s, x| s.max(x.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |e, (g, w)| e.max((g - w).abs()))
            / scale;
        assert!(err > 1e-5 && err < 2e-2, "relative error {err}");
    }
}
