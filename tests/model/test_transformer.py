"""The reconstruction transformer: neighbour mask, position embedding, parameter counts, v1/v2 decoder."""
from __future__ import annotations

import pytest
import torch

from onenip_ray.config import ModelConfig
from onenip_ray.model.build import trainable_parameters
from onenip_ray.model.onenip import OneNIP
from onenip_ray.model.refiner import Refiner
from onenip_ray.model.transformer import (
    Attention,
    EncoderLayer,
    LearnedPositionEmbedding,
    ReconstructionTransformer,
    TwoWayDecoderLayer,
    neighbor_mask,
)


def _blocked(mask: torch.Tensor, grid: int, y: int, x: int) -> torch.Tensor:
    """(grid, grid) bool map of the tokens that token (y, x) may NOT attend to."""
    return (~mask[y * grid + x]).reshape(grid, grid)


@pytest.mark.parametrize("grid, window", [(14, 7), (16, 9), (20, 11), (4, 3)])
def test_neighbor_mask_window_in_the_interior(grid, window):
    mask = neighbor_mask(grid)
    assert mask.shape == (grid * grid, grid * grid) and mask.dtype == torch.bool
    c = grid // 2
    blocked = _blocked(mask, grid, c, c)
    assert int(blocked.sum()) == window * window
    half = window // 2
    ys, xs = torch.nonzero(blocked, as_tuple=True)
    assert (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())) == (c - half, c + half, c - half, c + half)


def test_neighbor_mask_is_clipped_at_the_borders():
    mask = neighbor_mask(14)  # half-size 3
    assert int(_blocked(mask, 14, 0, 0).sum()) == 4 * 4
    assert int(_blocked(mask, 14, 0, 7).sum()) == 4 * 7
    assert int(_blocked(mask, 14, 13, 13).sum()) == 4 * 4
    assert int(_blocked(mask, 14, 2, 13).sum()) == 6 * 4


@pytest.mark.parametrize("grid", [2, 4, 14, 16, 20])
def test_neighbor_mask_never_blocks_a_whole_row_and_always_blocks_self(grid):
    mask = neighbor_mask(grid)
    assert mask.any(dim=1).all()
    assert not mask.diagonal().any()
    assert torch.equal(mask, mask.T)


def test_neighbor_mask_matches_a_brute_force_definition():
    grid, half = 14, 3
    expected = torch.ones(grid * grid, grid * grid, dtype=torch.bool)
    for i in range(grid * grid):
        for j in range(grid * grid):
            if abs(i // grid - j // grid) <= half and abs(i % grid - j % grid) <= half:
                expected[i, j] = False
    assert torch.equal(neighbor_mask(grid), expected)


def test_masked_encoder_ignores_tokens_in_the_window():
    """True in the mask means 'may attend': changing a token inside token 0's window leaves token 0's
    output of one encoder layer unchanged; changing one outside it does not."""
    torch.manual_seed(0)
    grid = 4
    layer = EncoderLayer(dim=16, num_heads=2, ffn=32, dropout=0.0).eval()
    pos = torch.zeros(grid * grid, 16)
    mask = neighbor_mask(grid)  # half-size 1: token 0 = (0,0) is blocked from (0,1), (1,0), (1,1)
    x = torch.randn(1, grid * grid, 16)
    base = layer(x, pos, mask)[0, 0]
    inside, outside = x.clone(), x.clone()
    inside[0, 1 * grid + 1] += 5.0
    outside[0, 2 * grid + 2] += 5.0
    assert torch.allclose(layer(inside, pos, mask)[0, 0], base, atol=1e-6)
    assert not torch.allclose(layer(outside, pos, mask)[0, 0], base, atol=1e-3)


def test_position_embedding_shape_and_layout():
    emb = LearnedPositionEmbedding(14, 256)
    pos = emb()
    assert pos.shape == (196, 256)
    y, x = 3, 11
    assert torch.equal(pos[y * 14 + x, :128], emb.col_embed.weight[x])
    assert torch.equal(pos[y * 14 + x, 128:], emb.row_embed.weight[y])
    odd = LearnedPositionEmbedding(4, 7)()
    assert odd.shape == (16, 7)


def test_transformer_position_embedding_follows_the_config_grid():
    model = OneNIP(ModelConfig(image_size=64, hidden_dim=32, num_heads=4, num_encoder_layers=1,
                               num_decoder_layers=1, dim_feedforward=32, refiner_dim=8), 8)
    assert model.transformer.pos_embed().shape == (16, 32)
    assert model.transformer.mask.shape == (16, 16)


# -- parameter counts --------------------------------------------------------------------------
ATTENTION = 4 * (256 * 256 + 256)  # = nn.MultiheadAttention(256, 8)
ENCODER_LAYER = ATTENTION + (256 * 1024 + 1024) + (1024 * 256 + 256) + 2 * 512
DECODER_LAYER = 2 * ATTENTION + (256 * 1024 + 1024) + (1024 * 256 + 256) + 3 * 512


@pytest.fixture(scope="module")
def paper_model() -> OneNIP:
    return OneNIP(ModelConfig(backbone="tf_efficientnet_b4", image_size=224), 272)  # the paper's main table


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_paper_b4_trainable_parameter_count(paper_model):
    assert trainable_parameters(paper_model) == 8_372_625


def test_per_part_parameter_counts(paper_model):
    assert _count(Attention(256, 8, 0.1)) == 263_168 == ATTENTION
    assert ATTENTION == _count(torch.nn.MultiheadAttention(256, 8))
    assert _count(paper_model.refiner) == 592_769 == _count(Refiner(272, 128))
    t = paper_model.transformer
    assert _count(t.encoder[0]) == ENCODER_LAYER == 789_760
    assert _count(t.decoder[0]) == DECODER_LAYER == 1_053_440
    assert _count(t.pos_embed) == 14 * 256
    assert _count(paper_model.input_proj) == 272 * 256 + 256
    assert _count(paper_model.output_proj) == 256 * 272 + 272
    assert _count(t) == 14 * 256 + 4 * ENCODER_LAYER + 4 * DECODER_LAYER + ATTENTION + 512


# -- decoder versions --------------------------------------------------------------------------
def _decode_grads(buggy_v1: bool) -> ReconstructionTransformer:
    torch.manual_seed(0)
    t = ReconstructionTransformer(grid=4, dim=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=2,
                                  ffn=32, dropout=0.0, buggy_v1=buggy_v1)
    image, prompt = torch.randn(2, 16, 16), torch.randn(2, 16, 16)
    t.decode(t.encode(image), t.encode(prompt)).square().sum().backward()
    return t


def _grad_norm(module: torch.nn.Module) -> float | None:
    grads = [p.grad for p in module.parameters()]
    if all(g is None for g in grads):
        return None
    return float(sum(g.abs().sum() for g in grads if g is not None))


def test_v1_decoder_leaves_image_to_prompt_attention_without_gradient():
    t = _decode_grads(buggy_v1=True)
    for layer in t.decoder:
        assert _grad_norm(layer.cross_attn_image_to_prompt) is None
        assert _grad_norm(layer.cross_attn_prompt_to_image) > 0
        assert _grad_norm(layer.mlp) > 0


def test_v2_decoder_trains_image_to_prompt_attention():
    t = _decode_grads(buggy_v1=False)
    for layer in t.decoder:
        assert _grad_norm(layer.cross_attn_image_to_prompt) > 0


def test_v1_image_update_is_the_prompt_mlp_output():
    torch.manual_seed(0)
    layer = TwoWayDecoderLayer(16, 2, 32, dropout=0.0, buggy_v1=True).eval()
    prompt, image, pos = torch.randn(1, 16, 16), torch.randn(1, 16, 16), torch.zeros(16, 16)
    new_prompt, new_image = layer(prompt, image, pos, None)
    p1 = layer.norm1(prompt + layer.cross_attn_prompt_to_image(prompt, image, image))
    assert torch.allclose(new_image, layer.norm3(image + layer.mlp(p1)), atol=1e-6)
    layer.buggy_v1 = False
    assert not torch.allclose(layer(prompt, image, pos, None)[1], new_image, atol=1e-4)
