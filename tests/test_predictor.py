"""The predictor: prompt tokens encoded once, retrieval vs oracle routing, outputs = the model's maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from onenip_ray.config import ModelConfig
from onenip_ray.data.images import to_network_input
from onenip_ray.data.layouts import read_dataset
from onenip_ray.model.anomaly_map import fuse, image_scores
from onenip_ray.model.build import build_backbone
from onenip_ray.model.onenip import OneNIP
from onenip_ray.predictor import Predictor
from onenip_ray.prompts import PromptPool, descriptors
from onenip_ray.training_data import load_images

CONFIG = ModelConfig(image_size=64, hidden_dim=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                     dim_feedforward=64, refiner_dim=8)


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(CONFIG)


@pytest.fixture(scope="module")
def images(tiny_dataset) -> dict[str, np.ndarray]:
    """Per class: 2 training images (the prompts) and its 6 test images, uint8 RGB 64×64."""
    samples = read_dataset("mvtec", str(tiny_dataset))
    out = {}
    for cls in ("disc", "stripes"):
        train = [s for s in samples if s.class_name == cls and s.split == "train"][:2]
        test = [s for s in samples if s.class_name == cls and s.split == "test"]
        out[cls] = load_images(train, 64)
        out[cls + "/test"] = load_images(test, 64)
    return out


@pytest.fixture
def parts(backbone, images):
    torch.manual_seed(0)
    model = OneNIP(CONFIG, backbone.channels).eval()
    prompt_images = np.concatenate([images["disc"], images["stripes"]])
    with torch.no_grad():
        feats = backbone(torch.from_numpy(to_network_input(prompt_images, backbone.mean, backbone.std)))
    pool = PromptPool(["disc", "stripes"], ["d0", "d1", "s0", "s1"], torch.tensor([0, 0, 1, 1]), feats)
    return model, pool


class _CountingEncode:
    def __init__(self, encode):
        self.encode, self.batches = encode, []

    def __call__(self, features):
        self.batches.append(features.shape[0])
        return self.encode(features)


def test_prompt_tokens_are_encoded_once(backbone, parts, images):
    model, pool = parts
    counter = _CountingEncode(model._encode)
    model._encode = counter
    predictor = Predictor(backbone, model, pool, rec_scale=1.0)
    assert counter.batches == [4]  # the whole pool, once, at construction
    assert predictor.prompt_tokens.shape == (4, 16, CONFIG.hidden_dim)
    batch = images["disc/test"][:3]
    predictor.predict(batch)
    predictor.predict(batch)
    predictor.predict(images["stripes/test"][:2], torch.tensor([1, 1]))
    assert counter.batches == [4, 3, 3, 2]  # queries only; prompts never re-encoded


def test_prediction_equals_the_model_maps_with_the_retrieved_prompt(backbone, parts, images):
    model, pool = parts
    predictor = Predictor(backbone, model, pool, rec_scale=1.7)
    batch = np.concatenate([images["disc/test"][:2], images["stripes/test"][:2]])
    pred = predictor.predict(batch)
    with torch.no_grad():
        feats = backbone(torch.from_numpy(to_network_input(batch, backbone.mean, backbone.std)))
        maps = model.maps(feats, model.encode(pool.features)[pred.prompt_index])
    fused = fuse(maps, CONFIG, 1.7)
    assert pred.fused.shape == (4, 64, 64)
    assert torch.allclose(pred.maps.reconstruction, maps.reconstruction, atol=1e-5)
    assert torch.allclose(pred.maps.refiner, maps.refiner, atol=1e-5)
    assert torch.allclose(pred.fused, fused, atol=1e-5)
    assert torch.allclose(pred.scores, image_scores(fused, CONFIG.score_pool), atol=1e-5)
    # the retrieved prompt is the most similar pool descriptor
    sims = descriptors(feats) @ descriptors(pool.features).T
    assert torch.equal(pred.prompt_index, sims.argmax(1))


def test_retrieval_routes_each_image_to_its_class(backbone, parts, images):
    model, pool = parts
    predictor = Predictor(backbone, model, pool, rec_scale=1.0)
    disc = predictor.predict(images["disc/test"])
    stripes = predictor.predict(images["stripes/test"])
    assert disc.class_index.tolist() == [0] * 6
    assert stripes.class_index.tolist() == [1] * 6
    assert set(disc.prompt_index.tolist()) <= {0, 1} and set(stripes.prompt_index.tolist()) <= {2, 3}


def test_oracle_class_overrides_retrieval(backbone, parts, images):
    model, pool = parts
    predictor = Predictor(backbone, model, pool, rec_scale=1.0)
    batch = images["disc/test"][:3]
    retrieved = predictor.predict(batch)
    forced = predictor.predict(batch, torch.tensor([1, 1, 1]))  # wrong class on purpose
    assert forced.class_index.tolist() == [1, 1, 1]
    assert set(forced.prompt_index.tolist()) <= {2, 3}
    assert not torch.allclose(forced.scores, retrieved.scores)
    same = predictor.predict(batch, torch.tensor([0, 0, 0]))
    assert torch.equal(same.prompt_index, retrieved.prompt_index)
    assert torch.equal(same.scores, retrieved.scores)
    assert predictor.class_names == ["disc", "stripes"]


def test_to_network_input_matches_the_data_module(backbone, parts, images):
    model, pool = parts
    predictor = Predictor(backbone, model, pool, rec_scale=1.0)
    batch = images["stripes/test"][:2]
    expected = torch.from_numpy(to_network_input(batch, backbone.mean, backbone.std))
    assert torch.allclose(predictor.to_network_input(batch), expected, atol=1e-6)
    assert not predictor.model.training and not predictor.backbone.training
