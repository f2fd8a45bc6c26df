//! `alignprop lora ...` and `sample --lora` with the tiny SDXL fixture's kohya LoRA (original sgm module names,
//! `lora_unet_input_blocks_4_1_...`): `convert --model` writes exactly the fixture's kohya file from the peft folder
//! and translates the kohya names back for peft output; without `--model` that is one clear error; `sample` with the
//! kohya file draws the same pictures as with the peft folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use alignprop_io::{SafetensorsSource, TensorSource};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_alignprop"))
}

fn sdxl() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sdxl")
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
fn sdxl_kohya_lora_converts_both_ways_and_samples() {
    let d = std::env::temp_dir().join(format!("alignprop-cli-sdxl-lora-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
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
    let sample = |out: &Path, lora: Option<&Path>| {
        let mut c = bin();
        c.args([
            "sample", "--prompt", "a cat", "--steps", "2", "--seed", "5", "--device", "cpu",
        ])
        .arg("--model")
        .arg(sdxl())
        .arg("--out")
        .arg(out);
        if let Some(l) = lora {
            c.arg("--lora").arg(l);
        }
        ok(c.output().unwrap());
        pngs(out)
    };
    let with_kohya = sample(&d.join("s_kohya"), Some(&kohya));
    let with_peft = sample(&d.join("s_peft"), Some(&sdxl().join("lora_peft")));
    let base = sample(&d.join("s_base"), None);
    assert_eq!(with_kohya, with_peft);
    assert_ne!(with_kohya, base, "the LoRA changed nothing");
    std::fs::remove_dir_all(&d).ok();
}
