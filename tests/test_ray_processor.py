"""fastinfer.integrations.ray on a local Ray cluster (``ray.init(num_cpus=2)``, one for the module): greedy outputs
equal single-process ``LLM.generate``, every id once, extra columns carried through, error rows or a failed job
naming the row, an actor killed mid-job, Ray's own writers. The engine stage's row handling is tested in-process
first, without a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")

from fastinfer.integrations.ray import (  # noqa: E402
    OUTPUT_COLUMNS, FastInferProcessorConfig, Processor, LLMStage, build_processor)
from fastinfer.engine.sampling_params import SamplingParams  # noqa: E402
from model_fixtures import default_model_or_skip  # noqa: E402
from test_cli import write_cli_llama  # noqa: E402

ENGINE = {"device": "cpu", "kv_cache_memory_bytes": 8 << 20, "max_num_seqs": 16}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight 2-layer Llama with a BPE tokenizer and a chat template (max_model_len 128)."""
    path = tmp_path_factory.mktemp("tiny_llama_ray")
    write_cli_llama(path)
    return str(path)


@pytest.fixture
def one_thread():
    import torch

    import fastinfer

    before = torch.get_num_threads(), fastinfer.get_num_threads()
    torch.set_num_threads(1)
    fastinfer.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    fastinfer.set_num_threads(before[1])


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (Ray's start is slow on 2 cores)."""
    started = not ray.is_initialized()
    if started:
        env = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}  # workers run this Python, not `uv run`
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    if started:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _table(rows: list[dict]) -> pa.Table:
    """An Arrow batch as Ray Data makes one: every row has every column (pyarrow alone takes the first row's)."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows])


def _greedy(max_tokens: int, **kw) -> dict:
    return {"temperature": 0.0, "max_tokens": max_tokens, **kw}


# ------------------------------------------------------------------------------------------- no cluster


def test_config_checked_at_birth():
    c = FastInferProcessorConfig(concurrency=[1, 3], num_cpus=2)
    assert c.concurrency == (1, 3) and c.threads == 2 and FastInferProcessorConfig().threads == 1
    assert c.model_source is None and c.engine_kwargs == {} and c.batch_size == 32
    assert not c.should_continue_on_error and c.apply_chat_template
    for kwargs, name in [({"batch_size": 0}, "batch_size"), ({"batch_size": 2.5}, "batch_size"),
                         ({"concurrency": 0}, "concurrency"), ({"concurrency": (2, 1)}, "concurrency"),
                         ({"concurrency": (0, 2)}, "concurrency"), ({"concurrency": (1, 2, 3)}, "concurrency"),
                         ({"concurrency": True}, "concurrency"), ({"num_cpus": 0}, "num_cpus"),
                         ({"num_cpus": 1.5}, "num_cpus"), ({"should_continue_on_error": 1}, "should_continue_on_error"),
                         ({"apply_chat_template": "yes"}, "apply_chat_template"),
                         ({"max_concurrent_batches": 0}, "max_concurrent_batches"),
                         ({"engine_kwargs": {"max_model_lenn": 5}}, "max_model_lenn"),
                         ({"engine_kwargs": {"model": "x"}}, "model_source"), ({"engine_kwargs": []}, "engine_kwargs"),
                         ({"model_source": 3}, "model_source"), ({"ray_remote_args": {"num_cpus": 2}}, "num_cpus"),
                         ({"runtime_env": "x"}, "runtime_env")]:
        with pytest.raises(ValueError, match=name):
            FastInferProcessorConfig(**kwargs)
    with pytest.raises(TypeError, match="config"):
        build_processor({"batch_size": 4})
    with pytest.raises(TypeError, match="postprocess"):
        build_processor(FastInferProcessorConfig(), postprocess="not a function")
    assert isinstance(build_processor(FastInferProcessorConfig()), Processor)


def test_import_without_ray_names_the_extra():
    code = ("import sys; sys.modules['ray'] = None\n"
            "try:\n    import fastinfer.integrations.ray\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert 'pip install "fastinfer[ray]"' in out.stdout, out.stdout + out.stderr


def test_stage_rows_in_process(tiny, one_thread):
    """The actor's class called directly on Arrow batches: each way a row can fail fails alone, nulls in dict
    columns (Arrow's union of keys) count as unset, an input column named like an output column is replaced."""
    from fastinfer.entrypoints.llm import LLM

    config = FastInferProcessorConfig(model_source=tiny, engine_kwargs=ENGINE, should_continue_on_error=True)
    stage = LLMStage(config)
    rows = [
        {"id": "ok", "prompt": "hello world", "sampling_params": {"temperature": 0.0, "max_tokens": 5, "top_k": None}},
        {"id": "chat", "messages": [{"role": "user", "content": "the fox"}], "sampling_params": _greedy(4)},
        {"id": "both", "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"id": "neither"},
        {"id": "n2", "prompt": "a", "sampling_params": {"n": 2}},
        {"id": "unknown", "prompt": "a", "sampling_params": {"temprature": 0}},
        {"id": "badvalue", "prompt": "a", "sampling_params": {"top_p": 7.0}},
        {"id": "logprobs", "prompt": "a", "sampling_params": {"logprobs": 999}},
        {"id": "toolong", "prompt": "the quick brown fox " * 60, "sampling_params": _greedy(3)},
    ]
    table = _table(rows)
    table = table.append_column("error", pa.array(["stale"] * len(rows)))  # replaced in place, not duplicated
    out = stage(table).to_pylist()
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert list(out[0]) == table.column_names + [n for n in OUTPUT_COLUMNS if n != "error"]
    by = {r["id"]: r for r in out}
    llm = LLM(tiny, **ENGINE)
    ref = llm.generate(["hello world"], SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0]
    assert by["ok"]["generated_text"] == ref.outputs[0].text and by["ok"]["error"] is None
    assert by["ok"]["generated_tokens"] == ref.outputs[0].token_ids
    assert by["ok"]["num_input_tokens"] == len(ref.prompt_token_ids)
    assert by["ok"]["num_generated_tokens"] == len(ref.outputs[0].token_ids)
    assert by["ok"]["finish_reason"] == ref.outputs[0].finish_reason
    chat = llm.chat([{"role": "user", "content": "the fox"}], SamplingParams(**_greedy(4)), use_tqdm=False)[0]
    assert by["chat"]["error"] is None, by["chat"]
    assert by["chat"]["generated_tokens"] == chat.outputs[0].token_ids
    assert by["chat"]["num_input_tokens"] == len(chat.prompt_token_ids)
    assert by["neither"]["error"] == "a row needs exactly one of 'prompt' and 'messages'"
    expected = {"both": "exactly one of", "n2": "n must be 1", "unknown": "unknown field 'temprature'",
                "badvalue": "top_p", "logprobs": "max_logprobs",
                "toolong": "longer than max_model_len"}
    for rid, message in expected.items():
        r = by[rid]
        assert message in r["error"], (rid, r["error"])
        assert r["finish_reason"] == "error" and r["generated_text"] == "" and r["generated_tokens"] == []
        assert r["num_generated_tokens"] == 0
    assert by["toolong"]["num_input_tokens"] > 128

    # Token-id prompts (an empty one fails alone), and messages refused without the chat template.
    ids = _table([{"prompt": [5, 6, 7], "sampling_params": _greedy(3)}, {"prompt": []}])
    got, empty = stage(ids).to_pylist()
    want = llm.generate([[5, 6, 7]], SamplingParams(**_greedy(3)), use_tqdm=False)[0]
    assert got["generated_tokens"] == want.outputs[0].token_ids and got["num_input_tokens"] == 3
    assert "at least one token" in empty["error"]
    stage.config = FastInferProcessorConfig(model_source=tiny, engine_kwargs=ENGINE, apply_chat_template=False,
                                            should_continue_on_error=True)
    msg = stage(_table([{"messages": [{"role": "user", "content": "x"}]}])).to_pylist()[0]
    assert "apply_chat_template" in msg["error"]
    # should_continue_on_error=False: the first failing row stops the batch, named by its id
    stage.config = FastInferProcessorConfig(model_source=tiny, engine_kwargs=ENGINE)
    with pytest.raises(ValueError, match="row id='toolong'.*longer than max_model_len"):
        stage(_table([rows[0], rows[-1]]))
    with pytest.raises(ValueError, match=r"row 1 of its batch \(prompt 'a'\).*n must be 1"):
        stage(_table([{"prompt": "b"}, {"prompt": "a", "sampling_params": {"n": 2}}]))
    assert stage(_table([{"prompt": "x"}]).slice(0, 0)).num_rows == 0


# ------------------------------------------------------------------------------------------- on a cluster


def test_greedy_matches_llm_generate_ids_once_columns_carried(cluster, one_thread):
    from fastinfer.entrypoints.llm import LLM

    model = default_model_or_skip()
    engine = {"max_model_len": 512, "kv_cache_memory_bytes": 32 << 20}
    topics = ["caches", "the sea", "Paris", "prime numbers", "a red fox", "winter", "trains", "tea", "bees"]
    rows = []
    for i, topic in enumerate(topics):
        row = {"id": f"r{i}", "topic": topic, "meta": {"rank": i, "tag": "t" + str(i)}, "tags": ["a"] * (i % 3)}
        if i % 3 == 2:
            row["messages"] = [{"role": "user", "content": f"Write one sentence about {topic}."}]
        else:
            row["prompt"] = f"A short fact about {topic}:"
        rows.append(row)

    def pre(row):  # sampling_params made here, as ray.data.llm users do; carried columns untouched
        return {**row, "sampling_params": {"temperature": 0, "max_tokens": 10 + len(row["topic"]) % 4}}

    def post(row):
        return {**row, "answer_chars": len(row["generated_text"])}

    # Two batches at once per actor: their requests share the engine's steps, the outputs stay the same.
    config = FastInferProcessorConfig(model_source=None, engine_kwargs=engine, batch_size=2, concurrency=2,
                                      num_cpus=1, max_concurrent_batches=2)
    processor = build_processor(config, preprocess=pre, postprocess=post)
    out = processor(ray.data.from_items(rows, override_num_blocks=3)).take_all()

    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)  # complete, each once
    llm = LLM(model, **engine)
    by = {r["id"]: r for r in out}
    for row in rows:
        got = by[row["id"]]
        for key in ("topic", "meta", "tags"):
            assert got[key] == row[key], key
        params = SamplingParams(**pre(row)["sampling_params"])
        if "messages" in row:
            ref = llm.chat(row["messages"], params, use_tqdm=False)[0]
        else:
            ref = llm.generate([row["prompt"]], params, use_tqdm=False)[0]
        c = ref.outputs[0]
        assert got["generated_text"] == c.text and got["generated_tokens"] == c.token_ids, row["id"]
        assert got["num_input_tokens"] == len(ref.prompt_token_ids) and got["num_generated_tokens"] == len(c.token_ids)
        assert got["finish_reason"] == c.finish_reason and got["error"] is None
        assert got["answer_chars"] == len(c.text)
    assert any(r["generated_text"] for r in out)


def test_error_rows_continue_and_written_with_rays_writers(cluster, tiny, tmp_path):
    rows = [{"id": i, "prompt": f"hello {i}", "sampling_params": _greedy(4)} for i in range(7)]
    rows.insert(3, {"id": 100, "prompt": "the quick brown fox " * 60, "sampling_params": _greedy(4)})
    rows.insert(5, {"id": 101, "prompt": "x", "sampling_params": {"temperature": -1.0}})
    config = FastInferProcessorConfig(model_source=tiny, engine_kwargs=ENGINE, batch_size=3, concurrency=1,
                                      should_continue_on_error=True)
    ds = build_processor(config)(ray.data.from_items(rows, override_num_blocks=3))
    ds.write_parquet(str(tmp_path / "parquet"))
    back = ray.data.read_parquet(str(tmp_path / "parquet")).take_all()
    by = {r["id"]: r for r in back}
    assert sorted(by) == sorted(r["id"] for r in rows) and len(back) == len(rows)
    assert "longer than max_model_len" in by[100]["error"] and by[100]["finish_reason"] == "error"
    assert "temperature" in by[101]["error"]
    for i in range(7):
        r = by[i]
        assert r["error"] is None and r["finish_reason"] in ("length", "stop")
        assert 1 <= r["num_generated_tokens"] == len(r["generated_tokens"]) <= 4
    # JSON lines too, read back with plain json: the same records
    ds.write_json(str(tmp_path / "json"))
    files = sorted((tmp_path / "json").glob("*.json*"))
    lines = [json.loads(ln) for f in files for ln in f.read_text().splitlines() if ln.strip()]
    assert {r["id"]: (r["generated_text"], r["error"]) for r in lines} == {
        k: (v["generated_text"], v["error"]) for k, v in by.items()}


def test_failing_row_fails_the_job_naming_it(cluster, tiny):
    rows = [{"id": f"ok{i}", "prompt": "hello", "sampling_params": _greedy(2)} for i in range(3)]
    rows.append({"id": "too-long", "prompt": "the quick brown fox " * 60})
    config = FastInferProcessorConfig(model_source=tiny, engine_kwargs=ENGINE, batch_size=2)
    with pytest.raises(Exception) as info:
        build_processor(config)(ray.data.from_items(rows, override_num_blocks=2)).take_all()
    text = str(info.value)
    assert "row id='too-long'" in text and "longer than max_model_len" in text, text[-2000:]
    assert "should_continue_on_error=True" in text


def _running(pid: int) -> bool:
    """Whether process pid still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_actor_killed_mid_job_every_id_once(cluster, tiny, tmp_path):
    """An actor is ray.kill-ed (restart allowed) while it holds a batch; Ray restarts it and retries the batch."""

    @ray.remote(num_cpus=0)
    class Handles:
        def __init__(self):
            self.by_pid = {}

        def put(self, pid, handle):
            self.by_pid[pid] = handle

        def get(self):
            return self.by_pid

    handles = Handles.remote()
    go = str(tmp_path / "go")
    deadline = time.time() + 600  # one bound for every wait below: CI has taken minutes to start the actor

    def pre(row):  # runs in the actor (Ray fuses it into the engine stage): records the actor's handle
        ray.get(handles.put.remote(os.getpid(), ray.get_runtime_context().current_actor))
        while row["id"] >= 4 and not os.path.exists(go) and time.time() < deadline:
            time.sleep(0.02)  # later batches wait until the killed process is gone, so the kill lands mid-job
        return {**row, "pid": os.getpid()}

    rows = [{"id": i, "prompt": f"count {i}", "sampling_params": _greedy(3)} for i in range(16)]
    # One actor: whatever it holds when killed (the next batch, waiting in pre) must be redone by its restart.
    config = FastInferProcessorConfig(model_source=tiny, engine_kwargs=ENGINE, batch_size=4, concurrency=1)
    ds = build_processor(config, preprocess=pre)(ray.data.from_items(rows, override_num_blocks=4))
    batches = iter(ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="pyarrow"))
    got = next(batches).to_pylist()
    assert {r["id"] for r in got} == {0, 1, 2, 3}
    victim = got[0]["pid"]
    ray.kill(ray.get(handles.get.remote())[victim], no_restart=False)
    wait_until = min(deadline, time.time() + 30)
    while time.time() < wait_until and _running(victim):  # ray.kill returns before the kill lands
        time.sleep(0.05)
    # Some Ray setups (CI's) restart the actor and retry its tasks while the old process lingers: the rows
    # must still come once each; where the process is gone, none of the later ones ran in it.
    gone = not _running(victim)
    open(go, "w").close()
    for b in batches:
        got += b.to_pylist()
    assert sorted(r["id"] for r in got) == list(range(16))  # every id, once
    assert all(r["error"] is None and r["num_generated_tokens"] >= 1 for r in got)
    if gone:
        assert all(r["pid"] != victim for r in got if r["id"] >= 4)  # the rest ran in the restarted actor
