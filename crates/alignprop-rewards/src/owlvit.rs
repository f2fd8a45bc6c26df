//! OWL-ViT (Minderer et al. 2022, "Simple Open-Vocabulary Object Detection with Vision Transformers"), the open-
//! vocabulary detector of the object-count reward ([`crate::count`]): transformers' `OwlViTForObjectDetection`
//! (e.g. `google/owlvit-base-patch32`), its class-prediction path, differentiable end to end.
//!
//! ```text
//! image  -> CLIP vision tower -> post_layernorm(all tokens) -> patch * class token -> layer_norm  [b, patches, hv]
//! query  -> CLIP text tower -> pooled (end token) -> text_projection -> L2-normalised              [q, d]
//! logits = (cos(dense0(patch), query) + logit_shift(patch)) * (elu(logit_scale(patch)) + 1)    [b, patches, q]
//! ```
//! Each patch is one detection; `sigmoid(logits)` is the probability that it shows the query's object.
//! transformers' `post_process_object_detection` keeps the detections above a threshold (no NMS: OWL-ViT is
//! trained with one-to-one matching, so an object is one detection). The box head is not needed for counting and is
//! not loaded.
//!
//! Layout: transformers' names (`owlvit.vision_model.*` with `pre_layernorm`, `owlvit.text_model.*`,
//! `owlvit.text_projection.weight`, `class_head.{dense0, logit_shift, logit_scale}`, `layer_norm`) and its
//! `config.json` (`text_config`, `vision_config`, `projection_dim`, with `OwlViTConfig`'s defaults: 16 text
//! positions, pad id 0, 768 px images, patch 32).
//!
//! Preprocessing: `OwlViTImageProcessor` resizes to the square input (768x768, bicubic, not keeping the aspect) and
//! applies CLIP's mean/std. Here the resize is bilinear without antialiasing (differentiable, as the other
//! rewards'), so scores of a picture differ slightly from the processor's.

use std::path::Path;

use alignprop_diffusion::clip::{CLIPTextConfig, CLIPTextModel};
use alignprop_diffusion::nn::{LayerNorm, Linear};
use alignprop_diffusion::tokenizer::CLIPTokenizer;
use alignprop_io::VarBuilder;
use alignprop_io::weights::{Result, WeightError};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};
use serde_json::{Value, json};

use crate::RewardError;
use crate::clip_vision::CLIPVisionModel;
use crate::pickscore::{
    CLIPConfig, clip_model_weights, model_config, text_defaults, vision_defaults,
};
use crate::preprocess::{CLIP_MEAN, CLIP_STD, normalize, resize_bilinear, to_unit_range};
use crate::text::{load_tokenizer, reward_prompt_ids};

/// `OwlViTConfig`'s defaults for the keys a `config.json` leaves out: CLIP's, with OWL-ViT's text length (16), pad
/// id (0), image size (768) and patch (32).
pub fn owlvit_defaults() -> (Value, Value) {
    let mut text = text_defaults();
    text["max_position_embeddings"] = json!(16);
    text["pad_token_id"] = json!(0);
    text["eos_token_id"] = json!(49407);
    let mut vision = vision_defaults();
    vision["image_size"] = json!(768);
    vision["patch_size"] = json!(32);
    (text, vision)
}

/// `OwlViTClassPredictionHead`: per patch, an embedding compared with the queries, and a logit shift and scale.
#[derive(Debug)]
pub struct OwlViTClassHead<B: Backend> {
    /// `[text hidden, vision hidden]` + bias.
    pub dense0: Linear<B>,
    /// `[1, vision hidden]` + bias.
    pub logit_shift: Linear<B>,
    /// `[1, vision hidden]` + bias (the scale is `elu(.) + 1`).
    pub logit_scale: Linear<B>,
}

/// `x / (|x| + 1e-6)` along the last dimension (the class head's normalisation).
fn normalize_last<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let norm = x.clone().powi_scalar(2).sum_dim(D - 1).sqrt();
    x / (norm + eps)
}

/// `elu(x) + 1` (alpha 1): `x + 1` above 0, `exp(x)` below; written with clamps so every backend differentiates it.
fn elu_plus_one<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone().clamp_min(0.0) + x.clamp_max(0.0).exp()
}

impl<B: Backend> OwlViTClassHead<B> {
    fn new(vb: &VarBuilder<B>, vision_hidden: usize, query_dim: usize) -> Result<Self> {
        Ok(Self {
            dense0: Linear::new(&vb.pp("dense0"), vision_hidden, query_dim, true)?,
            logit_shift: Linear::new(&vb.pp("logit_shift"), vision_hidden, 1, true)?,
            logit_scale: Linear::new(&vb.pp("logit_scale"), vision_hidden, 1, true)?,
        })
    }

    /// `patches` `[b, p, vision hidden]`, `queries` `[b, q, d]` (one set of queries per image) -> logits
    /// `[b, p, q]`.
    pub fn forward(&self, patches: Tensor<B, 3>, queries: Tensor<B, 3>) -> Tensor<B, 3> {
        let embeds = normalize_last(self.dense0.forward(patches.clone()), 1e-6);
        let queries = normalize_last(queries, 1e-6);
        let cos = embeds.matmul(queries.swap_dims(1, 2));
        let shift = self.logit_shift.forward(patches.clone());
        let scale = elu_plus_one(self.logit_scale.forward(patches));
        (cos + shift) * scale
    }
}

/// The detector: towers, projection, patch LayerNorm, class head, tokenizer.
#[derive(Debug)]
pub struct OwlViTDetector<B: Backend> {
    /// The vision tower (its `visual_projection` is loaded but not used for detection).
    pub vision: CLIPVisionModel<B>,
    pub text: CLIPTextModel<B>,
    /// `[projection_dim, text hidden]`, no bias.
    pub text_projection: Linear<B>,
    /// The LayerNorm of the class-token-merged patch embeddings (`layer_norm`).
    pub layer_norm: LayerNorm<B>,
    pub class_head: OwlViTClassHead<B>,
    pub tokenizer: CLIPTokenizer,
    /// Text length the queries are padded to (`max_position_embeddings`, 16).
    pub max_length: usize,
}

impl<B: Backend> OwlViTDetector<B> {
    /// Builds from `vb` at the root of an `OwlViTForObjectDetection` state dict.
    pub fn new(cfg: &CLIPConfig, vb: &VarBuilder<B>, tokenizer: CLIPTokenizer) -> Result<Self> {
        let (t, v): (&CLIPTextConfig, _) = (&cfg.text_config, &cfg.vision_config);
        if cfg.projection_dim != t.hidden_size {
            // The class head maps patches to the text width and compares them with projected queries.
            return Err(WeightError::Config {
                path: "OwlViTConfig".into(),
                msg: format!(
                    "projection_dim {} differs from text_config.hidden_size {}: OWL-ViT's class head needs them \
                     equal",
                    cfg.projection_dim, t.hidden_size
                ),
            });
        }
        let m = vb.pp("owlvit");
        Ok(Self {
            vision: CLIPVisionModel::with_pre_norm(v, &m, "pre_layernorm")?,
            text: CLIPTextModel::new(t, &m)?,
            text_projection: Linear::new(
                &m.pp("text_projection"),
                t.hidden_size,
                cfg.projection_dim,
                false,
            )?,
            layer_norm: LayerNorm::new(&vb.pp("layer_norm"), v.hidden_size, v.layer_norm_eps)?,
            class_head: OwlViTClassHead::new(&vb.pp("class_head"), v.hidden_size, t.hidden_size)?,
            tokenizer,
            max_length: t.max_position_embeddings,
        })
    }

    /// `path`: an `OwlViTForObjectDetection` folder (`config.json` + `model.safetensors` or `pytorch_model.bin`,
    /// e.g. `google/owlvit-base-patch32`) or a weights file (then `config`, by default the `config.json` beside
    /// it); `tokenizer`: a CLIP tokenizer folder (the OWL-ViT folder's own, which pads with "!").
    pub fn load(
        path: &Path,
        config: Option<&Path>,
        tokenizer: &Path,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        let (text, vision) = owlvit_defaults();
        let cfg = CLIPConfig::from_file_with_defaults(model_config(path, config), text, vision)?;
        let vb = VarBuilder::from_source(clip_model_weights(path)?, device, dtype);
        Self::new(&cfg, &vb, load_tokenizer(tokenizer)?)
    }

    /// The side of the square input (768 for the released models).
    pub fn image_size(&self) -> usize {
        self.vision.image_size
    }

    /// Query texts to `[q, max_length]` ids (start, text, end, padding with the tokenizer's pad id); a text the
    /// tokenizer cannot encode is a [`RewardError::Tokenizer`] naming `reward`.
    pub fn query_ids(
        &self,
        reward: &str,
        queries: &[String],
        device: &B::Device,
    ) -> std::result::Result<Tensor<B, 2, Int>, RewardError> {
        reward_prompt_ids(
            reward,
            &self.tokenizer,
            queries,
            self.max_length,
            self.tokenizer.pad_id(),
            self.text.embeddings.token_embedding.val().dims()[0],
            device,
        )
    }

    /// Query ids `[q, length]` -> L2-normalised projected text embeddings `[q, projection_dim]` (`OwlViTModel`'s
    /// `text_embeds`).
    pub fn query_embeds(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let e = self
            .text_projection
            .forward(self.text.forward(ids).pooler_output);
        normalize_last(e, 0.0)
    }

    /// Decoder output `[b, 3, H, W]` in `[-1, 1]` -> the detector's input `[b, 3, S, S]`: `[0, 1]`, bilinear resize
    /// of both sides to `S` (no antialiasing), CLIP's mean/std.
    pub fn preprocess(&self, images: Tensor<B, 4>) -> Tensor<B, 4> {
        let s = self.image_size();
        normalize(
            resize_bilinear(to_unit_range(images), [s, s]),
            CLIP_MEAN,
            CLIP_STD,
        )
    }

    /// `pixel_values` `[b, 3, S, S]` -> per-patch features `[b, patches, vision hidden]` (row-major patches):
    /// `layer_norm(post_layernorm(patch) * post_layernorm(class token))`.
    pub fn patch_features(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let x = self
            .vision
            .post_layernorm
            .forward(self.vision.last_hidden_state(pixel_values));
        let n = x.dims()[1];
        let cls = x.clone().narrow(1, 0, 1);
        let patches = x.narrow(1, 1, n - 1) * cls.repeat_dim(1, n - 1);
        self.layer_norm.forward(patches)
    }

    /// Decoder output `[b, 3, H, W]` in `[-1, 1]` and normalised query embeddings `[b, q, d]` (the queries of each
    /// image) -> logits `[b, patches, q]`.
    pub fn logits(&self, images: Tensor<B, 4>, queries: Tensor<B, 3>) -> Tensor<B, 3> {
        let feats = self.patch_features(self.preprocess(images));
        self.class_head.forward(feats, queries)
    }
}
