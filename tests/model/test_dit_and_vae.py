"""The diffusers DiT and VAE behind the model (docs/method.md §1, §2, §6): configurations, weight loading and
input-channel adaptation, the 18-channel input, per-frame time, text masking, the frozen VAE."""

from pathlib import Path

import pytest
import torch

from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.model.dit import (
    DIT_IN_CHANNELS,
    TRANSFORMER_CONFIGS,
    VideoDiT,
    build_transformer,
    reset_parameters_,
    transformer_config,
)
from cosmos_policy_lightning.model.vae import VideoVAE

diffusers = pytest.importorskip("diffusers")


def _inputs(batch=2, frames=5, size=4, text_len=6, dim=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, size, size, generator=g)
    t = torch.rand(batch, frames, generator=g)
    cond = torch.zeros(batch, frames, dtype=torch.bool)
    cond[:, :2] = True
    t = torch.where(cond, torch.zeros_like(t), t)
    text = torch.randn(batch, text_len, dim, generator=g)
    return x, t, cond, text


def _tiny_kwargs(**overrides):
    kwargs = transformer_config("tiny")
    kwargs.update(overrides)
    return kwargs


# ------------------------------------------------------------------------------------ configuration


def test_2b_config_on_meta_has_1_96_billion_parameters():
    model = build_transformer("cosmos-predict2-2b", device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert next(model.parameters()).device.type == "meta"
    assert n == pytest.approx(1.96e9, rel=0.02)
    cfg = model.config
    assert (cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_layers, cfg.in_channels) == (2048, 28, 18)
    assert tuple(cfg.rope_scale) == (1.0, 3.0, 3.0) and cfg.concat_padding_mask is False
    # the torch.device context works too, through VideoDiT
    with torch.device("meta"):
        dit = VideoDiT("cosmos-predict2-2b")
    assert len(dit.blocks) == 28 and dit.text_embed_dim == 1024


def test_config_resolution_and_errors():
    cfg = transformer_config({"base": "tiny", "num_layers": 3}, text_embed_dim=16)
    assert cfg["num_layers"] == 3 and cfg["text_embed_dim"] == 16 and cfg["in_channels"] == DIT_IN_CHANNELS
    assert transformer_config("tiny") == TRANSFORMER_CONFIGS["tiny"]
    with pytest.raises(CosmosPolicyError, match="unknown name"):
        transformer_config("huge")
    with pytest.raises(CosmosPolicyError, match="unknown key"):
        transformer_config({"num_layer": 3})
    with pytest.raises(CosmosPolicyError, match="in_channels"):
        transformer_config({"in_channels": 17})
    with pytest.raises(CosmosPolicyError, match="no default pretrained"):
        build_transformer("tiny", pretrained=True)


def test_meta_build_then_materialise_and_reset():
    model = build_transformer("tiny", device="meta")
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    reset_parameters_(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.transformer_blocks[0].attn1.norm_q.weight, torch.ones(32))
    x, t, cond, text = _inputs()
    assert torch.isfinite(VideoDiT(transformer=model)(x, t, cond, text)).all()


# ------------------------------------------------------------------------------------ pretrained


def test_load_released_layout_17_channels_plus_padding(tmp_path):
    # The released Video2World checkpoint: in_channels=17 (latent + condition mask), padding mask
    # concatenated inside: patch-embed columns already match our 18-channel layout.
    torch.manual_seed(0)
    src = diffusers.CosmosTransformer3DModel(**_tiny_kwargs(in_channels=17, concat_padding_mask=True))
    src.save_pretrained(tmp_path / "ckpt" / "transformer")
    loaded = build_transformer("tiny", pretrained=str(tmp_path / "ckpt"))  # finds the transformer/ subfolder
    assert loaded.config.in_channels == 18 and loaded.config.concat_padding_mask is False
    src_sd, new_sd = src.state_dict(), loaded.state_dict()
    assert src_sd.keys() == new_sd.keys()
    assert all(torch.equal(src_sd[k], new_sd[k]) for k in src_sd)
    # the adapted model round-trips through save_pretrained unchanged
    loaded.save_pretrained(tmp_path / "again")
    again = build_transformer("tiny", pretrained=str(tmp_path / "again"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in new_sd.items())


def test_load_16_channel_checkpoint_keeps_its_function(tmp_path):
    torch.manual_seed(1)
    src = diffusers.CosmosTransformer3DModel(**_tiny_kwargs(in_channels=16, concat_padding_mask=False))
    src.save_pretrained(tmp_path)
    dit = VideoDiT("tiny", pretrained=str(tmp_path))
    w = dit.transformer.patch_embed.proj.weight
    assert w.shape[1] == DIT_IN_CHANNELS * 4
    assert torch.equal(w[:, :64], src.patch_embed.proj.weight) and not w[:, 64:].any()
    # new channels are zero-initialised: whatever the condition mask, the output is the source model's
    x, t, cond, text = _inputs()
    with torch.no_grad():
        expected = src(hidden_states=x, timestep=t.view(2, 1, 5, 1, 1), encoder_hidden_states=text,
                       return_dict=False)[0]
        torch.testing.assert_close(dit(x, t, cond, text), expected)
        torch.testing.assert_close(dit(x, t, ~cond, text), expected)


def test_load_16_channels_with_padding_maps_padding_columns(tmp_path):
    torch.manual_seed(2)
    src = diffusers.CosmosTransformer3DModel(**_tiny_kwargs(in_channels=16, concat_padding_mask=True))
    src.save_pretrained(tmp_path)
    w = build_transformer("tiny", pretrained=str(tmp_path)).patch_embed.proj.weight
    sw = src.patch_embed.proj.weight  # 17 channels x 4 columns: latent 0..15, padding 16
    assert torch.equal(w[:, :64], sw[:, :64])
    assert not w[:, 64:68].any()  # condition mask: new, zero
    assert torch.equal(w[:, 68:72], sw[:, 64:68])  # padding mask keeps its weights


def test_load_errors(tmp_path):
    diffusers.CosmosTransformer3DModel(**_tiny_kwargs()).save_pretrained(tmp_path)
    with pytest.raises(CosmosPolicyError, match="num_layers"):
        build_transformer({"num_layers": 3}, pretrained=str(tmp_path))
    with pytest.raises(CosmosPolicyError, match="text_embed_dim"):
        build_transformer("tiny", text_embed_dim=1024, pretrained=str(tmp_path))
    with pytest.raises(CosmosPolicyError, match="cannot load"):
        build_transformer("tiny", pretrained=str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------- VideoDiT


def test_dit_builds_18_channels_and_per_frame_time():
    torch.manual_seed(0)
    dit = VideoDiT("tiny")
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)

    handle = dit.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    x, t, cond, text = _inputs()
    out = dit(x, t, cond, text)
    handle.remove()
    assert out.shape == x.shape and out.dtype == x.dtype
    hidden = seen["hidden_states"]
    assert hidden.shape == (2, DIT_IN_CHANNELS, 5, 4, 4)
    assert torch.equal(hidden[:, :16], x)
    assert torch.equal(hidden[:, 16], cond.float()[:, :, None, None].expand(2, 5, 4, 4))
    assert not hidden[:, 17].any()
    assert seen["timestep"].shape == (2, 1, 5, 1, 1)
    assert torch.equal(seen["timestep"].view(2, 5), t)
    # the condition-mask channel and the time reach the network
    with torch.no_grad():
        assert not torch.allclose(dit(x, t, ~cond, text), out)
        t2 = t.clone()
        t2[:, 3] = 0.9
        assert not torch.allclose(dit(x, t2, cond, text), out)


def test_dit_text_mask():
    torch.manual_seed(0)
    dit = VideoDiT("tiny")
    x, t, cond, text = _inputs()
    mask = torch.tensor([[True, True, True, False, False, False], [True] * 6])
    with torch.no_grad():
        out = dit(x, t, cond, text, mask)
        noisy = text.clone()
        noisy[0, 3:] = 100.0  # masked tokens
        assert torch.equal(dit(x, t, cond, noisy, mask), out)
        assert not torch.allclose(dit(x, t, cond, noisy, None), out)
        # no text at all: None, zero tokens, or an all-False mask give the same finite answer
        none = dit(x, t, cond, None)
        assert torch.isfinite(none).all()
        torch.testing.assert_close(dit(x, t, cond, text[:, :0]), none)
        torch.testing.assert_close(dit(x, t, cond, text, torch.zeros(2, 6, dtype=torch.bool)), none)
        assert not torch.allclose(none, out)


def test_dit_shape_errors():
    dit = VideoDiT("tiny")
    x, t, cond, text = _inputs()
    with pytest.raises(CosmosPolicyError, match="condition_mask"):
        dit(x, t, cond[:, :3], text)
    with pytest.raises(CosmosPolicyError, match="text"):
        dit(x, t, cond, text[..., :100])
    with pytest.raises(CosmosPolicyError, match="patch"):
        dit(x[..., :3], t, cond, text)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    dit = VideoDiT("tiny")
    x, t, cond, text = _inputs()
    dit(x, t, cond, text).square().mean().backward()
    reference = [p.grad.clone() for p in dit.parameters()]
    dit.zero_grad()
    dit.enable_activation_checkpointing()
    assert dit.transformer.gradient_checkpointing
    dit(x, t, cond, text).square().mean().backward()
    for ref, p in zip(reference, dit.parameters()):
        torch.testing.assert_close(p.grad, ref)
    assert len(dit.blocks) == 2 and isinstance(dit.blocks, torch.nn.ModuleList)


def test_bf16_weights_take_float32_inputs():
    dit = VideoDiT("tiny", torch_dtype=torch.bfloat16)
    x, t, cond, text = _inputs()
    with torch.no_grad():
        out = dit(x, t, cond, text)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------- VideoVAE

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True],
                latents_mean=[0.1 * i - 0.8 for i in range(16)], latents_std=[1.0 + 0.1 * i for i in range(16)])


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return VideoVAE(TINY_VAE)


def _pixels(frames=9, size=32, seed=0):
    return torch.rand(2, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vae_is_frozen_and_stays_in_eval(tiny_vae):
    assert not any(p.requires_grad for p in tiny_vae.parameters())
    tiny_vae.train()
    assert not tiny_vae.training and not tiny_vae.vae.training
    assert (tiny_vae.temporal_compression, tiny_vae.spatial_compression, tiny_vae.z_dim) == (4, 8, 16)
    assert tiny_vae.latent_shape(33, 224, 224) == (16, 9, 28, 28)


def test_vae_encode_normalises_the_posterior_mean(tiny_vae):
    pixels = _pixels()
    z = tiny_vae.encode(pixels)
    assert z.shape == (2, 16, 3, 4, 4) and z.dtype == torch.float32 and not z.requires_grad
    with torch.no_grad():
        mu = tiny_vae.vae.encode(pixels).latent_dist.mode()
    mean = torch.tensor(TINY_VAE["latents_mean"]).view(1, 16, 1, 1, 1)
    std = torch.tensor(TINY_VAE["latents_std"]).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(z, (mu - mean) / std)
    # decode undoes the normalisation before the VAE decoder
    with torch.no_grad():
        expected = tiny_vae.vae.decode(mu).sample
    out = tiny_vae.decode(z)
    assert out.shape == pixels.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert out.min() >= -1 and out.max() <= 1


def test_vae_is_causal_so_the_sequence_is_encoded_in_one_call(tiny_vae):
    pixels = _pixels()
    z = tiny_vae.encode(pixels)
    # a prefix of 1 + 4k frames gives the same first latents ...
    torch.testing.assert_close(tiny_vae.encode(pixels[:, :, :5]), z[:, :, :2])
    # ... but a group encoded without its past does not (docs/method.md §1)
    alone = tiny_vae.encode(pixels[:, :, 4:9])[:, :, 1]
    assert not torch.allclose(alone, z[:, :, 2], atol=1e-3)


def test_vae_shape_errors(tiny_vae):
    with pytest.raises(CosmosPolicyError, match="1 \\+ 4k"):
        tiny_vae.encode(_pixels(frames=8))
    with pytest.raises(CosmosPolicyError, match="latents"):
        tiny_vae.decode(torch.zeros(1, 4, 2, 4, 4))


def test_vae_loads_from_a_saved_directory(tmp_path, tiny_vae):
    tiny_vae.vae.save_pretrained(tmp_path / "model" / "vae")
    tiny_vae.vae.save_pretrained(tmp_path / "flat")
    pixels = _pixels(frames=5, seed=1)
    z = tiny_vae.encode(pixels)
    for path in (tmp_path / "model", tmp_path / "flat"):
        loaded = VideoVAE(str(path))
        assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
        torch.testing.assert_close(loaded.encode(pixels), z)
    with pytest.raises(CosmosPolicyError, match="cannot load"):
        VideoVAE(str(tmp_path / "missing"))


def test_bundled_tiny_vae_loads_by_path(repo: Path):
    path = repo / "assets" / "tiny_wan_vae"
    # a committed asset: missing means a broken checkout, which must fail, not skip
    assert (path / "config.json").is_file(), f"{path} is committed but missing"
    vae = VideoVAE(str(path))
    pixels = _pixels(frames=5, size=4 * vae.spatial_compression)
    z = vae.encode(pixels)
    assert z.shape == (2, vae.z_dim, *vae.latent_shape(5, pixels.shape[3], pixels.shape[4])[1:])
    assert torch.isfinite(vae.decode(z)).all()
