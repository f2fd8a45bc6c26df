//! Activation memory of the checkpointed backward does not grow with the number of differentiated steps K
//! (beyond the stored latents), while the plain full-graph backward grows linearly. Measured as peak heap bytes
//! with a counting allocator on the CPU backend. (Timing is never asserted; see the benchmarks.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use alignprop_testing::tiny_sd;
use alignprop_diffusion::unet::UNet2DConditionModel;
use alignprop_diffusion::vae::AutoencoderKL;
use alignprop_pipeline::{Conditioning, NoiseRng};
use alignprop_rewards::brightness::brightness;
use alignprop_schedulers::{DdimScheduler, SchedulerConfig};
use alignprop_trainer::{TrajectoryInput, Truncation, trajectory, trajectory_full_graph};
use burn::backend::Autodiff;
use burn::tensor::{DType, Tensor};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

type I = burn::backend::Flex;
type A = Autodiff<I>;

/// Peak heap bytes above the level at the start of `f`.
fn peak_during(f: impl FnOnce()) -> usize {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed) - base
}

#[test]
fn checkpointed_memory_is_flat_in_k_full_graph_is_not() {
    let d = Default::default();
    let mut unet =
        UNet2DConditionModel::<A>::load(&tiny_sd().join("unet"), &d, DType::F32).unwrap();
    alignprop_lora::inject(&mut unet, &alignprop_lora::LoraConfig::default()).unwrap();
    let vae = AutoencoderKL::<A>::load(&tiny_sd().join("vae"), &d, DType::F32).unwrap();
    let n = 8;
    let scheduler = DdimScheduler::new(&SchedulerConfig::default(), n).unwrap();
    let mut rng = NoiseRng::new(3);
    let text = Conditioning::<I> {
        uncond: rng.normal_tensor([1, 77, 32], &d, DType::F32),
        cond: rng.normal_tensor([1, 77, 32], &d, DType::F32),
    };
    let x_t: Tensor<I, 4> = rng.normal_tensor([1, 4, 16, 16], &d, DType::F32);
    let loss = |img: Tensor<A, 4>| {
        let s = brightness(img);
        (-s.clone().mean(), s)
    };
    let mut ckpt = Vec::new();
    let mut full = Vec::new();
    for k in [1usize, 2, 4, 8] {
        let steps = Truncation::Fixed { k }.grad_steps(n, &mut rng);
        let input = || TrajectoryInput {
            unet: &unet,
            vae: &vae,
            scheduler: &scheduler,
            text: &text,
            guidance: 7.5,
            x_t: x_t.clone(),
            noises: &[],
            grad_steps: &steps,
            loss_fn: loss,
        };
        ckpt.push(peak_during(|| {
            let _ = trajectory(input());
        }));
        full.push(peak_during(|| {
            let _ = trajectory_full_graph(input());
        }));
    }
    eprintln!(
        "peak extra heap bytes for K = 1, 2, 4, 8: checkpointed {ckpt:?}, full graph {full:?}"
    );
    // Checkpointed: flat (within 15 %) from K = 1 to K = 8.
    assert!(
        ckpt[3] as f64 <= ckpt[0] as f64 * 1.15,
        "checkpointed peak grew with K: {ckpt:?}"
    );
    // Full graph: grows with K, and at K = 8 needs clearly more than the checkpointed backward.
    assert!(
        full[3] as f64 > full[0] as f64 * 2.0,
        "full-graph peak did not grow with K: {full:?}"
    );
    assert!(
        full[3] as f64 > ckpt[3] as f64 * 2.0,
        "full graph {full:?} vs checkpointed {ckpt:?}"
    );
}
