"""The prompt pool (safetensors round trip) and class-agnostic / class-restricted retrieval."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from onenip_ray.prompts import PromptPool, descriptors, retrieve


def _pool() -> PromptPool:
    g = torch.Generator().manual_seed(0)
    return PromptPool(
        class_names=["bottle", "cable"],
        prompt_ids=["s3://b/bottle/train/good/000.png", "/data/cable/train/good/004.png", "/data/cable/train/good/007.png"],
        class_index=torch.tensor([0, 1, 1]),
        features=torch.randn(3, 8, 4, 4, generator=g),
    )


def test_pool_bytes_round_trip(tmp_path):
    pool = _pool()
    data = pool.to_bytes()
    back = PromptPool.from_bytes(data)
    assert back.class_names == pool.class_names
    assert back.prompt_ids == pool.prompt_ids
    assert torch.equal(back.features, pool.features)
    assert torch.equal(back.class_index, pool.class_index) and back.class_index.dtype == torch.int64
    # a plain safetensors file: any safetensors reader sees the tensors and the metadata
    path = tmp_path / "prompts.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"features", "class_index"}
        meta = f.metadata()
    assert json.loads(meta["class_names"]) == ["bottle", "cable"]
    assert json.loads(meta["prompt_ids"]) == pool.prompt_ids


def test_pool_features_are_stored_as_float32():
    pool = _pool()
    pool.features = pool.features.half()
    assert PromptPool.from_bytes(pool.to_bytes()).features.dtype == torch.float32


def test_pool_without_a_prompt_for_a_class_is_refused():
    with pytest.raises(ValueError, match=r"no prompt for classes \['cable'\]"):
        PromptPool(["bottle", "cable"], ["a", "b"], torch.tensor([0, 0]), torch.zeros(2, 8, 4, 4))


def test_pool_with_mismatched_lengths_is_refused():
    with pytest.raises(ValueError, match="disagree in length"):
        PromptPool(["bottle"], ["a", "b"], torch.tensor([0]), torch.zeros(1, 8, 4, 4))


def test_descriptors_are_normalised_spatial_means():
    feats = torch.zeros(2, 3, 4, 4)
    feats[0, 0] = 2.0
    feats[1, 1] = 1.0
    feats[1, 2, :2] = 2.0  # mean 1.0
    d = descriptors(feats)
    assert torch.allclose(d, torch.tensor([[1.0, 0.0, 0.0], [0.0, 2 ** -0.5, 2 ** -0.5]]))


def _unit(*v: float) -> torch.Tensor:
    return F.normalize(torch.tensor(v, dtype=torch.float32), dim=0)


def test_retrieve_picks_the_most_similar_prompt():
    pool = torch.stack([_unit(1, 0, 0), _unit(0, 1, 0), _unit(0, 0, 1), _unit(1, 1, 0)])
    pool_class = torch.tensor([0, 1, 2, 1])
    queries = torch.stack([_unit(0.9, 0.1, 0), _unit(0.1, 0.2, 1), _unit(1, 0.8, 0), _unit(0, 1, 0.1)])
    assert retrieve(queries, pool, pool_class).tolist() == [0, 2, 3, 1]


def test_retrieve_respects_the_class_restriction():
    pool = torch.stack([_unit(1, 0, 0), _unit(0, 1, 0), _unit(0.7, 0.7, 0), _unit(0, 0, 1)])
    pool_class = torch.tensor([0, 1, 1, 2])
    queries = torch.stack([_unit(1, 0, 0), _unit(1, 0, 0), _unit(1, 0, 0)])
    assert retrieve(queries, pool, pool_class).tolist() == [0, 0, 0]
    restricted = retrieve(queries, pool, pool_class, torch.tensor([0, 1, 2]))
    assert restricted.tolist() == [0, 2, 3]  # best within class 1 is the diagonal prompt
    assert pool_class[restricted].tolist() == [0, 1, 2]
