"""attn_implementation="fastinfer" in Hugging Face transformers against "sdpa", on random tiny models.

Models are built in-test from configs (hidden 64, 2 layers): no download. fp32 throughout, so the
tolerances are tight: the two implementations differ only in summation order.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import fastinfer

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config  # noqa: E402

from fastinfer.integrations import transformers as hf  # noqa: E402

VOCAB = 97


def tiny(kind: str, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        return LlamaConfig(**common, **extra)
    return Qwen3Config(**common, head_dim=16, **extra)


def build(config, impl: str, seed: int):
    torch.manual_seed(seed)
    config = config.__class__.from_dict(config.to_dict())
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float32)
    assert model.config._attn_implementation == impl
    return model


def batch(gen, lengths, seq):
    """Left-padded ids and mask (generation style) for the given real lengths."""
    ids = torch.randint(1, VOCAB, (len(lengths), seq), generator=gen)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, seq - n:] = 1
    return ids, mask


def step(model, ids, mask):
    """Logits and the gradients of one causal-LM training step (padded positions excluded)."""
    model.zero_grad()
    labels = ids.masked_fill(mask == 0, -100) if mask is not None else ids
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_step_close(a, b, mask):
    logits_a, grads_a = a
    logits_b, grads_b = b
    keep = torch.ones(logits_a.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(logits_a[keep], logits_b[keep], rtol=1e-4, atol=1e-4)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_matches_sdpa(gen, kind, padded):
    cfg = tiny(kind)
    ids, mask = batch(gen, [12, 7, 12], 12) if padded else (torch.randint(1, VOCAB, (2, 12), generator=gen), None)
    mine = build(cfg, "fastinfer", 0)
    ref = build(cfg, "sdpa", 0)
    assert_step_close(step(mine, ids, mask), step(ref, ids, mask), mask)


def test_sliding_window_and_softcap_reach_the_kernels(gen, monkeypatch):
    """Qwen3 with sliding-window layers: matches sdpa (whose mask encodes the window), and the
    window is really applied (a window of 3 changes the result)."""
    cfg = tiny("qwen3", use_sliding_window=True, sliding_window=3, layer_types=["sliding_attention"] * 2)
    ids = torch.randint(1, VOCAB, (2, 10), generator=gen)
    mine, ref = build(cfg, "fastinfer", 1), build(cfg, "sdpa", 1)
    assert_step_close(step(mine, ids, None), step(ref, ids, None), None)

    seen = []
    real = fastinfer.kernels.attention.flash_attn_func

    def spy(*args, **kw):
        seen.append((kw["window_size"], kw["softcap"]))
        return real(*args, **kw)

    monkeypatch.setattr(fastinfer.kernels.attention, "flash_attn_func", spy)
    q = torch.randn(1, 4, 6, 16)
    module = torch.nn.Module()
    module.is_causal = True
    hf.fastinfer_attention_forward(module, q, q, q, None, scaling=0.25, sliding_window=3, softcap=30.0)
    assert seen == [((2, 2), 30.0)]
    # softcap changes the answer when the scores are large
    big = torch.randn(1, 2, 5, 16) * 8
    a, _ = hf.fastinfer_attention_forward(module, big, big, big, None, softcap=1.0)
    b, _ = hf.fastinfer_attention_forward(module, big, big, big, None)
    assert (a - b).abs().max() > 1e-2


def test_generate_with_left_padding_matches_sdpa(gen):
    """Prefill with a padded batch, then cached decode steps (query length 1, 2-D mask)."""
    cfg = tiny("llama")
    ids, mask = batch(gen, [9, 5], 9)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    mine = build(cfg, "fastinfer", 2).generate(input_ids=ids, attention_mask=mask, **kw)
    ref = build(cfg, "sdpa", 2).generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(mine, ref)


def test_packed_sequences_by_position_ids(gen):
    """Batch 1 holding two sequences (positions restart): same logits as running them apart."""
    cfg = tiny("llama")
    model = build(cfg, "fastinfer", 3)
    a, b = torch.randint(1, VOCAB, (1, 5), generator=gen), torch.randint(1, VOCAB, (1, 7), generator=gen)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        out = model(input_ids=packed, position_ids=pos).logits
        sep = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], 1)
    torch.testing.assert_close(out, sep, rtol=1e-4, atol=1e-4)


def test_registration_is_lazy_and_happens_on_import():
    """`import fastinfer` imports neither torch nor transformers; importing transformers alone
    registers nothing; loading its modeling code registers "fastinfer", and the hook is gone."""
    script = textwrap.dedent("""
        import sys
        import fastinfer
        assert "transformers" not in sys.modules and "torch" not in sys.modules
        from fastinfer.integrations import transformers as hf
        assert hf._hook in sys.meta_path
        import transformers
        assert not hf._registered  # the package alone is lazy: nothing registered, nothing forced
        from transformers import AutoModelForCausalLM
        from transformers.modeling_utils import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        assert AttentionInterface._global_mapping["fastinfer"] is hf.fastinfer_attention_forward
        assert "fastinfer" in AttentionMaskInterface._global_mapping
        assert hf._hook not in sys.meta_path
        assert type(transformers.modeling_utils.__loader__).__name__ != "_CallbackLoader"
    """)
    subprocess.run([sys.executable, "-c", script], check=True)


def test_install_registers_at_once_when_transformers_is_loaded(monkeypatch):
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    monkeypatch.delitem(AttentionInterface._global_mapping, "fastinfer")
    monkeypatch.delitem(AttentionMaskInterface._global_mapping, "fastinfer")
    monkeypatch.setattr(hf, "_registered", False)
    before = list(sys.meta_path)
    hf.install()
    assert AttentionInterface._global_mapping["fastinfer"] is hf.fastinfer_attention_forward
    assert AttentionMaskInterface._global_mapping["fastinfer"] is not None
    assert sys.meta_path == before


def test_after_import_hook_runs_once_after_the_module(tmp_path, monkeypatch):
    """The post-import hook on a throwaway module: the callback sees the executed module, the
    module keeps its real loader, and the hook removes itself."""
    (tmp_path / "fi_hook_probe.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    hook = hf._AfterImport("fi_hook_probe", lambda: calls.append(sys.modules["fi_hook_probe"].VALUE))
    sys.meta_path.insert(0, hook)
    try:
        import fi_hook_probe
    finally:
        hook.remove()
        sys.modules.pop("fi_hook_probe", None)
    assert calls == [42]
    assert hook not in sys.meta_path
    assert type(fi_hook_probe.__loader__).__name__ != "_CallbackLoader"


def test_a_failing_callback_warns_and_does_not_break_the_import(tmp_path, monkeypatch):
    (tmp_path / "fi_hook_probe2.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def boom():
        raise RuntimeError("no")

    sys.meta_path.insert(0, hf._AfterImport("fi_hook_probe2", boom))
    try:
        with pytest.warns(RuntimeWarning, match="could not register"):
            import fi_hook_probe2
    finally:
        sys.modules.pop("fi_hook_probe2", None)
    assert fi_hook_probe2.VALUE == 1
