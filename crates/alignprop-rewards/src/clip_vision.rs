//! The CLIP vision transformer (transformers `CLIPVisionModelWithProjection`), sized by its `config.json`, loading
//! transformers' tensor names: patch embedding, class token, position embedding, pre-LN, the shared CLIP encoder,
//! post-LN on the class token, projection. Differentiable end to end (the image gradient is what AlignProp needs).

use std::path::Path;

use alignprop_diffusion::clip::{CLIPActivation, CLIPEncoder, CLIPEncoderDims};
use alignprop_diffusion::nn::{LayerNorm, param};
use alignprop_io::VarBuilder;
use alignprop_io::pipeline_files::{component_weights, read_json};
use alignprop_io::weights::{Init, Result, WeightError};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// transformers' `CLIPVisionConfig` as in `config.json` (unknown keys ignored). Defaults: OpenAI ViT-L/14 (the
/// LAION aesthetic predictor's encoder).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CLIPVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub projection_dim: usize,
    pub hidden_act: CLIPActivation,
    pub layer_norm_eps: f64,
    pub num_channels: usize,
}

impl Default for CLIPVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            projection_dim: 768,
            hidden_act: CLIPActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            num_channels: 3,
        }
    }
}

impl CLIPVisionConfig {
    fn dims(&self) -> CLIPEncoderDims {
        CLIPEncoderDims {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            num_hidden_layers: self.num_hidden_layers,
            layer_norm_eps: self.layer_norm_eps,
            hidden_act: self.hidden_act,
        }
    }
}

/// `CLIPVisionModelWithProjection`: images to projected embeddings.
#[derive(Module, Debug)]
pub struct CLIPVisionModel<B: Backend> {
    /// `[hidden]`
    pub class_embedding: Param<Tensor<B, 1>>,
    /// `[hidden, channels, patch, patch]`, no bias.
    pub patch_embedding: Param<Tensor<B, 4>>,
    /// `[1 + (image / patch)^2, hidden]`
    pub position_embedding: Param<Tensor<B, 2>>,
    pub pre_layrnorm: LayerNorm<B>,
    pub encoder: CLIPEncoder<B>,
    pub post_layernorm: LayerNorm<B>,
    /// `[projection, hidden]`, no bias.
    pub visual_projection: Param<Tensor<B, 2>>,
    pub patch_size: usize,
    pub image_size: usize,
}

impl<B: Backend> CLIPVisionModel<B> {
    /// Builds from `vb` at the root of a transformers file (`vision_model.*`, `visual_projection.weight`).
    pub fn new(cfg: &CLIPVisionConfig, vb: &VarBuilder<B>) -> Result<Self> {
        Self::with_pre_norm(cfg, vb, "pre_layrnorm")
    }

    /// [`Self::new`] with the pre-encoder LayerNorm stored as `vision_model.{pre_norm}` (CLIP spells it
    /// `pre_layrnorm`, OWL-ViT `pre_layernorm`).
    pub fn with_pre_norm(
        cfg: &CLIPVisionConfig,
        vb: &VarBuilder<B>,
        pre_norm: &str,
    ) -> Result<Self> {
        let (h, p) = (cfg.hidden_size, cfg.patch_size);
        if p == 0 || cfg.image_size % p != 0 {
            return Err(WeightError::Config {
                path: "CLIPVisionConfig".into(),
                msg: format!(
                    "image_size {} is not a multiple of patch_size {p}",
                    cfg.image_size
                ),
            });
        }
        let n_pos = (cfg.image_size / p).pow(2) + 1;
        let v = vb.pp("vision_model");
        let e = v.pp("embeddings");
        Ok(Self {
            class_embedding: param(e.get(
                [h],
                "class_embedding",
                Init::Normal((h as f64).powf(-0.5)),
            )?),
            patch_embedding: param(e.pp("patch_embedding").get(
                [h, cfg.num_channels, p, p],
                "weight",
                Init::fan_in(cfg.num_channels * p * p),
            )?),
            position_embedding: param(e.pp("position_embedding").get(
                [n_pos, h],
                "weight",
                Init::Normal(0.02),
            )?),
            pre_layrnorm: LayerNorm::new(&v.pp(pre_norm), h, cfg.layer_norm_eps)?,
            encoder: CLIPEncoder::new(&v.pp("encoder"), &cfg.dims())?,
            post_layernorm: LayerNorm::new(&v.pp("post_layernorm"), h, cfg.layer_norm_eps)?,
            visual_projection: param(vb.pp("visual_projection").get(
                [cfg.projection_dim, h],
                "weight",
                Init::fan_in(h),
            )?),
            patch_size: p,
            image_size: cfg.image_size,
        })
    }

    /// Loads a transformers folder (`config.json` + `model.safetensors`).
    pub fn load(folder: &Path, device: &B::Device, dtype: DType) -> Result<Self> {
        let cfg: CLIPVisionConfig = read_json(&folder.join("config.json"))?;
        let vb = VarBuilder::from_safetensors(&component_weights(folder)?, device, dtype)?;
        Self::new(&cfg, &vb)
    }

    /// `pixel_values` `[b, 3, image_size, image_size]` (CLIP-normalised) -> projected embeddings `[b, projection]`.
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.last_hidden_state(pixel_values);
        let [b, _, h] = x.dims();
        let pooled = self
            .post_layernorm
            .forward(x.narrow(1, 0, 1).reshape([b, h]));
        alignprop_kernels::linear(pooled, self.visual_projection.val())
    }

    /// `pixel_values` `[b, 3, image_size, image_size]` (CLIP-normalised) -> the encoder's output
    /// `[b, 1 + patches, hidden]` (class token first, patches in row-major order; before `post_layernorm`):
    /// transformers' `last_hidden_state`.
    pub fn last_hidden_state(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, _, hh, ww] = pixel_values.dims();
        assert_eq!(
            [hh, ww],
            [self.image_size; 2],
            "CLIP vision expects {0}x{0} inputs",
            self.image_size
        );
        let patches = conv2d(
            pixel_values,
            self.patch_embedding.val(),
            None,
            ConvOptions::new([self.patch_size; 2], [0, 0], [1, 1], 1),
        );
        let [_, h, gh, gw] = patches.dims();
        let tokens = patches.reshape([b, h, gh * gw]).swap_dims(1, 2); // [b, n, h]
        let cls = self
            .class_embedding
            .val()
            .reshape([1, 1, h])
            .repeat_dim(0, b);
        let x = Tensor::cat(vec![cls, tokens], 1) + self.position_embedding.val().unsqueeze::<3>();
        self.encoder.forward(self.pre_layrnorm.forward(x), false)
    }
}
