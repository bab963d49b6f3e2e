"""The prompt pool: normal images per class as backbone features, plus class-agnostic retrieval.

Two things per class: ``k`` prompt images (``features``; OneNIP's visual prompts, chosen to cover
the class's variation) and a **memory** of normal patch features (``memory``; the training
normals' patches, a coreset of them above a cap) for the nearest-neighbour map that is fused
with OneNIP's maps.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors


@dataclass
class PromptPool:
    """``features`` (P, C, h, w) of P prompt images; ``class_index`` (P,) into ``class_names``;
    ``memory`` (M, C) normal patch features with ``memory_class`` (M,) and ``memory_weight`` (M,),
    the factor a distance to that patch is weighed by (1, or ``density_weights``);
    ``neighbor_pool`` per class the neighbourhood its patches are averaged over (``aggregate``)."""

    class_names: list[str]
    prompt_ids: list[str]
    class_index: torch.Tensor
    features: torch.Tensor
    memory: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    memory_class: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    memory_weight: torch.Tensor | None = None  # None: all 1 (bundles written before the weights)
    neighbor_pool: list[int] | None = None  # None: all 1 (bundles written before the choice)

    def __post_init__(self) -> None:
        p = self.features.shape[0]
        if not (len(self.prompt_ids) == p == self.class_index.shape[0]):
            raise ValueError("prompt pool: ids, class indices and features disagree in length")
        missing = set(range(len(self.class_names))) - set(self.class_index.tolist())
        if missing:
            raise ValueError(f"prompt pool has no prompt for classes {[self.class_names[i] for i in sorted(missing)]}")
        if self.memory.shape[0] != self.memory_class.shape[0]:
            raise ValueError("prompt pool: memory patches and their class indices disagree in length")
        if self.memory.numel() == 0:
            self.memory = torch.zeros(0, self.features.shape[1])
        if self.memory_weight is None:
            self.memory_weight = torch.ones(self.memory.shape[0])
        if self.memory_weight.shape != (self.memory.shape[0],):
            raise ValueError("prompt pool: memory patches and their weights disagree in length")
        if self.neighbor_pool is None:
            self.neighbor_pool = [1] * len(self.class_names)
        if len(self.neighbor_pool) != len(self.class_names) or set(self.neighbor_pool) - set(NEIGHBOR_POOLS):
            raise ValueError(f"prompt pool: one neighbourhood per class, each of {NEIGHBOR_POOLS}")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors; ``memory_weight`` only where a weight is not 1, so a pool without
        weights has the file and the content hash (bundle version) it had before they existed."""
        out = {"features": self.features.contiguous().float(), "class_index": self.class_index.to(torch.int64),
               "memory": self.memory.contiguous().float(), "memory_class": self.memory_class.to(torch.int64)}
        if bool((self.memory_weight != 1).any()):
            out["memory_weight"] = self.memory_weight.contiguous().float()
        return out

    def to_bytes(self) -> bytes:
        """safetensors; ``neighbor_pool`` in the metadata only where a class averages its patches,
        so such a pool keeps the content hash it had before the choice existed."""
        meta = {"class_names": json.dumps(self.class_names), "prompt_ids": json.dumps(self.prompt_ids)}
        if any(size != 1 for size in self.neighbor_pool):
            meta["neighbor_pool"] = json.dumps(self.neighbor_pool)
        return save_safetensors(self.tensors(), metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "PromptPool":
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        extra = {k: tensors[k] for k in ("memory", "memory_class", "memory_weight") if k in tensors}
        pools = json.loads(meta["neighbor_pool"]) if "neighbor_pool" in meta else None
        return cls(class_names=json.loads(meta["class_names"]), prompt_ids=json.loads(meta["prompt_ids"]),
                   class_index=tensors["class_index"], features=tensors["features"], neighbor_pool=pools, **extra)

    def has_memory(self, class_index: int) -> bool:
        return bool((self.memory_class == class_index).any())

    def without_class(self, name: str) -> "PromptPool":
        """This pool minus one class (its prompts and memory); later class indices shift down."""
        c = self.class_names.index(name)
        keep, keep_mem = self.class_index != c, self.memory_class != c
        shift = lambda idx: idx - (idx > c).long()  # noqa: E731
        return PromptPool([n for n in self.class_names if n != name],
                          [i for i, k in zip(self.prompt_ids, keep.tolist()) if k], shift(self.class_index[keep]),
                          self.features[keep], self.memory[keep_mem], shift(self.memory_class[keep_mem]),
                          self.memory_weight[keep_mem], [p for n, p in zip(self.class_names, self.neighbor_pool)
                                                         if n != name])

    def with_class(self, name: str, prompt_ids: list[str], features: torch.Tensor, memory: torch.Tensor,
                   memory_weight: torch.Tensor | None = None, neighbor_pool: int = 1) -> "PromptPool":
        """This pool plus one class (appended last); its memory's weights default to 1, its
        ``neighbor_pool`` to 1 (patches as they are)."""
        c = len(self.class_names)
        weight = torch.ones(len(memory)) if memory_weight is None else memory_weight.float()
        return PromptPool(self.class_names + [name], self.prompt_ids + list(prompt_ids),
                          torch.cat([self.class_index, torch.full((len(features),), c)]),
                          torch.cat([self.features, features]), torch.cat([self.memory, memory]),
                          torch.cat([self.memory_class, torch.full((len(memory),), c)]),
                          torch.cat([self.memory_weight, weight]), self.neighbor_pool + [int(neighbor_pool)])


# Rotated copies of a class's few normals in its memory: up to this many pairs of angles, evenly
# spaced up to ± this many degrees (``rotation_angles``); a single normal's copies stay 10° apart,
# as its calibration views lie half-way between them (``add_class.views_of_one``).
MAX_ROTATION_PAIRS = 8
SINGLE_NORMAL_ROTATION_PAIRS = 4
MAX_ROTATION = 40.0


def rotation_angles(num_normals: int, budget: int) -> list[float]:
    """Angles of the rotated copies of each of a class's ``num_normals`` normals in its memory:
    p pairs ±40°·i/p (i = 1…p, at most 8 pairs, 4 for a single normal) such that the normals and
    their copies number at most ``budget`` images; none for a class of more than ``budget / 3``
    normals (or ``budget`` 0). The copies stand in for the poses a few normals' patches miss
    (measured in docs/results.md)."""
    most = SINGLE_NORMAL_ROTATION_PAIRS if num_normals == 1 else MAX_ROTATION_PAIRS
    pairs = min(most, (budget // max(num_normals, 1) - 1) // 2) if budget > 0 else 0
    return [sign * MAX_ROTATION * i / pairs for i in range(1, pairs + 1) for sign in (1, -1)]


def descriptors(features: torch.Tensor) -> torch.Tensor:
    """Global retrieval descriptor: L2-normalised spatial mean of the backbone features."""
    return F.normalize(features.mean(dim=(2, 3)), dim=1)


def retrieve(query: torch.Tensor, pool: torch.Tensor, pool_class: torch.Tensor,
             given_class: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, cosine similarity) of the most similar prompt per query (paper §3.5). With
    ``given_class`` (oracle / caller-given) only that class's prompts compete; -1 retrieves freely."""
    sims = query @ pool.T
    if given_class is not None:
        allowed = (pool_class[None, :] == given_class[:, None]) | (given_class[:, None] < 0)
        sims = sims.masked_fill(~allowed, float("-inf"))
    best = sims.max(dim=1)
    return best.indices, best.values


def k_center_greedy(distance_to: Callable[[int], torch.Tensor], first: int, k: int) -> torch.Tensor:
    """Indices of ``k`` rows in the order chosen: ``first``, then each next row the one farthest
    from those chosen (k-center greedy); ``distance_to(j)`` gives every row's distance to row ``j``."""
    chosen = torch.empty(k, dtype=torch.int64)
    chosen[0] = first
    nearest = distance_to(first).clone()  # each row's distance to its nearest chosen row
    for i in range(1, k):
        j = int(nearest.argmax())
        chosen[i] = j
        torch.minimum(nearest, distance_to(j), out=nearest)
    return chosen


def select_prompts(descriptor: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` images that cover a class: the medoid first, then k-center greedy on the
    retrieval descriptors' cosine distances."""
    dist = 1.0 - descriptor @ descriptor.T
    return k_center_greedy(lambda j: dist[j], int(dist.sum(1).argmin()), min(k, len(descriptor)))


# Neighbourhoods a class's patch features may be averaged over (``aggregate``): 1 = the patch alone.
NEIGHBOR_POOLS = (1, 3)


def aggregate(features: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) patch features averaged over each patch's ``size`` × ``size`` neighbourhood
    (stride 1, the border averaging only the cells inside; PatchCore's local aggregation); 1 =
    unchanged. A region of changed statistics (a texture defect) moves the averages together."""
    if size == 1:
        return features
    return F.avg_pool2d(features, size, stride=1, padding=size // 2, count_include_pad=False)


def patches(features: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) → (N·h·w, C) patch features."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


# Dimensions of the seeded random projection the memory coreset measures distances in.
CORESET_DIM = 64


def subsample(bank: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Indices of at most ``size`` rows of ``bank`` (M, C) as the memory: all, or a coreset
    (``k_center_greedy`` from a seeded random patch, as in PatchCore), with squared distances in a
    seeded random projection to ``CORESET_DIM`` dimensions. It keeps the rare
    normal patches a random subset drops."""
    count = len(bank)
    if size <= 0 or size >= count:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed)
    x = bank.float() @ torch.randn(bank.shape[1], CORESET_DIM, generator=generator).to(bank.device)
    sq = (x * x).sum(1)
    first = int(torch.randint(count, (1,), generator=generator))
    return k_center_greedy(lambda j: sq - 2.0 * (x @ x[j]) + sq[j], first, size).sort().values


# Query patches per distance matrix: bounds its size for large memories (512 × 100,000 patches, a
# bundle from before the coreset, = 205 MB where a whole stride-8 image at 320 px would be 640 MB).
QUERY_BLOCK = 512

# ``density_weights``: a memory patch's spacing is its mean distance to this many nearest others;
# the weight's floor on the spacing, as a fraction of the memory's mean spacing.
DENSITY_NEIGHBORS = 6
DENSITY_FLOOR = 0.25


def density_weights(memory: torch.Tensor) -> torch.Tensor:
    """Per memory patch, s̄ / (s + 0.25·s̄): s its mean distance to its 6 nearest other patches, s̄
    the mean of s. A distance to a patch where normal patches lie far apart counts less, one to a
    patch in a dense region more, in the units of a plain distance; used for the coreset of a few
    normals and their rotated copies."""
    k = min(DENSITY_NEIGHBORS, len(memory) - 1)
    if k < 1:
        return torch.ones(len(memory))
    memory = memory.float()
    spacing = torch.cat([torch.cdist(block, memory).topk(k + 1, dim=1, largest=False).values[:, 1:].mean(1)
                         for block in memory.split(4 * QUERY_BLOCK)])
    mean = spacing.mean()
    return mean / (spacing + DENSITY_FLOOR * mean)


def class_memory_weight(memory: torch.Tensor, weighted: bool) -> torch.Tensor:
    """A class memory's weights: ``density_weights`` where ``weighted`` (a coreset of a class's
    normals and their rotated copies, i.e. a class with few normals), else all 1."""
    return density_weights(memory) if weighted else torch.ones(len(memory))


def neighbor_distances(features: torch.Tensor, memory: torch.Tensor, memory_class: torch.Tensor,
                       class_index: torch.Tensor, chunk: int = 1, memory_weight: torch.Tensor | None = None,
                       neighbor_pool: list[int] | None = None) -> torch.Tensor:
    """Per patch, the L2 distance to the nearest memory patch of the image's class, times that
    patch's ``memory_weight`` (default 1): (N, h, w); the patches first ``aggregate``d over the
    class's ``neighbor_pool`` (default 1), as its memory was. A class without memory gives zeros. Computed
    in float32 (also under bf16 autocast), ``chunk`` images per distance matrix: with 1, an image's
    map does not depend on the batch it came in. The matrix product only picks the nearest patch;
    its distance is then measured directly (``nearest_distance``), so it carries no cancellation
    error (which differs between BLAS libraries and would keep exported graphs from matching this
    to 1e-3)."""
    n, c, h, w = features.shape
    features = features.float()
    out = torch.zeros(n, h, w, device=features.device)
    for cls in class_index.unique().tolist():
        in_class = memory_class == cls
        bank = memory[in_class].float()
        if not len(bank):
            continue
        weight = None if memory_weight is None else memory_weight[in_class].float()
        rows = torch.nonzero(class_index == cls).flatten()
        size = 1 if neighbor_pool is None else neighbor_pool[cls]
        for start in range(0, len(rows), chunk):
            r = rows[start : start + chunk]
            query = patches(aggregate(features[r], size))
            nearest = torch.cat([torch.cdist(block, bank).argmin(dim=1) for block in query.split(QUERY_BLOCK)])
            dist = nearest_distance(query, bank, nearest)
            out[r] = (dist if weight is None else dist * weight[nearest]).view(len(r), h, w)
    return out


def nearest_distance(query: torch.Tensor, bank: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """L2 distance of each query row to its ``nearest`` bank row, by subtraction (exact in float32)."""
    return (query - bank[nearest]).norm(dim=1)
