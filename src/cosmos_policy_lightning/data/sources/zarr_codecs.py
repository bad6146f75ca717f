"""Image codecs for Zarr stores (Diffusion Policy stores its images Jpeg2k-compressed, docs/method.md §4).

Zarr format 2 names a compressor by its numcodecs id (``imagecodecs_jpeg2k``): registering
imagecodecs' numcodecs codecs is enough. Zarr format 3 has no standard image codec; zarr-python
names foreign numcodecs codecs ``numcodecs.<id>``, so we register array-to-bytes wrappers under
``numcodecs.imagecodecs_<name>`` for the image codecs below, which reads (and writes) such stores.
"""

from __future__ import annotations

import warnings

IMAGE_CODECS = ("jpeg2k", "jpeg8", "jpegxl", "png", "webp", "avif", "jpegls", "jpegxr", "qoi")

_registered = False


def register_image_codecs() -> None:
    """Make imagecodecs' image codecs readable in Zarr v2 and v3 stores (idempotent)."""
    global _registered
    # Reading a v3 store that uses such a codec is the point here; zarr's portability warning is noise.
    warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")
    if _registered:
        return
    import imagecodecs.numcodecs as icn

    icn.register_codecs(verbose=False)
    try:
        from zarr.codecs.numcodecs import _NumcodecsArrayBytesCodec
        from zarr.registry import register_codec
    except ImportError:  # zarr < 3.1.3: v2 stores still work through numcodecs
        _registered = True
        return
    for name in IMAGE_CODECS:
        codec_id = f"imagecodecs_{name}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls = type(f"Imagecodecs{name.capitalize()}", (_NumcodecsArrayBytesCodec,), {},
                       codec_name=codec_id)
        register_codec(f"numcodecs.{codec_id}", cls)
    _registered = True


def v3_image_codec(name: str = "jpeg2k", **config):
    """A Zarr v3 array-to-bytes codec for ``imagecodecs_<name>`` (used to write test stores).

    Example: ``zarr.create_array(..., serializer=v3_image_codec("jpeg2k", level=50))``.
    """
    register_image_codecs()
    from zarr.registry import get_codec_class

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_codec_class(f"numcodecs.imagecodecs_{name}")(**config)
