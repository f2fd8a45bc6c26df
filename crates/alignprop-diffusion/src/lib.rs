//! Stable Diffusion networks (SD 1.x, 2.x, SDXL) for [burn](https://burn.dev), generic over the backend `B: Backend`.
//!
//! - [`unet`]: `UNet2DConditionModel` (diffusers), sized entirely by its `config.json`: noisy latents
//!   `[batch, 4, h, w]`, timesteps and text states `[batch, 77, cross_dim]` in (SDXL also takes pooled text
//!   embeddings and 6 time ids, [`unet::TextTimeCond`]), predicted noise `[batch, 4, h, w]` out.
//! - [`vae`]: `AutoencoderKL`: images `[batch, 3, H, W]` in `[-1, 1]` to latents `[batch, 4, H/8, W/8]` and back.
//! - [`clip`]: the CLIP text encoders (transformers `CLIPTextModel`, and `CLIPTextModelWithProjection`, SDXL's
//!   second): token ids `[batch, 77]` to hidden states `[batch, 77, width]` (and projected pooled embeddings); and
//!   [`tokenizer`]: `CLIPTokenizer`, prompts to token ids.
//! - [`resnet`]: `ResnetBlock2D`, `Downsample2D`, `Upsample2D`, shared by the UNet and the VAE.
//! - [`nn`]: the layers they share (linear, convolution, group and layer norm, activations, attention), whose hot
//!   ops run through the kernels of `alignprop-kernels`.
//! - [`convert`]: a single-file SD1.x / SD2.x / SDXL checkpoint into a diffusers folder, through the real loaders.
//!
//! Weights are read by `alignprop-io` ([`VarBuilder`], re-exported here): every model is built through it, from
//! files by their diffusers / transformers tensor names, or randomly initialised (tests and benchmarks of the
//! full-size architecture without weights). Errors name the file, the key and the expected and found shapes.

pub mod clip;
pub mod convert;
pub mod nn;
pub mod resnet;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub use alignprop_io::{VarBuilder, WeightError};

/// This crate's error. Building and loading the networks fails with a [`WeightError`] (file, key, expected and
/// found shapes), the tokenizer with a [`tokenizer::TokenizerError`]; both convert into it with `?`, so a program
/// that uses the whole crate can return `alignprop_diffusion::Result<()>`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
