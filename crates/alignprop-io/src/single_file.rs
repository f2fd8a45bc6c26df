//! The original single-file Stable Diffusion checkpoint layouts (CompVis / Stability-AI `ldm` for SD 1.x / 2.x, as
//! in `v1-5-pruned-emaonly.safetensors` and `v2-1_768-ema-pruned.safetensors`; Stability-AI generative-models `sgm`
//! for SDXL, as in `sd_xl_base_1.0.safetensors`), read through the diffusers tensor names the models ask for.
//!
//! One file holds all networks under different prefixes and, for the UNet, the VAE and the OpenCLIP towers,
//! different module names than diffusers / transformers use:
//!
//! | network | prefix | naming |
//! |---|---|---|
//! | UNet | `model.diffusion_model.` | `input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`, `time_embed`, `out`; SDXL: `label_emb.0.{0,2}` (diffusers' `add_embedding.linear_{1,2}`), several `transformer_blocks.i` per block |
//! | VAE | `first_stage_model.` | `encoder.down.i.block.j`, `mid.block_1`, `mid.attn_1.{q,k,v,proj_out}`, `decoder.up.i` (reversed) |
//! | SD1.x CLIP text encoder | `cond_stage_model.transformer.` | transformers' `text_model.*` names |
//! | SD2.x OpenCLIP text tower | `cond_stage_model.model.` | open_clip names: `token_embedding`, `positional_embedding`, `transformer.resblocks.i.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final` |
//! | SDXL CLIP text encoder (`text_encoder`) | `conditioner.embedders.0.transformer.` | transformers' `text_model.*` names |
//! | SDXL OpenCLIP bigG text tower (`text_encoder_2`) | `conditioner.embedders.1.model.` | open_clip names as SD2.x, plus `text_projection` `[width, proj]` (the transpose of transformers' `text_projection.weight`) |
//!
//! The text encoders tell the generations apart ([`SdVersion`]). SD2 conditions on the OpenCLIP tower's
//! penultimate block (`FrozenOpenCLIPEmbedder(layer="penultimate")`), so its diffusers text encoder is every block
//! but the last, and the file's last block is not used (as diffusers' `convert_open_clip_checkpoint`). SDXL uses
//! every block of its bigG tower (the penultimate output for the context, the last one, `ln_final` and
//! `text_projection` for the pooled embedding), so its `text_encoder_2` (a transformers
//! `CLIPTextModelWithProjection`) keeps them all, as diffusers does for the `conditioner.embedders.1.model.` prefix.
//! The SDXL refiner (`conditioner.embedders.0.model.` only) is refused.
//!
//! The pure functions [`unet_key`], [`vae_key`], [`clip_key`], [`open_clip_key`] and [`sdxl_open_clip_key`]
//! translate a diffusers / transformers key into the key under which the same tensor is stored in such a file.
//! [`SingleFileCheckpoint`] opens a file once (memory-mapped), checks that it is an SD1.x / SD2.x / SDXL original
//! checkpoint, infers what the tensor shapes tell about the architecture, and hands out one source per network for
//! [`crate::VarBuilder::from_source`]:
//!
//! ```no_run
//! # use alignprop_io::{single_file::SingleFileCheckpoint, VarBuilder};
//! # use burn::tensor::DType;
//! # type B = burn::backend::Flex;
//! # fn main() -> alignprop_io::Result<()> {
//! let ckpt = SingleFileCheckpoint::open("v1-5-pruned-emaonly.safetensors")?;
//! let device = Default::default();
//! let unet_vb = VarBuilder::<B>::from_source(ckpt.unet(), &device, DType::F32);
//! let vae_vb = VarBuilder::<B>::from_source(ckpt.vae(), &device, DType::F32);
//! let text_vb = VarBuilder::<B>::from_source(ckpt.text_encoder(), &device, DType::F32);
//! // SDXL files only: the second text encoder.
//! if let Some(text_2) = ckpt.text_encoder_2() {
//!     let text_2_vb = VarBuilder::<B>::from_source(text_2, &device, DType::F32);
//! }
//! # Ok(()) }
//! ```
//!
//! Weights stored as F16 or BF16 (the common `*-fp16.safetensors` files) are converted by the builder. The VAE's
//! mid-block attention projections are stored as 1x1 convolutions `[C, C, 1, 1]`; the builder accepts them where a
//! linear layer expects `[C, C]`. The OpenCLIP towers store each block's query, key and value projections as one
//! `attn.in_proj_weight` `[3 w, w]` (rows q, k, v) and `attn.in_proj_bias` `[3 w]`; [`OpenClipText`] hands out the
//! thirds as transformers' `q_proj` / `k_proj` / `v_proj`, and SDXL's `text_projection` transposed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::TensorData;

use crate::weights::{RawTensor, Renamed, Result, SafetensorsSource, TensorSource, WeightError};

/// Prefix of the UNet's tensors in an original checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of the VAE's tensors in an original checkpoint.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Prefix of the CLIP text encoder's tensors in an SD1.x original checkpoint (followed by `text_model.`).
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// Prefix of the OpenCLIP text tower's tensors in an SD2.x original checkpoint.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// The tensor whose presence marks an SD2.x checkpoint's OpenCLIP text tower (`[vocab, width]`).
const OPEN_CLIP_MARKER: &str = "cond_stage_model.model.token_embedding.weight";

/// Prefix of SDXL's first text encoder (OpenAI CLIP ViT-L, transformers' names, followed by `text_model.`).
pub const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Prefix of SDXL's second text encoder, the OpenCLIP ViT-bigG text tower (open_clip's names).
pub const SDXL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";
/// The tensor whose presence marks an SDXL checkpoint's OpenCLIP tower (`[vocab, width]`).
const SDXL_OPEN_CLIP_MARKER: &str = "conditioner.embedders.1.model.token_embedding.weight";
/// The prefix of the SDXL refiner's only text encoder (OpenCLIP bigG as embedder 0), which is not supported.
const SDXL_REFINER_PREFIX: &str = "conditioner.embedders.0.model.";

/// Tensors of the OpenCLIP text model that SD2's text encoder does not use (the CLIP projection and temperature; an
/// attention-mask buffer some exports keep).
const OPEN_CLIP_UNUSED: &[&str] = &["text_projection", "logit_scale", "attn_mask"];
/// Tensors of the OpenCLIP bigG tower that SDXL's `text_encoder_2` does not use (it keeps `text_projection`).
const SDXL_OPEN_CLIP_UNUSED: &[&str] = &["logit_scale", "attn_mask"];

/// The tensor whose presence marks an SD1.x original checkpoint (the UNet's `conv_in` weight).
const MARKER_KEY: &str = "model.diffusion_model.input_blocks.0.0.weight";

/// Buffers of the DDPM training wrapper (`ldm.models.diffusion.ddpm.LatentDiffusion`), stored at the top level of
/// original checkpoints, 1-D over the 1000 training timesteps. No network reads them.
pub const SCHEDULE_BUFFERS: &[&str] = &[
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
];

/// Whether a tensor of an original checkpoint belongs to none of the networks' parameters: the DDPM schedule
/// buffers ([`SCHEDULE_BUFFERS`]; sgm's `denoiser.*` sigma buffers in SDXL files), the EMA copy and its counters
/// (`model_ema.*`), the VAE training loss (`first_stage_model.loss.*`), the CLIP text encoders' constant
/// `position_ids` buffer, the OpenCLIP tower's `text_projection` / `logit_scale` (SD2) and bigG's `logit_scale`
/// (SDXL, whose `text_projection` is used). The last OpenCLIP block, which SD2 does not use either, depends on the
/// file: [`SingleFileCheckpoint::is_ignorable`].
pub fn is_ignorable_key(key: &str) -> bool {
    SCHEDULE_BUFFERS.contains(&key)
        || key.starts_with("model_ema.")
        || key.starts_with("denoiser.")
        || key.starts_with("first_stage_model.loss.")
        || ((key.starts_with(CLIP_PREFIX) || key.starts_with(SDXL_CLIP_PREFIX))
            && key.ends_with("embeddings.position_ids"))
        || key
            .strip_prefix(OPEN_CLIP_PREFIX)
            .is_some_and(|k| OPEN_CLIP_UNUSED.contains(&k))
        || key
            .strip_prefix(SDXL_OPEN_CLIP_PREFIX)
            .is_some_and(|k| SDXL_OPEN_CLIP_UNUSED.contains(&k))
}

/// The Stable Diffusion generation of a single-file checkpoint, told by its text encoder's tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SdVersion {
    /// SD1.x: OpenAI's CLIP ViT-L/14 text encoder under `cond_stage_model.transformer.` (transformers' names),
    /// epsilon prediction at 512 px.
    Sd1,
    /// SD2.x: the OpenCLIP ViT-H/14 text tower under `cond_stage_model.model.` (open_clip's names), of which SD2 uses
    /// all blocks but the last. SD2's 768-px models (2.0-v, 2.1) predict v, the 512-px base models epsilon; the file
    /// does not say which (diffusers takes every SD2 file for 2.1, v-prediction, unless given a config).
    Sd2,
    /// SDXL (base): CLIP ViT-L under `conditioner.embedders.0.transformer.` (transformers' names) and the OpenCLIP
    /// ViT-bigG tower under `conditioner.embedders.1.model.` (open_clip's names, every block used), a UNet with
    /// the `text_time` addition embedding (`label_emb`); epsilon prediction at 1024 px.
    Xl,
}

// ---------------------------------------------------------------------------------------------------------------
// Key mapping
// ---------------------------------------------------------------------------------------------------------------

/// What the UNet key mapping needs to know about the architecture (plain numbers, independent of the UNet config
/// type): the original layout numbers its blocks consecutively, so the index of a diffusers block depends on how
/// many resnets each level has and on whether an up level has attentions (its up-sampler then comes third).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SingleFileUnetLayout {
    /// Resnets per down level (`layers_per_block` in the diffusers config); up levels have one more.
    pub layers_per_block: usize,
    /// For each up level in diffusers order (`up_blocks.0` is the lowest resolution), whether it has attentions
    /// (`CrossAttnUpBlock2D`) or not (`UpBlock2D`).
    pub up_block_has_attention: Vec<bool>,
}

impl SingleFileUnetLayout {
    /// The layout of SD1.x's UNet: 2 resnets per down level, up levels `UpBlock2D` + 3 × `CrossAttnUpBlock2D`.
    pub fn sd15() -> Self {
        Self {
            layers_per_block: 2,
            up_block_has_attention: vec![false, true, true, true],
        }
    }

    /// The layout for a diffusers UNet config's `layers_per_block` and `up_block_types`
    /// (`"CrossAttnUpBlock2D"` has attentions, `"UpBlock2D"` not).
    pub fn from_block_types<S: AsRef<str>>(layers_per_block: usize, up_block_types: &[S]) -> Self {
        Self {
            layers_per_block,
            up_block_has_attention: up_block_types
                .iter()
                .map(|t| t.as_ref().contains("CrossAttn"))
                .collect(),
        }
    }
}

impl Default for SingleFileUnetLayout {
    fn default() -> Self {
        Self::sd15()
    }
}

/// Splits `a.b.rest` at the first dot: `("a", "b.rest")`; a key without a dot gives `(key, "")`.
fn head(key: &str) -> (&str, &str) {
    key.split_once('.').unwrap_or((key, ""))
}

/// Splits `name.i.rest` into `(i, rest)` when `key` starts with `name.` followed by a number.
fn indexed<'a>(key: &'a str, name: &str) -> Option<(usize, &'a str)> {
    let rest = key.strip_prefix(name)?.strip_prefix('.')?;
    let (idx, rest) = head(rest);
    Some((idx.parse().ok()?, rest))
}

/// Joins a module path and the remaining key (`rest` may be empty).
fn join(path: String, rest: &str) -> String {
    if rest.is_empty() {
        path
    } else {
        format!("{path}.{rest}")
    }
}

/// A diffusers `ResnetBlock2D` parameter name inside a UNet resnet, in the original `ResBlock` naming.
fn unet_resnet(rest: &str) -> String {
    let (module, tail) = head(rest);
    let module = match module {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        other => other,
    };
    join(module.to_string(), tail)
}

/// The key under which the diffusers UNet tensor `key` (e.g. `down_blocks.1.resnets.0.conv1.weight`) is stored in
/// an original checkpoint (`model.diffusion_model.input_blocks.4.0.in_layers.2.weight`).
///
/// Transformer blocks (`attentions.*`) keep their inner names (`proj_in`, `transformer_blocks.0.attn1.to_q`, ...,
/// `transformer_blocks.i` for each of SDXL's several layers), which the original `SpatialTransformer` shares with
/// diffusers. SDXL's `add_embedding.linear_{1,2}` is `label_emb.0.{0,2}`. A key outside the known modules, or with a resnet
/// or attention index beyond the layout (which would otherwise alias the next block), is returned with the prefix
/// only, so a lookup fails naming it.
pub fn unet_key(cfg: &SingleFileUnetLayout, key: &str) -> String {
    let per_level = cfg.layers_per_block + 1; // original blocks per level: resnets (+ attention) and the sampler
    let (module, rest) = head(key);
    let inner = match module {
        "conv_in" => join("input_blocks.0.0".into(), rest),
        "time_embedding" => {
            let (layer, tail) = head(rest);
            match layer {
                "linear_1" => join("time_embed.0".into(), tail),
                "linear_2" => join("time_embed.2".into(), tail),
                _ => key.to_string(),
            }
        }
        "add_embedding" => {
            // SDXL's `text_time` MLP, sgm's `label_emb.0` (a Sequential: Linear, SiLU, Linear).
            let (layer, tail) = head(rest);
            match layer {
                "linear_1" => join("label_emb.0.0".into(), tail),
                "linear_2" => join("label_emb.0.2".into(), tail),
                _ => key.to_string(),
            }
        }
        "conv_norm_out" => join("out.0".into(), rest),
        "conv_out" => join("out.2".into(), rest),
        "down_blocks" => match head(rest) {
            (i, tail) if i.parse::<usize>().is_ok() => {
                let i: usize = i.parse().unwrap();
                let in_range = |j: usize| j < cfg.layers_per_block;
                if let Some((j, r)) = indexed(tail, "resnets").filter(|&(j, _)| in_range(j)) {
                    format!(
                        "input_blocks.{}.0.{}",
                        1 + i * per_level + j,
                        unet_resnet(r)
                    )
                } else if let Some((j, r)) =
                    indexed(tail, "attentions").filter(|&(j, _)| in_range(j))
                {
                    join(format!("input_blocks.{}.1", 1 + i * per_level + j), r)
                } else if let Some((_, r)) = indexed(tail, "downsamplers") {
                    let r = r
                        .strip_prefix("conv")
                        .map(|t| t.strip_prefix('.').unwrap_or(t))
                        .unwrap_or(r);
                    join(format!("input_blocks.{}.0.op", (i + 1) * per_level), r)
                } else {
                    key.to_string()
                }
            }
            _ => key.to_string(),
        },
        "mid_block" => {
            if let Some((j, r)) = indexed(rest, "resnets").filter(|&(j, _)| j < 2) {
                format!("middle_block.{}.{}", 2 * j, unet_resnet(r))
            } else if let Some((_, r)) = indexed(rest, "attentions").filter(|&(j, _)| j == 0) {
                join("middle_block.1".into(), r)
            } else {
                key.to_string()
            }
        }
        "up_blocks" => match head(rest) {
            (i, tail) if i.parse::<usize>().is_ok() => {
                let i: usize = i.parse().unwrap();
                let in_range = |j: usize| j < per_level;
                if let Some((j, r)) = indexed(tail, "resnets").filter(|&(j, _)| in_range(j)) {
                    format!("output_blocks.{}.0.{}", i * per_level + j, unet_resnet(r))
                } else if let Some((j, r)) =
                    indexed(tail, "attentions").filter(|&(j, _)| in_range(j))
                {
                    join(format!("output_blocks.{}.1", i * per_level + j), r)
                } else if let Some((_, r)) = indexed(tail, "upsamplers") {
                    // The up-sampler follows the level's last resnet (and its attention, if any).
                    let has_attention = cfg.up_block_has_attention.get(i).copied().unwrap_or(true);
                    let slot = if has_attention { 2 } else { 1 };
                    join(
                        format!(
                            "output_blocks.{}.{slot}",
                            i * per_level + cfg.layers_per_block
                        ),
                        r,
                    )
                } else {
                    key.to_string()
                }
            }
            _ => key.to_string(),
        },
        _ => key.to_string(),
    };
    format!("{UNET_PREFIX}{inner}")
}

/// A diffusers VAE `ResnetBlock2D` parameter name in the original naming (only the shortcut differs).
fn vae_resnet(rest: &str) -> String {
    match head(rest) {
        ("conv_shortcut", tail) => join("nin_shortcut".into(), tail),
        _ => rest.to_string(),
    }
}

/// A diffusers VAE mid block parameter (`resnets.j.*`, `attentions.0.*`) in the original `mid.*` naming. The
/// attention accepts the current (`to_q`, `to_out.0`, `group_norm`) and the pre-0.14 diffusers names
/// (`query`, `proj_attn`).
fn vae_mid(rest: &str) -> Option<String> {
    if let Some((j, r)) = indexed(rest, "resnets") {
        return Some(format!("mid.block_{}.{}", j + 1, vae_resnet(r)));
    }
    let (_, r) = indexed(rest, "attentions")?;
    let (module, tail) = head(r);
    let (module, tail) = match module {
        "group_norm" => ("norm", tail),
        "to_q" | "query" => ("q", tail),
        "to_k" | "key" => ("k", tail),
        "to_v" | "value" => ("v", tail),
        "proj_attn" => ("proj_out", tail),
        "to_out" => ("proj_out", tail.strip_prefix("0.").unwrap_or(tail)),
        other => (other, tail),
    };
    Some(join(format!("mid.attn_1.{module}"), tail))
}

/// The key under which the diffusers VAE tensor `key` (e.g. `decoder.up_blocks.0.resnets.1.conv1.weight`) is
/// stored in an original checkpoint (`first_stage_model.decoder.up.3.block.1.conv1.weight`). The decoder's levels
/// are numbered from the highest resolution in the original layout, hence `num_up_blocks` (4 for SD1.x).
pub fn vae_key(num_up_blocks: usize, key: &str) -> String {
    let (part, rest) = head(key);
    let inner = match part {
        "encoder" | "decoder" => {
            let (module, tail) = head(rest);
            let mapped = match module {
                "conv_norm_out" => Some(join("norm_out".into(), tail)),
                "mid_block" => vae_mid(tail),
                "down_blocks" if part == "encoder" => match head(tail) {
                    (i, r) if i.parse::<usize>().is_ok() => {
                        if let Some((j, r)) = indexed(r, "resnets") {
                            Some(format!("down.{i}.block.{j}.{}", vae_resnet(r)))
                        } else {
                            indexed(r, "downsamplers")
                                .map(|(_, r)| join(format!("down.{i}.downsample"), r))
                        }
                    }
                    _ => None,
                },
                "up_blocks" if part == "decoder" => match head(tail) {
                    (i, r) if i.parse::<usize>().is_ok() => {
                        let level = num_up_blocks
                            .saturating_sub(1)
                            .saturating_sub(i.parse().unwrap());
                        if let Some((j, r)) = indexed(r, "resnets") {
                            Some(format!("up.{level}.block.{j}.{}", vae_resnet(r)))
                        } else {
                            indexed(r, "upsamplers")
                                .map(|(_, r)| join(format!("up.{level}.upsample"), r))
                        }
                    }
                    _ => None,
                },
                _ => None,
            };
            format!("{part}.{}", mapped.unwrap_or_else(|| rest.to_string()))
        }
        _ => key.to_string(), // quant_conv, post_quant_conv: same names
    };
    format!("{VAE_PREFIX}{inner}")
}

/// The key under which the transformers CLIP text-encoder tensor `key` is stored in an SD1.x original checkpoint:
/// `cond_stage_model.transformer.` + the transformers name. The names inside are transformers' own; a key given
/// without the `text_model.` prefix (transformers ≥ 5 naming) gets it added.
pub fn clip_key(key: &str) -> String {
    clip_key_in(CLIP_PREFIX, key)
}

/// [`clip_key`] for SDXL's first text encoder: `conditioner.embedders.0.transformer.` + the transformers name.
pub fn sdxl_clip_key(key: &str) -> String {
    clip_key_in(SDXL_CLIP_PREFIX, key)
}

fn clip_key_in(prefix: &str, key: &str) -> String {
    if key.starts_with("text_model.") {
        format!("{prefix}{key}")
    } else {
        format!("{prefix}text_model.{key}")
    }
}

/// Which third of a fused OpenCLIP `attn.in_proj_weight` `[3 w, w]` / `attn.in_proj_bias` `[3 w]` (rows q, k, v,
/// in that order, as `torch.nn.MultiheadAttention`) a transformers `q_proj` / `k_proj` / `v_proj` tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkvPart {
    Q = 0,
    K = 1,
    V = 2,
}

impl QkvPart {
    fn name(self) -> &'static str {
        match self {
            Self::Q => "q",
            Self::K => "k",
            Self::V => "v",
        }
    }
}

/// Where a transformers CLIP text-encoder tensor is stored in an OpenCLIP tower: the stored key and, for the query
/// / key / value projections, which third of the fused `in_proj` tensor it is; `transposed` for SDXL's
/// `text_projection.weight` `[proj, width]`, stored as OpenCLIP's `text_projection` `[width, proj]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenClipKey {
    pub stored: String,
    pub part: Option<QkvPart>,
    pub transposed: bool,
}

/// A transformers `CLIPEncoderLayer` parameter (`layer_norm1.weight`, `self_attn.q_proj.bias`, ...) in OpenCLIP's
/// `ResidualAttentionBlock` naming (`ln_1.weight`, `attn.in_proj_bias` + [`QkvPart::Q`], ...).
fn open_clip_block(rest: &str) -> Option<(String, Option<QkvPart>)> {
    let (module, tail) = head(rest);
    let plain = |name: &str| Some((join(name.to_string(), tail), None));
    match module {
        "layer_norm1" => plain("ln_1"),
        "layer_norm2" => plain("ln_2"),
        "mlp" => match head(tail) {
            ("fc1", t) => Some((join("mlp.c_fc".into(), t), None)),
            ("fc2", t) => Some((join("mlp.c_proj".into(), t), None)),
            _ => None,
        },
        "self_attn" => {
            let (proj, param) = head(tail);
            let part = match proj {
                "q_proj" => QkvPart::Q,
                "k_proj" => QkvPart::K,
                "v_proj" => QkvPart::V,
                "out_proj" => return Some((join("attn.out_proj".into(), param), None)),
                _ => return None,
            };
            match param {
                "weight" | "bias" => Some((format!("attn.in_proj_{param}"), Some(part))),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The key (and fused-projection third) under which the transformers CLIP text-encoder tensor `key` (with or
/// without `text_model.`) is stored in an SD2.x checkpoint whose text encoder has `layers` blocks:
/// `embeddings.token_embedding.weight` -> `cond_stage_model.model.token_embedding.weight`,
/// `embeddings.position_embedding.weight` -> `positional_embedding`, `encoder.layers.i.*` ->
/// `transformer.resblocks.i.*` (see [`QkvPart`]), `final_layer_norm.*` -> `ln_final.*`, as diffusers'
/// `convert_open_clip_checkpoint`. A key outside these, or a layer `>= layers` (the file's last block, which SD2
/// does not use, must not be read as a text-encoder layer), is returned with the prefix only, so a lookup fails
/// naming it.
pub fn open_clip_key(layers: usize, key: &str) -> OpenClipKey {
    open_clip_key_in(OPEN_CLIP_PREFIX, layers, false, key)
}

/// [`open_clip_key`] for SDXL's `text_encoder_2` (a transformers `CLIPTextModelWithProjection` of all `layers`
/// blocks of the bigG tower) under `conditioner.embedders.1.model.`, plus `text_projection.weight` ->
/// `text_projection`, transposed.
pub fn sdxl_open_clip_key(layers: usize, key: &str) -> OpenClipKey {
    open_clip_key_in(SDXL_OPEN_CLIP_PREFIX, layers, true, key)
}

fn open_clip_key_in(prefix: &str, layers: usize, projection: bool, key: &str) -> OpenClipKey {
    if projection && key == "text_projection.weight" {
        return OpenClipKey {
            stored: format!("{prefix}text_projection"),
            part: None,
            transposed: true,
        };
    }
    let name = key.strip_prefix("text_model.").unwrap_or(key);
    let mapped = match name {
        "embeddings.token_embedding.weight" => Some(("token_embedding.weight".to_string(), None)),
        "embeddings.position_embedding.weight" => Some(("positional_embedding".to_string(), None)),
        _ => {
            if let Some(tail) = name.strip_prefix("final_layer_norm.") {
                Some((format!("ln_final.{tail}"), None))
            } else {
                name.strip_prefix("encoder.")
                    .and_then(|r| indexed(r, "layers"))
                    .filter(|&(i, _)| i < layers)
                    .and_then(|(i, rest)| {
                        open_clip_block(rest)
                            .map(|(k, part)| (format!("transformer.resblocks.{i}.{k}"), part))
                    })
            }
        }
    };
    match mapped {
        Some((stored, part)) => OpenClipKey {
            stored: format!("{prefix}{stored}"),
            part,
            transposed: false,
        },
        None => OpenClipKey {
            stored: format!("{prefix}{key}"),
            part: None,
            transposed: false,
        },
    }
}

/// Rows `part` of a fused `[3 w, ...]` tensor (q, k, v stacked along the first dimension): `[w, ...]`, the same
/// dtype; its `stored_key` says which rows were taken. A first dimension that is not a multiple of 3 is an error
/// naming the file and the key.
pub fn split_qkv(raw: RawTensor, part: QkvPart) -> Result<RawTensor> {
    let rows = raw.shape.first().copied().unwrap_or(0);
    if rows == 0 || !rows.is_multiple_of(3) {
        return Err(WeightError::Config {
            path: raw.file,
            msg: format!(
                "tensor '{}': expected the fused q, k, v projections [3 x width, ...], found shape {:?}",
                raw.stored_key, raw.shape
            ),
        });
    }
    let n = rows / 3;
    let bytes = raw.data.as_bytes();
    let per_row = bytes.len() / rows;
    let i = part as usize;
    let mut shape = raw.shape.clone();
    shape[0] = n;
    Ok(RawTensor {
        data: TensorData::from_bytes_vec(
            bytes[i * n * per_row..(i + 1) * n * per_row].to_vec(),
            shape.clone(),
            raw.data.dtype,
        ),
        shape,
        file: raw.file,
        stored_key: format!(
            "{} (rows {}..{}, the {} part)",
            raw.stored_key,
            i * n,
            (i + 1) * n,
            part.name()
        ),
    })
}

/// The transpose of a 2-D tensor `[r, c]` -> `[c, r]`, the same dtype and values; its `stored_key` says it was
/// transposed. Another rank is an error naming the file and the key.
pub fn transpose_2d(raw: RawTensor) -> Result<RawTensor> {
    let &[rows, cols] = raw.shape.as_slice() else {
        return Err(WeightError::Config {
            path: raw.file,
            msg: format!(
                "tensor '{}': expected a matrix [width, projection], found shape {:?}",
                raw.stored_key, raw.shape
            ),
        });
    };
    let bytes = raw.data.as_bytes();
    let size = bytes.len().checked_div(rows * cols).unwrap_or(0);
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let (from, to) = ((r * cols + c) * size, (c * rows + r) * size);
            out[to..to + size].copy_from_slice(&bytes[from..from + size]);
        }
    }
    let shape = vec![cols, rows];
    Ok(RawTensor {
        data: TensorData::from_bytes_vec(out, shape.clone(), raw.data.dtype),
        shape,
        file: raw.file,
        stored_key: format!("{} (transposed)", raw.stored_key),
    })
}

/// An OpenCLIP text tower under transformers' CLIP text-encoder names, the query / key / value projections cut out
/// of the fused `in_proj` tensors ([`split_qkv`]): SD2.x's ([`Self::sd2`], [`open_clip_key`]; `layers` is the text
/// encoder's depth, the tower's blocks but the last) or SDXL's bigG ([`Self::sdxl`], [`sdxl_open_clip_key`]: every
/// block, and `text_projection.weight` transposed from the stored `text_projection`).
pub struct OpenClipText<S> {
    pub inner: S,
    pub layers: usize,
    /// SDXL's `text_encoder_2` (prefix `conditioner.embedders.1.model.`, with the projection) instead of SD2's.
    pub sdxl: bool,
}

impl<S> OpenClipText<S> {
    /// SD2.x's text encoder: the first `layers` blocks of the tower under `cond_stage_model.model.`.
    pub fn sd2(inner: S, layers: usize) -> Self {
        Self {
            inner,
            layers,
            sdxl: false,
        }
    }

    /// SDXL's `text_encoder_2`: the `layers` blocks of the tower under `conditioner.embedders.1.model.` and its
    /// projection.
    pub fn sdxl(inner: S, layers: usize) -> Self {
        Self {
            inner,
            layers,
            sdxl: true,
        }
    }

    fn key(&self, key: &str) -> OpenClipKey {
        if self.sdxl {
            sdxl_open_clip_key(self.layers, key)
        } else {
            open_clip_key(self.layers, key)
        }
    }
}

impl<S: TensorSource> TensorSource for OpenClipText<S> {
    fn find(&self, key: &str) -> Result<Option<RawTensor>> {
        let mapped = self.key(key);
        match (self.inner.find(&mapped.stored)?, mapped.part) {
            (Some(raw), Some(part)) => split_qkv(raw, part).map(Some),
            (Some(raw), None) if mapped.transposed => transpose_2d(raw).map(Some),
            (found, _) => Ok(found),
        }
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn stored_key(&self, key: &str) -> String {
        self.inner.stored_key(&self.key(key).stored)
    }
    fn keys(&self) -> Vec<String> {
        self.inner.keys()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The checkpoint
// ---------------------------------------------------------------------------------------------------------------

/// What the tensor shapes of an original checkpoint tell about the UNet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InferredUnet {
    /// The block layout used by [`unet_key`].
    pub layout: SingleFileUnetLayout,
    /// Latent channels in (`conv_in`) and out (`conv_out`).
    pub in_channels: usize,
    pub out_channels: usize,
    /// Output channels of each down level (`block_out_channels`), from the first resnet of each level.
    pub block_out_channels: Vec<usize>,
    /// For each down level, whether it has attentions (`CrossAttnDownBlock2D`).
    pub down_block_has_attention: Vec<bool>,
    /// Width of the text-encoder states the cross-attentions read (`cross_attention_dim`), if there are any.
    pub cross_attention_dim: Option<usize>,
    /// Whether the transformer blocks' `proj_in` / `proj_out` are linear layers (SD2.x, SDXL) instead of 1x1 convs.
    pub use_linear_projection: bool,
    /// Transformer layers per down level (`transformer_layers_per_block`, the up levels in reverse), counted in the
    /// level's first attention (`transformer_blocks.i`); 1 for a level without attention, except that the last
    /// level takes the mid block's depth (diffusers builds the mid block with the last entry). SD1.x / 2.x: all 1;
    /// SDXL: `[1, 2, 10]`.
    pub transformer_layers_per_block: Vec<usize>,
    /// SDXL's `text_time` addition embedding (`label_emb.0`), `None` without one.
    pub text_time: Option<InferredTextTime>,
}

/// What the shapes tell about SDXL's `text_time` addition embedding: `label_emb.0.0.weight` is
/// `[time_embed_dim, projection_class_embeddings_input_dim]`, the input being the pooled text embedding of the second
/// text encoder (`text_projection`'s width) followed by the 6 time ids' sinusoids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InferredTextTime {
    /// `projection_class_embeddings_input_dim` (SDXL: 2816).
    pub projection_class_embeddings_input_dim: usize,
    /// `addition_time_embed_dim`: (input width - pooled width) / 6 (SDXL: (2816 - 1280) / 6 = 256).
    pub addition_time_embed_dim: usize,
}

/// What the tensor shapes of an original checkpoint tell about the VAE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InferredVae {
    /// Output channels of each encoder level (`block_out_channels`).
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level (`layers_per_block`); decoder levels have one more.
    pub layers_per_block: usize,
    /// Number of decoder levels, the `num_up_blocks` of [`vae_key`].
    pub num_up_blocks: usize,
    pub latent_channels: usize,
    /// Image channels in and out.
    pub in_channels: usize,
    pub out_channels: usize,
}

/// What the tensor shapes of an original checkpoint tell about the CLIP text encoder (the number of attention
/// heads is not visible in the shapes: 12 for SD1.x, 16 for SD2.x; one per 64 channels in both). For SD2.x,
/// `num_hidden_layers` is the OpenCLIP tower's blocks but the last (the layers SD2 uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InferredTextEncoder {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub max_position_embeddings: usize,
}

/// What the tensor shapes of an SDXL checkpoint tell about its second text encoder (a transformers
/// `CLIPTextModelWithProjection`): the encoder (every block of the bigG tower; 20 heads of 64 for bigG, not visible
/// in the shapes) and the width of its projection (`text_projection` `[width, proj]`, SDXL: 1280).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InferredTextEncoder2 {
    pub text: InferredTextEncoder,
    pub projection_dim: usize,
}

/// How the text encoder is stored in a single file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TextTower {
    /// SD1.x: transformers' names under [`CLIP_PREFIX`]; `without_text_model` when the keys lack transformers'
    /// `text_model.` level (some early conversions).
    Clip { without_text_model: bool },
    /// SD2.x: OpenCLIP's names under [`OPEN_CLIP_PREFIX`]; the text encoder is the first `layers` blocks.
    OpenClip { layers: usize },
    /// SDXL: CLIP ViT-L with transformers' names under [`SDXL_CLIP_PREFIX`] (`without_text_model` as for SD1.x) and
    /// the bigG tower under [`SDXL_OPEN_CLIP_PREFIX`], all `layers_2` blocks used.
    Xl {
        without_text_model: bool,
        layers_2: usize,
    },
}

/// A single-file SD1.x / SD2.x / SDXL checkpoint in the original layout, memory-mapped once and shared by the
/// per-network sources it hands out.
pub struct SingleFileCheckpoint {
    path: PathBuf,
    source: Arc<SafetensorsSource>,
    unet: InferredUnet,
    vae: InferredVae,
    text_encoder: InferredTextEncoder,
    text_encoder_2: Option<InferredTextEncoder2>,
    text_tower: TextTower,
}

impl std::fmt::Debug for SingleFileCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFileCheckpoint")
            .field("path", &self.path)
            .field("version", &self.version())
            .field("unet", &self.unet)
            .field("vae", &self.vae)
            .field("text_encoder", &self.text_encoder)
            .field("text_encoder_2", &self.text_encoder_2)
            .finish()
    }
}

/// Reads the shapes of an opened file and answers the few structural questions the inference needs.
struct Shapes<'a> {
    path: &'a Path,
    src: &'a SafetensorsSource,
    /// All keys, sorted (for prefix queries).
    keys: Vec<String>,
}

impl<'a> Shapes<'a> {
    fn new(path: &'a Path, src: &'a SafetensorsSource) -> Self {
        Self {
            path,
            src,
            keys: src.keys(),
        }
    }

    fn get(&self, key: &str) -> Option<Vec<usize>> {
        self.src.shape(key)
    }

    /// Dimension `dim` of the tensor `key`, which must exist.
    fn dim(&self, key: &str, dim: usize) -> Result<usize> {
        let shape = self
            .get(key)
            .ok_or_else(|| self.err(format!("expected tensor '{key}' is missing")))?;
        shape
            .get(dim)
            .copied()
            .ok_or_else(|| self.err(format!("tensor '{key}' has shape {shape:?}")))
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Whether some key starts with `prefix`.
    fn has_prefix(&self, prefix: &str) -> bool {
        let i = self.keys.partition_point(|k| k.as_str() < prefix);
        self.keys.get(i).is_some_and(|k| k.starts_with(prefix))
    }

    /// How many consecutive indices `i = 0, 1, ...` satisfy `present(i)`.
    fn count(&self, present: impl Fn(usize) -> bool) -> usize {
        (0..).take_while(|&i| present(i)).count()
    }

    fn err(&self, msg: String) -> WeightError {
        WeightError::Config {
            path: self.path.to_path_buf(),
            msg: format!("single-file SD checkpoint: {msg}"),
        }
    }
}

impl SingleFileCheckpoint {
    /// Opens `path` (a `.safetensors` file), checks that it is an SD1.x, SD2.x or SDXL checkpoint in the original
    /// layout (which one: [`Self::version`], from the text encoders' keys) and infers the networks' structure from
    /// its tensor shapes.
    ///
    /// Errors: the file's I/O or format errors, or a [`WeightError::Config`] naming the file and the tensor that was
    /// expected when it holds something else (a diffusers component file, an SDXL refiner, ...).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let source = SafetensorsSource::open(&[&path])?;
        let shapes = Shapes::new(&path, &source);
        if !shapes.has(MARKER_KEY) {
            return Err(WeightError::Config {
                path: path.clone(),
                msg: format!(
                    "not a Stable Diffusion 1.x / 2.x / XL single-file checkpoint in the original (CompVis/ldm, \
                     Stability sgm) layout: expected the tensor '{MARKER_KEY}' (UNet under 'model.diffusion_model.', \
                     VAE under 'first_stage_model.', text encoder under 'cond_stage_model.transformer.' (SD1.x), \
                     'cond_stage_model.model.' (SD2.x) or 'conditioner.embedders.' (SDXL)){}",
                    describe_other(&shapes)
                ),
            });
        }
        let text_tower = detect_text_tower(&shapes)?;
        let (text_encoder, text_encoder_2) = match text_tower {
            TextTower::Clip { without_text_model } => (
                infer_text_encoder(&shapes, CLIP_PREFIX, without_text_model)?,
                None,
            ),
            TextTower::OpenClip { .. } => (infer_open_clip_text(&shapes, OPEN_CLIP_PREFIX)?, None),
            TextTower::Xl {
                without_text_model, ..
            } => (
                infer_text_encoder(&shapes, SDXL_CLIP_PREFIX, without_text_model)?,
                Some(infer_sdxl_open_clip_text(&shapes)?),
            ),
        };
        let mut unet = infer_unet(&shapes)?;
        unet.text_time = infer_text_time(&shapes, text_encoder_2.as_ref())?;
        let vae = infer_vae(&shapes)?;
        Ok(Self {
            path,
            source: Arc::new(source),
            unet,
            vae,
            text_encoder,
            text_encoder_2,
            text_tower,
        })
    }

    /// SD1.x, SD2.x or SDXL, from the text encoders' tensors.
    pub fn version(&self) -> SdVersion {
        match self.text_tower {
            TextTower::Clip { .. } => SdVersion::Sd1,
            TextTower::OpenClip { .. } => SdVersion::Sd2,
            TextTower::Xl { .. } => SdVersion::Xl,
        }
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file, under its own (original) key names.
    pub fn source(&self) -> &Arc<SafetensorsSource> {
        &self.source
    }

    /// The UNet structure read from the tensor shapes.
    pub fn unet_info(&self) -> &InferredUnet {
        &self.unet
    }

    /// The VAE structure read from the tensor shapes.
    pub fn vae_info(&self) -> &InferredVae {
        &self.vae
    }

    /// The text-encoder structure read from the tensor shapes (SDXL: the first text encoder, CLIP ViT-L).
    pub fn text_encoder_info(&self) -> &InferredTextEncoder {
        &self.text_encoder
    }

    /// SDXL's second text encoder as read from the tensor shapes; `None` for SD1.x / SD2.x.
    pub fn text_encoder_2_info(&self) -> Option<&InferredTextEncoder2> {
        self.text_encoder_2.as_ref()
    }

    /// The UNet's tensors under their diffusers names (`conv_in.weight`, `down_blocks.0.resnets.0.norm1.weight`,
    /// ...), with the block layout inferred from the file (compare [`Self::unet_info`] with the model config).
    pub fn unet(&self) -> Renamed<Arc<SafetensorsSource>> {
        let layout = self.unet.layout.clone();
        Renamed {
            inner: self.source.clone(),
            map: Box::new(move |key| unet_key(&layout, key)),
        }
    }

    /// The VAE's tensors under their diffusers names (`decoder.up_blocks.0.resnets.0.conv1.weight`, ...; the
    /// mid-block attention under the current and the legacy names).
    pub fn vae(&self) -> Renamed<Arc<SafetensorsSource>> {
        let n = self.vae.num_up_blocks;
        Renamed {
            inner: self.source.clone(),
            map: Box::new(move |key| vae_key(n, key)),
        }
    }

    /// The CLIP text encoder's tensors under transformers' names, with or without the `text_model.` prefix: SD1.x's
    /// (and SDXL's first encoder) renamed, SD2.x's OpenCLIP tower read as a transformers `CLIPTextModel` of its
    /// blocks but the last ([`OpenClipText`]).
    pub fn text_encoder(&self) -> Box<dyn TensorSource> {
        let clip = |prefix: &'static str, without_text_model: bool| -> Box<dyn TensorSource> {
            Box::new(Renamed {
                inner: self.source.clone(),
                map: Box::new(move |key| {
                    if without_text_model {
                        format!("{prefix}{}", key.strip_prefix("text_model.").unwrap_or(key))
                    } else {
                        clip_key_in(prefix, key)
                    }
                }),
            })
        };
        match self.text_tower {
            TextTower::OpenClip { layers } => {
                Box::new(OpenClipText::sd2(self.source.clone(), layers))
            }
            TextTower::Clip { without_text_model } => clip(CLIP_PREFIX, without_text_model),
            TextTower::Xl {
                without_text_model, ..
            } => clip(SDXL_CLIP_PREFIX, without_text_model),
        }
    }

    /// SDXL's second text encoder under transformers' `CLIPTextModelWithProjection` names (`text_model.*`, with or
    /// without that prefix, and `text_projection.weight`): the bigG tower, every block ([`OpenClipText::sdxl`]).
    /// `None` for SD1.x / SD2.x files.
    pub fn text_encoder_2(&self) -> Option<OpenClipText<Arc<SafetensorsSource>>> {
        match self.text_tower {
            TextTower::Xl { layers_2, .. } => {
                Some(OpenClipText::sdxl(self.source.clone(), layers_2))
            }
            _ => None,
        }
    }

    /// Whether the file's tensor `key` is one no network reads by design: [`is_ignorable_key`], and for SD2.x the
    /// OpenCLIP tower's last block (SD2 conditions on the penultimate one).
    pub fn is_ignorable(&self, key: &str) -> bool {
        is_ignorable_key(key)
            || match self.text_tower {
                TextTower::OpenClip { layers } => key.starts_with(&format!(
                    "{OPEN_CLIP_PREFIX}transformer.resblocks.{layers}."
                )),
                TextTower::Clip { .. } | TextTower::Xl { .. } => false,
            }
    }

    /// Keys of the file that belong to none of the networks under the layouts above and are not known to be
    /// ignorable ([`Self::is_ignorable`]): normally empty. Handy to warn about an unexpected variant.
    pub fn unknown_keys(&self) -> Vec<String> {
        let known = |k: &str| {
            k.starts_with(UNET_PREFIX)
                || k.starts_with(VAE_PREFIX)
                || k.starts_with(CLIP_PREFIX)
                || k.starts_with(OPEN_CLIP_PREFIX)
                || k.starts_with(SDXL_CLIP_PREFIX)
                || k.starts_with(SDXL_OPEN_CLIP_PREFIX)
                || self.is_ignorable(k)
        };
        self.source
            .keys()
            .into_iter()
            .filter(|k| !known(k))
            .collect()
    }
}

/// How the text encoder is stored: SD1.x's CLIP (with or without `text_model.`), SD2.x's OpenCLIP tower or SDXL's
/// pair; an error naming the expected tensors otherwise (an SDXL refiner, a file without text encoder).
fn detect_text_tower(s: &Shapes) -> Result<TextTower> {
    if s.has(&clip_key("embeddings.token_embedding.weight")) {
        return Ok(TextTower::Clip {
            without_text_model: false,
        });
    }
    if s.has(&format!("{CLIP_PREFIX}embeddings.token_embedding.weight")) {
        return Ok(TextTower::Clip {
            without_text_model: true,
        });
    }
    if s.has(OPEN_CLIP_MARKER) {
        let layers = open_clip_blocks(s, OPEN_CLIP_PREFIX).saturating_sub(1);
        return Ok(TextTower::OpenClip { layers });
    }
    let xl_clip = sdxl_clip_key("embeddings.token_embedding.weight");
    let xl_clip_bare = format!("{SDXL_CLIP_PREFIX}embeddings.token_embedding.weight");
    let xl_clip_found = s.has(&xl_clip) || s.has(&xl_clip_bare);
    if xl_clip_found && s.has(SDXL_OPEN_CLIP_MARKER) {
        return Ok(TextTower::Xl {
            without_text_model: !s.has(&xl_clip),
            layers_2: open_clip_blocks(s, SDXL_OPEN_CLIP_PREFIX),
        });
    }
    let other = if s.has_prefix(SDXL_REFINER_PREFIX) && !xl_clip_found {
        format!(
            " (found '{SDXL_REFINER_PREFIX}*' without a CLIP ViT-L encoder: an SDXL refiner, which is not supported)"
        )
    } else if s.has_prefix("conditioner.embedders.") {
        format!(
            " (found 'conditioner.embedders.*', an SDXL checkpoint, without both of its text encoders: \
             '{xl_clip}' ({}) and '{SDXL_OPEN_CLIP_MARKER}' ({}))",
            if xl_clip_found { "present" } else { "missing" },
            if s.has(SDXL_OPEN_CLIP_MARKER) {
                "present"
            } else {
                "missing"
            },
        )
    } else {
        String::new()
    };
    Err(s.err(format!(
        "expected the text encoder tensor '{}' (SD1.x), '{OPEN_CLIP_MARKER}' (SD2.x), or '{xl_clip}' and \
         '{SDXL_OPEN_CLIP_MARKER}' (SDXL){other}",
        clip_key("text_model.embeddings.token_embedding.weight")
    )))
}

/// Number of consecutive `transformer.resblocks.i` blocks of the OpenCLIP tower under `prefix`.
fn open_clip_blocks(s: &Shapes, prefix: &str) -> usize {
    s.count(|i| s.has_prefix(&format!("{prefix}transformer.resblocks.{i}.")))
}

/// A hint for a file that is not an original SD1.x / SD2.x checkpoint: what it looks like instead.
fn describe_other(s: &Shapes) -> String {
    if s.has_prefix("down_blocks.") && s.has_prefix("time_embedding.") {
        "; it looks like a diffusers UNet file (diffusers names such as 'down_blocks.*'): load its model folder instead"
            .into()
    } else if s.has_prefix("encoder.down_blocks.") || s.has_prefix("decoder.up_blocks.") {
        "; it looks like a diffusers VAE file: load its model folder instead".into()
    } else if s.has_prefix("text_model.") || s.has_prefix("embeddings.token_embedding.") {
        "; it looks like a transformers CLIP text-encoder file: load its model folder instead"
            .into()
    } else {
        let first: Vec<&str> = s.keys.iter().take(3).map(String::as_str).collect();
        format!("; its first tensors are {first:?}")
    }
}

fn infer_unet(s: &Shapes) -> Result<InferredUnet> {
    let p = UNET_PREFIX;
    // Levels: one down-sampler (`input_blocks.N.0.op`) per level but the last.
    let n_inputs = s.count(|i| s.has_prefix(&format!("{p}input_blocks.{i}.")));
    let n_outputs = s.count(|i| s.has_prefix(&format!("{p}output_blocks.{i}.")));
    let downsamplers = (1..n_inputs)
        .filter(|i| s.has(&format!("{p}input_blocks.{i}.0.op.weight")))
        .count();
    let levels = downsamplers + 1;
    if n_outputs == 0 || !n_outputs.is_multiple_of(levels) || n_outputs / levels < 2 {
        return Err(s.err(format!(
            "cannot read the UNet's block layout: {n_inputs} input blocks, {n_outputs} output blocks, {levels} levels"
        )));
    }
    let per_level = n_outputs / levels;
    let layers_per_block = per_level - 1;
    let first_resnet = |level: usize| 1 + level * per_level;
    let block_out_channels = (0..levels)
        .map(|l| {
            s.dim(
                &format!("{p}input_blocks.{}.0.out_layers.3.weight", first_resnet(l)),
                0,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let down_block_has_attention: Vec<bool> = (0..levels)
        .map(|l| {
            s.has(&format!(
                "{p}input_blocks.{}.1.norm.weight",
                first_resnet(l)
            ))
        })
        .collect();
    let up_block_has_attention = (0..levels)
        .map(|l| s.has(&format!("{p}output_blocks.{}.1.norm.weight", l * per_level)))
        .collect();
    let attn2 = |b: &str| format!("{p}{b}.1.transformer_blocks.0.attn2.to_k.weight");
    let cross_attention_dim = s.get(&attn2("middle_block")).map(|shape| shape[1]);
    let use_linear_projection = s
        .get(&format!("{p}middle_block.1.proj_in.weight"))
        .is_some_and(|sh| sh.len() == 2);
    // Transformer depth: the `transformer_blocks.i` of each level's first attention; the mid block's must be the
    // last level's (diffusers builds it with the last entry), which a level without attention takes.
    let depth =
        |block: &str| s.count(|i| s.has_prefix(&format!("{p}{block}.1.transformer_blocks.{i}.")));
    let mut transformer_layers_per_block: Vec<usize> = (0..levels)
        .map(|l| depth(&format!("input_blocks.{}", first_resnet(l))).max(1))
        .collect();
    let mid_depth = depth("middle_block");
    if mid_depth > 0 {
        let last = levels - 1;
        if !down_block_has_attention[last] {
            transformer_layers_per_block[last] = mid_depth;
        } else if transformer_layers_per_block[last] != mid_depth {
            return Err(s.err(format!(
                "the mid block has {mid_depth} transformer layers ('{p}middle_block.1.transformer_blocks.N'), the \
                 last level {} (diffusers builds both with the same depth)",
                transformer_layers_per_block[last]
            )));
        }
    }
    Ok(InferredUnet {
        layout: SingleFileUnetLayout {
            layers_per_block,
            up_block_has_attention,
        },
        in_channels: s.dim(&format!("{p}input_blocks.0.0.weight"), 1)?,
        out_channels: s.dim(&format!("{p}out.2.weight"), 0)?,
        block_out_channels,
        down_block_has_attention,
        cross_attention_dim,
        use_linear_projection,
        transformer_layers_per_block,
        text_time: None,
    })
}

/// SDXL's `text_time` embedding from `label_emb.0.0.weight` `[time_embed_dim, input]` and the pooled width of the
/// second text encoder; `None` for SD1.x / SD2.x files. An SDXL file without `label_emb`, or with an input width
/// that is not the pooled width plus 6 equal sinusoids, is an error naming the tensor.
fn infer_text_time(
    s: &Shapes,
    text_2: Option<&InferredTextEncoder2>,
) -> Result<Option<InferredTextTime>> {
    let key = format!("{UNET_PREFIX}label_emb.0.0.weight");
    if !s.has(&key) {
        if text_2.is_some() {
            return Err(s.err(format!(
                "an SDXL checkpoint (two text encoders) without the UNet's addition embedding: expected '{key}'"
            )));
        }
        return Ok(None);
    }
    // An SD1.x / SD2.x file with a class embedding (unCLIP and the like): not read (left as an unused key).
    let Some(text_2) = text_2 else {
        return Ok(None);
    };
    let input = s.dim(&key, 1)?;
    let pooled = text_2.projection_dim;
    let ids = input.saturating_sub(pooled);
    if ids == 0 || !ids.is_multiple_of(6) {
        return Err(s.err(format!(
            "tensor '{key}' takes {input} inputs: expected the pooled text width {pooled} ('{SDXL_OPEN_CLIP_PREFIX}\
             text_projection') plus 6 equal time-id sinusoids"
        )));
    }
    Ok(Some(InferredTextTime {
        projection_class_embeddings_input_dim: input,
        addition_time_embed_dim: ids / 6,
    }))
}

fn infer_vae(s: &Shapes) -> Result<InferredVae> {
    let p = VAE_PREFIX;
    let levels = s.count(|i| s.has(&format!("{p}encoder.down.{i}.block.0.conv1.weight")));
    let num_up_blocks = s.count(|i| s.has(&format!("{p}decoder.up.{i}.block.0.conv1.weight")));
    if levels == 0 || num_up_blocks == 0 {
        return Err(s.err(format!(
            "expected the VAE tensors '{p}encoder.down.0.block.0.conv1.weight' and \
             '{p}decoder.up.0.block.0.conv1.weight'"
        )));
    }
    let block_out_channels = (0..levels)
        .map(|i| s.dim(&format!("{p}encoder.down.{i}.block.0.conv1.weight"), 0))
        .collect::<Result<Vec<_>>>()?;
    Ok(InferredVae {
        block_out_channels,
        layers_per_block: s.count(|j| s.has(&format!("{p}encoder.down.0.block.{j}.conv1.weight"))),
        num_up_blocks,
        latent_channels: s.dim(&format!("{p}post_quant_conv.weight"), 0)?,
        in_channels: s.dim(&format!("{p}encoder.conv_in.weight"), 1)?,
        out_channels: s.dim(&format!("{p}decoder.conv_out.weight"), 0)?,
    })
}

fn infer_text_encoder(
    s: &Shapes,
    prefix: &str,
    without_text_model: bool,
) -> Result<InferredTextEncoder> {
    let key = |k: &str| {
        if without_text_model {
            format!("{prefix}{k}")
        } else {
            clip_key_in(prefix, k)
        }
    };
    let token = key("embeddings.token_embedding.weight");
    Ok(InferredTextEncoder {
        vocab_size: s.dim(&token, 0)?,
        hidden_size: s.dim(&token, 1)?,
        intermediate_size: s.dim(&key("encoder.layers.0.mlp.fc1.weight"), 0)?,
        num_hidden_layers: s
            .count(|i| s.has(&key(&format!("encoder.layers.{i}.layer_norm1.weight")))),
        max_position_embeddings: s.dim(&key("embeddings.position_embedding.weight"), 0)?,
    })
}

/// The text encoder of an OpenCLIP tower under `p`: width and vocabulary from `token_embedding` `[vocab, width]`,
/// MLP width from `c_fc` `[4 w, w]`, positions from `positional_embedding` `[77, w]`, layers = the tower's blocks
/// but the last for SD2.x ([`OPEN_CLIP_PREFIX`]), all of them for SDXL (at least 2 blocks are required: both use the
/// penultimate one).
fn infer_open_clip_text(s: &Shapes, p: &str) -> Result<InferredTextEncoder> {
    let blocks = open_clip_blocks(s, p);
    let sd2 = p == OPEN_CLIP_PREFIX;
    if blocks < 2 {
        return Err(s.err(format!(
            "the OpenCLIP text tower has {blocks} blocks ('{p}transformer.resblocks.N.*'), expected at least 2 \
             ({})",
            if sd2 {
                "SD2 uses all but the last"
            } else {
                "SDXL uses the penultimate one"
            }
        )));
    }
    let token = format!("{p}token_embedding.weight");
    Ok(InferredTextEncoder {
        vocab_size: s.dim(&token, 0)?,
        hidden_size: s.dim(&token, 1)?,
        intermediate_size: s.dim(&format!("{p}transformer.resblocks.0.mlp.c_fc.weight"), 0)?,
        num_hidden_layers: if sd2 { blocks - 1 } else { blocks },
        max_position_embeddings: s.dim(&format!("{p}positional_embedding"), 0)?,
    })
}

/// SDXL's second text encoder: the bigG tower ([`infer_open_clip_text`], every block) and the projection width of
/// `text_projection` `[width, proj]`.
fn infer_sdxl_open_clip_text(s: &Shapes) -> Result<InferredTextEncoder2> {
    let p = SDXL_OPEN_CLIP_PREFIX;
    let text = infer_open_clip_text(s, p)?;
    let key = format!("{p}text_projection");
    match s.get(&key).as_deref() {
        Some(&[w, proj]) if w == text.hidden_size => Ok(InferredTextEncoder2 {
            text,
            projection_dim: proj,
        }),
        Some(shape) => Err(s.err(format!(
            "tensor '{key}' has shape {shape:?}, expected [{}, projection_dim] (the tower's width first)",
            text.hidden_size
        ))),
        None => Err(s.err(format!(
            "expected tensor '{key}' is missing (SDXL's pooled text embedding is projected by it)"
        ))),
    }
}

/// The set of original-layout keys that the three mappings produce for the given diffusers key lists; a helper
/// for checks that every tensor of a file is used.
pub fn mapped_keys<'a>(
    layout: &SingleFileUnetLayout,
    num_vae_up_blocks: usize,
    unet: impl IntoIterator<Item = &'a str>,
    vae: impl IntoIterator<Item = &'a str>,
    text_encoder: impl IntoIterator<Item = &'a str>,
) -> BTreeSet<String> {
    unet.into_iter()
        .map(|k| unet_key(layout, k))
        .chain(vae.into_iter().map(|k| vae_key(num_vae_up_blocks, k)))
        .chain(text_encoder.into_iter().map(clip_key))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Well-known correspondences of the real SD1.5 checkpoint.
    #[test]
    fn sd15_unet_keys() {
        let l = SingleFileUnetLayout::sd15();
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_1.bias", "time_embed.0.bias"),
            ("time_embedding.linear_2.weight", "time_embed.2.weight"),
            (
                "down_blocks.0.resnets.0.norm1.weight",
                "input_blocks.1.0.in_layers.0.weight",
            ),
            (
                "down_blocks.0.resnets.1.conv1.weight",
                "input_blocks.2.0.in_layers.2.weight",
            ),
            (
                "down_blocks.0.attentions.1.proj_in.weight",
                "input_blocks.2.1.proj_in.weight",
            ),
            (
                "down_blocks.0.downsamplers.0.conv.weight",
                "input_blocks.3.0.op.weight",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut.weight",
                "input_blocks.4.0.skip_connection.weight",
            ),
            (
                "down_blocks.1.resnets.0.time_emb_proj.bias",
                "input_blocks.4.0.emb_layers.1.bias",
            ),
            (
                "down_blocks.2.downsamplers.0.conv.bias",
                "input_blocks.9.0.op.bias",
            ),
            (
                "down_blocks.3.resnets.1.conv2.weight",
                "input_blocks.11.0.out_layers.3.weight",
            ),
            (
                "mid_block.resnets.0.norm2.bias",
                "middle_block.0.out_layers.0.bias",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "mid_block.resnets.1.conv1.weight",
                "middle_block.2.in_layers.2.weight",
            ),
            (
                "up_blocks.0.resnets.2.conv2.weight",
                "output_blocks.2.0.out_layers.3.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.attentions.0.norm.weight",
                "output_blocks.3.1.norm.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.bias",
                "output_blocks.5.2.conv.bias",
            ),
            (
                "up_blocks.2.upsamplers.0.conv.weight",
                "output_blocks.8.2.conv.weight",
            ),
            (
                "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight",
                "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
            ),
            ("conv_norm_out.weight", "out.0.weight"),
            ("conv_out.bias", "out.2.bias"),
        ];
        for (diffusers, original) in cases {
            assert_eq!(
                unet_key(&l, diffusers),
                format!("{UNET_PREFIX}{original}"),
                "{diffusers}"
            );
        }
    }

    #[test]
    fn sd15_vae_and_clip_keys() {
        let cases = [
            ("encoder.conv_in.weight", "encoder.conv_in.weight"),
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
                "encoder.down.2.downsample.conv.bias",
            ),
            (
                "encoder.mid_block.resnets.1.norm2.weight",
                "encoder.mid.block_2.norm2.weight",
            ),
            (
                "encoder.mid_block.attentions.0.group_norm.bias",
                "encoder.mid.attn_1.norm.bias",
            ),
            (
                "decoder.mid_block.attentions.0.to_q.weight",
                "decoder.mid.attn_1.q.weight",
            ),
            (
                "decoder.mid_block.attentions.0.value.bias",
                "decoder.mid.attn_1.v.bias",
            ),
            (
                "decoder.mid_block.attentions.0.to_out.0.weight",
                "decoder.mid.attn_1.proj_out.weight",
            ),
            (
                "decoder.mid_block.attentions.0.proj_attn.bias",
                "decoder.mid.attn_1.proj_out.bias",
            ),
            ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
            (
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                "decoder.up.3.block.2.conv1.weight",
            ),
            (
                "decoder.up_blocks.0.upsamplers.0.conv.weight",
                "decoder.up.3.upsample.conv.weight",
            ),
            (
                "decoder.up_blocks.3.resnets.0.conv_shortcut.bias",
                "decoder.up.0.block.0.nin_shortcut.bias",
            ),
            ("quant_conv.weight", "quant_conv.weight"),
            ("post_quant_conv.bias", "post_quant_conv.bias"),
        ];
        for (diffusers, original) in cases {
            assert_eq!(
                vae_key(4, diffusers),
                format!("{VAE_PREFIX}{original}"),
                "{diffusers}"
            );
        }
        let full =
            "cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight";
        assert_eq!(
            clip_key("text_model.encoder.layers.3.self_attn.q_proj.weight"),
            full
        );
        assert_eq!(clip_key("encoder.layers.3.self_attn.q_proj.weight"), full);
    }

    /// Indices beyond the layout are not numbered into the next block.
    #[test]
    fn out_of_range_indices_are_not_aliased() {
        let l = SingleFileUnetLayout::sd15();
        for key in [
            "down_blocks.0.resnets.2.norm1.weight",
            "down_blocks.1.attentions.2.norm.weight",
            "up_blocks.1.resnets.3.conv1.weight",
            "mid_block.resnets.2.conv1.weight",
            "mid_block.attentions.1.norm.weight",
        ] {
            assert_eq!(unet_key(&l, key), format!("{UNET_PREFIX}{key}"));
        }
    }

    #[test]
    fn layout_from_block_types() {
        let l = SingleFileUnetLayout::from_block_types(
            2,
            &[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ],
        );
        assert_eq!(l, SingleFileUnetLayout::sd15());
    }

    /// diffusers' `convert_open_clip_checkpoint` correspondences; layers beyond the text encoder are not aliased
    /// to the tower's unused last block.
    #[test]
    fn sd2_open_clip_keys() {
        use QkvPart::{K, Q, V};
        let r = "transformer.resblocks";
        let cases = [
            (
                "text_model.embeddings.token_embedding.weight",
                "token_embedding.weight".to_string(),
                None,
            ),
            (
                "embeddings.position_embedding.weight",
                "positional_embedding".into(),
                None,
            ),
            (
                "text_model.encoder.layers.1.layer_norm1.bias",
                format!("{r}.1.ln_1.bias"),
                None,
            ),
            (
                "encoder.layers.0.layer_norm2.weight",
                format!("{r}.0.ln_2.weight"),
                None,
            ),
            (
                "text_model.encoder.layers.0.self_attn.q_proj.weight",
                format!("{r}.0.attn.in_proj_weight"),
                Some(Q),
            ),
            (
                "text_model.encoder.layers.1.self_attn.k_proj.bias",
                format!("{r}.1.attn.in_proj_bias"),
                Some(K),
            ),
            (
                "text_model.encoder.layers.22.self_attn.v_proj.weight",
                format!("{r}.22.attn.in_proj_weight"),
                Some(V),
            ),
            (
                "text_model.encoder.layers.3.self_attn.out_proj.bias",
                format!("{r}.3.attn.out_proj.bias"),
                None,
            ),
            (
                "text_model.encoder.layers.0.mlp.fc1.weight",
                format!("{r}.0.mlp.c_fc.weight"),
                None,
            ),
            (
                "text_model.encoder.layers.0.mlp.fc2.bias",
                format!("{r}.0.mlp.c_proj.bias"),
                None,
            ),
            (
                "text_model.final_layer_norm.weight",
                "ln_final.weight".into(),
                None,
            ),
        ];
        for (transformers, stored, part) in cases {
            assert_eq!(
                open_clip_key(23, transformers),
                OpenClipKey {
                    stored: format!("{OPEN_CLIP_PREFIX}{stored}"),
                    part,
                    transposed: false,
                },
                "{transformers}"
            );
        }
        for key in [
            "text_model.encoder.layers.23.layer_norm1.weight",
            "text_model.encoder.layers.0.self_attn.q_proj.lora_A",
            "text_model.embeddings.position_ids",
        ] {
            assert_eq!(
                open_clip_key(23, key),
                OpenClipKey {
                    stored: format!("{OPEN_CLIP_PREFIX}{key}"),
                    part: None,
                    transposed: false,
                }
            );
        }
        // SD2's text encoder is a CLIPTextModel: no projection.
        assert!(!open_clip_key(23, "text_projection.weight").transposed);
        assert!(is_ignorable_key("cond_stage_model.model.text_projection"));
        assert!(is_ignorable_key("cond_stage_model.model.logit_scale"));
        assert!(!is_ignorable_key("cond_stage_model.model.ln_final.weight"));
    }

    /// SDXL: `label_emb` is diffusers' `add_embedding`; the second encoder keeps every block of the bigG tower and
    /// reads `text_projection.weight` transposed; the first is transformers' names under its own prefix.
    #[test]
    fn sdxl_keys() {
        let l = SingleFileUnetLayout::from_block_types(
            2,
            &["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        );
        for (diffusers, original) in [
            ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
            ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
            (
                "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight",
                "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.9.ff.net.2.bias",
                "middle_block.1.transformer_blocks.9.ff.net.2.bias",
            ),
            (
                "up_blocks.0.attentions.2.proj_out.weight",
                "output_blocks.2.1.proj_out.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.weight",
                "output_blocks.5.2.conv.weight",
            ),
            (
                "up_blocks.2.resnets.2.conv2.bias",
                "output_blocks.8.0.out_layers.3.bias",
            ),
            (
                "down_blocks.0.downsamplers.0.conv.weight",
                "input_blocks.3.0.op.weight",
            ),
        ] {
            assert_eq!(
                unet_key(&l, diffusers),
                format!("{UNET_PREFIX}{original}"),
                "{diffusers}"
            );
        }
        assert_eq!(
            unet_key(&l, "add_embedding.linear_3.weight"),
            format!("{UNET_PREFIX}add_embedding.linear_3.weight")
        );
        assert_eq!(
            sdxl_clip_key("encoder.layers.11.mlp.fc2.bias"),
            "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.bias"
        );
        let p = SDXL_OPEN_CLIP_PREFIX;
        assert_eq!(
            sdxl_open_clip_key(32, "text_model.encoder.layers.31.self_attn.v_proj.bias"),
            OpenClipKey {
                stored: format!("{p}transformer.resblocks.31.attn.in_proj_bias"),
                part: Some(QkvPart::V),
                transposed: false,
            }
        );
        assert_eq!(
            sdxl_open_clip_key(32, "text_projection.weight"),
            OpenClipKey {
                stored: format!("{p}text_projection"),
                part: None,
                transposed: true,
            }
        );
        assert_eq!(
            sdxl_open_clip_key(32, "text_model.final_layer_norm.bias").stored,
            format!("{p}ln_final.bias")
        );
        assert_eq!(
            sdxl_open_clip_key(32, "text_model.encoder.layers.32.layer_norm1.weight").stored,
            format!("{p}text_model.encoder.layers.32.layer_norm1.weight")
        );
        assert!(is_ignorable_key(
            "conditioner.embedders.1.model.logit_scale"
        ));
        assert!(!is_ignorable_key(
            "conditioner.embedders.1.model.text_projection"
        ));
        assert!(is_ignorable_key(
            "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
        ));
        assert!(is_ignorable_key("denoiser.sigmas"));
    }

    #[test]
    fn transpose_2d_swaps_rows_and_columns() {
        let raw = RawTensor {
            data: TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]),
            shape: vec![2, 3],
            file: PathBuf::from("f.safetensors"),
            stored_key: "p".into(),
        };
        let t = transpose_2d(raw.clone()).unwrap();
        assert_eq!(t.shape, [3, 2]);
        assert_eq!(
            t.data.to_vec::<f32>().unwrap(),
            [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
        assert_eq!(t.stored_key, "p (transposed)");
        let mut bad = raw;
        bad.shape = vec![6];
        bad.data = TensorData::new(vec![0.0f32; 6], [6]);
        let Err(err) = transpose_2d(bad) else {
            panic!("a vector was transposed");
        };
        let msg = err.to_string();
        assert!(
            msg.contains("f.safetensors") && msg.contains("[6]"),
            "{msg}"
        );
    }
}
