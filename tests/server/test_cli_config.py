"""``lmserve serve`` argument parsing: YAML config precedence, refused vLLM flags, the API
key from the environment. Parse-level only: no server, no model."""

from __future__ import annotations

import pytest

from lmserve.engine.arg_utils import EngineArgs
from lmserve.entrypoints.cli import make_parser
from lmserve.entrypoints.cli_args import parse_serve_args


def parse(argv, monkeypatch=None):
    _, serve = make_parser()
    return parse_serve_args(argv, serve)


def write(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults():
    a = parse([])
    assert (a.host, a.port, a.uvicorn_log_level, a.model) == (None, 8000, "info", None)
    assert a.allowed_origins == ["*"] and a.response_role == "assistant"
    assert a.max_logprobs == 20 and a.scheduling_policy == "fcfs" and a.enable_prefix_caching is True


def test_seed_example_config(tmp_path):
    cfg = write(tmp_path, 'host: "127.0.0.1"\nport: 6379\nuvicorn-log-level: "info"\n')
    a = parse(["SOME_MODEL", "--config", cfg])
    assert (a.host, a.port, a.uvicorn_log_level, a.model) == ("127.0.0.1", 6379, "info", "SOME_MODEL")


def test_command_line_beats_config_beats_defaults(tmp_path):
    cfg = write(tmp_path, "port: 6379\nmax-model-len: 1024\nenable_prefix_caching: false\n"
                          "served-model-name: alias\nmodel: from-config\nallowed-origins: [\"http://a\"]\n"
                          "override-generation-config: {temperature: 0.5}\nkv-cache-memory: 1GiB\n")
    a = parse(["--config", cfg, "--port", "9000"])
    assert a.port == 9000  # command line
    assert a.max_model_len == 1024 and a.enable_prefix_caching is False  # config
    assert a.served_model_name == ["alias"] and a.model == "from-config"
    assert a.allowed_origins == ["http://a"]
    assert a.override_generation_config == {"temperature": 0.5}
    assert a.uvicorn_log_level == "info"  # default
    b = parse(["cli-model", "--config", cfg, "--enable-prefix-caching", "--max-model-len", "2k"])
    assert b.model == "cli-model" and b.enable_prefix_caching is True and b.max_model_len == 2048
    ea = EngineArgs.from_cli_args(a)
    assert ea.max_model_len == 1024 and ea.served_model_name == ["alias"] and ea.kv_cache_memory == "1GiB"


@pytest.mark.parametrize("text", ["nonexistent-flag: 1\n", "uvicorn-log-level: loud\n", "- a\n- b\n",
                                  "port: [unclosed\n"])
def test_bad_config_files_are_errors(tmp_path, text, capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--config", write(tmp_path, text)])
    assert e.value.code == 2
    assert "--config" in capsys.readouterr().err


def test_missing_config_file(capsys):
    with pytest.raises(SystemExit):
        parse(["--config", "/nonexistent/config.yaml"])
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("argv,fragment", [
    (["--enable-lora-bias"], "LoRA"),
    (["--lora-extra-vocab-size", "256"], "LoRA"),
    (["--lora-target-modules", '["o_proj"]'], "LoRA"),
    (["--speculative-model", "x"], "speculative"),
    (["--num-speculative-tokens", "3"], "speculative"),
    (["--quantization", "awq"], "quantization"),
    (["--cpu-offload-gb", "4"], "offloading"),
    (["--limit-mm-per-prompt", "image=2"], "text-only"),
    (["--kv-transfer-config", "{}"], "disaggregated"),
    (["--num-scheduler-steps", "8"], "multi-step"),
    (["--preemption-mode", "swap"], "recomputes"),
])
def test_flags_that_cannot_apply_are_refused(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert argv[0] in err and "not supported" in err and fragment.lower() in err.lower()


@pytest.mark.parametrize("argv", [["--quantization", "gguf"], ["--task", "generate"], ["--task", "embed"],
                                  ["--runner", "pooling"], ["--pooler-config", '{"pooling_type": "MEAN"}'],
                                  ["--override-pooler-config", '{"normalize": false}'], ["--swap-space", "0"],
                                  ["--num-scheduler-steps", "1"], ["--disable-frontend-multiprocessing"],
                                  ["--use-v2-block-manager"], ["--preemption-mode", "recompute"]])
def test_harmless_vllm_flags_are_accepted(argv):
    parse(argv)


def test_refused_flag_in_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(["--config", write(tmp_path, "enable-lora-bias: true\n")])
    assert "--enable-lora-bias" in capsys.readouterr().err


def test_lora_flags_parse_as_vllm():
    from lmserve.entrypoints.openai.serving_lora import LoRAModulePath

    args = parse(["--enable-lora", "--max-loras", "4", "--max-lora-rank", "64", "--max-cpu-loras", "8",
                  "--lora-dtype", "bfloat16", "--fully-sharded-loras", "--lora-modules", "a=/x/a",
                  '{"name": "b", "path": "/x/b", "base_model_name": "m"}',
                  '[{"name": "c", "path": "/x/c"}]', "--lora-allowed-dirs", "/x"])
    assert (args.enable_lora, args.max_loras, args.max_lora_rank, args.max_cpu_loras) == (True, 4, 64, 8)
    assert [m for g in args.lora_modules for m in g] == [LoRAModulePath("a", "/x/a"), LoRAModulePath("b", "/x/b", "m"),
                                                         LoRAModulePath("c", "/x/c")]
    assert args.lora_allowed_dirs == ["/x"]


def test_api_key_from_environment(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.delenv("LMSERVE_API_KEY", raising=False)
    assert parse([]).api_key is None
    monkeypatch.setenv("LMSERVE_API_KEY", "k2")
    assert parse([]).api_key == "k2"
    monkeypatch.setenv("VLLM_API_KEY", "k1")
    assert parse([]).api_key == "k1"
    assert parse(["--api-key", "k0"]).api_key == "k0"


def test_server_flags(tmp_path):
    a = parse(["--served-model-name", "a", "b", "--allowed-origins", '["http://x","http://y"]',
               "--middleware", "m.one", "--middleware", "m.two", "--rope-theta", "5e5",
               "--enable-request-id-headers", "--max-log-len", "10", "--root-path", "/api"])
    assert a.served_model_name == ["a", "b"] and a.allowed_origins == ["http://x", "http://y"]
    assert a.middleware == ["m.one", "m.two"] and a.hf_overrides == {"rope_theta": 500000.0}
    assert a.enable_request_id_headers and a.max_log_len == 10 and a.root_path == "/api"


def test_top_level_help_and_version(capsys):
    from lmserve.entrypoints.cli import main

    assert main([]) == 2
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "lmserve" in capsys.readouterr().out


def test_memory_bound_tokens_flag_config_and_default(tmp_path, tiny_models):
    assert parse([]).memory_bound_tokens is None
    assert parse(["--memory-bound-tokens", "32"]).memory_bound_tokens == 32
    assert parse(["--config", write(tmp_path, "memory-bound-tokens: 0\n")]).memory_bound_tokens == 0
    model = tiny_models["qwen2"]
    default = EngineArgs(model, device="cpu").create_engine_config().scheduler_config
    assert default.memory_bound_tokens == 64
    off = EngineArgs.from_cli_args(parse([model, "--memory-bound-tokens", "0", "--device", "cpu"]))
    assert off.create_engine_config().scheduler_config.memory_bound_tokens == 0


def test_vllm_spellings_underscores_and_dotted_json_flags(tmp_path):
    """``--max_model_len 5000`` and ``--flag.key value`` parse as vLLM's parser takes them; dotted
    keys nest and merge over an explicit JSON value; values are JSON where they parse."""
    cfg = write(tmp_path, "port: 6379\n")
    a = parse(["My_Model", "--max_model_len", "5000", "--enforce_eager", "--config", cfg,
               "--hf-overrides.rope_theta", "100000", "--hf_overrides.rope_scaling.type=linear",
               "--served_model_name=x_y"])
    assert a.model == "My_Model" and a.max_model_len == 5000 and a.enforce_eager is True and a.port == 6379
    assert a.served_model_name == ["x_y"]  # values keep their underscores
    assert a.hf_overrides == {"rope_theta": 100000, "rope_scaling": {"type": "linear"}}
    b = parse(["--hf-overrides", '{"rope_theta": 1, "keep": true}', "--hf-overrides.rope_theta", "2"])
    assert b.hf_overrides == {"rope_theta": 2, "keep": True}


def test_dotted_flag_conflict_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse(["--hf-overrides.a", "1", "--hf-overrides.a.b", "2"])
    assert "both as a value and as an object" in capsys.readouterr().err


def test_noop_flags_are_accepted_and_named_for_the_log(tmp_path):
    a = parse(["--no-async-scheduling", "--disable-custom-all-reduce", "--data-parallel-size", "1",
               "--api-server-count", "1", "--config", write(tmp_path, "use-v2-block-manager: true\n")])
    assert a.noop_flags == ["--use-v2-block-manager changes nothing on this build: there is one block manager",
                            "--disable-custom-all-reduce changes nothing on this build: there is no custom all-reduce",
                            "--async-scheduling changes nothing on this build: the engine thread schedules each "
                            "step after the previous one"]
    assert parse([]).noop_flags == []


def test_more_than_one_api_server_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse(["--api-server-count", "2"])
    assert "load balancer" in capsys.readouterr().err


def test_data_parallel_size_is_an_engine_arg():
    from lmserve.engine.arg_utils import EngineArgs
    assert EngineArgs.from_cli_args(parse(["-dp", "2"])).data_parallel_size == 2
    assert EngineArgs.from_cli_args(parse(["--data-parallel-size", "3"])).data_parallel_size == 3
    assert EngineArgs.from_cli_args(parse([])).data_parallel_size == 1


def test_compilation_flags_are_declared_no_ops():
    """-O3, --compilation-config JSON and its dotted form: accepted, named for the start-up log."""
    a = parse(["-O3", "--compilation-config.level", "3", "--compilation_config.cudagraph_capture_sizes", "[1, 2]"])
    assert [line.split(" changes")[0] for line in a.noop_flags] == [
        '--compilation-config {"level": 3, "cudagraph_capture_sizes": [1, 2]}', "-O 3"]
    assert all("nothing is compiled" in line for line in a.noop_flags)
