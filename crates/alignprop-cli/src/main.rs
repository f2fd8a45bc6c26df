//! `alignprop`: the command line of the project. It only parses arguments and wires the library crates together.

mod lora_cmd;
mod sample_cmd;
mod train_cmd;

use std::process::ExitCode;

use alignprop_diffusion::device::{self, DeviceChoice};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "alignprop",
    version,
    about = "Align text-to-image diffusion models to differentiable rewards (AlignProp), in Rust on burn",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fine-tune LoRA adapters by reward backpropagation (AlignProp). Without --config: the tiny CPU demo.
    Train(train_cmd::TrainArgs),
    /// Generate images from prompts with a Stable Diffusion model (optionally with a LoRA).
    Sample(sample_cmd::SampleArgs),
    /// Inspect, convert, scale and mix LoRA files.
    #[command(subcommand)]
    Lora(lora_cmd::LoraCommand),
}

/// `--device`: `cpu`, `cuda` or `cuda:N`; by default CUDA when a GPU is present, else the CPU.
pub fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse()
}

pub fn resolve_device(choice: Option<DeviceChoice>) -> DeviceChoice {
    choice.unwrap_or_else(device::default_device)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train_cmd::run(args),
        Command::Sample(args) => sample_cmd::run(args),
        Command::Lora(cmd) => lora_cmd::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear message (with its causes), never a panic backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
