//! The data-parallel workloads (`parallel/{tiny,mid}_w{1,2,4}`): optimiser steps of the real trainer
//! ([`alignprop_trainer::run_parallel`], what `train --devices` runs) on 1, 2 or 4 workers, each worker with its
//! own copy of the frozen model and adapters, the LoRA gradients all-reduced through burn's collective engine once
//! per step.
//!
//! - `tiny`: the built-in demo (`configs/tiny_demo.toml`: the tiny-shapes model at 64x64, 10 DDIM steps, K = 3,
//!   brightness reward), 2 images per worker per step.
//! - `mid`: the benchmarks' mid UNet + mid VAE (written once as a diffusers folder with random weights, see
//!   [`mid_model_folder`]) with a 768-wide 2-layer CLIP text encoder, 256x256, 20 DDIM steps, CFG 7.5, K = 1,
//!   brightness reward, 1 image per worker per step.
//!
//! The global batch grows with the worker count (weak scaling: every worker does the same work per step). On one
//! CPU the workers share its cores, so the figures show the cost of the extra replicas and of the exchange, not a
//! speed-up; on a GPU machine (`--device cuda`) worker `i` runs on `cuda:i`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use alignprop_diffusion::clip::{CLIPTextConfig, CLIPTextModel};
use alignprop_diffusion::unet::UNet2DConditionModel;
use alignprop_diffusion::vae::AutoencoderKL;
use alignprop_io::VarBuilder;
use alignprop_io::pipeline_files::read_json;
use alignprop_trainer::parallel::ParallelOptions;
use alignprop_trainer::{StepLog, TrainConfig, Truncation, run, run_parallel};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, TensorData};

use crate::{Timing, mid_unet_config, mid_vae_config, tiny_sd};

/// The data-parallel workloads.
pub const PARALLEL: &[&str] = &[
    "parallel/tiny_w1",
    "parallel/tiny_w2",
    "parallel/tiny_w4",
    "parallel/mid_w1",
    "parallel/mid_w2",
    "parallel/mid_w4",
];

/// `(config, workers)` of a `parallel/{tiny,mid}_wN` name.
pub fn parse_parallel(name: &str) -> Option<(&str, usize)> {
    let rest = name.strip_prefix("parallel/")?;
    let (config, w) = rest.split_once("_w")?;
    let workers: usize = w.parse().ok()?;
    (matches!(config, "tiny" | "mid") && workers >= 1).then_some((config, workers))
}

/// What one data-parallel workload measured: the optimiser-step times of worker 0 (which include waiting for the
/// others and the all-reduce), the images of one global step, and the throughput.
#[derive(Clone, Debug)]
pub struct ParallelTiming {
    pub timing: Timing,
    pub workers: usize,
    pub images_per_step: usize,
    /// Global images per second at the median step time.
    pub images_per_s: f64,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The config of a workload (`tiny` or `mid`), running `steps` optimiser steps into `out`.
fn config(which: &str, steps: usize, out: &Path) -> Result<TrainConfig, String> {
    let mut cfg = TrainConfig::from_file(&repo().join("configs/tiny_demo.toml"))
        .map_err(|e| e.to_string())?;
    if which == "mid" {
        cfg.model.path = Some(mid_model_folder()?);
        cfg.sampling.steps = 20;
        cfg.sampling.guidance_scale = 7.5;
        cfg.truncation = Truncation::Fixed { k: 1 };
        cfg.train.batch_size = 1;
    }
    cfg.train.steps = steps;
    cfg.train.grad_accum = 1;
    // Evaluation runs before the first step and after the last only (outside the timed steps); one save at the end.
    cfg.eval.every = steps + 1;
    cfg.output.save_every = steps + 1;
    cfg.output.dir = out.to_path_buf();
    Ok(cfg)
}

/// Runs `warmup + iters` optimiser steps of the workload `name` on `devices` (one worker each) and times the last
/// `iters` (the step times worker 0 logs).
pub fn run_workload<A: AutodiffBackend>(
    name: &str,
    devices: &[A::Device],
    warmup: usize,
    iters: usize,
) -> Result<ParallelTiming, String> {
    let (which, workers) = parse_parallel(name).ok_or(format!("unknown workload '{name}'"))?;
    if devices.len() != workers {
        return Err(format!(
            "{name} needs {workers} devices, {} given",
            devices.len()
        ));
    }
    let out = std::env::temp_dir().join(format!(
        "alignprop-bench-{}-{}",
        name.replace('/', "-"),
        std::process::id()
    ));
    std::fs::remove_dir_all(&out).ok();
    let cfg = config(which, warmup + iters, &out)?;
    let images_per_step = cfg.train.batch_size * workers;
    let stop = AtomicBool::new(false);
    let mut logs: Vec<StepLog> = Vec::new();
    let mut on_step = |s: &StepLog| {
        eprintln!(
            "{name}: step {}/{}: {:.2} s",
            s.step,
            warmup + iters,
            s.time_s
        );
        logs.push(s.clone());
    };
    let result = if workers == 1 {
        run::<A>(cfg, &devices[0], false, &stop, &mut on_step, &mut |_| {})
    } else {
        run_parallel::<A>(
            cfg,
            devices,
            false,
            &stop,
            &ParallelOptions::default(),
            &mut on_step,
            &mut |_| {},
        )
    };
    std::fs::remove_dir_all(&out).ok();
    result.map_err(|e| e.to_string())?;
    let mut times: Vec<f64> = logs.iter().skip(warmup).map(|s| s.time_s * 1e3).collect();
    if times.is_empty() {
        return Err(format!("{name}: no timed step was logged"));
    }
    times.sort_by(f64::total_cmp);
    let median_ms = times[times.len() / 2];
    Ok(ParallelTiming {
        timing: Timing {
            median_ms,
            min_ms: times[0],
            max_ms: times[times.len() - 1],
            iters: times.len(),
        },
        workers,
        images_per_step,
        images_per_s: images_per_step as f64 / (median_ms / 1e3),
    })
}

/// The mid model as a diffusers folder (the benchmarks' mid UNet and mid VAE, a 768-wide 2-layer CLIP text
/// encoder, the fixture's tokenizer and scheduler), random weights, written once under the target folder's
/// `bench-models/` and reused.
pub fn mid_model_folder() -> Result<PathBuf, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let dir = target.join("bench-models/mid-sd");
    // The marker names what wrote the folder, so a folder from another version of this code is rewritten.
    const STAMP: &str = "mid-sd v2: mid UNet, mid VAE, CLIP 768x2, N(0, 1/fan_in) weights, seed 11";
    if std::fs::read_to_string(dir.join("complete")).is_ok_and(|s| s == STAMP) {
        return Ok(dir);
    }
    let err = |e: &dyn std::fmt::Display| e.to_string();
    std::fs::remove_dir_all(&dir).ok();
    let tiny = tiny_sd();
    for sub in ["tokenizer", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| err(&e))?;
        for entry in std::fs::read_dir(tiny.join(sub)).map_err(|e| err(&e))? {
            let entry = entry.map_err(|e| err(&e))?;
            std::fs::copy(entry.path(), dir.join(sub).join(entry.file_name()))
                .map_err(|e| err(&e))?;
        }
    }
    std::fs::copy(tiny.join("model_index.json"), dir.join("model_index.json"))
        .map_err(|e| err(&e))?;

    let mut text: CLIPTextConfig =
        read_json(&tiny.join("text_encoder/config.json")).map_err(|e| err(&e))?;
    text.hidden_size = 768;
    text.intermediate_size = 3072;
    text.num_attention_heads = 12;
    text.num_hidden_layers = 2;
    text.projection_dim = 768;
    write_random(
        &dir.join("text_encoder"),
        "model.safetensors",
        &text,
        |vb| CLIPTextModel::<B>::new(&text, vb).map(drop),
    )?;
    let unet = mid_unet_config();
    write_random(
        &dir.join("unet"),
        "diffusion_pytorch_model.safetensors",
        &unet,
        |vb| UNet2DConditionModel::<B>::new(&unet, vb).map(drop),
    )?;
    let vae = mid_vae_config();
    write_random(
        &dir.join("vae"),
        "diffusion_pytorch_model.safetensors",
        &vae,
        |vb| AutoencoderKL::<B>::new(&vae, vb).map(drop),
    )?;
    std::fs::write(dir.join("complete"), STAMP).map_err(|e| err(&e))?;
    Ok(dir)
}

type B = burn::backend::Flex;

/// Writes `config` as `folder/config.json` and random weights for every tensor `build` asks for as
/// `folder/weights`: ones for 1-d `*.weight` (norm scales), zeros for biases, N(0, 1/fan_in) otherwise.
fn write_random<C: serde::Serialize>(
    folder: &Path,
    weights: &str,
    config: &C,
    build: impl FnOnce(&VarBuilder<B>) -> alignprop_io::weights::Result<()>,
) -> Result<(), String> {
    std::fs::create_dir_all(folder).map_err(|e| e.to_string())?;
    let json = serde_json::to_string_pretty(config).map_err(|e| e.to_string())?;
    std::fs::write(folder.join("config.json"), json).map_err(|e| e.to_string())?;
    let vb = VarBuilder::<B>::zeros(&Default::default(), DType::F32);
    build(&vb).map_err(|e| e.to_string())?;
    let mut rng = alignprop_pipeline::NoiseRng::new(11);
    let tensors: Vec<(String, TensorData)> = vb
        .used_tensors()
        .into_iter()
        .map(|(key, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if key.ends_with("bias") {
                vec![0.0; n]
            } else if shape.len() == 1 {
                vec![1.0; n]
            } else {
                let fan_in: usize = shape[1..].iter().product();
                let std = (1.0 / fan_in.max(1) as f64).sqrt();
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            };
            (key, TensorData::new(values, shape))
        })
        .collect();
    alignprop_io::weights::write_safetensors(
        &folder.join(weights),
        &tensors,
        &[("format".to_string(), "pt".to_string())].into(),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    type A = burn::backend::Autodiff<burn::backend::Flex>;

    #[test]
    fn names_parse_and_the_mid_folder_loads() {
        assert_eq!(parse_parallel("parallel/mid_w4"), Some(("mid", 4)));
        assert_eq!(parse_parallel("parallel/tiny_w1"), Some(("tiny", 1)));
        assert!(
            parse_parallel("parallel/huge_w2").is_none()
                && parse_parallel("parallel/mid_w0").is_none()
        );
        for name in PARALLEL {
            assert!(parse_parallel(name).is_some(), "{name}");
        }
        let dir = mid_model_folder().unwrap();
        let d = Default::default();
        let unet =
            UNet2DConditionModel::<burn::backend::Flex>::load(dir.join("unet"), &d, DType::F32)
                .unwrap();
        assert_eq!((unet.down_blocks.len(), unet.in_channels()), (4, 4));
        AutoencoderKL::<burn::backend::Flex>::load(dir.join("vae"), &d, DType::F32).unwrap();
        CLIPTextModel::<burn::backend::Flex>::load(dir.join("text_encoder"), &d, DType::F32)
            .unwrap();
    }

    /// Two workers on the CPU: one timed step of the demo, the global batch is both workers' images.
    #[test]
    fn tiny_two_workers_time_one_step() {
        let t = run_workload::<A>(
            "parallel/tiny_w2",
            &[Default::default(), Default::default()],
            0,
            1,
        )
        .unwrap();
        assert_eq!((t.workers, t.images_per_step, t.timing.iters), (2, 4, 1));
        assert!(t.timing.median_ms > 0.0 && t.images_per_s > 0.0);
        let err = run_workload::<A>("parallel/tiny_w2", &[Default::default()], 0, 1).unwrap_err();
        assert!(err.contains("needs 2 devices, 1 given"), "{err}");
    }
}
