//! One AlignProp step by hand: load an SD folder, add LoRA adapters to the UNet, run one DDIM trajectory whose last
//! step carries gradient (K = 1), score the decoded images with a reward (mean brightness here), and apply one
//! AdamW step to the adapters. `alignprop train` does this in a loop with checkpoints, evaluation and logs.
//!
//! ```text
//! cargo run --release --example lora_step -- /models/stable-diffusion-v1-5 "a photo of a cat"
//! ```
//!
//! `tests/fixtures/tiny-sd` (this repository) runs in a second on the CPU; SD1.5 at 512x512 wants a GPU.

use std::path::Path;

use alignprop_pipeline::{NoiseRng, StableDiffusion};
use alignprop_rewards::brightness::brightness;
use alignprop_schedulers::DdimScheduler;
use alignprop_trainer::{AdamW, AdamWConfig, TrajectoryInput, Truncation, trajectory};
use burn::tensor::{DType, Tensor};

/// The inner backend (the frozen parts and the gradients live there) and its autodiff wrapper.
type I = burn::backend::Flex;
type A = burn::backend::Autodiff<I>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [folder, prompt, ..] = args.as_slice() else {
        eprintln!("usage: lora_step MODEL_FOLDER PROMPT");
        std::process::exit(2);
    };
    let device = Default::default();
    // The UNet is loaded on the autodiff backend (its adapters train); the text encoder and VAE read the same
    // folder. The conditioning is computed once, without a graph.
    let mut sd = StableDiffusion::<A>::load(Path::new(folder), &device, DType::F32)?;
    let params = alignprop_lora::inject(&mut sd.unet, &alignprop_lora::LoraConfig::default())?;
    let text = sd.conditioning(&[prompt.as_str()], "")?;
    let text: alignprop_pipeline::Conditioning<I> = text.inner();

    let steps = 10;
    let scheduler = DdimScheduler::new(&sd.scheduler_config, steps)?;
    let mut rng = NoiseRng::new(0);
    let latent = sd.default_image_size() / sd.vae_factor();
    // `x_T`: `[1, 4, h/8, w/8]`.
    let x_t: Tensor<I, 4> = rng.normal_tensor(
        [1, sd.unet.in_channels(), latent, latent],
        &device,
        DType::F32,
    );
    let grad_steps = Truncation::Fixed { k: 1 }.grad_steps(steps, &mut rng);
    let out = trajectory(TrajectoryInput {
        unet: &sd.unet,
        vae: &sd.vae,
        scheduler: &scheduler,
        text: &text,
        guidance: 7.5,
        x_t,
        noises: &[],
        grad_steps: &grad_steps,
        // `images` `[1, 3, H, W]` -> (loss `[1]`, scores `[1]`): maximise the brightness.
        loss_fn: |images: Tensor<A, 4>| {
            let scores = brightness(images);
            Ok((-scores.clone().mean(), scores))
        },
    })
    .expect("a deterministic chain (eta 0) needs no noise");
    let mut optimizer = AdamW::<I>::new(AdamWConfig::default());
    let grad_norm = optimizer.step(&mut sd.unet, out.grads);
    println!(
        "{params} LoRA parameters; reward {:.4}, loss {:.4}, LoRA gradient norm {grad_norm:.3e}; one AdamW step applied",
        out.scores[0], out.loss
    );
    Ok(())
}
