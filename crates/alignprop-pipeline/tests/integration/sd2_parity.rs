//! SD 2.1 (768-v) end to end on the tiny SD2 fixture (`tests/fixtures/tiny-sd2`, README (d), (e)): the folder loaded
//! by `StableDiffusion::load` (v-prediction DDIM from its scheduler config, `!`-padding tokenizer), the 4-step CFG
//! sampling run against diffusers' `StableDiffusionPipeline` step by step (eta 0, and eta 1 with the stored noise),
//! the decoded image; and LoRA (peft's `save_pretrained` folder and diffusers' `save_lora_weights` file, alpha 4 on
//! rank 2) on the UNet.

use alignprop_diffusion::unet::UNet2DConditionModel;
use alignprop_lora::LoraWeights;
use alignprop_pipeline::{Conditioning, StableDiffusion, guided_noise};
use alignprop_schedulers::{DdimScheduler, PredictionType, Scheduler, x0_and_eps};
use alignprop_testing::{assert_close, ref_int_on, ref_tensor_on, refs_sd2, tiny_sd2};
use burn::tensor::{DType, Tensor};

use crate::shared::{assert_ddim_update, assert_prompt_ids};

type B = burn::backend::Flex;
const TOL: f64 = 1e-4;
/// f64 against the `_f64` references.
const TOL_F64: f64 = 1e-8;

fn t<const D: usize>(key: &str) -> Tensor<B, D> {
    ref_tensor_on(
        &refs_sd2("sample.safetensors"),
        key,
        &Default::default(),
        DType::F32,
    )
}

fn load() -> StableDiffusion<B> {
    StableDiffusion::<B>::load(tiny_sd2(), &Default::default(), DType::F32).unwrap()
}

fn reference_text() -> Conditioning<B> {
    Conditioning::new(t("uncond_embeds"), t("cond_embeds"))
}

#[test]
fn folder_loads_as_sd2_and_prompts_encode_to_the_reference() {
    let sd = load();
    assert_eq!(sd.scheduler_config.prediction_type, "v_prediction");
    assert_eq!(sd.tokenizer.pad_id(), 0);
    assert!(sd.tokenizer_note.is_none());
    assert_prompt_ids(&sd, &refs_sd2("sample.safetensors"));
    let text = sd
        .conditioning(&["cat", "a photo of a golden retriever"], "")
        .unwrap();
    assert_close("uncond embeds", text.uncond, t("uncond_embeds"), TOL);
    assert_close("cond embeds", text.cond, t("cond_embeds"), TOL);
    // sample_size 8 latents x 8.
    assert_eq!(sd.default_image_size(), 64);
}

/// eta 0, CFG 7.5, v-prediction: the UNet's v for both halves, the guided v, x0 and epsilon from it, each DDIM
/// update, the final latents and the decoded image.
#[test]
fn v_prediction_ddim_cfg_loop_matches_diffusers_step_by_step() {
    let sd = load();
    let text = reference_text();
    let sched = DdimScheduler::new(&sd.scheduler_config, 4).unwrap();
    assert_eq!(sched.timesteps(), [751, 501, 251, 1]);
    let r = refs_sd2("sample.safetensors");
    let expected_ts: Vec<i64> = ref_int_on::<B, 1>(&r, "timesteps", &Default::default())
        .into_data()
        .convert::<i64>()
        .to_vec()
        .unwrap();
    assert_eq!(expected_ts, [751, 501, 251, 1]);
    let mut x = t::<4>("x_T");
    for i in 0..4 {
        let ts = sched.timesteps()[i];
        let step = |name: &str| format!("step{i}.{name}");
        let both = sd.unet.forward_with_timestep(
            Tensor::cat(vec![x.clone(), x.clone()], 0),
            ts as f64,
            text.stacked(),
        );
        let [u, c] = both.chunk(2, 0).try_into().unwrap();
        assert_close(&step("v_uncond"), u, t(&step("v_uncond")), TOL);
        assert_close(&step("v_cond"), c, t(&step("v_cond")), TOL);
        let v = guided_noise(&sd.unet, x.clone(), ts as f64, &text, 7.5);
        assert_close(&step("v_guided"), v.clone(), t(&step("v_guided")), TOL);
        let (_, eps) = x0_and_eps(
            PredictionType::VPrediction,
            v.clone(),
            x.clone(),
            sched.alphas_cumprod()[ts],
        );
        assert_close(&step("pred_epsilon"), eps, t(&step("pred_epsilon")), TOL);
        x = assert_ddim_update(i, sched.step(v, i, x, None), t::<4>, TOL);
    }
    assert_close("final_latents", x.clone(), t("final_latents"), TOL);
    assert_close("image", sd.vae.decode_scaled(x), t("image"), TOL);
}

/// eta 1 with the stored variance noise, through `denoise` (the loop `sample` runs).
#[test]
fn eta1_loop_through_denoise_matches() {
    let sd = load();
    let sched = DdimScheduler::new(&sd.scheduler_config, 4)
        .unwrap()
        .with_eta(1.0)
        .unwrap();
    let noises = (0..4)
        .map(|i| Some(t::<4>(&format!("variance_noise.{i}"))))
        .collect();
    let x = alignprop_pipeline::denoise(
        &sd.unet,
        &sched,
        t("x_T"),
        &reference_text(),
        7.5,
        noises,
        &mut |_, _| {},
    );
    assert_close("final_latents_eta1", x, t("final_latents_eta1"), TOL);
}

// ------------------------------------------------------------------------------------------------ LoRA

fn unet(dtype: DType) -> UNet2DConditionModel<B> {
    UNet2DConditionModel::load(tiny_sd2().join("unet"), &Default::default(), dtype).unwrap()
}

fn run(unet: &UNet2DConditionModel<B>, dtype: DType) -> Tensor<B, 4> {
    let r = refs_sd2("lora_unet.safetensors");
    let d = Default::default();
    unet.forward(
        ref_tensor_on(&r, "sample", &d, dtype),
        ref_int_on::<B, 1>(&r, "timesteps", &d).float(),
        ref_tensor_on(&r, "encoder_hidden_states", &d, dtype),
    )
}

fn expected(key: &str, dtype: DType) -> Tensor<B, 4> {
    ref_tensor_on(
        &refs_sd2("lora_unet.safetensors"),
        key,
        &Default::default(),
        dtype,
    )
}

/// peft's folder (`adapter_model.safetensors`, alpha in `adapter_config.json`) and diffusers' file (alpha in the
/// header's `lora_adapter_metadata`): the same adapters, scale alpha / r = 2, at multiplier 1 and 0.5, merged; and
/// in f64.
#[test]
fn peft_and_diffusers_lora_reproduce_the_lora_unet() {
    let peft = LoraWeights::read(tiny_sd2().join("lora_peft")).unwrap();
    let diffusers =
        LoraWeights::read(tiny_sd2().join("lora/pytorch_lora_weights.safetensors")).unwrap();
    assert_eq!(peft, diffusers, "the two files hold the same adapters");
    assert_eq!(peft.modules.len(), 88);
    assert!(peft.modules.values().all(|p| p.scale() == 2.0));
    for (what, lora) in [("lora_peft/", peft), ("lora/", diffusers)] {
        let mut u = unet(DType::F32);
        assert_close(
            "base",
            run(&u, DType::F32),
            expected("out_base", DType::F32),
            TOL,
        );
        alignprop_lora::apply(&mut u, &lora, 1.0, false).unwrap();
        assert_eq!(alignprop_lora::num_params(&mut u), 4736);
        assert_close(
            &format!("{what} scale 1"),
            run(&u, DType::F32),
            expected("out", DType::F32),
            TOL,
        );
        alignprop_lora::set_multiplier(&mut u, 0.5);
        assert_close(
            &format!("{what} scale 0.5"),
            run(&u, DType::F32),
            expected("out_scale0.5", DType::F32),
            TOL,
        );
        alignprop_lora::set_multiplier(&mut u, 1.0);
        alignprop_lora::merge(&mut u);
        assert_close(
            &format!("{what} merged"),
            run(&u, DType::F32),
            expected("out", DType::F32),
            TOL,
        );
        let mut u64 = unet(DType::F64);
        alignprop_lora::apply(&mut u64, &lora, 1.0, false).unwrap();
        assert_close(
            &format!("{what} f64"),
            run(&u64, DType::F64),
            expected("out_f64", DType::F64),
            TOL_F64,
        );
    }
}

/// The peft file without its `adapter_config.json` would lose alpha (scale 1 instead of 2): read alone it says
/// so by giving the unscaled adapters, and settings that change the scale formula are refused naming the file.
#[test]
fn peft_adapter_config_decides_the_scale() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("sd2_peft_config");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = tiny_sd2().join("lora_peft");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let alone = LoraWeights::read(dir.join("adapter_model.safetensors")).unwrap();
    assert!(alone.modules.values().all(|p| p.alpha.is_none()));
    let config = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    assert!(config.contains("\"use_rslora\": false"));
    let config = config.replace("\"use_rslora\": false", "\"use_rslora\": true");
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    let msg = LoraWeights::read(&dir).unwrap_err().to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("adapter_config.json") && msg.contains("use_rslora"),
        "{msg}"
    );
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let msg = LoraWeights::read(&empty).unwrap_err().to_string();
    assert!(msg.contains("adapter_model.safetensors"), "{msg}");
}
