//! Data-parallel training on burn's collective engine (`burn::collective`): one worker thread per device, each
//! with its own copy of the frozen model and of the LoRA adapters; once per optimiser step the workers all-reduce
//! (sum) one flat vector holding their LoRA gradients and a header (failure and stop flags, adapter checksums,
//! each micro-batch's loss, K and rewards), then every worker applies the same AdamW update.
//!
//! The global batch of a step is `batch_size x grad_accum x world` images in `grad_accum x world` micro-batches;
//! worker `r` runs micro-batches `r * grad_accum ..`. Every draw of a micro-batch derives from (seed, step, global
//! index) ([`crate::train::derive_seed`]), so 1 worker with accumulation 4 and 4 workers with accumulation 1 see
//! the same samples and compute the same update (up to the summation order).
//!
//! Failures: every error or panic of a worker between two exchanges is carried into the next exchange as a flag,
//! so all workers stop at the same point and none waits forever; the run's error names the worker and its
//! device. Ctrl-C (`stop`) is agreed the same way: every worker finishes the step, worker 0 writes one checkpoint.

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use burn::collective::{CollectiveConfig, PeerId, ReduceOperation};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

use crate::config::TrainConfig;
use crate::lora_params::{LoraGrads, adapter_values};
use crate::train::{
    EvalLog, MicroBatch, Resume, RunSummary, StepLog, TrainError, Trainer, WorkerRank, drive,
    guarded,
};

/// What a worker brings to an exchange.
pub struct Contribution<B: Backend> {
    /// This worker failed since the last exchange (its error is returned after the exchange).
    pub failed: bool,
    /// Ctrl-C was seen on this worker.
    pub stop: bool,
    /// [`Trainer::adapter_checksum`], on the steps where replicas are compared.
    pub checksum: Option<[f64; 2]>,
    /// Its micro-batches' results.
    pub micro: Vec<MicroBatch>,
    /// The sum of its micro-batches' LoRA gradients (`None` at start-up or after a failure).
    pub grads: Option<LoraGrads<B>>,
}

impl<B: Backend> Contribution<B> {
    /// A failed worker's contribution: the flag, nothing else.
    pub fn failure() -> Self {
        Self {
            failed: true,
            stop: false,
            checksum: None,
            micro: Vec::new(),
            grads: None,
        }
    }
}

/// What every worker knows after an exchange (the same on all of them).
pub struct Agreed<B: Backend> {
    /// The workers that failed.
    pub failed: Vec<usize>,
    /// Ctrl-C was seen on some worker.
    pub stop: bool,
    /// Every worker's checksum, where they were sent.
    pub checksums: Vec<Option<[f64; 2]>>,
    /// Every micro-batch of the global batch, in index order.
    pub micro: Vec<MicroBatch>,
    /// The sum of all workers' gradients (in a step's exchange).
    pub grads: Option<LoraGrads<B>>,
}

impl<B: Backend> Agreed<B> {
    /// An error where some worker failed ([`TrainError::PeerFailed`]) or the replicas' checksums differ
    /// ([`TrainError::ReplicaDrift`]); the same answer on every worker.
    pub fn settle(&self) -> Result<(), TrainError> {
        if let Some(&worker) = self.failed.first() {
            return Err(TrainError::PeerFailed { worker });
        }
        let sent: Vec<(usize, [f64; 2])> = self
            .checksums
            .iter()
            .enumerate()
            .filter_map(|(w, c)| c.map(|c| (w, c)))
            .collect();
        if let Some(&(_, first)) = sent.first() {
            for &(w, c) in &sent[1..] {
                let close =
                    |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1e-12);
                if !close(c[0], first[0]) || !close(c[1], first[1]) {
                    return Err(TrainError::ReplicaDrift(format!(
                        "the LoRA adapters of worker {w} differ from worker {}'s (checksums sum {:e} / sum of \
                         squares {:e} against {:e} / {:e}): the replicas drifted apart",
                        sent[0].0, c[0], c[1], first[0], first[1]
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The shape of a step's gradient exchange: the adapters in one agreed order.
pub struct StepLayout<B: Backend> {
    /// Each LoRA tensor's key and shape, in key order.
    pub tensors: Vec<(String, [usize; 2])>,
    /// Micro-batches in the global batch and images per micro-batch.
    pub micro: usize,
    pub batch_size: usize,
    /// DRaFT-LV's re-noised copies per micro-batch (each logs its mean reward); 0 for the other methods.
    pub copies: usize,
    pub device: B::Device,
    /// The adapters' (and their gradients') dtype.
    pub dtype: DType,
}

impl<B: Backend> StepLayout<B> {
    fn grad_len(&self) -> usize {
        self.tensors.iter().map(|(_, [a, b])| a * b).sum()
    }
}

/// The layout of a worker's trainer (the same on every worker: the adapters are injected in one order).
pub fn step_layout<A: AutodiffBackend>(trainer: &mut Trainer<A>) -> StepLayout<A::InnerBackend> {
    let values = adapter_values(&mut trainer.sd.unet);
    let dtype = values
        .tensors
        .values()
        .next()
        .map(|t| t.dtype())
        .unwrap_or(DType::F32);
    StepLayout {
        tensors: values
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.dims()))
            .collect(),
        micro: trainer.config.train.grad_accum * trainer.worker.world,
        batch_size: trainer.config.train.batch_size,
        copies: match trainer.config.method.kind {
            crate::method::MethodKind::DraftLv => trainer.config.method.copies,
            _ => 0,
        },
        device: trainer.sd.device.clone(),
        dtype,
    }
}

/// How the workers of a run agree once per step.
pub trait Exchange<B: Backend> {
    /// Combines every worker's contribution; `layout` is `None` at start-up (flags and checksums only).
    fn exchange(
        &mut self,
        c: Contribution<B>,
        layout: Option<&StepLayout<B>>,
    ) -> Result<Agreed<B>, TrainError>;
}

/// The exchange of a single-worker run: its contribution is the agreement.
pub struct Solo;

impl<B: Backend> Exchange<B> for Solo {
    fn exchange(
        &mut self,
        c: Contribution<B>,
        _layout: Option<&StepLayout<B>>,
    ) -> Result<Agreed<B>, TrainError> {
        Ok(Agreed {
            failed: if c.failed { vec![0] } else { vec![] },
            stop: c.stop,
            checksums: vec![c.checksum],
            micro: c.micro,
            grads: c.grads,
        })
    }
}

/// The exchange of one worker of a collective run: everything in one flat vector, all-reduced (sum) by
/// `burn::collective` on the inner (non-autodiff) backend.
///
/// Header layout (`W` workers, `M` micro-batches of `b` images): `W` failure flags, 1 stop flag, `W` checksum
/// flags and `2W` checksums, then (in a step's exchange) `M x (4 + c)` (computed, loss, K, ReFL's stop step or
/// -1, DRaFT-LV's `c` per-copy rewards) and `M x b` rewards, then the gradients in [`StepLayout`]'s order. Each worker writes only its own slots, so the sum gathers them.
pub struct Collective<B: Backend> {
    pub worker: WorkerRank,
    pub peer: PeerId,
    /// The worker's device (where the start-up exchange's header is built).
    pub device: B::Device,
}

impl<B: Backend> Exchange<B> for Collective<B> {
    fn exchange(
        &mut self,
        c: Contribution<B>,
        layout: Option<&StepLayout<B>>,
    ) -> Result<Agreed<B>, TrainError> {
        let (w, r) = (self.worker.world, self.worker.rank);
        let micro_n = layout.map_or(0, |l| l.micro);
        let bs = layout.map_or(0, |l| l.batch_size);
        let copies = layout.map_or(0, |l| l.copies);
        let per = 4 + copies;
        let header_len = 4 * w + 1 + micro_n * (per + bs);
        let mut header = vec![0.0f64; header_len];
        header[r] = c.failed as u8 as f64;
        header[w] = c.stop as u8 as f64;
        if let Some([a, b]) = c.checksum {
            header[w + 1 + r] = 1.0;
            header[2 * w + 1 + 2 * r] = a;
            header[2 * w + 2 + 2 * r] = b;
        }
        let (stats, scores) = (4 * w + 1, 4 * w + 1 + per * micro_n);
        for m in &c.micro {
            if m.index >= micro_n || m.scores.len() != bs || m.copy_rewards.len() != copies {
                return Err(TrainError::Collective(format!(
                    "micro-batch {} of {} images does not fit the step's {micro_n} micro-batches of {bs}",
                    m.index,
                    m.scores.len()
                )));
            }
            let at = stats + per * m.index;
            let stop = m.stop.map_or(-1.0, |s| s as f64);
            header[at..at + 4].copy_from_slice(&[1.0, m.loss, m.k, stop]);
            header[at + 4..at + per].copy_from_slice(&m.copy_rewards);
            header[scores + bs * m.index..scores + bs * (m.index + 1)].copy_from_slice(&m.scores);
        }
        // The header travels in the gradients' dtype: on the adapters' device, beside them.
        let (device, dtype) = match layout {
            Some(l) => (l.device.clone(), l.dtype),
            None => (self.device.clone(), DType::F32),
        };
        let mut parts: Vec<Tensor<B, 1>> = vec![Tensor::from_data(
            TensorData::new(header, [header_len]),
            (&device, dtype),
        )];
        if let Some(l) = layout {
            let mut grads = c.grads.unwrap_or_default();
            for (key, [a, b]) in &l.tensors {
                parts.push(match grads.tensors.remove(key) {
                    Some(g) => g.cast(dtype).reshape([a * b]),
                    None => Tensor::zeros([a * b], (&device, dtype)),
                });
            }
        }
        let payload = Tensor::cat(parts, 0);
        let reduced = burn::collective::all_reduce::<B>(
            self.peer,
            payload.into_primitive().tensor(),
            ReduceOperation::Sum,
        )
        .map_err(|e| TrainError::Collective(format!("{e:?}")))?;
        let reduced: Tensor<B, 1> = Tensor::from_primitive(TensorPrimitive::Float(reduced));
        let total = header_len + layout.map_or(0, |l| l.grad_len());
        if reduced.dims()[0] != total {
            return Err(TrainError::Collective(format!(
                "the all-reduced vector holds {} values, expected {total}",
                reduced.dims()[0]
            )));
        }
        let head: Vec<f64> = reduced
            .clone()
            .slice(0..header_len)
            .into_data()
            .convert::<f64>()
            .to_vec()
            .expect("f64 header");
        let failed = (0..w).filter(|&i| head[i] > 0.5).collect();
        let checksums = (0..w)
            .map(|i| {
                (head[w + 1 + i] > 0.5).then(|| [head[2 * w + 1 + 2 * i], head[2 * w + 2 + 2 * i]])
            })
            .collect();
        let micro = (0..micro_n)
            .filter(|&m| head[stats + per * m] > 0.5)
            .map(|m| {
                let at = stats + per * m;
                MicroBatch {
                    index: m,
                    loss: head[at + 1],
                    k: head[at + 2],
                    stop: (head[at + 3] >= 0.0).then(|| head[at + 3].round() as usize),
                    copy_rewards: head[at + 4..at + per].to_vec(),
                    scores: head[scores + bs * m..scores + bs * (m + 1)].to_vec(),
                }
            })
            .collect();
        let grads = layout.map(|l| {
            let mut out = LoraGrads::default();
            let mut at = header_len;
            for (key, [a, b]) in &l.tensors {
                let t = reduced.clone().slice(at..at + a * b).reshape([*a, *b]);
                out.tensors.insert(key.clone(), t);
                at += a * b;
            }
            out
        });
        Ok(Agreed {
            failed,
            stop: head[w] > 0.5,
            checksums,
            micro,
            grads,
        })
    }
}

/// Test hook: makes one worker fail on purpose (to test that the others stop and nothing hangs).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InjectedFault {
    pub worker: usize,
    /// Fails while loading (`None`) or in this optimiser step's work (1-based).
    pub step: Option<usize>,
    /// Panics instead of returning an error.
    pub panic: bool,
}

/// Options of a data-parallel run beyond its config.
#[derive(Clone, Debug, Default)]
pub struct ParallelOptions {
    #[doc(hidden)]
    pub fault: Option<InjectedFault>,
}

/// One collective session per process at a time: burn::collective keeps one local server per backend type.
static SESSION: Mutex<()> = Mutex::new(());

/// Runs the configured training on several devices of one backend (`devices`, e.g. `[cuda:0, cuda:1]`, or the
/// same CPU device twice for tests), one worker thread each, on burn's collective engine. Worker 0 runs on the
/// calling thread and calls `on_step` / `on_eval` (with the global batch's figures). One device is [`crate::run`].
/// An error of any worker stops all of them and is returned as [`TrainError::Worker`] (worker and device).
pub fn run_parallel<B: AutodiffBackend>(
    config: TrainConfig,
    devices: &[B::Device],
    resume: impl Into<Resume>,
    stop: &AtomicBool,
    options: &ParallelOptions,
    on_step: &mut dyn FnMut(&StepLog),
    on_eval: &mut dyn FnMut(&EvalLog),
) -> Result<RunSummary, TrainError> {
    let resume = resume.into();
    let world = devices.len();
    if world == 0 {
        return Err(TrainError::Config("no devices to train on".into()));
    }
    config.validate().map_err(TrainError::Config)?;
    let _session = SESSION.lock().unwrap_or_else(|e| e.into_inner());
    burn::collective::reset_collective::<B::InnerBackend>();
    let collective = CollectiveConfig::default().with_num_devices(world);
    let worker_run = |rank: usize,
                      on_step: &mut dyn FnMut(&StepLog),
                      on_eval: &mut dyn FnMut(&EvalLog)|
     -> Result<RunSummary, TrainError> {
        let device = &devices[rank];
        let peer = PeerId::from(rank);
        burn::collective::register::<B::InnerBackend>(peer, device.clone(), collective.clone())
            .map_err(|e| TrainError::Collective(format!("register worker {rank}: {e:?}")))?;
        let worker = WorkerRank { rank, world };
        let fault = options.fault.filter(|f| f.worker == rank);
        // A panic while loading must reach the start-up exchange too.
        let trainer = guarded(|| match fault {
            Some(f) if f.step.is_none() => injected(f),
            _ => Trainer::<B>::new_worker(config.clone(), device, worker),
        })
        .map(|mut t| {
            t.fault = fault.and_then(|f| f.step.map(|s| (s, f)));
            t
        });
        let mut sync = Collective {
            worker,
            peer,
            device: device.clone(),
        };
        let result = drive(trainer, &mut sync, resume, stop, on_step, on_eval);
        let _ = burn::collective::finish_collective::<B::InnerBackend>(peer);
        result
    };
    let results: Vec<Result<RunSummary, TrainError>> =
        std::thread::scope(|scope| {
            let others: Vec<_> = (1..world)
                .map(|rank| {
                    let worker_run = &worker_run;
                    std::thread::Builder::new()
                        .name(format!("alignprop-worker-{rank}"))
                        .spawn_scoped(scope, move || worker_run(rank, &mut |_| {}, &mut |_| {}))
                        .expect("spawn a worker thread")
                })
                .collect();
            let mut all = vec![worker_run(0, on_step, on_eval)];
            for h in others {
                all.push(h.join().unwrap_or_else(|_| {
                    Err(TrainError::Panic("the worker thread panicked".into()))
                }));
            }
            all
        });
    // The run's error: the first worker's own (not "another worker failed"), with its worker and device.
    let culprit = results
        .iter()
        .position(|r| matches!(r, Err(e) if !matches!(e, TrainError::PeerFailed { .. })))
        .or_else(|| results.iter().position(|r| r.is_err()));
    let mut results = results;
    match culprit {
        Some(rank) => {
            let Err(source) = results.swap_remove(rank) else {
                unreachable!()
            };
            Err(TrainError::Worker {
                worker: rank,
                device: format!("{:?}", devices[rank]),
                source: Box::new(source),
            })
        }
        None => results.swap_remove(0),
    }
}

/// The error or panic of an [`InjectedFault`].
pub(crate) fn injected<T>(f: InjectedFault) -> Result<T, TrainError> {
    let msg = format!("injected fault in worker {}", f.worker);
    if f.panic {
        panic!("{msg}");
    }
    Err(TrainError::Config(msg))
}
