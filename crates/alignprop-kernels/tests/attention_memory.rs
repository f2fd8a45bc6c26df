//! The memory of one attention forward + backward under autodiff, counted by a global allocator: the blockwise
//! (FlashAttention-style) op grows linearly in the token count, the tensor-op attention (which keeps every
//! probability for its backward, as burn-autodiff's own attention does) quadratically. One test in this binary, so
//! no other test's allocations are counted.

use alignprop_kernels::{blockwise_attention, tensor_ops};
use alignprop_testing::alloc::{Counting, peak_during};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Distribution, Tensor};

#[global_allocator]
static GLOBAL: Counting = Counting;

type A = Autodiff<Flex>;

#[test]
fn blockwise_attention_memory_grows_linearly_naive_quadratically() {
    let device = Default::default();
    let (bh, d) = (2, 16);
    // A 1 MiB score budget per block: blocks of 1 MiB / (bh * n * 8 B) query rows.
    let budget = 1 << 20;
    let mut ours = Vec::new();
    let mut naive = Vec::new();
    let sizes = [512usize, 1024, 2048];
    // Warm up (thread pools, first-use allocations) so that they are not counted in the first measurement.
    let warm = Tensor::<A, 3>::random([bh, 64, d], Distribution::Default, (&device, DType::F64))
        .require_grad();
    let _ =
        blockwise_attention::attention(warm.clone(), warm.clone(), warm.clone(), 0.25, false, 16)
            .sum()
            .backward();
    for n in sizes {
        let make = || {
            let t = || {
                Tensor::<A, 3>::random(
                    [bh, n, d],
                    Distribution::Normal(0.0, 1.0),
                    (&device, DType::F64),
                )
                .require_grad()
            };
            (t(), t(), t())
        };
        let scale = 1.0 / (d as f64).sqrt();
        let rows = blockwise_attention::block_rows(bh, n, n, 8, budget);
        let (q, k, v) = make();
        ours.push(peak_during(|| {
            let out =
                blockwise_attention::attention(q.clone(), k.clone(), v.clone(), scale, false, rows);
            let grads = out.sum().backward();
            let _ = (q.grad(&grads), k.grad(&grads), v.grad(&grads));
        }));
        let (q, k, v) = make();
        naive.push(peak_during(|| {
            let out =
                tensor_ops::attention_head_major(q.clone(), k.clone(), v.clone(), scale, false);
            let grads = out.sum().backward();
            let _ = (q.grad(&grads), k.grad(&grads), v.grad(&grads));
        }));
    }
    let mib = |v: &[usize]| {
        v.iter()
            .map(|b| format!("{:.1}", *b as f64 / (1 << 20) as f64))
            .collect::<Vec<_>>()
    };
    eprintln!(
        "peak MiB for {sizes:?} tokens: blockwise {:?}, tensor-op {:?}",
        mib(&ours),
        mib(&naive)
    );
    // 4x the tokens: the blockwise peak at most 4x (linear: q, k, v, the output and their gradients, plus one
    // bounded block; here it hardly grows), the tensor-op peak at least 8x (the [bh, n, n] probabilities: 16x,
    // less its fixed part).
    let (g_ours, g_naive) = (
        ours[2] as f64 / ours[0] as f64,
        naive[2] as f64 / naive[0] as f64,
    );
    assert!(
        g_ours <= 4.0,
        "blockwise peak grew {g_ours:.2}x for 4x the tokens: {ours:?}"
    );
    assert!(
        g_naive >= 8.0,
        "tensor-op peak grew only {g_naive:.2}x for 4x the tokens: {naive:?}"
    );
    assert!(
        ours[2] * 4 < naive[2],
        "blockwise {ours:?} vs tensor-op {naive:?}"
    );
}
