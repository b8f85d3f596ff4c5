"""Name mapping between this package's state dicts and the released EAT layouts (docs/reference.md section 7).

Three external layouts exist:

- released pre-training checkpoints (``data2vec_multi``): the student encoder and decoder under
  ``modality_encoders.IMAGE.*`` and ``blocks.*``, the EMA teacher as a nested plain dict ``_ema``
  with the same names minus the decoder;
- released fine-tuned checkpoints (``mae_image_classification``): the encoder keys above prefixed
  ``model.``, plus ``fc_norm.*`` and ``head.*``;
- the Hugging Face port: prefix ``model.``, ``modality_encoders.IMAGE.`` dropped and
  ``context_encoder.norm`` renamed ``pre_norm``.

The mapping only renames keys; tensors are passed through untouched (same objects), so a round trip
is exact. Only names are translated here: reading the pickled files is ``checkpoints.load``'s job.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import Tensor

from eat_fairseq.model.encoder import EncoderConfig, sincos_pos_embed_2d

__all__ = [
    "IMAGE_PREFIX",
    "encoder_key_to_released",
    "encoder_key_from_released",
    "to_released",
    "from_released",
    "from_hf",
    "to_hf",
    "extend_positions",
    "infer_encoder_config",
    "RELEASED_HEADS",
]

IMAGE_PREFIX = "modality_encoders.IMAGE."
# attention heads of the released widths (EAT-base, EAT-large): the only ones shapes can tell
RELEASED_HEADS = {768: 12, 1024: 16}

# Our bare encoder names -> released names (blocks.* are identical in both).
_ENCODER_RENAMES = {
    "cls_token": IMAGE_PREFIX + "extra_tokens",
    "patch_embed.proj.weight": IMAGE_PREFIX + "local_encoder.proj.weight",
    "patch_embed.proj.bias": IMAGE_PREFIX + "local_encoder.proj.bias",
    "pos_embed": IMAGE_PREFIX + "fixed_positional_encoder.positions",
    "pre_norm.weight": IMAGE_PREFIX + "context_encoder.norm.weight",
    "pre_norm.bias": IMAGE_PREFIX + "context_encoder.norm.bias",
}
_ENCODER_RENAMES_INV = {v: k for k, v in _ENCODER_RENAMES.items()}

_OUR_DECODER_BLOCK = re.compile(r"^blocks\.(\d+)\.conv\.(weight|bias)$")
_REL_DECODER_BLOCK = re.compile(r"^blocks\.(\d+)\.0\.(weight|bias)$")
_REL_DECODER_PREFIX = IMAGE_PREFIX + "decoder."

_EMA_KEY = "_ema"
_EMA_COUNTER = "num_ema_updates"


def encoder_key_to_released(key: str) -> str | None:
    """Released name of a bare encoder key (``blocks.3.attn.qkv.weight``, ``cls_token``...); None if unknown."""
    if key in _ENCODER_RENAMES:
        return _ENCODER_RENAMES[key]
    if key.startswith("blocks."):
        return key
    return None


def encoder_key_from_released(key: str) -> str | None:
    """Bare encoder name of a released encoder key; None if the key is not an encoder key."""
    if key in _ENCODER_RENAMES_INV:
        return _ENCODER_RENAMES_INV[key]
    if key.startswith("blocks."):
        return key
    return None


def _decoder_key_to_released(key: str) -> str | None:
    m = _OUR_DECODER_BLOCK.match(key)
    if m:
        return f"{_REL_DECODER_PREFIX}blocks.{m.group(1)}.0.{m.group(2)}"
    if key.startswith("proj."):
        return _REL_DECODER_PREFIX + key
    return None


def _decoder_key_from_released(key: str) -> str | None:
    if not key.startswith(_REL_DECODER_PREFIX):
        return None
    rest = key[len(_REL_DECODER_PREFIX) :]
    m = _REL_DECODER_BLOCK.match(rest)
    if m:
        return f"blocks.{m.group(1)}.conv.{m.group(2)}"
    if rest.startswith("proj."):
        return rest
    return None


def _unknown(keys: list[str], what: str) -> None:
    if keys:
        shown = ", ".join(sorted(keys)[:10])
        more = f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""
        raise KeyError(f"unrecognised {what} keys: {shown}{more}; pass strict=False to carry them through")


def _is_pretraining_ours(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(("teacher.", "decoder.")) for k in state)


def to_released(state: Mapping[str, Any], strict: bool = True) -> dict[str, Any]:
    """Map one of our state dicts to the released layout.

    - Pre-training (``encoder.*``, ``decoder.*``, ``teacher.*``, ``num_ema_updates``): student ->
      ``modality_encoders.IMAGE.*`` / ``blocks.*``, teacher -> nested dict ``_ema``; the EMA counter
      has no released counterpart and is dropped.
    - Fine-tuned (``encoder.*``, ``fc_norm.*``, ``head.*``): encoder -> ``model.`` + released encoder
      names, ``fc_norm``/``head`` unchanged.

    With ``strict`` (default) unknown keys raise ``KeyError``; otherwise they are copied unchanged.
    """
    out: dict[str, Any] = {}
    unknown: list[str] = []
    if _is_pretraining_ours(state):
        ema: dict[str, Any] = {}
        for key, value in state.items():
            group, _, rest = key.partition(".")
            if group == "encoder" and (name := encoder_key_to_released(rest)) is not None:
                out[name] = value
            elif group == "decoder" and (name := _decoder_key_to_released(rest)) is not None:
                out[name] = value
            elif group == "teacher" and (name := encoder_key_to_released(rest)) is not None:
                ema[name] = value
            elif key == _EMA_COUNTER:
                continue
            else:
                unknown.append(key)
                out[key] = value
        if ema:
            out[_EMA_KEY] = ema
    else:
        for key, value in state.items():
            group, _, rest = key.partition(".")
            if group == "encoder" and (name := encoder_key_to_released(rest)) is not None:
                out["model." + name] = value
            elif group in ("fc_norm", "head"):
                out[key] = value
            else:
                unknown.append(key)
                out[key] = value
    if strict:
        _unknown(unknown, "state-dict")
    return out


def from_released(
    state: Mapping[str, Any], strict: bool = True, num_ema_updates: int = 0
) -> dict[str, Any]:
    """Map a released state dict (pre-trained or fine-tuned) to our names; inverse of :func:`to_released`.

    Pre-trained files (``_ema`` present or top-level ``modality_encoders.*``) give an
    ``EATPretrainingModel`` state: ``encoder.*``, ``decoder.*``, ``teacher.*`` and the EMA counter
    buffer ``num_ema_updates`` (released files do not record it; ``num_ema_updates`` sets it, default
    0). If ``_ema`` lacks the fixed positions table it is taken from the student (the table is not
    learned, so both are identical). Fine-tuned files (``model.*``) give an ``EATClassifier`` state:
    ``encoder.*``, ``fc_norm.*``, ``head.*``.

    With ``strict`` (default) unknown keys raise ``KeyError``; otherwise they are copied unchanged.
    """
    out: dict[str, Any] = {}
    unknown: list[str] = []
    pretraining = _EMA_KEY in state or any(k.startswith(IMAGE_PREFIX) for k in state)
    if pretraining:
        for key, value in state.items():
            if key == _EMA_KEY:
                for ema_key, ema_value in value.items():
                    name = encoder_key_from_released(ema_key)
                    if name is None:
                        unknown.append(f"{_EMA_KEY}.{ema_key}")
                        out[f"teacher.{ema_key}"] = ema_value
                    else:
                        out["teacher." + name] = ema_value
            elif (name := encoder_key_from_released(key)) is not None:
                out["encoder." + name] = value
            elif (name := _decoder_key_from_released(key)) is not None:
                out["decoder." + name] = value
            else:
                unknown.append(key)
                out[key] = value
        if _EMA_KEY in state:
            if "teacher.pos_embed" not in out and "encoder.pos_embed" in out:
                out["teacher.pos_embed"] = out["encoder.pos_embed"].clone()
            out[_EMA_COUNTER] = torch.tensor(int(num_ema_updates), dtype=torch.long)
    else:
        for key, value in state.items():
            if key.startswith("model.") and (name := encoder_key_from_released(key[6:])) is not None:
                out["encoder." + name] = value
            elif key.split(".", 1)[0] in ("fc_norm", "head"):
                out[key] = value
            else:
                unknown.append(key)
                out[key] = value
    if strict:
        _unknown(unknown, "released state-dict")
    return out


def _hf_key_to_encoder(key: str) -> str | None:
    """Bare encoder name of a Hugging Face key with ``model.`` already stripped."""
    if key.startswith(("pre_norm.", "blocks.")):
        return key
    if key.startswith("context_encoder."):
        return None  # the port renames it pre_norm; anything else there is foreign
    return _ENCODER_RENAMES_INV.get(IMAGE_PREFIX + key)


def from_hf(state: Mapping[str, Any], strict: bool = True) -> dict[str, Any]:
    """Map the Hugging Face port's state dict to our ``encoder.*`` names (``fc_norm``/``head`` kept).

    HF names: ``model.`` + released encoder names without ``modality_encoders.IMAGE.`` and with
    ``context_encoder.norm`` renamed ``pre_norm`` (e.g. ``model.extra_tokens``,
    ``model.local_encoder.proj.weight``, ``model.pre_norm.weight``, ``model.blocks.0...``).
    Note the HF port's ``fc_norm`` uses eps 1e-5 (ours 1e-6); the weights are the same.
    """
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in state.items():
        name = _hf_key_to_encoder(key[6:]) if key.startswith("model.") else None
        if name is not None:
            out["encoder." + name] = value
        elif key.split(".", 1)[0] in ("fc_norm", "head"):
            out[key] = value
        else:
            unknown.append(key)
            out[key] = value
    if strict:
        _unknown(unknown, "Hugging Face state-dict")
    return out


def to_hf(state: Mapping[str, Any], strict: bool = True) -> dict[str, Any]:
    """Inverse of :func:`from_hf`: ``encoder.*`` -> HF names; ``fc_norm``/``head`` kept."""
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in state.items():
        group, _, rest = key.partition(".")
        released = encoder_key_to_released(rest) if group == "encoder" else None
        if released is not None:
            if rest.startswith("pre_norm."):
                name = rest
            elif released.startswith(IMAGE_PREFIX):
                name = released[len(IMAGE_PREFIX) :]
            else:
                name = released
            out["model." + name] = value
        elif group in ("fc_norm", "head"):
            out[key] = value
        else:
            unknown.append(key)
            out[key] = value
    if strict:
        _unknown(unknown, "state-dict")
    return out


def extend_positions(pos: Tensor, max_rows: int, grid_w: int = 8, atol: float = 1e-4) -> Tensor:
    """Append sin-cos rows to a stored table ``(1, N, D)`` up to ``max_rows`` TIME rows.

    Older released files store only 512 rows (64 time patches, 10 s of audio); the table is a fixed
    function of position, so the missing rows can be generated for longer inputs. The stored rows are
    kept exactly as they are (only rows after them are appended), so the first 10 s of every input
    sees the very numbers the checkpoint was trained with. They must agree with the generated table
    (within ``atol``), otherwise the file holds some other table and this raises ``ValueError``
    rather than extending it. A table already ``max_rows`` long or longer is returned unchanged.
    The result has ``pos``'s dtype and device.
    """
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"expected positions of shape (1, N, D), got {tuple(pos.shape)}")
    n, d = pos.shape[1], pos.shape[2]
    if n % grid_w:
        raise ValueError(f"{n} position rows are not a multiple of grid_w={grid_w}")
    rows = max(max_rows, n // grid_w)
    table = sincos_pos_embed_2d(d, rows, grid_w)  # (rows*W, D) float32
    stored = pos[0].detach().float().cpu()
    if not torch.allclose(stored, table[:n], atol=atol, rtol=0.0):
        err = (stored - table[:n]).abs().max().item()
        raise ValueError(
            f"stored positions do not match the 2-D sin-cos table (max abs diff {err:.3g}); refusing to extend"
        )
    extra = table[n : max_rows * grid_w].unsqueeze(0).to(dtype=pos.dtype, device=pos.device)
    return torch.cat([pos.detach(), extra], dim=1)


def _find(state: Mapping[str, Any], suffixes: tuple[str, ...]) -> Tensor | None:
    for key, value in state.items():
        if isinstance(value, Tensor) and key.endswith(suffixes):
            return value
    return None


def infer_encoder_config(state: Mapping[str, Any]) -> EncoderConfig:
    """Encoder size from tensor shapes, for any layout (ours, released, fine-tuned, HF, bare encoder).

    Width and patch size come from the patch-embedding weight, depth from the student's block indices,
    the MLP ratio from ``fc1``, ``max_length`` from the positions table (64 for older 512-row files).
    Heads cannot be read from shapes: D 768 -> 12 (base), D 1024 -> 16 (large), else D // 64 (min 1).
    """
    flat = {k: v for k, v in state.items() if k != _EMA_KEY and not k.startswith("teacher.")}
    proj = _find(flat, ("local_encoder.proj.weight", "patch_embed.proj.weight"))
    if proj is None:
        raise KeyError("no patch-embedding weight (local_encoder.proj.weight / patch_embed.proj.weight) found")
    embed_dim, in_chans, patch_size = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    block_ids = set()
    for key in flat:
        m = re.search(r"(?:^|\.)blocks\.(\d+)\.attn\.qkv\.weight$", key)
        if m and "decoder" not in key:
            block_ids.add(int(m.group(1)))
    if not block_ids:
        raise KeyError("no transformer blocks (blocks.{i}.attn.qkv.weight) found")
    depth = max(block_ids) + 1
    fc1 = _find(flat, ("blocks.0.mlp.fc1.weight",))
    mlp_ratio = float(fc1.shape[0]) / embed_dim if fc1 is not None else 4.0
    num_heads = RELEASED_HEADS.get(embed_dim, max(1, embed_dim // 64))  # a guess elsewhere: callers check
    cfg = EncoderConfig(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        patch_size=patch_size,
        in_chans=in_chans,
    )
    pos = _find(flat, ("fixed_positional_encoder.positions", "pos_embed"))
    if pos is not None:
        cfg.max_length = int(pos.shape[1]) // cfg.grid_w
    return cfg
