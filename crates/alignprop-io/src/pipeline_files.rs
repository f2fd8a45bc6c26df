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

/// The pipeline classes whose folders load here: Stable Diffusion 1.x (and 2.x, the same pipeline class).
pub const SUPPORTED_PIPELINES: &[&str] = &["StableDiffusionPipeline", "StableDiffusionXLPipeline"];

/// Checks a diffusers folder's `model_index.json` (`_class_name`) and `unet/config.json` (`in_channels`) before
/// anything is loaded, so a model family that is not supported is one clear error naming what was found, not a
/// missing tensor later. A folder without `model_index.json` (e.g. a hand-assembled one) passes.
pub fn check_pipeline_family(folder: &Path) -> Result<()> {
    let index = folder.join("model_index.json");
    if index.is_file() {
        let value: serde_json::Value = read_json(&index)?;
        let class = value
            .get("_class_name")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        if !class.is_empty() && !SUPPORTED_PIPELINES.contains(&class) {
            let what = match class {
                "StableDiffusionXLImg2ImgPipeline" => "the SDXL refiner / img2img (not supported)",
                "StableDiffusionInpaintPipeline" | "StableDiffusionXLInpaintPipeline" => {
                    "an inpainting model (not supported)"
                }
                "StableDiffusionDepth2ImgPipeline" => "a depth-conditioned model (not supported)",
                "StableDiffusionUpscalePipeline" | "StableDiffusionLatentUpscalePipeline" => {
                    "an upscaler (not supported)"
                }
                "StableDiffusion3Pipeline" => "Stable Diffusion 3 (an MMDiT, not supported)",
                "FluxPipeline" => "FLUX (a flow transformer, not supported)",
                _ => "a pipeline that is not supported",
            };
            return Err(WeightError::Config {
                path: index,
                msg: format!(
                    "_class_name is '{class}': {what}; supported: {} (Stable Diffusion 1.x / 2.x / SDXL text-to-image)",
                    SUPPORTED_PIPELINES.join(", ")
                ),
            });
        }
    }
    let unet = folder.join("unet/config.json");
    if unet.is_file() {
        let value: serde_json::Value = read_json(&unet)?;
        if let Some(c) = value.get("in_channels").and_then(serde_json::Value::as_u64)
            && c != 4
        {
            let what = match c {
                9 => " (an inpainting UNet: latents + mask + masked image)",
                5 => " (a depth-conditioned UNet)",
                _ => "",
            };
            return Err(WeightError::Config {
                path: unet,
                msg: format!(
                    "in_channels is {c}{what}; expected 4 (a text-to-image UNet on 4-channel latents)"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod family_tests {
    use super::*;

    fn folder(name: &str, index: Option<&str>, unet: Option<&str>) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("alignprop-family-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        std::fs::create_dir_all(d.join("unet")).unwrap();
        if let Some(i) = index {
            std::fs::write(d.join("model_index.json"), i).unwrap();
        }
        if let Some(u) = unet {
            std::fs::write(d.join("unet/config.json"), u).unwrap();
        }
        d
    }

    #[test]
    fn unsupported_families_are_one_clear_error() {
        let ok = folder(
            "sd15",
            Some(r#"{"_class_name": "StableDiffusionPipeline"}"#),
            Some(r#"{"in_channels": 4}"#),
        );
        assert!(check_pipeline_family(&ok).is_ok());
        let xl = folder(
            "sdxl",
            Some(r#"{"_class_name": "StableDiffusionXLPipeline"}"#),
            Some(r#"{"in_channels": 4}"#),
        );
        assert!(check_pipeline_family(&xl).is_ok());
        let bare = folder("bare", None, None);
        assert!(check_pipeline_family(&bare).is_ok());
        for (class, says) in [
            ("StableDiffusionXLImg2ImgPipeline", "refiner"),
            ("StableDiffusion3Pipeline", "Stable Diffusion 3"),
            ("FluxPipeline", "FLUX"),
            ("KandinskyPipeline", "not supported"),
        ] {
            let d = folder(
                class,
                Some(&format!(r#"{{"_class_name": "{class}"}}"#)),
                None,
            );
            let e = check_pipeline_family(&d).unwrap_err().to_string();
            assert!(
                e.contains("model_index.json") && e.contains(class) && e.contains(says),
                "{e}"
            );
            assert!(
                e.contains("StableDiffusionPipeline") && !e.contains('\n'),
                "{e}"
            );
            std::fs::remove_dir_all(&d).ok();
        }
        let inpaint = folder(
            "inpaint",
            Some(r#"{"_class_name": "StableDiffusionPipeline"}"#),
            Some(r#"{"in_channels": 9}"#),
        );
        let e = check_pipeline_family(&inpaint).unwrap_err().to_string();
        assert!(
            e.contains("unet/config.json")
                && e.contains("in_channels is 9")
                && e.contains("inpainting"),
            "{e}"
        );
        for d in [ok, xl, bare, inpaint] {
            std::fs::remove_dir_all(&d).ok();
        }
    }
}
