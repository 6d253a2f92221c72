"""The persistent batch: row bookkeeping, BatchUpdate semantics, sampling metadata."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmserve.sampling_params import SamplingParams
from lmserve.worker.input_batch import InputBatch, make_generator
from lmserve.worker.logits_processors import (
    BatchUpdate,
    LogitsProcessor,
    LogitsProcessors,
    MoveDirectionality,
    process_dict_updates,
)
from lmserve.worker.logits_processors.loading import build_logitsprocs

UNI, SWAP = MoveDirectionality.UNIDIRECTIONAL, MoveDirectionality.SWAP
VOCAB = 16


class Recorder(LogitsProcessor):
    """Tracks index -> (request id, live output list) three ways and logs every update."""

    def __init__(self, vllm_config=None, device=torch.device("cpu"), is_pin_memory=False) -> None:
        self.updates: list[BatchUpdate | None] = []
        self.sparse: dict[int, tuple[str, list[int]]] = {}  # via process_dict_updates
        self.dense: list[str | None] = []  # added -> removed -> moved, by hand
        self.dense_vllm_doc_order: list[str | None] = []  # removed -> added -> moved

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    @staticmethod
    def _apply_dense(rows: list[str | None], update: BatchUpdate, removed_first: bool) -> None:
        def grow(i: int) -> None:
            rows.extend([None] * (i + 1 - len(rows)))

        def remove() -> None:
            for i in update.removed:
                grow(i)
                rows[i] = None

        if removed_first:
            remove()
        for i, params, _, _ in update.added:
            grow(i)
            rows[i] = params.extra_args["rid"]
        if not removed_first:
            remove()
        for a, b, d in update.moved:
            grow(max(a, b))
            if d == SWAP:
                rows[a], rows[b] = rows[b], rows[a]
            else:
                rows[b], rows[a] = rows[a], None
        del rows[update.batch_size:]

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.updates.append(batch_update)
        process_dict_updates(self.sparse, batch_update, lambda p, _, out: (p.extra_args["rid"], out))
        if batch_update is not None:
            self._apply_dense(self.dense, batch_update, removed_first=False)
            self._apply_dense(self.dense_vllm_doc_order, batch_update, removed_first=True)


def _batch(max_num_reqs: int = 8) -> tuple[InputBatch, Recorder]:
    rec = Recorder()
    return InputBatch(max_num_reqs, VOCAB, "cpu", LogitsProcessors([rec])), rec


def _params(rid: str, **kw) -> SamplingParams:
    return SamplingParams(extra_args={"rid": rid}, **kw)


def _add(batch: InputBatch, rid: str, outputs: dict[str, list[int]], **kw) -> int:
    outputs[rid] = []
    return batch.add_request(rid, _params(rid, **kw), [1, 2, 3], outputs[rid])


def test_adds_reuse_freed_slots_and_condense_moves_tail():
    batch, rec = _batch()
    outs: dict[str, list[int]] = {}
    for rid in "ABCD":
        _add(batch, rid, outs)
    batch.refresh()
    assert batch.req_ids == list("ABCD")
    assert [a[0] for a in rec.updates[-1].added] == [0, 1, 2, 3]

    batch.remove_request("B")
    batch.remove_request("D")
    assert _add(batch, "E", outs) == 1  # the lowest freed slot
    batch.refresh()
    update = rec.updates[-1]
    assert batch.req_ids == ["A", "E", "C"]
    assert [a[0] for a in update.added] == [1] and list(update.removed) == [3] and list(update.moved) == []
    assert update.batch_size == 3

    batch.remove_request("A")
    batch.refresh()
    update = rec.updates[-1]
    assert batch.req_ids == ["C", "E"]
    assert list(update.removed) == [0] and list(update.moved) == [(2, 0, UNI)]
    assert rec.sparse == {0: ("C", outs["C"]), 1: ("E", outs["E"])}


def test_refresh_without_changes_sends_none_and_keeps_metadata():
    batch, rec = _batch()
    outs: dict[str, list[int]] = {}
    _add(batch, "A", outs, temperature=0.5)
    batch.refresh()
    md = batch.make_sampling_metadata()
    outs["A"].append(3)  # new tokens are not a membership change
    batch.refresh()
    assert rec.updates[-1] is None and len(rec.updates) == 2
    assert batch.make_sampling_metadata() is md
    assert md.output_token_ids[0] is outs["A"]  # live list, not a copy
    _add(batch, "B", outs, temperature=0.0)
    batch.refresh()
    md2 = batch.make_sampling_metadata()
    assert md2 is not md and md2.num_reqs == 2
    assert md2.temperature is not None and md2.temperature.tolist() == [0.5, 0.0]
    assert not md2.all_greedy and not md2.all_random


def test_remove_request_added_in_same_step():
    batch, rec = _batch()
    outs: dict[str, list[int]] = {}
    for rid in "AB":
        _add(batch, rid, outs)
    batch.refresh()
    batch.remove_request("A")
    _add(batch, "C", outs)  # reuses slot 0
    batch.remove_request("C")  # and goes away before any refresh
    batch.refresh()
    update = rec.updates[-1]
    assert list(update.added) == [] and list(update.removed) == [0] and list(update.moved) == [(1, 0, UNI)]
    assert batch.req_ids == ["B"] and rec.dense == ["B"]


def test_swap_is_reported_as_swap():
    batch, rec = _batch()
    outs: dict[str, list[int]] = {}
    for rid in "ABC":
        _add(batch, rid, outs)
    batch.refresh()
    batch.swap(0, 2)
    batch.refresh()
    assert list(rec.updates[-1].moved) == [(0, 2, SWAP)]
    assert batch.req_ids == ["C", "B", "A"] and rec.dense == ["C", "B", "A"]


def test_errors_and_unknown_ids():
    batch, _ = _batch(max_num_reqs=2)
    outs: dict[str, list[int]] = {}
    _add(batch, "A", outs)
    with pytest.raises(ValueError, match="already"):
        _add(batch, "A", outs)
    _add(batch, "B", outs)
    with pytest.raises(RuntimeError, match="full"):
        _add(batch, "C", outs)
    assert batch.remove_request("nope") is None


def test_generators_are_kept_per_request():
    batch = InputBatch(4, VOCAB, "cpu")
    params = SamplingParams(seed=5)
    gen = make_generator(params)
    assert gen is not None and make_generator(SamplingParams(seed=5, temperature=0.0)) is None
    batch.add_request("A", params, [1], [], gen)
    batch.add_request("B", SamplingParams(seed=6), [1], [])  # created here when not given
    batch.add_request("C", SamplingParams(), [1], [])
    batch.refresh()
    md = batch.make_sampling_metadata()
    assert set(md.generators) == {0, 1} and md.generators[0] is gen
    assert batch.get_generator("C") is None


def test_metadata_fields_follow_rows():
    batch = InputBatch(4, VOCAB, "cpu", build_logitsprocs(None, "cpu", custom=()))
    specs = {
        "A": SamplingParams(top_k=3, logprobs=2, presence_penalty=0.5),
        "B": SamplingParams(top_p=0.5, allowed_token_ids=[1, 2], logprobs=-1, repetition_penalty=1.2),
        "C": SamplingParams(temperature=0.0, min_p=0.2),
    }
    for rid, p in specs.items():
        batch.add_request(rid, p, [4, 5], [])
    batch.refresh()
    md = batch.make_sampling_metadata()
    assert md.top_k is not None and md.top_k.tolist() == [3, VOCAB, VOCAB]
    assert md.top_p is not None and md.top_p.tolist() == [1.0, 0.5, 1.0]
    assert md.min_p is None  # greedy params drop min_p
    assert md.max_num_logprobs == -1 and md.penalty_rows == [0, 1]
    assert md.allowed_token_ids_mask is not None
    assert md.allowed_token_ids_mask[1].nonzero().numel() == VOCAB - 2
    assert not md.allowed_token_ids_mask[0].any() and not md.allowed_token_ids_mask[2].any()
    assert md.prompt_token_mask is not None and md.prompt_token_mask[1, [4, 5]].all()
    assert not md.prompt_token_mask[0].any()
    batch.remove_request("A")
    batch.refresh()
    md = batch.make_sampling_metadata()
    assert batch.req_ids == ["C", "B"] and md.top_k is None and md.penalty_rows == [1]


# ---------------------------------------------------------------------- property test
OPS = st.lists(st.tuples(st.sampled_from(["add", "add", "remove", "remove", "swap", "refresh", "grow"]),
                         st.integers(0, 63), st.integers(0, 63)), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_index_state_mapping_survives_random_sequences(ops):
    batch, rec = _batch(max_num_reqs=6)
    outs: dict[str, list[int]] = {}
    counter = 0
    changed = False

    def check() -> None:
        update = rec.updates[-1]
        assert (update is None) == (not changed)
        ids = batch.req_ids
        assert len(ids) == batch.num_reqs and batch.req_id_to_index == {r: i for i, r in enumerate(ids)}
        assert rec.sparse.keys() == set(range(len(ids)))
        for i, rid in enumerate(ids):
            assert rec.sparse[i][0] == rid and rec.sparse[i][1] is outs[rid]
        assert rec.dense == ids and rec.dense_vllm_doc_order == ids
        md = batch.make_sampling_metadata()
        assert md.num_reqs == len(ids)
        assert all(md.output_token_ids[i] is outs[r] for i, r in enumerate(ids))
        temps = [float(r[1:]) % 3 / 2 for r in ids]  # temperatures encode the request
        if md.temperature is not None:
            assert md.temperature.tolist() == pytest.approx(temps)

    for op, x, y in ops:
        live = batch.req_ids
        if op == "add" and batch.num_reqs < 6:
            counter += 1
            rid = f"r{counter}"
            outs[rid] = []
            batch.add_request(rid, _params(rid, temperature=counter % 3 / 2), None, outs[rid])
            changed = True
        elif op == "remove" and live:
            batch.remove_request(live[x % len(live)])
            changed = True
        elif op == "swap" and len(batch._rows) > 1:
            rows = batch._rows
            i, j = x % len(rows), y % len(rows)
            if i != j and rows[i] is not None and rows[j] is not None:
                batch.swap(i, j)
                changed = True
        elif op == "grow" and live:
            outs[live[x % len(live)]].append(y % VOCAB)
        elif op == "refresh":
            batch.refresh()
            check()
            changed = False
    batch.refresh()
    check()
