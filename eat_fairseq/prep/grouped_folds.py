"""Labelled folds that hold whole groups out: one split per fold, for leave-one-fold-out probing.

A frozen-feature probe measures what it claims only when the clips it tests on share no recording,
speaker, instrument or source with the clips it trains on; otherwise it rewards recognising the
recording. The held-out sets built by ``experiments/build_*.py`` therefore give every clip a GROUP
(the voice that spoke it, the instrument that played it, the source its takes were cut from), and
this writer deals whole groups to ``num_folds`` folds, balanced per class as far as the groups allow,
and writes one split per fold, which ``eat-probe --data DEST --folds auto`` holds out in turn (as
``manifests/fsdd.py --split-by speaker`` does with FSDD's speakers).

Outputs (in DEST; the formats of :mod:`eat_fairseq.prep.common`):
  fold1.tsv ... foldK.tsv    line 1 the absolute ROOT, then class/file.wav<TAB>n_samples, sorted by path
  fold1.lbl ... foldK.lbl    clip_id<TAB>class, clip_id = the relative path without extension
  label_descriptors.csv      index,class (no header), classes in the order given
  folds.csv                  header clip_id,label,group,fold: which group every clip belongs to
  excluded.tsv               header path, reason, detail; clips that could not be read

Dealing is deterministic: groups are taken largest first (ties by name), and each goes to the fold
where it adds the least to a cost that grows with the square of each class's clips per fold and of
each fold's total (and of each stratum's, where clips name one, such as a voice's language); so a
class's groups spread over the folds and the folds come out of similar size.
A class whose clips all fall into one fold could never be predicted when that fold is held out
(``eat-probe`` refuses such data), so the writer refuses it too.
"""
from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from eat_fairseq.prep.common import (
    ManifestReport,
    PrepError,
    check_label_token,
    check_outputs,
    clip_id_from_path,
    format_label_descriptors,
    probe_entries,
    write_excluded,
    write_split,
    write_text_atomic,
)

__all__ = ["GroupedClip", "assign_folds", "fold_name", "write_grouped_fold_manifests"]


@dataclass(frozen=True)
class GroupedClip:
    """One clip: its path relative to the audio root, its class and its group."""

    rel_path: str
    label: str
    group: str
    stratum: str = ""  # optional: a property to spread over the folds too (e.g. the language of a voice)


def fold_name(k: int) -> str:
    """The split name of fold ``k`` (0-based): ``fold1``, ``fold2``, ..."""
    return f"fold{k + 1}"


def assign_folds(groups: Mapping[str, Mapping[str, int]], num_folds: int,
                 strata: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, int]:
    """Deal groups to folds: ``{group: {label: clips}}`` -> ``{group: fold index}`` (0-based).

    Largest group first (ties by name); each goes to the fold with the least cost
    ``sum_c (n_fc + n_gc)^2 / N_c + (n_f + n_g)^2 / N``, the first such fold on ties, where
    ``n_fc`` counts the clips of class c already in fold f, ``N_c`` all clips of class c and
    ``n_f``, ``N`` the same over all classes. ``strata`` (``{group: {stratum: clips}}``, e.g. the
    language of a voice) adds the same kind of term per stratum, so that groups of one stratum
    spread over the folds as well. Deterministic: depends only on the counts and names.
    """
    if num_folds < 2:
        raise PrepError(f"need at least 2 folds, got {num_folds}")
    if len(groups) < num_folds:
        raise PrepError(f"{len(groups)} groups cannot fill {num_folds} folds")
    strata = strata or {}
    class_total: Counter[str] = Counter()
    stratum_total: Counter[str] = Counter()
    for counts in groups.values():
        class_total.update(counts)
    for counts in strata.values():
        stratum_total.update(counts)
    per_fold_stratum = [Counter() for _ in range(num_folds)]
    total = sum(class_total.values())
    per_fold = [Counter() for _ in range(num_folds)]
    fold_total = [0] * num_folds
    order = sorted(groups, key=lambda g: (-sum(groups[g].values()), g))
    assigned: dict[str, int] = {}
    for group in order:
        counts = groups[group]
        size = sum(counts.values())

        def cost(f: int) -> float:
            by_class = sum((per_fold[f][c] + n) ** 2 / class_total[c] for c, n in counts.items())
            by_stratum = sum((per_fold_stratum[f][s] + n) ** 2 / stratum_total[s]
                             for s, n in strata.get(group, {}).items())
            return by_class + by_stratum + (fold_total[f] + size) ** 2 / max(total, 1)

        best = min(range(num_folds), key=lambda f: (cost(f), f))
        assigned[group] = best
        per_fold[best].update(counts)
        per_fold_stratum[best].update(strata.get(group, {}))
        fold_total[best] += size
    return assigned


def write_grouped_fold_manifests(
    root: str | os.PathLike,
    dest: str | os.PathLike,
    clips: Sequence[GroupedClip],
    num_folds: int = 5,
    labels: Sequence[str] | None = None,
    workers: int = 1,
    force: bool = False,
    quiet: bool = True,
) -> ManifestReport:
    """Write the fold splits of ``clips`` (audio under ``root``) to ``dest``; see the module docstring.

    ``labels`` fixes the class order of ``label_descriptors.csv`` (default: sorted); every clip's
    label must be one of them. Folds are dealt from the clips given; clips that then turn out to be
    unreadable are listed in ``excluded.tsv`` and left out of their fold.
    """
    root_s = os.path.abspath(os.fspath(root))
    dest_p = Path(os.path.abspath(os.fspath(dest)))
    if not os.path.isdir(root_s):
        raise PrepError(f"{root_s} is not a directory")
    if not clips:
        raise PrepError("no clips to write")
    seen: set[str] = set()
    for clip in clips:
        if clip.rel_path in seen:
            raise PrepError(f"clip {clip.rel_path} is listed twice")
        seen.add(clip.rel_path)
        check_label_token(clip.label, "label")
    label_list = list(labels) if labels is not None else sorted({c.label for c in clips})
    unknown = sorted({c.label for c in clips} - set(label_list))
    if unknown:
        raise PrepError(f"labels {unknown} are not in the label list {label_list}")
    splits = [fold_name(k) for k in range(num_folds)]
    outputs = [dest_p / f"{s}{ext}" for s in splits for ext in (".tsv", ".lbl")]
    outputs += [dest_p / "label_descriptors.csv", dest_p / "folds.csv", dest_p / "excluded.tsv"]
    check_outputs(outputs, force)

    counts: dict[str, Counter[str]] = {}
    strata: dict[str, Counter[str]] = {}
    for clip in clips:
        counts.setdefault(clip.group, Counter())[clip.label] += 1
        if clip.stratum:
            strata.setdefault(clip.group, Counter())[clip.stratum] += 1
    fold_of_group = assign_folds(counts, num_folds, strata)
    folds_of_label: dict[str, set[int]] = {}
    for clip in clips:
        folds_of_label.setdefault(clip.label, set()).add(fold_of_group[clip.group])
    single = sorted(label for label, folds in folds_of_label.items() if len(folds) < 2)
    if single:
        raise PrepError(f"classes {single} have clips in one fold only (too few groups): the fold that holds "
                        "them out could never predict them; leave these classes out or use fewer folds")

    report = ManifestReport(root=Path(root_s), dest=dest_p)
    ordered = sorted(clips, key=lambda c: c.rel_path)
    candidates = [(c.rel_path, clip_id_from_path(c.rel_path), (c.label,)) for c in ordered]
    usable = probe_entries(root_s, candidates, workers, quiet, report)
    for k, split in enumerate(splits):
        entries = [usable[c.rel_path] for c in ordered if c.rel_path in usable and fold_of_group[c.group] == k]
        write_split(dest_p, split, root_s, entries, report)
    report.outputs.append(write_text_atomic(dest_p / "label_descriptors.csv",
                                            format_label_descriptors([(c, None) for c in label_list])))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["clip_id", "label", "group", "fold"])
    for c in ordered:
        if c.rel_path in usable:
            writer.writerow([clip_id_from_path(c.rel_path), c.label, c.group, splits[fold_of_group[c.group]]])
    report.outputs.append(write_text_atomic(dest_p / "folds.csv", buf.getvalue()))
    report.excluded.sort(key=lambda e: e.path)
    report.outputs.append(write_excluded(dest_p / "excluded.tsv", report.excluded))
    report.notes.append(f"{len(label_list)} classes, {len(counts)} groups in {num_folds} folds")
    return report
