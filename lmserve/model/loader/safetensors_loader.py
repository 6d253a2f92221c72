"""Iterate the tensors of a Hugging Face checkpoint directory (safetensors, or *.bin as a fallback)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

from typing import Any

import torch
from tqdm.auto import tqdm

from lmserve.model.layers.sharding import LazyWeight

# Progress bars appear only for loads that take longer than this many seconds.
_PROGRESS_DELAY_S = 2.0


def weight_files(model_dir: str) -> list[str]:
    """The checkpoint's weight files: those named by ``model.safetensors.index.json`` if present,
    else every ``*.safetensors``, else ``pytorch_model*.bin`` (through its index if present).
    FileNotFoundError if none."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = os.path.join(model_dir, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(model_dir, n) for n in names]
        files = sorted(glob.glob(os.path.join(model_dir, pattern)))
        if files:
            return files
    raise FileNotFoundError(f"No *.safetensors (or pytorch_model*.bin) weights in {model_dir}")


class SafetensorsWeight(LazyWeight):
    """One tensor of an open safetensors file, read by slices (``safe_open(...).get_slice``)."""

    def __init__(self, handle: Any, name: str) -> None:
        self._handle = handle
        self.name = name
        self._slice = handle.get_slice(name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._slice[index]

    def materialize(self) -> torch.Tensor:
        return self._handle.get_tensor(self.name)


def iter_checkpoint_weights(model_dir: str, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor | LazyWeight]]:
    """Yield (HF parameter name, CPU tensor) for every tensor of the checkpoint, once each. With
    ``lazy`` (a tensor-parallel rank), safetensors tensors come as ``SafetensorsWeight``s that read
    only the slices asked for, each valid until the next one is yielded (*.bin files are loaded
    memory-mapped, so slicing them reads only the slice's pages too)."""
    from safetensors import safe_open

    files = weight_files(model_dir)
    total = sum(os.path.getsize(f) for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Loading weights", delay=_PROGRESS_DELAY_S,
              leave=False) as bar:
        for path in files:
            if path.endswith(".safetensors"):
                with safe_open(path, framework="pt", device="cpu") as f:
                    for name in f.keys():
                        yield name, SafetensorsWeight(f, name) if lazy else f.get_tensor(name)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                yield from state.items()
                del state
            bar.update(os.path.getsize(path))
