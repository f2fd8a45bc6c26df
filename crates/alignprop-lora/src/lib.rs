//! LoRA (low-rank adaptation) for the Stable Diffusion UNet.
//!
//! - [`format`]: read and write LoRA safetensors in the peft, classic diffusers and kohya layouts, so that our
//!   files load in diffusers (`pipe.load_lora_weights`) and A1111/ComfyUI, and theirs load here.
//! - [`mix`]: scale a LoRA toward the base model, mix two LoRAs (reward interpolation).

pub mod format;
pub mod mix;

pub use format::{LoraError, LoraFormat, LoraPair, LoraWeights, Matrix};
pub use mix::{MixMode, mix, scale};
