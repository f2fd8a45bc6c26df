//! The `alignprop` binary on the tiny SDXL fixture (`tests/fixtures/tiny-sdxl`): the family is read from the folder
//! (no flag): `train` (two AlignProp steps with the brightness reward, 64x64 from the UNet's sample_size, pooled-text
//! and time-id conditioning), `sample` with the trained LoRA (seeded, the LoRA changes the pictures) and `eval`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_alignprop"))
}

fn sdxl() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sdxl")
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

fn sample(out: &Path, extra: &[&str]) -> Output {
    let mut c = bin();
    c.args([
        "sample", "--prompt", "a cat", "--steps", "3", "--seed", "5", "--device", "cpu",
    ])
    .arg("--model")
    .arg(sdxl())
    .arg("--out")
    .arg(out)
    .args(extra);
    c.output().expect("run alignprop")
}

fn pngs(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no PNG in {}", dir.display());
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
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
    ok(sample(&a, &[]));
    ok(sample(&b, &[]));
    assert_eq!(pngs(&a), pngs(&b), "seeded sampling is reproducible");
    let lora_arg = lora.to_string_lossy().to_string();
    ok(sample(&l, &["--lora", &lora_arg, "--lora-scale", "50"]));
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
