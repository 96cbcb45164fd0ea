"""Typed config: presets, round trip, dotted overrides, field-named errors, --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmalign import config as C

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "pipelines" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_load_and_round_trip(preset: Path, tmp_path: Path) -> None:
    cfg = C.load(str(preset))
    dumped = tmp_path / "cfg.yaml"
    dumped.write_text(yaml.safe_dump(C.to_dict(cfg)))
    assert C.load(str(dumped)) == cfg


def test_paper_preset_carries_the_papers_setting() -> None:
    cfg = C.load(str(ROOT / "pipelines/configs/llava-1.6-7b.yaml"))
    assert (cfg.bdhs.rho_th, cfg.bdhs.n_bdhs, cfg.bdhs.eps_s) == (0.99, 5, 0.97)
    assert (cfg.learner.lora_r, cfg.learner.lora_alpha) == (128, 256)
    assert cfg.pipeline.p_offline == 0.5
    assert "34b" in cfg.judge.model and "7b" in cfg.sampler.model


def test_dotted_overrides_and_types() -> None:
    cfg = C.load(
        None,
        {
            "learner.beta": "0.2",
            "learner.use_gpu": "true",
            "learner.lora_targets": "q_proj, v_proj",
            "sampler.concurrency": "3",
        },
    )
    assert cfg.learner.beta == 0.2 and cfg.learner.use_gpu is True
    assert cfg.learner.lora_targets == ("q_proj", "v_proj")
    assert cfg.sampler.concurrency == 3
    with pytest.raises(AttributeError):  # frozen
        cfg.learner.beta = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"learner.beta": "-1"}, "learner.beta"),
        ({"learner.beta": "abc"}, "learner.beta"),
        ({"bdhs.rho_th": "1.5"}, "bdhs.rho_th"),
        ({"pipeline.mode": "offline"}, "pipeline.mode"),
        ({"sampler.batch_size": "2.5"}, "sampler.batch_size"),
        ({"learner.betta": "0.1"}, "learner.betta"),
        ({"judge.both_orders": "maybe"}, "judge.both_orders"),
        ({"learner.rpo_alpha": "-0.5"}, "learner.rpo_alpha"),
        ({"learner.beta": "inf"}, "learner.beta"),
        ({"learner.max_grad_norm": "nan"}, "learner.max_grad_norm"),
        ({"bdhs.swap_prob": "1.5"}, "bdhs.swap_prob"),
        ({"learner.weight_decay": "-1"}, "learner.weight_decay"),
        ({"learner.max_response_tokens": "-1"}, "learner.max_response_tokens"),
        ({"learner.shuffle_window": "-1"}, "learner.shuffle_window"),
        ({"sampler.temperature": "inf"}, "sampler.temperature"),
        ({"learner.lr": "inf"}, "learner.lr"),
        ({"data.max_quarantined": "1.5"}, "data.max_quarantined"),
        ({"storage.retries": "0"}, "storage.retries"),
        ({"storage.retry_backoff_s": "-1"}, "storage.retry_backoff_s"),
        ({"bdhs.identical": "keep"}, "bdhs.identical"),
    ],
)
def test_bad_values_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(C.ConfigError, match=field.replace(".", r"\.")):
        C.load(None, overrides)


def test_bad_yaml_field_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  loss: kto\n")
    with pytest.raises(C.ConfigError, match=r"learner\.loss"):
        C.load(str(bad))


def test_cli_help_lists_every_field_with_its_doc() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from mmalign.config import parse_args; parse_args(['--help'])"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    flat = " ".join(out.split())  # argparse wraps lines
    for name, _typ, _default, doc in C.iter_fields():
        assert f"--{name}" in out, name
        assert " ".join(doc.split())[:40] in flat, name


def test_fields_users_could_not_set_before() -> None:
    cfg = C.load(
        None,
        {
            "learner.gradient_checkpointing": "true",
            "learner.max_response_tokens": "32",
            "learner.weight_decay": "0.01",
            "learner.shuffle_window": "0",
            "bdhs.swap_prob": "0.0",
        },
    )
    assert cfg.learner.gradient_checkpointing and cfg.learner.max_response_tokens == 32
    assert (cfg.learner.weight_decay, cfg.learner.shuffle_window) == (0.01, 0)
    assert cfg.bdhs.swap_prob == 0.0
    default = C.Config()
    assert (default.learner.lr, default.learner.shuffle_window, default.bdhs.swap_prob) == (
        5e-6,
        256,
        0.5,
    )


def test_python_m_config_prints_the_doc() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mmalign.config"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    assert out == (ROOT / "docs" / "CONFIG.md").read_text()


@pytest.mark.parametrize(
    ("value", "message"),
    [("x", "learner.beta"), ("inf", "learner.beta: expected finite float")],
)
def test_cli_error_exits_2_naming_field(value: str, message: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from mmalign.config import parse_args; parse_args(['--learner.beta', {value!r}])",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and message in proc.stderr


def test_config_doc_is_generated_from_the_dataclasses() -> None:
    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    assert C.markdown_table() in doc, "regenerate: python -m mmalign.config > docs/CONFIG.md"
