"""cluster.yaml passes Ray's own cluster-launcher validation, and that validator rejects broken
copies with the error type it really raises, naming the bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_validates_with_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    # what `ray up` does before touching AWS: fill provider defaults, then schema-validate
    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name in ("sampler_gpu", "judge_gpu", "learner_gpu"):
        assert types[name]["max_workers"] >= types[name]["min_workers"] >= 0


def _prepared() -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))


def test_validation_rejects_an_unknown_head_node_type() -> None:
    from ray.autoscaler._private.util import validate_config

    # prepared as `ray up` prepares it: an unprepared config fails earlier, with a
    # RuntimeError about 'cluster_synced_files', whatever else is wrong with it
    cfg = _prepared()
    cfg["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="`head_node_type` must be one of"):
        validate_config(cfg)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("available_node_types", "judge_gpu", "resources", "judge_node"), "eight", "'eight'"),
        (("available_node_types", "judge_gpu", "min_workers"), "one", "'one'"),
        (("max_wokers",), 3, "'max_wokers' was unexpected"),  # a typo in a field name
    ],
    ids=["label-amount", "min-workers", "unknown-field"],
)
def test_schema_errors_name_the_bad_field(path: tuple[str, ...], value: Any, message: str) -> None:
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    cfg = _prepared()
    parent = cfg
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError, match=message) as err:
        validate_config(cfg)
    # unknown fields are reported on the mapping that holds them
    where = path[:-1] if message.endswith("was unexpected") else path
    assert tuple(err.value.absolute_path) == where
