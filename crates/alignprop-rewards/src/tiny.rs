//! The tiny differentiable reward of the parity fixtures (a stand-in with the shape of the LAION aesthetic
//! scorer): CLIP preprocessing to a small square, a linear "image encoder", L2 normalisation, a two-layer linear
//! head. It lets the whole AlignProp gradient be checked against PyTorch on a tiny model.
//!
//! ```text
//! x = normalize(resize_to_s_x_s(clamp(img / 2 + 0.5, 0, 1)))     [b, 3, s, s]
//! f = flatten(x) @ proj^T; f = f / ||f||                [b, embed]
//! r = mlp.1(mlp.0(f))                                   [b]
//! ```

use std::path::Path;

use alignprop_diffusion::nn::Linear;
use alignprop_io::VarBuilder;
use alignprop_io::pipeline_files::read_json;
use alignprop_io::weights::{Init, Result};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use serde::Deserialize;

use crate::preprocess::{CLIP_MEAN, CLIP_STD, normalize, resize_bilinear, to_unit_range};

/// `reward/config.json` of the fixture.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct TinyRewardConfig {
    pub resize: [usize; 2],
    pub clip_mean: [f64; 3],
    pub clip_std: [f64; 3],
    pub embed_dim: usize,
}

impl Default for TinyRewardConfig {
    fn default() -> Self {
        Self {
            resize: [32, 32],
            clip_mean: CLIP_MEAN,
            clip_std: CLIP_STD,
            embed_dim: 32,
        }
    }
}

#[derive(Module, Debug)]
pub struct TinyReward<B: Backend> {
    /// `[embed, 3 * s * s]`, no bias.
    pub proj: Param<Tensor<B, 2>>,
    pub mlp0: Linear<B>,
    pub mlp1: Linear<B>,
    pub size: usize,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl<B: Backend> TinyReward<B> {
    pub fn new(cfg: &TinyRewardConfig, vb: &VarBuilder<B>) -> Result<Self> {
        let s = cfg.resize[0];
        let inputs = 3 * s * s;
        Ok(Self {
            proj: alignprop_diffusion::nn::param(vb.pp("proj").get(
                [cfg.embed_dim, inputs],
                "weight",
                Init::fan_in(inputs),
            )?),
            mlp0: Linear::new(&vb.pp("mlp").pp(0), cfg.embed_dim, 16, true)?,
            mlp1: Linear::new(&vb.pp("mlp").pp(1), 16, 1, true)?,
            size: s,
            mean: cfg.clip_mean,
            std: cfg.clip_std,
        })
    }

    /// Loads `folder/config.json` and `folder/tiny_reward.safetensors`.
    pub fn load(folder: &Path, device: &B::Device, dtype: DType) -> Result<Self> {
        let cfg: TinyRewardConfig = read_json(&folder.join("config.json"))?;
        let vb =
            VarBuilder::from_safetensors(&[folder.join("tiny_reward.safetensors")], device, dtype)?;
        Self::new(&cfg, &vb)
    }

    /// The L2-normalised embedding `[b, embed]` of decoder output `images` `[b, 3, H, W]` in `[-1, 1]`.
    pub fn embed(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        // The fixture's scorer resizes to exactly `size x size` (`F.interpolate(x, (s, s))`), whatever the aspect.
        let x = normalize(
            resize_bilinear(to_unit_range(images), [self.size, self.size]),
            self.mean,
            self.std,
        );
        let [b, c, h, w] = x.dims();
        let f = alignprop_kernels::linear(x.reshape([b, c * h * w]), self.proj.val());
        let norm = f.clone().square().sum_dim(1).sqrt();
        f / norm
    }

    /// One score per image: `[b]`.
    pub fn score(&self, images: Tensor<B, 4>) -> Tensor<B, 1> {
        let r = self.mlp1.forward(self.mlp0.forward(self.embed(images)));
        let b = r.dims()[0];
        r.reshape([b])
    }
}
