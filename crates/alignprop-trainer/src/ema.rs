//! An exponential moving average of the LoRA adapters, as diffusers' `EMAModel` keeps one (without its optional
//! warm-up): after optimiser step `n`, `shadow -= (1 - d_n) * (shadow - adapters)` with
//! `d_n = min(decay, (1 + k) / (10 + k))`, `k = n - update_after_step - 1`, and `d_n = 0` while `k <= 0` (the
//! shadow is the adapters themselves until then). The trainer evaluates with the shadow and saves it beside the
//! raw adapters (`*_ema.safetensors`); it is off by default (`[ema] enabled = false`).

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

/// `[ema]`: the moving average of the adapters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmaConfig {
    pub enabled: bool,
    /// The largest decay (diffusers' `decay`, default 0.9999); the decay ramps up to it as `(1 + k) / (10 + k)`.
    pub decay: f64,
    /// Optimiser steps before the average starts to lag the adapters (diffusers' `update_after_step`).
    pub update_after_step: usize,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            decay: 0.9999,
            update_after_step: 0,
        }
    }
}

impl EmaConfig {
    /// The decay applied after optimiser step `step` (1 for the first step).
    pub fn decay_at(&self, step: u64) -> f64 {
        let k = step as f64 - self.update_after_step as f64 - 1.0;
        if k <= 0.0 {
            return 0.0;
        }
        ((1.0 + k) / (10.0 + k)).min(self.decay).max(0.0)
    }
}

/// The shadow adapters (one matrix per LoRA tensor key, in the adapters' dtype) and the updates made.
#[derive(Clone, Debug)]
pub struct Ema<B: Backend> {
    pub shadow: BTreeMap<String, Tensor<B, 2>>,
    /// Optimiser steps averaged in (diffusers' `optimization_step`).
    pub step: u64,
}

impl<B: Backend> Ema<B> {
    /// An average that starts at `adapters` (the adapters before the first step).
    pub fn new(adapters: BTreeMap<String, Tensor<B, 2>>) -> Self {
        Self {
            shadow: adapters,
            step: 0,
        }
    }

    /// Averages in the adapters after one more optimiser step.
    pub fn update(&mut self, config: &EmaConfig, adapters: &BTreeMap<String, Tensor<B, 2>>) {
        self.step += 1;
        let d = config.decay_at(self.step);
        for (key, value) in adapters {
            let new = match self.shadow.remove(key) {
                Some(s) if d > 0.0 => s.clone() - (s - value.clone()) * (1.0 - d),
                _ => value.clone(),
            };
            self.shadow.insert(key.clone(), new);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    #[test]
    fn decay_ramps_as_diffusers_and_is_capped() {
        let c = EmaConfig {
            enabled: true,
            decay: 0.5,
            update_after_step: 0,
        };
        assert_eq!(c.decay_at(1), 0.0);
        assert!((c.decay_at(2) - 2.0 / 11.0).abs() < 1e-15);
        assert!((c.decay_at(3) - 3.0 / 12.0).abs() < 1e-15);
        assert_eq!(c.decay_at(100), 0.5);
        let late = EmaConfig {
            update_after_step: 3,
            ..c
        };
        assert_eq!((late.decay_at(4), late.decay_at(5)), (0.0, 2.0 / 11.0));
    }

    #[test]
    fn shadow_follows_the_formula() {
        let d = Default::default();
        let m = |v: f64| {
            let mut map = BTreeMap::new();
            map.insert(
                "a".to_string(),
                Tensor::<Flex, 2>::from_data(
                    TensorData::new(vec![v as f32, 2.0 * v as f32], [1, 2]),
                    &d,
                ),
            );
            map
        };
        let c = EmaConfig {
            enabled: true,
            ..Default::default()
        };
        let mut ema = Ema::new(m(0.0));
        ema.update(&c, &m(1.0)); // decay 0: the adapters themselves
        ema.update(&c, &m(3.0)); // decay 2/11: 1 - (1 - 2/11) (1 - 3)
        let want = 1.0 + (9.0 / 11.0) * 2.0;
        let got = ema.shadow["a"].clone().into_data().to_vec::<f32>().unwrap();
        let got: Vec<f64> = got.into_iter().map(f64::from).collect();
        assert!(
            (got[0] - want).abs() < 1e-6 && (got[1] - 2.0 * want).abs() < 1e-6,
            "{got:?}"
        );
        assert_eq!(ema.step, 2);
    }
}
