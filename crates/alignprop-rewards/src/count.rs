//! Object count: "controllability of the number of objects", one of the AlignProp paper's tasks. A differentiable
//! count from the open-vocabulary detector OWL-ViT ([`crate::owlvit`]): each image patch is one detection, and the
//! count of an image is the sum over its patches of the probability that the patch shows the object,
//! `sum_p sigmoid(logit[p, object])`. The loss is `|count - target|`.
//!
//! Why OWL-ViT: its towers are CLIP's (the vision and text code this crate already has), any object can be named in
//! words, and its released weights (`google/owlvit-base-patch32`, `-patch16`, `owlvit-large-patch14`) are in the
//! transformers layout. It is trained with one-to-one matching, so one object is one detection and the sum of the
//! probabilities is a count; YOLOS (VADER's detector for object removal) has a closed COCO vocabulary.
//!
//! The object and the target of each image:
//! - `object` set (`reward.object`, `eval --object`): that text is the query for every image (e.g. "a photo of a
//!   dog"); without it, the object is read from the image's prompt: the word after the first number ("three dogs on
//!   the grass", "a photo of 4 cats") in the singular, as the query "a photo of a dog" ([`count_in_prompt`]).
//! - the target is that number in the prompt, or `reward.target` (which then applies to every image).
//!
//! `eval --reward count` also prints the hard count: the detections above a probability threshold (default 0.1),
//! as transformers' `post_process_object_detection` keeps them.

use std::path::Path;

use alignprop_io::weights::{Result, WeightError};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::owlvit::OwlViTDetector;
use crate::text::check_prompts;
use crate::{Reward, RewardError, check_images};

const NAME: &str = "count";

/// The default probability above which a patch is a detection for the hard count (transformers'
/// `post_process_object_detection` examples for OWL-ViT use 0.1).
pub const DEFAULT_THRESHOLD: f64 = 0.1;

/// Number words read as counts (digits are read too).
const NUMBER_WORDS: [&str; 21] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
];

/// Irregular plurals of common objects.
const IRREGULAR: [(&str, &str); 12] = [
    ("people", "person"),
    ("men", "man"),
    ("women", "woman"),
    ("children", "child"),
    ("mice", "mouse"),
    ("geese", "goose"),
    ("teeth", "tooth"),
    ("feet", "foot"),
    ("sheep", "sheep"),
    ("fish", "fish"),
    ("deer", "deer"),
    ("knives", "knife"),
];

/// The singular of an English noun, by the common rules ("dogs" -> "dog", "boxes" -> "box", "puppies" ->
/// "puppy", "mice" -> "mouse"); a word that does not look plural is returned as it is.
pub fn singular(word: &str) -> String {
    let w = word.to_lowercase();
    if let Some((_, s)) = IRREGULAR.iter().find(|(p, _)| *p == w) {
        return s.to_string();
    }
    let n = w.len();
    if n > 4 && w.ends_with("ies") {
        return format!("{}y", &w[..n - 3]);
    }
    if ["ches", "shes", "sses", "xes", "zes"]
        .iter()
        .any(|e| w.ends_with(e))
    {
        return w[..n - 2].to_string();
    }
    if n > 3 && w.ends_with('s') && !w.ends_with("ss") && !w.ends_with("us") {
        return w[..n - 1].to_string();
    }
    w
}

/// The first count written in `prompt` (a number word from zero to twenty, or digits) and the word after it:
/// `"Three dogs on the grass"` -> `(3, "dogs")`, `"a photo of 4 cats"` -> `(4, "cats")`; `None` when there is no
/// number followed by a word.
pub fn count_in_prompt(prompt: &str) -> Option<(usize, String)> {
    let words: Vec<String> = prompt
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    words.iter().enumerate().find_map(|(i, w)| {
        let n = w
            .parse::<usize>()
            .ok()
            .or_else(|| NUMBER_WORDS.iter().position(|x| x == w))?;
        Some((n, words.get(i + 1)?.clone()))
    })
}

/// The detector query for an object word: `"a photo of a {singular}"` (OWL-ViT's prompt template).
pub fn object_query(word: &str) -> String {
    format!("a photo of a {}", singular(word))
}

/// The object count reward.
#[derive(Debug)]
pub struct ObjectCount<B: Backend> {
    pub detector: OwlViTDetector<B>,
    /// The configured object text and its query embedding `[1, d]` (constant); `None`: read from the prompts.
    object: Option<(String, Tensor<B, 2>)>,
    /// The probability above which a patch is a detection (the hard count).
    pub threshold: f64,
}

/// What each image is counted for.
struct Plan<B: Backend> {
    /// `[b, 1, d]`: each image's object query.
    queries: Tensor<B, 3>,
    /// Each image's target from its prompt, if the prompt has one.
    targets: Vec<Option<usize>>,
}

impl<B: Backend> ObjectCount<B> {
    /// Wraps a loaded detector; `object`: the query for every image (embedded once), else read from the prompts.
    pub fn new(
        detector: OwlViTDetector<B>,
        object: Option<&str>,
        threshold: f64,
    ) -> std::result::Result<Self, RewardError> {
        let object = match object.map(str::trim).filter(|o| !o.is_empty()) {
            Some(o) => {
                let device = detector.text_projection.weight.val().device();
                let ids = detector.query_ids(NAME, &[o.to_string()], &device)?;
                Some((o.to_string(), detector.query_embeds(ids)))
            }
            None => None,
        };
        Ok(Self {
            detector,
            object,
            threshold,
        })
    }

    /// `path`: an OWL-ViT folder (`config.json` + weights) or weights file; `tokenizer`: a CLIP tokenizer folder.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        path: &Path,
        config: Option<&Path>,
        tokenizer: &Path,
        object: Option<&str>,
        threshold: f64,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        let detector = OwlViTDetector::load(path, config, tokenizer, device, dtype)?;
        Self::new(detector, object, threshold).map_err(|e| WeightError::Config {
            path: path.to_path_buf(),
            msg: format!("reward.object: {e}"),
        })
    }

    /// The configured object text, if any.
    pub fn object(&self) -> Option<&str> {
        self.object.as_ref().map(|(o, _)| o.as_str())
    }

    /// The query and prompt target of each of `b` images.
    fn plan(
        &self,
        b: usize,
        prompts: &[String],
        device: &B::Device,
    ) -> std::result::Result<Plan<B>, RewardError> {
        let parsed: Vec<Option<(usize, String)>> =
            prompts.iter().map(|p| count_in_prompt(p)).collect();
        let targets = if prompts.len() == b {
            parsed.iter().map(|p| p.as_ref().map(|(n, _)| *n)).collect()
        } else {
            vec![None; b]
        };
        let queries = match &self.object {
            Some((_, embed)) => {
                if !prompts.is_empty() {
                    check_prompts(NAME, b, prompts)?;
                }
                embed.clone().unsqueeze::<3>().repeat_dim(0, b)
            }
            None => {
                check_prompts(NAME, b, prompts)?;
                let mut texts: Vec<String> = Vec::new();
                let mut index = Vec::with_capacity(b);
                for (p, parsed) in prompts.iter().zip(&parsed) {
                    let Some((_, word)) = parsed else {
                        return Err(RewardError::Input {
                            reward: NAME.into(),
                            message: format!(
                                "the prompt {p:?} names no count and object (e.g. \"three dogs\"): write them in the \
                                 prompt or set the object (reward.object, eval --object)"
                            ),
                        });
                    };
                    let q = object_query(word);
                    let i = texts.iter().position(|t| *t == q).unwrap_or_else(|| {
                        texts.push(q);
                        texts.len() - 1
                    });
                    index.push(i as i64);
                }
                let embeds = self
                    .detector
                    .query_embeds(self.detector.query_ids(NAME, &texts, device)?);
                let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [b]), device);
                embeds.select(0, index).unsqueeze_dim::<3>(1)
            }
        };
        Ok(Plan { queries, targets })
    }

    /// Decoder output `[b, 3, H, W]` in `[-1, 1]` -> each patch's probability of showing its image's object
    /// `[b, patches]`, and each image's target from its prompt (if any).
    pub fn probabilities(
        &self,
        images: Tensor<B, 4>,
        prompts: &[String],
    ) -> std::result::Result<(Tensor<B, 2>, Vec<Option<usize>>), RewardError> {
        let [b, ..] = check_images(NAME, &images)?;
        let plan = self.plan(b, prompts, &images.device())?;
        let logits = self.detector.logits(images, plan.queries);
        let [_, p, _] = logits.dims();
        Ok((
            burn::tensor::activation::sigmoid(logits.reshape([b, p])),
            plan.targets,
        ))
    }

    /// The hard count of each image: patches whose probability is above [`Self::threshold`].
    pub fn hard_counts(&self, probabilities: Tensor<B, 2>) -> Vec<f64> {
        let [b, _] = probabilities.dims();
        probabilities
            .greater_elem(self.threshold)
            .int()
            .sum_dim(1)
            .reshape([b])
            .into_data()
            .convert::<f64>()
            .to_vec()
            .expect("counts")
    }
}

impl<B: Backend> Reward<B> for ObjectCount<B> {
    fn name(&self) -> String {
        NAME.into()
    }
    /// The soft counts of the configured object; without one, a [`RewardError::MissingPrompts`] (the object comes
    /// from the prompts).
    fn score(&self, images: Tensor<B, 4>) -> std::result::Result<Tensor<B, 1>, RewardError> {
        self.score_with_prompts(images, &[])
    }
    fn score_with_prompts(
        &self,
        images: Tensor<B, 4>,
        prompts: &[String],
    ) -> std::result::Result<Tensor<B, 1>, RewardError> {
        let (p, _) = self.probabilities(images, prompts)?;
        let b = p.dims()[0];
        Ok(p.sum_dim(1).reshape([b]))
    }
    /// The targets come from the prompts, which this method does not see: use [`Reward::score_and_loss`], or wrap
    /// the reward in [`crate::compose::Targeted`] (what `reward.target` does).
    fn loss(&self, _scores: Tensor<B, 1>) -> Tensor<B, 1> {
        panic!(
            "count: the loss needs each image's target count: call score_and_loss with the prompts, or wrap the \
             reward in compose::Targeted"
        )
    }
    /// `|count - target|` with each image's target from its prompt (a prompt without a number is an error: set
    /// `reward.target` or write the count in the prompt).
    fn score_and_loss(
        &self,
        images: Tensor<B, 4>,
        prompts: &[String],
    ) -> std::result::Result<(Tensor<B, 1>, Tensor<B, 1>), RewardError> {
        let device = images.device();
        let (p, targets) = self.probabilities(images, prompts)?;
        let b = p.dims()[0];
        let targets = targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.map(|t| t as f64).ok_or_else(|| RewardError::Input {
                    reward: NAME.into(),
                    message: format!(
                        "no target count for image {i} (prompt {:?}): write the count in the prompt (\"three dogs\") \
                         or set reward.target",
                        prompts.get(i).map_or("", String::as_str)
                    ),
                })
            })
            .collect::<std::result::Result<Vec<f64>, _>>()?;
        let counts = p.sum_dim(1).reshape([b]);
        let targets =
            Tensor::<B, 1>::from_data(TensorData::new(targets, [b]), (&device, counts.dtype()));
        Ok((counts.clone(), (counts - targets).abs()))
    }
    /// The soft counts, the hard counts (detections above the threshold) and the prompts' targets where known.
    fn score_with_details(
        &self,
        images: Tensor<B, 4>,
        prompts: &[String],
    ) -> std::result::Result<(Tensor<B, 1>, Vec<(String, Vec<f64>)>), RewardError> {
        let (p, targets) = self.probabilities(images, prompts)?;
        let b = p.dims()[0];
        let hard = self.hard_counts(p.clone());
        let mut details = vec![(format!("hard_count@{}", self.threshold), hard)];
        if targets.iter().all(Option::is_some) {
            details.push((
                "target".into(),
                targets.iter().map(|t| t.unwrap_or(0) as f64).collect(),
            ));
        }
        Ok((p.sum_dim(1).reshape([b]), details))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_objects_are_read_from_prompts() {
        assert_eq!(
            count_in_prompt("Three dogs on the grass"),
            Some((3, "dogs".into()))
        );
        assert_eq!(
            count_in_prompt("a photo of 4 cats."),
            Some((4, "cats".into()))
        );
        assert_eq!(
            count_in_prompt("Twelve apples"),
            Some((12, "apples".into()))
        );
        assert_eq!(count_in_prompt("a cat on a mat"), None);
        assert_eq!(count_in_prompt("a picture with 5"), None);
        assert_eq!(object_query("puppies"), "a photo of a puppy");
        assert_eq!(object_query("Boxes"), "a photo of a box");
        assert_eq!(object_query("mice"), "a photo of a mouse");
        assert_eq!(object_query("glass"), "a photo of a glass");
        assert_eq!(object_query("bus"), "a photo of a bus");
        assert_eq!(object_query("cat"), "a photo of a cat");
        assert_eq!(object_query("dogs"), "a photo of a dog");
    }
}
