"""GPU settings of a recipe adapted, in one logged line, when a training run has no GPU.

Why: the GPU recipes (``examples/finetuning/custom.yaml`` and the like) ask for fp16 and 8 data-loader
workers. On a CPU, fairseq then casts the model to half precision (several times slower than float32
there: ~10 s per update on 2 cores) and 8 worker processes fight the training process for the cores;
on a small machine the workers also end in ~1,000 lines of DataLoader tracebacks at exit. Neither
is what a user trying a GPU recipe on a laptop wants, and neither says why, so a CPU run adapts:

- fp16 off (``common.fp16``, ``memory_efficient_fp16``, ``amp``): CUDA-only half precision. bf16 stays:
  CPUs run it (the tests train in bf16 on CPU), and a user who asks for it on a CPU means it;
- ``dataset.num_workers`` capped at a quarter of the cores (0 on up to 3 cores): the cores compute the
  model; with no workers left, ``dataset.data_buffer_size`` goes to 0 as in the CPU recipes (a
  buffer thread without workers only adds a shutdown race).

It logs ONE line naming every change and how to avoid it. A run that will use CUDA is never touched.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, List, Optional

import torch
from omegaconf import OmegaConf, open_dict

logger = logging.getLogger(__name__)

PRECISION_KEYS = ("fp16", "amp", "memory_efficient_fp16")  # bf16 runs on CPUs: left as asked


def max_cpu_workers(cores: Optional[int] = None) -> int:
    """Data-loader workers a CPU run keeps: a quarter of the cores (the rest compute the model)."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return max(0, cores // 4)


def uses_cuda(common: Any, cuda_available: Callable[[], bool] = torch.cuda.is_available) -> bool:
    """Whether fairseq will train on CUDA: it does when CUDA is there and ``common.cpu`` is not set."""
    return bool(cuda_available()) and not bool(common.get("cpu", False))


def adapt_to_cpu(task_cfg: Any, cores: Optional[int] = None,
                 cuda_available: Callable[[], bool] = torch.cuda.is_available) -> List[str]:
    """Turn a composed config's GPU-only settings into CPU ones in place; returns the changes made.

    ``task_cfg`` is the ``task`` node fairseq passes to ``setup_task``; the full config is its root
    (Trainer and the data loaders read it after the task is set up, so the changes take effect). A
    detached task config, or a run on CUDA, is left alone.
    """
    if not OmegaConf.is_config(task_cfg):
        return []
    root = task_cfg._get_root()
    common, dataset = root.get("common"), root.get("dataset")
    if not OmegaConf.is_config(common) or uses_cuda(common, cuda_available):
        return []
    changes: List[str] = []
    with open_dict(root):
        for key in PRECISION_KEYS:
            if common.get(key, False):
                common[key] = False
                changes.append(f"common.{key} true -> false")
        if OmegaConf.is_config(dataset):
            cap = max_cpu_workers(cores)
            workers = int(dataset.get("num_workers") or 0)
            if workers > cap:
                dataset.num_workers = cap
                changes.append(f"dataset.num_workers {workers} -> {cap} ({cores or os.cpu_count()} cores)")
            buffer = int(dataset.get("data_buffer_size") or 0)
            if int(dataset.get("num_workers") or 0) == 0 and buffer > 0 and changes:
                dataset.data_buffer_size = 0
                changes.append(f"dataset.data_buffer_size {buffer} -> 0")
    if changes:
        logger.warning("training on CPU (common.cpu=true or no CUDA), so GPU settings adapted: %s. "
                       "For the CPU recipe of a labelled folder see examples/finetuning/folder_cpu.yaml",
                       ", ".join(changes))
    return changes
