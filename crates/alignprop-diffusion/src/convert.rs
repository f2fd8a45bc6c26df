//! Conversion of a single-file SD1.x / SD2.x / SDXL checkpoint (original CompVis / Stability-AI layout) into a
//! diffusers pipeline folder, so the checkpoint can be used by every command that takes a model folder, and by
//! diffusers itself:
//!
//! | generation | folder written | defaults without a `configs_from` folder |
//! |---|---|---|
//! | SD1.x (`cond_stage_model.transformer.*`) | `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, `model_index.json` (`StableDiffusionPipeline`) | SD1.5's configs adjusted to the shapes; DDIM, epsilon; CLIP tokenizer padding with `<\|endoftext\|>` |
//! | SD2.x (`cond_stage_model.model.*`, OpenCLIP) | the same | SD 2.1's: heads of 64 channels, upcast attention, text encoder = the tower's blocks but the last, exact GELU; DDIM, v-prediction; tokenizer padding with `!` |
//! | SDXL (`conditioner.embedders.{0,1}.*`) | the same plus `text_encoder_2/` (transformers `CLIPTextModelWithProjection`) and `tokenizer_2/`; `model_index.json` `StableDiffusionXLPipeline`, `force_zeros_for_empty_prompt` true | SDXL base 1.0's: UNet `text_time` addition embedding (`addition_time_embed_dim`, `projection_class_embeddings_input_dim` from `label_emb.0.0` and `text_projection`), per-level `transformer_layers_per_block` and heads of 64 channels (`attention_head_dim` [5, 10, 20] at SDXL size), `sample_size` 128; VAE `scaling_factor` 0.13025, `force_upcast`; `text_encoder_2` with every block of the bigG tower, exact GELU, `projection_dim` from `text_projection`; `EulerDiscreteScheduler`, epsilon; `tokenizer_2` padding with `!` |
//!
//! Which generation a file is comes from its text encoders' keys ([`SdVersion`]). SD2.x's 512-px base models predict
//! epsilon, which the file cannot tell: [`ConvertOptions::prediction_type`] (or a `configs_from` folder) says so. A
//! `configs_from` folder's configs are used as they are (as diffusers' `from_single_file(..., config=folder)`), so
//! the values that the shapes cannot tell (GroupNorm groups, head counts of a non-standard model) come out right.
//!
//! The tensors written are exactly the ones our models read, under their diffusers / transformers names, with their
//! stored bytes and dtype unchanged (1x1 convolution weights that diffusers keeps as linear matrices are written in
//! the matrix shape; SDXL's OpenCLIP `text_projection` `[width, proj]` as transformers' `text_projection.weight`
//! `[proj, width]`). The tensor list comes from building each network through the real loaders, so a checkpoint
//! that would not load fails here with the loader's error (file, key, expected and found shape).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{DType, TensorData};

use crate::clip::{CLIPActivation, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection};
use crate::tokenizer::SD15_TOKENIZER_FILES;
use crate::unet::{OneOrMany, UNet2DConditionConfig, UNet2DConditionModel};
use crate::vae::{AutoencoderKL, AutoencoderKLConfig};
use alignprop_io::pipeline_files::read_json;
use alignprop_io::single_file::SdVersion;
use alignprop_io::single_file::{OPEN_CLIP_PREFIX, SingleFileCheckpoint};
use alignprop_io::weights::{Result, TensorSource, VarBuilder, WeightError, write_safetensors};

/// How to convert.
#[derive(Clone, Debug, Default)]
pub struct ConvertOptions {
    /// A diffusers folder whose `unet/`, `vae/`, `text_encoder/` (SDXL: and `text_encoder_2/`) `config.json` (and
    /// `scheduler/`, `tokenizer/`, `tokenizer_2/`, SDXL's `model_index.json` `force_zeros_for_empty_prompt`) describe
    /// the checkpoint. Without it the configs are SD1.5's (SD 2.1's for an SD2.x file, SDXL base 1.0's for an SDXL
    /// file), adjusted to what the tensor shapes tell (channels, levels, attention layout, transformer depth,
    /// text-encoder sizes, addition embedding); values the shapes cannot tell (GroupNorm groups, attention heads:
    /// one per 64 channels for SD2.x and SDXL) stay those models'.
    pub configs_from: Option<PathBuf>,
    /// A tokenizer folder (`vocab.json` + `merges.txt`, or `tokenizer.json`) to copy; default: `configs_from`'s
    /// `tokenizer/` if it has one, else SD1.5's CLIP tokenizer bundled with this crate (for an SD2.x file with SD2's
    /// `!` padding).
    pub tokenizer_from: Option<PathBuf>,
    /// SDXL only: the folder to copy as `tokenizer_2/`; default: `configs_from`'s `tokenizer_2/` if it has one, else
    /// the bundled CLIP tokenizer padding with `!` (as SDXL's `tokenizer_2`).
    pub tokenizer_2_from: Option<PathBuf>,
    /// The scheduler's `prediction_type` (`epsilon`, `v_prediction` or `sample`), which a single file does not
    /// store; default: `configs_from`'s scheduler, else `epsilon` for SD1.x and SDXL and `v_prediction` for SD2.x
    /// (SD 2.1 / 2.0-v at 768 px; give `epsilon` for the 512-px SD2 base models, whose default size then is 512).
    pub prediction_type: Option<String>,
    /// Overwrite an existing non-empty output folder.
    pub overwrite: bool,
}

/// What a conversion wrote.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    /// Tensors written per component (`unet`, `vae`, `text_encoder`, SDXL's `text_encoder_2`).
    pub tensors: BTreeMap<String, usize>,
    /// Keys of the checkpoint that no network read (EMA copies and the like are not counted).
    pub unused_keys: Vec<String>,
    /// Where the configs came from, in words.
    pub configs: String,
}

fn write_err(path: &Path, msg: impl std::fmt::Display) -> WeightError {
    WeightError::Write {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// The prediction types a diffusers scheduler config may name.
pub const PREDICTION_TYPES: [&str; 3] = ["epsilon", "v_prediction", "sample"];

/// What the model predicts when nothing says otherwise: epsilon for SD1.x and SDXL, v for SD2.x (diffusers takes
/// every SD2 single file for SD 2.1, 768-v).
pub fn default_prediction_type(version: SdVersion) -> &'static str {
    match version {
        SdVersion::Sd1 | SdVersion::Xl => "epsilon",
        SdVersion::Sd2 => "v_prediction",
    }
}

/// SDXL's latent size (1024 px).
const SDXL_SAMPLE_SIZE: usize = 128;
/// SDXL's VAE latent scaling.
pub const SDXL_VAE_SCALING_FACTOR: f64 = 0.13025;

/// SD1.5's UNet config adjusted to the structure read from the checkpoint; for SD2.x SD 2.1's: one attention head
/// per 64 channels (`attention_head_dim` [5, 10, 20, 20] at SD size), `upcast_attention`, and latents of 96
/// (768 px) for v-prediction, 64 (512 px, the base models) otherwise; for SDXL SDXL base 1.0's: heads of 64 channels
/// ([5, 10, 20]), the `text_time` addition embedding (`addition_time_embed_dim` 256 and
/// `projection_class_embeddings_input_dim` 2816 at SDXL size, read from the file), `transformer_layers_per_block`
/// per level ([1, 2, 10]), no upcast, latents of 128 (1024 px).
pub fn infer_unet_config(
    ckpt: &SingleFileCheckpoint,
    prediction_type: &str,
) -> UNet2DConditionConfig {
    let info = ckpt.unet_info();
    let mut cfg = UNet2DConditionConfig {
        in_channels: info.in_channels,
        out_channels: info.out_channels,
        block_out_channels: info.block_out_channels.clone(),
        layers_per_block: OneOrMany::One(info.layout.layers_per_block),
        use_linear_projection: info.use_linear_projection,
        ..Default::default()
    };
    let heads_of_64 = || {
        OneOrMany::Many(
            info.block_out_channels
                .iter()
                .map(|c| (c / 64).max(1))
                .collect(),
        )
    };
    match ckpt.version() {
        SdVersion::Sd1 => {}
        SdVersion::Sd2 => {
            cfg.attention_head_dim = heads_of_64();
            cfg.upcast_attention = true;
            cfg.sample_size = OneOrMany::One(if prediction_type == "v_prediction" {
                96
            } else {
                64
            });
        }
        SdVersion::Xl => {
            cfg.attention_head_dim = heads_of_64();
            cfg.sample_size = OneOrMany::One(SDXL_SAMPLE_SIZE);
            if let Some(tt) = &info.text_time {
                cfg.addition_embed_type = Some("text_time".into());
                cfg.addition_time_embed_dim = Some(tt.addition_time_embed_dim);
                cfg.projection_class_embeddings_input_dim =
                    Some(tt.projection_class_embeddings_input_dim);
                cfg.addition_embed_type_num_heads = Some(64);
            }
        }
    }
    // SDXL's config lists the depth per level; SD1.x / SD2.x keep diffusers' single 1.
    if ckpt.version() == SdVersion::Xl || info.transformer_layers_per_block.iter().any(|&d| d != 1)
    {
        cfg.transformer_layers_per_block =
            OneOrMany::Many(info.transformer_layers_per_block.clone());
    }
    cfg.down_block_types = info
        .down_block_has_attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
            .to_string()
        })
        .collect();
    cfg.up_block_types = info
        .layout
        .up_block_has_attention
        .iter()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string())
        .collect();
    if let Some(d) = info.cross_attention_dim {
        cfg.cross_attention_dim = OneOrMany::One(d);
    }
    cfg
}

/// SD1.5's VAE config adjusted to the structure read from the checkpoint; for SDXL SDXL's VAE config: latents
/// scaled by 0.13025 and 1024-px samples (`force_upcast` true, as SD1.5's: it overflows in float16).
pub fn infer_vae_config(ckpt: &SingleFileCheckpoint) -> AutoencoderKLConfig {
    let info = ckpt.vae_info();
    let xl = ckpt.version() == SdVersion::Xl;
    let base = AutoencoderKLConfig::default();
    AutoencoderKLConfig {
        scaling_factor: if xl {
            SDXL_VAE_SCALING_FACTOR
        } else {
            base.scaling_factor
        },
        sample_size: if xl {
            8 * SDXL_SAMPLE_SIZE
        } else {
            base.sample_size
        },
        in_channels: info.in_channels,
        out_channels: info.out_channels,
        down_block_types: vec!["DownEncoderBlock2D".into(); info.block_out_channels.len()],
        up_block_types: vec!["UpDecoderBlock2D".into(); info.num_up_blocks],
        block_out_channels: info.block_out_channels.clone(),
        layers_per_block: info.layers_per_block,
        latent_channels: info.latent_channels,
        ..base
    }
}

/// SD1.5's text-encoder config adjusted to the checkpoint (heads: one per 64 channels, as every CLIP text tower).
/// For SD2.x: exact GELU (OpenCLIP's `nn.GELU`, transformers' `"gelu"`), the tower's blocks but the last, and the
/// projection width of its `text_projection` `[width, proj]` (unused by the text encoder; SD 2.1: 1024 -> 512).
/// For SDXL the first text encoder (CLIP ViT-L, as SD1.x's) with the special-token ids of SDXL's config (bos 0, eos
/// 2, pad 1: pooling at the arg-max id, the first `<|endoftext|>`); the second: [`infer_text_2_config`].
pub fn infer_text_config(ckpt: &SingleFileCheckpoint) -> CLIPTextConfig {
    let info = ckpt.text_encoder_info();
    let mut cfg = CLIPTextConfig {
        vocab_size: info.vocab_size,
        hidden_size: info.hidden_size,
        intermediate_size: info.intermediate_size,
        num_hidden_layers: info.num_hidden_layers,
        max_position_embeddings: info.max_position_embeddings,
        num_attention_heads: (info.hidden_size / 64).max(1),
        projection_dim: info.hidden_size,
        ..Default::default()
    };
    match ckpt.version() {
        SdVersion::Sd1 => {}
        SdVersion::Sd2 => {
            cfg.hidden_act = CLIPActivation::Gelu;
            let projection = format!("{OPEN_CLIP_PREFIX}text_projection");
            if let Some(&[_, proj]) = ckpt.source().shape(&projection).as_deref() {
                cfg.projection_dim = proj;
            }
        }
        SdVersion::Xl => legacy_special_tokens(&mut cfg),
    }
    cfg
}

/// The special-token ids of SDXL's text-encoder configs (transformers' legacy values: bos 0, eos 2, pad 1).
fn legacy_special_tokens(cfg: &mut CLIPTextConfig) {
    cfg.bos_token_id = 0;
    cfg.eos_token_id = 2;
    cfg.pad_token_id = 1;
}

/// SDXL's `text_encoder_2` config (OpenCLIP ViT-bigG/14's text tower as a transformers
/// `CLIPTextModelWithProjection`): the sizes read from the file, every block of the tower, heads of 64 channels (20
/// for bigG), exact GELU, `projection_dim` from `text_projection` `[width, proj]` (1280), SDXL's special-token ids.
/// `None` for SD1.x / SD2.x files.
pub fn infer_text_2_config(ckpt: &SingleFileCheckpoint) -> Option<CLIPTextConfig> {
    let info = ckpt.text_encoder_2_info()?;
    let t = &info.text;
    let mut cfg = CLIPTextConfig {
        vocab_size: t.vocab_size,
        hidden_size: t.hidden_size,
        intermediate_size: t.intermediate_size,
        num_hidden_layers: t.num_hidden_layers,
        max_position_embeddings: t.max_position_embeddings,
        num_attention_heads: (t.hidden_size / 64).max(1),
        projection_dim: info.projection_dim,
        hidden_act: CLIPActivation::Gelu,
        ..Default::default()
    };
    legacy_special_tokens(&mut cfg);
    Some(cfg)
}

/// The stored tensors a builder read, under the model's names; in the stored shape, or, where `as_read(key)`, in the
/// shape the model reads (a 1x1 convolution `[C, C, 1, 1]` as the `[C, C]` matrix of a linear layer).
fn read_tensors(
    source: &dyn TensorSource,
    vb: &VarBuilder<Flex>,
    as_read: impl Fn(&str) -> bool,
) -> Result<Vec<(String, TensorData)>> {
    let mut out = Vec::new();
    for (key, shape) in vb.used_tensors() {
        let raw = source.find(&key)?.ok_or_else(|| WeightError::Missing {
            key: source.stored_key(&key),
            files: source.describe(),
            hint: String::new(),
        })?;
        let mut data = raw.data;
        if as_read(&key) {
            data.shape = shape.into();
        }
        out.push((key, data));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

/// diffusers' current name of a VAE attention tensor given under its legacy name (`query` -> `to_q`, `key` ->
/// `to_k`, `value` -> `to_v`, `proj_attn` -> `to_out.0`); other names unchanged.
pub fn current_vae_attention_name(key: &str) -> String {
    if !key.contains(".attentions.") {
        return key.to_string();
    }
    for (old, new) in [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ] {
        if key.contains(old) {
            return key.replacen(old, new, 1);
        }
    }
    key.to_string()
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| write_err(path, e))?;
    std::fs::write(path, text + "\n").map_err(|e| write_err(path, e))
}

fn copy_dir_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| write_err(to, e))?;
    let entries = std::fs::read_dir(from).map_err(|e| WeightError::Config {
        path: from.to_path_buf(),
        msg: format!("cannot read folder: {e}"),
    })?;
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_file() {
            let dest = to.join(entry.file_name());
            std::fs::copy(&p, &dest).map_err(|e| write_err(&dest, e))?;
        }
    }
    Ok(())
}

/// The scheduler config SD1.5 ships (PNDM in the original; DDIM here, the sampler AlignProp uses, with the same
/// betas and offsets) with the given `prediction_type`: SD 2.x's is the same DDIM config (SD 2.1 ships DDIM with
/// these values and `v_prediction`).
fn ddim_scheduler_config(prediction_type: &str) -> serde_json::Value {
    serde_json::json!({
        "_class_name": "DDIMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "trained_betas": null,
        "timestep_spacing": "leading"
    })
}

/// SDXL base 1.0's `scheduler/scheduler_config.json` (`EulerDiscreteScheduler`; AlignProp samples with DDIM built
/// from the same betas and offsets) with the given `prediction_type` (SDXL: epsilon).
fn sdxl_scheduler_config(prediction_type: &str) -> serde_json::Value {
    serde_json::json!({
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type,
        "sample_max_value": 1.0,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null,
        "use_karras_sigmas": false
    })
}

/// The bundled SD1.5 tokenizer files, as they are (SD1.x, SDXL's `tokenizer/`) or, when `pad_with_exclamation_mark`
/// (SD2.x, SDXL's `tokenizer_2/`: the same BPE, which OpenCLIP shares), `vocab.json` + `merges.txt` with
/// `pad_token` `"!"` in `tokenizer_config.json` and `special_tokens_map.json`, and no `tokenizer.json` (as SD 2.1's
/// and SDXL's own folders).
fn bundled_tokenizer_files(pad_with_exclamation_mark: bool) -> Vec<(&'static str, Vec<u8>)> {
    SD15_TOKENIZER_FILES
        .iter()
        .filter_map(|&(name, bytes)| match pad_with_exclamation_mark {
            false => Some((name, bytes.to_vec())),
            true => match name {
                "tokenizer.json" => None,
                "tokenizer_config.json" | "special_tokens_map.json" => {
                    Some((name, with_pad_token(bytes, "!")))
                }
                _ => Some((name, bytes.to_vec())),
            },
        })
        .collect()
}

/// A tokenizer JSON file (`tokenizer_config.json`, `special_tokens_map.json`) with its `pad_token` set to `pad`.
fn with_pad_token(json: &[u8], pad: &str) -> Vec<u8> {
    let mut value: serde_json::Value =
        serde_json::from_slice(json).expect("the bundled tokenizer files are valid JSON");
    value["pad_token"] = serde_json::Value::String(pad.to_string());
    let text = serde_json::to_string_pretty(&value).expect("JSON values serialize");
    (text + "\n").into_bytes()
}

/// Checks a `prediction_type` name against [`PREDICTION_TYPES`].
fn check_prediction_type(checkpoint: &Path, p: &str) -> Result<()> {
    if PREDICTION_TYPES.contains(&p) {
        Ok(())
    } else {
        Err(WeightError::Config {
            path: checkpoint.to_path_buf(),
            msg: format!(
                "prediction type '{p}': expected one of {}",
                PREDICTION_TYPES.join(", ")
            ),
        })
    }
}

/// `dir/scheduler_config.json` with its `prediction_type` set to `p`.
fn set_prediction_type(dir: &Path, p: &str) -> Result<()> {
    let file = dir.join("scheduler_config.json");
    let mut value: serde_json::Value = read_json(&file)?;
    value["prediction_type"] = serde_json::Value::String(p.to_string());
    write_json(&file, &value)
}

fn model_index(
    version: SdVersion,
    force_zeros_for_empty_prompt: bool,
    scheduler: &str,
) -> serde_json::Value {
    if version == SdVersion::Xl {
        return serde_json::json!({
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
            "scheduler": ["diffusers", scheduler],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        });
    }
    serde_json::json!({
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    })
}

/// Converts the single-file checkpoint `checkpoint` into the diffusers folder `out`.
///
/// Every network is built once through the loaders (on the CPU, in float32) to learn and check its tensors, then
/// the tensors are written from the file in their stored dtype: `unet/diffusion_pytorch_model.safetensors`,
/// `vae/diffusion_pytorch_model.safetensors`, `text_encoder/model.safetensors` (SDXL: and
/// `text_encoder_2/model.safetensors`), each with its `config.json`.
pub fn single_file_to_diffusers(
    checkpoint: impl AsRef<Path>,
    out: impl AsRef<Path>,
    options: &ConvertOptions,
) -> Result<ConvertReport> {
    let (checkpoint, out) = (checkpoint.as_ref(), out.as_ref());
    if out.is_file() {
        return Err(write_err(out, "the output is a file, expected a folder"));
    }
    if out.is_dir()
        && !options.overwrite
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    {
        return Err(write_err(
            out,
            "the output folder exists and is not empty (choose another, or allow overwriting)",
        ));
    }
    if let Some(p) = &options.prediction_type {
        check_prediction_type(checkpoint, p)?;
    }
    let ckpt = SingleFileCheckpoint::open(checkpoint)?;
    let version = ckpt.version();
    let xl = version == SdVersion::Xl;
    let prediction_type = options
        .prediction_type
        .as_deref()
        .unwrap_or(default_prediction_type(version));
    let (unet_cfg, vae_cfg, text_cfg, text_2_cfg, configs) = match &options.configs_from {
        Some(dir) => (
            read_json::<UNet2DConditionConfig>(&dir.join("unet/config.json"))?,
            read_json::<AutoencoderKLConfig>(&dir.join("vae/config.json"))?,
            read_json::<CLIPTextConfig>(&dir.join("text_encoder/config.json"))?,
            if xl {
                Some(read_json::<CLIPTextConfig>(
                    &dir.join("text_encoder_2/config.json"),
                )?)
            } else {
                None
            },
            format!("from {}", dir.display()),
        ),
        None => (
            infer_unet_config(&ckpt, prediction_type),
            infer_vae_config(&ckpt),
            infer_text_config(&ckpt),
            infer_text_2_config(&ckpt),
            match version {
                SdVersion::Sd1 => "SD1.5's, adjusted to the checkpoint's tensor shapes".to_string(),
                SdVersion::Sd2 => format!(
                    "SD 2.1's (an SD2.x checkpoint: OpenCLIP text encoder), adjusted to the checkpoint's tensor \
                     shapes; prediction type {prediction_type}"
                ),
                SdVersion::Xl => format!(
                    "SDXL base 1.0's (an SDXL checkpoint: CLIP ViT-L + OpenCLIP bigG text encoders), adjusted to \
                     the checkpoint's tensor shapes; prediction type {prediction_type}"
                ),
            },
        ),
    };
    let device = Default::default();
    let dtype = DType::F32;
    let mut report = ConvertReport {
        tensors: BTreeMap::new(),
        unused_keys: Vec::new(),
        configs,
    };
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut used_stored = std::collections::BTreeSet::new();

    // One network at a time, so only one is in memory.
    let mut components: Vec<(&str, &str)> = vec![
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ];
    if xl {
        components.push(("text_encoder_2", "model.safetensors"));
    }
    for (component, file) in components {
        let source = || -> Box<dyn TensorSource> {
            match component {
                "unet" => Box::new(ckpt.unet()),
                "vae" => Box::new(ckpt.vae()),
                "text_encoder_2" => Box::new(
                    ckpt.text_encoder_2()
                        .expect("an SDXL file has a second text encoder"),
                ),
                _ => Box::new(ckpt.text_encoder()),
            }
        };
        let vb = VarBuilder::<Flex>::from_source(source(), &device, dtype);
        match component {
            "unet" => {
                unet_cfg.validate().map_err(|msg| WeightError::Config {
                    path: checkpoint.to_path_buf(),
                    msg: format!("UNet config: {msg}"),
                })?;
                check_unet_family(checkpoint, &ckpt, &unet_cfg)?;
                drop(UNet2DConditionModel::new(&unet_cfg, &vb)?);
            }
            "vae" => drop(AutoencoderKL::new(&vae_cfg, &vb)?),
            "text_encoder_2" => {
                let cfg = text_2_cfg
                    .as_ref()
                    .expect("an SDXL conversion has a text_encoder_2 config");
                drop(CLIPTextModelWithProjection::new(cfg, &vb)?)
            }
            _ => drop(CLIPTextModel::new(&text_cfg, &vb)?),
        }
        let source = source();
        // diffusers keeps SD1's 1x1-convolution projections as convolutions, except the VAE's mid-block attention,
        // which is made of linear layers (the original stores it as 1x1 convolutions).
        let vae_attention = |k: &str| component == "vae" && k.contains(".attentions.");
        let mut tensors = read_tensors(source.as_ref(), &vb, vae_attention)?;
        for (key, _) in &tensors {
            used_stored.insert(source.stored_key(key));
        }
        if component == "vae" {
            // The loader accepts the legacy attention names too; write the current ones.
            for (key, _) in &mut tensors {
                *key = current_vae_attention_name(key);
            }
            tensors.sort_by(|a, b| a.0.cmp(&b.0));
        }
        let dir = out.join(component);
        std::fs::create_dir_all(&dir).map_err(|e| write_err(&dir, e))?;
        write_safetensors(&dir.join(file), &tensors, &metadata)?;
        match component {
            "unet" => write_json(&dir.join("config.json"), &unet_cfg)?,
            "vae" => write_json(&dir.join("config.json"), &vae_cfg)?,
            "text_encoder_2" => write_json(&dir.join("config.json"), &text_2_cfg)?,
            _ => write_json(&dir.join("config.json"), &text_cfg)?,
        }
        report.tensors.insert(component.to_string(), tensors.len());
    }

    // Tokenizers, scheduler, model index.
    let from_configs = |sub: &str| {
        options
            .configs_from
            .as_ref()
            .map(|d| d.join(sub))
            .filter(|d| d.is_dir())
    };
    let mut tokenizers = vec![(
        "tokenizer",
        options
            .tokenizer_from
            .clone()
            .or_else(|| from_configs("tokenizer")),
        version == SdVersion::Sd2,
    )];
    if xl {
        tokenizers.push((
            "tokenizer_2",
            options
                .tokenizer_2_from
                .clone()
                .or_else(|| from_configs("tokenizer_2")),
            true,
        ));
    }
    for (sub, from, pad_with_exclamation_mark) in tokenizers {
        let tok_dir = out.join(sub);
        match from {
            Some(from) => copy_dir_files(&from, &tok_dir)?,
            None => {
                std::fs::create_dir_all(&tok_dir).map_err(|e| write_err(&tok_dir, e))?;
                for (name, bytes) in bundled_tokenizer_files(pad_with_exclamation_mark) {
                    let p = tok_dir.join(name);
                    std::fs::write(&p, bytes).map_err(|e| write_err(&p, e))?;
                }
            }
        }
    }
    let sched_dir = out.join("scheduler");
    match from_configs("scheduler") {
        Some(from) => copy_dir_files(&from, &sched_dir)?,
        None => {
            std::fs::create_dir_all(&sched_dir).map_err(|e| write_err(&sched_dir, e))?;
            write_json(
                &sched_dir.join("scheduler_config.json"),
                &if xl {
                    sdxl_scheduler_config(prediction_type)
                } else {
                    ddim_scheduler_config(prediction_type)
                },
            )?;
        }
    }
    if let Some(p) = &options.prediction_type {
        set_prediction_type(&sched_dir, p)?;
    }
    // SDXL: the scheduler class of the config written, and `force_zeros_for_empty_prompt` from the configs folder's
    // model index when it has one (SDXL base: true).
    let (mut scheduler_class, mut force_zeros) = ("DDIMScheduler".to_string(), true);
    if xl {
        let sched: serde_json::Value = read_json(sched_dir.join("scheduler_config.json"))?;
        scheduler_class = sched["_class_name"]
            .as_str()
            .unwrap_or("EulerDiscreteScheduler")
            .to_string();
        if let Some(index) = options
            .configs_from
            .as_ref()
            .map(|d| d.join("model_index.json"))
            .filter(|f| f.is_file())
        {
            let index: serde_json::Value = read_json(&index)?;
            force_zeros = index["force_zeros_for_empty_prompt"]
                .as_bool()
                .unwrap_or(true);
        }
    }
    write_json(
        &out.join("model_index.json"),
        &model_index(version, force_zeros, &scheduler_class),
    )?;

    report.unused_keys = ckpt
        .source()
        .keys()
        .into_iter()
        .filter(|k| !used_stored.contains(k) && !ckpt.is_ignorable(k))
        .collect();
    Ok(report)
}

/// An SDXL file needs a UNet config with the `text_time` addition embedding, an SD1.x / SD2.x file one without: a
/// `configs_from` folder of the other family is one clear error instead of a missing-tensor one.
fn check_unet_family(
    checkpoint: &Path,
    ckpt: &SingleFileCheckpoint,
    cfg: &UNet2DConditionConfig,
) -> Result<()> {
    let xl = ckpt.version() == SdVersion::Xl;
    let text_time = cfg.addition_embed_type.as_deref() == Some("text_time");
    if xl == text_time {
        return Ok(());
    }
    Err(WeightError::Config {
        path: checkpoint.to_path_buf(),
        msg: if xl {
            "an SDXL checkpoint, but the UNet config has no `addition_embed_type` \"text_time\" (give the configs of \
             an SDXL model)"
                .into()
        } else {
            format!(
                "an SD{} checkpoint, but the UNet config has `addition_embed_type` \"text_time\" (SDXL's; give the \
                 configs of an SD1.x / SD2.x model)",
                if ckpt.version() == SdVersion::Sd1 {
                    "1.x"
                } else {
                    "2.x"
                }
            )
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alignprop_testing::{tiny_sd, tiny_sd2, tiny_sdxl};

    /// What the shapes of the tiny single file tell agrees with the tiny model's own configs.
    #[test]
    fn inferred_configs_match_the_tiny_model() {
        let ckpt = SingleFileCheckpoint::open(&tiny_sd().join("single_file/tiny-sd15.safetensors"))
            .unwrap();
        let unet: UNet2DConditionConfig = read_json(&tiny_sd().join("unet/config.json")).unwrap();
        let got = infer_unet_config(&ckpt, "epsilon");
        assert_eq!(got.block_out_channels, unet.block_out_channels);
        assert_eq!(got.down_block_types, unet.down_block_types);
        assert_eq!(got.up_block_types, unet.up_block_types);
        assert_eq!(got.in_channels, unet.in_channels);
        assert_eq!(got.layers_per_block, unet.layers_per_block);
        assert_eq!(got.cross_attention_dim, unet.cross_attention_dim);
        let vae: AutoencoderKLConfig = read_json(&tiny_sd().join("vae/config.json")).unwrap();
        let got = infer_vae_config(&ckpt);
        assert_eq!(
            (
                got.block_out_channels,
                got.layers_per_block,
                got.latent_channels
            ),
            (
                vae.block_out_channels,
                vae.layers_per_block,
                vae.latent_channels
            )
        );
        let text: CLIPTextConfig = read_json(&tiny_sd().join("text_encoder/config.json")).unwrap();
        let got = infer_text_config(&ckpt);
        assert_eq!(
            (
                got.hidden_size,
                got.intermediate_size,
                got.num_hidden_layers,
                got.vocab_size
            ),
            (
                text.hidden_size,
                text.intermediate_size,
                text.num_hidden_layers,
                text.vocab_size
            )
        );
    }

    /// Converted with the tiny configs, every tensor of the diffusers fixture is written with the same bytes and
    /// shape, and nothing else.
    #[test]
    fn conversion_reproduces_the_diffusers_files() {
        let out = std::env::temp_dir().join(format!("alignprop-convert-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let opts = ConvertOptions {
            configs_from: Some(tiny_sd()),
            ..Default::default()
        };
        let report = single_file_to_diffusers(
            &tiny_sd().join("single_file/tiny-sd15.safetensors"),
            &out,
            &opts,
        )
        .unwrap();
        assert!(report.unused_keys.is_empty(), "{:?}", report.unused_keys);
        assert_same_component_files(&out, &tiny_sd(), &report);
        // A second run into the same folder is refused unless overwriting.
        let again = single_file_to_diffusers(
            &tiny_sd().join("single_file/tiny-sd15.safetensors"),
            &out,
            &opts,
        );
        assert!(again.unwrap_err().to_string().contains("not empty"));
        std::fs::remove_dir_all(&out).ok();
    }

    fn sd2_file() -> PathBuf {
        tiny_sd2().join("single_file/tiny-sd21.safetensors")
    }

    /// Every tensor of the diffusers files of `fixture` (SDXL: `text_encoder_2/` too) is in `out` with the same
    /// bytes and shape, and nothing else.
    fn assert_same_component_files(out: &Path, fixture: &Path, report: &ConvertReport) {
        let mut components = vec![
            ("unet", "diffusion_pytorch_model.safetensors"),
            ("vae", "diffusion_pytorch_model.safetensors"),
            ("text_encoder", "model.safetensors"),
        ];
        if fixture.join("text_encoder_2").is_dir() {
            components.push(("text_encoder_2", "model.safetensors"));
        }
        assert_eq!(
            report.tensors.len(),
            components.len(),
            "{:?}",
            report.tensors
        );
        for (component, file) in components {
            let ours =
                alignprop_io::weights::SafetensorsSource::open(&[out.join(component).join(file)])
                    .unwrap();
            let theirs = alignprop_io::weights::SafetensorsSource::open(&[fixture
                .join(component)
                .join(file)])
            .unwrap();
            let tk: Vec<String> = theirs
                .keys()
                .into_iter()
                .filter(|k| !k.ends_with("position_ids"))
                .collect();
            assert_eq!(ours.keys(), tk, "{component}: key sets differ");
            assert_eq!(report.tensors[component], tk.len());
            for k in tk {
                let (a, b) = (
                    ours.find(&k).unwrap().unwrap(),
                    theirs.find(&k).unwrap().unwrap(),
                );
                assert_eq!(a.shape, b.shape, "{component} {k}");
                assert_eq!(a.data.dtype, b.data.dtype, "{component} {k}");
                assert_eq!(a.data.as_bytes(), b.data.as_bytes(), "{component} {k}");
            }
        }
    }

    /// The SD2 file is told apart by its OpenCLIP tower; what its shapes tell agrees with the tiny SD2 configs
    /// (the heads, one per 64 channels, are what a real SD2 has, not the tiny model's).
    #[test]
    fn sd2_inferred_configs_match_the_tiny_model() {
        let ckpt = SingleFileCheckpoint::open(sd2_file()).unwrap();
        assert_eq!(ckpt.version(), SdVersion::Sd2);
        let unet: UNet2DConditionConfig = read_json(tiny_sd2().join("unet/config.json")).unwrap();
        let got = infer_unet_config(&ckpt, "v_prediction");
        assert_eq!(got.block_out_channels, unet.block_out_channels);
        assert_eq!(got.down_block_types, unet.down_block_types);
        assert_eq!(got.up_block_types, unet.up_block_types);
        assert_eq!(got.layers_per_block, unet.layers_per_block);
        assert_eq!(got.cross_attention_dim, unet.cross_attention_dim);
        assert!(got.use_linear_projection && got.upcast_attention);
        assert_eq!(got.attention_head_dim, OneOrMany::Many(vec![1, 1, 1]));
        assert_eq!(got.sample_size, OneOrMany::One(96));
        assert_eq!(
            infer_unet_config(&ckpt, "epsilon").sample_size,
            OneOrMany::One(64)
        );
        let text: CLIPTextConfig = read_json(tiny_sd2().join("text_encoder/config.json")).unwrap();
        let got = infer_text_config(&ckpt);
        assert_eq!(
            (
                got.hidden_size,
                got.intermediate_size,
                got.num_hidden_layers,
                got.vocab_size,
                got.max_position_embeddings,
                got.hidden_act,
                got.projection_dim,
            ),
            (
                text.hidden_size,
                text.intermediate_size,
                text.num_hidden_layers,
                text.vocab_size,
                text.max_position_embeddings,
                CLIPActivation::Gelu,
                text.projection_dim,
            )
        );
        // SD 2.1's own sizes: 1024 wide -> 16 heads; [320, 640, 1280, 1280] -> [5, 10, 20, 20].
        let sd21 = [320usize, 640, 1280, 1280].map(|c| (c / 64).max(1));
        assert_eq!(sd21, [5, 10, 20, 20]);
        let sd1 = SingleFileCheckpoint::open(tiny_sd().join("single_file/tiny-sd15.safetensors"))
            .unwrap();
        assert_eq!(sd1.version(), SdVersion::Sd1);
        assert_eq!(
            infer_text_config(&sd1).hidden_act,
            CLIPActivation::QuickGelu
        );
        assert!(!infer_unet_config(&sd1, "epsilon").upcast_attention);
    }

    /// With the tiny SD2 folder's configs, the conversion writes exactly the diffusers files (the text encoder's
    /// q/k/v cut out of OpenCLIP's fused in_proj, the last block left out); the file's unused tensors (last block,
    /// text_projection, logit_scale, DDPM buffers) are no surprise.
    #[test]
    fn sd2_conversion_reproduces_the_diffusers_files() {
        let out =
            std::env::temp_dir().join(format!("alignprop-convert-sd2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let opts = ConvertOptions {
            configs_from: Some(tiny_sd2()),
            ..Default::default()
        };
        let report = single_file_to_diffusers(sd2_file(), &out, &opts).unwrap();
        assert!(report.unused_keys.is_empty(), "{:?}", report.unused_keys);
        assert_same_component_files(&out, &tiny_sd2(), &report);
        for f in [
            "scheduler/scheduler_config.json",
            "tokenizer/special_tokens_map.json",
        ] {
            assert_eq!(
                std::fs::read(out.join(f)).unwrap(),
                std::fs::read(tiny_sd2().join(f)).unwrap(),
                "{f}"
            );
        }
        std::fs::remove_dir_all(&out).ok();
    }

    /// A configs folder with the three networks' config.json only (the tiny model's GroupNorm groups and heads are
    /// not SD's, so the shapes alone cannot build it): the scheduler and tokenizer are the SD2 defaults.
    fn network_configs_only() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("alignprop-sd2-configs-{}", std::process::id()));
        for c in ["unet", "vae", "text_encoder"] {
            std::fs::create_dir_all(dir.join(c)).unwrap();
            std::fs::copy(
                tiny_sd2().join(c).join("config.json"),
                dir.join(c).join("config.json"),
            )
            .unwrap();
        }
        dir
    }

    /// SD2 defaults: v-prediction DDIM, SD2's "!" padding (no tokenizer.json); the prediction type can be given
    /// instead, and a wrong one is refused before anything is written.
    #[test]
    fn sd2_conversion_defaults_and_prediction_type() {
        let out =
            std::env::temp_dir().join(format!("alignprop-convert-sd2d-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let configs = network_configs_only();
        let opts = ConvertOptions {
            configs_from: Some(configs.clone()),
            ..Default::default()
        };
        let report = single_file_to_diffusers(sd2_file(), &out, &opts).unwrap();
        assert!(report.unused_keys.is_empty(), "{:?}", report.unused_keys);
        assert_same_component_files(&out, &tiny_sd2(), &report);
        let sched: serde_json::Value =
            read_json(out.join("scheduler/scheduler_config.json")).unwrap();
        assert_eq!(sched["prediction_type"], "v_prediction");
        assert!(!out.join("tokenizer/tokenizer.json").exists());
        for f in ["tokenizer_config.json", "special_tokens_map.json"] {
            let v: serde_json::Value = read_json(out.join("tokenizer").join(f)).unwrap();
            assert_eq!(v["pad_token"], "!", "{f}");
        }
        let tok = crate::tokenizer::CLIPTokenizer::from_folder(out.join("tokenizer")).unwrap();
        assert_eq!(tok.pad_id(), 0);
        let text: CLIPTextConfig = read_json(out.join("text_encoder/config.json")).unwrap();
        assert_eq!(
            (text.num_hidden_layers, text.hidden_act),
            (2, CLIPActivation::Gelu)
        );

        let opts = ConvertOptions {
            configs_from: Some(configs.clone()),
            prediction_type: Some("epsilon".into()),
            overwrite: true,
            ..Default::default()
        };
        single_file_to_diffusers(sd2_file(), &out, &opts).unwrap();
        let sched: serde_json::Value =
            read_json(out.join("scheduler/scheduler_config.json")).unwrap();
        assert_eq!(sched["prediction_type"], "epsilon");
        let bad = ConvertOptions {
            prediction_type: Some("x0".into()),
            overwrite: true,
            ..Default::default()
        };
        let msg = single_file_to_diffusers(sd2_file(), &out, &bad)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("tiny-sd21.safetensors")
                && msg.contains("'x0'")
                && msg.contains("v_prediction"),
            "{msg}"
        );
        // Without any configs the tiny file cannot be built with SD's 32 GroupNorm groups: one error line.
        let msg = single_file_to_diffusers(
            sd2_file(),
            &out,
            &ConvertOptions {
                overwrite: true,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("norm_num_groups"), "{msg}");
        std::fs::remove_dir_all(&out).ok();
        std::fs::remove_dir_all(&configs).ok();
    }

    // ------------------------------------------------------------------------------------------------------ SDXL

    fn sdxl_file() -> PathBuf {
        tiny_sdxl().join("single_file/tiny-sdxl.safetensors")
    }

    /// A fresh scratch folder under the system temporary directory, unique to this process and `name`.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("alignprop-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// A JSON file without diffusers' / transformers' version stamps.
    fn json_without_versions(path: &Path) -> serde_json::Value {
        let mut v: serde_json::Value = read_json(path).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.retain(|k, _| !k.ends_with("_version"));
        v
    }

    /// What the shapes of the SDXL file tell agrees with the tiny SDXL configs: the transformer depth per level
    /// ([1, 1, 2], the mid block's 2 = the last), the `text_time` embedding (60 = 12 pooled + 6 x 8), the second
    /// encoder (every one of the 10 blocks, projection 12); the values only SDXL's own sizes show (heads of 64
    /// channels, 1024 px, 0.13025) are SDXL base's.
    #[test]
    fn sdxl_inferred_configs_match_the_tiny_model() {
        let ckpt = SingleFileCheckpoint::open(sdxl_file()).unwrap();
        assert_eq!(ckpt.version(), SdVersion::Xl);
        assert!(ckpt.unknown_keys().is_empty(), "{:?}", ckpt.unknown_keys());
        let unet: UNet2DConditionConfig = read_json(tiny_sdxl().join("unet/config.json")).unwrap();
        let got = infer_unet_config(&ckpt, "epsilon");
        assert_eq!(got.block_out_channels, unet.block_out_channels);
        assert_eq!(got.down_block_types, unet.down_block_types);
        assert_eq!(got.up_block_types, unet.up_block_types);
        assert_eq!(got.layers_per_block, unet.layers_per_block);
        assert_eq!(got.cross_attention_dim, unet.cross_attention_dim);
        assert_eq!(got.use_linear_projection, unet.use_linear_projection);
        assert_eq!(got.upcast_attention, unet.upcast_attention);
        assert_eq!(
            got.transformer_layers_per_block,
            OneOrMany::Many(vec![1, 1, 2])
        );
        assert_eq!(
            got.transformer_layers_per_block,
            unet.transformer_layers_per_block
        );
        assert_eq!(got.addition_embed_type.as_deref(), Some("text_time"));
        assert_eq!(got.addition_time_embed_dim, unet.addition_time_embed_dim);
        assert_eq!(got.addition_time_embed_dim, Some(8));
        assert_eq!(got.projection_class_embeddings_input_dim, Some(60));
        assert_eq!(got.addition_embed_type_num_heads, Some(64));
        // Heads of 64 channels (tiny widths: 1 each; SDXL [320, 640, 1280] -> [5, 10, 20]), 1024 px.
        assert_eq!(got.attention_head_dim, OneOrMany::Many(vec![1, 1, 1]));
        assert_eq!([320usize, 640, 1280].map(|c| c / 64), [5, 10, 20]);
        assert_eq!(got.sample_size, OneOrMany::One(128));
        // Valid as a config (with the tiny GroupNorm groups, which the shapes cannot tell).
        let mut tiny_groups = got.clone();
        tiny_groups.norm_num_groups = 4;
        tiny_groups.validate().unwrap();

        let vae: AutoencoderKLConfig = read_json(tiny_sdxl().join("vae/config.json")).unwrap();
        let got = infer_vae_config(&ckpt);
        assert_eq!(
            (
                &got.block_out_channels,
                got.layers_per_block,
                got.scaling_factor,
                got.force_upcast
            ),
            (
                &vae.block_out_channels,
                vae.layers_per_block,
                vae.scaling_factor,
                vae.force_upcast
            )
        );
        assert_eq!((got.scaling_factor, got.sample_size), (0.13025, 1024));

        let key = |c: &CLIPTextConfig| {
            (
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers,
                c.vocab_size,
                c.max_position_embeddings,
                c.hidden_act,
                c.bos_token_id,
                c.eos_token_id,
                c.pad_token_id,
            )
        };
        let text: CLIPTextConfig = read_json(tiny_sdxl().join("text_encoder/config.json")).unwrap();
        assert_eq!(key(&infer_text_config(&ckpt)), key(&text));
        let text_2: CLIPTextConfig =
            read_json(tiny_sdxl().join("text_encoder_2/config.json")).unwrap();
        let got = infer_text_2_config(&ckpt).unwrap();
        assert_eq!(key(&got), key(&text_2));
        assert_eq!((got.projection_dim, got.num_hidden_layers), (12, 10));
        assert_eq!(got.hidden_act, CLIPActivation::Gelu);
        // SD1 / SD2 files have no second encoder.
        let sd2 = SingleFileCheckpoint::open(sd2_file()).unwrap();
        assert!(infer_text_2_config(&sd2).is_none() && sd2.text_encoder_2().is_none());
        assert_eq!(
            infer_unet_config(&sd2, "v_prediction").transformer_layers_per_block,
            OneOrMany::One(1)
        );
    }

    /// With the tiny SDXL folder's configs (as diffusers' `from_single_file(config=folder)`) the conversion writes
    /// exactly the diffusers files of the four networks (the bigG tower's q/k/v cut from the fused in_proj, every
    /// block kept, `text_projection` transposed), nothing of the file is left unused (position_ids and logit_scale
    /// are no surprise), and the folder's configs, scheduler, tokenizers and model index come through.
    #[test]
    fn sdxl_conversion_reproduces_the_diffusers_files() {
        let out = scratch("convert-sdxl");
        let opts = ConvertOptions {
            configs_from: Some(tiny_sdxl()),
            ..Default::default()
        };
        let report = single_file_to_diffusers(sdxl_file(), &out, &opts).unwrap();
        assert!(report.unused_keys.is_empty(), "{:?}", report.unused_keys);
        assert_same_component_files(&out, &tiny_sdxl(), &report);
        assert_eq!(report.tensors["text_encoder_2"], 165);
        for f in [
            "scheduler/scheduler_config.json",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer_2/special_tokens_map.json",
            "tokenizer_2/tokenizer_config.json",
            "tokenizer_2/vocab.json",
        ] {
            assert_eq!(
                std::fs::read(out.join(f)).unwrap(),
                std::fs::read(tiny_sdxl().join(f)).unwrap(),
                "{f}"
            );
        }
        let unet =
            |d: &Path| read_json::<UNet2DConditionConfig>(d.join("unet/config.json")).unwrap();
        assert_eq!(unet(&out), unet(&tiny_sdxl()));
        for c in ["text_encoder", "text_encoder_2"] {
            let v = |d: &Path| {
                let cfg: CLIPTextConfig = read_json(d.join(c).join("config.json")).unwrap();
                serde_json::to_value(cfg).unwrap()
            };
            assert_eq!(v(&out), v(&tiny_sdxl()), "{c}");
        }
        assert_eq!(
            json_without_versions(&out.join("model_index.json")),
            json_without_versions(&tiny_sdxl().join("model_index.json"))
        );
        std::fs::remove_dir_all(&out).ok();
    }

    /// SDXL defaults with only the networks' config.json: SDXL base's Euler scheduler config (epsilon), the
    /// CLIP tokenizer padding with `<|endoftext|>` and `tokenizer_2` padding with `!` (the same settings as the
    /// fixture's files), SDXL's model index; a wrong-family configs folder, or none at the tiny size, is one error.
    #[test]
    fn sdxl_conversion_defaults() {
        let out = scratch("convert-sdxl-defaults");
        let configs = scratch("sdxl-configs");
        alignprop_testing::copy_sdxl_network_configs(&tiny_sdxl(), &configs);
        let opts = ConvertOptions {
            configs_from: Some(configs.clone()),
            ..Default::default()
        };
        let report = single_file_to_diffusers(sdxl_file(), &out, &opts).unwrap();
        assert!(report.unused_keys.is_empty(), "{:?}", report.unused_keys);
        assert_same_component_files(&out, &tiny_sdxl(), &report);
        for f in ["scheduler/scheduler_config.json", "model_index.json"] {
            assert_eq!(
                json_without_versions(&out.join(f)),
                json_without_versions(&tiny_sdxl().join(f)),
                "{f}"
            );
        }
        for tok in ["tokenizer", "tokenizer_2"] {
            for f in ["special_tokens_map.json", "tokenizer_config.json"] {
                let (ours, theirs): (serde_json::Value, serde_json::Value) = (
                    read_json(out.join(tok).join(f)).unwrap(),
                    read_json(tiny_sdxl().join(tok).join(f)).unwrap(),
                );
                assert_eq!(ours["pad_token"], theirs["pad_token"], "{tok}/{f}");
            }
            for f in ["vocab.json", "merges.txt"] {
                assert_eq!(
                    std::fs::read(out.join(tok).join(f)).unwrap(),
                    std::fs::read(tiny_sdxl().join(tok).join(f)).unwrap(),
                    "{tok}/{f}"
                );
            }
        }
        let pads = ["tokenizer", "tokenizer_2"].map(|t| {
            crate::tokenizer::CLIPTokenizer::from_folder(out.join(t))
                .unwrap()
                .pad_id()
        });
        assert_eq!(pads, [49407, 0]);
        assert!(!out.join("tokenizer_2/tokenizer.json").exists());

        // --prediction-type goes into the Euler config.
        let opts = ConvertOptions {
            configs_from: Some(configs.clone()),
            prediction_type: Some("v_prediction".into()),
            overwrite: true,
            ..Default::default()
        };
        single_file_to_diffusers(sdxl_file(), &out, &opts).unwrap();
        let sched: serde_json::Value =
            read_json(out.join("scheduler/scheduler_config.json")).unwrap();
        assert_eq!(
            (&sched["prediction_type"], &sched["_class_name"]),
            (
                &serde_json::json!("v_prediction"),
                &serde_json::json!("EulerDiscreteScheduler")
            )
        );

        // Configs of the other family: one error naming the file (the checkpoint, or the missing config) and what
        // is wrong.
        let expect_err = |file: PathBuf, configs: PathBuf, names: &str, needle: &str| {
            let opts = ConvertOptions {
                configs_from: Some(configs),
                overwrite: true,
                ..Default::default()
            };
            let msg = single_file_to_diffusers(&file, &out, &opts)
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(names) && msg.contains(needle),
                "'{names}', '{needle}' in: {msg}"
            );
        };
        expect_err(
            sdxl_file(),
            tiny_sd2(),
            "text_encoder_2/config.json",
            "cannot read",
        );
        let sd2_like = scratch("sdxl-with-sd2-configs");
        copy_dir_files(
            &configs.join("text_encoder_2"),
            &sd2_like.join("text_encoder_2"),
        )
        .unwrap();
        for c in ["unet", "vae", "text_encoder"] {
            copy_dir_files(&tiny_sd2().join(c), &sd2_like.join(c)).unwrap();
        }
        expect_err(
            sdxl_file(),
            sd2_like.clone(),
            "tiny-sdxl.safetensors",
            "an SDXL checkpoint",
        );
        expect_err(
            sd2_file(),
            configs.clone(),
            "tiny-sd21.safetensors",
            "\"text_time\" (SDXL's",
        );
        // No configs: SD's 32 GroupNorm groups do not fit the tiny widths.
        let msg = single_file_to_diffusers(
            sdxl_file(),
            &out,
            &ConvertOptions {
                overwrite: true,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("norm_num_groups"), "{msg}");
        for d in [&out, &configs, &sd2_like] {
            std::fs::remove_dir_all(d).ok();
        }
    }
}
