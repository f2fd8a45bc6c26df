"""PyTorch side of `cargo xtask gpu-check`: the `gpu/*` workloads on CUDA (xtask/bench/WORKLOADS.md, "GPU").

    python bench_torch_gpu.py --list
    python bench_torch_gpu.py --workload gpu/sd15_512_k1_f32 [--iters N] [--warmup W]

One AlignProp step on full-size SD1.5 with random weights (diffusers' default UNet2DConditionModel and
AutoencoderKL configs are SD1.5's) at 512x512 (latent 64x64): 50 DDIM steps (eta 0), CFG 7.5 (UNet batch 2), the
last K steps with gradient into rank-4 LoRA adapters (peft, to_q/to_k/to_v/to_out.0), each of those UNet calls
under torch.utils.checkpoint; VAE decode; the benchmarks' tiny reward; loss -reward; backward; AdamW. Attention is
diffusers' default processor (F.scaled_dot_product_attention). `_bf16`: UNet, VAE and reward in bfloat16, LoRA
adapters and the optimizer in float32 (as our trainer does). Prints one JSON line on stdout:
    {"workload", "side": "torch", "median_ms", "min_ms", "max_ms", "iters", "warmup", "cuda_max_allocated_mib",
     "cuda_max_reserved_mib", "torch", "diffusers", "gpu"}
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_torch as bt  # noqa: E402  (shared configs and helpers)

WORKLOADS = {
    f"gpu/sd15_512_k{k}_{dt}": dict(k=k, dtype=dt) for k in (1, 50) for dt in ("f32", "bf16")
}


def build(k, dtype, steps=50, s=64, guidance=7.5):
    import torch
    import torch.nn.functional as F
    import torch.utils.checkpoint
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    dev = torch.device("cuda")
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(10)
    unet = UNet2DConditionModel().eval()  # SD1.5's config
    unet.requires_grad_(False)
    unet.add_adapter(bt.lora_config())
    unet.to(dev)
    for n, p in unet.named_parameters():
        p.data = p.data.to(torch.float32 if "lora_" in n else dt)
    params = [p for p in unet.parameters() if p.requires_grad]
    assert params
    torch.manual_seed(21)
    vae = AutoencoderKL(**bt.sd15_vae_kwargs([128, 256, 512, 512], 512)).eval().to(dev, dt)
    vae.requires_grad_(False)
    rw = {k_: v.to(dev, dt) for k_, v in bt.tiny_reward_weights().items()}
    mean = torch.tensor(bt.CLIP_MEAN, device=dev, dtype=dt).view(1, 3, 1, 1)
    std = torch.tensor(bt.CLIP_STD, device=dev, dtype=dt).view(1, 3, 1, 1)

    def reward(img):
        x = (img / 2 + 0.5).clamp(0, 1)
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
        x = (x - mean) / std
        f = x.flatten(1) @ rw["proj.weight"].T
        f = f / f.norm(dim=-1, keepdim=True)
        h = f @ rw["mlp.0.weight"].T + rw["mlp.0.bias"]
        return (h @ rw["mlp.1.weight"].T + rw["mlp.1.bias"])[:, 0].float()

    sched = DDIMScheduler(**bt.DDIM_CONFIG)
    sched.set_timesteps(steps)
    timesteps = list(sched.timesteps)
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator(device="cpu").manual_seed(2)
    emb = torch.randn((2, 77, 768), generator=g).to(dev, dt)
    x_T = torch.randn((1, 4, s, s), generator=g).to(dev, dt)

    def unet_eps(x, t):
        return unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample

    def guided(x, t, with_grad):
        eps_all = (torch.utils.checkpoint.checkpoint(unet_eps, x, t, use_reentrant=False)
                   if with_grad else unet_eps(x, t))
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
        img = vae.decode(x / bt.SD15_SCALING_FACTOR).sample
        loss = -reward(img).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--workload")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    if args.list:
        print("\n".join(WORKLOADS))
        return 0
    if args.workload not in WORKLOADS:
        ap.error(f"--workload: one of {', '.join(WORKLOADS)}")
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        import torch

        if not torch.cuda.is_available():
            print("error: this torch has no CUDA device", file=sys.stderr)
            return 2
        run = build(**WORKLOADS[args.workload])
        times = []
        for i in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            run()
            if i >= args.warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
        mib = 1 << 20
        result = {
            "workload": args.workload, "side": "torch", "median_ms": round(statistics.median(times), 2),
            "min_ms": round(min(times), 2), "max_ms": round(max(times), 2), "iters": args.iters,
            "warmup": args.warmup, "cuda_max_allocated_mib": round(torch.cuda.max_memory_allocated() / mib),
            "cuda_max_reserved_mib": round(torch.cuda.max_memory_reserved() / mib),
            "torch": bt.version("torch"), "diffusers": bt.version("diffusers"),
            "gpu": torch.cuda.get_device_name(0),
        }
    real_stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
