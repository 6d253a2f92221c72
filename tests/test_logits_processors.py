"""The logits-processor framework: vLLM v1 interface, built-ins, custom loading."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lmserve.sampling_params import SamplingParams
from lmserve.worker.logits_processors.per_request import RequestLogitsProcessorsAdapter
from lmserve.worker.logits_processors import (
    BatchUpdate,
    LogitBiasLogitsProcessor,
    LogitsProcessor,
    MinPLogitsProcessor,
    MinTokensLogitsProcessor,
    MoveDirectionality,
    build_logitsprocs,
    load_custom_logitsprocs,
    process_dict_updates,
    validate_all,
)
from tests.logitsprocs_examples import (
    DummyLogitsProcessor,
    NoRepeatPromptLogitsProcessor,
    WrappedPerReqLogitsProcessor,
)
from tests.sampling_helpers import make_batch, sample

UNI, SWAP = MoveDirectionality.UNIDIRECTIONAL, MoveDirectionality.SWAP
VOCAB = 12


def _logits(rows: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(rows))


# ---------------------------------------------------------------------- the seed's example
@pytest.mark.parametrize("proc", [DummyLogitsProcessor, WrappedPerReqLogitsProcessor])
def test_target_token_forced_only_for_rows_that_ask(proc):
    params = [SamplingParams(temperature=0.0, extra_args={"target_token": 5}),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, extra_args={"target_token": 0}),
              SamplingParams(temperature=0.0, extra_args={"target_token": 11})]
    batch, outs = make_batch(params, VOCAB, custom=[proc])
    logits = _logits(4)
    for _ in range(3):
        tokens = sample(batch, logits).sampled_token_ids.tolist()
        assert tokens[0] == 5 and tokens[2] == 0 and tokens[3] == 11
        assert tokens[1] == logits[1].argmax().item()
        for out, tok in zip(outs, tokens):
            out.append(tok)
        batch.refresh()


def test_target_token_follows_its_request_through_batch_changes():
    params = [SamplingParams(temperature=0.0, extra_args={"target_token": t}) for t in (1, 2, 3)]
    batch, _ = make_batch(params, VOCAB, custom=["tests.logitsprocs_examples:DummyLogitsProcessor"])
    batch.remove_request("r0")  # r2 moves into row 0
    batch.add_request("new", SamplingParams(temperature=0.0), [0], [])
    batch.refresh()
    tokens = dict(zip(batch.req_ids, sample(batch, torch.zeros(3, VOCAB)).sampled_token_ids.tolist()))
    assert tokens == {"r1": 2, "r2": 3, "new": 0}


def test_validate_params_rejects_non_int_target():
    classes = load_custom_logitsprocs(["tests.logitsprocs_examples:DummyLogitsProcessor"])
    validate_all(classes, SamplingParams(extra_args={"target_token": 3}))
    validate_all(classes, SamplingParams())
    with pytest.raises(ValueError, match="target_token value 'x' is not int"):
        validate_all(classes, SamplingParams(extra_args={"target_token": "x"}))


def test_validate_all_turns_other_errors_into_value_errors():
    class Strict(DummyLogitsProcessor):
        @classmethod
        def validate_params(cls, params):
            params.extra_args["required"]  # KeyError when missing

    with pytest.raises(ValueError, match="Strict rejected.*KeyError"):
        validate_all([Strict], SamplingParams())


# ---------------------------------------------------------------------- adapters
def test_adapter_three_argument_callable_sees_prompt_and_live_output():
    params = [SamplingParams(temperature=0.0, extra_args={"no_repeat": True}), SamplingParams(temperature=0.0)]
    batch, outs = make_batch(params, VOCAB, custom=[NoRepeatPromptLogitsProcessor], prompts=[[0], [0]])
    logits = torch.arange(VOCAB, 0, -1, dtype=torch.float32).expand(2, VOCAB)  # token 0 best
    got = []
    for _ in range(3):
        tokens = sample(batch, logits).sampled_token_ids.tolist()
        assert tokens[1] == 0
        got.append(tokens[0])
        outs[0].append(tokens[0])
        outs[1].append(tokens[1])
        batch.refresh()
    assert got == [1, 2, 3]


def test_adapter_arity_detection():
    proc = WrappedPerReqLogitsProcessor(None, torch.device("cpu"), False)
    out: list[int] = []
    proc.update_state(BatchUpdate(1, [], [(0, SamplingParams(extra_args={"target_token": 2}), [7], out)], []))
    assert proc.req_info[0].args == (out,)  # two-argument callable: output ids only
    proc3 = NoRepeatPromptLogitsProcessor(None, torch.device("cpu"), False)
    proc3.update_state(BatchUpdate(1, [], [(0, SamplingParams(extra_args={"no_repeat": 1}), [7], out)], []))
    assert proc3.req_info[0].args == ([7], out)


# ---------------------------------------------------------------------- loading
def test_load_by_class_and_both_string_forms():
    by_class = load_custom_logitsprocs([DummyLogitsProcessor], include_plugins=False)
    by_colon = load_custom_logitsprocs(["tests.logitsprocs_examples:DummyLogitsProcessor"], include_plugins=False)
    by_dot = load_custom_logitsprocs(["tests.logitsprocs_examples.DummyLogitsProcessor"], include_plugins=False)
    assert by_class == by_colon == by_dot == [DummyLogitsProcessor]
    both = load_custom_logitsprocs([DummyLogitsProcessor, "tests.logitsprocs_examples:DummyLogitsProcessor",
                                    WrappedPerReqLogitsProcessor], include_plugins=False)
    assert both == [DummyLogitsProcessor, WrappedPerReqLogitsProcessor]  # duplicates dropped


@pytest.mark.parametrize("spec,message", [
    ("no_such_module_xyz:Proc", "no module named 'no_such_module_xyz'"),
    ("no_such_module_xyz.Proc", "no module named 'no_such_module_xyz'"),
    ("tests.logitsprocs_examples:Missing", "has no attribute 'Missing'"),
    ("tests.logitsprocs_examples:NotAProcessor", "must be a subclass of"),
    ("tests.logitsprocs_examples:NOT_A_CLASS", "is not a class"),
    ("JustAName", "expected 'package.module:ClassName'"),
    ("a:b:c", "expected 'package.module:ClassName'"),
])
def test_bad_specs_give_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        load_custom_logitsprocs([spec], include_plugins=False)


def test_non_processor_class_rejected():
    with pytest.raises(ValueError, match="must be a subclass"):
        load_custom_logitsprocs([int], include_plugins=False)


@pytest.mark.parametrize("group", ["lmserve.logits_processors", "vllm.logits_processors"])
def test_entry_point_plugins_are_discovered(tmp_path: Path, monkeypatch, group):
    dist = tmp_path / "fake_lp_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-lp-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [{group}]
        dummy = tests.logitsprocs_examples:DummyLogitsProcessor
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_custom_logitsprocs([]) == [DummyLogitsProcessor]
    assert load_custom_logitsprocs([], include_plugins=False) == []
    procs = build_logitsprocs(None, "cpu")  # custom=None: config's list + plugins
    assert any(isinstance(p, DummyLogitsProcessor) for p in procs.all)


def test_broken_plugin_is_a_clear_error(tmp_path: Path, monkeypatch):
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vllm.logits_processors]\nbroken = no_such_mod_abc:X\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="broken"):
        load_custom_logitsprocs([])


def test_build_logitsprocs_splits_by_argmax_invariance():
    seen = []

    class Recording(DummyLogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory):
            super().__init__(vllm_config, device, is_pin_memory)
            seen.append((vllm_config, device, is_pin_memory))

    config = object()
    procs = build_logitsprocs(config, "cpu", [Recording])  # type: ignore[arg-type]
    assert [type(p) for p in procs.argmax_invariant] == [MinPLogitsProcessor]
    assert [type(p) for p in procs.non_argmax_invariant] == [
        MinTokensLogitsProcessor, LogitBiasLogitsProcessor, RequestLogitsProcessorsAdapter, Recording]
    assert seen == [(config, torch.device("cpu"), False)]


def test_vllm_module_layout_maps_one_to_one():
    import lmserve.logits_processor as top
    import lmserve.v1.sample.logits_processor as v1
    from lmserve.config import EngineConfig
    from lmserve.v1.sample.logits_processor.builtin import process_dict_updates as pdu
    from lmserve.v1.sample.logits_processor.interface import LogitsProcessor as LP

    for name in ("LogitsProcessor", "BatchUpdate", "MoveDirectionality", "AdapterLogitsProcessor",
                 "process_dict_updates", "RequestLogitsProcessor", "BatchUpdateBuilder", "LogitsProcessors"):
        assert getattr(top, name) is getattr(v1, name)
    assert top.VllmConfig is EngineConfig and LP is LogitsProcessor and pdu is process_dict_updates


def test_custom_processor_written_for_vllm_runs_unchanged(tmp_path: Path, monkeypatch):
    """A vLLM-style module using the vLLM module layout, only 'vllm' renamed."""
    (tmp_path / "my_vllm_lp.py").write_text(textwrap.dedent("""
        import torch
        from lmserve.logits_processor import VllmConfig
        from lmserve.sampling_params import SamplingParams
        from lmserve.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
        from lmserve.v1.sample.logits_processor.builtin import process_dict_updates

        class BanToken(LogitsProcessor):
            def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
                self.req_info: dict[int, int] = {}
            def is_argmax_invariant(self) -> bool:
                return False
            def update_state(self, batch_update: BatchUpdate | None):
                process_dict_updates(self.req_info, batch_update,
                                     lambda p, _, __: p.extra_args.get("ban"))
            def apply(self, logits):
                for row, tok in self.req_info.items():
                    logits[row, tok] = float("-inf")
                return logits
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        params = [SamplingParams(temperature=0.0, extra_args={"ban": 0}), SamplingParams(temperature=0.0)]
        batch, _ = make_batch(params, VOCAB, custom=["my_vllm_lp:BanToken"])
        logits = torch.zeros(2, VOCAB)
        logits[:, 0] = 1.0
        assert sample(batch, logits).sampled_token_ids.tolist() == [1, 0]
    finally:
        sys.modules.pop("my_vllm_lp", None)


# ---------------------------------------------------------------------- process_dict_updates
def test_process_dict_updates_semantics():
    p_yes = SamplingParams(extra_args={"v": "x"})
    p_no = SamplingParams()
    state: dict[int, str] = {0: "a", 1: "b", 2: "c", 3: "d"}

    def new(params, _p, _o):
        return params.extra_args.get("v")

    # slot 1 freed and reused by an add (so not listed in removed); 3 removed; swap 0 <-> 2
    update = BatchUpdate(batch_size=3, removed=[3], added=[(1, p_yes, None, [])], moved=[(0, 2, SWAP)])
    assert process_dict_updates(state, update, new)
    assert state == {0: "c", 1: "x", 2: "a"}
    # an add that does not use the processor clears a stale entry at its slot
    assert process_dict_updates(state, BatchUpdate(3, [], [(1, p_no, None, [])], []), new)
    assert state == {0: "c", 2: "a"}
    # unidirectional move into a hole
    assert process_dict_updates(state, BatchUpdate(2, [0], [], [(2, 0, UNI)]), new)
    assert state == {0: "a"}
    # a unidirectional move replaces whatever was at the destination, and empties the source
    state = {0: "a", 1: "b"}
    assert process_dict_updates(state, BatchUpdate(2, [], [], [(0, 1, UNI)]), new)
    assert state == {1: "a"}
    assert not process_dict_updates(state, None, new)


def test_batch_update_is_frozen_and_vllm_field_order():
    update = BatchUpdate(2, [1], [], [])
    assert update.removed == [1] and update.added == [] and update.moved == []
    with pytest.raises(AttributeError):
        update.batch_size = 3  # type: ignore[misc]


# ---------------------------------------------------------------------- built-ins directly
def test_min_p_processor_is_argmax_invariant_and_masks_rows():
    proc = MinPLogitsProcessor(None, torch.device("cpu"), False)
    assert proc.is_argmax_invariant()
    proc.update_state(BatchUpdate(2, [], [(0, SamplingParams(min_p=0.5), None, []),
                                          (1, SamplingParams(), None, [])], []))
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    out = proc.apply(logits.clone())
    assert torch.isinf(out[0, 2]) and torch.isfinite(out[0, :2]).all()
    assert torch.isfinite(out[1]).all()


def test_builtin_non_argmax_invariance():
    for cls in (LogitBiasLogitsProcessor, MinTokensLogitsProcessor):
        assert not cls(None, torch.device("cpu"), False).is_argmax_invariant()
    assert issubclass(MinPLogitsProcessor, LogitsProcessor)
