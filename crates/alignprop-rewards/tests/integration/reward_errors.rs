//! Input a reward cannot score is a [`RewardError`] naming the reward, what it expected and what it found, never a
//! panic: HPSv2 and PickScore (the tiny fixture models, `tests/fixtures/tiny-prompt-reward`) without prompts or with
//! a prompt count that is not the batch's, prompts their tokenizer cannot encode (a `tokenizer.json` whose
//! truncation settings fail on long prompts) or encodes to ids the text model does not have, images that are not
//! `[batch, 3, H, W]`, non-square images for the aesthetic scorer, and a weighted sum holding a prompt reward.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use alignprop_rewards::aesthetic::AestheticScorer;
use alignprop_rewards::compose::{WeightedSum, WeightedTerm};
use alignprop_rewards::hps::HpsScorer;
use alignprop_rewards::pickscore::PickScorer;
use alignprop_rewards::{Brightness, Reward, RewardError};
use alignprop_testing::prompt_reward::{PromptRewardModels, write_prompt_reward_models};
use burn::tensor::{DType, Tensor};

type I = burn::backend::Flex;

/// A fresh temporary folder (removed when dropped).
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "alignprop-reward-errors-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// The fixture models as standard files.
fn models(s: &Scratch) -> PromptRewardModels {
    write_prompt_reward_models(&s.0.join("models")).unwrap()
}

fn hps(m: &PromptRewardModels, tokenizer: &Path) -> HpsScorer<I> {
    HpsScorer::load(
        &m.hps_weights,
        Some(&m.hps_config),
        tokenizer,
        &Default::default(),
        DType::F32,
    )
    .unwrap()
}

fn pickscore(m: &PromptRewardModels, tokenizer: &Path) -> PickScorer<I> {
    PickScorer::load(
        &m.pickscore,
        None,
        tokenizer,
        &Default::default(),
        DType::F32,
    )
    .unwrap()
}

fn images(shape: [usize; 4]) -> Tensor<I, 4> {
    Tensor::zeros(shape, &Default::default())
}

fn prompts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("a photo of cat number {i}"))
        .collect()
}

/// A prompt long enough to need truncation (more than 75 tokens).
fn long_prompt() -> String {
    "a very detailed painting of a red fox in a snowy forest at dawn, ".repeat(8)
}

/// Both prompt rewards, loaded with the tokenizer folder `tokenizer`.
fn prompt_rewards(m: &PromptRewardModels, tokenizer: &Path) -> Vec<Box<dyn Reward<I>>> {
    vec![
        Box::new(hps(m, tokenizer)),
        Box::new(pickscore(m, tokenizer)),
    ]
}

fn missing(reward: &str, images: usize, prompts: usize) -> RewardError {
    RewardError::MissingPrompts {
        reward: reward.into(),
        images,
        prompts,
    }
}

/// `score` (no prompts), `score_and_loss` without prompts and `score_with_prompts` with a prompt count other than
/// the batch's are [`RewardError::MissingPrompts`] with a one-line message saying what to call; one prompt per image
/// scores.
#[test]
fn prompt_rewards_without_one_prompt_per_image_are_errors() {
    let s = Scratch::new("prompts");
    let m = models(&s);
    for r in prompt_rewards(&m, &m.tokenizer) {
        let name = r.name();
        let e = r.score(images([4, 3, 16, 16])).err();
        assert_eq!(e, Some(missing(&name, 4, 0)));
        let msg = e.unwrap().to_string();
        assert_eq!(
            msg,
            format!(
                "{name}: needs one prompt per image (4 images, 0 prompts): call score_with_prompts with one \
                 prompt per image"
            )
        );
        assert_eq!(
            r.score_and_loss(images([2, 3, 16, 16]), &[]).err(),
            Some(missing(&name, 2, 0))
        );
        assert_eq!(
            r.score_with_prompts(images([2, 3, 16, 16]), &prompts(1))
                .err(),
            Some(missing(&name, 2, 1))
        );
        assert_eq!(
            r.score_with_prompts(images([1, 3, 16, 16]), &prompts(3))
                .err(),
            Some(missing(&name, 1, 3))
        );
        let ok = r.score_with_prompts(images([2, 3, 16, 16]), &prompts(2));
        assert_eq!(ok.unwrap().dims(), [2], "{name}");
    }
}

/// Images that are not `[batch, 3, H, W]` with a non-empty batch are [`RewardError::Input`] naming the reward and
/// the shape found, for the prompt rewards and for the others; the aesthetic scorer (no crop) refuses non-square
/// images, which its CLIP tower cannot take.
#[test]
fn images_a_reward_cannot_take_are_input_errors() {
    let s = Scratch::new("images");
    let m = models(&s);
    let mut rewards = prompt_rewards(&m, &m.tokenizer);
    rewards.push(Box::new(Brightness));
    for r in &rewards {
        let name = r.name();
        for shape in [[1, 4, 16, 16], [1, 1, 16, 16], [0, 3, 16, 16]] {
            let e = r
                .score_with_prompts(images(shape), &prompts(shape[0]))
                .err();
            let Some(RewardError::Input { reward, message }) = &e else {
                panic!("{name} {shape:?}: {e:?}");
            };
            assert_eq!(reward, &name);
            let msg = e.as_ref().unwrap().to_string();
            assert!(
                msg.starts_with(&format!("{name}: expected RGB images [batch, 3, H, W]"))
                    && message.contains(&format!("{shape:?}"))
                    && !msg.contains('\n'),
                "{msg}"
            );
        }
    }
    let dir = alignprop_testing::tiny_reward();
    let aesthetic = AestheticScorer::<I>::load(
        &dir.join("clip_vision"),
        &dir.join("aesthetic/mlp.safetensors"),
        &Default::default(),
        DType::F32,
    )
    .unwrap();
    let e = Reward::score(&aesthetic, images([1, 3, 16, 24]))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("aesthetic: expected square images, found 16x24") && e.contains("crop"),
        "{e}"
    );
    assert!(Reward::score(&aesthetic, images([2, 3, 24, 24])).is_ok());
}

/// Copies the fixture's CLIP `tokenizer.json` into `dir` with `edit` applied to its JSON.
fn edited_tokenizer(src: &Path, dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    edit(&mut json);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    dir.to_path_buf()
}

/// A tokenizer that fails on long prompts (a `tokenizer.json` asking to truncate only a second sequence) is a
/// [`RewardError::Tokenizer`] naming the reward and the prompt, not a panic; short prompts still score.
#[test]
fn a_prompt_the_tokenizer_cannot_encode_is_a_tokenizer_error() {
    let s = Scratch::new("tokenize");
    let m = models(&s);
    let tok = edited_tokenizer(&m.tokenizer, &s.0.join("tokenizer"), |j| {
        j["truncation"] = serde_json::json!({
            "direction": "Right", "max_length": 16, "strategy": "OnlySecond", "stride": 0
        });
    });
    for r in prompt_rewards(&m, &tok) {
        let name = r.name();
        let p = vec!["a cat".to_string(), long_prompt()];
        let e = r.score_with_prompts(images([2, 3, 16, 16]), &p).err();
        let Some(RewardError::Tokenizer { reward, message }) = &e else {
            panic!("{name}: {e:?}");
        };
        assert_eq!(reward, &name);
        let msg = e.as_ref().unwrap().to_string();
        assert!(
            msg.starts_with(&format!(
                "{name}: cannot tokenize the prompts: cannot tokenize"
            )) && message.contains("a very detailed painting")
                && !msg.contains('\n'),
            "{msg}"
        );
        let short = ["a cat".to_string(), "a dog".to_string()];
        assert!(
            r.score_with_prompts(images([2, 3, 16, 16]), &short).is_ok(),
            "{name}"
        );
    }
}

/// A tokenizer that is not the model's (ids beyond its 49408-row token embedding, which would index out of bounds)
/// is a [`RewardError::Tokenizer`] naming the id and the model's vocabulary size.
#[test]
fn token_ids_outside_the_text_model_vocabulary_are_tokenizer_errors() {
    let s = Scratch::new("vocab");
    let m = models(&s);
    let tok = edited_tokenizer(&m.tokenizer, &s.0.join("tokenizer"), |j| {
        // Shift every ordinary token's id past the model's vocabulary.
        let vocab = j["model"]["vocab"].as_object_mut().unwrap();
        for (k, v) in vocab.iter_mut() {
            if !k.starts_with("<|") {
                *v = serde_json::json!(v.as_u64().unwrap() + 100_000);
            }
        }
    });
    for r in prompt_rewards(&m, &tok) {
        let name = r.name();
        let e = r
            .score_with_prompts(images([1, 3, 16, 16]), &["a cat".to_string()])
            .err();
        let Some(RewardError::Tokenizer { reward, .. }) = &e else {
            panic!("{name}: {e:?}");
        };
        assert_eq!(reward, &name);
        let msg = e.as_ref().unwrap().to_string();
        assert!(
            msg.contains("\"a cat\"")
                && msg.contains("the text model has 49408 tokens")
                && msg.contains("use this model's tokenizer"),
            "{msg}"
        );
    }
}

/// A weighted sum passes its terms' errors on: a prompt reward in it needs the prompts too.
#[test]
fn a_weighted_sum_passes_its_terms_errors_on() {
    let s = Scratch::new("sum");
    let m = models(&s);
    let sum = WeightedSum::<I>::new(vec![
        WeightedTerm {
            weight: 1.0,
            reward: Box::new(Brightness),
        },
        WeightedTerm {
            weight: 0.5,
            reward: Box::new(hps(&m, &m.tokenizer)),
        },
    ]);
    assert_eq!(
        sum.score(images([3, 3, 16, 16])).err(),
        Some(missing("hps", 3, 0))
    );
    assert!(
        sum.score_and_loss(images([3, 3, 16, 16]), &prompts(3))
            .is_ok()
    );
    let empty = WeightedSum::<I> { terms: vec![] };
    let e = empty
        .score_and_loss(images([1, 3, 16, 16]), &[])
        .unwrap_err();
    assert!(
        matches!(&e, RewardError::Input { reward, .. } if reward == "sum"),
        "{e}"
    );
}
