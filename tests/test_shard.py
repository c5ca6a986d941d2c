"""`fastinfer generate --shard I/N`: N runs over one file do every request exactly once between them, the split is
stable across processes, --resume continues one shard, and bad values of I/N are one-line errors. Against the fake
LLM of test_cli.py (the engine itself is tested there and in test_llm.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastinfer.entrypoints.cli.shard import Shard, shard_of
from test_cli import lines, run

IDS = [f"q{i}" for i in range(40)] + list(range(20))  # strings and ints: 3 and "3" are different ids


def _jsonl(tmp_path, ids=IDS):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": f"prompt {i}"}) + "\n" for i in ids))
    return src


def _key(i):
    return json.dumps(i)


def test_shard_values_checked():
    assert (Shard.parse("0/2"), Shard.parse(" 3 / 4 ")) == (Shard(0, 2), Shard(3, 4))
    assert str(Shard.parse("1/3")) == "1/3"
    for text, message in [("2/2", "[0, 1]"), ("3/2", "numbered from 0"), ("0/0", "shard count"), ("-1/2", "I/N"),
                          ("1", "I/N"), ("a/b", "I/N"), ("1/2/3", "I/N"), ("", "I/N")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            Shard.parse(text)


def test_shard_cli_errors(tmp_path, capsys):
    src = _jsonl(tmp_path)
    for value in ("2/2", "1/0", "x"):
        with pytest.raises(SystemExit) as exc:
            run(["generate", "-i", src, "--shard", value], capsys)
        assert exc.value.code == 2
        assert "--shard" in capsys.readouterr().err
    code, _, err, llm = run(["generate", "hello", "--shard", "0/2"], capsys)
    assert code == 2 and llm is None and "--shard splits an --input file" in err


def test_union_of_shards_is_the_whole_file_each_id_once(tmp_path, capsys):
    src = _jsonl(tmp_path)
    n = 3
    seen = []
    for i in range(n):
        out = tmp_path / f"out.{i}.jsonl"
        argv = ["generate", "-i", src, "-o", out, "--shard", f"{i}/{n}", "--no-progress", "--no-chat"]
        code, _, err, llm = run(argv, capsys)
        assert code == 0, err
        recs = lines(out)
        ids = [r["id"] for r in recs]
        assert len(recs) == len(llm.received) == len(set(map(_key, ids)))
        assert all(r["text"] == f"re:prompt {r['id']}" for r in recs)
        assert all(shard_of(r, n) == i for r in ids)
        assert f"shard {i}/{n}: {len(ids)} of the input's {len(IDS)} requests" in err
        seen += ids
    assert sorted(map(_key, seen)) == sorted(map(_key, IDS))  # every id, once
    # A real split, not all in one shard (60 ids: each shard gets 20 +- 10 with overwhelming probability).
    counts = [sum(shard_of(r, n) == i for r in IDS) for i in range(n)]
    assert min(counts) >= 10, counts


def test_text_lines_shard_by_line_index(tmp_path, capsys):
    src = tmp_path / "p.txt"
    src.write_text("".join(f"line {i}\n" for i in range(12)))
    got = []
    for i in range(2):
        out = tmp_path / f"o{i}.jsonl"
        argv = ["generate", "-i", src, "-o", out, "--shard", f"{i}/2", "--no-progress", "--no-chat"]
        assert run(argv, capsys)[0] == 0
        got += [(r["id"], r["text"]) for r in lines(out)]
    assert sorted(got) == [(i, f"re:line {i}") for i in range(12)]


def test_assignment_does_not_depend_on_the_process_or_the_line_order(tmp_path):
    ids = IDS + ["", "é", 10**30]
    here = [shard_of(i, 7) for i in ids]
    code = ("import json, sys; from fastinfer.entrypoints.cli.shard import shard_of; "
            "print(json.dumps([shard_of(i, 7) for i in json.loads(sys.argv[1])]))")
    for seed in ("1", "2"):  # Python's own hash() of a str differs between these two processes
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run([sys.executable, "-c", code, json.dumps(ids)], capture_output=True, text=True, env=env,
                             timeout=120, check=True)
        assert json.loads(res.stdout) == here
    assert len(set(here)) > 1


def test_resume_works_per_shard(tmp_path, capsys):
    src = _jsonl(tmp_path)
    mine = [i for i in IDS if shard_of(i, 2) == 1]
    out = tmp_path / "o1.jsonl"
    argv = ["generate", "-i", src, "-o", out, "--shard", "1/2", "--no-progress"]
    code, _, err, _ = run(argv, capsys, interrupt_after=5)
    assert code == 130 and len(lines(out)) == 5
    code, _, err, llm = run([*argv, "--resume"], capsys)
    assert code == 0 and len(llm.received) == len(mine) - 5
    assert "5 already in the output" in err
    assert sorted(map(_key, (r["id"] for r in lines(out)))) == sorted(map(_key, mine))
    # Resuming the finished shard does nothing; the other shard is untouched by it and runs on its own file.
    code, _, err, llm = run([*argv, "--resume"], capsys)
    assert code == 0 and llm is None
    out0 = tmp_path / "o0.jsonl"
    assert run(["generate", "-i", src, "-o", out0, "--shard", "0/2", "--no-progress"], capsys)[0] == 0
    both = [r["id"] for r in lines(out) + lines(out0)]
    assert sorted(map(_key, both)) == sorted(map(_key, IDS))


def test_bad_lines_one_shard_reports_each_and_fail_fails_all(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [json.dumps({"id": f"ok{i}", "prompt": "p"}) for i in range(10)]
    rows += ['{"id": "bad-a", "prompt": "p", "top_p": 2}', "not json", '{"prompt": "p", "temperature": "hot"}']
    src.write_text("\n".join(rows) + "\n")
    reported = []
    for i in range(2):
        code, _, err, _ = run(["generate", "-i", src, "-o", tmp_path / f"o{i}", "--shard", f"{i}/2",
                               "--no-progress"], capsys)
        assert code == 0
        reported += [ln.split("skipping line ")[1].split(":")[0] for ln in err.splitlines() if "skipping line" in ln]
    assert sorted(reported) == ["11", "12", "13"]  # each bad line is reported by exactly one shard
    for i in range(2):
        code, _, err, llm = run(["generate", "-i", src, "-o", tmp_path / f"f{i}", "--shard", f"{i}/2",
                                 "--on-bad-line", "fail"], capsys)
        assert code == 2 and llm is None and "3 bad input line(s)" in err


def test_openai_error_lines_land_in_their_shard(tmp_path, capsys):
    src = tmp_path / "b.jsonl"
    good = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": {"prompt": f"p{i}"}}
            for i in range(8)]
    bad = {"custom_id": "broken", "method": "POST", "url": "/v1/completions", "body": {"prompt": "p", "n": 0}}
    src.write_text("".join(json.dumps(o) + "\n" for o in [*good, bad]))
    found = []
    for i in range(3):
        out = tmp_path / f"o{i}.jsonl"
        assert run(["generate", "-i", src, "-o", out, "--shard", f"{i}/3", "--no-progress"], capsys)[0] == 0
        recs = lines(out)
        assert all(shard_of(r["custom_id"], 3) == i for r in recs)
        found += [(r["custom_id"], r["error"] is None) for r in recs]
    assert sorted(found) == sorted([(f"r{i}", True) for i in range(8)] + [("broken", False)])


def test_shards_through_the_router(tmp_path, capsys):
    """--config: the same split, each line through the router to a fake OpenAI upstream (a child process on
    127.0.0.1)."""
    for mod in ("httpx", "yaml"):
        pytest.importorskip(mod)
    from fake_upstream import start_fakes

    [fake] = start_fakes("a")
    try:
        config = tmp_path / "router.yaml"
        config.write_text(f"model_list:\n  - model_name: small\n    litellm_params: {{model: openai/up-a, "
                          f"api_base: {fake.api_base}}}\n")
        src = _jsonl(tmp_path, IDS[:24])
        seen = []
        for i in range(2):
            out = tmp_path / f"r{i}.jsonl"
            code, _, err, _ = run(["generate", "--config", config, "-m", "small", "-i", src, "-o", out, "--shard",
                                   f"{i}/2", "--no-progress"], capsys)
            assert code == 0, err
            recs = lines(out)
            assert recs and all("error" not in r for r in recs)
            assert all(shard_of(r["id"], 2) == i and r["text"].startswith("a says:") for r in recs)
            seen += [r["id"] for r in recs]
        assert sorted(map(_key, seen)) == sorted(map(_key, IDS[:24]))
        assert fake.hits() == 24
    finally:
        fake.stop()
