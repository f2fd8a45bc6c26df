//! `[method]`: which reward-gradient method trains the adapters. All four run on the same sampling chain and
//! reward; they differ in which part of the chain carries the gradient:
//!
//! | kind | gradient through | per trajectory |
//! |---|---|---|
//! | `alignprop` | the steps `[truncation]` keeps (fixed K, random K, per-step random, full) | `n` UNet calls + K recomputed |
//! | `draft_k` | the last K steps (`[truncation] mode = "fixed"`): DRaFT-K | `n + K` UNet calls |
//! | `draft_lv` | one step from each of `copies` re-noised copies of the final sample: DRaFT-LV | `n + copies` UNet calls, `copies` decodes |
//! | `refl` | the x0 prediction of one step drawn from `stop_min ..= stop_max` (the chain stops there): ReFL | `stop + 1` UNet calls |

use serde::{Deserialize, Serialize};

use crate::truncation::Truncation;

/// The method's name in the config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MethodKind {
    /// AlignProp (Prabhudesai et al. 2023): the truncation modes of `[truncation]`.
    #[default]
    Alignprop,
    /// DRaFT-K (Clark et al. 2023): gradient through the last K steps, `[truncation] mode = "fixed"`.
    DraftK,
    /// DRaFT-LV (Clark et al. 2023): K = 1 on `copies` re-noised copies of the final sample.
    DraftLv,
    /// ReFL (Xu et al. 2023, ImageReward): the x0 prediction of a late step, rewarded.
    Refl,
}

/// ReFL's loss on a reward score `s`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReflLoss {
    /// The reward's own loss (`-s`, `1 - s` for HPSv2, `|s - target|` with a target), as the other methods.
    #[default]
    Reward,
    /// `relu(relu_margin - s)`: ImageReward's `ReFL.py` (`F.relu(-rewards + 2)`).
    Relu,
}

/// `[method]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodConfig {
    pub kind: MethodKind,
    /// `draft_lv`: re-noised copies per trajectory (DRaFT-LV's n; default 2).
    pub copies: usize,
    /// `refl`: the stop step (0-based index into the sampling steps) is drawn uniformly from
    /// `stop_min ..= stop_max`; each defaults to ReFL.py's range scaled to `sampling.steps` (30 ..= 39 of 40:
    /// the last quarter).
    pub stop_min: Option<usize>,
    pub stop_max: Option<usize>,
    /// `refl`: the loss on the score.
    pub refl_loss: ReflLoss,
    /// `refl` with `refl_loss = "relu"`: the margin (ReFL.py: 2).
    pub relu_margin: f64,
}

impl Default for MethodConfig {
    fn default() -> Self {
        Self {
            kind: MethodKind::Alignprop,
            copies: 2,
            stop_min: None,
            stop_max: None,
            refl_loss: ReflLoss::Reward,
            relu_margin: 2.0,
        }
    }
}

impl MethodConfig {
    /// ReFL's stop-step range for a chain of `steps` steps (inclusive).
    pub fn stop_range(&self, steps: usize) -> (usize, usize) {
        let last = steps.saturating_sub(1);
        (
            self.stop_min.unwrap_or(steps * 3 / 4).min(last),
            self.stop_max.unwrap_or(last),
        )
    }

    /// Checks the method against the chain (`steps` sampling steps) and `[truncation]`.
    pub fn validate(&self, steps: usize, truncation: &Truncation) -> Result<(), String> {
        match self.kind {
            MethodKind::Alignprop => Ok(()),
            MethodKind::DraftK => match truncation {
                Truncation::Fixed { .. } => Ok(()),
                other => Err(format!(
                    "method.kind = \"draft_k\" differentiates a fixed last K: set [truncation] mode = \"fixed\" \
                     with k (found {other:?}), or use method.kind = \"alignprop\" for the other modes"
                )),
            },
            MethodKind::DraftLv if self.copies == 0 => Err(
                "method.copies = 0: DRaFT-LV needs at least one re-noised copy (default 2)"
                    .into(),
            ),
            MethodKind::DraftLv => Ok(()),
            MethodKind::Refl => {
                let (lo, hi) = self.stop_range(steps);
                if lo > hi || hi >= steps {
                    return Err(format!(
                        "method.stop_min = {lo} / stop_max = {hi}: expected 0 <= stop_min <= stop_max < \
                         sampling.steps ({steps})"
                    ));
                }
                if !self.relu_margin.is_finite() {
                    return Err(format!(
                        "method.relu_margin = {}: expected a finite number",
                        self.relu_margin
                    ));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refl_range_defaults_to_the_last_quarter() {
        let m = MethodConfig {
            kind: MethodKind::Refl,
            ..Default::default()
        };
        assert_eq!(m.stop_range(40), (30, 39));
        assert_eq!(m.stop_range(10), (7, 9));
        assert_eq!(m.stop_range(1), (0, 0));
        assert!(m.validate(10, &Truncation::default()).is_ok());
        let bad = MethodConfig {
            stop_max: Some(10),
            ..m.clone()
        };
        let e = bad.validate(10, &Truncation::default()).unwrap_err();
        assert!(e.contains("stop_max = 10") && e.contains("(10)"), "{e}");
    }

    #[test]
    fn draft_k_needs_a_fixed_truncation_and_names_parse() {
        let m: MethodConfig = toml::from_str("kind = \"draft_k\"").unwrap();
        assert_eq!(m.kind, MethodKind::DraftK);
        assert!(m.validate(10, &Truncation::Fixed { k: 2 }).is_ok());
        let e = m.validate(10, &Truncation::Full).unwrap_err();
        assert!(e.contains("mode = \"fixed\""), "{e}");
        let lv: MethodConfig = toml::from_str("kind = \"draft_lv\"\ncopies = 0").unwrap();
        assert!(
            lv.validate(10, &Truncation::default())
                .unwrap_err()
                .contains("copies = 0")
        );
        assert!(toml::from_str::<MethodConfig>("kind = \"ddpo\"").is_err());
    }
}
