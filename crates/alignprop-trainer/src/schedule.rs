//! Learning-rate schedules over a run's optimiser steps: constant, linear decay or cosine decay, each after an
//! optional linear warm-up, with the names and formulas of transformers' `get_scheduler` (the schedules
//! diffusers' training scripts use through `--lr_scheduler` and `--lr_warmup_steps`).

use serde::{Deserialize, Serialize};

/// `[optimizer] schedule`: how the learning rate changes over `train.steps` optimiser steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// `lr` throughout (after the warm-up, if any: transformers' `constant_with_warmup`). AlignProp's setting.
    #[default]
    Constant,
    /// Linear decay from `lr` to 0 at the last step (transformers' `linear`).
    Linear,
    /// Half a cosine from `lr` to 0 at the last step (transformers' `cosine`, `num_cycles = 0.5`).
    Cosine,
}

/// The factor the base learning rate is multiplied by for the optimiser step that follows `done` steps (0 for the
/// first step), in a run of `total` steps whose first `warmup` steps ramp linearly from 0 (transformers' lambdas
/// as its `LambdaLR` evaluates them: the first step with warm-up has factor 0).
pub fn lr_factor(schedule: LrSchedule, warmup: usize, total: usize, done: usize) -> f64 {
    if done < warmup {
        return done as f64 / warmup.max(1) as f64;
    }
    // Past the last step (a run resumed with fewer `train.steps`) both decays stay at 0.
    let progress = ((done - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64).min(1.0);
    match schedule {
        LrSchedule::Constant => 1.0,
        LrSchedule::Linear => (1.0 - progress).max(0.0),
        LrSchedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn warmup_then_each_decay() {
        use LrSchedule::*;
        // Warm-up of 2 steps in 10: 0, 1/2, then the decay over the 8 remaining steps.
        for s in [Constant, Linear, Cosine] {
            assert!(close(lr_factor(s, 2, 10, 0), 0.0) && close(lr_factor(s, 2, 10, 1), 0.5));
            assert!(close(lr_factor(s, 2, 10, 2), 1.0), "{s:?}");
        }
        assert!(close(lr_factor(Constant, 2, 10, 9), 1.0));
        assert!(
            close(lr_factor(Linear, 2, 10, 6), 0.5) && close(lr_factor(Linear, 2, 10, 9), 0.125)
        );
        assert!(close(lr_factor(Cosine, 2, 10, 6), 0.5));
        assert!(close(lr_factor(Cosine, 0, 10, 0), 1.0) && close(lr_factor(Cosine, 0, 10, 5), 0.5));
        // cos(pi * 9/10): the last step of 10 still moves a little, as in transformers.
        let last = 0.5 * (1.0 + (std::f64::consts::PI * 0.9).cos());
        assert!(close(lr_factor(Cosine, 0, 10, 9), last) && last > 0.0);
        // No warm-up: the constant schedule is 1 from the first step; past the end the decays stay at 0.
        assert!(close(lr_factor(Constant, 0, 10, 0), 1.0));
        assert!(
            close(lr_factor(Linear, 0, 10, 12), 0.0) && close(lr_factor(Cosine, 0, 10, 12), 0.0)
        );
    }

    #[test]
    fn names_parse_as_in_toml() {
        #[derive(Deserialize)]
        struct T {
            s: LrSchedule,
        }
        let t: T = toml::from_str("s = \"cosine\"").unwrap();
        assert_eq!(t.s, LrSchedule::Cosine);
        assert!(toml::from_str::<T>("s = \"cosine_with_restarts\"").is_err());
    }
}
