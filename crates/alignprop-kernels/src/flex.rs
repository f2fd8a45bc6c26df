//! Fused CPU kernels for ops that burn's tensor API cannot make fast, with their autodiff backward.
//!
//! GroupNorm written with tensor ops takes several full passes over the activation (mean, centring, variance,
//! normalisation, affine) and, under autodiff, a graph of as many nodes. Here it is one kernel on the CPU backend
//! (`Flex`): per `(batch, group)` a two-pass mean/variance, then `y = x * scale + shift` with the affine folded
//! in, in parallel over rayon's pool; and one backward kernel registered as a custom autodiff op for
//! `Autodiff<Flex>` (gradients for the input, gamma and beta). Softmax ([`softmax_last`]) and GEGLU ([`geglu`]) are
//! fused the same way. The row kernels they share (and [`crate::flex_attention`] uses) are in `simd`: vectorised
//! `exp` / `erf`, compiled for AVX-512, AVX2+FMA and the baseline and chosen at run time; the strided GEMM helpers
//! `mm` / `mm_strided` serve the attention and convolution kernels.
//!
//! Dispatch is by backend type at run time (each entry point returns its inputs back in `Err` for any other
//! backend, dtype or checkpointing strategy, and callers fall back to the tensor-op version), so model code stays
//! generic over `B: Backend` with no extra trait bound on users' code, and every backend keeps working unchanged.

use std::any::TypeId;
use std::cell::RefCell;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

pub(crate) type AdFlex = Autodiff<Flex, NoCheckpointing>;
pub(crate) type AdPrimitive = <AdFlex as BackendTypes>::FloatTensorPrimitive;

use crate::Activation;
pub(crate) use crate::cast;

pub(crate) fn f32_values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().unwrap().to_vec()),
    }
}

pub(crate) fn flex_tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// A layer with a weight `w` and, optionally, a bias on `Flex` or `Autodiff<Flex>` (the caller has checked that `B`
/// is one of them and that every tensor is f32): `run` computes the output from the values of `x`, `w` and the
/// bias; under autodiff the output is recorded as the custom op `op2` (parents `x`, `w`) or `op3` (and the bias),
/// keeping `state(x, w)` for the backward when a parent is tracked.
pub(crate) fn layer_with_bias<B, const D: usize, S, O2, O3>(
    (x, w, bias): (Tensor<B, D>, Tensor<B, D>, Option<Tensor<B, 1>>),
    run: impl Fn(&[f32], &[f32], Option<&[f32]>) -> FlexTensor,
    state: impl FnOnce(FlexTensor, FlexTensor) -> S,
    (op2, op3): (O2, O3),
) -> Tensor<B, D>
where
    B: Backend,
    S: Clone + Send + std::fmt::Debug + 'static,
    O2: Backward<Flex, 2, State = S>,
    O3: Backward<Flex, 3, State = S>,
{
    let prim = |t: Tensor<B, D>| t.into_primitive().tensor();
    let prim1 = |t: Tensor<B, 1>| t.into_primitive().tensor();
    let wrap =
        |p: B::FloatTensorPrimitive| Tensor::<B, D>::from_primitive(TensorPrimitive::Float(p));
    let values = |x: &FlexTensor, w: &FlexTensor, bias: Option<&FlexTensor>| {
        let bias = bias.map(f32_values);
        run(&f32_values(x), &f32_values(w), bias.as_deref())
    };
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        let (x, w): (FlexTensor, FlexTensor) = (cast(prim(x)), cast(prim(w)));
        let bias: Option<FlexTensor> = bias.map(|t| cast(prim1(t)));
        return wrap(cast(values(&x, &w, bias.as_ref())));
    }
    let (x, w): (AdPrimitive, AdPrimitive) = (cast(prim(x)), cast(prim(w)));
    let bias: Option<AdPrimitive> = bias.map(|t| cast(prim1(t)));
    let y = values(
        &x.primitive,
        &w.primitive,
        bias.as_ref().map(|t| &t.primitive),
    );
    let state = state(x.primitive.clone(), w.primitive.clone());
    let out = match bias {
        Some(bias) => match op3
            .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone(), bias.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
        None => match op2
            .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
    };
    wrap(cast(out))
}

/// A vector of `len` values that the caller writes completely before reading one (no zeroing pass).
pub(crate) fn filled_later(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: f32 has no invalid bit patterns, and every caller overwrites all `len` values before it reads one.
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(len)
    };
    v
}

thread_local! {
    /// Per-thread scratch (attention's score blocks, convolution's im2col blocks), reused across calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a per-thread scratch buffer of at least `len` floats (contents unspecified). `f` must not start
/// rayon work (a stolen task on this thread would find the buffer borrowed).
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// A raw pointer that may cross threads: parallel tasks write disjoint regions of one output buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: every task that holds a copy writes a region no other task touches (see the callers).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper, not its field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A strided matrix view for [`mm`]: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a view is an address and strides; tasks that share one read through it, and a view used as a GEMM's
// destination addresses a region only its task writes (see the callers).
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    /// Row-major rows of `rs` elements starting at `s[offset]`.
    pub fn rows(s: &[f32], offset: usize, rs: usize) -> Self {
        Self {
            ptr: s[offset..].as_ptr(),
            rs: rs as isize,
            cs: 1,
        }
    }
    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst (m x n, row stride dst_rs) = [dst +] beta * a (m x k) b (k x n)` on the calling thread.
///
/// # Safety
/// Every view must address valid memory for its `m x k`, `k x n`, `m x n` extent; `dst` must not alias `a`, `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: View,
    b: View,
    beta: f32,
) {
    let dst = View {
        ptr: dst,
        rs: dst_rs as isize,
        cs: 1,
    };
    // SAFETY: forwarded from the caller's contract.
    unsafe { mm_strided(m, n, k, dst, accumulate, a, b, beta, false) }
}

/// [`mm`] with a strided destination (its `ptr` written through) and, when `parallel`, rayon's threads inside
/// the GEMM.
///
/// # Safety
/// As [`mm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: View,
    accumulate: bool,
    a: View,
    b: View,
    beta: f32,
    parallel: bool,
) {
    let par = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr as *mut f32,
            dst.cs,
            dst.rs,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// Products below this many multiply-adds run as one GEMM on the calling thread (no task overhead).
const SERIAL_MACS: usize = 1 << 18;

/// `dst (m x n, row-major, row stride n) = [dst +] a (m x k) b (k x n)` across rayon's threads: the longer of `m`
/// and `n` is cut in one part per thread (the other operand, packed by every part, is then the smaller one), each
/// part one single-threaded GEMM.
pub(crate) fn par_mm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: View,
    b: View,
) {
    debug_assert_eq!(dst.len(), m * n);
    let threads = rayon::current_num_threads();
    let parts = if m * n * k < SERIAL_MACS {
        1
    } else {
        threads.min(m.max(n).div_ceil(16)).max(1)
    };
    if b.rs == 1 && m * n * k >= SERIAL_MACS && 2 * m <= n.min(k) {
        // A column-stored `b` with few rows of `a` (CLIP's 154 tokens through its 768-wide layers, the UNet's
        // cross-attention keys and values): gemm would pack `bᵀ`, the big operand, by gathers (below) for only `m`
        // uses of each value. Computed as `dstᵀ` instead (gemm's natural column-major destination), gemm reads `b`'s
        // columns in place and packs only `a`; one 8 x 8-block transpose then writes (or adds) `dstᵀ` into `dst`.
        // Measured (AMD EPYC, AVX-512, 2 threads, [rows, in] -> [rows, out]): 154 x 768 -> 768 165 -> 186
        // GFLOP/s, -> 2304 177 -> 207, -> 1280 155 -> 182, 77 x 768 -> 768 133 -> 164, 128 x 640 -> 640 160 -> 181;
        // no gain from 2 m > min(n, k) on (308 x 768 -> 768 178 / 181, 256 x 320 -> 320 194 / 184, 1024 rows 200 /
        // 184).
        // `dstᵀ = bᵀ aᵀ` by this function itself: split along `n` (its longer side now), each part's row-major
        // destination handed to gemm as the column-major `dst` part it is (`2 n > min(m, k)`: no deeper recursion).
        let mut dt = filled_later(m * n);
        par_mm(n, m, k, &mut dt, false, b.t(), a.t());
        // SAFETY: `dt` holds `n` rows of `m` values; `dst` holds `m * n`.
        unsafe {
            if accumulate {
                transpose_into::<true>(View::rows(&dt, 0, m), n, m, dst)
            } else {
                transpose_into::<false>(View::rows(&dt, 0, m), n, m, dst)
            }
        };
        return;
    }
    if parts > 1 && b.rs == 1 && gather_aliases(b.cs.unsigned_abs()) {
        // gemm computes a row-major `dst` as `dstᵀ = bᵀ aᵀ` and packs `bᵀ` into register panels (64 rows with
        // AVX-512); from a `b` stored column by column (a linear layer's `wᵀ`, a convolution's transposed input)
        // that packing gathers one value at a time from rows `b.cs` apart, and at the strides of `gather_aliases`
        // those rows fall into a few L1 sets (linear layers of 128-2048 rows from 512, 1024 or 3072 inputs: 92-141
        // GFLOP/s, 170-220 at other strides). One transposed copy by 8 x 8 register transposes, shared by the
        // parts, makes the packing a contiguous copy. With few rows of `a` the branch above comes first: it packs
        // `a` instead and copies no weight (CLIP's MLP output layer [154, 3072] x [3072, 768]: 111 GFLOP/s
        // gathering, 157 with the weight's transposed copy, 199 computed as `dstᵀ`).
        let mut bt = filled_later(k * n);
        // SAFETY: `b` addresses `k x n` values, so `bᵀ` addresses `n` rows of `k` at unit stride.
        unsafe { transpose(b.t(), n, k, &mut bt) };
        return par_mm(m, n, k, dst, accumulate, a, View::rows(&bt, 0, n));
    }
    let dst = SharedMut(dst.as_mut_ptr());
    let split_rows = m >= n;
    let len = if split_rows { m } else { n };
    // Parts of whole 16-element blocks (the GEMM's register tiles), the last one shorter.
    let step = len.div_ceil(parts).div_ceil(16) * 16;
    (0..len.div_ceil(step)).into_par_iter().for_each(|part| {
        let (s, e) = (part * step, ((part + 1) * step).min(len));
        // SAFETY: part `part` writes rows (or columns) `s .. e` of `dst`, which no other part touches; `a` and `b`
        // address `m x k` and `k x n` values (callers' views over their own buffers); `dst` is `m x n`.
        unsafe {
            if split_rows {
                let a = View {
                    ptr: a.ptr.offset(s as isize * a.rs),
                    ..a
                };
                let d = View {
                    ptr: dst.get().add(s * n),
                    rs: n as isize,
                    cs: 1,
                };
                mm_strided(e - s, n, k, d, accumulate, a, b, 1.0, false);
            } else {
                let b = View {
                    ptr: b.ptr.offset(s as isize * b.cs),
                    ..b
                };
                let d = View {
                    ptr: dst.get().add(s),
                    rs: n as isize,
                    cs: 1,
                };
                mm_strided(m, e - s, k, d, accumulate, a, b, 1.0, false);
            }
        }
    });
}

/// Whether gathering values `stride` floats apart (gemm's packing of a column-stored operand) lands in at most 2 of
/// the 64 sets of an L1 data cache with 64 sets of 64-byte lines (AMD Zen 4: 32 KiB 8-way; Intel Sapphire Rapids:
/// 48 KiB 12-way): strides of a multiple of 2 KiB (512, 1024, 3072 floats).
/// Measured (AMD EPYC, AVX-512, linear layers of 128-2048 rows): those strides ran at 92-141 GFLOP/s against
/// 170-220 otherwise, and a transposed copy first gave 157-218; at 640, 768 and 1280 floats the copy gained
/// -10% to +13%, so it is left out there.
fn gather_aliases(stride: usize) -> bool {
    stride > 1 && (stride * size_of::<f32>()).is_multiple_of(2048)
}

/// `dst[c * rows + r] = src(r, c)` for `r < rows`, `c < cols`: a `[rows, cols]` view with unit column stride
/// written as the row-major `[cols, rows]` transpose, in parallel over strips of 16 columns, by 8 x 8 register
/// transposes (AVX) where the CPU has them.
///
/// # Safety
/// `src` must address `rows x cols` values; `dst` holds `rows * cols` values.
pub(crate) unsafe fn transpose(src: View, rows: usize, cols: usize, dst: &mut [f32]) {
    // SAFETY: forwarded from the caller's contract.
    unsafe { transpose_into::<false>(src, rows, cols, dst) }
}

/// [`transpose`], adding to `dst` when `ADD` (`dst[c * rows + r] += src(r, c)`) instead of overwriting it.
///
/// # Safety
/// As [`transpose`].
pub(crate) unsafe fn transpose_into<const ADD: bool>(
    src: View,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
) {
    const STRIP: usize = 16;
    assert_eq!(src.cs, 1, "transpose reads rows at unit stride");
    assert_eq!(dst.len(), rows * cols);
    if dst.is_empty() {
        return;
    }
    let src_rs = src.rs as usize;
    dst.par_chunks_mut(STRIP * rows)
        .enumerate()
        .for_each(|(strip, d)| {
            let c0 = strip * STRIP;
            let width = d.len() / rows;
            // The whole view (Sync), not its pointer field alone, is what the closure captures.
            let src: View = src;
            // SAFETY: strip `strip` reads columns `c0 .. c0 + width` of the caller's `rows x cols` view.
            unsafe { transpose_strip::<ADD>(src.ptr.add(c0), rows, width, src_rs, d) };
        });
}

/// [`transpose`] of one strip of `width` columns on the calling thread.
///
/// # Safety
/// As [`transpose`] for `width` columns.
pub(crate) unsafe fn transpose_strip<const ADD: bool>(
    src: *const f32,
    rows: usize,
    width: usize,
    src_rs: usize,
    d: &mut [f32],
) {
    let (r8, c8) = (rows / 8 * 8, width / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    let done = if std::arch::is_x86_feature_detected!("avx") {
        for c in (0..c8).step_by(8) {
            for r in (0..r8).step_by(8) {
                // SAFETY: rows r .. r + 8, columns c .. c + 8 lie inside the block; the CPU has AVX.
                unsafe {
                    transpose8x8_avx::<ADD>(
                        src.add(r * src_rs + c),
                        src_rs,
                        d.as_mut_ptr().add(c * rows + r),
                        rows,
                    )
                };
            }
        }
        (r8, c8)
    } else {
        (0, 0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = (0, 0);
    // The edges (and everything without AVX): one value at a time.
    for c in 0..width {
        let r_from = if c < done.1 { done.0 } else { 0 };
        let out = &mut d[c * rows..(c + 1) * rows];
        for (r, o) in out.iter_mut().enumerate().skip(r_from) {
            // SAFETY: `r < rows`, `c < width`.
            let v = unsafe { *src.add(r * src_rs + c) };
            *o = if ADD { *o + v } else { v };
        }
    }
}

/// The 8 x 8 block at `src` (row stride `src_rs`) written transposed at `dst` (row stride `dst_rs`), or added to
/// it when `ADD`.
///
/// # Safety
/// Both blocks must be valid; the CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose8x8_avx<const ADD: bool>(
    src: *const f32,
    src_rs: usize,
    dst: *mut f32,
    dst_rs: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract: 8 rows of 8 values at `src`, 8 rows of 8 at `dst`.
    unsafe {
        let r = |i: usize| _mm256_loadu_ps(src.add(i * src_rs));
        // Pairs of rows interleaved, then quadruples, then the 128-bit halves exchanged.
        let (t0, t1) = (
            _mm256_unpacklo_ps(r(0), r(1)),
            _mm256_unpackhi_ps(r(0), r(1)),
        );
        let (t2, t3) = (
            _mm256_unpacklo_ps(r(2), r(3)),
            _mm256_unpackhi_ps(r(2), r(3)),
        );
        let (t4, t5) = (
            _mm256_unpacklo_ps(r(4), r(5)),
            _mm256_unpackhi_ps(r(4), r(5)),
        );
        let (t6, t7) = (
            _mm256_unpacklo_ps(r(6), r(7)),
            _mm256_unpackhi_ps(r(6), r(7)),
        );
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let w = |i: usize, v| {
            let d = dst.add(i * dst_rs);
            let v = if ADD {
                _mm256_add_ps(_mm256_loadu_ps(d), v)
            } else {
                v
            };
            _mm256_storeu_ps(d, v)
        };
        w(0, _mm256_permute2f128_ps::<0x20>(s0, s4));
        w(1, _mm256_permute2f128_ps::<0x20>(s1, s5));
        w(2, _mm256_permute2f128_ps::<0x20>(s2, s6));
        w(3, _mm256_permute2f128_ps::<0x20>(s3, s7));
        w(4, _mm256_permute2f128_ps::<0x31>(s0, s4));
        w(5, _mm256_permute2f128_ps::<0x31>(s1, s5));
        w(6, _mm256_permute2f128_ps::<0x31>(s2, s6));
        w(7, _mm256_permute2f128_ps::<0x31>(s3, s7));
    }
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
    let mut y = filled_later(b * c * s);
    let mut stats = vec![(0f32, 0f32); b * groups];
    y.par_chunks_mut(n)
        .zip(xs.par_chunks(n))
        .zip(stats.par_iter_mut())
        .enumerate()
        .for_each(|(bg, ((yg, xg), st))| {
            // Two passes in f32 with 16 vector-lane partial sums (each lane sums n / 16 values).
            let mean = simd::sum(xg) / n as f32;
            let var = simd::centred_square_sum(xg, mean) / n as f32;
            let rstd = 1.0 / (var + eps as f32).sqrt();
            let g0 = (bg % groups) * cpg;
            for ch in 0..cpg {
                let scale = gs[g0 + ch] * rstd;
                let shift = bs[g0 + ch] - mean * scale;
                let range = ch * s..(ch + 1) * s;
                simd::scale_shift(&xg[range.clone()], scale, shift, &mut yg[range]);
            }
            *st = (mean, rstd);
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
    let mut dx = filled_later(b * c * s);
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
                let range = ch * s..(ch + 1) * s;
                let (sdy, sdy_xhat) =
                    simd::group_norm_grad_sums(&xg[range.clone()], &dyg[range], mean, rstd);
                let (sdy, sdy_xhat) = (sdy as f64, sdy_xhat as f64);
                part[ch] = (sdy_xhat, sdy);
                sum_dyg += gamma * sdy;
                sum_dyg_xhat += gamma * sdy_xhat;
            }
            let (a, bb) = (
                (sum_dyg / n as f64) as f32,
                (sum_dyg_xhat / n as f64) as f32,
            );
            for ch in 0..cpg {
                let range = ch * s..(ch + 1) * s;
                simd::group_norm_dx(
                    &xg[range.clone()],
                    &dyg[range.clone()],
                    [mean, rstd, gs[g0 + ch], a, bb],
                    &mut dxg[range],
                );
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

/// Softmax over the last dimension of `x` `[rows, ..., n]`, fused: per row one pass for the maximum, one for
/// `exp(x - max)` and its sum (a vectorised polynomial `exp`), one to scale; in parallel over rows.
///
/// burn's `activation::softmax` is five tensor ops (max, subtract, exp, sum, divide), and Flex's `exp` is the
/// scalar libm call: in SD's self-attention at 32x32 latents that was a fifth of the UNet's forward time.
/// The backward (for `Autodiff<Flex>`) is `dx = y * (dy - sum(dy * y))` per row, from the saved output `y`.
///
/// Returns the input back unless the backend is `Flex` or `Autodiff<Flex>` and `x` is f32.
pub fn softmax_last<B: Backend, const D: usize>(
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if x.dtype() != DType::F32 || x.dims()[D - 1] == 0 {
        return Err(x);
    }
    let wrap =
        |p: B::FloatTensorPrimitive| Tensor::<B, D>::from_primitive(TensorPrimitive::Float(p));
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        let x: FlexTensor = cast(x.into_primitive().tensor());
        return Ok(wrap(cast(softmax_forward(x))));
    }
    if TypeId::of::<B>() == TypeId::of::<AdFlex>() {
        let x: AdPrimitive = cast(x.into_primitive().tensor());
        let node = x.node.clone();
        // Moved, not cloned: a uniquely held score matrix is normalised in its own buffer.
        let y = softmax_forward(x.primitive);
        let out = match SoftmaxBackward
            .prepare::<NoCheckpointing>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        return Ok(wrap(cast(out)));
    }
    Err(x)
}

/// Rows handed to one rayon task (rows are typically 77 to 4096 values long).
const ROWS_PER_TASK: usize = 8;

/// The values of `t` in a buffer this function owns: `t`'s own when it holds them alone, contiguously and from
/// offset 0 (the usual case for a fresh matmul output or gradient), a copy otherwise.
fn owned_f32(t: FlexTensor) -> Vec<f32> {
    t.into_data()
        .into_vec::<f32>()
        .expect("fused: f32 checked before")
}

fn softmax_forward(x: FlexTensor) -> FlexTensor {
    let shape = x.layout().shape().to_vec();
    let n = *shape.last().unwrap();
    let mut y = owned_f32(x);
    y.par_chunks_mut(n * ROWS_PER_TASK).for_each(|rows| {
        for row in rows.chunks_mut(n) {
            simd::softmax_row(row);
        }
    });
    flex_tensor(y, shape)
}

#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Flex, 1> for SoftmaxBackward {
    /// The forward's output.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
        let y = ops.state;
        let shape = y.layout().shape().to_vec();
        let n = *shape.last().unwrap();
        let ys = f32_values(&y);
        // The gradient buffer becomes dx in place.
        let mut g = owned_f32(dy);
        g.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(ys.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(gr, yr)| {
                for (g, y) in gr.chunks_mut(n).zip(yr.chunks(n)) {
                    simd::softmax_row_backward(y, g);
                }
            });
        let [px] = ops.parents;
        if let Some(node) = px {
            grads.register::<Flex>(node.id, flex_tensor(g, shape));
        }
    }
}

/// An element-wise [`Activation`], fused and vectorised: one pass with the polynomial `exp` / `erf`, in parallel
/// over chunks, in place at inference when the input's buffer is its own; its backward (for `Autodiff<Flex>`) from
/// the saved input: swish `dx = dy * s * (1 + beta x (1 - s))`, `s = sigmoid(beta x)`; GELU
/// `dx = dy * (Phi(x) + x phi(x))`. burn's `silu` / `sigmoid` / `gelu` are a scalar libm `exp` / `erf` per element
/// and a multiply: two passes and a temporary.
///
/// Returns the input back unless the backend is `Flex` or `Autodiff<Flex>` and `x` is f32.
pub fn activation<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    act: Activation,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    let wrap =
        |p: B::FloatTensorPrimitive| Tensor::<B, D>::from_primitive(TensorPrimitive::Float(p));
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        let x: FlexTensor = cast(x.into_primitive().tensor());
        // In place when the input's buffer is its own (the usual GroupNorm output).
        let shape = x.layout().shape().to_vec();
        let mut y = owned_f32(x);
        y.par_chunks_mut(ELEMENTS_PER_TASK)
            .for_each(|y| act_in_place(act, y));
        return Ok(wrap(cast(flex_tensor(y, shape))));
    }
    if TypeId::of::<B>() == TypeId::of::<AdFlex>() {
        let x: AdPrimitive = cast(x.into_primitive().tensor());
        let shape = x.primitive.layout().shape().to_vec();
        let xs = f32_values(&x.primitive);
        let mut y = filled_later(xs.len());
        y.par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(xs.par_chunks(ELEMENTS_PER_TASK))
            .for_each(|(y, x)| {
                y.copy_from_slice(x);
                act_in_place(act, y)
            });
        drop(xs);
        let y = flex_tensor(y, shape);
        let out = match ActivationBackward(act)
            .prepare::<NoCheckpointing>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(x.primitive.clone(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        return Ok(wrap(cast(out)));
    }
    Err(x)
}

/// `sum(out * g)` -> `[1]` with `g` a constant ([`crate::vjp_scalar`]): one pass over the two tensors ([`dot`]);
/// under autodiff its backward registers `g` itself (or `g` times the scalar's gradient when that is not 1) as
/// `out`'s gradient, where burn's `(out * g).sum()` expands the sum's gradient into a tensor of ones and multiplies
/// `g` by it.
///
/// Returns the inputs back unless the backend is `Flex` or `Autodiff<Flex>`, both tensors are f32 of one shape and
/// `g` does not require a gradient.
pub fn vjp_scalar<B: Backend, const D: usize>(
    out: Tensor<B, D>,
    g: Tensor<B, D>,
) -> Result<Tensor<B, 1>, (Tensor<B, D>, Tensor<B, D>)> {
    if out.dtype() != DType::F32
        || g.dtype() != DType::F32
        || out.dims() != g.dims()
        || g.is_require_grad()
    {
        return Err((out, g));
    }
    let wrap =
        |p: B::FloatTensorPrimitive| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(p));
    let scalar = |v: f32| flex_tensor(vec![v], vec![1]);
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        let out: FlexTensor = cast(out.into_primitive().tensor());
        let g: FlexTensor = cast(g.into_primitive().tensor());
        return Ok(wrap(cast(scalar(dot(&f32_values(&out), &f32_values(&g))))));
    }
    if TypeId::of::<B>() == TypeId::of::<AdFlex>() {
        let out: AdPrimitive = cast(out.into_primitive().tensor());
        let g: AdPrimitive = cast(g.into_primitive().tensor());
        let y = scalar(dot(&f32_values(&out.primitive), &f32_values(&g.primitive)));
        let result = match VjpBackward
            .prepare::<NoCheckpointing>([out.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(g.primitive, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        return Ok(wrap(cast(result)));
    }
    Err((out, g))
}

/// `sum(a * b)` of two slices of one length: [`simd::dot`] per block of [`ELEMENTS_PER_TASK`] values, in
/// parallel, the blocks summed in f64.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.par_chunks(ELEMENTS_PER_TASK)
        .zip(b.par_chunks(ELEMENTS_PER_TASK))
        .map(|(a, b)| simd::dot(a, b) as f64)
        .sum::<f64>() as f32
}

#[derive(Debug)]
struct VjpBackward;

impl Backward<Flex, 1> for VjpBackward {
    /// The cotangent `g`.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
        let s = f32_values(&dy)[0];
        let g = ops.state;
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        let dx = if s == 1.0 {
            g
        } else {
            let shape = g.layout().shape().to_vec();
            let values = f32_values(&g).iter().map(|v| v * s).collect();
            flex_tensor(values, shape)
        };
        grads.register::<Flex>(node.id, dx);
    }
}

/// SiLU `x * sigmoid(x)`: [`activation`] with [`Activation::Swish`]`(1.0)`.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
    activation(x, Activation::Swish(1.0))
}

fn act_in_place(act: Activation, y: &mut [f32]) {
    match act {
        Activation::Swish(beta) => simd::swish_in_place(y, beta as f32),
        Activation::Gelu => simd::gelu_in_place(y),
    }
}

/// Elements handed to one rayon task by the element-wise kernels.
const ELEMENTS_PER_TASK: usize = 1 << 14;

#[derive(Debug)]
struct ActivationBackward(Activation);

impl Backward<Flex, 1> for ActivationBackward {
    /// The forward's input `x`.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
        let x = ops.state;
        let shape = x.layout().shape().to_vec();
        let xs = f32_values(&x);
        // The gradient buffer becomes dx in place.
        let mut g = owned_f32(dy);
        g.par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(xs.par_chunks(ELEMENTS_PER_TASK))
            .for_each(|(g, x)| match self.0 {
                Activation::Swish(beta) => simd::swish_row_backward(x, g, beta as f32),
                Activation::Gelu => simd::gelu_row_backward(x, g),
            });
        let [px] = ops.parents;
        if let Some(node) = px {
            grads.register::<Flex>(node.id, flex_tensor(g, shape));
        }
    }
}

/// GEGLU's gate, fused: `h` `[rows, 2 * inner]` -> `h[:, :inner] * gelu(h[:, inner:])` `[rows, inner]` with the
/// exact (erf) GELU, vectorised, in parallel over rows; its backward (for `Autodiff<Flex>`) writes both halves of
/// the input gradient in one pass. With tensor ops this was a strided `narrow`, a scalar `erf` per element and a
/// strided multiply (an eighth of the mid-size UNet's forward time).
///
/// Returns the input back unless the backend is `Flex` or `Autodiff<Flex>` and `h` is f32 with an even width.
pub fn geglu<B: Backend>(h: Tensor<B, 2>) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let [_, w] = h.dims();
    if h.dtype() != DType::F32 || w % 2 != 0 || w == 0 {
        return Err(h);
    }
    let wrap =
        |p: B::FloatTensorPrimitive| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p));
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        let h: FlexTensor = cast(h.into_primitive().tensor());
        return Ok(wrap(cast(geglu_forward(&h))));
    }
    if TypeId::of::<B>() == TypeId::of::<AdFlex>() {
        let h: AdPrimitive = cast(h.into_primitive().tensor());
        let y = geglu_forward(&h.primitive);
        let out = match GegluBackward
            .prepare::<NoCheckpointing>([h.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(h.primitive.clone(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        return Ok(wrap(cast(out)));
    }
    Err(h)
}

fn geglu_forward(h: &FlexTensor) -> FlexTensor {
    let shape = h.layout().shape().to_vec();
    let (rows, inner) = (shape[0], shape[1] / 2);
    let hs = f32_values(h);
    let mut y = vec![0f32; rows * inner];
    y.par_chunks_mut(inner * ROWS_PER_TASK)
        .zip(hs.par_chunks(2 * inner * ROWS_PER_TASK))
        .for_each(|(yr, hr)| {
            for (yo, hi) in yr.chunks_mut(inner).zip(hr.chunks(2 * inner)) {
                let (a, b) = hi.split_at(inner);
                simd::geglu_row(a, b, yo);
            }
        });
    flex_tensor(y, vec![rows, inner])
}

#[derive(Debug)]
struct GegluBackward;

impl Backward<Flex, 1> for GegluBackward {
    /// The forward's input `h`.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
        let h = ops.state;
        let shape = h.layout().shape().to_vec();
        let inner = shape[1] / 2;
        let (hs, dys) = (f32_values(&h), f32_values(&dy));
        let mut dh = vec![0f32; hs.len()];
        dh.par_chunks_mut(2 * inner * ROWS_PER_TASK)
            .zip(hs.par_chunks(2 * inner * ROWS_PER_TASK))
            .zip(dys.par_chunks(inner * ROWS_PER_TASK))
            .for_each(|((dhr, hr), dyr)| {
                for ((dho, hi), dyi) in dhr
                    .chunks_mut(2 * inner)
                    .zip(hr.chunks(2 * inner))
                    .zip(dyr.chunks(inner))
                {
                    let (a, b) = hi.split_at(inner);
                    let (da, db) = dho.split_at_mut(inner);
                    simd::geglu_row_backward(a, b, dyi, da, db);
                }
            });
        let [ph] = ops.parents;
        if let Some(node) = ph {
            grads.register::<Flex>(node.id, flex_tensor(dh, shape));
        }
    }
}

/// `x` `[batch, m, n]` -> `[batch, n, m]`, contiguous, by [`transpose`] per batch; under autodiff its backward is
/// the same swap of the gradient. Returns the input back unless the backend is `Flex` or `Autodiff<Flex>` and it
/// is f32.
pub fn swap_last2<B: Backend>(x: Tensor<B, 3>) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    let wrap =
        |p: B::FloatTensorPrimitive| Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(p));
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        let x: FlexTensor = cast(x.into_primitive().tensor());
        return Ok(wrap(cast(swap_last2_values(&x))));
    }
    if TypeId::of::<B>() == TypeId::of::<AdFlex>() {
        let x: AdPrimitive = cast(x.into_primitive().tensor());
        let y = swap_last2_values(&x.primitive);
        let out = SwapBackward
            .prepare::<NoCheckpointing>([x.node.clone()])
            .compute_bound()
            .stateless(y);
        return Ok(wrap(cast(out)));
    }
    Err(x)
}

fn swap_last2_values(x: &FlexTensor) -> FlexTensor {
    let shape = x.layout().shape().to_vec();
    let (b, m, n) = (shape[0], shape[1], shape[2]);
    let xs = f32_values(x);
    let mut y = filled_later(b * m * n);
    for (src, dst) in xs.chunks_exact(m * n).zip(y.chunks_exact_mut(m * n)) {
        // SAFETY: `src` is `m` rows of `n` values, row-major, inside `xs`.
        unsafe { transpose(View::rows(src, 0, n), m, n, dst) };
    }
    flex_tensor(y, vec![b, n, m])
}

#[derive(Debug)]
struct SwapBackward;

impl Backward<Flex, 1> for SwapBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
        let [px] = ops.parents;
        if let Some(node) = px {
            grads.register::<Flex>(node.id, swap_last2_values(&dy));
        }
    }
}

/// `cat([a, b], 1)`: `a` `[batch, c_a, h, w]` and `b` `[batch, c_b, h, w]` -> `[batch, c_a + c_b, h, w]`,
/// contiguous (the UNet's up blocks concatenate their input with the skip connection). Under autodiff its backward
/// hands each input a contiguous copy of its channels of the gradient: burn's `cat` backward hands out strided
/// slices of it, which the gradient sums of the skip tensors (each also feeds the next down layer) and the copies
/// into contiguous values then walk one element at a time on one thread. Returns the inputs back unless the
/// backend is `Flex` or `Autodiff<Flex>`, both are f32 and all but the channel dimension agree.
#[allow(clippy::type_complexity)]
pub fn cat_channels<B: Backend>(
    a: Tensor<B, 4>,
    b: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>)> {
    let ([n, ca, h, w], [nb, cb, hb, wb]) = (a.dims(), b.dims());
    if a.dtype() != DType::F32
        || b.dtype() != DType::F32
        || (n, h, w) != (nb, hb, wb)
        || n * ca * cb * h * w == 0
    {
        return Err((a, b));
    }
    let split = Split {
        batch: n,
        a: ca * h * w,
        b: cb * h * w,
    };
    let shape = vec![n, ca + cb, h, w];
    let prim = |t: Tensor<B, 4>| t.into_primitive().tensor();
    let wrap =
        |p: B::FloatTensorPrimitive| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p));
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        let (a, b): (FlexTensor, FlexTensor) = (cast(prim(a)), cast(prim(b)));
        return Ok(wrap(cast(flex_tensor(split.join(&a, &b), shape))));
    }
    if TypeId::of::<B>() == TypeId::of::<AdFlex>() {
        let (a, b): (AdPrimitive, AdPrimitive) = (cast(prim(a)), cast(prim(b)));
        let out = flex_tensor(split.join(&a.primitive, &b.primitive), shape);
        let out = match CatBackward
            .prepare::<NoCheckpointing>([a.node.clone(), b.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((split, vec![n, ca, h, w], vec![n, cb, h, w]), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        return Ok(wrap(cast(out)));
    }
    Err((a, b))
}

/// The per-image extents of [`cat_channels`]: `batch` images of `a` then `b` values each.
#[derive(Clone, Copy, Debug)]
struct Split {
    batch: usize,
    a: usize,
    b: usize,
}

impl Split {
    /// Per image, `a`'s values then `b`'s.
    fn join(&self, a: &FlexTensor, b: &FlexTensor) -> Vec<f32> {
        let (av, bv) = (f32_values(a), f32_values(b));
        let mut out = filled_later(self.batch * (self.a + self.b));
        out.par_chunks_mut(self.a + self.b)
            .zip(av.par_chunks(self.a).zip(bv.par_chunks(self.b)))
            .for_each(|(dst, (sa, sb))| {
                dst[..self.a].copy_from_slice(sa);
                dst[self.a..].copy_from_slice(sb);
            });
        out
    }
    /// Of every image of `joined`, its first `self.a` values (`first`) or its last `self.b`, contiguous.
    fn part(&self, joined: &[f32], first: bool) -> Vec<f32> {
        let (off, len) = if first { (0, self.a) } else { (self.a, self.b) };
        let mut out = filled_later(self.batch * len);
        out.par_chunks_mut(len).enumerate().for_each(|(i, dst)| {
            dst.copy_from_slice(&joined[i * (self.a + self.b) + off..][..len])
        });
        out
    }
}

#[derive(Debug)]
struct CatBackward;

impl Backward<Flex, 2> for CatBackward {
    type State = (Split, Vec<usize>, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
        let (split, shape_a, shape_b) = ops.state;
        let dys = f32_values(&dy);
        let [pa, pb] = ops.parents;
        if let Some(node) = pa {
            grads.register::<Flex>(node.id, flex_tensor(split.part(&dys, true), shape_a));
        }
        if let Some(node) = pb {
            grads.register::<Flex>(node.id, flex_tensor(split.part(&dys, false), shape_b));
        }
    }
}

/// Row kernels written so that LLVM vectorises them (fixed-width lane arrays, no float reductions in loop order,
/// no saturating casts), compiled three times: for AVX-512, for AVX2 + FMA (both with fused multiply-adds), and
/// for the baseline target (separate multiply and add); the widest the CPU has is picked at run time.
pub(crate) mod simd {
    const LANES: usize = 16;

    /// Defines `fn $name(args) -> ret` that runs `$imp::<FMA>` compiled for the widest vector extension available.
    macro_rules! multiversion {
        ($(#[$meta:meta])* $name:ident => $imp:ident ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
            $(#[$meta])*
            pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f,fma")]
                    unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                        $imp::<true>($($arg),*)
                    }
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                        $imp::<true>($($arg),*)
                    }
                    if std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: the CPU has AVX-512F and FMA (checked above).
                        return unsafe { v4($($arg),*) };
                    }
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: the CPU has AVX2 and FMA (checked above).
                        return unsafe { v3($($arg),*) };
                    }
                }
                $imp::<false>($($arg),*)
            }
        };
    }

    pub(crate) use multiversion;

    /// `a * b + c`, fused where the kernel is compiled for FMA (elsewhere `mul_add` would be a libm call).
    #[inline(always)]
    fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
        if FMA { a.mul_add(b, c) } else { a * b + c }
    }

    /// `exp(x)` for f32 to about 2 ulp: `x = n ln2 + r` with `|r| <= ln2 / 2`, a degree-6 polynomial for
    /// `exp(r)` (Cephes' `expf` minimax coefficients), then the exponent `n` put into the float's bits.
    /// Below -87.3 (including -inf, masked scores) the result is 0; NaN stays NaN.
    #[inline(always)]
    pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
        const ROUND: f32 = 12_582_912.0;
        let xc = if x > 88.37 { 88.37 } else { x };
        let t = madd::<FMA>(xc, LOG2E, ROUND);
        let n = t - ROUND;
        let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, xc));
        let p = 1.987_569_1e-4_f32;
        let p = madd::<FMA>(p, r, 1.398_199_9e-3);
        let p = madd::<FMA>(p, r, 8.333_452e-3);
        let p = madd::<FMA>(p, r, 4.166_579_6e-2);
        let p = madd::<FMA>(p, r, 1.666_666_5e-1);
        let p = madd::<FMA>(p, r, 0.5);
        let e = madd::<FMA>(p, r * r, r + 1.0);
        // `t`'s low mantissa bits hold `n` (offset by the rounding constant, whose bits shift out): `2^n` is
        // built with integer ops only (a float-to-int cast would not vectorise: Rust's casts saturate).
        let scale = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
        if x < -87.3 { 0.0 } else { e * scale }
    }

    /// `2^x` for `x <= 0` (a softmax's shifted scores in base 2) to about 2 ulp: `x = n + r` with `|r| <= 1/2`,
    /// a degree-6 minimax polynomial for `2^r` (fitted on `[-1/2, 1/2]`: 1e-7 relative in f32 arithmetic), then
    /// `2^n` put into the float's bits. `x` is first raised to -127, where `2^n`'s bits are all 0: the result is 0
    /// below about -126.5 (including -inf), so no comparison is needed; NaN stays NaN. Not for `x >= 128`.
    /// Fewer operations than [`exp`] (no range reduction by `ln 2`, no upper clamp, no select).
    #[inline(always)]
    pub(crate) fn exp2_nonpos<const FMA: bool>(x: f32) -> f32 {
        let xc = if x < -127.0 { -127.0 } else { x };
        let t = xc + EXP2_ROUND;
        let r = xc - (t - EXP2_ROUND);
        let mut e = EXP2_POLY[0];
        for c in &EXP2_POLY[1..] {
            e = madd::<FMA>(e, r, *c);
        }
        e * f32::from_bits(t.to_bits().wrapping_add(127) << 23)
    }

    /// [`exp2_nonpos`]'s rounding constant (`1.5 * 2^23`: `x + ROUND - ROUND` is `x` rounded to an integer, whose
    /// bits sit in the low bits of `x + ROUND`).
    pub(crate) const EXP2_ROUND: f32 = 12_582_912.0;
    /// [`exp2_nonpos`]'s polynomial for `2^r`, highest degree first (evaluated by Horner's rule from
    /// `EXP2_POLY[0]`); also the AVX-512 attention kernels' (`flex_attention`).
    pub(crate) const EXP2_POLY: [f32; 7] = [
        1.535_336_2e-4,
        1.339_887_4e-3,
        9.618_437e-3,
        5.550_332_4e-2,
        2.402_264_8e-1,
        6.931_472e-1,
        1.0,
    ];

    /// `erf(x)` to about 1.5e-7 absolute (Abramowitz and Stegun 7.1.26, with the vectorised `exp`).
    #[inline(always)]
    pub(crate) fn erf<const FMA: bool>(x: f32) -> f32 {
        let a = x.abs();
        let t = 1.0 / madd::<FMA>(0.327_591_1, a, 1.0);
        let p = madd::<FMA>(1.061_405_4, t, -1.453_152);
        let p = madd::<FMA>(p, t, 1.421_413_8);
        let p = madd::<FMA>(p, t, -0.284_496_74);
        let p = madd::<FMA>(p, t, 0.254_829_6);
        let y = 1.0 - p * t * exp::<FMA>(-a * a);
        y.copysign(x)
    }

    /// In place `y <- exp(y - max(y))` (the softmax numerators); returns `(max, sum of the numerators)`.
    #[inline(always)]
    fn exp_sum_impl<const FMA: bool>(y: &mut [f32]) -> (f32, f32) {
        let split = y.len() - y.len() % LANES;
        let mut lanes = [f32::NEG_INFINITY; LANES];
        for c in y[..split].chunks_exact(LANES) {
            for i in 0..LANES {
                lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
            }
        }
        let mut max = f32::NEG_INFINITY;
        for &v in lanes.iter().chain(&y[split..]) {
            max = if v > max { v } else { max };
        }
        let mut sums = [0f32; LANES];
        for c in y[..split].chunks_exact_mut(LANES) {
            for i in 0..LANES {
                let e = exp::<FMA>(c[i] - max);
                c[i] = e;
                sums[i] += e;
            }
        }
        let mut sum = sums.iter().sum::<f32>();
        for v in &mut y[split..] {
            *v = exp::<FMA>(*v - max);
            sum += *v;
        }
        (max, sum)
    }

    /// In place `y <- softmax(y)`.
    #[inline(always)]
    fn softmax_impl<const FMA: bool>(y: &mut [f32]) {
        let (_, sum) = exp_sum_impl::<FMA>(y);
        let inv = 1.0 / sum;
        for v in y.iter_mut() {
            *v *= inv;
        }
    }

    /// `sum(a * b)`.
    #[inline(always)]
    fn dot_impl<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
        let split = a.len() - a.len() % LANES;
        let mut dots = [0f32; LANES];
        for (ac, bc) in a[..split]
            .chunks_exact(LANES)
            .zip(b[..split].chunks_exact(LANES))
        {
            for i in 0..LANES {
                dots[i] = madd::<FMA>(ac[i], bc[i], dots[i]);
            }
        }
        let mut dot = dots.iter().sum::<f32>();
        for (x, y) in a[split..].iter().zip(&b[split..]) {
            dot += x * y;
        }
        dot
    }

    /// Softmax numerators down the columns of `s` (`[keys, cols]` row-major: column `i` is query `i`'s scores,
    /// in base 2, i.e. already multiplied by `log2(e)`): in place `s[j][i] <- 2^(s[j][i] - max_j s[j][i])`;
    /// `max[i]`, `sum[i]` receive each column's maximum and the sum of its numerators. Columns are taken in strips
    /// of `LANES`, whose maxima and sums stay in registers.
    #[inline(always)]
    fn exp2_sum_cols_impl<const FMA: bool>(
        s: &mut [f32],
        cols: usize,
        max: &mut [f32],
        sum: &mut [f32],
    ) {
        let split = cols - cols % LANES;
        for i0 in (0..split).step_by(LANES) {
            let mut m = [f32::NEG_INFINITY; LANES];
            for row in s.chunks_exact(cols) {
                let c = &row[i0..i0 + LANES];
                for i in 0..LANES {
                    m[i] = if c[i] > m[i] { c[i] } else { m[i] };
                }
            }
            let mut t = [0f32; LANES];
            for row in s.chunks_exact_mut(cols) {
                let c = &mut row[i0..i0 + LANES];
                for i in 0..LANES {
                    let e = exp2_nonpos::<FMA>(c[i] - m[i]);
                    c[i] = e;
                    t[i] += e;
                }
            }
            max[i0..i0 + LANES].copy_from_slice(&m);
            sum[i0..i0 + LANES].copy_from_slice(&t);
        }
        for i in split..cols {
            let mut m = f32::NEG_INFINITY;
            for row in s.chunks_exact(cols) {
                m = if row[i] > m { row[i] } else { m };
            }
            let mut t = 0f32;
            for row in s.chunks_exact_mut(cols) {
                row[i] = exp2_nonpos::<FMA>(row[i] - m);
                t += row[i];
            }
            max[i] = m;
            sum[i] = t;
        }
    }

    /// In place `g <- p * (g - d)`.
    #[inline(always)]
    fn mul_sub_impl<const FMA: bool>(p: &[f32], g: &mut [f32], d: f32) {
        for (o, &a) in g.iter_mut().zip(p) {
            *o = a * (*o - d);
        }
    }

    /// In place `g <- y * (g - sum(g * y))`.
    #[inline(always)]
    fn softmax_backward_impl<const FMA: bool>(y: &[f32], g: &mut [f32]) {
        let dot = dot_impl::<FMA>(y, g);
        mul_sub_impl::<FMA>(y, g, dot)
    }

    /// In place `s[i] <- 2^(s[i] - shift[i])` for `s[i] <= shift[i]` (base-2 scores and log-sum-exps).
    #[inline(always)]
    fn exp2_shifted_each_impl<const FMA: bool>(s: &mut [f32], shift: &[f32]) {
        for (v, &m) in s.iter_mut().zip(shift) {
            *v = exp2_nonpos::<FMA>(*v - m);
        }
    }

    /// In place `g[i] <- p[i] * (g[i] - d[i])`.
    #[inline(always)]
    fn mul_sub_each_impl<const FMA: bool>(p: &[f32], g: &mut [f32], d: &[f32]) {
        for ((o, &a), &b) in g.iter_mut().zip(p).zip(d) {
            *o = a * (*o - b);
        }
    }

    /// Below this (in `beta * x`) swish and its derivative are 0 to f32 precision (`|silu(x)| < 6e-37`), and
    /// `exp(-beta x)` would saturate.
    const SWISH_ZERO_BELOW: f32 = -88.0;

    /// `x / (1 + exp(-beta x))`: x far above 0 (where the `exp` is 0), 0 below [`SWISH_ZERO_BELOW`].
    #[inline(always)]
    fn swish<const FMA: bool>(x: f32, beta: f32) -> f32 {
        let bx = beta * x;
        let y = x / (1.0 + exp::<FMA>(-bx));
        if bx < SWISH_ZERO_BELOW { 0.0 } else { y }
    }

    #[inline(always)]
    fn swish_in_place_impl<const FMA: bool>(y: &mut [f32], beta: f32) {
        for y in y.iter_mut() {
            *y = swish::<FMA>(*y, beta);
        }
    }

    /// `g <- g * s * (1 + beta x (1 - s))` with `s = sigmoid(beta x)`.
    #[inline(always)]
    fn swish_backward_impl<const FMA: bool>(x: &[f32], g: &mut [f32], beta: f32) {
        for (g, &x) in g.iter_mut().zip(x) {
            let bx = beta * x;
            let s = 1.0 / (1.0 + exp::<FMA>(-bx));
            let d = s * madd::<FMA>(bx, 1.0 - s, 1.0);
            *g *= if bx < SWISH_ZERO_BELOW { 0.0 } else { d };
        }
    }

    /// `Phi(x)`, the standard normal CDF.
    #[inline(always)]
    fn normal_cdf<const FMA: bool>(x: f32) -> f32 {
        madd::<FMA>(0.5, erf::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2), 0.5)
    }

    #[inline(always)]
    fn gelu_in_place_impl<const FMA: bool>(y: &mut [f32]) {
        for y in y.iter_mut() {
            *y *= normal_cdf::<FMA>(*y);
        }
    }

    /// `g <- g * (Phi(x) + x phi(x))`.
    #[inline(always)]
    fn gelu_backward_impl<const FMA: bool>(x: &[f32], g: &mut [f32]) {
        for (g, &x) in g.iter_mut().zip(x) {
            let pdf = INV_SQRT_2PI * exp::<FMA>(-0.5 * x * x);
            *g *= madd::<FMA>(x, pdf, normal_cdf::<FMA>(x));
        }
    }

    /// `1 / sqrt(2 pi)`.
    const INV_SQRT_2PI: f32 = 0.398_942_3;

    /// `out = a * gelu(b)` with the exact (erf) GELU.
    #[inline(always)]
    fn geglu_impl<const FMA: bool>(a: &[f32], b: &[f32], out: &mut [f32]) {
        for ((o, &x), &g) in out.iter_mut().zip(a).zip(b) {
            *o = x * g * normal_cdf::<FMA>(g);
        }
    }

    /// Given `dout`, `da = dout * gelu(b)` and `db = dout * a * gelu'(b)`, with
    /// `gelu'(x) = Phi(x) + x phi(x)`.
    #[inline(always)]
    fn geglu_backward_impl<const FMA: bool>(
        a: &[f32],
        b: &[f32],
        dout: &[f32],
        da: &mut [f32],
        db: &mut [f32],
    ) {
        for ((((da, db), &x), &g), &d) in da.iter_mut().zip(db.iter_mut()).zip(a).zip(b).zip(dout) {
            let cdf = normal_cdf::<FMA>(g);
            let pdf = INV_SQRT_2PI * exp::<FMA>(-0.5 * g * g);
            *da = d * g * cdf;
            *db = d * x * madd::<FMA>(g, pdf, cdf);
        }
    }

    /// `sum(x)`.
    #[inline(always)]
    fn sum_impl<const FMA: bool>(x: &[f32]) -> f32 {
        let split = x.len() - x.len() % LANES;
        let mut sums = [0f32; LANES];
        for c in x[..split].chunks_exact(LANES) {
            for i in 0..LANES {
                sums[i] += c[i];
            }
        }
        sums.iter().sum::<f32>() + x[split..].iter().sum::<f32>()
    }

    #[inline(always)]
    fn add_into_impl<const FMA: bool>(acc: &mut [f32], x: &[f32]) {
        debug_assert_eq!(acc.len(), x.len());
        for (a, v) in acc.iter_mut().zip(x) {
            *a += v;
        }
    }

    /// `sum((x - mean)^2)`.
    #[inline(always)]
    fn centred_square_sum_impl<const FMA: bool>(x: &[f32], mean: f32) -> f32 {
        let split = x.len() - x.len() % LANES;
        let mut sums = [0f32; LANES];
        for c in x[..split].chunks_exact(LANES) {
            for i in 0..LANES {
                let d = c[i] - mean;
                sums[i] = madd::<FMA>(d, d, sums[i]);
            }
        }
        sums.iter().sum::<f32>()
            + x[split..]
                .iter()
                .map(|v| (v - mean) * (v - mean))
                .sum::<f32>()
    }

    /// `y = x * scale + shift`.
    #[inline(always)]
    fn scale_shift_impl<const FMA: bool>(x: &[f32], scale: f32, shift: f32, y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = madd::<FMA>(v, scale, shift);
        }
    }

    /// GroupNorm backward sums over one channel: `(sum dy, sum dy * xhat)` with `xhat = (x - mean) * rstd`.
    #[inline(always)]
    fn group_norm_grad_sums_impl<const FMA: bool>(
        x: &[f32],
        dy: &[f32],
        mean: f32,
        rstd: f32,
    ) -> (f32, f32) {
        let split = x.len() - x.len() % LANES;
        let (mut s1, mut s2) = ([0f32; LANES], [0f32; LANES]);
        for (xc, dc) in x[..split]
            .chunks_exact(LANES)
            .zip(dy[..split].chunks_exact(LANES))
        {
            for i in 0..LANES {
                s1[i] += dc[i];
                s2[i] = madd::<FMA>(dc[i], (xc[i] - mean) * rstd, s2[i]);
            }
        }
        let (mut a, mut b) = (s1.iter().sum::<f32>(), s2.iter().sum::<f32>());
        for (&v, &d) in x[split..].iter().zip(&dy[split..]) {
            a += d;
            b += d * (v - mean) * rstd;
        }
        (a, b)
    }

    /// GroupNorm input gradient over one channel: `dx = rstd * (dy * gamma - a - xhat * b)` with
    /// `p = [mean, rstd, gamma, a, b]`.
    #[inline(always)]
    fn group_norm_dx_impl<const FMA: bool>(x: &[f32], dy: &[f32], p: [f32; 5], dx: &mut [f32]) {
        let [mean, rstd, gamma, a, b] = p;
        for ((o, &v), &d) in dx.iter_mut().zip(x).zip(dy) {
            let xhat = (v - mean) * rstd;
            *o = rstd * (madd::<FMA>(d, gamma, -a) - xhat * b);
        }
    }

    /// LayerNorm of one row: `y = (x - mean) * rstd * gamma + beta`.
    #[inline(always)]
    fn layer_norm_row_impl<const FMA: bool>(
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        mean: f32,
        rstd: f32,
        y: &mut [f32],
    ) {
        for (((o, &v), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
            *o = madd::<FMA>((v - mean) * rstd, g, b);
        }
    }

    /// LayerNorm backward sums of one row: `(sum dy * gamma, sum dy * gamma * xhat)`, `xhat = (x - mean) * rstd`.
    #[inline(always)]
    fn layer_norm_grad_sums_impl<const FMA: bool>(
        x: &[f32],
        dy: &[f32],
        gamma: &[f32],
        mean: f32,
        rstd: f32,
    ) -> (f32, f32) {
        let split = x.len() - x.len() % LANES;
        let (mut s1, mut s2) = ([0f32; LANES], [0f32; LANES]);
        for ((xc, dc), gc) in x[..split]
            .chunks_exact(LANES)
            .zip(dy[..split].chunks_exact(LANES))
            .zip(gamma[..split].chunks_exact(LANES))
        {
            for i in 0..LANES {
                let gd = dc[i] * gc[i];
                s1[i] += gd;
                s2[i] = madd::<FMA>(gd, (xc[i] - mean) * rstd, s2[i]);
            }
        }
        let (mut a, mut b) = (s1.iter().sum::<f32>(), s2.iter().sum::<f32>());
        for ((&v, &d), &g) in x[split..].iter().zip(&dy[split..]).zip(&gamma[split..]) {
            a += d * g;
            b += d * g * (v - mean) * rstd;
        }
        (a, b)
    }

    /// LayerNorm input gradient of one row, `dx = rstd * (dy * gamma - a - xhat * b)` with `p = [mean, rstd, a, b]`,
    /// and the row's share of the parameter gradients: `dgamma += dy * xhat`, `dbeta += dy`.
    #[inline(always)]
    fn layer_norm_dx_impl<const FMA: bool>(
        x: &[f32],
        dy: &[f32],
        gamma: &[f32],
        p: [f32; 4],
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        let [mean, rstd, a, b] = p;
        for (((((o, &v), &d), &g), dg), db) in dx
            .iter_mut()
            .zip(x)
            .zip(dy)
            .zip(gamma)
            .zip(dgamma.iter_mut())
            .zip(dbeta.iter_mut())
        {
            let xhat = (v - mean) * rstd;
            *o = rstd * (madd::<FMA>(d, g, -a) - xhat * b);
            *dg = madd::<FMA>(d, xhat, *dg);
            *db += d;
        }
    }

    multiversion!(
        /// LayerNorm of one row.
        layer_norm_row => layer_norm_row_impl(
            x: &[f32],
            gamma: &[f32],
            beta: &[f32],
            mean: f32,
            rstd: f32,
            y: &mut [f32]
        )
    );
    multiversion!(
        /// `(sum dy * gamma, sum dy * gamma * xhat)` over one row.
        layer_norm_grad_sums => layer_norm_grad_sums_impl(
            x: &[f32],
            dy: &[f32],
            gamma: &[f32],
            mean: f32,
            rstd: f32
        ) -> (f32, f32)
    );
    multiversion!(
        /// LayerNorm `dx` of one row and its share of `dgamma`, `dbeta`.
        layer_norm_dx => layer_norm_dx_impl(
            x: &[f32],
            dy: &[f32],
            gamma: &[f32],
            p: [f32; 4],
            dx: &mut [f32],
            dgamma: &mut [f32],
            dbeta: &mut [f32]
        )
    );
    multiversion!(
        /// `sum(x)` (16 partial sums).
        sum => sum_impl(x: &[f32]) -> f32
    );
    multiversion!(
        /// `acc[i] += x[i]` (equal lengths).
        add_into => add_into_impl(acc: &mut [f32], x: &[f32])
    );
    multiversion!(
        /// `sum(a * b)`.
        dot => dot_impl(a: &[f32], b: &[f32]) -> f32
    );
    multiversion!(
        /// `sum((x - mean)^2)` (16 partial sums).
        centred_square_sum => centred_square_sum_impl(x: &[f32], mean: f32) -> f32
    );
    multiversion!(
        /// `y = x * scale + shift`.
        scale_shift => scale_shift_impl(x: &[f32], scale: f32, shift: f32, y: &mut [f32])
    );
    multiversion!(
        /// `(sum dy, sum dy * (x - mean) * rstd)` over one channel.
        group_norm_grad_sums => group_norm_grad_sums_impl(
            x: &[f32],
            dy: &[f32],
            mean: f32,
            rstd: f32
        ) -> (f32, f32)
    );
    multiversion!(
        /// `dx = rstd * (dy * gamma - a - xhat * b)` over one channel, `p = [mean, rstd, gamma, a, b]`.
        group_norm_dx => group_norm_dx_impl(x: &[f32], dy: &[f32], p: [f32; 5], dx: &mut [f32])
    );
    multiversion!(
        /// `y <- softmax(y)` for one row, in place.
        softmax_row => softmax_impl(y: &mut [f32])
    );
    multiversion!(
        /// In place `s[j][i] <- 2^(s[j][i] - max[i])` for `s` `[keys, cols]` in base 2, with `max[i]`, `sum[i]`
        /// each column's maximum and sum of numerators (the softmax of queries stored as columns).
        exp2_sum_cols => exp2_sum_cols_impl(s: &mut [f32], cols: usize, max: &mut [f32], sum: &mut [f32])
    );
    multiversion!(
        /// `g <- y * (g - sum(g * y))` for one row (the softmax backward), in place.
        softmax_row_backward => softmax_backward_impl(y: &[f32], g: &mut [f32])
    );
    multiversion!(
        /// `s[i] <- 2^(s[i] - shift[i])`, in place (one shift per element; base-2 scores, `s[i] <= shift[i]`).
        exp2_shifted_each => exp2_shifted_each_impl(s: &mut [f32], shift: &[f32])
    );
    multiversion!(
        /// `g[i] <- p[i] * (g[i] - d[i])`, in place (one `d` per element).
        mul_sub_each => mul_sub_each_impl(p: &[f32], g: &mut [f32], d: &[f32])
    );
    multiversion!(
        /// `y <- x * sigmoid(beta * x)`, in place.
        swish_in_place => swish_in_place_impl(y: &mut [f32], beta: f32)
    );
    multiversion!(
        /// The swish backward: `g <- g * swish'(x)`.
        swish_row_backward => swish_backward_impl(x: &[f32], g: &mut [f32], beta: f32)
    );
    multiversion!(
        /// `y <- gelu(y)` (exact), in place.
        gelu_in_place => gelu_in_place_impl(y: &mut [f32])
    );
    multiversion!(
        /// The GELU backward: `g <- g * gelu'(x)`.
        gelu_row_backward => gelu_backward_impl(x: &[f32], g: &mut [f32])
    );
    multiversion!(
        /// `out = a * gelu(b)` (exact GELU).
        geglu_row => geglu_impl(a: &[f32], b: &[f32], out: &mut [f32])
    );
    multiversion!(
        /// The GEGLU backward for one row: `da`, `db` from `dout`.
        geglu_row_backward => geglu_backward_impl(
            a: &[f32],
            b: &[f32],
            dout: &[f32],
            da: &mut [f32],
            db: &mut [f32]
        )
    );
}

/// Test helper shared by the fused kernels' tests: `max |a - b| / max |b|`.
#[cfg(test)]
pub(crate) fn rel_max_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    let max_abs =
        |t: Tensor<B, D>| -> f32 { t.abs().max().into_scalar().to_string().parse().unwrap() };
    max_abs(a - b.clone()) / max_abs(b).max(1e-6)
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

    /// The transpose is exact at shapes with and without whole 8 x 8 blocks and strips, from a source whose rows
    /// are longer than the block; `par_mm` with a column-stored `b` (the transposed-copy path at 512 and 1024
    /// floats apart, gemm's own packing at 9, the transposed destination for few rows) equals the plain sum.
    #[test]
    fn transpose_and_par_mm_with_a_column_stored_b() {
        let value = |i: usize| ((i * 7919) % 1000) as f32 / 100.0 - 5.0;
        for (rows, cols) in [
            (0, 5),
            (1, 1),
            (8, 8),
            (9, 17),
            (40, 33),
            (77, 64),
            (16, 100),
        ] {
            let src_rs = cols + 3;
            let src: Vec<f32> = (0..rows * src_rs).map(value).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            // SAFETY: `src` holds `rows` rows of `src_rs >= cols` values.
            unsafe { transpose(View::rows(&src, 0, src_rs), rows, cols, &mut dst) };
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * src_rs + c],
                        "{rows}x{cols} at ({r}, {c})"
                    );
                }
            }
        }
        // Split by rows (m >= n) and by columns, with remainders of the 8 x 8 blocks and of the parts' 16s.
        assert!(
            gather_aliases(512)
                && gather_aliases(3072)
                && !gather_aliases(768)
                && !gather_aliases(1)
        );
        // (154, 77, 512) and (120, 203, 1024) take the weight's transposed copy (split by rows and by columns);
        // (37, 203, 1024), (40, 203, 600) and (9, 64, 640) the transposed destination (2 m <= min(n, k)), added to
        // or overwriting `dst`, the first with `a`'s transposed copy inside (a row stride of 1024).
        for (m, n, k, accumulate) in [
            (154, 77, 512, true),
            (120, 203, 1024, false),
            (37, 203, 1024, true),
            (300, 300, 9, true),
            (40, 203, 600, true),
            (9, 64, 640, false),
        ] {
            let a: Vec<f32> = (0..m * k).map(value).collect();
            // b [k, n] stored column by column: b(kk, j) = bs[j * k + kk].
            let bs: Vec<f32> = (0..k * n).map(|i| value(i + 11)).collect();
            let start = if accumulate { 1.0 } else { f32::NAN };
            let mut dst = vec![start; m * n];
            let b = View::rows(&bs, 0, k).t();
            par_mm(m, n, k, &mut dst, accumulate, View::rows(&a, 0, k), b);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = if accumulate { 1.0 } else { 0.0 }
                        + (0..k)
                            .map(|kk| a[i * k + kk] as f64 * bs[j * k + kk] as f64)
                            .sum::<f64>();
                    let got = dst[i * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{m}x{n}x{k} ({i}, {j})"
                    );
                }
            }
        }
    }

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (simd::exp::<false>(x), x.exp());
            let c = simd::exp::<true>(x);
            worst = worst.max(((c - b) / b).abs());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(simd::exp::<false>(f32::NEG_INFINITY), 0.0);
        assert_eq!(simd::exp::<false>(-100.0), 0.0);
        assert!(simd::exp::<false>(f32::NAN).is_nan());
        assert_eq!(simd::exp::<false>(0.0), 1.0);
        // erf against its odd symmetry, its limits and values of the reference table (A&S 7.1).
        for (x, e) in [
            (0.0f32, 0.0f32),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (2.0, 0.995_322_3),
        ] {
            assert!((simd::erf::<false>(x) - e).abs() < 2e-7, "erf({x})");
            assert!((simd::erf::<true>(-x) + e).abs() < 2e-7, "erf(-{x})");
        }
        assert_eq!(simd::erf::<false>(6.0), 1.0);
    }

    #[test]
    fn base_2_softmax_exp_is_within_a_few_ulp_and_flushes_below_the_normals() {
        let mut worst = 0f64;
        let mut x = -126.0f32;
        while x <= 0.0 {
            let b = (x as f64).exp2();
            for e in [simd::exp2_nonpos::<false>(x), simd::exp2_nonpos::<true>(x)] {
                worst = worst.max(((e as f64 - b) / b).abs());
            }
            x += 0.000_731;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(simd::exp2_nonpos::<true>(0.0), 1.0);
        assert_eq!(simd::exp2_nonpos::<true>(-1.0), 0.5);
        for x in [-127.0, -200.0, f32::NEG_INFINITY] {
            assert_eq!(simd::exp2_nonpos::<true>(x), 0.0, "2^{x}");
        }
        assert!(simd::exp2_nonpos::<true>(f32::NAN).is_nan());
    }

    #[test]
    fn column_softmax_numerators_match_a_scalar_reference() {
        // 37 columns: two 16-lane strips and a scalar tail; -inf entries (masked keys) get 0.
        let (keys, cols) = (23, 37);
        let s: Vec<f32> = (0..keys * cols)
            .map(|i| ((i * 7919) % 1013) as f32 / 50.0 - 10.0)
            .map(|v| if v > 9.5 { f32::NEG_INFINITY } else { v })
            .collect();
        let mut y = s.clone();
        let (mut max, mut sum) = (vec![0f32; cols], vec![0f32; cols]);
        simd::exp2_sum_cols(&mut y, cols, &mut max, &mut sum);
        for i in 0..cols {
            let col: Vec<f64> = (0..keys).map(|j| s[j * cols + i] as f64).collect();
            let m = col.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(max[i] as f64, m, "max of column {i}");
            let total: f64 = col.iter().map(|v| (v - m).exp2()).sum();
            assert!(
                (sum[i] as f64 - total).abs() < 1e-6 * total,
                "sum of column {i}"
            );
            for (j, v) in col.iter().enumerate() {
                // The shifted score as the kernel forms it (an f32 difference), then 2^ in f64.
                let e = ((*v as f32 - m as f32) as f64).exp2();
                assert!(
                    (y[j * cols + i] as f64 - e).abs() <= 3e-7 * e.max(1e-30),
                    "({j}, {i})"
                );
            }
        }
    }

    #[test]
    fn swap_last2_matches_swap_dims_forward_and_backward() {
        type A = AdFlex;
        let d = Default::default();
        // Edges of the 8 x 8 register blocks and of the 16-column strips; a single row; the UNet's [b, 64, 1024].
        for [b, m, n] in [[2, 13, 37], [1, 1, 9], [3, 16, 8], [2, 64, 1024]] {
            let x = Tensor::<A, 3>::random([b, m, n], Distribution::Normal(0.0, 1.0), &d);
            let g = Tensor::<A, 3>::random([b, n, m], Distribution::Normal(0.0, 1.0), &d);
            let run = |fused: bool| {
                let x = x.clone().require_grad();
                let y = if fused {
                    swap_last2(x.clone()).unwrap()
                } else {
                    x.clone().swap_dims(1, 2)
                };
                let grads = (y.clone() * g.clone()).sum().backward();
                (y.inner(), x.grad(&grads).unwrap())
            };
            let ((y1, dx1), (y0, dx0)) = (run(true), run(false));
            assert_eq!(y1.dims(), [b, n, m]);
            assert_eq!(max_diff(y1, y0), 0.0, "[{b}, {m}, {n}]");
            assert_eq!(max_diff(dx1, dx0), 0.0, "[{b}, {m}, {n}]");
        }
        let x = Tensor::<Flex, 3>::random([2, 5, 3], Distribution::Normal(0.0, 1.0), &d);
        let y = swap_last2(x.clone()).unwrap();
        assert_eq!(max_diff(y, x.clone().swap_dims(1, 2)), 0.0);
        assert!(swap_last2(x.cast(DType::F64)).is_err());
    }

    #[test]
    fn cat_channels_matches_burn_cat_forward_and_backward() {
        type A = AdFlex;
        let d = Default::default();
        // One image, the UNet's batch of 2, a 1x1 map; `b` also used on its own (its gradient is a sum, as for
        // the skip connections); `a` tracked or not.
        for ([n, ca, cb, h, w], a_tracked) in [
            ([1, 3, 5, 4, 6], true),
            ([2, 16, 8, 8, 8], true),
            ([3, 2, 7, 1, 1], false),
        ] {
            let a = Tensor::<A, 4>::random([n, ca, h, w], Distribution::Normal(0.0, 1.0), &d);
            let b = Tensor::<A, 4>::random([n, cb, h, w], Distribution::Normal(0.0, 1.0), &d);
            let g = Tensor::<A, 4>::random([n, ca + cb, h, w], Distribution::Normal(0.0, 1.0), &d);
            let g2 = Tensor::<A, 4>::random([n, cb, h, w], Distribution::Normal(0.0, 1.0), &d);
            let run = |fused: bool| {
                let a = if a_tracked {
                    a.clone().require_grad()
                } else {
                    a.clone()
                };
                let b = b.clone().require_grad();
                let y = if fused {
                    cat_channels(a.clone(), b.clone()).unwrap_or_else(|_| panic!("applies"))
                } else {
                    Tensor::cat(vec![a.clone(), b.clone()], 1)
                };
                let loss = (y.clone() * g.clone()).sum() + (b.clone() * g2.clone()).sum();
                let grads = loss.backward();
                (y.inner(), a.grad(&grads), b.grad(&grads).unwrap())
            };
            let ((y1, da1, db1), (y0, da0, db0)) = (run(true), run(false));
            let case = format!("[{n}, {ca}+{cb}, {h}, {w}]");
            assert_eq!(y1.dims(), [n, ca + cb, h, w]);
            assert_eq!(max_diff(y1, y0), 0.0, "{case}");
            assert_eq!(max_diff(db1, db0), 0.0, "{case}");
            assert_eq!(da1.is_some(), a_tracked, "{case}");
            if let (Some(da1), Some(da0)) = (da1, da0) {
                assert_eq!(max_diff(da1, da0), 0.0, "{case}");
            }
        }
        let t = |c: usize, h: usize| {
            Tensor::<Flex, 4>::random([2, c, h, 3], Distribution::Normal(0.0, 1.0), &d)
        };
        let (a, b) = (t(2, 3), t(4, 3));
        let y = cat_channels(a.clone(), b.clone()).unwrap_or_else(|_| panic!("applies"));
        assert_eq!(max_diff(y, Tensor::cat(vec![a.clone(), b], 1)), 0.0);
        assert!(cat_channels(a.clone(), t(4, 5)).is_err());
        assert!(cat_channels(a.clone().cast(DType::F64), t(4, 3).cast(DType::F64)).is_err());
    }

    #[test]
    fn fused_softmax_matches_tensor_ops_forward_and_backward() {
        type A = AdFlex;
        let d = Default::default();
        // 37 is not a multiple of the lane width: the tail path is exercised too.
        for n in [37, 64] {
            let x = Tensor::<A, 3>::random([3, 5, n], Distribution::Normal(0.0, 4.0), &d);
            let dy = Tensor::<A, 3>::random([3, 5, n], Distribution::Normal(0.0, 1.0), &d);
            let run = |fused: bool| {
                let x = x.clone().require_grad();
                let y = if fused {
                    softmax_last(x.clone()).unwrap()
                } else {
                    burn::tensor::activation::softmax(x.clone(), 2)
                };
                let grads = (y.clone() * dy.clone()).sum().backward();
                (y.inner(), x.grad(&grads).unwrap())
            };
            let (y1, dx1) = run(true);
            let (y0, dx0) = run(false);
            assert!(max_diff(y1, y0) < 1e-6);
            assert!(max_diff(dx1, dx0) < 1e-5);
        }
        // Masked (-inf) scores get exactly zero weight; f64 falls back.
        let x = Tensor::<Flex, 2>::from_floats([[0.0, f32::NEG_INFINITY, 1.0]], &d);
        let y = softmax_last(x.clone())
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(y[1], 0.0);
        assert!((y[0] + y[2] - 1.0).abs() < 1e-6);
        assert!(softmax_last(x.cast(DType::F64)).is_err());
    }

    #[test]
    fn fused_silu_matches_tensor_ops_forward_and_backward() {
        type A = AdFlex;
        let d = Default::default();
        // 3 x 7 x 1601 values: more than one task, not a multiple of the lane width; N(0, 6) reaches the
        // saturated ends of `exp`.
        let x = Tensor::<A, 3>::random([3, 7, 1601], Distribution::Normal(0.0, 6.0), &d);
        let dy = Tensor::<A, 3>::random([3, 7, 1601], Distribution::Normal(0.0, 1.0), &d);
        let run = |fused: bool| {
            let x = x.clone().require_grad();
            let y = if fused {
                silu(x.clone()).unwrap()
            } else {
                burn::tensor::activation::silu(x.clone())
            };
            let grads = (y.clone() * dy.clone()).sum().backward();
            (y.inner(), x.grad(&grads).unwrap())
        };
        let (y1, dx1) = run(true);
        let (y0, dx0) = run(false);
        assert!(rel_max_diff(y1, y0) < 1e-6);
        assert!(rel_max_diff(dx1, dx0) < 2e-6);
        // Inference: in place on the input's buffer, same values.
        let inner = x.inner();
        let y2 = silu(inner.clone()).unwrap();
        assert!(rel_max_diff(y2, burn::tensor::activation::silu(inner.clone())) < 1e-6);
        // Extremes: exactly x far above 0, exactly 0 far below, NaN stays NaN.
        let ends = [100.0, -100.0, -1e30, 1e30, f32::NAN];
        let v = silu(Tensor::<Flex, 1>::from_floats(ends, &d))
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(&v[..4], &[100.0, 0.0, 0.0, 1e30]);
        assert!(v[4].is_nan());
        // ... and the derivative: 1 far above 0, 0 far below.
        let xe = Tensor::<A, 1>::from_floats(ends, &d).require_grad();
        let grads = silu(xe.clone()).unwrap().sum().backward();
        let dv = xe
            .grad(&grads)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(&dv[..4], &[1.0, 0.0, 0.0, 1.0]);
        assert!(silu(inner.cast(DType::F64)).is_err());
    }

    /// quick_gelu (swish with beta 1.702) and the exact GELU against burn's tensor ops, value and gradient, at
    /// inference (in place) and under autodiff.
    #[test]
    fn fused_quick_gelu_and_gelu_match_tensor_ops_forward_and_backward() {
        type A = AdFlex;
        let d = Default::default();
        let x = Tensor::<A, 2>::random([5, 6421], Distribution::Normal(0.0, 4.0), &d);
        let dy = Tensor::<A, 2>::random([5, 6421], Distribution::Normal(0.0, 1.0), &d);
        for act in [Activation::Swish(1.702), Activation::Gelu] {
            let reference = |x: Tensor<A, 2>| match act {
                Activation::Swish(b) => x.clone() * burn::tensor::activation::sigmoid(x * b),
                Activation::Gelu => burn::tensor::activation::gelu(x),
            };
            let run = |fused: bool| {
                let x = x.clone().require_grad();
                let y = if fused {
                    activation(x.clone(), act).unwrap()
                } else {
                    reference(x.clone())
                };
                let grads = (y.clone() * dy.clone()).sum().backward();
                (y.inner(), x.grad(&grads).unwrap())
            };
            let (y1, dx1) = run(true);
            let (y0, dx0) = run(false);
            assert!(rel_max_diff(y1.clone(), y0.clone()) < 1e-6, "{act:?}");
            assert!(rel_max_diff(dx1, dx0) < 2e-6, "{act:?}");
            let y2 = activation(x.clone().inner(), act).unwrap();
            assert!(rel_max_diff(y2, y0) < 1e-6, "{act:?} inference");
        }
    }

    #[test]
    fn fused_geglu_matches_tensor_ops_forward_and_backward() {
        type A = AdFlex;
        let d = Default::default();
        // 19 rows of width 2 x 37: not multiples of the task size or the lane width.
        let h = Tensor::<A, 2>::random([19, 74], Distribution::Normal(0.0, 2.0), &d);
        let dy = Tensor::<A, 2>::random([19, 37], Distribution::Normal(0.0, 1.0), &d);
        let run = |fused: bool| {
            let h = h.clone().require_grad();
            let y = if fused {
                geglu(h.clone()).unwrap()
            } else {
                h.clone().narrow(1, 0, 37)
                    * burn::tensor::activation::gelu(h.clone().narrow(1, 37, 37))
            };
            let grads = (y.clone() * dy.clone()).sum().backward();
            (y.inner(), h.grad(&grads).unwrap())
        };
        let (y1, dh1) = run(true);
        let (y0, dh0) = run(false);
        // Relative to the largest value: with N(0, 2) inputs `a * gelu(b)` reaches ~50, where one f32 ulp is
        // ~4e-6, so an absolute bound fails on some random draws.
        assert!(rel_max_diff(y1, y0) < 2e-6);
        assert!(rel_max_diff(dh1, dh0) < 2e-5);
        assert!(geglu(h.inner().cast(DType::F64)).is_err());
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
