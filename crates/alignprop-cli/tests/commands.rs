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

/// `--devices cpu,cpu`: two data-parallel workers train (one output folder, logs over the global batch of 2
/// images); the run resumes on one device with the same global batch (`grad_accum` 2).
#[test]
fn train_on_two_workers_then_resume_on_one() {
    let out = tmp("dp");
    let base = |steps: &str| {
        let mut c = bin();
        c.arg("train");
        for set in [
            "sampling.steps=2",
            "truncation.k=1",
            "train.batch_size=1",
            "eval.every=100",
            "output.save_every=1",
        ] {
            c.args(["--set", set]);
        }
        c.arg("--set")
            .arg(format!("train.steps={steps}"))
            .arg("--out")
            .arg(&out);
        c
    };
    let two = run(base("2").args(["--devices", "cpu,cpu"]));
    let err = String::from_utf8_lossy(&two.stderr);
    assert!(two.status.success(), "{err}");
    assert!(
        err.contains("data parallel: 2 workers (cpu, cpu), global batch 2 images"),
        "{err}"
    );
    assert!(out.join("checkpoints/step_00002/state.json").is_file());
    // Another global batch is refused; the same one on one device resumes.
    let wrong = run(base("3").args(["--device", "cpu", "--resume"]));
    assert_clean_error(&wrong, "global batch");
    let one = run(base("3").args(["--device", "cpu", "--set", "train.grad_accum=2", "--resume"]));
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
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
    // Data-parallel devices of two backends, or one GPU twice.
    assert_clean_error(
        &run(bin().args(["train", "--devices", "cpu,wgpu:0"])),
        "different backends",
    );
    assert_clean_error(
        &run(bin().args(["train", "--devices", "cuda:0,cuda:0"])),
        "listed twice",
    );
    assert_clean_error(&run(bin().args(["train", "--devices", "cpu,tpu"])), "tpu");
    // A config key that does not exist.
    assert_clean_error(
        &run(bin().args(["train", "--set", "train.stepz=3"])),
        "stepz",
    );
    std::fs::remove_dir_all(out).ok();
}

/// The RGB pixels of a PNG.
fn pixels(p: &Path) -> Vec<u8> {
    image::open(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8()
        .into_raw()
}

fn sample_from(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut c = bin();
    c.args([
        "sample", "--prompt", "a cat", "--steps", "3", "--seed", "5", "--device", "cpu",
    ])
    .arg("--model")
    .arg(model)
    .arg("--out")
    .arg(out)
    .args(extra);
    run(&mut c)
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn convert_single_file_and_merge_lora_give_usable_model_folders() {
    use alignprop_io::weights::{SafetensorsSource, TensorSource};
    let d = tmp("conv");
    std::fs::create_dir_all(&d).unwrap();
    let png = "0000_a_cat_0.png";

    // Single-file checkpoint -> diffusers folder: samples exactly as the original folder.
    let conv = d.join("converted");
    ok(run(bin()
        .args(["convert", "single-file"])
        .arg(tiny().join("single_file/tiny-sd15.safetensors"))
        .arg(&conv)
        .arg("--configs")
        .arg(tiny())));
    for f in [
        "model_index.json",
        "unet/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(conv.join(f).is_file(), "{f} missing");
    }
    ok(sample_from(&tiny(), &d.join("s_orig"), &[]));
    ok(sample_from(&conv, &d.join("s_conv"), &[]));
    assert_eq!(
        read(&d.join("s_orig").join(png)),
        read(&d.join("s_conv").join(png)),
        "the converted model samples differently"
    );
    // A non-empty output folder is refused; a file that is not a single-file checkpoint is named as what it is.
    assert_clean_error(
        &run(bin()
            .args(["convert", "single-file"])
            .arg(tiny().join("single_file/tiny-sd15.safetensors"))
            .arg(&conv)),
        "not empty",
    );
    assert_clean_error(
        &run(bin()
            .args(["convert", "single-file"])
            .arg(tiny().join("unet/diffusion_pytorch_model.safetensors"))
            .arg(d.join("x"))),
        "diffusers UNet file",
    );

    // LoRA merged into the model = the model with the LoRA applied.
    let lora = tiny().join("lora_peft/pytorch_lora_weights.safetensors");
    let merged = d.join("merged");
    ok(run(bin()
        .args(["lora", "merge", "--model"])
        .arg(tiny())
        .arg("--lora")
        .arg(&lora)
        .arg("--out")
        .arg(&merged)));
    ok(sample_from(&merged, &d.join("s_merged"), &[]));
    ok(sample_from(
        &tiny(),
        &d.join("s_lora"),
        &["--lora", lora.to_str().unwrap()],
    ));
    let (a, b, base) = (
        pixels(&d.join("s_merged").join(png)),
        pixels(&d.join("s_lora").join(png)),
        pixels(&d.join("s_orig").join(png)),
    );
    let max_diff = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(
        max_diff <= 2,
        "merged vs applied LoRA differ by {max_diff} levels"
    );
    assert_ne!(a, base, "the merge changed nothing");
    assert_clean_error(
        &run(bin()
            .args(["lora", "merge", "--model"])
            .arg(tiny())
            .arg("--lora")
            .arg(&lora)
            .arg("--out")
            .arg(d.join("s_orig").join(png))),
        "is a file",
    );

    // A reward head's .pth to safetensors: the same tensors as the generator's safetensors copy.
    let head = d.join("mlp.safetensors");
    let fixtures = tiny().join("../tiny-reward/aesthetic");
    ok(run(bin()
        .args(["convert", "pth"])
        .arg(fixtures.join("mlp.pth"))
        .arg(&head)));
    let (ours, theirs) = (
        SafetensorsSource::open(&[&head]).unwrap(),
        SafetensorsSource::open(&[fixtures.join("mlp.safetensors")]).unwrap(),
    );
    assert_eq!(ours.keys(), theirs.keys());
    for k in ours.keys() {
        let (x, y) = (
            ours.find(&k).unwrap().unwrap(),
            theirs.find(&k).unwrap().unwrap(),
        );
        assert_eq!(x.shape, y.shape, "{k}");
        assert_eq!(x.data.as_bytes(), y.data.as_bytes(), "{k}");
    }
    std::fs::remove_dir_all(d).ok();
}

/// An SD2.x single file (OpenCLIP text tower, v-prediction): converted with the tiny SD2 folder's configs it
/// samples exactly as that folder; with only the networks' configs (the tiny GroupNorm groups are not SD's) the
/// scheduler and tokenizer are SD2's defaults (v-prediction, "!" padding), and `--prediction-type epsilon` (an SD2
/// base model) is written into the scheduler.
#[test]
fn convert_sd2_single_file_gives_a_working_folder() {
    let d = tmp("conv_sd2");
    std::fs::create_dir_all(&d).unwrap();
    let sd2 = tiny().join("../tiny-sd2");
    let file = sd2.join("single_file/tiny-sd21.safetensors");
    let conv = d.join("converted");
    ok(run(bin()
        .args(["convert", "single-file"])
        .arg(&file)
        .arg(&conv)
        .arg("--configs")
        .arg(&sd2)));
    ok(sample_from(&sd2, &d.join("s_orig"), &[]));
    ok(sample_from(&conv, &d.join("s_conv"), &[]));
    let png = "0000_a_cat_0.png";
    assert_eq!(
        read(&d.join("s_orig").join(png)),
        read(&d.join("s_conv").join(png)),
        "the converted SD2 model samples differently"
    );

    let scheduler = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&read(&dir.join("scheduler/scheduler_config.json"))).unwrap()
    };
    let configs = d.join("configs");
    for c in ["unet", "vae", "text_encoder"] {
        std::fs::create_dir_all(configs.join(c)).unwrap();
        std::fs::copy(
            sd2.join(c).join("config.json"),
            configs.join(c).join("config.json"),
        )
        .unwrap();
    }
    let inferred = d.join("inferred");
    ok(run(bin()
        .args(["convert", "single-file"])
        .arg(&file)
        .arg(&inferred)
        .arg("--configs")
        .arg(&configs)));
    assert_eq!(scheduler(&inferred)["prediction_type"], "v_prediction");
    ok(sample_from(&inferred, &d.join("s_inferred"), &[]));
    assert_eq!(
        read(&d.join("s_orig").join(png)),
        read(&d.join("s_inferred").join(png)),
        "the SD2 defaults (scheduler, tokenizer) sample differently from the SD2 folder"
    );
    let tok: serde_json::Value =
        serde_json::from_slice(&read(&inferred.join("tokenizer/tokenizer_config.json"))).unwrap();
    assert_eq!(tok["pad_token"], "!");
    let base = d.join("base");
    ok(run(bin()
        .args(["convert", "single-file", "--prediction-type", "epsilon"])
        .arg(&file)
        .arg(&base)
        .arg("--configs")
        .arg(&configs)));
    assert_eq!(scheduler(&base)["prediction_type"], "epsilon");
    assert_clean_error(
        &run(bin()
            .args(["convert", "single-file", "--prediction-type", "x0"])
            .arg(&file)
            .arg(d.join("bad"))),
        "x0",
    );
    std::fs::remove_dir_all(d).ok();
}

#[test]
fn fit_compressibility_then_eval_with_it_and_with_the_true_jpeg_size() {
    let d = tmp("fit");
    let imgs = d.join("imgs");
    let mut c = bin();
    c.args(["sample", "--steps", "2", "--seed", "3", "--device", "cpu"]);
    for p in ["a cat", "a dog", "a red car", "a field of flowers"] {
        c.args(["--prompt", p]);
    }
    ok(run(c.arg("--model").arg(tiny()).arg("--out").arg(&imgs)));
    let clip = tiny().join("../tiny-reward/clip_vision");
    let head = d.join("head.safetensors");
    let out = ok(run(bin()
        .args([
            "fit-compressibility",
            "--steps",
            "300",
            "--device",
            "cpu",
            "--images",
        ])
        .arg(&imgs)
        .arg("--clip-path")
        .arg(&clip)
        .arg("--out")
        .arg(&head)));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("5 images") && text.contains("R^2"), "{text}");
    let scores = |reward: &str, json: &Path, extra: &[&std::ffi::OsStr]| {
        ok(run(bin()
            .args(["eval", "--device", "cpu", "--reward", reward, "--images"])
            .arg(&imgs)
            .arg("--json")
            .arg(json)
            .args(extra)));
        let v: serde_json::Value = serde_json::from_slice(&read(json)).unwrap();
        v["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["score"].as_f64().unwrap())
            .collect::<Vec<f64>>()
    };
    let jpeg = scores("jpeg", &d.join("jpeg.json"), &[]);
    let surrogate = scores(
        "compressibility",
        &d.join("surrogate.json"),
        &[
            "--reward-path".as_ref(),
            head.as_os_str(),
            "--clip-path".as_ref(),
            clip.as_os_str(),
        ],
    );
    assert_eq!(jpeg.len(), 5);
    assert!(jpeg.iter().all(|&k| k > 0.1), "{jpeg:?}");
    // The surrogate's score is minus its predicted size; on the images it was fitted on it is close.
    let mean_abs_err = jpeg
        .iter()
        .zip(&surrogate)
        .map(|(k, s)| (k + s).abs())
        .sum::<f64>()
        / jpeg.len() as f64;
    let spread = jpeg.iter().cloned().fold(f64::MIN, f64::max)
        - jpeg.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        mean_abs_err < 0.5 * spread.max(0.05),
        "{jpeg:?} vs {surrogate:?}"
    );
    assert_clean_error(
        &run(bin()
            .args(["eval", "--reward", "compressibility", "--images"])
            .arg(&imgs)),
        "--reward-path",
    );
    std::fs::remove_dir_all(d).ok();
}

/// `eval --reward hps|pickscore|concept` (the tiny fixture models): a folder written by `sample` is scored with the prompts
/// of its manifest.json; `--prompt` gives one prompt for every image instead; `--model` scores generated images
/// with their prompts (the tokenizer defaults to the model's); missing prompts or tokenizer are clean errors.
#[test]
fn eval_with_prompt_rewards_reads_the_sample_manifest_or_prompts() {
    let d = tmp("prompt-rewards");
    let m =
        alignprop_testing::prompt_reward::write_prompt_reward_models(&d.join("models")).unwrap();
    let imgs = d.join("imgs");
    ok(sample(&imgs, &[]));
    let manifest: serde_json::Value =
        serde_json::from_slice(&read(&imgs.join("manifest.json"))).unwrap();
    assert_eq!(manifest["images"][1]["file"], "0001_a_dog_0.png");
    assert_eq!(manifest["images"][1]["prompt"], "a dog");
    let hps: Vec<std::ffi::OsString> = vec![
        "--reward".into(),
        "hps".into(),
        "--reward-path".into(),
        m.hps_weights.clone().into(),
        "--reward-config".into(),
        m.hps_config.clone().into(),
    ];
    let tok: Vec<std::ffi::OsString> = vec!["--tokenizer".into(), m.tokenizer.clone().into()];
    let scores = |args: &[std::ffi::OsString], name: &str| {
        let json = d.join(name);
        ok(run(bin()
            .args(["eval", "--device", "cpu"])
            .args(args)
            .arg("--json")
            .arg(&json)));
        let v: serde_json::Value = serde_json::from_slice(&read(&json)).unwrap();
        v["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["item"].as_str().unwrap().to_string(),
                    s["score"].as_f64().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let folder: Vec<std::ffi::OsString> = vec!["--images".into(), imgs.clone().into()];
    let from_manifest = scores(
        &[hps.clone(), tok.clone(), folder.clone()].concat(),
        "a.json",
    );
    let names: Vec<&str> = from_manifest.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(names, ["0000_a_cat_0.png", "0001_a_dog_0.png"]);
    assert!(
        from_manifest.iter().all(|r| r.1.abs() <= 1.0),
        "{from_manifest:?}"
    );
    // One prompt for every image of the folder (the grid too): the cat image with "a cat" scores the same.
    let one: Vec<std::ffi::OsString> = vec!["--prompt".into(), "a cat".into()];
    let all_cat = scores(
        &[hps.clone(), tok.clone(), folder.clone(), one].concat(),
        "b.json",
    );
    assert_eq!(all_cat.len(), 3);
    assert_eq!(all_cat[0], from_manifest[0]);
    assert_ne!(
        all_cat[1].1, from_manifest[1].1,
        "the prompt did not change the score"
    );
    // PickScore from its folder; generated images scored with their prompts, tokenizer from --model.
    let pick: Vec<std::ffi::OsString> = vec![
        "--reward".into(),
        "pickscore".into(),
        "--reward-path".into(),
        m.pickscore.clone().into(),
    ];
    let p = scores(
        &[pick.clone(), tok.clone(), folder.clone()].concat(),
        "c.json",
    );
    assert_eq!(p.len(), 2);
    // Concept removal on the same CLIPModel: every image's similarity to --concept (no prompts needed); without
    // --concept a clean error says what to give.
    let concept: Vec<std::ffi::OsString> = vec![
        "--reward".into(),
        "concept".into(),
        "--reward-path".into(),
        m.pickscore.clone().into(),
    ];
    let text: Vec<std::ffi::OsString> = vec!["--concept".into(), "a cat".into()];
    let c = scores(
        &[concept.clone(), tok.clone(), folder.clone(), text].concat(),
        "e.json",
    );
    assert!(c.len() >= 2 && c.iter().all(|r| r.1.abs() <= 1.0), "{c:?}");
    let e = run(bin()
        .args(["eval", "--device", "cpu"])
        .args(&concept)
        .args(&tok)
        .args(&folder));
    assert_clean_error(&e, "--concept");
    let gen_args: Vec<std::ffi::OsString> = vec![
        "--model".into(),
        tiny().into(),
        "--prompt".into(),
        "a cat".into(),
        "--steps".into(),
        "2".into(),
    ];
    let g = scores(&[hps.clone(), gen_args].concat(), "d.json");
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].0, "a cat");
    // Clean errors: no tokenizer; a folder without prompts or manifest; a wrong number of prompts.
    let e = run(bin()
        .args(["eval", "--device", "cpu"])
        .args(&hps)
        .args(&folder));
    assert_clean_error(&e, "--tokenizer");
    let bare = d.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(imgs.join("0000_a_cat_0.png"), bare.join("x.png")).unwrap();
    let e = run(bin()
        .args(["eval", "--device", "cpu"])
        .args(&hps)
        .args(&tok)
        .arg("--images")
        .arg(&bare));
    assert_clean_error(&e, "manifest.json");
    let e = run(bin()
        .args(["eval", "--device", "cpu"])
        .args(&hps)
        .args(&tok)
        .args(&folder)
        .args(["--prompt", "a", "--prompt", "b"]));
    assert_clean_error(&e, "2 prompts given for 3 images");
    std::fs::remove_dir_all(d).ok();
}

/// `eval --reward count` (the tiny OWL-ViT fixture): with --object every image of a folder is counted and the table
/// and JSON carry the hard count at --count-threshold; without it, each image's object and target come from its
/// prompt ("three cats"), and a prompt without a count is a clean error naming it.
#[test]
fn eval_counts_objects_with_owlvit() {
    let d = tmp("count");
    let owl = alignprop_testing::prompt_reward::write_count_model(&d.join("owlvit")).unwrap();
    let imgs = d.join("imgs");
    ok(sample(&imgs, &[]));
    let count: Vec<std::ffi::OsString> = vec![
        "--reward".into(),
        "count".into(),
        "--reward-path".into(),
        owl.into(),
        "--images".into(),
        imgs.clone().into(),
        "--count-threshold".into(),
        "0.5".into(),
    ];
    let eval = |extra: &[&str], name: &str| {
        let json = d.join(name);
        let out = ok(run(bin()
            .args(["eval", "--device", "cpu"])
            .args(&count)
            .args(extra)
            .arg("--json")
            .arg(&json)));
        let v: serde_json::Value = serde_json::from_slice(&read(&json)).unwrap();
        (String::from_utf8_lossy(&out.stdout).into_owned(), v)
    };
    let (table, v) = eval(&["--object", "a photo of a cat"], "object.json");
    assert!(table.contains("hard_count@0.5"), "{table}");
    let rows = v["scores"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "two samples and the grid: {v}");
    for r in rows {
        // 4x4 patches in the tiny detector: a soft count in [0, 16], a whole hard count.
        let (s, h) = (
            r["score"].as_f64().unwrap(),
            r["hard_count@0.5"].as_f64().unwrap(),
        );
        assert!(
            (0.0..=16.0).contains(&s) && (0.0..=16.0).contains(&h) && h.fract() == 0.0,
            "{r}"
        );
        assert!(r.get("target").is_none(), "{r}");
    }
    // Objects and targets from the prompts: one prompt for every image.
    let (_, v) = eval(&["--prompt", "three cats"], "prompt.json");
    let with_prompt = v["scores"].as_array().unwrap();
    assert!(with_prompt.iter().all(|r| r["target"] == 3.0), "{v}");
    assert_eq!(
        with_prompt[0]["score"], rows[0]["score"],
        "the same query: 'a photo of a cat'"
    );
    // The manifest's prompts ("a cat", "a dog") name no count.
    let e = run(bin().args(["eval", "--device", "cpu"]).args(&count));
    assert_clean_error(&e, "\"a cat\" names no count");
    std::fs::remove_dir_all(d).ok();
}
