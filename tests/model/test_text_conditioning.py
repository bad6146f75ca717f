"""Text conditioning as the reference feeds it: T5 embeddings zero-padded to 512 tokens and attended to
without a mask (the pretrained and released weights were trained that way); masking stays the choice
for MiniLM and tiny models. The tensors are captured where they enter diffusers' transformer."""

import pytest
import torch
import yaml

from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.model.module import CosmosPolicyModule
from cosmos_policy_lightning.text import pad_text_tokens, uses_padded_text

from ..conftest import REPO
from ..fixtures.batch_factory import make_batch
from ..fixtures.checkpoint_factory import TINY_VAE, toy_record
from ..fixtures.shard_factory import TOY_EMBODIMENT as EMBODIMENT

T5 = "t5:google-t5/t5-11b"


class TransformerInputs:
    """Records ``encoder_hidden_states`` and ``attention_mask`` of every call of diffusers' transformer."""

    def __init__(self, transformer):
        self.calls = []
        self.handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append((kwargs["encoder_hidden_states"], kwargs.get("attention_mask")))

    def remove(self):
        self.handle.remove()


def _module(text_dim, identity, conditioning="auto"):
    torch.manual_seed(0)
    m = CosmosPolicyModule(embodiment=EMBODIMENT, text_dim=text_dim, vae=TINY_VAE, image_log_every_n_steps=0,
                           text_conditioning=conditioning, inference_record=toy_record(EMBODIMENT, identity))
    m.configure_model()
    return m


def _batch_with_padding(text_dim):
    batch = make_batch(b=3, text_len=7, text_dim=text_dim, seed=1)
    # sample 0: 7 real tokens; sample 1: 4 real tokens then 3 padding rows holding garbage; sample 2: 1 token
    batch["text_mask"][1, 4:] = False
    batch["text_mask"][2, 1:] = False
    return batch


def _text_inputs_of_a_training_step(module, batch) -> list:
    """(text, mask) as the diffusers transformer received them, per call, during one training step."""
    probe = TransformerInputs(module.dit.transformer)
    try:
        module.training_step(batch, 0)
    finally:
        probe.remove()
    return probe.calls


def test_t5_text_is_zero_padded_to_512_tokens_with_no_mask():
    module = _module(1024, T5)
    batch = _batch_with_padding(1024)
    calls = _text_inputs_of_a_training_step(module, batch)
    assert len(calls) == 1
    text, mask = calls[0]
    assert mask is None                                    # attends to all 512 tokens
    assert tuple(text.shape) == (3, 512, 1024)
    real = batch["text_mask"]
    for i, n in enumerate(real.sum(dim=1).tolist()):
        torch.testing.assert_close(text[i, :n], batch["text"][i, :n])  # the real tokens, first, unchanged
        assert torch.count_nonzero(text[i, n:]) == 0       # exactly zero after them (garbage rows too)


def test_minilm_text_keeps_its_mask_and_length():
    module = _module(384, "minilm:all-MiniLM-L6-v2")
    batch = _batch_with_padding(384)
    text, mask = _text_inputs_of_a_training_step(module, batch)[0]
    assert tuple(text.shape) == (3, 7, 384) and mask is not None
    assert torch.equal(mask, batch["text_mask"])


@pytest.mark.parametrize("conditioning, identity, padded", [
    ("masked", T5, False), ("padded", "minilm:all-MiniLM-L6-v2", True), ("auto", None, False),
    ("auto", "none", False), ("auto", T5, True)])
def test_conditioning_option_overrides_the_encoder_default(conditioning, identity, padded):
    assert uses_padded_text(conditioning, identity) is padded


def test_unknown_conditioning_is_refused_in_one_line():
    with pytest.raises(CosmosPolicyError, match="text_conditioning must be one of auto, padded, masked"):
        CosmosPolicyModule(embodiment=EMBODIMENT, vae=TINY_VAE, text_conditioning="sometimes")


def test_padding_changes_the_prediction():
    """The zero tokens are attended to (an attention sink): padded and masked T5 text give different
    outputs for the same weights, so feeding the released weights masked text would change them."""
    padded = _module(1024, T5, "padded")
    masked = _module(1024, T5, "masked")
    masked.dit.load_state_dict(padded.dit.state_dict())
    for m in (padded, masked):  # a non-zero cross-attention output projection (its init is random)
        assert torch.count_nonzero(m.dit.transformer.transformer_blocks[0].attn2.to_out[0].weight) > 0
    batch = _batch_with_padding(1024)
    x0 = padded.encode_batch(batch)
    cond = padded.cond_table[batch["objective"]]
    sigma = torch.full((3,), 5.0)
    outs = [m.denoise(x0, sigma, cond, x0, batch["text"], batch["text_mask"]) for m in (padded, masked)]
    assert not torch.allclose(outs[0], outs[1], atol=1e-5)


def test_pad_text_tokens_cuts_longer_inputs():
    text = torch.ones(2, 600, 8)
    assert tuple(pad_text_tokens(text, None, 512).shape) == (2, 512, 8)


def test_2b_recipe_feeds_512_tokens_on_the_meta_device():
    """The 2B LIBERO recipe's model (Cosmos-Predict2-2B config, 1024-d T5 text), run on the meta device:
    its transformer receives exactly 512 text tokens and no attention mask."""
    init = yaml.safe_load((REPO / "recipes" / "libero.yaml").read_text())["model"]["init_args"]
    emb = yaml.safe_load((REPO / "embodiments" / "libero.yaml").read_text())
    module = CosmosPolicyModule(embodiment=emb, text_dim=1024, transformer=init["transformer"], vae=TINY_VAE,
                                text_conditioning=init.get("text_conditioning", "auto"),
                                inference_record=toy_record(emb, T5))
    with torch.device("meta"):
        module.configure_model()
    probe = TransformerInputs(module.dit.transformer)
    t = module.layout.num_latent_frames
    x = torch.empty(2, 16, t, 28, 28, device="meta")
    cond = torch.zeros(2, t, dtype=torch.bool, device="meta")
    text = torch.empty(2, 13, 1024, device="meta")
    mask = torch.ones(2, 13, dtype=torch.bool, device="meta")
    try:
        out = module._network(cond, text, mask)(x, torch.empty(2, t, device="meta"))
    finally:
        probe.remove()
    assert tuple(out.shape) == (2, 16, t, 28, 28)
    text_in, mask_in = probe.calls[0]
    assert tuple(text_in.shape) == (2, 512, 1024) and mask_in is None
    assert init.get("text_conditioning", "auto") == "auto"  # the recipes keep the reference behaviour
