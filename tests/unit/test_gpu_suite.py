"""bench/gpu_suite.py at the tiny shape on CPU: every figure is in its JSON, and neither
ray nor vllm is imported (the GPU device image has neither)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Runs the suite as __main__ in a fresh interpreter, then reports what it imported: an
# independent check of the suite's own `ray_or_vllm_imported` field.
RUNNER = """
import json, runpy, sys
sys.argv = ["bench/gpu_suite.py", "--shape", "tiny", "--out", sys.argv[1]]
runpy.run_path("bench/gpu_suite.py", run_name="__main__")
print("MODULES " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "vllm"))))
"""


@pytest.mark.slow
def test_tiny_suite_reports_every_figure_without_ray_or_vllm_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = json.loads(proc.stdout.split("MODULES ", 1)[1])
    assert modules == []
    result = json.loads(out.read_text())
    assert result["ray_or_vllm_imported"] == []
    assert result["smoke"] is True and result["card"].startswith("CPU")
    assert "SMOKE RUN" in proc.stdout and "NOT a figure" in proc.stdout

    sampler = result["sampler"]
    assert sampler["image_tokens"] == 24  # mini: 2 x 2 grid of 2 x 2 features + newlines + base
    for kind, sizes in (("bdhs", [2, 4]), ("unmasked", [2])):
        assert [p["rows"] for p in sampler[kind]] == sizes
        for p in sampler[kind]:
            assert p["new_tokens"] > 0 and p["tok_per_s"] > 0 and p["peak_mem_gib"] > 0
            assert 0 <= p["preprocess_s"] < p["seconds"]
    assert [p["requests"] for p in sampler["bdhs"]] == [4, 8]  # two sentences per row
    assert all(p["visible_image_tokens"] < 24 for p in sampler["bdhs"])  # drop masks

    for impl in ("mmalign", "hf-peft"):
        learner = result["learner"][impl]
        assert learner["impl"] == impl and learner["model"] == "llava-1.6-mini"
        assert learner["model_tflops_per_step"] > 0 and learner["peak_mem_gib"] > 0
        assert 0 < learner["mfu"] < 1  # against the nominal CPU peak: exercises the path

    s = result["summary"]
    for key in (
        "bdhs_tok_per_s",
        "unmasked_tok_per_s",
        "sampler_peak_mem_gib",
        "learner_mfu",
        "hf_peft_mfu",
        "learner_peak_mem_gib",
        "hf_peft_peak_mem_gib",
    ):
        assert s[key], key
    assert result["targets"] == {"bdhs_tok_per_s": 5000.0, "learner_mfu": 0.45}


def test_a_failing_part_is_recorded_and_the_suite_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import gpu_suite

    def boom(*_: object) -> dict:
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(gpu_suite, "run_sampler", boom)
    monkeypatch.setattr(gpu_suite, "run_learner", lambda plan, device, impl: {"impl": impl})
    out = tmp_path / "suite.json"
    with pytest.raises(SystemExit, match="sampler"):
        gpu_suite.main(["--shape", "tiny", "--out", str(out)])
    result = json.loads(out.read_text())  # written before the exit
    assert result["sampler"] == {"error": "RuntimeError: no kernel image"}
    assert result["summary"]["bdhs_tok_per_s"] is None
    assert "ERROR" in capsys.readouterr().out
