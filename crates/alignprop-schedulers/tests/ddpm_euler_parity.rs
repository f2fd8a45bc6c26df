//! DDPM and Euler ancestral against diffusers' `DDPMScheduler` / `EulerAncestralDiscreteScheduler`
//! (`refs/schedulers.safetensors`, made by `xtask/fixtures/make_scheduler_refs.py`), in f32 and f64.

use alignprop_schedulers::{AnyScheduler, Scheduler, SchedulerConfig};
use alignprop_testing::{ref_tensor_on, ref_values, refs, rel_err, tiny_sd};
use burn::tensor::{DType, Tensor};

type B = burn::backend::Flex;

fn config() -> SchedulerConfig {
    SchedulerConfig::from_file(&tiny_sd().join("scheduler/scheduler_config.json")).unwrap()
}

#[test]
fn schedules_match() {
    let r = refs("schedulers.safetensors");
    for name in ["ddpm", "euler_a"] {
        for n in [4usize, 50] {
            let s = AnyScheduler::new(name, &config(), n, 0.0).unwrap();
            let t: Vec<f64> = s.timesteps().iter().map(|&t| t as f64).collect();
            assert_eq!(
                t,
                ref_values(&r, &format!("{name}.{n}.timesteps")),
                "{name} {n} timesteps"
            );
            if let AnyScheduler::EulerAncestral(e) = &s {
                let sig = ref_values(&r, &format!("{name}.{n}.sigmas"));
                for (a, b) in e.sigmas().iter().zip(&sig) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{name} {n} sigma {a} vs {b}"
                    );
                }
                let init = ref_values(&r, &format!("{name}.{n}.init_noise_sigma"))[0];
                assert!(
                    (s.init_noise_sigma() - init).abs() < 1e-5 * init,
                    "{} vs {init}",
                    s.init_noise_sigma()
                );
            }
        }
    }
}

#[test]
fn steps_match_in_f32_and_f64() {
    let r = refs("schedulers.safetensors");
    let d = Default::default();
    for dtype in [DType::F32, DType::F64] {
        for name in ["ddpm", "euler_a"] {
            for n in [4usize, 50] {
                let s = AnyScheduler::new(name, &config(), n, 0.0).unwrap();
                let mut indices = vec![0, n / 2, n - 1];
                indices.dedup();
                for i in indices {
                    let q = format!("{name}.{n}.step{i}");
                    let t = |k: &str| -> Tensor<B, 4> {
                        ref_tensor_on(&r, &format!("{q}.{k}"), &d, dtype)
                    };
                    if name == "euler_a" {
                        let (e, _) =
                            rel_err(s.scale_model_input(t("sample"), i), t("scaled_input"));
                        assert!(e < 1e-5, "{q} scaled input {e:e}");
                    }
                    let out = s.step(t("model_output"), i, t("sample"), Some(t("noise")));
                    let (ep, _) = rel_err(out.prev_sample, t("prev_sample"));
                    let (ex, _) = rel_err(out.pred_original_sample, t("pred_original_sample"));
                    eprintln!("{dtype:?} {q}: prev {ep:.2e}, x0 {ex:.2e}");
                    assert!(
                        ep < 1e-5 && ex < 1e-5,
                        "{dtype:?} {q}: prev {ep:e}, x0 {ex:e}"
                    );
                }
            }
        }
    }
}
