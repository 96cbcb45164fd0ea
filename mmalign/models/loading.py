"""Load a LLaVA-style model + processor from a local dir, an s3:// prefix or a hub id."""

from __future__ import annotations

import os

# float64 is for numerical checks (e.g. data-parallel == single-worker to 1e-6).
_DTYPES = ("float32", "bfloat16", "float16", "float64")


def resolve_model_dir(path_or_uri: str) -> str:
    """Local directory or hub id to hand to `from_pretrained`.

    s3:// prefixes are downloaded once into the local cache (mmalign.storage.localize).
    A string that exists locally must be a model directory (holding config.json); any
    other string is treated as a Hugging Face hub id.
    """
    if path_or_uri.startswith("s3://"):
        from mmalign.storage import localize

        local = localize(path_or_uri)
        _check_model_dir(local, shown=path_or_uri)
        return local
    local = os.path.expanduser(path_or_uri)
    if os.path.exists(local) or path_or_uri.startswith((".", "/", "~")):
        _check_model_dir(local, shown=path_or_uri)
        return local
    return path_or_uri


def _check_model_dir(local: str, shown: str) -> None:
    if not os.path.isdir(local):
        raise FileNotFoundError(f"{shown}: not a directory (expected a saved model directory)")
    if not os.path.isfile(os.path.join(local, "config.json")):
        found = sorted(os.listdir(local))[:10]
        raise FileNotFoundError(
            f"{shown}: not a model directory (no config.json; it holds {found}). "
            "Expected the output of model.save_pretrained + processor.save_pretrained."
        )


# The architectures every role is tested with (README "Supported models"): a CLIP-style
# vision tower, a projector and a Llama-family language model, one <image> placeholder that
# the processor expands to the image's feature positions.
SUPPORTED = {
    "LlavaForConditionalGeneration": "LLaVA-1.5 (fixed 336 px grid)",
    "LlavaNextForConditionalGeneration": "LLaVA-1.6 / LLaVA-NeXT (AnyRes tiles)",
}


def check_architecture(config: object, shown: str) -> str:
    """The checkpoint's architecture class, or a ValueError naming it and what is missing."""
    names = list(getattr(config, "architectures", None) or [type(config).__name__])
    for name in names:
        if name in SUPPORTED:
            return name
    have = ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items())
    raise ValueError(
        f"{shown}: architecture {names[0]} is not supported. mmalign's roles need a LLaVA-style "
        "model (vision tower + projector + language model, get_image_features, one <image> "
        f"placeholder expanded by the processor); supported: {have}"
    )


def load_model(path_or_uri: str, dtype: str = "float32", device: str = "cpu"):  # noqa: ANN201
    """(model, processor) from a local dir, an s3://bucket/prefix or a hub id.

    Args:
        path_or_uri: saved model directory (save_pretrained of model and processor).
        dtype: "float32", "bfloat16", "float16" or "float64" (parameter dtype after loading).
        device: torch device string, e.g. "cpu" or "cuda:0".

    Returns:
        (AutoModelForImageTextToText instance in eval mode on `device`, AutoProcessor).
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    source = resolve_model_dir(path_or_uri)
    check_architecture(AutoConfig.from_pretrained(source), path_or_uri)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=getattr(torch, dtype))
    processor = AutoProcessor.from_pretrained(source)
    return model.to(device).eval(), processor  # type: ignore[arg-type]
