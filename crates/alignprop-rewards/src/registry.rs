//! The reward kinds by name: one entry per kind that `alignprop train` (`reward.kind`) or `alignprop eval
//! --reward` accepts, with its constructor, the files it needs, whether it scores an image with its prompt, and
//! whether the trainer can use it (`jpeg`, the exact JPEG size, is not differentiable: evaluation only).
//!
//! The trainer's `sum` ([`SUM_KIND`]) is not an entry: it adds entries ([`crate::compose::WeightedSum`]).

use std::path::{Path, PathBuf};

use alignprop_io::weights::{Result, WeightError};
use burn::tensor::DType;
use burn::tensor::backend::Backend;

use crate::Reward;
use crate::aesthetic::AestheticScorer;
use crate::compressibility::CompressibilityScorer;
use crate::concept::ConceptSimilarity;
use crate::count::{DEFAULT_THRESHOLD, ObjectCount};
use crate::hps::HpsScorer;
use crate::pickscore::PickScorer;
use crate::text::find_tokenizer;
use crate::tiny::TinyReward;

/// The trainer's weighted sum of reward kinds (`reward.kind = "sum"` with `[[reward.terms]]`).
pub const SUM_KIND: &str = "sum";

/// A file a reward reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewardFile {
    /// The reward's weights: `reward.path` in a training config, `--reward-path` for `eval`.
    Weights,
    /// A CLIP vision model folder: `reward.clip_path`, `--clip-path`.
    ClipVision,
}

impl RewardFile {
    /// The name of the file's key in a training config (`path`, `clip_path`), and of its [`RewardFiles`] field.
    pub fn config_key(self) -> &'static str {
        match self {
            Self::Weights => "path",
            Self::ClipVision => "clip_path",
        }
    }
}

/// A file a reward kind cannot do without, and what it is (for messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    pub file: RewardFile,
    pub what: &'static str,
}

/// The files given for one reward.
#[derive(Clone, Copy, Debug, Default)]
pub struct RewardFiles<'a> {
    /// [`RewardFile::Weights`].
    pub path: Option<&'a Path>,
    /// [`RewardFile::ClipVision`].
    pub clip_path: Option<&'a Path>,
    /// `hps`: an open_clip model config json (default ViT-H-14); `pickscore`: the `CLIPModel` `config.json` when
    /// `path` is a weights file.
    pub config: Option<&'a Path>,
    /// Where a prompt reward's CLIP tokenizer is looked for, in order ([`RewardKind::tokenizer_candidates`]).
    pub tokenizers: &'a [PathBuf],
    /// `concept`: the text of the concept to move away from (`reward.concept`, `--concept`).
    pub concept: Option<&'a str>,
    /// `count`: the object to count in every image (`reward.object`, `--object`); else read from each prompt.
    pub object: Option<&'a str>,
    /// `count`: the probability above which a patch is a detection for the hard count (`--count-threshold`;
    /// default [`DEFAULT_THRESHOLD`]).
    pub count_threshold: Option<f64>,
}

impl RewardFiles<'_> {
    /// The given file of a kind, if any.
    pub fn get(&self, file: RewardFile) -> Option<&Path> {
        match file {
            RewardFile::Weights => self.path,
            RewardFile::ClipVision => self.clip_path,
        }
    }

    /// The given file, or an error naming its key.
    fn require(&self, file: RewardFile) -> Result<&Path> {
        self.get(file).ok_or_else(|| WeightError::Config {
            path: PathBuf::new(),
            msg: format!("no reward {} given", file.config_key()),
        })
    }
}

/// How a kind scores images.
pub enum Scorer<B: Backend> {
    /// A differentiable [`Reward`] (training and evaluation), built from its files on a device in a dtype.
    #[allow(clippy::type_complexity)]
    Reward(fn(&RewardFiles<'_>, &B::Device, DType) -> Result<Box<dyn Reward<B>>>),
    /// The exact size in KiB of the 8-bit images as JPEG at [`crate::compressibility::JPEG_QUALITY`]
    /// ([`crate::compressibility::jpeg_size_kib`]): not differentiable, so evaluation only.
    JpegSize,
}

/// Whether a kind scores each image with its prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prompts {
    /// It ignores prompts.
    Ignored,
    /// It needs one prompt per image (HPSv2, PickScore).
    Needed,
    /// It needs them unless an object is given ([`RewardFiles::object`]): the object count.
    UnlessObject,
}

/// One reward kind.
pub struct RewardKind<B: Backend> {
    /// The name configs and the command line use.
    pub name: &'static str,
    /// The files it cannot do without.
    pub needs: &'static [Need],
    /// Whether it scores each image with its prompt (see [`Self::reads_prompts`]).
    pub prompts: Prompts,
    /// Whether its weights folder may hold its tokenizer (PickScore's does).
    pub tokenizer_in_weights: bool,
    pub scorer: Scorer<B>,
}

impl<B: Backend> RewardKind<B> {
    /// Whether it scores each image with its prompt, given `files`.
    pub fn reads_prompts(&self, files: &RewardFiles<'_>) -> bool {
        match self.prompts {
            Prompts::Ignored => false,
            Prompts::Needed => true,
            Prompts::UnlessObject => files.object.is_none_or(|o| o.trim().is_empty()),
        }
    }

    /// Whether the trainer can use it (it is differentiable).
    pub fn trainable(&self) -> bool {
        matches!(self.scorer, Scorer::Reward(_))
    }

    /// The needed files that `files` lacks.
    pub fn missing(&self, files: &RewardFiles<'_>) -> Vec<Need> {
        self.needs
            .iter()
            .filter(|n| files.get(n.file).is_none())
            .copied()
            .collect()
    }

    /// `{subject} needs {key} ({what}) and {key} ({what})`, with each file's key as `key` names it (a config key, a
    /// command-line flag).
    pub fn needs_message(&self, subject: &str, key: impl Fn(RewardFile) -> String) -> String {
        let needs: Vec<String> = self
            .needs
            .iter()
            .map(|n| format!("{} ({})", key(n.file), n.what))
            .collect();
        format!("{subject} needs {}", needs.join(" and "))
    }

    /// Where its tokenizer is looked for, in order: `tokenizer` when given (only it); else the weights folder
    /// `path` when the kind keeps its tokenizer there and `path` is a folder, then `default` (for the trainer and
    /// `eval --model`: the SD model's `tokenizer/`, the same CLIP BPE).
    pub fn tokenizer_candidates(
        &self,
        path: Option<&Path>,
        tokenizer: Option<&Path>,
        default: Option<&Path>,
    ) -> Vec<PathBuf> {
        if let Some(t) = tokenizer {
            return vec![t.to_path_buf()];
        }
        let weights_dir = path.filter(|p| self.tokenizer_in_weights && p.is_dir());
        weights_dir
            .into_iter()
            .chain(default)
            .map(Path::to_path_buf)
            .collect()
    }

    /// Builds the reward; an error when a needed file is missing or the kind is not a differentiable reward.
    pub fn build(
        &self,
        files: &RewardFiles<'_>,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Box<dyn Reward<B>>> {
        let config_error = |msg: String| WeightError::Config {
            path: PathBuf::new(),
            msg,
        };
        if !self.missing(files).is_empty() {
            let subject = format!("reward '{}'", self.name);
            return Err(config_error(
                self.needs_message(&subject, |f| f.config_key().to_string()),
            ));
        }
        match self.scorer {
            Scorer::Reward(build) => build(files, device, dtype),
            Scorer::JpegSize => Err(config_error(format!(
                "reward '{}' is not differentiable (evaluation only)",
                self.name
            ))),
        }
    }
}

const WEIGHTS: RewardFile = RewardFile::Weights;
const CLIP: RewardFile = RewardFile::ClipVision;

/// A reward loaded from a CLIP vision folder and a head file: `load(clip, head, device, dtype)`.
fn clip_and_head<B: Backend, R: Reward<B> + 'static>(
    load: fn(&Path, &Path, &B::Device, DType) -> Result<R>,
    f: &RewardFiles<'_>,
    device: &B::Device,
    dtype: DType,
) -> Result<Box<dyn Reward<B>>> {
    Ok(Box::new(load(
        f.require(CLIP)?,
        f.require(WEIGHTS)?,
        device,
        dtype,
    )?))
}

/// A prompt reward loaded from its weights, its optional config and the first tokenizer found:
/// `load(weights, config, tokenizer, device, dtype)`.
#[allow(clippy::type_complexity)]
fn with_tokenizer<B: Backend, R: Reward<B> + 'static>(
    load: fn(&Path, Option<&Path>, &Path, &B::Device, DType) -> Result<R>,
    f: &RewardFiles<'_>,
    device: &B::Device,
    dtype: DType,
) -> Result<Box<dyn Reward<B>>> {
    let tokenizer = find_tokenizer(f.tokenizers)?;
    let reward = load(f.require(WEIGHTS)?, f.config, &tokenizer, device, dtype)?;
    Ok(Box::new(reward))
}

/// Every reward kind, in the order messages list them.
pub fn reward_kinds<B: Backend>() -> Vec<RewardKind<B>> {
    let kind =
        |name: &'static str, needs: &'static [Need], reads_prompts: bool, scorer: Scorer<B>| {
            RewardKind {
                name,
                needs,
                prompts: if reads_prompts {
                    Prompts::Needed
                } else {
                    Prompts::Ignored
                },
                tokenizer_in_weights: false,
                scorer,
            }
        };
    vec![
        kind(
            "brightness",
            &[],
            false,
            Scorer::Reward(|_, _, _| Ok(Box::new(crate::Brightness))),
        ),
        kind(
            "aesthetic",
            &[
                Need {
                    file: CLIP,
                    what: "the CLIP ViT-L/14 vision folder",
                },
                Need {
                    file: WEIGHTS,
                    what: "the aesthetic head .pth or .safetensors",
                },
            ],
            false,
            Scorer::Reward(|f, d, t| {
                clip_and_head(
                    |c: &Path, m: &Path, d, t| AestheticScorer::load(c, m, d, t),
                    f,
                    d,
                    t,
                )
            }),
        ),
        kind(
            "compressibility",
            &[
                Need {
                    file: CLIP,
                    what: "the CLIP vision folder of its head",
                },
                Need {
                    file: WEIGHTS,
                    what: "a head written by `alignprop fit-compressibility`",
                },
            ],
            false,
            Scorer::Reward(|f, d, t| {
                clip_and_head(
                    |c: &Path, m: &Path, d, t| CompressibilityScorer::load(c, m, d, t),
                    f,
                    d,
                    t,
                )
            }),
        ),
        kind("jpeg", &[], false, Scorer::JpegSize),
        kind(
            "hps",
            &[Need {
                file: WEIGHTS,
                what: "HPS_v2_compressed.pt / HPS_v2.1_compressed.pt or its safetensors conversion; the model \
                       config defaults to open_clip's ViT-H-14",
            }],
            true,
            Scorer::Reward(|f, d, t| with_tokenizer(HpsScorer::load, f, d, t)),
        ),
        RewardKind {
            tokenizer_in_weights: true,
            ..kind(
                "pickscore",
                &[Need {
                    file: WEIGHTS,
                    what: "the yuvalkirstain/PickScore_v1 folder: config.json and model.safetensors or \
                           pytorch_model.bin",
                }],
                true,
                Scorer::Reward(|f, d, t| with_tokenizer(PickScorer::load, f, d, t)),
            )
        },
        RewardKind {
            tokenizer_in_weights: true,
            ..kind(
                "concept",
                &[Need {
                    file: WEIGHTS,
                    what: "a transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14); the concept \
                           text is reward.concept / --concept",
                }],
                false,
                Scorer::Reward(|f, d, t| {
                    let concept = f.concept.filter(|c| !c.trim().is_empty()).ok_or_else(|| {
                        WeightError::Config {
                            path: PathBuf::new(),
                            msg: "reward 'concept' needs the concept's text (reward.concept = \"...\" in a \
                                  config, --concept for eval)"
                                .into(),
                        }
                    })?;
                    let tokenizer = find_tokenizer(f.tokenizers)?;
                    let reward = ConceptSimilarity::load(
                        f.require(WEIGHTS)?,
                        f.config,
                        &tokenizer,
                        concept,
                        d,
                        t,
                    )?;
                    Ok(Box::new(reward) as Box<dyn Reward<B>>)
                }),
            )
        },
        RewardKind {
            tokenizer_in_weights: true,
            prompts: Prompts::UnlessObject,
            ..kind(
                "count",
                &[Need {
                    file: WEIGHTS,
                    what: "an OWL-ViT folder (transformers OwlViTForObjectDetection, e.g. \
                           google/owlvit-base-patch32); the object is reward.object / --object or read from each \
                           prompt (\"three dogs\")",
                }],
                true,
                Scorer::Reward(|f, d, t| {
                    let tokenizer = find_tokenizer(f.tokenizers)?;
                    let reward = ObjectCount::load(
                        f.require(WEIGHTS)?,
                        f.config,
                        &tokenizer,
                        f.object,
                        f.count_threshold.unwrap_or(DEFAULT_THRESHOLD),
                        d,
                        t,
                    )?;
                    Ok(Box::new(reward) as Box<dyn Reward<B>>)
                }),
            )
        },
        kind(
            "tiny",
            &[Need {
                file: WEIGHTS,
                what: "the folder with tiny_reward.safetensors",
            }],
            false,
            Scorer::Reward(|f, d, t| Ok(Box::new(TinyReward::load(f.require(WEIGHTS)?, d, t)?))),
        ),
    ]
}

/// The kind named `name`.
pub fn reward_kind<B: Backend>(name: &str) -> Option<RewardKind<B>> {
    reward_kinds().into_iter().find(|k| k.name == name)
}

/// The kind named `name` that the trainer can use, or a message listing those:
/// `kind '{name}' is not available (expected one of: ..., or sum at the top level)`, saying so when the kind is
/// evaluation-only.
pub fn trainable_kind<B: Backend>(name: &str) -> std::result::Result<RewardKind<B>, String> {
    let eval_only = match reward_kind(name) {
        Some(kind) if kind.trainable() => return Ok(kind),
        Some(_) => " for training: it is not differentiable, `alignprop eval` only",
        None => "",
    };
    Err(format!(
        "kind '{name}' is not available{eval_only} (expected one of: {}, or {SUM_KIND} at the top level)",
        kind_names(true).join(", ")
    ))
}

/// A backend to read the registry's entries where none is at hand (their constructors are not called).
pub type AnyBackend = burn::backend::Flex;

/// The names of the kinds, in order; `trainable_only`: only those the trainer can use.
pub fn kind_names(trainable_only: bool) -> Vec<&'static str> {
    reward_kinds::<AnyBackend>()
        .into_iter()
        .filter(|k| k.trainable() || !trainable_only)
        .map(|k| k.name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names are unique; only `jpeg` is evaluation-only; the prompt rewards are HPSv2, PickScore and the object
    /// count (unless its object is given); PickScore, concept and count look for their tokenizer in their weights
    /// folder first; concept without its text is an error.
    #[test]
    fn kinds_are_unique_and_described() {
        let mut names = kind_names(false);
        assert_eq!(
            names,
            [
                "brightness",
                "aesthetic",
                "compressibility",
                "jpeg",
                "hps",
                "pickscore",
                "concept",
                "count",
                "tiny"
            ]
        );
        assert_eq!(
            kind_names(true),
            [
                "brightness",
                "aesthetic",
                "compressibility",
                "hps",
                "pickscore",
                "concept",
                "count",
                "tiny"
            ]
        );
        names.sort();
        names.dedup();
        assert_eq!(names.len(), reward_kinds::<AnyBackend>().len());
        assert!(!names.contains(&SUM_KIND));
        let prompts: Vec<_> = reward_kinds::<AnyBackend>()
            .into_iter()
            .filter(|k| k.reads_prompts(&RewardFiles::default()))
            .map(|k| k.name)
            .collect();
        assert_eq!(prompts, ["hps", "pickscore", "count"]);
        let count = reward_kind::<AnyBackend>("count").unwrap();
        let with_object = RewardFiles {
            object: Some("a photo of a dog"),
            ..Default::default()
        };
        assert!(count.tokenizer_in_weights && !count.reads_prompts(&with_object));
        let pick = reward_kind::<AnyBackend>("pickscore").unwrap();
        assert_eq!(
            pick.tokenizer_candidates(None, None, Some(Path::new("sd/tokenizer"))),
            [PathBuf::from("sd/tokenizer")]
        );
        let aesthetic = reward_kind::<AnyBackend>("aesthetic").unwrap();
        let msg = aesthetic.needs_message("--reward aesthetic", |f| f.config_key().to_string());
        assert!(
            msg.contains("clip_path (the CLIP ViT-L/14") && msg.contains("and path (the aesthetic")
        );
        let e = aesthetic
            .build(&RewardFiles::default(), &Default::default(), DType::F32)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("reward 'aesthetic' needs clip_path"), "{e}");
        let e = trainable_kind::<AnyBackend>("jpeg").err().unwrap();
        assert!(
            e.contains("not differentiable") && e.contains("tiny, or sum"),
            "{e}"
        );
        assert!(trainable_kind::<AnyBackend>("tiny").is_ok());
        let concept = reward_kind::<AnyBackend>("concept").unwrap();
        assert!(concept.tokenizer_in_weights && !concept.reads_prompts(&RewardFiles::default()));
        let files = RewardFiles {
            path: Some(Path::new("clip")),
            ..Default::default()
        };
        let e = concept
            .build(&files, &Default::default(), DType::F32)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("needs the concept's text"), "{e}");
    }
}
