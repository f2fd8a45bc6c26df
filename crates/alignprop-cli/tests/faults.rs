//! The training process killed (SIGKILL) 20 times at random points, some of them while it writes a checkpoint,
//! and resumed each time: every resume starts from the last complete checkpoint, and the final LoRA is the same
//! file as an uninterrupted run's. Bounded in time: no wait for an incarnation's progress lasts over 2 minutes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: usize = 16;
const KILLS: usize = 20;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("alignprop-kill-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `alignprop train` on the tiny demo made small (2 sampling steps, K = 1, one image, a checkpoint every step, no
/// evals but the first and last), its stderr to `log`.
fn train(out: &Path, resume: bool, log: &Path) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_alignprop"));
    c.args(["train", "--device", "cpu"]);
    for set in [
        "sampling.steps=2".to_string(),
        "truncation.k=1".into(),
        "train.batch_size=1".into(),
        "eval.every=1000".into(),
        "output.save_every=1".into(),
        format!("train.steps={STEPS}"),
    ] {
        c.arg("--set").arg(set);
    }
    c.arg("--out").arg(out);
    if resume {
        c.arg("--resume");
    }
    // Checkpoint writing pauses between its files, so that kills can land inside it.
    c.env("ALIGNPROP_TEST_CHECKPOINT_PAUSE_MS", "300");
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    c.spawn().expect("start alignprop train")
}

fn checkpoints(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether a checkpoint is being written now by the incarnation born at `born`: a `step_N.tmp` folder created
/// since (a stale one left by an earlier kill is older).
fn writing_checkpoint(out: &Path, born: std::time::SystemTime) -> bool {
    checkpoints(out)
        .iter()
        .filter(|n| n.ends_with(".tmp"))
        .any(|n| {
            std::fs::metadata(out.join("checkpoints").join(n))
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= born)
        })
}

/// The newest complete checkpoint (`step_N`, not `step_N.tmp`).
fn last_complete(out: &Path) -> Option<String> {
    checkpoints(out)
        .into_iter()
        .filter(|n| n.starts_with("step_") && !n.contains('.'))
        .last()
}

fn complete_checkpoint(out: &Path) -> bool {
    checkpoints(out)
        .iter()
        .any(|n| n.starts_with("step_") && !n.contains('.'))
}

fn finish(out: &Path, resume: bool, log: &Path) {
    let status = train(out, resume, log).wait().unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// A small seeded generator for the kill times.
struct Lcg(u64);
impl Lcg {
    fn next_f64(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[test]
fn killed_twenty_times_then_resumed_gives_the_uninterrupted_lora() {
    let (straight, killed) = (tmp("straight"), tmp("killed"));
    std::fs::create_dir_all(&killed).unwrap();
    let log = killed.with_extension("log");
    finish(&straight, false, &straight.with_extension("log"));

    let mut rng = Lcg(20261202);
    let (mut kills, mut mid_checkpoint, mut finished_early) = (0, 0, false);
    let mut resumed_from = Vec::new();
    let started = Instant::now();
    while kills < KILLS {
        let resume = complete_checkpoint(&killed);
        resumed_from.push(last_complete(&killed));
        let born_at = std::time::SystemTime::now() - Duration::from_millis(50);
        let mut child = train(&killed, resume, &log);
        let born = Instant::now();
        // Where this incarnation is killed, by progress rather than by the clock (start-up takes 3 s on one
        // machine and 8 s on a loaded CI machine): every 4th inside a checkpoint write, every 4th at a random
        // time that may fall in the start-up, the rest at a random point of the step after its first new
        // checkpoint, so that the runs move on.
        let done_before = last_complete(&killed);
        let alive = |child: &mut Child| child.try_wait().unwrap().is_none();
        let bound = Duration::from_secs(120);
        match kills % 4 {
            3 => {
                // A checkpoint being written (`step_N.tmp`): kill inside it.
                while born.elapsed() < bound
                    && !writing_checkpoint(&killed, born_at)
                    && alive(&mut child)
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            2 => std::thread::sleep(Duration::from_secs_f64(4.0 * rng.next_f64())),
            _ => {
                while born.elapsed() < bound
                    && last_complete(&killed) == done_before
                    && alive(&mut child)
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                std::thread::sleep(Duration::from_secs_f64(1.5 * rng.next_f64()));
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            // It ended by itself: only a finished run may do that.
            assert!(
                status.success(),
                "incarnation {kills} failed: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            finished_early = true;
            break;
        }
        let in_checkpoint = writing_checkpoint(&killed, born_at);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        mid_checkpoint += in_checkpoint as usize;
        kills += 1;
    }
    eprintln!(
        "{kills} kills ({mid_checkpoint} while a checkpoint was being written) in {:.0} s; incarnations started \
         from {resumed_from:?}; checkpoints then: {:?}",
        started.elapsed().as_secs_f64(),
        checkpoints(&killed)
    );
    if !finished_early {
        finish(&killed, complete_checkpoint(&killed), &log);
    }
    assert!(kills >= KILLS || finished_early, "{kills} kills");
    assert!(
        mid_checkpoint >= 1,
        "no kill landed inside a checkpoint write"
    );
    let resumes = resumed_from
        .iter()
        .flatten()
        .collect::<std::collections::BTreeSet<_>>();
    assert!(
        resumes.len() >= 3,
        "resumed from too few distinct checkpoints: {resumed_from:?}"
    );
    let lora = "pytorch_lora_weights.safetensors";
    let (a, b) = (
        std::fs::read(straight.join(lora)).unwrap(),
        std::fs::read(killed.join(lora)).unwrap(),
    );
    let first_difference = a.iter().zip(&b).position(|(x, y)| x != y);
    assert!(
        a.len() == b.len() && first_difference.is_none(),
        "the final LoRA differs from the uninterrupted run's ({} vs {} bytes, first difference at byte {:?})",
        a.len(),
        b.len(),
        first_difference
    );
    // Every step logged once, in order, although some were run more than once.
    let metrics = std::fs::read_to_string(killed.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=STEPS as u64).collect::<Vec<_>>(), "{metrics}");
    assert!(
        !killed.join(".lock").exists(),
        "the finished run left its lock"
    );
    for d in [straight, killed] {
        std::fs::remove_dir_all(&d).ok();
        std::fs::remove_file(d.with_extension("log")).ok();
    }
}
