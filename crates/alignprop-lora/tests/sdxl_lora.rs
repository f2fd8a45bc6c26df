//! SDXL LoRA files against diffusers / peft (`tests/fixtures/tiny-sdxl`, README section (e)): the peft folder, the
//! diffusers `save_lora_weights` file and the kohya sd-scripts file (original sgm module names,
//! `lora_unet_input_blocks_4_1_...`) each reproduce `refs/lora_unet.safetensors` on the tiny SDXL UNet (applied,
//! at multiplier 0.5, merged, merged into a model folder); our kohya export of the peft LoRA is the fixture's kohya
//! file (same keys, same values, same alphas); the formats round-trip; SD1.5 kohya export keeps the diffusers names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alignprop_diffusion::unet::{TextTimeCond, UNet2DConditionModel};
use alignprop_io::{SafetensorsSource, TensorSource};
use alignprop_lora::{LoraFormat, LoraWeights, UnetNames};
use alignprop_testing::{assert_close, ref_int_on, ref_tensor_on, refs_sdxl, tiny_sd, tiny_sdxl};
use burn::tensor::{DType, Tensor};

type B = burn::backend::Flex;

/// The LoRA's modules: 17 transformer blocks x (attn1, attn2) x (q, k, v, out).
const MODULES: usize = 136;
const PARAMS: usize = 11_936;

fn unet_in(dir: &Path) -> UNet2DConditionModel<B> {
    UNet2DConditionModel::load(dir, &Default::default(), DType::F32).unwrap()
}

fn unet() -> UNet2DConditionModel<B> {
    unet_in(&tiny_sdxl().join("unet"))
}

fn run(unet: &UNet2DConditionModel<B>) -> Tensor<B, 4> {
    let r = refs_sdxl("lora_unet.safetensors");
    let d = Default::default();
    let added = TextTimeCond {
        text_embeds: ref_tensor_on(&r, "text_embeds", &d, DType::F32),
        time_ids: ref_tensor_on(&r, "time_ids", &d, DType::F32),
    };
    unet.forward_added(
        ref_tensor_on(&r, "sample", &d, DType::F32),
        ref_int_on::<B, 1>(&r, "timesteps", &d).float(),
        ref_tensor_on(&r, "encoder_hidden_states", &d, DType::F32),
        Some(&added),
    )
}

fn expected(key: &str) -> Tensor<B, 4> {
    ref_tensor_on(
        &refs_sdxl("lora_unet.safetensors"),
        key,
        &Default::default(),
        DType::F32,
    )
}

fn kohya_file() -> PathBuf {
    tiny_sdxl().join("lora_kohya/tiny-sdxl-kohya.safetensors")
}

fn peft() -> LoraWeights {
    LoraWeights::read(tiny_sdxl().join("lora_peft")).unwrap()
}

/// A fresh scratch folder for one test (removed by the test when it passes).
fn scratch(test: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("alignprop-sdxl-lora-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every tensor of a safetensors file: shape, dtype and bytes (as f32 values) by key.
fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, String, Vec<f32>)> {
    let src = SafetensorsSource::open(&[path]).unwrap();
    src.keys()
        .into_iter()
        .map(|k| {
            let raw = src.find(&k).unwrap().unwrap();
            let dtype = format!("{:?}", raw.data.dtype);
            (
                k,
                (raw.shape.clone(), dtype, raw.data.to_vec::<f32>().unwrap()),
            )
        })
        .collect()
}

fn assert_same_adapters(what: &str, a: &LoraWeights, b: &LoraWeights) {
    assert_eq!(
        a.modules.keys().collect::<Vec<_>>(),
        b.modules.keys().collect::<Vec<_>>(),
        "{what}: module names"
    );
    for (k, p) in &a.modules {
        let q = &b.modules[k];
        assert_eq!((&p.down, &p.up), (&q.down, &q.up), "{what}: {k}");
        assert_eq!(p.scale(), q.scale(), "{what}: scale of {k}");
    }
}

#[test]
fn peft_diffusers_and_kohya_files_reproduce_the_lora_unet() {
    let base = unet();
    assert_close("SDXL base", run(&base), expected("out_base"), 1e-4);
    for (what, path) in [
        ("lora_peft/", tiny_sdxl().join("lora_peft")),
        (
            "lora/",
            tiny_sdxl().join("lora/pytorch_lora_weights.safetensors"),
        ),
        ("lora_kohya/", kohya_file()),
    ] {
        let lora = LoraWeights::read(&path).unwrap();
        assert_eq!(lora.modules.len(), MODULES, "{what}");
        assert_eq!(lora.num_params(), PARAMS, "{what}");
        assert_eq!(lora.has_sgm_names(), what == "lora_kohya/", "{what}");
        let mut u = base.clone();
        // apply translates kohya's original (sgm) names for this UNet by itself.
        alignprop_lora::apply(&mut u, &lora, 1.0, false).unwrap();
        assert_eq!(alignprop_lora::num_params(&mut u), PARAMS, "{what}");
        assert_close(&format!("{what} x1"), run(&u), expected("out"), 1e-4);
        alignprop_lora::set_multiplier(&mut u, 0.5);
        assert_close(
            &format!("{what} x0.5"),
            run(&u),
            expected("out_scale0.5"),
            1e-4,
        );
        alignprop_lora::set_multiplier(&mut u, 1.0);
        // Read back: the peft file's adapters under the diffusers names, alpha 4 (scale 2).
        let back = alignprop_lora::extract(&mut u);
        assert_same_adapters(what, &peft(), &back);
        assert!(back.modules.values().all(|p| p.scale() == 2.0));
        alignprop_lora::merge(&mut u);
        assert_eq!(alignprop_lora::num_params(&mut u), 0);
        assert_close(&format!("{what} merged"), run(&u), expected("out"), 1e-4);
    }
}

#[test]
fn kohya_names_resolve_to_the_peft_modules() {
    let kohya = LoraWeights::read(kohya_file()).unwrap();
    let q = &kohya.modules["input_blocks.4.1.transformer_blocks.0.attn1.to_q"];
    assert_eq!((q.down.shape, q.alpha), ([2, 16], Some(4.0)));
    assert!(
        kohya
            .modules
            .contains_key("middle_block.1.transformer_blocks.1.attn2.to_v")
    );
    assert!(
        kohya
            .modules
            .contains_key("output_blocks.5.1.transformer_blocks.0.attn1.to_out.0")
    );
    let names = UnetNames::of(&unet());
    // The folder's config and weight names give the same as the built model.
    assert_eq!(UnetNames::from_folder(tiny_sdxl()).unwrap(), names);
    assert_eq!(
        UnetNames::from_folder(tiny_sdxl().join("unet")).unwrap(),
        names
    );
    assert!(names.sgm_kohya);
    assert_eq!(names.transformers.len(), 4 + 1 + 6);
    let resolved = kohya.resolve_names(&names).unwrap();
    assert!(!resolved.has_sgm_names());
    assert_same_adapters("kohya resolved", &peft(), &resolved);
    // Every name of the generator's table (manifest.json `kohya_names`), both ways.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_sdxl().join("manifest.json")).unwrap())
            .unwrap();
    let table = manifest["kohya_names"].as_object().unwrap();
    assert_eq!(table.len(), MODULES);
    for (diffusers, kohya_name) in table {
        let sgm = names.to_sgm(diffusers).unwrap();
        assert_eq!(
            format!("lora_unet_{}", sgm.replace('.', "_")),
            kohya_name.as_str().unwrap()
        );
        assert_eq!(&names.to_diffusers(&sgm).unwrap(), diffusers);
    }
}

#[test]
fn kohya_export_of_the_peft_lora_is_the_fixture_kohya_file() {
    let dir = scratch("kohya_export_of_the_peft_lora_is_the_fixture_kohya_file");
    let names = UnetNames::of(&unet());
    let ours = dir.join("export-kohya.safetensors");
    peft().write_for(&ours, LoraFormat::Kohya, &names).unwrap();
    let (got, want) = (tensors(&ours), tensors(&kohya_file()));
    assert_eq!(want.len(), 3 * MODULES);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "key set"
    );
    assert_eq!(got, want, "shapes, dtypes and values");
    assert!(got.contains_key("lora_unet_middle_block_1_transformer_blocks_1_attn2_to_v.alpha"));
    // The same from the folder's names (no model built), from the diffusers file, and from the kohya file itself:
    // read + write without a model keeps its original names.
    let from_folder = dir.join("export-kohya-folder.safetensors");
    LoraWeights::read(tiny_sdxl().join("lora"))
        .unwrap()
        .write_for(
            &from_folder,
            LoraFormat::Kohya,
            &UnetNames::from_folder(tiny_sdxl()).unwrap(),
        )
        .unwrap();
    assert_eq!(tensors(&from_folder), want, "diffusers file -> kohya");
    let again = dir.join("kohya-again.safetensors");
    LoraWeights::read(kohya_file())
        .unwrap()
        .write(&again, LoraFormat::Kohya)
        .unwrap();
    assert_eq!(tensors(&again), want, "kohya -> kohya without a model");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn round_trips_between_the_formats() {
    let dir = scratch("round_trips_between_the_formats");
    let names = UnetNames::from_folder(tiny_sdxl()).unwrap();
    let p = peft();
    let kohya = LoraWeights::read(kohya_file()).unwrap();
    // kohya -> peft / diffusers (names resolved for the model) -> read: the peft LoRA.
    for format in [LoraFormat::Peft, LoraFormat::Diffusers, LoraFormat::Kohya] {
        let path = dir.join(format!("from-kohya-{format:?}.safetensors"));
        kohya.write_for(&path, format, &names).unwrap();
        let back = LoraWeights::read(&path).unwrap();
        assert_eq!(back.has_sgm_names(), format == LoraFormat::Kohya);
        let back = back.resolve_names(&names).unwrap();
        if format == LoraFormat::Diffusers {
            // The classic diffusers layout stores no alpha (read as scale 1): alpha / rank = 2 is folded into up.
            for (k, a) in &p.modules {
                let b = &back.modules[k];
                let up: Vec<f32> = a.up.values.iter().map(|v| v * 2.0).collect();
                assert_eq!(
                    (&a.down, &up, 1.0),
                    (&b.down, &b.up.values, b.scale()),
                    "{k}"
                );
            }
        } else {
            assert_same_adapters(&format!("kohya -> {format:?}"), &p, &back);
        }
        // peft -> format -> read -> kohya: the fixture's kohya names again.
        let k = back.to_sgm_names(&names).unwrap();
        assert_eq!(
            k.modules.keys().collect::<Vec<_>>(),
            kohya.modules.keys().collect::<Vec<_>>()
        );
    }
    // Without the model, original names cannot become peft / diffusers keys: a clear error, nothing written.
    let path = dir.join("refused.safetensors");
    let err = kohya
        .write(&path, LoraFormat::Peft)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("input_blocks") && err.contains("original"),
        "{err}"
    );
    assert!(!path.exists());
    // A kohya LoRA for another model (here: SD1.5's layout) is refused naming the module.
    let sd15 = UnetNames::of(&unet_in(&tiny_sd().join("unet")));
    let err = kohya.resolve_names(&sd15).unwrap_err().to_string();
    // (SD1.5's up level 0 has no attention: output_blocks.0.1 does not exist there.)
    assert!(
        err.contains("'output_blocks.0.1.transformer_blocks.0.attn1.to_k' (original UNet naming)")
            && err.contains("another model"),
        "{err}"
    );
    let mut u = unet_in(&tiny_sd().join("unet"));
    assert!(alignprop_lora::apply(&mut u, &kohya, 1.0, false).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn kohya_lora_merges_into_the_sdxl_model_folder() {
    let dir = scratch("kohya_lora_merges_into_the_sdxl_model_folder");
    let out = dir.join("merged-model");
    let kohya = LoraWeights::read(kohya_file()).unwrap();
    let r = alignprop_lora::merge_files::merge_into_model_folder(&tiny_sdxl(), &kohya, 1.0, &out)
        .unwrap();
    assert_eq!(r.merged, MODULES);
    let merged = unet_in(&out.join("unet"));
    assert_close(
        "kohya merged into the folder",
        run(&merged),
        expected("out"),
        1e-4,
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sd15_kohya_export_keeps_the_diffusers_names() {
    let dir = scratch("sd15_kohya_export_keeps_the_diffusers_names");
    let u = unet_in(&tiny_sd().join("unet"));
    let names = UnetNames::of(&u);
    assert!(!names.sgm_kohya);
    let lora =
        LoraWeights::read(tiny_sd().join("lora_peft/pytorch_lora_weights.safetensors")).unwrap();
    let (a, b) = (
        dir.join("sd15-write.safetensors"),
        dir.join("sd15-write-for.safetensors"),
    );
    lora.write(&a, LoraFormat::Kohya).unwrap();
    lora.write_for(&b, LoraFormat::Kohya, &names).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let t = tensors(&a);
    assert!(t.contains_key(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    ));
    // The SD1.5 layout in the original names (as older SD1.5 kohya files) resolves too.
    let sgm = lora.to_sgm_names(&names).unwrap();
    assert!(
        sgm.modules
            .contains_key("input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    );
    assert_same_adapters(
        "SD1.5 sgm -> diffusers",
        &lora,
        &sgm.resolve_names(&names).unwrap(),
    );
    std::fs::remove_dir_all(&dir).ok();
}
