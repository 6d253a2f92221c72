"""Tokenizer loading (Hugging Face fast tokenizers, also built from GGUF metadata),
EOS ids and the generation config.

Invariants:
- ``get_tokenizer`` returns a transformers tokenizer (a fast one unless ``tokenizer_mode="slow"``);
  for a GGUF file it is the tokenizer transformers converts from the GGUF metadata, chat template
  (``tokenizer.chat_template``) included.
- Converting a GGUF tokenizer is slow (~10 s for SmolLM2), so the converted tokenizer is saved once
  under ``tokenizer_cache_dir()/<key>/`` and loaded from there afterwards. ``<key>`` is the sha256 of
  the GGUF file's absolute path, size, mtime and the transformers version, so a changed file or
  library never reads a stale entry. Entries are written to a temp dir and renamed into place, so a
  reader never sees a half-written entry and concurrent writers are harmless.
- No module-level mutable state: the only cache is on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_CACHE_MARKER = "lmserve_gguf_tokenizer.json"
_TOKENIZER_MODES = ("auto", "hf", "slow")
# vLLM 0.32's other --tokenizer-mode values, and why each cannot apply here.
_FOREIGN_TOKENIZER_MODES = {
    "mistral": "the mistral_common tokenizer is not supported; use the model's Hugging Face tokenizer files "
               "(tokenizer.json) with --tokenizer-mode auto",
    "deepseek_v32": "DeepSeek's Python prompt encoder is not supported; the Hugging Face tokenizer and chat "
                    "template are used with --tokenizer-mode auto",
    "deepseek_v4": "DeepSeek's Python prompt encoder is not supported; the Hugging Face tokenizer and chat "
                   "template are used with --tokenizer-mode auto",
    "deepseek_v41": "DeepSeek's Python prompt encoder is not supported; the Hugging Face tokenizer and chat "
                    "template are used with --tokenizer-mode auto",
    "kimi_k3": "Kimi K3's Python prompt encoding is not supported; the Hugging Face tokenizer and chat template "
               "are used with --tokenizer-mode auto",
    "inkling": "the inkling tokenizer is not supported; use --tokenizer-mode auto",
    "cohere": "cohere_melody chat rendering is not supported; the Hugging Face chat template is used with "
              "--tokenizer-mode auto",
    "custom": "tokenizer plugins are not supported; use --tokenizer-mode auto, hf or slow",
}


def check_tokenizer_mode(tokenizer_mode: str) -> None:
    """Raises ``ValueError`` with the reason for a mode this build cannot load: "auto"/"hf"
    (the fast tokenizer) and "slow" (transformers' ``use_fast=False``) are the ones it can."""
    if tokenizer_mode in _TOKENIZER_MODES:
        return
    why = _FOREIGN_TOKENIZER_MODES.get(tokenizer_mode, "tokenizer plugins are not supported")
    raise ValueError(f"--tokenizer-mode {tokenizer_mode!r} is not supported: {why}. Supported: "
                     f"{', '.join(_TOKENIZER_MODES)}.")


# ----------------------------------------------------------------------------- paths
def tokenizer_cache_dir() -> Path:
    """Where converted GGUF tokenizers live: ``$LMSERVE_CACHE_DIR/tokenizers`` when that variable
    is set, else ``~/.cache/lmserve/tokenizers``."""
    root = os.environ.get("LMSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lmserve")
    return Path(root) / "tokenizers"


def split_gguf_path(path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Normalises (directory, gguf file name): a path naming a ``.gguf`` file is split in two;
    an absolute ``gguf_file`` wins over ``path``. Returns ``(path, None)`` when no GGUF is involved."""
    if gguf_file is None:
        if path.endswith(".gguf") and os.path.isfile(path):
            return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        return path, None
    if os.path.isabs(gguf_file):
        return os.path.dirname(gguf_file), os.path.basename(gguf_file)
    return path, gguf_file


def _gguf_cache_key(gguf_path: str) -> str:
    import transformers

    st = os.stat(gguf_path)
    ident = f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}|transformers={transformers.__version__}"
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- tokenizer
def get_tokenizer(
    tokenizer_path: str,
    gguf_file: str | None = None,
    revision: str | None = None,
    tokenizer_mode: str = "auto",
    trust_remote_code: bool = False,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """Loads the tokenizer of a model directory, or of a GGUF file (``gguf_file`` inside
    ``tokenizer_path``, or ``tokenizer_path`` itself naming a ``.gguf`` file).

    ``tokenizer_mode``: "auto"/"hf" (fast tokenizer) or "slow" (a Python tokenizer, ``use_fast=False``;
    a ``ValueError`` when the model has none).
    ``cache_dir`` overrides ``tokenizer_cache_dir()`` for converted GGUF tokenizers.
    Raises ``ValueError`` for an unknown mode and ``FileNotFoundError`` for a missing GGUF file.
    """
    check_tokenizer_mode(tokenizer_mode)
    from transformers import AutoTokenizer

    use_fast = tokenizer_mode != "slow"
    path, gguf_name = split_gguf_path(tokenizer_path, gguf_file)
    if gguf_name is None:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, use_fast=use_fast,
                                            trust_remote_code=trust_remote_code)
        if use_fast and not getattr(tok, "is_fast", False):
            logger.warning("Using a slow tokenizer for %s; incremental detokenization will be slower.", path)
        if not use_fast and getattr(tok, "is_fast", False):
            raise ValueError(f"--tokenizer-mode slow: the tokenizer of {path} has no slow (Python) implementation "
                             f"in transformers ({type(tok).__name__} is a fast tokenizer); use --tokenizer-mode auto")
        return tok
    if not use_fast:
        raise ValueError("--tokenizer-mode slow: a GGUF file's tokenizer is converted to a fast tokenizer; use "
                         "--tokenizer-mode auto")
    return _get_gguf_tokenizer(os.path.join(path, gguf_name), Path(cache_dir) if cache_dir else None)


def _get_gguf_tokenizer(gguf_path: str, cache_root: Path | None) -> Any:
    """The GGUF tokenizer, from the disk cache when there is a valid entry, else converted and cached."""
    from transformers import AutoTokenizer

    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    root = cache_root if cache_root is not None else tokenizer_cache_dir()
    entry = root / _gguf_cache_key(gguf_path)
    if (entry / _CACHE_MARKER).is_file():
        try:
            return AutoTokenizer.from_pretrained(str(entry))
        except Exception as e:  # a damaged entry: rebuild it below
            logger.warning("Ignoring unreadable tokenizer cache entry %s (%s); rebuilding it.", entry, e)
    logger.info("Converting the tokenizer of %s (once; cached under %s)", gguf_path, entry)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    try:
        _write_cache_entry(tok, entry, gguf_path)
    except OSError as e:  # read-only home, full disk...: work uncached
        logger.warning("Could not cache the converted tokenizer in %s: %s", entry, e)
    return tok


def _write_cache_entry(tok: Any, entry: Path, gguf_path: str) -> None:
    """save_pretrained into a temp dir next to ``entry``, then rename it into place (atomic)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the entry is as readable as any cache file
        tok.save_pretrained(str(tmp))
        if getattr(tok, "chat_template", None) and not (tmp / "chat_template.jinja").exists():
            # Older transformers keep the template inside tokenizer_config.json; make sure it survives.
            cfg_path = tmp / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            cfg.setdefault("chat_template", tok.chat_template)
            cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
        (tmp / _CACHE_MARKER).write_text(json.dumps({"gguf_file": os.path.abspath(gguf_path)}), encoding="utf-8")
        if entry.exists():  # damaged entry (no marker or unreadable): replace it
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / _CACHE_MARKER).is_file():  # not a concurrent writer winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- GGUF metadata
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str, with_arrays: bool = False) -> dict[str, Any]:
    """Key/value metadata of a GGUF (v2/v3, little-endian) file, without reading tensors.

    Arrays are skipped (absent from the result) unless ``with_arrays``; skipping the tokenizer's
    vocabulary keeps this to tens of milliseconds.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = struct.unpack_from("<I", buf, 4)[0]
        if version not in (2, 3):
            raise ValueError(f"Unsupported GGUF version {version} in {path}")
        _n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24
        out: dict[str, Any] = {}

        def read_str(p: int) -> tuple[str, int]:
            n = struct.unpack_from("<Q", buf, p)[0]
            return bytes(buf[p + 8:p + 8 + n]).decode("utf-8", errors="replace"), p + 8 + n

        def read_value(vtype: int, p: int, keep: bool) -> tuple[Any, int]:
            if vtype in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[vtype]
                return struct.unpack_from(fmt, buf, p)[0], p + struct.calcsize(fmt)
            if vtype == _GGUF_STRING:
                if keep:
                    return read_str(p)
                return None, p + 8 + struct.unpack_from("<Q", buf, p)[0]
            if vtype == _GGUF_ARRAY:
                etype, count = struct.unpack_from("<IQ", buf, p)
                p += 12
                if not keep and etype in _GGUF_SCALARS:  # fixed size: jump over it
                    return None, p + count * struct.calcsize(_GGUF_SCALARS[etype])
                items = []
                for _ in range(count):
                    v, p = read_value(etype, p, keep)
                    if keep:
                        items.append(v)
                return (items if keep else None), p
            raise ValueError(f"Unknown GGUF value type {vtype} in {path}")

        for _ in range(n_kv):
            key, pos = read_str(pos)
            vtype = struct.unpack_from("<I", buf, pos)[0]
            keep = with_arrays or vtype != _GGUF_ARRAY
            value, pos = read_value(vtype, pos + 4, keep)
            if keep:
                out[key] = value
        return out


def _generation_config_from_gguf(meta: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids (eos also lists the end-of-turn / end-of-message ids when distinct) and the
    sampling defaults a GGUF may carry (``general.sampling.*``), in generation_config.json's names."""
    cfg: dict[str, Any] = {}
    if "tokenizer.ggml.bos_token_id" in meta:
        cfg["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    eos = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                  "tokenizer.ggml.eom_token_id") if k in meta]
    eos = list(dict.fromkeys(eos))
    if eos:
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if "tokenizer.ggml.padding_token_id" in meta:
        cfg["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    for gguf_key, name in (("general.sampling.temp", "temperature"), ("general.sampling.top_k", "top_k"),
                           ("general.sampling.top_p", "top_p"), ("general.sampling.min_p", "min_p"),
                           ("general.sampling.penalty_repeat", "repetition_penalty")):
        if gguf_key in meta:
            value = meta[gguf_key]  # float32 in the file: 0.7 reads back as 0.699999988...
            cfg[name] = float(f"{value:.7g}") if isinstance(value, float) else value
    return cfg


# ----------------------------------------------------------------------------- generation config
def load_generation_config(model_dir: str, gguf_file: str | None = None) -> dict[str, Any]:
    """The model's generation defaults as a dict (possibly empty).

    ``generation_config.json`` in ``model_dir`` wins when present (keys starting with "_" and
    ``transformers_version`` dropped); else, for a GGUF model, bos/eos/pad ids and sampling
    defaults from the GGUF metadata; else ``{}``.
    """
    path, gguf_name = split_gguf_path(model_dir, gguf_file)
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            cfg = json.load(f)
        return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "transformers_version"}
    if gguf_name is not None:
        return _generation_config_from_gguf(read_gguf_metadata(os.path.join(path, gguf_name)))
    return {}


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


def get_eos_token_ids(tokenizer: Any, hf_config: Any, generation_config: dict[str, Any] | None) -> list[int]:
    """All token ids that end generation, primary first, without duplicates.

    Order: the tokenizer's ``eos_token_id``; then ``generation_config["eos_token_id"]`` (int or
    list), or, when the generation config names none, the model config's ``eos_token_id`` (as vLLM,
    which builds the generation config from the model config when there is no file).
    ``hf_config`` may be a transformers config, a dict or None.
    """
    ids: list[int] = _as_id_list(getattr(tokenizer, "eos_token_id", None)) if tokenizer is not None else []
    gen_eos = (generation_config or {}).get("eos_token_id")
    if gen_eos is None and hf_config is not None:
        gen_eos = (hf_config.get("eos_token_id") if isinstance(hf_config, dict)
                   else getattr(hf_config, "eos_token_id", None))
    ids.extend(_as_id_list(gen_eos))
    return list(dict.fromkeys(ids))
