//! diffusers' `UNet2DConditionModel` (the Stable Diffusion 1.5 denoiser), sized entirely by its `config.json`.
//!
//! ```text
//! sample [b, in, h, w] ──conv_in──► down blocks ──► mid block ──► up blocks ──► norm, act, conv_out ──► [b, out, h, w]
//!                                        │  skips (last in, first out)  ▲
//!                                        └──────────────────────────────┘
//! timesteps [b] ──sinusoid (float32)──► time_embedding (linear, act, linear) ──► every ResnetBlock2D
//! encoder_hidden_states [b, tokens, cross_dim] ──► cross-attention of every Transformer2DModel
//! ```
//!
//! Module and tensor names follow diffusers exactly (`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`,
//! ...), so weights load by name from a diffusers `unet/` folder and the attention projections (`to_q`, `to_k`,
//! `to_v`, `to_out.0`) are plain [`Linear`] fields that adapters such as LoRA can reach
//! (see [`UNet2DConditionModel::attentions_mut`]).
//!
//! Supported block types: `CrossAttnDownBlock2D`, `DownBlock2D`, `UNetMidBlock2DCrossAttn` (or no mid block),
//! `CrossAttnUpBlock2D`, `UpBlock2D`, i.e. SD 1.x and SD 2.x UNets. Anything else is rejected with a
//! [`WeightError::Config`] that names the field.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use serde::{Deserialize, Serialize};

pub use crate::nn::Activation;
use crate::nn::{Conv2d, GroupNorm, LayerNorm, Linear, multi_head_attention};
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use alignprop_io::pipeline_files::{component_weights, read_json};
use alignprop_io::weights::{Result, VarBuilder, WeightError};

// ---------------------------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------------------------

/// A config value given either once for all blocks or as a list with one entry per block
/// (diffusers accepts both for `attention_head_dim`, `layers_per_block`, `cross_attention_dim`, ...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// One value per block: the single value repeated `n` times, or the list when it has exactly `n` entries.
    pub fn per_block(&self, n: usize, field: &str) -> std::result::Result<Vec<T>, String> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::Many(v) if v.len() == n => Ok(v.clone()),
            Self::Many(v) => Err(format!(
                "`{field}` has {} entries but the model has {n} blocks",
                v.len()
            )),
        }
    }
}

/// The fields of diffusers' `UNet2DConditionModel` config (`unet/config.json`), read as is.
///
/// Unknown keys (`_class_name`, `_diffusers_version`, ...) are ignored, missing keys take SD1.5's values (so the
/// diffusers-0.6.0 config that SD1.5 ships parses to the same model). Fields for features this port does not have
/// (class/addition embeddings, other attention types, ...) must keep their neutral values; [`Self::validate`]
/// says which one is not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    /// Latent height and width the model was trained on (informative only: any size runs).
    pub sample_size: OneOrMany<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    /// `sample = 2 * sample - 1` before `conv_in`.
    pub center_input_sample: bool,
    /// Timestep sinusoid layout: `[cos, sin]` when true, `[sin, cos]` when false.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the sinusoid: `freq_k = exp(-ln(10000) k / (half - freq_shift))`.
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    /// `None` (JSON `null`) builds no mid block.
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: OneOrMany<bool>,
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: OneOrMany<usize>,
    /// Padding of the stride-2 downsampling convolutions (0 pads right/bottom by one instead, as diffusers).
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets: `(x + h) / mid_block_scale_factor`.
    pub mid_block_scale_factor: f64,
    /// Ignored (inference; dropout is the identity).
    pub dropout: f64,
    /// Activation of resnets, time embedding and output: `silu` (= `swish`), `gelu`, `relu` or `mish`.
    pub act_fn: String,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: OneOrMany<usize>,
    pub transformer_layers_per_block: OneOrMany<usize>,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    /// SD1.5 naming quirk: this is the NUMBER of attention heads per block, not their width.
    pub attention_head_dim: OneOrMany<usize>,
    /// The number of heads under its proper name; takes precedence over `attention_head_dim` when given.
    pub num_attention_heads: Option<OneOrMany<usize>>,
    pub dual_cross_attention: bool,
    /// Transformer `proj_in` / `proj_out` are `Linear` (true, SD2) or 1x1 convolutions (false, SD1).
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    /// `"text_time"` (SDXL): the time embedding gains the projection of `[pooled text, sinusoid(time ids)]`
    /// ([`TextTimeEmbedding`]); `None` (SD 1.x / 2.x) adds nothing.
    pub addition_embed_type: Option<String>,
    /// Width of each time id's sinusoid in the `text_time` embedding (256 for SDXL).
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of the `text_time` embedding: pooled text width + 6 x `addition_time_embed_dim` (2816 for SDXL).
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Ignored (only used by `addition_embed_type = "text"`, which is rejected); diffusers' default 64.
    pub addition_embed_type_num_heads: Option<usize>,
    pub num_class_embeds: Option<usize>,
    /// Attention scores in float32 for half-precision models (SD2.1). SDXL's config says `null` (= false).
    #[serde(deserialize_with = "null_as_default")]
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    /// When true the resnets take the time embedding without the activation.
    pub resnet_skip_time_act: bool,
    /// Output scale of the down/up blocks' resnets: `(x + h) / resnet_out_scale_factor`.
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    /// Width of the time embedding; `None` means `4 * block_out_channels[0]`.
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub attention_type: String,
    pub cross_attention_norm: Option<String>,
}

impl Default for UNet2DConditionConfig {
    /// Stable Diffusion 1.5's `unet/config.json`.
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Self {
            sample_size: OneOrMany::One(64),
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: s(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: s(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: OneOrMany::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: OneOrMany::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: OneOrMany::One(768),
            transformer_layers_per_block: OneOrMany::One(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            addition_embed_type_num_heads: Some(64),
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            attention_type: "default".into(),
            cross_attention_norm: None,
        }
    }
}

/// Reads a JSON `null` as the type's default (diffusers writes `null` for some boolean settings).
fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The per-block values of a config, resolved and checked.
#[derive(Clone, Debug)]
struct Plan {
    act: Activation,
    heads: Vec<usize>,
    layers: Vec<usize>,
    cross_dims: Vec<usize>,
    transformer_layers: Vec<usize>,
    down_cross: Vec<bool>,
    up_cross: Vec<bool>,
    mid: bool,
    time_embed_dim: usize,
    /// `text_time`: (`addition_time_embed_dim`, `projection_class_embeddings_input_dim`).
    text_time: Option<(usize, usize)>,
}

impl UNet2DConditionConfig {
    /// Checks that this config describes a model this port can build; the message names the offending field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.plan().map(|_| ())
    }

    fn plan(&self) -> std::result::Result<Plan, String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("`block_out_channels` is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "`down_block_types` ({}) and `up_block_types` ({}) must have one entry per `block_out_channels` ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        let unsupported = |field: &str, value: &dyn std::fmt::Debug| {
            Err(format!(
                "unsupported `{field}` = {value:?} (this port implements SD 1.x / 2.x / SDXL UNets only)"
            ))
        };
        let down_cross = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                other => Err(format!(
                    "unsupported down block type '{other}' in `down_block_types` (supported: CrossAttnDownBlock2D, \
                     DownBlock2D)"
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let up_cross = self
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(true),
                "UpBlock2D" => Ok(false),
                other => Err(format!(
                    "unsupported up block type '{other}' in `up_block_types` (supported: CrossAttnUpBlock2D, UpBlock2D)"
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mid = match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => true,
            None => false,
            Some(other) => {
                return Err(format!(
                    "unsupported mid block type '{other}' in `mid_block_type` (supported: UNetMidBlock2DCrossAttn, null)"
                ));
            }
        };
        let act = Activation::from_name(&self.act_fn).ok_or_else(|| {
            format!(
                "unsupported `act_fn` '{}' (supported: silu, swish, gelu, relu, mish)",
                self.act_fn
            )
        })?;
        if self
            .only_cross_attention
            .per_block(n, "only_cross_attention")?
            .contains(&true)
        {
            return unsupported("only_cross_attention", &self.only_cross_attention);
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention", &true);
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            return unsupported("class_embed_type", &self.class_embed_type);
        }
        let text_time = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let (Some(time_dim), Some(input_dim)) = (
                    self.addition_time_embed_dim,
                    self.projection_class_embeddings_input_dim,
                ) else {
                    return Err(
                        "`addition_embed_type` \"text_time\" needs `addition_time_embed_dim` and \
                         `projection_class_embeddings_input_dim`"
                            .into(),
                    );
                };
                if time_dim == 0 || input_dim <= TIME_IDS * time_dim {
                    return Err(format!(
                        "`projection_class_embeddings_input_dim` = {input_dim} must exceed {TIME_IDS} x \
                         `addition_time_embed_dim` ({time_dim}): it is the pooled text width plus the time ids' width"
                    ));
                }
                Some((time_dim, input_dim))
            }
            Some(other) => {
                return Err(format!(
                    "unsupported `addition_embed_type` '{other}' (supported: \"text_time\" (SDXL), null)"
                ));
            }
        };
        if self.encoder_hid_dim.is_some() || self.encoder_hid_dim_type.is_some() {
            return unsupported("encoder_hid_dim_type", &self.encoder_hid_dim_type);
        }
        if self
            .reverse_transformer_layers_per_block
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return unsupported(
                "reverse_transformer_layers_per_block",
                &self.reverse_transformer_layers_per_block,
            );
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported("resnet_time_scale_shift", &self.resnet_time_scale_shift);
        }
        if self.time_embedding_type != "positional" {
            return unsupported("time_embedding_type", &self.time_embedding_type);
        }
        if self.time_embedding_act_fn.is_some() {
            return unsupported("time_embedding_act_fn", &self.time_embedding_act_fn);
        }
        if self.timestep_post_act.is_some() {
            return unsupported("timestep_post_act", &self.timestep_post_act);
        }
        if self.time_cond_proj_dim.is_some() {
            return unsupported("time_cond_proj_dim", &self.time_cond_proj_dim);
        }
        if self.attention_type != "default" {
            return unsupported("attention_type", &self.attention_type);
        }
        if self.cross_attention_norm.is_some() {
            return unsupported("cross_attention_norm", &self.cross_attention_norm);
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return Err("`conv_in_kernel` and `conv_out_kernel` must be odd".into());
        }
        let heads = match &self.num_attention_heads {
            Some(h) => h.per_block(n, "num_attention_heads")?,
            None => self.attention_head_dim.per_block(n, "attention_head_dim")?,
        };
        if heads.contains(&0) {
            return Err("the number of attention heads must be positive".into());
        }
        let groups = self.norm_num_groups;
        if groups == 0 || self.block_out_channels.iter().any(|c| c % groups != 0) {
            return Err(format!(
                "`norm_num_groups` = {groups} must divide every entry of `block_out_channels` {:?}",
                self.block_out_channels
            ));
        }
        Ok(Plan {
            act,
            heads,
            layers: self.layers_per_block.per_block(n, "layers_per_block")?,
            cross_dims: self
                .cross_attention_dim
                .per_block(n, "cross_attention_dim")?,
            transformer_layers: self
                .transformer_layers_per_block
                .per_block(n, "transformer_layers_per_block")?,
            down_cross,
            up_cross,
            mid,
            time_embed_dim: self
                .time_embedding_dim
                .unwrap_or(4 * self.block_out_channels[0]),
            text_time,
        })
    }
}

fn config_error(path: impl Into<PathBuf>, msg: String) -> WeightError {
    WeightError::Config {
        path: path.into(),
        msg,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Small pieces
// ---------------------------------------------------------------------------------------------------------------

/// Sinusoidal timestep features (diffusers `Timesteps` / `get_timestep_embedding`), computed in float32 whatever
/// the model's dtype, exactly as diffusers does, and returned in float32 (the caller casts).
#[derive(Clone, Debug, PartialEq)]
pub struct Timesteps {
    /// Output width (`block_out_channels[0]`).
    pub num_channels: usize,
    /// `[cos, sin]` instead of `[sin, cos]`.
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
    /// 10000.
    pub max_period: f64,
}

impl Timesteps {
    /// The `num_channels / 2` frequencies `exp(-ln(max_period) k / (half - shift))`, with diffusers' float32
    /// rounding steps.
    pub fn frequencies(&self) -> Vec<f32> {
        let half = self.num_channels / 2;
        let log_period = -(self.max_period.ln()) as f32;
        let denom = (half as f64 - self.downscale_freq_shift) as f32;
        (0..half)
            .map(|k| (k as f32 * log_period / denom).exp())
            .collect()
    }

    /// `timesteps`: `[batch]` (any float dtype, fractional values allowed) -> `[batch, num_channels]` float32.
    pub fn forward<B: Backend>(&self, timesteps: Tensor<B, 1>) -> Tensor<B, 2> {
        let [n] = timesteps.dims();
        let device = timesteps.device();
        let half = self.num_channels / 2;
        let t = timesteps.cast(DType::F32).reshape([n, 1]);
        let freqs = Tensor::<B, 2>::from_data(
            TensorData::new(self.frequencies(), [1, half]),
            (&device, DType::F32),
        );
        let arg = t * freqs;
        let (sin, cos) = (arg.clone().sin(), arg.cos());
        let mut parts = if self.flip_sin_to_cos {
            vec![cos, sin]
        } else {
            vec![sin, cos]
        };
        if self.num_channels % 2 == 1 {
            parts.push(Tensor::zeros([n, 1], (&device, DType::F32)));
        }
        Tensor::cat(parts, 1)
    }
}

/// The time-embedding MLP: `linear_2(act(linear_1(x)))`.
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
    pub act: Activation,
}

impl<B: Backend> TimestepEmbedding<B> {
    pub fn new(
        vb: &VarBuilder<B>,
        in_dim: usize,
        embed_dim: usize,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(&vb.pp("linear_1"), in_dim, embed_dim, true)?,
            linear_2: Linear::new(&vb.pp("linear_2"), embed_dim, embed_dim, true)?,
            act,
        })
    }

    /// `[batch, in_dim]` -> `[batch, embed_dim]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.linear_2
            .forward(self.act.forward(self.linear_1.forward(x)))
    }
}

/// Number of SDXL time ids: original height and width, crop top and left, target height and width.
pub const TIME_IDS: usize = 6;

/// SDXL's extra conditioning (diffusers' `added_cond_kwargs` for `addition_embed_type = "text_time"`).
#[derive(Clone, Debug)]
pub struct TextTimeCond<B: Backend> {
    /// `[batch, pooled_width]`: the projected pooled output of the second text encoder (`text_embeds`).
    pub text_embeds: Tensor<B, 2>,
    /// `[batch, 6]`: `(original_h, original_w, crop_top, crop_left, target_h, target_w)` in pixels (`time_ids`).
    pub time_ids: Tensor<B, 2>,
}

impl<B: Backend> TextTimeCond<B> {
    /// The time ids of one image size for a batch: `[batch, 6]` in `dtype`, from `[original_h, original_w,
    /// crop_top, crop_left, target_h, target_w]` (what diffusers' `_get_add_time_ids` builds).
    pub fn time_ids(
        ids: [f64; TIME_IDS],
        batch: usize,
        device: &B::Device,
        dtype: DType,
    ) -> Tensor<B, 2> {
        let row: Vec<f64> = ids.to_vec();
        let data: Vec<f64> = (0..batch).flat_map(|_| row.iter().copied()).collect();
        Tensor::<B, 2>::from_data(
            TensorData::new(data, [batch, TIME_IDS]),
            (device, DType::F64),
        )
        .cast(dtype)
    }

    /// The rows of `self` followed by the rows of `other` (classifier-free guidance batches `[uncond; cond]`).
    pub fn cat(&self, other: &Self) -> Self {
        Self {
            text_embeds: Tensor::cat(vec![self.text_embeds.clone(), other.text_embeds.clone()], 0),
            time_ids: Tensor::cat(vec![self.time_ids.clone(), other.time_ids.clone()], 0),
        }
    }

    /// Rows repeated to `batch` when this holds a single one (or `batch` already).
    fn for_batch(&self, batch: usize) -> Self {
        let n = self.text_embeds.dims()[0];
        assert_eq!(
            self.time_ids.dims(),
            [n, TIME_IDS],
            "time_ids must be [batch, {TIME_IDS}] with the batch of text_embeds ({n})"
        );
        if n == batch {
            return self.clone();
        }
        assert!(
            n == 1,
            "text_embeds has {n} rows for a batch of {batch} (give one per sample or a single one)"
        );
        Self {
            text_embeds: self.text_embeds.clone().repeat_dim(0, batch),
            time_ids: self.time_ids.clone().repeat_dim(0, batch),
        }
    }
}

/// diffusers' `text_time` addition embedding (SDXL): `add_embedding(cat[text_embeds, add_time_proj(time_ids)])`,
/// added to the time embedding before the resnets see it.
///
/// `add_time_proj` is a [`Timesteps`] sinusoid of width `addition_time_embed_dim` applied to each of the 6 time ids
/// (in float32, as diffusers), `add_embedding` a [`TimestepEmbedding`] (always SiLU, whatever the UNet's `act_fn`)
/// from `projection_class_embeddings_input_dim` to the time-embedding width.
#[derive(Module, Debug)]
pub struct TextTimeEmbedding<B: Backend> {
    pub add_time_proj: Timesteps,
    pub add_embedding: TimestepEmbedding<B>,
}

impl<B: Backend> TextTimeEmbedding<B> {
    /// `text_embeds` `[b, pooled]`, `time_ids` `[b, 6]` -> `[b, time_embed_dim]` in the dtype of `text_embeds`.
    pub fn forward(&self, cond: &TextTimeCond<B>) -> Tensor<B, 2> {
        let [b, pooled] = cond.text_embeds.dims();
        let dtype = cond.text_embeds.dtype();
        let width = self.add_time_proj.num_channels;
        let expected = self.add_embedding.linear_1.weight.dims()[1];
        assert_eq!(
            pooled + TIME_IDS * width,
            expected,
            "text_embeds has {pooled} channels: the UNet's add_embedding takes {expected} = pooled width + \
             {TIME_IDS} x {width}"
        );
        let ids = cond.time_ids.clone().reshape([b * TIME_IDS]);
        let time = self
            .add_time_proj
            .forward(ids)
            .reshape([b, TIME_IDS * width])
            .cast(dtype);
        self.add_embedding
            .forward(Tensor::cat(vec![cond.text_embeds.clone(), time], 1))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Attention, transformer
// ---------------------------------------------------------------------------------------------------------------

/// diffusers' `Attention` (processor `AttnProcessor2_0`): multi-head scaled dot-product attention with
/// bias-free `to_q`, `to_k`, `to_v` and a biased output projection `to_out.0`; scale `1 / sqrt(head_dim)`.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[inner, query_dim]`, no bias.
    pub to_q: Linear<B>,
    /// `[inner, context_dim]`, no bias.
    pub to_k: Linear<B>,
    /// `[inner, context_dim]`, no bias.
    pub to_v: Linear<B>,
    /// `to_out.0`: `[query_dim, inner]` with bias.
    pub to_out: Linear<B>,
    pub heads: usize,
    /// Compute the attention in float32 when the model runs in half precision.
    pub upcast: bool,
}

impl<B: Backend> Attention<B> {
    /// `context_dim`: `None` for self-attention (keys and values from the queries' tokens).
    pub fn new(
        vb: &VarBuilder<B>,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let ctx = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: Linear::new(&vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::new(&vb.pp("to_k"), ctx, inner, false)?,
            to_v: Linear::new(&vb.pp("to_v"), ctx, inner, false)?,
            to_out: Linear::new(&vb.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
            upcast,
        })
    }

    /// `x`: `[batch, tokens, query_dim]`; `context`: `[batch, context_tokens, context_dim]` or `None` for
    /// self-attention. Returns `[batch, tokens, query_dim]`.
    pub fn forward(&self, x: Tensor<B, 3>, context: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let context = context.unwrap_or_else(|| x.clone());
        let q = self.to_q.forward(x);
        let k = self.to_k.forward(context.clone());
        let v = self.to_v.forward(context);
        let dtype = q.dtype();
        let out = if self.upcast && matches!(dtype, DType::F16 | DType::BF16) {
            let f = |t: Tensor<B, 3>| t.cast(DType::F32);
            multi_head_attention(f(q), f(k), f(v), self.heads, false).cast(dtype)
        } else {
            multi_head_attention(q, k, v, self.heads, false)
        };
        self.to_out.forward(out)
    }
}

/// The GEGLU projection `ff.net.0`: `proj` to twice the width, split into `hidden, gate`, `hidden * gelu(gate)`.
#[derive(Module, Debug)]
pub struct GEGLU<B: Backend> {
    /// `[2 * inner, dim]` with bias.
    pub proj: Linear<B>,
}

impl<B: Backend> GEGLU<B> {
    pub fn new(vb: &VarBuilder<B>, dim: usize, inner: usize) -> Result<Self> {
        Ok(Self {
            proj: Linear::new(&vb.pp("proj"), dim, 2 * inner, true)?,
        })
    }

    /// `[batch, tokens, dim]` -> `[batch, tokens, inner]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.proj.forward(x);
        let [b, t, w] = h.dims();
        let inner = w / 2;
        alignprop_kernels::geglu(h.reshape([b * t, w])).reshape([b, t, inner])
    }
}

/// diffusers' `FeedForward` with `activation_fn = "geglu"`, `mult = 4`: `net.2(net.0(x))` (`net.1` is dropout).
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// `net.0`
    pub geglu: GEGLU<B>,
    /// `net.2`: `[dim, inner]`
    pub out: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    pub fn new(vb: &VarBuilder<B>, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        let net = vb.pp("net");
        Ok(Self {
            geglu: GEGLU::new(&net.pp(0), dim, inner)?,
            out: Linear::new(&net.pp(2), inner, dim, true)?,
        })
    }

    /// `[batch, tokens, dim]` -> `[batch, tokens, dim]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.out.forward(self.geglu.forward(x))
    }
}

/// diffusers' `BasicTransformerBlock` (pre-LayerNorm): self-attention, cross-attention, GEGLU feed-forward,
/// each with a residual connection.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn1: Attention<B>,
    pub norm2: LayerNorm<B>,
    pub attn2: Attention<B>,
    pub norm3: LayerNorm<B>,
    pub ff: FeedForward<B>,
}

impl<B: Backend> BasicTransformerBlock<B> {
    pub fn new(
        vb: &VarBuilder<B>,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        const LN_EPS: f64 = 1e-5;
        Ok(Self {
            norm1: LayerNorm::new(&vb.pp("norm1"), dim, LN_EPS)?,
            attn1: Attention::new(&vb.pp("attn1"), dim, None, heads, head_dim, upcast)?,
            norm2: LayerNorm::new(&vb.pp("norm2"), dim, LN_EPS)?,
            attn2: Attention::new(
                &vb.pp("attn2"),
                dim,
                Some(cross_dim),
                heads,
                head_dim,
                upcast,
            )?,
            norm3: LayerNorm::new(&vb.pp("norm3"), dim, LN_EPS)?,
            ff: FeedForward::new(&vb.pp("ff"), dim)?,
        })
    }

    /// `x`: `[batch, tokens, dim]`; `context`: `[batch, context_tokens, cross_dim]`. Same shape out.
    pub fn forward(&self, x: Tensor<B, 3>, context: &Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.attn1.forward(self.norm1.forward(x.clone()), None) + x;
        let x = self
            .attn2
            .forward(self.norm2.forward(x.clone()), Some(context.clone()))
            + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}

/// diffusers' `Transformer2DModel` on a feature map: GroupNorm (eps 1e-6), `proj_in`, transformer blocks over the
/// `h * w` tokens, `proj_out`, plus the input.
///
/// `proj_in` / `proj_out` are `Linear` layers when `use_linear_projection` (SD2) and 1x1 convolutions otherwise
/// (SD1). A 1x1 convolution is the same linear map applied to every pixel's channel vector, so both are held as a
/// [`Linear`] applied to the tokens; for the convolution form its weight is the file's `[out, in, 1, 1]` tensor
/// read as `[out, in]` (same numbers, same order).
#[derive(Module, Debug)]
pub struct Transformer2DModel<B: Backend> {
    pub norm: GroupNorm<B>,
    pub proj_in: Linear<B>,
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    pub proj_out: Linear<B>,
    /// Whether the projections are stored as `Linear` (`[out, in]`) or as 1x1 convolutions (`[out, in, 1, 1]`).
    pub use_linear_projection: bool,
}

impl<B: Backend> Transformer2DModel<B> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: &VarBuilder<B>,
        channels: usize,
        heads: usize,
        layers: usize,
        cross_dim: usize,
        groups: usize,
        use_linear_projection: bool,
        upcast: bool,
    ) -> Result<Self> {
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        let blocks = vb.pp("transformer_blocks");
        Ok(Self {
            norm: GroupNorm::new(&vb.pp("norm"), groups, channels, 1e-6)?,
            proj_in: Linear::new(&vb.pp("proj_in"), channels, inner, true)?,
            transformer_blocks: (0..layers)
                .map(|i| {
                    BasicTransformerBlock::new(
                        &blocks.pp(i),
                        inner,
                        heads,
                        head_dim,
                        cross_dim,
                        upcast,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: Linear::new(&vb.pp("proj_out"), inner, channels, true)?,
            use_linear_projection,
        })
    }

    /// `x`: `[batch, channels, h, w]`; `context`: `[batch, context_tokens, cross_dim]`. Same shape out.
    pub fn forward(&self, x: Tensor<B, 4>, context: &Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let tokens =
            alignprop_kernels::swap_last2(self.norm.forward(x.clone()).reshape([b, c, h * w]));
        let mut t = self.proj_in.forward(tokens);
        for block in &self.transformer_blocks {
            t = block.forward(t, context);
        }
        let t = self.proj_out.forward(t);
        alignprop_kernels::swap_last2(t).reshape([b, c, h, w]) + x
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Blocks
// ---------------------------------------------------------------------------------------------------------------

/// Settings shared by every block of one UNet.
#[derive(Clone, Copy, Debug)]
struct BlockSettings {
    temb: usize,
    groups: usize,
    eps: f64,
    act: Activation,
    resnet_scale: f64,
    linear_projection: bool,
    upcast: bool,
}

impl BlockSettings {
    /// The settings of a resnet with `out_channels` outputs.
    fn resnet(&self, out_channels: usize) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            out_channels,
            temb_channels: Some(self.temb),
            groups: self.groups,
            eps: self.eps,
            act: self.act,
            output_scale_factor: self.resnet_scale,
        }
    }
}

/// The attention part of a cross-attention block: heads, transformer depth and context width.
#[derive(Clone, Copy, Debug)]
struct AttnSettings {
    heads: usize,
    layers: usize,
    cross_dim: usize,
}

fn transformers<B: Backend>(
    vb: &VarBuilder<B>,
    count: usize,
    channels: usize,
    s: &BlockSettings,
    a: &AttnSettings,
) -> Result<Vec<Transformer2DModel<B>>> {
    let vb = vb.pp("attentions");
    (0..count)
        .map(|j| {
            Transformer2DModel::new(
                &vb.pp(j),
                channels,
                a.heads,
                a.layers,
                a.cross_dim,
                s.groups,
                s.linear_projection,
                s.upcast,
            )
        })
        .collect()
}

/// Up-block resnets: resnet `j` takes the previous hidden state concatenated with one skip connection.
fn up_resnets<B: Backend>(
    vb: &VarBuilder<B>,
    layers: usize,
    in_c: usize,
    prev_c: usize,
    out_c: usize,
    s: &BlockSettings,
) -> Result<Vec<ResnetBlock2D<B>>> {
    let vb = vb.pp("resnets");
    (0..layers)
        .map(|j| {
            let skip_c = if j == layers - 1 { in_c } else { out_c };
            let c_in = if j == 0 { prev_c } else { out_c };
            ResnetBlock2D::new(&vb.pp(j), c_in + skip_c, &s.resnet(out_c))
        })
        .collect()
}

fn downsampler<B: Backend>(
    vb: &VarBuilder<B>,
    add: bool,
    c: usize,
    padding: usize,
) -> Result<Option<Downsample2D<B>>> {
    add.then(|| Downsample2D::new(&vb.pp("downsamplers").pp(0), c, padding))
        .transpose()
}

fn upsampler<B: Backend>(vb: &VarBuilder<B>, add: bool, c: usize) -> Result<Option<Upsample2D<B>>> {
    add.then(|| Upsample2D::new(&vb.pp("upsamplers").pp(0), c))
        .transpose()
}

/// diffusers' `DownBlock2D`: resnets, then an optional downsampler.
#[derive(Module, Debug)]
pub struct DownBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// `downsamplers.0`
    pub downsampler: Option<Downsample2D<B>>,
}

impl<B: Backend> DownBlock2D<B> {
    /// `x`: `[batch, in, h, w]` -> `[batch, out, h', w']`; pushes every resnet's output and the downsampler's
    /// output onto `skips`.
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        skips: &mut Vec<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        for resnet in &self.resnets {
            x = resnet.forward(x, Some(temb));
            skips.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(x);
            skips.push(x.clone());
        }
        x
    }
}

/// diffusers' `CrossAttnDownBlock2D`: (resnet, transformer) pairs, then an optional downsampler.
#[derive(Module, Debug)]
pub struct CrossAttnDownBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
    /// `downsamplers.0`
    pub downsampler: Option<Downsample2D<B>>,
}

impl<B: Backend> CrossAttnDownBlock2D<B> {
    /// `x`: `[batch, in, h, w]`, `context`: `[batch, tokens, cross_dim]` -> `[batch, out, h', w']`; pushes every
    /// (resnet, transformer) output and the downsampler's output onto `skips`.
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        skips: &mut Vec<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            x = attn.forward(resnet.forward(x, Some(temb)), context);
            skips.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(x);
            skips.push(x.clone());
        }
        x
    }
}

/// A down block of either kind.
#[derive(Module, Debug)]
pub enum DownBlock<B: Backend> {
    CrossAttn(CrossAttnDownBlock2D<B>),
    Plain(DownBlock2D<B>),
}

impl<B: Backend> DownBlock<B> {
    /// See [`CrossAttnDownBlock2D::forward`] and [`DownBlock2D::forward`].
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        skips: &mut Vec<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        match self {
            Self::CrossAttn(b) => b.forward(x, temb, context, skips),
            Self::Plain(b) => b.forward(x, temb, skips),
        }
    }
}

/// diffusers' `UpBlock2D`: resnets over `cat([h, skip])`, then an optional upsampler.
#[derive(Module, Debug)]
pub struct UpBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// `upsamplers.0`
    pub upsampler: Option<Upsample2D<B>>,
}

impl<B: Backend> UpBlock2D<B> {
    /// `x`: `[batch, prev, h, w]`; `skips`: this block's skip connections in the order they were pushed (one per
    /// resnet, consumed from the last); `upsample_size`: see [`Upsample2D::forward`].
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        mut skips: Vec<Tensor<B, 4>>,
        temb: &Tensor<B, 2>,
        upsample_size: Option<[usize; 2]>,
    ) -> Tensor<B, 4> {
        for resnet in &self.resnets {
            let skip = skips
                .pop()
                .expect("one skip connection per up-block resnet");
            x = resnet.forward(alignprop_kernels::cat_channels(x, skip), Some(temb));
        }
        match &self.upsampler {
            Some(up) => up.forward(x, upsample_size),
            None => x,
        }
    }
}

/// diffusers' `CrossAttnUpBlock2D`: (resnet over `cat([h, skip])`, transformer) pairs, then an optional upsampler.
#[derive(Module, Debug)]
pub struct CrossAttnUpBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
    /// `upsamplers.0`
    pub upsampler: Option<Upsample2D<B>>,
}

impl<B: Backend> CrossAttnUpBlock2D<B> {
    /// As [`UpBlock2D::forward`], with `context`: `[batch, tokens, cross_dim]`.
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        mut skips: Vec<Tensor<B, 4>>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        upsample_size: Option<[usize; 2]>,
    ) -> Tensor<B, 4> {
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            let skip = skips
                .pop()
                .expect("one skip connection per up-block resnet");
            x = attn.forward(
                resnet.forward(alignprop_kernels::cat_channels(x, skip), Some(temb)),
                context,
            );
        }
        match &self.upsampler {
            Some(up) => up.forward(x, upsample_size),
            None => x,
        }
    }
}

/// An up block of either kind.
#[derive(Module, Debug)]
pub enum UpBlock<B: Backend> {
    CrossAttn(CrossAttnUpBlock2D<B>),
    Plain(UpBlock2D<B>),
}

impl<B: Backend> UpBlock<B> {
    /// Number of resnets, i.e. of skip connections this block consumes.
    pub fn num_resnets(&self) -> usize {
        match self {
            Self::CrossAttn(b) => b.resnets.len(),
            Self::Plain(b) => b.resnets.len(),
        }
    }

    /// See [`CrossAttnUpBlock2D::forward`] and [`UpBlock2D::forward`].
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        skips: Vec<Tensor<B, 4>>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        upsample_size: Option<[usize; 2]>,
    ) -> Tensor<B, 4> {
        match self {
            Self::CrossAttn(b) => b.forward(x, skips, temb, context, upsample_size),
            Self::Plain(b) => b.forward(x, skips, temb, upsample_size),
        }
    }
}

/// diffusers' `UNetMidBlock2DCrossAttn`: `resnets[0]`, then (transformer, resnet) pairs.
#[derive(Module, Debug)]
pub struct UNetMidBlock2DCrossAttn<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
}

impl<B: Backend> UNetMidBlock2DCrossAttn<B> {
    /// `x`: `[batch, c, h, w]`, `context`: `[batch, tokens, cross_dim]`. Same shape out.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, Some(temb));
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet.forward(attn.forward(x, context), Some(temb));
        }
        x
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------------------------

/// diffusers' `UNet2DConditionModel`: predicts the noise of `sample` at `timesteps`, conditioned on text states.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub time_proj: Timesteps,
    pub time_embedding: TimestepEmbedding<B>,
    /// SDXL's `text_time` addition embedding (`add_time_proj`, `add_embedding`); `None` for SD 1.x / 2.x.
    pub add_embedding: Option<TextTimeEmbedding<B>>,
    pub down_blocks: Vec<DownBlock<B>>,
    pub mid_block: Option<UNetMidBlock2DCrossAttn<B>>,
    pub up_blocks: Vec<UpBlock<B>>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
    pub act: Activation,
    pub center_input_sample: bool,
    /// The resnets get the time embedding without the activation (`resnet_skip_time_act`).
    pub skip_time_act: bool,
}

/// Intermediate results of one forward pass (the outputs diffusers' forward hooks see), for debugging and
/// parity tests.
#[derive(Clone, Debug)]
pub struct UNetTrace<B: Backend> {
    /// `[batch, block_out_channels[0]]`, float32.
    pub time_proj: Tensor<B, 2>,
    /// `[batch, time_embed_dim]`, before the activation (without the addition embedding).
    pub time_embedding: Tensor<B, 2>,
    /// `[batch, time_embed_dim]`: the `text_time` addition embedding (`add_embedding`'s output), SDXL only.
    pub add_embedding: Option<Tensor<B, 2>>,
    pub conv_in: Tensor<B, 4>,
    /// The hidden state after each down block (including its downsampler).
    pub down_blocks: Vec<Tensor<B, 4>>,
    pub mid_block: Option<Tensor<B, 4>>,
    /// The hidden state after each up block (including its upsampler).
    pub up_blocks: Vec<Tensor<B, 4>>,
    /// Before the activation.
    pub conv_norm_out: Tensor<B, 4>,
    pub conv_out: Tensor<B, 4>,
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// Builds the model described by `cfg`, reading (or randomly initialising) every tensor through `vb` under
    /// diffusers' names.
    pub fn new(cfg: &UNet2DConditionConfig, vb: &VarBuilder<B>) -> Result<Self> {
        let plan = cfg
            .plan()
            .map_err(|msg| config_error("UNet2DConditionConfig", msg))?;
        let channels = &cfg.block_out_channels;
        let n = channels.len();
        let c0 = channels[0];
        let settings = BlockSettings {
            temb: plan.time_embed_dim,
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            act: plan.act,
            resnet_scale: cfg.resnet_out_scale_factor,
            linear_projection: cfg.use_linear_projection,
            upcast: cfg.upcast_attention,
        };
        let attn = |i: usize, rev: bool| {
            let i = if rev { n - 1 - i } else { i };
            AttnSettings {
                heads: plan.heads[i],
                layers: plan.transformer_layers[i],
                cross_dim: plan.cross_dims[i],
            }
        };

        // Built in the order of the layers (conv_in first), so a mismatched file is reported at its first layer.
        let (k_in, k_out) = (cfg.conv_in_kernel, cfg.conv_out_kernel);
        let conv_in = Conv2d::new(&vb.pp("conv_in"), cfg.in_channels, c0, k_in, 1, k_in / 2)?;
        let time_embedding =
            TimestepEmbedding::new(&vb.pp("time_embedding"), c0, plan.time_embed_dim, plan.act)?;
        let add_embedding = match plan.text_time {
            Some((time_dim, input_dim)) => Some(TextTimeEmbedding {
                add_time_proj: Timesteps {
                    num_channels: time_dim,
                    flip_sin_to_cos: cfg.flip_sin_to_cos,
                    downscale_freq_shift: cfg.freq_shift,
                    max_period: 10000.0,
                },
                add_embedding: TimestepEmbedding::new(
                    &vb.pp("add_embedding"),
                    input_dim,
                    plan.time_embed_dim,
                    Activation::Silu,
                )?,
            }),
            None => None,
        };

        let down_vb = vb.pp("down_blocks");
        let mut down_blocks = Vec::with_capacity(n);
        let mut in_c = c0;
        for (i, &out_c) in channels.iter().enumerate() {
            let vb = down_vb.pp(i);
            let resnets = ResnetBlock2D::stack(&vb, plan.layers[i], in_c, &settings.resnet(out_c))?;
            let downsampler = downsampler(&vb, i + 1 < n, out_c, cfg.downsample_padding)?;
            down_blocks.push(if plan.down_cross[i] {
                DownBlock::CrossAttn(CrossAttnDownBlock2D {
                    attentions: transformers(
                        &vb,
                        resnets.len(),
                        out_c,
                        &settings,
                        &attn(i, false),
                    )?,
                    resnets,
                    downsampler,
                })
            } else {
                DownBlock::Plain(DownBlock2D {
                    resnets,
                    downsampler,
                })
            });
            in_c = out_c;
        }

        let c_last = channels[n - 1];
        let mid_block = if plan.mid {
            let vb = vb.pp("mid_block");
            let mid_settings = BlockSettings {
                resnet_scale: cfg.mid_block_scale_factor,
                ..settings
            };
            Some(UNetMidBlock2DCrossAttn {
                resnets: ResnetBlock2D::stack(&vb, 2, c_last, &mid_settings.resnet(c_last))?,
                attentions: transformers(&vb, 1, c_last, &settings, &attn(n - 1, false))?,
            })
        } else {
            None
        };

        let up_vb = vb.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = channels[n - 1];
        for i in 0..n {
            let (prev_c, vb) = (out_c, up_vb.pp(i));
            out_c = channels[n - 1 - i];
            let in_c = channels[n - 1 - (i + 1).min(n - 1)];
            let layers = plan.layers[n - 1 - i] + 1;
            let resnets = up_resnets(&vb, layers, in_c, prev_c, out_c, &settings)?;
            let upsampler = upsampler(&vb, i + 1 < n, out_c)?;
            up_blocks.push(if plan.up_cross[i] {
                UpBlock::CrossAttn(CrossAttnUpBlock2D {
                    attentions: transformers(&vb, layers, out_c, &settings, &attn(i, true))?,
                    resnets,
                    upsampler,
                })
            } else {
                UpBlock::Plain(UpBlock2D { resnets, upsampler })
            });
        }

        Ok(Self {
            conv_in,
            time_proj: Timesteps {
                num_channels: c0,
                flip_sin_to_cos: cfg.flip_sin_to_cos,
                downscale_freq_shift: cfg.freq_shift,
                max_period: 10000.0,
            },
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &vb.pp("conv_norm_out"),
                cfg.norm_num_groups,
                c0,
                cfg.norm_eps,
            )?,
            conv_out: Conv2d::new(
                &vb.pp("conv_out"),
                c0,
                cfg.out_channels,
                k_out,
                1,
                k_out / 2,
            )?,
            act: plan.act,
            center_input_sample: cfg.center_input_sample,
            skip_time_act: cfg.resnet_skip_time_act,
        })
    }

    /// Loads a diffusers `unet/` folder: `config.json` plus its safetensors weights, converted to `dtype`.
    pub fn load(folder: impl AsRef<Path>, device: &B::Device, dtype: DType) -> Result<Self> {
        let folder = folder.as_ref();
        let cfg_path = folder.join("config.json");
        let cfg: UNet2DConditionConfig = read_json(&cfg_path)?;
        cfg.validate().map_err(|msg| config_error(&cfg_path, msg))?;
        let vb = VarBuilder::from_safetensors(&component_weights(folder)?, device, dtype)?;
        Self::new(&cfg, &vb)
    }

    /// The noise prediction.
    ///
    /// - `sample`: `[batch, in_channels, h, w]` noisy latents (any `h`, `w`, odd ones included);
    /// - `timesteps`: `[batch]` (or `[1]`, broadcast) float timestep values;
    /// - `encoder_hidden_states`: `[batch, tokens, cross_attention_dim]` text states.
    ///
    /// Returns `[batch, out_channels, h, w]`.
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        encoder_hidden_states: Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        self.run(sample, timesteps, encoder_hidden_states, None, None)
    }

    /// [`Self::forward`] with SDXL's `text_time` conditioning (`added`, one row per sample or a single row), which
    /// an SDXL UNet requires and an SD 1.x / 2.x UNet must not be given.
    pub fn forward_added(
        &self,
        sample: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        encoder_hidden_states: Tensor<B, 3>,
        added: Option<&TextTimeCond<B>>,
    ) -> Tensor<B, 4> {
        self.run(sample, timesteps, encoder_hidden_states, added, None)
    }

    /// Whether the model takes SDXL's `text_time` conditioning ([`Self::forward_added`]).
    pub fn needs_text_time(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// [`Self::forward`] with one timestep for the whole batch.
    pub fn forward_with_timestep(
        &self,
        sample: Tensor<B, 4>,
        timestep: f64,
        encoder_hidden_states: Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        self.forward_added_with_timestep(sample, timestep, encoder_hidden_states, None)
    }

    /// [`Self::forward_added`] with one timestep for the whole batch.
    pub fn forward_added_with_timestep(
        &self,
        sample: Tensor<B, 4>,
        timestep: f64,
        encoder_hidden_states: Tensor<B, 3>,
        added: Option<&TextTimeCond<B>>,
    ) -> Tensor<B, 4> {
        let t = Tensor::from_data(
            TensorData::new(vec![timestep as f32], [1]),
            (&sample.device(), DType::F32),
        );
        self.forward_added(sample, t, encoder_hidden_states, added)
    }

    /// [`Self::forward`] that also returns the intermediate results.
    pub fn forward_traced(
        &self,
        sample: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        encoder_hidden_states: Tensor<B, 3>,
        added: Option<&TextTimeCond<B>>,
    ) -> (Tensor<B, 4>, UNetTrace<B>) {
        let mut trace = Vec::new();
        let out = self.run(
            sample,
            timesteps,
            encoder_hidden_states,
            added,
            Some(&mut trace),
        );
        let mut it = trace.into_iter();
        let mut next = || it.next().expect("traced value");
        let time_proj = next().into_2d();
        let time_embedding = next().into_2d();
        let add_embedding = self.add_embedding.as_ref().map(|_| next().into_2d());
        let conv_in = next().into_4d();
        let down_blocks = (0..self.down_blocks.len())
            .map(|_| next().into_4d())
            .collect();
        let mid_block = self.mid_block.as_ref().map(|_| next().into_4d());
        let up_blocks = (0..self.up_blocks.len())
            .map(|_| next().into_4d())
            .collect();
        let conv_norm_out = next().into_4d();
        let conv_out = out.clone();
        let trace = UNetTrace {
            time_proj,
            time_embedding,
            add_embedding,
            conv_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        };
        (out, trace)
    }

    fn run(
        &self,
        sample: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        context: Tensor<B, 3>,
        added: Option<&TextTimeCond<B>>,
        mut trace: Option<&mut Vec<Traced<B>>>,
    ) -> Tensor<B, 4> {
        let [batch, _, _, _] = sample.dims();
        let dtype = sample.dtype();
        let [n_t] = timesteps.dims();
        assert!(
            n_t == batch || n_t == 1,
            "timesteps has {n_t} entries for a batch of {batch} (give one per sample or a single one)"
        );
        let timesteps = if n_t == batch {
            timesteps
        } else {
            timesteps.expand([batch])
        };

        // Time embedding: sinusoid in float32, cast to the model's dtype, then the MLP.
        let t_proj = self.time_proj.forward(timesteps);
        note(&mut trace, || Traced::D2(t_proj.clone()));
        let emb = self.time_embedding.forward(t_proj.cast(dtype));
        note(&mut trace, || Traced::D2(emb.clone()));
        let emb = match (&self.add_embedding, added) {
            (Some(add), Some(cond)) => {
                let aug = add.forward(&cond.for_batch(batch));
                note(&mut trace, || Traced::D2(aug.clone()));
                emb + aug
            }
            (Some(_), None) => panic!(
                "this UNet has a `text_time` addition embedding (SDXL): give the pooled text embeddings and time \
                 ids (forward_added)"
            ),
            (None, Some(_)) => panic!(
                "text_embeds / time_ids given to a UNet without an addition embedding (SD 1.x / 2.x): use forward"
            ),
            (None, None) => emb,
        };
        let temb = if self.skip_time_act {
            emb
        } else {
            self.act.forward(emb)
        };

        let sample = if self.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample
        };
        let mut h = self.conv_in.forward(sample);
        note(&mut trace, || Traced::D4(h.clone()));

        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(h, &temb, &context, &mut skips);
            note(&mut trace, || Traced::D4(h.clone()));
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(h, &temb, &context);
            note(&mut trace, || Traced::D4(h.clone()));
        }
        for block in &self.up_blocks {
            let n = block.num_resnets();
            assert!(
                skips.len() >= n,
                "the down path left fewer skip connections than the up path needs"
            );
            let own = skips.split_off(skips.len() - n);
            // Upsample to the spatial size of the skip connection the next block starts with: 2x, except after
            // odd sizes were downsampled (diffusers' `upsample_size`).
            let size = skips.last().map(|s| {
                let d = s.dims();
                [d[2], d[3]]
            });
            h = block.forward(h, own, &temb, &context, size);
            note(&mut trace, || Traced::D4(h.clone()));
        }

        let h = self.conv_norm_out.forward(h);
        note(&mut trace, || Traced::D4(h.clone()));
        self.conv_out.forward(self.act.forward(h))
    }

    /// Channels of the latents the model takes (4 for SD).
    pub fn in_channels(&self) -> usize {
        self.conv_in.weight.dims()[1]
    }

    /// Every attention module with its diffusers name, read-only (see [`Self::attentions_mut`]).
    pub fn attentions(&self) -> Vec<(String, &Attention<B>)> {
        let mut out = Vec::new();
        for (prefix, transformers) in self.attention_groups() {
            for (j, t) in transformers.iter().enumerate() {
                for (k, block) in t.transformer_blocks.iter().enumerate() {
                    let p = format!("{prefix}.attentions.{j}.transformer_blocks.{k}");
                    out.push((format!("{p}.attn1"), &block.attn1));
                    out.push((format!("{p}.attn2"), &block.attn2));
                }
            }
        }
        out
    }

    /// The transformer stacks of the model with their block prefix (`down_blocks.0`, `mid_block`, ...).
    fn attention_groups(&self) -> Vec<(String, &Vec<Transformer2DModel<B>>)> {
        let mut groups = Vec::new();
        for (i, block) in self.down_blocks.iter().enumerate() {
            if let DownBlock::CrossAttn(b) = block {
                groups.push((format!("down_blocks.{i}"), &b.attentions));
            }
        }
        if let Some(mid) = &self.mid_block {
            groups.push(("mid_block".into(), &mid.attentions));
        }
        for (i, block) in self.up_blocks.iter().enumerate() {
            if let UpBlock::CrossAttn(b) = block {
                groups.push((format!("up_blocks.{i}"), &b.attentions));
            }
        }
        groups
    }

    /// Every attention module with its diffusers name (`down_blocks.0.attentions.0.transformer_blocks.0.attn1`,
    /// ...), in the order of the model's layers: where adapters such as LoRA attach to `to_q`, `to_k`, `to_v`,
    /// `to_out` (= `to_out.0`).
    pub fn attentions_mut(&mut self) -> Vec<(String, &mut Attention<B>)> {
        let mut groups: Vec<(String, &mut Vec<Transformer2DModel<B>>)> = Vec::new();
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            if let DownBlock::CrossAttn(b) = block {
                groups.push((format!("down_blocks.{i}"), &mut b.attentions));
            }
        }
        if let Some(mid) = &mut self.mid_block {
            groups.push(("mid_block".into(), &mut mid.attentions));
        }
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            if let UpBlock::CrossAttn(b) = block {
                groups.push((format!("up_blocks.{i}"), &mut b.attentions));
            }
        }
        let mut out = Vec::new();
        for (prefix, transformers) in groups {
            for (j, t) in transformers.iter_mut().enumerate() {
                for (k, block) in t.transformer_blocks.iter_mut().enumerate() {
                    let p = format!("{prefix}.attentions.{j}.transformer_blocks.{k}");
                    out.push((format!("{p}.attn1"), &mut block.attn1));
                    out.push((format!("{p}.attn2"), &mut block.attn2));
                }
            }
        }
        out
    }
}

/// Records an intermediate when tracing (the closure is not run otherwise).
fn note<B: Backend>(trace: &mut Option<&mut Vec<Traced<B>>>, value: impl FnOnce() -> Traced<B>) {
    if let Some(t) = trace {
        t.push(value());
    }
}

/// A recorded intermediate of [`UNet2DConditionModel::forward_traced`].
enum Traced<B: Backend> {
    D2(Tensor<B, 2>),
    D4(Tensor<B, 4>),
}

impl<B: Backend> Traced<B> {
    fn into_2d(self) -> Tensor<B, 2> {
        match self {
            Self::D2(t) => t,
            Self::D4(_) => unreachable!("trace order"),
        }
    }
    fn into_4d(self) -> Tensor<B, 4> {
        match self {
            Self::D4(t) => t,
            Self::D2(_) => unreachable!("trace order"),
        }
    }
}
