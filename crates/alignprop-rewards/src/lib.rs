//! Differentiable reward models: each maps decoded images `[batch, 3, H, W]` in `[-1, 1]` to one score per image,
//! end to end in burn tensor ops, so the gradient reaches the images (and through the VAE and sampler, the LoRA).
//!
//! - [`preprocess`]: AlignProp's CLIP preprocessing (clamp, shorter-side bilinear resize, normalisation).
//! - [`clip_vision`]: the CLIP vision transformer (transformers `CLIPVisionModelWithProjection` weights).
//! - [`aesthetic`]: the LAION aesthetic predictor (CLIP embedding -> linear MLP), loss `|score - 10|`.
//! - [`open_clip`]: OpenCLIP's CLIP (ViT + text transformer, open_clip's state-dict names and model configs).
//! - [`hps`]: HPSv2 (OpenCLIP ViT-H/14; cosine of image and prompt features), loss `1 - score`.
//! - [`pickscore`]: PickScore (transformers CLIP-H; `logit_scale.exp()` times the cosine), loss `-score`.
//! - [`concept`]: concept removal: the CLIP cosine of an image to a concept prompt, loss `+similarity`.
//! - [`owlvit`]: the OWL-ViT open-vocabulary detector (transformers `OwlViTForObjectDetection`), class path.
//! - [`count`]: object count: the sum of OWL-ViT's per-patch probabilities of an object, loss `|count - target|`.
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
pub mod concept;
pub mod count;
pub mod hps;
pub mod open_clip;
pub mod owlvit;
pub mod pickscore;
pub mod preprocess;
pub mod registry;
pub mod text;
pub mod tiny;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// This crate's error: loading a reward fails with `alignprop-io`'s error, naming the file, the key and the expected
/// and found shapes (tokenizer problems included). Scoring fails with a [`RewardError`].
pub use alignprop_io::{Error, Result};

/// Why a reward cannot score a batch: one line that names the reward, what it expected and what it found, and what
/// to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RewardError {
    /// A prompt reward called without one prompt per image (e.g. [`Reward::score`], which has no prompts).
    #[error(
        "{reward}: needs one prompt per image ({}, {}): call score_with_prompts with one prompt per image",
        count(*images, "image"),
        count(*prompts, "prompt")
    )]
    MissingPrompts {
        reward: String,
        images: usize,
        prompts: usize,
    },
    /// The prompts cannot be turned into token ids the reward's text model reads.
    #[error("{reward}: cannot tokenize the prompts: {message}")]
    Tokenizer { reward: String, message: String },
    /// The images are not what the reward takes (shape, channels, aspect).
    #[error("{reward}: {message}")]
    Input { reward: String, message: String },
}

/// `1 image`, `4 images`.
fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Checks that `images` are decoder output as every reward takes it: `[batch, 3, H, W]` with at least one image and
/// non-empty sides; the shape otherwise, as [`RewardError::Input`] naming `reward`.
pub fn check_images<B: Backend>(
    reward: &str,
    images: &Tensor<B, 4>,
) -> std::result::Result<[usize; 4], RewardError> {
    let dims = images.dims();
    let [b, c, h, w] = dims;
    let problem = if c != 3 {
        Some(format!("{c} channels"))
    } else if b == 0 {
        Some("an empty batch".to_string())
    } else if h == 0 || w == 0 {
        Some("an empty image".to_string())
    } else {
        None
    };
    match problem {
        None => Ok(dims),
        Some(p) => Err(RewardError::Input {
            reward: reward.into(),
            message: format!(
                "expected RGB images [batch, 3, H, W] with batch, H, W > 0, found {dims:?} ({p}): pass the VAE's \
                 decoded images"
            ),
        }),
    }
}

/// [`check_images`], and that the images become `size x size` when their shorter side is resized to `size`: for
/// the rewards that feed AlignProp's preprocessing ([`preprocess::clip_preprocess`], no crop) to a square CLIP
/// tower of input `size`, i.e. square images (or nearly).
pub fn check_square_images<B: Backend>(
    reward: &str,
    images: &Tensor<B, 4>,
    size: usize,
) -> std::result::Result<[usize; 4], RewardError> {
    let dims = check_images(reward, images)?;
    let [_, _, h, w] = dims;
    let resized = preprocess::shorter_side_size(h, w, size);
    if resized != [size, size] {
        return Err(RewardError::Input {
            reward: reward.into(),
            message: format!(
                "expected square images, found {h}x{w} in {dims:?} (resized to {}x{} without a crop, not the CLIP \
                 input {size}x{size}): generate square images or crop them",
                resized[0], resized[1]
            ),
        });
    }
    Ok(dims)
}

/// A differentiable reward: `score` maps images to `[batch]` scores, `loss` maps scores to per-image losses to
/// minimise. Implement it to plug a new reward into the trainer.
///
/// The scoring methods return a [`RewardError`] rather than panic on input they cannot score: images that are not
/// `[batch, 3, H, W]`, missing prompts, or prompts the tokenizer cannot encode.
pub trait Reward<B: Backend> {
    /// A short name for logs.
    fn name(&self) -> String;
    /// `images`: `[batch, 3, H, W]` in `[-1, 1]` -> `[batch]`. Rewards that need prompts (HPSv2, PickScore)
    /// return [`RewardError::MissingPrompts`].
    fn score(&self, images: Tensor<B, 4>) -> std::result::Result<Tensor<B, 1>, RewardError>;
    /// Per-image loss from scores (default: `-score`, i.e. maximise the reward).
    fn loss(&self, scores: Tensor<B, 1>) -> Tensor<B, 1> {
        -scores
    }
    /// Scores of images generated from `prompts` (one prompt per image). Rewards that compare the image with its
    /// prompt (HPSv2, PickScore) override this, and return [`RewardError::MissingPrompts`] unless there is one
    /// prompt per image; the default ignores the prompts.
    fn score_with_prompts(
        &self,
        images: Tensor<B, 4>,
        prompts: &[String],
    ) -> std::result::Result<Tensor<B, 1>, RewardError> {
        let _ = prompts;
        self.score(images)
    }
    /// Scores and per-image losses `([batch], [batch])` in one pass: what the trainer calls. The default is
    /// [`Self::score_with_prompts`] then [`Self::loss`]; compositions ([`compose::WeightedSum`]) override it.
    fn score_and_loss(
        &self,
        images: Tensor<B, 4>,
        prompts: &[String],
    ) -> std::result::Result<(Tensor<B, 1>, Tensor<B, 1>), RewardError> {
        let s = self.score_with_prompts(images, prompts)?;
        Ok((s.clone(), self.loss(s)))
    }
    /// Scores as [`Self::score_with_prompts`], with per-image quantities to show beside them as `(name, one value
    /// per image)` columns (the object count's thresholded detections); the default has none.
    #[allow(clippy::type_complexity)]
    fn score_with_details(
        &self,
        images: Tensor<B, 4>,
        prompts: &[String],
    ) -> std::result::Result<(Tensor<B, 1>, Vec<(String, Vec<f64>)>), RewardError> {
        Ok((self.score_with_prompts(images, prompts)?, Vec::new()))
    }
}

impl<B: Backend> Reward<B> for tiny::TinyReward<B> {
    fn name(&self) -> String {
        "tiny".into()
    }
    fn score(&self, images: Tensor<B, 4>) -> std::result::Result<Tensor<B, 1>, RewardError> {
        check_images("tiny", &images)?;
        Ok(tiny::TinyReward::score(self, images))
    }
}

/// Mean image brightness as a reward.
#[derive(Clone, Copy, Debug, Default)]
pub struct Brightness;

impl<B: Backend> Reward<B> for Brightness {
    fn name(&self) -> String {
        "brightness".into()
    }
    fn score(&self, images: Tensor<B, 4>) -> std::result::Result<Tensor<B, 1>, RewardError> {
        check_images("brightness", &images)?;
        Ok(brightness::brightness(images))
    }
}
