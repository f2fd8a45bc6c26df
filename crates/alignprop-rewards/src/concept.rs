//! Concept removal: the CLIP similarity of an image to a configured concept prompt (`"a photo of a dog"`,
//! `"blood"`, ...), with loss `+similarity`, so that training moves the images away from the concept (the
//! abstract's "ethical image generation"). Any transformers `CLIPModel` folder serves (e.g.
//! `openai/clip-vit-large-patch14`, the aesthetic reward's CLIP; PickScore's): the score is
//! `cosine(visual_projection(vision(image)), text_projection(text(concept)))` in `[-1, 1]`, without the logit
//! scale, i.e. `CLIPModel`'s `logits_per_image / logit_scale.exp()`. The concept's text embedding is computed once.

use std::path::Path;

use alignprop_io::weights::Result;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use crate::hps::cosine_rows;
use crate::pickscore::PickScorer;
use crate::preprocess::{CLIP_MEAN, CLIP_STD, clip_preprocess_center_crop};
use crate::{Reward, RewardError, check_images};

/// Similarity to a concept prompt; the loss pushes it down.
#[derive(Debug)]
pub struct ConceptSimilarity<B: Backend> {
    /// The CLIP towers and projections (a `CLIPModel`, loaded as PickScore's).
    pub clip: PickScorer<B>,
    pub concept: String,
    /// The concept's projected text embedding `[1, projection_dim]` (constant).
    pub text_embed: Tensor<B, 2>,
}

impl<B: Backend> ConceptSimilarity<B> {
    /// Wraps a loaded `CLIPModel`, embedding `concept` once (a prompt the tokenizer cannot encode is an error).
    pub fn new(clip: PickScorer<B>, concept: &str) -> std::result::Result<Self, RewardError> {
        let device = clip.logit_scale.val().device();
        let ids = clip.input_ids(&[concept.to_string()], &device)?;
        let text_embed = clip
            .text_projection
            .forward(clip.text.forward(ids).pooler_output);
        Ok(Self {
            clip,
            concept: concept.to_string(),
            text_embed,
        })
    }

    /// `path`: a `CLIPModel` folder or weights file (then `config`, by default the `config.json` beside it);
    /// `tokenizer`: a CLIP tokenizer folder.
    pub fn load(
        path: &Path,
        config: Option<&Path>,
        tokenizer: &Path,
        concept: &str,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        let clip = PickScorer::load(path, config, tokenizer, device, dtype)?;
        Self::new(clip, concept).map_err(|e| alignprop_io::weights::WeightError::Config {
            path: path.to_path_buf(),
            msg: format!("reward.concept: {e}"),
        })
    }

    /// Decoder output `[b, 3, H, W]` in `[-1, 1]` -> cosine similarity to the concept `[b]`.
    pub fn similarity(&self, images: Tensor<B, 4>) -> Tensor<B, 1> {
        let px =
            clip_preprocess_center_crop(images, self.clip.vision.image_size, CLIP_MEAN, CLIP_STD);
        let image_embeds = self.clip.vision.forward(px);
        let n = image_embeds.dims()[0];
        let text = self
            .text_embed
            .clone()
            .cast(image_embeds.dtype())
            .repeat_dim(0, n);
        cosine_rows(image_embeds, text)
    }
}

impl<B: Backend> Reward<B> for ConceptSimilarity<B> {
    fn name(&self) -> String {
        "concept".into()
    }
    fn score(&self, images: Tensor<B, 4>) -> std::result::Result<Tensor<B, 1>, RewardError> {
        check_images("concept", &images)?;
        Ok(self.similarity(images))
    }
    /// `+similarity`: minimising it moves the images away from the concept.
    fn loss(&self, scores: Tensor<B, 1>) -> Tensor<B, 1> {
        scores
    }
}
