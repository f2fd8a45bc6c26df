//! `alignprop train`: AlignProp fine-tuning from a TOML config, with command-line overrides.

use std::path::{Path, PathBuf};

use alignprop_device::{Cpu, Cuda, DeviceChoice, Wgpu, cuda_device, wgpu_device};
use std::sync::atomic::{AtomicBool, Ordering};

use alignprop_trainer::{Resume, RunEnd, TrainConfig, builtin};
use anyhow::{Context, Result, anyhow, bail};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A TOML training config (see configs/), or the name of a built-in preset (tiny_demo, aesthetic, aesthetic_k1,
    /// hps, hps_k1: embedded in the binary). Without one, the built-in CPU demo runs (tiny_demo: a tiny pretrained
    /// shapes model aligned to a brightness reward in about a minute; before_after.png shows the change).
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
    /// With --resume: continue even though the config differs from the checkpoint's (in more than train.steps,
    /// eval.* and output.*); the numbers then differ from an uninterrupted run.
    #[arg(long, requires = "resume")]
    pub allow_config_change: bool,
    /// cpu, cuda, cuda:N, wgpu or wgpu:N (any Vulkan / Metal / DX12 GPU; default: CUDA when a GPU is present, else CPU).
    #[arg(long, value_parser = crate::parse_device)]
    pub device: Option<DeviceChoice>,
    /// Data-parallel training: one worker per device, LoRA gradients all-reduced once per optimiser step (global
    /// batch = batch_size x grad_accum x devices). A comma-separated list of one backend (`cuda:0,cuda:1`,
    /// `wgpu:0,wgpu:1`, `cpu,cpu`), or `all` (every CUDA GPU). Replaces `[train] devices`.
    #[arg(long, value_name = "LIST", conflicts_with = "device")]
    pub devices: Option<String>,
}

/// The devices of a data-parallel run: `all` (every CUDA GPU the driver reports) or a comma-separated list of
/// devices of one backend; an error names the entry that does not parse or the mix of backends.
pub fn parse_devices(list: &[String]) -> Result<Vec<DeviceChoice>> {
    if list.len() == 1 && list[0].trim() == "all" {
        return match alignprop_device::cuda_status() {
            alignprop_device::CudaStatus::Available(n) => {
                Ok((0..n).map(DeviceChoice::Cuda).collect())
            }
            alignprop_device::CudaStatus::Unavailable(why) => {
                bail!("--devices all: no CUDA GPU ({why})")
            }
        };
    }
    let devices: Vec<DeviceChoice> = list
        .iter()
        .map(|d| {
            d.trim()
                .parse::<DeviceChoice>()
                .map_err(|e| anyhow!("--devices: {e}"))
        })
        .collect::<Result<_>>()?;
    let kind = |d: &DeviceChoice| std::mem::discriminant(d);
    if let Some(first) = devices.first()
        && let Some(other) = devices.iter().find(|d| kind(d) != kind(first))
    {
        bail!("--devices: {first} and {other} are different backends (one backend per run)");
    }
    let mut seen = std::collections::BTreeSet::new();
    for d in &devices {
        if !matches!(d, DeviceChoice::Cpu) && !seen.insert(d.to_string()) {
            bail!("--devices: {d} is listed twice (one worker per GPU)");
        }
    }
    Ok(devices)
}

/// The built-in demo's config (embedded in the binary, written to the cache folder on first use).
fn builtin_demo() -> Result<PathBuf> {
    builtin::preset("tiny_demo")
        .map_err(anyhow::Error::msg)?
        .ok_or_else(|| anyhow!("the built-in demo config is missing from this build"))
}

/// The config file to run: `--config`'s path where it exists; else, where it names a built-in preset (`aesthetic`,
/// `aesthetic.toml` or `configs/aesthetic.toml` run from a folder without that file), the preset written out from
/// the binary; without `--config`, the demo.
fn config_path(arg: Option<&Path>) -> Result<PathBuf> {
    let Some(p) = arg else {
        let demo = builtin_demo()?;
        eprintln!(
            "no --config given: running the built-in CPU demo ({})",
            demo.display()
        );
        return Ok(demo);
    };
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let bare = p
        .parent()
        .is_none_or(|d| d.as_os_str().is_empty() || d.ends_with("configs"));
    if bare && let Some(preset) = builtin::preset(name).map_err(anyhow::Error::msg)? {
        eprintln!(
            "{}: not found here: using the built-in preset '{}' ({})",
            p.display(),
            name.trim_end_matches(".toml"),
            preset.display()
        );
        return Ok(preset);
    }
    bail!(
        "{}: no such config file (the built-in presets run by name: {})",
        p.display(),
        builtin::preset_names().join(", ")
    )
}

/// Reads the config with the `KEY=VALUE` overrides applied (unknown keys are errors naming the key).
///
/// Values are TOML (numbers, booleans, quoted strings, arrays); a bare word is taken as a string only where the
/// config holds a string or nothing (`--set model.path=/models/sd15`), and is an error naming the key and the
/// expected type where it holds a number or a boolean. Setting a section's `mode` (`truncation.mode=gaussian`)
/// drops the keys of its previous mode, so the new mode's keys follow with `--set`. Input paths given with `--set`
/// are relative to the working folder (the config's own are relative to the config file's folder).
pub fn load_config(path: &Path, overrides: &[String]) -> Result<TrainConfig> {
    let mut cfg = TrainConfig::from_file(path).map_err(|e| anyhow!(e))?;
    if overrides.is_empty() {
        return Ok(cfg);
    }
    let from_file: Vec<PathBuf> = cfg
        .input_paths_mut()
        .into_iter()
        .map(|p| p.clone())
        .collect();
    let mut value = toml::Value::try_from(&cfg).context("config to TOML")?;
    for o in overrides {
        let (key, raw) = o
            .split_once('=')
            .ok_or_else(|| anyhow!("--set {o}: expected KEY=VALUE"))?;
        let (key, raw) = (key.trim(), raw.trim());
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            bail!("--set {o}: '{key}' is not a dotted config key (e.g. train.steps)");
        }
        let current = lookup(&value, &parts).cloned();
        let parsed = parse_value(o, key, raw, current.as_ref())?;
        let mut node = &mut value;
        for (i, part) in parts.iter().enumerate() {
            let table = node
                .as_table_mut()
                .ok_or_else(|| anyhow!("--set {key}: '{part}' is not inside a section"))?;
            if i + 1 == parts.len() {
                if *part == "mode" && current.as_ref() != Some(&parsed) {
                    // A new mode: the old mode's keys do not apply to it.
                    table.clear();
                }
                table.insert(part.to_string(), parsed.clone());
                break;
            }
            node = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()));
        }
    }
    cfg = value.try_into().map_err(|e| {
        anyhow!(
            "{}: with --set {}: {}",
            path.display(),
            overrides.join(" --set "),
            one_line(&e.to_string())
        )
    })?;
    // Paths typed on the command line are relative to where the command runs.
    let cwd = std::env::current_dir().context("the working folder")?;
    for p in cfg.input_paths_mut() {
        if p.is_relative() && !from_file.contains(p) {
            *p = cwd.join(&*p);
        }
    }
    Ok(cfg)
}

/// The value at `parts` of a TOML tree, if any.
fn lookup<'a>(value: &'a toml::Value, parts: &[&str]) -> Option<&'a toml::Value> {
    parts
        .iter()
        .try_fold(value, |node, part| node.as_table()?.get(*part))
}

/// An override's value: TOML where it parses; a bare word where the key holds a string (or nothing yet);
/// otherwise an error that names the key and the type it holds.
fn parse_value(
    o: &str,
    key: &str,
    raw: &str,
    current: Option<&toml::Value>,
) -> Result<toml::Value> {
    let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    let kind = |v: &toml::Value| v.type_str();
    match (parsed, current) {
        (Some(v), Some(c)) if kind(&v) != kind(c) && !(v.is_integer() && c.is_float()) => {
            if c.is_str() {
                // `--set model.dtype=1` style: keep the text.
                Ok(toml::Value::String(raw.to_string()))
            } else {
                bail!(
                    "--set {o}: {key} holds {}{}, got {} '{raw}'",
                    article(kind(c)),
                    now(c),
                    article(kind(&v))
                )
            }
        }
        (Some(v), Some(c)) if v.is_integer() && c.is_float() => {
            Ok(toml::Value::Float(v.as_integer().unwrap_or_default() as f64))
        }
        (Some(v), _) => Ok(v),
        (None, None) => Ok(toml::Value::String(raw.to_string())),
        (None, Some(c)) if c.is_str() => Ok(toml::Value::String(raw.to_string())),
        (None, Some(c)) => bail!(
            "--set {o}: '{raw}' is not a valid value for {key}, which holds {}{}",
            article(kind(c)),
            now(c)
        ),
    }
}

/// ` (now VALUE)` for a scalar, nothing for a table or an array (multi-line in TOML).
fn now(c: &toml::Value) -> String {
    if c.is_table() || c.is_array() {
        String::new()
    } else {
        format!(" (now {c})")
    }
}

fn article(kind: &str) -> String {
    match kind {
        "integer" => "an integer".into(),
        "array" => "an array".into(),
        other => format!("a {other}"),
    }
}

/// An error message on one line (TOML's errors span several, with a caret under the spot).
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn run(args: TrainArgs) -> Result<()> {
    let path = config_path(args.config.as_deref())?;
    let mut cfg = load_config(&path, &args.overrides)?;
    if let Some(out) = &args.out {
        cfg.output.dir = out.clone();
    }
    // The built-in demo is disposable: running it again replaces its previous run (any other run refuses to
    // start over an earlier run's checkpoints).
    let demo_dir = args.config.is_none() && args.out.is_none() && !args.resume;
    if demo_dir && cfg.output.dir.join("checkpoints").is_dir() {
        eprintln!(
            "replacing the previous demo run in {}",
            cfg.output.dir.display()
        );
        std::fs::remove_dir_all(&cfg.output.dir)
            .with_context(|| format!("{}: cannot remove", cfg.output.dir.display()))?;
    }
    if cfg.model.path.is_none() {
        eprintln!(
            "no model.path: using the built-in demo model (tiny-shapes: 64x64 pictures of shapes, not SD1.5)"
        );
    }
    let resume = match (args.resume, args.allow_config_change) {
        (false, _) => Resume::No,
        (true, false) => Resume::Checked,
        (true, true) => Resume::AllowConfigChange,
    };
    if let Some(list) = &args.devices {
        cfg.train.devices = list.split(',').map(|s| s.trim().to_string()).collect();
    }
    // One device (`--device`, or the only entry of `[train] devices`) or several (data parallel): the same loop.
    let devices = if !cfg.train.devices.is_empty() {
        parse_devices(&cfg.train.devices)?
    } else if cfg.model.path.is_none() && args.device.is_none() {
        vec![DeviceChoice::Cpu]
    } else {
        vec![crate::resolve_device(args.device)]
    };
    match devices[0] {
        DeviceChoice::Cpu => {
            train_on::<Autodiff<Cpu>>(cfg, &vec![Default::default(); devices.len()], resume)
        }
        DeviceChoice::Cuda(_) => {
            train_on::<Autodiff<Cuda>>(cfg, &open(&devices, cuda_device)?, resume)
        }
        DeviceChoice::Wgpu(_) => {
            train_on::<Autodiff<Wgpu>>(cfg, &open(&devices, wgpu_device)?, resume)
        }
    }
}

/// Opens every device of `devices` (all of one backend, as [`parse_devices`] returns them) by its index.
fn open<D>(devices: &[DeviceChoice], make: fn(usize) -> Result<D, String>) -> Result<Vec<D>> {
    devices
        .iter()
        .map(|d| make(d.index()).map_err(anyhow::Error::msg))
        .collect()
}

/// Trains on one device, or data-parallel on several of one backend.
fn train_on<B: AutodiffBackend>(
    cfg: TrainConfig,
    devices: &[B::Device],
    resume: Resume,
) -> Result<()> {
    if cfg.train.steps == 0 {
        bail!("train.steps is 0: nothing to do");
    }
    if devices.len() > 1 {
        eprintln!(
            "data parallel: {} workers ({}), global batch {} images per optimiser step",
            devices.len(),
            cfg.train.devices.join(", "),
            cfg.train.batch_size * cfg.train.grad_accum * devices.len()
        );
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
    let mut on_step = |s: &alignprop_trainer::StepLog| {
        bar.set_message(format!(
            "reward {:.4} loss {:.4} |g| {:.3} K {:.1} {:.2} img/s",
            s.reward_mean, s.loss, s.grad_norm, s.k, s.images_per_s
        ));
        bar.inc(1);
    };
    let mut on_eval = |e: &alignprop_trainer::EvalLog| {
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
    };
    let summary = if devices.len() == 1 {
        // On a worker of the CPU kernels' thread pool, all threads on the main heap (`alignprop_device::single_job`).
        // Not the data-parallel run: its workers wait for each other and must not hold the pool's threads while
        // they do, and they allocate at the same time (one heap would be contended).
        alignprop_device::single_job(|| {
            alignprop_trainer::run::<B>(cfg, &devices[0], resume, &STOP, &mut on_step, &mut on_eval)
        })?
    } else {
        alignprop_trainer::run_parallel::<B>(
            cfg,
            devices,
            resume,
            &STOP,
            &Default::default(),
            &mut on_step,
            &mut on_eval,
        )?
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use alignprop_trainer::Truncation;

    fn demo_with(sets: &[&str]) -> Result<TrainConfig> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        load_config(&builtin_demo().unwrap(), &sets)
    }

    /// Setting `truncation.mode` drops the old mode's keys (the demo's `k`), so the new mode's keys follow.
    #[test]
    fn setting_a_mode_replaces_the_sections_keys() {
        let cfg = demo_with(&[
            "truncation.mode=gaussian",
            "truncation.mean=42",
            "truncation.std=5",
        ])
        .unwrap();
        assert_eq!(
            cfg.truncation,
            Truncation::Gaussian {
                mean: 42.0,
                std: 5.0
            }
        );
        // The same mode again keeps its keys.
        let cfg = demo_with(&["truncation.mode=fixed"]).unwrap();
        assert_eq!(cfg.truncation, Truncation::Fixed { k: 3 });
        // A new mode without its keys names the missing one.
        let e = demo_with(&["truncation.mode=gaussian"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("mean") && !e.contains('\n'), "{e}");
    }

    /// A value that is not of the key's type is an error naming the key and the type; integers widen to floats;
    /// bare words are strings where the config holds strings.
    #[test]
    fn set_values_are_type_checked() {
        for (set, needles) in [
            (
                "train.steps=abc",
                &["train.steps", "an integer", "'abc'"][..],
            ),
            ("optimizer.lr=fast", &["optimizer.lr", "a float"]),
            (
                "train.steps=1.5",
                &["train.steps holds an integer", "a float '1.5'"],
            ),
            (
                "sampling.eta=true",
                &["sampling.eta holds a float", "a boolean"],
            ),
            ("train.stepz=3", &["stepz"]),
            ("train=3", &["train holds a table"]),
            ("=3", &["not a dotted config key"]),
            ("train.steps", &["expected KEY=VALUE"]),
        ] {
            let e = demo_with(&[set]).unwrap_err().to_string();
            assert!(
                needles.iter().all(|n| e.contains(n)) && !e.contains('\n'),
                "--set {set}: {e}"
            );
        }
        let cfg = demo_with(&[
            "sampling.guidance_scale=7",
            "model.dtype=bf16",
            "model.bf16_products=true",
            "reward.kind=sum",
        ]);
        // `sum` without terms is a validate() error, not a parse error: the parse succeeds.
        let cfg = cfg.unwrap();
        assert_eq!(cfg.sampling.guidance_scale, 7.0);
        assert_eq!(cfg.model.dtype, "bf16");
        assert!(cfg.model.bf16_products);
    }

    /// Paths given with --set are relative to the working folder; the config's own stay relative to the config.
    #[test]
    fn set_paths_are_relative_to_the_working_folder() {
        let cwd = std::env::current_dir().unwrap();
        let cfg = demo_with(&["model.path=models/sd15", "eval.prompts=my_prompts.txt"]).unwrap();
        assert_eq!(cfg.model.path, Some(cwd.join("models/sd15")));
        assert_eq!(cfg.eval.prompts, cwd.join("my_prompts.txt"));
        let config_dir = builtin_demo().unwrap().parent().unwrap().to_path_buf();
        assert_eq!(cfg.train.prompts, config_dir.join("prompts/shapes.txt"));
        let cfg = demo_with(&["model.path=/abs/sd15"]).unwrap();
        assert_eq!(cfg.model.path, Some(PathBuf::from("/abs/sd15")));
    }
}
