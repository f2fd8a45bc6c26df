//! Load a diffusers Stable Diffusion folder and sample one image from a prompt (DDIM, classifier-free guidance).
//!
//! ```text
//! cargo run --release --example sample -- /models/stable-diffusion-v1-5 "a photo of a cat" cat.png 30
//! ```
//!
//! The folder is what `StableDiffusionPipeline.save_pretrained` writes (`unet/`, `vae/`, `text_encoder/`,
//! `tokenizer/`, `scheduler/`). On the CPU a 512x512 image takes minutes; pass a smaller model to try it quickly
//! (this repository's `tests/fixtures/tiny-sd` samples in a second).

use std::path::Path;

use alignprop_pipeline::{SampleOptions, StableDiffusion, images};
use burn::tensor::DType;

/// The CPU backend; `burn::backend::Cuda` (feature `cuda`) for an NVIDIA GPU.
type B = burn::backend::Flex;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [folder, prompt, rest @ ..] = args.as_slice() else {
        eprintln!("usage: sample MODEL_FOLDER PROMPT [OUT.png] [STEPS]");
        std::process::exit(2);
    };
    let out = rest.first().map(String::as_str).unwrap_or("sample.png");
    let steps = match rest.get(1) {
        Some(s) => s.parse()?,
        None => 30,
    };

    let device = Default::default();
    let sd = StableDiffusion::<B>::load(Path::new(folder), &device, DType::F32)?;
    let size = sd.default_image_size();
    let opts = SampleOptions {
        steps,
        height: size,
        width: size,
        seed: 0,
        ..SampleOptions::default()
    };
    let sample = sd.sample(&[prompt.as_str()], &opts, &mut |i, n| {
        eprint!("\rstep {i}/{n}")
    })?;
    eprintln!();
    // `images`: `[1, 3, size, size]` in [-1, 1].
    let pictures = images::to_rgb8(sample.images);
    images::save_png(&pictures[0], Path::new(out))?;
    println!("wrote {out} ({size}x{size}, {steps} steps)");
    Ok(())
}
