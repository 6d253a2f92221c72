"""``--generation-config`` (auto / vllm / a directory) and ``--tokenizer-mode`` (auto / hf /
slow; vLLM's other modes refused with the reason), through ``LLM`` on the tiny ChatML Llama."""

from __future__ import annotations

import json
import shutil

import pytest

from lmserve import LLM, SamplingParams

KW = dict(dtype="float32", kv_cache_memory=8 * 2**20, max_model_len=64)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    from tests.server.tiny_model import write_tiny_llama
    path = write_tiny_llama(str(tmp_path_factory.mktemp("tiny-opts")))
    with open(f"{path}/generation_config.json") as f:  # the model's own defaults
        cfg = json.load(f)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({**cfg, "temperature": 0.6, "top_k": 20}, f)
    return path


def _folder(tmp_path, **cfg) -> str:
    d = tmp_path / "gen"
    d.mkdir()
    (d / "generation_config.json").write_text(json.dumps(cfg))
    return str(d)


def test_generation_config_auto_vllm_and_folder(tiny_dir, tmp_path):
    auto = LLM(tiny_dir, **KW)
    assert auto.llm_engine.default_sampling_params() == {"temperature": 0.6, "top_k": 20}
    assert LLM(tiny_dir, generation_config="vllm", **KW).llm_engine.default_sampling_params() == {}
    folder = _folder(tmp_path, top_p=0.5, max_new_tokens=3, eos_token_id=[2, 9])
    llm = LLM(tiny_dir, generation_config=folder, **KW)
    assert llm.llm_engine.default_sampling_params() == {"top_p": 0.5, "max_tokens": 3}  # not the model's
    # the folder's EOS ids end generation too: bias token 9 to the top and it stops there
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8, logit_bias={9: 100}))[0].outputs[0]
    assert out.token_ids == [9] and out.finish_reason == "stop"
    plain = auto.generate(["Hello"], SamplingParams(temperature=0, max_tokens=3, logit_bias={9: 100}))[0]
    assert plain.outputs[0].token_ids == [9, 9, 9]


def test_generation_config_bad_folder(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        LLM(tiny_dir, generation_config=str(tmp_path / "absent"), **KW)
    with pytest.raises(ValueError, match="has no generation_config.json"):
        LLM(tiny_dir, generation_config=str(tmp_path), **KW)


def test_tokenizer_mode_slow_is_passed_through(tiny_dir, tmp_path):
    byt5 = tmp_path / "byt5"  # ByT5's tokenizer is pure Python: a real slow tokenizer, no files needed
    byt5.mkdir()
    (byt5 / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ByT5Tokenizer"}))
    shutil.copy(f"{tiny_dir}/config.json", byt5)  # --tokenizer names a model directory
    llm = LLM(tiny_dir, tokenizer=str(byt5), tokenizer_mode="slow", **KW)
    tok = llm.get_tokenizer()
    assert not tok.is_fast and type(tok).__name__ == "ByT5Tokenizer"
    out = llm.generate(["hi"], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0]
    assert out.prompt_token_ids == [107, 108, 1]  # 'h', 'i' (+3 offset), </s>
    assert LLM(tiny_dir, tokenizer_mode="hf", **KW).get_tokenizer().is_fast


def test_tokenizer_mode_refusals(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="no slow .Python. implementation"):
        LLM(tiny_dir, tokenizer_mode="slow", **KW)
    for mode, why in (("mistral", "mistral_common"), ("deepseek_v32", "DeepSeek"), ("cohere", "cohere_melody"),
                      ("kimi_k3", "Kimi"), ("my_plugin", "plugins")):
        with pytest.raises(ValueError, match=f"--tokenizer-mode '{mode}' is not supported: .*{why}"):
            LLM(tiny_dir, tokenizer_mode=mode, **KW)


def test_serve_refuses_bad_tokenizer_mode_at_start(tiny_dir):
    """The serve command line: the same reason, as a start-up error (exit status 1)."""
    import subprocess
    import sys

    from tests.server.conftest import REPO_ROOT
    proc = subprocess.run([sys.executable, "-m", "lmserve.entrypoints.cli", "serve", tiny_dir, "--port", "0",
                           "--tokenizer-mode", "mistral"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode != 0 and "mistral_common" in proc.stdout + proc.stderr
