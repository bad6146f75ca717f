"""The LightningModule's single training step, objective by objective (docs/method.md §2, §3)."""

import pytest
import torch

from cosmos_policy_lightning.layout import OBJECTIVES
from cosmos_policy_lightning.model.module import CosmosPolicyModule
from cosmos_policy_lightning.model.sequence import build_pixel_sequence, read_vectors
from cosmos_policy_lightning.model.schedule import lr_multiplier

from ..fixtures.batch_factory import make_batch
from ..fixtures.checkpoint_factory import TINY_VAE
from ..fixtures.shard_factory import TOY_EMBODIMENT as EMBODIMENT

@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    m = CosmosPolicyModule(embodiment=EMBODIMENT, vae=TINY_VAE, image_log_every_n_steps=0)
    m.configure_model()
    return m


def test_pixel_sequence_layout(module):
    batch = make_batch(2)
    px = build_pixel_sequence(module.layout, batch["images"], batch["future_images"])
    assert px.shape == (2, 3, module.layout.num_pixel_frames, 32, 32)
    first, last = module.layout.slot("image/front").pixel_frames
    expect = batch["images"][:, 1].permute(0, 3, 1, 2).float() / 127.5 - 1
    for f in range(first, last + 1):
        torch.testing.assert_close(px[:, :, f], expect)
    a0, a1 = module.layout.slot("action").pixel_frames
    assert torch.all(px[:, :, 0] == -1) and torch.all(px[:, :, a0:a1 + 1] == -1)


def test_injected_vectors_read_back(module):
    batch = make_batch(3)
    x0 = module.encode_batch(batch)
    assert x0.shape == (3, 16, module.layout.num_latent_frames, 4, 4)
    vec = read_vectors(x0, module.layout, 3, 4, 2)
    torch.testing.assert_close(vec["actions"], batch["actions"])
    torch.testing.assert_close(vec["future_proprio"], batch["future_proprio"])
    torch.testing.assert_close(vec["value"], batch["value"])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_training_step_noises_targets_and_puts_loss_on_loss_frames(module, objective):
    o = OBJECTIVES.index(objective)
    batch = make_batch(2, objectives=[o, o], seed=o)
    cond = torch.tensor(module.layout.conditioning_mask(objective))
    loss_frames = torch.tensor(module.layout.loss_mask(objective))
    seen = {}

    def grab(mod, args):
        seen["x"], seen["t"], seen["cond"] = args[0].detach(), args[1].detach(), args[2].detach()

    handle = module.dit.register_forward_pre_hook(grab)
    try:
        torch.manual_seed(123)
        x0 = module.encode_batch(batch)
        torch.manual_seed(123)
        x0_again, x0_pred, loss, _ = module._noised_step(batch)
    finally:
        handle.remove()
    torch.testing.assert_close(x0_again, x0)
    # (1) conditioning inputs are the clean latents (c_in = 1 at time 0), targets are noised
    x_in, t = seen["x"], seen["t"]
    assert torch.equal(x_in[:, :, cond], x0[:, :, cond])
    assert (x_in[:, :, ~cond] - x0[:, :, ~cond]).abs().mean() > 0.1
    # (2) per-frame time: 0 on conditioning frames, sigma/(1+sigma) > 0 elsewhere
    assert torch.all(t[:, cond] == 0) and torch.all(t[:, ~cond] > 0)
    # (3) the condition-mask input marks exactly the conditioning frames
    assert torch.equal(seen["cond"].bool(), cond.expand(2, -1))
    # (4) conditioning outputs equal the clean latents exactly
    assert torch.equal(x0_pred[:, :, cond], x0[:, :, cond])
    # loss lives exactly on the objective's loss frames
    x0_pred = x0_pred.detach().requires_grad_(True)
    from cosmos_policy_lightning.model import diffusion

    sigma = torch.full((2,), 5.0)
    diffusion.diffusion_loss(x0_pred, x0 + 0.1, sigma, loss_frames.expand(2, -1)).backward()
    has_grad = x0_pred.grad.abs().sum(dim=(0, 1, 3, 4)) > 0
    assert torch.equal(has_grad, loss_frames)
    assert torch.isfinite(loss) and loss > 0


def test_auxiliary_switch_drops_auxiliary_loss_frames():
    m = CosmosPolicyModule(embodiment=EMBODIMENT, vae=TINY_VAE, auxiliary_targets=False)
    pol = m.loss_table[OBJECTIVES.index("policy")]
    assert pol.tolist() == [s.name == "action" for s in m.layout.slots]
    wm = m.loss_table[OBJECTIVES.index("world_model")]
    assert not wm[m.layout.index("value")] and wm[m.layout.index("future_proprio")]


def test_backward_reaches_every_dit_parameter(module):
    module.zero_grad()
    _, _, loss, _ = module._noised_step(make_batch(3, objectives=[0, 1, 2]))
    loss.backward()
    grads = [p.grad for p in module.dit.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in module.vae.parameters())


def test_generate_keeps_conditioning_and_samples_targets(module):
    batch = make_batch(2)
    x0 = module.encode_batch(batch)
    cond = module.cond_table[0].expand(2, -1)
    out = module.generate(x0, cond, batch["text"], batch["text_mask"], num_steps=2,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, cond[0]], x0[:, :, cond[0]])
    out2 = module.generate(x0, cond, batch["text"], batch["text_mask"], num_steps=2,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, out2)
    assert torch.isfinite(out).all()


def test_lr_schedule_matches_the_reference():
    # LIBERO (the reference's two-cycle LambdaLinearScheduler): warm-up from 1e-6 over 1K steps, linear
    # 1 -> 0.3 from 1K to 30K, then flat 0.06 (no ramp from 0.3 to 0.06; the run length does not matter)
    assert lr_multiplier(0, 1000, 30000, 40000) == pytest.approx(1e-6)
    assert lr_multiplier(500, 1000, 30000, 40000) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert lr_multiplier(1000, 1000, 30000, 40000) == pytest.approx(1.0)
    assert lr_multiplier(15500, 1000, 30000, 40000) == pytest.approx(0.65)
    assert lr_multiplier(30000, 1000, 30000, 40000) == pytest.approx(0.3)
    for step in (30001, 35000, 40000, 10**9):
        assert lr_multiplier(step, 1000, 30000, 40000) == pytest.approx(0.06)
        assert lr_multiplier(step, 1000, 30000, None) == pytest.approx(0.06)
    # ALOHA: warm-up 2K, 0.3x at 20K, then 0.06x
    assert lr_multiplier(2000, 2000, 20000) == pytest.approx(1.0)
    assert lr_multiplier(11000, 2000, 20000) == pytest.approx(0.65)
    assert lr_multiplier(20001, 2000, 20000) == pytest.approx(0.06)
    # no warm-up at all: starts at 1
    assert lr_multiplier(0, 0, 100) == pytest.approx(1.0)
