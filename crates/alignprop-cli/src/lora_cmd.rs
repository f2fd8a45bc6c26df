//! `alignprop lora ...`: inspect, convert, scale, mix LoRA files, and merge one into a model.

use std::path::PathBuf;

use std::path::Path;

use alignprop_lora::{LoraFormat, LoraWeights, MixMode, UnetNames};
use anyhow::{Result, bail};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum LoraCommand {
    /// Print the adapted modules, rank, alpha and parameter count of a LoRA file.
    Inspect { file: PathBuf },
    /// Rewrite a LoRA file in another key format (peft: diffusers' current format; diffusers: the older
    /// lora.down/lora.up keys; kohya: A1111/ComfyUI). For SDXL give --model.
    Convert {
        input: PathBuf,
        output: PathBuf,
        #[arg(long, default_value = "peft")]
        format: LoraFormat,
        /// The model the LoRA is for (a diffusers folder or its unet/; config and tensor names only are read): kohya
        /// output then names the modules as kohya's tools do for that model (the original UNet's `input_blocks_*`
        /// names for SDXL), and a kohya SDXL input's names are translated for peft / diffusers output.
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Scale a LoRA's effect: c * L (0 = base model, 1 = unchanged).
    Scale {
        input: PathBuf,
        output: PathBuf,
        #[arg(long)]
        c: f64,
        #[arg(long, default_value = "peft")]
        format: LoraFormat,
        /// The model the LoRA is for (a diffusers folder or its unet/; config and tensor names only are read): kohya
        /// output then names the modules as kohya's tools do for that model (the original UNet's `input_blocks_*`
        /// names for SDXL), and a kohya SDXL input's names are translated for peft / diffusers output.
        #[arg(long)]
        model: Option<PathBuf>,
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
        /// The model the LoRA is for (a diffusers folder or its unet/; config and tensor names only are read): kohya
        /// output then names the modules as kohya's tools do for that model (the original UNet's `input_blocks_*`
        /// names for SDXL), and a kohya SDXL input's names are translated for peft / diffusers output.
        #[arg(long)]
        model: Option<PathBuf>,
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
            if l.has_sgm_names() {
                println!(
                    "names:       original (sgm) UNet's, as kohya's SDXL files (input_blocks.*, ...)"
                );
            }
        }
        LoraCommand::Convert {
            input,
            output,
            format,
            model,
        } => {
            let names = unet_names(model.as_deref())?;
            write(
                &read(&input, names.as_ref())?,
                &output,
                format,
                names.as_ref(),
            )?;
            eprintln!("wrote {} ({format:?})", output.display());
        }
        LoraCommand::Scale {
            input,
            output,
            c,
            format,
            model,
        } => {
            let names = unet_names(model.as_deref())?;
            let l = alignprop_lora::scale(&read(&input, names.as_ref())?, c);
            write(&l, &output, format, names.as_ref())?;
            eprintln!("wrote {}", output.display());
        }
        LoraCommand::Mix {
            first,
            second,
            output,
            c,
            mode,
            format,
            model,
        } => {
            if !(0.0..=1.0).contains(&c) {
                bail!("--c must be in [0, 1], got {c}");
            }
            let names = unet_names(model.as_deref())?;
            let (l1, l2) = (
                read(&first, names.as_ref())?,
                read(&second, names.as_ref())?,
            );
            if l1.has_sgm_names() != l2.has_sgm_names() {
                bail!(
                    "one LoRA names the original (sgm) UNet's modules (a kohya SDXL file), the other the diffusers \
                     modules: give --model to translate the names"
                );
            }
            let m = alignprop_lora::mix(&l1, &l2, c, mode)?;
            write(&m, &output, format, names.as_ref())?;
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

/// The module names of `--model`'s UNet, when given.
fn unet_names(model: Option<&Path>) -> Result<Option<UnetNames>> {
    Ok(model.map(UnetNames::from_folder).transpose()?)
}

/// A LoRA file, with kohya's original (sgm) UNet names translated for the model when one is given.
fn read(path: &Path, names: Option<&UnetNames>) -> Result<LoraWeights> {
    let l = LoraWeights::read(path)?;
    Ok(match names {
        Some(n) => l.resolve_names(n)?,
        None => l,
    })
}

/// Writes `l` in `format`: for the model's UNet when one is given (kohya keys as kohya's tools spell them for it).
fn write(
    l: &LoraWeights,
    output: &Path,
    format: LoraFormat,
    names: Option<&UnetNames>,
) -> Result<()> {
    match names {
        Some(n) => l.write_for(output, format, n)?,
        None => l.write(output, format)?,
    }
    Ok(())
}
