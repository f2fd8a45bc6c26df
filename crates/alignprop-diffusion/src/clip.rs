//! The CLIP text encoders of Stable Diffusion (transformers `CLIPTextModel`, and `CLIPTextModelWithProjection`,
//! SDXL's second encoder).
//!
//! ```text
//! input_ids [batch, tokens]
//!   -> token_embedding + position_embedding                       hidden_states[0]
//!   -> num_hidden_layers x CLIPEncoderLayer (pre-LN, causal mask)  hidden_states[1..=num_hidden_layers]
//!   -> final_layer_norm                                           last_hidden_state [batch, tokens, hidden]
//!   -> row of the end-of-text token                               pooler_output     [batch, hidden]
//! ```
//!
//! Tensor names follow transformers: `text_model.embeddings.token_embedding.weight`,
//! `text_model.encoder.layers.{i}.self_attn.q_proj.weight`, ... The `text_model.` prefix is optional: SD1.5 files
//! (and full `CLIPModel` checkpoints) have it, transformers >= 5 saves a `CLIPTextModel` without it. Which layout a
//! file has is detected from the token embedding key. The `position_ids` buffer stored in old files is ignored.
//!
//! [`CLIPEncoderLayer`] and [`CLIPEncoder`] are shared with a CLIP vision tower: they take the causal flag as an
//! argument and are sized by [`CLIPEncoderDims`], which both text and vision configs provide.

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, activation};
use serde::{Deserialize, Serialize};

use crate::nn::{self, LayerNorm, Linear, param};
use alignprop_io::pipeline_files::{component_weights, read_json};
use alignprop_io::weights::{Init, Result, VarBuilder, WeightError};

/// The `eos_token_id` that transformers treats as a legacy value: configs written before transformers 4.24 (SD1.5's
/// among them) say `eos_token_id: 2`, and the pooled row is then found as the argmax of the input ids (the real
/// end-of-text id 49407 is the largest id of the CLIP vocabulary).
const LEGACY_EOS_TOKEN_ID: u32 = 2;

/// Activation of the CLIP MLP (`hidden_act` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CLIPActivation {
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP's activation (SD1.5's text encoder).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP models, e.g. SD2's text encoder).
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
}

impl CLIPActivation {
    /// Applies the activation elementwise.
    pub fn forward<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::QuickGelu => nn::quick_gelu(x),
            Self::Gelu => nn::gelu(x),
            Self::GeluTanh => {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715)
                    * (2.0 / std::f64::consts::PI).sqrt();
                x.clone() * 0.5 * (activation::tanh(inner) + 1.0)
            }
        }
    }
}

/// transformers' `CLIPTextConfig`, read from `text_encoder/config.json` as is (unknown keys are ignored).
///
/// Defaults are SD1.5's text encoder (OpenAI CLIP ViT-L/14's text tower).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct CLIPTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Size of the text projection of a full `CLIPModel`; not used by the text encoder itself.
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: CLIPActivation,
    pub layer_norm_eps: f64,
    /// Dropout of the attention probabilities; inference only here, so never applied.
    pub attention_dropout: f64,
    pub initializer_range: f64,
    pub initializer_factor: f64,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    /// Selects the pooled row: the first position holding this id, or (legacy value 2) the argmax of the ids.
    pub eos_token_id: u32,
}

impl Default for CLIPTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: CLIPActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
            initializer_range: 0.02,
            initializer_factor: 1.0,
            pad_token_id: 1,
            bos_token_id: 49406,
            eos_token_id: 49407,
        }
    }
}

impl CLIPTextConfig {
    /// The encoder sizes of this configuration.
    pub fn encoder_dims(&self) -> CLIPEncoderDims {
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

/// The sizes of a CLIP transformer encoder (the same fields in the text and vision configs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CLIPEncoderDims {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: CLIPActivation,
}

impl CLIPEncoderDims {
    fn check(&self) -> Result<()> {
        let ok = self.num_attention_heads > 0
            && self.hidden_size.is_multiple_of(self.num_attention_heads);
        if ok {
            Ok(())
        } else {
            Err(WeightError::Config {
                path: "CLIP config".into(),
                msg: format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            })
        }
    }
}

/// Multi-head self-attention with biased query, key, value and output projections (`self_attn`).
#[derive(Module, Debug)]
pub struct CLIPAttention<B: Backend> {
    /// `[hidden, hidden]` + bias
    pub q_proj: Linear<B>,
    /// `[hidden, hidden]` + bias
    pub k_proj: Linear<B>,
    /// `[hidden, hidden]` + bias
    pub v_proj: Linear<B>,
    /// `[hidden, hidden]` + bias
    pub out_proj: Linear<B>,
    pub num_heads: usize,
}

impl<B: Backend> CLIPAttention<B> {
    pub fn new(vb: &VarBuilder<B>, hidden: usize, num_heads: usize) -> Result<Self> {
        Ok(Self {
            q_proj: Linear::new(&vb.pp("q_proj"), hidden, hidden, true)?,
            k_proj: Linear::new(&vb.pp("k_proj"), hidden, hidden, true)?,
            v_proj: Linear::new(&vb.pp("v_proj"), hidden, hidden, true)?,
            out_proj: Linear::new(&vb.pp("out_proj"), hidden, hidden, true)?,
            num_heads,
        })
    }

    /// `x`: `[batch, tokens, hidden]` -> `[batch, tokens, hidden]`. `causal`: each token attends only to itself and
    /// earlier tokens (text encoder); the vision tower attends to all patches.
    pub fn forward(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        let q = self.q_proj.forward(x.clone());
        let k = self.k_proj.forward(x.clone());
        let v = self.v_proj.forward(x);
        self.out_proj
            .forward(nn::multi_head_attention(q, k, v, self.num_heads, causal))
    }
}

/// The feed-forward block (`mlp`): `fc2(act(fc1(x)))`.
#[derive(Module, Debug)]
pub struct CLIPMlp<B: Backend> {
    /// `[intermediate, hidden]` + bias
    pub fc1: Linear<B>,
    /// `[hidden, intermediate]` + bias
    pub fc2: Linear<B>,
    pub activation: CLIPActivation,
}

impl<B: Backend> CLIPMlp<B> {
    pub fn new(
        vb: &VarBuilder<B>,
        hidden: usize,
        intermediate: usize,
        activation: CLIPActivation,
    ) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(&vb.pp("fc1"), hidden, intermediate, true)?,
            fc2: Linear::new(&vb.pp("fc2"), intermediate, hidden, true)?,
            activation,
        })
    }

    /// `x`: `[batch, tokens, hidden]` -> `[batch, tokens, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2
            .forward(self.activation.forward(self.fc1.forward(x)))
    }
}

/// One pre-LN transformer block (`encoder.layers.{i}`):
/// `x = x + self_attn(layer_norm1(x)); x = x + mlp(layer_norm2(x))`.
#[derive(Module, Debug)]
pub struct CLIPEncoderLayer<B: Backend> {
    pub layer_norm1: LayerNorm<B>,
    pub self_attn: CLIPAttention<B>,
    pub layer_norm2: LayerNorm<B>,
    pub mlp: CLIPMlp<B>,
}

impl<B: Backend> CLIPEncoderLayer<B> {
    pub fn new(vb: &VarBuilder<B>, dims: &CLIPEncoderDims) -> Result<Self> {
        let h = dims.hidden_size;
        Ok(Self {
            layer_norm1: LayerNorm::new(&vb.pp("layer_norm1"), h, dims.layer_norm_eps)?,
            self_attn: CLIPAttention::new(&vb.pp("self_attn"), h, dims.num_attention_heads)?,
            layer_norm2: LayerNorm::new(&vb.pp("layer_norm2"), h, dims.layer_norm_eps)?,
            mlp: CLIPMlp::new(&vb.pp("mlp"), h, dims.intermediate_size, dims.hidden_act)?,
        })
    }

    /// `x`: `[batch, tokens, hidden]` -> `[batch, tokens, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x), causal);
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

/// The stack of transformer blocks (`encoder.layers.*`).
#[derive(Module, Debug)]
pub struct CLIPEncoder<B: Backend> {
    pub layers: Vec<CLIPEncoderLayer<B>>,
}

impl<B: Backend> CLIPEncoder<B> {
    /// Builds `dims.num_hidden_layers` layers under `vb` (the `encoder` prefix).
    pub fn new(vb: &VarBuilder<B>, dims: &CLIPEncoderDims) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..dims.num_hidden_layers)
            .map(|i| CLIPEncoderLayer::new(&vb.pp(i), dims))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// Runs all layers. `x`: `[batch, tokens, hidden]` -> `[batch, tokens, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        self.forward_layers(x, causal, self.layers.len(), None)
    }

    /// Runs the first `num_layers` layers (for "clip skip": the output of an earlier layer).
    ///
    /// With `hidden_states`, pushes the input and the output of every layer run (transformers'
    /// `output_hidden_states`: `num_layers + 1` tensors, the last one equal to the returned tensor).
    pub fn forward_layers(
        &self,
        mut x: Tensor<B, 3>,
        causal: bool,
        num_layers: usize,
        mut hidden_states: Option<&mut Vec<Tensor<B, 3>>>,
    ) -> Tensor<B, 3> {
        assert!(
            num_layers <= self.layers.len(),
            "asked for {num_layers} layers, the encoder has {}",
            self.layers.len()
        );
        for layer in &self.layers[..num_layers] {
            if let Some(hs) = hidden_states.as_deref_mut() {
                hs.push(x.clone());
            }
            x = layer.forward(x, causal);
        }
        if let Some(hs) = hidden_states {
            hs.push(x.clone());
        }
        x
    }
}

/// Token and absolute position embeddings (`embeddings`).
#[derive(Module, Debug)]
pub struct CLIPTextEmbeddings<B: Backend> {
    /// `[vocab_size, hidden]`
    pub token_embedding: Param<Tensor<B, 2>>,
    /// `[max_position_embeddings, hidden]`
    pub position_embedding: Param<Tensor<B, 2>>,
}

impl<B: Backend> CLIPTextEmbeddings<B> {
    pub fn new(vb: &VarBuilder<B>, cfg: &CLIPTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let token = vb.pp("token_embedding");
        let position = vb.pp("position_embedding");
        Ok(Self {
            token_embedding: param(token.get([cfg.vocab_size, h], "weight", Init::Normal(0.02))?),
            position_embedding: param(position.get(
                [cfg.max_position_embeddings, h],
                "weight",
                Init::Normal(0.01),
            )?),
        })
    }

    /// `input_ids`: `[batch, tokens]` -> `[batch, tokens, hidden]` (positions `0..tokens`).
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let n = input_ids.dims()[1];
        let max = self.position_embedding.dims()[0];
        assert!(
            n <= max,
            "{n} tokens given, the text encoder has {max} positions"
        );
        let tokens = burn::tensor::module::embedding(self.token_embedding.val(), input_ids);
        let positions = self.position_embedding.val().slice(0..n).unsqueeze::<3>();
        tokens + positions
    }
}

/// What the text encoder returns.
#[derive(Debug, Clone)]
pub struct CLIPTextOutput<B: Backend> {
    /// `[batch, tokens, hidden]`: after `final_layer_norm`; SD's `encoder_hidden_states`.
    pub last_hidden_state: Tensor<B, 3>,
    /// `[batch, hidden]`: the row of `last_hidden_state` at the end-of-text token.
    pub pooler_output: Tensor<B, 2>,
    /// With [`CLIPTextModel::forward_hidden_states`]: `num_hidden_layers + 1` tensors
    /// `[batch, tokens, hidden]`: the embeddings, then the output of each layer (the last one before
    /// `final_layer_norm`), as transformers' `hidden_states`.
    pub hidden_states: Option<Vec<Tensor<B, 3>>>,
}

/// The CLIP text encoder (transformers `CLIPTextModel` / its `text_model`).
#[derive(Module, Debug)]
pub struct CLIPTextModel<B: Backend> {
    pub embeddings: CLIPTextEmbeddings<B>,
    pub encoder: CLIPEncoder<B>,
    pub final_layer_norm: LayerNorm<B>,
    /// `eos_token_id` of the config (selects the pooled row, see [`CLIPTextConfig::eos_token_id`]).
    pub eos_token_id: u32,
}

impl<B: Backend> CLIPTextModel<B> {
    /// Builds the model under `vb`, which may hold the tensors with or without the `text_model.` prefix.
    pub fn new(cfg: &CLIPTextConfig, vb: &VarBuilder<B>) -> Result<Self> {
        let dims = cfg.encoder_dims();
        dims.check()?;
        let vb = if vb.contains("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        Ok(Self {
            embeddings: CLIPTextEmbeddings::new(&vb.pp("embeddings"), cfg)?,
            encoder: CLIPEncoder::new(&vb.pp("encoder"), &dims)?,
            final_layer_norm: LayerNorm::new(
                &vb.pp("final_layer_norm"),
                cfg.hidden_size,
                cfg.layer_norm_eps,
            )?,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// Loads `folder/config.json` and the safetensors weights of a `text_encoder` folder.
    pub fn load(folder: impl AsRef<Path>, device: &B::Device, dtype: DType) -> Result<Self> {
        let folder = folder.as_ref();
        let cfg: CLIPTextConfig = read_json(&folder.join("config.json"))?;
        let files = component_weights(folder)?;
        let vb = VarBuilder::from_safetensors(&files, device, dtype)?;
        Self::new(&cfg, &vb)
    }

    /// `input_ids`: `[batch, tokens]` (tokens <= `max_position_embeddings`, 77 for SD, no attention mask: padding
    /// is after the end-of-text token and the mask is causal).
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> CLIPTextOutput<B> {
        self.run(input_ids, false)
    }

    /// As [`forward`](Self::forward), also returning every intermediate hidden state.
    pub fn forward_hidden_states(&self, input_ids: Tensor<B, 2, Int>) -> CLIPTextOutput<B> {
        self.run(input_ids, true)
    }

    fn run(&self, input_ids: Tensor<B, 2, Int>, keep_hidden_states: bool) -> CLIPTextOutput<B> {
        let eos = self.eos_positions(input_ids.clone());
        let x = self.embeddings.forward(input_ids);
        let mut hidden_states = keep_hidden_states.then(Vec::new);
        let x =
            self.encoder
                .forward_layers(x, true, self.encoder.layers.len(), hidden_states.as_mut());
        let last_hidden_state = self.final_layer_norm.forward(x);
        let [b, _, h] = last_hidden_state.dims();
        let index = eos.reshape([b, 1, 1]).repeat_dim(2, h);
        let pooler_output = last_hidden_state.clone().gather(1, index).reshape([b, h]);
        CLIPTextOutput {
            last_hidden_state,
            pooler_output,
            hidden_states,
        }
    }

    /// What SDXL takes from each of its encoders in one run: the output of the penultimate layer
    /// (`hidden_states[-2]`, WITHOUT `final_layer_norm`) `[batch, tokens, hidden]`, and `pooler_output`
    /// `[batch, hidden]` (the end-of-text row after all layers and `final_layer_norm`).
    pub fn encode_penultimate(&self, input_ids: Tensor<B, 2, Int>) -> (Tensor<B, 3>, Tensor<B, 2>) {
        let n = self.encoder.layers.len();
        assert!(n >= 1, "the text encoder has no layers");
        let eos = self.eos_positions(input_ids.clone());
        let x = self.embeddings.forward(input_ids);
        let penultimate = self.encoder.forward_layers(x, true, n - 1, None);
        let last = self.encoder.layers[n - 1].forward(penultimate.clone(), true);
        let last = self.final_layer_norm.forward(last);
        let [b, _, h] = last.dims();
        let index = eos.reshape([b, 1, 1]).repeat_dim(2, h);
        (penultimate, last.gather(1, index).reshape([b, h]))
    }

    /// diffusers' `encode_prompt(..., clip_skip)`: the output of layer `num_hidden_layers - clip_skip`, passed
    /// through `final_layer_norm`. `clip_skip = 0` is `last_hidden_state`; `1` uses the penultimate layer.
    /// Only the layers needed are run. `input_ids`: `[batch, tokens]` -> `[batch, tokens, hidden]`.
    pub fn encode_clip_skip(&self, input_ids: Tensor<B, 2, Int>, clip_skip: usize) -> Tensor<B, 3> {
        let n = self.encoder.layers.len();
        assert!(
            clip_skip < n,
            "clip_skip {clip_skip} must be below the number of layers ({n})"
        );
        let x = self.embeddings.forward(input_ids);
        let x = self.encoder.forward_layers(x, true, n - clip_skip, None);
        self.final_layer_norm.forward(x)
    }

    /// Position of the pooled token in each row, `[batch]`, computed on the ids' device as transformers does:
    /// the first position holding `eos_token_id`, or, for the legacy `eos_token_id == 2`, the first position of the
    /// largest id. (A row without the token pools position 0, as torch's argmax of all zeros.)
    fn eos_positions(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 1, Int> {
        let [b, n] = input_ids.dims();
        let device = input_ids.device();
        // `n - 1 - position`: adding it to a score that is a multiple of `n` makes every entry distinct and favours
        // the earliest position among equal scores, so any backend's argmax picks torch's first maximum.
        let tie_break = Tensor::<B, 1, Int>::arange(0..n as i64, (&device, input_ids.dtype()))
            .neg()
            .add_scalar(n as i64 - 1)
            .unsqueeze::<2>();
        let score = if self.eos_token_id == LEGACY_EOS_TOKEN_ID {
            input_ids.mul_scalar(n as i64)
        } else {
            let is_eos = input_ids.clone().equal_elem(self.eos_token_id as i64);
            input_ids.zeros_like().mask_fill(is_eos, n as i64)
        };
        (score + tie_break).argmax(1).reshape([b])
    }
}

/// transformers' `CLIPTextModelWithProjection`: a [`CLIPTextModel`] whose pooled output is projected by a bias-free
/// `text_projection` to `projection_dim` (`text_embeds`). SDXL's second text encoder (OpenCLIP ViT-bigG/14's text
/// tower in the transformers layout: `text_model.*` and `text_projection.weight` `[projection_dim, hidden]`).
#[derive(Module, Debug)]
pub struct CLIPTextModelWithProjection<B: Backend> {
    pub text_model: CLIPTextModel<B>,
    /// `[projection_dim, hidden]`, no bias.
    pub text_projection: Linear<B>,
}

impl<B: Backend> CLIPTextModelWithProjection<B> {
    /// Builds the model under `vb` (`text_model.*` with or without that prefix, `text_projection.weight`).
    pub fn new(cfg: &CLIPTextConfig, vb: &VarBuilder<B>) -> Result<Self> {
        Ok(Self {
            text_model: CLIPTextModel::new(cfg, vb)?,
            text_projection: Linear::new(
                &vb.pp("text_projection"),
                cfg.hidden_size,
                cfg.projection_dim,
                false,
            )?,
        })
    }

    /// Loads `folder/config.json` and the safetensors weights of a `text_encoder_2` folder.
    pub fn load(folder: impl AsRef<Path>, device: &B::Device, dtype: DType) -> Result<Self> {
        let folder = folder.as_ref();
        let cfg: CLIPTextConfig = read_json(&folder.join("config.json"))?;
        let files = component_weights(folder)?;
        let vb = VarBuilder::from_safetensors(&files, device, dtype)?;
        Self::new(&cfg, &vb)
    }

    /// The encoder's output with `text_embeds = text_projection(pooler_output)` `[batch, projection_dim]`.
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> (CLIPTextOutput<B>, Tensor<B, 2>) {
        let out = self.text_model.forward(input_ids);
        let text_embeds = self.text_projection.forward(out.pooler_output.clone());
        (out, text_embeds)
    }

    /// SDXL's use: the penultimate layer's output `[batch, tokens, hidden]` (no final norm) and `text_embeds`
    /// `[batch, projection_dim]`.
    pub fn encode_penultimate(&self, input_ids: Tensor<B, 2, Int>) -> (Tensor<B, 3>, Tensor<B, 2>) {
        let (penultimate, pooled) = self.text_model.encode_penultimate(input_ids);
        (penultimate, self.text_projection.forward(pooled))
    }
}
