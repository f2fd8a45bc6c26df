//! Truncated backpropagation: which denoising steps' noise predictions carry gradient.

use alignprop_pipeline::NoiseRng;
use serde::{Deserialize, Serialize};

/// How many of the last steps are differentiated (the others' noise predictions are detached).
///
/// TOML: `truncation = { mode = "fixed", k = 1 }`, `{ mode = "uniform", min = 0, max = 50 }`,
/// `{ mode = "gaussian", mean = 42.0, std = 5.0 }`, `{ mode = "per_step_random", min = 0, max = 50 }`,
/// `{ mode = "full" }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum Truncation {
    /// Every step carries gradient.
    Full,
    /// The last `k` steps (K = 1 is the low-memory mode).
    Fixed { k: usize },
    /// The last K steps with K drawn uniformly in `min..=max` per trajectory.
    Uniform { min: usize, max: usize },
    /// The cut index drawn from a normal distribution (as a step index: steps before it are detached), redrawn
    /// until it falls in `1..n` (AlignProp's gaussian truncation, mean 42 / std 5 for 50 steps).
    Gaussian { mean: f64, std: f64 },
    /// The first AlignProp release: at every step `i` a fresh cut is drawn uniformly in `min..=max` and the step
    /// is detached when `i < cut` (gradient steps need not be contiguous).
    PerStepRandom { min: usize, max: usize },
}

impl Default for Truncation {
    fn default() -> Self {
        Self::Fixed { k: 1 }
    }
}

impl Truncation {
    /// One flag per step (`true`: the step's noise prediction carries gradient) for a chain of `n` steps.
    pub fn grad_steps(&self, n: usize, rng: &mut NoiseRng) -> Vec<bool> {
        let last_k = |k: usize| (0..n).map(|i| i + k.min(n) >= n).collect::<Vec<_>>();
        match *self {
            Self::Full => vec![true; n],
            Self::Fixed { k } => last_k(k),
            Self::Uniform { min, max } => {
                let (lo, hi) = (min.min(max), min.max(max));
                last_k(lo + rng.below((hi - lo + 1) as u64) as usize)
            }
            Self::Gaussian { mean, std } => {
                let cut = loop {
                    let c = (mean + std * rng.normal()).round();
                    if c >= 1.0 && c < n as f64 {
                        break c as usize;
                    }
                    if std == 0.0 {
                        break (mean.round() as usize).clamp(1, n.saturating_sub(1).max(1));
                    }
                };
                last_k(n - cut)
            }
            Self::PerStepRandom { min, max } => {
                let (lo, hi) = (min.min(max), min.max(max));
                (0..n)
                    .map(|i| i >= lo + rng.below((hi - lo + 1) as u64) as usize)
                    .collect()
            }
        }
    }

    /// Checks the parameters against a chain of `n` steps.
    pub fn validate(&self, n: usize) -> Result<(), String> {
        match *self {
            Self::Fixed { k } if k == 0 || k > n => {
                Err(format!("truncation k = {k} must be in 1..={n}"))
            }
            Self::Uniform { min, max } if min > max || max > n => Err(format!(
                "truncation uniform min {min} / max {max} must satisfy min <= max <= {n}"
            )),
            Self::Gaussian { std, .. } if std < 0.0 => {
                Err("truncation gaussian std must be >= 0".into())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        let mut rng = NoiseRng::new(1);
        assert_eq!(
            Truncation::Fixed { k: 1 }.grad_steps(4, &mut rng),
            [false, false, false, true]
        );
        assert_eq!(
            Truncation::Fixed { k: 9 }.grad_steps(3, &mut rng),
            [true; 3]
        );
        assert_eq!(Truncation::Full.grad_steps(2, &mut rng), [true, true]);
        for _ in 0..100 {
            let s = Truncation::Uniform { min: 2, max: 4 }.grad_steps(10, &mut rng);
            let k = s.iter().filter(|&&x| x).count();
            assert!((2..=4).contains(&k) && s[10 - k..].iter().all(|&x| x));
            let g = Truncation::Gaussian {
                mean: 42.0,
                std: 5.0,
            }
            .grad_steps(50, &mut rng);
            let k = g.iter().filter(|&&x| x).count();
            assert!((1..=49).contains(&k) && g[50 - k..].iter().all(|&x| x));
        }
        // Per-step draws: step i is kept with probability (i + 1) / 51, so late steps are kept far more often.
        let mut kept = [0usize; 50];
        for _ in 0..400 {
            let r = Truncation::PerStepRandom { min: 0, max: 50 }.grad_steps(50, &mut rng);
            assert_eq!(r.len(), 50);
            for (i, k) in r.iter().enumerate() {
                kept[i] += *k as usize;
            }
        }
        assert!(
            kept[0] < 40 && kept[49] > 340,
            "step 0 kept {} times, step 49 {} times",
            kept[0],
            kept[49]
        );
        assert!(Truncation::Fixed { k: 0 }.validate(50).is_err());
    }

    #[test]
    fn toml_forms() {
        #[derive(Deserialize)]
        struct W {
            truncation: Truncation,
        }
        let w: W =
            toml::from_str("truncation = { mode = \"gaussian\", mean = 42.0, std = 5.0 }").unwrap();
        assert_eq!(
            w.truncation,
            Truncation::Gaussian {
                mean: 42.0,
                std: 5.0
            }
        );
        assert!(toml::from_str::<W>("truncation = { mode = \"fixed\", kk = 1 }").is_err());
    }
}
