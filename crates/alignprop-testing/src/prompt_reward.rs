//! The tiny HPSv2 / PickScore fixture models (`tests/fixtures/tiny-prompt-reward`, made by
//! `xtask/fixtures/make_prompt_reward_refs.py`) and the tiny OWL-ViT detector of the object count
//! (`tests/fixtures/tiny-count`, made by `xtask/fixtures/make_count_refs.py`) as loadable files, for the tests of
//! this and the other crates.
//!
//! The fixture stores each 49408-row token embedding compactly (`<prefix>token_embedding.rows` `[n, width]` and
//! `.ids` `[n]`, every other row being zero) to stay small; [`write_prompt_reward_models`] writes the models in their
//! standard layouts (`<prefix>token_embedding.weight` `[49408, width]`), as open_clip and transformers save them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alignprop_io::weights::{
    Result, SafetensorsSource, TensorSource, WeightError, write_safetensors,
};
use burn::tensor::TensorData;

/// `tests/fixtures/tiny-prompt-reward`.
pub fn tiny_prompt_reward() -> PathBuf {
    crate::fixtures_root().join("tiny-prompt-reward")
}

/// The files [`write_prompt_reward_models`] wrote.
#[derive(Clone, Debug)]
pub struct PromptRewardModels {
    /// The open_clip state dict (HPSv2 layout), safetensors.
    pub hps_weights: PathBuf,
    /// Its open_clip model config json.
    pub hps_config: PathBuf,
    /// A transformers `CLIPModel` folder (`config.json`, `model.safetensors`).
    pub pickscore: PathBuf,
    /// A CLIP tokenizer folder (the tiny SD fixture's, the real CLIP BPE).
    pub tokenizer: PathBuf,
}

/// Rewrites `file` with every compact `<stem>token_embedding.rows` / `.ids` pair expanded to
/// `<stem>token_embedding.weight` `[vocab, width]`.
fn expand(file: &Path, out: &Path, vocab: usize) -> Result<()> {
    let src = SafetensorsSource::open(&[file])?;
    let mut tensors = Vec::new();
    for key in src.keys() {
        if key.ends_with("token_embedding.ids") {
            continue;
        }
        let raw = src.find(&key)?.expect("listed key");
        let Some(stem) = key.strip_suffix("token_embedding.rows") else {
            tensors.push((key, raw.data));
            continue;
        };
        let ids_key = format!("{stem}token_embedding.ids");
        let ids = src.find(&ids_key)?.ok_or_else(|| WeightError::Missing {
            key: ids_key,
            files: file.display().to_string(),
            hint: String::new(),
        })?;
        let w = raw.shape[1];
        let rows: Vec<f32> = raw.data.convert::<f32>().to_vec().expect("f32 rows");
        let ids: Vec<i64> = ids.data.convert::<i64>().to_vec().expect("i64 ids");
        let mut full = vec![0f32; vocab * w];
        for (j, &id) in ids.iter().enumerate() {
            let id = id as usize;
            full[id * w..(id + 1) * w].copy_from_slice(&rows[j * w..(j + 1) * w]);
        }
        tensors.push((
            format!("{stem}token_embedding.weight"),
            TensorData::new(full, [vocab, w]),
        ));
    }
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(out, &tensors, &meta)
}

/// Writes the tiny HPSv2 (open_clip) and PickScore (transformers) models with full token embeddings under `out`.
pub fn write_prompt_reward_models(out: &Path) -> Result<PromptRewardModels> {
    let dir = tiny_prompt_reward();
    let io = |path: &Path, source| WeightError::Io {
        path: path.to_path_buf(),
        source,
    };
    let vocab = 49408;
    let hps_weights = out.join("hps.safetensors");
    expand(&dir.join("hps/model.safetensors"), &hps_weights, vocab)?;
    let hps_config = out.join("open_clip_config.json");
    std::fs::copy(dir.join("hps/open_clip_config.json"), &hps_config)
        .map_err(|e| io(&hps_config, e))?;
    let pickscore = out.join("pickscore");
    expand(
        &dir.join("pickscore/model.safetensors"),
        &pickscore.join("model.safetensors"),
        vocab,
    )?;
    std::fs::copy(
        dir.join("pickscore/config.json"),
        pickscore.join("config.json"),
    )
    .map_err(|e| io(&pickscore, e))?;
    Ok(PromptRewardModels {
        hps_weights,
        hps_config,
        pickscore,
        tokenizer: crate::tiny_sd().join("tokenizer"),
    })
}

/// `tests/fixtures/tiny-count`.
pub fn tiny_count() -> PathBuf {
    crate::fixtures_root().join("tiny-count")
}

/// Writes the tiny OWL-ViT detector as a complete `OwlViTForObjectDetection` folder at `out` (created): its
/// `config.json`, `model.safetensors` with the full token embedding, and a tokenizer (the tiny SD fixture's CLIP BPE
/// with the fixture's `tokenizer_config.json`: padding with "!", 16 tokens, as OWL-ViT's). Returns `out`.
pub fn write_count_model(out: &Path) -> Result<PathBuf> {
    let dir = tiny_count().join("owlvit");
    let io = |path: &Path, source| WeightError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    expand(
        &dir.join("model.safetensors"),
        &out.join("model.safetensors"),
        49408,
    )?;
    let bpe = crate::tiny_sd().join("tokenizer");
    for (from, name) in [
        (dir.join("config.json"), "config.json"),
        (dir.join("tokenizer_config.json"), "tokenizer_config.json"),
        (bpe.join("tokenizer.json"), "tokenizer.json"),
        (bpe.join("vocab.json"), "vocab.json"),
        (bpe.join("merges.txt"), "merges.txt"),
    ] {
        std::fs::copy(&from, out.join(name)).map_err(|e| io(&from, e))?;
    }
    Ok(out.to_path_buf())
}
