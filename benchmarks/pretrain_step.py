"""Wall time per pre-training update and peak memory, for eat_tiny and eat_base.

One update = forward (teacher + student + decoder) + UFO loss + backward + AdamW step + EMA step,
on random fbank, with masks drawn as the data loader would. Each configuration runs in its own
process so its peak resident memory (CPU) or peak allocated memory (CUDA) is its own.

    python benchmarks/pretrain_step.py                  # tiny and base on CPU
    python benchmarks/pretrain_step.py --device cuda --configs base large
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    # name: (preset, batch, clone, frames), matching examples/pretraining/*.yaml (base/large per GPU: 12)
    "tiny": ("tiny", 8, 2, 128),
    "base": ("base", 2, 16, 1024),
    "large": ("large", 2, 16, 1024),
}


def measure(name: str, device: str, steps: int, warmup: int, threads: int | None) -> dict:
    import torch

    from eat_fairseq.model.masking import inverse_block_mask
    from eat_fairseq.model.objective import ufo_loss
    from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig

    if threads:
        torch.set_num_threads(threads)
    preset, batch, clone, frames = CONFIGS[name]
    cfg = getattr(PretrainConfig, preset)(clone_batch=clone)
    torch.manual_seed(0)
    model = EATPretrainingModel(cfg).to(device).train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=5e-4, betas=(0.9, 0.95), weight_decay=0.05
    )
    grid = model.encoder.grid(frames)
    fbank = torch.randn(batch, 1, frames, 128, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        mask = inverse_block_mask(
            batch * clone, grid, cfg.mask_prob, cfg.mask_length, cfg.mask_prob_adjust
        )
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(fbank, mask.to(device))
        loss, sample_size = ufo_loss(out["frame_err"], out["utterance_err"], cfg.utterance_loss_weight)
        (loss / sample_size).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.ema_step(step)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak_cpu_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "config": name,
        "device": device,
        "batch": batch,
        "clone": clone,
        "frames": frames,
        "threads": torch.get_num_threads(),
        "median_s_per_update": statistics.median(times),
        "min_s_per_update": min(times),
        "steps": steps,
        "peak_rss_mib": peak_cpu_mib,
        "params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    }
    if device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "base"], choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=5, help="timed updates per config")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.device, args.steps, args.warmup, args.threads)))
        return 0
    for name in args.configs:
        cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        line = (
            f"{r['config']:5s} {r['device']} threads={r['threads']} batch={r['batch']} clone={r['clone']} "
            f"frames={r['frames']} params={r['params_m']:.1f}M: {r['median_s_per_update']:.3f} s/update "
            f"(median of {r['steps']}, min {r['min_s_per_update']:.3f}), peak RSS {r['peak_rss_mib']:.0f} MiB"
        )
        if "peak_cuda_mib" in r:
            line += f", peak CUDA {r['peak_cuda_mib']:.0f} MiB on {r['gpu']}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
