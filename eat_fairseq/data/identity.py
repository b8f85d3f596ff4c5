"""What a training run was trained on, in a few numbers a checkpoint can carry.

A run folder is resumed by whatever command is started in it next. When that command names other
data (another folder, or the same folder whose manifest was rewritten), fairseq would continue the old
run on the new rows: at an epoch boundary it may even report "done training" with the old data's
model, mid-epoch it fails with an internal "dataloader mismatch". The eat tasks store the identity of
their training manifest in every checkpoint (``task_state``) and the resume compares it with the data
of the run being started (:mod:`eat_fairseq.fairseq_ext.checkpoint_io`).

The identity is the manifest's path, its row count, the sum of its ``n_samples`` column and a hash
of its rows. The root folder (line 1) is left out of the hash, so data moved to another folder with
its manifest rewritten for the new root is still the same data.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Optional

__all__ = ["manifest_identity", "same_data", "describe_identity"]


def manifest_identity(manifest: str) -> Optional[Dict[str, Any]]:
    """``{"manifest", "rows", "samples", "rows_sha256"}`` of a TSV manifest (None: no such file).

    Reads the file once, in blocks, so it stays cheap for millions of rows (about 0.3 s per 100 MB).
    """
    if not os.path.isfile(manifest):
        return None
    digest = hashlib.sha256()
    rows = samples = 0
    with open(manifest, "rb") as handle:
        handle.readline()  # the root folder: where the data lives, not what it is
        for line in handle:
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            digest.update(line + b"\n")
            rows += 1
            _, _, size = line.rpartition(b"\t")
            samples += int(size) if size.isdigit() else 0
    return {"manifest": os.path.abspath(manifest), "rows": rows, "samples": samples, "rows_sha256": digest.hexdigest()}


def same_data(saved: Dict[str, Any], now: Dict[str, Any]) -> bool:
    """Whether two identities name the same rows (the manifest's path may differ)."""
    return saved.get("rows_sha256") == now.get("rows_sha256") and saved.get("rows") == now.get("rows")


def describe_identity(identity: Dict[str, Any]) -> str:
    """One line for messages: ``/data/a/train.tsv (1,200 rows, 19,200,000 samples, rows hash 1a2b3c4d)``."""
    return (
        f"{identity.get('manifest')} ({int(identity.get('rows', 0)):,} rows, {int(identity.get('samples', 0)):,} "
        f"samples, rows hash {str(identity.get('rows_sha256', ''))[:8]})"
    )
