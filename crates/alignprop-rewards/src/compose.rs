//! Composing rewards: a fixed loss target for any reward, and a weighted sum of rewards (multi-objective
//! alignment: e.g. `1.0 * aesthetic + 0.5 * HPSv2`). Both are [`Reward`]s themselves, so they plug into the trainer
//! like any other, and researchers' own rewards compose the same way.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::{Reward, RewardError};

/// A reward whose per-image loss is `|score - target|` (AlignProp's aesthetic loss with target 10).
pub struct Targeted<B: Backend> {
    pub inner: Box<dyn Reward<B>>,
    pub target: f64,
}

impl<B: Backend> Reward<B> for Targeted<B> {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn score(&self, images: Tensor<B, 4>) -> Result<Tensor<B, 1>, RewardError> {
        self.inner.score(images)
    }
    fn score_with_prompts(
        &self,
        images: Tensor<B, 4>,
        prompts: &[String],
    ) -> Result<Tensor<B, 1>, RewardError> {
        self.inner.score_with_prompts(images, prompts)
    }
    fn loss(&self, scores: Tensor<B, 1>) -> Tensor<B, 1> {
        (scores - self.target).abs()
    }
    #[allow(clippy::type_complexity)]
    fn score_with_details(
        &self,
        images: Tensor<B, 4>,
        prompts: &[String],
    ) -> Result<(Tensor<B, 1>, Vec<(String, Vec<f64>)>), RewardError> {
        self.inner.score_with_details(images, prompts)
    }
}

/// One term of a [`WeightedSum`].
pub struct WeightedTerm<B: Backend> {
    pub weight: f64,
    pub reward: Box<dyn Reward<B>>,
}

/// `score = sum_i w_i * score_i` and `loss = sum_i w_i * loss_i(score_i)`, per image. Every term sees the same
/// images (one decoder pass) and the gradient of the sum flows through each term.
pub struct WeightedSum<B: Backend> {
    pub terms: Vec<WeightedTerm<B>>,
}

impl<B: Backend> WeightedSum<B> {
    pub fn new(terms: Vec<WeightedTerm<B>>) -> Self {
        assert!(
            !terms.is_empty(),
            "a weighted sum needs at least one reward"
        );
        Self { terms }
    }
}

impl<B: Backend> Reward<B> for WeightedSum<B> {
    fn name(&self) -> String {
        self.terms
            .iter()
            .map(|t| format!("{}*{}", t.weight, t.reward.name()))
            .collect::<Vec<_>>()
            .join(" + ")
    }
    /// The terms' scores without prompts: a [`RewardError::MissingPrompts`] if a term needs them.
    fn score(&self, images: Tensor<B, 4>) -> Result<Tensor<B, 1>, RewardError> {
        self.score_with_prompts(images, &[])
    }
    fn score_with_prompts(
        &self,
        images: Tensor<B, 4>,
        prompts: &[String],
    ) -> Result<Tensor<B, 1>, RewardError> {
        Ok(self.score_and_loss(images, prompts)?.0)
    }
    /// The sum's own per-image loss cannot be rebuilt from the summed score: use [`Reward::score_and_loss`].
    fn loss(&self, scores: Tensor<B, 1>) -> Tensor<B, 1> {
        -scores
    }
    /// The first term's error, if any; an empty sum (built without [`WeightedSum::new`]) is a
    /// [`RewardError::Input`].
    fn score_and_loss(
        &self,
        images: Tensor<B, 4>,
        prompts: &[String],
    ) -> Result<(Tensor<B, 1>, Tensor<B, 1>), RewardError> {
        let mut total: Option<(Tensor<B, 1>, Tensor<B, 1>)> = None;
        for t in &self.terms {
            let (s, l) = t.reward.score_and_loss(images.clone(), prompts)?;
            let (s, l) = (s * t.weight, l * t.weight);
            total = Some(match total {
                None => (s, l),
                Some((ts, tl)) => (ts + s, tl + l),
            });
        }
        total.ok_or_else(|| RewardError::Input {
            reward: "sum".into(),
            message: "expected at least one weighted reward, found none: add terms to the sum"
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Brightness;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;

    type A = Autodiff<Flex>;

    /// Brightness of a constant image is the constant mapped to [0, 1]; a sum of `2 * brightness` and a targeted
    /// brightness adds scores and losses with their weights, and the image gradient is the weighted sum.
    #[test]
    fn weighted_sum_adds_scores_losses_and_gradients() {
        let device = Default::default();
        let images = Tensor::<A, 4>::from_data(
            TensorData::new(vec![0.2f32; 2 * 3 * 4 * 4], [2, 3, 4, 4]),
            &device,
        )
        .require_grad();
        let b = Reward::<A>::score(&Brightness, images.clone())
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap()[0] as f64;
        let sum = WeightedSum::new(vec![
            WeightedTerm {
                weight: 2.0,
                reward: Box::new(Brightness),
            },
            WeightedTerm {
                weight: 0.5,
                reward: Box::new(Targeted {
                    inner: Box::new(Brightness),
                    target: 1.0,
                }),
            },
        ]);
        assert_eq!(sum.name(), "2*brightness + 0.5*brightness");
        let (s, l) = sum.score_and_loss(images.clone(), &[]).unwrap();
        let s: Vec<f32> = s.into_data().to_vec().unwrap();
        let lv: Vec<f32> = l.clone().into_data().to_vec().unwrap();
        assert!((s[0] as f64 - 2.5 * b).abs() < 1e-6, "{s:?} vs {b}");
        // loss = 2 * (-b) + 0.5 * |b - 1|
        assert!(
            (lv[0] as f64 - (-2.0 * b + 0.5 * (1.0 - b))).abs() < 1e-6,
            "{lv:?}"
        );
        // d loss / d image: -2.5 * d b / d image; d b / d pixel = 1 / (2 * 3 * 4 * 4) per image (mean of x/2 + 0.5).
        let grads = l.sum().backward();
        let g: Vec<f32> = images.grad(&grads).unwrap().into_data().to_vec().unwrap();
        let expected = -2.5 * 0.5 / 48.0;
        assert!(
            g.iter().all(|v| (*v as f64 - expected).abs() < 1e-7),
            "{:?}",
            &g[..4]
        );
    }
}
