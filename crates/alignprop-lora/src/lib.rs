//! LoRA (low-rank adaptation) for the Stable Diffusion UNet.
//!
//! Takes a `UNet2DConditionModel` and LoRA files (or a rank and seed); gives the UNet with adapters on its attention
//! projections (each `[out, rank] x [rank, in]`), the adapters' tensors by their file keys, and merged weights.
//!
//! - [`format`]: read and write LoRA safetensors in the peft, classic diffusers and kohya layouts, so that our
//!   files load in diffusers (`pipe.load_lora_weights`) and A1111/ComfyUI, and theirs load here.
//! - [`inject`]: add trainable adapters to the UNet's attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`),
//!   install a file's adapters, read them back, merge them into the base weights.
//! - [`merge_files`]: merge a LoRA into a diffusers model folder's UNet weights (a standalone merged model).
//! - [`names`]: diffusers vs original (sgm) UNet module names (kohya's SDXL files), for a given UNet.
//! - [`mix`]: scale a LoRA toward the base model, mix two LoRAs (reward interpolation).

pub mod format;
pub mod inject;
pub mod merge_files;
pub mod mix;
pub mod names;

/// This crate's error ([`LoraError`]; weight-file errors convert into it with `?`).
pub use format::LoraError as Error;
pub use format::{LoraError, LoraFormat, LoraPair, LoraWeights, Matrix};
pub use inject::{
    LoraConfig, TARGET_MODULES, apply, extract, inject, inject_seeded, merge, num_params,
    projections, projections_mut, set_multiplier,
};
pub use mix::{MixMode, mix, scale};
pub use names::UnetNames;
