//! Training checkpoints: the LoRA tensors and the AdamW moments in their own dtype (`state.safetensors`), the
//! step counters and the random generator state (`state.json`), and the run's config (`config.toml`, compared on
//! resume). Written to a temporary folder, each file flushed to disk, then renamed, so a crash (or a full disk)
//! never leaves a half-written checkpoint and never damages the previous one; resuming continues the run with the
//! same numbers. [`OutputLock`] keeps two runs out of one output folder.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use alignprop_io::weights::{SafetensorsSource, TensorSource};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde::{Deserialize, Serialize};

/// The scalar part of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimiser steps done.
    pub step: usize,
    /// AdamW's step count (bias correction).
    pub adam_step: u64,
    /// Workers of the run that wrote it (its global batch is `batch_size x grad_accum x workers`); checkpoints
    /// of earlier versions: 1.
    #[serde(default = "one")]
    pub workers: usize,
    /// Optimiser steps averaged into the adapters' moving average (`ema.*` tensors), when the run keeps one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_step: Option<u64>,
    // No generator state: every draw of a step derives from (train.seed, step, sample index), see
    // `Trainer::local_step`. (Checkpoints of earlier versions hold `rng` / `rng_spare`: ignored.)
}

/// Writes named matrices as safetensors (F32 or F64, as the tensors are).
pub fn save_tensors<B: Backend>(
    path: &Path,
    tensors: &BTreeMap<String, Tensor<B, 2>>,
) -> Result<(), String> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, t) in tensors {
        let shape = t.dims().to_vec();
        let (dtype, data) = match t.dtype() {
            DType::F64 => (Dtype::F64, t.clone().into_data()),
            _ => (Dtype::F32, t.clone().into_data().convert_dtype(DType::F32)),
        };
        owned.push((k.clone(), dtype, shape, data.bytes.to_vec()));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(k, dt, shape, bytes)| {
            (
                k.clone(),
                TensorView::new(*dt, shape.clone(), bytes).expect("consistent tensor"),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| format!("{}: cannot serialise: {e}", path.display()))?;
    write_file(path, &bytes)
}

/// Write calls left before an injected failure (`usize::MAX`: none); see [`fail_writes_after`].
static WRITES_BEFORE_FAILURE: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Fault injection for tests: the `n`-th checkpoint file written from now on (0: the next one) fails as a full disk
/// does (`StorageFull`); `usize::MAX` turns it off. Process-wide.
#[doc(hidden)]
pub fn fail_writes_after(n: usize) {
    WRITES_BEFORE_FAILURE.store(n, Ordering::SeqCst);
}

/// Writes `bytes` to `path` and flushes them to the disk (`fsync`), so that a renamed checkpoint is complete even
/// after a power loss. Errors name the file.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let inject = WRITES_BEFORE_FAILURE
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
            usize::MAX => None,
            0 => Some(usize::MAX),
            n => Some(n - 1),
        })
        .is_ok_and(|n| n == 0);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        if inject {
            // Half the bytes reach the file, then the disk is full.
            f.write_all(&bytes[..bytes.len() / 2])?;
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "No space left on device (injected)",
            ));
        }
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| format!("{}: cannot write: {e}", path.display()))
}

/// Reads every tensor of a safetensors file as a matrix in `dtype` on `device`.
pub fn load_tensors<B: Backend>(
    path: &Path,
    device: &B::Device,
    dtype: DType,
) -> Result<BTreeMap<String, Tensor<B, 2>>, String> {
    let src = SafetensorsSource::open(&[path]).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for k in src.keys() {
        let raw = src
            .find(&k)
            .map_err(|e| e.to_string())?
            .expect("listed key");
        if raw.shape.len() != 2 {
            return Err(format!(
                "{}: tensor '{k}' has shape {:?}, expected a matrix",
                path.display(),
                raw.shape
            ));
        }
        out.insert(k, Tensor::from_data(raw.data, (device, dtype)));
    }
    Ok(out)
}

/// Writes `dir/state.safetensors`, `dir/state.json` and `dir/config.toml` atomically: into `dir.tmp`, each file
/// flushed, then renamed to `dir` (a `dir` already there is moved aside first and removed only after). On any
/// error the previous checkpoints are untouched and `dir` does not exist half-written.
pub fn write_checkpoint<B: Backend>(
    dir: &Path,
    tensors: &BTreeMap<String, Tensor<B, 2>>,
    state: &CheckpointState,
    config_toml: &str,
) -> Result<(), String> {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let written = (|| {
        save_tensors(&tmp.join("state.safetensors"), tensors)?;
        test_pause();
        let json = serde_json::to_string_pretty(state).expect("json");
        write_file(&tmp.join("state.json"), json.as_bytes())?;
        write_file(&tmp.join(CONFIG_FILE), config_toml.as_bytes())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = dir.with_extension("old");
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    if let Some(parent) = dir.parent() {
        // The rename itself reaches the disk with the folder's entry.
        let _ = std::fs::File::open(parent).and_then(|f| f.sync_all());
    }
    Ok(())
}

/// Test hook: `ALIGNPROP_TEST_CHECKPOINT_PAUSE_MS` makes checkpoint writing pause that long between its files, so
/// that the fault tests' kills land inside a checkpoint write.
fn test_pause() {
    if let Some(ms) = std::env::var("ALIGNPROP_TEST_CHECKPOINT_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// The config a checkpoint was written with (TOML, as the run resolved it).
pub const CONFIG_FILE: &str = "config.toml";

/// Config keys that may change on resume: the length of the run, evaluation and output settings. Everything else
/// (model, reward, sampling, truncation, LoRA, optimiser, batch, seed, prompts) changes the numbers.
pub const RESUMABLE_CHANGES: &[&str] = &[
    "train.steps",
    "eval.",
    "output.",
    // The split of the global batch over workers and accumulation (checked as a product on resume).
    "train.grad_accum",
    "train.devices",
];

fn one() -> usize {
    1
}

/// The dotted keys where two configs (as TOML values) differ, outside [`RESUMABLE_CHANGES`], each with both
/// values: `(key, checkpoint's, now)`.
pub fn config_differences(saved: &toml::Value, now: &toml::Value) -> Vec<(String, String, String)> {
    fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", saved, &mut a);
    flatten("", now, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let absent = || "(absent)".to_string();
    keys.into_iter()
        .filter(|k| {
            !RESUMABLE_CHANGES
                .iter()
                .any(|p| k.as_str() == *p || (p.ends_with('.') && k.starts_with(p)))
        })
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            (
                k.clone(),
                a.get(k).cloned().unwrap_or_else(absent),
                b.get(k).cloned().unwrap_or_else(absent),
            )
        })
        .collect()
}

/// An output folder held by one training run: `<dir>/.lock` holds the process id, created exclusively. A lock
/// left by a process that no longer runs (killed) is taken over; one held by a live process is an error.
/// Removed when dropped.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
}

impl OutputLock {
    /// Takes the lock of `dir` (which must exist).
    pub fn acquire(dir: &Path) -> Result<Self, String> {
        let path = dir.join(".lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let _ = write!(f, "{}", std::process::id());
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let pid = holder.trim().parse::<u32>().ok();
                    if pid.is_some_and(process_alive) || pid.is_none() && !cfg!(target_os = "linux")
                    {
                        return Err(format!(
                            "{}: another training run (process {}) is using this output folder; wait for it, \
                             choose another output.dir, or delete the lock file if no run is active",
                            path.display(),
                            holder.trim()
                        ));
                    }
                    // Stale (its process is gone): take it over.
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => {
                    return Err(format!(
                        "{}: cannot create the lock file: {e}",
                        path.display()
                    ));
                }
            }
        }
        Err(format!("{}: cannot take the lock file", path.display()))
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether process `pid` is running (Linux: `/proc/<pid>` exists; elsewhere assumed running).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// The config a checkpoint folder was written with (`None` for checkpoints written before configs were stored).
pub fn read_checkpoint_config(dir: &Path) -> Result<Option<toml::Value>, String> {
    let path = dir.join(CONFIG_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str::<toml::Table>(&text)
            .map(|t| Some(toml::Value::Table(t)))
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: cannot read: {e}", path.display())),
    }
}

/// Reads a checkpoint folder.
pub fn read_checkpoint<B: Backend>(
    dir: &Path,
    device: &B::Device,
    dtype: DType,
) -> Result<(BTreeMap<String, Tensor<B, 2>>, CheckpointState), String> {
    let json = dir.join("state.json");
    let text = std::fs::read_to_string(&json)
        .map_err(|e| format!("{}: cannot read checkpoint: {e}", json.display()))?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", json.display()))?;
    Ok((
        load_tensors(&dir.join("state.safetensors"), device, dtype)?,
        state,
    ))
}

/// The checkpoint folders (`step_NNNNN`) under `root`, oldest first.
pub fn list_checkpoints(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.is_dir()
                        && p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("step_"))
                })
                // `step_N.tmp` (being written) and `step_N.old` (being replaced) are not checkpoints.
                .filter(|p| p.extension().is_none())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
