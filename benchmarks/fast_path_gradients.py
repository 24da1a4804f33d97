"""Gradients of the fast path (CUDA graphs) against eager, on one batch at full SDXL architecture (issue 17).

``lora2.train.recipe.DreamBoothRecipe`` is set up as ``lora2 train`` would (random-weight SDXL pipeline built by
``benchmarks/full_scale.py build``, the DreamBooth dog, 1024 px, bf16, LoRA² defaults, the entropy term on so that
its graphed path is compared too). The adapters are perturbed first (B random, ν spread: at init B = 0 and A gets no
gradient). Then, on the same batch (latents, noise, timesteps, prompt embeddings), the gradients of every adapter
tensor of the UNet (``lora_A``, ``lora_B`` of each layer and its ``log_nu``) are taken in this order: graphs (the
capture, which also gives every layer its headroom), eager, eager again, graphs (a replay), eager once more. Error of
a tensor: ‖g − g_eager‖ / ‖g_eager‖ with the first eager pass as reference. ``max_rel_err`` is the largest over all
tensors for the replay; ``eager_rel_err`` the same for the second eager pass (bf16 kernels are not bit-reproducible,
so this is the floor); ``eager_after_rel_err`` shows the replay left no state behind.

    python benchmarks/fast_path_gradients.py --base /tmp/fs/sdxl --instance .gpu/dreambooth/dog \\
        --out $OUT/fast_path_gradients.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lora2.lora.model import layers_of
from lora2.train.config import TrainConfig
from lora2.train.fast_path import UNetRunner
from lora2.train.loss import noised_inputs
from lora2.train.recipe import DreamBoothRecipe


def perturb(unet: torch.nn.Module, seed: int) -> None:
    """B ~ N(0, 0.01²) and log ν moved by U(−0.5, 0.5): every adapter tensor then has a gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers_of(unet):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.01)
            layer.log_nu.add_(torch.rand((), generator=generator) - 0.5)


def batch(run: DreamBoothRecipe) -> tuple:
    """The inputs of step 1's micro-batch, as ``train_step`` builds them."""
    samples = run.data.samples(0)
    latents, time_ids, _ = run.data.latents(samples)  # (B, C, h, w), (B, 6)
    noisy, timesteps, target = noised_inputs(latents, run.components.noise_scheduler, 0.0, run.generator, run.device)
    embeds, pooled = run.data.text(samples)  # (B, T, D), (B, P)
    added = {"text_embeds": pooled, "time_ids": time_ids.to(embeds.dtype)} if pooled is not None else None
    rows = torch.tensor([sample.kind == "instance" for sample in samples])  # (B,)
    return (noisy.to(run.config.weight_dtype), timesteps, embeds, added, rows), target


def gradients(run: DreamBoothRecipe, runner: UNetRunner, inputs: tuple, target: torch.Tensor) -> dict:
    """Adapter gradients of the UNet for the step's loss (MSE + regularization + λ_e · entropy)."""
    run.optimizer.zero_grad(set_to_none=True)
    prediction, entropy = runner(*inputs)
    loss = F.mse_loss(prediction.float(), target.float()) + run.backend.regularization()
    if entropy is not None:
        loss = loss + run.config.entropy_weight * entropy
    loss.backward()
    runner.after_backward()
    unet = run.components.unet
    return {name: p.grad.detach().float().clone() for name, p in unet.named_parameters() if p.grad is not None}


def relative_errors(grads: dict, reference: dict) -> dict:
    """‖g − g_ref‖ / ‖g_ref‖ per tensor (0 where both are zero)."""
    errors = {}
    for name, ref in reference.items():
        norm = float(ref.norm())
        diff = float((grads[name] - ref).norm())
        errors[name] = diff / norm if norm > 0 else diff
    return errors


def summary(errors: dict) -> dict:
    values = sorted(errors.values())
    worst = sorted(errors.items(), key=lambda item: -item[1])[:5]
    nu = [value for name, value in errors.items() if name.endswith("log_nu")]
    return {"max": max(values), "median": values[len(values) // 2], "max_nu": max(nu) if nu else None,
            "worst": {name: value for name, value in worst}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--entropy-weight", type=float, default=1e-4)
    parser.add_argument("--mixed-precision", default="bf16", choices=("bf16", "no"), help="no: fp32 weights and math")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fast_path_gradients_"))
    config = TrainConfig.from_dict({
        "base": args.base, "instance_data_dir": args.instance, "instance_prompt": "a sks dog", "class_name": "dog",
        "output_dir": str(work / "run"), "resolution": args.resolution, "mixed_precision": args.mixed_precision,
        "entropy_weight": args.entropy_weight, "report_to": "none", "compile": "graphs", "max_train_steps": 1,
    })  # fmt: skip
    run = DreamBoothRecipe(config)
    with run.run_folder():
        run.setup()
        unet = run.components.unet
        perturb(unet, seed=0)
        inputs, target = batch(run)
        graphs = run.unet_runner
        eager = UNetRunner(unet, run.collector, "none", graphs.autocast, run.optimizer)
        start = time.perf_counter()
        gradients(run, graphs, inputs, target)  # capture (and headroom for every layer)
        capture_s = time.perf_counter() - start
        reference = gradients(run, eager, inputs, target)
        eager_again = gradients(run, eager, inputs, target)
        replay = gradients(run, graphs, inputs, target)
        eager_after = gradients(run, eager, inputs, target)
    replay_errors = relative_errors(replay, reference)
    result = {
        "max_rel_err": max(replay_errors.values()),
        "replay": summary(replay_errors),
        "eager_rel_err": summary(relative_errors(eager_again, reference)),
        "eager_after_rel_err": summary(relative_errors(eager_after, reference)),
        "tensors": len(reference),
        "nu_tensors": sum(name.endswith("log_nu") for name in reference),
        "fast_path": graphs.summary(),
        "first_call_s": round(capture_s, 2),
        "settings": {
            "base": args.base,
            "resolution": args.resolution,
            "mixed_precision": args.mixed_precision,
            "entropy_weight": args.entropy_weight,
            "perturbation": "B ~ N(0, 0.01^2), log nu += U(-0.5, 0.5)",
            "error": "||g - g_eager|| / ||g_eager|| per tensor",
        },  # fmt: skip
        "versions": {
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if run.device.type == "cuda" else None,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({key: result[key] for key in ("max_rel_err", "eager_rel_err", "tensors", "fast_path")}, indent=1))


if __name__ == "__main__":
    main()
