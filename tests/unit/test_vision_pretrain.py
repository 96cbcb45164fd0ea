"""Dense vision pre-training: patch labels from annotations, and it teaches the tower."""

from __future__ import annotations

import torch

from mmalign.models.tiny_llava import build_tiny_llava
from mmalign.models.vision_pretrain import (
    BACKGROUND,
    VisionPretrainConfig,
    image_features,
    patch_labels,
    pretrain_vision,
)
from mmalign.shapes.vocab import OBJECT_CLASSES
from mmalign.shapes.world import WorldConfig, generate_split


def test_patch_labels_hand_case_on_cpu() -> None:
    # A 16x16 image, 8 px patches: one 8 px red circle centred at (4, 4) covers the
    # top-left patch centre (4, 4) only; a blue square centred at (12, 12) the last one.
    objects = [
        {"name": "red circle", "x": 4.0, "y": 4.0, "size": 8},
        {"name": "blue square", "x": 12.0, "y": 12.0, "size": 4},
    ]
    red, blue = OBJECT_CLASSES.index("red circle") + 1, OBJECT_CLASSES.index("blue square") + 1
    assert patch_labels(objects, 16, 8) == [red, BACKGROUND, BACKGROUND, blue]


def test_pretraining_makes_patches_decodable_and_keeps_the_lm_on_cpu() -> None:
    torch.set_num_threads(1)
    model, processor = build_tiny_llava("small", seed=0)
    records = generate_split(WorldConfig(seed=0), "sft", 64)
    lm_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    vision_before = model.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"]
    vision_before = vision_before.clone()
    cfg = VisionPretrainConfig(steps=60, batch_size=16, log_every=1000)
    losses = pretrain_vision(model, processor, records, cfg, log=lambda _: None)
    assert sum(losses[-10:]) / 10 < 0.7 * losses[0], (losses[0], losses[-10:])
    after = model.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"]
    assert not torch.equal(after, vision_before)
    for name, tensor in model.model.language_model.state_dict().items():
        assert torch.equal(tensor, lm_before[name]), name  # only vision + projector train
    pixels = torch.randn(2, 3, 32, 32)
    assert image_features(model, pixels).shape == (2, 64, model.config.text_config.hidden_size)
