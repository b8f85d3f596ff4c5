"""Exponential moving average teacher (docs/reference.md section 3).

The teacher is an EMA of the student encoder, updated after every optimizer step with a decay that
rises linearly from 0.9998 to 0.99999 over the first 100k updates (150k for large) and then stays
constant, so the teacher tracks the student quickly early on and becomes a slow, stable target later.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_decay_at", "ema_update_"]


def ema_decay_at(
    num_updates: int,
    start: float = 0.9998,
    end: float = 0.99999,
    anneal_end_step: int = 100000,
) -> float:
    """EMA decay after ``num_updates`` optimizer updates: linear from ``start`` to ``end``, then ``end``."""
    if num_updates >= anneal_end_step or anneal_end_step <= 0:
        return float(end)
    if num_updates <= 0:
        return float(start)
    return float(start + (end - start) * (num_updates / anneal_end_step))


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """In place: ``teacher = decay * teacher + (1 - decay) * student`` for every parameter.

    Parameters are matched by name and the update is computed in the teacher's dtype (fp32) from the
    student's values upcast, so an fp16/bf16 student never degrades the teacher. Buffers (such as the
    fixed ``pos_embed`` table) are copied as-is when the dtypes agree: they are not learned, so
    averaging them is meaningless, and a low-precision copy is skipped rather than rounding the teacher.
    """
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        missing = sorted(t_params.keys() ^ s_params.keys())
        raise KeyError(f"teacher and student parameters differ: {missing[:10]}")
    for name, t in t_params.items():
        s = s_params[name].detach().to(device=t.device, dtype=t.dtype)
        t.mul_(decay).add_(s, alpha=1.0 - decay)
    t_bufs = dict(teacher.named_buffers())
    for name, s in student.named_buffers():
        # a buffer of a student cast to fp16/bf16 would lose precision in the fp32 teacher; the
        # encoder's only buffer is the fixed sin-cos table, identical in both, so it is left alone then
        if name in t_bufs and t_bufs[name].dtype == s.dtype:
            t_bufs[name].copy_(s.detach())
