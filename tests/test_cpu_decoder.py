"""The native decoder stack (fastinfer.models.cpu_decoder) against the per-op path it replaces.

Both run the same kernels in the same order, so logits and the KV caches they write must be equal bit for
bit, over chunked prefills mixed with decodes. Bad calls must raise naming the argument and change nothing.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from fastinfer import _C
from fastinfer.models.cpu_decoder import CpuDecoder
from fastinfer.loading import load_model

sys.path.insert(0, __import__("os").path.dirname(__file__))
from model_fixtures import VOCAB, PagedDriver, hf_model  # noqa: E402
from reference import check_rejected  # noqa: E402

_FOLDERS: dict = {}


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


def packed_model(arch: str, dtype: str, tmp_path_factory):
    pytest.importorskip("transformers")
    if arch not in _FOLDERS:
        folder = tmp_path_factory.mktemp(f"native_{arch}")
        with torch.inference_mode(False):
            hf_model(arch).save_pretrained(folder)
        _FOLDERS[arch] = folder
    model = load_model(str(_FOLDERS[arch]), dtype=dtype).model
    assert model.pack_for_cpu()
    return model


class Toggled(PagedDriver):
    """A PagedDriver whose steps run with the model's native stack on or off."""

    native: bool = True

    def step(self, chunks):
        saved = self.model.cpu_decoder
        if not self.native:
            self.model.cpu_decoder = None
        try:
            return super().step(chunks)
        finally:
            self.model.cpu_decoder = saved


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_native_stack_equals_per_op_path(arch, dtype, tmp_path_factory):
    """llama: tied head, llama3 rope; mistral: sliding window; qwen2: q/k/v biases, untied head."""
    model = packed_model(arch, dtype, tmp_path_factory)
    assert model.cpu_decoder is not None, CpuDecoder.unsupported(model)
    native, per_op = Toggled(model, block_size=3), Toggled(model, block_size=3)
    per_op.native = False
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (17, 12, 9))
    schedule = [[(0, a[:5]), (1, b[:8])],
                [(0, a[5:11]), (1, b[8:9])],                 # a prefill chunk and a decode
                [(1, b[9:10]), (0, a[11:12]), (2, c[:4])],   # decodes and a new prompt's first chunk
                [(2, c[4:9]), (1, b[10:11]), (0, a[12:13])],
                [(0, a[13:14]), (1, b[11:12]), (2, [7])]]
    for chunks in schedule:
        for x, y in zip(native.step(chunks), per_op.step(chunks)):
            assert torch.equal(x, y)
    for (k1, v1), (k2, v2) in zip(native.caches, per_op.caches):
        assert same(k1, k2) and same(v1, v2)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_models_the_stack_does_not_cover_keep_the_per_op_path(arch, tmp_path_factory):
    model = packed_model(arch, "float32", tmp_path_factory)
    assert model.cpu_decoder is None
    assert CpuDecoder.unsupported(model)
    logits = PagedDriver(model, block_size=3).step([(0, [5, 6, 7, 8])])[0]
    assert torch.isfinite(logits).all()


def test_engine_uses_the_native_stack(tmp_path_factory):
    from fastinfer import LLM, SamplingParams

    model = packed_model("llama", "float32", tmp_path_factory)
    llm = LLM(str(_FOLDERS["llama"]), dtype="float32", kv_cache_memory_bytes=1 << 20)
    runner_model = llm.engine.runner.model
    assert runner_model.cpu_decoder is not None
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    got = llm.generate([[5, 6, 7, 8, 9]], params, use_tqdm=False)[0].outputs[0].token_ids
    expected = PagedDriver(model, block_size=3).greedy(0, [5, 6, 7, 8, 9], 6)
    assert got == expected


# ---------------------------------------------------------------- bad calls
@pytest.fixture
def call(tmp_path_factory):
    """A valid forward of the llama model's native stack (two sequences, three new tokens), as a namespace."""
    model = packed_model("llama", "float32", tmp_path_factory)
    c = model.config
    driver = PagedDriver(model, block_size=3)
    driver.step([(0, [4, 5, 6, 7]), (1, [8, 9, 10, 11, 12])])  # two blocks each, something in them
    native = model.cpu_decoder.native
    native.bind_caches(driver.caches)
    ns = types.SimpleNamespace(
        native=native, x=torch.randn(3, c.hidden_size), out=torch.full((3, c.hidden_size), float("nan")),
        cos=torch.randn(3, c.head_dim // 2), sin=torch.randn(3, c.head_dim // 2), rows=torch.arange(3),
        cu_q=torch.tensor([0, 1, 3], dtype=torch.int32), cu_k=torch.tensor([0, 5, 9], dtype=torch.int32),
        table=torch.tensor([driver.blocks[0][:2], driver.blocks[1][:2]], dtype=torch.int32),
        slots=torch.tensor([driver.blocks[0][1] * 3 + 1, driver.blocks[1][0] * 3 + 2, driver.blocks[1][1] * 3]),
        workspace=torch.empty(native.workspace_bytes(3), dtype=torch.uint8))
    for i, (k, v) in enumerate(driver.caches):
        setattr(ns, f"k{i}", k)
        setattr(ns, f"v{i}", v)
    return ns


def forward(ns) -> None:
    ns.native.forward(ns.x, ns.out, ns.cos, ns.sin, ns.rows, ns.cu_q, ns.cu_k, ns.table, ns.slots, ns.workspace)


def test_valid_call_runs(call):
    forward(call)
    assert torch.isfinite(call.out).all()


@pytest.mark.parametrize("edit,exc,match", [
    (lambda ns: setattr(ns, "x", ns.x.double()), TypeError, "x: expected dtype float32"),
    (lambda ns: setattr(ns, "x", torch.randn(3, ns.x.shape[1] + 1)), ValueError, "x: expected shape"),
    (lambda ns: setattr(ns, "out", ns.x), ValueError, "out: must not overlap x"),
    (lambda ns: setattr(ns, "cos", ns.cos[:2]), ValueError, "cos: expected shape"),
    (lambda ns: setattr(ns, "rows", torch.tensor([0, 1, 3])), ValueError, r"rows\[2\] = 3"),
    (lambda ns: setattr(ns, "cu_q", torch.tensor([0, 1, 2], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q\[-1\] = 2 must equal"),
    (lambda ns: setattr(ns, "cu_q", torch.tensor([0, 2, 1], dtype=torch.int32)), ValueError, "non-decreasing"),
    (lambda ns: setattr(ns, "cu_k", torch.tensor([0, 5, 6], dtype=torch.int32)), ValueError, "sequence 1 has 2 new"),
    (lambda ns: setattr(ns, "cu_k", torch.tensor([0, 5, 15], dtype=torch.int32)), ValueError, "block_table row holds"),
    (lambda ns: ns.table.__setitem__((1, 1), 10_000), ValueError, r"block_table\[1, 1\] = 10000 is out of range"),
    (lambda ns: setattr(ns, "table", ns.table.long()), TypeError, "block_table: expected dtype int32"),
    (lambda ns: ns.slots.__setitem__(2, 10_000), ValueError, r"slot_mapping\[2\] = 10000 is out of range"),
    (lambda ns: setattr(ns, "workspace", ns.workspace[:-1]), ValueError, "workspace: .* needed for 3 tokens"),
])
def test_bad_forward_raises_and_changes_nothing(call, edit, exc, match):
    edit(call)
    check_rejected(call, forward, exc, match)


def test_forward_before_caches_are_bound(tmp_path_factory, call):
    model = packed_model("llama", "float32", tmp_path_factory)
    call.native = model.cpu_decoder.native
    check_rejected(call, forward, ValueError, "bind_caches")


def test_bad_caches_are_refused(call):
    caches = [(getattr(call, f"k{i}"), getattr(call, f"v{i}")) for i in range(3)]
    with pytest.raises(ValueError, match="kv_caches: 2 .k, v. pairs for 3 layers"):
        call.native.bind_caches(caches[:2])
    k, v = caches[1]
    with pytest.raises(ValueError, match=r"kv_caches\[1\]: every layer's cache must have the strides"):
        call.native.bind_caches([caches[0], (k.transpose(0, 1).contiguous().transpose(0, 1), v), caches[2]])
    with pytest.raises(TypeError, match=r"kv_caches\[2\]\.k: expected dtype float32"):
        call.native.bind_caches(caches[:2] + [(caches[2][0].double(), caches[2][1])])
    with pytest.raises(ValueError, match=r"kv_caches\[0\]\.k: expected \(num_blocks, block_size, 2, 16\)"):
        call.native.bind_caches([(caches[0][0][..., :8], caches[0][1])] + caches[1:])


def test_bad_weights_are_refused(tmp_path_factory):
    model = packed_model("llama", "float32", tmp_path_factory)
    c = model.config
    layer = model.model.layers[0]
    good = dict(input_norm=layer.input_layernorm.scale32, post_norm=layer.post_attention_layernorm.scale32,
                qkv=layer.self_attn.qkv_proj.packed, qkv_bias=None, o=layer.self_attn.o_proj.packed, o_bias=None,
                gate_up=layer.mlp.gate_up_proj.packed, gate_up_bias=None, down=layer.mlp.down_proj.packed,
                down_bias=None, window_left=-1)

    def config(act="silu"):
        return _C.CpuDecoderConfig(hidden=c.hidden_size, intermediate=c.intermediate_size, heads=4, kv_heads=2,
                                   head_dim=16, norm_eps=1e-5, softmax_scale=0.25, act=act)

    def build(**change):
        d = {**good, **change}
        layer = _C.DecoderLayerWeights(**{k: v for k, v in d.items() if v is not ...})
        return _C.CpuDecoder(config(), model.model.norm.scale32, [layer])

    build()
    with pytest.raises(ValueError, match="missing 'down'"):
        build(down=...)
    with pytest.raises(ValueError, match=r"layers\[0\]\.o: expected shape"):
        build(o=layer.mlp.down_proj.packed)
    with pytest.raises(TypeError, match=r"layers\[0\]\.input_norm: expected dtype float32"):
        build(input_norm=good["input_norm"].double())
    with pytest.raises(ValueError, match=r"layers\[0\]\.qkv_bias: expected shape"):
        build(qkv_bias=torch.zeros(3))
    with pytest.raises(ValueError, match="act: expected 'silu' or 'gelu_tanh'"):
        config(act="relu")
    with pytest.raises(TypeError, match=r"layers\[0\]: expected a DecoderLayerWeights, got dict"):
        _C.CpuDecoder(config(), model.model.norm.scale32, [good])
