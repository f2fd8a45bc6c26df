//! Diffusion noise schedulers as diffusers computes them for Stable Diffusion: [`DdimScheduler`],
//! [`DdpmScheduler`] and [`EulerAncestralScheduler`], behind one interface ([`Scheduler`]).
//!
//! Takes a diffusers `scheduler_config.json` ([`SchedulerConfig`]) and a step count; gives the timesteps and, per
//! step, the next latents `[batch, 4, h, w]` from the current ones and the model output (same shape).
//!
//! Schedule math ([`schedule`]) is plain numbers; a step is a handful of scalar-times-tensor operations
//! (pure functions of their inputs), so the same code runs inside autodiff and gradients flow through it.
//! Stochastic steps take the noise from the caller, so runs are reproducible.

pub mod ddim;
pub mod ddpm;
pub mod euler_ancestral;
pub mod schedule;

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

pub use ddim::{DdimScheduler, DdimStepCoefficients};
pub use ddpm::DdpmScheduler;
pub use euler_ancestral::EulerAncestralScheduler;
/// This crate's error ([`ConfigError`]: a scheduler configuration or request it cannot serve).
pub use schedule::ConfigError as Error;
pub use schedule::{ConfigError, PredictionType, SchedulerConfig};

/// The result of one denoising step. Tensors are `[batch, channels, height, width]` latents.
#[derive(Clone, Debug)]
pub struct StepOutput<B: Backend> {
    /// `x_{t-1}`.
    pub prev_sample: Tensor<B, 4>,
    /// The model's estimate of the clean latent `x_0`.
    pub pred_original_sample: Tensor<B, 4>,
}

/// The common interface of the samplers. Steps are addressed by index `i` into [`Scheduler::timesteps`].
pub trait Scheduler {
    /// The timesteps of the inference schedule, highest first (e.g. 981, 961, ..., 1 for SD1.5 DDIM-50).
    fn timesteps(&self) -> &[usize];

    /// The standard deviation of the initial noise `x_T` (1 for DDIM/DDPM).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Scales the model input at step `i` (identity for DDIM/DDPM; Euler divides by `sqrt(sigma^2 + 1)`).
    fn scale_model_input<B: Backend>(&self, sample: Tensor<B, 4>, _i: usize) -> Tensor<B, 4> {
        sample
    }

    /// Whether step `i` adds fresh noise (and so takes a noise tensor).
    fn needs_noise(&self, i: usize) -> bool;

    /// One step from `sample` (`x_t`, t = `timesteps()[i]`) given the model output at that timestep.
    /// `noise` (standard normal, same shape) is used when [`Scheduler::needs_noise`]; when it is `None` there, it
    /// is drawn from the backend's random generator.
    fn step<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        i: usize,
        sample: Tensor<B, 4>,
        noise: Option<Tensor<B, 4>>,
    ) -> StepOutput<B>;
}

/// Standard normal noise shaped like `like` (same device and dtype), for callers that do not supply their own.
pub(crate) fn noise_like<B: Backend>(
    like: &Tensor<B, 4>,
    noise: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    noise.unwrap_or_else(|| like.random_like(Distribution::Normal(0.0, 1.0)))
}

/// Splits a model output into (x0, eps) estimates for the given prediction type.
///
/// With `a` = alpha_prod_t and `b = 1 - a`:
/// epsilon: `x0 = (x - sqrt(b) eps) / sqrt(a)`; sample: `eps = (x - sqrt(a) x0) / sqrt(b)`;
/// v: `x0 = sqrt(a) x - sqrt(b) v`, `eps = sqrt(a) v + sqrt(b) x`.
pub fn x0_and_eps<B: Backend>(
    prediction: PredictionType,
    model_output: Tensor<B, 4>,
    sample: Tensor<B, 4>,
    alpha_prod_t: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let (sa, sb) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
    // Products with reciprocals, not divisions: burn-autodiff 0.21's `div_scalar` backward rounds the divisor to
    // f32, which float64 gradients through a step would inherit.
    match prediction {
        PredictionType::Epsilon => (
            (sample - model_output.clone() * sb) * (1.0 / sa),
            model_output,
        ),
        PredictionType::Sample => (
            (model_output.clone()),
            (sample - model_output * sa) * (1.0 / sb),
        ),
        PredictionType::VPrediction => (
            sample.clone() * sa - model_output.clone() * sb,
            model_output * sa + sample * sb,
        ),
    }
}

/// Any of the schedulers, chosen at run time (e.g. from a CLI flag).
#[derive(Clone, Debug)]
pub enum AnyScheduler {
    Ddim(DdimScheduler),
    Ddpm(DdpmScheduler),
    EulerAncestral(EulerAncestralScheduler),
}

impl AnyScheduler {
    /// `kind`: `ddim` (with `eta`), `ddpm` or `euler_a` (which ignore `eta`).
    pub fn new(
        kind: &str,
        cfg: &SchedulerConfig,
        steps: usize,
        eta: f64,
    ) -> Result<Self, ConfigError> {
        Ok(match kind {
            "ddim" => Self::Ddim(DdimScheduler::new(cfg, steps)?.with_eta(eta)?),
            "ddpm" => Self::Ddpm(DdpmScheduler::new(cfg, steps)?),
            "euler_a" | "euler_ancestral" => {
                Self::EulerAncestral(EulerAncestralScheduler::new(cfg, steps)?)
            }
            other => {
                return Err(ConfigError(format!(
                    "unknown scheduler '{other}' (expected ddim, ddpm or euler_a)"
                )));
            }
        })
    }

    /// The chosen scheduler's [`Scheduler::timesteps`], callable without the trait.
    pub fn timesteps(&self) -> &[usize] {
        match self {
            Self::Ddim(s) => s.timesteps(),
            Self::Ddpm(s) => s.timesteps(),
            Self::EulerAncestral(s) => s.timesteps(),
        }
    }

    /// The chosen scheduler's [`Scheduler::init_noise_sigma`], callable without the trait.
    pub fn init_noise_sigma(&self) -> f64 {
        match self {
            Self::Ddim(s) => s.init_noise_sigma(),
            Self::Ddpm(s) => s.init_noise_sigma(),
            Self::EulerAncestral(s) => s.init_noise_sigma(),
        }
    }
}

impl Scheduler for AnyScheduler {
    fn timesteps(&self) -> &[usize] {
        AnyScheduler::timesteps(self)
    }
    fn init_noise_sigma(&self) -> f64 {
        AnyScheduler::init_noise_sigma(self)
    }
    fn scale_model_input<B: Backend>(&self, sample: Tensor<B, 4>, i: usize) -> Tensor<B, 4> {
        match self {
            Self::Ddim(s) => s.scale_model_input(sample, i),
            Self::Ddpm(s) => s.scale_model_input(sample, i),
            Self::EulerAncestral(s) => s.scale_model_input(sample, i),
        }
    }
    fn needs_noise(&self, i: usize) -> bool {
        match self {
            Self::Ddim(s) => s.needs_noise(i),
            Self::Ddpm(s) => s.needs_noise(i),
            Self::EulerAncestral(s) => s.needs_noise(i),
        }
    }
    fn step<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        i: usize,
        sample: Tensor<B, 4>,
        noise: Option<Tensor<B, 4>>,
    ) -> StepOutput<B> {
        match self {
            Self::Ddim(s) => s.step(model_output, i, sample, noise),
            Self::Ddpm(s) => s.step(model_output, i, sample, noise),
            Self::EulerAncestral(s) => s.step(model_output, i, sample, noise),
        }
    }
}
