//! Stable Diffusion text-to-image: prompt encoding, classifier-free guidance, the scheduler loop, VAE decoding.
//!
//! Every function here is plain burn tensor code, so the same loop runs under `Autodiff<_>` and gradients flow
//! through the text conditioning, every UNet call, every scheduler update and the decoder (the AlignProp chain).

use std::path::Path;

use alignprop_diffusion::clip::CLIPTextModel;
use alignprop_diffusion::tokenizer::CLIPTokenizer;
use alignprop_diffusion::unet::{OneOrMany, UNet2DConditionConfig, UNet2DConditionModel};
use alignprop_diffusion::vae::AutoencoderKL;
use alignprop_io::pipeline_files::read_json;
use alignprop_schedulers::{AnyScheduler, Scheduler, SchedulerConfig};
use burn::tensor::backend::Backend;
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

/// The four parts of a Stable Diffusion model plus its scheduler configuration.
pub struct StableDiffusion<B: Backend> {
    pub tokenizer: CLIPTokenizer,
    pub text_encoder: CLIPTextModel<B>,
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

/// Text conditioning for a batch of `b` prompts, each `[b, tokens, hidden]`.
#[derive(Clone, Debug)]
pub struct Conditioning<B: Backend> {
    /// The negative / empty prompt's states.
    pub uncond: Tensor<B, 3>,
    /// The prompts' states.
    pub cond: Tensor<B, 3>,
}

impl<B: Backend> Conditioning<B> {
    /// `[uncond; cond]`: `[2b, tokens, hidden]`, the order diffusers batches them in.
    pub fn stacked(&self) -> Tensor<B, 3> {
        Tensor::cat(vec![self.uncond.clone(), self.cond.clone()], 0)
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
        return unet.forward_with_timestep(x, t, text.cond.clone());
    }
    let both = unet.forward_with_timestep(Tensor::cat(vec![x.clone(), x], 0), t, text.stacked());
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
        Ok(Self {
            sample_size,
            tokenizer,
            tokenizer_note,
            text_encoder: CLIPTextModel::load(&folder.join("text_encoder"), device, dtype)?,
            unet: UNet2DConditionModel::load(&folder.join("unet"), device, dtype)?,
            vae: AutoencoderKL::load(&folder.join("vae"), device, dtype)?,
            scheduler_config,
            device: device.clone(),
            dtype,
        })
    }

    /// Text-encoder states of `prompts`: `[n, 77, hidden]` (one encoder call for the batch).
    pub fn encode_prompts<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Tensor<B, 3>> {
        let ids = self.tokenizer.input_ids::<B, S>(prompts, &self.device)?;
        Ok(self.text_encoder.forward(ids).last_hidden_state)
    }

    /// Conditional and unconditional states for classifier-free guidance (two encoder calls, as diffusers'
    /// `encode_prompt`).
    pub fn conditioning<S: AsRef<str>>(
        &self,
        prompts: &[S],
        negative_prompt: &str,
    ) -> Result<Conditioning<B>> {
        let negatives = vec![negative_prompt; prompts.len()];
        Ok(Conditioning {
            uncond: self.encode_prompts(&negatives)?,
            cond: self.encode_prompts(prompts)?,
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
        let text = self.conditioning(prompts, &opts.negative_prompt)?;
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
