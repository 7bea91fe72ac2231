"""Inference-only CPU speed-up: every ``nn.Linear`` weight reordered once into oneDNN's blocked
layout, the same prepacking PyTorch's own compiler (Inductor, ``freezing``) applies to CPU linears.

Why: decoding on CPU is bound by reading weights, and a plain ``F.linear`` on a row-major
weight streams SmolLM2-135M's 540 MB at about 11 GB/s on the 2-core reference machine. Blocked
weights are read about 3x faster at batch 8 (1.9x for a whole decode step, 1.6x for a prefill;
``benchmarks/eval_throughput.py`` shows the end-to-end effect). Results equal ``F.linear`` up to
float rounding (about 1e-5 relative in fp32), and they are deterministic.

The swap replaces modules (as ``torch.ao`` dynamic quantization does); the language model's own
code is untouched. A packed model is for inference only: it has no gradients, and its
``state_dict`` no longer holds the linear weights, so never train or save one.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held in oneDNN's blocked layout (see the module docstring)."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 8):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        # A buffer, not a parameter: the model's dtype/device queries must keep coming from real
        # parameters, and the blocked tensor is opaque (no strides, no autograd).
        self.register_buffer(
            "packed_weight",
            torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint),
            persistent=False,
        )
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def packing_supported(dtype: torch.dtype, device: torch.device | str = "cpu") -> str | None:
    """None when linears of ``dtype`` on ``device`` can be packed, else the reason why not."""
    if torch.device(device).type != "cpu":
        return f"device {device} is not the CPU"
    if dtype not in PACKABLE_DTYPES:
        return f"dtype {dtype} is not float32 or bfloat16"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch build lacks mkldnn._reorder_linear_weight"
    # The ops are PyTorch-internal (Inductor's), so check them numerically before trusting them.
    try:
        gen = torch.Generator().manual_seed(0)
        lin = nn.Linear(24, 40, dtype=dtype)
        x = torch.randn(3, 5, 24, generator=gen).to(dtype)
        with torch.no_grad():
            want = lin(x).float()
            got = PackedLinear(lin)(x).float()
    except RuntimeError as exc:
        return f"oneDNN linear packing failed: {exc}"
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if got.shape != want.shape or not torch.allclose(got, want, atol=tol, rtol=tol):
        return "oneDNN packed linear disagrees with F.linear"
    return None


def pack_linears(model: nn.Module, *, batch_hint: int = 8) -> int:
    """Swap every ``nn.Linear`` in ``model`` for a :class:`PackedLinear`, in place, and put the
    model in eval mode. Returns how many were swapped; 0 (and the model unchanged) when packing
    isn't supported here, with the reason logged."""
    try:
        param = next(model.parameters())
    except StopIteration:
        return 0
    reason = packing_supported(param.dtype, param.device)
    if reason is not None:
        log.info("linear weights left unpacked: %s", reason)
        return 0
    model.eval()
    swapped = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                # Exact type: subclasses (LoRA layers, quantized linears) have their own forward.
                if type(child) is nn.Linear and child.weight.dtype in PACKABLE_DTYPES:
                    setattr(parent, name, PackedLinear(child, batch_hint))
                    swapped += 1
    return swapped


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())
