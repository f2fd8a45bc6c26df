//! Training checkpoints: the LoRA tensors and the AdamW moments in their own dtype (`state.safetensors`), the
//! step counters and the random generator state (`state.json`). Written to a temporary folder and renamed, so a
//! crash never leaves a half-written checkpoint; resuming continues the run with the same numbers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alignprop_io::weights::{SafetensorsSource, TensorSource};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde::{Deserialize, Serialize};

/// The scalar part of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimiser steps done.
    pub step: usize,
    /// AdamW's step count (bias correction).
    pub adam_step: u64,
    /// The training noise generator's state.
    pub rng: [u64; 4],
    pub rng_spare: Option<f64>,
}

/// Writes named matrices as safetensors (F32 or F64, as the tensors are).
pub fn save_tensors<B: Backend>(
    path: &Path,
    tensors: &BTreeMap<String, Tensor<B, 2>>,
) -> Result<(), String> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, t) in tensors {
        let shape = t.dims().to_vec();
        let (dtype, data) = match t.dtype() {
            DType::F64 => (Dtype::F64, t.clone().into_data()),
            _ => (Dtype::F32, t.clone().into_data().convert_dtype(DType::F32)),
        };
        owned.push((k.clone(), dtype, shape, data.bytes.to_vec()));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(k, dt, shape, bytes)| {
            (
                k.clone(),
                TensorView::new(*dt, shape.clone(), bytes).expect("consistent tensor"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| format!("{}: cannot write: {e}", path.display()))
}

/// Reads every tensor of a safetensors file as a matrix in `dtype` on `device`.
pub fn load_tensors<B: Backend>(
    path: &Path,
    device: &B::Device,
    dtype: DType,
) -> Result<BTreeMap<String, Tensor<B, 2>>, String> {
    let src = SafetensorsSource::open(&[path]).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for k in src.keys() {
        let raw = src
            .find(&k)
            .map_err(|e| e.to_string())?
            .expect("listed key");
        if raw.shape.len() != 2 {
            return Err(format!(
                "{}: tensor '{k}' has shape {:?}, expected a matrix",
                path.display(),
                raw.shape
            ));
        }
        out.insert(k, Tensor::from_data(raw.data, (device, dtype)));
    }
    Ok(out)
}

/// Writes `dir/state.safetensors` + `dir/state.json` atomically (via `dir.tmp`).
pub fn write_checkpoint<B: Backend>(
    dir: &Path,
    tensors: &BTreeMap<String, Tensor<B, 2>>,
    state: &CheckpointState,
) -> Result<(), String> {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    save_tensors(&tmp.join("state.safetensors"), tensors)?;
    let json = serde_json::to_string_pretty(state).expect("json");
    std::fs::write(tmp.join("state.json"), json).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Reads a checkpoint folder.
pub fn read_checkpoint<B: Backend>(
    dir: &Path,
    device: &B::Device,
    dtype: DType,
) -> Result<(BTreeMap<String, Tensor<B, 2>>, CheckpointState), String> {
    let json = dir.join("state.json");
    let text = std::fs::read_to_string(&json)
        .map_err(|e| format!("{}: cannot read checkpoint: {e}", json.display()))?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", json.display()))?;
    Ok((
        load_tensors(&dir.join("state.safetensors"), device, dtype)?,
        state,
    ))
}

/// The checkpoint folders (`step_NNNNN`) under `root`, oldest first.
pub fn list_checkpoints(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.is_dir()
                        && p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("step_"))
                })
                .filter(|p| p.extension().is_none())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
