"""Let fairseq's own ``torch.load`` calls read OUR checkpoints under torch's ``weights_only=True``.

torch >= 2.6 loads with ``weights_only=True`` by default and fairseq does not opt out
(``checkpoint_utils.load_checkpoint_to_cpu``, and ``distributed.utils._broadcast_object_slow`` when a
resumed distributed run broadcasts the loaded state). Files written by fairseq's trainer hold the
cfg as plain containers (``OmegaConf.to_container(..., enum_to_str=True)``), so they load as they
are. The broadcast, however, pickles the state AFTER ``load_checkpoint_to_cpu`` turned the cfg into
an omegaconf ``DictConfig`` (``OmegaConf.create(cfg, flags={"allow_objects": True})``), and the
receiving ranks reject it (``Unsupported global: omegaconf.dictconfig.DictConfig``; fairseq-notes
trap 5).

:func:`install_safe_globals` registers exactly the globals such a pickled cfg needs, found by
round-tripping a full ``FairseqConfig`` (plus nested lists/dicts/None/bool/float values) through
``torch.save`` / ``torch.load(weights_only=True)`` and reading each ``Unsupported global`` error,
then checking that dropping any one entry breaks the load again:

- ``omegaconf.dictconfig.DictConfig``, ``omegaconf.listconfig.ListConfig``: the config containers.
- ``omegaconf.nodes.AnyNode``: every leaf of a config created from plain containers (values are
  untyped, so no StringNode/IntegerNode/... appear).
- ``omegaconf.base.ContainerMetadata``, ``omegaconf.base.Metadata``: per-container / per-node
  metadata (flags, key and element types, parent reference type).
- ``typing.Any``: the ``ref_type`` / ``key_type`` / ``element_type`` recorded in that metadata.
- ``builtins.dict``, ``builtins.list``: ``ContainerMetadata.object_type`` of DictConfig / ListConfig;
  ``dict`` is also the factory of the resolver cache below.
- ``builtins.int``: ``ListConfig``'s ``key_type``.
- ``collections.defaultdict``: ``ContainerMetadata.resolver_cache`` is ``defaultdict(dict)``.
- ``fairseq.distributed.utils._TensorPlaceholder``: a distributed resume broadcasts the loaded state
  from rank 0 with tensors replaced by these placeholders (an index), then ``torch.load``s it.

Every entry is a class; the weights-only unpickler only instantiates it or restores its
``__dict__``/``__setstate__``, none of which runs file-controlled code.

Deliberately NOT allow-listed: numpy scalars (``numpy._core.multiarray.scalar`` with ``numpy.dtype``
and ``_codecs.encode``). Our criterions, tasks and metrics log only Python numbers, so our files never
contain them; allow-listing would (a) hide the bug that put one there, (b) make files whose loading
depends on the numpy major version (numpy 2 pickles ``numpy._core``, which numpy 1 cannot import) and
(c) widen what every ``torch.load`` in the process accepts, since the registry is process-wide.
Released EAT files do contain numpy scalars: read those with
:func:`eat_fairseq.checkpoints.load.load_checkpoint` (restricted unpickler) and convert them with
``eat-convert``, never by widening this list.
"""
from __future__ import annotations

import collections
import typing

import torch

__all__ = ["safe_globals", "install_safe_globals"]

_installed = False


def safe_globals() -> list[typing.Any]:
    """The allow-list (see the module docstring for why each entry is needed)."""
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.dictconfig import DictConfig
    from omegaconf.listconfig import ListConfig
    from omegaconf.nodes import AnyNode
    from fairseq.distributed.utils import _TensorPlaceholder

    return [
        _TensorPlaceholder,
        DictConfig,
        ListConfig,
        AnyNode,
        ContainerMetadata,
        Metadata,
        typing.Any,
        dict,
        list,
        int,
        collections.defaultdict,
    ]


def install_safe_globals() -> list[typing.Any]:
    """Register :func:`safe_globals` with ``torch.serialization.add_safe_globals`` (idempotent).

    Returns the registered list. A torch without ``add_safe_globals`` (< 2.4) loads with full
    unpickling by default and needs nothing, so this is then a no-op returning ``[]``.
    """
    global _installed
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:
        return []
    entries = safe_globals()
    if not _installed:
        add(entries)
        _installed = True
    return entries
