//! Reading PyTorch `.pth` state dicts (torch zip format, as the LAION aesthetic head is published) safely: burn's
//! PyTorch reader parses the pickle without executing any code. Also converts them to safetensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::weights::{RawTensor, Result, TensorSource, WeightError};
use burn::tensor::{DType, TensorData};
use burn_store::pytorch::PytorchReader;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// A `.pth` file's tensors, read once (these files are small heads, not whole models).
pub struct PthSource {
    path: PathBuf,
    tensors: HashMap<String, TensorData>,
}

impl PthSource {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let err = |msg: String| WeightError::Format {
            path: path.to_path_buf(),
            msg,
        };
        let reader = PytorchReader::new(path)
            .map_err(|e| err(format!("not a readable PyTorch file: {e}")))?;
        let mut tensors = HashMap::new();
        for (k, snap) in reader.tensors() {
            let data = snap
                .to_data()
                .map_err(|e| err(format!("tensor '{k}': {e:?}")))?;
            tensors.insert(k.clone(), data);
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }
}

impl TensorSource for PthSource {
    fn find(&self, key: &str) -> Result<Option<RawTensor>> {
        Ok(self.tensors.get(key).map(|d| RawTensor {
            data: d.clone(),
            shape: d.shape.as_slice().to_vec(),
            file: self.path.clone(),
            stored_key: key.to_string(),
        }))
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.tensors.keys().cloned().collect();
        k.sort();
        k
    }
}

/// Writes every tensor of a `.pth` state dict to a safetensors file (float tensors as F32).
pub fn pth_to_safetensors(pth: impl AsRef<Path>, out: impl AsRef<Path>) -> Result<usize> {
    let pth = pth.as_ref();
    let out = out.as_ref();
    let src = PthSource::open(pth)?;
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for k in src.keys() {
        let d = src.tensors[&k].clone().convert_dtype(DType::F32);
        owned.push((k, d.shape.as_slice().to_vec(), d.bytes.to_vec()));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("consistent tensor"),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), out).map_err(|e| WeightError::Format {
        path: out.to_path_buf(),
        msg: format!("cannot write: {e}"),
    })?;
    Ok(owned.len())
}
