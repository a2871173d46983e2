"""``nn.MultiheadAttention`` as a host: converted to :class:`LowRankMultiheadAttention`, whose
in-projection(s) and ``out_proj`` are then ordinary Linear targets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from lrsearch.core._attention import LowRankMultiheadAttention
from lrsearch.core._kind import HostKind, check_entry, factory_options

__all__ = ["ATTENTION", "AttentionHost"]


def _layout(attention: nn.Module) -> dict[str, Any]:
    return {"embed_dim": attention.embed_dim, "num_heads": attention.num_heads, "kdim": attention.kdim,
            "vdim": attention.vdim, "bias": attention.in_proj_bias is not None,
            "add_bias_kv": attention.bias_k is not None, "add_zero_attn": bool(attention.add_zero_attn),
            "batch_first": bool(attention.batch_first)}


class AttentionHost(HostKind):
    label = "MultiheadAttention"
    recipe_type = "attention"
    explicit_type = LowRankMultiheadAttention

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if type(module).forward is not nn.MultiheadAttention.forward:
            return (f"{type(module).__name__} overrides forward(), so an explicit attention could change what "
                    "it computes; its projections stay dense")
        if parametrize.is_parametrized(module):
            return "the attention has a parametrization (torch.nn.utils.parametrize); its projections stay dense"
        return None

    def convert(self, module: nn.Module, *, share: bool) -> nn.Module:
        return LowRankMultiheadAttention.from_dense(module, share=share)  # type: ignore[arg-type]

    def recipe_entry(self, explicit: nn.Module) -> dict[str, Any]:
        return {"type": self.recipe_type, **_layout(explicit)}

    def rebuild(self, dense: nn.Module, entry: Mapping[str, Any]) -> nn.Module:
        layout = _layout(dense)
        check_entry(entry, layout)
        return LowRankMultiheadAttention(dense.embed_dim, dense.num_heads, dropout=dense.dropout,
                                         bias=layout["bias"], add_bias_kv=layout["add_bias_kv"],
                                         add_zero_attn=layout["add_zero_attn"], kdim=dense.kdim, vdim=dense.vdim,
                                         batch_first=layout["batch_first"], **factory_options(dense))


ATTENTION = AttentionHost()
