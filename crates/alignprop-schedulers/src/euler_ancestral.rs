//! Euler ancestral sampling (Karras et al. 2022 / k-diffusion) as diffusers' `EulerAncestralDiscreteScheduler`.
//!
//! Works in sigma space, `sigma_t = sqrt((1 - a_t) / a_t)`; the model sees `x / sqrt(sigma^2 + 1)`:
//!
//! ```text
//! x0 = x - sigma eps;  sigma_up = sqrt(s_to^2 (s^2 - s_to^2) / s^2);  sigma_down = sqrt(s_to^2 - sigma_up^2)
//! x_prev = x + (x - x0) / sigma * (sigma_down - sigma) + sigma_up z
//! ```

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::schedule::{self, ConfigError, PredictionType, SchedulerConfig};
use crate::{Scheduler, StepOutput, noise_like};

#[derive(Clone, Debug)]
pub struct EulerAncestralScheduler {
    prediction: PredictionType,
    timesteps: Vec<usize>,
    /// One sigma per step plus a final 0 (diffusers stores them as float32).
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
}

impl EulerAncestralScheduler {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let prediction = cfg.prediction()?;
        if prediction == PredictionType::Sample {
            return Err(ConfigError(
                "Euler ancestral supports epsilon and v_prediction only".into(),
            ));
        }
        let ac = schedule::alphas_cumprod(&schedule::betas(cfg)?);
        let timesteps = schedule::inference_timesteps(cfg, steps)?;
        let sigma = |t: usize| ((1.0 - ac[t] as f32) / ac[t] as f32).sqrt() as f64;
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| sigma(t)).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().cloned().fold(0.0, f64::max);
        let init_noise_sigma = match cfg.timestep_spacing.as_str() {
            "linspace" | "trailing" => max,
            _ => (max * max + 1.0).sqrt(),
        };
        Ok(Self {
            prediction,
            timesteps,
            sigmas,
            init_noise_sigma,
        })
    }

    /// One sigma per step plus a final 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The timesteps of the inference schedule, highest first; the same as [`Scheduler::timesteps`], callable
    /// without the trait.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The standard deviation of the initial noise `x_T` (`max sigma`, or `sqrt(max sigma^2 + 1)` for
    /// `leading` spacing).
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn timesteps(&self) -> &[usize] {
        EulerAncestralScheduler::timesteps(self)
    }

    fn init_noise_sigma(&self) -> f64 {
        EulerAncestralScheduler::init_noise_sigma(self)
    }

    fn scale_model_input<B: Backend>(&self, sample: Tensor<B, 4>, i: usize) -> Tensor<B, 4> {
        let s = self.sigmas[i];
        sample / (s * s + 1.0).sqrt()
    }

    fn needs_noise(&self, i: usize) -> bool {
        self.sigmas[i + 1] > 0.0
    }

    fn step<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        i: usize,
        sample: Tensor<B, 4>,
        noise: Option<Tensor<B, 4>>,
    ) -> StepOutput<B> {
        let (s, s_to) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = match self.prediction {
            PredictionType::VPrediction => {
                // `* (1 / (s^2 + 1))`, not `/`: burn-autodiff 0.21's `div_scalar` backward rounds the divisor to f32.
                model_output * (-s / (s * s + 1.0).sqrt()) + sample.clone() * (1.0 / (s * s + 1.0))
            }
            _ => sample.clone() - model_output * s,
        };
        let sigma_up = (s_to * s_to * (s * s - s_to * s_to) / (s * s)).sqrt();
        let sigma_down = (s_to * s_to - sigma_up * sigma_up).sqrt();
        let derivative = (sample.clone() - x0.clone()) / s;
        let mut prev = sample + derivative * (sigma_down - s);
        if sigma_up > 0.0 {
            prev = prev + noise_like(&x0, noise) * sigma_up;
        }
        StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        }
    }
}
