//! OpenCLIP's `CLIP` model (the ViT image tower and the text transformer of `open_clip.model.CLIP`), sized by an
//! open_clip model config (`ViT-H-14.json`: `embed_dim`, `vision_cfg`, `text_cfg`) and loading open_clip's own
//! state-dict names:
//!
//! ```text
//! visual.conv1.weight [width, 3, patch, patch]     visual.class_embedding [width]
//! visual.positional_embedding [grid^2 + 1, width]  visual.ln_pre.{weight,bias}
//! visual.transformer.resblocks.{i}.{ln_1, attn.in_proj_weight [3w, w], attn.in_proj_bias [3w], attn.out_proj,
//!                                   ln_2, mlp.c_fc, mlp.c_proj}
//! visual.ln_post.{weight,bias}                     visual.proj [width, embed_dim]
//! token_embedding.weight [vocab, width]            positional_embedding [context_length, width]
//! transformer.resblocks.{i}.*                      ln_final.{weight,bias}
//! text_projection [width, embed_dim]               logit_scale [] (not used by the rewards)
//! ```
//!
//! The blocks are the CLIP encoder blocks of [`alignprop_diffusion::clip`]: open_clip's fused attention input
//! projection (`in_proj_weight`, rows `q | k | v`) is split into the query, key and value projections when loading,
//! so the image tower is a [`CLIPVisionModel`] and the text tower a [`CLIPTextModel`] whose pooled row is
//! the argmax of the token ids (the end-of-text token, open_clip's `text_global_pool(..., "argmax")`).
//!
//! Checkpoints: safetensors, or a PyTorch file (`.pt`, `.pth`, `.bin`, read without executing pickle code) whose
//! tensors may sit under a `state_dict` entry and a `module.` prefix (the HPSv2 release); see [`open_weights`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use alignprop_diffusion::clip::{
    CLIPActivation, CLIPAttention, CLIPEncoder, CLIPEncoderLayer, CLIPMlp, CLIPTextEmbeddings,
    CLIPTextModel,
};
use alignprop_diffusion::nn::{LayerNorm, Linear, param};
use alignprop_io::VarBuilder;
use alignprop_io::pipeline_files::read_json;
use alignprop_io::weights::{Init, Renamed, Result, SafetensorsSource, TensorSource, WeightError};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clip_vision::CLIPVisionModel;
use alignprop_io::pth::PthSource;

/// open_clip's `CLIPVisionCfg` (the ViT fields; unknown keys are checked by [`OpenClipConfig::validate`]).
/// Defaults are open_clip's dataclass defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OpenClipVisionConfig {
    pub image_size: usize,
    pub layers: usize,
    pub width: usize,
    pub patch_size: usize,
    /// Attention heads are `width / head_width`.
    pub head_width: usize,
    /// The MLP width is `int(width * mlp_ratio)`.
    pub mlp_ratio: f64,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl Default for OpenClipVisionConfig {
    fn default() -> Self {
        Self {
            image_size: 224,
            layers: 12,
            width: 768,
            patch_size: 16,
            head_width: 64,
            mlp_ratio: 4.0,
            other: BTreeMap::new(),
        }
    }
}

/// open_clip's `CLIPTextCfg` (the plain text transformer). Defaults are open_clip's dataclass defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OpenClipTextConfig {
    pub context_length: usize,
    pub vocab_size: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    pub mlp_ratio: f64,
    /// The id that pads token sequences (open_clip's `tokenize` pads with 0).
    pub pad_id: u32,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl Default for OpenClipTextConfig {
    fn default() -> Self {
        Self {
            context_length: 77,
            vocab_size: 49408,
            width: 512,
            heads: 8,
            layers: 12,
            mlp_ratio: 4.0,
            pad_id: 0,
            other: BTreeMap::new(),
        }
    }
}

/// An open_clip model config (`open_clip/model_configs/*.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OpenClipConfig {
    /// Width of the joint image-text embedding.
    pub embed_dim: usize,
    /// `x * sigmoid(1.702 x)` in the MLPs (OpenAI's models) instead of exact GELU (`nn.GELU`, e.g. ViT-H-14).
    pub quick_gelu: bool,
    pub vision_cfg: OpenClipVisionConfig,
    pub text_cfg: OpenClipTextConfig,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl Default for OpenClipConfig {
    fn default() -> Self {
        Self {
            embed_dim: 512,
            quick_gelu: false,
            vision_cfg: OpenClipVisionConfig::default(),
            text_cfg: OpenClipTextConfig::default(),
            other: BTreeMap::new(),
        }
    }
}

/// Options of open_clip configs that change the architecture away from the plain ViT + text transformer built
/// here, each with the only value supported (absent and `null` are accepted too).
const UNSUPPORTED_TOP: &[(&str, &str)] = &[
    ("custom_text", "false"),
    ("init_logit_bias", "null"),
    ("multimodal_cfg", "null"),
];
const UNSUPPORTED_VISION: &[(&str, &str)] = &[
    ("ls_init_value", "null"),
    ("attentional_pool", "false"),
    ("no_ln_pre", "false"),
    ("pos_embed_type", "\"learnable\""),
    ("pool_type", "\"tok\""),
    ("global_average_pool", "false"),
    ("input_patchnorm", "false"),
    ("timm_model_name", "null"),
    ("act_kwargs", "null"),
    ("norm_kwargs", "null"),
    ("block_type", "\"default\""),
    ("qk_norm", "false"),
    ("scaled_cosine_attn", "false"),
    ("scale_heads", "false"),
    ("scale_attn_inner", "false"),
    ("scale_attn", "false"),
    ("scale_fc", "false"),
];
const UNSUPPORTED_TEXT: &[(&str, &str)] = &[
    ("hf_model_name", "null"),
    ("ls_init_value", "null"),
    ("embed_cls", "false"),
    ("pool_type", "\"argmax\""),
    ("proj_bias", "false"),
    ("proj_type", "\"linear\""),
    ("no_causal_mask", "false"),
    ("act_kwargs", "null"),
    ("norm_kwargs", "null"),
    ("block_type", "\"default\""),
    ("qk_norm", "false"),
    ("scaled_cosine_attn", "false"),
    ("scale_heads", "false"),
    ("scale_attn_inner", "false"),
    ("scale_attn", "false"),
    ("scale_fc", "false"),
];

fn check_options(
    section: &str,
    other: &BTreeMap<String, Value>,
    rules: &[(&str, &str)],
) -> std::result::Result<(), String> {
    for (key, supported) in rules {
        let Some(v) = other.get(*key) else { continue };
        let ok: Value = serde_json::from_str(supported).expect("valid rule");
        if !v.is_null() && *v != ok {
            return Err(format!(
                "{section}{key} = {v} is not supported (only {supported}: the plain open_clip ViT / text \
                 transformer is implemented)"
            ));
        }
    }
    Ok(())
}

impl OpenClipConfig {
    /// open_clip's `ViT-H-14.json`, the HPSv2 model: embed 1024; ViT 224 px, patch 14, 32 layers of width 1280,
    /// head width 80 (16 heads); text 24 layers of width 1024, 16 heads; exact GELU.
    pub fn vit_h_14() -> Self {
        Self {
            embed_dim: 1024,
            quick_gelu: false,
            vision_cfg: OpenClipVisionConfig {
                image_size: 224,
                layers: 32,
                width: 1280,
                head_width: 80,
                patch_size: 14,
                ..Default::default()
            },
            text_cfg: OpenClipTextConfig {
                context_length: 77,
                vocab_size: 49408,
                width: 1024,
                heads: 16,
                layers: 24,
                ..Default::default()
            },
            other: BTreeMap::new(),
        }
    }

    /// Reads a model config json and checks it describes a model built here ([`Self::validate`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|msg| WeightError::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        Ok(cfg)
    }

    /// Rejects options that change the architecture (layer scale, attentional pooling, timm / HF towers, ...) and
    /// sizes that do not divide; other unknown keys (training options such as `patch_dropout`) are ignored.
    pub fn validate(&self) -> std::result::Result<(), String> {
        check_options("", &self.other, UNSUPPORTED_TOP)?;
        check_options("vision_cfg.", &self.vision_cfg.other, UNSUPPORTED_VISION)?;
        check_options("text_cfg.", &self.text_cfg.other, UNSUPPORTED_TEXT)?;
        let v = &self.vision_cfg;
        if v.head_width == 0 || !v.width.is_multiple_of(v.head_width) {
            return Err(format!(
                "vision_cfg.width {} is not a multiple of head_width {}",
                v.width, v.head_width
            ));
        }
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return Err(format!(
                "vision_cfg.image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        let t = &self.text_cfg;
        if t.heads == 0 || !t.width.is_multiple_of(t.heads) {
            return Err(format!(
                "text_cfg.width {} is not divisible by heads {}",
                t.width, t.heads
            ));
        }
        Ok(())
    }

    fn activation(&self) -> CLIPActivation {
        if self.quick_gelu {
            CLIPActivation::QuickGelu
        } else {
            CLIPActivation::Gelu
        }
    }
}

/// One open_clip `ResidualAttentionBlock` (`resblocks.{i}`) as a CLIP encoder layer:
/// `x += out_proj(attn(ln_1(x)))`, `x += c_proj(act(c_fc(ln_2(x))))`. `in_proj_weight` `[3 width, width]` and
/// `in_proj_bias` `[3 width]` are split into the query, key and value projections.
pub fn resblock<B: Backend>(
    vb: &VarBuilder<B>,
    width: usize,
    heads: usize,
    mlp_width: usize,
    activation: CLIPActivation,
) -> Result<CLIPEncoderLayer<B>> {
    let attn = vb.pp("attn");
    let w: Tensor<B, 2> = attn.get([3 * width, width], "in_proj_weight", Init::fan_in(width))?;
    let b: Tensor<B, 1> = attn.get([3 * width], "in_proj_bias", Init::Zeros)?;
    let part = |i: usize| Linear {
        weight: param(w.clone().narrow(0, i * width, width)),
        bias: Some(param(b.clone().narrow(0, i * width, width))),
        lora: None,
    };
    Ok(CLIPEncoderLayer {
        layer_norm1: LayerNorm::new(&vb.pp("ln_1"), width, 1e-5)?,
        self_attn: CLIPAttention {
            q_proj: part(0),
            k_proj: part(1),
            v_proj: part(2),
            out_proj: Linear::new(&attn.pp("out_proj"), width, width, true)?,
            num_heads: heads,
        },
        layer_norm2: LayerNorm::new(&vb.pp("ln_2"), width, 1e-5)?,
        mlp: CLIPMlp {
            fc1: Linear::new(&vb.pp("mlp").pp("c_fc"), width, mlp_width, true)?,
            fc2: Linear::new(&vb.pp("mlp").pp("c_proj"), mlp_width, width, true)?,
            activation,
        },
    })
}

/// open_clip's `Transformer` (`transformer.resblocks.*` under `vb`).
pub fn transformer<B: Backend>(
    vb: &VarBuilder<B>,
    width: usize,
    heads: usize,
    layers: usize,
    mlp_ratio: f64,
    activation: CLIPActivation,
) -> Result<CLIPEncoder<B>> {
    let mlp_width = (width as f64 * mlp_ratio) as usize;
    let r = vb.pp("resblocks");
    let layers = (0..layers)
        .map(|i| resblock(&r.pp(i), width, heads, mlp_width, activation))
        .collect::<Result<_>>()?;
    Ok(CLIPEncoder { layers })
}

/// open_clip's `CLIP`: both towers and their projections into the joint embedding.
#[derive(Module, Debug)]
pub struct OpenClip<B: Backend> {
    /// The image tower (`visual.*`); its `visual_projection` is `visual.proj` transposed, `[embed, width]`.
    pub visual: CLIPVisionModel<B>,
    /// The text tower; `eos_token_id` is the legacy value 2, i.e. the pooled row is at the argmax of the ids.
    pub text: CLIPTextModel<B>,
    /// `[text width, embed_dim]` (used as `pooled @ text_projection`).
    pub text_projection: Param<Tensor<B, 2>>,
    pub context_length: usize,
    pub pad_id: u32,
}

impl<B: Backend> OpenClip<B> {
    /// Builds the model from `vb` at the root of an open_clip state dict (`visual.*`, `token_embedding.*`, ...).
    pub fn new(cfg: &OpenClipConfig, vb: &VarBuilder<B>) -> Result<Self> {
        cfg.validate().map_err(|msg| WeightError::Config {
            path: "open_clip config".into(),
            msg,
        })?;
        let act = cfg.activation();
        let (v, t) = (&cfg.vision_cfg, &cfg.text_cfg);
        let (w, p) = (v.width, v.patch_size);
        let n_pos = (v.image_size / p).pow(2) + 1;
        let vis = vb.pp("visual");
        let proj: Tensor<B, 2> = vis.get(
            [w, cfg.embed_dim],
            "proj",
            Init::Normal((w as f64).powf(-0.5)),
        )?;
        let visual = CLIPVisionModel {
            class_embedding: param(vis.get(
                [w],
                "class_embedding",
                Init::Normal((w as f64).powf(-0.5)),
            )?),
            patch_embedding: param(vis.pp("conv1").get(
                [w, 3, p, p],
                "weight",
                Init::fan_in(3 * p * p),
            )?),
            position_embedding: param(vis.get(
                [n_pos, w],
                "positional_embedding",
                Init::Normal((w as f64).powf(-0.5)),
            )?),
            pre_layrnorm: LayerNorm::new(&vis.pp("ln_pre"), w, 1e-5)?,
            encoder: transformer(
                &vis.pp("transformer"),
                w,
                w / v.head_width,
                v.layers,
                v.mlp_ratio,
                act,
            )?,
            post_layernorm: LayerNorm::new(&vis.pp("ln_post"), w, 1e-5)?,
            visual_projection: param(proj.transpose()),
            patch_size: p,
            image_size: v.image_size,
        };
        let tw = t.width;
        let text = CLIPTextModel {
            embeddings: CLIPTextEmbeddings {
                token_embedding: param(vb.pp("token_embedding").get(
                    [t.vocab_size, tw],
                    "weight",
                    Init::Normal(0.02),
                )?),
                position_embedding: param(vb.get(
                    [t.context_length, tw],
                    "positional_embedding",
                    Init::Normal(0.01),
                )?),
            },
            encoder: transformer(
                &vb.pp("transformer"),
                tw,
                t.heads,
                t.layers,
                t.mlp_ratio,
                act,
            )?,
            final_layer_norm: LayerNorm::new(&vb.pp("ln_final"), tw, 1e-5)?,
            // transformers' legacy value: pool at the argmax of the ids, as open_clip's `text.argmax(dim=-1)`.
            eos_token_id: 2,
        };
        let text_projection = param(vb.get(
            [tw, cfg.embed_dim],
            "text_projection",
            Init::Normal((tw as f64).powf(-0.5)),
        )?);
        Ok(Self {
            visual,
            text,
            text_projection,
            context_length: t.context_length,
            pad_id: t.pad_id,
        })
    }

    /// `pixel_values` `[b, 3, image_size, image_size]` (CLIP-normalised) -> image features `[b, embed_dim]`
    /// (not normalised), as `CLIP.encode_image`.
    pub fn encode_image(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 2> {
        self.visual.forward(pixel_values)
    }

    /// `input_ids` `[b, context_length]` -> text features `[b, embed_dim]` (not normalised), as
    /// `CLIP.encode_text`: causal transformer, `ln_final`, the row at the argmax id, `@ text_projection`.
    pub fn encode_text(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        self.text
            .forward(input_ids)
            .pooler_output
            .matmul(self.text_projection.val())
    }
}

/// The tensors of an open_clip checkpoint, seen at the root of the state dict: safetensors, or a PyTorch file
/// (`.pt`, `.pth`, `.bin`, `.ckpt`; read without executing pickle code). Tensors may be stored under a prefix (a
/// `state_dict` entry, DDP's `module.`, both: HPSv2's `HPS_v2_compressed.pt`); it is found from the key of
/// `visual.conv1.weight`.
pub fn open_weights(path: &Path) -> Result<Arc<dyn TensorSource>> {
    let pickle = path
        .extension()
        .is_some_and(|e| ["pt", "pth", "bin", "ckpt"].iter().any(|x| e == *x));
    let src: Arc<dyn TensorSource> = if pickle {
        Arc::new(PthSource::open(path)?)
    } else {
        Arc::new(SafetensorsSource::open(&[path])?)
    };
    let anchor = "visual.conv1.weight";
    let prefix = src
        .keys()
        .into_iter()
        .filter_map(|k| k.strip_suffix(anchor).map(str::to_string))
        .filter(|p| p.is_empty() || p.ends_with('.'))
        .min_by_key(|p| p.len())
        .ok_or_else(|| WeightError::Missing {
            key: anchor.into(),
            files: path.display().to_string(),
            hint: " (expected an open_clip CLIP state dict: visual.*, token_embedding.*, transformer.*, \
                   optionally under state_dict and module.)"
                .into(),
        })?;
    Ok(if prefix.is_empty() {
        src
    } else {
        Arc::new(Renamed {
            inner: src,
            map: Box::new(move |k: &str| format!("{prefix}{k}")),
        })
    })
}

/// Loads an open_clip model: `weights` as in [`open_weights`], `config` a model config json (`None`: ViT-H-14).
pub fn load<B: Backend>(
    weights: &Path,
    config: Option<&Path>,
    device: &B::Device,
    dtype: DType,
) -> Result<OpenClip<B>> {
    let cfg = match config {
        Some(p) => OpenClipConfig::from_file(p)?,
        None => OpenClipConfig::vit_h_14(),
    };
    let vb = VarBuilder::from_source(open_weights(weights)?, device, dtype);
    OpenClip::new(&cfg, &vb)
}
