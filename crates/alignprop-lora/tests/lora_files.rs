//! LoRA files: the peft and classic-diffusers files written by diffusers (fixtures) load to the same adapters,
//! and our writer round-trips every format.

use std::path::PathBuf;

use alignprop_lora::{LoraFormat, LoraWeights, MixMode, mix, scale};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny-sd")
        .join(rel)
}

fn peft() -> LoraWeights {
    LoraWeights::read(&fixture("lora_peft/pytorch_lora_weights.safetensors")).unwrap()
}

#[test]
fn diffusers_and_peft_files_hold_the_same_adapters() {
    let p = peft();
    let d = LoraWeights::read(&fixture("lora/pytorch_lora_weights.safetensors")).unwrap();
    // 16 transformer blocks x 2 attentions x 4 projections.
    assert_eq!(p.modules.len(), 128);
    assert_eq!(p.num_params(), 21_568);
    assert_eq!(p.rank(), Some(4));
    assert_eq!(p.target_modules(), ["to_k", "to_out.0", "to_q", "to_v"]);
    let q = &p.modules["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"];
    assert_eq!((q.down.shape, q.up.shape), ([4, 8], [8, 4]));
    // peft metadata: lora_alpha 4 with r 4 -> scale 1; the classic file has no alpha (scale 1 as well).
    assert_eq!(q.alpha, Some(4.0));
    assert_eq!(q.scale(), 1.0);
    for (k, a) in &p.modules {
        let b = &d.modules[k];
        assert_eq!((&a.down, &a.up), (&b.down, &b.up), "{k}");
        assert_eq!(b.scale(), 1.0);
    }
}

#[test]
fn write_read_round_trip_in_every_format() {
    let p = peft();
    let dir = std::env::temp_dir().join(format!("alignprop-lora-test-{}", std::process::id()));
    for format in [LoraFormat::Peft, LoraFormat::Diffusers, LoraFormat::Kohya] {
        let path = dir.join(format!("{format:?}.safetensors"));
        p.write(&path, format).unwrap();
        let back = LoraWeights::read(&path).unwrap();
        assert_eq!(back.modules.len(), p.modules.len());
        for (k, a) in &p.modules {
            let b = back
                .modules
                .get(k)
                .unwrap_or_else(|| panic!("{format:?}: {k} missing after round trip"));
            assert_eq!((&a.down, &a.up), (&b.down, &b.up), "{format:?} {k}");
            assert_eq!(a.scale(), b.scale(), "{format:?} {k}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The classic diffusers layout has no alpha: an adapter whose scale is not 1 (tiny-sdxl's peft LoRA: alpha 4 on
/// rank 2) is written with the scale folded into `up`, so its weight delta survives the conversion.
#[test]
fn diffusers_format_keeps_the_scale_of_adapters_without_alpha() {
    let p = LoraWeights::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tiny-sdxl/lora_peft/adapter_model.safetensors"),
    )
    .unwrap();
    let q = p.modules.values().next().unwrap();
    assert_eq!(q.scale(), 2.0);
    let path = std::env::temp_dir().join(format!(
        "alignprop-lora-diffusers-scale-{}.safetensors",
        std::process::id()
    ));
    p.write(&path, LoraFormat::Diffusers).unwrap();
    let back = LoraWeights::read(&path).unwrap();
    for (k, a) in &p.modules {
        let b = &back.modules[k];
        assert_eq!(b.scale(), 1.0, "{k}");
        let (da, db) = (delta(a), delta(b));
        let err = da
            .iter()
            .zip(&db)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        let size = da.iter().map(|x| x.abs()).fold(0.0, f64::max);
        assert!(
            err <= 1e-6 * size,
            "{k}: delta changed by {err:e} (max {size:e})"
        );
    }
    std::fs::remove_file(&path).ok();
}

#[test]
fn non_lora_file_is_a_clear_error() {
    let path = fixture("vae/diffusion_pytorch_model.safetensors");
    let err = LoraWeights::read(&path).unwrap_err().to_string();
    assert!(
        err.contains("not a LoRA file") && err.contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );
}

/// Dense `scale * up @ down` for one module.
fn delta(p: &alignprop_lora::LoraPair) -> Vec<f64> {
    let (out, r, inf) = (p.up.shape[0], p.rank(), p.down.shape[1]);
    let mut d = vec![0.0; out * inf];
    for o in 0..out {
        for i in 0..inf {
            let s: f64 = (0..r)
                .map(|k| p.up.values[o * r + k] as f64 * p.down.values[k * inf + i] as f64)
                .sum();
            d[o * inf + i] = s * p.scale();
        }
    }
    d
}

#[test]
fn scaling_and_mixing() {
    let l1 = peft();
    let l2 = scale(&l1, -0.5);
    let key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v";
    let d1 = delta(&l1.modules[key]);
    let d2 = delta(&l2.modules[key]);
    assert!(d1.iter().zip(&d2).all(|(a, b)| (b + 0.5 * a).abs() < 1e-6));

    // Exact mixing: the delta is exactly the interpolation of the deltas, with rank r1 + r2.
    let c = 0.3;
    let m = mix(&l1, &l2, c, MixMode::Exact).unwrap();
    assert_eq!(m.rank(), Some(8));
    let dm = delta(&m.modules[key]);
    for ((a, b), x) in d1.iter().zip(&d2).zip(&dm) {
        assert!((c * a + (1.0 - c) * b - x).abs() < 1e-6);
    }
    // Parameter mixing keeps the rank; at c = 1 it is the first LoRA.
    let p = mix(&l1, &l2, 1.0, MixMode::Parameters).unwrap();
    assert_eq!(p.rank(), Some(4));
    assert_eq!(p.modules[key], l1.modules[key]);
    // Different module sets are refused.
    let mut partial = l1.clone();
    partial.modules.remove(key);
    assert!(
        mix(&l1, &partial, 0.5, MixMode::Exact)
            .unwrap_err()
            .to_string()
            .contains("different modules")
    );
}
