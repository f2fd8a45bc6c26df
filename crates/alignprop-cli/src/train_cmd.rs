//! `alignprop train`: AlignProp fine-tuning from a TOML config, with command-line overrides.

use std::path::{Path, PathBuf};

use alignprop_device::{Cpu, Cuda, DeviceChoice, Wgpu, cuda_device, wgpu_device};
use std::sync::atomic::{AtomicBool, Ordering};

use alignprop_trainer::{RunEnd, TrainConfig};
use anyhow::{Context, Result, anyhow, bail};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A TOML training config (see configs/). Without one, the tiny built-in CPU demo runs
    /// (configs/tiny_demo.toml: the repository's tiny model, brightness reward, about a minute).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config value: `--set train.steps=10` (repeatable; values are TOML: numbers, strings, booleans).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Output folder (overrides output.dir).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in the output folder from its newest checkpoint (same config and seed give the same
    /// numbers as an uninterrupted run).
    #[arg(long)]
    pub resume: bool,
    /// cpu, cuda, cuda:N, wgpu or wgpu:N (any Vulkan / Metal / DX12 GPU; default: CUDA when a GPU is present, else CPU).
    #[arg(long, value_parser = crate::parse_device)]
    pub device: Option<DeviceChoice>,
}

fn builtin_demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny_demo.toml")
}

/// Reads the config with the `KEY=VALUE` overrides applied (unknown keys are errors naming the key).
pub fn load_config(path: &Path, overrides: &[String]) -> Result<TrainConfig> {
    let mut cfg = TrainConfig::from_file(path).map_err(|e| anyhow!(e))?;
    if overrides.is_empty() {
        return Ok(cfg);
    }
    let mut value = toml::Value::try_from(&cfg).context("config to TOML")?;
    for o in overrides {
        let (key, raw) = o
            .split_once('=')
            .ok_or_else(|| anyhow!("--set {o}: expected KEY=VALUE"))?;
        let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        let mut node = &mut value;
        let parts: Vec<&str> = key.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let table = node
                .as_table_mut()
                .ok_or_else(|| anyhow!("--set {key}: '{part}' is not inside a section"))?;
            if i + 1 == parts.len() {
                table.insert(part.to_string(), parsed.clone());
                break;
            }
            node = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()));
        }
    }
    cfg = value.try_into().map_err(|e| anyhow!("--set: {e}"))?;
    Ok(cfg)
}

pub fn run(args: TrainArgs) -> Result<()> {
    let path = match &args.config {
        Some(p) => p.clone(),
        None => {
            eprintln!(
                "no --config given: running the tiny built-in CPU demo ({})",
                builtin_demo().display()
            );
            builtin_demo()
        }
    };
    let mut cfg = load_config(&path, &args.overrides)?;
    if let Some(out) = &args.out {
        cfg.output.dir = out.clone();
    }
    if cfg.model.path.is_none() {
        eprintln!(
            "no model.path: using the tiny built-in model (tests/fixtures/tiny-sd), a demo, not a real SD1.5"
        );
    }
    let device = if cfg.model.path.is_none() && args.device.is_none() {
        DeviceChoice::Cpu
    } else {
        crate::resolve_device(args.device)
    };
    match device {
        DeviceChoice::Cpu => train::<Autodiff<Cpu>>(cfg, &Default::default(), args.resume),
        DeviceChoice::Cuda(i) => {
            let d = cuda_device(i).map_err(anyhow::Error::msg)?;
            train::<Autodiff<Cuda>>(cfg, &d, args.resume)
        }
        DeviceChoice::Wgpu(i) => {
            let d = wgpu_device(i).map_err(anyhow::Error::msg)?;
            train::<Autodiff<Wgpu>>(cfg, &d, args.resume)
        }
    }
}

fn train<B: AutodiffBackend>(cfg: TrainConfig, device: &B::Device, resume: bool) -> Result<()> {
    if cfg.train.steps == 0 {
        bail!("train.steps is 0: nothing to do");
    }
    // Ctrl-C: finish the current step, write a checkpoint, exit (resume with --resume).
    static STOP: AtomicBool = AtomicBool::new(false);
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130); // a second Ctrl-C quits at once
        }
        eprintln!(
            "\nCtrl-C: finishing this step and writing a checkpoint (Ctrl-C again to quit at once)"
        );
    });
    let out = cfg.output.dir.clone();
    let bar = ProgressBar::new(cfg.train.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} eta {eta}] {msg}")
            .expect("template"),
    );
    let summary = alignprop_trainer::run::<B>(
        cfg,
        device,
        resume,
        &STOP,
        &mut |s| {
            bar.set_message(format!(
                "loss {:.4} reward {:.4} |g| {:.3} K {:.0}",
                s.loss, s.reward_mean, s.grad_norm, s.k
            ));
            bar.inc(1);
        },
        &mut |e| {
            let line = format!(
                "eval at step {}: reward {:.4} ± {:.4}",
                e.step, e.eval_reward_mean, e.eval_reward_std
            );
            // A hidden bar (output not a terminal) drops println: print the line directly then.
            if bar.is_hidden() {
                eprintln!("{line}")
            } else {
                bar.println(line)
            }
        },
    )?;
    bar.finish_and_clear();
    if summary.end == RunEnd::Interrupted {
        eprintln!(
            "interrupted: checkpoint written in {}/checkpoints; continue with --resume",
            out.display()
        );
        return Ok(());
    }
    match (summary.evals.first(), summary.evals.last()) {
        (Some(first), Some(last)) => eprintln!(
            "done: eval reward {:.4} -> {:.4}; {} steps run; LoRA {}; logs, eval grids and reward_curve.png in {}",
            first.eval_reward_mean,
            last.eval_reward_mean,
            summary.steps.len(),
            summary.lora.display(),
            out.display()
        ),
        _ => eprintln!(
            "done: {} steps run; LoRA {}",
            summary.steps.len(),
            summary.lora.display()
        ),
    }
    Ok(())
}
