//! `alignprop sample`: text to image with a diffusers Stable Diffusion folder, optionally with a LoRA. Writes the
//! PNGs, a grid and `manifest.json` (each file with its prompt).

use std::path::PathBuf;
use std::time::Instant;

use alignprop_device::{Cpu, Cuda, DeviceChoice, Wgpu, cuda_device, wgpu_device};
use alignprop_lora::LoraWeights;
use alignprop_pipeline::images::{grid, save_png, to_rgb8};
use alignprop_pipeline::{SampleOptions, StableDiffusion};
use anyhow::{Context, Result, bail};
use burn::tensor::DType;
use burn::tensor::backend::Backend;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// A diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/). Default: the
    /// built-in demo model (tiny-shapes: 64x64 pictures of shapes, prompts like "two red squares on a blue
    /// background"), the model `alignprop train` without --config tunes.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A prompt (repeat the flag for several).
    #[arg(long = "prompt", short = 'p')]
    pub prompts: Vec<String>,
    /// A text file with one prompt per line (empty lines and lines starting with # are skipped).
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Negative prompt for classifier-free guidance.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// DDIM eta: 0 deterministic, 1 stochastic.
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// ddim, ddpm or euler_a.
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    /// Image height in pixels (default: the UNet's sample_size x 8).
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long)]
    pub width: Option<usize>,
    /// A LoRA safetensors file (peft, diffusers or kohya keys).
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// LoRA strength (0 = base model, 1 = as trained).
    #[arg(long, default_value_t = 1.0)]
    pub lora_scale: f64,
    /// Output folder for the PNGs (created if missing).
    #[arg(long, default_value = "samples")]
    pub out: PathBuf,
    /// Images generated per model call.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// cpu, cuda, cuda:N, wgpu or wgpu:N (any Vulkan / Metal / DX12 GPU; default: CUDA when a GPU is present, else CPU).
    #[arg(long, value_parser = crate::parse_device)]
    pub device: Option<DeviceChoice>,
    /// f32, f16 or bf16 (half precision needs a GPU).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "fp32" => DType::F32,
        "f64" | "fp64" => DType::F64,
        "f16" | "fp16" => DType::F16,
        "bf16" => DType::BF16,
        _ => bail!("unknown dtype '{s}' (expected f32, f16, bf16 or f64)"),
    })
}

/// Reads prompts from the flags and the prompt file; at least one is required.
pub fn collect_prompts(prompts: &[String], file: Option<&PathBuf>) -> Result<Vec<String>> {
    let mut all = prompts.to_vec();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read prompt file", path.display()))?;
        let from_file: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect();
        if from_file.is_empty() {
            bail!("{}: the prompt file has no prompts", path.display());
        }
        all.extend(from_file);
    }
    if all.is_empty() {
        bail!("no prompts: give --prompt TEXT (repeatable) or --prompt-file FILE");
    }
    Ok(all)
}

pub fn run(args: SampleArgs) -> Result<()> {
    let dtype = parse_dtype(&args.dtype)?;
    match crate::resolve_device(args.device) {
        DeviceChoice::Cpu => {
            if matches!(dtype, DType::F16 | DType::BF16) {
                bail!("--dtype {} needs a GPU; use f32 on the CPU", args.dtype);
            }
            sample::<Cpu>(&args, &Default::default(), dtype)
        }
        DeviceChoice::Cuda(i) => {
            let device = cuda_device(i).map_err(anyhow::Error::msg)?;
            sample::<Cuda>(&args, &device, dtype)
        }
        DeviceChoice::Wgpu(i) => {
            let device = wgpu_device(i).map_err(anyhow::Error::msg)?;
            sample::<Wgpu>(&args, &device, dtype)
        }
    }
}

fn sample<B: Backend>(args: &SampleArgs, device: &B::Device, dtype: DType) -> Result<()> {
    let prompts = collect_prompts(&args.prompts, args.prompt_file.as_ref())?;
    if args.out.exists() && !args.out.is_dir() {
        bail!(
            "{}: the output path exists and is not a folder",
            args.out.display()
        );
    }
    let t0 = Instant::now();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let m = alignprop_trainer::builtin::demo_model().map_err(anyhow::Error::msg)?;
            eprintln!("no --model: the built-in demo model ({})", m.display());
            m
        }
    };
    let mut sd = StableDiffusion::<B>::load(&model, device, dtype)
        .with_context(|| format!("loading the model from {}", model.display()))?;
    if let Some(path) = &args.lora {
        let lora = LoraWeights::read(path)?;
        alignprop_lora::apply(&mut sd.unet, &lora, args.lora_scale, false)
            .with_context(|| format!("applying {}", path.display()))?;
        eprintln!(
            "LoRA {} ({} parameters, rank {}) at scale {}",
            path.display(),
            lora.num_params(),
            lora.rank().map_or("mixed".to_string(), |r| r.to_string()),
            args.lora_scale
        );
    }
    eprintln!("model loaded in {:.1?}", t0.elapsed());
    let default_size = sd.default_image_size();
    let opts = SampleOptions {
        steps: args.steps,
        guidance_scale: args.guidance,
        eta: args.eta,
        scheduler: args.scheduler.clone(),
        negative_prompt: args.negative_prompt.clone(),
        height: args.height.unwrap_or(default_size),
        width: args.width.unwrap_or(default_size),
        seed: args.seed,
    };
    let jobs: Vec<(usize, &String)> = prompts
        .iter()
        .flat_map(|p| (0..args.num_images).map(move |k| (k, p)))
        .collect();
    let bar = ProgressBar::new((jobs.len() * opts.steps) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps {elapsed_precise} eta {eta}")
            .unwrap(),
    );
    let mut pictures = Vec::new();
    for (chunk_index, chunk) in jobs.chunks(args.batch_size.max(1)).enumerate() {
        let chunk_prompts: Vec<&str> = chunk.iter().map(|(_, p)| p.as_str()).collect();
        // Each batch gets its own seed so the images do not depend on the batch size only through the seed.
        let opts = SampleOptions {
            seed: args.seed.wrapping_add(chunk_index as u64),
            ..opts.clone()
        };
        let out = sd.sample(&chunk_prompts, &opts, &mut |_, _| bar.inc(1))?;
        pictures.extend(to_rgb8(out.images));
    }
    bar.finish_and_clear();
    let mut manifest = Vec::new();
    for (i, ((k, prompt), img)) in jobs.iter().zip(&pictures).enumerate() {
        let file = format!("{i:04}_{}_{k}.png", slug(prompt));
        save_png(img, &args.out.join(&file)).map_err(anyhow::Error::msg)?;
        manifest.push(serde_json::json!({"file": file, "prompt": prompt}));
    }
    // Which file shows which prompt: what `alignprop eval --reward hps|pickscore --images` reads.
    let manifest_path = args.out.join(crate::eval_cmd::MANIFEST);
    let manifest = serde_json::json!({"images": manifest, "seed": args.seed, "steps": args.steps});
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("{}: cannot write", manifest_path.display()))?;
    let grid_path = args.out.join("grid.png");
    save_png(
        &grid(&pictures, (pictures.len() as f64).sqrt().ceil() as usize),
        &grid_path,
    )
    .map_err(anyhow::Error::msg)?;
    eprintln!(
        "{} images in {} ({:.1?} in all)",
        pictures.len(),
        args.out.display(),
        t0.elapsed()
    );
    Ok(())
}

/// A file-name-safe short form of a prompt.
fn slug(prompt: &str) -> String {
    let s: String = prompt
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_matches('_').to_string();
    s.chars().take(40).collect()
}
