"""Frames -> model-size JPEG bytes, done once at conversion so loading never resizes (docs/method.md §4).

Every frame is decoded (if stored encoded), converted to RGB, resized to the embodiment's
``image_size`` with PIL's bilinear filter (which widens its support when shrinking, i.e. it averages
like an area filter instead of aliasing) and encoded as JPEG quality 95. A frame that already has
the target size is not resampled.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..errors import DataError
from .episode import FrameSource

JPEG_QUALITY = 95
#: Frames read from the source per block: bounds memory to a block of raw frames per camera.
BLOCK = 32


def to_pil(frame: np.ndarray | bytes, size_hw: tuple[int, int], where: str, swap_rb: bool = False,
           float_max: float = 1.0) -> Image.Image:
    """One frame as an RGB PIL image of ``size_hw = (H, W)``.

    Args:
        frame: ``(H, W, 3)`` uint8 (or float in [0, float_max], checked) array, or encoded image bytes.
        size_hw: target ``(H, W)`` in pixels.
        where: message prefix naming file, episode and key.
        swap_rb: the source is BGR (e.g. frames encoded by OpenCV from RGB arrays): swap red and blue.
        float_max: white of a floating-point frame (1.0; 255.0 for sources that store 0..255 as float).

    Raises:
        DataError: undecodable bytes, or an array refused by :func:`frame_to_uint8`.
    """
    h, w = size_hw
    if isinstance(frame, bytes):
        try:
            img = Image.open(io.BytesIO(frame))
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when we shrink a lot: much less work, and
            # the bilinear resize below still runs from a frame at least as large as the target.
            img.draft("RGB", (w, h))
            img = img.convert("RGB")
        except Exception as err:  # PIL raises several types for corrupt data
            raise DataError(f"{where}: cannot decode image bytes ({type(err).__name__}: {err})") from None
    else:
        img = Image.fromarray(np.ascontiguousarray(frame_to_uint8(frame, where, float_max)))
    if swap_rb:
        r, g, b = img.split()
        img = Image.merge("RGB", (b, g, r))
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    return img


def frame_to_uint8(frame: np.ndarray, where: str, float_max: float = 1.0) -> np.ndarray:
    """An ``(H, W, 3)`` RGB frame as uint8 0..255, refusing anything that would be silently wrong.

    uint8 passes unchanged. Floating-point frames must lie in [0, float_max] (checked: a float frame in
    0..255 read as [0, 1] would saturate to white, and NaN would become black) and are scaled by
    ``255 / float_max``. Some sources store 0..255 as float (Diffusion Policy's Push-T Zarr): they need
    ``float_max=255`` (``cosmos-policy convert --float_image_max 255``), stated, never guessed.
    Every other dtype (uint16, int64, bool, ...) is refused: its range has no single meaning.

    Args:
        frame: the array, ``H, W >= 1``.
        where: message prefix naming file, episode and key (or the camera at inference).
        float_max: the value of white in a floating-point frame (> 0; default 1.0).

    Returns:
        uint8 ``(H, W, 3)``.

    Raises:
        DataError: one line naming ``where``, the dtype and the observed range (or the shape).
    """
    arr = np.asarray(frame)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DataError(f"{where}: expected an (H, W, 3) RGB image with H, W >= 1, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        nan = int(np.isnan(arr).sum())
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (float("nan"), float("nan"))
        if nan or finite.size < arr.size or lo < 0.0 or hi > float_max:
            extra = f", {nan} NaN" if nan else ""
            extra += f", {arr.size - finite.size - nan} inf" if finite.size + nan < arr.size else ""
            hint = (" (looks like 0..255: pass uint8, or convert with --float_image_max 255)"
                    if float_max == 1.0 and 1.0 < hi <= 255.0 and lo >= 0.0 else "")
            raise DataError(f"{where}: float image values must be in [0, {float_max:g}], observed range "
                            f"[{lo:.6g}, {hi:.6g}]"
                            f"{extra} ({arr.dtype}){hint}")
        return (arr.astype(np.float32) * np.float32(255.0 / float_max) + 0.5).clip(0, 255).astype(np.uint8)
    finite = arr.astype(np.float64) if arr.dtype.kind in "biu" else None
    rng = f", observed range [{finite.min():.6g}, {finite.max():.6g}]" if finite is not None else ""
    raise DataError(f"{where}: image dtype {arr.dtype} is not accepted{rng}; pass uint8 0..255 or float in [0, 1]")


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB PIL image."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_frames(frames: FrameSource, size_hw: tuple[int, int], quality: int = JPEG_QUALITY,
                  swap_rb: bool = False, float_max: float = 1.0) -> list[bytes]:
    """All frames of one camera as model-size JPEG bytes, read in blocks of about ``BLOCK`` frames
    aligned to the storage chunks (``FrameSource.blocks``), so no compressed chunk is decoded twice.

    Returns:
        ``T`` JPEG byte strings, each ``size_hw`` pixels.

    Raises:
        DataError: a frame cannot be read or decoded (message names file, episode, key).
    """
    out: list[bytes] = []
    for start, stop in frames.blocks(BLOCK):
        try:
            block = frames.read(start, stop)
        except DataError:
            raise
        except Exception as err:  # h5py / zarr / codec errors on a corrupt chunk
            raise DataError(f"{frames.where}: cannot read frames {start}..{stop - 1} "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        for frame in block:
            out.append(encode_jpeg(to_pil(frame, size_hw, frames.where, swap_rb, float_max), quality))
    return out
