#!/usr/bin/env python3
"""PyTorch side of `cargo xtask bench --torch` (workloads: xtask/bench/WORKLOADS.md).

    python bench_torch.py --list
    python bench_torch.py --workload NAME [--iters N] [--warmup W] [--threads T] [--fixtures DIR]

Runs one workload in this process and prints exactly one JSON line on stdout:
    {"workload": ..., "side": "torch", "median_ms": ..., "min_ms": ..., "max_ms": ..., "iters": ...,
     "peak_rss_mib": ..., "warmup": ..., "threads": ..., "torch": ..., "diffusers": ...,
     "baseline_rss_mib": ..., "flops": ...}
flops: the FLOPs of one iteration by torch.utils.flop_counter.FlopCounterMode over the first warm-up run.
Everything else (library warnings, progress) goes to stderr. peak_rss_mib is VmHWM of this process, read
at the end (so it includes model construction and the libraries' own footprint); baseline_rss_mib is VmRSS
right after importing the libraries, before anything is built.

CPU, float32, eval mode, no torch.compile; torch.set_num_threads(T), torch.set_num_interop_threads(1).
Models are diffusers/transformers modules built from configs with seeded random weights (no hub access);
unet/tiny_fwd loads the fixture tiny UNet from its local folder.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

# No network, quiet libraries (set before any HF import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.normpath(os.path.join(SCRIPT_DIR, "..", ".."))
DEFAULT_FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "tiny-sd")

SD15_SCALING_FACTOR = 0.18215
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
DDIM_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    trained_betas=None, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    prediction_type="epsilon", thresholding=False, timestep_spacing="leading", rescale_betas_zero_snr=False,
)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# ---------------------------------------------------------------------------------------------------------
# Workload table: name -> (class, builder name, kwargs). Class gives the default warmup/iters.
# ---------------------------------------------------------------------------------------------------------

# "fastop": well under a millisecond; 1000 timed runs so that the median is not one moment of a shared host
# (the Rust runner's FAST_OPS, crates/alignprop-bench/src/lib.rs, lists the same workloads).
DEFAULTS = {"op": (3, 20), "fastop": (10, 1000), "model": (2, 5), "step": (1, 3)}  # (warmup, iters)

WORKLOADS = {
    "op/conv3x3_fwd": ("op", "conv3x3", dict(bwd=False)),
    "op/conv3x3_fwdbwd": ("op", "conv3x3", dict(bwd=True)),
    "op/attn_scores_softmax": ("op", "attn_scores_softmax", {}),
    "op/attention_fwd": ("op", "attention", dict(bwd=False)),
    "op/attention_fwdbwd": ("op", "attention", dict(bwd=True)),
    "op/linear_fwd": ("op", "linear", dict(bwd=False)),
    "op/linear_fwdbwd": ("op", "linear", dict(bwd=True)),
    "op/groupnorm_fwd": ("fastop", "groupnorm", dict(bwd=False)),
    "op/groupnorm_fwdbwd": ("fastop", "groupnorm", dict(bwd=True)),
    "op/layernorm_fwd": ("fastop", "layernorm", {}),
    "unet/tiny_fwd": ("model", "unet_tiny_fwd", {}),
    "unet/mid_fwd": ("model", "unet_mid", dict(bwd=False)),
    "unet/mid_fwdbwd": ("model", "unet_mid", dict(bwd=True)),
    "vae/decode_256": ("model", "vae_decode_256", {}),
    "clip/text_encode": ("model", "clip_text_encode", {}),
    # Scheduler math only: cheap, so it gets the fast-op defaults.
    "ddim/step": ("fastop", "ddim_step", {}),
    "step/k1": ("step", "alignprop_step", dict(k=1, s=32, ckpt=True)),
    "step/kall": ("step", "alignprop_step", dict(k=20, s=32, ckpt=True)),
}
for _k in (1, 2, 4, 8, 20):
    WORKLOADS[f"scale/k{_k}"] = ("step", "alignprop_step", dict(k=_k, s=32, ckpt=True))
for _k in (1, 2, 4, 8, 20):
    WORKLOADS[f"scale/k{_k}_nockpt"] = ("step", "alignprop_step", dict(k=_k, s=32, ckpt=False))
for _s in (16, 32, 64):
    WORKLOADS[f"scale/s{_s}_k1"] = ("step", "alignprop_step", dict(k=1, s=_s, ckpt=True))


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------

def randn(shape, seed, requires_grad=False):
    import torch

    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return t.requires_grad_(requires_grad)


def proc_status_mib(field):
    """A memory field of /proc/self/status (VmHWM: peak resident set, VmRSS: current) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MiB
    return float("nan")


def version(pkg):
    import importlib.metadata

    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def clear_grads(tensors):
    for t in tensors:
        t.grad = None


class Bench:
    """A prepared workload: run() is one timed iteration; reset() runs untimed before each iteration
    (clears gradients so that backward writes fresh .grad tensors instead of accumulating)."""

    def __init__(self, run, reset=None, grad_mode="inference"):
        self.run = run
        self.reset = reset or (lambda: None)
        self.grad_mode = grad_mode  # "inference" (torch.inference_mode) | "grad" (autograd on)


def fwd_or_fwdbwd(fn, inputs, grads_of, out_seed, bwd):
    """forward only (inference_mode), or forward + out.backward(g) for a fixed random g (grads of grads_of)."""
    import torch

    if not bwd:
        return Bench(lambda: fn(*inputs), grad_mode="inference")
    with torch.no_grad():
        out_shape = fn(*[x.detach() for x in inputs]).shape
    g = randn(out_shape, out_seed)

    def run():
        out = fn(*inputs)
        out.backward(g)

    return Bench(run, reset=lambda: clear_grads(grads_of), grad_mode="grad")


def lora_config():
    from peft import LoraConfig

    # init_lora_weights="gaussian" as diffusers' LoRA training scripts (A ~ N(0, 1/r), B = 0: the
    # adapted UNet starts equal to the base one; lora_A's gradient is zero until B has moved).
    return LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights="gaussian", lora_dropout=0.0)


def add_lora(unet):
    """Freeze the base UNet, add rank-4 LoRA on to_q/to_k/to_v/to_out.0; returns the trainable parameters."""
    unet.requires_grad_(False)
    unet.add_adapter(lora_config())
    params = [p for p in unet.parameters() if p.requires_grad]
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n in names), "only LoRA parameters may be trainable"
    return params


# ---------------------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------------------

def build_conv3x3(args, bwd):
    import torch

    torch.manual_seed(1)
    conv = torch.nn.Conv2d(320, 320, 3, padding=1, bias=True).eval()
    x = randn((2, 320, 32, 32), 2, requires_grad=bwd)
    return fwd_or_fwdbwd(conv, [x], [x, conv.weight, conv.bias], 3, bwd)


def build_attn_scores_softmax(args):
    import torch

    q = randn((16, 1024, 40), 1)
    k = randn((16, 1024, 40), 2)
    scale = 40 ** -0.5
    return Bench(lambda: torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1), grad_mode="inference")


def build_attention(args, bwd):
    import torch
    import torch.nn.functional as F

    q = randn((16, 1024, 40), 1, requires_grad=bwd)
    k = randn((16, 1024, 40), 2, requires_grad=bwd)
    v = randn((16, 1024, 40), 3, requires_grad=bwd)
    if args.attn_impl == "sdpa":
        # What diffusers' UNet attention runs (AttnProcessor2_0): the fused kernel.
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    else:
        scale = 40 ** -0.5
        fn = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
    return fwd_or_fwdbwd(fn, [q, k, v], [q, k, v], 4, bwd)


def build_linear(args, bwd):
    import torch

    torch.manual_seed(1)
    lin = torch.nn.Linear(320, 1280).eval()
    x = randn((2048, 320), 2, requires_grad=bwd)
    return fwd_or_fwdbwd(lin, [x], [x, lin.weight, lin.bias], 3, bwd)


def build_groupnorm(args, bwd):
    import torch

    gn = torch.nn.GroupNorm(32, 320, eps=1e-5, affine=True).eval()
    with torch.no_grad():  # non-trivial affine parameters
        gn.weight.copy_(1 + 0.1 * randn((320,), 1))
        gn.bias.copy_(0.1 * randn((320,), 2))
    x = randn((2, 320, 32, 32), 3, requires_grad=bwd)
    return fwd_or_fwdbwd(gn, [x], [x, gn.weight, gn.bias], 4, bwd)


def build_layernorm(args):
    import torch

    ln = torch.nn.LayerNorm(320).eval()
    x = randn((2, 1024, 320), 1)
    return Bench(lambda: ln(x), grad_mode="inference")


def build_ddim_step(args):
    import torch
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**DDIM_CONFIG)
    sched.set_timesteps(50)  # leading spacing, offset 1: 981, 961, ...
    ts = [int(t) for t in sched.timesteps]
    assert ts[0] == 981 and ts[1] == 961, ts[:2]
    t = sched.timesteps[0]
    latents = randn((2, 4, 64, 64), 1)
    eps = randn((2, 4, 64, 64), 2)
    return Bench(lambda: sched.step(eps, t, latents, eta=0.0).prev_sample, grad_mode="inference")


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------

def mid_unet(seed=10):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention=False, block_out_channels=(64, 128, 256, 256), layers_per_block=2,
        downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
        cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False, upcast_attention=False,
        resnet_time_scale_shift="default",
    ).eval()


def sd15_vae_kwargs(block_out_channels, sample_size):
    n = len(block_out_channels)
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
        layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=sample_size,
        scaling_factor=SD15_SCALING_FACTOR,
    )


def make_vae(block_out_channels, sample_size, seed):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**sd15_vae_kwargs(block_out_channels, sample_size)).eval()


def build_unet_tiny_fwd(args):
    import torch
    from diffusers import UNet2DConditionModel

    path = os.path.join(args.fixtures, "unet")
    unet = UNet2DConditionModel.from_pretrained(path, local_files_only=True).eval()
    cfg = unet.config
    x = randn((2, cfg.in_channels, cfg.sample_size, cfg.sample_size), 1)
    emb = randn((2, 77, cfg.cross_attention_dim), 2)
    t = torch.tensor(500)
    return Bench(lambda: unet(x, t, encoder_hidden_states=emb).sample, grad_mode="inference")


def build_unet_mid(args, bwd):
    import torch

    unet = mid_unet()
    x = randn((2, 4, 32, 32), 1)  # input does not require grad
    emb = randn((2, 77, 768), 2)
    t = torch.tensor(500)
    fn = lambda x, emb: unet(x, t, encoder_hidden_states=emb).sample
    if not bwd:
        return fwd_or_fwdbwd(fn, [x, emb], [], 3, False)
    params = add_lora(unet)
    return fwd_or_fwdbwd(fn, [x, emb], params, 3, True)


def build_vae_decode_256(args):
    # SD1.5 VAE config (diffusers' stable-diffusion-v1-5/vae): block_out_channels [128,256,512,512].
    vae = make_vae([128, 256, 512, 512], 512, seed=20)
    z = randn((1, 4, 32, 32), 1)
    return Bench(lambda: vae.decode(z / SD15_SCALING_FACTOR).sample, grad_mode="inference")


def build_clip_text_encode(args):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    # SD1.5's text encoder (OpenAI CLIP ViT-L/14 text tower).
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, projection_dim=768)
    torch.manual_seed(30)
    te = CLIPTextModel(cfg).eval()
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(1))
    return Bench(lambda: te(input_ids=ids).last_hidden_state, grad_mode="inference")


# ---------------------------------------------------------------------------------------------------------
# AlignProp step
# ---------------------------------------------------------------------------------------------------------

def tiny_reward_weights(seed=40, size=32, embed=32):
    d = 3 * size * size
    return {
        "proj.weight": randn((embed, d), seed) / d ** 0.5,
        "mlp.0.weight": randn((16, embed), seed + 1) / embed ** 0.5,
        "mlp.0.bias": randn((16,), seed + 2) * 0.1,
        "mlp.1.weight": randn((1, 16), seed + 3) * 0.25,
        "mlp.1.bias": randn((1,), seed + 4) * 0.1,
    }


def tiny_reward(img, w, size=32):
    """The fixture reward: clamp(img/2+0.5), bilinear resize (align_corners False, no antialias), CLIP
    mean/std, flatten @ proj^T, L2 normalise, Linear(E,16), Linear(16,1). [B,3,H,W] -> [B]."""
    import torch
    import torch.nn.functional as F

    x = (img / 2 + 0.5).clamp(0, 1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    f = x.flatten(1) @ w["proj.weight"].T
    f = f / f.norm(dim=-1, keepdim=True)
    h = f @ w["mlp.0.weight"].T + w["mlp.0.bias"]
    r = h @ w["mlp.1.weight"].T + w["mlp.1.bias"]
    return r[:, 0]


def build_alignprop_step(args, k, s, ckpt, steps=20, guidance=7.5):
    import torch
    import torch.utils.checkpoint
    from diffusers import DDIMScheduler

    assert 1 <= k <= steps
    unet = mid_unet()
    params = add_lora(unet)
    # "mid" VAE: SD1.5 config with block_out_channels [32,64,128,128]; frozen.
    vae = make_vae([32, 64, 128, 128], 256, seed=21)
    vae.requires_grad_(False)
    rw = tiny_reward_weights()
    sched = DDIMScheduler(**DDIM_CONFIG)
    sched.set_timesteps(steps)
    timesteps = list(sched.timesteps)
    opt = torch.optim.AdamW(params, lr=1e-3)

    emb = randn((2, 77, 768), 2)  # [uncond, cond], fixed
    x_T = randn((1, 4, s, s), 1)

    def unet_eps(x, t):
        return unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample

    def guided(x, t, with_grad):
        if with_grad and ckpt:
            eps_all = torch.utils.checkpoint.checkpoint(unet_eps, x, t, use_reentrant=False)
        else:
            eps_all = unet_eps(x, t)
        eps_u, eps_c = eps_all.chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    def run():
        x = x_T
        for i, t in enumerate(timesteps):
            if i < steps - k:
                with torch.no_grad():
                    x = sched.step(guided(x, t, False), t, x, eta=0.0).prev_sample
            else:
                x = sched.step(guided(x, t, True), t, x, eta=0.0).prev_sample
        img = vae.decode(x / SD15_SCALING_FACTOR).sample
        loss = -tiny_reward(img, rw).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    bench = Bench(run, grad_mode="grad")
    bench.params, bench.opt, bench.unet = params, opt, unet  # (for checks)
    return bench


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the workload names, one per line")
    ap.add_argument("--workload", help="the workload to run (see --list)")
    ap.add_argument("--iters", type=int, help="timed iterations (default per class: op 20, fast op 1000, model 5, step 3)")
    ap.add_argument("--warmup", type=int, help="untimed iterations first (default: op 3, fast op 10, model 2, step 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--fixtures", default=DEFAULT_FIXTURES, help="tiny-sd fixture folder (for unet/tiny_fwd)")
    ap.add_argument("--attn-impl", choices=["sdpa", "explicit"], default="sdpa",
                    help="op/attention_*: F.scaled_dot_product_attention (default, what diffusers uses) or "
                         "explicit softmax(q k^T * scale) @ v (diagnostic)")
    ap.add_argument("--autocast-bf16", action="store_true",
                    help="run under torch.autocast('cpu', dtype=torch.bfloat16) (linear layers, matrix products and "
                         "convolutions in bf16; compare with alignprop-bench --bf16-products, which takes only the "
                         "linear layers in bf16)")
    args = ap.parse_args()

    if args.list:
        for name in WORKLOADS:
            print(name)
        return 0
    if not args.workload:
        ap.error("--workload NAME or --list is required")
    if args.workload not in WORKLOADS:
        ap.error(f"unknown workload {args.workload!r} (see --list)")
    cls, builder, kwargs = WORKLOADS[args.workload]
    d_warmup, d_iters = DEFAULTS[cls]
    warmup = d_warmup if args.warmup is None else args.warmup
    iters = d_iters if args.iters is None else args.iters
    if iters < 1 or warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")

    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # only the JSON line goes to stdout
        import torch

        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
        torch.set_default_dtype(torch.float32)
        if builder not in ("conv3x3", "attn_scores_softmax", "attention", "linear", "groupnorm", "layernorm"):
            # (imported before the baseline is read; the builders import the same)
            from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: F401
            from peft import LoraConfig  # noqa: F401
            from transformers import CLIPTextConfig, CLIPTextModel  # noqa: F401
        # Resident memory of the imported libraries alone (the CUDA torch wheel maps a lot): context
        # for peak_rss_mib, which includes it.
        baseline_rss = proc_status_mib("VmRSS")

        bench = globals()["build_" + builder](args, **kwargs)
        ctx = torch.inference_mode if bench.grad_mode == "inference" else torch.enable_grad
        from torch.utils.flop_counter import FlopCounterMode

        times = []
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast_bf16)
        with ctx(), autocast:
            # The first warm-up iteration (or one extra, untimed) counts the FLOPs of one iteration with torch's
            # own counter (matrix products, convolutions, SDPA; backward and checkpoint recomputation included).
            counter = FlopCounterMode(display=False)
            bench.reset()
            with counter:
                bench.run()
            flops = counter.get_total_flops()
            untimed = max(warmup - 1, 0)  # the counting run was the first warm-up
            for i in range(untimed + iters):
                bench.reset()
                t0 = time.perf_counter()
                bench.run()
                dt = (time.perf_counter() - t0) * 1000.0
                if i >= untimed:
                    times.append(dt)
        bench.reset()

        result = {
            "workload": args.workload, "side": "torch",
            "median_ms": round(statistics.median(times), 4), "min_ms": round(min(times), 4),
            "max_ms": round(max(times), 4), "iters": iters, "warmup": warmup, "threads": args.threads,
            "flops": int(flops), "autocast_bf16": args.autocast_bf16,
            "torch": version("torch"), "diffusers": version("diffusers"),
            "peak_rss_mib": round(proc_status_mib("VmHWM"), 1), "baseline_rss_mib": round(baseline_rss, 1),
        }
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
