"""Cross-attention entropy of the identifier token (LoRA²'s L_entropy; our reading, see docs/LORA2_METHOD.md).

For a cross-attention layer with attention probabilities P (softmax over text tokens, one row per spatial query
position), the map of token t over the N spatial positions is m_t(j) = P[j, t] / Σ_j' P[j', t]. Its entropy

    H(m_t) = −Σ_j m_t(j) log m_t(j)                         (Shannon entropy; log N for a uniform map, 0 for one-hot)

is averaged over the identifier tokens, the heads, the instance samples of the batch and the adapted cross-attention
layers (``attn2``), and minimised with weight λ_e: a low entropy concentrates the identifier on the subject.

Attention probabilities are only materialised when λ_e > 0: ``install_entropy_processors`` is called only then,
and its processor falls back to the default SDPA processor whenever no training step is collecting
(validation, sampling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
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

    @property
    def active(self) -> bool:
        return self.rows is not None

    def start(self, rows: torch.Tensor) -> None:
        self.rows = rows
        self.values = []

    def stop(self) -> None:
        self.rows = None
        self.values = []

    def loss(self) -> torch.Tensor:
        """Mean identifier-map entropy over the layers that ran since ``start`` (0-d tensor)."""
        if not self.values:
            raise ValueError("no cross-attention layer recorded an entropy: are the entropy processors installed?")
        return torch.stack(self.values).mean()


class EntropyAttnProcessor:
    """Cross-attention processor that records the identifier-token map entropy, otherwise like AttnProcessor.

    Computes the same output as diffusers' default processor (explicit softmax instead of SDPA) while collecting;
    delegates to ``AttnProcessor2_0`` when the collector is inactive.
    """

    def __init__(self, collector: EntropyCollector) -> None:
        self.collector = collector
        self.fallback = AttnProcessor2_0()

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
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, N, C)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)  # (B, N, inner)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # (B, T, inner)
        value = attn.to_v(encoder_hidden_states)  # (B, T, inner)
        query = attn.head_to_batch_dim(query)  # (B·h, N, d)
        key = attn.head_to_batch_dim(key)  # (B·h, T, d)
        value = attn.head_to_batch_dim(value)  # (B·h, T, d)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B·h, N, T)
        self._record(probs, batch_size, attn.heads)
        hidden_states = torch.bmm(probs, value)  # (B·h, N, d)
        hidden_states = attn.batch_to_head_dim(hidden_states)  # (B, N, inner)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _record(self, probs: torch.Tensor, batch_size: int, heads: int) -> None:
        rows = self.collector.rows.to(probs.device)  # (B,)
        if not bool(rows.any()):
            return
        maps = probs.view(batch_size, heads, probs.shape[1], probs.shape[2])[rows]  # (B', h, N, T)
        maps = maps[..., self.collector.token_positions].transpose(-1, -2)  # (B', h, k, N)
        self.collector.values.append(map_entropy(maps.float()).mean())


def install_entropy_processors(unet: nn.Module, collector: EntropyCollector) -> list[str]:
    """Set an ``EntropyAttnProcessor`` on every cross-attention (``attn2``) module holding a LoRA² layer.

    Returns the names of those modules; ``ValueError`` when no adapted cross-attention exists.
    """
    names = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.rsplit(".", 1)[-1] == "attn2":
            if any(isinstance(child, LoRA2Layer) for child in module.modules()):
                module.set_processor(EntropyAttnProcessor(collector))
                names.append(name)
    if not names:
        raise ValueError(
            "entropy_weight > 0 needs adapted cross-attention layers (attn2), but no attn2 module holds a LoRA² "
            "layer: add to_q/to_k/to_v/to_out.0 of attn2 to target_modules or set entropy_weight to 0"
        )
    return names
