//! Fused multi-head attention for the CPU backend, forward and backward, that never holds the whole score matrix.
//!
//! Attention written with tensor ops materialises `softmax(q kᵀ)` for every head at once (`[batch * heads,
//! n_q, n_kv]`: 64 MiB for one self-attention at 32x32 latents, 1 GiB at SD's 64x64), passes over it several
//! times in memory, and under autodiff keeps it for the backward. Here, per `(batch, head, block of 64
//! queries)`: scores into a small buffer that stays in cache (GEMM), `exp(s - max)` in place (vectorised),
//! times `v` (GEMM), divided by the sums; only each query's log-sum-exp is kept. The block's scores and output are
//! held transposed (queries along the rows gemm vectorises) and the exponentials taken in base 2. The backward
//! recomputes each block's probabilities from `q`, `k` and the log-sum-exp (as FlashAttention does) and accumulates
//! `dk`, `dv` per task.
//!
//! Tensors stay in the token layout `[batch, tokens, heads * head_dim]` that the projections produce and
//! consume, so splitting into heads and merging back costs no copies: a head is a column range, read through
//! the GEMM's strides. Dispatch is by backend type at run time, as in [`crate::flex`]: `Flex` and
//! `Autodiff<Flex>` with f32 tensors take this path, everything else the tensor-op path.

use std::any::TypeId;
use std::f32::consts::LOG2_E;

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use rayon::prelude::*;

use crate::flex::{
    AdFlex, AdPrimitive, SharedMut, View, cast, f32_values, filled_later, flex_tensor, mm, simd,
    with_scratch,
};

/// Queries per block: a block's scores (`64 x n_kv` floats: 256 KiB at 1024 keys) stay in the core's cache.
const BLOCK: usize = 64;

/// Multi-head attention `softmax(q kᵀ * scale) v` per head, fused.
///
/// `q`: `[batch, n_q, heads * d]`, `k`, `v`: `[batch, n_kv, heads * d]` -> `[batch, n_q, heads * d]`;
/// `causal` hides key `j` from query `i` when `j > i` (requires `n_q == n_kv`).
/// Returns the inputs back unless the backend is `Flex` or `Autodiff<Flex>` and all three are f32.
#[allow(clippy::type_complexity)]
pub fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    scale: f32,
    causal: bool,
) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>)> {
    let f32s = [q.dtype(), k.dtype(), v.dtype()]
        .iter()
        .all(|d| *d == DType::F32);
    let [b, n_q, c] = q.dims();
    let n_kv = k.dims()[1];
    if !f32s || !crate::attention_shapes_ok(&q, &k, &v, heads, causal) {
        return Err((q, k, v));
    }
    let dims = Dims {
        b,
        n_q,
        n_kv,
        heads,
        d: c / heads,
        scale,
        causal,
    };
    let prim = |t: Tensor<B, 3>| t.into_primitive().tensor();
    let wrap =
        |p: B::FloatTensorPrimitive| Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(p));
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        let (q, k, v): (FlexTensor, FlexTensor, FlexTensor) =
            (cast(prim(q)), cast(prim(k)), cast(prim(v)));
        let (out, _) = forward(&q, &k, &v, &dims);
        return Ok(wrap(cast(out)));
    }
    if TypeId::of::<B>() == TypeId::of::<AdFlex>() {
        let (q, k, v): (AdPrimitive, AdPrimitive, AdPrimitive) =
            (cast(prim(q)), cast(prim(k)), cast(prim(v)));
        let (out, lse) = forward(&q.primitive, &k.primitive, &v.primitive, &dims);
        let out = match AttentionBackward
            .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                AttentionState {
                    q: q.primitive.clone(),
                    k: k.primitive.clone(),
                    v: v.primitive.clone(),
                    out: out.clone(),
                    lse,
                    dims,
                },
                out,
            ),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        return Ok(wrap(cast(out)));
    }
    Err((q, k, v))
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    n_q: usize,
    n_kv: usize,
    heads: usize,
    d: usize,
    scale: f32,
    causal: bool,
}

impl Dims {
    /// Elements between consecutive tokens (`heads * d`).
    fn row(&self) -> usize {
        self.heads * self.d
    }
    fn blocks(&self) -> usize {
        self.n_q.div_ceil(BLOCK)
    }
    /// Offset of `(batch, token 0, head)` in a `[batch, n, heads * d]` buffer.
    fn base(&self, batch: usize, n: usize, head: usize) -> usize {
        batch * n * self.row() + head * self.d
    }
    /// Of the `rows` queries from `q0` on, how many come before key `j` and do not see it (query `i` sees keys
    /// `0..=i` when causal).
    fn hidden_from(&self, j: usize, q0: usize, rows: usize) -> usize {
        if self.causal {
            j.saturating_sub(q0).min(rows)
        } else {
            0
        }
    }
}

/// Forward: the output `[b, n_q, heads * d]` and each query's log-sum-exp of its scaled scores in base 2
/// (`log2 sum_j 2^(s_j log2(e))`, what the backward's base-2 recomputation subtracts) `[b, heads, n_q]`.
///
/// A block's scores are computed transposed, `sᵀ = k qᵀ` (`[n_kv, rows]`), and its output as `outᵀ = vᵀ pᵀ`
/// (`[d, rows]`, then scattered into the token layout): in both products the block's queries are gemm's
/// vectorised dimension, so its 64-row kernel runs full whatever the head size (with `[rows, n_kv]` scores, `p v`
/// vectorises over the head's `d` columns: half-empty vectors at `d = 8`, 40 of 48 lanes at `d = 40`), and the
/// softmax runs down the columns with each query's maximum and sum in a vector lane.
fn forward(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, dm: &Dims) -> (FlexTensor, Vec<f32>) {
    let (qs, ks, vs) = (f32_values(q), f32_values(k), f32_values(v));
    let (qs, ks, vs) = (&*qs, &*ks, &*vs);
    let row = dm.row();
    // Every output row of every head and every log-sum-exp is written by exactly one task below.
    let mut out = filled_later(dm.b * dm.n_q * row);
    let mut lse = filled_later(dm.b * dm.heads * dm.n_q);
    let out_ptr = SharedMut(out.as_mut_ptr());
    // One task per (batch, head, query block); each writes its own rows of its head's columns of `out` and its
    // own slice of `lse`.
    lse.par_chunks_mut(dm.n_q)
        .enumerate()
        .for_each(|(bh, lse_head)| {
            let (batch, head) = (bh / dm.heads, bh % dm.heads);
            lse_head
                .par_chunks_mut(BLOCK)
                .enumerate()
                .for_each(|(blk, lse_blk)| {
                    let q0 = blk * BLOCK;
                    let rows = lse_blk.len();
                    with_scratch(rows * (dm.n_kv + dm.d), |scratch| {
                        let (st, ot) = scratch.split_at_mut(rows * dm.n_kv);
                        let qv = View::rows(qs, dm.base(batch, dm.n_q, head) + q0 * row, row);
                        let kv = View::rows(ks, dm.base(batch, dm.n_kv, head), row);
                        let vv = View::rows(vs, dm.base(batch, dm.n_kv, head), row);
                        // SAFETY: k `n_kv x d`, the q block transposed `d x rows` and `st` `n_kv x rows` lie in
                        // their buffers.
                        unsafe {
                            mm(
                                dm.n_kv,
                                rows,
                                dm.d,
                                st.as_mut_ptr(),
                                rows,
                                false,
                                kv,
                                qv.t(),
                                dm.scale * LOG2_E,
                            )
                        };
                        for (j, srow) in st.chunks_mut(rows).enumerate() {
                            srow[..dm.hidden_from(j, q0, rows)].fill(f32::NEG_INFINITY);
                        }
                        // Unnormalised numerators `exp(s - max) = 2^(s log2(e) - max)` (the scores are in base 2);
                        // the output is divided by the sums after the product with `v` (d values per query
                        // instead of n_kv).
                        let (mut max, mut sum) = ([0f32; BLOCK], [0f32; BLOCK]);
                        simd::exp2_sum_cols(st, rows, &mut max[..rows], &mut sum[..rows]);
                        for (l, (m, s)) in lse_blk.iter_mut().zip(max.iter().zip(&sum)) {
                            *l = m + s.log2();
                        }
                        let ptv = View::rows(st, 0, rows);
                        // SAFETY: vᵀ `d x n_kv`, pᵀ `n_kv x rows` and `ot` `d x rows` lie in their buffers.
                        unsafe {
                            mm(
                                dm.d,
                                rows,
                                dm.n_kv,
                                ot.as_mut_ptr(),
                                rows,
                                false,
                                vv.t(),
                                ptv,
                                1.0,
                            )
                        };
                        // SAFETY: this task's output rows `q0..q0 + rows` of head `head`'s columns are written
                        // by no other task and lie in `out`.
                        unsafe {
                            let dst = out_ptr.get().add(dm.base(batch, dm.n_q, head) + q0 * row);
                            scatter_rows(ot, rows, dm.d, dst, row, |r| 1.0 / sum[r]);
                        }
                    })
                })
        });
    (flex_tensor(out, vec![dm.b, dm.n_q, row]), lse)
}

/// `2^x` for 16 lanes by the operations of [`simd::exp2_nonpos`] (its values exactly). No target feature of its
/// own, so that it is inlined into its AVX-512 callers rather than called with its vectors in memory (as are
/// intrinsics inside closures: a fused forward written with `std::array::from_fn` closures ran 3x slower).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp2_x16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: AVX-512F (the caller's contract).
    unsafe {
        let round = _mm512_set1_ps(simd::EXP2_ROUND);
        let x = _mm512_max_ps(x, _mm512_set1_ps(-127.0));
        let t = _mm512_add_ps(x, round);
        let r = _mm512_sub_ps(x, _mm512_sub_ps(t, round));
        let mut e = _mm512_set1_ps(simd::EXP2_POLY[0]);
        for c in &simd::EXP2_POLY[1..] {
            e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(*c));
        }
        let two_n = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_castps_si512(t),
            _mm512_set1_epi32(127),
        )));
        _mm512_mul_ps(e, two_n)
    }
}

/// Rows `r0 .. r0 + 16` of `view` (8 columns, unit column stride) times `f`, one vector per column: lane `l` of
/// vector `c` is `f view[r0 + l, c]`.
///
/// # Safety
/// The 16 rows lie in the view; the CPU has AVX-512F (inlined into the AVX-512 kernels).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lanes_x8(view: View, r0: usize, f: f32) -> [std::arch::x86_64::__m512; 8] {
    use std::arch::x86_64::*;
    let mut vals = [[0f32; 16]; 8];
    for l in 0..16 {
        // SAFETY: row `r0 + l`, columns `0..8` of the view (the caller's contract).
        let src = unsafe { view.ptr.offset((r0 + l) as isize * view.rs) };
        for (c, col) in vals.iter_mut().enumerate() {
            col[l] = f * unsafe { *src.add(c) };
        }
    }
    let mut out = [unsafe { _mm512_setzero_ps() }; 8];
    for (o, col) in out.iter_mut().zip(&vals) {
        // SAFETY: 16 floats; AVX-512F (the caller's contract).
        *o = unsafe { _mm512_loadu_ps(col.as_ptr()) };
    }
    out
}

/// Writes a block's product held transposed, `src` `[d, rows]`, into the token layout: row `r` (its `d` values
/// times `scale(r)`) at `dst + r * row`.
///
/// # Safety
/// `dst` must address `rows` rows of `d` writable values, `row` apart, that nothing else accesses meanwhile.
unsafe fn scatter_rows(
    src: &[f32],
    rows: usize,
    d: usize,
    dst: *mut f32,
    row: usize,
    scale: impl Fn(usize) -> f32,
) {
    for r in 0..rows {
        // SAFETY: row `r` of the caller's destination.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.add(r * row), d) };
        let f = scale(r);
        for (c, o) in out.iter_mut().enumerate() {
            *o = src[c * rows + r] * f;
        }
    }
}

#[derive(Debug)]
struct AttentionBackward;

#[derive(Clone, Debug)]
struct AttentionState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    out: FlexTensor,
    lse: Vec<f32>,
    dims: Dims,
}

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout: FlexTensor = grads.consume::<Flex>(&ops.node);
        let (dq, dk, dv) = backward(&dout, &ops.state);
        let [pq, pk, pv] = ops.parents;
        for (parent, grad) in [(pq, dq), (pk, dk), (pv, dv)] {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

/// Backward. Per query block, with `P` recomputed as `exp(s - lse)` and `D_i = sum(dout_i * out_i)`:
/// `dv += Pᵀ dout`, `dP = dout vᵀ`, `dS = P * (dP - D)`, `dq = scale dS k`, `dk += scale dSᵀ q`
/// (computed on `Pᵀ`, `dPᵀ`, `dSᵀ`: `Sᵀ = k qᵀ`, `dPᵀ = v doutᵀ`; in base 2 as in the forward, with `s` times
/// `log2(e)` and the forward's base-2 log-sum-exp).
fn backward(dout: &FlexTensor, st: &AttentionState) -> (FlexTensor, FlexTensor, FlexTensor) {
    let dm = st.dims;
    let (qs, ks, vs) = (f32_values(&st.q), f32_values(&st.k), f32_values(&st.v));
    let (os, gs) = (f32_values(&st.out), f32_values(dout));
    let (qs, ks, vs, os, gs) = (&*qs, &*ks, &*vs, &*os, &*gs);
    let row = dm.row();
    let blocks = dm.blocks();
    // Query blocks of one head are split into `groups` tasks (each with its own dk, dv partial sums) so that
    // both cores stay busy when batch * heads is small (the VAE's single-head attention).
    let bh = dm.b * dm.heads;
    let groups = (2 * rayon::current_num_threads())
        .div_ceil(bh)
        .clamp(1, blocks);
    let kv_len = dm.n_kv * dm.d;
    // Every query row of every head's columns is written (not accumulated) by exactly one block's product.
    let mut dq = filled_later(dm.b * dm.n_q * row);
    let dq_ptr = SharedMut(dq.as_mut_ptr());
    // Per task: dk partial then dv partial, each `[n_kv, d]`.
    let mut partial = vec![0f32; bh * groups * 2 * kv_len];
    partial
        .par_chunks_mut(2 * kv_len)
        .enumerate()
        .for_each(|(task, part)| {
            let (pair, group) = (task / groups, task % groups);
            let (batch, head) = (pair / dm.heads, pair % dm.heads);
            let (dk_part, dv_part) = part.split_at_mut(kv_len);
            let kv = View::rows(ks, dm.base(batch, dm.n_kv, head), row);
            let vv = View::rows(vs, dm.base(batch, dm.n_kv, head), row);
            let (first, last) = (group * blocks / groups, (group + 1) * blocks / groups);
            with_scratch(2 * BLOCK * dm.n_kv + BLOCK * dm.d, |scratch| {
                // `pt`, `dst`: the block's probabilities and score gradients transposed, `[n_kv, rows]` (key
                // `j`, query `r` at `j * rows + r`). In this layout the two products that accumulate over the
                // block's queries (`dv`, `dk`) read a row-major operand, which gemm runs at ~1.7x the speed of
                // the column-major one that `[rows, n_kv]` would give them (measured at head size 40).
                // `dqt`: the block's `dq` transposed, `[d, rows]`, so that gemm vectorises that product along
                // the queries rather than along the head's `d` columns (8 or 40: partly empty vectors).
                let (pt, rest) = scratch.split_at_mut(BLOCK * dm.n_kv);
                let (dst, dqt) = rest.split_at_mut(BLOCK * dm.n_kv);
                let mut d_row = [0f32; BLOCK];
                for blk in first..last {
                    let q0 = blk * BLOCK;
                    let rows = BLOCK.min(dm.n_q - q0);
                    let (pt, dst) = (&mut pt[..rows * dm.n_kv], &mut dst[..rows * dm.n_kv]);
                    let dqt = &mut dqt[..dm.d * rows];
                    let q_off = dm.base(batch, dm.n_q, head) + q0 * row;
                    let qv = View::rows(qs, q_off, row);
                    let gv = View::rows(gs, q_off, row);
                    let lse = &st.lse[pair * dm.n_q + q0..][..rows];
                    // SAFETY (all `mm` calls below): every view addresses its block inside its buffer; `pt`,
                    // `dst` and this task's partials are its own; `dq` rows `q0..q0 + rows` of this head's
                    // columns are written by this task only.
                    for (r, d_r) in d_row[..rows].iter_mut().enumerate() {
                        let o = q_off + r * row;
                        *d_r = simd::dot(&os[o..o + dm.d], &gs[o..o + dm.d]);
                    }
                    let fused = unsafe {
                        probs_and_score_grads(
                            &dm,
                            rows,
                            [kv, vv, qv, gv],
                            lse,
                            &d_row[..rows],
                            pt,
                            dst,
                        )
                    };
                    if !fused {
                        unsafe {
                            mm(
                                dm.n_kv,
                                rows,
                                dm.d,
                                pt.as_mut_ptr(),
                                rows,
                                false,
                                kv,
                                qv.t(),
                                dm.scale * LOG2_E,
                            )
                        };
                        for (j, prow) in pt.chunks_mut(rows).enumerate() {
                            let hidden = dm.hidden_from(j, q0, rows);
                            prow[..hidden].fill(0.0);
                            simd::exp2_shifted_each(&mut prow[hidden..], &lse[hidden..]);
                        }
                        unsafe {
                            mm(
                                dm.n_kv,
                                rows,
                                dm.d,
                                dst.as_mut_ptr(),
                                rows,
                                false,
                                vv,
                                gv.t(),
                                1.0,
                            )
                        };
                        for (prow, dsrow) in pt.chunks(rows).zip(dst.chunks_mut(rows)) {
                            simd::mul_sub_each(prow, dsrow, &d_row[..rows]);
                        }
                    }
                    let ptv = View::rows(pt, 0, rows);
                    unsafe { accumulate_over_queries(dm.n_kv, dm.d, rows, dv_part, ptv, gv, 1.0) };
                    let dsv = View::rows(dst, 0, rows);
                    unsafe {
                        mm(
                            dm.d,
                            rows,
                            dm.n_kv,
                            dqt.as_mut_ptr(),
                            rows,
                            false,
                            kv.t(),
                            dsv,
                            dm.scale,
                        );
                        scatter_rows(dqt, rows, dm.d, dq_ptr.get().add(q_off), row, |_| 1.0);
                    };
                    unsafe {
                        accumulate_over_queries(dm.n_kv, dm.d, rows, dk_part, dsv, qv, dm.scale)
                    };
                }
            })
        });
    // Sum the partials of each (batch, head) into the token layout.
    let mut dk = vec![0f32; dm.b * dm.n_kv * row];
    let mut dv = vec![0f32; dm.b * dm.n_kv * row];
    dk.par_chunks_mut(dm.n_kv * row)
        .zip(dv.par_chunks_mut(dm.n_kv * row))
        .enumerate()
        .for_each(|(batch, (dkb, dvb))| {
            for head in 0..dm.heads {
                for group in 0..groups {
                    let task = (batch * dm.heads + head) * groups + group;
                    let part = &partial[task * 2 * kv_len..(task + 1) * 2 * kv_len];
                    let (dk_part, dv_part) = part.split_at(kv_len);
                    for j in 0..dm.n_kv {
                        let dst = j * row + head * dm.d;
                        let src = j * dm.d;
                        for c in 0..dm.d {
                            dkb[dst + c] += dk_part[src + c];
                            dvb[dst + c] += dv_part[src + c];
                        }
                    }
                }
            }
        });
    let kv_shape = vec![dm.b, dm.n_kv, row];
    (
        flex_tensor(dq, vec![dm.b, dm.n_q, row]),
        flex_tensor(dk, kv_shape.clone()),
        flex_tensor(dv, kv_shape),
    )
}

/// The backward's probabilities and score gradients of one query block in one pass over the keys, at head size 8
/// without a causal mask: `pt[j, r] = 2^(scale log2(e) k_j · q_r - lse_r)` and `dst[j, r] = pt[j, r] (v_j · g_r -
/// D_r)`, both key-major `[n_kv, rows]`. Returns `false` (nothing written) where it does not apply: another head
/// size, causal, `rows` not a multiple of 16, or no AVX-512.
///
/// The general path makes both through two GEMMs of inner size 8 and two element-wise passes over the block
/// (`exp`, then `p (dp - D)`); here 16 queries sit in the lanes of a vector, their `q` and `g` in 16 registers,
/// and each key's 8 + 8 values are broadcast into the multiply-adds, so the block's scores are written once, as
/// probabilities, and never re-read before the products that use them.
///
/// # Safety
/// `views` = `[k, v, q, g]`: `k`, `v` address `n_kv` rows of `d` values, `q`, `g` the block's `rows`; `lse` and
/// `d_row` hold `rows` values; `pt` and `dst` `n_kv * rows`.
unsafe fn probs_and_score_grads(
    dm: &Dims,
    rows: usize,
    views: [View; 4],
    lse: &[f32],
    d_row: &[f32],
    pt: &mut [f32],
    dst: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if dm.d == 8
        && !dm.causal
        && rows.is_multiple_of(16)
        && views.iter().all(|v| v.cs == 1)
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        debug_assert!(pt.len() >= dm.n_kv * rows && dst.len() >= dm.n_kv * rows);
        // SAFETY: the checks above and the caller's contract.
        unsafe {
            probs_and_score_grads_x8_avx512(
                dm.n_kv,
                rows,
                views,
                dm.scale * LOG2_E,
                lse,
                d_row,
                pt.as_mut_ptr(),
                dst.as_mut_ptr(),
            )
        };
        return true;
    }
    let _ = (dm, rows, views, lse, d_row, pt, dst);
    false
}

/// [`probs_and_score_grads`] on AVX-512: 16 queries at a time; `2^x` by [`exp2_x16`] (the values of the general
/// path's pass).
///
/// # Safety
/// As [`probs_and_score_grads`], with `d = 8`, unit column strides, `rows` a multiple of 16 and AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn probs_and_score_grads_x8_avx512(
    n_kv: usize,
    rows: usize,
    [k, v, q, g]: [View; 4],
    scale2: f32,
    lse: &[f32],
    d_row: &[f32],
    pt: *mut f32,
    dst: *mut f32,
) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): every pointer stays within the views' and buffers' extents (the caller's contract);
    // the CPU has AVX-512F.
    unsafe {
        for r0 in (0..rows).step_by(16) {
            // The 16 queries' columns: `qc[c]` lane `l` = `scale2 q[r0 + l, c]`, `gc[c]` = `g[r0 + l, c]`.
            let qc = lanes_x8(q, r0, scale2);
            let gc = lanes_x8(g, r0, 1.0);
            let l = _mm512_loadu_ps(lse.as_ptr().add(r0));
            let dd = _mm512_loadu_ps(d_row.as_ptr().add(r0));
            for j in 0..n_kv {
                let kp = k.ptr.offset(j as isize * k.rs);
                let vp = v.ptr.offset(j as isize * v.rs);
                // Two chains each for `s` and `dp`.
                let mut s0 = _mm512_mul_ps(qc[0], _mm512_set1_ps(*kp.add(0)));
                let mut s1 = _mm512_mul_ps(qc[1], _mm512_set1_ps(*kp.add(1)));
                let mut d0 = _mm512_mul_ps(gc[0], _mm512_set1_ps(*vp.add(0)));
                let mut d1 = _mm512_mul_ps(gc[1], _mm512_set1_ps(*vp.add(1)));
                for c in (2..8).step_by(2) {
                    s0 = _mm512_fmadd_ps(qc[c], _mm512_set1_ps(*kp.add(c)), s0);
                    s1 = _mm512_fmadd_ps(qc[c + 1], _mm512_set1_ps(*kp.add(c + 1)), s1);
                    d0 = _mm512_fmadd_ps(gc[c], _mm512_set1_ps(*vp.add(c)), d0);
                    d1 = _mm512_fmadd_ps(gc[c + 1], _mm512_set1_ps(*vp.add(c + 1)), d1);
                }
                let p = exp2_x16(_mm512_sub_ps(_mm512_add_ps(s0, s1), l));
                let ds = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_add_ps(d0, d1), dd));
                _mm512_storeu_ps(pt.add(j * rows + r0), p);
                _mm512_storeu_ps(dst.add(j * rows + r0), ds);
            }
        }
    }
}

/// `part[j, c] += alpha * sum_r a[j, r] b[r, c]` for keys `j < n_kv`, head columns `c < d`, the block's `rows`
/// queries `r`: the backward's `dv` and `dk` partials (`a` the block's probabilities or score gradients, key-major
/// `[n_kv, rows]`; `b` its output gradient or queries, `[rows, d]` at the token layout's row stride).
///
/// gemm vectorises such a product along `d`, the output's contiguous side: at `d = 8` (the "mid" UNet's first
/// level) half of each 16-lane vector is empty and its 16 x 6 kernel loads more than it multiplies (one vector and
/// six broadcasts per six half-empty multiply-adds). For `d = 8` and an even `rows` on AVX-512,
/// [`keys_x8_avx512`] fills the vectors with two queries at once instead.
///
/// # Safety
/// `a` must address `n_kv x rows` values, `b` `rows x d`; `part` holds `n_kv * d`.
unsafe fn accumulate_over_queries(
    n_kv: usize,
    d: usize,
    rows: usize,
    part: &mut [f32],
    a: View,
    b: View,
    alpha: f32,
) {
    debug_assert_eq!(part.len(), n_kv * d);
    #[cfg(target_arch = "x86_64")]
    if d == 8
        && rows.is_multiple_of(2)
        && a.cs == 1
        && a.rs == rows as isize
        && b.cs == 1
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        // SAFETY: the checks above and the caller's contract.
        unsafe { keys_x8_avx512(n_kv, rows, part, a.ptr, b, alpha) };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { mm(n_kv, d, rows, part.as_mut_ptr(), d, true, a, b, alpha) }
}

/// [`accumulate_over_queries`] at `d = 8`: `a` row-major `[n_kv, rows]` (`rows` even) at `a`.
///
/// The block's `b` is first interleaved by pairs of queries, `bi[p][2 c + e] = b[2 p + e, c]`, so that one 16-lane
/// vector holds two queries' 8 columns; each key's pair `a[j, 2 p], a[j, 2 p + 1]`, broadcast as one 64-bit value,
/// multiplies it in one full multiply-add. Twelve keys are accumulated at a time (one vector and twelve broadcasts
/// per twelve multiply-adds); at the end the even and odd lanes of two keys' sums are added into those keys' 16
/// output values.
///
/// # Safety
/// As [`accumulate_over_queries`]; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn keys_x8_avx512(
    n_kv: usize,
    rows: usize,
    part: &mut [f32],
    a: *const f32,
    b: View,
    alpha: f32,
) {
    use std::arch::x86_64::*;
    let pairs = rows / 2;
    debug_assert!(rows <= BLOCK);
    let mut bi = [0f32; 16 * BLOCK / 2];
    for (p, chunk) in bi[..pairs * 16].chunks_exact_mut(16).enumerate() {
        for (i, v) in chunk.iter_mut().enumerate() {
            let (c, e) = (i / 2, i % 2);
            // SAFETY: row `2 p + e < rows`, column `c < 8` of `b`.
            *v = unsafe { *b.ptr.offset((2 * p + e) as isize * b.rs + c as isize) };
        }
    }
    let bi = bi.as_ptr();
    let out = part.as_mut_ptr();
    /// Keys `j .. j + J` (`J` even, or 1 for the last odd key).
    #[inline(always)]
    unsafe fn keys<const J: usize>(
        j: usize,
        rows: usize,
        pairs: usize,
        a: *const f32,
        bi: *const f32,
        out: *mut f32,
        alpha: f32,
    ) {
        // SAFETY: keys `j .. j + J` lie inside `a`'s `n_kv` rows and `out`'s (the caller's loop); `bi` holds
        // `pairs` vectors; the CPU has AVX-512F.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); J];
            for p in 0..pairs {
                let v = _mm512_loadu_ps(bi.add(16 * p));
                for (jj, acc) in acc.iter_mut().enumerate() {
                    let pair = a.add((j + jj) * rows + 2 * p) as *const f64;
                    let w = _mm512_castpd_ps(_mm512_set1_pd(pair.read_unaligned()));
                    *acc = _mm512_fmadd_ps(w, v, *acc);
                }
            }
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            let alpha = _mm512_set1_ps(alpha);
            if J == 1 {
                let s = _mm512_add_ps(
                    _mm512_permutexvar_ps(even, acc[0]),
                    _mm512_permutexvar_ps(odd, acc[0]),
                );
                let o = out.add(j * 8);
                let cur = _mm512_maskz_loadu_ps(0xFF, o);
                _mm512_mask_storeu_ps(o, 0xFF, _mm512_fmadd_ps(s, alpha, cur));
            } else {
                for jj in (0..J).step_by(2) {
                    let s = _mm512_add_ps(
                        _mm512_permutex2var_ps(acc[jj], even, acc[jj + 1]),
                        _mm512_permutex2var_ps(acc[jj], odd, acc[jj + 1]),
                    );
                    let o = out.add((j + jj) * 8);
                    _mm512_storeu_ps(o, _mm512_fmadd_ps(s, alpha, _mm512_loadu_ps(o)));
                }
            }
        }
    }
    let mut j = 0;
    // SAFETY (each call): `j + J <= n_kv`.
    unsafe {
        while j + 12 <= n_kv {
            keys::<12>(j, rows, pairs, a, bi, out, alpha);
            j += 12;
        }
        while j + 2 <= n_kv {
            keys::<2>(j, rows, pairs, a, bi, out, alpha);
            j += 2;
        }
        if j < n_kv {
            keys::<1>(j, rows, pairs, a, bi, out, alpha);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flex::rel_max_diff;
    use burn::tensor::Distribution;
    use burn::tensor::activation::softmax;

    /// The tensor-op attention the fused kernel replaces.
    fn reference<B: Backend>(
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        heads: usize,
        scale: f32,
        causal: bool,
    ) -> Tensor<B, 3> {
        let [b, n_q, c] = q.dims();
        let n_kv = k.dims()[1];
        let d = c / heads;
        let split = |t: Tensor<B, 3>, n: usize| t.reshape([b, n, heads, d]).swap_dims(1, 2);
        let mut s = split(q, n_q).matmul(split(k, n_kv).swap_dims(2, 3)) * scale;
        if causal {
            let mask = Tensor::<B, 2, burn::tensor::Bool>::tril_mask([n_q, n_kv], 0, &s.device());
            s = s.mask_fill(mask.unsqueeze::<4>(), f32::NEG_INFINITY);
        }
        softmax(s, 3)
            .matmul(split(v, n_kv))
            .swap_dims(1, 2)
            .reshape([b, n_q, c])
    }

    #[test]
    fn fused_attention_matches_tensor_ops_forward_and_backward() {
        type A = AdFlex;
        let dev = Default::default();
        // (batch, n_q, n_kv, heads, d, causal): query counts that are not multiples of the block, cross
        // attention with fewer keys, one head (more tasks than pairs), causal.
        for (b, n_q, n_kv, heads, d, causal) in [
            (2, 70, 70, 2, 8, false),
            (2, 130, 17, 3, 5, false),
            (1, 65, 65, 1, 16, false),
            (2, 77, 77, 2, 8, true),
        ] {
            let c = heads * d;
            let q = Tensor::<A, 3>::random([b, n_q, c], Distribution::Normal(0.0, 1.0), &dev);
            let k = Tensor::<A, 3>::random([b, n_kv, c], Distribution::Normal(0.0, 1.0), &dev);
            let v = Tensor::<A, 3>::random([b, n_kv, c], Distribution::Normal(0.0, 1.0), &dev);
            let g = Tensor::<A, 3>::random([b, n_q, c], Distribution::Normal(0.0, 1.0), &dev);
            let scale = 1.0 / (d as f32).sqrt();
            let run = |fused: bool| {
                let (q, k, v) = (
                    q.clone().require_grad(),
                    k.clone().require_grad(),
                    v.clone().require_grad(),
                );
                let y = if fused {
                    attention(q.clone(), k.clone(), v.clone(), heads, scale, causal)
                        .unwrap_or_else(|_| panic!("fused path taken for Autodiff<Flex> f32"))
                } else {
                    reference(q.clone(), k.clone(), v.clone(), heads, scale, causal)
                };
                let grads = (y.clone() * g.clone()).sum().backward();
                (
                    y.inner(),
                    q.grad(&grads).unwrap(),
                    k.grad(&grads).unwrap(),
                    v.grad(&grads).unwrap(),
                )
            };
            let (y1, dq1, dk1, dv1) = run(true);
            let (y0, dq0, dk0, dv0) = run(false);
            let case = format!("b{b} nq{n_q} nkv{n_kv} h{heads} d{d} causal {causal}");
            assert!(rel_max_diff(y1, y0) < 1e-5, "output, {case}");
            assert!(rel_max_diff(dq1, dq0) < 1e-4, "dq, {case}");
            assert!(rel_max_diff(dk1, dk0) < 1e-4, "dk, {case}");
            assert!(rel_max_diff(dv1, dv0) < 1e-4, "dv, {case}");
        }
    }

    #[test]
    fn inference_backend_takes_the_fused_path_and_f64_falls_back() {
        let dev = Default::default();
        let t = || Tensor::<Flex, 3>::random([1, 9, 8], Distribution::Normal(0.0, 1.0), &dev);
        let (q, k, v) = (t(), t(), t());
        let fused = attention(q.clone(), k.clone(), v.clone(), 2, 0.5, false)
            .unwrap_or_else(|_| panic!("fused path taken for Flex f32"));
        let reference = reference(q.clone(), k.clone(), v.clone(), 2, 0.5, false);
        assert!(rel_max_diff(fused, reference) < 1e-5);
        let f = |t: Tensor<Flex, 3>| t.cast(DType::F64);
        assert!(attention(f(q), f(k), f(v), 2, 0.5, false).is_err());
    }
}
