//! DDIM against diffusers' DDIMScheduler (`tests/fixtures/tiny-sd/refs/ddim.safetensors`).

use alignprop_io::weights::SafetensorsSource;
use alignprop_schedulers::{DdimScheduler, Scheduler, SchedulerConfig};
use alignprop_testing::{ref_tensor_on, ref_values, rel_err, tiny_sd};
use burn::tensor::{DType, Tensor};

type B = burn::backend::Flex;

fn fixture() -> std::path::PathBuf {
    tiny_sd()
}

fn refs() -> SafetensorsSource {
    alignprop_testing::refs("ddim.safetensors")
}

fn values(src: &SafetensorsSource, key: &str) -> Vec<f64> {
    ref_values(src, key)
}

fn tensor(src: &SafetensorsSource, key: &str, dtype: DType) -> Tensor<B, 4> {
    ref_tensor_on(src, key, &Default::default(), dtype)
}

fn sd15_config() -> SchedulerConfig {
    SchedulerConfig::from_file(&fixture().join("scheduler/scheduler_config.json")).unwrap()
}

#[test]
fn config_files_parse_to_sd15_defaults() {
    assert_eq!(sd15_config(), SchedulerConfig::default());
    // SD1.5 ships a PNDM config; DDIM built from it is the same schedule.
    let pndm = SchedulerConfig::from_file(
        &fixture().join("extra/sd15_style_configs/scheduler_config.json"),
    )
    .unwrap();
    assert_eq!(pndm, SchedulerConfig::default());
}

#[test]
fn schedule_matches_diffusers_float32_values() {
    let r = refs();
    let cfg = sd15_config();
    let betas = alignprop_schedulers::schedule::betas(&cfg).unwrap();
    let ref_betas = values(&r, "betas");
    // torch's vectorised linspace kernel rounds a few interior points differently (chunked arange); the
    // values agree to within a few float32 ulps.
    for (i, (a, b)) in betas.iter().zip(&ref_betas).enumerate() {
        assert!(((*a as f64 - b) / b).abs() <= 5e-7, "beta[{i}]: {a} vs {b}");
    }
    let s = DdimScheduler::new(&cfg, 50).unwrap();
    let ref_ac = values(&r, "alphas_cumprod");
    let max_rel = s
        .alphas_cumprod()
        .iter()
        .zip(&ref_ac)
        .map(|(a, b)| ((a - b) / b).abs())
        .fold(0.0, f64::max);
    assert!(max_rel <= 1.2e-7, "alphas_cumprod max rel err {max_rel:e}");
    assert_eq!(
        s.final_alpha_cumprod(),
        values(&r, "final_alpha_cumprod")[0]
    );
}

#[test]
fn timesteps_and_sigmas() {
    let r = refs();
    let cfg = sd15_config();
    for n in [50usize, 4] {
        let s = DdimScheduler::new(&cfg, n).unwrap().with_eta(1.0).unwrap();
        let t: Vec<f64> = s.timesteps().iter().map(|&t| t as f64).collect();
        assert_eq!(t, values(&r, &format!("timesteps_{n}")), "timesteps_{n}");
        let sig: Vec<f64> = (0..n).map(|i| s.sigma_eta1(i)).collect();
        for (i, (a, b)) in sig
            .iter()
            .zip(values(&r, &format!("sigma_eta1_{n}")))
            .enumerate()
        {
            assert!(
                ((a - b) / b).abs() < 1e-5,
                "sigma_eta1_{n}[{i}]: {a} vs {b}"
            );
        }
    }
}

#[test]
fn single_steps_eta0_and_eta1() {
    let r = refs();
    let cfg = sd15_config();
    for dtype in [DType::F32, DType::F64] {
        for eta in [0.0, 1.0] {
            let s = DdimScheduler::new(&cfg, 50).unwrap().with_eta(eta).unwrap();
            for t in [981usize, 481, 1] {
                let i = s.timesteps().iter().position(|&x| x == t).unwrap();
                let p = format!("step_t{t}");
                let out = s.step(
                    tensor(&r, &format!("{p}.model_output"), dtype),
                    i,
                    tensor(&r, &format!("{p}.sample"), dtype),
                    Some(tensor(&r, &format!("{p}.variance_noise"), dtype)),
                );
                let e = eta as usize;
                let prev = tensor(&r, &format!("{p}.eta{e}.prev_sample"), dtype);
                let x0 = tensor(&r, &format!("{p}.eta{e}.pred_original_sample"), dtype);
                let (ep, ex) = (
                    rel_err(out.prev_sample, prev).0,
                    rel_err(out.pred_original_sample, x0).0,
                );
                assert!(
                    ep < 1e-5 && ex < 1e-5,
                    "{dtype:?} eta {eta} t {t}: prev {ep:e}, x0 {ex:e}"
                );
            }
        }
    }
}

#[test]
fn ddim_step_is_differentiable() {
    use burn::backend::Autodiff;
    type A = Autodiff<B>;
    let s = DdimScheduler::new(&SchedulerConfig::default(), 50)
        .unwrap()
        .with_eta(1.0)
        .unwrap();
    let device = Default::default();
    let eps = Tensor::<A, 4>::ones([1, 4, 2, 2], &device).require_grad();
    let x = Tensor::<A, 4>::ones([1, 4, 2, 2], &device).require_grad();
    let z = Tensor::<A, 4>::zeros([1, 4, 2, 2], &device);
    let i = 10;
    let out = s.step(eps.clone(), i, x.clone(), Some(z)).prev_sample.sum();
    let grads = out.backward();
    let c = s.coefficients(i);
    let (sa, sb) = (c.alpha_prod_t.sqrt(), (1.0 - c.alpha_prod_t).sqrt());
    // x_prev = sqrt(a_prev) (x - sb eps) / sa + direction eps
    let d_eps = -c.sqrt_alpha_prev * sb / sa + c.direction;
    let d_x = c.sqrt_alpha_prev / sa;
    let g_eps: Vec<f32> = eps.grad(&grads).unwrap().into_data().to_vec().unwrap();
    let g_x: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
    assert!(
        g_eps.iter().all(|g| (*g as f64 - d_eps).abs() < 1e-5),
        "{g_eps:?} vs {d_eps}"
    );
    assert!(
        g_x.iter().all(|g| (*g as f64 - d_x).abs() < 1e-5),
        "{g_x:?} vs {d_x}"
    );
}

/// The detached-step VJP equals autodiff through `step` with the model output held fixed, for every prediction
/// type, with and without `clip_sample`, at eta 0 and 1 (float64).
#[test]
fn step_sample_vjp_equals_autodiff_for_every_prediction_type_and_clipping() {
    use burn::backend::Autodiff;
    use burn::tensor::Distribution;
    type A = Autodiff<B>;
    let device = Default::default();
    let r = |seed: u64| {
        <B as burn::tensor::backend::Backend>::seed(&device, seed);
        Tensor::<B, 4>::random(
            [2, 4, 3, 5],
            Distribution::Normal(0.0, 1.0),
            (&device, DType::F64),
        )
    };
    let mut clipped_somewhere = false;
    for prediction in ["epsilon", "v_prediction", "sample"] {
        for clip in [false, true] {
            for eta in [0.0, 1.0] {
                let cfg = SchedulerConfig {
                    prediction_type: prediction.into(),
                    clip_sample: clip,
                    clip_sample_range: 1.0,
                    ..SchedulerConfig::default()
                };
                let s = DdimScheduler::new(&cfg, 10).unwrap().with_eta(eta).unwrap();
                for i in [0, 4, 9] {
                    let (out, x, z, g) = (r(1), r(2) * 2.0, r(3), r(4));
                    let xa = Tensor::<A, 4>::from_inner(x.clone()).require_grad();
                    let prev = s
                        .step(
                            Tensor::<A, 4>::from_inner(out.clone()),
                            i,
                            xa.clone(),
                            Some(Tensor::from_inner(z)),
                        )
                        .prev_sample;
                    let grads = (prev * Tensor::from_inner(g.clone())).sum().backward();
                    let expected = xa.grad(&grads).unwrap();
                    let ours = s.step_sample_vjp(i, g.clone(), out, x);
                    // Relative to the largest element: burn passes scalar factors as float32, so the two groupings
                    // of the step's scalars differ by ~1e-7 even on float64 tensors.
                    let scale = expected.clone().abs().max().into_scalar();
                    let e = (ours - expected.clone()).abs().max().into_scalar() / scale;
                    assert!(e < 1e-6, "{prediction} clip {clip} eta {eta} step {i}: {e}");
                    // With clipping some elements of x0 are clamped: then the gradient is not g times a scalar.
                    if clip && prediction != "sample" {
                        let ratio = expected / g;
                        let spread = (ratio.clone().max() - ratio.min()).into_scalar();
                        clipped_somewhere |= spread > 1e-3;
                    }
                }
            }
        }
    }
    assert!(
        clipped_somewhere,
        "no case clamped x0: the clip branch was not exercised"
    );
}
