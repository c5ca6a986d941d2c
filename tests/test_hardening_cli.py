"""`fastinfer generate` under hostile or unlucky conditions (issue 14): two runs on one output file, outsized
logprobs, deeply nested JSON, out-of-range seeds and engine flags, a full disk, and the small things users see.
Every mistake must be one line on stderr, never a traceback. Inputs that could crash the interpreter run in a
subprocess; the rest run ``cli.main`` in-process against test_cli's FakeLLM."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from test_cli import FakeLLM, lines, run

from fastinfer.entrypoints.cli import batch_input, batch_run
from fastinfer.entrypoints.cli import main as cli

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def cli_subprocess(*argv, timeout=60):
    """``python -m fastinfer`` in its own process (no model is loaded in these runs)."""
    return subprocess.run([sys.executable, "-m", "fastinfer", *map(str, argv)], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(err: str) -> bool:
    return "Traceback" not in err and len([ln for ln in err.splitlines() if "error:" in ln]) == 1


def openai_line(cid, prompt="p", **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                       "body": {"prompt": prompt, **body}})


# ------------------------------------------------------------------------------- 5: one output, two runs

# A run of the CLI in a child process whose fake model writes one line, then waits for the file `go` before
# finishing: the parent runs the CLI on the same output meanwhile.
_CHILD = r"""
import os, sys, time
sys.path.insert(0, {tests!r})
from test_cli import FakeLLM
from fastinfer.entrypoints.cli import main as cli

class Waiting(FakeLLM):
    def stream(self, prompts, sampling_params, *, request_ids):
        for k, ro in enumerate(super().stream(prompts, sampling_params, request_ids=request_ids)):
            yield ro
            if ro.finished and not os.path.exists({go!r}):
                open({ready!r}, "w").close()
                while not os.path.exists({go!r}):
                    time.sleep(0.01)

sys.exit(cli.main(sys.argv[1:], llm_factory=lambda model, **kw: Waiting(model)))
"""


def test_second_run_on_one_output_is_refused(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(openai_line(f"r{i}") + "\n" for i in range(4)))
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"custom_id": "r0", "response": {}, "error": None}) + "\n")
    ready, go = tmp_path / "ready", tmp_path / "go"
    script = _CHILD.format(tests=os.path.dirname(__file__), go=str(go), ready=str(ready))
    argv = ["generate", "-i", src, "-o", out, "--no-progress"]
    child = subprocess.Popen([sys.executable, "-c", script, *map(str, argv), "--resume"], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = 60
        while not ready.exists():
            assert child.poll() is None, child.communicate()
            deadline -= 0.01
            assert deadline > 0
            __import__("time").sleep(0.01)
        during = out.read_bytes()
        assert during.count(b"\n") == 2  # the child's first line is written; it holds the lock
        for extra in (["--resume"], ["--overwrite"], []):
            code, stdout, err, llm = run([*argv, *extra], capsys)
            assert code == 1 and llm is None, (extra, err)
            assert f"{out} is being written by another fastinfer run (pid {child.pid})" in err
            assert one_line_error(err) and out.read_bytes() == during  # untouched: not truncated, not appended
        go.touch()
        _, child_err = child.communicate(timeout=60)
    finally:
        go.touch()
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, child_err
    ids = [r["custom_id"] for r in lines(out)]
    assert sorted(ids) == ["r0", "r1", "r2", "r3"]  # each once
    # the lock went with the child: a later --resume runs (and has nothing left to do)
    code, _, err, llm = run([*argv, "--resume"], capsys)
    assert code == 0 and llm is None and "4 already in the output" in err


def test_lock_is_taken_before_overwrite_truncates(tmp_path, capsys):
    import fcntl

    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 0}\n')
    with open(out, "rb") as holder:  # another open file description of it, locked: as another process would
        fcntl.flock(holder, fcntl.LOCK_EX)
        code, _, err, llm = run(["generate", "x", "-o", out, "--overwrite"], capsys)
        assert code == 1 and llm is None and "being written by another fastinfer run" in err
        assert out.read_text() == '{"id": 0}\n'
    code, _, _, _ = run(["generate", "x", "-o", out, "--overwrite", "--no-chat"], capsys)
    assert code == 0 and [r["text"] for r in lines(out)] == ["re:x"]


def test_resume_reports_duplicate_ids_and_writes_no_more(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": k, "prompt": k}) + "\n" for k in "abc"))
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({"id": k, "text": "t"}) + "\n" for k in "aab"))
    code, _, err, llm = run(["generate", "-i", src, "-o", out, "--resume", "--no-progress", "--no-chat"], capsys)
    assert code == 0 and "holds 1 id(s) more than once (e.g. 'a')" in err
    assert [p["prompt"] for p, _ in llm.received] == ["c"]
    assert sorted(r["id"] for r in lines(out)) == ["a", "a", "b", "c"]


def test_retry_failed_rewrite_keeps_the_lock(tmp_path, capsys):
    import fcntl

    src = tmp_path / "in.jsonl"
    src.write_text(openai_line("a") + "\n" + openai_line("b") + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"custom_id": "a", "response": None, "error": {"code": "x", "message": "m"}}) + "\n")
    seen = []

    class Probe(FakeLLM):  # tries the lock of the rewritten file while the run is going
        def stream(self, *args, **kwargs):
            with open(out, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    seen.append("free")
                except BlockingIOError:
                    seen.append("locked")
            yield from super().stream(*args, **kwargs)

    code, _, err, _ = run(["generate", "-i", src, "-o", out, "--resume", "--retry-failed", "--no-progress"], capsys,
                          llm=Probe())
    assert code == 0 and "removed 1 error line(s)" in err and seen == ["locked"]
    assert sorted(r["custom_id"] for r in lines(out)) == ["a", "b"] and sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]


# ------------------------------------------------------------------------------- 6: logprobs cap


def test_logprobs_above_the_cap_are_bad_lines_before_the_model_loads(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([
        json.dumps({"id": "ok", "prompt": "a", "logprobs": 20}),
        json.dumps({"id": "big", "prompt": "b", "logprobs": 1000000}),
    ]) + "\n")
    code, stdout, err, llm = run(["generate", "-i", src, "--on-bad-line", "fail"], capsys)
    assert code == 2 and llm is None and stdout == ""
    assert "line 2: bad sampling setting: logprobs must be <= 20 (--max-logprobs), got 1000000" in err
    code, stdout, err, llm = run(["generate", "-i", src, "--no-progress", "--no-chat"], capsys)
    assert code == 0 and [r["id"] for r in lines(stdout)] == ["ok"] and "skipping line 2" in err
    assert llm.engine_kwargs["max_logprobs"] == 20
    code, stdout, _, llm = run(["generate", "-i", src, "--no-progress", "--max-logprobs", 1000000], capsys)
    assert code == 0 and len(lines(stdout)) == 2 and llm.engine_kwargs["max_logprobs"] == 1000000
    code, _, err, llm = run(["generate", "x", "--logprobs", 21], capsys)
    assert code == 2 and llm is None and "--logprobs must be <= 20 (--max-logprobs), got 21" in err


def test_openai_logprob_fields_are_capped_by_name(tmp_path, capsys):
    chat = {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}}
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(chat) + "\n" + openai_line("t", logprobs=99) + "\n" + openai_line("ok") + "\n")
    out = tmp_path / "out.jsonl"
    code, _, err, _ = run(["generate", "-i", src, "-o", out, "--no-progress"], capsys)
    recs = {r["custom_id"]: r for r in lines(out)}
    assert code == 0 and recs["ok"]["error"] is None
    assert "top_logprobs must be <= 20" in recs["c"]["error"]["message"] and "skipping line 1" in err
    assert "logprobs must be <= 20" in recs["t"]["error"]["message"] and "skipping line 2" in err


# ------------------------------------------------------------------------------- 10: deep nesting


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_deeply_nested_lines_are_bad_lines_in_a_subprocess(tmp_path, fmt):
    good = json.dumps({"prompt": "x"}) if fmt == "jsonl" else openai_line("g")
    deep_msg = json.dumps({"messages": [{"role": "user", "content": "hi", "name": "@"}]}).replace('"@"', _deep(1000))
    src = tmp_path / "in.jsonl"
    rows = ['{"prompt": ' + _deep(100000) + "}", good, '{"prompt": ' + _deep(990) + "}", deep_msg,
            '{"custom_id": ' + _deep(2000) + "}"]
    if fmt == "openai":  # the first line decides the format: a deep first line must not hide it
        rows[0] = '{"custom_id": "d", "method": "POST", "url": "/v1/completions", "body": {"prompt": ' + _deep(
            100000) + "}}"
    src.write_text("\n".join(rows) + "\n")
    r = cli_subprocess("generate", "-i", src, "--on-bad-line", "fail")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for line in (1, 3, 4, 5):
        assert f"bad line {line}: " in r.stderr
    assert "nested deeper than 64 levels" in r.stderr and "bad line 2" not in r.stderr
    assert "4 bad input line(s); nothing generated" in r.stderr


def test_deeply_nested_output_line_stops_resume_in_a_subprocess(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("a\n")
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 0, "text": ' + _deep(100000) + "}\n")
    r = cli_subprocess("generate", "-i", src, "-o", out, "--resume")
    assert r.returncode == 1 and one_line_error(r.stderr), r.stderr[-2000:]
    assert "line 1 is not JSON" in r.stderr


def test_deep_lines_skipped_good_lines_run(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "good"}\n{"prompt": "x", "stop": ' + _deep(900) + "}\n" +
                   '{"messages": [{"role": "user", "content": [{"type": "text", "text": ' + _deep(50) + "}]}]}\n")
    code, stdout, err, _ = run(["generate", "-i", src, "--no-progress", "--no-chat"], capsys)
    assert code == 0 and [r["prompt"] for r in lines(stdout)] == ["good"]
    assert "skipping line 2: invalid JSON: nested deeper" in err
    assert 'skipping line 3: a text content part\'s "text" must be a string' in err
    deep_first = b'{"custom_id": "a", "body": ' + _deep(100000).encode() + b"}"
    assert batch_input.detect_format([deep_first, b'{"prompt": "x"}']) == "jsonl"


def test_error_messages_do_not_echo_huge_values(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "x", "stop": ["s" * 1000000, 3]}) + "\n" +
                   json.dumps({"prompt": "x", "temperature": "h" * 1000000}) + "\n")
    code, _, err, _ = run(["generate", "-i", src, "--on-bad-line", "fail"], capsys)
    assert code == 2 and len(err) < 2000 and "stop must be a list of str" in err and "temperature" in err


# ------------------------------------------------------------------------------- 11: checked before loading


def test_seed_flag_checked_before_the_model_loads(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a"}\n')
    for argv in (["generate", "-i", src], ["generate", "x"]):
        code, stdout, err, llm = run([*argv, "--seed", 10**23], capsys)
        assert code == 2 and llm is None and stdout == "" and one_line_error(err)
        assert "error: --seed: seed must be" in err and "cannot load" not in err
    code, _, err, llm = run(["generate", "-i", src, "--temperature", -1], capsys)
    assert code == 2 and llm is None and "error: --temperature: temperature must be >= 0" in err
    assert "line 1" not in err  # the flag's mistake, not every line's


def test_per_line_seed_is_a_bad_line_and_good_lines_still_run(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a", "seed": 100000000000000000000000}\n{"prompt": "b", "seed": 3}\n')
    code, stdout, err, llm = run(["generate", "-i", src, "--no-progress", "--no-chat"], capsys)
    assert code == 0 and [r["prompt"] for r in lines(stdout)] == ["b"]
    assert "skipping line 1: bad sampling setting: seed" in err
    assert [sp.seed for _, sp in llm.received] == [3]


@pytest.mark.parametrize("argv, msg", [
    (["--threads", 10**20], "--threads: must be <= 65536"),
    (["--device", "bogus"], "--device: expected auto, cpu, cuda or cuda:N"),
    (["--dtype", "float8"], "--dtype: invalid choice"),
])
def test_engine_flags_checked_by_the_parser(capsys, argv, msg):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "x", *map(str, argv)], llm_factory=FakeLLM)
    assert exc.value.code == 2 and msg in capsys.readouterr().err


def test_engine_setting_errors_are_not_load_errors(capsys):
    def bad_setting(model, **kw):
        raise ValueError("kv_cache_memory_bytes: 1 bytes hold no 16-token block (one takes 8192 bytes)")

    assert cli.main(["generate", "x", "--kv-cache-memory-bytes", "1"], llm_factory=bad_setting) == 1
    err = capsys.readouterr().err
    assert "error: --kv-cache-memory-bytes: 1 bytes hold no" in err
    assert "cannot load" not in err

    def torch_trace(model, **kw):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory\nframe #0: c10::...\nframe #1: ...")

    assert cli.main(["generate", "x"], llm_factory=torch_trace) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load the default model: DefaultCPUAllocator" in err


# ------------------------------------------------------------------------------- 12: output errors


def test_disk_full_output_is_one_line(tmp_path, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    src = tmp_path / "in.txt"
    src.write_text("a\nb\n")
    code, _, err, _ = run(["generate", "-i", src, "-o", "/dev/full", "--no-progress"], capsys)
    assert code == 1 and one_line_error(err)
    assert "error: cannot write /dev/full: No space left on device" in err


class _FailingStdout:
    """A stdout whose writes fail with ``errno`` (a full disk under `> file`, an I/O error)."""

    def __init__(self, code: int) -> None:
        self.buffer = self
        self.code = code

    def write(self, data):
        raise OSError(self.code, os.strerror(self.code))

    def flush(self):
        pass

    def fileno(self):
        raise io.UnsupportedOperation("fileno")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_stdout_write_errors_are_one_line(tmp_path, capsys, monkeypatch, code):
    monkeypatch.setattr(sys, "stdout", _FailingStdout(code))
    src = tmp_path / "in.txt"
    src.write_text("a\n")
    for argv in (["generate", "one prompt", "--no-chat"], ["generate", "-i", str(src), "--no-progress"]):
        status = cli.main(argv, llm_factory=lambda model, **kw: FakeLLM(model, **kw))
        err = capsys.readouterr().err
        assert status == 1 and one_line_error(err) and f"error: cannot write stdout: {os.strerror(code)}" in err


def test_output_directory_and_unwritable_output(tmp_path, capsys):
    code, _, err, _ = run(["generate", "x", "-o", tmp_path], capsys)
    assert code == 2 and "is a directory" in err and "--resume" not in err and "--overwrite" not in err
    code, _, err, _ = run(["generate", "x", "-o", tmp_path / "no_such_dir" / "o.jsonl"], capsys)
    assert code == 1 and one_line_error(err) and "cannot write --output" in err


# ------------------------------------------------------------------------------- cosmetic


def test_summary_without_generation_has_no_rates(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("a\n")
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": 0, "text": "t"}\n')
    code, _, err, llm = run(["generate", "-i", src, "-o", out, "--resume"], capsys)
    assert code == 0 and llm is None and "req/s" not in err and "tok/s" not in err and "nothing generated" in err


def test_interrupt_suggests_resume_only_with_an_output_file(tmp_path, capsys):
    code, _, err, _ = run(["generate", "x", "--no-chat"], capsys, interrupt_after=1)
    assert code == 130 and "interrupted" in err and "--resume" not in err
    src = tmp_path / "in.txt"
    src.write_text("a\nb\n")
    code, _, err, _ = run(["generate", "-i", src, "--no-progress"], capsys, interrupt_after=1)
    assert code == 130 and "--resume" not in err
    out = tmp_path / "o.jsonl"
    code, _, err, _ = run(["generate", "-i", src, "-o", out, "--no-progress"], capsys, interrupt_after=1)
    assert code == 130 and f"kept in {out} (run again with --resume" in err


def test_progress_into_a_log_has_no_carriage_returns(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.txt"
    src.write_text("a\nb\nc\n")
    code, _, err, _ = run(["generate", "-i", src, "-o", tmp_path / "o.jsonl"], capsys)
    assert code == 0 and "\r" not in err
    monkeypatch.setattr(batch_run, "LOG_EVERY_S", 0.0)
    code, _, err, _ = run(["generate", "-i", src, "-o", tmp_path / "o2.jsonl"], capsys)
    assert code == 0 and "\r" not in err and "fastinfer: 3/3 requests, " in err


def test_progress_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(batch_run, "_is_tty", lambda stream: True)
    src = tmp_path / "in.txt"
    src.write_text("a\n")
    code, _, err, _ = run(["generate", "-i", src, "-o", tmp_path / "o.jsonl"], capsys)
    assert code == 0 and "1/1" in err and "req" in err


def test_stdin_fake_for_sanity(capsys, monkeypatch):
    """--input - still works with the locked-output code path (stdout, no lock)."""
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(b"q\n")))
    code, stdout, _, _ = run(["generate", "--input", "-", "--no-progress", "--no-chat"], capsys)
    assert code == 0 and lines(stdout)[0]["text"] == "re:q"
