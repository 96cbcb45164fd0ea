"""Field helpers of the config sections: documented fields, checks that name the field."""

from __future__ import annotations

from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the dotted field."""


def opt(default: Any, help: str) -> Any:  # noqa: A002 - 'help' mirrors argparse
    """A documented dataclass field with an immutable default."""
    return field(default=default, metadata={"help": help})


def check(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {msg}")


def one_of(value: str, choices: tuple[str, ...], name: str) -> None:
    check(value in choices, name, f"must be one of {list(choices)}, got {value!r}")


_RESERVED = ("CPU", "GPU", "memory", "object_store_memory")


def parse_resources(spec: str, name: str = "resources") -> dict[str, float]:
    """'sampler_node:0.01,other:1' -> {'sampler_node': 0.01, 'other': 1.0}; '' -> {}.

    Custom Ray resources (the labels cluster.yaml's node types advertise); CPU/GPU go in
    num_cpus/num_gpus. Raises ConfigError naming `name` on a malformed entry.
    """
    out: dict[str, float] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        label, sep, amount = item.partition(":")
        label = label.strip()
        check(bool(sep) and bool(label), name, f"expected 'label:amount', got {item!r}")
        check(label not in _RESERVED, name, f"{label!r} is not custom: use num_cpus/num_gpus")
        check(label not in out, name, f"{label!r} appears twice")
        try:
            value = float(amount)
        except ValueError:
            raise ConfigError(
                f"{name}: amount of {label!r} must be a number, got {amount!r}"
            ) from None
        check(value > 0, name, f"amount of {label!r} must be > 0, got {value}")
        out[label] = value
    return out


def resources_opt(example: str) -> Any:
    return opt(
        "",
        "Custom Ray resources per actor, 'label:amount[,label:amount]' (e.g. "
        f"'{example}:0.01' lands it on cluster.yaml's {example} nodes); empty = none.",
    )


def vllm_memory_opt() -> Any:
    return opt(
        0.5,
        "engine vllm: fraction of each GPU vLLM may reserve (weights + KV cache); the HF copy "
        "that computes image embeddings needs the rest (vLLM's own default, 0.9, leaves "
        "too little).",
    )
