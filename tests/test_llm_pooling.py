"""The offline pooling API (``LLM.embed / encode / classify / score / reward``) against the
references: sentence-transformers for MiniLM embeddings, HF ``BertForSequenceClassification``
for a cross-encoder (MiniLM's encoder with a seeded random head)."""

from __future__ import annotations

import pytest
import torch

from lmserve import LLM
from lmserve.pooling_params import PoolingParams

_LONG_WORDS = ("Tokenization splits text into pieces that a model can read. " * 60).strip()

TEXTS = [
    "", "a", "Hello world", "hello world", "HELLO WORLD!!!", "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?", "The capital of France is Paris.", "The capital of Brazil is Brasilia.",
    "Horses and cows are both animals", "I love machine learning.", "I hate waiting in long queues.",
    "def main():\n    print('hello world')\n    return 0", "SELECT name, age FROM users WHERE age > 30;",
    "3.14159 2.71828 1.41421", "1234567890", "e = mc^2", "Les élèves étudient à l'école.",
    "Der schnelle braune Fuchs springt über den faulen Hund.", "日本語のテキストです。", "Ünïcödé ☃ ✓ → ∞",
    "emoji 😀🎉🚀 in text", "   leading and trailing spaces   ", "tabs\tand\nnewlines\n\n",
    "A robot may not injure a human being or, through inaction, allow a human being to come to harm.",
    "To be, or not to be, that is the question.", "It was the best of times, it was the worst of times.",
    "Photosynthesis converts light energy into chemical energy.", "The mitochondria is the powerhouse of the cell.",
    "Stock prices fell sharply after the announcement.", "The recipe calls for two cups of flour and one egg.",
    "She sells seashells by the seashore.", "Can you recommend a good book about history?",
    "The weather today is sunny with a chance of rain.", "Quantum computers use qubits instead of bits.",
    "https://example.com/path?query=1&other=2", "user@example.com wrote: thanks!", "#hashtag @mention $money",
    "antidisestablishmentarianism", "supercalifragilisticexpialidocious", "[CLS] [SEP] [PAD] [MASK]",
    "word " * 50, "repeat repeat repeat repeat", "Yes.", "No!", "Maybe?", "...",
    # long texts: truncated at the model's limit (256 tokens for all-MiniLM-L6-v2)
    _LONG_WORDS, "lorem ipsum dolor sit amet " * 200, " ".join(str(i) for i in range(2000)),
    "x" * 3000, ("Paris is the capital of France. " * 100) + "The end.",
    "unbelievably " * 300, "na" * 2000 + " batman",
]


@pytest.fixture(scope="module")
def minilm_llm(minilm_path):
    llm = LLM(minilm_path)
    # The default dtype keeps a float32 checkpoint float32, as sentence-transformers runs it
    # (bf16 agrees only to ~1e-4 in cosine).
    assert llm.llm_engine.model_config.dtype == torch.float32
    return llm


@pytest.fixture(scope="module")
def st_model(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


def _cos(a, b) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a, dtype=torch.float32),
                                                 torch.as_tensor(b, dtype=torch.float32), dim=-1)


# ---------------------------------------------------------------------- embed
def test_minilm_matches_sentence_transformers(minilm_llm, st_model):
    assert len(TEXTS) >= 50
    tok = minilm_llm.get_tokenizer()
    assert sum(len(tok.encode(t)) > 256 for t in TEXTS) >= 5, "several texts must exceed the model's limit"
    ref = st_model.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=False).float()
    outs = minilm_llm.embed(TEXTS, truncate_prompt_tokens=-1)
    assert len(outs) == len(TEXTS)
    got = torch.tensor([o.outputs.embedding for o in outs])
    assert got.shape == (len(TEXTS), 384)
    cos = _cos(got, ref)
    worst = int(cos.argmin())
    assert cos.min() > 0.9999, f"text {worst} {TEXTS[worst][:40]!r}: cosine {cos[worst]:.6f}"
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-4)  # the Normalize module
    long = [i for i, t in enumerate(TEXTS) if len(tok.encode(t)) > 256]
    assert all(len(outs[i].prompt_token_ids) == 256 for i in long)
    assert outs[long[0]].prompt_token_ids[-1] == tok.sep_token_id  # truncation keeps [SEP]


def test_embed_token_ids_and_batching_agree(minilm_llm):
    tok = minilm_llm.get_tokenizer()
    texts = TEXTS[2:8]
    by_text = minilm_llm.embed(texts)
    by_ids = minilm_llm.embed([tok.encode(t) for t in texts])
    single = [minilm_llm.embed(t)[0] for t in texts]
    for a, b, c in zip(by_text, by_ids, single):
        assert a.prompt_token_ids == b.prompt_token_ids == c.prompt_token_ids
        assert _cos(a.outputs.embedding, b.outputs.embedding) > 0.99999
        assert _cos(a.outputs.embedding, c.outputs.embedding) > 0.99999
    one = minilm_llm.embed({"prompt_token_ids": tok.encode("Hello world")})
    assert _cos(one[0].outputs.embedding, by_text[0].outputs.embedding) > 0.99999


def test_embed_truncation_and_too_long(minilm_llm):
    long = "lorem ipsum dolor sit amet " * 200
    with pytest.raises(ValueError, match="maximum context length"):
        minilm_llm.embed(long)
    with pytest.raises(ValueError, match="greater than max_model_len|max_model_len"):
        minilm_llm.embed(long, truncate_prompt_tokens=100000)
    out = minilm_llm.embed(long, truncate_prompt_tokens=10)[0]
    assert len(out.prompt_token_ids) == 10
    # token ids keep the last k
    ids = list(range(1000, 1300))
    assert minilm_llm.embed([ids], truncate_prompt_tokens=8)[0].prompt_token_ids == ids[-8:]


def test_embed_params(minilm_llm):
    raw = minilm_llm.embed("Hello world", pooling_params=PoolingParams(normalize=False))[0].outputs.embedding
    normed = minilm_llm.embed("Hello world")[0].outputs.embedding
    assert abs(torch.tensor(raw).norm() - 1) > 1e-2
    assert _cos(raw, normed) > 0.99999
    with pytest.raises(ValueError, match="matryoshka"):
        minilm_llm.embed("Hello", pooling_params=PoolingParams(dimensions=128))
    with pytest.raises(ValueError, match="same"):
        minilm_llm.embed(["a", "b"], pooling_params=[PoolingParams()])


def test_matryoshka_dimensions(minilm_path, minilm_llm):
    llm = LLM(minilm_path, hf_overrides={"is_matryoshka": True})
    full = torch.tensor(minilm_llm.embed("Hello world")[0].outputs.embedding)
    short = llm.embed("Hello world", pooling_params=PoolingParams(dimensions=64))[0].outputs
    assert short.hidden_size == 64
    assert _cos(short.embedding, full[:64]) > 0.99999
    assert abs(torch.tensor(short.embedding).norm() - 1) < 1e-4


def test_encode_tasks(minilm_llm):
    tok = minilm_llm.get_tokenizer()
    per_token = minilm_llm.encode("Hello world")[0]  # the model's per-token task: token_embed
    assert per_token.outputs.data.shape == (len(tok.encode("Hello world")), 384)
    pooled = minilm_llm.encode("Hello world", pooling_task="embed")[0]
    assert pooled.outputs.data.shape == (384,)
    assert _cos(pooled.outputs.data, minilm_llm.embed("Hello world")[0].outputs.embedding) > 0.99999
    with pytest.raises(ValueError, match="not supported"):
        minilm_llm.classify("Hello")
    with pytest.raises(ValueError, match="not supported"):
        minilm_llm.reward("Hello")
    with pytest.raises(ValueError, match="generative"):
        minilm_llm.generate("Hello")


# ---------------------------------------------------------------------- score (embedding model)
def test_score_embedding_model_is_cosine(minilm_llm):
    q = "What is the capital of France?"
    docs = ["The capital of Brazil is Brasilia.", "The capital of France is Paris.",
            "Horses and cows are both animals"]
    embeds = [torch.tensor(o.outputs.embedding) for o in minilm_llm.embed([q, *docs])]
    one_n = minilm_llm.score(q, docs)
    assert [round(o.outputs.score, 5) for o in one_n] == [round(float(_cos(embeds[0], e)), 5) for e in embeds[1:]]
    assert max(range(3), key=lambda i: one_n[i].outputs.score) == 1
    one_one = minilm_llm.score(q, docs[1])
    assert len(one_one) == 1 and abs(one_one[0].outputs.score - one_n[1].outputs.score) < 1e-5
    n_n = minilm_llm.score([q, docs[0]], [docs[1], docs[0]])
    assert abs(n_n[0].outputs.score - one_n[1].outputs.score) < 1e-5 and abs(n_n[1].outputs.score - 1) < 1e-5
    tok = minilm_llm.get_tokenizer()
    assert one_one[0].prompt_token_ids == tok.encode(q) + [tok.pad_token_id] + tok.encode(docs[1])
    for bad in (([q, q], docs), ([], docs), (q, [])):
        with pytest.raises(ValueError, match="1:1, 1:N or N:N|At least one"):
            minilm_llm.score(*bad)


# ---------------------------------------------------------------------- cross-encoder
@pytest.fixture(scope="module")
def cross_encoder(make_cross_encoder_checkpoint):
    path = make_cross_encoder_checkpoint(1)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf, AutoTokenizer.from_pretrained(path), LLM(path)


def _hf_logits(hf, tok, text_1, text_2=None, **kw) -> torch.Tensor:
    enc = tok(text_1, text_2, padding=True, return_tensors="pt", **kw)
    with torch.no_grad():
        return hf(**enc).logits.float()


def test_cross_encoder_matches_hf(cross_encoder):
    _, hf, tok, llm = cross_encoder
    q = "What is the capital of France?"
    docs = ["The capital of Brazil is Brasilia.", "The capital of France is Paris.",
            "Horses and cows are both animals", "Paris " * 20]
    ref = _hf_logits(hf, tok, [q] * len(docs), docs)[:, 0]
    logits = llm.score(q, docs, pooling_params=PoolingParams(use_activation=False))
    assert torch.allclose(torch.tensor([o.outputs.score for o in logits]), ref, atol=2e-3, rtol=1e-3)
    probs = llm.score(q, docs)
    assert torch.allclose(torch.tensor([o.outputs.score for o in probs]), torch.sigmoid(ref), atol=5e-4)
    # the pair is one prompt with its segments: [CLS] q [SEP] d [SEP]
    pair = tok(q, docs[1])
    assert logits[1].prompt_token_ids == pair["input_ids"]
    # N-N
    nn = llm.score([q, docs[0]], [docs[1], docs[2]], pooling_params=PoolingParams(use_activation=False))
    ref_nn = _hf_logits(hf, tok, [q, docs[0]], [docs[1], docs[2]])[:, 0]
    assert torch.allclose(torch.tensor([o.outputs.score for o in nn]), ref_nn, atol=2e-3, rtol=1e-3)


def test_cross_encoder_truncation(cross_encoder):
    _, hf, tok, llm = cross_encoder
    q, doc = "What is the capital of France?", "Paris is lovely in the spring. " * 100
    limit = llm.llm_engine.model_config.max_model_len
    with pytest.raises(ValueError, match="maximum context length"):
        llm.score(q, doc)
    out = llm.score(q, doc, truncate_prompt_tokens=-1, pooling_params=PoolingParams(use_activation=False))[0]
    ref = _hf_logits(hf, tok, q, doc, truncation=True, max_length=limit)[0, 0]
    assert len(out.prompt_token_ids) == limit
    assert out.prompt_token_ids[:len(tok(q)["input_ids"])] == tok(q)["input_ids"]  # the query is kept whole
    assert abs(out.outputs.score - float(ref)) < 2e-3 * max(1.0, abs(float(ref)))


def test_classify_and_reward_match_hf(make_cross_encoder_checkpoint):
    path = make_cross_encoder_checkpoint(3)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    llm = LLM(path)
    texts = ["I love this movie!", "This is terrible.", "The weather is fine."]
    ref = _hf_logits(hf, tok, texts)
    probs = llm.classify(texts)
    assert [o.outputs.num_classes for o in probs] == [3, 3, 3]
    assert torch.allclose(torch.tensor([o.outputs.probs for o in probs]), ref.softmax(-1), atol=5e-4)
    raw = llm.classify(texts, pooling_params=PoolingParams(use_activation=False))
    assert torch.allclose(torch.tensor([o.outputs.probs for o in raw]), ref, atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="does not support Score API"):
        llm.score("a", "b")  # a three-label classifier is no cross-encoder
    rewards = llm.reward(texts[:1])[0]  # per-token classification
    assert rewards.outputs.data.shape == (len(tok.encode(texts[0])), 3)
    with pytest.raises(ValueError, match="not supported"):
        llm.embed("Hello")


def test_pooling_api_on_generative_model(tmp_path):
    from tests.conftest import make_tiny_checkpoint

    llm = LLM(make_tiny_checkpoint(str(tmp_path / "llama"), "llama"), skip_tokenizer_init=True)
    for call in (lambda: llm.embed([[1, 2, 3]]), lambda: llm.encode([[1, 2, 3]]),
                 lambda: llm.classify([[1, 2]]), lambda: llm.reward([[1, 2]])):
        with pytest.raises(ValueError, match="only supported for pooling models"):
            call()
    with pytest.raises(ValueError, match="only supported for pooling models"):
        llm.score("a", "b")
