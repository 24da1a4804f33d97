"""Training-step time and peak memory of LoRA² against peft LoRA on the SDXL and KOALA-700m UNets.

The UNets are built from the configs shipped in ``lora2/configs`` with random weights (no download). One
process measures every row in turn on one model per backbone (adapters injected, measured, removed):

- ``floor``: the frozen UNet alone, forward and backward to its input (what any adapter must pay);
- ``peft``: peft LoRA (``LoraConfig`` + ``inject_adapter_in_model``) on to_q, to_k, to_v, to_out.0;
- ``lora2``: ``lora2.inject`` with ``LoRA2Config(init_rank=r, max_rank=512, adaptive=True)``, the rank
  regularization in the loss and the rank update after every optimizer step (the real training step);
- ``lora2+entropy``: the same plus the cross-attention entropy term of the identifier token, with the trainer's
  processor (``lora2.train.entropy``, explicit softmax); ``lora2+entropy-sdpa``: with a processor that keeps SDPA
  for the output and computes only the identifier's probabilities (``IdentifierEntropyProcessor`` below);
- ``lora2+cudagraph``: the same step with forward and backward replayed from CUDA graphs, re-captured whenever
  a rank changes (stretch target).

A training step is: bf16 autocast forward at the given latent size (1024 px = 128×128 latent) with SDXL
conditioning, MSE loss to a random target, backward, AdamW over the adapter parameters (base weights bf16,
adapter weights fp32, as the diffusers SDXL LoRA scripts do). Each row: warm-up steps, then the median over
timed steps (device synchronised around each step), and the peak of ``torch.cuda.max_memory_allocated`` (reset
per row, everything freed between rows). Rows are written to the JSON file as soon as they are measured.

With ``--repeats N`` every row is measured in N rounds on the same model; a peft row and the LoRA² row of equal
(rank, batch, grad_ckpt) run back to back, in swapped order every other round, so that drift of a shared machine
hits both alike. A row reports the median over all timed steps of all rounds, the per-round medians and their
spread; ``--budget-s`` starts no row or pair after the budget, nor one that its last round's time says would end
past it. The CUDA-graph row first checks that the graphed step's adapter gradients equal the eager step's.

Also measured once: a rank change of every adapted layer at once (through ``lora2.sync_ranks``, the call after
each optimizer step), and exporting an SDXL-size adapter to a file.

    python benchmarks/sdxl_train_step.py --out-dir $OUT --profile --warmup 2 --steps 10 --budget-s 290  # H200 run
    python benchmarks/sdxl_train_step.py --tiny --out-dir /tmp/bench --count-ops   # CPU smoke test, operator counts
    python benchmarks/sdxl_train_step.py --tiny --repeats 2 --out-dir /tmp/perf_tiny  # CPU smoke test of rounds
    python benchmarks/sdxl_train_step.py --table benchmarks/results/sdxl_train_step.json  # Markdown table

Results and their reading: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lora2
from lora2.configs import unet_config
from lora2.rank.math import nu_for_rank

logger = logging.getLogger("sdxl_train_step")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
GIB = 1024**3


# ---------------------------------------------------------------------------------------------------- rows
@dataclass
class RowSpec:
    """One measured configuration."""

    backbone: str
    method: str  # floor | peft | lora2 | lora2+entropy | lora2+entropy-sdpa | lora2+cudagraph
    rank: int | None
    batch: int
    grad_ckpt: bool = False

    @property
    def key(self) -> str:
        return f"{self.backbone}/{self.method}/r{self.rank}/b{self.batch}/gc{int(self.grad_ckpt)}"


def default_rows(ranks: tuple[int, int], backbones: list[str], batches: list[int]) -> list[RowSpec]:
    """Rows in order of importance: the must-show SDXL batch-1 rows first, so that a timeout keeps them."""
    low, high = ranks
    rows: list[RowSpec] = []
    if "sdxl" in backbones:
        b = batches[0]
        rows += [
            RowSpec("sdxl", "floor", None, b),
            RowSpec("sdxl", "peft", low, b),
            RowSpec("sdxl", "lora2", low, b),
            RowSpec("sdxl", "peft", high, b),
            RowSpec("sdxl", "lora2", high, b),
            RowSpec("sdxl", "peft", low, b, grad_ckpt=True),
            RowSpec("sdxl", "lora2", low, b, grad_ckpt=True),
            RowSpec("sdxl", "lora2+entropy", low, b),
            RowSpec("sdxl", "peft", high, b, grad_ckpt=True),
            RowSpec("sdxl", "lora2", high, b, grad_ckpt=True),
            RowSpec("sdxl", "lora2+cudagraph", low, b),
        ]
        for b in batches[1:]:
            rows += [
                RowSpec("sdxl", "floor", None, b),
                RowSpec("sdxl", "peft", low, b),
                RowSpec("sdxl", "lora2", low, b),
                RowSpec("sdxl", "peft", high, b),
                RowSpec("sdxl", "lora2", high, b),
            ]
    if "koala700m" in backbones:
        rows += [
            RowSpec("koala700m", "floor", None, batches[0]),
            RowSpec("koala700m", "peft", low, batches[0]),
            RowSpec("koala700m", "lora2", low, batches[0]),
        ]
    if "sdxl" in backbones:
        rows.append(RowSpec("sdxl", "lora2+entropy-sdpa", low, batches[0]))
        for b in batches[1:]:
            rows += [RowSpec("sdxl", "peft", low, b, grad_ckpt=True), RowSpec("sdxl", "lora2", low, b, grad_ckpt=True)]
    return rows


# ---------------------------------------------------------------------------------------------------- models
def tiny_unet_config() -> dict:
    """An SDXL-shaped UNet (text_time conditioning, cross-attention blocks) small enough for a CPU test."""
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 1],
        "attention_head_dim": [2, 4],
        "cross_attention_dim": 32,
        "norm_num_groups": 8,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 80,  # 6 · 8 (time ids) + 32 (text embeds)
    }


def build_unet(config: dict, device: torch.device) -> nn.Module:
    """UNet2DConditionModel from a config with random weights, created directly on ``device``, base in bf16."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    unet.to(dtype=torch.bfloat16)
    unet.requires_grad_(False)
    unet.train()
    return unet


def conditioning_shapes(config: dict) -> tuple[int, int, int]:
    """(cross_attention_dim, text_embeds dim, time_ids count) of a text_time UNet config."""
    n_time_ids = 6
    text_dim = config["projection_class_embeddings_input_dim"] - n_time_ids * config["addition_time_embed_dim"]
    return config["cross_attention_dim"], text_dim, n_time_ids


def make_inputs(config: dict, batch: int, latent: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random SDXL conditioning: latent (B,4,h,w), t (B,), encoder_hidden_states (B,77,C), text_embeds, time_ids."""
    cross_dim, text_dim, n_time_ids = conditioning_shapes(config)
    gen = torch.Generator(device="cpu").manual_seed(1)
    channels = config.get("in_channels", 4)
    return {
        "sample": torch.randn(batch, channels, latent, latent, generator=gen).to(device),  # (B, 4, h, w)
        "target": torch.randn(batch, channels, latent, latent, generator=gen).to(device),  # (B, 4, h, w)
        "timestep": torch.randint(0, 1000, (batch,), generator=gen).to(device),  # (B,)
        "encoder_hidden_states": torch.randn(batch, 77, cross_dim, generator=gen).to(device),  # (B, 77, C)
        "text_embeds": torch.randn(batch, text_dim, generator=gen).to(device),  # (B, 1280)
        "time_ids": torch.tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]).repeat(batch, 1).to(device),  # (B, 6)
    }


class UNetCall(nn.Module):
    """The UNet as a function of tensors only (what CUDA-graph capture needs)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids) -> torch.Tensor:
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------------- entropy
class EntropyStore:
    """Collects one entropy value per adapted cross-attention layer during a forward pass."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def loss(self) -> torch.Tensor:
        return torch.stack(self.values).mean()


class IdentifierEntropyProcessor:
    """Cross-attention with the entropy of one token's attention map over spatial positions (local minimal version).

    H = −Σ_n a_n log a_n with a_n = p(token | query n) / Σ_m p(token | query m): the entropy of where the
    identifier token is attended to. The attention output itself comes from ``scaled_dot_product_attention``;
    the token's probabilities come from a log-sum-exp over the 77 keys.
    """

    def __init__(self, store: EntropyStore, token_index: int) -> None:
        self.store = store
        self.token_index = token_index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, length, _ = hidden_states.shape
        query = attn.to_q(hidden_states)  # (B, N, H·d)
        key = attn.to_k(encoder_hidden_states)  # (B, 77, H·d)
        value = attn.to_v(encoder_hidden_states)  # (B, 77, H·d)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, 77, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, 77, d)
        out = F.scaled_dot_product_attention(query, key, value)  # (B, H, N, d)
        logits = (query @ key.transpose(-1, -2)).float() * attn.scale  # (B, H, N, 77)
        log_p = logits[..., self.token_index] - logits.logsumexp(-1)  # (B, H, N)
        log_a = log_p - log_p.logsumexp(-1, keepdim=True)  # (B, H, N), normalised over positions
        self.store.values.append(-(log_a.exp() * log_a).sum(-1).mean())
        out = out.transpose(1, 2).reshape(batch, length, attn.heads * head_dim).to(query.dtype)  # (B, N, H·d)
        return attn.to_out[1](attn.to_out[0](out))


def install_entropy(unet: nn.Module, method: str, token_index: int, batch: int, device: torch.device):
    """Entropy processors on every adapted cross-attention; returns (start-of-step fn, loss fn, implementation).

    ``lora2+entropy`` uses the trainer's processor (``lora2.train.entropy``); ``lora2+entropy-sdpa`` the local one.
    """
    if method == "lora2+entropy-sdpa":
        store = EntropyStore()
        for name, module in unet.named_modules():
            if name.endswith("attn2") and hasattr(module, "set_processor"):
                module.set_processor(IdentifierEntropyProcessor(store, token_index))
        return store.values.clear, store.loss, "benchmarks/sdxl_train_step.py IdentifierEntropyProcessor (SDPA)"
    from lora2.train.entropy import EntropyCollector, install_entropy_processors

    collector = EntropyCollector([token_index])
    install_entropy_processors(unet, collector)
    rows = torch.ones(batch, dtype=torch.bool, device=device)  # (B,), every row is an instance row
    return (lambda: collector.start(rows)), collector.loss, "lora2.train.entropy.EntropyAttnProcessor"


# ---------------------------------------------------------------------------------------------------- adapters
def inject_peft(unet: nn.Module, rank: int) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=True)
    inject_adapter_in_model(config, unet)
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # adapter weights in fp32 (diffusers' cast_training_params)


def remove_peft(unet: nn.Module) -> None:
    from peft.tuners.lora import LoraLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name), child, module.get_base_layer())
    if hasattr(unet, "peft_config"):
        del unet.peft_config


def inject_lora2(unet: nn.Module, rank: int, args: argparse.Namespace) -> None:
    config = lora2.LoRA2Config(
        target_modules=TARGETS,
        init_rank=rank,
        max_rank=args.max_rank,
        adaptive=True,
        chunk_size=args.chunk_size,
        **({"lambda_scaling": args.lambda_scaling} if args.lambda_scaling else {}),
    )
    lora2.inject(unet, config)


def set_all_ranks(unet: nn.Module, rank: int) -> None:
    """Point every layer's ν at rank ``rank`` (the next rank update moves all of them at once)."""
    with torch.no_grad():
        for _, layer in lora2.lora_layers(unet):
            layer.log_nu.fill_(math.log(nu_for_rank(rank, layer.config.quantile)))


# ---------------------------------------------------------------------------------------------------- timing
class Timer:
    """Wall time of a region with the device synchronised at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None


def count_ops(fn) -> int:
    """Aten operators dispatched by ``fn()`` other than views and allocations: a device-independent proxy for the
    kernel launches of a step (the eager SDXL step is bound by the host, one dispatch and launch at a time)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    skipped = {"empty", "empty_strided", "empty_like", "detach", "lift_fresh", "_local_scalar_dense"}

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in skipped:
                self.count += 1
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        fn()
    return counter.count


GRAD_RTOL = 1e-2  # bf16 autocast: products rounded to 8 mantissa bits (2^-8 ≈ 4e-3), atomics in some backward kernels


def compare_gradients(
    params: list[nn.Parameter], eager, other, names: list[str] | None = None, rtol: float = GRAD_RTOL
) -> dict:
    """Gradients of the same step from the same state through two implementations (no optimizer step between).

    ``eager`` and ``other`` each set ``.grad`` of ``params`` (forward and backward) and return the loss. Order:
    eager, eager, other, eager. The second eager run's difference from the first (non-deterministic reductions) is
    the reference noise level; the last one checks that ``other`` left no state behind that changes an eager step.
    Reported per parameter kind (the name's last component: lora_A, lora_B, log_nu, ...): max |g_other − g_eager|
    and that difference relative to max |g_eager|; passes when every relative difference, of ``other`` and of the
    last eager run, is ≤ ``rtol``.
    """
    names = names or [f"param{i}" for i in range(len(params))]
    kinds = [name.rpartition(".")[2] for name in names]

    def grads() -> list[torch.Tensor]:
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    def max_diff(reference: list[torch.Tensor]) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, ref, param in zip(kinds, reference, params):
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            out[kind] = max(out.get(kind, 0.0), float((grad.float() - ref.float()).abs().max()))
        return out

    loss_eager = float(eager().detach())
    reference = grads()
    scale: dict[str, float] = {}
    for kind, ref in zip(kinds, reference):
        scale[kind] = max(scale.get(kind, 0.0), float(ref.abs().max()))
    loss_again = float(eager().detach())
    eager_diff = max_diff(reference)
    loss_other = float(other().detach())
    other_diff = max_diff(reference)
    loss_after = float(eager().detach())
    after_diff = max_diff(reference)
    del reference

    def relative(diff: dict[str, float]) -> dict[str, float]:
        return {kind: diff[kind] / scale[kind] if scale[kind] > 0 else diff[kind] for kind in diff}

    rel, after_rel = relative(other_diff), relative(after_diff)
    return {
        "graph_vs_eager_max_abs_diff": max(other_diff.values()),
        "graph_vs_eager_rel_diff": max(rel.values()),
        "graph_vs_eager_by_param": {
            kind: {"max_abs_diff": other_diff[kind], "rel_diff": rel[kind], "max_abs_grad": scale[kind]}
            for kind in rel
        },
        "eager_vs_eager_max_abs_diff": max(eager_diff.values()),
        "graph_vs_eager_loss_diff": abs(loss_other - loss_eager),
        "eager_vs_eager_loss_diff": abs(loss_again - loss_eager),
        "eager_after_graph_rel_diff": max(after_rel.values()),
        "eager_after_graph_loss_diff": abs(loss_after - loss_eager),
        "graph_check_rtol": rtol,
        "graph_check": "adapter .grad after one forward+backward from the same state (eager, eager, graph, eager); "
        "rel = max|Δg| / max|g_eager|",
        "graph_vs_eager_ok": all(value <= rtol for value in [*rel.values(), *after_rel.values()]),
    }


# ---------------------------------------------------------------------------------------------------- one row
class Bench:
    """Holds the current backbone model and measures rows on it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.timer = Timer(self.device)
        self.backbone: str | None = None
        self.unet: nn.Module | None = None
        self.config: dict | None = None
        self.extras: list[dict] = []

    def model(self, backbone: str) -> nn.Module:
        if self.backbone != backbone:
            self.unet = None
            free_memory(self.device)
            self.config = tiny_unet_config() if self.args.tiny else unet_config(backbone)
            start = time.perf_counter()
            self.unet = build_unet(self.config, self.device)
            logger.info("built %s UNet in %.1f s", backbone, time.perf_counter() - start)
            self.backbone = backbone
        return self.unet

    def autocast(self, cache_enabled: bool = True):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)

    def measure(self, spec: RowSpec, round_index: int = 0) -> dict:
        """One round of one row: warm-up, timed steps, peak memory; extras (operator count, profile, rank change,
        export) in round 0 only."""
        args = self.args
        first_round = round_index == 0
        unet = self.model(spec.backbone)
        free_memory(self.device)
        base_gib = allocated_gib(self.device)
        inputs = make_inputs(self.config, spec.batch, args.latent, self.device)
        lora2_method = spec.method.startswith("lora2")
        entropy_weight = args.entropy_weight if spec.method.startswith("lora2+entropy") else 0.0
        if spec.method == "peft":
            inject_peft(unet, spec.rank)
        elif lora2_method:
            inject_lora2(unet, spec.rank, args)
        if spec.grad_ckpt:
            unet.enable_gradient_checkpointing()
        entropy_start = entropy_loss = entropy_source = None
        if entropy_weight > 0:
            entropy_start, entropy_loss, entropy_source = install_entropy(
                unet, spec.method, args.token_index, spec.batch, self.device
            )
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4) if params else None
        call = UNetCall(unet)
        sample = inputs["sample"].requires_grad_(spec.method == "floor")
        cond = (inputs["timestep"], inputs["encoder_hidden_states"], inputs["text_embeds"], inputs["time_ids"])
        graphed = spec.method == "lora2+cudagraph"
        layers = [layer for _, layer in lora2.lora_layers(unet)] if graphed else []  # the same objects at any rank
        graph = {"fn": None, "ranks": None, "captures": 0, "capture_s": []}

        def forward(use_graph: bool) -> torch.Tensor:
            if not use_graph:
                with self.autocast():
                    return call(sample, *cond)
            current = tuple(layer.r for layer in layers)
            if graph["fn"] is None or graph["ranks"] != current:
                start = time.perf_counter()
                with self.autocast(cache_enabled=False):
                    graph["fn"] = torch.cuda.make_graphed_callables(UNetCall(unet), (sample, *cond))
                graph["ranks"], graph["captures"] = current, graph["captures"] + 1
                graph["capture_s"].append(time.perf_counter() - start)
            with self.autocast(cache_enabled=False):
                pred = graph["fn"](sample, *cond)  # (B, 4, h, w)
            return pred

        def forward_backward(use_graph: bool = graphed) -> torch.Tensor:
            """Gradients of one step into ``.grad`` (set, not accumulated); returns the loss."""
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            else:
                sample.grad = None
            if entropy_start is not None:
                entropy_start()
            pred = forward(use_graph)  # (B, 4, h, w)
            loss = F.mse_loss(pred.float(), inputs["target"])
            if lora2_method:
                loss = loss + lora2.regularization(unet)
            if entropy_loss is not None:
                loss = loss + entropy_weight * entropy_loss()
            loss.backward()
            return loss

        def step() -> torch.Tensor:
            loss = forward_backward()
            if optimizer is not None:
                optimizer.step()
                if lora2_method:
                    lora2.sync_ranks(optimizer, unet)  # LoRA²: ranks follow ν after each step
            return loss

        losses = []
        for _ in range(args.warmup):
            losses.append(step().detach())
        ops = count_ops(step) if args.count_ops and first_round else None
        check = None
        if graphed and args.graph_check and first_round:
            names = [name for name, p in unet.named_parameters() if p.requires_grad]
            try:
                check = compare_gradients(
                    params, lambda: forward_backward(False), lambda: forward_backward(True), names
                )
                logger.info("CUDA graph vs eager: %s", json.dumps(check))
            except Exception as exc:  # noqa: BLE001 - recorded in the row; the timing still runs
                logger.exception("CUDA graph gradient check failed for %s", spec.key)
                check = {"graph_check_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        self.timer.sync()
        finite = bool(torch.isfinite(torch.stack(losses)).all()) if losses else None
        times = [self.timer(step) for _ in range(args.steps)]
        median = statistics.median(times)
        row = {
            **asdict(spec),
            "round": round_index,
            "median_step_s": median,
            "min_step_s": min(times),
            "max_step_s": max(times),
            "step_times_s": times,
            "steps_timed": len(times),
            "warmup_steps": args.warmup,
            "peak_mem_gib": peak_gib(self.device),
            "base_alloc_gib": base_gib,
            "trainable_params": sum(p.numel() for p in params),
            "loss_finite": finite,
        }
        if ops is not None:
            row["ops_per_step"] = ops
        if check is not None:
            row.update(check)
        if lora2_method:
            config = next(iter(lora2.lora_layers(unet)))[1].config
            keys = ("lambda_scaling", "chunk_size", "max_rank", "quantile")
            row["lora2_config"] = {key: getattr(config, key) for key in keys}
            layer_ranks = list(lora2.ranks(unet).values())
            row["mean_rank"] = sum(layer_ranks) / len(layer_ranks)
            row["adapter_params_active"] = lora2.adapter_parameter_count(unet)
        if entropy_source:
            row["entropy_impl"] = entropy_source
        if spec.method == "lora2+cudagraph":
            row["graph_captures"] = graph["captures"]
            row["graph_capture_s"] = graph["capture_s"]
        extras = first_round and spec.batch == args.batches[0] and not spec.grad_ckpt
        if args.profile and extras and spec.rank == args.ranks[0]:
            if spec.method in ("peft", "lora2") and spec.backbone == "sdxl":
                self.guarded("profile", spec, lambda: self.profile(spec, step))
        if extras and spec.method == "lora2" and spec.backbone == "sdxl":
            if spec.rank == args.ranks[0]:
                self.guarded("rank_change", spec, lambda: self.rank_change(spec, unet, optimizer, step, median))
            self.guarded("export", spec, lambda: self.export(spec, unet))
        # teardown: the model goes back to its frozen state; the row's tensors are freed when this frame ends and
        # the next row starts with free_memory()
        if spec.grad_ckpt:
            unet.disable_gradient_checkpointing()
        if entropy_start is not None:
            from diffusers.models.attention_processor import AttnProcessor2_0

            for name, module in unet.named_modules():
                if name.endswith("attn2") and hasattr(module, "set_processor"):
                    module.set_processor(AttnProcessor2_0())
        if spec.method == "peft":
            remove_peft(unet)
        elif lora2_method:
            lora2.unload(unet)
        free_memory(self.device)
        return row

    # ------------------------------------------------------------------------------------------------ extras
    def guarded(self, kind: str, spec: RowSpec, fn) -> None:
        """Run one extra measurement; its failure is recorded instead of losing the row."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - recorded in the results file
            logger.exception("%s failed for %s", kind, spec.key)
            self.extras.append({"kind": kind, "row": spec.key, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})

    def rank_change(self, spec: RowSpec, unet: nn.Module, optimizer, step, step_s: float) -> None:
        """Time one growth and one shrink of every adapted layer at once (with storage re-allocation)."""
        layers = [layer for _, layer in lora2.lora_layers(unet)]
        low = layers[0].r
        high = min(low + 2 * self.args.chunk_size, self.args.max_rank)  # re-allocation and optimizer-state moves
        results = {}
        for label, rank in (("noop", low), ("grow", high), ("shrink", low)):
            set_all_ranks(unet, rank)
            changed = {}
            seconds = self.timer(lambda changed=changed: changed.update(n=lora2.sync_ranks(optimizer, layers)))
            results[label] = {"to_rank": rank, "layers_changed": changed["n"], "seconds": seconds}
            if label == "grow":
                results["first_step_after_grow_s"] = self.timer(step)
        self.extras.append(
            {
                "kind": "rank_change",
                "backbone": spec.backbone,
                "from_rank": low,
                "layers": len(layers),
                "via": "lora2.sync_ranks(optimizer, layers) (the call after each optimizer step)",
                "median_step_s": step_s,
                **results,
                "ratio_grow_vs_step": results["grow"]["seconds"] / step_s,
                "ratio_shrink_vs_step": results["shrink"]["seconds"] / step_s,
            }
        )
        logger.info("rank change: %s", json.dumps(self.extras[-1]))

    def export(self, spec: RowSpec, unet: nn.Module) -> None:
        """Time writing the adapter as a diffusers LoRA file (fp32) with ``lora2.save_lora``."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "adapter.safetensors"
            seconds = self.timer(lambda: lora2.save_lora(unet, path))
            size = path.stat().st_size
        self.extras.append(
            {
                "kind": "export",
                "backbone": spec.backbone,
                "rank": spec.rank,
                "adapter_params": lora2.adapter_parameter_count(unet),
                "bytes": size,
                "seconds": seconds,
                "via": "lora2.save_lora(unet, path) (diffusers format, fp32)",
            }
        )
        logger.info("export: %s", json.dumps(self.extras[-1]))

    def profile(self, spec: RowSpec, step) -> None:
        """One profiled step; the top operators by device and host time go to the profile file."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.timer.sync()
        with profile(activities=activities) as prof:
            step()
            self.timer.sync()
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        text = [
            f"===== {spec.key} sorted by {sort}",
            averages.table(sort_by=sort, row_limit=25),
            f"===== {spec.key} sorted by self_cpu_time_total",
            averages.table(sort_by="self_cpu_time_total", row_limit=25),
        ]
        with open(self.args.out_dir / "profile.txt", "a", encoding="utf-8") as handle:
            handle.write("\n".join(text) + "\n")


# ---------------------------------------------------------------------------------------------------- table
def add_ratios(rows: list[dict]) -> None:
    """ratio_*_vs_peft against the peft row of equal backbone, rank, batch and checkpointing; *_vs_floor too.

    The ratios divide the rows' medians over all rounds; with several rounds, ``round_ratio_time_vs_peft`` also
    lists the ratio of the two round medians in each round both rows ran (measured back to back) and
    ``ratio_time_vs_peft_round_median`` their median, which machine drift between rounds does not move.
    """
    for row in rows:
        row["ratio_time_vs_peft"] = row["ratio_mem_vs_peft"] = row["ratio_time_vs_floor"] = None
        if "median_step_s" not in row:
            continue
        for other in rows:
            same = all(other[k] == row[k] for k in ("backbone", "batch", "grad_ckpt"))
            if same and other["method"] == "peft" and other["rank"] == row["rank"] and "median_step_s" in other:
                row["ratio_time_vs_peft"] = row["median_step_s"] / other["median_step_s"]
                if row["peak_mem_gib"] is not None:
                    row["ratio_mem_vs_peft"] = row["peak_mem_gib"] / other["peak_mem_gib"]
                peft_rounds = dict(zip(other.get("round_index", []), other.get("round_median_step_s", [])))
                paired = [
                    value / peft_rounds[index]
                    for index, value in zip(row.get("round_index", []), row.get("round_median_step_s", []))
                    if index in peft_rounds
                ]
                if paired and row["method"] != "peft":
                    row["round_ratio_time_vs_peft"] = paired
                    row["ratio_time_vs_peft_round_median"] = statistics.median(paired)
            if same and other["method"] == "floor" and "median_step_s" in other:
                row["ratio_time_vs_floor"] = row["median_step_s"] / other["median_step_s"]


def environment(device: torch.device) -> dict:
    import diffusers
    import peft

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
    }


def verdict(row: dict) -> str:
    """Targets of issue 6 for LoRA² rows: time ≤ 1.05× and memory ≤ 1.10× peft at equal rank; stretch ≤ 0.7×."""
    time_ratio, mem_ratio = row.get("ratio_time_vs_peft"), row.get("ratio_mem_vs_peft")
    if not row["method"].startswith("lora2") or time_ratio is None:
        return ""
    if row["method"] == "lora2+cudagraph":
        return f"stretch ≤ 0.7× time: {'met' if time_ratio <= 0.7 else 'MISSED'}"
    parts = [f"time ≤ 1.05×: {'met' if time_ratio <= 1.05 else 'MISSED'}"]
    if mem_ratio is not None:
        parts.append(f"mem ≤ 1.10×: {'met' if mem_ratio <= 1.10 else 'MISSED'}")
    return "; ".join(parts)


def markdown_table(rows: list[dict]) -> str:
    """The Markdown table of docs/PERFORMANCE.md."""

    def fmt(value, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    lines = [
        "| backbone | method | rank | batch | grad ckpt | median step (s) | rounds: min–max of round medians (s) | "
        "peak mem (GiB) | time / peft | time / peft, median of rounds | mem / peft | time / floor | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = (
            f"| {row['backbone']} | {row['method']} | {fmt(row['rank'], 'd')} | {row['batch']} | "
            f"{'yes' if row['grad_ckpt'] else 'no'} |"
        )
        if "median_step_s" not in row:
            lines.append(f"{head} {row.get('error', 'not run')} | | | | | | | |")
            continue
        spread = row.get("round_spread_s")
        rounds = f"{row.get('rounds', 1)}: {spread[0]:.3f}–{spread[1]:.3f}" if spread else "1"
        lines.append(
            f"{head} {row['median_step_s']:.3f} | {rounds} | {fmt(row['peak_mem_gib'], '.2f')} | "
            f"{fmt(row['ratio_time_vs_peft'], '.2f')} | {fmt(row.get('ratio_time_vs_peft_round_median'), '.2f')} | "
            f"{fmt(row['ratio_mem_vs_peft'], '.2f')} | {fmt(row['ratio_time_vs_floor'], '.2f')} | {verdict(row)} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- rounds
PAIRED = ("peft", "lora2")


def pair_groups(specs: list[RowSpec]) -> list[list[RowSpec]]:
    """Consecutive peft and LoRA² rows of equal (backbone, rank, batch, grad_ckpt) form a group; others are alone."""
    groups: list[list[RowSpec]] = []
    for spec in specs:
        last = groups[-1] if groups else []
        pairable = spec.method in PAIRED and all(s.method in PAIRED and s.method != spec.method for s in last)
        if (
            last
            and pairable
            and (last[0].backbone, last[0].rank, last[0].batch, last[0].grad_ckpt)
            == (
                spec.backbone,
                spec.rank,
                spec.batch,
                spec.grad_ckpt,
            )
        ):
            last.append(spec)
        else:
            groups.append([spec])
    return groups


def schedule(specs: list[RowSpec], repeats: int, once: set[str]) -> list[tuple[int, list[RowSpec]]]:
    """(round, group) in run order: backbone by backbone (one model build each), ``repeats`` rounds per backbone,
    each round every group in the order of importance, a peft/LoRA² pair back to back and in swapped order every
    other round, so that drift of the machine hits both alike. Methods in ``once`` run in the first round only."""
    order = []
    for backbone in dict.fromkeys(spec.backbone for spec in specs):
        groups = pair_groups([spec for spec in specs if spec.backbone == backbone])
        for round_index in range(repeats):
            for group in groups:
                group = [spec for spec in group if round_index == 0 or spec.method not in once]
                if group:
                    order.append((round_index, group if round_index % 2 == 0 else group[::-1]))
    return order


def aggregate(spec: RowSpec, samples: list[dict], notes: dict, common: dict) -> dict:
    """One row from its rounds: the median over all timed steps of all rounds, per-round medians and their spread."""
    if not samples:
        return {**asdict(spec), **common, "error": notes["errors"][-1] if notes["errors"] else notes["skip_reason"]}
    row = {key: value for key, value in samples[0].items() if key not in ("round", "step_times_s")}
    times = [t for sample in samples for t in sample["step_times_s"]]
    medians = [sample["median_step_s"] for sample in samples]
    peaks = [sample["peak_mem_gib"] for sample in samples]
    row.update(
        median_step_s=statistics.median(times),
        min_step_s=min(times),
        max_step_s=max(times),
        steps_timed=len(times),
        rounds=len(samples),
        round_index=[sample["round"] for sample in samples],
        round_median_step_s=medians,
        round_spread_s=[min(medians), max(medians)],
        round_spread_rel=(max(medians) - min(medians)) / statistics.median(medians),
        round_step_times_s=[sample["step_times_s"] for sample in samples],
        peak_mem_gib=None if peaks[0] is None else max(peaks),
        round_peak_mem_gib=peaks,
        loss_finite=all(sample["loss_finite"] is not False for sample in samples),
        **common,
    )
    if "mean_rank" in samples[-1]:
        row["mean_rank"] = samples[-1]["mean_rank"]  # at the end of the last round
    if notes["skipped"]:
        row["rounds_skipped"] = notes["skipped"]
        row["skip_reason"] = notes["skip_reason"]
    if notes["errors"]:
        row["round_errors"] = notes["errors"]
    return row


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny SDXL-shaped UNet on CPU (smoke test)")
    parser.add_argument("--table", type=Path, default=None, help="only print the Markdown table of a results file")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--backbones", default="sdxl,koala700m")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--ranks", default=None, help="low,high effective ranks (default 64,512; tiny 4,16)")
    parser.add_argument("--max-rank", type=int, default=None, help="default: the high rank")
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--lambda-scaling", default=None, help="LoRA2Config.lambda_scaling (default: its default)")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 128 = 1024 px; tiny 8)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per row and round (3; tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row and round (10; tiny 2)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--entropy-weight", type=float, default=1e-4)
    parser.add_argument("--token-index", type=int, default=1, help="identifier token position in the prompt")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no row or pair after this many seconds, nor one whose last round would end past it",
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all rows (peft/LoRA² pairs interleaved)")
    parser.add_argument("--once", default="lora2+cudagraph", help="methods measured in the first round only")
    parser.add_argument(
        "--no-graph-check",
        dest="graph_check",
        action="store_false",
        help="skip comparing the CUDA-graph step's adapter gradients with the eager step's",
    )
    parser.add_argument("--only", default=None, help="comma-separated methods to run (default: all)")
    parser.add_argument("--profile", action="store_true", help="profile one peft and one LoRA² step")
    parser.add_argument("--count-ops", action="store_true", help="count dispatched operators of one step (CPU)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.backbones = args.backbones.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.ranks = tuple(int(r) for r in (args.ranks or ("4,16" if args.tiny else "64,512")).split(","))
    if len(args.ranks) != 2 or args.ranks[0] >= args.ranks[1]:
        raise ValueError(f"--ranks must be two increasing ranks low,high, got {args.ranks}")
    args.max_rank = args.max_rank or args.ranks[1]
    args.latent = args.latent or (8 if args.tiny else 128)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    if args.steps < 1:
        raise ValueError(f"--steps must be ≥ 1, got {args.steps}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be ≥ 1, got {args.repeats}")
    args.once = [method for method in args.once.split(",") if method]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.table is not None:
        rows = json.loads(args.table.read_text(encoding="utf-8"))
        print(markdown_table(rows))
        return rows
    args.out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    start = time.perf_counter()
    env = environment(torch.device(args.device))
    logger.info("environment: %s", env)
    specs = default_rows(args.ranks, args.backbones, args.batches)
    if args.only:
        specs = [s for s in specs if s.method in args.only.split(",")]
    bench = Bench(args)
    common = {"latent": args.latent, "px": args.latent * 8, "dtype": "bf16 autocast, base bf16, adapters fp32", **env}
    table_path = args.out_dir / "sdxl_train_step.json"
    extras_path = args.out_dir / "rank_change_export.json"
    samples: dict[str, list[dict]] = {spec.key: [] for spec in specs}
    notes = {spec.key: {"skipped": 0, "errors": [], "skip_reason": "not run"} for spec in specs}
    runnable = []
    for spec in specs:
        if spec.method == "lora2+cudagraph" and bench.device.type != "cuda":  # timing and gradient check need CUDA
            notes[spec.key]["skip_reason"] = f"skipped: CUDA graphs need a CUDA device, not {bench.device.type}"
            logger.info("skip %s: %s", spec.key, notes[spec.key]["skip_reason"])
        else:
            runnable.append(spec)

    def write_results(final: bool) -> list[dict]:
        """Rows reached so far (all rows when ``final``), written at once: a killed run keeps what it measured."""
        reached = [spec for spec in specs if final or samples[spec.key] or any(notes[spec.key][k] for k in notes_keys)]
        rows = [aggregate(spec, samples[spec.key], notes[spec.key], common) for spec in reached]
        add_ratios(rows)
        table_path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        extras_path.write_text(json.dumps({"env": env, "results": bench.extras}, indent=1) + "\n", encoding="utf-8")
        return rows

    notes_keys = ("errors", "skipped")
    group_seconds: dict[tuple[str, ...], float] = {}  # wall time of each group's last run: the next round's estimate
    for round_index, group in schedule(runnable, args.repeats, set(args.once)):
        group_key = tuple(sorted(spec.key for spec in group))
        elapsed = time.perf_counter() - start
        estimate = group_seconds.get(group_key, 0.0)
        if args.budget_s is not None and elapsed + estimate > args.budget_s:
            for spec in group:
                notes[spec.key]["skipped"] += 1
                notes[spec.key]["skip_reason"] = (
                    f"skipped: time budget ({elapsed:.0f} s + {estimate:.0f} s estimated > {args.budget_s:g} s)"
                )
            logger.info(
                "skip round %d of %s (budget: %.0f s elapsed, %.0f s estimated)",
                round_index,
                "+".join(spec.method for spec in group),
                elapsed,
                estimate,
            )
            continue
        group_start = time.perf_counter()
        for spec in group:
            logger.info("round %d row %s ...", round_index, spec.key)
            try:
                samples[spec.key].append(bench.measure(spec, round_index))
                logger.info(
                    "round %d row %s: %.3f s, %s GiB",
                    round_index,
                    spec.key,
                    samples[spec.key][-1]["median_step_s"],
                    samples[spec.key][-1]["peak_mem_gib"],
                )
            except Exception as exc:  # an OOM or a failed capture must not lose the other rows
                logger.exception("round %d row %s failed", round_index, spec.key)
                notes[spec.key]["errors"].append(f"round {round_index}: {type(exc).__name__}: {str(exc)[:200]}")
                bench.backbone = bench.unet = None  # rebuild: the model may hold half-injected adapters
                free_memory(bench.device)
        group_seconds[group_key] = time.perf_counter() - group_start
        write_results(False)
    rows = write_results(True)
    print(markdown_table(rows))
    logger.info("total %.1f s", time.perf_counter() - start)
    return rows


if __name__ == "__main__":
    main()
