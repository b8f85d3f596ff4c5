"""What the online probe costs: seconds per probe of a student and a teacher encoder.

Times :class:`eat_fairseq.evaluation.probe.OnlineProbe` as the pre-training task runs it (one layer, one
pooling, logistic regression and kNN, every fold) for a subset of N clips per split and for all
clips, on randomly initialised encoders of the chosen architecture (the cost does not depend on the
weights). Compare the seconds with the run's seconds per update times ``task.probe_interval_updates``.

    python benchmarks/probe_overhead.py --data data/fsdd_speakers [--arch small] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from eat_fairseq.model.encoder import EATEncoder, EncoderConfig
from eat_fairseq.data.features import FeatureConfig
from eat_fairseq.evaluation.probe import OnlineProbe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="labelled manifest folder (as task.probe_data)")
    p.add_argument("--arch", default="small", choices=["tiny", "small", "base"], help="encoder size")
    p.add_argument("--target-length", type=int, default=128, help="fbank frames per clip (the recipe's)")
    p.add_argument("--subset", type=int, default=100, help="clips per split for the subset row")
    p.add_argument("--repeats", type=int, default=2, help="timed probes per row (the median is shown)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = getattr(EncoderConfig, args.arch)()
    encoders = {"student": EATEncoder(cfg).eval(), "teacher": EATEncoder(cfg).eval()}
    feat = FeatureConfig(target_length=args.target_length)
    print(f"{args.arch} encoder, {args.threads} threads, student + teacher per probe")
    print(f"{'clips per split':>16} {'clips':>6} {'fbank once (s)':>15} {'per probe (s)':>14}")
    for per_split in [args.subset, None]:
        probe = OnlineProbe(args.data, feat, max_per_split=per_split, target_length=args.target_length)
        t0 = time.perf_counter()
        n = len(probe.data.labels)
        load = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            probe.run(encoders)
            times.append(time.perf_counter() - t0)
        times.sort()
        print(f"{per_split or 'all':>16} {n:>6} {load:>15.1f} {times[len(times) // 2]:>14.1f}")


if __name__ == "__main__":
    main()
