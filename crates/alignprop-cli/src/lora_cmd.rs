//! `alignprop lora ...`: inspect, convert, scale, mix LoRA files, and merge one into a model.

use std::path::PathBuf;

use alignprop_lora::{LoraFormat, LoraWeights, MixMode};
use anyhow::{Result, bail};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum LoraCommand {
    /// Print the adapted modules, rank, alpha and parameter count of a LoRA file.
    Inspect { file: PathBuf },
    /// Rewrite a LoRA file in another key format (peft: diffusers' current format; diffusers: the older
    /// lora.down/lora.up keys; kohya: A1111/ComfyUI).
    Convert {
        input: PathBuf,
        output: PathBuf,
        #[arg(long, default_value = "peft")]
        format: LoraFormat,
    },
    /// Scale a LoRA's effect: c * L (0 = base model, 1 = unchanged).
    Scale {
        input: PathBuf,
        output: PathBuf,
        #[arg(long)]
        c: f64,
        #[arg(long, default_value = "peft")]
        format: LoraFormat,
    },
    /// Mix two LoRAs: c * L1 + (1 - c) * L2 (reward interpolation).
    Mix {
        first: PathBuf,
        second: PathBuf,
        output: PathBuf,
        #[arg(long)]
        c: f64,
        /// parameters (interpolate A and B, as AlignProp) or exact (the weight deltas interpolate exactly; rank adds).
        #[arg(long, default_value = "parameters")]
        mode: MixMode,
        #[arg(long, default_value = "peft")]
        format: LoraFormat,
    },
    /// Merge a LoRA into a diffusers model folder's UNet and write a complete merged model folder (usable by
    /// tools without LoRA support). Weights keep their stored dtype.
    Merge {
        /// The diffusers model folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
        #[arg(long)]
        model: PathBuf,
        /// The LoRA file (peft, diffusers or kohya keys).
        #[arg(long)]
        lora: PathBuf,
        /// Multiplier of the LoRA (1 = as trained, 0 = base model).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// The merged model folder to write (created; must not be the model folder).
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(cmd: LoraCommand) -> Result<()> {
    match cmd {
        LoraCommand::Inspect { file } => {
            let l = LoraWeights::read(&file)?;
            println!("file:        {}", file.display());
            println!("modules:     {}", l.modules.len());
            println!("parameters:  {}", l.num_params());
            match l.rank() {
                Some(r) => println!("rank:        {r}"),
                None => println!("rank:        mixed"),
            }
            let scales: std::collections::BTreeSet<String> = l
                .modules
                .values()
                .map(|p| format!("{}", p.scale()))
                .collect();
            println!(
                "alpha/rank:  {}",
                scales.into_iter().collect::<Vec<_>>().join(", ")
            );
            println!("targets:     {}", l.target_modules().join(", "));
        }
        LoraCommand::Convert {
            input,
            output,
            format,
        } => {
            LoraWeights::read(&input)?.write(&output, format)?;
            eprintln!("wrote {} ({format:?})", output.display());
        }
        LoraCommand::Scale {
            input,
            output,
            c,
            format,
        } => {
            alignprop_lora::scale(&LoraWeights::read(&input)?, c).write(&output, format)?;
            eprintln!("wrote {}", output.display());
        }
        LoraCommand::Mix {
            first,
            second,
            output,
            c,
            mode,
            format,
        } => {
            if !(0.0..=1.0).contains(&c) {
                bail!("--c must be in [0, 1], got {c}");
            }
            let m = alignprop_lora::mix(
                &LoraWeights::read(&first)?,
                &LoraWeights::read(&second)?,
                c,
                mode,
            )?;
            m.write(&output, format)?;
            eprintln!("wrote {}", output.display());
        }
        LoraCommand::Merge {
            model,
            lora,
            scale,
            out,
        } => {
            let l = LoraWeights::read(&lora)?;
            let r = alignprop_lora::merge_files::merge_into_model_folder(&model, &l, scale, &out)?;
            eprintln!(
                "merged {} adapters (x{scale}) into {} ({} tensors); model folder {}",
                r.merged,
                r.unet_file.display(),
                r.tensors,
                out.display()
            );
        }
    }
    Ok(())
}
