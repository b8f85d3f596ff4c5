"""Manifest rows to waveforms: whole files, spans of long files, members of zip shards.

THE row reader: pre-training, fine-tuning and evaluation (:func:`read_row_window`), the online probe
and eat-probe, eat-extract and eat-tag (:func:`read_row`), validation (:func:`open_clip`) and every
audio file a user passes to the API or HEAR (:func:`eat_fairseq.data.audio.load_audio` is
:func:`read_row` of a file row) go through this module, so all three kinds of row
(:mod:`eat_fairseq.data.manifest`) are read the same way and fail with the same messages. Reads touch only the frames that are used: a clip of a 10-minute recording
costs what a 10-second file costs, because the file is opened, seeked and only the window decoded.

A shard member is read with one ``seek`` + ``read`` of its byte range (no zip directory lookup), so
any data-loader worker can read any row; files are opened per read, which keeps forked workers free
of shared file positions.
"""
from __future__ import annotations

import io
import os
import random
import struct
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import soundfile as sf

from eat_fairseq.data.errors import AudioError
from eat_fairseq.data.feature_settings import FeatureConfig, frame_geometry
from eat_fairseq.data.manifest import SHARD, SPAN, ManifestRow

if TYPE_CHECKING:
    import torch

__all__ = [
    "ClipSource",
    "open_clip",
    "read_row",
    "read_row_window",
    "window_frames",
    "choose_start",
    "CROP_MODES",
]

CROP_MODES = ("start", "random")

# A shard member up to this size is read with a single read() into memory; a larger one (a long
# recording packed whole) is decoded through a windowed file object so only the frames used are read.
_WHOLE_MEMBER_BYTES = 16 << 20
# Extra native-rate samples read beyond the crop window when resampling, so that the resampler's
# filter (about 0.4 ms at 16 kHz out) never sees the artificial end of the read window in a used sample.
_RESAMPLE_MARGIN_S = 0.002


class _ByteRange(io.RawIOBase):
    """Read-only file object over bytes ``[offset, offset + length)`` of an open binary file."""

    def __init__(self, handle: io.BufferedReader, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._offset, self._length, self._pos = handle, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(0, base + pos), self._length)
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._offset + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got or 0
        return got or 0


class ClipSource:
    """An open clip: ``frames`` (its length), ``samplerate`` and ``channels``, and :meth:`read`.

    Frame numbers are relative to the clip (a span's frame 0 is its first frame in the file).
    """

    def __init__(self, sound: sf.SoundFile, first: int, frames: int, row: ManifestRow, where: str) -> None:
        self._sound, self._first, self._row, self._where = sound, first, row, where
        self.frames = frames
        self.samplerate = int(sound.samplerate)
        self.channels = int(sound.channels)
        self.format, self.subtype = str(sound.format), str(sound.subtype)  # e.g. WAV, PCM_16

    def read(self, start: int = 0, count: int = -1, dtype: str = "float32") -> np.ndarray:
        """``count`` frames (all to the clip's end when -1) from ``start`` as (S, C) of ``dtype``
        (float32 for features; pack asks for the stored integer type to copy samples exactly)."""
        try:
            if self._first + start:
                self._sound.seek(self._first + start)
            if self._row.kind == SPAN:  # never past the span's end into the rest of the file
                count = self.frames - start if count < 0 else min(count, self.frames - start)
            return self._sound.read(count, dtype=dtype, always_2d=True)
        except Exception as exc:
            raise AudioError(f"cannot decode {self._row.describe()}{self._where}: {exc}") from exc


class _PcmClip(ClipSource):
    """A plain PCM-16 or float-32 WAV shard member, decoded with ``numpy`` from its bytes.

    Reading a member through libsndfile's virtual I/O costs more than the decoding itself; for the
    formats most corpora use, the samples are at a fixed byte offset, so a window is one slice (or
    one seek + read for a large member). The values equal libsndfile's bit for bit: int16 samples
    scaled by 2**-15 in float32, float32 samples as stored.
    """

    def __init__(self, fetch, layout: "_WavLayout", row: ManifestRow, where: str) -> None:
        self._fetch, self._layout, self._row, self._where = fetch, layout, row, where
        self.frames = layout.frames
        self.samplerate = layout.samplerate
        self.channels = layout.channels

    def read(self, start: int = 0, count: int = -1) -> np.ndarray:
        lay = self._layout
        start = min(max(start, 0), self.frames)
        count = self.frames - start if count < 0 else min(count, self.frames - start)
        step = lay.channels * lay.width
        raw = self._fetch(lay.data_offset + start * step, count * step)
        if len(raw) != count * step:
            raise AudioError(f"cannot decode {self._row.describe()}{self._where}: member data ends early")
        x = np.frombuffer(raw, dtype=lay.dtype).reshape(count, lay.channels)
        if lay.dtype == "<i2":
            return x.astype(np.float32) * np.float32(1.0 / 32768.0)
        return x.astype(np.float32)


class _WavLayout:
    """Where the samples of a plain WAV are: see :func:`_wav_layout`."""

    def __init__(self, channels: int, samplerate: int, dtype: str, data_offset: int, data_bytes: int) -> None:
        self.channels, self.samplerate, self.dtype = channels, samplerate, dtype
        self.width = np.dtype(dtype).itemsize
        self.data_offset, self.frames = data_offset, data_bytes // (channels * self.width)


_WAV_TAGS = {(1, 16): "<i2", (3, 32): "<f4"}  # (format tag, bits) -> sample dtype
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


def _wav_layout(head: bytes, member_bytes: int) -> Optional[_WavLayout]:
    """The sample layout of a RIFF/WAVE member holding PCM-16 or float-32 samples, from its first
    bytes; ``None`` for anything else (other encodings, odd headers, a data chunk that does not fit
    in the member), which then goes through libsndfile."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos + 8 <= len(head):
        cid, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        body = pos + 8
        if cid == b"fmt ":
            if size < 16 or body + size > len(head):
                return None
            tag, channels, samplerate, _, block_align, bits = struct.unpack_from("<HHIIHH", head, body)
            if tag == _WAVE_FORMAT_EXTENSIBLE:
                if size < 40:
                    return None
                tag = struct.unpack_from("<H", head, body + 24)[0]  # first two bytes of the sub-format GUID
            dtype = _WAV_TAGS.get((tag, bits))
            if dtype is None or channels <= 0 or samplerate <= 0 or block_align != channels * bits // 8:
                return None
            fmt = (channels, samplerate, dtype)
        elif cid == b"data":
            if fmt is None or body + size > member_bytes:
                return None
            return _WavLayout(*fmt, data_offset=body, data_bytes=size)
        pos = body + size + (size & 1)
    return None


_WAV_HEAD_BYTES = 4096


def _where(row: ManifestRow, manifest: Optional[str]) -> str:
    return f" (manifest {manifest}, line {row.line})" if manifest else ""


def _not_found(row: ManifestRow, manifest: Optional[str]) -> AudioError:
    what = "zip shard" if row.kind == SHARD else "audio file"
    return AudioError(f"{what} not found: {row.path}{_where(row, manifest)}")


@contextmanager
def open_clip(row: ManifestRow, manifest: Optional[str] = None) -> Iterator[ClipSource]:
    """Open the clip a manifest row addresses; errors are :class:`AudioError` naming the file
    (and the manifest and line when ``manifest`` is given). A missing file reads as "not found"."""
    where = _where(row, manifest)
    handle = None
    try:
        if row.kind == SHARD:
            try:
                handle = open(row.path, "rb")
            except FileNotFoundError:
                raise _not_found(row, manifest) from None
            except OSError as exc:
                raise AudioError(f"cannot open zip shard {row.path}{where}: {exc}") from exc
            handle.seek(row.offset)
            if row.length <= _WHOLE_MEMBER_BYTES:
                data = handle.read(row.length)
                if len(data) != row.length:
                    raise AudioError(
                        f"{row.describe()}{where}: the shard ends after {row.offset + len(data)} bytes "
                        "(truncated shard, or a row from another shard)"
                    )
                layout = _wav_layout(data[:_WAV_HEAD_BYTES], row.length)
                if layout is not None:
                    view = memoryview(data)
                    yield _PcmClip(lambda at, n: view[at:at + n], layout, row, where)
                    return
                target: object = io.BytesIO(data)
            else:
                if os.fstat(handle.fileno()).st_size < row.offset + row.length:
                    raise AudioError(f"{row.describe()}{where}: byte range past the end of the shard")
                ranged = _ByteRange(handle, row.offset, row.length)
                layout = _wav_layout(ranged.read(_WAV_HEAD_BYTES), row.length)
                if layout is not None:
                    def fetch(at: int, n: int) -> bytes:
                        ranged.seek(at)
                        return ranged.read(n)

                    yield _PcmClip(fetch, layout, row, where)
                    return
                ranged.seek(0)
                target = ranged
        else:
            target = row.path
        try:
            sound = sf.SoundFile(target)
        except Exception as exc:  # libsndfile reports a missing file as "System error"
            if row.kind != SHARD and not os.path.exists(row.path):
                raise _not_found(row, manifest) from None
            raise AudioError(f"cannot read audio {row.describe()}{where}: {exc}") from exc
        with sound:
            if sound.samplerate <= 0:
                raise AudioError(f"audio {row.describe()}{where} reports an invalid sample rate {sound.samplerate}")
            first, frames = 0, int(sound.frames)
            if row.kind == SPAN:
                if row.offset + row.length > frames:
                    raise AudioError(
                        f"span {row.describe()}{where} ends past the end of the file ({frames} frames)"
                    )
                first, frames = row.offset, row.length
            yield ClipSource(sound, first, frames, row, where)
    finally:
        if handle is not None:
            handle.close()


def _checked(data: np.ndarray, row: ManifestRow, where: str) -> np.ndarray:
    # Empty or NaN/inf audio would silently turn into NaN features and poison a whole batch.
    if data.size == 0:
        raise AudioError(f"audio {row.describe()}{where} contains no samples")
    if not np.isfinite(data).all():
        raise AudioError(f"audio {row.describe()}{where} contains NaN or infinite samples")
    return np.ascontiguousarray(data.T)


def _tensor(data: np.ndarray) -> "torch.Tensor":
    # torch is imported here, not at module level: the torch-free ONNX runner reads rows too.
    import torch

    return torch.from_numpy(data)


def read_row_array(row: ManifestRow, manifest: Optional[str] = None) -> tuple[np.ndarray, int]:
    """:func:`read_row` as a numpy array ``(C, S)`` float32: the same reader, without torch."""
    with open_clip(row, manifest) as clip:
        return _checked(clip.read(), row, _where(row, manifest)), clip.samplerate


def read_row(row: ManifestRow, manifest: Optional[str] = None) -> tuple["torch.Tensor", int]:
    """The whole clip of a row as ``(wave (C, S) float32, sample_rate)``, validated like
    :func:`eat_fairseq.data.audio.load_audio` (which it equals for a plain file row)."""
    data, samplerate = read_row_array(row, manifest)
    return _tensor(data), samplerate


def window_frames(samplerate: int, cfg: FeatureConfig) -> Optional[int]:
    """Native-rate frames that yield ``cfg.target_length`` fbank frames (None: no crop, read all).

    At the feature rate that is exactly ``window + (target_length - 1) * shift`` samples; at another
    rate the equivalent count plus 2 ms, so the resampled window still covers every used sample with
    the resampler's full filter support.
    """
    if cfg.target_length is None:
        return None
    window, shift, _ = frame_geometry(cfg.sample_rate)
    needed = window + (cfg.target_length - 1) * shift
    if samplerate == cfg.sample_rate:
        return needed
    native = -(-needed * samplerate // cfg.sample_rate)
    return native + int(np.ceil(_RESAMPLE_MARGIN_S * samplerate))


def choose_start(clip_frames: int, window: int, crop: str, seed: Optional[int] = None) -> int:
    """First frame of the crop window: 0 for ``crop="start"``; for ``"random"`` uniform over the
    valid starts, drawn from ``seed`` alone (so it is the same in any worker and after a resume)."""
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    if crop == "start" or clip_frames <= window:
        return 0
    if seed is None:
        raise ValueError("crop='random' needs a seed")
    return random.Random(seed).randrange(clip_frames - window + 1)


def read_row_window(
    row: ManifestRow,
    cfg: FeatureConfig,
    crop: str = "start",
    seed: Optional[int] = None,
    whole_file: bool = False,
    manifest: Optional[str] = None,
) -> tuple["torch.Tensor", int]:
    """Read only the frames the features of a row use: ``(wave (C, S) float32, sample_rate)``.

    A clip no longer than the window (``cfg.target_length`` fbank frames) is read whole, so its
    features are bit-identical to decoding the whole file. A longer clip is read from the crop start
    (:func:`choose_start`) for one window: its cost no longer grows with the clip. Features of such
    a clip differ from the whole-file computation only by float32 rounding, because the waveform's
    DC offset is then taken over the window instead of the whole file. ``whole_file=True`` decodes
    the whole clip (the release's behaviour) and crops nothing; ``crop="random"`` is then refused.
    """
    if crop == "random" and whole_file:
        raise ValueError("crop='random' reads a window; it cannot be combined with whole-file reads")
    where = _where(row, manifest)
    with open_clip(row, manifest) as clip:
        window = window_frames(clip.samplerate, cfg)
        if whole_file or window is None or clip.frames <= window:
            data = clip.read()
        else:
            start = choose_start(clip.frames, window, crop, seed)
            data = clip.read(start, window)
        return _tensor(_checked(data, row, where)), clip.samplerate
