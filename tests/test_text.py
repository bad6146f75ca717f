"""Text encoders (MiniLM from its wheel, T5 through transformers) and the per-instruction cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.text import (
    INDEX_FILE,
    TextEmbeddingCache,
    build_text_encoder,
    instruction_file,
)


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm")


def test_minilm_per_token_embeddings(minilm):
    assert minilm.identity == "minilm:all-MiniLM-L6-v2" and minilm.dim == 384
    short, long, again = minilm.encode(["open the drawer", "push the puck to the goal and then stop", "open the drawer"])
    # [CLS] open the drawer [SEP] = 5 real tokens; no padding rows even though batched with a longer text.
    assert short.shape == (5, 384) and short.dtype == np.float32
    assert long.shape[0] > short.shape[0]
    assert np.isfinite(long).all() and np.abs(short).max() > 0.1
    np.testing.assert_allclose(short, again, atol=1e-5)
    # Tokens are contextual: different instructions give different first-token (CLS) states.
    assert np.abs(short[0] - long[0]).max() > 1e-3


def test_tiny_t5_from_local_directory(tmp_path, minilm):
    from transformers import T5Config, T5EncoderModel

    # A randomly initialised small T5 encoder saved like a hub checkpoint, with a borrowed tokenizer.
    tok = minilm.tokenizer
    cfg = T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, num_heads=4, num_layers=2,
                   num_decoder_layers=0, d_ff=64)
    T5EncoderModel(cfg).save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    enc = build_text_encoder(f"t5:{tmp_path / 't5'}")
    assert enc.identity == f"t5:{tmp_path / 't5'}" and enc.dim == 32
    a, b = enc.encode(["reach the goal", "press the button from the top now"])
    assert a.shape == (len(tok("reach the goal")["input_ids"]), 32)
    assert b.shape[0] > a.shape[0] and np.isfinite(b).all()


def test_bad_specs():
    for spec in ("bert", "t5:", "", "t5:/definitely/not/a/model/dir"):
        with pytest.raises(CosmosPolicyError):
            build_text_encoder(spec)
    none = build_text_encoder("none")
    assert none.identity == "none" and none.dim == 0 and none.encode(["x"])[0].shape == (0, 0)


def test_cache_roundtrip_skip_and_refuse(tmp_path, minilm):
    cache = TextEmbeddingCache(tmp_path / "text_embeddings")
    assert cache.identity is None and "open the drawer" not in cache
    added = cache.add(minilm, ["open the drawer", "reach the goal", "open the drawer"])
    assert added == ["open the drawer", "reach the goal"]
    index = json.loads((tmp_path / "text_embeddings" / INDEX_FILE).read_text())
    assert index["encoder"] == minilm.identity and index["dim"] == 384
    assert index["entries"]["open the drawer"] == {"file": instruction_file("open the drawer"), "tokens": 5}
    stored = np.load(tmp_path / "text_embeddings" / instruction_file("open the drawer"))
    assert stored.dtype == np.float16 and stored.shape == (5, 384)
    assert not list((tmp_path / "text_embeddings").glob("*.tmp"))

    # A fresh handle on the same directory sees the entries; cached ones are not re-encoded.
    again = TextEmbeddingCache(tmp_path / "text_embeddings")
    assert "reach the goal" in again and again.identity == minilm.identity and again.dim == 384
    assert again.add(minilm, ["reach the goal"]) == []
    emb = again.get("open the drawer")
    assert emb.dtype == np.float32 and emb.shape == (5, 384)
    np.testing.assert_allclose(emb, minilm.encode(["open the drawer"])[0], atol=2e-3)

    with pytest.raises(CosmosPolicyError, match="press the button"):
        again.get("press the button")
    with pytest.raises(CosmosPolicyError, match="refusing"):
        again.add(build_text_encoder("none"), ["press the button"])


def test_cache_rejects_malformed_index(tmp_path):
    (tmp_path / INDEX_FILE).write_text('{"encoder": 3}')
    with pytest.raises(CosmosPolicyError, match="index.json"):
        TextEmbeddingCache(tmp_path)


def test_an_unknown_instruction_without_its_encoder_is_refused_naming_the_known_ones(tmp_path):
    import numpy as np

    from cosmos_policy_lightning.errors import CosmosPolicyError
    from cosmos_policy_lightning.text import InstructionEmbeddings

    table = InstructionEmbeddings(8, identity=f"t5:{tmp_path / 'no-t5-here'}",
                                  precomputed={"open the drawer": np.ones((3, 4), np.float32)})
    assert tuple(table.get("open the drawer").shape) == (3, 4)  # known: no encoder loaded
    import pytest

    with pytest.raises(CosmosPolicyError) as info:
        table.get("close the drawer")
    message = str(info.value)
    assert "\n" not in message and "'close the drawer' is not one the policy was trained on" in message
    assert "'open the drawer'" in message and "cannot be loaded here" in message
