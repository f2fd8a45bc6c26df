//! Stable Diffusion 1.5 networks for [burn](https://burn.dev), generic over the backend.
//!
//! - [`unet`]: `UNet2DConditionModel` (diffusers), sized entirely by its `config.json`.
//! - [`vae`]: `AutoencoderKL` encoder and decoder.
//! - [`resnet`]: `ResnetBlock2D`, `Downsample2D`, `Upsample2D`, shared by the UNet and the VAE.
//! - [`clip`]: the CLIP text encoder (transformers `CLIPTextModel`) and [`tokenizer`]: the CLIP BPE tokenizer.
//! - [`weights`]: safetensors loading by the diffusers / transformers tensor names ([`weights::VarBuilder`]),
//!   with clear errors naming the file, the key and the expected and found shapes.
//! - [`convert`]: a single-file checkpoint into a diffusers folder.
//! - [`single_file`]: the original single-file SD1.5 checkpoint layout (`model.diffusion_model.*`, ...).
//! - [`pipeline_files`]: a diffusers model folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, ...).
//! - [`device`]: run-time choice of the CPU (`Flex`) or CUDA backend.
//! - [`fused`]: fused CPU kernels (GroupNorm) with their autodiff backward, picked at run time.
//!
//! Every model is built through one code path, [`weights::VarBuilder`], which either reads tensors from files or
//! initialises them randomly (for tests and benchmarks of the full-size architecture without weights).

pub mod clip;
pub mod convert;
pub mod device;
pub mod fused;
pub mod fused_attention;
pub mod fused_conv;
pub mod nn;
pub mod pipeline_files;
pub mod resnet;
pub mod single_file;
pub mod testing;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use weights::{VarBuilder, WeightError};
