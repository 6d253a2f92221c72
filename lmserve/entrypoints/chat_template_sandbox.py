"""Renders untrusted chat templates (a request's ``chat_template``) in separate processes.

A thread cannot be stopped and jinja cannot bound a loop's iterations, so a hostile template
is compiled and rendered in a worker process that the server can kill:

- each worker is ``python -m lmserve.entrypoints.chat_template_sandbox``; it imports only jinja
  and ``lmserve.chat_template``, then caps its own address space at ``TemplateLimits.memory_bytes``
  (``RLIMIT_AS``), so an allocation past it is a ``MemoryError`` inside the worker, never in the
  server;
- the server waits ``TemplateLimits.render_timeout_s`` for the answer (compile + render); past
  that, or when the worker dies or hits its memory cap, the worker is killed and the request
  gets ``TemplateLimitError`` (a 400); the next render starts a fresh worker;
- jobs and answers are length-prefixed JSON (never pickle: a worker's output is untrusted);
- at most ``size`` renders run at once; the others wait their turn on the event loop, which
  never blocks.

Invariant: a worker that did not answer cleanly is never reused.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
from typing import Any

from lmserve.chat_template import DEFAULT_LIMITS, TemplateLimitError, TemplateLimits

_HEADER = struct.Struct(">Q")


def _encode(obj: Any) -> bytes:
    data = json.dumps(obj, ensure_ascii=True).encode("ascii")
    return _HEADER.pack(len(data)) + data


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, limits: TemplateLimits) -> "_Worker":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lmserve.entrypoints.chat_template_sandbox", str(limits.memory_bytes),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        return cls(proc)

    async def call(self, job: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(_encode(job))
        await self.proc.stdin.drain()
        (size,) = _HEADER.unpack(await self.proc.stdout.readexactly(_HEADER.size))
        return json.loads(await self.proc.stdout.readexactly(size))

    def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass


class TemplateSandbox:
    """A pool of up to ``size`` render processes, started on first use (see the module contract)."""

    def __init__(self, limits: TemplateLimits = DEFAULT_LIMITS, size: int = 2) -> None:
        self.limits = limits
        self.size = size
        self._idle: list[_Worker] = []
        self._slots: asyncio.Semaphore | None = None

    async def render(self, template: str, messages: list[dict[str, Any]], special_tokens: dict[str, str],
                     **kwargs: Any) -> str:
        """``apply_chat_template`` of ``template`` in a worker; ``kwargs`` are its other keyword
        arguments (JSON values). Raises ``ValueError`` for a template error and
        ``TemplateLimitError`` for a limit or a worker that died."""
        job = {"template": template, "messages": messages, "special_tokens": special_tokens, "kwargs": kwargs,
               "limits": [self.limits.max_template_chars, self.limits.max_output_chars]}
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        async with self._slots:
            worker = self._idle.pop() if self._idle else await _Worker.start(self.limits)
            reuse = False
            try:
                answer = await asyncio.wait_for(worker.call(job), self.limits.render_timeout_s)
                reuse = not answer.get("fatal")
            except asyncio.TimeoutError:
                raise TemplateLimitError(f"Rendering the chat template took longer than the limit of "
                                         f"{self.limits.render_timeout_s:g} s.") from None
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                raise TemplateLimitError("The chat template's render process failed (it went past its "
                                         "memory limit).") from None
            finally:
                if reuse:
                    self._idle.append(worker)
                else:
                    worker.kill()
        if "text" in answer:
            return answer["text"]
        if answer.get("limit"):
            raise TemplateLimitError(answer["error"])
        raise ValueError(answer["error"])

    async def aclose(self) -> None:
        """Kills the idle workers and waits for them (busy ones are killed by their render)."""
        idle, self._idle = self._idle, []
        for w in idle:
            w.kill()
            await w.proc.wait()


# ---------------------------------------------------------------------- the worker process
def _serve(memory_bytes: int) -> None:
    import resource
    from types import SimpleNamespace

    from lmserve.chat_template import apply_chat_template

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # nothing but answers may reach the protocol stream
    inp = sys.stdin.buffer
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    while True:
        header = inp.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        (size,) = _HEADER.unpack(header)
        fatal = False
        try:
            job = json.loads(inp.read(size))
            limits = TemplateLimits(*job["limits"])
            tokenizer = SimpleNamespace(chat_template=None, special_tokens_map=job["special_tokens"])
            answer: dict[str, Any] = {"text": apply_chat_template(tokenizer, job["messages"],
                                                                  chat_template=job["template"], limits=limits,
                                                                  **job["kwargs"])}
        except TemplateLimitError as e:
            answer = {"error": str(e), "limit": True}
            fatal = isinstance(e.__cause__, MemoryError)
        except MemoryError:
            answer = {"error": "The chat template needs more memory than the limit allows.", "limit": True}
            fatal = True
        except Exception as e:  # noqa: BLE001 - every template failure is the request's problem
            answer = {"error": str(e)}
        answer["fatal"] = fatal
        out.write(_encode(answer))
        out.flush()
        if fatal:
            return


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_LIMITS.memory_bytes)
