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
            Self::Gaussian { mean, std } => last_k(n - gaussian_cut(mean, std, n, rng)),
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
            Self::Gaussian { mean, std } => validate_gaussian(mean, std, n),
            Self::PerStepRandom { min, max } if min > max || max > n => Err(format!(
                "truncation per_step_random min {min} / max {max} must satisfy min <= max <= {n}"
            )),
            _ => Ok(()),
        }
    }
}

/// Draws before [`gaussian_cut`] gives up redrawing and takes the nearest valid cut instead.
const GAUSSIAN_DRAWS: usize = 64;

/// The smallest share of the gaussian's mass that must fall on valid cuts (`1..n`) for [`Truncation::validate`]:
/// with less, most draws would be redrawn (and the distribution would not be the one asked for).
const GAUSSIAN_MIN_MASS: f64 = 0.01;

/// The cut index of a gaussian truncation for a chain of `n >= 2` steps: `round(mean + std z)` redrawn while it
/// falls outside `1..n`, at most [`GAUSSIAN_DRAWS`] times, then clamped into `1..n` (so it always ends, whatever
/// the parameters; [`Truncation::validate`] refuses those that would need many redraws).
fn gaussian_cut(mean: f64, std: f64, n: usize, rng: &mut NoiseRng) -> usize {
    let hi = n.saturating_sub(1).max(1);
    let mut c = mean;
    for _ in 0..GAUSSIAN_DRAWS {
        c = (mean + std * rng.normal()).round();
        if c >= 1.0 && c < n as f64 {
            return c as usize;
        }
        if std == 0.0 {
            break;
        }
    }
    if c.is_finite() {
        (c.round().max(1.0) as usize).min(hi)
    } else {
        hi
    }
}

/// The probability that `round(mean + std z)` lands in `1..n` (standard normal `z`).
fn gaussian_valid_mass(mean: f64, std: f64, n: usize) -> f64 {
    let (lo, hi) = (0.5, n as f64 - 0.5);
    if std == 0.0 {
        let c = mean.round();
        return if c >= 1.0 && c < n as f64 { 1.0 } else { 0.0 };
    }
    normal_cdf((hi - mean) / std) - normal_cdf((lo - mean) / std)
}

/// The standard normal distribution function (Abramowitz-Stegun 7.1.26 erf, absolute error < 1.5e-7).
fn normal_cdf(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let poly = t
        * (0.254829592
            + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let erf = 1.0 - poly * (-z * z).exp();
    if x >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

fn validate_gaussian(mean: f64, std: f64, n: usize) -> Result<(), String> {
    if !mean.is_finite() || !std.is_finite() || std < 0.0 {
        return Err(format!(
            "truncation gaussian mean {mean} / std {std}: both must be finite numbers and std >= 0"
        ));
    }
    if n < 2 {
        return Err(format!(
            "truncation gaussian needs at least 2 sampling steps (its cut falls in 1..steps); got {n}: use \
             mode = \"full\" or \"fixed\""
        ));
    }
    let mass = gaussian_valid_mass(mean, std, n);
    if mass < GAUSSIAN_MIN_MASS {
        return Err(format!(
            "truncation gaussian mean {mean} / std {std} puts {:.2e} of its mass on the valid cuts 1..={} of a \
             {n}-step chain (at least {GAUSSIAN_MIN_MASS} needed): the mean is a step index, so scale it with \
             sampling.steps (AlignProp's 42 / 5 is for 50 steps; for {n} steps e.g. mean = {:.1}, std = {:.1})",
            mass,
            n - 1,
            (0.84 * n as f64).max(1.0),
            (0.1 * n as f64).max(0.5),
        ));
    }
    Ok(())
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

    /// The shipped preset (42 / 5, made for 50 steps) on short chains: refused by `validate` with a message that
    /// says how to scale it, and `grad_steps` ends even so (it redrew forever at <= 8 steps before).
    #[test]
    fn gaussian_truncation_is_validated_and_always_ends() {
        let preset = Truncation::Gaussian {
            mean: 42.0,
            std: 5.0,
        };
        assert!(preset.validate(50).is_ok());
        assert!(
            preset.validate(40).is_ok(),
            "mass on the cuts 1..=39 is ~0.31"
        );
        for n in [2, 8, 10, 20] {
            let e = preset.validate(n).unwrap_err();
            assert!(
                e.contains("scale it with") && e.contains(&format!("{n}-step")),
                "{e}"
            );
        }
        let mut rng = NoiseRng::new(3);
        for n in [2, 5, 8, 10] {
            let steps = preset.grad_steps(n, &mut rng);
            assert_eq!(steps.len(), n);
            assert_eq!(
                steps.iter().filter(|&&k| k).count(),
                1,
                "cut clamped to n - 1"
            );
        }
        for bad in [(f64::NAN, 5.0), (42.0, f64::INFINITY), (42.0, -1.0)] {
            let t = Truncation::Gaussian {
                mean: bad.0,
                std: bad.1,
            };
            assert!(t.validate(50).is_err(), "{bad:?}");
            assert_eq!(
                t.grad_steps(50, &mut rng).len(),
                50,
                "ends even unvalidated"
            );
        }
        assert!(
            Truncation::Gaussian {
                mean: 1.0,
                std: 0.0
            }
            .validate(1)
            .is_err()
        );
        // The valid-mass estimate: a centred gaussian far inside the chain has all of it.
        assert!((gaussian_valid_mass(25.0, 3.0, 50) - 1.0).abs() < 1e-6);
        assert!((normal_cdf(1.0) - 0.841_344_746).abs() < 2e-7);
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
