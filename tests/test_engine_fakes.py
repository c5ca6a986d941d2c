"""Fakes for the engine tests (imported by the other test_engine_* files) and checks of the fakes themselves.

FakeRunner stands in for the model: it keeps a paged "KV cache" holding (position, token id) per slot, writes every
scheduled chunk's tokens through the sequence's block_table, then reads each sampled sequence's whole history back
through the block table. Logits depend only on what it reads back, so a cache bug (wrong block, evicted prefix,
shared block overwritten) trips its assertions (and would change the generated tokens).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from fastinfer.engine.scheduler import SchedulerOutput


def history_seed(tokens: list[int]) -> int:
    """Deterministic (process-independent) seed from a token history."""
    return zlib.crc32(repr((len(tokens), tokens[-4:])).encode())


class FakeRunner:
    """runner interface of LLMEngine over a simulated paged cache; logits are a function of the cached history."""

    def __init__(self, num_blocks: int, block_size: int, vocab: int = 64, peaked: bool = True) -> None:
        self.num_blocks, self.block_size, self.vocab, self.peaked = num_blocks, block_size, vocab, peaked
        self.vocab_size = vocab  # the engine checks prompt token ids against it
        self.kv: list[tuple[int, int] | None] = [None] * (num_blocks * block_size)
        self.steps = 0
        self.max_batch_tokens = 0

    def slot(self, seq, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, sched: SchedulerOutput) -> torch.Tensor:
        self.steps += 1
        self.max_batch_tokens = max(self.max_batch_tokens, sched.num_batched_tokens)
        assert sched.num_batched_tokens == sum(c.num_tokens for c in sched.scheduled)
        ids = [c.seq.seq_id for c in sched.scheduled]
        assert len(ids) == len(set(ids)), "a sequence scheduled twice in one step"
        written: dict[int, tuple[int, int]] = {}
        for c in sched.scheduled:  # write phase (every layer writes the step's KV before attending)
            seq = c.seq
            assert c.start == seq.num_computed_tokens and c.num_tokens >= 1
            assert c.start + c.num_tokens <= seq.num_tokens
            assert len(seq.block_table) * self.block_size >= c.start + c.num_tokens
            assert c.sample == (c.start + c.num_tokens == seq.num_tokens)
            for pos in range(c.start, c.start + c.num_tokens):
                s = self.slot(seq, pos)
                new = (pos, seq.token_ids[pos])
                assert written.setdefault(s, new) == new, "two different tokens written to one slot in a step"
                self.kv[s] = new
        rows = []
        for c in sched.scheduled:  # read phase: attend over the whole cached history
            if not c.sample:
                continue
            seq = c.seq
            history = [self.kv[self.slot(seq, p)] for p in range(seq.num_tokens)]
            assert history == list(enumerate(seq.token_ids)), "cache content differs from the sequence"
            rows.append(self.logits([t for _, t in history]))
        return torch.stack(rows) if rows else torch.empty(0, self.vocab)

    def logits(self, tokens: list[int]) -> torch.Tensor:
        g = torch.Generator().manual_seed(history_seed(tokens))
        x = torch.randn(self.vocab, generator=g)
        if self.peaked:
            x[torch.randint(self.vocab, (1,), generator=g)] += 8.0  # one clear favourite (greedy = its argmax)
        return x


class ByteTokenizer:
    """Byte-level BPE with no merges (one token per byte, so multi-byte characters span tokens) + special tokens."""

    def __init__(self) -> None:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
        self.backend = Tokenizer(models.BPE(vocab, []))
        self.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.backend.decoder = decoders.ByteLevel()
        self.backend.add_special_tokens(["<eos>", "<bos>"])
        self.eos_token_ids = [self.backend.token_to_id("<eos>")]
        self.bos_id = self.backend.token_to_id("<bos>")
        self.vocab_size = self.backend.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def test_byte_tokenizer_splits_multibyte_characters():
    tok = ByteTokenizer()
    ids = tok.encode("é€")
    assert len(ids) == 5 and tok.decode(ids) == "é€"
    assert "\ufffd" in tok.decode(ids[:1])  # half a character decodes to the replacement character
    assert tok.decode(ids + tok.eos_token_ids) == "é€"
    assert tok.decode(ids + tok.eos_token_ids, skip_special_tokens=False) == "é€<eos>"


def test_fake_runner_logits_depend_on_history():
    r = FakeRunner(4, 2)
    assert torch.equal(r.logits([1, 2, 3]), r.logits([1, 2, 3]))
    assert not torch.equal(r.logits([1, 2, 3]), r.logits([1, 2, 4]))
    with pytest.raises(AssertionError, match="cache content"):
        r.kv = [None] * 8

        class S:  # a sequence whose cache was never written
            seq_id, token_ids, num_tokens, num_computed_tokens, block_table = 0, [5, 6], 2, 1, [0]

        class C:
            seq, start, num_tokens, sample = S, 1, 1, True

        r.execute(SchedulerOutput(scheduled=[C], num_batched_tokens=1))
