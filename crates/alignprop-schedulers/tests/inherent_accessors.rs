//! The schedules are readable without importing the `Scheduler` trait, and DDIM's `eta` is set by a builder.

use alignprop_schedulers::{
    AnyScheduler, DdimScheduler, DdpmScheduler, EulerAncestralScheduler, SchedulerConfig,
};

#[test]
fn schedules_read_without_the_trait() {
    let cfg = SchedulerConfig::default();
    let ddim = DdimScheduler::new(&cfg, 50).unwrap();
    assert_eq!(ddim.timesteps().len(), 50);
    assert_eq!(ddim.timesteps()[0], 981);
    assert_eq!(*ddim.timesteps().last().unwrap(), 1);
    assert_eq!(ddim.init_noise_sigma(), 1.0);
    assert_eq!(ddim.alphas_cumprod().len(), cfg.num_train_timesteps);
    let ddpm = DdpmScheduler::new(&cfg, 50).unwrap();
    assert_eq!(ddpm.timesteps(), ddim.timesteps());
    assert_eq!(ddpm.init_noise_sigma(), 1.0);
    assert_eq!(ddpm.alphas_cumprod(), ddim.alphas_cumprod());
    let euler = EulerAncestralScheduler::new(&cfg, 50).unwrap();
    assert_eq!(euler.timesteps(), ddim.timesteps());
    assert!(euler.init_noise_sigma() > 1.0);
    for kind in ["ddim", "ddpm", "euler_a"] {
        let any = AnyScheduler::new(kind, &cfg, 50, 0.0).unwrap();
        assert_eq!(any.timesteps(), ddim.timesteps(), "{kind}");
    }
    let any = AnyScheduler::new("euler_a", &cfg, 50, 0.0).unwrap();
    assert_eq!(any.init_noise_sigma(), euler.init_noise_sigma());
}

#[test]
fn ddim_eta_defaults_to_zero_and_is_checked() {
    let cfg = SchedulerConfig::default();
    let ddim = DdimScheduler::new(&cfg, 10).unwrap();
    assert_eq!(ddim.eta(), 0.0);
    assert!((0..10).all(|i| ddim.coefficients(i).sigma == 0.0));
    let noisy = ddim.clone().with_eta(1.0).unwrap();
    assert_eq!(noisy.eta(), 1.0);
    assert_eq!(noisy.timesteps(), ddim.timesteps());
    for bad in [-0.1, 1.5, f64::NAN] {
        let err = ddim.clone().with_eta(bad).unwrap_err();
        assert!(err.to_string().contains("eta"), "{err}");
    }
    assert!(AnyScheduler::new("ddim", &cfg, 10, 2.0).is_err());
}
