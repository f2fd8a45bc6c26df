//! `alignprop fit-compressibility`: fit the compressibility reward's surrogate head (CLIP embedding -> MLP ->
//! JPEG KiB at quality 95) on a folder of images against their true JPEG sizes.

use std::path::PathBuf;

use alignprop_device::{Cpu, Cuda, DeviceChoice, Wgpu, cuda_device, wgpu_device};
use alignprop_rewards::clip_vision::CLIPVisionModel;
use alignprop_rewards::compressibility::{
    JPEG_QUALITY, clip_embedding, fit_head, jpeg_size_kib, save_head,
};
use anyhow::{Context, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use clap::Args;

use crate::eval_cmd::{list_images, load_image};

#[derive(Args, Debug)]
pub struct FitArgs {
    /// A folder of PNG / JPEG images to fit on (e.g. samples of the model you will train; a few hundred).
    #[arg(long)]
    pub images: PathBuf,
    /// The CLIP vision folder whose embeddings the head reads (a transformers CLIPVisionModelWithProjection).
    #[arg(long)]
    pub clip_path: PathBuf,
    /// The head file to write (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Width of the hidden layer.
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Full-batch Adam steps.
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    #[arg(long, default_value_t = 1e-2)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda, cuda:N, wgpu or wgpu:N (any Vulkan / Metal / DX12 GPU; default: CUDA when a GPU is present, else CPU).
    #[arg(long, value_parser = crate::parse_device)]
    pub device: Option<DeviceChoice>,
}

pub fn run(args: FitArgs) -> Result<()> {
    if args.out.is_dir() {
        anyhow::bail!(
            "{}: is a folder, expected a .safetensors file path",
            args.out.display()
        );
    }
    match crate::resolve_device(args.device) {
        DeviceChoice::Cpu => fit::<Cpu>(&args, &Default::default()),
        DeviceChoice::Cuda(i) => fit::<Cuda>(&args, &cuda_device(i).map_err(anyhow::Error::msg)?),
        DeviceChoice::Wgpu(i) => fit::<Wgpu>(&args, &wgpu_device(i).map_err(anyhow::Error::msg)?),
    }
}

fn fit<B: Backend>(args: &FitArgs, device: &B::Device) -> Result<()> {
    let files = list_images(&args.images)?;
    let clip = CLIPVisionModel::<B>::load(&args.clip_path, device, DType::F32)
        .with_context(|| format!("loading CLIP from {}", args.clip_path.display()))?;
    let bar = indicatif::ProgressBar::new(files.len() as u64);
    let (mut sizes, mut embs) = (Vec::new(), Vec::new());
    for f in &files {
        // load_image first: it checks the content and the size before decoding (one-line errors).
        let pixels = load_image::<B>(f, device).map_err(anyhow::Error::msg)?;
        let img = image::open(f)
            .with_context(|| format!("{}: cannot read image", f.display()))?
            .to_rgb8();
        sizes.push(jpeg_size_kib(&img, JPEG_QUALITY));
        embs.push(clip_embedding(&clip, pixels));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let fit = fit_head::<Autodiff<B>>(
        Tensor::cat(embs, 0),
        &sizes,
        args.hidden,
        args.steps,
        args.lr,
        args.seed,
    );
    save_head(&fit, &args.out)?;
    let mean = sizes.iter().sum::<f64>() / sizes.len() as f64;
    println!(
        "{} images, JPEG q{JPEG_QUALITY} size {mean:.2} KiB on average; surrogate RMSE {:.3} KiB (predicting the \
         mean: {:.3} KiB; R^2 {:.3} on the fitting set)",
        sizes.len(),
        fit.mse.sqrt(),
        fit.mse_of_mean.sqrt(),
        1.0 - fit.mse / fit.mse_of_mean.max(f64::MIN_POSITIVE)
    );
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
