//! Putting LoRA adapters on the UNet attention projections, reading them back, merging them into the weights.
//!
//! The targets are named like peft's `target_modules`: `to_q`, `to_k`, `to_v`, `to_out.0` of every attention
//! (self- and cross-attention of every transformer block). At rank 4 on SD1.5 that is 797,184 parameters.

use alignprop_diffusion::nn::{Linear, LoraAdapter};
use alignprop_diffusion::unet::UNet2DConditionModel;
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::format::{LoraError, LoraPair, LoraWeights, Matrix, Result};
use crate::names::UnetNames;

/// The projections of every attention that LoRA adapts, by their name inside the attention (peft's
/// `target_modules` names), in the order [`projections`] lists them: query, key, value, output.
pub const TARGET_MODULES: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

/// How adapters are created for training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    /// The scale is `alpha / rank`.
    pub alpha: f64,
    /// Projections to adapt, by their name inside an attention (`to_q`, `to_k`, `to_v`, `to_out.0`).
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    /// AlignProp's setting: rank 4, alpha 4 (scale 1), on q, k, v and out of every attention.
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 4.0,
            target_modules: TARGET_MODULES.map(String::from).to_vec(),
        }
    }
}

/// The diffusers module paths of the [`TARGET_MODULES`] of the attention at `attention` (`....attn1.to_q`, ...).
fn module_paths(attention: &str) -> [String; 4] {
    TARGET_MODULES.map(|t| format!("{attention}.{t}"))
}

/// Every adaptable projection of the UNet with its diffusers module path
/// (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, ...), attention by attention in the UNet's
/// order and [`TARGET_MODULES`] order within one.
pub fn projections<B: Backend>(unet: &UNet2DConditionModel<B>) -> Vec<(String, &Linear<B>)> {
    let mut out = Vec::new();
    for (name, a) in unet.attentions() {
        let linears = [&a.to_q, &a.to_k, &a.to_v, &a.to_out];
        out.extend(module_paths(&name).into_iter().zip(linears));
    }
    out
}

/// [`projections`], mutable.
pub fn projections_mut<B: Backend>(
    unet: &mut UNet2DConditionModel<B>,
) -> Vec<(String, &mut Linear<B>)> {
    let mut out = Vec::new();
    for (name, a) in unet.attentions_mut() {
        let linears = [&mut a.to_q, &mut a.to_k, &mut a.to_v, &mut a.to_out];
        out.extend(module_paths(&name).into_iter().zip(linears));
    }
    out
}

/// Adapters (and so their gradients and optimiser state) stay in f32 when the frozen base runs in half precision.
fn adapter_dtype(base: DType) -> DType {
    match base {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

fn is_target(module: &str, targets: &[String]) -> bool {
    targets
        .iter()
        .any(|t| module == t || module.ends_with(&format!(".{t}")))
}

/// Adds fresh trainable adapters to the targeted projections, initialised as peft's `init_lora_weights=True`
/// for training: `A ~ kaiming-uniform(a = sqrt(5))`, i.e. uniform in `[-1/sqrt(in), 1/sqrt(in)]`, and `B = 0`,
/// so the model starts exactly at the base model. Base weights stay frozen. The draws come from a generator of
/// this crate seeded with 0 (see [`inject_seeded`]), never from the backend's global RNG, so they do not depend
/// on what else runs in the process. Returns the number of trainable parameters.
pub fn inject<B: Backend>(unet: &mut UNet2DConditionModel<B>, cfg: &LoraConfig) -> Result<usize> {
    inject_seeded(unet, cfg, 0)
}

/// SplitMix64: a small, fast, well-mixed generator for reproducible initialisation.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-bound, bound)`.
    fn uniform(&mut self, bound: f64) -> f64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (2.0 * u - 1.0) * bound
    }
}

/// As [`inject`], with the adapters' `A` matrices drawn from a generator seeded with `seed` (module by module in
/// the UNet's order), so a training run is reproducible whatever else shares the process.
pub fn inject_seeded<B: Backend>(
    unet: &mut UNet2DConditionModel<B>,
    cfg: &LoraConfig,
    seed: u64,
) -> Result<usize> {
    let mut rng = SplitMix64(seed);
    if cfg.rank == 0 {
        return Err(LoraError::Invalid("LoRA rank must be at least 1".into()));
    }
    let mut count = 0;
    for (name, linear) in projections_mut(unet) {
        if !is_target(&name, &cfg.target_modules) {
            continue;
        }
        let w = linear.weight.val();
        let [out_f, in_f] = w.dims();
        let (device, dtype) = (w.device(), adapter_dtype(w.dtype()));
        let bound = 1.0 / (in_f as f64).sqrt();
        let values: Vec<f32> = (0..cfg.rank * in_f)
            .map(|_| rng.uniform(bound) as f32)
            .collect();
        let down =
            Tensor::<B, 2>::from_data(TensorData::new(values, [cfg.rank, in_f]), (&device, dtype));
        let up = Tensor::zeros([out_f, cfg.rank], (&device, dtype));
        linear.lora = Some(LoraAdapter {
            down: Param::from_tensor(down),
            up: Param::from_tensor(up),
            scale: cfg.alpha / cfg.rank as f64,
            multiplier: 1.0,
        });
        count += (in_f + out_f) * cfg.rank;
    }
    if count == 0 {
        return Err(LoraError::Invalid(format!(
            "no UNet projection matches target_modules {:?}",
            cfg.target_modules
        )));
    }
    Ok(count)
}

/// Installs the adapters of a LoRA file (every module of the file must exist in the UNet with matching shapes),
/// at strength `multiplier` (1 = as trained). `trainable` makes them require gradients (resuming training).
/// Modules named after the original UNet (kohya's SDXL files: `input_blocks.4.1...`) are translated for this UNet
/// first ([`LoraWeights::resolve_names`]).
pub fn apply<B: Backend>(
    unet: &mut UNet2DConditionModel<B>,
    lora: &LoraWeights,
    multiplier: f64,
    trainable: bool,
) -> Result<()> {
    let resolved;
    let lora = if lora.has_sgm_names() {
        resolved = lora.resolve_names(&UnetNames::of(unet))?;
        &resolved
    } else {
        lora
    };
    let mut remaining: std::collections::BTreeSet<&String> = lora.modules.keys().collect();
    for (name, linear) in projections_mut(unet) {
        let Some(pair) = lora.modules.get(&name) else {
            continue;
        };
        remaining.remove(&name);
        let w = linear.weight.val();
        let [out_f, in_f] = w.dims();
        let r = pair.rank();
        if pair.down.shape != [r, in_f] || pair.up.shape != [out_f, r] {
            return Err(LoraError::Invalid(format!(
                "LoRA module '{name}': expected down [{r}, {in_f}] and up [{out_f}, {r}] for this UNet, found \
                 down {:?} and up {:?}",
                pair.down.shape, pair.up.shape
            )));
        }
        let (device, dtype) = (w.device(), adapter_dtype(w.dtype()));
        let t = |m: &Matrix| {
            let p = Param::from_tensor(Tensor::<B, 2>::from_data(
                TensorData::new(m.values.clone(), m.shape),
                (&device, dtype),
            ));
            p.set_require_grad(trainable)
        };
        linear.lora = Some(LoraAdapter {
            down: t(&pair.down),
            up: t(&pair.up),
            scale: pair.scale(),
            multiplier,
        });
    }
    if let Some(first) = remaining.first() {
        return Err(LoraError::Invalid(format!(
            "{} LoRA module(s) do not exist in this UNet, e.g. '{first}' (a LoRA for another model?)",
            remaining.len()
        )));
    }
    Ok(())
}

/// Reads the adapters back (as f32), e.g. to save them.
pub fn extract<B: Backend>(unet: &mut UNet2DConditionModel<B>) -> LoraWeights {
    let mut out = LoraWeights::default();
    for (name, linear) in projections_mut(unet) {
        let Some(l) = &linear.lora else { continue };
        let m = |t: Tensor<B, 2>| {
            let shape = t.dims();
            Matrix::new(
                shape,
                t.into_data().convert::<f32>().to_vec().expect("f32 data"),
            )
        };
        let r = l.rank();
        out.modules.insert(
            name,
            LoraPair {
                down: m(l.down.val()),
                up: m(l.up.val()),
                alpha: Some(l.scale * r as f64),
            },
        );
    }
    out
}

/// Sets the run-time strength of every installed adapter (diffusers' `cross_attention_kwargs={"scale": s}`).
pub fn set_multiplier<B: Backend>(unet: &mut UNet2DConditionModel<B>, multiplier: f64) {
    for (_, linear) in projections_mut(unet) {
        if let Some(l) = &mut linear.lora {
            l.multiplier = multiplier;
        }
    }
}

/// Folds every adapter into its base weight (`W += scale * multiplier * B A`) and removes the adapters: the
/// merged UNet runs at the base model's speed.
pub fn merge<B: Backend>(unet: &mut UNet2DConditionModel<B>) {
    for (_, linear) in projections_mut(unet) {
        if let Some(l) = linear.lora.take() {
            let w = linear.weight.val();
            let dtype = w.dtype();
            let merged = w + l.delta().cast(dtype);
            linear.weight = Param::from_tensor(merged.detach()).set_require_grad(false);
        }
    }
}

/// The number of LoRA parameters installed.
pub fn num_params<B: Backend>(unet: &mut UNet2DConditionModel<B>) -> usize {
    projections_mut(unet)
        .iter()
        .filter_map(|(_, l)| l.lora.as_ref())
        .map(|l| l.down.val().shape().num_elements() + l.up.val().shape().num_elements())
        .sum()
}
