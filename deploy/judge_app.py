"""The pairwise judge as a Ray Serve application (HTTP + deployment handle).

    serve run deploy/serve_judge.yaml                      # the config file (recommended)
    serve run deploy.judge_app:build_app kind=objects      # or the builder with overrides

HTTP (JSON), one pair a request; requests are batched on the replica (`@serve.batch`):

    POST /judge  {"image_b64": "<base64 PNG/JPEG>" | "image_uri": "s3://... or /path",
                  "question": "...", "response_a": "...", "response_b": "...",
                  "objects": ["red circle", ...]}          # objects: kind=objects only
    -> 200 verdict (keys `mmalign.judge.VERDICT_KEYS`: winner "a"|"b"|null, kept, reason,
       raw_a, raw_b, ...); 422 {"error": ..., "verdict": ...} for a malformed request
       (no image, empty response, unreadable image); 500 when the judge failed on the row.
    GET /stats   this replica's JudgeStats counts and batch sizes;  GET /healthz  "ok".

`image_uri` is read by the replica with its own storage access (local path or s3://):
serve the port to trusted clients only. Python callers use the handle:
`await handle.judge.remote(row)` with the row contract of mmalign.engines.judge_engine.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at
# runtime, and Serve's ingress wrapper cannot resolve string annotations.
import asyncio
import base64
import binascii
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve import Application

from mmalign.config import JudgeConfig, from_dict, parse_resources, to_dict
from mmalign.engines.judge_engine import JudgeEngine, validate_row
from mmalign.judge import JudgeStats

api = FastAPI(title="mmalign judge")


class JudgeRequest(BaseModel):
    """One pair to judge over HTTP (the image as base64 bytes or a URI, not both)."""

    image_b64: str | None = None
    image_uri: str | None = None
    question: str = ""
    response_a: str = ""
    response_b: str = ""
    objects: list[str] | None = None


def request_to_row(req: JudgeRequest) -> dict[str, Any]:
    """HTTP request -> engine row. Raises ValueError naming the field on a bad image field."""
    if req.image_b64 and req.image_uri:
        raise ValueError("image: give image_b64 or image_uri, not both")
    image: dict[str, Any] | None = None
    if req.image_b64:
        try:
            image = {"bytes": base64.b64decode(req.image_b64, validate=True), "path": None}
        except (binascii.Error, ValueError):
            raise ValueError("image_b64: not valid base64") from None
    elif req.image_uri:
        image = {"bytes": None, "path": req.image_uri}
    row: dict[str, Any] = {
        "image": image,
        "question": req.question,
        "response_a": req.response_a,
        "response_b": req.response_b,
    }
    if req.objects is not None:
        row["objects"] = req.objects
    return row


def _error(status: int, message: str, verdict: dict[str, Any] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "verdict": verdict})


@serve.deployment(name="Judge")
@serve.ingress(api)
class JudgeDeployment:
    """One judge replica: owns a JudgeEngine, batches concurrent requests into one call.

    Args:
        judge: a JudgeConfig as a dict (mmalign.config.to_dict), passed explicitly so no
            setting travels through environment variables.
    """

    def __init__(self, judge: dict[str, Any]) -> None:
        self.cfg: JudgeConfig = from_dict(JudgeConfig, judge, "judge")
        self.cfg.validate("judge")
        self.engine = JudgeEngine.from_config(self.cfg)
        self.stats = JudgeStats()
        self.batches = self.largest_batch = 0
        self.judge.set_max_batch_size(self.cfg.batch_size)  # type: ignore[attr-defined]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def judge(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Handle entry point: one row in, one verdict dict out (batched by Serve)."""
        # The engine is synchronous (torch); a thread keeps the replica's event loop free.
        verdicts = await asyncio.to_thread(self.engine.judge, rows)
        self.stats.update(verdicts)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(rows))
        return verdicts

    @api.post("/judge")
    async def judge_http(self, req: JudgeRequest) -> JSONResponse:
        try:
            row = request_to_row(req)
        except ValueError as err:
            return _error(422, str(err))
        problem = validate_row(row, self.cfg.kind)
        if problem:  # rejected before queueing: a bad request never joins a batch
            return _error(422, problem)
        verdict = await self.judge(row)
        if verdict["reason"] == "invalid":
            return _error(422, verdict["error"], verdict)
        if verdict["reason"] == "error":
            return _error(500, verdict["error"], verdict)
        return JSONResponse(verdict)

    @api.get("/stats")
    async def stats_http(self) -> JSONResponse:
        """This replica's counts (sum over replicas for the service's totals)."""
        return JSONResponse(self.stats_dict())

    def stats_dict(self) -> dict[str, float]:
        """Handle-callable form of GET /stats."""
        return {
            **self.stats.as_dict(),
            "judge/batches": self.batches,
            "judge/largest_batch": self.largest_batch,
        }

    @api.get("/healthz")
    async def healthz(self) -> str:
        return "ok"


def deployment_options(cfg: JudgeConfig) -> dict[str, Any]:
    """The Judge deployment's options, derived from the config (what `build_app` sets).

    Replica resources come from num_cpus, num_gpus and resources; `concurrency` is the
    autoscaling ceiling. A Serve config file's `deployments:` section replaces these option
    by option (`ray_actor_options` and `autoscaling_config` as whole dicts, so a section that
    leaves out num_gpus runs the replica without a GPU): such a section must repeat them.
    """
    return {
        "ray_actor_options": {
            "num_cpus": cfg.num_cpus,
            "num_gpus": cfg.num_gpus,
            "resources": parse_resources(cfg.resources),  # e.g. judge_node: the 80 GB nodes
        },
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": cfg.concurrency,
            "target_ongoing_requests": cfg.batch_size,
        },
        # Room for a full batch plus the next one queueing; fewer would cap batches.
        "max_ongoing_requests": 2 * cfg.batch_size,
    }


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder; `args` are JudgeConfig fields (validated, typos fail).

    The deployment's options come from the config (`deployment_options`).
    """
    cfg: JudgeConfig = from_dict(JudgeConfig, dict(args or {}), "judge")
    cfg.validate("judge")
    options = deployment_options(cfg)
    return JudgeDeployment.options(**options).bind(to_dict(cfg))  # type: ignore[attr-defined]
