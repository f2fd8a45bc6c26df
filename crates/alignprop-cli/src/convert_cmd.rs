//! `alignprop convert ...`: weight-file conversions (a reward's `.pth` to safetensors; a single-file SD1.x / SD2.x /
//! SDXL checkpoint to a diffusers folder).

use std::path::PathBuf;

use alignprop_diffusion::convert::{ConvertOptions, single_file_to_diffusers};
use anyhow::{Result, bail};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum ConvertCommand {
    /// A PyTorch `.pth` / `.pt` state dict (e.g. LAION's aesthetic head) to safetensors, read without executing
    /// any pickle code. Float tensors are written as float32.
    Pth {
        /// The `.pth` / `.pt` file.
        input: PathBuf,
        /// The `.safetensors` file to write.
        output: PathBuf,
    },
    /// A single-file SD1.x, SD2.x or SDXL checkpoint (`model.diffusion_model.*`, `first_stage_model.*`, and
    /// `cond_stage_model.transformer.*` (SD1.x), `cond_stage_model.model.*` (SD2.x, OpenCLIP) or
    /// `conditioner.embedders.{0,1}.*` (SDXL base: CLIP ViT-L + OpenCLIP bigG) keys) to a diffusers folder (unet/,
    /// vae/, text_encoder/, tokenizer/, scheduler/, model_index.json; SDXL: also text_encoder_2/ and tokenizer_2/),
    /// tensors in their stored dtype. SD2.x files are taken for SD 2.1 (768 px, v-prediction) unless
    /// --prediction-type or --configs says otherwise; SDXL files for SDXL base 1.0 (1024 px, epsilon, Euler
    /// scheduler config, VAE scaling factor 0.13025, force_zeros_for_empty_prompt).
    SingleFile {
        /// The `.safetensors` checkpoint (`.ckpt` pickles are refused: convert them to safetensors first).
        input: PathBuf,
        /// The diffusers folder to create.
        output: PathBuf,
        /// A diffusers folder whose unet/vae/text_encoder (SDXL: and text_encoder_2) config.json (and scheduler/,
        /// tokenizer/, tokenizer_2/) describe the checkpoint; default: SD1.5's configs (SD 2.1's for an SD2.x file,
        /// SDXL base 1.0's for an SDXL file) adjusted to the tensor shapes.
        #[arg(long)]
        configs: Option<PathBuf>,
        /// A tokenizer folder to copy; default: SD1.5's CLIP tokenizer, bundled (padding with "!" for SD2.x).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// SDXL: the folder to copy as tokenizer_2/; default: the bundled CLIP tokenizer padding with "!".
        #[arg(long)]
        tokenizer_2: Option<PathBuf>,
        /// What the model predicts, which a single file does not store: epsilon (SD1.x, the 512-px SD2 base
        /// models, SDXL), v_prediction (SD 2.0-v / 2.1 at 768 px) or sample; default: --configs' scheduler, else
        /// epsilon for SD1.x and SDXL and v_prediction for SD2.x.
        #[arg(long, value_parser = ["epsilon", "v_prediction", "sample"])]
        prediction_type: Option<String>,
        /// Write into an existing non-empty folder.
        #[arg(long)]
        overwrite: bool,
    },
}

pub fn run(cmd: ConvertCommand) -> Result<()> {
    match cmd {
        ConvertCommand::Pth { input, output } => {
            if output.is_dir() {
                bail!(
                    "{}: is a folder, expected a .safetensors file path",
                    output.display()
                );
            }
            let n = alignprop_io::pth::pth_to_safetensors(&input, &output)?;
            eprintln!("wrote {} ({n} tensors)", output.display());
        }
        ConvertCommand::SingleFile {
            input,
            output,
            configs,
            tokenizer,
            tokenizer_2,
            prediction_type,
            overwrite,
        } => {
            if input
                .extension()
                .is_some_and(|e| e == "ckpt" || e == "pt" || e == "bin")
            {
                bail!(
                    "{}: pickle checkpoints are not read (they can execute code); use the .safetensors release",
                    input.display()
                );
            }
            let opts = ConvertOptions {
                configs_from: configs,
                tokenizer_from: tokenizer,
                tokenizer_2_from: tokenizer_2,
                prediction_type,
                overwrite,
            };
            eprintln!(
                "converting {} (loads each network once on the CPU) ...",
                input.display()
            );
            let report = single_file_to_diffusers(&input, &output, &opts)?;
            for (component, n) in &report.tensors {
                eprintln!("  {component}: {n} tensors");
            }
            eprintln!("  configs: {}", report.configs);
            if !report.unused_keys.is_empty() {
                eprintln!(
                    "  note: {} tensors of the checkpoint belong to no network and were left out (first: {})",
                    report.unused_keys.len(),
                    report.unused_keys[0]
                );
            }
            eprintln!("wrote {}", output.display());
        }
    }
    Ok(())
}
