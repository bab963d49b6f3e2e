"""The prompt pool (safetensors round trip) and class-agnostic / class-restricted retrieval."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from onenip_ray import prompts
from onenip_ray.enrolment import enrol_features
from onenip_ray.prompts import (
    PromptPool,
    aggregate,
    descriptors,
    neighbor_distances,
    retrieve,
    rotation_angles,
    select_prompts,
    subsample,
)


def _pool(**memory) -> PromptPool:
    g = torch.Generator().manual_seed(0)
    return PromptPool(
        class_names=["bottle", "cable"],
        prompt_ids=["s3://b/bottle/train/good/000.png", "/data/cable/train/good/004.png",
                    "/data/cable/train/good/007.png"],
        class_index=torch.tensor([0, 1, 1]),
        features=torch.randn(3, 8, 4, 4, generator=g),
        **memory,
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
        assert set(f.keys()) == {"features", "class_index", "memory", "memory_class"}  # no weights: none stored
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
    index, similarity = retrieve(queries, pool, pool_class)
    assert index.tolist() == [0, 2, 3, 1]
    assert torch.allclose(similarity, (queries * pool[index]).sum(1))


def test_retrieve_respects_the_class_restriction():
    pool = torch.stack([_unit(1, 0, 0), _unit(0, 1, 0), _unit(0.7, 0.7, 0), _unit(0, 0, 1)])
    pool_class = torch.tensor([0, 1, 1, 2])
    queries = torch.stack([_unit(1, 0, 0), _unit(1, 0, 0), _unit(1, 0, 0)])
    assert retrieve(queries, pool, pool_class)[0].tolist() == [0, 0, 0]
    restricted = retrieve(queries, pool, pool_class, torch.tensor([0, 1, 2]))[0]
    assert restricted.tolist() == [0, 2, 3]  # best within class 1 is the diagonal prompt
    assert pool_class[restricted].tolist() == [0, 1, 2]


def test_memory_round_trips_and_an_old_pool_without_memory_loads():
    pool = _pool(memory=torch.randn(5, 8), memory_class=torch.tensor([0, 0, 1, 1, 1]))
    back = PromptPool.from_bytes(pool.to_bytes())
    assert torch.equal(back.memory, pool.memory) and back.memory_class.tolist() == [0, 0, 1, 1, 1]
    old = save_safetensors({"features": pool.features, "class_index": pool.class_index},
                           metadata={"class_names": json.dumps(pool.class_names),
                                     "prompt_ids": json.dumps(pool.prompt_ids)})
    assert PromptPool.from_bytes(old).memory.shape == (0, 8)


def test_memory_weights_round_trip_and_a_pool_without_them_weighs_1():
    pool = _pool(memory=torch.randn(5, 8), memory_class=torch.tensor([0, 0, 1, 1, 1]),
                 memory_weight=torch.tensor([1.0, 2.0, 0.5, 0.25, 1.5]))
    assert "memory_weight" in pool.tensors()  # stored, and so part of the bundle version
    assert torch.equal(PromptPool.from_bytes(pool.to_bytes()).memory_weight, pool.memory_weight)
    tensors = {k: v for k, v in pool.tensors().items() if k != "memory_weight"}
    old = save_safetensors(tensors, metadata={"class_names": json.dumps(pool.class_names),
                                              "prompt_ids": json.dumps(pool.prompt_ids)})
    assert torch.equal(PromptPool.from_bytes(old).memory_weight, torch.ones(5))
    without = pool.without_class("bottle")
    assert torch.equal(without.memory_weight, pool.memory_weight[2:])
    back = without.with_class("bottle", ["x"], pool.features[:1], pool.memory[:2], pool.memory_weight[:2])
    assert torch.equal(back.memory_weight, torch.tensor([0.5, 0.25, 1.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match="weights"):
        PromptPool(pool.class_names, pool.prompt_ids, pool.class_index, pool.features, pool.memory,
                   pool.memory_class, torch.ones(4))


def test_density_weights_favour_dense_memory_regions():
    """A distance to a patch among close neighbours counts more than one to a patch where normal
    patches lie far apart; the mean weight stays near 1 (the units of a plain distance)."""
    g = torch.Generator().manual_seed(5)
    dense = 0.1 * torch.randn(50, 4, generator=g)
    sparse = 10.0 + 3.0 * torch.randn(50, 4, generator=g)
    weight = prompts.density_weights(torch.cat([dense, sparse]))
    assert weight[:50].min() > weight[50:].max()
    assert 0.5 < float(weight.mean()) < 2.0
    assert torch.equal(prompts.density_weights(torch.randn(1, 4)), torch.ones(1))


def test_neighbor_distances_are_weighed_by_the_nearest_patchs_weight():
    g = torch.Generator().manual_seed(6)
    feats, memory = torch.randn(2, 4, 3, 3, generator=g), torch.randn(12, 4, generator=g)
    memory_class, classes = torch.tensor([0] * 6 + [1] * 6), torch.tensor([1, 0])
    weight = torch.rand(12, generator=g) + 0.5
    plain = neighbor_distances(feats, memory, memory_class, classes)
    weighed = neighbor_distances(feats, memory, memory_class, classes, memory_weight=weight)
    for n, c in enumerate(classes.tolist()):
        bank, w = memory[memory_class == c], weight[memory_class == c]
        query = feats[n].permute(1, 2, 0).reshape(-1, 4)
        nearest = torch.cdist(query, bank).argmin(1)
        assert torch.allclose(weighed[n].flatten(), plain[n].flatten() * w[nearest])


def test_select_prompts_covers_the_clusters_of_a_class():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(4)[:3] * 5
    points = torch.cat([c + 0.1 * torch.randn(10, 4, generator=g) for c in centres])  # 3 clusters of 10
    chosen = select_prompts(F.normalize(points, dim=1), 3)
    assert sorted(i // 10 for i in chosen.tolist()) == [0, 1, 2]  # one prompt per cluster
    assert len(select_prompts(F.normalize(points, dim=1), 50)) == 30  # never more than the class has


def build_pool(class_names, ids, labels, feats, patch_feats, prompts_per_class, memory_per_class, rotated_patches=None,
               rotated_class=None) -> PromptPool:
    """The pool of ``enrol_features`` per class, as training builds it (class ``c`` seeded ``c``)."""
    pool = None
    for c, name in enumerate(class_names):
        rows = torch.nonzero(labels == c).flatten()
        own = patch_feats[rows]
        copies = rotated_patches[rotated_class == c] if rotated_patches is not None else own[:0]
        angles = [float(a) for a in range(len(copies) // len(rows))]
        pool = enrol_features(name, [ids[i] for i in rows], feats[rows], torch.cat([own, copies]), prompts_per_class,
                              memory_per_class, c, angles).pool(pool)
    return pool


def test_build_pool_keeps_k_prompts_and_all_patches_per_class():
    feats, patch_feats = torch.randn(7, 8, 3, 3), torch.randn(7, 8, 6, 6)  # patches on a grid twice as fine
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    pool = build_pool(["a", "b"], [f"img{i}" for i in range(7)], labels, feats, patch_feats, prompts_per_class=2,
                      memory_per_class=0)
    assert pool.class_index.tolist() == [0, 0, 1, 1] and pool.features.shape == (4, 8, 3, 3)
    assert pool.memory.shape == (7 * 36, 8) and (pool.memory_class == 1).sum() == 4 * 36
    assert torch.equal(pool.memory[:36], patch_feats[0].permute(1, 2, 0).reshape(36, 8))
    capped = build_pool(["a", "b"], [f"img{i}" for i in range(7)], labels, feats, patch_feats, prompts_per_class=1,
                        memory_per_class=10)
    assert (capped.memory_class == 0).sum() == 10 and (capped.memory_class == 1).sum() == 10
    assert torch.equal(subsample(torch.randn(5, 8), 10), torch.arange(5))


def test_few_normals_get_rotated_copies_within_the_budget():
    assert rotation_angles(8, 72) == [10, -10, 20, -20, 30, -30, 40, -40]  # 8 normals + 64 copies = 72
    assert rotation_angles(8, 160) == [5 * i * sign for i in range(1, 9) for sign in (1, -1)]  # at most 8 pairs
    assert rotation_angles(1, 160) == rotation_angles(8, 72)  # a single normal: at most 4 pairs
    assert rotation_angles(12, 72) == [20, -20, 40, -40]  # 60 images
    assert rotation_angles(24, 72) == [40, -40] and rotation_angles(25, 72) == []
    assert rotation_angles(200, 72) == [] and rotation_angles(8, 0) == []


def _pool_with_copies(grid: int, memory_per_class: int) -> tuple[PromptPool, torch.Tensor]:
    """Class a: 2 normals and 4 rotated copies; class b: 3 normals; patch grids ``grid``×``grid``."""
    feats, patch_feats = torch.randn(5, 8, 3, 3), torch.randn(5, 8, grid, grid)
    rotated = torch.randn(4, 8, grid, grid)
    pool = build_pool(["a", "b"], [f"img{i}" for i in range(5)], torch.tensor([0, 0, 1, 1, 1]), feats, patch_feats,
                      prompts_per_class=1, memory_per_class=memory_per_class, rotated_patches=rotated,
                      rotated_class=torch.tensor([0, 0, 0, 0]))
    return pool, rotated


def test_rotated_patches_join_their_class_memory_only():
    pool, rotated = _pool_with_copies(2, memory_per_class=0)
    assert (pool.memory_class == 0).sum() == (2 + 4) * 4 and (pool.memory_class == 1).sum() == 3 * 4
    assert torch.equal(pool.memory[8:24], rotated.permute(0, 2, 3, 1).reshape(16, 8))
    assert torch.equal(pool.memory_weight, torch.ones(len(pool.memory)))  # all patches kept: no weights


def test_a_coreset_of_few_normals_and_their_copies_is_weighed_by_density():
    pool, _ = _pool_with_copies(4, memory_per_class=40)
    a, b = pool.memory_class == 0, pool.memory_class == 1
    assert torch.allclose(pool.memory_weight[a], prompts.density_weights(pool.memory[a]))
    assert torch.equal(pool.memory_weight[b], torch.ones(40))  # a coreset, but no copies: many normals


def test_the_memory_coreset_keeps_rare_patches_a_random_subset_would_drop():
    g = torch.Generator().manual_seed(4)
    common = 0.05 * torch.randn(2000, 16, generator=g)  # one dense mode of normal patches
    rare = 3.0 * torch.eye(16)[:5]  # five rare normal patches, far from it and from each other
    bank = torch.cat([common, rare])
    chosen = subsample(bank, 20, seed=3)
    assert len(chosen.unique()) == 20 and torch.equal(chosen, chosen.sort().values)
    assert set(range(2000, 2005)) <= set(chosen.tolist())  # every rare patch is kept (random: 20/2005 each)
    assert torch.equal(chosen, subsample(bank, 20, seed=3))  # seeded: the same memory every time


def test_neighbor_distances_match_brute_force_within_the_class():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(3, 4, 2, 2, generator=g)
    memory = torch.randn(20, 4, generator=g)
    memory_class = torch.tensor([0] * 10 + [1] * 10)
    got = neighbor_distances(feats, memory, memory_class, torch.tensor([1, 0, 1]), chunk=1)
    for n, c in enumerate([1, 0, 1]):
        bank = memory[memory_class == c]
        for y in range(2):
            for x in range(2):
                expected = (bank - feats[n, :, y, x]).norm(dim=1).min()
                assert torch.isclose(got[n, y, x], expected, atol=1e-5)
    assert torch.equal(neighbor_distances(feats, memory, memory_class, torch.tensor([2, 2, 2])), torch.zeros(3, 2, 2))


def test_query_blocks_do_not_change_the_distances(monkeypatch):
    """Query patches go through the distance matrix in blocks (bounded memory); the result is the same."""
    g = torch.Generator().manual_seed(3)
    feats, memory = torch.randn(2, 4, 3, 3, generator=g), torch.randn(30, 4, generator=g)
    memory_class, classes = torch.tensor([0] * 15 + [1] * 15), torch.tensor([0, 1])
    whole = neighbor_distances(feats, memory, memory_class, classes)
    monkeypatch.setattr(prompts, "QUERY_BLOCK", 2)
    assert torch.equal(neighbor_distances(feats, memory, memory_class, classes), whole)


def test_a_class_is_removed_and_added_back_with_consistent_indices():
    feats = torch.randn(6, 8, 2, 2)
    pool = build_pool(["a", "b", "c"], [f"i{k}" for k in range(6)], torch.tensor([0, 0, 1, 1, 2, 2]), feats, feats,
                      prompts_per_class=1, memory_per_class=0)
    without = pool.without_class("b")
    assert without.class_names == ["a", "c"] and without.class_index.tolist() == [0, 1]
    assert without.memory_class.unique().tolist() == [0, 1] and len(without.memory) == 16
    b = pool.class_index == 1
    back = without.with_class("b", [pool.prompt_ids[i] for i in torch.nonzero(b).flatten().tolist()], pool.features[b],
                              pool.memory[pool.memory_class == 1])
    assert back.class_names == ["a", "c", "b"] and back.class_index.tolist() == [0, 1, 2]
    assert torch.equal(back.memory[back.memory_class == 2], pool.memory[pool.memory_class == 1])


def test_aggregate_averages_each_patch_with_its_neighbours_inside_the_grid():
    feats = torch.arange(2 * 16, dtype=torch.float32).view(1, 2, 4, 4)
    out = aggregate(feats, 3)
    assert out.shape == feats.shape and torch.equal(aggregate(feats, 1), feats)
    assert torch.isclose(out[0, 1, 1, 2], feats[0, 1, 0:3, 1:4].mean())  # interior: 3 x 3
    assert torch.isclose(out[0, 0, 0, 0], feats[0, 0, 0:2, 0:2].mean())  # corner: the 2 x 2 inside only


def test_each_class_compares_patches_averaged_over_its_own_neighbourhood():
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(3, 4, 3, 3, generator=g)
    memory, memory_class = torch.randn(20, 4, generator=g), torch.tensor([0] * 10 + [1] * 10)
    classes = torch.tensor([0, 1, 1])
    got = neighbor_distances(feats, memory, memory_class, classes, neighbor_pool=[1, 3])
    plain = neighbor_distances(feats, memory, memory_class, classes)
    averaged = neighbor_distances(aggregate(feats, 3), memory, memory_class, classes)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1:], averaged[1:])


def test_a_pool_keeps_its_classes_neighbourhoods_and_its_old_bytes_where_all_are_one():
    pool = _pool()
    assert pool.neighbor_pool == [1, 1]
    assert "neighbor_pool" not in json.loads(pool.to_bytes()[8 : 8 + int.from_bytes(pool.to_bytes()[:8], "little")]
                                             ).get("__metadata__", {})
    averaged = PromptPool.from_bytes(replace(pool, neighbor_pool=[3, 1]).to_bytes())
    assert averaged.neighbor_pool == [3, 1]
    assert averaged.without_class("bottle").neighbor_pool == [1]
    added = averaged.with_class("can", ["x"], pool.features[:1], torch.zeros(0, 8), neighbor_pool=3)
    assert added.neighbor_pool == [3, 1, 3]
    with pytest.raises(ValueError, match="neighbourhood"):
        replace(pool, neighbor_pool=[5, 1])
