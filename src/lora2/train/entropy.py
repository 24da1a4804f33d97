"""Cross-attention entropy of the identifier token (LoRA²'s L_entropy; our reading, see docs/LORA2_METHOD.md).

For a cross-attention layer with attention probabilities P (softmax over text tokens, one row per spatial query
position), the map of token t over the N spatial positions is m_t(j) = P[j, t] / Σ_j' P[j', t]. Its entropy

    H(m_t) = −Σ_j m_t(j) log m_t(j)                         (Shannon entropy; log N for a uniform map, 0 for one-hot)

is averaged over the identifier tokens, the heads, the instance samples of the batch and the adapted cross-attention
layers (``attn2``), and minimised with weight λ_e: a low entropy concentrates the identifier on the subject.

The processors are installed only when λ_e > 0, and fall back to the default SDPA processor whenever no training
step is collecting (validation, sampling). The maps come from a second fused attention with one-hot values on the
identifier tokens (``identifier_maps``), so no layer materialises its N × T attention probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from lora2.lora.layer import LoRA2Layer


def map_entropy(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """H = −Σ_j m(j) log m(j) over the last dimension, after normalising each map to sum 1.

    ``maps``: (..., N) non-negative attention mass over N positions. Returns (...,).
    """
    probs = maps / maps.sum(dim=-1, keepdim=True).clamp_min(eps)  # (..., N)
    return -(probs * probs.clamp_min(eps).log()).sum(dim=-1)  # (...,)


class EntropyCollector:
    """Shared state of the entropy processors during one forward pass.

    token_positions: indices of the identifier's tokens in the text sequence.
    rows: bool mask (B,) of the batch rows whose prompt holds the identifier (instance rows; class rows of prior
        preservation do not). Set with ``start(rows)`` before the UNet forward, read with ``loss()`` after it.
    """

    def __init__(self, token_positions: Sequence[int]) -> None:
        if not token_positions:
            raise ValueError("entropy term needs at least one identifier token position, got none")
        self.token_positions = list(token_positions)
        self.rows: torch.Tensor | None = None
        self.values: list[torch.Tensor] = []
        self.index: slice | list[int] | None = None  # the rows as ``_row_index`` gives them, set by ``start``
        self._onehots: dict[tuple, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.rows is not None

    def start(self, rows: torch.Tensor) -> None:
        self.rows = rows
        self.index = _row_index(rows)
        self.values = []

    def stop(self) -> None:
        self.rows = None
        self.values = []

    def onehot(self, tokens: int, device: torch.device) -> torch.Tensor:
        """E (T, k): one-hot columns on the identifier tokens, made once per sequence length and device."""
        key = (tokens, str(device))
        if key not in self._onehots:
            onehot = torch.zeros(tokens, len(self.token_positions), dtype=torch.float32)  # (T, k)
            onehot[self.token_positions, range(len(self.token_positions))] = 1.0
            self._onehots[key] = onehot.to(device)
        return self._onehots[key]

    def loss(self) -> torch.Tensor:
        """Mean identifier-map entropy over the layers that ran since ``start`` (0-d tensor)."""
        if not self.values:
            raise ValueError("no cross-attention layer recorded an entropy: are the entropy processors installed?")
        return torch.stack(self.values).mean()


def _row_index(rows: torch.Tensor) -> slice | list[int] | None:
    """The True rows as a slice when they are contiguous (no index tensor: CUDA-graph capture copies nothing from the
    host), else a list; None when there are none."""
    found = torch.nonzero(rows).flatten().tolist()
    if not found:
        return None
    return slice(found[0], found[-1] + 1) if found == list(range(found[0], found[-1] + 1)) else found


def identifier_maps(
    query: torch.Tensor, key: torch.Tensor, onehot: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention mass of each identifier token at every query position, P[b, h, n, t] for the k tokens marked in
    ``onehot`` (T, k), without materialising P: one fused attention whose values are one-hot on those tokens,

        SDPA(q, k, E)[b, h, n, i] = Σ_t softmax_t(q_n·k_t / √d) E[t, i] = P[b, h, n, token_i].

    ``query``: (B, h, N, d), ``key``: (B, h, T, d). Returns (B, h, N, k) in fp32 (the attention runs in fp32).
    """
    batch, heads, tokens = key.shape[0], key.shape[1], key.shape[2]
    values = onehot.expand(batch, heads, tokens, onehot.shape[1])  # (B, h, T, k)
    with torch.autocast(query.device.type, enabled=False):
        return F.scaled_dot_product_attention(query.float(), key.float(), values, attn_mask=mask)  # (B, h, N, k)


class EntropyAttnProcessor(AttnProcessor2_0):
    """Cross-attention processor that records the identifier-token map entropy, otherwise diffusers' SDPA processor.

    While collecting, it computes q, k, v once, the output with ``F.scaled_dot_product_attention`` exactly as
    ``AttnProcessor2_0`` does, and the identifier's maps with ``identifier_maps`` (a second fused attention with
    k ≤ a few value columns, on the instance rows only): no N × T probability tensor per layer.
    """

    def __init__(self, collector: EntropyCollector) -> None:
        super().__init__()
        self.collector = collector

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if not self.collector.active or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, N, C)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        heads = attn.heads
        query, key, value = (
            projection.view(batch_size, -1, heads, projection.shape[-1] // heads).transpose(1, 2)  # (B, h, L, d)
            for projection in (
                attn.to_q(hidden_states),
                attn.to_k(encoder_hidden_states),
                attn.to_v(encoder_hidden_states),
            )
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        self._record(query, key, attention_mask)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)  # (B, h, N, d)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * value.shape[-1]).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # projection, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _record(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> None:
        rows = self.collector.index
        if rows is None:
            return
        mask = mask[rows] if mask is not None else None
        onehot = self.collector.onehot(key.shape[2], key.device)  # (T, k)
        maps = identifier_maps(query[rows], key[rows], onehot, mask)  # (B', h, N, k)
        self.collector.values.append(map_entropy(maps.transpose(-1, -2)).mean())  # H over N, per (b, h, token)


def adapted_cross_attention(unet: nn.Module) -> dict[str, nn.Module]:
    """The cross-attention (``attn2``) modules that hold a LoRA² layer, by name: where the entropy term is read."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, Attention)
        and name.rsplit(".", 1)[-1] == "attn2"
        and any(isinstance(child, LoRA2Layer) for child in module.modules())
    }


def install_entropy_processors(unet: nn.Module, collector: EntropyCollector) -> list[str]:
    """Set an ``EntropyAttnProcessor`` on every cross-attention (``attn2``) module holding a LoRA² layer.

    Returns the names of those modules; ``ValueError`` when no adapted cross-attention exists.
    """
    modules = adapted_cross_attention(unet)
    if not modules:
        raise ValueError(
            "entropy_weight > 0 needs adapted cross-attention layers (attn2), but no attn2 module holds a LoRA² "
            "layer: add to_q/to_k/to_v/to_out.0 of attn2 to target_modules or set entropy_weight to 0"
        )
    for module in modules.values():
        module.set_processor(EntropyAttnProcessor(collector))
    return list(modules)
