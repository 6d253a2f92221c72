"""Turns a scheduled step into one flat (varlen) batch, runs the model, samples.

Layout of a step (see ``AttentionMetadata``): the scheduled requests' new tokens back
to back, every single-token query (decodes) first, then the longer chunks. Logits are
computed only where needed: at the last token of each request that samples this step
(rows in the persistent ``InputBatch`` order) and, for requests that asked for prompt
logprobs, at every prompt position of their chunk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from lmserve.config import EngineConfig
from lmserve.distributed.parallel_state import ParallelContext
from lmserve.engine.sched_output import ScheduledRequest, SchedulerOutput
from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.worker.kv_cache_sizing import determine_num_blocks
from lmserve.worker.step_inputs import StepInputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VocabLogprobsRow:
    """The whole vocabulary at one position: ``ids`` by descending ``lps`` (numpy arrays, which
    may be views of one array for a whole prompt chunk), and the chosen token and its rank."""

    chosen: int
    rank: int
    ids: np.ndarray  # [V] int64
    lps: np.ndarray  # [V] float32


# (token ids with the chosen token first then the top-k or the asked-for ids, their logprobs,
# rank of the chosen token), or the whole vocabulary (logprobs of -1).
LogprobsRow = tuple[list[int], list[float], int] | VocabLogprobsRow


def vocab_rows(logprobs: torch.Tensor, chosen: list[int], ranks: list[int]) -> list[VocabLogprobsRow]:
    """One sort per row of ``logprobs`` [N, V]: no Python object per vocabulary entry."""
    values, order = logprobs.float().sort(dim=-1, descending=True)
    values_np, order_np = values.cpu().numpy(), order.cpu().numpy()
    return [VocabLogprobsRow(c, r, order_np[i], values_np[i]) for i, (c, r) in enumerate(zip(chosen, ranks))]


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request id -> new token id
    logprobs: dict[str, LogprobsRow] = field(default_factory=dict)
    # request id -> logprobs of prompt tokens [start, start + len) (prompt position >= 1)
    prompt_logprobs: dict[str, tuple[int, list[LogprobsRow]]] = field(default_factory=dict)
    # request id -> the pooler's float32 CPU tensor (pooling runner only)
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _DriverStep:
    """What the driver keeps of a step between ``prepare`` and ``finish`` (never sent to workers)."""

    sched: SchedulerOutput
    sampling: list[ScheduledRequest]
    prompt_logprob_reqs: list[tuple[ScheduledRequest, int, int]]  # (request, first, last) per logits group
    req_ids: list[str]  # the sampling rows, in the persistent batch's order


class ModelRunner:
    """Owns one rank's model part and KV cache tensors; on the driver (rank 0) also the persistent
    batch, the sampler, grammars and logits processors.

    A step is ``prepare`` (driver: scheduler output -> picklable ``StepInputs``), ``run_model``
    (every rank, identically: the forward pass and the logits of the step's row groups; the
    driver gets the logits) and ``finish`` (driver: sampling, logprobs). ``execute`` is the three
    in one process (one rank). ``num_blocks`` None: this rank sizes its KV cache itself; an
    executor with several ranks passes the number every rank agreed on."""

    def __init__(self, config: EngineConfig, logitsprocs_classes: list[type],
                 parallel: ParallelContext | None = None, device: torch.device | None = None,
                 agree_num_blocks=None) -> None:
        from lmserve.model.loader import get_model
        from lmserve.worker.kv_cache_sizing import pooling_num_blocks

        self.config = config
        self.parallel = parallel if parallel is not None else ParallelContext.single()
        self.device = device if device is not None else config.device_config.torch_device
        self.block_size = config.cache_config.block_size
        self.is_pooling = config.model_config.is_pooling
        torch.manual_seed(config.model_config.seed)
        self.model = get_model(config.model_config, self.device, parallel=self.parallel)
        self.uses_token_type_ids = bool(getattr(self.model, "uses_token_type_ids", False))
        self.lora_builder = None
        if config.lora_config is not None:
            self._enable_lora()
        self.kv_spec = self.model.kv_cache_spec() if getattr(self.model, "needs_kv_cache", True) else None
        if self.kv_spec is None:  # an encoder: block ids are scheduler bookkeeping only
            self.num_blocks = pooling_num_blocks(config)
            self.kv_caches: list[torch.Tensor] = []
        else:
            num_blocks = determine_num_blocks(config, self.kv_spec, self.device)
            self.num_blocks = agree_num_blocks(num_blocks) if agree_num_blocks is not None else num_blocks
            # Zeroed, never empty: masked attention positions multiply 0 x V, which must not be NaN.
            self.kv_caches = self.kv_spec.allocate(self.num_blocks, self.block_size, self.device)
            logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                        self.num_blocks * self.kv_spec.bytes_per_block(self.block_size) / 2**20)
        self.vocab_size = config.model_config.vocab_size
        self.input_batch = None
        self._bitmask = None  # structured outputs' GrammarBitmask, allocated on first use
        if not self.is_pooling and self.parallel.is_driver:
            from lmserve.worker.input_batch import InputBatch
            from lmserve.worker.logits_processors.loading import build_logitsprocs
            from lmserve.worker.sampler import Sampler

            self.logitsprocs = build_logitsprocs(config, self.device, logitsprocs_classes)
            self.input_batch = InputBatch(max_num_reqs=config.scheduler_config.max_num_seqs,
                                          vocab_size=self.vocab_size, device=self.device,
                                          logitsprocs=self.logitsprocs)
            self.sampler = Sampler()

    def _enable_lora(self) -> None:
        from lmserve.lora.batch import LoRABatchBuilder
        from lmserve.model.layers.fused_moe import FusedMoE
        from lmserve.model.models.llama import enable_lora

        config = self.config
        if self.is_pooling or not hasattr(getattr(self.model, "model", None), "layers") or \
                any(isinstance(m, FusedMoE) for m in self.model.modules()):
            raise ValueError("LoRA adapters (--enable-lora) apply to generative Llama-family models without "
                             f"mixture-of-experts layers only, not to {type(self.model).__name__}")
        n = enable_lora(self.model)
        self.lora_builder = LoRABatchBuilder()
        logger.info("LoRA: %d projection modules take adapters (up to %d per step, rank <= %d); a step with "
                    "adapters runs layer by layer (the native decode step has no LoRA delta)", n,
                    config.lora_config.max_loras, config.lora_config.max_lora_rank)

    # ------------------------------------------------------------------ batch building
    def _update_input_batch(self, sampling: list[ScheduledRequest]) -> None:
        """The persistent batch holds exactly the requests that sample this step."""
        batch = self.input_batch
        wanted = {s.request.request_id for s in sampling}
        for req_id in list(batch.req_ids):
            if req_id not in wanted:
                batch.remove_request(req_id)
        present = set(batch.req_ids)
        for s in sampling:
            r = s.request
            if r.request_id not in present:
                batch.add_request(r.request_id, r.sampling_params, r.prompt_token_ids,
                                  r.output_token_ids, r.generator)
        batch.refresh()

    def _build_batch(self, scheduled: list[ScheduledRequest]):
        """-> (input_ids, positions, metadata, flat start of each request, the batch order)."""
        order = sorted(scheduled, key=lambda s: s.num_new_tokens != 1)  # stable: decodes first
        num_decodes = sum(1 for s in order if s.num_new_tokens == 1)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        starts: dict[str, int] = {}
        max_blocks = max(len(s.block_ids) for s in order)
        tables = torch.zeros((len(order), max_blocks), dtype=torch.int32)
        for i, s in enumerate(order):
            r = s.request
            start, end = s.num_computed_before, s.num_computed_before + s.num_new_tokens
            starts[r.request_id] = len(input_ids)
            input_ids.extend(r.all_token_ids[start:end])
            positions.extend(range(start, end))
            blocks = s.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(s.num_new_tokens)
            seq_lens.append(end)
            tables[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        dev = self.device
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        meta = AttentionMetadata(
            num_decodes=num_decodes,
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_size=bs, query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            decode_only=all(s.num_computed_before >= s.request.num_prompt_tokens for s in order))
        if self.lora_builder is not None:
            meta.lora = self.lora_builder.build([s.request.lora for s in order], query_lens, dev)
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids_t, pos_t, meta, starts, order

    # ------------------------------------------------------------------ execution
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """One step on one rank: ``prepare``, ``run_model``, ``finish``."""
        if sched.is_empty:
            return RunnerOutput()
        if self.is_pooling:
            return self._execute_pooling(sched)
        step, kept = self.prepare(sched)
        return self.finish(kept, self.run_model(step))

    def prepare(self, sched: SchedulerOutput) -> tuple[StepInputs, _DriverStep]:
        """Driver only: the step's flat batch and its logits row groups (each prompt-logprob chunk,
        in scheduling order, then the sampling rows in the persistent batch's order), and what
        ``finish`` needs to turn their logits into tokens."""
        sampling = [s for s in sched.scheduled if s.samples]
        self._update_input_batch(sampling)
        input_ids, positions, meta, starts, _ = self._build_batch(sched.scheduled)
        groups: list[list[int]] = []
        prompt_reqs: list[tuple[ScheduledRequest, int, int]] = []
        for s in sched.scheduled:
            r = s.request
            if not r.wants_prompt_logprobs:
                continue
            first = s.num_computed_before
            last = min(first + s.num_new_tokens, r.num_prompt_tokens - 1)  # positions p < prompt_len - 1
            if last > first:
                flat = starts[r.request_id]
                groups.append(list(range(flat, flat + (last - first))))
                prompt_reqs.append((s, first, last))
        req_ids = list(self.input_batch.req_ids)
        if req_ids:
            sched_by_id = {s.request.request_id: s for s in sampling}
            groups.append([starts[r] + sched_by_id[r].num_new_tokens - 1 for r in req_ids])
        step = StepInputs(input_ids, positions, meta, groups)
        return step, _DriverStep(sched, sampling, prompt_reqs, req_ids)

    @torch.inference_mode()
    def run_model(self, step: StepInputs) -> list[torch.Tensor] | None:
        """Every rank, identically (same collectives in the same order): the forward pass and
        ``compute_logits`` of each row group. Returns the groups' float32 logits on the driver,
        None on other ranks. With pipeline stages the step runs as micro-batches
        (``worker/pipeline.py``)."""
        step = step.to(self.device)  # a worker unpickles it on CPU
        if self.parallel.pp_size > 1:
            from lmserve.worker.pipeline import run_pipelined

            return run_pipelined(self.model, self.kv_caches, step, self.parallel)
        hidden = self.model(step.input_ids, step.positions, self.kv_caches, step.meta)  # [T, hidden]
        logits = [self.model.compute_logits(step.rows(hidden, g)) for g in step.logits_groups]
        return logits if self.parallel.is_driver else None

    @torch.inference_mode()
    def finish(self, kept: _DriverStep, logits_groups: list[torch.Tensor]) -> RunnerOutput:
        """Driver only: prompt logprobs and sampling from ``run_model``'s logits."""
        out = RunnerOutput()
        for (s, first, last), logits in zip(kept.prompt_logprob_reqs, logits_groups):
            self._prompt_logprobs(s, first, last, logits, out)
        req_ids = kept.req_ids
        if not req_ids:
            return out
        logits = logits_groups[-1]  # [B, vocab] float32
        sched_by_id = {s.request.request_id: s for s in kept.sampling}
        grammar_mask = self._grammar_mask([sched_by_id[r].request for r in req_ids])
        result = self.sampler(logits, self.input_batch.make_sampling_metadata(), grammar_mask)
        tokens = result.sampled_token_ids.tolist()
        for req_id, tok in zip(req_ids, tokens):
            out.sampled[req_id] = tok
        if result.logprobs is not None:
            self._sample_logprobs(req_ids, sched_by_id, tokens, result, out)
        return out

    def _grammar_mask(self, requests: list):
        """This step's token bitmask of the constrained rows (structured outputs), or None.
        Row i is ``requests[i]``; each grammar state is first synced to its sequence's tokens, and
        a row whose reasoning is still open is left free."""
        constrained = [(row, r.grammar) for row, r in enumerate(requests) if r.grammar is not None]
        for row, state in constrained:
            state.sync(requests[row].output_token_ids)
        constrained = [(row, state) for row, state in constrained if not state.in_reasoning]
        if not constrained:
            return None
        if self._bitmask is None:
            from lmserve.structured_output.bitmask import GrammarBitmask
            self._bitmask = GrammarBitmask(self.config.scheduler_config.max_num_seqs, self.vocab_size)
        return self._bitmask.fill(constrained)
    @staticmethod
    def _sample_logprobs(req_ids: list[str], sched_by_id: dict[str, ScheduledRequest], tokens: list[int],
                         result, out: RunnerOutput) -> None:
        """Each row as its request asked: the top-k, the whole vocabulary (one sort of that row)
        or its ``logprob_token_ids`` (one gather; they keep the requested order)."""
        ids = result.logprobs.token_ids.tolist()
        lps = result.logprobs.logprobs.tolist()
        ranks = result.logprobs.ranks.tolist()
        raw = result.raw_logprobs
        for row, req_id in enumerate(req_ids):
            params = sched_by_id[req_id].request.sampling_params
            k = params.num_logprobs
            if k is None:
                continue
            if params.logprob_token_ids:
                wanted = [tokens[row], *params.logprob_token_ids]
                values = raw[row, torch.tensor(wanted, device=raw.device)].tolist()
                out.logprobs[req_id] = (wanted, values, ranks[row])
            elif k == -1:
                out.logprobs[req_id] = vocab_rows(raw[row:row + 1], [tokens[row]], [ranks[row]])[0]
            else:
                out.logprobs[req_id] = (ids[row][:k + 1], lps[row][:k + 1], ranks[row])

    def _prompt_logprobs(self, s: ScheduledRequest, first: int, last: int, logits: torch.Tensor,
                         out: RunnerOutput) -> None:
        """Logprobs of prompt tokens p+1 for each prompt position p in [first, last) of this chunk,
        from that chunk's ``logits`` [last - first, vocab]."""
        from lmserve.worker.sampler import compute_logprobs_tensors

        r = s.request
        k = r.sampling_params.prompt_logprobs
        logprobs = torch.log_softmax(logits, dim=-1)
        target_ids = r.prompt_token_ids[first + 1:last + 1]
        targets = torch.tensor(target_ids, device=logprobs.device)
        t = compute_logprobs_tensors(logprobs, targets, 0 if k == -1 else k)
        ranks = t.ranks.tolist()
        if k == -1:
            out.prompt_logprobs[r.request_id] = (first + 1, vocab_rows(logprobs, target_ids, ranks))
            return
        ids, lps = t.token_ids.tolist(), t.logprobs.tolist()
        out.prompt_logprobs[r.request_id] = (first + 1, list(zip(ids, lps, ranks)))

    def _execute_pooling(self, sched: SchedulerOutput) -> RunnerOutput:
        """Every scheduled request is a whole prompt (the scheduler never chunks pooling
        requests), so the hidden rows are the prompts back to back in batch order."""
        from lmserve.model.layers.pooler import PoolingMetadata

        out = RunnerOutput()
        input_ids, positions, meta, _, order = self._build_batch(sched.scheduled)
        kwargs = {}
        if self.uses_token_type_ids:
            types: list[int] = []
            for s in order:
                r = s.request
                types.extend(r.token_type_ids if r.token_type_ids is not None else [0] * r.num_prompt_tokens)
            kwargs["token_type_ids"] = torch.tensor(types, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, **kwargs)  # [T, hidden]
        pooling_meta = PoolingMetadata(prompt_lens=[s.request.num_prompt_tokens for s in order],
                                       params=[s.request.pooling_params for s in order],
                                       prompt_token_ids=[s.request.prompt_token_ids for s in order])
        results = self.model.pooler(hidden, pooling_meta)
        for s, data in zip(order, results, strict=True):
            out.pooled[s.request.request_id] = data.to("cpu", torch.float32)
        return out
