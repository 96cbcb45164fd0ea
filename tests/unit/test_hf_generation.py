"""HFGenerationEngine on a tiny random LLaVA: our decode loop vs transformers, masks, stops.

The tiny model's default init (std 0.02) makes a 2-layer model repeat one token forever,
which would make "outputs are equal" vacuous; the fixture re-draws the weight matrices
with std 0.08 so that outputs vary with the prompt, the image and the positions.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from mmalign.engines.hf_generation import HFGenerationEngine, SamplingSettings
from mmalign.engines.mm_inputs import VLRequest, build_mm_batch
from mmalign.models.tiny_llava import build_tiny_llava, format_prompt
from mmalign.noise import noisy_pil_image

QUESTIONS = [
    "Describe the image.",
    "Is there a red circle in the image?",
    "What colour is the square?",
    "How many shapes are there?",
    "Where is the blue triangle?",
    "Describe.",
]
PREFIXES = ["There is", "", "A red", "Two", "", "The"]


@pytest.fixture(scope="module")
def engine() -> Iterator[HFGenerationEngine]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, processor = build_tiny_llava("small", seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.08, generator=gen)
    yield HFGenerationEngine(model, processor)
    torch.set_num_threads(threads)


def _images(n: int, seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")) for _ in range(n)]


def _requests(rho_th: float | None = None, with_prefix: bool = True) -> list[VLRequest]:
    rng = np.random.default_rng(1)
    return [
        VLRequest(
            format_prompt(q),
            image,
            response=prefix if with_prefix else "",
            visible=None if rho_th is None else rng.random(64) >= rho_th,
            seed=i,
        )
        for i, (q, image, prefix) in enumerate(zip(QUESTIONS, _images(6), PREFIXES))
    ]


def _hf_logprobs(engine: HFGenerationEngine, req: VLRequest) -> torch.Tensor:
    """Reference: transformers' own forward (input_ids + pixel_values) on one unpadded row."""
    proc = engine.processor
    enc = proc(images=[req.image], text=[req.prompt], return_tensors="pt")
    resp = proc.tokenizer(" " + req.response, add_special_tokens=False)["input_ids"]
    ids = torch.cat([enc["input_ids"], torch.tensor([resp])], dim=1)
    with torch.no_grad():
        logits = engine.model(input_ids=ids, pixel_values=enc["pixel_values"]).logits[0]
    start = enc["input_ids"].shape[1]
    logp = torch.log_softmax(logits[start - 1 : -1].float(), -1)
    return logp.gather(-1, torch.tensor(resp)[:, None])[:, 0]


def test_greedy_matches_model_generate_on_cpu(engine: HFGenerationEngine) -> None:
    reqs = _requests(with_prefix=False)
    settings = SamplingSettings(max_new_tokens=16, stop_strings=())
    ours = engine.generate(reqs, settings)
    proc = engine.processor
    enc = proc(
        images=[r.image for r in reqs],
        text=[r.prompt for r in reqs],
        return_tensors="pt",
        padding=True,
    )
    assert len(set(enc["attention_mask"].sum(1).tolist())) > 1  # rows really are left-padded
    ref = engine.model.generate(**enc, max_new_tokens=16, do_sample=False)[
        :, enc["input_ids"].shape[1] :
    ]
    for out, row in zip(ours, ref.tolist()):
        assert out.token_ids == row[: len(out.token_ids)]
        assert out.finish_reason == "length" and len(out.token_ids) == 16
    assert len({tuple(o.token_ids) for o in ours}) == len(ours)  # not one degenerate output


def test_all_visible_mask_equals_unmasked_on_cpu(engine: HFGenerationEngine) -> None:
    settings = SamplingSettings(max_new_tokens=12, stop_strings=())
    plain = [o.token_ids for o in engine.generate(_requests(), settings)]
    for mode in ("mask", "drop"):
        all_visible = [
            VLRequest(r.prompt, r.image, r.response, np.ones(64, dtype=bool), r.seed)
            for r in _requests()
        ]
        got = engine.generate(all_visible, SamplingSettings(12, stop_strings=(), mask_mode=mode))
        assert [o.token_ids for o in got] == plain
    # log-probs of the batched, left-padded builder == transformers' plain forward
    reqs = [r for r in _requests() if r.response]
    for got, req in zip(engine.continuation_logprobs(reqs), reqs):
        torch.testing.assert_close(got, _hf_logprobs(engine, req), atol=1e-4, rtol=1e-4)


def test_mask_and_drop_differ_only_by_positions_on_cpu(engine: HFGenerationEngine) -> None:
    reqs = [r for r in _requests(rho_th=0.5) if r.response]
    model = engine.model

    def response_logits(batch) -> list[torch.Tensor]:  # noqa: ANN001
        with torch.no_grad():
            logits = model(
                inputs_embeds=batch.inputs_embeds,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            ).logits
        return [
            logits[b, int(s) - 1 : int(s) - 1 + len(ids)]
            for b, (s, ids) in enumerate(zip(batch.response_start, batch.response_ids))
        ]

    masked = build_mm_batch(model, engine.processor, reqs, "mask")
    dropped = build_mm_batch(model, engine.processor, reqs, "drop")
    # "mask": every token keeps its original position, hidden image rows included
    assert masked.attention_mask.sum() < masked.attention_mask.numel()
    lm, ld = response_logits(masked), response_logits(dropped)
    assert max((a - b).abs().max().item() for a, b in zip(lm, ld)) > 1e-2
    # give the masked batch the positions that dropping produces -> same logits
    masked.position_ids = (masked.attention_mask.cumsum(1) - 1).clamp(min=0)
    for a, b in zip(response_logits(masked), ld):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_measure_mask_vs_drop_on_cpu(engine: HFGenerationEngine) -> None:
    """Print how far the two semantics drift apart as more of the image is hidden."""
    settings = {m: SamplingSettings(16, stop_strings=(), mask_mode=m) for m in ("mask", "drop")}
    print("\nrho_th  mean|dlogp|/token  greedy tokens differing")
    for rho in (0.0, 0.5, 0.9, 0.99, 1.0):
        reqs = [r for r in _requests(rho_th=rho) if r.response]
        lp = {m: engine.continuation_logprobs(reqs, m) for m in settings}
        dlogp = torch.cat([a - b for a, b in zip(lp["mask"], lp["drop"])]).abs().mean().item()
        toks = {
            m: [o.token_ids for o in engine.generate(_requests(rho), s)]
            for m, s in settings.items()
        }
        pairs = [(a, b) for ra, rb in zip(toks["mask"], toks["drop"]) for a, b in zip(ra, rb)]
        differ = sum(a != b for a, b in pairs) / len(pairs)
        print(f"{rho:6.2f}  {dlogp:17.4f}  {differ:6.1%}")
        if rho == 0.0:  # nothing hidden: the two semantics coincide
            assert dlogp < 1e-5 and differ == 0.0
        else:
            assert dlogp > 1e-3


def test_stop_strings_on_cpu(engine: HFGenerationEngine) -> None:
    import copy

    reqs = _requests()
    free = engine.generate(reqs, SamplingSettings(max_new_tokens=24, stop_strings=()))
    # Make full stops likely but not everywhere: copy the model and give "." 1.02x the
    # output embedding of the token row 0 emits at step 3, so "." wins wherever that
    # token came within 2% of the top logit (rows then stop after 1, 2, 17 or no tokens).
    model = copy.deepcopy(engine.model)
    dot = engine.tokenizer.convert_tokens_to_ids(".")
    with torch.no_grad():
        model.lm_head.weight[dot] = 1.02 * model.lm_head.weight[free[0].token_ids[3]]
    dotty = HFGenerationEngine(model, engine.processor)
    free = dotty.generate(reqs, SamplingSettings(max_new_tokens=24, stop_strings=()))
    assert "." in free[0].text and any("." not in f.text for f in free)
    stopped = dotty.generate(reqs, SamplingSettings(max_new_tokens=24))  # default: "."
    # a "." stops a row only where whitespace follows it (a sentence end, not "2.5")
    ends = [
        [i for i, ch in enumerate(f.text[:-1]) if ch == "." and f.text[i + 1].isspace()]
        for f in free
    ]
    assert any(ends) and any(not e for e in ends)
    for f, s, e in zip(free, stopped, ends):
        if e:
            assert s.finish_reason == "stop"
            assert s.text == f.text[: e[0] + 1]
            assert s.token_ids == f.token_ids[: len(s.token_ids)]
            assert tok_text(engine, s.token_ids).startswith(s.text)  # no token past the cut
            assert not tok_text(engine, s.token_ids[:-1]).startswith(s.text)
        else:
            assert s.text == f.text and s.finish_reason == "length"
    # a stop string spanning a token boundary: the last char of token 3 + first of token 4
    tok = engine.tokenizer
    row = next(f for f in free if tok.decode(f.token_ids[3:4]) and tok.decode(f.token_ids[4:5]))
    stop = tok.decode(row.token_ids[3:4])[-1] + tok.decode(row.token_ids[4:5])[0]
    out = dotty.generate([reqs[free.index(row)]], SamplingSettings(24, stop_strings=(stop,)))[0]
    hits = [i + 2 for i in range(len(row.text) - 2) if row.text[i : i + 2] == stop]
    first = next((h for h in hits if row.text[h].isspace()), None)
    if first is None:  # the stop is never followed by whitespace: no sentence end
        assert out.text == row.text and out.finish_reason == "length"
    else:
        assert out.text == row.text[:first] and out.finish_reason == "stop"


def test_eos_ends_a_row_on_cpu(engine: HFGenerationEngine) -> None:
    reqs = _requests()[:2]
    free = engine.generate(reqs, SamplingSettings(max_new_tokens=10, stop_strings=()))
    eos = free[0].token_ids[5]  # declare a token the model emits to be an EOS
    custom = HFGenerationEngine(engine.model, engine.processor, eos_token_ids=[eos])
    out = custom.generate(reqs, SamplingSettings(max_new_tokens=10, stop_strings=()))
    first = free[0].token_ids.index(eos)
    assert out[0].finish_reason == "eos" and out[0].token_ids == free[0].token_ids[:first]
    assert eos not in out[0].token_ids


def test_sampling_is_seeded_on_cpu(engine: HFGenerationEngine) -> None:
    settings = SamplingSettings(max_new_tokens=12, temperature=1.0, top_p=0.9, stop_strings=())
    a = [o.token_ids for o in engine.generate(_requests(0.5), settings)]
    b = [o.token_ids for o in engine.generate(_requests(0.5), settings)]
    assert a == b
    reseeded = [
        VLRequest(r.prompt, r.image, r.response, r.visible, r.seed + 100) for r in _requests(0.5)
    ]
    c = [o.token_ids for o in engine.generate(reseeded, settings)]
    assert c != a
    greedy = [
        o.token_ids for o in engine.generate(_requests(0.5), SamplingSettings(12, stop_strings=()))
    ]
    assert a != greedy


@pytest.mark.parametrize("mode", ["mask", "drop"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_equals_single_rows_on_cpu(
    engine: HFGenerationEngine, mode: str, temperature: float
) -> None:
    settings = SamplingSettings(16, temperature=temperature, stop_strings=(), mask_mode=mode)  # type: ignore[arg-type]
    reqs = _requests(rho_th=0.5)
    batched = engine.generate(reqs, settings)
    for req, out in zip(reqs, batched):
        assert engine.generate([req], settings)[0] == out


def test_teacher_forced_argmax_under_noise_on_cpu(engine: HFGenerationEngine) -> None:
    answer = "There is a red circle and a blue square."
    clean = _images(2, seed=3)
    noisy = [
        noisy_pil_image(im, 500, torch.Generator().manual_seed(i)) for i, im in enumerate(clean)
    ]
    reqs = [VLRequest(format_prompt("Describe the image."), im, answer) for im in noisy]
    outs = engine.teacher_forced_argmax(reqs)
    for req, out in zip(reqs, outs):
        # argmax over the same logits transformers computes; EOS position included
        proc = engine.processor
        enc = proc(images=[req.image], text=[req.prompt], return_tensors="pt")
        resp = proc.tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [
            proc.tokenizer.eos_token_id
        ]
        ids = torch.cat([enc["input_ids"], torch.tensor([resp])], dim=1)
        with torch.no_grad():
            logits = engine.model(input_ids=ids, pixel_values=enc["pixel_values"]).logits[0]
        start = enc["input_ids"].shape[1]
        assert out.token_ids == logits[start - 1 : -1].argmax(-1).tolist()
        assert len(out.token_ids) == len(resp)
    clean_out = engine.teacher_forced_argmax(
        [VLRequest(r.prompt, im, answer) for r, im in zip(reqs, clean)]
    )
    assert [o.token_ids for o in clean_out] != [o.token_ids for o in outs]


def test_bdhs_generate_fn_on_cpu(engine: HFGenerationEngine) -> None:
    from mmalign.bdhs import bdhs_sample
    from mmalign.config import BDHSConfig

    image = _images(1)[0]
    reference = "There is a red circle. It is left of a blue square."
    prompt = format_prompt("Describe the image.")
    generate_fn = engine.bdhs_generate_fn(prompt, image, SamplingSettings(max_new_tokens=12))

    def embed(texts: list[str]) -> np.ndarray:
        return np.ones((len(texts), 2))  # cosine 1.0: the gate never passes

    res = bdhs_sample(
        reference,
        generate_fn,
        embed,
        np.random.default_rng(0),
        BDHSConfig(rho_th=0.99, n_bdhs=2),
        num_image_positions=engine.image_token_count(prompt, image),
    )
    assert res.final_unguided and res.tries == 2 and res.rejected
    assert len(res.similarities) == 2 and res.similarities[0] == pytest.approx(1.0)


def tok_text(engine: HFGenerationEngine, ids: list[int]) -> str:
    return engine.tokenizer.decode(ids, skip_special_tokens=True)
