//! Merging a LoRA into a model's weight files: `W' = W + c * (alpha / rank) * up @ down` for every adapted linear
//! layer, written as a complete diffusers model folder that any tool loads without LoRA support.
//!
//! This works on the stored tensors (no model is built): each adapted weight is read in float32, updated, and
//! written back in its stored dtype (fp16 / bf16 files stay fp16 / bf16); every other tensor is copied byte for byte.
//! A LoRA named after the original UNet (kohya's SDXL files) is translated with the folder's UNet config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alignprop_io::pipeline_files::component_weights;
use alignprop_io::weights::{SafetensorsSource, TensorSource, write_safetensors};
use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};

use crate::format::{LoraError, LoraWeights, Result};
use crate::names::UnetNames;

/// What a merge changed.
#[derive(Clone, Debug)]
pub struct MergeReport {
    /// Weights updated (one per adapter).
    pub merged: usize,
    /// Tensors written in all.
    pub tensors: usize,
    /// The merged UNet file.
    pub unet_file: PathBuf,
}

/// `weight + c * lora_scale * up @ down`, in float32, returned in `weight`'s dtype and shape.
///
/// `weight`: `[out, in]` (or `[out, in, 1, 1]` for a 1x1 convolution); `up`: `[out, rank]`; `down`: `[rank, in]`.
pub fn merged_weight(
    weight: TensorData,
    down: &crate::Matrix,
    up: &crate::Matrix,
    factor: f64,
) -> TensorData {
    let device = Default::default();
    let dtype = weight.dtype;
    let shape = weight.shape.to_vec();
    let mut w = weight.convert_dtype(DType::F32);
    w.shape = [up.shape[0], down.shape[1]].into();
    let w = Tensor::<Flex, 2>::from_data(w, &device);
    let u = Tensor::<Flex, 2>::from_data(TensorData::new(up.values.clone(), up.shape), &device);
    let d = Tensor::<Flex, 2>::from_data(TensorData::new(down.values.clone(), down.shape), &device);
    let merged = w + u.matmul(d) * factor;
    let mut data = merged.cast(dtype).into_data();
    data.shape = shape.into();
    data
}

/// Merges `lora` (multiplied by `c`; 1 = as trained) into the UNet of the diffusers folder `model` and writes a
/// complete folder `out`: every file of `model` copied, except the UNet's weights, which are written merged as
/// `unet/diffusion_pytorch_model.safetensors`.
pub fn merge_into_model_folder(
    model: &Path,
    lora: &LoraWeights,
    c: f64,
    out: &Path,
) -> Result<MergeReport> {
    let file_err = |path: &Path, msg: String| LoraError::File {
        path: path.to_path_buf(),
        msg,
    };
    if out.is_file() {
        return Err(file_err(
            out,
            "the output is a file, expected a folder".into(),
        ));
    }
    if out.canonicalize().ok().is_some() && out.canonicalize().ok() == model.canonicalize().ok() {
        return Err(file_err(
            out,
            "the output folder must differ from the model folder".into(),
        ));
    }
    let unet_dir = model.join("unet");
    let unet_files = component_weights(&unet_dir)?;
    let source = SafetensorsSource::open(&unet_files)?;
    // Kohya's SDXL files name the original UNet's modules: translate them for this UNet.
    let resolved;
    let lora = if lora.has_sgm_names() {
        resolved = lora.resolve_names(&UnetNames::from_folder(&unet_dir)?)?;
        &resolved
    } else {
        lora
    };

    // Check every adapter before writing anything.
    let mut updates: BTreeMap<String, TensorData> = BTreeMap::new();
    for (module, pair) in &lora.modules {
        let key = format!("{module}.weight");
        let raw = source.find(&key)?.ok_or_else(|| {
            LoraError::Invalid(format!(
                "the LoRA adapts '{module}', but the UNet has no tensor '{key}' ({})",
                source.describe()
            ))
        })?;
        let expected = [pair.up.shape[0], pair.down.shape[1]];
        let squeezed: Vec<usize> = {
            let mut s = raw.shape.clone();
            while s.len() > 2 && s.last() == Some(&1) {
                s.pop();
            }
            s
        };
        if squeezed != expected {
            return Err(file_err(
                &raw.file,
                format!(
                    "tensor '{key}': the LoRA expects shape {expected:?}, found {:?}",
                    raw.shape
                ),
            ));
        }
        let factor = c * pair.scale();
        updates.insert(key, merged_weight(raw.data, &pair.down, &pair.up, factor));
    }

    copy_tree(model, out, &unet_dir)?;
    let mut tensors = Vec::new();
    for key in source.keys() {
        let data = match updates.remove(&key) {
            Some(d) => d,
            None => source.find(&key)?.expect("listed key").data,
        };
        tensors.push((key, data));
    }
    let unet_file = out.join("unet").join("diffusion_pytorch_model.safetensors");
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "alignprop_merged_lora".to_string(),
            format!("{} adapters, multiplier {c}", lora.modules.len()),
        ),
    ]);
    write_safetensors(&unet_file, &tensors, &metadata)?;
    Ok(MergeReport {
        merged: lora.modules.len(),
        tensors: tensors.len(),
        unet_file,
    })
}

/// Copies `from` into `to` recursively, leaving out the weight files of `skip_weights_of` (a component folder).
fn copy_tree(from: &Path, to: &Path, skip_weights_of: &Path) -> Result<()> {
    let err = |path: &Path, e: std::io::Error| LoraError::File {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    std::fs::create_dir_all(to).map_err(|e| err(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| err(from, e))? {
        let entry = entry.map_err(|e| err(from, e))?;
        let path = entry.path();
        let dest = to.join(entry.file_name());
        if path.is_dir() {
            copy_tree(&path, &dest, skip_weights_of)?;
        } else {
            let name = entry.file_name().to_string_lossy().to_string();
            let is_weights = name.ends_with(".safetensors")
                || name.ends_with(".safetensors.index.json")
                || name.ends_with(".bin")
                || name.ends_with(".ckpt");
            if path.parent() == Some(skip_weights_of) && is_weights {
                continue;
            }
            std::fs::copy(&path, &dest).map_err(|e| err(&path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Matrix;

    #[test]
    fn merged_weight_adds_the_scaled_product_and_keeps_dtype_and_shape() {
        // W [2, 3], up [2, 1], down [1, 3]: W + 0.5 * up @ down.
        let w = TensorData::new(vec![1f32, 2., 3., 4., 5., 6.], [2, 3, 1, 1]);
        let up = Matrix::new([2, 1], vec![1.0, -2.0]);
        let down = Matrix::new([1, 3], vec![2.0, 0.0, 4.0]);
        let m = merged_weight(w, &down, &up, 0.5);
        assert_eq!(m.shape.to_vec(), vec![2, 3, 1, 1]);
        assert_eq!(m.dtype, DType::F32);
        assert_eq!(
            m.to_vec::<f32>().unwrap(),
            vec![2.0, 2.0, 5.0, 2.0, 5.0, 2.0]
        );
        let h = TensorData::new(vec![half::f16::from_f32(1.0); 6], [2, 3]);
        let m = merged_weight(h, &down, &up, 1.0);
        assert_eq!(m.dtype, DType::F16);
        let v: Vec<f32> = m.convert_dtype(DType::F32).to_vec().unwrap();
        assert_eq!(v, vec![3.0, 1.0, 5.0, -3.0, 1.0, -7.0]);
    }
}
