//! Criterion benchmarks of the op and model workloads on the CPU backend (`cargo bench -p alignprop-bench`).
//! The side-by-side comparison with PyTorch, with peak memory and the AlignProp steps, is `cargo xtask bench`.

use alignprop_bench::{MODELS, OPS, prepare};
use criterion::{Criterion, criterion_group, criterion_main};

type A = burn::backend::Autodiff<burn::backend::Flex>;

fn workloads(c: &mut Criterion) {
    alignprop_device::keep_freed_memory();
    let device = Default::default();
    let mut group = c.benchmark_group("cpu");
    group.sample_size(10);
    for name in OPS.iter().chain(MODELS) {
        let mut w = prepare::<A>(name, &device).expect("workload");
        group.bench_function(*name, |b| b.iter(&mut w));
    }
    group.finish();
}

criterion_group!(benches, workloads);
criterion_main!(benches);
