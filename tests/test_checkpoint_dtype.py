"""Reading a checkpoint's dtype logs no transformers deprecation warning."""

from __future__ import annotations

import subprocess
import sys


def test_pooling_model_dtype_without_torch_dtype_warning(minilm_path):
    code = ("import sys; from transformers import AutoConfig; "
            "from lmserve.model.loader.hf_config import checkpoint_dtype; "
            "print(checkpoint_dtype(AutoConfig.from_pretrained(sys.argv[1]), sys.argv[1]))")
    result = subprocess.run([sys.executable, "-c", code, minilm_path], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch_dtype" not in result.stderr + result.stdout
    assert result.stdout.strip() in ("None", "torch.float32")
