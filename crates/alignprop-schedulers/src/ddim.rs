//! DDIM (Song et al. 2020) exactly as diffusers' `DDIMScheduler` computes it.
//!
//! For step `t -> prev = t - T/n` with `a_t = alphas_cumprod[t]`, `a_prev = alphas_cumprod[prev]` (or the final
//! alpha when `prev < 0`):
//!
//! ```text
//! x0     = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                       (epsilon prediction)
//! sigma  = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
//! x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
//! ```

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::schedule::{self, ConfigError, PredictionType, SchedulerConfig};
use crate::{Scheduler, StepOutput, noise_like, x0_and_eps};

/// DDIM with a fixed number of inference steps and a fixed `eta` (0 = deterministic, 1 = DDPM-like noise; set with
/// [`DdimScheduler::with_eta`]).
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    config: SchedulerConfig,
    prediction: PredictionType,
    /// `alphas_cumprod[t]` for every training timestep (diffusers' float32 values, widened).
    alphas_cumprod: Vec<f64>,
    /// `alphas_cumprod[0]`, or 1 when `set_alpha_to_one`.
    final_alpha_cumprod: f64,
    timesteps: Vec<usize>,
    /// `num_train_timesteps / num_inference_steps`: the distance to the previous timestep.
    step_ratio: usize,
    eta: f64,
}

/// The scalars of one DDIM step: `x_prev = sqrt_alpha_prev * x0 + direction * eps + sigma * z`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DdimStepCoefficients {
    pub timestep: usize,
    pub alpha_prod_t: f64,
    pub alpha_prod_prev: f64,
    /// `eta * sigma_t` (the standard deviation of the added noise).
    pub sigma: f64,
    pub sqrt_alpha_prev: f64,
    /// `sqrt(1 - a_prev - sigma^2)`.
    pub direction: f64,
}

impl DdimScheduler {
    /// A DDIM schedule of `steps` inference steps (diffusers: `DDIMScheduler.from_config(cfg)` +
    /// `set_timesteps(steps)`), deterministic (`eta` 0; see [`Self::with_eta`]).
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let alphas_cumprod = schedule::alphas_cumprod(&schedule::betas(cfg)?);
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            prediction: cfg.prediction()?,
            timesteps: schedule::inference_timesteps(cfg, steps)?,
            step_ratio: cfg.num_train_timesteps / steps,
            config: cfg.clone(),
            alphas_cumprod,
            final_alpha_cumprod,
            eta: 0.0,
        })
    }

    /// The same schedule with noise scale `eta` (0 = deterministic, 1 = DDPM-like); an error outside `[0, 1]`.
    pub fn with_eta(mut self, eta: f64) -> Result<Self, ConfigError> {
        if !(0.0..=1.0).contains(&eta) {
            return Err(ConfigError(format!("eta must be in [0, 1], got {eta}")));
        }
        self.eta = eta;
        Ok(self)
    }

    /// The timesteps of the inference schedule, highest first (981, 961, ..., 1 for SD1.5 DDIM-50); the same as
    /// [`Scheduler::timesteps`], callable without the trait.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The standard deviation of the initial noise `x_T`: 1.
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn eta(&self) -> f64 {
        self.eta
    }

    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    pub fn final_alpha_cumprod(&self) -> f64 {
        self.final_alpha_cumprod
    }

    /// `sigma_t` at eta = 1 for step `i`: `sqrt((1 - a_prev)/(1 - a_t) * (1 - a_t/a_prev))`.
    pub fn sigma_eta1(&self, i: usize) -> f64 {
        let (a_t, a_prev) = self.alphas(i);
        ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).sqrt()
    }

    fn alphas(&self, i: usize) -> (f64, f64) {
        let t = self.timesteps[i];
        let a_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        (self.alphas_cumprod[t], a_prev)
    }

    /// The scalar coefficients of step `i`.
    pub fn coefficients(&self, i: usize) -> DdimStepCoefficients {
        let (a_t, a_prev) = self.alphas(i);
        let sigma = self.eta * self.sigma_eta1(i);
        DdimStepCoefficients {
            timestep: self.timesteps[i],
            alpha_prod_t: a_t,
            alpha_prod_prev: a_prev,
            sigma,
            sqrt_alpha_prev: a_prev.sqrt(),
            direction: (1.0 - a_prev - sigma * sigma).max(0.0).sqrt(),
        }
    }
}

/// One DDIM update given its coefficients, as a pure function of its inputs (differentiable in `model_output`
/// and `sample`): returns `x_prev` and `x0`.
pub fn ddim_step<B: Backend>(
    prediction: PredictionType,
    clip_range: Option<f64>,
    c: &DdimStepCoefficients,
    model_output: Tensor<B, 4>,
    sample: Tensor<B, 4>,
    noise: Option<Tensor<B, 4>>,
) -> StepOutput<B> {
    let (mut x0, eps) = x0_and_eps(prediction, model_output, sample, c.alpha_prod_t);
    if let Some(r) = clip_range {
        // As diffusers (use_clipped_model_output = False): only x0 is clipped, eps stays the model's.
        x0 = x0.clamp(-r, r);
    }
    let mut prev = x0.clone() * c.sqrt_alpha_prev + eps * c.direction;
    if c.sigma > 0.0 {
        prev = prev + noise_like(&x0, noise) * c.sigma;
    }
    StepOutput {
        prev_sample: prev,
        pred_original_sample: x0,
    }
}

/// `(dx0/dx, deps/dx)` of [`x0_and_eps`] with the model output held fixed, `a` = alpha_prod_t, `b = 1 - a`:
/// epsilon `(1 / sqrt(a), 0)`, sample `(0, 1 / sqrt(b))`, v `(sqrt(a), sqrt(b))`.
pub fn x0_eps_sample_slopes(prediction: PredictionType, alpha_prod_t: f64) -> (f64, f64) {
    let (sa, sb) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
    match prediction {
        PredictionType::Epsilon => (1.0 / sa, 0.0),
        PredictionType::Sample => (0.0, 1.0 / sb),
        PredictionType::VPrediction => (sa, sb),
    }
}

impl DdimScheduler {
    /// The vector-Jacobian product of step `i` with respect to its input sample, the model output held fixed
    /// (a step whose noise prediction is detached): `g = dL/dx_prev` -> `dL/dx_t`.
    ///
    /// Exact for every prediction type and with `clip_sample` (elements whose `x0` was clamped pass no gradient
    /// through `x0`, as the derivative of the clamp). Without clipping it is `g` times one scalar
    /// (`sqrt(a_prev) / sqrt(a_t)` for epsilon prediction) and `model_output` and `sample` are not read; with it they
    /// give the clamp's mask (computed in `g`'s dtype). All tensors `[batch, channels, height, width]`.
    pub fn step_sample_vjp<B: Backend>(
        &self,
        i: usize,
        g: Tensor<B, 4>,
        model_output: Tensor<B, 4>,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let c = self.coefficients(i);
        let (dx0, deps) = x0_eps_sample_slopes(self.prediction, c.alpha_prod_t);
        if !self.config.clip_sample || dx0 == 0.0 {
            return g * (c.sqrt_alpha_prev * dx0 + c.direction * deps);
        }
        let r = self.config.clip_sample_range;
        let dtype = g.dtype();
        let (x0, _) = x0_and_eps(
            self.prediction,
            model_output.cast(dtype),
            sample.cast(dtype),
            c.alpha_prod_t,
        );
        // clamp's derivative: 1 inside [-r, r] (bounds included, as torch and burn), 0 outside.
        let inside = x0.abs().lower_equal_elem(r).float().cast(dtype);
        g.clone() * (inside * (c.sqrt_alpha_prev * dx0)) + g * (c.direction * deps)
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[usize] {
        DdimScheduler::timesteps(self)
    }

    fn init_noise_sigma(&self) -> f64 {
        DdimScheduler::init_noise_sigma(self)
    }

    fn needs_noise(&self, i: usize) -> bool {
        self.coefficients(i).sigma > 0.0
    }

    fn step<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        i: usize,
        sample: Tensor<B, 4>,
        noise: Option<Tensor<B, 4>>,
    ) -> StepOutput<B> {
        let clip = self
            .config
            .clip_sample
            .then_some(self.config.clip_sample_range);
        ddim_step(
            self.prediction,
            clip,
            &self.coefficients(i),
            model_output,
            sample,
            noise,
        )
    }
}
