"""Pooling models vs their references (fp32, CPU): BERT encoders vs HF ``BertModel``, MiniLM +
Pooler vs sentence-transformers, cross-encoders and decoder sequence classifiers vs HF
``*ForSequenceClassification``; and the registry's runner/convert rules."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, LlamaConfig, Qwen2Config

from lmserve.config import ModelConfig, PoolerConfig
from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.pooler import Pooler, PoolingMetadata
from lmserve.model.loader import get_model
from lmserve.model.loader.hf_config import load_hf_config
from lmserve.model.loader.pooler_config import resolve_pooler_config
from lmserve.model.models.bert import BertForSequenceClassification, BertModel
from lmserve.model.models.llama import LlamaForCausalLM, LlamaForSequenceClassification
from lmserve.model.models.registry import get_model_class, resolve_model_class
from lmserve.pooling_params import PoolingParams

from tests.model_utils import PagedTestCache, randomize_parameters

_TINY_BERT = dict(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=64, type_vocab_size=2)


def whole_prompts_batch(prompts: list[list[int]], device: str = "cpu", pad_tokens: int = 0):
    """(input_ids, positions, AttentionMetadata) of whole prompts back to back, as the model
    runner's ``_build_batch`` lays out an encoder step (no KV cache: slots/block tables unused)."""
    lens = [len(p) for p in prompts]
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    ids = [t for p in prompts for t in p] + [0] * pad_tokens
    positions = [i for n in lens for i in range(n)] + [0] * pad_tokens
    meta = AttentionMetadata(
        num_decodes=sum(1 for n in lens if n == 1),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros((len(lens), 1), dtype=torch.int32, device=device),
        slot_mapping=torch.full((len(ids),), -1, dtype=torch.int64, device=device),
        block_size=16, query_lens_cpu=list(lens), seq_lens_cpu=list(lens),
        max_query_len=max(lens), max_seq_len=max(lens))
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device), meta)


def _pooling_config(path: str, cls: type, runner: str = "pooling", convert: str = "none",
                    override: PoolerConfig | None = None) -> ModelConfig:
    return ModelConfig(model=path, model_path=path, gguf_file=None, tokenizer=path, hf_config=load_hf_config(path),
                       dtype=torch.float32, max_model_len=512, served_model_name="m", runner_type=runner,
                       convert_type=convert, pooler_config=resolve_pooler_config(path, cls, override),
                       supported_pooling_tasks=cls.pooling_tasks)


def _pool(model, prompts: list[list[int]], task: str, token_types: list[list[int]] | None = None,
          **params) -> list[torch.Tensor]:
    """Run ``prompts`` through ``model`` in one flat batch (decoders: through a paged KV cache)
    and pool them all with ``task``."""
    kwargs = {}
    if token_types is not None:
        kwargs["token_type_ids"] = torch.tensor([t for tt in token_types for t in tt])
    if model.needs_kv_cache:
        cache = PagedTestCache(model.kv_cache_spec(), num_blocks=64)
        batch = cache.step(list(enumerate(prompts)))
        assert batch.order == list(range(len(prompts)))  # no one-token prompts: no reordering
        ids, pos, meta, kv = batch.input_ids, batch.positions, batch.meta, cache.kv_caches
    else:
        (ids, pos, meta), kv = whole_prompts_batch(prompts), []
    hidden = model(ids, pos, kv, meta, **kwargs)
    plist = [PoolingParams(task=task, **params) for _ in prompts]
    return model.pooler(hidden, PoolingMetadata([len(p) for p in prompts], plist, prompts))


# -- tiny random BERT vs HF ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertModel as HFBertModel

    config = BertConfig(**_TINY_BERT, architectures=["BertModel"])
    torch.manual_seed(0)
    hf = HFBertModel(config).eval()
    randomize_parameters(hf, seed=0, std=0.1)
    path = str(tmp_path_factory.mktemp("tiny_bert"))
    hf.save_pretrained(path)
    return path, hf


def test_tiny_bert_varlen_matches_hf(tiny_bert):
    path, hf = tiny_bert
    ours = get_model(_pooling_config(path, BertModel), "cpu")
    assert ours.kv_cache_spec() is None and not ours.needs_kv_cache
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 120, (n,), generator=gen).tolist() for n in (7, 1, 13)]
    types = [[0] * 3 + [1] * 4, [1], [0] * 6 + [1] * 7]
    ids, pos, meta = whole_prompts_batch(prompts, pad_tokens=2)
    tt = torch.tensor([t for x in types for t in x] + [0, 0])
    hidden = ours(ids, pos, [], meta, token_type_ids=tt)
    assert hidden.shape == (ids.shape[0], 48)
    start = 0
    for p, t in zip(prompts, types):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([p]), token_type_ids=torch.tensor([t])).last_hidden_state[0]
        torch.testing.assert_close(hidden[start:start + len(p)], ref, atol=1e-5, rtol=1e-5)
        start += len(p)
    # token_type_ids default to zeros
    hidden0 = ours(ids, pos, [], meta)
    with torch.no_grad():
        ref0 = hf(input_ids=torch.tensor([prompts[2]])).last_hidden_state[0]
    torch.testing.assert_close(hidden0[8:21], ref0, atol=1e-5, rtol=1e-5)


def test_tiny_bert_bf16_close_to_fp32(tiny_bert):
    path, _ = tiny_bert
    fp32 = get_model(_pooling_config(path, BertModel), "cpu")
    mc = _pooling_config(path, BertModel)
    bf16 = get_model(ModelConfig(**{**mc.__dict__, "dtype": torch.bfloat16}), "cpu")
    prompts = [[5, 6, 7, 8, 9], list(range(20, 45))]
    a = _pool(fp32, prompts, "embed")
    b = _pool(bf16, prompts, "embed")
    for x, y in zip(a, b):
        assert y.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(x, y, dim=0) > 0.999


def test_bert_config_errors():
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key' is not supported"):
        BertModel(BertConfig(**_TINY_BERT, position_embedding_type="relative_key"), torch.float32)
    with pytest.raises(ValueError, match="hidden_act 'swish' is not supported"):
        BertModel(BertConfig(**_TINY_BERT, hidden_act="swish"), torch.float32)
    model = BertModel(BertConfig(**_TINY_BERT), torch.float32)
    _, _, meta = whole_prompts_batch([[1, 2, 3]])
    meta.seq_lens_cpu = [5]  # a chunk continuing a cached prefix
    with pytest.raises(ValueError, match="whole in one step"):
        model(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4]), [], meta)


def test_bert_load_weights_strict(tiny_bert):
    _, hf = tiny_bert
    state = dict(hf.state_dict())
    model = BertModel(hf.config, torch.float32)
    loaded = model.load_weights(state.items())  # pooler.dense.* accepted and ignored
    assert "pooler.dense.weight" not in loaded and "embeddings.word_embeddings.weight" in loaded
    with pytest.raises(ValueError, match="Unexpected weights.*encoder.layer.0.bogus.weight"):
        model.load_weights([*state.items(), ("encoder.layer.0.bogus.weight", torch.zeros(1))])
    del state["encoder.layer.1.attention.self.key.bias"]
    with pytest.raises(ValueError, match="missing.*encoder.layer.1.attention.self.qkv_proj.bias"):
        model.load_weights(state.items())
    cls_model = BertForSequenceClassification(BertConfig(**_TINY_BERT, num_labels=2), torch.float32)
    with pytest.raises(ValueError, match="missing.*bert_pooler.dense.weight"):
        cls_model.load_weights([(f"bert.{k}", v) for k, v in hf.state_dict().items() if "pooler" not in k])


# -- all-MiniLM-L6-v2 vs sentence-transformers -----------------------------------------------------
def test_minilm_matches_sentence_transformers(minilm_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    mc = _pooling_config(minilm_path, BertModel)
    assert mc.pooler_config.pooling_type == "MEAN" and mc.pooler_config.normalize is True
    model = get_model(mc, "cpu")
    texts = ["The capital of France is Paris.", "A man is eating food.", "hello",
             "Embeddings map sentences to vectors; similar meanings land close together. " * 30]
    tok = AutoTokenizer.from_pretrained(minilm_path)
    prompts = [tok(t, truncation=True, max_length=256)["input_ids"] for t in texts]
    assert len(prompts[-1]) == 256 and prompts[-1][-1] == tok.sep_token_id
    ours = torch.stack(_pool(model, prompts, "embed", normalize=True))
    ref = torch.from_numpy(SentenceTransformer(minilm_path, device="cpu").encode(texts)).float()
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=1)
    assert cos.min() > 0.99999, cos
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(texts)), atol=1e-5)


# -- cross-encoder (MiniLM encoder + seeded random head) vs HF ---------------------------------------
@pytest.mark.parametrize("num_labels", [1, 3])
def test_cross_encoder_matches_hf(make_cross_encoder_checkpoint, num_labels):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = make_cross_encoder_checkpoint(num_labels)
    mc = _pooling_config(path, BertForSequenceClassification)
    assert mc.pooler_config.pooling_type == "CLS"
    model = get_model(mc, "cpu")
    assert model.num_labels == num_labels
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    pairs = [("What is the capital of France?", "Paris is the capital of France."),
             ("How old is the universe?", "Bananas are yellow."), ("hi", "hello there, friend")]
    encs = [tok(a, b) for a, b in pairs]
    prompts = [e["input_ids"] for e in encs]
    types = [e["token_type_ids"] for e in encs]
    assert all(1 in t for t in types)
    logits = torch.stack(_pool(model, prompts, "classify", types, use_activation=False))
    with torch.no_grad():
        batch = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
        ref = hf(**batch).logits.float()
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    probs = torch.stack(_pool(model, prompts, "score", types, use_activation=True))
    expected = torch.sigmoid(ref) if num_labels == 1 else torch.softmax(ref, dim=-1)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)


# -- decoder sequence classifiers vs HF ---------------------------------------------------------------
_SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, num_labels=3)


@pytest.mark.parametrize("config_cls,arch", [(Qwen2Config, "Qwen2ForSequenceClassification"),
                                             (LlamaConfig, "LlamaForSequenceClassification")])
def test_decoder_classifier_matches_hf(tmp_path, config_cls, arch):
    from transformers import AutoModelForSequenceClassification

    config = config_cls(**_SMALL, architectures=[arch])
    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).eval()
    randomize_parameters(hf, seed=3)
    hf.save_pretrained(str(tmp_path))
    mc = _pooling_config(str(tmp_path), LlamaForSequenceClassification)
    assert mc.pooler_config.pooling_type == "LAST"
    model = get_model(mc, "cpu")
    prompts = [[5, 9, 11, 30, 2], [7, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    ours = _pool(model, prompts, "classify", use_activation=False)
    for p, logits in zip(prompts, ours):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([p])).logits[0].float()
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    probs = _pool(model, prompts, "classify")
    torch.testing.assert_close(probs[0], torch.softmax(ours[0], -1))


def test_causal_lm_as_embedding_model(tiny_models):
    """A causal LM with --runner pooling: LAST-token hidden states, normalized; lm_head loads."""
    path = tiny_models["llama"]
    mc = _pooling_config(path, LlamaForCausalLM, convert="embed")
    model = get_model(mc, "cpu")
    assert isinstance(model, LlamaForCausalLM) and mc.pooler_config.pooling_type == "LAST"
    prompts = [[3, 4, 5, 6], [9, 10, 11]]
    embs = _pool(model, prompts, "embed", normalize=True)
    cache = PagedTestCache(model.kv_cache_spec(), num_blocks=64)
    batch = cache.step([(0, prompts[0])])
    hidden = model(batch.input_ids, batch.positions, cache.kv_caches, batch.meta)
    torch.testing.assert_close(embs[0], torch.nn.functional.normalize(hidden[-1].float(), dim=0))


# -- registry -------------------------------------------------------------------------------------------
def test_resolve_model_class_rules():
    llama = LlamaConfig(**{k: v for k, v in _SMALL.items() if k != "num_labels"}, architectures=["LlamaForCausalLM"])
    assert resolve_model_class(llama) == (LlamaForCausalLM, "generate", "none")
    assert resolve_model_class(llama, "generate", "none") == (LlamaForCausalLM, "generate", "none")
    assert resolve_model_class(llama, "pooling") == (LlamaForCausalLM, "pooling", "embed")
    assert resolve_model_class(llama, "auto", "embed") == (LlamaForCausalLM, "pooling", "embed")
    assert resolve_model_class(llama, "pooling", "embed") == (LlamaForCausalLM, "pooling", "embed")
    with pytest.raises(ValueError, match="no classification head"):
        resolve_model_class(llama, "pooling", "classify")
    with pytest.raises(ValueError, match="needs --runner pooling"):
        resolve_model_class(llama, "generate", "embed")

    bert = BertConfig(**_TINY_BERT, architectures=["BertModel"])
    assert resolve_model_class(bert) == (BertModel, "pooling", "none")
    assert resolve_model_class(bert, "pooling", "none") == (BertModel, "pooling", "none")
    assert resolve_model_class(BertConfig(**_TINY_BERT)) == (BertModel, "pooling", "none")  # by model_type
    with pytest.raises(ValueError, match="cannot generate text.*--runner pooling"):
        resolve_model_class(bert, "generate")
    with pytest.raises(ValueError, match="cannot be converted with --convert classify"):
        resolve_model_class(bert, "auto", "classify")

    for arch, cls in [("BertForSequenceClassification", BertForSequenceClassification),
                      ("Qwen2ForSequenceClassification", LlamaForSequenceClassification),
                      ("Qwen3ForSequenceClassification", LlamaForSequenceClassification),
                      ("MistralForSequenceClassification", LlamaForSequenceClassification),
                      ("LlamaForSequenceClassification", LlamaForSequenceClassification)]:
        cfg = BertConfig(**_TINY_BERT, architectures=[arch])
        assert resolve_model_class(cfg) == (cls, "pooling", "none")
        assert cls.pooling_tasks == ("classify", "score", "token_classify")
        with pytest.raises(ValueError, match="cannot generate"):
            resolve_model_class(cfg, "generate")
    with pytest.raises(ValueError, match="FalconForCausalLM is not supported. Supported architectures: "
                                         ".*LlamaForCausalLM.*BertModel"):
        resolve_model_class(LlamaConfig(architectures=["FalconForCausalLM"]))
    with pytest.raises(ValueError, match="runner must be one of"):
        resolve_model_class(llama, "embed")
    assert get_model_class(llama) is LlamaForCausalLM and get_model_class(bert) is BertModel
    assert BertModel.default_pooling_type == "CLS" and LlamaForCausalLM.default_pooling_type == "LAST"
    assert BertModel.uses_token_type_ids and not LlamaForSequenceClassification.uses_token_type_ids
    assert LlamaForCausalLM.needs_kv_cache and not BertForSequenceClassification.needs_kv_cache


def test_pooler_attached_only_for_pooling(tiny_models):
    path = tiny_models["qwen2"]
    gen = get_model(ModelConfig(model=path, model_path=path, gguf_file=None, tokenizer=path,
                                hf_config=load_hf_config(path), dtype=torch.float32, max_model_len=64,
                                served_model_name="m"), "cpu")
    assert not hasattr(gen, "pooler")
    pooled = get_model(_pooling_config(path, LlamaForCausalLM, convert="embed"), "cpu")
    assert isinstance(pooled.pooler, Pooler) and pooled.pooler.head is None


def test_grouped_attention_equals_per_prompt():
    """The step's prompts sorted and padded in length groups (several groups, a uniform one and a
    masked one, extra rows past the batch) give each prompt its own bidirectional attention."""
    from lmserve.model.models.bert import BertSelfAttention, _VarlenLayout

    config = BertConfig(**_TINY_BERT)
    attn = BertSelfAttention(config, torch.float32)
    randomize_parameters(attn, seed=3, std=0.2)
    lens = [5, 40, 1, 5, 5, 17, 33, 2, 64, 9, 12, 5]
    gen = torch.Generator().manual_seed(2)
    _, _, meta = whole_prompts_batch([[0] * n for n in lens], pad_tokens=3)
    hidden = torch.randn(sum(lens) + 3, 48, generator=gen)
    layout = _VarlenLayout.build(meta, hidden.device)
    assert len(layout.groups) > 2 and any(g.key_mask is None for g in layout.groups)
    assert any(g.key_mask is not None for g in layout.groups)
    out = attn(hidden, layout)
    assert out.shape == hidden.shape and not out[-3:].any()
    H, D = attn.num_heads, attn.head_dim
    start = 0
    for n in lens:
        q, k, v = attn.qkv_proj(hidden[start:start + n]).view(n, 3, H, D).permute(1, 2, 0, 3)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(n, H * D)
        torch.testing.assert_close(out[start:start + n], ref, atol=1e-6, rtol=1e-5)
        start += n


def test_fused_gelu_equals_gelu_of_linear():
    """Linear.forward_gelu (oneDNN's erf-GELU post-op where the layer is packed for oneDNN, else
    F.gelu after the matmul) equals F.gelu of the layer's output."""
    from lmserve.model.layers.linear import Linear
    from tests.backend_utils import bind

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 19, 48, generator=gen)
    for gemm in ("auto", "torch"):
        layer = Linear(48, 96, bias=True, dtype=torch.float32)
        randomize_parameters(layer, seed=5, std=0.3)
        bind(layer, gemm=gemm)
        torch.testing.assert_close(layer.forward_gelu(x), torch.nn.functional.gelu(layer(x)), atol=1e-6, rtol=1e-6)
    layer.lora_key = "mlp"
    with pytest.raises(ValueError, match="LoRA"):
        layer.forward_gelu(x)
