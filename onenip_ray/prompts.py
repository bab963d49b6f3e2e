"""The prompt pool: normal images per class as backbone features, plus class-agnostic retrieval."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors


@dataclass
class PromptPool:
    """``features`` (P, C, h, w) of P prompt images; ``class_index`` (P,) into ``class_names``."""

    class_names: list[str]
    prompt_ids: list[str]
    class_index: torch.Tensor
    features: torch.Tensor

    def __post_init__(self) -> None:
        p = self.features.shape[0]
        if not (len(self.prompt_ids) == p == self.class_index.shape[0]):
            raise ValueError("prompt pool: ids, class indices and features disagree in length")
        missing = set(range(len(self.class_names))) - set(self.class_index.tolist())
        if missing:
            raise ValueError(f"prompt pool has no prompt for classes {[self.class_names[i] for i in sorted(missing)]}")

    def to_bytes(self) -> bytes:
        meta = {"class_names": json.dumps(self.class_names), "prompt_ids": json.dumps(self.prompt_ids)}
        tensors = {"features": self.features.contiguous().float(), "class_index": self.class_index.to(torch.int64)}
        return save_safetensors(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "PromptPool":

        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        return cls(
            class_names=json.loads(meta["class_names"]),
            prompt_ids=json.loads(meta["prompt_ids"]),
            class_index=tensors["class_index"],
            features=tensors["features"],
        )


def descriptors(features: torch.Tensor) -> torch.Tensor:
    """Global retrieval descriptor: L2-normalised spatial mean of the backbone features."""
    return F.normalize(features.mean(dim=(2, 3)), dim=1)


def retrieve(query: torch.Tensor, pool: torch.Tensor, pool_class: torch.Tensor, class_index: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the most cosine-similar prompt per query (paper §3.5). With ``class_index``
    (oracle / given class) only that class's prompts compete; an entry of -1 retrieves freely."""
    sims = query @ pool.T
    if class_index is not None:
        allowed = (pool_class[None, :] == class_index[:, None]) | (class_index[:, None] < 0)
        sims = sims.masked_fill(~allowed, float("-inf"))
    return sims.argmax(dim=1)
