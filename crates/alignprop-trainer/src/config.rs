//! The training configuration, read from TOML (`configs/*.toml`). Unknown keys are errors that name the key.

use std::path::{Path, PathBuf};

use alignprop_rewards::registry::{AnyBackend, RewardFiles, SUM_KIND, reward_kind, trainable_kind};
use serde::{Deserialize, Serialize};

use crate::lora_params::AdamWConfig;
use crate::truncation::Truncation;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelConfig,
    pub reward: RewardConfig,
    pub sampling: SamplingConfig,
    /// Which reward-gradient method (AlignProp, DRaFT-K, DRaFT-LV, ReFL).
    pub method: crate::method::MethodConfig,
    pub truncation: Truncation,
    pub lora: alignprop_lora::LoraConfig,
    pub optimizer: AdamWConfig,
    pub train: LoopConfig,
    pub eval: EvalConfig,
    pub output: OutputConfig,
    /// A moving average of the adapters for eval and export (off by default).
    pub ema: crate::ema::EmaConfig,
}

/// Which Stable Diffusion to fine-tune.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A diffusers folder. `None`: the tiny built-in demo model (the repository's test fixture).
    pub path: Option<PathBuf>,
    /// `f32` (CPU, GPU) or `bf16` (frozen networks in bfloat16; LoRA, optimiser and the latent gradient in f32).
    /// `f16` is refused for training (no loss scaling: float16 gradients underflow); `f64` for tests.
    pub dtype: String,
    /// CPU, `dtype = "f32"`: the linear layers' forward and input-gradient products in bf16 with f32 sums
    /// (`alignprop_kernels::flex_bf16`, about twice the multiply-adds per cycle; needs AVX512_BF16: AMD Zen 4+,
    /// Intel Cooper Lake / Sapphire Rapids+). The LoRA weight gradients, convolutions and attention stay f32. No
    /// effect on GPU backends. Off by default.
    pub bf16_products: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: None,
            dtype: "f32".into(),
            bf16_products: false,
        }
    }
}

/// The reward and the loss built from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    /// `brightness` (mean image brightness, for demos), `aesthetic` (LAION aesthetic predictor: needs
    /// `clip_path` and `path`), `compressibility` (the JPEG-size surrogate: `clip_path` and `path`), `hps` (HPSv2:
    /// `path`, optional `config` and `tokenizer`; loss `1 - score`), `pickscore` (PickScore: `path`, optional
    /// `tokenizer`; loss `-score`), `concept` (CLIP similarity to `concept`: `path`; loss `+similarity`), `count`
    /// (object count from OWL-ViT: `path`, optional `object`; loss `|count - target|` with the target from
    /// `target` or the prompt), `tiny` (the fixtures' tiny scorer, needs `path`), or `sum`: a weighted sum of the
    /// rewards listed as `[[reward.terms]]`.
    pub kind: String,
    /// Weights: the aesthetic head (`.pth` as LAION publishes it, or `.safetensors`), the HPSv2 checkpoint
    /// (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt` or a safetensors conversion), the PickScore folder
    /// (transformers `CLIPModel`: `config.json` + `model.safetensors` or `pytorch_model.bin`), the OWL-ViT folder
    /// (`count`: transformers `OwlViTForObjectDetection`), or the `tiny` folder.
    pub path: Option<PathBuf>,
    /// `aesthetic`: a transformers `CLIPVisionModelWithProjection` folder (OpenAI CLIP ViT-L/14).
    pub clip_path: Option<PathBuf>,
    /// `hps`: the open_clip model config json (default: the built-in ViT-H-14); `pickscore`: the `CLIPModel`
    /// `config.json` when `path` is a weights file (default: `config.json` next to the weights).
    pub config: Option<PathBuf>,
    /// `hps`, `pickscore`: a CLIP tokenizer folder (`tokenizer.json` or `vocab.json` + `merges.txt`). Default: the
    /// PickScore folder when it holds one, else the `tokenizer/` folder of `model.path` (SD1.5's is the same BPE).
    pub tokenizer: Option<PathBuf>,
    /// `concept`: the text of the concept to move away from (e.g. "a photo of a dog"); the reward is the CLIP
    /// similarity of each image to it (`path`: a transformers `CLIPModel` folder), the loss `+similarity`.
    pub concept: Option<String>,
    /// `count`: the object to count in every image, as a detector query (e.g. "a photo of a dog"); unset: read from
    /// each prompt ("three dogs": object "dog", target 3). `path`: an OWL-ViT folder.
    pub object: Option<String>,
    /// The loss is `loss_coeff * mean(per-image loss)`; AlignProp uses 0.01 for the aesthetic reward.
    pub loss_coeff: f64,
    /// For `|score - target|` losses (aesthetic: 10); `None` uses the reward's own loss (`-score` for most,
    /// `1 - score` for HPSv2).
    pub target: Option<f64>,
    /// `kind = "sum"`: the rewards to add, each with its weight (`score = sum w_i s_i`, loss `sum w_i loss_i`).
    pub terms: Vec<RewardTermConfig>,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            kind: "brightness".into(),
            path: None,
            clip_path: None,
            config: None,
            tokenizer: None,
            concept: None,
            object: None,
            loss_coeff: 1.0,
            target: None,
            terms: Vec::new(),
        }
    }
}

/// One reward of a `kind = "sum"` composition (`[[reward.terms]]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardTermConfig {
    /// Any single reward kind (not `sum`).
    pub kind: String,
    pub weight: f64,
    pub path: Option<PathBuf>,
    pub clip_path: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub concept: Option<String>,
    pub object: Option<String>,
    pub target: Option<f64>,
}

impl Default for RewardTermConfig {
    fn default() -> Self {
        Self {
            kind: "brightness".into(),
            weight: 1.0,
            path: None,
            clip_path: None,
            config: None,
            tokenizer: None,
            concept: None,
            object: None,
            target: None,
        }
    }
}

impl RewardTermConfig {
    /// Where the tokenizer of a prompt reward is looked for, in order: `tokenizer` when set (only it); else the
    /// PickScore folder (`path`, when it is a folder) and `default` (the `tokenizer/` folder of the SD model).
    pub fn tokenizer_candidates(&self, default: Option<&Path>) -> Vec<PathBuf> {
        let (path, tokenizer) = (self.path.as_deref(), self.tokenizer.as_deref());
        match reward_kind::<AnyBackend>(&self.kind) {
            Some(kind) => kind.tokenizer_candidates(path, tokenizer, default),
            None => tokenizer
                .or(default)
                .map(Path::to_path_buf)
                .into_iter()
                .collect(),
        }
    }

    /// The term's files for the reward registry, with `tokenizers` where a prompt reward looks for its tokenizer.
    pub fn files<'a>(&'a self, tokenizers: &'a [PathBuf]) -> RewardFiles<'a> {
        RewardFiles {
            path: self.path.as_deref(),
            clip_path: self.clip_path.as_deref(),
            config: self.config.as_deref(),
            tokenizers,
            concept: self.concept.as_deref(),
            object: self.object.as_deref(),
            count_threshold: None,
        }
    }

    /// Checks the kind and that its files are given; `at` names the config place for messages.
    pub fn validate(&self, at: &str) -> Result<(), String> {
        let kind = trainable_kind::<AnyBackend>(&self.kind).map_err(|e| format!("{at}{e}"))?;
        if !kind.missing(&self.files(&[])).is_empty() {
            let subject = format!("{at}kind = \"{}\"", self.kind);
            return Err(kind.needs_message(&subject, |f| format!("{at}{}", f.config_key())));
        }
        if !self.weight.is_finite() {
            return Err(format!("{at}weight must be a finite number"));
        }
        if self.kind == "concept" && self.concept.as_deref().is_none_or(|c| c.trim().is_empty()) {
            return Err(format!(
                "{at}kind = \"concept\" needs {at}concept: the text of the concept to move away from \
                 (e.g. concept = \"a photo of a dog\")"
            ));
        }
        Ok(())
    }
}

impl RewardConfig {
    /// The rewards to build: the `terms` of a sum, or the single reward described at the top level (weight 1).
    pub fn terms(&self) -> Vec<RewardTermConfig> {
        if self.kind == SUM_KIND {
            self.terms.clone()
        } else {
            vec![RewardTermConfig {
                kind: self.kind.clone(),
                weight: 1.0,
                path: self.path.clone(),
                clip_path: self.clip_path.clone(),
                config: self.config.clone(),
                tokenizer: self.tokenizer.clone(),
                concept: self.concept.clone(),
                object: self.object.clone(),
                target: self.target,
            }]
        }
    }
}

/// The sampler used for training trajectories and evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    pub steps: usize,
    pub guidance_scale: f64,
    pub eta: f64,
    /// Image size in pixels; `None`: the UNet's `sample_size * 8`.
    pub resolution: Option<usize>,
    pub negative_prompt: String,
}

impl Default for SamplingConfig {
    /// AlignProp v1 preset: DDIM 50 steps, eta 0, guidance 7.5.
    fn default() -> Self {
        Self {
            steps: 50,
            guidance_scale: 7.5,
            eta: 0.0,
            resolution: None,
            negative_prompt: String::new(),
        }
    }
}

/// The optimisation loop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoopConfig {
    /// Optimiser steps.
    pub steps: usize,
    /// Trajectories (images) per backward pass.
    pub batch_size: usize,
    /// Backward passes accumulated per optimiser step and worker (global batch = batch_size x grad_accum x
    /// workers).
    pub grad_accum: usize,
    /// Devices to train on, one worker each (data parallel): e.g. `["cuda:0", "cuda:1"]`, `["cpu", "cpu"]`; empty:
    /// one device, chosen by `--device`. The command line's `--devices` replaces it.
    pub devices: Vec<String>,
    /// Seeds every random stream (noise, prompts, truncation) of the run.
    pub seed: u64,
    /// A prompt file (one per line); relative paths are taken from the config file's folder.
    pub prompts: PathBuf,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 2,
            grad_accum: 1,
            devices: Vec::new(),
            seed: 42,
            prompts: "prompts/animals.txt".into(),
        }
    }
}

/// Evaluation on fixed prompts with fixed initial noise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate every this many optimiser steps (and before the first and after the last).
    pub every: usize,
    pub prompts: PathBuf,
    pub seed: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: 10,
            prompts: "prompts/eval_animals.txt".into(),
            seed: 1234,
        }
    }
}

/// Where results go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    pub dir: PathBuf,
    /// Write the LoRA and a checkpoint every this many optimiser steps (and at the end).
    pub save_every: usize,
    /// Checkpoints kept (the newest ones).
    pub keep_last: usize,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            dir: "runs/alignprop".into(),
            save_every: 50,
            keep_last: 2,
        }
    }
}

impl TrainConfig {
    /// Reads a TOML config; relative input paths (`model.path`, the prompt files, the reward's files) are resolved
    /// against the config's folder ([`Self::resolve_paths`]); `output.dir` stays relative to the working folder.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let mut cfg: TrainConfig =
            toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
        cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(cfg)
    }

    /// The config's input paths (`model.path`, `train.prompts`, `eval.prompts`, every reward file).
    pub fn input_paths_mut(&mut self) -> Vec<&mut PathBuf> {
        let r = &mut self.reward;
        let term_paths = r.terms.iter_mut().flat_map(|t| {
            [
                &mut t.path,
                &mut t.clip_path,
                &mut t.config,
                &mut t.tokenizer,
            ]
        });
        [&mut self.train.prompts, &mut self.eval.prompts]
            .into_iter()
            .chain(
                [
                    &mut self.model.path,
                    &mut r.path,
                    &mut r.clip_path,
                    &mut r.config,
                    &mut r.tokenizer,
                ]
                .into_iter()
                .chain(term_paths)
                .flatten(),
            )
            .collect()
    }

    /// Joins every relative input path ([`Self::input_paths_mut`]) to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in self.input_paths_mut() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        let s = &self.sampling;
        if s.steps == 0 {
            return Err("sampling.steps must be at least 1".into());
        }
        self.method.validate(s.steps, &self.truncation)?;
        let o = &self.optimizer;
        let numbers = [
            (
                "sampling.guidance_scale",
                s.guidance_scale,
                f64::NEG_INFINITY,
            ),
            ("sampling.eta", s.eta, 0.0),
            ("optimizer.lr", o.lr, 0.0),
            ("optimizer.beta1", o.beta1, 0.0),
            ("optimizer.beta2", o.beta2, 0.0),
            ("optimizer.eps", o.eps, 0.0),
            ("optimizer.weight_decay", o.weight_decay, 0.0),
            (
                "reward.loss_coeff",
                self.reward.loss_coeff,
                f64::NEG_INFINITY,
            ),
        ];
        for (key, v, min) in numbers {
            if !v.is_finite() || v < min {
                return Err(format!(
                    "{key} = {v}: expected a finite number{}",
                    if min == 0.0 { " >= 0" } else { "" }
                ));
            }
        }
        if o.lr <= 0.0 {
            return Err(format!("optimizer.lr = {}: expected a number > 0", o.lr));
        }
        if o.beta1 >= 1.0 || o.beta2 >= 1.0 {
            return Err(format!(
                "optimizer.beta1 = {} / beta2 = {}: each must be in [0, 1)",
                o.beta1, o.beta2
            ));
        }
        if o.warmup_steps > 0 && o.warmup_steps >= self.train.steps {
            return Err(format!(
                "optimizer.warmup_steps = {}: expected fewer than train.steps ({}), or the learning rate never \
                 reaches optimizer.lr",
                o.warmup_steps, self.train.steps
            ));
        }
        let e = &self.ema;
        if e.enabled && !(0.0..1.0).contains(&e.decay) {
            return Err(format!(
                "ema.decay = {}: expected a number in [0, 1) (diffusers' EMAModel uses 0.9999)",
                e.decay
            ));
        }
        if let Some(c) = o.max_grad_norm
            && (!c.is_finite() || c <= 0.0)
        {
            return Err(format!(
                "optimizer.max_grad_norm = {c}: expected a finite number > 0 (or leave it out: no clipping)"
            ));
        }
        if let Some(t) = self.reward.target
            && !t.is_finite()
        {
            return Err(format!("reward.target = {t}: expected a finite number"));
        }
        self.truncation.validate(s.steps)?;
        if self.train.batch_size == 0 || self.train.grad_accum == 0 {
            return Err("train.batch_size and train.grad_accum must be at least 1".into());
        }
        if self.reward.kind == SUM_KIND {
            if self.reward.terms.is_empty() {
                return Err(
                    "reward.kind = \"sum\" needs at least one [[reward.terms]] entry".into(),
                );
            }
            for (i, t) in self.reward.terms.iter().enumerate() {
                t.validate(&format!("reward.terms[{i}]."))?;
            }
        } else {
            if !self.reward.terms.is_empty() {
                return Err("reward.terms is only read with reward.kind = \"sum\"".into());
            }
            self.reward.terms()[0].validate("reward.")?;
        }
        Ok(())
    }
}

/// A TOML error on one line: `file: line L, column C: message` (toml's own text spans several lines, with an
/// excerpt and a caret).
pub fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> String {
    let place = e
        .span()
        .map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: ")
        })
        .unwrap_or_default();
    let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    format!("{}: {place}{message}", path.display())
}

/// Reads prompts, one per line (blank lines and `#` comments skipped); an empty file is an error.
pub fn read_prompts(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read prompt file: {e}", path.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        return Err(format!(
            "{}: the prompt file has no prompts",
            path.display()
        ));
    }
    Ok(prompts)
}
