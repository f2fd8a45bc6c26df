//! Activation memory of the checkpointed backward does not grow with the number of differentiated steps K
//! (beyond the stored latents), while the plain full-graph backward grows linearly. Measured as peak heap bytes
//! with a counting allocator on the CPU backend. (Timing is never asserted; see the benchmarks.)

use alignprop_diffusion::unet::UNet2DConditionModel;
use alignprop_diffusion::vae::AutoencoderKL;
use alignprop_pipeline::{Conditioning, NoiseRng};
use alignprop_rewards::brightness::brightness;
use alignprop_schedulers::{DdimScheduler, SchedulerConfig};
use alignprop_testing::alloc::{Counting, peak_during};
use alignprop_testing::tiny_sd;
use alignprop_trainer::{TrajectoryInput, Truncation, trajectory, trajectory_full_graph};
use burn::backend::Autodiff;
use burn::tensor::{DType, Tensor};

#[global_allocator]
static GLOBAL: Counting = Counting;

type I = burn::backend::Flex;
type A = Autodiff<I>;

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
    let text = Conditioning::<I>::new(
        rng.normal_tensor([1, 77, 32], &d, DType::F32),
        rng.normal_tensor([1, 77, 32], &d, DType::F32),
    );
    let x_t: Tensor<I, 4> = rng.normal_tensor([1, 4, 16, 16], &d, DType::F32);
    let loss = |img: Tensor<A, 4>| {
        let s = brightness(img);
        Ok((-s.clone().mean(), s))
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
            drop(trajectory(input()).expect("trajectory"));
        }));
        full.push(peak_during(|| {
            drop(trajectory_full_graph(input()).expect("trajectory"));
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
