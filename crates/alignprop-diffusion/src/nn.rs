//! Building blocks shared by the UNet, the VAE and CLIP: linear, convolution, group and layer norms, attention.
//!
//! Parameters keep PyTorch's layouts (`Linear.weight` is `[out, in]`, `Conv2d.weight` is
//! `[out, in, kh, kw]`), so files load and save without transposition.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;

use burn::tensor::{Tensor, activation};

use alignprop_io::weights::{Init, Result, VarBuilder};

/// Wraps a loaded tensor as a parameter. Parameters start frozen: base weights of SD are never trained;
/// trainable adapters (LoRA) turn gradients on for their own tensors.
pub fn param<B: Backend, const D: usize>(t: Tensor<B, D>) -> Param<Tensor<B, D>> {
    Param::from_tensor(t).set_require_grad(false)
}

/// A low-rank adapter on a linear layer: `delta y = scale * multiplier * (x A^T) B^T` (LoRA, Hu et al. 2021).
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `A`: `[rank, in_features]` (peft `lora_A`, diffusers `lora.down`).
    pub down: Param<Tensor<B, 2>>,
    /// `B`: `[out_features, rank]` (peft `lora_B`, diffusers `lora.up`).
    pub up: Param<Tensor<B, 2>>,
    /// `alpha / rank`.
    pub scale: f64,
    /// A run-time strength (diffusers' `cross_attention_kwargs={"scale": s}`), 1 by default.
    pub multiplier: f64,
}

impl<B: Backend> LoraAdapter<B> {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// The dense weight delta `scale * multiplier * B A`: `[out_features, in_features]`.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.up.val().matmul(self.down.val()) * (self.scale * self.multiplier)
    }
}

/// `y = x W^T + b`, applied to the last dimension, plus an optional LoRA adapter.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out_features, in_features]`
    pub weight: Param<Tensor<B, 2>>,
    /// `[out_features]`
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A trainable low-rank adapter (None for plain layers).
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> Linear<B> {
    /// Loads `weight` (and `bias` when `bias` is true) under `vb`.
    pub fn new(
        vb: &VarBuilder<B>,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let init = Init::fan_in(in_features);
        let weight = param(vb.get([out_features, in_features], "weight", init)?);
        let bias = if bias {
            Some(param(vb.get([out_features], "bias", init)?))
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            lora: None,
        })
    }

    /// Same as [`Linear::new`] but the weight may be stored under one of several names (legacy layouts).
    pub fn new_any(
        vb: &VarBuilder<B>,
        names: &[&str],
        in_f: usize,
        out_f: usize,
        bias: bool,
    ) -> Result<Self> {
        for name in &names[..names.len() - 1] {
            if vb.contains(&format!("{name}.weight")) {
                return Self::new(&vb.pp(name), in_f, out_f, bias);
            }
        }
        Self::new(&vb.pp(names[names.len() - 1]), in_f, out_f, bias)
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x`: `[..., in_features]` -> `[..., out_features]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let x2: Tensor<B, 2> = x.reshape([rows, dims[D - 1]]);
        let mut y = alignprop_kernels::linear_with_bias(
            x2.clone(),
            self.weight.val(),
            self.bias.as_ref().map(|b| b.val()),
        );
        if let Some(l) = &self.lora {
            // Mixed precision: adapters may be f32 on a half-precision base; the low-rank path runs in the
            // adapter's dtype and is cast back.
            let (down, up) = (l.down.val(), l.up.val());
            let (base, ad) = (y.dtype(), down.dtype());
            let x2 = if ad == base { x2 } else { x2.cast(ad) };
            let delta = alignprop_kernels::linear(alignprop_kernels::linear(x2, down), up)
                * (l.scale * l.multiplier);
            y = y + if ad == base { delta } else { delta.cast(base) };
        }
        let mut out = dims;
        out[D - 1] = self.out_features();
        y.reshape(out)
    }
}

/// 2-D convolution with square kernel, stride and symmetric zero padding.
#[derive(Module, Debug)]
pub struct Conv2d<B: Backend> {
    /// `[out_channels, in_channels, kernel, kernel]`
    pub weight: Param<Tensor<B, 4>>,
    /// `[out_channels]`
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub stride: usize,
    pub padding: usize,
}

impl<B: Backend> Conv2d<B> {
    pub fn new(
        vb: &VarBuilder<B>,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let init = Init::fan_in(in_channels * kernel * kernel);
        Ok(Self {
            weight: param(vb.get([out_channels, in_channels, kernel, kernel], "weight", init)?),
            bias: Some(param(vb.get([out_channels], "bias", init)?)),
            stride,
            padding,
        })
    }

    /// `x`: `[batch, in_channels, height, width]` -> `[batch, out_channels, height', width']`.
    /// Through [`alignprop_kernels::conv2d`] (stride-1 "same" convolutions have a fused backward on the CPU).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let bias = self.bias.as_ref().map(|b| b.val());
        alignprop_kernels::conv2d(x, self.weight.val(), bias, self.stride, self.padding)
    }
}

/// Group normalisation over `[batch, channels, ...]` with a per-channel affine transform.
#[derive(Module, Debug)]
pub struct GroupNorm<B: Backend> {
    /// `[channels]`
    pub weight: Param<Tensor<B, 1>>,
    /// `[channels]`
    pub bias: Param<Tensor<B, 1>>,
    pub groups: usize,
    pub eps: f64,
}

impl<B: Backend> GroupNorm<B> {
    pub fn new(vb: &VarBuilder<B>, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: param(vb.get([channels], "weight", Init::Ones)?),
            bias: param(vb.get([channels], "bias", Init::Zeros)?),
            groups,
            eps,
        })
    }

    /// `x`: `[batch, channels, ...]` (any rank >= 3), same shape out, through [`alignprop_kernels::group_norm`].
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let (b, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let x3: Tensor<B, 3> = x.reshape([b, c, spatial]);
        alignprop_kernels::group_norm(
            x3,
            self.weight.val(),
            self.bias.val(),
            self.groups,
            self.eps,
        )
        .reshape(dims)
    }
}

/// Layer normalisation over the last dimension.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// `[features]`
    pub weight: Param<Tensor<B, 1>>,
    /// `[features]`
    pub bias: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn new(vb: &VarBuilder<B>, features: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: param(vb.get([features], "weight", Init::Ones)?),
            bias: param(vb.get([features], "bias", Init::Zeros)?),
            eps,
        })
    }

    /// `x`: `[..., features]`, same shape out, through [`alignprop_kernels::layer_norm`].
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let f = dims[D - 1];
        let rows: usize = dims[..D - 1].iter().product();
        let x2: Tensor<B, 2> = x.reshape([rows, f]);
        alignprop_kernels::layer_norm(x2, self.weight.val(), self.bias.val(), self.eps)
            .reshape(dims)
    }
}

/// The element-wise nonlinearity named by a diffusers `act_fn` (`get_activation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)` (`silu` / `swish`), SD's choice.
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    Relu,
    /// `x * tanh(softplus(x))`.
    Mish,
}

impl Activation {
    /// `silu` / `swish`, `gelu`, `relu`, `mish`; `None` for other names.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "relu" => Self::Relu,
            "mish" => Self::Mish,
            _ => return None,
        })
    }

    /// [`Activation::from_name`] with an error message naming the supported values.
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        Self::from_name(name).ok_or_else(|| {
            format!("unsupported act_fn '{name}' (supported: silu, swish, gelu, relu, mish)")
        })
    }

    /// Applies the activation element-wise.
    pub fn forward<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Silu => alignprop_kernels::silu(x),
            Self::Gelu => gelu(x),
            Self::Relu => activation::relu(x),
            Self::Mish => activation::mish(x),
        }
    }
}

/// `x * sigmoid(x)` (the fused kernel on the CPU backend).
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    alignprop_kernels::silu(x)
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu` (the fused kernel on the CPU backend).
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    alignprop_kernels::gelu(x)
}

/// CLIP's `quick_gelu`: `x * sigmoid(1.702 x)` (the fused kernel on the CPU backend).
pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    alignprop_kernels::quick_gelu(x)
}

pub use alignprop_kernels::{multi_head_attention, scaled_dot_product_attention, softmax};
