//! Stable Diffusion text-to-image sampling with classifier-free guidance ([`sd`]), seeded noise that is identical
//! on every backend ([`noise`]), and PNG output ([`images`]). The sampling loop is differentiable end to end.

pub mod images;
pub mod noise;
pub mod sd;

pub use noise::NoiseRng;
pub use sd::{
    Conditioning, PipelineError, SampleOptions, SampleOutput, StableDiffusion, denoise,
    guided_noise,
};
