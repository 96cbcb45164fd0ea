"""JudgeEngine: judge batches of pair rows with a VLM (both orders) or the object annotations.

Ray-free; the Serve deployment (deploy/judge_app.py) and the Ray Data pool
(operators/judge.py) only wrap it.

Row contract (`JUDGE_COLUMNS`), one pair per row:
    image       {bytes, path} struct (`mmalign.schema.IMAGE`); or `images`, a list of them
                (prompt-record layout; the first one is used)
    question    the user's question about the image
    response_a  first candidate answer (y_a)
    response_b  second candidate answer (y_b)
    objects     annotated object classes (or their surface forms); kind="objects" only

A row that breaks the contract gets a verdict with reason "invalid" and a message in
`error`; a row the model fails on gets reason "error". Neither stops the rest of the batch
(Ray Data LLM users lose whole batches to one bad row; we do not).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mmalign.io import decode_image
from mmalign.judge import (
    PROMPT_STYLES,
    GenerateFn,
    PairRequest,
    Verdict,
    failed_verdict,
    judge_pairs,
    object_judge,
    object_score,
    score_verdict,
    verdict_dict,
)
from mmalign.metrics.vocab import ObjectVocabulary, load_vocabulary

JUDGE_COLUMNS: tuple[str, ...] = ("image", "question", "response_a", "response_b", "objects")


def _first_image(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """The row's image struct; raises ValueError naming the column when there is none."""
    image = row.get("image")
    if image is None:
        images = row.get("images")
        if images is not None and len(images) > 0:
            image = images[0]
    if not isinstance(image, Mapping):
        raise ValueError("image: missing (give 'image' {bytes, path} or a non-empty 'images')")
    if not image.get("bytes") and not image.get("path"):
        raise ValueError("image: neither bytes nor path")
    return image


def _object_names(row: Mapping[str, Any]) -> list[str]:
    """The row's annotated objects as names ({name, ...} dicts or plain strings)."""
    return [o["name"] if isinstance(o, Mapping) else str(o) for o in row["objects"]]


def _text_field(row: Mapping[str, Any], name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: missing or empty")
    return value


def validate_row(row: Mapping[str, Any], kind: str) -> str:
    """'' when `row` satisfies the judge row contract for `kind`, else a message naming the
    column. Checks presence only (no image decoding), so it is cheap enough for an HTTP
    front end to call before queueing the request."""
    try:
        _first_image(row)
        for name in ("question", "response_a", "response_b"):
            _text_field(row, name)
        if kind == "objects":
            objects = row.get("objects")
            if objects is None or isinstance(objects, str) or len(objects) == 0:
                raise ValueError("objects: kind='objects' needs a non-empty list of objects")
    except ValueError as err:
        return str(err)
    return ""


def hf_generate_fn(engine: Any, max_new_tokens: int) -> GenerateFn:
    """Adapt a generation engine (HFGenerationEngine or its vLLM subclass) to
    `generate(list[(PIL image, question)]) -> texts`.

    The question is wrapped by the processor's chat template (LLaVA-1.5/1.6 and the tiny
    model all ship one), decoding is greedy and runs to EOS or `max_new_tokens`, so the
    explanation after "Response N" is kept for the logs.
    """
    from mmalign.engines.hf_generation import SamplingSettings
    from mmalign.engines.mm_inputs import VLRequest

    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, stop_strings=())
    processor = engine.processor

    def generate(requests: Sequence[tuple[Any, str]]) -> list[str]:
        rows = []
        for image, question in requests:
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
            ]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            rows.append(VLRequest(prompt=prompt, image=image))
        return [out.text for out in engine.generate(rows, settings)]

    return generate


class JudgeEngine:
    """Judges pair rows; see the module docstring for the row contract.

    Args:
        kind: "vlm" (needs `generate`) or "objects" (needs `vocab`).
        generate: `generate(list[(PIL image, judge prompt)]) -> list[str]`, one text each.
        vocab: object vocabulary of the object judge (default: ShapesWorld's).
        both_orders: judge both presentation orders; keep a pair only when they agree.
        prompt_style: "full" or "compact" judge prompt (`mmalign.judge.format_judge_prompt`).
        batch_size: pairs per generate call (2 prompts a pair with both orders).
    """

    def __init__(
        self,
        kind: str,
        *,
        generate: GenerateFn | None = None,
        vocab: ObjectVocabulary | None = None,
        both_orders: bool = True,
        batch_size: int = 8,
        prompt_style: str = "full",
        reward_model: Any = None,
        tie_margin: float = 0.0,
    ) -> None:
        if kind not in ("vlm", "objects", "reward-model"):
            raise ValueError(f"kind must be 'vlm', 'objects' or 'reward-model', got {kind!r}")
        if kind == "reward-model" and reward_model is None:
            raise ValueError("kind='reward-model' needs a reward_model (RewardModel)")
        if kind == "vlm" and generate is None:
            raise ValueError("kind='vlm' needs a generate callable")
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if kind == "objects" and vocab is None:
            from mmalign.metrics.vocab import shapes_vocabulary

            vocab = shapes_vocabulary()
        self.kind = kind
        self.generate = generate
        self.vocab = vocab
        self.both_orders = both_orders
        self.batch_size = batch_size
        self.prompt_style = prompt_style
        self.reward_model, self.tie_margin = reward_model, tie_margin

    @classmethod
    def from_config(cls, cfg: Any, vocab: ObjectVocabulary | None = None) -> JudgeEngine:
        """Build from a `mmalign.config.JudgeConfig`: for kind='vlm' loads the judge model on
        `judge.engine` ("hf" or "vllm", mmalign.engines.factory)."""
        if cfg.kind == "reward-model":
            from mmalign.engines.reward_model import RewardModel

            return cls(
                "reward-model",
                reward_model=RewardModel.load(cfg.model, dtype=cfg.dtype),
                batch_size=cfg.batch_size,
                tie_margin=cfg.tie_margin,
            )
        if cfg.kind == "objects":
            vocab = vocab or load_vocabulary(cfg.vocabulary)  # judge.vocabulary
            return cls(
                "objects", vocab=vocab, both_orders=cfg.both_orders, batch_size=cfg.batch_size
            )
        import torch

        from mmalign.engines import factory

        device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        # judge.engine "vllm": greedy, unmasked decoding, which vLLM serves like HF
        engine = factory.load_generation_engine(
            cfg.engine, cfg.model, cfg.vllm_gpu_memory, dtype=cfg.dtype, device=device
        )
        return cls(
            "vlm",
            generate=hf_generate_fn(engine, cfg.max_new_tokens),
            both_orders=cfg.both_orders,
            batch_size=cfg.batch_size,
            prompt_style=cfg.prompt_style,
        )

    def judge(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One verdict dict (keys `mmalign.judge.VERDICT_KEYS`) per row, in order."""
        verdicts: list[Verdict | None] = [None] * len(rows)
        todo: list[tuple[int, PairRequest]] = []
        for i, row in enumerate(rows):
            problem = validate_row(row, self.kind)
            if problem:
                verdicts[i] = failed_verdict(self.kind, "invalid", problem)
            elif self.kind == "objects":
                verdicts[i] = self._judge_objects(row)
            else:
                try:
                    image = decode_image(dict(_first_image(row)))
                except Exception as err:  # noqa: BLE001 - unreadable/unreachable image
                    verdicts[i] = failed_verdict(self.kind, "invalid", str(err))
                    continue
                todo.append(
                    (i, PairRequest(image, row["question"], row["response_a"], row["response_b"]))
                )
        judge_chunk = self._score_chunk if self.kind == "reward-model" else self._judge_chunk
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            for (i, _), verdict in zip(chunk, judge_chunk([p for _, p in chunk])):
                verdicts[i] = verdict
        return [verdict_dict(v) for v in verdicts if v is not None]

    def score(self, rows: Sequence[Mapping[str, Any]]) -> list[float]:
        """A scalar reward per row's `response` (the RL baselines' reward role): the object
        score (`mmalign.judge.object_score`, kind objects: needs `objects`) or the reward
        model's (kind reward-model). A generative judge only compares pairs: ValueError."""
        if self.kind == "objects":
            assert self.vocab is not None
            out = []
            for row in rows:
                question = str(row.get("question") or "")
                out.append(object_score(row["response"], _object_names(row), self.vocab, question))
            return out
        if self.kind == "reward-model":
            items = [
                {"image": decode_image(dict(_first_image(r))), "prompt": r["question"],
                 "response": r["response"]}
                for r in rows
            ]  # fmt: skip
            scores: list[float] = []
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                scores += [float(x) for x in self.reward_model.score(chunk, "response")]
            return scores
        raise ValueError(
            "judge.kind 'vlm' compares pairs; scoring needs 'objects' or 'reward-model'"
        )

    def _judge_objects(self, row: Mapping[str, Any]) -> Verdict:
        assert self.vocab is not None
        try:
            return object_judge(
                row["response_a"],
                row["response_b"],
                _object_names(row),
                self.vocab,
                question=str(row.get("question") or ""),
            )
        except ValueError as err:
            return failed_verdict("objects", "invalid", f"objects: {err}")

    def _judge_chunk(self, pairs: list[PairRequest]) -> list[Verdict]:
        """Judge a chunk in one call; if that fails, pair by pair so one bad row fails alone."""
        assert self.generate is not None
        try:
            return judge_pairs(pairs, self.generate, self.both_orders, self.prompt_style)
        except Exception as err:  # noqa: BLE001 - isolate the failing row(s) below
            if len(pairs) == 1:
                return [_error_verdict(err)]
        return [self._judge_alone(p) for p in pairs]

    def _score_chunk(self, pairs: list[PairRequest]) -> list[Verdict]:
        """Reward-model verdicts: each answer scored alone; a failing chunk is retried
        pair by pair so one bad row fails alone."""
        rows = [{"image": p.image, "prompt": p.question, "a": p.response_a, "b": p.response_b}
                for p in pairs]  # fmt: skip
        try:
            a, b = self.reward_model.score(rows, "a"), self.reward_model.score(rows, "b")
            return [score_verdict(float(x), float(y), self.tie_margin) for x, y in zip(a, b)]
        except Exception as err:  # noqa: BLE001 - isolate the failing row(s) below
            if len(pairs) == 1:
                return [_error_verdict(err, "reward-model")]
        return [self._score_chunk([p])[0] for p in pairs]

    def _judge_alone(self, pair: PairRequest) -> Verdict:
        assert self.generate is not None
        try:
            return judge_pairs([pair], self.generate, self.both_orders, self.prompt_style)[0]
        except Exception as err:  # noqa: BLE001 - reported per row, the batch goes on
            return _error_verdict(err)


def _error_verdict(err: Exception, judge: str = "vlm") -> Verdict:
    message = f"judge failed: {type(err).__name__}: {err}"
    if "out of memory" in str(err).lower():
        message += " (lower judge.batch_size or max_new_tokens, or give the judge more memory)"
    return failed_verdict(judge, "error", message)
