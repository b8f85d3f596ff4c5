"""First-GPU-hour check: throughput, memory, fbank parity and a real fairseq run, in one table.

On one CUDA GPU (under 8 minutes on an H100-class card):

1. EAT-base pre-training updates at the release's per-GPU batch (12 clips x clone 16, 1024 frames):
   clips/s and peak memory in fp32, fp16 and bf16, each half precision with the teacher forward in
   the student's dtype (``teacher_precision=release``, default) and in fp32. Mixed precision is done
   as fairseq does it: the model cast to fp16/bf16, fp32 master weights in the optimizer, a loss
   scale of 128 for fp16 (steps whose gradients overflow are skipped and counted).
2. EAT-base extraction (``load_model(...).extract``, 10 s clips, batch 32), clips/s.
3. Batched fbank on the GPU (mixed lengths, one call) vs torchaudio's Kaldi fbank per clip on the CPU.
4. ``fairseq-hydra-train`` of ``eat_base`` on one GPU through torchrun with the nccl backend: 10 updates,
   then a second run that resumes from ``checkpoint_last.pt`` to 20 updates; checks the resumed update
   count and the EMA step count in the final checkpoint.

Without CUDA it prints why and exits 0. ``--device cpu --tiny`` runs the same steps on the CPU with
EAT-tiny, short clips and gloo (fp16 is skipped on the CPU), which is how the tests exercise this
script. Exit status: 0 when every step passed (or CUDA is absent), 1 when a step failed.

    python benchmarks/gpu_check.py [--json results.json] [--skip-train]
    python benchmarks/gpu_check.py --device cpu --tiny
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = [("fp32", "release"), ("fp16", "release"), ("fp16", "fp32"), ("bf16", "release"), ("bf16", "fp32")]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_memory(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


# --------------------------------------------------------------------------------------------------
# 1. pre-training throughput


def pretrain_throughput(
    device: str, tiny: bool, precision: str, teacher: str, steps: int, warmup: int, loss_scale: float | None = None
) -> dict:
    """Timed pre-training updates: forward, UFO loss, backward, (fp32 master) AdamW step, EMA step.

    ``loss_scale``: default 128 for fp16 (fairseq's initial scale), 1 otherwise. A step whose
    gradient norm is not finite is skipped (no optimizer or EMA step) and counted, as fairseq does.
    """
    import torch

    from eat_fairseq.model.masking import inverse_block_mask
    from eat_fairseq.model.objective import ufo_loss
    from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    batch, frames = (2, 128) if tiny else (12, 1024)
    cfg = (PretrainConfig.tiny if tiny else PretrainConfig.base)(teacher_precision=teacher)
    _reset_memory(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = EATPretrainingModel(cfg)
    model = model.to(dtype=dtype).train()  # the teacher's weights stay fp32 (EMA master copy)
    params = [p for p in model.parameters() if p.requires_grad]
    master = params if dtype == torch.float32 else [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = torch.optim.AdamW(master, lr=5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    scale = loss_scale if loss_scale is not None else (128.0 if dtype == torch.float16 else 1.0)
    grid = model.encoder.grid(frames)
    gen = torch.Generator().manual_seed(0)
    fbank = torch.randn(batch, 1, frames, 128, generator=gen).to(device=device, dtype=dtype)
    masks = [  # drawn up front: the release and our tasks compute masks in the data-loader workers
        inverse_block_mask(batch * cfg.clone_batch, grid, cfg.mask_prob, cfg.mask_length, cfg.mask_prob_adjust,
                           generator=gen).to(device)
        for _ in range(warmup + steps)
    ]
    overflows, losses, elapsed = 0, [], 0.0
    for step in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        out = model(fbank, masks[step])
        loss, sample_size = ufo_loss(out["frame_err"], out["utterance_err"], cfg.utterance_loss_weight)
        (loss / sample_size * scale).backward()
        if master is not params or scale != 1.0:
            for p, m in zip(params, master):  # fp32 master gradients, unscaled (p may be m itself)
                grad = None if p.grad is None else p.grad.float() / scale
                p.grad = None
                m.grad = grad
        norm = torch.nn.utils.clip_grad_norm_(master, 4.0)
        if torch.isfinite(norm):
            opt.step()
            if master is not params:
                with torch.no_grad():
                    for p, m in zip(params, master):
                        p.copy_(m)
            model.ema_step(step + 1)
        else:
            overflows += 1
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step >= warmup:
            elapsed += time.perf_counter() - start
            losses.append(float(loss.detach()) / sample_size)
    result = {
        "precision": precision,
        "teacher": teacher if precision != "fp32" else "fp32",
        "batch": batch,
        "clone": cfg.clone_batch,
        "frames": frames,
        "clips_per_s": batch * steps / elapsed,
        "s_per_update": elapsed / steps,
        "peak_mib": _peak_mib(device),
        "overflow_steps": overflows,
        "last_loss": losses[-1] if losses else float("nan"),
        "ema_steps": int(model.num_ema_updates),
    }
    del model, opt, master, params, masks, fbank
    _reset_memory(device)
    return result


# --------------------------------------------------------------------------------------------------
# 2. extraction throughput


def extraction_throughput(device: str, tiny: bool, batch: int, num_clips: int, seconds: float) -> dict:
    import numpy as np
    import torch

    from eat_fairseq.inference.api import load_model
    from eat_fairseq.checkpoints.convert import build_checkpoint
    from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig

    cfg = PretrainConfig.tiny() if tiny else PretrainConfig.base()
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32) for _ in range(num_clips)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "random.pt")
        torch.manual_seed(0)
        torch.save(build_checkpoint("pretrained", EATPretrainingModel(cfg).state_dict(), cfg), path)
        handle = load_model(path, device=device, batch_size=batch)
    handle.extract(clips[:batch], granularity="utterance")  # warm-up
    _sync(device)
    start = time.perf_counter()
    for i in range(0, num_clips, batch):
        out = handle.extract(clips[i : i + batch], granularity="utterance")
    _sync(device)
    elapsed = time.perf_counter() - start
    width = len(out[0]) if isinstance(out, list) else int(np.asarray(out).shape[-1])
    return {"batch": batch, "clips": num_clips, "seconds": seconds, "clips_per_s": num_clips / elapsed, "dim": width}


# --------------------------------------------------------------------------------------------------
# 3. fbank parity


def fbank_parity(device: str) -> dict:
    """One batched call on ``device`` (mixed lengths) vs torchaudio's fbank per clip on the CPU."""
    import torch
    import torchaudio

    from eat_fairseq.data.features import kaldi_fbank

    gen = torch.Generator().manual_seed(0)
    lengths = [16000 * s for s in (10, 7, 3, 1)] + [12345, 4000]
    t = [torch.arange(n) / 16000.0 for n in lengths]
    clips = [0.3 * torch.sin(2 * torch.pi * (200 + 300 * i) * ti) + 0.05 * torch.randn(len(ti), generator=gen)
             for i, ti in enumerate(t)]
    padded = torch.zeros(len(clips), max(lengths))
    for i, c in enumerate(clips):
        padded[i, : len(c)] = c
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # kaldi_fbank's documented setting for exact parity
    try:
        feats, counts = kaldi_fbank(padded.to(device), lengths=torch.tensor(lengths, device=device))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    feats, counts = feats.cpu(), counts.cpu()
    max_abs, max_rel = 0.0, 0.0
    for i, c in enumerate(clips):
        ref = torchaudio.compliance.kaldi.fbank(
            c[None], htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
            num_mel_bins=128, dither=0.0, frame_shift=10,
        )
        got = feats[i, : int(counts[i])]
        if got.shape != ref.shape:
            raise AssertionError(f"clip {i}: {tuple(got.shape)} frames vs torchaudio {tuple(ref.shape)}")
        diff = (got - ref).abs()
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / ref.abs().clamp_min(1e-3)).max()))
    return {"clips": len(clips), "max_abs_diff": max_abs, "max_rel_diff": max_rel, "equal": max_abs <= 1e-3}


# --------------------------------------------------------------------------------------------------
# 4. fairseq-hydra-train with a resume


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_corpus(root: Path, num_clips: int, seconds: float) -> Path:
    """Noisy tones at 16 kHz and a ``train.tsv`` manifest (root line, then ``path<TAB>samples``)."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    rows = []
    n = int(16000 * seconds)
    t = np.arange(n) / 16000.0
    for i in range(num_clips):
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.05 * rng.standard_normal(n)
        sf.write(audio / f"clip{i:03d}.wav", x.astype(np.float32), 16000)
        rows.append(f"clip{i:03d}.wav\t{n}")
    manifests = root / "manifests"
    manifests.mkdir(exist_ok=True)
    (manifests / "train.tsv").write_text(f"{audio}\n" + "\n".join(rows) + "\n")
    return manifests


def train_command(device: str, tiny: bool, data: Path, save_dir: Path, max_update: int) -> list[str]:
    """torchrun (1 process) -> fairseq-hydra-train, nccl on a GPU, gloo on the CPU (fairseq-notes trap 6)."""
    import eat_fairseq

    exe = shutil.which("fairseq-hydra-train", path=os.path.dirname(sys.executable)) or shutil.which(
        "fairseq-hydra-train"
    )
    if exe is None:
        raise FileNotFoundError("fairseq-hydra-train not found next to this python or on PATH")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_free_port()}",
        exe, "--config-dir", str(REPO / "examples" / "pretraining"), "--config-name", "eat_tiny" if tiny else "eat_base",
        f"task.data={data}", f"common.user_dir={eat_fairseq.USER_DIR}", f"checkpoint.save_dir={save_dir}",
        f"optimization.max_update={max_update}", "common.log_interval=1", "common.log_format=json",
        f"checkpoint.save_interval_updates={max_update}",
        "distributed_training.distributed_init_method=env://", "distributed_training.distributed_no_spawn=true",
        "distributed_training.distributed_world_size=1", "distributed_training.distributed_rank=0",
        "distributed_training.device_id=0",
    ]
    if tiny:
        cmd += ["dataset.batch_size=4"]
    else:
        cmd += ["dataset.num_workers=4", f"common.tensorboard_logdir={save_dir / 'tb'}"]
    if device.startswith("cuda"):
        cmd += ["distributed_training.distributed_backend=nccl"]
    else:
        cmd += ["common.cpu=true", "distributed_training.distributed_backend=gloo",
                "distributed_training.ddp_backend=legacy_ddp"]
    return cmd


def hydra_train_resume(device: str, tiny: bool, first: int, total: int, timeout: float) -> dict:
    from eat_fairseq.checkpoints.load import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_corpus(root, num_clips=16 if tiny else 48, seconds=1.5 if tiny else 10.0)
        save_dir = root / "ckpt"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        runs = []
        for max_update in (first, total):
            start = time.perf_counter()
            proc = subprocess.run(train_command(device, tiny, data, save_dir, max_update), cwd=root, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
            runs.append({"max_update": max_update, "seconds": time.perf_counter() - start, "rc": proc.returncode})
            if proc.returncode != 0:
                tail = "\n".join(proc.stdout.splitlines()[-40:])
                raise RuntimeError(f"fairseq-hydra-train (max_update={max_update}) exited {proc.returncode}:\n{tail}")
            log = proc.stdout
        ckpt = load_checkpoint(str(save_dir / "checkpoint_last.pt"))
        updates = int(ckpt["optimizer_history"][-1]["num_updates"])
        ema_updates = int(ckpt["model"]["num_ema_updates"])
        resumed = "loaded checkpoint" in log.lower() and f"@ {first} updates" in log
        ok = resumed and updates == total and ema_updates == total
        return {"runs": runs, "resumed": resumed, "num_updates": updates, "num_ema_updates": ema_updates, "ok": ok}


# --------------------------------------------------------------------------------------------------
# driver


def _step(results: dict, name: str, fn: Callable[[], Any]) -> None:
    print(f"[gpu_check] {name} ...", flush=True)
    start = time.perf_counter()
    try:
        results[name] = {"ok": True, "result": fn()}
    except Exception as exc:  # one failed step must not hide the others
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        print(results[name]["trace"], file=sys.stderr, flush=True)
    results[name]["seconds"] = time.perf_counter() - start
    print(f"[gpu_check] {name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['seconds']:.0f} s)",
          flush=True)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pretrain_row(r: dict) -> tuple[str, str]:
    return (
        f"{r['precision']}, teacher {r['teacher']}, {r['batch']} x clone {r['clone']}, {r['frames']} frames",
        f"{r['clips_per_s']:.1f} clips/s ({r['s_per_update']:.3f} s/update), peak {_fmt(r['peak_mib'], '.0f')} MiB, "
        f"overflow steps {r['overflow_steps']}",
    )


def _train_row(r: dict) -> tuple[str, str]:
    runs = ", ".join(f"{x['max_update']} updates in {x['seconds']:.0f} s" for x in r["runs"])
    return ("torchrun x1, resume", f"{'ok' if r['ok'] else 'NOT ok'}: {runs}; resumed {r['resumed']}, "
            f"final updates {r['num_updates']}, EMA steps {r['num_ema_updates']}")


ROWS: list[tuple[str, str, Callable[[dict], tuple[str, str]]]] = [
    *((f"pretrain {p} teacher={t}", "pre-training", _pretrain_row) for p, t in PRECISIONS),
    ("extraction", "extraction", lambda r: (f"batch {r['batch']}, {r['clips']} clips of {r['seconds']:g} s",
                                            f"{r['clips_per_s']:.1f} clips/s")),
    ("fbank", "fbank parity", lambda r: ("one batched call (mixed lengths) vs torchaudio per clip on the CPU",
                                         f"{'equal' if r['equal'] else 'NOT equal'}: max abs diff "
                                         f"{r['max_abs_diff']:.2e}, max rel {r['max_rel_diff']:.2e}")),
    ("train", "fairseq-hydra-train", _train_row),
]


def render(results: dict, header: str) -> str:
    """The markdown table of everything measured."""
    lines = [header, "", "| check | setting | result |", "|---|---|---|"]
    for name, label, row in ROWS:
        entry = results.get(name)
        if entry is None:
            continue
        if entry["ok"]:
            setting, result = row(entry["result"])
        else:
            setting, result = name, "FAILED: " + entry["error"].splitlines()[0][:160]
        lines.append(f"| {label} | {setting} | {result} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: the test mode)")
    parser.add_argument("--tiny", action="store_true", help="EAT-tiny, short clips, few steps")
    parser.add_argument("--steps", type=int, default=None, help="timed updates per precision (10; tiny 2)")
    parser.add_argument("--skip-train", action="store_true", help="leave out the fairseq-hydra-train run")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA device (torch.cuda.is_available() is False); nothing was measured. "
              "Run it on a GPU machine, or `--device cpu --tiny` to exercise the script on the CPU.")
        return 0
    tiny = args.tiny
    steps = args.steps or (2 if tiny else 10)
    warmup = 1 if tiny else 3
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        header = (f"gpu_check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                  f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, TF32 cuDNN {torch.backends.cudnn.allow_tf32}"
                  f"{', EAT-tiny' if tiny else ', EAT-base'}")
    else:
        header = f"gpu_check on CPU (test mode), torch {torch.__version__}{', EAT-tiny' if tiny else ''}"
    results: dict[str, Any] = {}
    for precision, teacher in PRECISIONS:
        if precision == "fp16" and not device.startswith("cuda"):
            continue  # fairseq's fp16 is GPU-only (fairseq-notes trap 7)
        _step(results, f"pretrain {precision} teacher={teacher}",
              lambda p=precision, t=teacher: pretrain_throughput(device, tiny, p, t, steps, warmup))
    _step(results, "extraction", lambda: extraction_throughput(
        device, tiny, batch=4 if tiny else 32, num_clips=8 if tiny else 128, seconds=2.0 if tiny else 10.0))
    _step(results, "fbank", lambda: fbank_parity(device))
    if not args.skip_train:
        _step(results, "train", lambda: hydra_train_resume(device, tiny, 2 if tiny else 10, 4 if tiny else 20,
                                                           timeout=600 if tiny else 300))
    table = render(results, header)
    print(table, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=2, default=str))
    failed = [k for k, v in results.items() if not v["ok"]]
    failed += [k for k in ("fbank", "train") if k in results and results[k]["ok"]
               and not (results[k]["result"].get("equal", True) and results[k]["result"].get("ok", True))]
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
