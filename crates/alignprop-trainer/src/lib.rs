//! AlignProp training: reward backpropagation through the denoising chain into UNet LoRA adapters.
//!
//! - [`chain`]: one trajectory forward and our own checkpointed backward (memory flat in the number of kept steps).
//! - [`truncation`]: which steps carry gradient (fixed K, uniform, gaussian, per-step random detach).
//! - [`lora_params`]: LoRA gradients and AdamW with global-norm clipping.

pub mod chain;
pub mod lora_params;
pub mod truncation;

pub use chain::{TrajectoryOutput, trajectory};
pub use lora_params::{AdamW, AdamWConfig, LoraGrads};
pub use truncation::Truncation;
