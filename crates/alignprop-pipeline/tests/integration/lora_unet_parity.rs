//! LoRA on the UNet against diffusers/peft (`refs/lora_unet.safetensors`): the peft file applied at scale 1 and
//! 0.5, merged, extracted back; fresh adapters start at the base model; SD1.5's parameter count at rank 4.

use alignprop_diffusion::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use alignprop_io::weights::VarBuilder;
use alignprop_lora::{LoraConfig, LoraWeights};
use alignprop_testing::{assert_close, ref_int_on, ref_tensor_on, refs, tiny_sd};
use burn::tensor::{DType, Tensor};

type B = burn::backend::Flex;

fn unet() -> UNet2DConditionModel<B> {
    UNet2DConditionModel::load(&tiny_sd().join("unet"), &Default::default(), DType::F32).unwrap()
}

fn run(unet: &UNet2DConditionModel<B>) -> Tensor<B, 4> {
    let r = refs("lora_unet.safetensors");
    let d = Default::default();
    unet.forward(
        ref_tensor_on(&r, "sample", &d, DType::F32),
        ref_int_on::<B, 1>(&r, "timesteps", &d).float(),
        ref_tensor_on(&r, "encoder_hidden_states", &d, DType::F32),
    )
}

fn expected(key: &str) -> Tensor<B, 4> {
    ref_tensor_on(
        &refs("lora_unet.safetensors"),
        key,
        &Default::default(),
        DType::F32,
    )
}

#[test]
fn peft_and_diffusers_files_reproduce_the_lora_unet() {
    for file in ["lora_peft", "lora"] {
        let lora = LoraWeights::read(
            &tiny_sd()
                .join(file)
                .join("pytorch_lora_weights.safetensors"),
        )
        .unwrap();
        let mut u = unet();
        assert_close("base", run(&u), expected("out_base"), 1e-4);
        alignprop_lora::apply(&mut u, &lora, 1.0, false).unwrap();
        assert_eq!(alignprop_lora::num_params(&mut u), 21_568);
        assert_close(&format!("{file} scale 1"), run(&u), expected("out"), 1e-4);
        alignprop_lora::set_multiplier(&mut u, 0.5);
        assert_close(
            &format!("{file} scale 0.5"),
            run(&u),
            expected("out_scale0.5"),
            1e-4,
        );
        alignprop_lora::set_multiplier(&mut u, 1.0);
        // Extracting gives back the file's adapters.
        let back = alignprop_lora::extract(&mut u);
        for (k, p) in &lora.modules {
            assert_eq!(
                (&back.modules[k].down, &back.modules[k].up),
                (&p.down, &p.up),
                "{k}"
            );
            assert_eq!(back.modules[k].scale(), p.scale());
        }
        // Merged into the base weights: same output, no adapters left.
        alignprop_lora::merge(&mut u);
        assert_eq!(alignprop_lora::num_params(&mut u), 0);
        assert_close(&format!("{file} merged"), run(&u), expected("out"), 1e-4);
    }
}

#[test]
fn fresh_adapters_start_at_the_base_model_and_are_trainable() {
    let mut u = unet();
    let n = alignprop_lora::inject(&mut u, &LoraConfig::default()).unwrap();
    assert_eq!(n, 21_568);
    assert_close("fresh LoRA = base", run(&u), expected("out_base"), 1e-6);
    let wrong = LoraConfig {
        target_modules: vec!["to_nothing".into()],
        ..Default::default()
    };
    assert!(alignprop_lora::inject(&mut unet(), &wrong).is_err());
}

#[test]
fn lora_for_another_model_is_refused_clearly() {
    let lora =
        LoraWeights::read(&tiny_sd().join("lora_peft/pytorch_lora_weights.safetensors")).unwrap();
    let mut other = UNet2DConditionModel::<B>::load(
        &tiny_sd().join("extra/unet_2block"),
        &Default::default(),
        DType::F32,
    )
    .unwrap();
    let err = alignprop_lora::apply(&mut other, &lora, 1.0, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("LoRA module") || err.contains("do not exist"),
        "{err}"
    );
}

#[test]
fn sd15_rank4_has_797184_parameters() {
    // Shapes only: the full-size UNet with zero weights (cheap), rank-4 adapters on q, k, v, out.
    let vb = VarBuilder::<B>::zeros(&Default::default(), DType::F32);
    let mut u = UNet2DConditionModel::new(&UNet2DConditionConfig::default(), &vb).unwrap();
    assert_eq!(
        alignprop_lora::inject(&mut u, &LoraConfig::default()).unwrap(),
        797_184
    );
}

#[test]
fn half_precision_base_keeps_f32_adapters_and_trains_them() {
    use burn::backend::Autodiff;
    type A = Autodiff<B>;
    let d = Default::default();
    let mut u = UNet2DConditionModel::<A>::load(&tiny_sd().join("unet"), &d, DType::BF16).unwrap();
    let lora =
        LoraWeights::read(&tiny_sd().join("lora_peft/pytorch_lora_weights.safetensors")).unwrap();
    alignprop_lora::apply(&mut u, &lora, 1.0, true).unwrap();
    let (name, attn) = u.attentions().into_iter().next().unwrap();
    let l = attn.to_q.lora.as_ref().unwrap();
    assert_eq!(
        (attn.to_q.weight.val().dtype(), l.down.val().dtype()),
        (DType::BF16, DType::F32),
        "{name}"
    );
    let r = refs("lora_unet.safetensors");
    let out = u.forward(
        ref_tensor_on(&r, "sample", &d, DType::BF16),
        ref_int_on::<A, 1>(&r, "timesteps", &d).float(),
        ref_tensor_on(&r, "encoder_hidden_states", &d, DType::BF16),
    );
    assert_eq!(out.dtype(), DType::BF16);
    // bf16 keeps ~3 significant digits: the output is still close to the f32 LoRA reference.
    let (rel, _) =
        alignprop_testing::rel_err(out.clone().inner().cast(DType::F32), expected("out"));
    assert!(rel < 3e-2, "bf16 LoRA UNet rel err {rel:e}");
    let grads = out.cast(DType::F32).sum().backward();
    let g = l
        .down
        .val()
        .grad(&grads)
        .expect("the f32 adapter gets a gradient");
    assert_eq!(g.dtype(), DType::F32);
}
