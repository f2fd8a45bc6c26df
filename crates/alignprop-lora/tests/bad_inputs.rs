//! Bad-input corpus for the LoRA reader ([`LoraWeights::read`]): each malformed peft / diffusers / kohya file must
//! give an `Err` whose message is one line naming the file, the key and what is wrong (expected and found), never a
//! panic.

#[path = "../../alignprop-io/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alignprop_io::weights::write_safetensors;
use alignprop_lora::{LoraFormat, LoraPair, LoraWeights, Matrix};
use burn::tensor::TensorData;
use common::temp_dir;

const MODULE: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
const KOHYA: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";

fn f32s(shape: &[usize], v: f32) -> TensorData {
    TensorData::new(vec![v; shape.iter().product()], shape.to_vec())
}

/// Writes `tensors` (and `metadata`) as a safetensors file `name`.
fn lora_file(name: &str, tensors: Vec<(String, TensorData)>, metadata: &[(&str, &str)]) -> PathBuf {
    let path = temp_dir("lora-bad").join(name);
    let metadata: BTreeMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    write_safetensors(&path, &tensors, &metadata).unwrap();
    path
}

fn peft(name: &str, a: TensorData, b: TensorData) -> PathBuf {
    lora_file(
        name,
        vec![
            (format!("unet.{MODULE}.lora_A.weight"), a),
            (format!("unet.{MODULE}.lora_B.weight"), b),
        ],
        &[],
    )
}

fn kohya(name: &str, down: TensorData, up: TensorData, alpha: TensorData) -> PathBuf {
    lora_file(
        name,
        vec![
            (format!("{KOHYA}.lora_down.weight"), down),
            (format!("{KOHYA}.lora_up.weight"), up),
            (format!("{KOHYA}.alpha"), alpha),
        ],
        &[],
    )
}

/// Reads `path`, expecting an error that is one line, names the file and says `what`.
fn lora_error(path: &Path, what: &str) {
    let msg = LoraWeights::read(path)
        .err()
        .unwrap_or_else(|| panic!("{}: read without error", path.display()))
        .to_string();
    assert!(!msg.contains('\n'), "message is not one line: {msg:?}");
    assert!(
        msg.contains(&path.display().to_string()),
        "message does not name the file: {msg}"
    );
    assert!(msg.contains(what), "message {msg:?} does not say {what:?}");
}

#[test]
fn valid_files_round_trip_in_every_format() {
    let pair = LoraPair {
        down: Matrix::new([2, 4], (0..8).map(|i| i as f32).collect()),
        up: Matrix::new([4, 2], (0..8).map(|i| -(i as f32)).collect()),
        alpha: Some(2.0),
    };
    let weights = LoraWeights {
        modules: [(MODULE.to_string(), pair)].into(),
    };
    for format in [LoraFormat::Peft, LoraFormat::Diffusers, LoraFormat::Kohya] {
        let path = temp_dir("lora-bad").join(format!("valid_{format:?}.safetensors"));
        weights.write(&path, format).unwrap();
        // Every layout keeps the matrices and the scale (the classic diffusers one stores no alpha: scale 1).
        let read = LoraWeights::read(&path).unwrap();
        let (a, b) = (&read.modules[MODULE], &weights.modules[MODULE]);
        assert_eq!(
            (&a.down, &a.up, a.scale()),
            (&b.down, &b.up, b.scale()),
            "{format:?}"
        );
    }
}

#[test]
fn missing_halves() {
    let a = format!("unet.{MODULE}.lora_A.weight");
    let b = format!("unet.{MODULE}.lora_B.weight");
    let path = lora_file(
        "peft_no_b.safetensors",
        vec![(a.clone(), f32s(&[2, 4], 0.1))],
        &[],
    );
    lora_error(
        &path,
        &format!("tensor '{a}' has no up half: expected '{b}'"),
    );
    let other = format!("unet.{MODULE}.other.lora_A.weight");
    let path = lora_file(
        "peft_no_a.safetensors",
        vec![(other, f32s(&[2, 4], 0.1)), (b.clone(), f32s(&[4, 2], 0.1))],
        &[],
    );
    lora_error(
        &path,
        &format!("tensor '{b}' has no down half: expected '{a}'"),
    );
    let down = format!("unet.{MODULE}.lora.down.weight");
    let path = lora_file(
        "diffusers_no_up.safetensors",
        vec![(down.clone(), f32s(&[2, 4], 0.1))],
        &[],
    );
    lora_error(
        &path,
        &format!("tensor '{down}' has no up half: expected 'unet.{MODULE}.lora.up.weight'"),
    );
    let down = format!("{KOHYA}.lora_down.weight");
    let path = lora_file(
        "kohya_no_up.safetensors",
        vec![(down.clone(), f32s(&[2, 4], 0.1))],
        &[],
    );
    lora_error(
        &path,
        &format!("tensor '{down}' has no up half: expected '{KOHYA}.lora_up.weight'"),
    );
}

#[test]
fn mismatched_and_wrong_ranks() {
    let path = peft("ranks.safetensors", f32s(&[4, 8], 0.1), f32s(&[8, 2], 0.1));
    lora_error(
        &path,
        &format!("tensor 'unet.{MODULE}.lora_B.weight': expected shape [_, 4]"),
    );
    lora_error(&path, "found [8, 2]");
    let path = peft("rank0.safetensors", f32s(&[0, 8], 0.1), f32s(&[8, 0], 0.1));
    lora_error(&path, "rank 0 (shape [0, 8]), expected at least 1");
    let path = peft(
        "cube.safetensors",
        f32s(&[2, 8, 3], 0.1),
        f32s(&[8, 2], 0.1),
    );
    lora_error(&path, "expected a matrix, found shape [2, 8, 3]");
    let path = peft("vector.safetensors", f32s(&[2], 0.1), f32s(&[8, 2], 0.1));
    lora_error(&path, "expected a matrix, found shape [2]");
    // Conv-shaped adapters ([r, in, 1, 1]) are matrices.
    let path = peft(
        "conv.safetensors",
        f32s(&[2, 8, 1, 1], 0.1),
        f32s(&[8, 2, 1, 1], 0.1),
    );
    assert_eq!(LoraWeights::read(&path).unwrap().rank(), Some(2));
}

#[test]
fn bad_alphas() {
    let (down, up) = (|| f32s(&[2, 4], 0.1), || f32s(&[4, 2], 0.1));
    let path = kohya("alpha_vector.safetensors", down(), up(), f32s(&[4], 2.0));
    lora_error(
        &path,
        &format!(
            "tensor '{KOHYA}.alpha': expected a scalar alpha (shape [] or [1]), found shape [4]"
        ),
    );
    let path = kohya("alpha_nan.safetensors", down(), up(), f32s(&[], f32::NAN));
    lora_error(&path, "expected a finite alpha, found NaN");
    let path = kohya(
        "alpha_int.safetensors",
        down(),
        up(),
        TensorData::new(vec![2i32], [1]),
    );
    lora_error(
        &path,
        "expected a float dtype (F32, F16, BF16, F64), found I32",
    );
    let path = kohya("alpha_ok.safetensors", down(), up(), f32s(&[1], 2.0));
    assert_eq!(
        LoraWeights::read(&path).unwrap().modules[MODULE].scale(),
        1.0
    );
    let tensors = || {
        vec![
            (format!("unet.{MODULE}.lora_A.weight"), f32s(&[2, 4], 0.1)),
            (format!("unet.{MODULE}.lora_B.weight"), f32s(&[4, 2], 0.1)),
        ]
    };
    let path = lora_file(
        "peft_meta_json.safetensors",
        tensors(),
        &[("lora_adapter_metadata", "{not json")],
    );
    lora_error(&path, "metadata 'lora_adapter_metadata' is not valid JSON");
    let path = lora_file(
        "peft_meta_alpha.safetensors",
        tensors(),
        &[("lora_adapter_metadata", r#"{"unet.lora_alpha": "four"}"#)],
    );
    lora_error(&path, "expected a number for lora_alpha, found \"four\"");
}

#[test]
fn bad_values_and_dtypes() {
    let mut b = vec![0.1f32; 8];
    b[3] = f32::NAN;
    b[5] = f32::INFINITY;
    let path = peft(
        "nan.safetensors",
        f32s(&[2, 4], 0.1),
        TensorData::new(b, [4, 2]),
    );
    lora_error(
        &path,
        &format!(
            "tensor 'unet.{MODULE}.lora_B.weight': expected finite values, found NaN at index 3 (2 of 8 not finite)"
        ),
    );
    let path = peft(
        "int.safetensors",
        TensorData::new(vec![1i32; 8], [2, 4]),
        f32s(&[4, 2], 0.1),
    );
    lora_error(
        &path,
        "expected a float dtype (F32, F16, BF16, F64), found I32",
    );
    let path = peft(
        "u8.safetensors",
        f32s(&[2, 4], 0.1),
        TensorData::new(vec![1u8; 8], [4, 2]),
    );
    lora_error(&path, "found U8");
    // F16 / BF16 adapters are fine.
    let path = peft(
        "f16.safetensors",
        TensorData::new(vec![half::f16::ONE; 8], [2, 4]),
        TensorData::new(vec![half::bf16::ONE; 8], [4, 2]),
    );
    assert_eq!(
        LoraWeights::read(&path).unwrap().modules[MODULE].up.values,
        [1.0; 8]
    );
}

#[test]
fn not_lora_files() {
    let path = lora_file(
        "no_lora.safetensors",
        vec![("conv.weight".into(), f32s(&[2], 1.0))],
        &[],
    );
    lora_error(&path, "not a LoRA file: no peft (lora_A/lora_B)");
    let path = temp_dir("lora-bad").join("garbage.safetensors");
    std::fs::write(&path, b"definitely not a safetensors file").unwrap();
    lora_error(&path, "not a valid safetensors file (header length");
    let path = temp_dir("lora-bad").join("missing.safetensors");
    lora_error(&path, "cannot read");
}
