"""Loading diffusers models (the DiT and the VAE) from a Hugging Face Hub id or a local folder.

diffusers is imported lazily (it takes seconds to import and most commands never need it), and a model
that cannot be loaded is refused in one line naming the source.
"""

from __future__ import annotations

import os

from ..errors import CosmosPolicyError, first_line


def diffusers_module():
    # Imported lazily: diffusers takes seconds to import and most commands never need it.
    import diffusers

    return diffusers


def from_pretrained(model_cls, source: str, subfolder: str | None, default_subfolder: str, torch_dtype):
    """``model_cls.from_pretrained`` for a hub id or a local directory, failing in one line."""
    if subfolder is None:
        if os.path.isdir(source):
            has_own_config = os.path.isfile(os.path.join(source, "config.json"))
            if not has_own_config and os.path.isdir(os.path.join(source, default_subfolder)):
                subfolder = default_subfolder
        elif not os.path.exists(source):
            subfolder = default_subfolder  # a hub id: the diffusers pipeline layout
    try:
        return model_cls.from_pretrained(source, subfolder=subfolder, torch_dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError) as err:
        reason = first_line(err)
        where = f"{source}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise CosmosPolicyError(f"{where}: cannot load {model_cls.__name__} weights: {reason}") from err
