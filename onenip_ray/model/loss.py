"""OneNIP's training loss, in the released code's form: the mean feature MSE over the reconstruction
and restoration streams (= (L_rec + L_res)/2) + 0.5 · Dice of the refiner (smoothing 1, no factor 2);
``refiner_loss="dice+bce"`` adds the refiner's per-pixel binary cross-entropy to its Dice."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

DICE_WEIGHT = 0.5


class Losses(NamedTuple):
    total: torch.Tensor
    mse: torch.Tensor  # detached
    dice: torch.Tensor  # detached


def dice_loss(logits: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 − (Σpt + smooth) / (Σp² + Σt² + smooth), per sample, averaged."""
    p = torch.sigmoid(logits).flatten(1)
    t = masks.flatten(1)
    num = (p * t).sum(1) + smooth
    den = (p * p).sum(1) + (t * t).sum(1) + smooth
    return (1.0 - num / den).mean()


def training_losses(model: nn.Module, clean: torch.Tensor, synthetic: torch.Tensor, synthetic_mask: torch.Tensor,
                    prompt: torch.Tensor, refiner_loss: str = "dice") -> Losses:
    """One training pass of ``model`` (a ``OneNIP``, or its DDP wrapper): reconstruction of ``clean``
    and restoration of ``synthetic`` (both toward ``clean``) guided by ``prompt``; the refiner is
    supervised with zeros / ``synthetic_mask`` (N, H, W): Dice, plus with ``refiner_loss="dice+bce"``
    the mean per-pixel binary cross-entropy, whose gradient does not vanish where the sigmoid
    saturates (a refiner pushed to 0 everywhere by the clean stream's Dice gets out again)."""
    reconstruction, target, logits = model(clean, synthetic, prompt)
    mse = F.mse_loss(reconstruction, target)
    masks = torch.cat([torch.zeros_like(synthetic_mask), synthetic_mask])
    dice = dice_loss(logits, masks)
    refiner = dice if refiner_loss == "dice" else dice + F.binary_cross_entropy_with_logits(logits, masks)
    return Losses(total=mse + DICE_WEIGHT * refiner, mse=mse.detach(), dice=dice.detach())
