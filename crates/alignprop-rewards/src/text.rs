//! Prompts to token ids for the rewards that compare an image with its prompt (HPSv2, PickScore), and loading the
//! CLIP BPE tokenizer they use (the SD1.5 tokenizer folder is the same BPE as open_clip's and OpenCLIP-H's).

use std::path::{Path, PathBuf};

use alignprop_diffusion::tokenizer::CLIPTokenizer;
use alignprop_io::weights::{Result, WeightError};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// Loads the tokenizer of a folder (`tokenizer.json`, or `vocab.json` + `merges.txt`; see
/// [`CLIPTokenizer::from_folder`]), as a weight error naming the folder.
pub fn load_tokenizer(dir: impl AsRef<Path>) -> Result<CLIPTokenizer> {
    let dir = dir.as_ref();
    CLIPTokenizer::from_folder(dir).map_err(|e| WeightError::Config {
        path: dir.to_path_buf(),
        msg: format!("cannot load the CLIP tokenizer: {e}"),
    })
}

/// Whether `dir` holds tokenizer files.
pub fn has_tokenizer(dir: impl AsRef<Path>) -> bool {
    let dir = dir.as_ref();
    dir.join("tokenizer.json").is_file()
        || (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file())
}

/// The first of `candidates` that holds tokenizer files, or an error listing them.
pub fn find_tokenizer(candidates: &[PathBuf]) -> Result<PathBuf> {
    candidates
        .iter()
        .find(|d| has_tokenizer(d))
        .cloned()
        .ok_or_else(|| WeightError::Config {
            path: candidates.first().cloned().unwrap_or_default(),
            msg: format!(
                "no CLIP tokenizer found (looked for tokenizer.json or vocab.json + merges.txt in: {})",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

/// Token ids of `prompts` as `[batch, length]`: start token, the prompt, end token, then `pad` up to `length`; a
/// longer sequence is cut to `length` with the end token last (open_clip's `tokenize`, and transformers'
/// `truncation=True, max_length=length`).
pub fn prompt_ids<B: Backend>(
    tokenizer: &CLIPTokenizer,
    prompts: &[String],
    length: usize,
    pad: u32,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let mut all = Vec::with_capacity(prompts.len() * length);
    for p in prompts {
        let mut ids = tokenizer
            .tokenize(p)
            .unwrap_or_else(|e| panic!("cannot tokenize the prompt {p:?}: {e}"));
        if ids.len() > length {
            ids.truncate(length - 1);
            ids.push(tokenizer.eos_id());
        }
        ids.resize(length, pad);
        all.extend(ids.into_iter().map(i64::from));
    }
    Tensor::from_data(TensorData::new(all, [prompts.len(), length]), device)
}

/// Panics with a clear message unless there is one prompt per image.
pub fn check_prompts(reward: &str, images: usize, prompts: &[String]) {
    assert!(
        prompts.len() == images,
        "{reward} compares each image with its prompt: {} prompt(s) given for {images} image(s) (use \
         score_with_prompts with one prompt per image)",
        prompts.len()
    );
}

/// The message of the panic of `Reward::score` for rewards that need prompts.
pub fn needs_prompts(reward: &str) -> String {
    format!(
        "{reward} compares each image with its prompt: call score_with_prompts (one prompt per image), not score"
    )
}
