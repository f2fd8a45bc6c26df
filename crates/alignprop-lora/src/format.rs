//! LoRA weight files (safetensors) in the three layouts people exchange them in.
//!
//! | format | key of the down (A) matrix `[rank, in]` | up (B) matrix `[out, rank]` | scale `alpha / rank` |
//! |---|---|---|---|
//! | [`LoraFormat::Peft`] (diffusers >= 0.24 `save_lora_weights`) | `unet.<module>.lora_A.weight` | `unet.<module>.lora_B.weight` | `lora_adapter_metadata` (`unet.lora_alpha`, `unet.r`), else 1 |
//! | [`LoraFormat::Peft`] (peft's own `save_pretrained`: `adapter_model.safetensors`) | `base_model.model.<module>.lora_A.weight` | `base_model.model.<module>.lora_B.weight` | `lora_alpha` of `adapter_config.json` beside it, else 1 |
//! | [`LoraFormat::Diffusers`] (older diffusers training scripts) | `unet.<module>.lora.down.weight` | `unet.<module>.lora.up.weight` | 1 (or `network_alphas`); written with `alpha / rank` folded into `up` |
//! | [`LoraFormat::Kohya`] (A1111 / ComfyUI) | `lora_unet_<module with _>.lora_down.weight` | `....lora_up.weight` | `....alpha` scalar |
//!
//! `<module>` is the diffusers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
//! except in kohya's SDXL files, which name the original (sgm / LDM) UNet's modules:
//! `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` (kohya's SD 1.x / 2.x files use the diffusers names).
//! Reading keeps such a module under its original path (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`,
//! [`LoraWeights::has_sgm_names`]); [`LoraWeights::resolve_names`] translates it for a given UNet ([`UnetNames`]), and
//! [`crate::apply`] and [`crate::merge_files`] do so by themselves. Writing: [`LoraWeights::write_for`] spells a
//! kohya file the way kohya's tools do for that UNet (the original names for SDXL); [`LoraWeights::write`] uses the
//! diffusers names.
//!
//! Reading checks each adapter whole, with errors naming the file, the key and what was expected and found: both
//! halves present (a down without its up, or an up without its down, is an error), float matrices whose ranks agree
//! and are not 0, a one-element `alpha`, readable peft metadata, and finite values (a NaN or infinite weight or alpha
//! — the mark of a diverged run — would turn every image it touches into NaNs, so it is refused at load time).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use alignprop_io::weights::{SafetensorsSource, TensorSource};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::names::{UnetNames, is_sgm_name};

/// Errors reading or writing LoRA files; messages name the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(transparent)]
    Weights(#[from] alignprop_io::WeightError),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, LoraError>;

/// The key layout of a LoRA file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    Peft,
    Diffusers,
    Kohya,
}

impl std::str::FromStr for LoraFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "peft" => Ok(Self::Peft),
            "diffusers" => Ok(Self::Diffusers),
            "kohya" => Ok(Self::Kohya),
            _ => Err(format!(
                "unknown LoRA format '{s}' (expected peft, diffusers or kohya)"
            )),
        }
    }
}

/// A row-major f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    /// `[rows, cols]`
    pub shape: [usize; 2],
    pub values: Vec<f32>,
}

impl Matrix {
    pub fn new(shape: [usize; 2], values: Vec<f32>) -> Self {
        assert_eq!(
            shape[0] * shape[1],
            values.len(),
            "matrix shape {shape:?} vs {} values",
            values.len()
        );
        Self { shape, values }
    }

    fn to_le_bytes(&self) -> Vec<u8> {
        self.values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

/// The adapter of one linear layer: `delta W = scale * up @ down`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    /// `[rank, in_features]` (peft `lora_A`, diffusers `lora.down`).
    pub down: Matrix,
    /// `[out_features, rank]` (peft `lora_B`, diffusers `lora.up`).
    pub up: Matrix,
    /// `alpha`; the effective scale is `alpha / rank`. `None` means `alpha = rank` (scale 1).
    pub alpha: Option<f64>,
}

impl LoraPair {
    pub fn rank(&self) -> usize {
        self.down.shape[0]
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha.map_or(1.0, |a| a / self.rank() as f64)
    }

    pub fn num_params(&self) -> usize {
        self.down.values.len() + self.up.values.len()
    }
}

/// The adapters of a model, keyed by diffusers module path (`down_blocks.0...attn1.to_q`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoraWeights {
    pub modules: BTreeMap<String, LoraPair>,
}

impl LoraWeights {
    pub fn num_params(&self) -> usize {
        self.modules.values().map(LoraPair::num_params).sum()
    }

    /// The rank shared by all adapters (`None` if empty or mixed).
    pub fn rank(&self) -> Option<usize> {
        let mut ranks = self.modules.values().map(LoraPair::rank);
        let first = ranks.next()?;
        ranks.all(|r| r == first).then_some(first)
    }

    /// Reads a LoRA file in any of the three formats (detected from its keys), or the file in a LoRA folder
    /// ([`lora_file_in`]: diffusers' `pytorch_lora_weights.safetensors` or peft's `adapter_model.safetensors`).
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = lora_file_in(path.as_ref())?;
        let path = path.as_path();
        let src = SafetensorsSource::open(&[path])?;
        let keys = src.keys();
        let err = |msg: String| LoraError::File {
            path: path.to_path_buf(),
            msg,
        };
        let format = detect(&keys).ok_or_else(|| {
            err(format!(
                "not a LoRA file: no peft (lora_A/lora_B), diffusers (lora.down/lora.up) or kohya \
                 (lora_down/lora_up) keys among {} tensors (first: {})",
                keys.len(),
                keys.first().map_or("none", String::as_str)
            ))
        })?;
        // peft's own files name the wrapped UNet `base_model.model.`, and keep the alpha in adapter_config.json.
        let peft_model =
            format == LoraFormat::Peft && keys.iter().any(|k| k.starts_with(PEFT_MODEL_PREFIX));
        let (down_sfx, up_sfx, prefix) = match format {
            LoraFormat::Peft if peft_model => {
                (".lora_A.weight", ".lora_B.weight", PEFT_MODEL_PREFIX)
            }
            LoraFormat::Peft => (".lora_A.weight", ".lora_B.weight", "unet."),
            LoraFormat::Diffusers => (".lora.down.weight", ".lora.up.weight", "unet."),
            LoraFormat::Kohya => (".lora_down.weight", ".lora_up.weight", "lora_unet_"),
        };
        let peft_alpha = match peft_alpha(&src.metadata()).map_err(err)? {
            None if peft_model => adapter_config_alpha(path)?,
            alpha => alpha,
        };
        if let Some(key) = keys.iter().find(|k| {
            k.strip_suffix(up_sfx)
                .is_some_and(|m| src.shape(&format!("{m}{down_sfx}")).is_none())
        }) {
            let module = key.strip_suffix(up_sfx).expect("found by suffix");
            return Err(err(format!(
                "tensor '{key}' has no down half: expected '{module}{down_sfx}' next to it"
            )));
        }
        let mut modules = BTreeMap::new();
        for key in &keys {
            let Some(module) = key.strip_suffix(down_sfx) else {
                continue;
            };
            let up_key = format!("{module}{up_sfx}");
            if src.shape(&up_key).is_none() {
                return Err(err(format!(
                    "tensor '{key}' has no up half: expected '{up_key}' next to it"
                )));
            }
            let down = read_matrix(&src, key, path)?;
            let up = read_matrix(&src, &up_key, path)?;
            if down.shape[0] == 0 {
                return Err(err(format!(
                    "tensor '{key}': rank 0 (shape {:?}), expected at least 1",
                    down.shape
                )));
            }
            if up.shape[1] != down.shape[0] {
                return Err(err(format!(
                    "tensor '{up_key}': expected shape [_, {}] (the rank of '{key}', shape {:?}), found {:?}",
                    down.shape[0], down.shape, up.shape
                )));
            }
            let alpha = match format {
                LoraFormat::Kohya => read_scalar(&src, &format!("{module}.alpha"), path)?,
                _ => peft_alpha,
            };
            let Some(name) = module.strip_prefix(prefix) else {
                // Text-encoder adapters (`text_encoder.*`, `lora_te_*`) are not used by this project.
                continue;
            };
            let name = match format {
                LoraFormat::Kohya => kohya_to_diffusers(name),
                _ => name.to_string(),
            };
            modules.insert(name, LoraPair { down, up, alpha });
        }
        if modules.is_empty() {
            return Err(err("no UNet adapters in this LoRA file".into()));
        }
        Ok(Self { modules })
    }

    /// Whether some modules are named after the original (sgm / LDM) UNet (`input_blocks.4.1...`, as kohya's SDXL
    /// files name them): they need [`Self::resolve_names`] before peft / diffusers output or [`crate::extract`]-style
    /// comparisons (installing them with [`crate::apply`] resolves them by itself).
    pub fn has_sgm_names(&self) -> bool {
        self.modules.keys().any(|m| is_sgm_name(m))
    }

    /// The same adapters with every module named after the original UNet (`input_blocks.4.1...`) renamed to its
    /// diffusers path in `unet` (`down_blocks.1.attentions.0...`); diffusers-named modules are kept. An error names
    /// a module that is in none of the UNet's transformers, or two names for the same module.
    pub fn resolve_names(&self, unet: &UnetNames) -> Result<Self> {
        if !self.has_sgm_names() {
            return Ok(self.clone());
        }
        let mut modules = BTreeMap::new();
        for (name, pair) in &self.modules {
            let new = if is_sgm_name(name) {
                unet.to_diffusers(name)?
            } else {
                name.clone()
            };
            if modules.insert(new.clone(), pair.clone()).is_some() {
                return Err(LoraError::Invalid(format!(
                    "LoRA module '{new}' is given twice (once under its original UNet name '{}')",
                    unet.to_sgm(&new).unwrap_or_default()
                )));
            }
        }
        Ok(Self { modules })
    }

    /// The same adapters with every module named after the original UNet (`down_blocks.1.attentions.0...` ->
    /// `input_blocks.4.1...`), as kohya's SDXL files name them.
    pub fn to_sgm_names(&self, unet: &UnetNames) -> Result<Self> {
        let mut modules = BTreeMap::new();
        for (name, pair) in &self.modules {
            let new = unet.to_sgm(name)?;
            if modules.insert(new.clone(), pair.clone()).is_some() {
                return Err(LoraError::Invalid(format!(
                    "LoRA module '{new}' is given twice (once under its diffusers name)"
                )));
            }
        }
        Ok(Self { modules })
    }

    /// [`Self::write`] for the UNet `unet`: a kohya file names the modules the way kohya's tools (and A1111,
    /// ComfyUI) name them for that UNet — the original UNet's names for SDXL (`lora_unet_input_blocks_4_1_...`), the
    /// diffusers names otherwise; peft and diffusers files use the diffusers names (original names are resolved).
    pub fn write_for(
        &self,
        path: impl AsRef<Path>,
        format: LoraFormat,
        unet: &UnetNames,
    ) -> Result<()> {
        match format {
            LoraFormat::Kohya if unet.sgm_kohya => self.to_sgm_names(unet)?.write(path, format),
            _ => self.resolve_names(unet)?.write(path, format),
        }
    }

    /// Writes the adapters as safetensors in `format` (float32), under the modules' names as they are (kohya: the
    /// diffusers names with `_`, kohya's SD 1.x / 2.x spelling; see [`Self::write_for`] for SDXL). Peft files carry
    /// diffusers' `lora_adapter_metadata`, so `pipe.load_lora_weights(dir)` restores rank and alpha. Modules named
    /// after the original UNet ([`Self::has_sgm_names`]) are written in the kohya format only.
    pub fn write(&self, path: impl AsRef<Path>, format: LoraFormat) -> Result<()> {
        let path = path.as_ref();
        if format != LoraFormat::Kohya
            && let Some(m) = self.modules.keys().find(|m| is_sgm_name(m))
        {
            return Err(LoraError::File {
                path: path.to_path_buf(),
                msg: format!(
                    "cannot write {format:?} keys: module '{m}' is named after the original (sgm) UNet, as in \
                     kohya's SDXL files; translate the names for the model first (LoraWeights::resolve_names / \
                     write_for; the CLI's --model)"
                ),
            });
        }
        let rank = self
            .rank()
            .ok_or_else(|| LoraError::Invalid("cannot save: adapters have mixed ranks".into()))?;
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut alphas = BTreeMap::new();
        for (module, pair) in &self.modules {
            let (dk, uk) = match format {
                LoraFormat::Peft => (
                    format!("unet.{module}.lora_A.weight"),
                    format!("unet.{module}.lora_B.weight"),
                ),
                LoraFormat::Diffusers => (
                    format!("unet.{module}.lora.down.weight"),
                    format!("unet.{module}.lora.up.weight"),
                ),
                LoraFormat::Kohya => {
                    let k = format!("lora_unet_{}", module.replace('.', "_"));
                    let alpha = pair.alpha.unwrap_or(pair.rank() as f64) as f32;
                    tensors.push((
                        format!("{k}.alpha"),
                        Dtype::F32,
                        vec![],
                        alpha.to_le_bytes().to_vec(),
                    ));
                    (
                        format!("{k}.lora_down.weight"),
                        format!("{k}.lora_up.weight"),
                    )
                }
            };
            tensors.push((
                dk,
                Dtype::F32,
                pair.down.shape.to_vec(),
                pair.down.to_le_bytes(),
            ));
            // The classic diffusers layout stores no alpha (its readers apply scale 1): fold `alpha / rank` into
            // the up matrix so the adapter's effect is kept.
            let up = match format {
                LoraFormat::Diffusers if pair.scale() != 1.0 => {
                    let scale = pair.scale() as f32;
                    Matrix::new(
                        pair.up.shape,
                        pair.up.values.iter().map(|v| v * scale).collect(),
                    )
                }
                _ => pair.up.clone(),
            };
            tensors.push((uk, Dtype::F32, up.shape.to_vec(), up.to_le_bytes()));
            alphas.insert(pair.alpha.map(|a| a.to_bits()), ());
        }
        let mut metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        if format == LoraFormat::Peft {
            let alpha = match alphas.keys().collect::<Vec<_>>().as_slice() {
                [a] => a.map_or(rank as f64, f64::from_bits),
                _ => {
                    return Err(LoraError::Invalid(
                        "cannot save peft metadata: adapters have mixed alphas".into(),
                    ));
                }
            };
            metadata.insert(
                "lora_adapter_metadata".into(),
                peft_metadata(rank, alpha, &self.target_modules()),
            );
        }
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(k, dt, shape, bytes)| {
                let view =
                    TensorView::new(*dt, shape.clone(), bytes).expect("tensor bytes match shape");
                (k.clone(), view)
            })
            .collect();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| LoraError::File {
                path: dir.to_path_buf(),
                msg: format!("cannot create folder: {e}"),
            })?;
        }
        // Write to a temporary file and rename, so a crash never leaves a truncated LoRA behind.
        let tmp = path.with_extension("safetensors.tmp");
        let write = || -> std::result::Result<(), String> {
            let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())?;
            let bytes = sorted_header(&bytes)?;
            let mut f = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
            std::io::Write::write_all(&mut f, &bytes).map_err(|e| e.to_string())?;
            f.sync_all().map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, path).map_err(|e| e.to_string())
        };
        write().map_err(|e| LoraError::File {
            path: path.to_path_buf(),
            msg: format!("cannot write: {e}"),
        })
    }

    /// The distinct last path components of the adapted modules (`to_q`, `to_out.0`, ...), sorted.
    pub fn target_modules(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .modules
            .keys()
            .map(|m| {
                // `...attn1.to_out.0` -> `to_out.0`; `...attn1.to_q` -> `to_q`
                let parts: Vec<&str> = m.split('.').collect();
                match parts.as_slice() {
                    [.., a, b] if b.parse::<usize>().is_ok() => format!("{a}.{b}"),
                    [.., b] => b.to_string(),
                    [] => String::new(),
                }
            })
            .collect();
        t.sort();
        t.dedup();
        t
    }
}

fn detect(keys: &[String]) -> Option<LoraFormat> {
    if keys.iter().any(|k| k.ends_with(".lora_A.weight")) {
        Some(LoraFormat::Peft)
    } else if keys.iter().any(|k| k.ends_with(".lora.down.weight")) {
        Some(LoraFormat::Diffusers)
    } else if keys.iter().any(|k| k.ends_with(".lora_down.weight")) {
        Some(LoraFormat::Kohya)
    } else {
        None
    }
}

/// `down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0` ->
/// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`: every `_` becomes `.` except inside the
/// multi-word names of the diffusers UNet and of the original UNet's top-level blocks (kohya's SDXL
/// `input_blocks_4_1_transformer_blocks_0_attn1_to_q` -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`, still
/// in the original naming: [`LoraWeights::resolve_names`]).
pub fn kohya_to_diffusers(name: &str) -> String {
    const COMPOUNDS: &[&str] = &[
        "input_blocks",
        "middle_block",
        "output_blocks",
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "proj_in",
        "proj_out",
        "time_emb_proj",
        "conv_shortcut",
        "conv_in",
        "conv_out",
        "time_embedding",
        "linear_1",
        "linear_2",
        "conv_norm_out",
    ];
    let mut out = name.replace('_', ".");
    for c in COMPOUNDS {
        out = out.replace(&c.replace('_', "."), c);
    }
    out
}

fn read_matrix(src: &SafetensorsSource, key: &str, path: &Path) -> Result<Matrix> {
    let raw = src.find(key)?.ok_or_else(|| LoraError::File {
        path: path.to_path_buf(),
        msg: format!("tensor '{key}' is missing"),
    })?;
    // Conv-shaped adapters ([r, in, 1, 1]) are accepted as matrices.
    let shape = match raw.shape.as_slice() {
        [a, b, rest @ ..] if rest.iter().all(|&d| d == 1) => [*a, *b],
        _ => {
            return Err(LoraError::File {
                path: path.to_path_buf(),
                msg: format!(
                    "tensor '{key}': expected a matrix, found shape {:?}",
                    raw.shape
                ),
            });
        }
    };
    let values = float_values::<f32>(raw, key, path)?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(LoraError::File {
            path: path.to_path_buf(),
            msg: format!(
                "tensor '{key}': expected finite values, found {} at index {i} ({} of {} not finite)",
                values[i],
                values.iter().filter(|v| !v.is_finite()).count(),
                values.len()
            ),
        });
    }
    Ok(Matrix::new(shape, values))
}

/// The values of a stored float tensor (F32, F16, BF16, F64) as `E`; an integer or boolean tensor is an error.
fn float_values<E: burn::tensor::Element>(
    raw: alignprop_io::RawTensor,
    key: &str,
    path: &Path,
) -> Result<Vec<E>> {
    let err = |msg: String| LoraError::File {
        path: path.to_path_buf(),
        msg: format!("tensor '{key}': {msg}"),
    };
    if !raw.data.dtype.is_float() {
        return Err(err(format!(
            "expected a float dtype (F32, F16, BF16, F64), found {:?}",
            raw.data.dtype
        )));
    }
    raw.data
        .convert::<E>()
        .to_vec::<E>()
        .map_err(|e| err(format!("{e:?}")))
}

/// A kohya `alpha`: one finite number (shape `[]` or `[1]`), or `None` when the file has none.
fn read_scalar(src: &SafetensorsSource, key: &str, path: &Path) -> Result<Option<f64>> {
    let Some(raw) = src.find(key)? else {
        return Ok(None);
    };
    let err = |msg: String| LoraError::File {
        path: path.to_path_buf(),
        msg: format!("tensor '{key}': {msg}"),
    };
    let shape = raw.shape.clone();
    let values = float_values::<f64>(raw, key, path)?;
    match values.as_slice() {
        [a] if a.is_finite() => Ok(Some(*a)),
        [a] => Err(err(format!("expected a finite alpha, found {a}"))),
        _ => Err(err(format!(
            "expected a scalar alpha (shape [] or [1]), found shape {shape:?}"
        ))),
    }
}

/// A serialised safetensors file with its JSON header's keys sorted (the metadata map is a `HashMap`, whose order
/// changes from process to process), so the same LoRA is the same file byte for byte. The header is padded with
/// spaces to a multiple of 8 bytes, as safetensors writes it; tensor offsets are relative to the data and unchanged.
fn sorted_header(bytes: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let n = u64::from_le_bytes(bytes[..8].try_into().map_err(|_| "short header")?) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| e.to_string())?;
    // serde_json's map is ordered by key (no `preserve_order`), so re-serialising sorts every level.
    let mut json = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// Key prefix of the UNet in peft's own adapter files (`PeftModel.save_pretrained`).
const PEFT_MODEL_PREFIX: &str = "base_model.model.";

/// The LoRA file `path` names: the path itself, or in a folder its `pytorch_lora_weights.safetensors` (diffusers'
/// `save_lora_weights`) or `adapter_model.safetensors` (peft's `save_pretrained`, next to its `adapter_config.json`).
pub fn lora_file_in(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    [
        "pytorch_lora_weights.safetensors",
        "adapter_model.safetensors",
    ]
    .iter()
    .map(|name| path.join(name))
    .find(|p| p.is_file())
    .ok_or_else(|| LoraError::File {
        path: path.to_path_buf(),
        msg: "a folder without pytorch_lora_weights.safetensors or adapter_model.safetensors"
            .into(),
    })
}

/// `lora_alpha` of the `adapter_config.json` next to a peft adapter file; `None` without that file. Settings that
/// would change the scale per module or its formula (`alpha_pattern`, `use_rslora`, `use_dora`) are refused, naming
/// the file (reading the adapters without them would silently change the model).
fn adapter_config_alpha(file: &Path) -> Result<Option<f64>> {
    let config = file.with_file_name("adapter_config.json");
    if !config.is_file() {
        return Ok(None);
    }
    let err = |msg: String| LoraError::File {
        path: config.clone(),
        msg,
    };
    let text = std::fs::read_to_string(&config).map_err(|e| err(format!("cannot read: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    for flag in ["use_rslora", "use_dora"] {
        if json.get(flag).and_then(serde_json::Value::as_bool) == Some(true) {
            return Err(err(format!(
                "{flag} is true: not supported (plain LoRA only)"
            )));
        }
    }
    if json
        .get("alpha_pattern")
        .and_then(serde_json::Value::as_object)
        .is_some_and(|m| !m.is_empty())
    {
        return Err(err(
            "alpha_pattern gives some modules their own alpha: not supported (one lora_alpha for all)".into(),
        ));
    }
    match json.get("lora_alpha") {
        None => Ok(None),
        Some(a) => match a.as_f64() {
            Some(a) if a.is_finite() => Ok(Some(a)),
            _ => Err(err(format!("expected a number for lora_alpha, found {a}"))),
        },
    }
}

/// `lora_alpha` from diffusers' peft metadata (`{"unet.lora_alpha": 4, "unet.r": 4, ...}`); `None` without
/// metadata. Metadata that is there but unreadable is an error (ignoring it would silently change the scale).
fn peft_alpha(metadata: &BTreeMap<String, String>) -> std::result::Result<Option<f64>, String> {
    let Some(text) = metadata.get("lora_adapter_metadata") else {
        return Ok(None);
    };
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("metadata 'lora_adapter_metadata' is not valid JSON: {e}"))?;
    let Some(alpha) = json
        .get("unet.lora_alpha")
        .or_else(|| json.get("lora_alpha"))
    else {
        return Ok(None);
    };
    match alpha.as_f64() {
        Some(a) if a.is_finite() => Ok(Some(a)),
        _ => Err(format!(
            "metadata 'lora_adapter_metadata': expected a number for lora_alpha, found {alpha}"
        )),
    }
}

/// The metadata diffusers writes with `save_lora_weights(..., unet_lora_adapter_metadata=config)`.
fn peft_metadata(rank: usize, alpha: f64, targets: &[String]) -> String {
    let value = serde_json::json!({
        "unet.r": rank,
        "unet.lora_alpha": alpha,
        "unet.target_modules": targets,
        "unet.peft_type": "LORA",
        "unet.bias": "none",
        "unet.lora_dropout": 0.0,
        "unet.init_lora_weights": "gaussian",
        "unet.fan_in_fan_out": false,
        "unet.use_dora": false,
        "unet.use_rslora": false,
        "unet.rank_pattern": {},
        "unet.alpha_pattern": {},
    });
    serde_json::to_string_pretty(&value).expect("json")
}
