//! Stable Diffusion text-to-image sampling with classifier-free guidance ([`sd`]), seeded noise that is identical
//! on every backend ([`noise`]), and image I/O ([`images`]). The sampling loop is differentiable end to end.
//!
//! Takes a diffusers Stable Diffusion folder (SD 1.x, 2.x or SDXL, told apart by its files) and prompts; gives latents `[batch, 4, h/8, w/8]`, decoded images
//! `[batch, 3, h, w]` in `[-1, 1]` and 8-bit pictures / PNG files.

pub mod images;
pub mod noise;
pub mod sd;

pub use noise::NoiseRng;
pub use sd::{
    AddedConditioning, Conditioning, PipelineError, SampleOptions, SampleOutput, SecondEncoder,
    StableDiffusion, denoise, guided_noise,
};
/// This crate's error ([`PipelineError`]): every error of the crates below converts into it with `?`.
pub use sd::{PipelineError as Error, Result};
