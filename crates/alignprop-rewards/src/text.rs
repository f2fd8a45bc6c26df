//! Prompts to token ids for the rewards that compare an image with its prompt (HPSv2, PickScore), and loading the
//! CLIP BPE tokenizer they use (the SD1.5 tokenizer folder is the same BPE as open_clip's and OpenCLIP-H's).

use std::path::{Path, PathBuf};

use alignprop_diffusion::tokenizer::{CLIPTokenizer, TokenizerError};
use alignprop_io::weights::{Result, WeightError};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::RewardError;

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

/// The ids of `prompts`, `length` per prompt: start token, the prompt, end token, then `pad` up to `length`; a
/// longer sequence is cut to `length` with the end token last.
fn padded_ids(
    tokenizer: &CLIPTokenizer,
    prompts: &[String],
    length: usize,
    pad: u32,
) -> std::result::Result<Vec<u32>, TokenizerError> {
    let mut all = Vec::with_capacity(prompts.len() * length);
    for p in prompts {
        let mut ids = tokenizer.tokenize(p)?;
        if ids.len() > length {
            ids.truncate(length.saturating_sub(1));
            ids.push(tokenizer.eos_id());
        }
        ids.resize(length, pad);
        all.extend(ids);
    }
    Ok(all)
}

fn ids_tensor<B: Backend>(
    ids: Vec<u32>,
    prompts: usize,
    length: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
    Tensor::from_data(TensorData::new(ids, [prompts, length]), device)
}

/// Token ids of `prompts` as `[batch, length]`: start token, the prompt, end token, then `pad` up to `length`; a
/// longer sequence is cut to `length` with the end token last (open_clip's `tokenize`, and transformers'
/// `truncation=True, max_length=length`). Fails with the tokenizer's error (naming the prompt) when a prompt cannot
/// be encoded.
pub fn prompt_ids<B: Backend>(
    tokenizer: &CLIPTokenizer,
    prompts: &[String],
    length: usize,
    pad: u32,
    device: &B::Device,
) -> std::result::Result<Tensor<B, 2, Int>, TokenizerError> {
    let ids = padded_ids(tokenizer, prompts, length, pad)?;
    Ok(ids_tensor(ids, prompts.len(), length, device))
}

/// [`prompt_ids`] for the text model of `reward` whose token embedding has `vocab` rows: a tokenizer failure, or an
/// id the embedding does not have (a tokenizer that is not the model's), is a [`RewardError::Tokenizer`].
pub fn reward_prompt_ids<B: Backend>(
    reward: &str,
    tokenizer: &CLIPTokenizer,
    prompts: &[String],
    length: usize,
    pad: u32,
    vocab: usize,
    device: &B::Device,
) -> std::result::Result<Tensor<B, 2, Int>, RewardError> {
    let error = |message: String| RewardError::Tokenizer {
        reward: reward.into(),
        message,
    };
    let ids = padded_ids(tokenizer, prompts, length, pad).map_err(|e| {
        error(format!(
            "{e} (check the tokenizer folder: the reward needs a plain CLIP BPE tokenizer)"
        ))
    })?;
    if let Some((i, id)) = ids
        .iter()
        .enumerate()
        .find(|&(_, &id)| id as usize >= vocab)
    {
        return Err(error(format!(
            "prompt {:?} gives token id {id}, but the text model has {vocab} tokens: use this model's tokenizer",
            prompts[i / length.max(1)]
        )));
    }
    Ok(ids_tensor(ids, prompts.len(), length, device))
}

/// One prompt per image, else [`RewardError::MissingPrompts`] naming `reward`.
pub fn check_prompts(
    reward: &str,
    images: usize,
    prompts: &[String],
) -> std::result::Result<(), RewardError> {
    if prompts.len() == images {
        Ok(())
    } else {
        Err(RewardError::MissingPrompts {
            reward: reward.into(),
            images,
            prompts: prompts.len(),
        })
    }
}
