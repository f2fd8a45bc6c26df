//! Differentiable reward models: each maps decoded images `[batch, 3, H, W]` in `[-1, 1]` to one score per image,
//! end to end in burn tensor ops, so the gradient reaches the images (and through the VAE and sampler, the LoRA).
//!
//! - [`preprocess`]: AlignProp's CLIP preprocessing (clamp, shorter-side bilinear resize, normalisation).
//! - [`clip_vision`]: the CLIP vision transformer (transformers `CLIPVisionModelWithProjection` weights).
//! - [`aesthetic`]: the LAION aesthetic predictor (CLIP embedding -> linear MLP), loss `|score - 10|`.
//! - [`open_clip`]: OpenCLIP's CLIP (ViT + text transformer, open_clip's state-dict names and model configs).
//! - [`hps`]: HPSv2 (OpenCLIP ViT-H/14; cosine of image and prompt features), loss `1 - score`.
//! - [`pickscore`]: PickScore (transformers CLIP-H; `logit_scale.exp()` times the cosine), loss `-score`.
//! - [`text`]: prompts to token ids for the prompt-conditioned rewards.
//! - [`compressibility`]: JPEG size (the true metric) and its learned differentiable surrogate.
//! - [`compose`]: a weighted sum of rewards, and a fixed target (`|score - target|` loss) for any reward.
//! - [`tiny`]: the tiny scorer of the parity fixtures.
//! - [`brightness`]: mean brightness, for demos and loop tests.
//! - [`registry`]: every reward kind by name (constructor, needed files, whether it reads prompts).

pub mod aesthetic;
pub mod brightness;
pub mod clip_vision;
pub mod compose;
pub mod compressibility;
pub mod hps;
pub mod open_clip;
pub mod pickscore;
pub mod preprocess;
pub mod registry;
pub mod text;
pub mod tiny;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// This crate's error: loading a reward fails with `alignprop-io`'s error, naming the file, the key and the expected
/// and found shapes (tokenizer problems included).
pub use alignprop_io::{Error, Result};

/// A differentiable reward: `score` maps images to `[batch]` scores, `loss` maps scores to per-image losses to
/// minimise. Implement it to plug a new reward into the trainer.
pub trait Reward<B: Backend> {
    /// A short name for logs.
    fn name(&self) -> String;
    /// `images`: `[batch, 3, H, W]` in `[-1, 1]` -> `[batch]`.
    fn score(&self, images: Tensor<B, 4>) -> Tensor<B, 1>;
    /// Per-image loss from scores (default: `-score`, i.e. maximise the reward).
    fn loss(&self, scores: Tensor<B, 1>) -> Tensor<B, 1> {
        -scores
    }
    /// Scores of images generated from `prompts` (one prompt per image). Rewards that compare the image with its
    /// prompt (HPSv2, PickScore) override this; the default ignores the prompts.
    fn score_with_prompts(&self, images: Tensor<B, 4>, prompts: &[String]) -> Tensor<B, 1> {
        let _ = prompts;
        self.score(images)
    }
    /// Scores and per-image losses `([batch], [batch])` in one pass: what the trainer calls. The default is
    /// [`Self::score_with_prompts`] then [`Self::loss`]; compositions ([`compose::WeightedSum`]) override it.
    fn score_and_loss(
        &self,
        images: Tensor<B, 4>,
        prompts: &[String],
    ) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let s = self.score_with_prompts(images, prompts);
        (s.clone(), self.loss(s))
    }
}

impl<B: Backend> Reward<B> for tiny::TinyReward<B> {
    fn name(&self) -> String {
        "tiny".into()
    }
    fn score(&self, images: Tensor<B, 4>) -> Tensor<B, 1> {
        tiny::TinyReward::score(self, images)
    }
}

/// Mean image brightness as a reward.
#[derive(Clone, Copy, Debug, Default)]
pub struct Brightness;

impl<B: Backend> Reward<B> for Brightness {
    fn name(&self) -> String {
        "brightness".into()
    }
    fn score(&self, images: Tensor<B, 4>) -> Tensor<B, 1> {
        brightness::brightness(images)
    }
}
