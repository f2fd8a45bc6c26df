//! Weight files for the alignprop networks: reading, writing and converting them, by their real on-disk names.
//!
//! - [`weights`]: safetensors files (memory-mapped, sharded, F32/F16/BF16/F64) as a [`TensorSource`], and
//!   [`VarBuilder`], which builds a network's parameters from a source by their diffusers / transformers / open_clip
//!   names (or initialises them randomly, for tests and benchmarks of full-size architectures without weights);
//!   [`write_safetensors`].
//! - [`pth`]: PyTorch `.pth` state dicts read without executing their pickle (burn-store's reader), and their
//!   conversion to safetensors.
//! - [`single_file`]: the original single-file SD1.x / SD2.x / SDXL checkpoint layouts (`model.diffusion_model.*`,
//!   `first_stage_model.*`, `cond_stage_model.*` / SDXL's `conditioner.embedders.{0,1}.*`: the OpenCLIP text towers
//!   with their fused q/k/v split) renamed to the diffusers names, one source per network.
//! - [`pipeline_files`]: the files of a diffusers model folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, ...)
//!   and `config.json` reading.
//!
//! Every error is a [`WeightError`] (alias [`Error`]) naming the file, the tensor key and the expected and found
//! shapes or values. Tensors come out as burn `TensorData` / tensors of any backend `B: Backend`.

pub mod pipeline_files;
pub mod pth;
pub mod single_file;
pub mod weights;

pub use weights::{
    Init, RawTensor, Renamed, Result, SafetensorsSource, TensorSource, VarBuilder, WeightError,
};

/// This crate's error type: every failure names the file, the key and what was expected and found.
pub type Error = WeightError;
