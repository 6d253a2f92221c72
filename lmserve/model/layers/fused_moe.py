"""Mixture-of-experts feed-forward: top-k routing and a batched expert dispatch over stacked weights.

Contracts:
- Expert weights are stacked at load time: ``w13`` [E, 2*I, H] (each expert's gate rows, then its up
  rows, as transformers' ``experts.gate_up_proj``) and ``w2`` [E, H, I] (``experts.down_proj``).
  Expert e computes ``w2[e] @ (silu(w13[e][:I] @ x) * w13[e][I:] @ x)``.
- Routing (``select_experts``) is transformers': softmax over the router logits in float32, top-k,
  and (``renormalize``) the k weights divided by their sum. Weights stay float32 until they scale
  an expert's output, cast to the activation dtype there (as transformers multiplies).
- ``fused_moe`` never loops over tokens. It sorts the T*k (token, expert) pairs by expert id,
  runs one GEMM pair per expert over that expert's contiguous group of rows, scales each row by
  its routing weight and ``index_add_``s the rows back to their tokens (**grouped** path; only the
  experts hit are read, so a decode step of batch 1 reads k experts' weights). For a step of few
  pairs (``T * k <= gather_max_rows``, by device: ``GATHER_MAX_ROWS``) it instead gathers the
  selected experts' weights and runs one batched matmul over all T*k pairs (**gathered** path: no
  per-expert loop, at the cost of copying those weights). Both paths compute the same sums; they
  differ only in float rounding order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.backends.linear import PrepackedWeight
from lmserve.model.layers.activation import SiluAndMul
from lmserve.model.layers.linear import Linear

# (token, expert) pairs per step up to which the gathered (bmm) path runs on torch's stacked weights,
# by device type: on CPU it measured slower than the grouped path at every batch (copying the selected
# experts' weights costs more than it saves; benchmarks/README.md, "Mixture-of-experts decode"), so
# never; on CUDA it replaces up to 2 * k small GEMM launches by two bmm calls.
GATHER_MAX_ROWS = {"cpu": 0, "cuda": 8}


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights float32 [T, k], expert ids int64 [T, k]), as transformers
    routes: softmax in float32, top-k (ties to the lower id, as torch.topk), optional renormalization."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _silu_mul(h: torch.Tensor, act: nn.Module | None) -> torch.Tensor:
    """[..., 2I] (gate | up) -> [..., I]."""
    if act is not None and h.dim() == 2:
        return act(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_dispatch(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                     expert_mlp: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The grouped path over any expert implementation: ``expert_mlp(e, rows [n, H])`` -> [n, H] is
    expert e's feed-forward; it is called once per expert hit, with all of that expert's rows."""
    T, k = ids.shape
    if T == 1:  # one token (decode at batch 1): its k experts in id order, no sort or scatter
        pairs = sorted(zip(ids[0].tolist(), weights[0].tolist()))
        y = torch.zeros_like(x)
        for e, w in pairs:
            y += expert_mlp(e, x) * w
        return y
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # pair positions grouped by expert, token order kept
    token_of = order // k  # [T*k] the token of each sorted pair
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    rows = x.index_select(0, token_of)  # [T*k, H]
    out = torch.empty_like(rows)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        out[start:start + n] = expert_mlp(e, rows[start:start + n])
        start += n
    out.mul_(weights.reshape(-1)[order].to(x.dtype).unsqueeze(1))
    return torch.zeros_like(x).index_add_(0, token_of, out)


def _grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
             act: nn.Module | None) -> torch.Tensor:
    return grouped_dispatch(x, weights, ids, w13.shape[0],
                            lambda e, rows: F.linear(_silu_mul(F.linear(rows, w13[e]), act), w2[e]))


def _gathered(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    T, k = ids.shape
    flat_ids = ids.reshape(-1)
    rows = x.repeat_interleave(k, dim=0).unsqueeze(2)  # [T*k, H, 1], pair p = token p // k
    h = torch.bmm(w13.index_select(0, flat_ids), rows).squeeze(2)  # [T*k, 2I]
    y = torch.bmm(w2.index_select(0, flat_ids), _silu_mul(h, None).unsqueeze(2)).squeeze(2)  # [T*k, H]
    y = y * weights.reshape(-1).to(x.dtype).unsqueeze(1)
    return y.view(T, k, -1).sum(dim=1)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              gather_max_rows: int = 0, act: nn.Module | None = None) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; weights [T, k] (float32) and ids [T, k] from
    ``select_experts`` -> [T, H] in x's dtype: sum over j of weights[t, j] * expert_{ids[t, j]}(x[t]).
    ``act`` (a ``SiluAndMul`` layer) computes silu(gate) * up on 2-D rows where given."""
    if x.shape[0] == 0:
        return x.new_zeros(0, w2.shape[1])
    if ids.numel() <= gather_max_rows:
        return _gathered(x, w13, w2, weights, ids)
    return _grouped(x, w13, w2, weights, ids, act)


class FusedMoE(nn.Module):
    """A sparse MoE feed-forward block: ``gate`` (the router, [E, H] without bias) and the stacked
    expert weights ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I] (the
    parameter names of transformers' fused experts, so such checkpoints load as they are).
    ``forward(x [T, H], decode_only)`` -> [T, H].

    ``bind_backends`` may give each expert its two matrices in the plan's dense CPU layout
    (``set_packed_experts``): the stacked parameters are then freed and every step takes the
    grouped path, one packed GEMM pair per expert hit. Otherwise ``fused_moe`` runs on the stacked
    torch weights."""

    # per expert: (gate|up [2I, H], down [H, I]) packed, or None (the stacked torch weights)
    packed_experts: list[tuple[PrepackedWeight, PrepackedWeight]] | None = None

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool,
                 dtype: torch.dtype, gather_max_rows: int | None = None) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in 1..num_experts={num_experts}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate = Linear(hidden_size, num_experts, bias=False, dtype=dtype)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype), requires_grad=False)
        device = self.experts.gate_up_proj.device.type  # built under the model's device
        self.gather_max_rows = GATHER_MAX_ROWS.get(device, 0) if gather_max_rows is None else gather_max_rows
        self.experts.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype), requires_grad=False)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor, decode_only: bool = False, lora: object | None = None) -> torch.Tensor:
        """x [T, H] -> [T, H]. ``decode_only`` as ``Linear.forward``; ``lora`` (a step's LoRA
        mapping, passed by the decoder layer as to a dense MLP) must be None: adapters on experts
        are not supported, and a step that carries them is refused rather than run without them."""
        if lora is not None:
            raise ValueError("LoRA adapters on mixture-of-experts layers are not supported "
                             "(serve this model without --enable-lora)")
        weights, ids = select_experts(self.gate(x, decode_only), self.top_k, self.renormalize)
        packed = self.packed_experts
        if packed is not None:
            return grouped_dispatch(x, weights, ids, self.num_experts,
                                    lambda e, rows: packed[e][1].linear(self.act_fn(packed[e][0].linear(rows, None)),
                                                                        None))
        return fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids,
                         self.gather_max_rows, self.act_fn)

    def set_packed_experts(self, packed: list[tuple[PrepackedWeight, PrepackedWeight]]) -> None:
        """Install one (gate|up, down) packed pair per expert and free the stacked parameters."""
        if len(packed) != self.num_experts:
            raise ValueError(f"{len(packed)} packed experts for num_experts={self.num_experts}")
        self.packed_experts = packed
        for name in ("gate_up_proj", "down_proj"):
            old = getattr(self.experts, name)
            setattr(self.experts, name, nn.Parameter(old.new_empty(0), requires_grad=False))

    def dispatch(self) -> str:
        """What computes the experts (``extra_repr`` and the start-up table say it)."""
        if self.packed_experts is not None:
            return f"grouped, {self.packed_experts[0][0].backend} GEMM pair per expert hit"
        return f"torch: grouped GEMM per expert, gathered bmm for <= {self.gather_max_rows} (token, expert) pairs"

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, renormalize={self.renormalize}, dispatch={self.dispatch()}")
