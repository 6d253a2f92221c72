"""The Pooler (every pooling type and task against straightforward per-sequence references) and
the pooler-config resolution from sentence-transformers checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from lmserve.config import PoolerConfig
from lmserve.model.layers.pooler import Pooler, PoolingMetadata, supported_tasks
from lmserve.model.loader.pooler_config import (resolve_pooler_config, sentence_transformers_max_seq_length,
                                                sentence_transformers_pooler_config)
from lmserve.pooling_params import PoolingParams

H, LABELS = 16, 3
LENS = [4, 1, 6, 3]


def _hidden(lens=LENS, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(sum(lens), H, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _head(num_labels: int = LABELS):
    w = torch.randn(num_labels, H, generator=torch.Generator().manual_seed(7))
    return lambda x: (x.float() @ w.T)


def _meta(tasks, lens=LENS, token_ids=None, **params) -> PoolingMetadata:
    tasks = [tasks] * len(lens) if isinstance(tasks, str) else tasks
    ids = token_ids or [list(range(n)) for n in lens]
    return PoolingMetadata(list(lens), [PoolingParams(task=t, **params) for t in tasks], ids)


def _segments(hidden, lens=LENS):
    return list(torch.split(hidden[:sum(lens)].float(), lens))


@pytest.mark.parametrize("ptype", ["CLS", "LAST", "MEAN"])
@pytest.mark.parametrize("normalize", [True, False])
def test_embed_pooling_types(ptype, normalize):
    hidden = _hidden()
    out = Pooler(PoolerConfig(pooling_type=ptype))(hidden, _meta("embed", normalize=normalize))
    pick = {"CLS": lambda s: s[0], "LAST": lambda s: s[-1], "MEAN": lambda s: s.mean(0)}[ptype]
    for seg, got in zip(_segments(hidden), out):
        ref = pick(seg)
        ref = F.normalize(ref, dim=0) if normalize else ref
        assert got.dtype == torch.float32 and got.shape == (H,)
        torch.testing.assert_close(got, ref)


def test_embed_dimensions_then_normalize():
    hidden = _hidden()
    out = Pooler(PoolerConfig(pooling_type="MEAN"))(hidden, _meta("embed", dimensions=5, normalize=True))
    for seg, got in zip(_segments(hidden), out):
        torch.testing.assert_close(got, F.normalize(seg.mean(0)[:5], dim=0))


def test_token_embed():
    hidden = _hidden()
    out = Pooler(PoolerConfig(pooling_type="CLS"))(hidden, _meta("token_embed", normalize=True, dimensions=4))
    for seg, got in zip(_segments(hidden), out):
        torch.testing.assert_close(got, F.normalize(seg[:, :4], dim=-1))
    raw = Pooler(PoolerConfig(pooling_type="ALL"))(hidden, _meta("token_embed", normalize=False))
    for seg, got in zip(_segments(hidden), raw):
        torch.testing.assert_close(got, seg)


@pytest.mark.parametrize("task", ["classify", "score"])
@pytest.mark.parametrize("num_labels", [1, LABELS])
def test_classify_activation_and_bias(task, num_labels):
    hidden = _hidden()
    head = _head(num_labels)
    pooler = Pooler(PoolerConfig(pooling_type="LAST", logit_bias=0.5), head, num_labels)
    raw = pooler(hidden, _meta(task, use_activation=False))
    act = pooler(hidden, _meta(task, use_activation=True))
    for seg, r, a in zip(_segments(hidden), raw, act):
        logits = head(seg[-1:])[0] - 0.5  # vLLM subtracts logit_bias
        torch.testing.assert_close(r, logits)
        expected = torch.sigmoid(logits) if num_labels == 1 else torch.softmax(logits, -1)
        torch.testing.assert_close(a, expected)
        assert a.shape == (num_labels,)


def test_token_classify_and_step():
    hidden = _hidden()
    head = _head()
    out = Pooler(PoolerConfig(pooling_type="ALL"), head, LABELS)(hidden, _meta("token_classify"))
    for seg, got in zip(_segments(hidden), out):
        torch.testing.assert_close(got, torch.softmax(head(seg), -1))
    # STEP: rows whose prompt token is the step tag; columns returned_token_ids (softmax over them)
    token_ids = [[9, 5, 9, 1], [5], [1, 9, 9, 2, 3, 9], [9, 0, 0]]
    step = Pooler(PoolerConfig(pooling_type="STEP", step_tag_id=9, returned_token_ids=[2, 0]), head, LABELS)
    out = step(hidden, _meta("token_classify", token_ids=token_ids))
    for seg, ids, got in zip(_segments(hidden), token_ids, out):
        keep = torch.tensor(ids) == 9
        torch.testing.assert_close(got, torch.softmax(head(seg[keep])[:, [2, 0]], -1))
    assert out[1].shape == (0, 2)
    no_tag = Pooler(PoolerConfig(pooling_type="STEP"), head, LABELS)
    out = no_tag(hidden, _meta("token_classify", token_ids=token_ids, use_activation=False))
    for seg, got in zip(_segments(hidden), out):
        torch.testing.assert_close(got, head(seg))


def test_batched_equals_one_at_a_time():
    """Mixed tasks and per-request params in one batch give what each sequence gets alone."""
    hidden = _hidden(dtype=torch.bfloat16)
    lens = LENS
    params = [PoolingParams(task="embed", normalize=True), PoolingParams(task="embed", normalize=False, dimensions=3),
              PoolingParams(task="classify", use_activation=True), PoolingParams(task="score", use_activation=False)]
    for ptype in ("CLS", "LAST", "MEAN"):
        pooler = Pooler(PoolerConfig(pooling_type=ptype), _head(), LABELS)
        batched = pooler(hidden, PoolingMetadata(lens, params, [list(range(n)) for n in lens]))
        segs = torch.split(hidden, lens)
        for seg, p, got in zip(segs, params, batched):
            alone = pooler(seg, PoolingMetadata([len(seg)], [p], [list(range(len(seg)))]))[0]
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, alone)
        # a subset of sequences on the MEAN path (gathered rows)
        mean_params = [PoolingParams(task="embed", normalize=False), PoolingParams(task="token_embed", normalize=False)]
        out = Pooler(PoolerConfig(pooling_type="MEAN"))(hidden[:5], PoolingMetadata([1, 4], mean_params[::-1],
                                                                                     [[0], [0] * 4]))
        torch.testing.assert_close(out[1], hidden[1:5].float().mean(0))


def test_extra_rows_ignored_and_errors():
    hidden = _hidden()
    padded = torch.cat([hidden, torch.full((3, H), 1e6)])
    pooler = Pooler(PoolerConfig(pooling_type="MEAN"))
    torch.testing.assert_close(pooler(padded, _meta("embed", normalize=False)),
                               pooler(hidden, _meta("embed", normalize=False)))
    with pytest.raises(ValueError, match="hidden rows"):
        pooler(hidden[:5], _meta("embed"))
    with pytest.raises(ValueError, match="no classification head"):
        pooler(hidden, _meta("classify"))
    with pytest.raises(ValueError, match="verified"):
        pooler(hidden, PoolingMetadata(LENS, [PoolingParams()] * 4, [[0] * n for n in LENS]))
    with pytest.raises(ValueError, match="cannot serve embed"):
        Pooler(PoolerConfig(pooling_type="ALL"))(hidden, _meta("embed"))
    with pytest.raises(ValueError, match="resolved"):
        Pooler(PoolerConfig())
    assert supported_tasks(("embed", "token_embed"), PoolerConfig(pooling_type="STEP")) == ("token_embed",)
    assert supported_tasks(("classify", "score", "token_classify"), PoolerConfig(pooling_type="CLS")) == \
        ("classify", "score", "token_classify")


# -- pooler config resolution -------------------------------------------------------------------------
class _Cls:
    default_pooling_type = "CLS"


def _st_dir(tmp_path, pooling: dict | None, normalize: bool, extra_modules=()) -> str:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    if pooling is not None:
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        os.makedirs(tmp_path / "1_Pooling", exist_ok=True)
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    modules += list(extra_modules)
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    return str(tmp_path)


def test_resolve_pooler_config(tmp_path, minilm_path):
    minilm = resolve_pooler_config(minilm_path, _Cls, None)
    assert (minilm.pooling_type, minilm.normalize) == ("MEAN", True)
    assert sentence_transformers_max_seq_length(minilm_path) == 256
    # no modules.json: the class default, normalized
    assert resolve_pooler_config(str(tmp_path), _Cls, None) == PoolerConfig(pooling_type="CLS", normalize=True)
    assert resolve_pooler_config(None, _Cls, None) == PoolerConfig(pooling_type="CLS", normalize=True)
    assert sentence_transformers_max_seq_length(str(tmp_path)) is None
    # the override wins field by field
    over = resolve_pooler_config(minilm_path, _Cls, PoolerConfig(normalize=False, logit_bias=1.0))
    assert (over.pooling_type, over.normalize, over.logit_bias) == ("MEAN", False, 1.0)


@pytest.mark.parametrize("pooling,expected", [
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "CLS"),
    ({"pooling_mode_lasttoken": True}, "LAST"),
    ({"pooling_mode": "mean"}, "MEAN"),
    ({"pooling_mode": ["lasttoken"]}, "LAST"),
    (None, "CLS"),  # no Pooling module: the class default
])
def test_sentence_transformers_pooling_modes(tmp_path, pooling, expected):
    path = _st_dir(tmp_path, pooling, normalize=False)
    config = resolve_pooler_config(path, _Cls, None)
    assert (config.pooling_type, config.normalize) == (expected, False)


@pytest.mark.parametrize("pooling,message", [
    ({"pooling_mode_max_tokens": True}, "'max' is not supported"),
    ({"pooling_mode_mean_sqrt_len_tokens": True}, "'mean_sqrt_len_tokens' is not supported"),
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, "not supported"),
    ({"pooling_mode": "mean", "include_prompt": False}, "include_prompt"),
])
def test_sentence_transformers_unsupported(tmp_path, pooling, message):
    with pytest.raises(ValueError, match=message):
        sentence_transformers_pooler_config(_st_dir(tmp_path, pooling, normalize=True))


def test_sentence_transformers_dense_unsupported(tmp_path):
    dense = {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    with pytest.raises(ValueError, match="Dense"):
        sentence_transformers_pooler_config(_st_dir(tmp_path, {"pooling_mode": "cls"}, True, [dense]))
