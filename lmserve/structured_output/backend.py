"""The xgrammar backend: compiles ``GrammarSpec``s into xgrammar ``CompiledGrammar``s.

Invariants:
- one ``xgrammar.GrammarCompiler`` per engine, built lazily (its tokenizer table takes a moment
  to build) on the first compile, under a lock; compiles may run on several threads at once;
- compiled grammars are cached by spec (``GrammarSpec`` is the key), least recently used out
  first, at most ``cache_size`` entries; a compiled grammar is immutable and shared by every
  sequence that uses it (each sequence owns its own ``GrammarMatcher``);
- every failure (invalid schema, regex, grammar, structural tag) raises ``InvalidRequestError``
  naming the field and carrying xgrammar's message (trimmed).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from lmserve.errors import InvalidRequestError
from lmserve.structured_output.spec import GrammarSpec

_KIND_FIELD = {"json": "json", "json_object": "json_object", "regex": "regex", "grammar": "grammar",
               "lark": "grammar", "structural_tag": "structural_tag"}
_KIND_WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regular expression",
              "grammar": "grammar (EBNF)", "lark": "grammar (Lark)", "structural_tag": "structural tag"}
_MAX_MESSAGE = 500


class XgrammarBackend:
    """Compiles specs for one tokenizer and vocabulary (``vocab_size``: the width of the
    model's logits, which may exceed the tokenizer's vocabulary)."""

    def __init__(self, tokenizer: Any, vocab_size: int, cache_size: int = 256, max_threads: int = 4) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.max_threads = max_threads
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self.max_threads, cache_enabled=False)
            return self._compiler

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar of ``spec`` (cached). Raises InvalidRequestError."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        compiled = self._compile_uncached(spec)
        with self._lock:
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def cached(self, spec: GrammarSpec) -> bool:
        with self._lock:
            return spec in self._cache

    def _compile_uncached(self, spec: GrammarSpec) -> Any:
        compiler = self._get_compiler()
        separators = None if spec.any_whitespace else (",", ":")
        try:
            if spec.kind == "json":
                return compiler.compile_json_schema(spec.text, any_whitespace=spec.any_whitespace,
                                                    separators=separators, strict_mode=True)
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=spec.any_whitespace,
                                                    separators=separators, strict_mode=True)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.text)
            if spec.kind == "grammar":
                return compiler.compile_grammar(spec.text)
            if spec.kind == "lark":
                return compiler.compile_lark(spec.text)
            if spec.kind == "structural_tag":
                return self._compile_structural_tag(compiler, spec.text)
        except InvalidRequestError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError/its own errors for bad input
            field = _KIND_FIELD[spec.kind]
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if len(message) > _MAX_MESSAGE:
                message = message[:_MAX_MESSAGE] + "..."
            raise InvalidRequestError(f"structured_outputs.{field}: invalid {_KIND_WHAT[spec.kind]}: {message}",
                                      f"structured_outputs.{field}") from None
        raise AssertionError(f"unknown grammar kind {spec.kind!r}")

    @staticmethod
    def _compile_structural_tag(compiler: Any, text: str) -> Any:
        """vLLM's two forms: the legacy ``{"structures": [{begin, schema, end}], "triggers": [...]}``
        and xgrammar's ``{"type": "structural_tag", "format": {...}}``."""
        import xgrammar as xgr

        tag = json.loads(text)
        if isinstance(tag, dict) and "structures" in tag:
            try:
                items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema", {})),
                                               end=s["end"]) for s in tag["structures"]]
                triggers = list(tag["triggers"])
            except (KeyError, TypeError) as e:
                raise InvalidRequestError(f"structured_outputs.structural_tag: each structure needs 'begin', "
                                          f"'schema' and 'end', and 'triggers' a list ({e!r} missing or wrong)",
                                          "structured_outputs.structural_tag") from None
            return compiler.compile_structural_tag(items, triggers)
        return compiler.compile_structural_tag(text)
