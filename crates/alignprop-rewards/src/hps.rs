//! HPSv2 (Human Preference Score v2, Wu et al. 2023): an OpenCLIP ViT-H/14 fine-tuned on human preferences. The
//! score of an image and its prompt is the cosine similarity of the normalised image and text features (no logit
//! scale), about 0.2-0.35 for real models; AlignProp's loss is `1 - score`.
//!
//! As AlignProp's `hps_loss_fn`: images go through [`clip_preprocess_center_crop`] (clamp, bilinear resize of the
//! shorter side to 224, CLIP mean/std; the centre crop is the identity for square images and lets non-square ones
//! reach the ViT), prompts through the CLIP BPE tokenizer padded with open_clip's pad id 0 to 77 tokens.
//!
//! Weights: `HPS_v2_compressed.pt` or `HPS_v2.1_compressed.pt` (a torch file whose `state_dict` holds open_clip's
//! names, read without executing pickle code) or the same tensors as safetensors (`alignprop convert pth`), with
//! open_clip's `ViT-H-14.json` (built in: [`OpenClipConfig::vit_h_14`]).
//!
//! [`Reward::score`] without prompts is a [`RewardError::MissingPrompts`]: an HPSv2 score is only defined for an
//! image and its prompt; the trainer and `alignprop eval` call [`Reward::score_with_prompts`].

use std::path::Path;

use alignprop_diffusion::tokenizer::CLIPTokenizer;
use alignprop_io::VarBuilder;
use alignprop_io::weights::Result;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};

use crate::open_clip::{self, OpenClip, OpenClipConfig};
use crate::preprocess::{CLIP_MEAN, CLIP_STD, clip_preprocess_center_crop};
use crate::text::{check_prompts, load_tokenizer, reward_prompt_ids};
use crate::{Reward, RewardError, check_images};

/// The name of the reward in logs and errors.
const NAME: &str = "hps";

/// The HPSv2 scorer: open_clip model + tokenizer.
#[derive(Debug)]
pub struct HpsScorer<B: Backend> {
    pub clip: OpenClip<B>,
    pub tokenizer: CLIPTokenizer,
}

/// L2-normalises the rows of `[b, d]`.
pub(crate) fn normalize_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().square().sum_dim(1).sqrt();
    x / norm
}

/// Row-wise cosine similarity of two `[b, d]` tensors -> `[b]`.
pub(crate) fn cosine_rows<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 1> {
    let n = a.dims()[0];
    (normalize_rows(a) * normalize_rows(b))
        .sum_dim(1)
        .reshape([n])
}

impl<B: Backend> HpsScorer<B> {
    /// Builds the model from `vb` at the root of an open_clip state dict (see [`open_clip::open_weights`]).
    pub fn new(cfg: &OpenClipConfig, vb: &VarBuilder<B>, tokenizer: CLIPTokenizer) -> Result<Self> {
        Ok(Self {
            clip: OpenClip::new(cfg, vb)?,
            tokenizer,
        })
    }

    /// `weights`: the HPSv2 checkpoint (`.pt` or `.safetensors`); `config`: an open_clip model config json
    /// (`None`: ViT-H-14); `tokenizer`: a CLIP tokenizer folder (an SD1.5 `tokenizer/` folder works).
    pub fn load(
        weights: &Path,
        config: Option<&Path>,
        tokenizer: &Path,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        Ok(Self {
            clip: open_clip::load(weights, config, device, dtype)?,
            tokenizer: load_tokenizer(tokenizer)?,
        })
    }

    /// Prompts to `[b, context_length]` ids as open_clip's tokenizer gives them (padding 0); a prompt the
    /// tokenizer cannot encode, or an id outside the text model's vocabulary, is a [`RewardError::Tokenizer`].
    pub fn input_ids(
        &self,
        prompts: &[String],
        device: &B::Device,
    ) -> std::result::Result<Tensor<B, 2, Int>, RewardError> {
        reward_prompt_ids(
            NAME,
            &self.tokenizer,
            prompts,
            self.clip.context_length,
            self.clip.pad_id,
            self.clip.text.embeddings.token_embedding.val().dims()[0],
            device,
        )
    }

    /// Decoder output `[b, 3, H, W]` in `[-1, 1]` and token ids `[b, context_length]` -> HPSv2 score `[b]` (the
    /// cosine of image `i` and text `i`).
    pub fn score_ids(&self, images: Tensor<B, 4>, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let size = self.clip.visual.image_size;
        let px = clip_preprocess_center_crop(images, size, CLIP_MEAN, CLIP_STD);
        cosine_rows(self.clip.encode_image(px), self.clip.encode_text(input_ids))
    }
}

impl<B: Backend> Reward<B> for HpsScorer<B> {
    fn name(&self) -> String {
        NAME.into()
    }
    /// Always [`RewardError::MissingPrompts`]: HPSv2 needs the prompts ([`Reward::score_with_prompts`]).
    fn score(&self, images: Tensor<B, 4>) -> std::result::Result<Tensor<B, 1>, RewardError> {
        self.score_with_prompts(images, &[])
    }
    fn score_with_prompts(
        &self,
        images: Tensor<B, 4>,
        prompts: &[String],
    ) -> std::result::Result<Tensor<B, 1>, RewardError> {
        let [b, ..] = check_images(NAME, &images)?;
        check_prompts(NAME, b, prompts)?;
        let ids = self.input_ids(prompts, &images.device())?;
        Ok(self.score_ids(images, ids))
    }
    /// AlignProp's HPS loss: `1 - score`.
    fn loss(&self, scores: Tensor<B, 1>) -> Tensor<B, 1> {
        scores.neg() + 1.0
    }
}
