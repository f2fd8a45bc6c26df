//! PickScore (Kirstain et al. 2023): a CLIP-H/14 (transformers `CLIPModel`) fine-tuned on Pick-a-Pic preferences.
//! Score of an image and its prompt: `logit_scale.exp() * cosine(image_embeds, text_embeds)` (about 20-23 for the
//! real model); loss `-score`.
//!
//! Layout: transformers `CLIPModel` names (`text_model.*`, `vision_model.*`, `visual_projection.weight`,
//! `text_projection.weight`, `logit_scale`) and its `config.json` (`text_config`, `vision_config`,
//! `projection_dim`); the towers are this crate's [`CLIPVisionModel`] and the SD text encoder's
//! [`CLIPTextModel`].
//!
//! Preprocessing: PickScore's processor (that of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`) resizes the shorter side
//! to 224 with bicubic interpolation, centre-crops 224 and applies CLIP's mean/std. Here, to be differentiable and
//! consistent with the other rewards, the resize is AlignProp's bilinear one (no antialiasing), followed by the
//! same centre crop ([`clip_preprocess_center_crop`]); scores of the same picture differ slightly from the
//! processor's (bilinear vs. bicubic), as AlignProp's own HPS and aesthetic rewards do.
//!
//! Prompts: the CLIP BPE tokenizer, padded to `max_position_embeddings` (77); the processor pads only to the longest
//! prompt and masks the padding, which gives the same pooled output since the text mask is causal and padding comes
//! after the end-of-text token.
//!
//! [`Reward::score`] without prompts is a [`RewardError::MissingPrompts`] (the score needs the prompt).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use alignprop_diffusion::clip::{CLIPTextConfig, CLIPTextModel};
use alignprop_diffusion::nn::{Linear, param};
use alignprop_diffusion::tokenizer::CLIPTokenizer;
use alignprop_io::VarBuilder;
use alignprop_io::pipeline_files::component_weights;
use alignprop_io::weights::{Init, Result, SafetensorsSource, TensorSource, WeightError};
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};
use serde_json::{Map, Value, json};

use crate::clip_vision::{CLIPVisionConfig, CLIPVisionModel};
use crate::hps::cosine_rows;
use crate::preprocess::{CLIP_MEAN, CLIP_STD, clip_preprocess_center_crop};
use crate::text::{check_prompts, load_tokenizer, reward_prompt_ids};
use crate::{Reward, RewardError, check_images};
use alignprop_io::pth::PthSource;

/// transformers' `CLIPConfig` as read from a `config.json`: the two tower configs (with transformers' defaults for
/// keys a file leaves out, and any `text_config_dict` / `vision_config_dict` of old files applied on top) and the
/// joint `projection_dim`.
#[derive(Clone, Debug)]
pub struct CLIPConfig {
    pub text_config: CLIPTextConfig,
    /// `projection_dim` is set to the model's (top-level) `projection_dim`.
    pub vision_config: CLIPVisionConfig,
    pub projection_dim: usize,
}

/// transformers' `CLIPTextConfig()` defaults (a file only lists the values that differ).
pub fn text_defaults() -> Value {
    json!({
        "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "projection_dim": 512,
        "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "initializer_range": 0.02,
        "initializer_factor": 1.0, "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407
    })
}

/// transformers' `CLIPVisionConfig()` defaults.
pub fn vision_defaults() -> Value {
    json!({
        "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512, "num_hidden_layers": 12,
        "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
    })
}

/// `base` with the non-null entries of each object in `layers` written over it.
fn overlay(mut base: Value, layers: &[Option<&Value>]) -> Value {
    let obj = base.as_object_mut().expect("object");
    for layer in layers.iter().flatten() {
        if let Some(m) = layer.as_object() {
            for (k, v) in m {
                if !v.is_null() {
                    obj.insert(k.clone(), v.clone());
                }
            }
        }
    }
    base
}

impl CLIPConfig {
    /// Reads a `CLIPModel` `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_file_with_defaults(path, text_defaults(), vision_defaults())
    }

    /// Reads the `config.json` of a model made of a CLIP text and vision tower (`CLIPModel`, OWL-ViT's
    /// `OwlViTConfig`), with `text_base` / `vision_base` as the defaults of the keys its tower configs leave out.
    pub fn from_file_with_defaults(
        path: impl AsRef<Path>,
        text_base: Value,
        vision_base: Value,
    ) -> Result<Self> {
        let path = path.as_ref();
        let err = |msg: String| WeightError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|source| WeightError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let empty = Value::Object(Map::new());
        let root = v
            .as_object()
            .ok_or_else(|| err("expected a JSON object".into()))?;
        if !root.contains_key("text_config") && !root.contains_key("vision_config") {
            return Err(err(
                "not a CLIPModel config (no text_config / vision_config; a CLIPVisionModel or CLIPTextModel \
                 folder holds only one tower)"
                    .into(),
            ));
        }
        let get = |k: &str| root.get(k).or(Some(&empty));
        let t = overlay(text_base, &[get("text_config"), get("text_config_dict")]);
        let vis = overlay(
            vision_base,
            &[get("vision_config"), get("vision_config_dict")],
        );
        let text_config: CLIPTextConfig =
            serde_json::from_value(t).map_err(|e| err(format!("text_config: {e}")))?;
        let mut vision_config: CLIPVisionConfig =
            serde_json::from_value(vis).map_err(|e| err(format!("vision_config: {e}")))?;
        let projection_dim = match root.get("projection_dim") {
            None | Some(Value::Null) => 512,
            Some(p) => p
                .as_u64()
                .ok_or_else(|| err(format!("projection_dim: expected an integer, found {p}")))?
                as usize,
        };
        vision_config.projection_dim = projection_dim;
        Ok(Self {
            text_config,
            vision_config,
            projection_dim,
        })
    }
}

/// The `config.json` of a transformers model given as a folder or a weights file: `config` when given, else the
/// folder's, else the one beside the weights file.
pub fn model_config(path: &Path, config: Option<&Path>) -> PathBuf {
    match config {
        Some(c) => c.to_path_buf(),
        None if path.is_dir() => path.join("config.json"),
        None => path.with_file_name("config.json"),
    }
}

/// The PickScore model: CLIP towers, projections, logit scale, tokenizer.
#[derive(Debug)]
pub struct PickScorer<B: Backend> {
    /// Vision tower with `visual_projection` `[projection_dim, vision hidden]`.
    pub vision: CLIPVisionModel<B>,
    pub text: CLIPTextModel<B>,
    /// `[projection_dim, text hidden]`, no bias.
    pub text_projection: Linear<B>,
    /// `[1]`: the log of the scale (stored as a 0-d tensor).
    pub logit_scale: Param<Tensor<B, 1>>,
    pub tokenizer: CLIPTokenizer,
    /// Text length the prompts are padded to (`max_position_embeddings`).
    pub max_length: usize,
}

/// The tensors of a `CLIPModel` folder or file: `model.safetensors` (or sharded, or fp16 variants), else
/// `pytorch_model.bin` (read without executing pickle code); a file path is opened as it is.
pub fn clip_model_weights(path: impl AsRef<Path>) -> Result<Arc<dyn TensorSource>> {
    let path = path.as_ref();
    let pickle = |p: &Path| {
        p.extension()
            .is_some_and(|e| ["bin", "pt", "pth"].iter().any(|x| e == *x))
    };
    if path.is_file() {
        return Ok(if pickle(path) {
            Arc::new(PthSource::open(path)?)
        } else {
            Arc::new(SafetensorsSource::open(&[path])?)
        });
    }
    match component_weights(path) {
        Ok(files) => Ok(Arc::new(SafetensorsSource::open(&files)?)),
        Err(e) => {
            let bin = path.join("pytorch_model.bin");
            if bin.is_file() {
                Ok(Arc::new(PthSource::open(&bin)?))
            } else {
                Err(e)
            }
        }
    }
}

impl<B: Backend> PickScorer<B> {
    /// Builds from `vb` at the root of a `CLIPModel` state dict.
    pub fn new(cfg: &CLIPConfig, vb: &VarBuilder<B>, tokenizer: CLIPTokenizer) -> Result<Self> {
        let t = &cfg.text_config;
        Ok(Self {
            vision: CLIPVisionModel::new(&cfg.vision_config, vb)?,
            text: CLIPTextModel::new(t, vb)?,
            text_projection: Linear::new(
                &vb.pp("text_projection"),
                t.hidden_size,
                cfg.projection_dim,
                false,
            )?,
            logit_scale: param(vb.get([1], "logit_scale", Init::Ones)?),
            tokenizer,
            max_length: t.max_position_embeddings,
        })
    }

    /// `path`: a `CLIPModel` folder (`config.json` + weights, e.g. `yuvalkirstain/PickScore_v1`) or a weights file
    /// (then `config` names its `config.json`, by default the one next to it); `tokenizer`: a CLIP tokenizer folder
    /// (`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`'s, or an SD1.5 `tokenizer/`: the same BPE).
    pub fn load(
        path: &Path,
        config: Option<&Path>,
        tokenizer: &Path,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        let cfg = CLIPConfig::from_file(model_config(path, config))?;
        let vb = VarBuilder::from_source(clip_model_weights(path)?, device, dtype);
        Self::new(&cfg, &vb, load_tokenizer(tokenizer)?)
    }

    /// Prompts to `[b, max_length]` ids (padded with the tokenizer's pad id); a prompt the tokenizer cannot
    /// encode, or an id outside the text model's vocabulary, is a [`RewardError::Tokenizer`].
    pub fn input_ids(
        &self,
        prompts: &[String],
        device: &B::Device,
    ) -> std::result::Result<Tensor<B, 2, Int>, RewardError> {
        reward_prompt_ids(
            "pickscore",
            &self.tokenizer,
            prompts,
            self.max_length,
            self.tokenizer.pad_id(),
            self.text.embeddings.token_embedding.val().dims()[0],
            device,
        )
    }

    /// Decoder output `[b, 3, H, W]` in `[-1, 1]` and ids `[b, max_length]` -> PickScore `[b]` (image `i` with
    /// text `i`).
    pub fn score_ids(&self, images: Tensor<B, 4>, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let px = clip_preprocess_center_crop(images, self.vision.image_size, CLIP_MEAN, CLIP_STD);
        let image_embeds = self.vision.forward(px);
        let text_embeds = self
            .text_projection
            .forward(self.text.forward(input_ids).pooler_output);
        let n = image_embeds.dims()[0];
        cosine_rows(image_embeds, text_embeds) * self.logit_scale.val().exp().repeat_dim(0, n)
    }
}

impl<B: Backend> Reward<B> for PickScorer<B> {
    fn name(&self) -> String {
        "pickscore".into()
    }
    /// Always [`RewardError::MissingPrompts`]: PickScore needs the prompts ([`Reward::score_with_prompts`]).
    fn score(&self, images: Tensor<B, 4>) -> std::result::Result<Tensor<B, 1>, RewardError> {
        self.score_with_prompts(images, &[])
    }
    fn score_with_prompts(
        &self,
        images: Tensor<B, 4>,
        prompts: &[String],
    ) -> std::result::Result<Tensor<B, 1>, RewardError> {
        let [b, ..] = check_images("pickscore", &images)?;
        check_prompts("pickscore", b, prompts)?;
        let ids = self.input_ids(prompts, &images.device())?;
        Ok(self.score_ids(images, ids))
    }
}
