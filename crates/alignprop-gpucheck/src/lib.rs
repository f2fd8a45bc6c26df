//! The GPU check: one backend-generic suite that proves a backend computes what PyTorch computes, for every part
//! of the product, on the repository's fixtures (`tests/fixtures`, float32 tolerances).
//!
//! - [`ops`]: shape sweeps of the ops the models use (the matmul layouts of `Linear`, attention and LoRA, long
//!   reductions, GroupNorm / LayerNorm / softmax on large maps, convolutions, attention), each against a host
//!   float64 reference, plus the known upstream faults of burn 0.21's cube backend pinned as such.
//! - [`models`]: the text encoder, the UNet with and without LoRA, the VAE, the 4-step CFG sampling run, every
//!   reward's score and image gradient, and the float32 AlignProp gradient (full chain and K = 1) against the
//!   fixture references.
//! - [`training`]: seeded tiny training runs (the demo, and one per CLIP-based reward) and `sample`, each compared
//!   with the same run on the CPU backend.
//!
//! The binary `alignprop-gpucheck --device wgpu|cuda[:N]` runs it with a watchdog (a check that hangs or a panic on a
//! backend thread ends the process with the check's name instead of waiting forever); the test `wgpu_suite` runs the
//! binary on the first wgpu adapter in CI, and `cargo xtask gpu-check` runs it on CUDA.

pub mod models;
pub mod ops;
pub mod training;

pub use alignprop_testing::{try_rel_err_values, values};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

/// What a check that did not fail reports: its measured figures, or why it does not apply to this backend.
#[derive(Clone, Debug)]
pub enum Outcome {
    Pass(String),
    Skip(String),
}

/// A check's result: `Err` holds what was wrong (with the figures).
pub type CheckResult = Result<Outcome, String>;

/// One named check of the suite, run on device `A::Device` of the autodiff backend `A`.
pub struct Check<A: AutodiffBackend> {
    /// `group/name`, e.g. `models/unet`.
    pub name: &'static str,
    pub run: fn(&A::Device) -> CheckResult,
}

/// Every check, in the order the suite runs them (cheap op sweeps first, so kernel faults show before models).
pub fn checks<A: AutodiffBackend>() -> Vec<Check<A>> {
    let mut all = ops::checks::<A>();
    all.extend(models::checks::<A>());
    all.extend(training::checks::<A>());
    all
}

/// Collects named comparisons of one check: `compare` records `name: rel` and remembers the ones over their
/// tolerance; `finish` gives the report line, or the failures.
#[derive(Default)]
pub struct Report {
    lines: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    pub fn new() -> Self {
        Self::default()
    }

    /// Compares value lists: relative L2 error at most `tol`.
    pub fn compare_values(&mut self, what: &str, actual: &[f64], expected: &[f64], tol: f64) {
        match try_rel_err_values(actual, expected) {
            Ok((rel, max_abs)) => {
                self.lines.push(format!("{what} {rel:.1e}"));
                if rel > tol || rel.is_nan() {
                    self.failures.push(format!(
                        "{what}: relative error {rel:.3e} > {tol:.0e} (max abs {max_abs:.3e})"
                    ));
                }
            }
            Err(e) => self.failures.push(format!("{what}: {e}")),
        }
    }

    /// Compares two tensors of the same shape (any backends).
    pub fn compare<B1: Backend, B2: Backend, const D: usize>(
        &mut self,
        what: &str,
        actual: Tensor<B1, D>,
        expected: Tensor<B2, D>,
        tol: f64,
    ) {
        if actual.dims() != expected.dims() {
            self.failures.push(format!(
                "{what}: shape {:?}, expected {:?}",
                actual.dims(),
                expected.dims()
            ));
            return;
        }
        self.compare_values(what, &values(actual), &values(expected), tol);
    }

    /// Records a figure that is not compared.
    pub fn note(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }

    /// Records a failure.
    pub fn fail(&mut self, line: impl Into<String>) {
        self.failures.push(line.into());
    }

    pub fn finish(self) -> CheckResult {
        if self.failures.is_empty() {
            Ok(Outcome::Pass(self.lines.join(", ")))
        } else {
            Err(self.failures.join("; "))
        }
    }
}
