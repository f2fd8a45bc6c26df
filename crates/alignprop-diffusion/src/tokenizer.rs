//! The CLIP BPE tokenizer, giving exactly the ids diffusers feeds SD1.5's text encoder.
//!
//! A model folder's `tokenizer/` holds either a Hugging Face fast-tokenizer file (`tokenizer.json`) or the files of
//! transformers' slow `CLIPTokenizer` (`vocab.json` + `merges.txt`, what SD1.5 ships). Both become the same
//! [`tokenizers`] pipeline:
//!
//! 1. normalizer: Unicode NFC, every run of whitespace replaced by one space, lower case;
//! 2. pre-tokenizer: CLIP's split regex (special tokens, contractions, letter runs, single digits, runs of other
//!    non-space characters; whitespace dropped), then GPT-2's byte-to-unicode mapping (`ByteLevel`);
//! 3. model: BPE whose word-final symbols carry the `</w>` suffix, unknown token `<|endoftext|>`;
//! 4. post-processor: `<|startoftext|>` (49406) before and `<|endoftext|>` (49407) after the prompt.
//!
//! [`CLIPTokenizer::encode`] then truncates to `bos + 75 tokens + eos` and pads to 77 with the pad id
//! (`<|endoftext|>` = 49407 for SD1.5, `!` = 0 for SD2), as `tokenizer(prompt, padding="max_length", max_length=77,
//! truncation=True)` in diffusers' `StableDiffusionPipeline.encode_prompt`.
//!
//! A pad token other than `<|startoftext|>` / `<|endoftext|>` (SD2's `!`) is a special token for transformers, so
//! the same text inside a prompt also becomes that one token: `"bamboo!"` is `bamboo</w>` then id 0, where CLIP's own
//! BPE would give `!</w>` (256). [`CLIPTokenizer::from_folder`] does the same, so the ids are transformers'.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// The start-of-text token.
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// The end-of-text token (also SD1.5's padding and the BPE unknown token).
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Context length of SD's text encoder: `bos + 75 tokens + eos`.
pub const MAX_LENGTH: usize = 77;
/// CLIP's pre-tokenization regex (OpenAI `simple_tokenizer`, with `\p{L}` / `\p{N}` classes as in HF's
/// `tokenizer.json`).
pub const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// SD1.5's CLIP BPE tokenizer files (the vocabulary of OpenAI CLIP ViT-L/14, which every SD1.x checkpoint uses),
/// bundled with this crate (`assets/sd15-tokenizer/`): `(file name, bytes)`. [`CLIPTokenizer::sd15`] is built from
/// them; [`crate::convert`] writes them into converted folders. They are the `stable-diffusion-v1-5/tokenizer`
/// files, checked against transformers' `CLIPTokenizer` by the tokenizer tests.
pub const SD15_TOKENIZER_FILES: [(&str, &[u8]); 5] = [
    (
        "vocab.json",
        include_bytes!("../assets/sd15-tokenizer/vocab.json"),
    ),
    (
        "merges.txt",
        include_bytes!("../assets/sd15-tokenizer/merges.txt"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../assets/sd15-tokenizer/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../assets/sd15-tokenizer/tokenizer_config.json"),
    ),
    (
        "special_tokens_map.json",
        include_bytes!("../assets/sd15-tokenizer/special_tokens_map.json"),
    ),
];

/// The bytes of the bundled SD1.5 tokenizer file `name` (see [`SD15_TOKENIZER_FILES`]).
fn sd15_file(name: &str) -> &'static [u8] {
    SD15_TOKENIZER_FILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| *bytes)
        .expect("a bundled SD1.5 tokenizer file")
}

/// Merges OpenAI's CLIP vocabulary uses: `49152 - 256 - 2` (transformers' slow `CLIPTokenizer` reads no more).
const CLIP_NUM_MERGES: usize = 49152 - 256 - 2;

/// Tokenizer errors; loading errors name the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Load { path: PathBuf, msg: String },
    #[error("{path}: no tokenizer found (expected tokenizer.json, or vocab.json and merges.txt)")]
    NotFound { path: PathBuf },
    #[error("cannot tokenize {prompt:?}: {msg}")]
    Encode { prompt: String, msg: String },
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// CLIP's BPE tokenizer with SD's fixed-length padding.
#[derive(Clone)]
pub struct CLIPTokenizer {
    inner: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl std::fmt::Debug for CLIPTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CLIPTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

fn load_err(path: &Path, msg: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Load {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl CLIPTokenizer {
    /// Loads a Hugging Face fast-tokenizer file (`tokenizer/tokenizer.json`). Padding is `<|endoftext|>`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json = read_text(path)?;
        let inner: Tokenizer = json
            .parse()
            .map_err(|e| load_err(path, format!("invalid tokenizer.json: {e}")))?;
        Self::with_tokenizer(inner, path)
    }

    /// Builds the tokenizer from transformers' slow-tokenizer files: `vocab.json` (token -> id) and `merges.txt`
    /// (`#version` header, then one `left right` merge per line, highest priority first).
    pub fn from_vocab_merges(vocab: impl AsRef<Path>, merges: impl AsRef<Path>) -> Result<Self> {
        let (vocab_path, merges_path) = (vocab.as_ref(), merges.as_ref());
        Self::from_vocab_merges_text(
            &read_text(vocab_path)?,
            &read_text(merges_path)?,
            vocab_path,
            merges_path,
        )
    }

    /// [`Self::from_vocab_merges`] from the files' contents (UTF-8 bytes of a `vocab.json` and a `merges.txt`)
    /// instead of their paths; errors name them `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges_bytes(vocab: &[u8], merges: &[u8]) -> Result<Self> {
        fn text<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a str> {
            std::str::from_utf8(bytes).map_err(|e| load_err(path, format!("not UTF-8: {e}")))
        }
        let (vocab_path, merges_path) = (Path::new("vocab.json"), Path::new("merges.txt"));
        Self::from_vocab_merges_text(
            text(vocab, vocab_path)?,
            text(merges, merges_path)?,
            vocab_path,
            merges_path,
        )
    }

    /// SD1.5's tokenizer (OpenAI CLIP ViT-L/14's vocabulary, `<|endoftext|>` padding), from the files bundled with
    /// this crate ([`SD15_TOKENIZER_FILES`]): for model folders without a `tokenizer/` directory.
    pub fn sd15() -> Self {
        Self::from_vocab_merges_bytes(sd15_file("vocab.json"), sd15_file("merges.txt"))
            .expect("the bundled SD1.5 tokenizer files are valid")
    }

    /// The slow-tokenizer pipeline from the text of `vocab.json` and `merges.txt`; the paths name them in errors.
    fn from_vocab_merges_text(
        vocab: &str,
        merges: &str,
        vocab_path: &Path,
        merges_path: &Path,
    ) -> Result<Self> {
        let vocab: HashMap<String, u32> = serde_json::from_str(vocab).map_err(|e| {
            load_err(
                vocab_path,
                format!("invalid vocabulary (expected {{token: id}}): {e}"),
            )
        })?;
        let merges = parse_merges(merges).map_err(|msg| load_err(merges_path, msg))?;
        for token in [BOS_TOKEN, EOS_TOKEN] {
            if !vocab.contains_key(token) {
                return Err(load_err(
                    vocab_path,
                    format!("special token {token} missing"),
                ));
            }
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .unk_token(EOS_TOKEN.into())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| {
                load_err(
                    merges_path,
                    format!("merges do not fit {}: {e}", vocab_path.display()),
                )
            })?;
        let pipeline_err = |e| load_err(vocab_path, format!("cannot build the CLIP pipeline: {e}"));

        let mut inner = Tokenizer::new(bpe);
        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
                .map_err(pipeline_err)?
                .into(),
            Lowercase.into(),
        ]);
        inner
            .with_normalizer(Some(normalizer))
            .map_err(pipeline_err)?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(pipeline_err)?;
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        let bos_id = token_id(&inner, BOS_TOKEN, vocab_path)?;
        let eos_id = token_id(&inner, EOS_TOKEN, vocab_path)?;
        inner.with_post_processor(Some(
            RobertaProcessing::new((EOS_TOKEN.into(), eos_id), (BOS_TOKEN.into(), bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        inner
            .add_special_tokens([
                AddedToken::from(BOS_TOKEN, true),
                AddedToken::from(EOS_TOKEN, true),
            ])
            .map_err(pipeline_err)?;
        Self::with_tokenizer(inner, vocab_path)
    }

    /// Loads a model folder's `tokenizer/` directory: `tokenizer.json` if present, else `vocab.json` +
    /// `merges.txt`. The pad token (SD2 pads with `!`) is the `pad_token` of `special_tokens_map.json`, else of
    /// `tokenizer_config.json` (transformers' precedence: the special-tokens map overrides the config), else
    /// `<|endoftext|>`; see [`Self::with_pad_token`].
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let fast = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let mut tok = if fast.is_file() {
            Self::from_file(&fast)?
        } else if vocab.is_file() && merges.is_file() {
            Self::from_vocab_merges(&vocab, &merges)?
        } else {
            return Err(TokenizerError::NotFound {
                path: dir.to_path_buf(),
            });
        };
        if let Some((pad, file)) = folder_pad_token(dir)? {
            tok = tok.with_pad_token(&pad, &file)?;
        }
        Ok(tok)
    }

    /// This tokenizer padding with `token` (which must be in the vocabulary; `path` names the file that asked for
    /// it in errors). A pad token other than bos / eos becomes a special token, as in transformers: its text inside
    /// a prompt is then that single token too (SD2's `!`: `"bamboo!"` ends in id 0, not `!</w>`).
    pub fn with_pad_token(mut self, token: &str, path: &Path) -> Result<Self> {
        let id = token_id(&self.inner, token, path)?;
        if id != self.bos_id && id != self.eos_id {
            self.inner
                .add_special_tokens([AddedToken::from(token.to_string(), true)])
                .map_err(|e| load_err(path, format!("cannot add the pad token {token:?}: {e}")))?;
        }
        self.pad_id = id;
        Ok(self)
    }

    fn with_tokenizer(inner: Tokenizer, path: &Path) -> Result<Self> {
        let bos_id = token_id(&inner, BOS_TOKEN, path)?;
        let eos_id = token_id(&inner, EOS_TOKEN, path)?;
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            pad_id: eos_id,
            max_length: MAX_LENGTH,
        })
    }

    /// The ids of `prompt` with `bos` and `eos`, neither truncated nor padded.
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(prompt, true)
            .map_err(|e| TokenizerError::Encode {
                prompt: prompt.to_string(),
                msg: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The `max_length` (77) ids SD's text encoder takes: `bos`, at most 75 prompt tokens, `eos`, then padding.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenize(prompt)?;
        if ids.len() > self.max_length {
            ids.truncate(self.max_length - 1);
            ids.push(self.eos_id);
        }
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// [`encode`](Self::encode) for each prompt.
    pub fn encode_batch<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Vec<Vec<u32>>> {
        prompts.iter().map(|p| self.encode(p.as_ref())).collect()
    }

    /// The padded ids of `prompts` as a `[batch, max_length]` integer tensor on `device`.
    pub fn input_ids<B: Backend, S: AsRef<str>>(
        &self,
        prompts: &[S],
        device: &B::Device,
    ) -> Result<Tensor<B, 2, Int>> {
        let ids: Vec<i64> = self
            .encode_batch(prompts)?
            .into_iter()
            .flatten()
            .map(i64::from)
            .collect();
        Ok(Tensor::from_data(
            TensorData::new(ids, [prompts.len(), self.max_length]),
            device,
        ))
    }

    /// Text of `ids` without special tokens (word ends become spaces), for inspection.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Encode {
                prompt: format!("{ids:?}"),
                msg: e.to_string(),
            })?;
        Ok(text.replace("</w>", " ").trim_end().to_string())
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Length of every [`encode`](Self::encode)d sequence (77).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Number of tokens including the special ones (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying [`tokenizers::Tokenizer`].
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

fn token_id(tok: &Tokenizer, token: &str, path: &Path) -> Result<u32> {
    tok.token_to_id(token)
        .ok_or_else(|| load_err(path, format!("token {token} is not in the vocabulary")))
}

/// Merge pairs of a `merges.txt`: lines after an optional `#version` header, blank lines skipped, at most
/// [`CLIP_NUM_MERGES`] (as transformers' `CLIPTokenizer`).
fn parse_merges(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    text.lines()
        .enumerate()
        .filter(|(i, line)| {
            let header = *i == 0 && line.starts_with("#version");
            !header && !line.trim().is_empty()
        })
        .take(CLIP_NUM_MERGES)
        .map(|(i, line)| match line.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                Ok((a.to_string(), b.to_string()))
            }
            _ => Err(format!(
                "line {}: expected two symbols separated by a space, found {line:?}",
                i + 1
            )),
        })
        .collect()
}

/// The pad token a tokenizer folder declares, with the file that declares it: `special_tokens_map.json` first, then
/// `tokenizer_config.json` (transformers loads the config, then lets the special-tokens map override it).
fn folder_pad_token(dir: &Path) -> Result<Option<(String, PathBuf)>> {
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let file = dir.join(name);
        if file.is_file()
            && let Some(pad) = pad_token(&file)?
        {
            return Ok(Some((pad, file)));
        }
    }
    Ok(None)
}

/// `pad_token` of a `tokenizer_config.json` or `special_tokens_map.json` (a string or `{"content": ...}`), if any.
fn pad_token(config: &Path) -> Result<Option<String>> {
    let value: serde_json::Value = serde_json::from_str(&read_text(config)?)
        .map_err(|e| load_err(config, format!("invalid JSON: {e}")))?;
    Ok(match value.get("pad_token") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    })
}
