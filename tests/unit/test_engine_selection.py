"""`engine: vllm` is honoured or refused loudly wherever the config offers it (no vllm needed).

The config refuses vLLM with BDHS "mask" semantics at load time; the judge, the BDHS
operator and the policy sampler reach the engine the config names; without the vllm
package every vLLM path raises an ImportError that says how to install it, before any
model is loaded. The vLLM engine itself is tested in tests/unit/test_vllm_engine.py.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mmalign import config as C
from mmalign.engines import factory
from mmalign.engines.hf_generation import HFGenerationEngine
from mmalign.engines.learner import PreferenceLearner
from mmalign.engines.vllm_generation import (
    VLLMGenerationEngine,
    split_adapter_state,
    vllm_max_lora_rank,
)

NO_VLLM = importlib.util.find_spec("vllm") is None
STUB = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace()), processor=None)


def test_bdhs_runs_refuse_vllm_with_mask_semantics_on_cpu() -> None:
    from pipelines.online_dpo import check_config

    cfg = C.load(None, {"sampler.engine": "vllm"})  # bdhs.mask_mode defaults to "mask"
    with pytest.raises(C.ConfigError, match=r"^bdhs\.mask_mode: must be 'drop' when sampler"):
        C.check_bdhs_engine(cfg.sampler, cfg.bdhs)
    online_bdhs = {"sampler.engine": "vllm", "pipeline.mode": "online-bdhs"}
    online_bdhs["data.offline_pairs"] = "pairs.parquet"
    with pytest.raises(C.ConfigError, match=r"^bdhs\.mask_mode"):
        check_config(C.load(None, online_bdhs))
    check_config(cfg)  # plain online sampling never masks: vLLM with any mask_mode is fine
    mdpo = {"pipeline.mode": "online-bdhs", "data.offline_pairs": "p.parquet"}
    with pytest.raises(C.ConfigError, match=r"^learner\.loss: mode 'online-bdhs'"):
        check_config(C.load(None, {**mdpo, "learner.loss": "mdpo"}))
    for ok in ({"bdhs.variant": "povid"}, {"bdhs.mask_mode": "drop"}):
        ok_cfg = C.load(None, {"sampler.engine": "vllm", **ok})
        C.check_bdhs_engine(ok_cfg.sampler, ok_cfg.bdhs)
    preset = C.load(str(C.EMBEDDED_PRESET.parent / "llava-1.6-7b.yaml"))
    assert (preset.sampler.engine, preset.bdhs.mask_mode, preset.judge.engine) == (
        "vllm",
        "drop",
        "hf",  # a 34B judge cannot hold HF's and vLLM's copies on one 80 GB GPU
    )


class Calls(list):
    """(engine, path) per factory call; `memory` holds each call's vllm_gpu_memory."""

    def __init__(self) -> None:
        super().__init__()
        self.memory: list[float] = []


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Record which engine the callers ask the factory for (no model is loaded)."""
    seen = Calls()

    def fake(engine: str, path: str, vllm_gpu_memory: float = 0.5, **kwargs: Any) -> Any:
        seen.append((engine, path))
        memory.append(vllm_gpu_memory)
        return STUB

    memory: list[float] = seen.memory

    monkeypatch.setattr(factory, "load_generation_engine", fake)
    return seen


def test_judge_and_bdhs_operator_use_the_configured_engine_on_cpu(calls: Calls) -> None:
    from mmalign.engines.judge_engine import JudgeEngine
    from operators.bdhs import BDHSOperator

    cfg = C.JudgeConfig(engine="vllm", model="judge-dir", vllm_gpu_memory=0.3)
    judge = JudgeEngine.from_config(cfg)
    assert judge.kind == "vlm" and calls[-1] == ("vllm", "judge-dir")
    pool = [object()]  # an embedder pool handle: the operator loads no embedder
    vllm = C.SamplerConfig(model="policy-dir", engine="vllm", vllm_gpu_memory=0.7)
    BDHSOperator(vllm, C.BDHSConfig(variant="bdhs", mask_mode="drop"), embedder_pool=pool)
    assert calls[-1] == ("vllm", "policy-dir")
    assert calls.memory == [0.3, 0.7]  # each config's share reaches the factory
    BDHSOperator(vllm, C.BDHSConfig(variant="povid"))  # one HF forward: vLLM adds nothing
    assert calls[-1] == ("hf", "policy-dir")
    with pytest.raises(ValueError, match=r"bdhs\.mask_mode: must be 'drop'"):
        BDHSOperator(vllm, C.BDHSConfig(variant="bdhs", mask_mode="mask"), embedder_pool=pool)
    assert len(calls) == 3, "the mask refusal must come before the model is loaded"


def test_factory_reaches_the_named_class_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for cls, name in ((HFGenerationEngine, "hf"), (VLLMGenerationEngine, "vllm")):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, p, **kw: (c, p, kw)))
        got = factory.load_generation_engine(name, "dir", 0.4, dtype="float32")
        want = {"dtype": "float32", **({"gpu_memory_utilization": 0.4} if name == "vllm" else {})}
        assert got == (cls, "dir", want)
    with pytest.raises(ValueError, match="engine must be one of"):
        factory.load_generation_engine("tgi", "dir")


@pytest.mark.skipif(not NO_VLLM, reason="vllm is installed here")
def test_missing_vllm_raises_a_clear_import_error_on_cpu() -> None:
    from mmalign.engines.judge_engine import JudgeEngine
    from mmalign.engines.policy import PolicySampler
    from operators.bdhs import BDHSOperator

    hint = r"scripts/setup_vllm\.sh"
    # model paths that do not exist: the ImportError must come before any loading
    with pytest.raises(ImportError, match=hint):
        factory.load_generation_engine("vllm", "/no/such/model")
    with pytest.raises(ImportError, match=hint):
        JudgeEngine.from_config(C.JudgeConfig(engine="vllm", model="/no/such/model"))
    with pytest.raises(ImportError, match=hint):
        BDHSOperator(
            C.SamplerConfig(model="/no/such/model", engine="vllm"),
            C.BDHSConfig(mask_mode="drop"),
            embedder_pool=[object()],
        )
    with pytest.raises(ImportError, match=hint):
        PolicySampler(None, None, C.LearnerConfig(lora_r=4, lora_alpha=8), engine="vllm")
    with pytest.raises(ValueError, match="sampler.engine must be one of"):
        PolicySampler(None, None, None, engine="tgi")


def test_vllm_lora_rank_rounds_up_to_an_allowed_value_on_cpu() -> None:
    assert [vllm_max_lora_rank(r) for r in (1, 4, 8, 100, 128, 512)] == [1, 8, 8, 128, 128, 512]
    with pytest.raises(ValueError, match="learner.lora_r=600"):
        vllm_max_lora_rank(600)


def test_split_adapter_state_of_a_learner_with_projector_on_cpu() -> None:
    from mmalign.models.tiny_llava import build_tiny_llava

    model, processor = build_tiny_llava("small", seed=0)
    names = set(model.state_dict())
    settings = C.LearnerConfig(lora_r=4, lora_alpha=8, projector_lr=1e-6)
    state = PreferenceLearner(model, processor, settings).adapter_state()
    lora, projector = split_adapter_state(state)
    assert len(lora) + len(projector) == len(state) and lora and projector
    assert all(".language_model." in k and "lora_" in k for k in lora)
    # projector tensors come back under the LLaVA's own names, ready for load_state_dict
    assert set(projector) == {k for k in names if k.startswith("model.multi_modal_projector.")}
    with pytest.raises(ValueError, match="cannot serve"):
        split_adapter_state({**state, "base_model.model.lm_head.weight": torch.zeros(1)})
