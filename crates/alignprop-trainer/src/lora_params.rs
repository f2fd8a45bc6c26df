//! The trainable LoRA tensors of a UNet, their gradients, and the AdamW update (decoupled weight decay,
//! global-norm clipping) applied to them.

use std::collections::BTreeMap;

use alignprop_diffusion::nn::LoraAdapter;
use alignprop_diffusion::unet::UNet2DConditionModel;
use burn::module::Param;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};

/// Gradients (or any per-tensor values) of the LoRA tensors, keyed by peft-style names
/// (`<module>.lora_A.weight` for `down`, `<module>.lora_B.weight` for `up`).
#[derive(Clone, Debug)]
pub struct LoraGrads<B: Backend> {
    pub tensors: BTreeMap<String, Tensor<B, 2>>,
}

impl<B: Backend> Default for LoraGrads<B> {
    fn default() -> Self {
        Self {
            tensors: BTreeMap::new(),
        }
    }
}

impl<B: Backend> LoraGrads<B> {
    /// Adds `other` into `self` (tensor by tensor; missing ones are inserted).
    pub fn add(&mut self, other: LoraGrads<B>) {
        for (k, v) in other.tensors {
            let sum = match self.tensors.remove(&k) {
                Some(a) => a + v,
                None => v,
            };
            self.tensors.insert(k, sum);
        }
    }

    /// Multiplies every tensor by `c`.
    pub fn scale(&mut self, c: f64) {
        for v in self.tensors.values_mut() {
            *v = v.clone() * c;
        }
    }

    /// The squared global L2 norm over all tensors as one device tensor `[1]` (no host sync), accumulated in f32
    /// for half-precision gradients; `None` when there are no tensors.
    pub fn squared_norm(&self) -> Option<Tensor<B, 1>> {
        let parts: Vec<Tensor<B, 1>> = self
            .tensors
            .values()
            .map(|t| {
                let t = match t.dtype() {
                    DType::F16 | DType::BF16 => t.clone().cast(DType::F32),
                    _ => t.clone(),
                };
                alignprop_kernels::sum_all(t.square())
            })
            .collect();
        (!parts.is_empty()).then(|| alignprop_kernels::sum_all(Tensor::cat(parts, 0)))
    }

    /// The global L2 norm over all tensors: one read from the device for all of them.
    pub fn norm(&self) -> f64 {
        self.squared_norm()
            .map(|sq| {
                sq.into_data()
                    .convert::<f64>()
                    .to_vec::<f64>()
                    .expect("f64")[0]
                    .sqrt()
            })
            .unwrap_or(0.0)
    }

    /// Whether every value is finite, from the global norm (one device read): a NaN or an infinity anywhere makes
    /// the norm non-finite (so does a norm beyond the accumulation type's range, a gradient no step should take).
    pub fn all_finite(&self) -> bool {
        self.norm().is_finite()
    }
}

/// The installed adapters with their module names.
pub fn adapters<B: Backend>(unet: &UNet2DConditionModel<B>) -> Vec<(String, &LoraAdapter<B>)> {
    alignprop_lora::projections(unet)
        .into_iter()
        .filter_map(|(name, linear)| linear.lora.as_ref().map(|l| (name, l)))
        .collect()
}

/// The LoRA gradients contained in an autodiff gradient set.
pub fn lora_grads_from<B: AutodiffBackend>(
    unet: &UNet2DConditionModel<B>,
    grads: &B::Gradients,
) -> LoraGrads<B::InnerBackend> {
    let mut out = LoraGrads::default();
    for (name, l) in adapters(unet) {
        if let Some(g) = l.down.val().grad(grads) {
            out.tensors.insert(format!("{name}.lora_A.weight"), g);
        }
        if let Some(g) = l.up.val().grad(grads) {
            out.tensors.insert(format!("{name}.lora_B.weight"), g);
        }
    }
    out
}

/// Calls `f(key, param)` for every LoRA tensor of the UNet (`<module>.lora_A.weight` = down,
/// `<module>.lora_B.weight` = up).
pub fn for_each_adapter_param<B: Backend>(
    unet: &mut UNet2DConditionModel<B>,
    mut f: impl FnMut(&str, &mut Param<Tensor<B, 2>>),
) {
    for (name, linear) in alignprop_lora::projections_mut(unet) {
        let Some(l) = &mut linear.lora else { continue };
        f(&format!("{name}.lora_A.weight"), &mut l.down);
        f(&format!("{name}.lora_B.weight"), &mut l.up);
    }
}

/// The current LoRA tensors, keyed like the gradients.
pub fn adapter_values<B: AutodiffBackend>(
    unet: &mut UNet2DConditionModel<B>,
) -> LoraGrads<B::InnerBackend> {
    let mut out = LoraGrads::default();
    for_each_adapter_param(unet, |key, p| {
        out.tensors.insert(key.to_string(), p.val().inner());
    });
    out
}

/// Sets the LoRA tensors from `values` (trainable); every adapter of the UNet must be present.
pub fn set_adapter_values<B: AutodiffBackend>(
    unet: &mut UNet2DConditionModel<B>,
    values: &LoraGrads<B::InnerBackend>,
) -> Result<(), String> {
    let mut missing = None;
    for_each_adapter_param(unet, |key, p| match values.tensors.get(key) {
        Some(v) if v.dims() == p.val().dims() => {
            *p = Param::initialized(p.id, Tensor::from_inner(v.clone()).require_grad());
        }
        Some(v) => {
            missing = Some(format!(
                "'{key}' has shape {:?}, the model's is {:?}",
                v.dims(),
                p.val().dims()
            ))
        }
        None => missing = Some(format!("'{key}' is missing")),
    });
    missing.map_or(Ok(()), Err)
}

/// AdamW hyper-parameters (PyTorch semantics: decoupled weight decay `p -= lr * wd * p`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global-norm gradient clipping (None: off).
    pub max_grad_norm: Option<f64>,
    /// How `lr` changes over `train.steps`: `constant` (AlignProp's), `linear` or `cosine` decay to 0.
    pub schedule: crate::schedule::LrSchedule,
    /// Optimiser steps of linear warm-up from 0 to `lr` before the schedule (0: none).
    pub warmup_steps: usize,
}

impl Default for AdamWConfig {
    /// AlignProp's settings: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 1e-4, clip 5.0.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
            max_grad_norm: Some(5.0),
            schedule: Default::default(),
            warmup_steps: 0,
        }
    }
}

/// AdamW state for the LoRA tensors (first and second moments, step count), kept in f32 or the model dtype.
#[derive(Clone, Debug)]
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    pub step: u64,
    pub m: LoraGrads<B>,
    pub v: LoraGrads<B>,
    /// The learning-rate schedule's factor for the next step (the step's rate is `config.lr * lr_factor`).
    pub lr_factor: f64,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            m: LoraGrads::default(),
            v: LoraGrads::default(),
            lr_factor: 1.0,
        }
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        self.config.lr * self.lr_factor
    }

    /// Clips `grads` to the configured global norm (returns the norm before clipping) and applies one AdamW step
    /// to the UNet's adapters.
    pub fn step<AB>(&mut self, unet: &mut UNet2DConditionModel<AB>, grads: LoraGrads<B>) -> f64
    where
        AB: AutodiffBackend<InnerBackend = B>,
    {
        let norm = grads.norm();
        self.step_with_norm(unet, grads, norm)
    }

    /// [`Self::step`] with the global norm of `grads` already read ([`LoraGrads::norm`]), so a training step reads
    /// it from the device once for the finiteness check and the clipping.
    pub fn step_with_norm<AB>(
        &mut self,
        unet: &mut UNet2DConditionModel<AB>,
        mut grads: LoraGrads<B>,
        norm: f64,
    ) -> f64
    where
        AB: AutodiffBackend<InnerBackend = B>,
    {
        if let Some(max) = self.config.max_grad_norm {
            if norm > max {
                grads.scale(max / (norm + 1e-6));
            }
        }
        self.step += 1;
        let c = self.config.clone();
        let lr = self.lr();
        let (bc1, bc2) = (
            1.0 - c.beta1.powi(self.step as i32),
            1.0 - c.beta2.powi(self.step as i32),
        );
        for_each_adapter_param(unet, |key, param| {
            let Some(g) = grads.tensors.remove(key) else {
                return;
            };
            let m = match self.m.tensors.remove(key) {
                Some(m) => m * c.beta1 + g.clone() * (1.0 - c.beta1),
                None => g.clone() * (1.0 - c.beta1),
            };
            let v = match self.v.tensors.remove(key) {
                Some(v) => v * c.beta2 + g.square() * (1.0 - c.beta2),
                None => g.square() * (1.0 - c.beta2),
            };
            let value = param.val().inner();
            let update = (m.clone() / bc1) / ((v.clone() / bc2).sqrt() + c.eps);
            let new = value * (1.0 - lr * c.weight_decay) - update * lr;
            *param = Param::initialized(param.id, Tensor::from_inner(new).require_grad());
            self.m.tensors.insert(key.to_string(), m);
            self.v.tensors.insert(key.to_string(), v);
        });
        norm
    }
}

#[cfg(test)]
mod norm_tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    fn grads(values: &[(&str, Vec<f32>, DType)]) -> LoraGrads<Flex> {
        let device = Default::default();
        LoraGrads {
            tensors: values
                .iter()
                .map(|(k, v, dtype)| {
                    let t = Tensor::<Flex, 2>::from_data(
                        TensorData::new(v.clone(), [1, v.len()]),
                        &device,
                    );
                    (k.to_string(), t.cast(*dtype))
                })
                .collect(),
        }
    }

    #[test]
    fn global_norm_and_finiteness_in_one_read() {
        let g = grads(&[
            ("a", vec![3.0, 0.0], DType::F32),
            ("b", vec![4.0], DType::F32),
        ]);
        assert!((g.norm() - 5.0).abs() < 1e-6);
        assert!(g.all_finite());
        assert_eq!(LoraGrads::<Flex>::default().norm(), 0.0);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let g = grads(&[
                ("a", vec![1.0, 2.0], DType::F32),
                ("b", vec![bad], DType::F32),
            ]);
            assert!(!g.all_finite(), "{bad} not found");
        }
        // f16 gradients whose squares overflow f16 (300^2 > 65504) still have a finite norm (summed in f32).
        let g = grads(&[("a", vec![300.0; 4], DType::F16)]);
        assert!((g.norm() - 600.0).abs() < 1e-3, "{}", g.norm());
    }
}
