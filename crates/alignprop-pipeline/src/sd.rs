//! Stable Diffusion text-to-image: prompt encoding, classifier-free guidance, the scheduler loop, VAE decoding.
//!
//! Every function here is plain burn tensor code, so the same loop runs under `Autodiff<_>` and gradients flow
//! through the text conditioning, every UNet call, every scheduler update and the decoder (the AlignProp chain).

use std::path::Path;

use alignprop_diffusion::clip::{CLIPTextModel, CLIPTextModelWithProjection};
use alignprop_diffusion::tokenizer::CLIPTokenizer;
use alignprop_diffusion::unet::{
    OneOrMany, TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel,
};
use alignprop_diffusion::vae::AutoencoderKL;
use alignprop_io::pipeline_files::read_json;
use alignprop_schedulers::{AnyScheduler, Scheduler, SchedulerConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};

use crate::noise::NoiseRng;

/// Errors of the pipeline: loading, tokenizing, bad requests. Messages name the file or the setting.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Weights(#[from] alignprop_io::WeightError),
    #[error(transparent)]
    Tokenizer(#[from] alignprop_diffusion::tokenizer::TokenizerError),
    #[error(transparent)]
    Scheduler(#[from] alignprop_schedulers::ConfigError),
    #[error(transparent)]
    Lora(#[from] alignprop_lora::LoraError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, PipelineError>;

impl From<alignprop_diffusion::Error> for PipelineError {
    fn from(e: alignprop_diffusion::Error) -> Self {
        match e {
            alignprop_diffusion::Error::Weights(e) => Self::Weights(e),
            alignprop_diffusion::Error::Tokenizer(e) => Self::Tokenizer(e),
        }
    }
}

/// The parts of a Stable Diffusion model (SD 1.x, 2.x or SDXL) plus its scheduler configuration.
pub struct StableDiffusion<B: Backend> {
    pub tokenizer: CLIPTokenizer,
    pub text_encoder: CLIPTextModel<B>,
    /// SDXL's second text encoder (OpenCLIP bigG with projection) and its tokenizer; `None` for SD 1.x / 2.x.
    pub text_encoder_2: Option<SecondEncoder<B>>,
    pub unet: UNet2DConditionModel<B>,
    pub vae: AutoencoderKL<B>,
    pub scheduler_config: SchedulerConfig,
    /// The UNet's `sample_size` (latent side the model was trained at; 64 for SD1.5).
    pub sample_size: usize,
    pub device: B::Device,
    pub dtype: DType,
    /// Set when the tokenizer is not the folder's own: the folder has no `tokenizer/` directory, so SD1.5's
    /// bundled one ([`CLIPTokenizer::sd15`]) is used. [`StableDiffusion::load`] also prints it to stderr.
    pub tokenizer_note: Option<String>,
}

/// SDXL's second text encoder with its tokenizer, and the pipeline setting that goes with the pair.
pub struct SecondEncoder<B: Backend> {
    pub tokenizer: CLIPTokenizer,
    pub text_encoder: CLIPTextModelWithProjection<B>,
    /// `force_zeros_for_empty_prompt` of `model_index.json` (true for SDXL base): an empty negative prompt is
    /// all-zero states and pooled embeddings instead of the encoded "" (diffusers' default, `negative_prompt=None`).
    pub force_zeros_for_empty_prompt: bool,
}

/// Text conditioning for a batch of `b` prompts, each `[b, tokens, hidden]`.
#[derive(Clone, Debug)]
pub struct Conditioning<B: Backend> {
    /// The negative / empty prompt's states.
    pub uncond: Tensor<B, 3>,
    /// The prompts' states.
    pub cond: Tensor<B, 3>,
    /// SDXL only: the pooled text embeddings and time ids of the negative and of the positive prompts.
    pub added: Option<AddedConditioning<B>>,
}

/// SDXL's `text_time` conditioning for the negative (`uncond`) and positive (`cond`) prompts, `[b, ..]` each.
#[derive(Clone, Debug)]
pub struct AddedConditioning<B: Backend> {
    pub uncond: TextTimeCond<B>,
    pub cond: TextTimeCond<B>,
}

impl<B: Backend> Conditioning<B> {
    /// SD 1.x / 2.x conditioning: text states only.
    pub fn new(uncond: Tensor<B, 3>, cond: Tensor<B, 3>) -> Self {
        Self {
            uncond,
            cond,
            added: None,
        }
    }

    /// `[uncond; cond]`: `[2b, tokens, hidden]`, the order diffusers batches them in.
    pub fn stacked(&self) -> Tensor<B, 3> {
        Tensor::cat(vec![self.uncond.clone(), self.cond.clone()], 0)
    }

    /// This conditioning on the inner backend of an autodiff backend (no graph).
    pub fn inner(&self) -> Conditioning<B::InnerBackend>
    where
        B: AutodiffBackend,
    {
        let tt = |c: &TextTimeCond<B>| TextTimeCond {
            text_embeds: c.text_embeds.clone().inner(),
            time_ids: c.time_ids.clone().inner(),
        };
        Conditioning {
            uncond: self.uncond.clone().inner(),
            cond: self.cond.clone().inner(),
            added: self.added.as_ref().map(|a| AddedConditioning {
                uncond: tt(&a.uncond),
                cond: tt(&a.cond),
            }),
        }
    }

    /// A constant (no gradient) copy of inner-backend conditioning on the autodiff backend `B`.
    pub fn from_inner(c: &Conditioning<B::InnerBackend>) -> Self
    where
        B: AutodiffBackend,
    {
        let tt = |c: &TextTimeCond<B::InnerBackend>| TextTimeCond {
            text_embeds: Tensor::from_inner(c.text_embeds.clone()),
            time_ids: Tensor::from_inner(c.time_ids.clone()),
        };
        Conditioning {
            uncond: Tensor::from_inner(c.uncond.clone()),
            cond: Tensor::from_inner(c.cond.clone()),
            added: c.added.as_ref().map(|a| AddedConditioning {
                uncond: tt(&a.uncond),
                cond: tt(&a.cond),
            }),
        }
    }

    /// The added conditioning batched as [`Self::stacked`].
    pub fn stacked_added(&self) -> Option<TextTimeCond<B>> {
        self.added.as_ref().map(|a| a.uncond.cat(&a.cond))
    }

    pub fn batch(&self) -> usize {
        self.cond.dims()[0]
    }
}

/// Classifier-free guided noise prediction for latents `x` `[b, c, h, w]` at timestep `t`: one batched UNet call on
/// `[x; x]` with `[uncond; cond]`, then `eps_u + guidance * (eps_c - eps_u)`. With `guidance == 1` only the
/// conditional branch runs. `model_input_scale` is the scheduler's input scaling (1 for DDIM).
pub fn guided_noise<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    x: Tensor<B, 4>,
    t: f64,
    text: &Conditioning<B>,
    guidance: f64,
) -> Tensor<B, 4> {
    if guidance == 1.0 {
        let added = text.added.as_ref().map(|a| &a.cond);
        return unet.forward_added_with_timestep(x, t, text.cond.clone(), added);
    }
    let both = unet.forward_added_with_timestep(
        Tensor::cat(vec![x.clone(), x], 0),
        t,
        text.stacked(),
        text.stacked_added().as_ref(),
    );
    let [eps_u, eps_c] = both.chunk(2, 0).try_into().expect("two halves");
    eps_u.clone() + (eps_c - eps_u) * guidance
}

/// What to generate. Sizes are in pixels (multiples of the VAE factor, 8 for SD).
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub steps: usize,
    pub guidance_scale: f64,
    /// DDIM's eta (0 deterministic, 1 stochastic); ignored by the other schedulers.
    pub eta: f64,
    /// `ddim`, `ddpm` or `euler_a`.
    pub scheduler: String,
    pub negative_prompt: String,
    pub height: usize,
    pub width: usize,
    /// Seeds the initial latents and the per-step noise ([`NoiseRng`]).
    pub seed: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            steps: 50,
            guidance_scale: 7.5,
            eta: 0.0,
            scheduler: "ddim".into(),
            negative_prompt: String::new(),
            height: 512,
            width: 512,
            seed: 0,
        }
    }
}

/// The result of a sampling run.
pub struct SampleOutput<B: Backend> {
    /// Final latents `[b, 4, h/8, w/8]` (scaled, as the UNet sees them).
    pub latents: Tensor<B, 4>,
    /// Decoded images `[b, 3, h, w]`, roughly in `[-1, 1]`.
    pub images: Tensor<B, 4>,
}

impl<B: Backend> StableDiffusion<B> {
    /// Loads a diffusers Stable Diffusion folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).
    ///
    /// A folder without `tokenizer/` gets SD1.5's tokenizer ([`CLIPTokenizer::sd15`], the one of every SD1.x
    /// model), which is said in [`StableDiffusion::tokenizer_note`] and on stderr.
    pub fn load(folder: impl AsRef<Path>, device: &B::Device, dtype: DType) -> Result<Self> {
        let folder = folder.as_ref();
        if !folder.is_dir() {
            return Err(PipelineError::Invalid(format!(
                "{}: model folder not found (expected a diffusers Stable Diffusion folder)",
                folder.display()
            )));
        }
        // An SDXL, SD3, FLUX, inpainting or depth folder: one clear error before anything is read.
        alignprop_io::pipeline_files::check_pipeline_family(folder)?;
        let scheduler_file = folder.join("scheduler/scheduler_config.json");
        let scheduler_config = if scheduler_file.is_file() {
            SchedulerConfig::from_file(&scheduler_file)?
        } else {
            SchedulerConfig::default()
        };
        let unet_config: UNet2DConditionConfig = read_json(&folder.join("unet/config.json"))?;
        let sample_size = match &unet_config.sample_size {
            OneOrMany::One(s) => *s,
            OneOrMany::Many(v) => v.first().copied().unwrap_or(64),
        };
        let tokenizer_dir = folder.join("tokenizer");
        let (tokenizer, tokenizer_note) = if tokenizer_dir.is_dir() {
            (CLIPTokenizer::from_folder(&tokenizer_dir)?, None)
        } else {
            let note = format!(
                "{}: no tokenizer/ folder, using the SD1.5 CLIP tokenizer bundled with alignprop-diffusion",
                folder.display()
            );
            eprintln!("note: {note}");
            (CLIPTokenizer::sd15(), Some(note))
        };
        let unet = UNet2DConditionModel::load(&folder.join("unet"), device, dtype)?;
        let text_encoder_2 = if folder.join("text_encoder_2").is_dir() {
            let force_zeros = folder.join("model_index.json");
            let force_zeros = if force_zeros.is_file() {
                read_json::<serde_json::Value>(&force_zeros)?
                    .get("force_zeros_for_empty_prompt")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(true)
            } else {
                true
            };
            let tok_dir = folder.join("tokenizer_2");
            if !tok_dir.is_dir() {
                return Err(PipelineError::Invalid(format!(
                    "{}: an SDXL folder (it has text_encoder_2/) needs tokenizer_2/ beside it",
                    folder.display()
                )));
            }
            Some(SecondEncoder {
                tokenizer: CLIPTokenizer::from_folder(&tok_dir)?,
                text_encoder: CLIPTextModelWithProjection::load(
                    &folder.join("text_encoder_2"),
                    device,
                    dtype,
                )?,
                force_zeros_for_empty_prompt: force_zeros,
            })
        } else {
            None
        };
        match (unet.needs_text_time(), text_encoder_2.is_some()) {
            (true, false) => {
                return Err(PipelineError::Invalid(format!(
                    "{}: the UNet takes SDXL's text_time conditioning (addition_embed_type) but the folder has no \
                     text_encoder_2/",
                    folder.display()
                )));
            }
            (false, true) => {
                return Err(PipelineError::Invalid(format!(
                    "{}: the folder has text_encoder_2/ (SDXL) but unet/config.json has no addition_embed_type \
                     \"text_time\"",
                    folder.display()
                )));
            }
            _ => {}
        }
        Ok(Self {
            sample_size,
            tokenizer,
            tokenizer_note,
            text_encoder: CLIPTextModel::load(&folder.join("text_encoder"), device, dtype)?,
            text_encoder_2,
            unet,
            vae: AutoencoderKL::load(&folder.join("vae"), device, dtype)?,
            scheduler_config,
            device: device.clone(),
            dtype,
        })
    }

    /// Text-encoder states of `prompts`: `[n, 77, hidden]` (one encoder call for the batch). For SDXL, the
    /// penultimate states of both encoders concatenated on the channel axis, `[n, 77, hidden_1 + hidden_2]`
    /// (see [`Self::encode_prompts_sdxl`] for the pooled embeddings too).
    pub fn encode_prompts<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Tensor<B, 3>> {
        if self.text_encoder_2.is_some() {
            return Ok(self.encode_prompts_sdxl(prompts)?.0);
        }
        let ids = self.tokenizer.input_ids::<B, S>(prompts, &self.device)?;
        Ok(self.text_encoder.forward(ids).last_hidden_state)
    }

    /// SDXL's `encode_prompt` for one list of prompts (the same text for both encoders): `(prompt_embeds
    /// [n, 77, hidden_1 + hidden_2], pooled_prompt_embeds [n, projection_dim])`, the first the two encoders'
    /// penultimate hidden states (no final norm) side by side, the second the second encoder's `text_embeds`.
    pub fn encode_prompts_sdxl<S: AsRef<str>>(
        &self,
        prompts: &[S],
    ) -> Result<(Tensor<B, 3>, Tensor<B, 2>)> {
        let second = self.text_encoder_2.as_ref().ok_or_else(|| {
            PipelineError::Invalid(
                "encode_prompts_sdxl: this model has no second text encoder (not SDXL)".into(),
            )
        })?;
        let ids_1 = self.tokenizer.input_ids::<B, S>(prompts, &self.device)?;
        let ids_2 = second.tokenizer.input_ids::<B, S>(prompts, &self.device)?;
        let (states_1, _) = self.text_encoder.encode_penultimate(ids_1);
        let (states_2, pooled) = second.text_encoder.encode_penultimate(ids_2);
        Ok((Tensor::cat(vec![states_1, states_2], 2), pooled))
    }

    /// Conditional and unconditional states for classifier-free guidance (two encoder calls, as diffusers'
    /// `encode_prompt`), for images of the model's default size ([`Self::conditioning_sized`]).
    pub fn conditioning<S: AsRef<str>>(
        &self,
        prompts: &[S],
        negative_prompt: &str,
    ) -> Result<Conditioning<B>> {
        let side = self.default_image_size();
        self.conditioning_sized(prompts, negative_prompt, [side, side])
    }

    /// [`Self::conditioning`] for images of `[height, width]` pixels. SD 1.x / 2.x ignore the size; SDXL adds the
    /// pooled embeddings and the time ids `(h, w, 0, 0, h, w)` (original size = target size, no crop: diffusers'
    /// defaults), and, when `force_zeros_for_empty_prompt` is set, an empty negative prompt is all zeros.
    pub fn conditioning_sized<S: AsRef<str>>(
        &self,
        prompts: &[S],
        negative_prompt: &str,
        [height, width]: [usize; 2],
    ) -> Result<Conditioning<B>> {
        let negatives = vec![negative_prompt; prompts.len()];
        let Some(second) = &self.text_encoder_2 else {
            return Ok(Conditioning::new(
                self.encode_prompts(&negatives)?,
                self.encode_prompts(prompts)?,
            ));
        };
        let (cond, pooled) = self.encode_prompts_sdxl(prompts)?;
        let (uncond, pooled_uncond) =
            if negative_prompt.is_empty() && second.force_zeros_for_empty_prompt {
                (cond.zeros_like(), pooled.zeros_like())
            } else {
                self.encode_prompts_sdxl(&negatives)?
            };
        let (h, w) = (height as f64, width as f64);
        let ids =
            |n| TextTimeCond::<B>::time_ids([h, w, 0.0, 0.0, h, w], n, &self.device, self.dtype);
        let n = prompts.len();
        Ok(Conditioning {
            uncond,
            cond,
            added: Some(AddedConditioning {
                uncond: TextTimeCond {
                    text_embeds: pooled_uncond,
                    time_ids: ids(n),
                },
                cond: TextTimeCond {
                    text_embeds: pooled,
                    time_ids: ids(n),
                },
            }),
        })
    }

    /// The default image side in pixels: `sample_size * vae_factor` (512 for SD1.5).
    pub fn default_image_size(&self) -> usize {
        self.sample_size * self.vae_factor()
    }

    /// The VAE's spatial downsampling factor (8 for SD).
    pub fn vae_factor(&self) -> usize {
        1 << (self.vae.decoder.up_blocks.len() - 1)
    }

    /// The scheduler `opts` asks for.
    pub fn scheduler(&self, opts: &SampleOptions) -> Result<AnyScheduler> {
        Ok(AnyScheduler::new(
            &opts.scheduler,
            &self.scheduler_config,
            opts.steps,
            opts.eta,
        )?)
    }

    /// Generates images for `prompts` with seeded noise. `on_step(i, n)` is called after each step.
    pub fn sample<S: AsRef<str>>(
        &self,
        prompts: &[S],
        opts: &SampleOptions,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<SampleOutput<B>> {
        let f = self.vae_factor();
        if opts.height % f != 0 || opts.width % f != 0 || opts.height == 0 || opts.width == 0 {
            return Err(PipelineError::Invalid(format!(
                "image size {}x{} must be a positive multiple of {f}",
                opts.width, opts.height
            )));
        }
        if prompts.is_empty() {
            return Err(PipelineError::Invalid("no prompts to sample".into()));
        }
        let scheduler = self.scheduler(opts)?;
        let shape = [
            prompts.len(),
            self.unet.in_channels(),
            opts.height / f,
            opts.width / f,
        ];
        let mut rng = NoiseRng::new(opts.seed);
        let x_t = rng.normal_tensor::<B, 4>(shape, &self.device, self.dtype);
        let noises: Vec<Option<Tensor<B, 4>>> = (0..opts.steps)
            .map(|i| {
                scheduler
                    .needs_noise(i)
                    .then(|| rng.normal_tensor(shape, &self.device, self.dtype))
            })
            .collect();
        let text =
            self.conditioning_sized(prompts, &opts.negative_prompt, [opts.height, opts.width])?;
        let latents = denoise(
            &self.unet,
            &scheduler,
            x_t,
            &text,
            opts.guidance_scale,
            noises,
            on_step,
        );
        let images = self.vae.decode_scaled(latents.clone());
        Ok(SampleOutput { latents, images })
    }
}

/// The denoising loop from `x_T` (standard normal, scaled by the scheduler's initial sigma here) with guidance,
/// using `noises[i]` for step `i` when the scheduler adds noise (`None`: drawn from the backend RNG).
pub fn denoise<B: Backend, S: Scheduler>(
    unet: &UNet2DConditionModel<B>,
    scheduler: &S,
    x_t: Tensor<B, 4>,
    text: &Conditioning<B>,
    guidance: f64,
    noises: Vec<Option<Tensor<B, 4>>>,
    on_step: &mut dyn FnMut(usize, usize),
) -> Tensor<B, 4> {
    let n = scheduler.timesteps().len();
    let mut x = x_t * scheduler.init_noise_sigma();
    for (i, noise) in (0..n).zip(noises.into_iter().chain(std::iter::repeat(None))) {
        let t = scheduler.timesteps()[i] as f64;
        let input = scheduler.scale_model_input(x.clone(), i);
        let eps = guided_noise(unet, input, t, text, guidance);
        x = scheduler.step(eps, i, x, noise).prev_sample;
        on_step(i + 1, n);
    }
    x
}

/// A `[n]` f32 tensor of timesteps.
pub fn timesteps_tensor<B: Backend>(t: &[f64], device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(
        TensorData::new(t.iter().map(|&v| v as f32).collect::<Vec<_>>(), [t.len()]),
        (device, DType::F32),
    )
}
