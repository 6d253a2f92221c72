"""Executors (issue 24): pipeline- and tensor-parallel engines through ``LLM`` give the one-rank
engine's greedy tokens and prompt logprobs (fp32, tiny Llama / Qwen2 / Qwen3 checkpoints, chunked
prefill and prefix caching on), through the ``mp`` backend and (TP) the ``ray`` backend; start-up
refusals name their reason; the micro-batch split and metadata slicing keep their invariants."""

from __future__ import annotations

import os
import pickle
import signal
import time

import pytest
import torch

from lmserve.entrypoints.llm import LLM
from lmserve.executor.base import WorkerDiedError
from lmserve.sampling_params import SamplingParams
from tests.conftest import make_tiny_checkpoint

# prompts that share prefixes (prefix caching hits on the second pass) and are longer than the
# 16-token step budget (chunked prefill), of different lengths (decodes and chunks in one step)
PROMPTS = [[1, 5, 9, 33, 7, 200, 17] * k for k in (1, 3, 6, 2)] + [[1, 5, 9, 33, 7, 200, 17] * 3 + [44, 45]]
ENGINE = dict(skip_tokenizer_init=True, dtype="float32", block_size=4, kv_cache_memory=4 * 2**20,
              max_num_batched_tokens=16, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-executor")
    # 3 layers: an uneven split over 2 pipeline stages
    return {k: make_tiny_checkpoint(str(root / k), k, num_hidden_layers=3) for k in ("llama", "qwen2", "qwen3")}


def _run(llm: LLM) -> tuple[list, list[float]]:
    """(every output's token ids and the token ids of its logprobs and prompt logprobs, the
    logprob values in the same order). Tensor parallelism sums in another order, so the values
    are compared with a tolerance and the ids exactly."""
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with_logprobs = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    ids, values = [], []
    for params in (greedy, greedy, with_logprobs):  # the second pass hits the prefix cache
        for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False):
            c = o.outputs[0]
            ids.append(list(c.token_ids))
            for d in list(c.logprobs or []) + [d for d in (o.prompt_logprobs or []) if d]:
                ids.append(sorted(d))
                values.extend(d[t].logprob for t in sorted(d))
    return ids, values


def _same(got: tuple[list, list[float]], want: tuple[list, list[float]]) -> None:
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], abs=1e-4)


def _reference(path: str, cache: dict) -> list:
    if path not in cache:
        llm = LLM(path, **ENGINE)
        cache[path] = _run(llm)
    return cache[path]


@pytest.fixture(scope="module")
def reference_cache() -> dict:
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_pipeline_parallel_2_equals_one_rank(kind: str, tiny_checkpoints, reference_cache) -> None:
    path = tiny_checkpoints[kind]
    llm = LLM(path, pipeline_parallel_size=2, distributed_executor_backend="mp", cpu_distributed_timeout_seconds=60,
              distributed_timeout_seconds=120, **ENGINE)
    try:
        assert type(llm.llm_engine.core.executor).__name__ == "MultiprocExecutor"
        got = _run(llm)
    finally:
        llm.shutdown()
    _same(got, _reference(path, reference_cache))


def _heads_on_driver(llm: LLM) -> int:
    return llm.llm_engine.core.executor.model.model.layers[0].self_attn.num_heads


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_tensor_parallel_2_equals_one_rank_mp(kind: str, tiny_checkpoints, reference_cache) -> None:
    path = tiny_checkpoints[kind]
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)  # mp is the default with several ranks
    try:
        assert type(llm.llm_engine.core.executor).__name__ == "MultiprocExecutor"
        assert _heads_on_driver(llm) == 2  # of the tiny model's 4: the driver holds its shard
        got = _run(llm)
    finally:
        llm.shutdown()
    _same(got, _reference(path, reference_cache))


@pytest.mark.slow
def test_tensor_parallel_2_through_ray_equals_one_rank(tiny_checkpoints, reference_cache) -> None:
    pytest.importorskip("ray")
    path = tiny_checkpoints["llama"]
    llm = LLM(path, tensor_parallel_size=2, distributed_executor_backend="ray", **ENGINE)  # a local Ray cluster
    try:
        executor = llm.llm_engine.core.executor
        assert type(executor).__name__ == "RayExecutor"
        assert _heads_on_driver(llm) == 2
        got = _run(llm)
        # a dead actor: reported by the monitor, then every step refuses with the reason
        os.kill(executor.worker_pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while executor._failure is None and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.05)
        with pytest.raises(WorkerDiedError, match="Ray worker rank 1 .*ActorDiedError"):
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        llm.shutdown()
    _same(got, _reference(path, reference_cache))


@pytest.mark.slow
def test_tensor_2_by_pipeline_2_equals_one_rank(tiny_checkpoints, reference_cache) -> None:
    """4 ranks: two stages of two TP ranks; qwen2's tied head is vocab-parallel on the last stage."""
    path = tiny_checkpoints["qwen2"]
    llm = LLM(path, tensor_parallel_size=2, pipeline_parallel_size=2, **ENGINE)
    try:
        assert _heads_on_driver(llm) == 2
        got = _run(llm)
    finally:
        llm.shutdown()
    _same(got, _reference(path, reference_cache))


def test_pipeline_parallel_refused_for_other_architectures(tmp_path) -> None:
    from transformers import GPT2Config

    from lmserve.engine.arg_utils import EngineArgs

    GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel does not split into pipeline stages"):
        EngineArgs(model=str(tmp_path), pipeline_parallel_size=2).create_engine_config()
    with pytest.raises(ValueError, match="more than the model's 2 layers"):
        make_tiny_checkpoint(str(tmp_path / "llama"), "llama")
        EngineArgs(model=str(tmp_path / "llama"), pipeline_parallel_size=3).create_engine_config()
    with pytest.raises(ValueError, match="--cpu-distributed-timeout-seconds must be positive"):
        EngineArgs(model=str(tmp_path / "llama"), cpu_distributed_timeout_seconds=0).create_engine_config()
    with pytest.raises(ValueError, match="--enable-lora with tensor/pipeline parallelism"):
        EngineArgs(model=str(tmp_path / "llama"), tensor_parallel_size=2, enable_lora=True).create_engine_config()


def test_layer_split_and_micro_batches() -> None:
    from lmserve.model.layers.attention_metadata import AttentionMetadata
    from lmserve.model.models.llama import pp_layer_range
    from lmserve.worker.step_inputs import StepInputs, slice_metadata

    assert [pp_layer_range(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [pp_layer_range(4, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    qlens, slens = [1, 1, 7, 3], [5, 9, 7, 11]
    qsl = torch.tensor([0, 1, 2, 9, 12], dtype=torch.int32)
    meta = AttentionMetadata(num_decodes=2, query_start_loc=qsl, seq_lens=torch.tensor(slens, dtype=torch.int32),
                             block_tables=torch.arange(12, dtype=torch.int32).view(4, 3),
                             slot_mapping=torch.arange(12), block_size=4, query_lens_cpu=qlens, seq_lens_cpu=slens,
                             max_query_len=7, max_seq_len=11)
    step = StepInputs(torch.arange(12), torch.arange(12), meta, [[11]])
    for count in (1, 2, 3, 4, 9):
        runs = step.micro_batches(count)
        assert runs[0][0] == 0 and runs[-1][1] == 4 and len(runs) == min(count, 4)
        assert all(a < b for a, b in runs) and all(runs[i][1] == runs[i + 1][0] for i in range(len(runs) - 1))
    sub, t0, t1 = slice_metadata(meta, 1, 3)
    assert (t0, t1) == (1, 9) and sub.num_decodes == 1 and sub.query_lens_cpu == [1, 7]
    assert sub.query_start_loc.tolist() == [0, 1, 8] and sub.slot_mapping.tolist() == list(range(1, 9))
    assert sub.block_tables.tolist() == [[3, 4, 5], [6, 7, 8]] and sub.max_seq_len == 9
    sent = pickle.loads(pickle.dumps(step))  # as the driver sends it: tensors travel as numpy arrays
    assert torch.equal(sent.input_ids, step.input_ids) and sent.logits_groups == [[11]]
    for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
        a, b = getattr(meta, name), getattr(sent.meta, name)
        assert torch.equal(a, b) and a.dtype == b.dtype
    assert sent.meta.query_lens_cpu == qlens and sent.meta.num_decodes == 2 and sent.meta.lora is None
    assert StepInputs.rows(torch.arange(10).view(10, 1), [2, 3, 4]).flatten().tolist() == [2, 3, 4]
    assert StepInputs.rows(torch.arange(10).view(10, 1), [7, 2]).flatten().tolist() == [7, 2]
