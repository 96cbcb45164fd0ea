"""The judge on a REAL local Ray Serve: deployment handle, HTTP on 127.0.0.1, Ray Data pool.

One Ray start for the module (8 logical CPUs on the 2-core box so pools do not starve;
replicas take 0.5 CPU). Two applications: kind="objects" (exact verdicts) and kind="vlm"
with a random-weight tiny LLaVA saved to a temp dir (the trained checkpoint is not part of
this test: random weights give noisy verdicts, so only the mechanics are asserted).
"""

from __future__ import annotations

import base64
import io
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # listeners on loopback

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
GOOD = "There is a red circle and a blue square."
BAD = "There is a red circle and a green triangle."
OBJECTS = ["red circle", "blue square"]


def png_bytes(size: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (255, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def serve_apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Ray + Serve on loopback with both judge apps; yields {'url', 'objects', 'vlm'}."""
    import ray
    import torch
    from ray import serve

    from deploy.judge_app import build_app
    from mmalign.models.tiny_llava import build_tiny_llava

    torch.set_num_threads(1)
    model_dir = tmp_path_factory.mktemp("judge") / "tiny-judge"
    model, processor = build_tiny_llava("small", seed=0)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    del model, processor

    relative = os.path.relpath(model_dir)
    port = _free_port()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"batch_size": 4, "concurrency": 1, "num_cpus": 0.5}
        objects = serve.run(
            build_app({**common, "kind": "objects"}), name="objects", route_prefix="/objects"
        )
        vlm = serve.run(
            # A path relative to the driver's cwd, like the YAML's default model path: the
            # replica must resolve it the same way.
            build_app({**common, "kind": "vlm", "model": relative, "max_new_tokens": 6}),
            name="vlm",
            route_prefix="/vlm",
        )
        yield {"url": f"http://127.0.0.1:{port}", "objects": objects, "vlm": vlm}
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url: str, body: Any) -> tuple[int, dict[str, Any]]:
    import requests

    resp = requests.post(url, json=body, timeout=120)
    return resp.status_code, resp.json()


def test_serve_yaml_is_a_valid_serve_config_on_cpu() -> None:
    from ray.serve.schema import ServeDeploySchema

    from deploy.judge_app import build_app
    from mmalign.config import JudgeConfig, from_dict

    raw = yaml.safe_load((REPO / "deploy" / "serve_judge.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "deploy.judge_app:build_app"
    module, attr = app.import_path.split(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is build_app
    from_dict(JudgeConfig, app.args, "judge").validate("judge")  # args are JudgeConfig fields
    (dep,) = app.deployments
    assert dep.name == "Judge"
    assert dep.ray_actor_options.num_cpus == 0.5
    scaling = dep.autoscaling_config
    scaling = scaling if isinstance(scaling, dict) else scaling.model_dump()
    assert scaling["max_replicas"] >= scaling["min_replicas"] >= 1
    assert schema.http_options.host == "127.0.0.1"


def test_serve_yaml_deployments_agree_with_args_on_cpu() -> None:
    """The `deployments:` section overrides what build_app derives from `args` (num_gpus,
    resources, autoscaling, max_ongoing_requests): both halves of the file must agree."""
    from ray.serve.schema import ServeDeploySchema

    from tests.unit.test_deploy_kuberay import check_deployments_match_args

    raw = yaml.safe_load((REPO / "deploy" / "serve_judge.yaml").read_text())
    (app,) = ServeDeploySchema.model_validate(raw).applications
    cfg = check_deployments_match_args(app)
    assert cfg.num_gpus == 0.0  # the local file serves the CPU tiny judge
    # The check bites: a section that drifted from its args fails it.
    for path, value in (
        (("ray_actor_options", "num_gpus"), 1.0),
        (("autoscaling_config", "max_replicas"), 5),
        (("max_ongoing_requests",), 3),
    ):
        drifted = yaml.safe_load((REPO / "deploy" / "serve_judge.yaml").read_text())
        node = drifted["applications"][0]["deployments"][0]
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        (bad,) = ServeDeploySchema.model_validate(drifted).applications
        with pytest.raises(AssertionError):
            check_deployments_match_args(bad)
    # leaving num_cpus out of ray_actor_options drops it to Serve's default: caught too
    drifted = yaml.safe_load((REPO / "deploy" / "serve_judge.yaml").read_text())
    del drifted["applications"][0]["deployments"][0]["ray_actor_options"]["num_cpus"]
    (bad,) = ServeDeploySchema.model_validate(drifted).applications
    with pytest.raises(AssertionError):
        check_deployments_match_args(bad)


def test_builder_rejects_bad_args_on_cpu() -> None:
    from deploy.judge_app import build_app
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match="judge.kind"):
        build_app({"kind": "oracle"})
    with pytest.raises(ConfigError, match="judge.batchsize: unknown field"):
        build_app({"batchsize": 4})


@pytest.mark.slow
def test_objects_judge_through_handle_batches_requests(serve_apps: dict[str, Any]) -> None:
    handle = serve_apps["objects"]
    image = {"bytes": png_bytes(), "path": None}
    rows = [
        {"image": image, "question": "Describe.", "objects": OBJECTS}
        | (
            {"response_a": GOOD, "response_b": BAD}
            if i % 2 == 0
            else {"response_a": BAD, "response_b": GOOD}
        )
        for i in range(8)
    ]
    rows.append(
        {"image": None, "question": "Q", "response_a": GOOD, "response_b": BAD, "objects": OBJECTS}
    )
    responses = [handle.judge.remote(r) for r in rows]  # all in flight at once
    verdicts = [r.result(timeout_s=60) for r in responses]
    assert [v["winner"] for v in verdicts[:8]] == ["a", "b"] * 4
    assert all(v["kept"] and v["judge"] == "objects" for v in verdicts[:8])
    assert (verdicts[8]["reason"], verdicts[8]["kept"]) == ("invalid", False)
    assert "image: missing" in verdicts[8]["error"]
    stats = handle.stats_dict.remote().result(timeout_s=30)
    assert stats["judge/pairs"] >= 9 and stats["judge/invalid_rows"] >= 1
    # 9 requests in flight, batch_size 4: Serve grouped them (timing-tolerant bound).
    assert 1 < stats["judge/largest_batch"] <= 4
    assert stats["judge/batches"] < stats["judge/pairs"]


@pytest.mark.slow
def test_objects_judge_over_http(serve_apps: dict[str, Any]) -> None:
    url = serve_apps["url"] + "/objects/judge"
    body = {
        "image_b64": b64(png_bytes()),
        "question": "Describe.",
        "response_a": BAD,
        "response_b": GOOD,
        "objects": OBJECTS,
    }
    status, verdict = post(url, body)
    assert status == 200, verdict
    assert (verdict["winner"], verdict["kept"], verdict["reason"]) == ("b", True, "agree")
    assert (verdict["hallucinated_a"], verdict["hallucinated_b"]) == (1, 0)

    bad_requests = {
        "image: missing": {k: v for k, v in body.items() if k != "image_b64"},
        "response_a: missing or empty": body | {"response_a": "   "},
        "image_b64: not valid base64": body | {"image_b64": "***"},
        "not both": body | {"image_uri": "/tmp/x.png"},
        "objects:": {k: v for k, v in body.items() if k != "objects"},
        "pink elephant": body | {"objects": ["pink elephant"]},
    }
    for message, bad in bad_requests.items():
        status, answer = post(url, bad)
        assert status == 422 and message in answer["error"], (message, status, answer)
    status, _ = post(url, ["not", "an", "object"])  # FastAPI's own validation
    assert status == 422
    # The replica survived all of it.
    assert post(url, body)[0] == 200
    import requests

    stats = requests.get(serve_apps["url"] + "/objects/stats", timeout=30).json()
    assert isinstance(stats["judge/pairs"], int) and stats["judge/pairs"] >= 2


@pytest.mark.slow
def test_vlm_judge_over_http_and_handle(serve_apps: dict[str, Any], tmp_path: Path) -> None:
    url = serve_apps["url"] + "/vlm/judge"
    body = {
        "image_b64": b64(png_bytes()),
        "question": "Describe.",
        "response_a": GOOD,
        "response_b": BAD,
    }
    status, verdict = post(url, body)
    assert status == 200, verdict
    assert verdict["judge"] == "vlm" and verdict["orders"] == 2
    assert verdict["raw_a"] and verdict["raw_b"]  # two real generations, both orders
    assert verdict["reason"] in ("agree", "disagree", "tie", "parse_failure")

    image_file = tmp_path / "img.png"
    image_file.write_bytes(png_bytes())
    status, verdict = post(
        url, {k: v for k, v in body.items() if k != "image_b64"} | {"image_uri": str(image_file)}
    )
    assert status == 200 and verdict["orders"] == 2

    status, answer = post(url, body | {"image_b64": b64(b"not an image")})
    assert status == 422 and "unreadable image" in answer["error"]
    assert answer["verdict"]["reason"] == "invalid"
    status, answer = post(
        url,
        {k: v for k, v in body.items() if k != "image_b64"}
        | {"image_uri": str(tmp_path / "missing.png")},
    )
    assert status == 422, answer

    row = {
        "image": {"bytes": png_bytes(), "path": None},
        "question": "Q",
        "response_a": GOOD,
        "response_b": "",
    }
    verdict = serve_apps["vlm"].judge.remote(row).result(timeout_s=60)
    assert verdict["reason"] == "invalid" and "response_b" in verdict["error"]


@pytest.mark.slow
def test_judge_pool_in_ray_data(serve_apps: dict[str, Any]) -> None:
    """Offline annotation: map_batches(JudgePool) keeps one row per input row."""
    import ray

    from operators.judge import JudgePool

    image = {"bytes": png_bytes(), "path": None}
    items = [
        {
            "id": str(i),
            "images": [image],
            "question": "Describe.",
            "response_a": a,
            "response_b": b,
            "objects": OBJECTS,
        }
        for i, (a, b) in enumerate([(GOOD, BAD), (BAD, GOOD), (GOOD, ""), (GOOD, GOOD)])
    ]
    ds = ray.data.from_items(items).map_batches(
        JudgePool,
        fn_constructor_kwargs={"judge": {"kind": "objects"}},
        batch_size=2,
        concurrency=1,
        num_cpus=0.5,
    )
    out = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [(r["judge_winner"], r["judge_reason"]) for r in out] == [
        ("a", "agree"),
        ("b", "agree"),
        (None, "invalid"),
        (None, "tie"),
    ]
    assert out[0]["response_a"] == GOOD  # input columns pass through
