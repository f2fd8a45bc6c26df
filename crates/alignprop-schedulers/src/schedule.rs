//! The noise schedule shared by every scheduler: betas, cumulative alpha products and inference timesteps,
//! computed exactly as diffusers does (including its float32 rounding), as plain numbers.

use serde::{Deserialize, Serialize};

/// The fields of a diffusers `scheduler_config.json` that the schedulers here use. Deserializes the DDIM, DDPM,
/// PNDM and Euler configs as they are (unknown keys ignored); defaults are Stable Diffusion 1.5's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    /// `epsilon`, `v_prediction` or `sample`.
    pub prediction_type: String,
    /// `leading`, `trailing` or `linspace`.
    pub timestep_spacing: String,
    pub thresholding: bool,
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            trained_betas: None,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: false,
            steps_offset: 1,
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            thresholding: false,
            rescale_betas_zero_snr: false,
        }
    }
}

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// A configuration value the schedulers cannot honour.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("scheduler config: {0}")]
pub struct ConfigError(pub String);

impl SchedulerConfig {
    /// Reads a diffusers `scheduler_config.json`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    pub fn prediction(&self) -> Result<PredictionType, ConfigError> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            "sample" => Ok(PredictionType::Sample),
            other => Err(ConfigError(format!(
                "unknown prediction_type '{other}' (expected epsilon, v_prediction or sample)"
            ))),
        }
    }

    /// Checks the options that are not implemented.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.prediction()?;
        if self.thresholding {
            return Err(ConfigError(
                "thresholding (dynamic thresholding) is not supported".into(),
            ));
        }
        if self.rescale_betas_zero_snr {
            return Err(ConfigError(
                "rescale_betas_zero_snr is not supported".into(),
            ));
        }
        if !matches!(
            self.timestep_spacing.as_str(),
            "leading" | "trailing" | "linspace"
        ) {
            return Err(ConfigError(format!(
                "unknown timestep_spacing '{}' (expected leading, trailing or linspace)",
                self.timestep_spacing
            )));
        }
        betas(self).map(|_| ())
    }
}

/// `torch.linspace(start, end, steps, dtype=float32)`, reproducing torch's CPU kernel: the step is computed in
/// float32 and the second half of the points is taken from the end, so both ends are exact.
pub fn linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if steps == 1 {
        return vec![s];
    }
    let step = (e - s) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                s + step * i as f32
            } else {
                e - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// The betas of the training schedule, as float32 numbers (diffusers keeps them as float32 tensors).
pub fn betas(cfg: &SchedulerConfig) -> Result<Vec<f32>, ConfigError> {
    let n = cfg.num_train_timesteps;
    if let Some(b) = &cfg.trained_betas {
        if b.len() != n {
            return Err(ConfigError(format!(
                "trained_betas has {} values, num_train_timesteps is {n}",
                b.len()
            )));
        }
        return Ok(b.iter().map(|&x| x as f32).collect());
    }
    Ok(match cfg.beta_schedule.as_str() {
        "linear" => linspace_f32(cfg.beta_start, cfg.beta_end, n),
        "scaled_linear" => linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
            .into_iter()
            .map(|x| x * x)
            .collect(),
        "squaredcos_cap_v2" => {
            // Glide cosine schedule, computed in f64 and stored as f32 (diffusers: betas_for_alpha_bar).
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                })
                .collect()
        }
        other => {
            return Err(ConfigError(format!(
                "unknown beta_schedule '{other}' (expected linear, scaled_linear or squaredcos_cap_v2)"
            )));
        }
    })
}

/// `cumprod(1 - betas)` as torch computes it for float32 on the CPU: accumulated in f64, each output rounded
/// to f32. Returned widened to f64 (the values are exactly diffusers' float32 numbers).
pub fn alphas_cumprod(betas: &[f32]) -> Vec<f64> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32 as f64
        })
        .collect()
}

/// The inference timesteps, highest first, for `n` steps (diffusers' `set_timesteps` for DDIM / DDPM).
pub fn inference_timesteps(cfg: &SchedulerConfig, n: usize) -> Result<Vec<usize>, ConfigError> {
    let train = cfg.num_train_timesteps;
    if n == 0 || n > train {
        return Err(ConfigError(format!(
            "number of inference steps must be in 1..={train}, got {n}"
        )));
    }
    Ok(match cfg.timestep_spacing.as_str() {
        "leading" => {
            let ratio = train / n;
            (0..n).rev().map(|i| i * ratio + cfg.steps_offset).collect()
        }
        "trailing" => {
            let ratio = train as f64 / n as f64;
            (0..n)
                .map(|i| ((train as f64 - i as f64 * ratio).round() as usize).saturating_sub(1))
                .collect()
        }
        "linspace" => {
            let last = (train - 1) as f64;
            (0..n)
                .rev()
                .map(|i| {
                    if n == 1 {
                        0
                    } else {
                        (last * i as f64 / (n - 1) as f64).round() as usize
                    }
                })
                .collect()
        }
        other => return Err(ConfigError(format!("unknown timestep_spacing '{other}'"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_timesteps() {
        let cfg = SchedulerConfig::default();
        let t50 = inference_timesteps(&cfg, 50).unwrap();
        assert_eq!(t50.len(), 50);
        assert_eq!((t50[0], t50[1], t50[49]), (981, 961, 1));
        assert_eq!(
            inference_timesteps(&cfg, 4).unwrap(),
            vec![751, 501, 251, 1]
        );
        let trailing = SchedulerConfig {
            timestep_spacing: "trailing".into(),
            ..cfg.clone()
        };
        assert_eq!(
            inference_timesteps(&trailing, 4).unwrap(),
            vec![999, 749, 499, 249]
        );
        let lin = SchedulerConfig {
            timestep_spacing: "linspace".into(),
            ..cfg.clone()
        };
        assert_eq!(
            inference_timesteps(&lin, 4).unwrap(),
            vec![999, 666, 333, 0]
        );
        assert!(inference_timesteps(&cfg, 0).is_err());
    }

    #[test]
    fn linspace_ends_exact() {
        let v = linspace_f32(0.1, 0.7, 11);
        assert_eq!(v[0], 0.1f32);
        assert_eq!(v[10], 0.7f32);
    }

    #[test]
    fn rejects_unknown_options() {
        let bad = SchedulerConfig {
            beta_schedule: "quadratic".into(),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().0.contains("quadratic"));
        let bad = SchedulerConfig {
            prediction_type: "x".into(),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
