//! LoRA (low-rank adaptation) for the Stable Diffusion UNet.
//!
//! - [`format`]: read and write LoRA safetensors in the peft, classic diffusers and kohya layouts, so that our
//!   files load in diffusers (`pipe.load_lora_weights`) and A1111/ComfyUI, and theirs load here.
//! - [`inject`]: add trainable adapters to the UNet's attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`),
//!   install a file's adapters, read them back, merge them into the base weights.
//! - [`merge_files`]: merge a LoRA into a diffusers model folder's UNet weights (a standalone merged model).
//! - [`mix`]: scale a LoRA toward the base model, mix two LoRAs (reward interpolation).

pub mod format;
pub mod inject;
pub mod merge_files;
pub mod mix;

pub use format::{LoraError, LoraFormat, LoraPair, LoraWeights, Matrix};
pub use inject::{
    LoraConfig, TARGET_MODULES, apply, extract, inject, inject_seeded, merge, num_params,
    projections, projections_mut, set_multiplier,
};
pub use mix::{MixMode, mix, scale};
