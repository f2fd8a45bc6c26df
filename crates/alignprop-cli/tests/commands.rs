//! The `alignprop` binary end to end on the tiny fixture model: sample (seeded, with a LoRA), train (a few
//! steps, then resume), and clear one-line errors for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_alignprop"))
}

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sd")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("alignprop-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run alignprop")
}

/// A failed command: non-zero exit, an `error:` line, no panic text.
fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(
        err.contains("error:") && err.contains(needle),
        "stderr lacks '{needle}': {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
}

fn sample(out: &Path, extra: &[&str]) -> Output {
    let mut c = bin();
    c.args([
        "sample", "--prompt", "a cat", "--prompt", "a dog", "--steps", "3", "--seed", "5",
        "--device", "cpu",
    ])
    .arg("--model")
    .arg(tiny())
    .arg("--out")
    .arg(out)
    .args(extra);
    run(&mut c)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn sample_is_seeded_and_lora_changes_it() {
    let (a, b, l) = (tmp("sa"), tmp("sb"), tmp("sl"));
    for d in [&a, &b] {
        let out = sample(d, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let lora = tiny().join("lora_peft/pytorch_lora_weights.safetensors");
    let out = sample(&l, &["--lora", lora.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = ["0000_a_cat_0.png", "0001_a_dog_0.png", "grid.png"];
    for f in files {
        assert_eq!(
            read(&a.join(f)),
            read(&b.join(f)),
            "{f}: same seed, different image"
        );
    }
    let img = image::open(a.join(files[0])).unwrap();
    assert_eq!((img.width(), img.height()), (128, 128));
    assert_ne!(
        read(&a.join(files[0])),
        read(&l.join(files[0])),
        "the LoRA did not change the image"
    );
    for d in [a, b, l] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn train_then_resume() {
    let out = tmp("train");
    let base = |steps: &str| {
        let mut c = bin();
        c.args([
            "train",
            "--device",
            "cpu",
            "--set",
            "sampling.steps=2",
            "--set",
            "truncation.k=1",
        ])
        .args([
            "--set",
            "eval.every=100",
            "--set",
            "output.save_every=1",
            "--set",
        ])
        .arg(format!("train.steps={steps}"))
        .arg("--out")
        .arg(&out);
        c
    };
    let first = run(&mut base("2"));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(out.join("pytorch_lora_weights.safetensors").is_file());
    assert!(out.join("checkpoints/step_00002/state.json").is_file());
    let second = run(base("3").arg("--resume"));
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    std::fs::remove_dir_all(out).ok();
}

#[test]
fn bad_input_is_one_clear_error() {
    let out = tmp("bad");
    // Missing model folder.
    assert_clean_error(
        &run(bin().args(["sample", "--prompt", "x", "--model", "/nonexistent/sd"])),
        "/nonexistent/sd",
    );
    // A folder that is not a diffusers model.
    assert_clean_error(
        &run(bin()
            .args(["sample", "--prompt", "x", "--device", "cpu", "--model"])
            .arg(tiny().join("refs"))),
        "refs",
    );
    // No prompts at all; an empty prompt file.
    assert_clean_error(
        &run(bin()
            .args(["sample", "--device", "cpu", "--model"])
            .arg(tiny())),
        "no prompts",
    );
    std::fs::create_dir_all(&out).unwrap();
    let empty = out.join("empty.txt");
    std::fs::write(&empty, "\n# nothing\n").unwrap();
    assert_clean_error(
        &run(bin()
            .args(["sample", "--device", "cpu", "--model"])
            .arg(tiny())
            .arg("--prompt-file")
            .arg(&empty)),
        "no prompts",
    );
    // Output path that is a file.
    assert_clean_error(&sample(&empty, &[]), "not a folder");
    // CUDA on a machine without a GPU (where there is one, the command must succeed instead).
    let cuda = run(bin()
        .args([
            "sample", "--prompt", "x", "--steps", "1", "--device", "cuda", "--model",
        ])
        .arg(tiny())
        .arg("--out")
        .arg(out.join("cuda")));
    if !cuda.status.success() {
        assert_clean_error(&cuda, "CUDA");
    }
    // Unknown scheduler; a LoRA that is not a LoRA.
    assert_clean_error(&sample(&out.join("s"), &["--scheduler", "plms"]), "plms");
    let not_lora = tiny().join("vae/diffusion_pytorch_model.safetensors");
    assert_clean_error(
        &run(bin().args(["lora", "inspect"]).arg(&not_lora)),
        "not a LoRA file",
    );
    // eval of a folder without images; an unknown reward.
    assert_clean_error(
        &run(bin()
            .args(["eval", "--device", "cpu", "--images"])
            .arg(tiny().join("unet"))),
        "no PNG",
    );
    assert_clean_error(
        &run(bin()
            .args(["eval", "--reward", "clip", "--images"])
            .arg(&out)),
        "unknown reward",
    );
    // A config key that does not exist.
    assert_clean_error(
        &run(bin().args(["train", "--set", "train.stepz=3"])),
        "stepz",
    );
    std::fs::remove_dir_all(out).ok();
}
