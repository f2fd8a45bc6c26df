//! The `alignprop` binary on the tiny SDXL fixture (`tests/fixtures/tiny-sdxl`), whose family is read from the folder
//! (no flag):
//! - `train` (two AlignProp steps with the brightness reward, 64x64 from the UNet's sample_size, pooled-text and
//!   time-id conditioning), `sample` with the trained LoRA (seeded, the LoRA changes the pictures) and `eval`;
//! - `lora ...` and `sample --lora` with the fixture's kohya LoRA (original sgm module names,
//!   `lora_unet_input_blocks_4_1_...`): `convert --model` writes exactly the fixture's kohya file from the peft folder
//!   and translates the kohya names back for peft output; without `--model` that is one clear error; `sample` with
//!   the kohya file draws the same pictures as with the peft folder;
//! - `convert single-file` on the fixture's original (sgm) single file (`single_file/tiny-sdxl.safetensors`): the
//!   converted folder samples exactly as the fixture's diffusers folder, with the fixture's configs and with SDXL's
//!   defaults for everything but the networks' config.json (scheduler, both tokenizers, model index).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use alignprop_io::{SafetensorsSource, TensorSource};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_alignprop"))
}

/// The tiny SDXL fixture.
fn sdxl() -> PathBuf {
    alignprop_testing::tiny_sdxl()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("alignprop-cli-sdxl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `sample --prompt "a cat" --seed 5` from `model` into `out` with `steps` steps and the `extra` arguments.
fn sample(model: &Path, out: &Path, steps: usize, extra: &[&str]) -> Output {
    let mut c = bin();
    c.args([
        "sample", "--prompt", "a cat", "--seed", "5", "--device", "cpu",
    ])
    .arg("--steps")
    .arg(steps.to_string())
    .arg("--model")
    .arg(model)
    .arg("--out")
    .arg(out)
    .args(extra);
    c.output().expect("run alignprop")
}

/// The PNG files of `dir`, by name.
fn pngs(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no PNG in {}", dir.display());
    files.iter().map(|p| read(p)).collect()
}

/// Every tensor of a safetensors file: shape and values by key.
fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let src = SafetensorsSource::open(&[path]).unwrap();
    src.keys()
        .into_iter()
        .map(|k| {
            let raw = src.find(&k).unwrap().unwrap();
            (k, (raw.shape.clone(), raw.data.to_vec::<f32>().unwrap()))
        })
        .collect()
}

#[test]
fn sdxl_folder_trains_samples_and_evaluates() {
    let run = tmp("train");
    let mut c = bin();
    c.args(["train", "--device", "cpu"])
        .arg("--set")
        .arg(format!("model.path={}", sdxl().display()))
        .args([
            "--set",
            "sampling.steps=2",
            "--set",
            "truncation.k=1",
            "--set",
            "train.steps=2",
        ])
        .args(["--set", "eval.every=100", "--set", "output.save_every=1"])
        .arg("--out")
        .arg(&run);
    ok(c.output().unwrap());
    let lora = run.join("pytorch_lora_weights.safetensors");
    assert!(lora.is_file());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    assert!(metrics.contains("\"loss\""), "{metrics}");

    let (a, b, l) = (tmp("sa"), tmp("sb"), tmp("sl"));
    ok(sample(&sdxl(), &a, 3, &[]));
    ok(sample(&sdxl(), &b, 3, &[]));
    assert_eq!(pngs(&a), pngs(&b), "seeded sampling is reproducible");
    let lora_arg = lora.to_string_lossy().to_string();
    ok(sample(
        &sdxl(),
        &l,
        3,
        &["--lora", &lora_arg, "--lora-scale", "50"],
    ));
    assert_ne!(pngs(&a), pngs(&l), "the trained LoRA changes the pictures");
    let img = image::open(
        std::fs::read_dir(&a)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "png"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (img.width(), img.height()),
        (64, 64),
        "the model's default size (sample_size 8 x 8)"
    );

    let mut e = bin();
    e.args(["eval", "--images"])
        .arg(&a)
        .args(["--reward", "brightness"]);
    ok(e.output().unwrap());
    for d in [run, a, b, l] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn sdxl_kohya_lora_converts_both_ways_and_samples() {
    let d = tmp("lora");
    let kohya = sdxl().join("lora_kohya/tiny-sdxl-kohya.safetensors");
    // peft folder -> kohya for the SDXL model: the fixture's kohya file (keys, alphas, values).
    let ours = d.join("kohya.safetensors");
    ok(bin()
        .args(["lora", "convert"])
        .arg(sdxl().join("lora_peft"))
        .arg(&ours)
        .args(["--format", "kohya", "--model"])
        .arg(sdxl())
        .output()
        .unwrap());
    assert_eq!(tensors(&ours), tensors(&kohya));
    // kohya -> peft needs the model's layout: without --model one clear error, with it the peft tensors.
    let peft = d.join("peft.safetensors");
    let out = bin()
        .args(["lora", "convert"])
        .arg(&kohya)
        .arg(&peft)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--model") && err.contains("input_blocks"),
        "{err}"
    );
    ok(bin()
        .args(["lora", "convert"])
        .arg(&kohya)
        .arg(&peft)
        .arg("--model")
        .arg(sdxl().join("unet"))
        .output()
        .unwrap());
    let want = tensors(&sdxl().join("lora/pytorch_lora_weights.safetensors"));
    assert_eq!(tensors(&peft), want);
    // sample: the kohya file and the peft folder give the same pictures (and differ from the base model).
    let draw = |out: &Path, lora: Option<&Path>| {
        let lora = lora.map(|l| l.to_string_lossy().to_string());
        let extra: Vec<&str> = lora.iter().flat_map(|l| ["--lora", l.as_str()]).collect();
        ok(sample(&sdxl(), out, 2, &extra));
        pngs(out)
    };
    let with_kohya = draw(&d.join("s_kohya"), Some(&kohya));
    let with_peft = draw(&d.join("s_peft"), Some(&sdxl().join("lora_peft")));
    let base = draw(&d.join("s_base"), None);
    assert_eq!(with_kohya, with_peft);
    assert_ne!(with_kohya, base, "the LoRA changed nothing");
    std::fs::remove_dir_all(&d).ok();
}

fn convert(out: &Path, configs: &Path) -> Output {
    bin()
        .args(["convert", "single-file"])
        .arg(sdxl().join("single_file/tiny-sdxl.safetensors"))
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
    ok(sample(&sdxl(), &d.join("s_orig"), 3, &[]));
    let original = read(&d.join("s_orig").join(png));

    // With the fixture folder's configs.
    let conv = d.join("converted");
    let out = ok(convert(&conv, &sdxl()));
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
    ok(sample(&conv, &d.join("s_conv"), 3, &[]));
    assert_eq!(
        read(&d.join("s_conv").join(png)),
        original,
        "the converted SDXL model samples differently"
    );

    // With only the networks' configs: SDXL's scheduler, tokenizers and model index.
    let configs = d.join("configs");
    alignprop_testing::copy_sdxl_network_configs(&sdxl(), &configs);
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
    ok(sample(&inferred, &d.join("s_inferred"), 3, &[]));
    assert_eq!(
        read(&d.join("s_inferred").join(png)),
        original,
        "the SDXL defaults (scheduler, tokenizers) sample differently from the SDXL folder"
    );
    std::fs::remove_dir_all(d).ok();
}
