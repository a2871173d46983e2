"""``LowRankMultiheadAttention``: ``nn.MultiheadAttention`` with its projections as modules.

``nn.MultiheadAttention`` reads ``in_proj_weight`` and ``out_proj.weight`` directly, so its
projections cannot be swapped for low-rank layers. This module computes the same function
(``F.multi_head_attention_forward``'s math, step for step: masks, ``bias_k``/``bias_v``,
``add_zero_attn``, dropout, ``need_weights`` and ``average_attn_weights``, ``batch_first``,
unbatched inputs) but calls ``in_proj`` (or ``q_proj``/``k_proj``/``v_proj`` when ``kdim``
or ``vdim`` differ from ``embed_dim``) and ``out_proj`` as modules, each an ``nn.Linear`` or
a :class:`~lrsearch.core.LowRankLinear`.

Self-attention (``query is key is value``, as in ``nn.TransformerEncoderLayer`` and ViT
blocks) projects once. Cross-attention through the packed ``in_proj`` projects the query,
key and value rows together and keeps each one's part, so the single ``in_proj`` module sees
every input (its calibration statistics cover all three) at up to 3× the projection work.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrsearch.core._linear import assign_

__all__ = ["LowRankMultiheadAttention"]


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as an additive float mask (``True`` → ``-inf``), as torch canonicalizes it."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"only bool and floating masks are supported, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _pad_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """One more (unmasked) key column, for ``bias_k`` or ``add_zero_attn``."""
    return None if mask is None else F.pad(mask, (0, 1))


class LowRankMultiheadAttention(nn.Module):
    """Multi-head attention whose input and output projections are separate, replaceable modules.

    Constructor arguments mean what they mean for ``nn.MultiheadAttention``; at full rank (or
    with dense projections) the outputs equal those of the ``nn.MultiheadAttention`` it was
    built from.
    """

    # nn.TransformerEncoderLayer reads this before taking a fused kernel that needs one packed
    # in_proj_weight tensor; there is none here, so the layer runs its module path.
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        options: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.packed = self.kdim == embed_dim and self.vdim == embed_dim
        if self.packed:
            self.in_proj: nn.Module = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **options)
        else:
            self.q_proj: nn.Module = nn.Linear(embed_dim, embed_dim, bias=bias, **options)
            self.k_proj: nn.Module = nn.Linear(self.kdim, embed_dim, bias=bias, **options)
            self.v_proj: nn.Module = nn.Linear(self.vdim, embed_dim, bias=bias, **options)
        self.out_proj: nn.Module = nn.Linear(embed_dim, embed_dim, bias=bias, **options)
        self.bias_k = nn.Parameter(torch.zeros(1, 1, embed_dim, **options)) if add_bias_kv else None
        self.bias_v = nn.Parameter(torch.zeros(1, 1, embed_dim, **options)) if add_bias_kv else None

    @property
    def projections(self) -> tuple[str, ...]:
        """Names of the projection submodules, in-projections first."""
        return ("in_proj", "out_proj") if self.packed else ("q_proj", "k_proj", "v_proj", "out_proj")

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """The q, k, v projection biases in one tensor, as ``nn.MultiheadAttention`` names them."""
        if self.packed:
            return _bias(self.in_proj)
        biases = [_bias(getattr(self, name)) for name in self.projections[:-1]]
        return None if biases[0] is None else torch.cat(biases)  # type: ignore[arg-type]

    @classmethod
    def from_dense(cls, attention: nn.MultiheadAttention, *, share: bool = False) -> LowRankMultiheadAttention:
        """The same attention with ``nn.Linear`` projections holding its weights.

        ``share=True`` makes the projections use ``attention``'s own tensors (views, no copy),
        for a model that is only read; otherwise the weights are copied.
        """
        weight = attention.out_proj.weight
        layer = cls(attention.embed_dim, attention.num_heads, dropout=attention.dropout,
                    bias=attention.in_proj_bias is not None, add_bias_kv=attention.bias_k is not None,
                    add_zero_attn=attention.add_zero_attn, kdim=attention.kdim, vdim=attention.vdim,
                    batch_first=attention.batch_first, device=weight.device, dtype=weight.dtype)
        e = attention.embed_dim
        if layer.packed:
            weights = {"in_proj": attention.in_proj_weight}
            biases = {"in_proj": attention.in_proj_bias}
        else:
            weights = {"q_proj": attention.q_proj_weight, "k_proj": attention.k_proj_weight,
                       "v_proj": attention.v_proj_weight}
            bias = attention.in_proj_bias
            biases = {name: None if bias is None else bias[i * e:(i + 1) * e]
                      for i, name in enumerate(("q_proj", "k_proj", "v_proj"))}
        weights["out_proj"], biases["out_proj"] = attention.out_proj.weight, attention.out_proj.bias
        extras = {"bias_k": attention.bias_k, "bias_v": attention.bias_v}
        for name, tensor in weights.items():
            _load(getattr(layer, name), "weight", tensor, share=share)
            if biases[name] is not None:
                _load(getattr(layer, name), "bias", biases[name], share=share)
        for name, tensor in extras.items():
            if tensor is not None:
                _load(layer, name, tensor, share=share)
        return layer

    # ------------------------------------------------------------------ forward
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same arguments and results as ``nn.MultiheadAttention.forward``.

        The projections run on tensors in the caller's layout, so, like every other Linear of
        the model, they see one row per token of each sample.
        """
        batched = query.dim() == 3
        sequence_dim = 1 if self.batch_first and batched else 0
        q, k, v = self._project(query, key, value, sequence_dim)
        if sequence_dim:
            q, k, v = q.transpose(1, 0), k.transpose(1, 0), v.transpose(1, 0)
        if not batched:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        context, weights = self._attend(q, k, v, key_padding_mask, need_weights, attn_mask,
                                        average_attn_weights, is_causal)
        if not batched:
            return self.out_proj(context.squeeze(1)), None if weights is None else weights.squeeze(0)
        if not sequence_dim:
            return self.out_proj(context), weights
        output = self.out_proj(context.transpose(1, 0))
        # nn.MultiheadAttention returns a transposed view of a sequence-first tensor; the same
        # memory layout keeps what follows identical (dropout draws its mask in memory order).
        return output.transpose(1, 0).contiguous().transpose(1, 0), weights

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 sequence_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.packed:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        e = self.embed_dim
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
            return q, k, v
        inputs = [query, key] if key is value else [query, key, value]
        parts = self.in_proj(torch.cat(inputs, dim=sequence_dim)).split(
            [x.shape[sequence_dim] for x in inputs], dim=sequence_dim)
        return parts[0][..., :e], parts[1][..., e:2 * e], parts[-1][..., 2 * e:]

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None, need_weights: bool, attn_mask: torch.Tensor | None,
                average_attn_weights: bool, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``F.multi_head_attention_forward`` on projected ``(L, N, E)`` inputs, up to ``out_proj``."""
        tgt_len, bsz, embed_dim = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        key_padding_mask = _float_mask(key_padding_mask, query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = _float_mask(attn_mask, query.dtype)
            if key_padding_mask is not None:
                is_causal = False
        q, k, v = query, key, value
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask, key_padding_mask = _pad_mask(attn_mask), _pad_mask(key_padding_mask)
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask, key_padding_mask = _pad_mask(attn_mask), _pad_mask(key_padding_mask)
        src_len = k.shape[1]
        if key_padding_mask is not None:
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
                                .reshape(bsz * heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            scaled = q * math.sqrt(1.0 / float(head_dim))
            scores = (torch.baddbmm(attn_mask, scaled, k.transpose(-2, -1)) if attn_mask is not None
                      else torch.bmm(scaled, k.transpose(-2, -1)))
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            output = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len, bsz, embed_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            return output, weights.mean(dim=1) if average_attn_weights else weights
        if attn_mask is not None:
            attn_mask = (attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1
                         else attn_mask.view(bsz, heads, -1, src_len))
        output = F.scaled_dot_product_attention(q.view(bsz, heads, tgt_len, head_dim),
                                                k.view(bsz, heads, src_len, head_dim),
                                                v.view(bsz, heads, src_len, head_dim),
                                                attn_mask, dropout_p, is_causal)
        return output.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim), None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}")


def _bias(module: nn.Module) -> torch.Tensor | None:
    """The output bias of a projection: ``nn.Linear.bias`` or a LowRankLinear's ``second.bias``."""
    return module.second.bias if hasattr(module, "second") else module.bias


def _load(module: nn.Module, name: str, tensor: torch.Tensor, *, share: bool) -> None:
    if share:
        setattr(module, name, tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor))
    else:
        assign_(getattr(module, name), tensor)
