//! The Stable Diffusion variational auto-encoder: diffusers' `AutoencoderKL`, sized entirely by its `config.json`.
//!
//! ```text
//! encode: image [b, 3, H, W] in [-1, 1]
//!   -> Encoder (conv_in, DownEncoderBlock2D x n, mid block, GroupNorm, act, conv_out)   [b, 2 * latent, H/f, W/f]
//!   -> quant_conv (1x1)                                                                  moments = mean ‖ logvar
//!   -> DiagonalGaussian { mean, logvar }                                                 each [b, latent, H/f, W/f]
//! decode: z [b, latent, h, w] (unscaled latents)
//!   -> post_quant_conv (1x1) -> Decoder (conv_in, mid block, UpDecoderBlock2D x n, GroupNorm, act, conv_out)
//!   -> image [b, 3, h * f, w * f]
//! ```
//!
//! `f = 2^(n - 1)` for `n` entries in `block_out_channels` (8 for SD1.5). The UNet works on *scaled* latents
//! `(z - shift_factor) * scaling_factor` ([`AutoencoderKL::scale_latents`]); [`AutoencoderKL::decode_scaled`] undoes
//! the scaling before decoding, as `StableDiffusionPipeline` does.
//!
//! Tensor names follow diffusers (`encoder.down_blocks.0.resnets.1.conv2.weight`, ...). The mid-block attention
//! also loads from the names of the deprecated diffusers `AttentionBlock` (`query`, `key`, `value`, `proj_attn`)
//! still found in older SD VAE files, and from 1x1-convolution shaped `[C, C, 1, 1]` weights.
//!
//! Every forward pass is made of plain burn tensor operations, so the decoder can be differentiated through
//! (AlignProp back-propagates the reward through it) under `burn::backend::Autodiff`.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};

pub use crate::nn::Activation;
use crate::nn::{Conv2d, GroupNorm, Linear, multi_head_attention};
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use alignprop_io::pipeline_files::{component_weights, read_json};
use alignprop_io::weights::{Result, VarBuilder, WeightError};

/// Epsilon of every GroupNorm in the VAE (resnets, mid-block attention, output norms): diffusers hard-codes 1e-6.
pub const VAE_NORM_EPS: f64 = 1e-6;

/// `scaling_factor` of the SD1.5 VAE (the default when a config does not name one).
pub const SD15_SCALING_FACTOR: f64 = 0.18215;

/// The diffusers `AutoencoderKL` configuration (`vae/config.json`), read as is; unknown keys are ignored and
/// missing keys take SD1.5's values (SD1.5's own config, written by diffusers 0.6.0, lacks `scaling_factor`,
/// `force_upcast`, `mid_block_add_attention`, ...).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    /// Image channels in (3).
    pub in_channels: usize,
    /// Image channels out (3).
    pub out_channels: usize,
    /// One entry per encoder level; only `DownEncoderBlock2D` is supported.
    pub down_block_types: Vec<String>,
    /// One entry per decoder level; only `UpDecoderBlock2D` is supported.
    pub up_block_types: Vec<String>,
    /// Channels per level, from the image side: SD1.5 `[128, 256, 512, 512]`.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level; decoder levels have one more.
    pub layers_per_block: usize,
    /// Activation: `silu` (= `swish`), `gelu`, `relu` or `mish`.
    pub act_fn: String,
    /// Latent channels (4).
    pub latent_channels: usize,
    /// Groups of every GroupNorm (32).
    pub norm_num_groups: usize,
    /// Image size the model was trained for (512); informational.
    pub sample_size: usize,
    /// Latent scaling applied before the UNet (0.18215).
    pub scaling_factor: f64,
    /// Latent shift applied before scaling (none for SD1.5, used by SD3 / Flux style VAEs).
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics of some VAEs (SDXL-era configs); carried, not used here.
    pub latents_mean: Option<Vec<f64>>,
    /// See `latents_mean`.
    pub latents_std: Option<Vec<f64>>,
    /// Whether diffusers runs this VAE in float32 when the pipeline is in float16.
    pub force_upcast: bool,
    /// Whether the self-attention of the encoder and decoder mid blocks exists.
    pub mid_block_add_attention: bool,
    /// Whether the 1x1 `quant_conv` follows the encoder.
    pub use_quant_conv: bool,
    /// Whether the 1x1 `post_quant_conv` precedes the decoder.
    pub use_post_quant_conv: bool,
}

impl Default for AutoencoderKLConfig {
    /// The SD1.5 VAE (`stable-diffusion-v1-5/vae/config.json`).
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 512,
            scaling_factor: SD15_SCALING_FACTOR,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// Checks that this configuration describes a model this module can build. `path` names the config in the
    /// error ([`WeightError::Config`]).
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |msg: String| WeightError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(err("block_out_channels is empty".into()));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(err(format!(
                "down_block_types ({}) and up_block_types ({}) must have one entry per block_out_channels ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| t.as_str() != "DownEncoderBlock2D")
        {
            return Err(err(format!(
                "unsupported down block type '{t}' (supported: DownEncoderBlock2D)"
            )));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| t.as_str() != "UpDecoderBlock2D")
        {
            return Err(err(format!(
                "unsupported up block type '{t}' (supported: UpDecoderBlock2D)"
            )));
        }
        Activation::parse(&self.act_fn).map_err(err)?;
        if self.layers_per_block == 0 {
            return Err(err("layers_per_block must be at least 1".into()));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return Err(err(
                "in_channels, out_channels and latent_channels must be positive".into(),
            ));
        }
        let g = self.norm_num_groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| g == 0 || c == 0 || c % g != 0)
        {
            return Err(err(format!(
                "block_out_channels entry {c} is not a positive multiple of norm_num_groups {g}"
            )));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return Err(err(format!(
                "scaling_factor {} must be finite and non-zero",
                self.scaling_factor
            )));
        }
        Ok(())
    }

    /// Spatial down-sampling factor between image and latents: `2^(levels - 1)` (8 for SD1.5).
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// The settings of a VAE resnet with `out_c` outputs: no time embedding, GroupNorm eps [`VAE_NORM_EPS`], no output
/// scaling.
fn resnet_config(out_c: usize, groups: usize, act: Activation) -> ResnetBlock2DConfig {
    ResnetBlock2DConfig {
        out_channels: out_c,
        temb_channels: None,
        groups,
        eps: VAE_NORM_EPS,
        act,
        output_scale_factor: 1.0,
    }
}

/// Single-head self-attention over the `height * width` positions, with group norm and residual (diffusers
/// `Attention` as built by `UNetMidBlock2D` for the VAE: one head of size `channels`).
#[derive(Module, Debug)]
pub struct AttentionBlock<B: Backend> {
    pub group_norm: GroupNorm<B>,
    /// `to_q` (legacy `query`), `[C, C]` with bias.
    pub to_q: Linear<B>,
    /// `to_k` (legacy `key`).
    pub to_k: Linear<B>,
    /// `to_v` (legacy `value`).
    pub to_v: Linear<B>,
    /// `to_out.0` (legacy `proj_attn`).
    pub to_out: Linear<B>,
}

impl<B: Backend> AttentionBlock<B> {
    pub fn new(vb: &VarBuilder<B>, channels: usize, groups: usize) -> Result<Self> {
        // The current name goes last: a file with neither reports the current name as missing.
        let linear = |names: &[&str]| Linear::new_any(vb, names, channels, channels, true);
        Ok(Self {
            group_norm: GroupNorm::new(&vb.pp("group_norm"), groups, channels, VAE_NORM_EPS)?,
            to_q: linear(&["query", "to_q"])?,
            to_k: linear(&["key", "to_k"])?,
            to_v: linear(&["value", "to_v"])?,
            to_out: linear(&["proj_attn", "to_out.0"])?,
        })
    }

    /// `x`: `[batch, channels, height, width]`, same shape out.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        // [b, c, h, w] -> [b, h*w, c]: one token per pixel.
        let tokens = self
            .group_norm
            .forward(x.clone())
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let q = self.to_q.forward(tokens.clone());
        let k = self.to_k.forward(tokens.clone());
        let v = self.to_v.forward(tokens);
        let attended = self.to_out.forward(multi_head_attention(q, k, v, 1, false));
        attended.swap_dims(1, 2).reshape([b, c, h, w]) + x
    }
}

/// diffusers' `UNetMidBlock2D` without time embedding: `resnet, [attention], resnet`.
#[derive(Module, Debug)]
pub struct MidBlock2D<B: Backend> {
    /// Two resnets, `channels -> channels`.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// Absent when the config sets `mid_block_add_attention: false`.
    pub attention: Option<AttentionBlock<B>>,
}

impl<B: Backend> MidBlock2D<B> {
    pub fn new(
        vb: &VarBuilder<B>,
        channels: usize,
        groups: usize,
        act: Activation,
        attention: bool,
    ) -> Result<Self> {
        let resnets = ResnetBlock2D::stack(vb, 2, channels, &resnet_config(channels, groups, act))?;
        let attention = if attention {
            Some(AttentionBlock::new(
                &vb.pp("attentions").pp(0),
                channels,
                groups,
            )?)
        } else {
            None
        };
        Ok(Self { resnets, attention })
    }

    /// `x`: `[batch, channels, height, width]`, same shape out.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut h = self.resnets[0].forward(x, None);
        if let Some(attn) = &self.attention {
            h = attn.forward(h);
        }
        self.resnets[1..].iter().fold(h, |h, r| r.forward(h, None))
    }
}

/// One encoder level (diffusers `DownEncoderBlock2D`): resnets, then a down-sampler except at the last level.
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D<B: Backend> {
    /// `layers_per_block` resnets; the first maps `in -> out` channels.
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub downsampler: Option<Downsample2D<B>>,
}

impl<B: Backend> DownEncoderBlock2D<B> {
    pub fn new(
        vb: &VarBuilder<B>,
        in_c: usize,
        out_c: usize,
        layers: usize,
        groups: usize,
        act: Activation,
        downsample: bool,
    ) -> Result<Self> {
        let resnets = ResnetBlock2D::stack(vb, layers, in_c, &resnet_config(out_c, groups, act))?;
        let downsampler = if downsample {
            Some(Downsample2D::new(&vb.pp("downsamplers").pp(0), out_c, 0)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            downsampler,
        })
    }

    /// `x`: `[batch, in_c, h, w]` -> `[batch, out_c, h/2, w/2]` (or `[batch, out_c, h, w]` at the last level).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.resnets.iter().fold(x, |h, r| r.forward(h, None));
        match &self.downsampler {
            Some(d) => d.forward(h),
            None => h,
        }
    }
}

/// One decoder level (diffusers `UpDecoderBlock2D`): resnets, then an up-sampler except at the last level.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D<B: Backend> {
    /// `layers_per_block + 1` resnets; the first maps `in -> out` channels.
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub upsampler: Option<Upsample2D<B>>,
}

impl<B: Backend> UpDecoderBlock2D<B> {
    pub fn new(
        vb: &VarBuilder<B>,
        in_c: usize,
        out_c: usize,
        layers: usize,
        groups: usize,
        act: Activation,
        upsample: bool,
    ) -> Result<Self> {
        let resnets = ResnetBlock2D::stack(vb, layers, in_c, &resnet_config(out_c, groups, act))?;
        let upsampler = if upsample {
            Some(Upsample2D::new(&vb.pp("upsamplers").pp(0), out_c)?)
        } else {
            None
        };
        Ok(Self { resnets, upsampler })
    }

    /// `x`: `[batch, in_c, h, w]` -> `[batch, out_c, 2h, 2w]` (or `[batch, out_c, h, w]` at the last level).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.resnets.iter().fold(x, |h, r| r.forward(h, None));
        match &self.upsampler {
            Some(u) => u.forward(h, None),
            None => h,
        }
    }
}

/// diffusers' VAE `Encoder` (with `double_z`): image -> moments (`mean ‖ logvar` before `quant_conv`).
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    /// 3x3, `in_channels -> block_out_channels[0]`.
    pub conv_in: Conv2d<B>,
    pub down_blocks: Vec<DownEncoderBlock2D<B>>,
    pub mid_block: MidBlock2D<B>,
    pub conv_norm_out: GroupNorm<B>,
    /// 3x3, `block_out_channels[-1] -> 2 * latent_channels`.
    pub conv_out: Conv2d<B>,
    pub act: Activation,
}

impl<B: Backend> Encoder<B> {
    /// Builds the encoder under `vb` (`encoder.*`); `cfg` must be valid ([`AutoencoderKLConfig::validate`]).
    pub fn new(cfg: &AutoencoderKLConfig, vb: &VarBuilder<B>) -> Result<Self> {
        let act = activation_of(cfg)?;
        let (channels, groups) = (&cfg.block_out_channels, cfg.norm_num_groups);
        let top = *channels.last().expect("validated config has levels");
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut in_c = channels[0];
        for (i, &out_c) in channels.iter().enumerate() {
            let last = i + 1 == channels.len();
            let vbi = vb.pp("down_blocks").pp(i);
            down_blocks.push(DownEncoderBlock2D::new(
                &vbi,
                in_c,
                out_c,
                cfg.layers_per_block,
                groups,
                act,
                !last,
            )?);
            in_c = out_c;
        }
        Ok(Self {
            conv_in: Conv2d::new(&vb.pp("conv_in"), cfg.in_channels, channels[0], 3, 1, 1)?,
            down_blocks,
            mid_block: MidBlock2D::new(
                &vb.pp("mid_block"),
                top,
                groups,
                act,
                cfg.mid_block_add_attention,
            )?,
            conv_norm_out: GroupNorm::new(&vb.pp("conv_norm_out"), groups, top, VAE_NORM_EPS)?,
            conv_out: Conv2d::new(&vb.pp("conv_out"), top, 2 * cfg.latent_channels, 3, 1, 1)?,
            act,
        })
    }

    /// `image`: `[batch, in_channels, H, W]` -> `[batch, 2 * latent_channels, H/f, W/f]`.
    pub fn forward(&self, image: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.conv_in.forward(image);
        let h = self.down_blocks.iter().fold(h, |h, block| block.forward(h));
        let h = self.mid_block.forward(h);
        self.conv_out
            .forward(self.act.forward(self.conv_norm_out.forward(h)))
    }
}

/// diffusers' VAE `Decoder`: latents (after `post_quant_conv`) -> image.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// 3x3, `latent_channels -> block_out_channels[-1]`.
    pub conv_in: Conv2d<B>,
    pub mid_block: MidBlock2D<B>,
    /// From the latent side: `up_blocks[0]` works at `block_out_channels[-1]` channels.
    pub up_blocks: Vec<UpDecoderBlock2D<B>>,
    pub conv_norm_out: GroupNorm<B>,
    /// 3x3, `block_out_channels[0] -> out_channels`.
    pub conv_out: Conv2d<B>,
    pub act: Activation,
}

impl<B: Backend> Decoder<B> {
    /// Builds the decoder under `vb` (`decoder.*`); `cfg` must be valid ([`AutoencoderKLConfig::validate`]).
    pub fn new(cfg: &AutoencoderKLConfig, vb: &VarBuilder<B>) -> Result<Self> {
        let act = activation_of(cfg)?;
        let (channels, groups) = (&cfg.block_out_channels, cfg.norm_num_groups);
        let top = *channels.last().expect("validated config has levels");
        let mut up_blocks = Vec::with_capacity(channels.len());
        let mut in_c = top;
        for (i, &out_c) in channels.iter().rev().enumerate() {
            let last = i + 1 == channels.len();
            let vbi = vb.pp("up_blocks").pp(i);
            up_blocks.push(UpDecoderBlock2D::new(
                &vbi,
                in_c,
                out_c,
                cfg.layers_per_block + 1,
                groups,
                act,
                !last,
            )?);
            in_c = out_c;
        }
        Ok(Self {
            conv_in: Conv2d::new(&vb.pp("conv_in"), cfg.latent_channels, top, 3, 1, 1)?,
            mid_block: MidBlock2D::new(
                &vb.pp("mid_block"),
                top,
                groups,
                act,
                cfg.mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &vb.pp("conv_norm_out"),
                groups,
                channels[0],
                VAE_NORM_EPS,
            )?,
            conv_out: Conv2d::new(&vb.pp("conv_out"), channels[0], cfg.out_channels, 3, 1, 1)?,
            act,
        })
    }

    /// `z`: `[batch, latent_channels, h, w]` -> `[batch, out_channels, h * f, w * f]`.
    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.mid_block.forward(self.conv_in.forward(z));
        let h = self.up_blocks.iter().fold(h, |h, block| block.forward(h));
        self.conv_out
            .forward(self.act.forward(self.conv_norm_out.forward(h)))
    }
}

fn activation_of(cfg: &AutoencoderKLConfig) -> Result<Activation> {
    Activation::parse(&cfg.act_fn).map_err(|msg| WeightError::Config {
        path: PathBuf::from("AutoencoderKLConfig"),
        msg,
    })
}

/// The encoder's output distribution: a diagonal Gaussian per latent element.
#[derive(Clone, Debug)]
pub struct DiagonalGaussian<B: Backend> {
    /// `[batch, latent_channels, h, w]`
    pub mean: Tensor<B, 4>,
    /// Log-variance, clamped to `[-30, 20]` as diffusers does; `[batch, latent_channels, h, w]`.
    pub logvar: Tensor<B, 4>,
}

impl<B: Backend> DiagonalGaussian<B> {
    /// Splits `moments` `[batch, 2 * latent, h, w]` into mean (first half of the channels) and log-variance.
    pub fn from_moments(moments: Tensor<B, 4>) -> Self {
        let mut halves = moments.chunk(2, 1);
        let logvar = halves.pop().expect("two halves").clamp(-30.0, 20.0);
        let mean = halves.pop().expect("two halves");
        Self { mean, logvar }
    }

    /// Standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Tensor<B, 4> {
        (self.logvar.clone() * 0.5).exp()
    }

    /// Variance `exp(logvar)`.
    pub fn var(&self) -> Tensor<B, 4> {
        self.logvar.clone().exp()
    }

    /// A draw `mean + std * noise` for the given standard normal `noise` (same shape as `mean`).
    pub fn sample(&self, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        self.mean.clone() + self.std() * noise
    }

    /// The most likely latent, `mean`.
    pub fn mode(&self) -> Tensor<B, 4> {
        self.mean.clone()
    }
}

/// diffusers' `AutoencoderKL`: the SD VAE.
#[derive(Module, Debug)]
pub struct AutoencoderKL<B: Backend> {
    pub encoder: Encoder<B>,
    pub decoder: Decoder<B>,
    /// 1x1, `2 * latent -> 2 * latent` (absent when `use_quant_conv` is false).
    pub quant_conv: Option<Conv2d<B>>,
    /// 1x1, `latent -> latent` (absent when `use_post_quant_conv` is false).
    pub post_quant_conv: Option<Conv2d<B>>,
    /// `config.scaling_factor`.
    pub scaling_factor: f64,
    /// `config.shift_factor`, 0 when absent.
    pub shift_factor: f64,
}

impl<B: Backend> AutoencoderKL<B> {
    /// Builds the VAE from `cfg`, reading (or randomly initialising) every tensor through `vb` by its diffusers name.
    pub fn new(cfg: &AutoencoderKLConfig, vb: &VarBuilder<B>) -> Result<Self> {
        cfg.validate(Path::new("AutoencoderKLConfig"))?;
        let latent = cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::new(cfg, &vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, &vb.pp("decoder"))?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv2d::new(
                    &vb.pp("quant_conv"),
                    2 * latent,
                    2 * latent,
                    1,
                    1,
                    0,
                )?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::new(
                    &vb.pp("post_quant_conv"),
                    latent,
                    latent,
                    1,
                    1,
                    0,
                )?)
            } else {
                None
            },
            scaling_factor: cfg.scaling_factor,
            shift_factor: cfg.shift_factor.unwrap_or(0.0),
        })
    }

    /// Loads a diffusers VAE folder: `folder/config.json` and its safetensors weights, as `dtype` on `device`.
    pub fn load(folder: impl AsRef<Path>, device: &B::Device, dtype: DType) -> Result<Self> {
        let folder = folder.as_ref();
        let config_path = folder.join("config.json");
        let cfg: AutoencoderKLConfig = read_json(&config_path)?;
        cfg.validate(&config_path)?;
        let vb = VarBuilder::from_safetensors(&component_weights(folder)?, device, dtype)?;
        Self::new(&cfg, &vb)
    }

    /// The latent distribution of `image` `[batch, 3, H, W]` (values in `[-1, 1]`); mean and log-variance are
    /// `[batch, latent_channels, H/f, W/f]`.
    pub fn encode(&self, image: Tensor<B, 4>) -> DiagonalGaussian<B> {
        let moments = self.encoder.forward(image);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(moments),
            None => moments,
        };
        DiagonalGaussian::from_moments(moments)
    }

    /// Scaled latents of `image` as the UNet sees them: `scale_latents(encode(image).sample(noise))`.
    pub fn encode_scaled(&self, image: Tensor<B, 4>, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        self.scale_latents(self.encode(image).sample(noise))
    }

    /// Decodes unscaled latents `z` `[batch, latent_channels, h, w]` to an image `[batch, 3, h * f, w * f]`
    /// (roughly in `[-1, 1]`).
    pub fn decode(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z),
            None => z,
        };
        self.decoder.forward(z)
    }

    /// Decodes scaled latents (the UNet's / sampler's output): `decode(unscale_latents(latents))`.
    pub fn decode_scaled(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        self.decode(self.unscale_latents(latents))
    }

    /// VAE latents -> UNet latents: `(z - shift_factor) * scaling_factor`.
    pub fn scale_latents(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        if self.shift_factor == 0.0 {
            z * self.scaling_factor
        } else {
            (z - self.shift_factor) * self.scaling_factor
        }
    }

    /// UNet latents -> VAE latents: `latents / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        // A product with the reciprocal, not a division: burn-autodiff 0.21's `div_scalar` backward rounds the
        // divisor to f32 (`1.0 / rhs.elem::<f32>()`), a 3e-8 error in every float64 gradient through here.
        let z = latents * (1.0 / self.scaling_factor);
        if self.shift_factor == 0.0 {
            z
        } else {
            z + self.shift_factor
        }
    }
}
