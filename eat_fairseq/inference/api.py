"""Use trained EAT models without fairseq: embeddings (utterance / per time patch / per patch) and tags.

    from eat_fairseq import load_model
    model = load_model("checkpoint_best.pt")       # pre-training or fine-tuned checkpoint
    model.extract("clip.wav")                      # (768,) utterance embedding
    model.extract("clip.wav", granularity="frame") # (H, 768), one row per 160 ms time patch
    model.predict("clip.wav", top_k=3)             # fine-tuned only: [(label, score), ...]

Everything here runs on the pure-PyTorch packages (model, data, checkpoints), so it works when fairseq, hydra or
omegaconf are not installed (or fail to import). Checkpoints are read with the core's restricted
unpickler unless ``trusted=True``.

**Accepted checkpoints** (the kind is detected from ``cfg.model._name``, else from the state-dict names):

- our pre-training checkpoints (model ``eat``: ``encoder.*`` student, ``teacher.*`` EMA teacher,
  ``decoder.*``). The STUDENT encoder is used by default, ``use_teacher=True`` selects the teacher;
- our fine-tuned checkpoints (model ``eat_classifier``: ``encoder.*``, ``fc_norm.*``, ``head.*``,
  labels from ``task_state["labels"]``);
- released EAT files and the Hugging Face port's ``.safetensors``, converted in memory by
  :mod:`eat_fairseq.checkpoints.convert` (the same conversion ``eat-convert`` writes to disk);
- ``.onnx`` files written by ``eat-export`` (any of the above, exported): the same handle, with the
  encoder run by onnxruntime (:mod:`eat_fairseq.inference.onnx_backend`); their metadata carry the
  feature settings and labels, so the file alone is enough.

Feature settings (``target_length``, ``norm_mean``, ``norm_std``, ``sample_rate``) come from
``cfg.task``; missing ones default to the AudioSet settings.

**Audio input** (``audio`` argument of :meth:`EATModelHandle.extract` / :meth:`~EATModelHandle.predict`):

- a path (any format soundfile reads; the file's own sample rate is used, ``sample_rate`` is ignored);
- a 1-D array/tensor ``(samples,)``: one mono clip;
- a 2-D array/tensor ``(channels, samples)``: ONE multi-channel clip, channels first (a 2-D input is
  never read as a batch; an input with more rows than columns is rejected as probably
  ``(samples, channels)``);
- a list/tuple of the above: a batch, whose clips may differ in length; the result is then a list
  (an empty list gives an empty list).

``soundfile.read`` returns ``(samples, channels)`` for multi-channel files: pass its transpose
(``data.T``), or the path itself.

Arrays are at ``sample_rate`` (default: the model's rate, 16 kHz); integer arrays are read as PCM
and scaled to [-1, 1) like soundfile does. Every clip is mixed down to mono
first, then resampled (:func:`eat_fairseq.data.audio.to_mono_16k`).

**Long audio.** The encoder sees windows of ``target_length`` fbank frames (1024 frames = 10.24 s
for AudioSet models). The fbank of the whole clip is computed once and cut into consecutive,
non-overlapping windows of ``target_length`` frames; the last window is zero-padded at the end
(then normalised) exactly like a short clip in training. So a clip of at most one window is
processed exactly as in fine-tuning / evaluation, and no frame is lost at window boundaries. Windows
of all clips in a call are batched together (``batch_size`` windows per forward pass).

**Granularities** (D = embedding width, H = time patches, W = 8 frequency patches):

- ``"utterance"`` -> ``(D,)``: the encoder's CLS output. For a clip spanning several windows it is
  the mean of the per-window CLS outputs weighted by the number of real (unpadded) frames in each
  window, so a short padded tail window counts for what it covers, not as much as a full one;
- ``"frame"`` -> ``(H, D)``: one row per 160 ms time patch (16 frames), the mean over its 8
  frequency patches. Time patches of all windows are concatenated in time; patches made only of
  padding are dropped, a patch with at least one real frame is kept, so
  ``H = ceil(num_frames / 16)`` with ``num_frames = 1 + (samples - 400) // 160`` at 16 kHz;
- ``"all"`` -> dict with ``"utterance"`` ``(D,)``, ``"frame"`` ``(H, D)``, ``"patches"``
  ``(H, W, D)`` (every patch, frequency index second) and ``"timestamps"`` ``(H,)`` (seconds).

Time patch ``j`` covers the frames ``16 j .. 16 j + 15``, i.e. audio from ``0.16 j`` s to
``0.16 j + 0.175`` s (a frame is 25 ms long, one every 10 ms); its timestamp is the centre,
``0.16 j + 0.0875`` s (:meth:`EATModelHandle.timestamps`), except for a last patch only partly
covered by the clip's frames: it is centred on the frames it does cover, so no timestamp lies past
the end of the audio (a 1 s clip's last patch: 0.9775 s, not 1.0475 s).

**Tagging.** :meth:`EATModelHandle.predict` scores fine-tuned models: sigmoid per class for
multi-label heads, softmax for single-label ones. Which one is read from the checkpoint:
``cfg.task.multi_label`` when present, else ``cfg.criterion.loss`` (``ce`` -> softmax, ``bce*`` ->
sigmoid), else multi-label (AudioSet). Long clips get per-window scores combined by ``aggregate``:
``"mean"`` (weighted by real frames, like the utterance embedding; softmax scores still sum to 1) or
``"max"`` (per class, for "does this occur anywhere" tagging of long recordings).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from eat_fairseq.data.audio import AudioError, load_audio, to_mono_16k
from eat_fairseq.checkpoints.errors import CheckpointError, ModelLoadError  # noqa: F401  (CheckpointError re-exported)
from eat_fairseq.model.classifier import EATClassifier
from eat_fairseq.checkpoints.convert import dig
from eat_fairseq.model.encoder import EATEncoder, EncoderConfig
from eat_fairseq.data.features import FeatureConfig, fbank_of, num_frames, split_windows
from eat_fairseq.inference.geometry import WindowGeometry
from eat_fairseq.checkpoints.weights import RELEASED_HEADS, infer_encoder_config

__all__ = [
    "AudioInput",
    "GRANULARITIES",
    "ModelLoadError",
    "EATModelHandle",
    "load_model",
]

AudioInput = Union[str, "os.PathLike[str]", np.ndarray, Tensor]
GRANULARITIES = ("utterance", "frame", "all")
_AGGREGATES = ("mean", "max")
_PRETRAIN_NAMES = ("eat", "data2vec_multi")
_CLASSIFIER_NAMES = ("eat_classifier", "mae_image_classification")


def _read_checkpoint(path: str, trusted: bool) -> dict[str, Any]:
    """Our checkpoint layout through the one loader (:func:`eat_fairseq.checkpoints.convert.load_ours`),
    memory-mapped: only the tensors the model keeps are read (:func:`_load_strict` copies them)."""
    from eat_fairseq.checkpoints.convert import ConversionError, load_ours

    try:
        return load_ours(path, trusted=trusted, mmap=True)
    except ConversionError as exc:
        raise ModelLoadError(str(exc)) from exc


def _encoder_config(state: Mapping[str, Tensor], cfg_model: Mapping[str, Any], prefix: str) -> EncoderConfig:
    """Sizes from the tensors (authoritative), the rest (heads, eps, mel bins) from ``cfg.model``.

    Dropouts and drop path are zeroed: this is inference.
    """
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    shaped = infer_encoder_config(sub)
    names = {f.name for f in dataclasses.fields(EncoderConfig)}
    recorded = {k: v for k, v in cfg_model.items() if k in names and v is not None}
    values = {**recorded}
    for name in ("embed_dim", "depth", "mlp_ratio", "patch_size", "in_chans", "max_length"):
        values[name] = getattr(shaped, name)
    if "num_heads" not in values:
        if shaped.embed_dim not in RELEASED_HEADS:
            raise ModelLoadError(
                f"the checkpoint records no num_heads for its D={shaped.embed_dim} encoder; only the released "
                "sizes (768/12, 1024/16) can be inferred from shapes"
            )
        values["num_heads"] = shaped.num_heads
    values.update(drop_path_rate=0.0, dropout=0.0, attn_dropout=0.0)
    return EncoderConfig(**values)


def _feature_config(cfg_task: Mapping[str, Any], num_mel_bins: int) -> FeatureConfig:
    """Feature settings of the task; the mel bins are the encoder's (the task does not record them)."""
    defaults = FeatureConfig()
    values: dict[str, Any] = {"num_mel_bins": num_mel_bins}
    for name in ("sample_rate", "target_length", "norm_mean", "norm_std"):
        value = cfg_task.get(name)
        values[name] = getattr(defaults, name) if value is None or isinstance(value, (bool, str)) else value
    values["sample_rate"] = int(values["sample_rate"])
    values["target_length"] = int(values["target_length"])
    return FeatureConfig(**values)


def _multi_label(cfg: Mapping[str, Any]) -> bool:
    """Sigmoid scores for heads trained with BCE (even single-label sets such as Speech Commands),
    softmax for cross-entropy; the training loss decides first, the task's label format second."""
    loss = dig(cfg, "criterion", "loss")
    if isinstance(loss, str):
        return not loss.startswith("ce")
    flag = dig(cfg, "task", "multi_label")
    if isinstance(flag, bool):
        return flag
    return True


def _label_list(task_state: Mapping[str, Any], num_classes: int, path: str) -> list[str]:
    labels = task_state.get("labels") if isinstance(task_state, Mapping) else None
    if not labels:
        return [str(i) for i in range(num_classes)]
    pairs = sorted((int(index), str(label)) for label, index in dict(labels).items())
    if [i for i, _ in pairs] != list(range(num_classes)):
        raise ModelLoadError(f"{path}: the label map ({len(pairs)} labels) does not match the head's {num_classes} outputs")
    return [label for _, label in pairs]


def _load_strict(module: torch.nn.Module, state: Mapping[str, Tensor], path: str) -> None:
    """Give ``module`` (built on the ``meta`` device: no memory, no random initialisation) the tensors of
    ``state``, which must match its keys and shapes exactly, as private contiguous copies in the
    module's dtypes. Why: initialising the weights at random only to overwrite them, and reading the
    teacher, decoder and optimiser state a pre-training checkpoint also holds, made an EAT-base load
    take 1.3-2.9 s instead of 0.2 s (one thread, 2026-12-07). Copying (rather than keeping the
    memory-mapped tensors) leaves nothing tied to the file once the load returns: plain fairseq and
    ``cp`` rewrite a file such as ``checkpoint_last.pt`` in place. During the load itself the file must
    not shrink (the mapping would fault); this package's training replaces checkpoints by renaming
    (:mod:`eat_fairseq.fairseq_ext.checkpoint_io`), which never touches a file being read."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ModelLoadError(
            f"{path}: weights do not fit the model: missing {missing[:6]}, unexpected {unexpected[:6]}, "
            f"wrong shapes {wrong[:6]}"
        )
    copies = {
        k: state[k].detach().to(dtype=v.dtype, memory_format=torch.contiguous_format, copy=True) for k, v in own.items()
    }
    module.load_state_dict(copies, strict=True, assign=True)


def load_model(
    path: Union[str, "os.PathLike[str]"],
    device: Union[str, torch.device] = "cpu",
    trusted: bool = False,
    use_teacher: bool = False,
    batch_size: int = 8,
) -> "EATModelHandle":
    """Load an EAT checkpoint for inference (see the module docstring for what is accepted).

    Args:
        path: our fairseq checkpoint (pre-training or fine-tuned), a released EAT ``.pt``, the
            Hugging Face port's ``.safetensors``, or an ``.onnx`` file written by ``eat-export``
            (run by onnxruntime: :mod:`eat_fairseq.inference.onnx_backend`).
        device: where the model runs (features are computed there too); ``.onnx`` files run on the CPU.
        trusted: read the ``.pt`` with full unpickling (only for files you produced); the default
            restricted unpickler refuses files that ask to run code.
        use_teacher: pre-training checkpoints only: use the EMA teacher instead of the student.
        batch_size: windows per forward pass (see :attr:`EATModelHandle.batch_size`).

    Raises :class:`~eat_fairseq.checkpoints.load.CheckpointError` (or its subclass
    :class:`ModelLoadError`) naming the file when it cannot be read or used.
    """
    name = os.fspath(path)
    from eat_fairseq.inference.onnx_backend import is_onnx_path, load_onnx

    if is_onnx_path(name):
        if use_teacher:
            raise ModelLoadError(f"{name}: use_teacher does not apply to an .onnx file (choose the teacher at eat-export)")
        return load_onnx(name, device=device, batch_size=batch_size)
    ckpt = _read_checkpoint(name, trusted)
    cfg = ckpt["cfg"] if isinstance(ckpt["cfg"], Mapping) else {}
    cfg_model = cfg.get("model") if isinstance(cfg.get("model"), Mapping) else {}
    cfg_task = cfg.get("task") if isinstance(cfg.get("task"), Mapping) else {}
    state = {k: v for k, v in ckpt["model"].items() if isinstance(v, Tensor)}
    model_name = cfg_model.get("_name")
    if model_name in _CLASSIFIER_NAMES or (model_name not in _PRETRAIN_NAMES and "head.weight" in state):
        kind = "classifier"
    elif model_name in _PRETRAIN_NAMES or any(k.startswith(("teacher.", "decoder.")) for k in state):
        kind = "pretrained"
    elif any(k.startswith("encoder.") for k in state):
        kind = "encoder"
    else:
        raise ModelLoadError(f"{name}: not an EAT checkpoint (model {model_name!r}, keys {sorted(state)[:5]})")
    if use_teacher and kind != "pretrained":
        raise ModelLoadError(f"{name}: use_teacher needs a pre-training checkpoint, this one is a {kind}")

    prefix = "teacher." if use_teacher else "encoder."
    if not any(k.startswith(prefix) for k in state):
        raise ModelLoadError(f"{name}: no '{prefix}*' weights in the checkpoint")
    try:
        enc_cfg = _encoder_config(state, cfg_model, prefix)
    except (KeyError, ModelLoadError) as exc:
        raise ModelLoadError(f"{name}: {exc}") from exc
    feat_cfg = _feature_config(cfg_task, enc_cfg.num_mel_bins)

    labels: list[str] | None = None
    classifier: EATClassifier | None = None
    if kind == "classifier":
        if "head.weight" not in state:
            raise ModelLoadError(f"{name}: a fine-tuned checkpoint needs head.weight")
        num_classes = int(state["head.weight"].shape[0])
        pooling = str(cfg_model.get("pooling") or "cls")
        with torch.device("meta"):
            classifier = EATClassifier(enc_cfg, num_classes, pooling=pooling)
        _load_strict(classifier, {k: v for k, v in state.items() if k.split(".", 1)[0] in ("encoder", "fc_norm", "head")}, name)
        encoder = classifier.encoder
        labels = _label_list(ckpt.get("task_state") or {}, num_classes, name)
    else:
        with torch.device("meta"):
            encoder = EATEncoder(enc_cfg)
        _load_strict(encoder, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, name)
    module: torch.nn.Module = classifier if classifier is not None else encoder
    module.to(device).eval()
    return EATModelHandle(
        encoder=encoder,
        feature_cfg=feat_cfg,
        kind=kind,
        classifier=classifier,
        labels=labels,
        multi_label=_multi_label(cfg) if kind == "classifier" else None,
        batch_size=batch_size,
        source=name,
    )


class EATModelHandle(WindowGeometry):
    """A loaded EAT model plus its feature settings: :meth:`extract` embeddings, :meth:`predict` tags.

    Attributes:
        kind: ``"pretrained"`` (encoder of a pre-training checkpoint), ``"classifier"`` (fine-tuned,
            with head) or ``"encoder"`` (a bare encoder state).
        encoder: the :class:`~eat_fairseq.model.encoder.EATEncoder` (eval mode).
        classifier: the :class:`~eat_fairseq.model.classifier.EATClassifier` or None.
        feature_cfg: fbank settings from the checkpoint's task.
        labels: class labels in head order (fine-tuned models), else None.
        multi_label: sigmoid (True) or softmax (False) scores; None without a head.
        batch_size: windows (of ``window_frames`` frames) per forward pass; lower it to save memory.
    """

    def __init__(
        self,
        encoder: EATEncoder,
        feature_cfg: FeatureConfig,
        kind: str = "pretrained",
        classifier: EATClassifier | None = None,
        labels: list[str] | None = None,
        multi_label: bool | None = None,
        batch_size: int = 8,
        source: str = "<memory>",
    ) -> None:
        window = feature_cfg.target_length
        patch = encoder.cfg.patch_size
        if window is None or window <= 0 or window % patch:
            raise ModelLoadError(f"{source}: target_length {window} is not a positive multiple of the patch size {patch}")
        if window > patch * encoder.cfg.max_length:
            raise ModelLoadError(
                f"{source}: target_length {window} exceeds the position table ({encoder.cfg.max_length} time patches)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.encoder = encoder
        self.classifier = classifier
        self.feature_cfg = feature_cfg
        self.kind = kind
        self.labels = labels
        self.multi_label = multi_label
        self.batch_size = batch_size
        self.source = source

    def check_layer(self, layer: int | None) -> None:
        """Raise ``ValueError`` (with the accepted range) for a ``layer`` this model cannot give.

        The CLIs call it before reading any audio, so a bad ``--layer`` is one usage error, not
        one failure per clip.
        """
        depth = self.num_layers
        if layer is not None and not -depth <= layer < depth:
            raise ValueError(f"layer must be in [-{depth}, {depth - 1}], got {layer}")

    def __repr__(self) -> str:
        cfg = self.encoder.cfg
        head = f", {len(self.labels)} classes, {'multi' if self.multi_label else 'single'}-label" if self.labels else ""
        return (
            f"EATModelHandle({self.kind}, D={cfg.embed_dim}, depth={cfg.depth}, "
            f"window={self.window_frames} frames{head}, device={self.device})"
        )

    # -- geometry ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Device of the weights (follows ``handle.encoder.to(...)``)."""
        return self.encoder.cls_token.device

    @property
    def embed_dim(self) -> int:
        return self.encoder.cfg.embed_dim

    @property
    def num_layers(self) -> int:
        return self.encoder.cfg.depth

    @property
    def sample_rate(self) -> int:
        """Rate the model's fbank runs at; inputs at other rates are resampled to it."""
        return self.feature_cfg.sample_rate

    @property
    def window_frames(self) -> int:
        """fbank frames per encoder window (``cfg.task.target_length``)."""
        return int(self.feature_cfg.target_length)

    @property
    def patch_frames(self) -> int:
        """fbank frames per time patch (16)."""
        return self.encoder.cfg.patch_size

    @property
    def num_freq_patches(self) -> int:
        """Frequency patches per time patch W (8 for 128 mel bins)."""
        return self.encoder.cfg.grid_w

    # -- audio preparation ------------------------------------------------------------------------

    def prepare(self, audio: AudioInput, sample_rate: int | None = None, source: str | None = None) -> Tensor:
        """One clip -> mono float32 waveform (S,) at the model's rate, on the CPU.

        ``source`` names an array in error messages (eat-extract passes the file it read).

        Raises :class:`~eat_fairseq.data.audio.AudioError` for unreadable files and for clips
        shorter than one 25 ms frame, ``ValueError`` for arrays of the wrong shape.
        """
        if isinstance(audio, (str, os.PathLike)):
            wave, sr = load_audio(audio)
            name = os.fspath(audio)
        else:
            wave = torch.as_tensor(np.asarray(audio) if not isinstance(audio, Tensor) else audio).detach()
            sr = int(sample_rate) if sample_rate is not None else self.sample_rate
            name = source or "<array>"
            if wave.dim() not in (1, 2):
                raise ValueError(f"audio arrays must be (samples,) or (channels, samples), got shape {tuple(wave.shape)}")
            if wave.dim() == 2 and wave.shape[0] > wave.shape[1]:
                raise ValueError(
                    f"audio of shape {tuple(wave.shape)} looks like (samples, channels); "
                    "pass (channels, samples), e.g. wave.T, or a list of 1-D clips for a batch"
                )
            if not wave.is_floating_point():
                # integer PCM (e.g. int16 from a WAV reader) -> [-1, 1), as soundfile would return it
                scale = float(2 ** (torch.iinfo(wave.dtype).bits - 1)) if wave.dtype != torch.bool else 1.0
                wave = wave.double() / scale
            wave = wave.cpu().float()
            if wave.numel() == 0:
                raise AudioError("audio array contains no samples")
            if not bool(torch.isfinite(wave).all()):
                raise AudioError("audio array contains NaN or infinite samples")
        mono = to_mono_16k(wave, sr, self.sample_rate)
        if num_frames(mono.shape[-1], self.sample_rate) == 0:
            raise AudioError(f"{name}: audio is shorter than one 25 ms frame ({mono.shape[-1]} samples)")
        return mono

    def _prepare_all(self, audio: Any, sample_rate: int | None) -> tuple[list[Tensor], bool]:
        if isinstance(audio, (list, tuple)):
            return [self.prepare(a, sample_rate) for a in audio], False
        return [self.prepare(audio, sample_rate)], True

    # -- core pipeline ----------------------------------------------------------------------------

    def _fbank(self, waves: list[Tensor]) -> list[Tensor]:
        """Un-padded, un-normalised fbank (T_i, F) per clip, computed on the model's device.

        Equal-length clips (a HEAR batch) go through one batched call.
        """
        cfg = self.feature_cfg
        device = self.device
        if len({w.shape[-1] for w in waves}) == 1:
            return list(fbank_of(torch.stack(waves).to(device), cfg.sample_rate, cfg).unbind(0))
        return [fbank_of(w.to(device), cfg.sample_rate, cfg) for w in waves]

    def _windows(self, fbanks: list[Tensor]) -> tuple[Tensor, list[list[int]]]:
        """Cut each fbank into windows; returns ``(windows (N, L, F) normalised, valid frames per window per clip)``."""
        pieces, valid = zip(*(split_windows(fb, self.feature_cfg) for fb in fbanks))
        return torch.cat(pieces), list(valid)

    def windows(self, waves: list[Tensor]) -> tuple[Tensor, list[list[int]]]:
        """Mono waveforms at the model rate -> the encoder's input: ``(windows (N, L, F) normalised, real
        frames per window per clip)``, as :meth:`extract` computes it (for timing or checking the
        encoder alone, e.g. ``eat-export``'s accuracy check)."""
        with torch.no_grad():
            return self._windows(self._fbank(waves))

    def _run(self, windows: Tensor, layer: int | None, want_patches: bool, want_logits: bool) -> dict[str, Tensor]:
        """Encoder over windows in batches; per window: ``cls`` (N, D), ``frame`` (N, H, D),
        optional ``patches`` (N, H, W, D) and ``logits`` (N, C). Only what is asked for is kept."""
        w = self.num_freq_patches
        out: dict[str, list[Tensor]] = {"cls": [], "frame": [], "patches": [], "logits": []}
        for start in range(0, windows.shape[0], self.batch_size):
            chunk = windows[start : start + self.batch_size]
            if want_logits:
                assert self.classifier is not None
                out["logits"].append(self.classifier(chunk).float())
                continue
            x = self.encoder.extract_features(chunk, layer=layer).float()  # (n, 1+P, D)
            n, _, d = x.shape
            grid = x[:, 1:].reshape(n, -1, w, d)  # (n, H, W, D), time-major tokens
            out["cls"].append(x[:, 0])
            out["frame"].append(grid.mean(dim=2))
            if want_patches:
                out["patches"].append(grid)
        return {k: torch.cat(v) for k, v in out.items() if v}

    def embed_waveforms(
        self, waves: list[Tensor], layer: int | None = None, patches: bool = False
    ) -> list[dict[str, Tensor]]:
        """Mono waveforms at the model rate -> per clip ``{"utterance" (D,), "frame" (H, D)[, "patches" (H, W, D)]}``.

        The tensor-level workhorse of :meth:`extract` (and the HEAR module); results stay on the
        model's device as float32 tensors.
        """
        with torch.no_grad():
            windows, valid = self._windows(self._fbank(waves))
            res = self._run(windows, layer, patches, want_logits=False)
        results: list[dict[str, Tensor]] = []
        start = 0
        for counts in valid:
            stop = start + len(counts)
            weights = torch.tensor(counts, dtype=torch.float32, device=res["cls"].device)
            utterance = (res["cls"][start:stop] * weights[:, None]).sum(0) / weights.sum()
            keep = [-(-c // self.patch_frames) for c in counts]  # time patches with real frames
            item = {
                "utterance": utterance,
                "frame": torch.cat([res["frame"][start + k, :h] for k, h in enumerate(keep)]),
            }
            if patches:
                item["patches"] = torch.cat([res["patches"][start + k, :h] for k, h in enumerate(keep)])
            results.append(item)
            start = stop
        return results

    # -- public API -------------------------------------------------------------------------------

    def extract(
        self,
        audio: Any,
        sample_rate: int | None = None,
        granularity: str = "utterance",
        layer: int | None = None,
    ) -> Any:
        """Embeddings of one clip (or a list of clips: a list of results).

        Args:
            audio: a path, a ``(samples,)`` or ``(channels, samples)`` array/tensor, or a list of those
                (module docstring).
            sample_rate: rate of array inputs (default the model's, 16 kHz); ignored for paths.
            granularity: ``"utterance"`` -> ``(D,)``; ``"frame"`` -> ``(H, D)`` (one row per 160 ms
                time patch, mean over frequency patches); ``"all"`` -> dict with ``utterance``,
                ``frame``, ``patches`` ``(H, W, D)`` and ``timestamps`` ``(H,)`` seconds.
            layer: transformer block whose output is used (0-based, negative from the end; default
                the last). Only the blocks up to it run.

        Returns float32 numpy arrays.
        """
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        waves, single = self._prepare_all(audio, sample_rate)
        if not waves:
            return []
        items = self.embed_waveforms(waves, layer=layer, patches=granularity == "all")
        results: list[Any] = []
        for wave, item in zip(waves, items):
            arrays = {k: v.cpu().numpy() for k, v in item.items()}
            if granularity == "all":
                arrays["timestamps"] = self.timestamps(arrays["frame"].shape[0], num_samples=wave.shape[-1])
                results.append(arrays)
            else:
                results.append(arrays[granularity])
        return results[0] if single else results

    def predict_scores(self, audio: Any, sample_rate: int | None = None, aggregate: str = "mean") -> Any:
        """Class scores ``(C,)`` (float32 numpy) of one clip, or a list of them for a list input.

        Sigmoid (multi-label) or softmax (single-label) per window, combined over windows by
        ``aggregate`` (``"mean"`` weighted by real frames, or ``"max"``).
        """
        if self.classifier is None or self.labels is None:
            raise ValueError(
                f"{self.source} is a {self.kind} checkpoint without a classification head; "
                "tagging needs a fine-tuned checkpoint (use extract() for embeddings)"
            )
        if aggregate not in _AGGREGATES:
            raise ValueError(f"aggregate must be one of {_AGGREGATES}, got {aggregate!r}")
        waves, single = self._prepare_all(audio, sample_rate)
        if not waves:
            return []
        with torch.no_grad():
            windows, valid = self._windows(self._fbank(waves))
            logits = self._run(windows, None, False, want_logits=True)["logits"]
            probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        results: list[np.ndarray] = []
        start = 0
        for counts in valid:
            window_probs = probs[start : start + len(counts)]
            if aggregate == "max":
                scores = window_probs.max(dim=0).values
            else:
                weights = torch.tensor(counts, dtype=torch.float32, device=probs.device)
                scores = (window_probs * weights[:, None]).sum(0) / weights.sum()
            results.append(scores.cpu().numpy())
            start += len(counts)
        return results[0] if single else results

    def predict(
        self, audio: Any, sample_rate: int | None = None, top_k: int | None = 5, aggregate: str = "mean"
    ) -> Any:
        """Top-``k`` ``(label, score)`` pairs, highest score first (a list of such lists for a list input).

        ``top_k=None`` ranks every class. Labels are the checkpoint's label strings
        (``task_state["labels"]``; class indices as strings when it has none). Raises ``ValueError``
        for checkpoints without a head.
        """
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        scores = self.predict_scores(audio, sample_rate, aggregate)
        single = not isinstance(scores, list)
        ranked = []
        for row in [scores] if single else scores:
            order = np.argsort(-row, kind="stable")[:top_k]
            ranked.append([(self.labels[i], float(row[i])) for i in order])  # type: ignore[index]
        return ranked[0] if single else ranked

