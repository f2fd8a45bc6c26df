//! The building blocks the UNet and the VAE share: diffusers' `ResnetBlock2D` (`models/resnet.py`), `Downsample2D`
//! (`models/downsampling.py`) and `Upsample2D` (`models/upsampling.py`), as candle's `stable_diffusion` module
//! has them too.
//!
//! The time embedding is optional: the UNet's resnets add a projection of it (`time_emb_proj`), the VAE's have
//! none. Tensor names are diffusers' (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`, `conv`).

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use crate::nn::{Activation, Conv2d, GroupNorm, Linear};
use alignprop_io::weights::{Result, VarBuilder};

/// The sizes and settings of one [`ResnetBlock2D`] (diffusers' constructor arguments, `time_embedding_norm =
/// "default"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResnetBlock2DConfig {
    /// Output channels; a 1x1 `conv_shortcut` is built when they differ from the input's.
    pub out_channels: usize,
    /// Width of the time embedding (`temb_channels`); `None` builds no `time_emb_proj` (the VAE's resnets).
    pub temb_channels: Option<usize>,
    /// Groups of both GroupNorms.
    pub groups: usize,
    /// Epsilon of both GroupNorms (`norm_eps` for the UNet, 1e-6 for the VAE).
    pub eps: f64,
    /// The non-linearity after each norm (`act_fn`).
    pub act: Activation,
    /// The output is `(shortcut(x) + h) / output_scale_factor`.
    pub output_scale_factor: f64,
}

/// diffusers' `ResnetBlock2D` (`time_embedding_norm = "default"`):
/// `h = conv1(act(norm1(x))) [+ time_emb_proj(temb)]; h = conv2(act(norm2(h))); (shortcut(x) + h) / scale`.
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    pub norm1: GroupNorm<B>,
    /// 3x3, padding 1, `in -> out` channels.
    pub conv1: Conv2d<B>,
    /// `[out, temb_channels]` with bias; absent without a time embedding.
    pub time_emb_proj: Option<Linear<B>>,
    pub norm2: GroupNorm<B>,
    /// 3x3, padding 1, `out -> out` channels.
    pub conv2: Conv2d<B>,
    /// 1x1 projection of the input, present when the channel count changes.
    pub conv_shortcut: Option<Conv2d<B>>,
    pub act: Activation,
    pub output_scale_factor: f64,
}

impl<B: Backend> ResnetBlock2D<B> {
    /// Reads (or initialises) the tensors under `vb` in diffusers' order: `norm1`, `conv1`, `time_emb_proj`,
    /// `norm2`, `conv2`, `conv_shortcut`.
    pub fn new(vb: &VarBuilder<B>, in_channels: usize, cfg: &ResnetBlock2DConfig) -> Result<Self> {
        let out_channels = cfg.out_channels;
        let norm1 = GroupNorm::new(&vb.pp("norm1"), cfg.groups, in_channels, cfg.eps)?;
        let conv1 = Conv2d::new(&vb.pp("conv1"), in_channels, out_channels, 3, 1, 1)?;
        let time_emb_proj = cfg
            .temb_channels
            .map(|temb| Linear::new(&vb.pp("time_emb_proj"), temb, out_channels, true))
            .transpose()?;
        let norm2 = GroupNorm::new(&vb.pp("norm2"), cfg.groups, out_channels, cfg.eps)?;
        let conv2 = Conv2d::new(&vb.pp("conv2"), out_channels, out_channels, 3, 1, 1)?;
        let conv_shortcut = (in_channels != out_channels)
            .then(|| Conv2d::new(&vb.pp("conv_shortcut"), in_channels, out_channels, 1, 1, 0))
            .transpose()?;
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            act: cfg.act,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `layers` resnets under `vb` as `resnets.0`, `resnets.1`, ...: the first maps `in_channels ->
    /// cfg.out_channels`, the others keep `cfg.out_channels` (the resnets of diffusers' down blocks, mid blocks and
    /// VAE decoder blocks).
    pub fn stack(
        vb: &VarBuilder<B>,
        layers: usize,
        in_channels: usize,
        cfg: &ResnetBlock2DConfig,
    ) -> Result<Vec<Self>> {
        let vb = vb.pp("resnets");
        (0..layers)
            .map(|i| {
                let c = if i == 0 {
                    in_channels
                } else {
                    cfg.out_channels
                };
                Self::new(&vb.pp(i), c, cfg)
            })
            .collect()
    }

    /// `x`: `[batch, in_channels, height, width]` -> `[batch, out_channels, height, width]`.
    ///
    /// `temb`: `[batch, temb_channels]`, the time embedding ALREADY passed through the activation (diffusers
    /// applies it inside every resnet; the UNet does it once for all of them). It is added only when both it and
    /// `time_emb_proj` are present (as candle does); the VAE passes `None`.
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<&Tensor<B, 2>>) -> Tensor<B, 4> {
        let h = self
            .conv1
            .forward(self.act.forward(self.norm1.forward(x.clone())));
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let dims = h.dims();
                let [b, c] = [dims[0], dims[1]];
                // One scalar per (batch, channel) row: `[b * c, h * w] + [b * c, 1]` is a broadcast burn's CPU
                // backend does fast, unlike `[b, c, h, w] + [b, c, 1, 1]`.
                let t = proj.forward(temb.clone()).reshape([b * c, 1]);
                (h.reshape([b * c, dims[2] * dims[3]]) + t).reshape(dims)
            }
            _ => h,
        };
        let h = self.conv2.forward(self.act.forward(self.norm2.forward(h)));
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        let out = shortcut + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out * (1.0 / self.output_scale_factor) // not `/`: see `AutoencoderKL::unscale_latents`
        }
    }
}

/// diffusers' `Downsample2D` with `use_conv`: a 3x3 stride-2 convolution (`conv`).
#[derive(Module, Debug)]
pub struct Downsample2D<B: Backend> {
    /// 3x3, stride 2, `channels -> channels`.
    pub conv: Conv2d<B>,
}

impl<B: Backend> Downsample2D<B> {
    /// `padding`: the convolution's padding (the UNet's `downsample_padding`, 1 for SD); 0 means "pad right and
    /// bottom by one zero" instead, as diffusers does (the VAE encoder's down-samplers).
    pub fn new(vb: &VarBuilder<B>, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&vb.pp("conv"), channels, channels, 3, 2, padding)?,
        })
    }

    /// `[batch, channels, height, width]` -> `[batch, channels, ceil(height / 2), ceil(width / 2)]` with padding 1,
    /// `[batch, channels, floor(height / 2), floor(width / 2)]` with padding 0.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if self.conv.padding != 0 {
            return self.conv.forward(x);
        }
        // Zeros of the input's dtype concatenated, rather than `Tensor::pad`, which builds its fill in float32
        // whatever the tensor's dtype (a dtype mismatch on burn-flex for float64 inputs).
        let [b, c, h, w] = x.dims();
        let (device, dtype) = (x.device(), x.dtype());
        let x = Tensor::cat(vec![x, Tensor::zeros([b, c, h, 1], (&device, dtype))], 3);
        let x = Tensor::cat(
            vec![x, Tensor::zeros([b, c, 1, w + 1], (&device, dtype))],
            2,
        );
        self.conv.forward(x)
    }
}

/// diffusers' `Upsample2D` with `use_conv`: nearest-neighbour upsampling then a 3x3 convolution (`conv`).
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    /// 3x3, padding 1, `channels -> channels`.
    pub conv: Conv2d<B>,
}

impl<B: Backend> Upsample2D<B> {
    pub fn new(vb: &VarBuilder<B>, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// `[batch, channels, height, width]` -> `[batch, channels, size[0], size[1]]`, `size` defaulting to
    /// `[2 * height, 2 * width]`. The UNet passes the spatial size of the next skip connection, which differs from
    /// `2x` after odd sizes were downsampled (torch's nearest rule: source index `floor(dst * in / out)`).
    pub fn forward(&self, x: Tensor<B, 4>, size: Option<[usize; 2]>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let size = size.unwrap_or([2 * h, 2 * w]);
        let up = interpolate(x, size, InterpolateOptions::new(InterpolateMode::Nearest));
        self.conv.forward(up)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{DType, Distribution, Tensor};

    use super::*;

    type B = Flex;

    fn randn(shape: [usize; 4], dtype: DType) -> Tensor<B, 4> {
        Tensor::random(
            shape,
            Distribution::Normal(0.0, 1.0),
            (&Default::default(), dtype),
        )
    }

    #[test]
    fn resnet_with_and_without_time_embedding() {
        let vb = VarBuilder::<B>::random(&Default::default(), DType::F32);
        let cfg = ResnetBlock2DConfig {
            out_channels: 8,
            temb_channels: Some(6),
            groups: 2,
            eps: 1e-5,
            act: Activation::Silu,
            output_scale_factor: 2.0,
        };
        let unet_style = ResnetBlock2D::new(&vb, 4, &cfg).unwrap();
        assert!(unet_style.time_emb_proj.is_some() && unet_style.conv_shortcut.is_some());
        let x = randn([2, 4, 5, 3], DType::F32);
        let temb =
            Tensor::<B, 2>::random([2, 6], Distribution::Normal(0.0, 1.0), &Default::default());
        let with_t = unet_style.forward(x.clone(), Some(&temb));
        assert_eq!(with_t.dims(), [2, 8, 5, 3]);
        let without_t = unet_style.forward(x, None);
        let diff = (with_t - without_t)
            .abs()
            .max()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap()[0];
        assert!(diff > 0.0, "the time embedding changes the output");

        let vae_style = ResnetBlock2D::new(
            &vb,
            8,
            &ResnetBlock2DConfig {
                temb_channels: None,
                ..cfg
            },
        )
        .unwrap();
        assert!(vae_style.time_emb_proj.is_none() && vae_style.conv_shortcut.is_none());
        assert_eq!(
            vae_style
                .forward(randn([1, 8, 4, 4], DType::F32), None)
                .dims(),
            [1, 8, 4, 4]
        );

        let stack = ResnetBlock2D::stack(&vb, 3, 4, &cfg).unwrap();
        assert_eq!(stack.len(), 3);
        assert!(
            stack[0].conv_shortcut.is_some()
                && stack[1..].iter().all(|r| r.conv_shortcut.is_none())
        );
    }

    #[test]
    fn down_and_upsampling_shapes_and_dtypes() {
        for dtype in [DType::F32, DType::F64] {
            let vb = VarBuilder::<B>::random(&Default::default(), dtype);
            let x = randn([1, 4, 5, 7], dtype);
            // Padding 0 (the VAE's): zero row and column appended, floor(n / 2) out, the input's dtype kept.
            let down0 = Downsample2D::new(&vb, 4, 0).unwrap().forward(x.clone());
            assert_eq!((down0.dims(), down0.dtype()), ([1, 4, 2, 3], dtype));
            // Padding 1 (SD's UNet): ceil(n / 2) out.
            let down1 = Downsample2D::new(&vb, 4, 1).unwrap().forward(x.clone());
            assert_eq!((down1.dims(), down1.dtype()), ([1, 4, 3, 4], dtype));
            let up = Upsample2D::new(&vb, 4).unwrap();
            assert_eq!(up.forward(x.clone(), None).dims(), [1, 4, 10, 14]);
            assert_eq!(up.forward(x, Some([9, 13])).dims(), [1, 4, 9, 13]);
        }
    }
}
