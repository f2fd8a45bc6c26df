//! DDPM ancestral sampling (Ho et al. 2020) as diffusers' `DDPMScheduler` computes it (`variance_type`
//! `fixed_small`), on a strided inference schedule.
//!
//! ```text
//! x_prev = sqrt(a_prev) beta_t / (1 - a_t) x0 + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) x_t + sqrt(var) z
//! alpha_t = a_t / a_prev, beta_t = 1 - alpha_t, var = (1 - a_prev) / (1 - a_t) beta_t     (no noise at t = 0)
//! ```

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::schedule::{self, ConfigError, PredictionType, SchedulerConfig};
use crate::{Scheduler, StepOutput, noise_like, x0_and_eps};

#[derive(Clone, Debug)]
pub struct DdpmScheduler {
    config: SchedulerConfig,
    prediction: PredictionType,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<usize>,
    step_ratio: usize,
}

impl DdpmScheduler {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            prediction: cfg.prediction()?,
            alphas_cumprod: schedule::alphas_cumprod(&schedule::betas(cfg)?),
            timesteps: schedule::inference_timesteps(cfg, steps)?,
            step_ratio: cfg.num_train_timesteps / steps,
            config: cfg.clone(),
        })
    }

    /// The timesteps of the inference schedule, highest first; the same as [`Scheduler::timesteps`], callable
    /// without the trait.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The standard deviation of the initial noise `x_T`: 1.
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// `alphas_cumprod[t]` for every training timestep.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// `(a_t, a_prev)`; `a_prev` is 1 before the first training step.
    fn alphas(&self, i: usize) -> (f64, f64) {
        let t = self.timesteps[i];
        let a_prev = t
            .checked_sub(self.step_ratio)
            .map_or(1.0, |p| self.alphas_cumprod[p]);
        (self.alphas_cumprod[t], a_prev)
    }

    /// The variance of the noise added at step `i` (clamped below at 1e-20, as diffusers).
    pub fn variance(&self, i: usize) -> f64 {
        let (a_t, a_prev) = self.alphas(i);
        ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).max(1e-20)
    }
}

impl Scheduler for DdpmScheduler {
    fn timesteps(&self) -> &[usize] {
        DdpmScheduler::timesteps(self)
    }

    fn init_noise_sigma(&self) -> f64 {
        DdpmScheduler::init_noise_sigma(self)
    }

    fn needs_noise(&self, i: usize) -> bool {
        self.timesteps[i] > 0
    }

    fn step<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        i: usize,
        sample: Tensor<B, 4>,
        noise: Option<Tensor<B, 4>>,
    ) -> StepOutput<B> {
        let (a_t, a_prev) = self.alphas(i);
        let current_alpha = a_t / a_prev;
        let current_beta = 1.0 - current_alpha;
        let (mut x0, _) = x0_and_eps(self.prediction, model_output, sample.clone(), a_t);
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0 = x0.clamp(-r, r);
        }
        let c_x0 = a_prev.sqrt() * current_beta / (1.0 - a_t);
        let c_x = current_alpha.sqrt() * (1.0 - a_prev) / (1.0 - a_t);
        let mut prev = x0.clone() * c_x0 + sample * c_x;
        if self.needs_noise(i) {
            prev = prev + noise_like(&x0, noise) * self.variance(i).sqrt();
        }
        StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        }
    }
}
