//! Finding the files of a diffusers model folder (`StableDiffusionPipeline.save_pretrained` layout):
//!
//! ```text
//! model_index.json
//! unet/config.json             unet/diffusion_pytorch_model[.fp16].safetensors  (or sharded + .index.json)
//! vae/config.json              vae/diffusion_pytorch_model[.fp16].safetensors
//! text_encoder/config.json     text_encoder/model[.fp16].safetensors
//! tokenizer/                   tokenizer.json, or vocab.json + merges.txt
//! scheduler/scheduler_config.json
//! ```
//!
//! Pickle files (`*.bin`, `*.ckpt`) are never executed: a folder that only has those gets an error that says so.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::weights::{Result, WeightError};

/// Reads and deserializes a JSON config file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<T> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| WeightError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| WeightError::Config {
        path: path.to_path_buf(),
        msg: format!("invalid config: {e}"),
    })
}

/// The safetensors file(s) of one component folder (`unet`, `vae`, `text_encoder`, ...).
///
/// Looks for `<stem>.safetensors`, then the fp16 variant `<stem>.fp16.safetensors`, then a sharded checkpoint
/// (`<stem>.safetensors.index.json`), for the stems diffusers and transformers use.
pub fn component_weights(component_dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let component_dir = component_dir.as_ref();
    const STEMS: &[&str] = &["diffusion_pytorch_model", "model"];
    if !component_dir.is_dir() {
        return Err(WeightError::Config {
            path: component_dir.to_path_buf(),
            msg: "folder not found (expected a diffusers model folder with unet/, vae/, text_encoder/, tokenizer/)"
                .into(),
        });
    }
    for stem in STEMS {
        for variant in ["", ".fp16", ".bf16"] {
            let single = component_dir.join(format!("{stem}{variant}.safetensors"));
            if single.is_file() {
                return Ok(vec![single]);
            }
            let index = component_dir.join(format!("{stem}{variant}.safetensors.index.json"));
            if index.is_file() {
                return sharded(&index);
            }
        }
    }
    let pickles: Vec<String> = std::fs::read_dir(component_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".bin") || n.ends_with(".ckpt") || n.ends_with(".pt"))
                .collect()
        })
        .unwrap_or_default();
    let msg = if pickles.is_empty() {
        "no safetensors weights found (expected diffusion_pytorch_model.safetensors or model.safetensors)".to_string()
    } else {
        format!(
            "only pickle weights found ({}); pickle files are never executed here: convert them to safetensors \
             first (diffusers: save_pretrained(..., safe_serialization=True))",
            pickles.join(", ")
        )
    };
    Err(WeightError::Config {
        path: component_dir.to_path_buf(),
        msg,
    })
}

fn sharded(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let idx: Index = read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let files: BTreeSet<&String> = idx.weight_map.values().collect();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}
