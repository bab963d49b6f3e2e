"""OneNIP's losses, inference maps, fusion and image scores on a tiny (4×4 grid) model."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from onenip_ray.config import ModelConfig
from onenip_ray.model import loss as loss_module
from onenip_ray.model.anomaly_map import Maps, fuse, gaussian_blur, image_scores
from onenip_ray.model.loss import dice_loss, training_losses
from onenip_ray.model.onenip import OneNIP

C = 24
TINY = ModelConfig(image_size=64, hidden_dim=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                   dim_feedforward=64, refiner_dim=8)


@pytest.fixture
def model() -> OneNIP:
    torch.manual_seed(0)
    return OneNIP(TINY, C)


def _batch(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n, C, 4, 4, generator=g)
    synthetic = clean.clone()
    synthetic[:, :, 1:3, 1:3] += 3.0
    masks = torch.zeros(n, 64, 64)
    masks[:, 16:48, 16:48] = 1.0
    prompt = torch.randn(n, C, 4, 4, generator=g)
    return clean, synthetic, masks, prompt


def test_training_losses_are_finite_and_backward_reaches_every_parameter(model):
    model.train()
    losses = training_losses(model, *_batch())
    assert all(torch.isfinite(t) for t in losses)
    assert losses.mse > 0 and 0 < losses.dice < 1
    assert torch.allclose(losses.total, losses.mse + 0.5 * losses.dice)
    assert losses.total.requires_grad and not losses.mse.requires_grad
    losses.total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_training_step_lowers_the_loss(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = _batch()
    model.eval()  # no jitter, no dropout: the loss is a deterministic function of the weights
    first = training_losses(model, *batch).total
    for _ in range(5):
        opt.zero_grad()
        training_losses(model, *batch).total.backward()
        opt.step()
    assert training_losses(model, *batch).total < first


def test_the_loss_uses_the_official_dice_on_both_streams(model, monkeypatch):
    calls = []

    def spy(logits, masks):
        calls.append((logits.shape, masks.clone()))
        return dice_loss(logits, masks)

    monkeypatch.setattr(loss_module, "dice_loss", spy)
    clean, synthetic, masks, prompt = _batch(n=2)
    model.train()
    losses = training_losses(model, clean, synthetic, masks, prompt)
    # refiner targets: zeros for the reconstruction stream, the synthetic masks for restoration
    ((shape, targets),) = calls
    assert shape == (4, 64, 64)
    assert torch.equal(targets, torch.cat([torch.zeros_like(masks), masks]))
    assert torch.allclose(losses.total, losses.mse + 0.5 * losses.dice)


def test_dice_plus_bce_pulls_a_collapsed_refiner_back(model):
    """A refiner at 0 everywhere (saturated logits) gets almost no gradient from the official Dice;
    ``refiner_loss="dice+bce"`` gives it one (its mask pixels pull at about 1 / pixels each)."""
    batch = _batch(n=2)
    model.eval()
    with torch.no_grad():
        model.refiner.predictor.bias.fill_(-20.0)
    grads, losses = {}, {}
    for kind in ("dice", "dice+bce"):
        model.zero_grad()
        losses[kind] = training_losses(model, *batch, refiner_loss=kind)
        losses[kind].total.backward()
        grads[kind] = float(model.refiner.predictor.bias.grad.abs())
    assert grads["dice"] < 1e-6 < 1e-2 < grads["dice+bce"]
    assert torch.allclose(losses["dice"].dice, losses["dice+bce"].dice)  # the logged Dice is the Dice alone


def _hand_dice(logits: list[list[float]], masks: list[list[float]], smooth: float) -> float:
    losses = []
    for row_l, row_t in zip(logits, masks):
        p = [1 / (1 + math.exp(-v)) for v in row_l]
        inter = sum(a * b for a, b in zip(p, row_t))
        num = inter + smooth
        den = sum(a * a for a in p) + sum(b * b for b in row_t) + smooth
        losses.append(1 - num / den)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("smooth", [1.0, 1e-6])
def test_dice_loss_matches_a_hand_computation(smooth):
    logits = [[0.0, 2.0, -1.0, 3.0], [-2.0, -2.0, 0.5, 1.0]]
    masks = [[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
    got = dice_loss(torch.tensor(logits).view(2, 2, 2), torch.tensor(masks).view(2, 2, 2), smooth)
    assert float(got) == pytest.approx(_hand_dice(logits, masks, smooth), rel=1e-6)


def test_dice_on_a_perfect_prediction():
    """Without the factor 2 of the paper's Dice, a perfect mask bottoms out near 0.5, not 0."""
    masks = torch.zeros(1, 8, 8)
    masks[0, 2:6, 2:6] = 1.0
    logits = (masks * 2 - 1) * 50.0
    assert float(dice_loss(logits, masks)) == pytest.approx(1 - 17 / 33, abs=1e-6)
    # an empty target with an empty prediction: smoothing 1 gives 0, not NaN
    assert float(dice_loss(torch.full((1, 8, 8), -50.0), torch.zeros(1, 8, 8))) == pytest.approx(0.0, abs=1e-6)


@torch.no_grad()
def test_eval_mode_is_deterministic_and_training_mode_is_not(model):
    feats = _batch()[0]
    model.eval()
    prompt = model.encode(_batch()[3])
    a, b = model.maps(feats, prompt), model.maps(feats, prompt)
    assert torch.equal(a.reconstruction, b.reconstruction) and torch.equal(a.refiner, b.refiner)
    tokens = model._to_tokens(feats)
    assert model._jitter(tokens) is tokens
    model.train()
    assert not torch.equal(model.encode(feats), model.encode(feats))  # jitter + dropout


@torch.no_grad()
def test_maps_have_input_resolution_and_match_the_feature_error(model):
    model.eval()
    feats, _, _, prompt_feats = _batch(n=2)
    prompt = model.encode(prompt_feats)
    maps = model.maps(feats, prompt)
    assert maps.reconstruction.shape == (2, 64, 64) and maps.refiner.shape == (2, 64, 64)
    assert float(maps.refiner.min()) >= 0.0 and float(maps.refiner.max()) <= 1.0
    error = (model.reconstruct(model.encode(feats), prompt) - feats).norm(dim=1)  # (2, 4, 4)
    # align_corners=True: the corner pixels are the corner grid cells exactly
    assert torch.allclose(maps.reconstruction[:, 0, 0], error[:, 0, 0], atol=1e-5)
    assert torch.allclose(maps.reconstruction[:, -1, -1], error[:, -1, -1], atol=1e-5)
    assert float(maps.reconstruction.max()) <= float(error.max()) + 1e-5


def test_image_scores_are_the_max_of_the_mean_pooled_map():
    rng = np.random.default_rng(0)
    fused = rng.random((2, 20, 20)).astype(np.float32)
    k = 4
    expected = [max(fused[n, y:y + k,
                          x:x + k].mean() for y in range(20 - k + 1) for x in range(20 - k + 1)) for n in range(2)]
    got = image_scores(torch.from_numpy(fused), k)
    assert got.shape == (2,)
    assert np.allclose(got.numpy(), expected, atol=1e-6)
    spike = torch.zeros(1, 32, 32)
    spike[0, 10, 10] = 8.0
    assert float(image_scores(spike, 16)) == pytest.approx(8.0 / 256)
    assert torch.allclose(image_scores(torch.from_numpy(fused), 1), torch.from_numpy(fused).flatten(1).amax(1))


def test_fuse_official_and_paper():
    maps = Maps(reconstruction=torch.full((1, 4, 4), 2.0), refiner=torch.full((1, 4, 4), 0.5))
    official = fuse(maps, ModelConfig(image_size=64, alpha=0.5, fusion="official", map_sigma=0), rec_scale=3.0)
    paper = fuse(maps, ModelConfig(image_size=64, alpha=0.5, fusion="paper", map_sigma=0), rec_scale=3.0)
    assert torch.allclose(official, torch.full((1, 4, 4), 0.5 * 2.0 + 0.5 * 3.0 * 0.5))
    assert torch.allclose(paper, torch.full((1, 4, 4), 0.5 * 2.0 + 0.5 * 0.5))
    only_rec = fuse(maps, ModelConfig(image_size=64, alpha=0.0, map_sigma=0), rec_scale=3.0)
    assert torch.equal(only_rec, maps.reconstruction)
    assert torch.allclose(fuse(maps, ModelConfig(image_size=64, alpha=0.2), rec_scale=3.0, alpha=1.0),
                          torch.full((1, 4, 4), 1.5))


def test_gaussian_blur_keeps_constants_and_mass_and_spreads_a_peak():
    flat = torch.full((2, 40, 40), 3.0)
    assert torch.allclose(gaussian_blur(flat, 4.0), flat)
    peak = torch.zeros(1, 41, 41)
    peak[0, 20, 20] = 1.0
    out = gaussian_blur(peak, 2.0)
    assert abs(float(out.sum()) - 1.0) < 1e-4
    assert float(out[0, 20, 20]) < 0.1 and float(out[0, 20, 24]) > 0.0
    assert torch.allclose(out[0], out[0].T, atol=1e-7)
    assert torch.equal(gaussian_blur(peak, 0.0), peak)


def test_model_config_validation():
    with pytest.raises(ValueError, match="multiple of 16"):
        ModelConfig(image_size=100)
    with pytest.raises(ValueError, match="decoder"):
        ModelConfig(decoder="v3")
    with pytest.raises(ValueError, match="fusion"):
        ModelConfig(fusion="sum")
    with pytest.raises(ValueError, match="alpha"):
        ModelConfig(alpha=1.5)
    with pytest.raises(ValueError, match="residual_init"):
        ModelConfig(residual_init=0.0)
    with pytest.raises(ValueError, match="neighbor_coarse_weight"):
        ModelConfig(neighbor_coarse_weight=0.0)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**TINY.to_dict(), "extra": 1})
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY
    assert TINY.grid == 4


def test_residual_init_scales_only_the_residual_branch_outputs():
    torch.manual_seed(3)
    official = OneNIP(replace(TINY, residual_init=1.0), C)
    torch.manual_seed(3)
    scaled = OneNIP(replace(TINY, residual_init=0.1), C)
    branch = {id(layer.weight) for layer in scaled.transformer.residual_branch_outputs()}
    assert len(branch) == 2 + 3 + 1  # encoder: attn + FFN; decoder: 2 attns + MLP; final attention
    for (name, a), b in zip(official.named_parameters(), scaled.parameters()):
        expected = a * 0.1 if id(b) in branch else a
        torch.testing.assert_close(b, expected, msg=name)
    attn = scaled.transformer.encoder[0].self_attn
    assert all((p.bias == 0).all() for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj))
