//! `alignprop convert single-file` on the tiny SDXL fixture's original (sgm) single file
//! (`tests/fixtures/tiny-sdxl/single_file/tiny-sdxl.safetensors`): the converted folder samples exactly as the
//! fixture's diffusers folder, with the fixture's configs and with SDXL's defaults for everything but the networks'
//! config.json (scheduler, both tokenizers, model index).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_alignprop"))
}

fn tiny_sdxl() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sdxl")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("alignprop-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn sample_from(model: &Path, out: &Path) -> Output {
    bin()
        .args([
            "sample", "--prompt", "a cat", "--steps", "3", "--seed", "5", "--device", "cpu",
        ])
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run alignprop")
}

fn convert(out: &Path, configs: &Path) -> Output {
    bin()
        .args(["convert", "single-file"])
        .arg(tiny_sdxl().join("single_file/tiny-sdxl.safetensors"))
        .arg(out)
        .arg("--configs")
        .arg(configs)
        .output()
        .expect("run alignprop")
}

#[test]
fn convert_sdxl_single_file_gives_a_working_folder() {
    let d = tmp("conv_sdxl");
    std::fs::create_dir_all(&d).unwrap();
    let png = "0000_a_cat_0.png";
    ok(sample_from(&tiny_sdxl(), &d.join("s_orig")));
    let original = read(&d.join("s_orig").join(png));

    // With the fixture folder's configs.
    let conv = d.join("converted");
    let out = ok(convert(&conv, &tiny_sdxl()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("text_encoder_2: 165 tensors"), "{err}");
    assert!(!err.contains("note:"), "tensors left out: {err}");
    for f in [
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "text_encoder_2/config.json",
        "tokenizer/vocab.json",
        "tokenizer_2/special_tokens_map.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(conv.join(f).is_file(), "{f} missing");
    }
    ok(sample_from(&conv, &d.join("s_conv")));
    assert_eq!(
        read(&d.join("s_conv").join(png)),
        original,
        "the converted SDXL model samples differently"
    );

    // With only the networks' configs: SDXL's scheduler, tokenizers and model index.
    let configs = d.join("configs");
    for c in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        std::fs::create_dir_all(configs.join(c)).unwrap();
        std::fs::copy(
            tiny_sdxl().join(c).join("config.json"),
            configs.join(c).join("config.json"),
        )
        .unwrap();
    }
    let inferred = d.join("inferred");
    ok(convert(&inferred, &configs));
    let json = |p: PathBuf| -> serde_json::Value { serde_json::from_slice(&read(&p)).unwrap() };
    let sched = json(inferred.join("scheduler/scheduler_config.json"));
    assert_eq!(sched["_class_name"], "EulerDiscreteScheduler");
    assert_eq!(sched["prediction_type"], "epsilon");
    assert_eq!(
        json(inferred.join("tokenizer_2/tokenizer_config.json"))["pad_token"],
        "!"
    );
    let index = json(inferred.join("model_index.json"));
    assert_eq!(index["_class_name"], "StableDiffusionXLPipeline");
    assert_eq!(index["force_zeros_for_empty_prompt"], true);
    ok(sample_from(&inferred, &d.join("s_inferred")));
    assert_eq!(
        read(&d.join("s_inferred").join(png)),
        original,
        "the SDXL defaults (scheduler, tokenizers) sample differently from the SDXL folder"
    );
    std::fs::remove_dir_all(d).ok();
}
