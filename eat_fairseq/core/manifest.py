"""TSV manifests (reference section 6), parsed without fairseq so every reader shares one parser.

The format is the release's: the first line is the audio root folder, then one
``relative/path<TAB>n_samples`` row per clip. Training, evaluation, extraction and validation all read
manifests through :func:`read_manifest`, so a malformed file fails the same way everywhere, with the
file and line named.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

__all__ = ["ManifestError", "ManifestRow", "read_manifest"]


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the line."""


@dataclass
class ManifestRow:
    path: str  # absolute path
    num_samples: int
    line: int  # 1-based line number in the manifest


def read_manifest(manifest: str) -> tuple[str, List[ManifestRow]]:
    """Parse a TSV manifest, checking its format up front so a bad row fails before training."""
    rows: List[ManifestRow] = []
    with open(manifest, encoding="utf-8") as f:
        root = f.readline().rstrip("\n").rstrip("\r")
        if not root:
            raise ManifestError(f"{manifest}:1: first line must be the audio root folder, got an empty line")
        if "\t" in root:
            raise ManifestError(f"{manifest}:1: first line must be the audio root folder, got a data row {root!r}")
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise ManifestError(
                    f"{manifest}:{lineno}: expected 'relative/path<TAB>n_samples', got {len(parts)} field(s): {line!r}"
                )
            try:
                n = int(parts[1])
            except ValueError:
                raise ManifestError(f"{manifest}:{lineno}: n_samples is not an integer: {parts[1]!r}") from None
            rows.append(ManifestRow(os.path.join(root, parts[0]), n, lineno))
    return root, rows
