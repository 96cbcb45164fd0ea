"""Dense pre-training of a tiny LLaVA's vision tower + projector on ShapesWorld annotations.

Real LLaVAs start from a pretrained CLIP; our tiny one starts from random weights, and
learning to see through the language-model loss alone is slow on a CPU. This stage gives
the vision side a direct signal first: a throw-away linear head on the *projector output*
(exactly the features the language model reads) classifies every image patch as the
object class whose bounding box covers the patch centre, or background. The head is
discarded; the saved model stays a plain `LlavaForConditionalGeneration`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mmalign.models.sft import shuffled_batches
from mmalign.shapes.render import from_png
from mmalign.shapes.vocab import OBJECT_CLASSES

BACKGROUND = 0
"""Label of a patch no object covers; object class i (OBJECT_CLASSES order) is i + 1."""


@dataclass(frozen=True)
class VisionPretrainConfig:
    """Optimisation settings of `pretrain_vision`."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 64
    """Images per step."""
    lr: float = 3e-3
    """Constant AdamW learning rate."""
    seed: int = 0
    """Seed of the head's initialisation and the batch order."""
    log_every: int = 100
    """Log every this many steps."""


def patch_labels(objects: Sequence[dict], image_size: int, patch_size: int) -> list[int]:
    """Class label of every patch, row-major ((image_size / patch_size) ** 2 labels).

    A patch is labelled with the object whose bounding box (centre x, y; side size)
    contains the patch centre; objects never overlap (ShapesWorld leaves a 1 px gap).
    """
    side = image_size // patch_size
    index = {name: i + 1 for i, name in enumerate(OBJECT_CLASSES)}
    labels = []
    for row in range(side):
        for col in range(side):
            cx, cy = (col + 0.5) * patch_size, (row + 0.5) * patch_size
            label = BACKGROUND
            for obj in objects:
                half = obj["size"] / 2
                if abs(cx - obj["x"]) <= half and abs(cy - obj["y"]) <= half:
                    label = index[obj["name"]]
                    break
            labels.append(label)
    return labels


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Projector output per patch, (B, num_patches, text_hidden): what the LM reads."""
    cfg = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    selected = hidden[cfg.vision_feature_layer]
    if cfg.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]  # drop CLS
    return model.model.multi_modal_projector(selected)


def pretrain_vision(
    model,  # noqa: ANN001 (LlavaForConditionalGeneration)
    processor,  # noqa: ANN001 (LlavaProcessor)
    records: Sequence[dict],
    cfg: VisionPretrainConfig,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Train the vision tower + projector in place; returns the loss of every step."""
    vcfg = model.config.vision_config
    images = [from_png(r["image"]) for r in records]
    pixels = torch.as_tensor(
        processor.image_processor(images, return_tensors="np")["pixel_values"],
        dtype=torch.float32,
    )
    labels = torch.tensor(
        [patch_labels(r["objects"], vcfg.image_size, vcfg.patch_size) for r in records]
    )
    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(OBJECT_CLASSES) + 1)
    params = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
        *head.parameters(),
    ]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    batches = shuffled_batches(len(records), cfg.batch_size, random.Random(cfg.seed))
    losses: list[float] = []
    model.train()
    t0 = time.time()
    for step in range(cfg.steps):
        idx = next(batches)
        logits = head(image_features(model, pixels[idx]))  # (B, P, C)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[idx].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step == 0:
            recent = losses[-cfg.log_every :]
            acc = float((logits.argmax(-1) == labels[idx]).float().mean())
            log(
                f"vision step {step + 1}/{cfg.steps} loss {sum(recent) / len(recent):.4f} "
                f"patch acc {acc:.3f} {time.time() - t0:.0f}s"
            )
    model.eval()
    return losses
