"""Every ``lora2 train`` path at full SDXL / KOALA-700m / SD 1.5 architecture, and lora2 beside the diffusers script.

Issue 16. Random-weight pipelines are built at full architecture from ``../shared/configs`` (no download), with the
world's offline CLIP tokenizers; the DreamBooth ``dog`` photos are the instance images. Every measured program is
an unmodified command-line run in its own process (``lora2 train``, ``torchrun -m lora2.cli train``, ``lora2
generate``, ``lora2 eval``, ``python train_dreambooth_lora_sdxl.py``), with ``benchmarks/step_probe`` on its
``PYTHONPATH`` and ``LORA2_STEP_PROBE`` set, so lora2 and the script are measured by the same code.

How each number is measured:

- ``s_per_step``: the probe records ``time.time()`` at the end of every optimizer step (global post-step hook,
  after the optimizer's own hooks such as LoRA²'s rank update, ``torch.cuda.synchronize()`` first). The step time is
  the median of the intervals between consecutive step ends, leaving out the first 5 steps of each process (the
  intervals ending at steps 6, 7, …; warm-up, autotuning and allocator growth). An interval holds everything a
  program does per step: data, forward, backward, optimizer, rank update, logging. With gradient accumulation a
  step is an optimizer step (all its micro-batches); a step that fp16's GradScaler skips merges two intervals.
  A resumed run pools the intervals of both processes (each without its first 5).
- ``peak_alloc_gib``: ``torch.cuda.max_memory_allocated`` at process exit (the probe's atexit), the largest over
  the row's processes (torchrun: per process, i.e. per GPU). ``peak_process_gib``: ``torch.cuda.max_memory_reserved``
  at exit, the same way (the caching allocator's total, which is what the process holds of the GPU, less the CUDA
  context). Both include everything the run does (class-image generation, latent caching, final samples);
  ``peak_train_alloc_gib`` / ``peak_train_reserved_gib`` are the same peaks read at the last optimizer step.
- ``nvidia_smi_gib``: the largest sum of ``used_memory`` of ``nvidia-smi --query-compute-apps`` over the row's
  processes (polled every 0.5 s; CUDA context included). Where nvidia-smi reports PIDs this sandbox cannot match
  (another PID namespace), the sum over all compute processes is taken; rows run one at a time
  (``nvidia_smi_scope`` says which).
- ``final_mean_rank`` and ``adapter_mib``: ``lora2 inspect --json`` of the run's diffusers adapter file
  (``pytorch_lora_weights.safetensors``): ``totals.mean_rank`` and ``totals.bytes_fp32`` in MiB;
  ``adapter_file_mib`` is the file's size on disk.
- ``wall_s``: from starting the row's first process to the exit of its last (interpreter start, imports, loading,
  caching, training, checkpoints, exports and samples included); ``vs_script.wall_500`` compares this for one
  500-step run of each program. ``to_first_step_s`` (process start to the end of step 1: imports, loading, class
  images, caching, step 1) and ``after_last_step_s`` (last step to exit: checkpoint, exports, samples) split it.
- ``vs_script``: the diffusers script (``--rank 64``) and lora2 (fixed rank 64, and adaptive with its defaults),
  each with and without gradient checkpointing, in interleaved rounds in one call (script, lora2 fixed, lora2
  adaptive, script + checkpointing, …, then again). ``time_ratio`` = lora2's s/step ÷ the script's (each the
  median over its runs of the per-run medians); ``mem_ratio`` = lora2's ``max_memory_reserved`` peak ÷ the
  script's (largest over runs; ``train_mem_ratio`` and ``nvidia_smi_ratio`` the same for the other two measures).

Settings of every training row: 1024 px (SD 1.5: 512), bf16 unless the row is about precision, batch 1, lr 1e-4,
seed 0, 20 steps, one sample prompt at 2 sampling steps (``lora2 train`` always writes samples at the end),
``--report-to none``; the row's own flags come last (see each row's ``command``). ``vs-script`` runs both programs
with their default reporting (tensorboard), both at 1024 px, bf16, batch 1, lr 1e-4 constant, seed 0, no
validation (lora2: one sample prompt at 2 steps); the script runs as ``python3 train_dreambooth_lora_sdxl.py``
(plain python: accelerate's defaults, one process; no accelerate config file is needed).

    python benchmarks/full_scale.py prepare --shared ../shared --dest .gpu
    python benchmarks/full_scale.py build --configs .gpu/configs --out /tmp/fs --backbones sdxl koala-700m sd15 \\
        --device cuda --dtype fp16
    python benchmarks/full_scale.py run --pipelines /tmp/fs --data .gpu --rows 'sdxl-*' --out $OUT/full_scale.json
    python benchmarks/full_scale.py vs-script --pipelines /tmp/fs --data .gpu --repeats 2 --steps 30 \\
        --out $OUT/full_scale.json [--wall-steps 500]
    python benchmarks/full_scale.py table benchmarks/results/full_scale.json   # Markdown for docs/PERFORMANCE.md
    python benchmarks/full_scale.py build --tiny --configs ../shared/configs --out /tmp/fs_tiny --device cpu \\
        --dtype fp32   # CPU smoke test (tests/benchmarks/test_full_scale.py)

``benchmarks/full_scale.sh`` is the GPU-machine driver (one device call: install, build once, rows under a budget).
``lora2 train`` replays CUDA graphs by default on a GPU (``--compile auto``): the ``adaptive`` runs are the fast
path's, and ``vs_script.fast`` / ``fast_wall_500`` repeat ``adaptive`` / ``wall_500`` (``same_runs_as``) unless a
``fast`` config is run; ``--add-config 'eager=--compile none'`` measures the eager trainer beside them. Use
``--name-suffix=-x`` (with ``=``: the value starts with a dash). The probe counts optimizer ``step`` calls.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import fnmatch
import functools
import importlib.metadata
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE_DIR = REPO / "benchmarks" / "step_probe"
WORLD_ASSETS = REPO / "src" / "lora2" / "world" / "assets"
GIB = 2**30
MIB = 2**20
WARMUP_STEPS = 5
SD15_VAE_SCALING = 0.18215  # SD 1.5's VAE latent scaling factor (SDXL's is 0.13025)
INSTANCE_PROMPT = "a sks dog"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
LOG_FILE = "log.jsonl"
MEASUREMENT = {
    "s_per_step": f"median of the intervals between consecutive optimizer-step ends, after the first "
    f"{WARMUP_STEPS} steps of each process (torch.cuda.synchronize() before each clock read; step probe)",
    "peak_alloc_gib": "torch.cuda.max_memory_allocated at process exit, largest over the row's processes",
    "peak_process_gib": "torch.cuda.max_memory_reserved at process exit, largest over the row's processes",
    "peak_train_alloc_gib / peak_train_reserved_gib": "the same two peaks read at the last optimizer step",
    "nvidia_smi_gib": "largest sum of nvidia-smi compute-apps used_memory over the row's processes (0.5 s polls)",
    "final_mean_rank / adapter_mib": "lora2 inspect --json of pytorch_lora_weights.safetensors: totals.mean_rank, "
    "totals.bytes_fp32 / 2**20",
    "wall_s": "start of the row's first process to exit of its last",
    "vs_script": "ratios lora2 / script from runs of one call, interleaved: time = median s/step (median of per-run "
    "medians), mem = max_memory_reserved peak at exit (train_mem: at the last step; nvidia_smi: as above)",
}

# ---------------------------------------------------------------------------------------------- backbones
BACKBONES = {
    "sdxl": {"unet": "sdxl_unet.json", "resolution": 1024},
    "koala-700m": {"unet": "koala700m_unet.json", "resolution": 1024},
    "sd15": {"unet": "sd15_unet.json", "resolution": 512},
}
# full-size parameter counts of /work/shared/configs/README.md: a build that differs is an error
EXPECTED_PARAMETERS = {
    ("sdxl", "unet"): 2_567_463_684,
    ("koala-700m", "unet"): 782_822_724,
    ("sd15", "unet"): 859_520_964,
    ("sdxl", "text_encoder_2"): 694_659_840,
    ("koala-700m", "text_encoder_2"): 694_659_840,
}
SDXL_SHARED = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
# tiny layouts of the same families (CPU tests): the real config with these fields replaced
_TINY_SDXL_UNET = {
    "block_out_channels": [32, 32, 64],
    "attention_head_dim": [1, 2, 2],
    "transformer_layers_per_block": [1, 1, 2],
    "cross_attention_dim": 64,  # 32 + 32: both tiny text encoders' hidden states concatenated
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,  # 32 pooled + 6 time ids x 8
    "sample_size": 8,
}
TINY_OVERRIDES = {
    "sdxl_unet": {**_TINY_SDXL_UNET, "layers_per_block": 1},
    "koala700m_unet": _TINY_SDXL_UNET,  # keeps KOALA's layers_per_block 1 and missing mid block
    "sd15_unet": {
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 1,
        "attention_head_dim": 2,
        "cross_attention_dim": 32,
        "sample_size": 8,
    },
    "sdxl_vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "sample_size": 64},
    "sdxl_text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 32,
    },
}
TINY_OVERRIDES["sdxl_text_encoder_2"] = TINY_OVERRIDES["sdxl_text_encoder"]


# ---------------------------------------------------------------------------------------------- prepare
def subject_class(dreambooth: Path, subject: str) -> str:
    """The class of a DreamBooth subject from ``prompts_and_classes.txt`` (``subject,class`` lines)."""
    path = dreambooth / "prompts_and_classes.txt"
    for line in path.read_text(encoding="utf-8").splitlines():
        name, _, klass = line.strip().partition(",")
        if name == subject and klass:
            return klass
    raise ValueError(f"{path}: no class for subject {subject!r}")


def _copy_tree_files(source: Path, dest: Path, names: list[str] | None = None) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and (names is None or path.name in names):
            shutil.copyfile(path, dest / path.name)  # contents only: the shared files are read-only
            copied.append(path.name)
    return copied


def unpack_bitsandbytes(wheel: Path, site: Path) -> int:
    """Unpack a bitsandbytes wheel into ``site`` with only its CPU and CUDA 13 libraries (the GPU machine's torch is
    cu130; the full wheel is over 40 MB, too much for a device call's 64 MiB). Returns the files written."""
    keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.endswith(".so") and not keep.search(name):
                continue
            if name.startswith("bitsandbytes/") or ".dist-info/" in name:
                target = site / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
                count += 1
    return count


def prepare(shared: Path, dest: Path, subject: str = "dog", class_images: int = 2, bnb_wheel: Path | None = None):
    """Copy what a GPU run needs into ``dest``: configs, the peers script and its licence, the subject's photos
    (with the DreamBooth prompt/class table and licences) and ``class_images`` photos of another subject of the
    same class as given class images. Returns the manifest (also written as ``dest/prepare.json``)."""
    dreambooth = shared / "datasets" / "dreambooth"
    for needed in (shared / "configs", shared / "peers", dreambooth / subject):
        if not needed.is_dir():
            raise ValueError(f"{needed} not found (give --shared, the folder holding configs/, peers/, datasets/)")
    manifest = {"shared": str(shared), "subject": subject}
    manifest["configs"] = _copy_tree_files(shared / "configs", dest / "configs")
    manifest["peers"] = _copy_tree_files(shared / "peers", dest / "peers")
    manifest["instance_images"] = _copy_tree_files(dreambooth / subject, dest / "dreambooth" / subject)
    notes = ["prompts_and_classes.txt", "LICENSE-repo.md", "references_and_licenses.txt"]
    _copy_tree_files(dreambooth, dest / "dreambooth", notes)
    klass = subject_class(dreambooth, subject)
    donors = [
        line.split(",")[0]
        for line in (dreambooth / "prompts_and_classes.txt").read_text(encoding="utf-8").splitlines()
        if line.endswith(f",{klass}") and not line.startswith(f"{subject},")
    ]
    if not donors:
        raise ValueError(f"no other DreamBooth subject of class {klass!r} to take class images from")
    photos = sorted(p for p in (dreambooth / donors[0]).iterdir() if p.is_file())[:class_images]
    class_dir = dest / "class_images"
    if class_dir.is_dir():
        shutil.rmtree(class_dir)
    class_dir.mkdir(parents=True)
    for photo in photos:
        shutil.copyfile(photo, class_dir / f"{donors[0]}_{photo.name}")
    manifest.update(class_name=klass, class_images=f"{len(photos)} photos of DreamBooth subject {donors[0]}")
    if bnb_wheel is not None:
        manifest["bitsandbytes"] = f"{unpack_bitsandbytes(bnb_wheel, dest / 'site')} files from {bnb_wheel.name}"
    (dest / "prepare.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


# ---------------------------------------------------------------------------------------------- build
def read_config(configs: Path, stem: str, tiny: bool) -> dict:
    """A config of ``configs/<stem>.json``, with the tiny layout's fields when ``tiny``."""
    path = configs / f"{stem}.json"
    if not path.is_file():
        raise ValueError(f"config {path} not found (give --configs, e.g. .gpu/configs or ../shared/configs)")
    config = json.loads(path.read_text(encoding="utf-8"))
    return {**config, **TINY_OVERRIDES.get(stem, {})} if tiny else config


def sd15_vae_config(configs: Path, tiny: bool) -> dict:
    """SD 1.5's VAE: the SDXL VAE's architecture (the two are the same network) with SD 1.5's latent scaling factor
    0.18215 and sample size 512 (SD 1.5 ships no VAE config in ../shared/configs)."""
    return {**read_config(configs, "sdxl_vae", tiny), "scaling_factor": SD15_VAE_SCALING, "sample_size": 512}


def sd15_model_index() -> dict:
    """``model_index.json`` of a StableDiffusionPipeline without safety checker."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_model(model, folder: Path, dtype) -> int:
    """Cast to ``dtype``, move to the CPU and ``save_pretrained`` (safetensors); returns the parameter count."""
    count = sum(p.numel() for p in model.parameters())
    model.to(dtype=dtype).to("cpu").save_pretrained(folder)
    return count


def build_component(kind: str, config: dict, folder: Path, device: str, dtype) -> int:
    """Build one model at random init directly on ``device`` (fast on a GPU) and save it; returns its parameters."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        if kind == "unet":
            model = UNet2DConditionModel.from_config(config)
        elif kind == "vae":
            model = AutoencoderKL.from_config(config)
        else:
            text_class = CLIPTextModelWithProjection if kind == "text_encoder_2" else CLIPTextModel
            clean = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "dtype")}
            model = text_class(CLIPTextConfig.from_dict(clean))
    count = save_model(model, folder, dtype)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return count


def write_tokenizers(folder: Path, names: tuple[str, ...]) -> None:
    """The world's offline CLIP tokenizer (model_max_length 77); SDXL's second one pads with "!"."""
    from lora2.world.tokenizer import build_tokenizer

    for name in names:
        build_tokenizer(folder / name, pad_token="!" if name == "tokenizer_2" else "<|endoftext|>")


def build_pipeline(configs: Path, backbone: str, out: Path, device: str, dtype, tiny: bool) -> dict[str, int]:
    """Write the pipeline folder ``out/<backbone>``; KOALA-700m links SDXL's non-UNet parts when they exist."""
    folder = out / backbone
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    unet_config = read_config(configs, Path(BACKBONES[backbone]["unet"]).stem, tiny)
    counts = {"unet": build_component("unet", unet_config, folder / "unet", device, dtype)}
    if backbone == "sd15":
        counts["vae"] = build_component("vae", sd15_vae_config(configs, tiny), folder / "vae", device, dtype)
        te_config = read_config(configs, "sdxl_text_encoder", tiny)
        counts["text_encoder"] = build_component("text_encoder", te_config, folder / "text_encoder", device, dtype)
        write_tokenizers(folder, ("tokenizer",))
        (folder / "scheduler").mkdir()
        shutil.copyfile(configs / "sd15_scheduler.json", folder / "scheduler" / "scheduler_config.json")
        (folder / "model_index.json").write_text(json.dumps(sd15_model_index(), indent=1), encoding="utf-8")
        return counts
    sdxl = out / "sdxl"
    if backbone != "sdxl" and (sdxl / "build.json").is_file():
        for name in SDXL_SHARED:
            (folder / name).symlink_to(Path("..") / "sdxl" / name, target_is_directory=True)
        shared = json.loads((sdxl / "build.json").read_text(encoding="utf-8"))["parameters"]
        counts.update({name: count for name, count in shared.items() if name != "unet"})
    else:
        for kind in ("vae", "text_encoder", "text_encoder_2"):
            config = read_config(configs, f"sdxl_{kind}", tiny)
            counts[kind] = build_component(kind, config, folder / kind, device, dtype)
        write_tokenizers(folder, ("tokenizer", "tokenizer_2"))
        (folder / "scheduler").mkdir()
        shutil.copyfile(configs / "sdxl_scheduler.json", folder / "scheduler" / "scheduler_config.json")
    shutil.copyfile(configs / "sdxl_model_index.json", folder / "model_index.json")
    return counts


def build(configs: Path, out: Path, backbones: list[str], device: str, dtype_name: str, tiny: bool) -> dict:
    """Build each backbone's pipeline folder (SDXL first: KOALA-700m links its text encoders, VAE, tokenizers);
    check full-size parameter counts against ../shared/configs/README.md; ``out/<backbone>/build.json`` marks a
    finished folder. Returns {backbone: {"parameters": {...}, "seconds": s}}."""
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    report = {}
    for backbone in sorted(backbones, key=lambda b: b != "sdxl"):
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; known: {sorted(BACKBONES)}")
        start = time.perf_counter()
        counts = build_pipeline(configs, backbone, out, device, dtype, tiny)
        if not tiny:
            for (name, part), expected in EXPECTED_PARAMETERS.items():
                if name == backbone and counts.get(part) != expected:
                    raise ValueError(f"{backbone} {part}: {counts.get(part):,} parameters, expected {expected:,}")
        seconds = time.perf_counter() - start
        info = {"parameters": counts, "seconds": round(seconds, 1), "tiny": tiny, "dtype": dtype_name}
        (out / backbone / "build.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        report[backbone] = info
        parts = ", ".join(f"{part} {count:,}" for part, count in counts.items())
        print(f"{backbone}{' (tiny)' if tiny else ''}: {parts} parameters; {seconds:.1f} s", flush=True)
    return report


# ---------------------------------------------------------------------------------------------- processes
def _descendants(root: int) -> set[int]:
    """``root`` and every process below it (from /proc; empty where /proc cannot be read)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


class GpuMemoryPoller(threading.Thread):
    """Largest nvidia-smi ``used_memory`` sum (MiB) over a process tree while it runs (all compute processes when
    nvidia-smi's PIDs are not this namespace's)."""

    def __init__(self, root_pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.interval = root_pid, interval
        self.peak_mib: float | None = None
        self.scope: str | None = None
        self.done = threading.Event()

    def poll(self) -> None:
        try:
            text = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return
        usage = {}
        for line in text.strip().splitlines():
            pid, _, mib = line.partition(",")
            if pid.strip().isdigit() and mib.strip().replace(".", "", 1).isdigit():
                usage[int(pid)] = usage.get(int(pid), 0.0) + float(mib)
        if not usage:
            return
        mine = _descendants(self.root_pid) & set(usage)
        scope = "pids" if mine else "all-gpu-processes"
        total = sum(usage[pid] for pid in mine) if mine else sum(usage.values())
        if self.peak_mib is None or total > self.peak_mib:
            self.peak_mib, self.scope = total, scope

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.poll()


def child_env(probe_path: str, data: Path | None) -> dict[str, str]:
    """Environment of a measured process: the probe first on PYTHONPATH, then this checkout's sources."""
    env = dict(os.environ)
    paths = [str(PROBE_DIR), str(REPO / "src")]
    if data is not None and (data / "site").is_dir():
        paths.append(str((data / "site").resolve()))  # bitsandbytes unpacked by `prepare --bitsandbytes-wheel`
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(paths), LORA2_STEP_PROBE=probe_path, PYTHONUNBUFFERED="1")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def run_process(cmd: list[str], log: Path, env: dict, timeout: float, watch=None) -> dict:
    """Run ``cmd`` in its own process group with output to ``log``; SIGTERM to the group at ``timeout`` (SIGKILL
    30 s later). ``watch(process)`` is called every 0.2 s. Returns rc, wall_s, timed_out, nvidia-smi peak."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "ab") as handle:
        handle.write(f"$ {shlex.join(cmd)}\n".encode())
        handle.flush()
        process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, process_group=0)
        poller = GpuMemoryPoller(process.pid)
        if shutil.which("nvidia-smi"):
            poller.start()
        timed_out = False
        while process.poll() is None:
            if time.time() - start > timeout and not timed_out:
                timed_out = True
                _signal_group(process, signal.SIGTERM)
            if timed_out and time.time() - start > timeout + 30:
                _signal_group(process, signal.SIGKILL)
            if watch is not None and not timed_out:
                watch(process)
            time.sleep(0.2)
        poller.done.set()
    wall = time.time() - start
    return {"rc": process.returncode, "wall_s": wall, "timed_out": timed_out, "start": start,
            "nvidia_smi_mib": poller.peak_mib, "nvidia_smi_scope": poller.scope}  # fmt: skip


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def log_tail(log: Path, lines: int = 25) -> str:
    """The last non-empty lines of a log, each progress-bar line reduced to its last state."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    kept = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join([line for line in kept if line.strip()][-lines:])


# ---------------------------------------------------------------------------------------------- probe files
def read_probes(folder: Path) -> list[dict]:
    """The step-probe records of the processes that ran in ``folder``, oldest first."""
    records = []
    for path in sorted(folder.glob("probe-*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(records, key=lambda record: record.get("probe_loaded") or 0.0)


def step_intervals(steps: list[float], warmup: int = WARMUP_STEPS) -> list[float]:
    """Durations of steps warmup+1 … N (step k lasts from the end of step k−1 to its own end; step 1's start is
    unknown, so at least step 1 is left out)."""
    first = max(warmup, 1)
    return [end - begin for begin, end in zip(steps[first - 1 :], steps[first:])]


def probe_summary(records: list[dict], warmup: int = WARMUP_STEPS) -> dict:
    """s/step (median of the pooled intervals), memory peaks (largest over processes, GiB), and the time from the
    first training process's start to the end of its first step and from the last step to the exit (loading,
    caching / final outputs) of a row."""
    intervals = [x for record in records for x in step_intervals(record.get("steps") or [], warmup)]

    def peak(key: str) -> float | None:
        values = [record[key] for record in records if record.get(key) is not None]
        return round(max(values) / GIB, 3) if values else None

    trained = [record for record in records if record.get("steps")]
    first, last = (trained[0], trained[-1]) if trained else ({}, {})
    began = first.get("process_start") or first.get("probe_loaded")
    return {
        "s_per_step": round(statistics.median(intervals), 4) if intervals else None,
        "intervals": len(intervals),
        "steps_per_process": [len(record["steps"]) for record in trained],
        "to_first_step_s": round(first["steps"][0] - began, 1) if trained and began else None,
        "after_last_step_s": round(last["exit_time"] - last["steps"][-1], 1) if last.get("exit_time") else None,
        "peak_alloc_gib": peak("max_memory_allocated"),
        "peak_process_gib": peak("max_memory_reserved"),
        "peak_train_alloc_gib": peak("max_memory_allocated_at_last_step"),
        "peak_train_reserved_gib": peak("max_memory_reserved_at_last_step"),
    }


# ---------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One measured path. ``args`` follow the common training flags (so they win); ``{data}`` is the prepared
    folder. kind: train | resume | torchrun | generate | eval. ``source``: the row whose run generate/eval use.
    ``weight``: expected wall time relative to a defaults row of the backbone (for the time budget)."""

    name: str
    backbone: str
    covers: str
    args: tuple[str, ...] = ()
    kind: str = "train"
    needs: str | None = None  # "bitsandbytes" | "2 gpus" | "photos"
    source: str | None = None
    weight: float = 1.0


ROWS = (
    Row("sdxl-adaptive", "sdxl",
        "rank_mode adaptive; defaults (init_rank 8, AdamW, constant lr, lambda first, entropy 1e-4)"),
    Row("sdxl-fixed64", "sdxl", "rank_mode fixed", ("--rank-mode", "fixed", "--init-rank", "64")),
    Row("sdxl-fixed64-ckpt", "sdxl", "fixed rank + gradient_checkpointing",
        ("--rank-mode", "fixed", "--init-rank", "64", "--gradient-checkpointing"), weight=1.3),
    Row("sdxl-adaptive-ckpt", "sdxl", "adaptive + gradient_checkpointing", ("--gradient-checkpointing",), weight=1.3),
    Row("sdxl-prior-generated", "sdxl", "with_prior_preservation, class images generated",
        ("--with-prior-preservation", "--num-class-images", "2", "--class-generation-steps", "2"), weight=1.5),
    Row("sdxl-prior-given", "sdxl", "with_prior_preservation, class images given (class_data_dir)",
        ("--with-prior-preservation", "--class-data-dir", "{data}/class_images", "--num-class-images", "2"),
        weight=1.3),
    Row("sdxl-text-encoder", "sdxl", "train_text_encoder", ("--train-text-encoder",), weight=1.2),
    Row("sdxl-fp16", "sdxl", "mixed_precision fp16", ("--mixed-precision", "fp16")),
    Row("sdxl-fp32", "sdxl", "mixed_precision no (fp32)", ("--mixed-precision", "no"), weight=2.0),
    Row("sdxl-adam", "sdxl", "optimizer adam; lr_scheduler linear",
        ("--optimizer", "adam", "--lr-scheduler", "linear")),
    Row("sdxl-adamw8bit", "sdxl", "optimizer adamw8bit", ("--optimizer", "adamw8bit"), needs="bitsandbytes"),
    Row("sdxl-adam8bit", "sdxl", "optimizer adam8bit; lr_scheduler polynomial",
        ("--optimizer", "adam8bit", "--lr-scheduler", "polynomial"), needs="bitsandbytes"),
    Row("sdxl-cosine-warmup", "sdxl", "lr_scheduler cosine with warm-up",
        ("--lr-scheduler", "cosine", "--lr-warmup-steps", "5")),
    Row("sdxl-accum2", "sdxl", "gradient_accumulation_steps 2; lr_scheduler constant_with_warmup",
        ("--gradient-accumulation-steps", "2", "--lr-scheduler", "constant_with_warmup", "--lr-warmup-steps", "3"),
        weight=1.6),
    Row("sdxl-min-snr", "sdxl", "snr_gamma 5; lr_scheduler cosine_with_restarts; lambda_scaling none",
        ("--snr-gamma", "5", "--lr-scheduler", "cosine_with_restarts", "--lr-num-cycles", "2",
         "--lambda-scaling", "none")),
    Row("sdxl-noise-offset", "sdxl", "noise_offset 0.05", ("--noise-offset", "0.05")),
    Row("sdxl-entropy", "sdxl", "entropy_weight 1e-4 set explicitly; lambda_scaling sum",
        ("--entropy-weight", "1e-4", "--lambda-scaling", "sum"), weight=1.3),
    Row("sdxl-dora", "sdxl", "adapter_type dora", ("--adapter-type", "dora")),
    Row("sdxl-adalora", "sdxl", "adapter_type adalora",
        ("--adapter-type", "adalora", "--init-rank", "12", "--target-rank", "8")),
    Row("sdxl-resume", "sdxl", "SIGTERM at half the steps, then --resume latest to the end", kind="resume",
        weight=2.2),
    Row("sdxl-torchrun2", "sdxl", "torchrun --nproc_per_node 2 (batch 1 per GPU)", kind="torchrun", needs="2 gpus",
        weight=1.5),
    Row("sdxl-generate", "sdxl", "lora2 generate with the sdxl-adaptive adapter (1 image, 4 steps)", kind="generate",
        source="sdxl-adaptive", weight=0.7),
    Row("sdxl-eval", "sdxl", "lora2 eval of the sdxl-adaptive run (1 prompt, 1 image, 4 steps, world DINO/CLIP)",
        kind="eval", source="sdxl-adaptive", weight=1.0),
    Row("sdxl-uncached-crops", "sdxl", "cache_latents off, random crops and flips (VAE encodes every step)",
        ("--no-cache-latents", "--no-center-crop", "--random-flip"), weight=1.2),
    Row("sdxl-photos", "sdxl",
        "own photos (issue 18): aspect_buckets, caption_extension .txt, caption_dropout_rate, shuffle_caption, "
        "keep_tokens, masked_loss, optimizer prodigy, ema_decay",
        ("--instance-data-dir", "{data}/photos_dog", "--class-name", "dog", "--aspect-buckets",
         "--caption-extension", ".txt", "--caption-dropout-rate", "0.1", "--shuffle-caption", "--keep-tokens", "1",
         "--masked-loss", "--optimizer", "prodigy", "--learning-rate", "1.0", "--ema-decay", "0.999"),
        needs="photos", weight=1.3),
    Row("koala-700m-adaptive", "koala-700m", "KOALA-700m with the defaults"),
    Row("sd15-adaptive", "sd15", "SD 1.5 with the defaults (512 px)"),
)  # fmt: skip
ROW_NAMES = tuple(row.name for row in ROWS)


def select_rows(patterns: list[str]) -> list[Row]:
    """Rows matching names or globs (``all`` = every row), in the order given (a glob's rows in the table's order,
    each row once): the order they run in, so that a time budget drops the last ones."""
    unknown = [p for p in patterns if p != "all" and not any(fnmatch.fnmatchcase(n, p) for n in ROW_NAMES)]
    if unknown:
        raise ValueError(f"no row matches {unknown}; rows: {', '.join(ROW_NAMES)}")
    chosen = [row for p in patterns for row in ROWS if p == "all" or fnmatch.fnmatchcase(row.name, p)]
    return list({row.name: row for row in chosen}.values())  # a dict keeps the first position of a name


@dataclass
class Setup:
    """Where things are and the settings shared by every row of one call.

    device: passed as ``--device`` when set (tests: cpu); precision: the rows' mixed precision unless a row sets
    its own; resolution: None = the backbone's (1024, SD 1.5 512); extra_args / name_suffix: appended to every
    lora2 train command and row name (e.g. a fast-path flag); gpus: None = count with nvidia-smi.
    """

    pipelines: Path
    data: Path
    work: Path
    steps: int = 20
    device: str | None = None
    precision: str = "bf16"
    resolution: int | None = None
    warmup: int = WARMUP_STEPS
    row_timeout: float = 540.0
    extra_args: tuple[str, ...] = ()
    name_suffix: str = ""
    gpus: int | None = None
    keep_checkpoints: bool = False
    python: str = field(default_factory=lambda: sys.executable)

    def lora2(self, *args: str) -> list[str]:
        return [self.python, "-m", "lora2.cli", *args]

    def resolution_of(self, backbone: str) -> int:
        return self.resolution or BACKBONES[backbone]["resolution"]

    def subject_dir(self) -> Path:
        return self.data / "dreambooth" / "dog"


def train_args(setup: Setup, backbone: str, output_dir: Path, steps: int | None = None) -> list[str]:
    """The flags every training row shares (a row's own flags come after them and win)."""
    args = ["train", "--base", str(setup.pipelines / backbone), "--instance-data-dir", str(setup.subject_dir()),
            "--output-dir", str(output_dir), "--overwrite", "--resolution", str(setup.resolution_of(backbone)),
            "--max-train-steps", str(steps or setup.steps), "--train-batch-size", "1", "--learning-rate", "1e-4",
            "--mixed-precision", setup.precision, "--seed", "0", "--sample-steps", "2",
            "--sample-prompts", "{instance}", "--report-to", "none"]  # fmt: skip
    return args + (["--device", setup.device] if setup.device else [])


def row_args(setup: Setup, row: Row) -> list[str]:
    return [arg.replace("{data}", str(setup.data)) for arg in row.args] + list(setup.extra_args)


def gpu_count(setup: Setup) -> int:
    """GPUs for torchrun: ``setup.gpus``, else nvidia-smi's count (0 on the CPU or without nvidia-smi)."""
    if setup.gpus is not None:
        return setup.gpus
    if setup.device == "cpu" or not shutil.which("nvidia-smi"):
        return 0
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))


def missing_need(setup: Setup, row: Row) -> str | None:
    """Why a row cannot run here (its ``needs``), or None."""
    if row.needs == "2 gpus" and gpu_count(setup) < 2:
        return f"needs 2 GPUs, this machine has {gpu_count(setup)}"
    if row.needs == "photos" and not (setup.data / "photos_dog").is_dir():
        return f"needs {setup.data / 'photos_dog'} (benchmarks/photo_folder.py --subject dog --out .gpu/photos_dog)"
    if row.needs == "bitsandbytes":
        code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('bitsandbytes') is None)"
        env = child_env("", setup.data)
        if subprocess.run([setup.python, "-c", code], env=env, check=False).returncode != 0:
            return "bitsandbytes is not importable here (prepare --bitsandbytes-wheel unpacks one into .gpu/site)"
    return None


@dataclass
class Outcome:
    """What a row's processes did: commands, process results, the first failure, the lora2 run folder."""

    commands: list[list[str]]
    processes: list[dict]
    error: str | None = None
    run_dir: Path | None = None
    extra: dict = field(default_factory=dict)


def _failure(process: dict, log: Path, what: str, expected_rc: int = 0) -> str | None:
    if process["timed_out"]:
        return f"{what} timed out after {process['wall_s']:.0f} s\n{log_tail(log)}"
    if process["rc"] != expected_rc:
        return f"{what} exited with {process['rc']} (expected {expected_rc})\n{log_tail(log)}"
    return None


def _train(setup: Setup, row: Row, row_dir: Path, env: dict, log: Path) -> Outcome:
    run_dir = row_dir / "run"
    cmd = setup.lora2(*train_args(setup, row.backbone, run_dir), *row_args(setup, row))
    if row.kind == "torchrun":
        cmd = [setup.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd[1:]]
    process = run_process(cmd, log, env, setup.row_timeout)
    return Outcome([cmd], [process], _failure(process, log, "lora2 train"), run_dir)


def logged_steps(path: Path) -> list[int]:
    """The ``step`` of every complete line of a run's log.jsonl (a line being written is skipped)."""
    steps = []
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    for line in text.split("\n"):
        try:
            steps.append(int(json.loads(line)["step"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return steps


def _resume(setup: Setup, row: Row, row_dir: Path, env: dict, log: Path) -> Outcome:
    """SIGTERM once log.jsonl shows half the steps, then ``--resume latest``; ok only if the first process wrote a
    checkpoint before the end, the second completes, and log.jsonl holds steps 0 … N once each, in order."""
    run_dir = row_dir / "run"
    stop_at = max(1, setup.steps // 2)
    first = setup.lora2(*train_args(setup, row.backbone, run_dir), *row_args(setup, row))
    sent: list[float] = []

    def watch(process: subprocess.Popen) -> None:
        if not sent and max(logged_steps(run_dir / LOG_FILE), default=0) >= stop_at:
            process.send_signal(signal.SIGTERM)
            sent.append(time.time())

    start = time.time()
    interrupted = run_process(first, log, env, setup.row_timeout, watch)
    checkpoints = sorted(int(p.name[11:]) for p in run_dir.glob("checkpoint-*") if p.name[11:].isdigit())
    stopped = checkpoints[-1] if checkpoints else None
    error = _failure(interrupted, log, "lora2 train (until SIGTERM)", expected_rc=143 if sent else 0)
    if error is None and not sent:
        error = f"the run ended before step {stop_at}, no SIGTERM sent"
    elif error is None and (stopped is None or stopped >= setup.steps):
        error = f"no checkpoint before the end after SIGTERM (checkpoints: {checkpoints})"
    extra = {"stopped_at": stopped}
    if error is not None:
        return Outcome([first], [interrupted], error, run_dir, extra)
    second = [arg for arg in first if arg != "--overwrite"] + ["--resume", "latest"]
    resumed = run_process(second, log, env, setup.row_timeout - (time.time() - start))
    error = _failure(resumed, log, "lora2 train --resume latest")
    logged = logged_steps(run_dir / LOG_FILE)
    if error is None and logged != list(range(setup.steps + 1)):
        error = f"log.jsonl is not continuous after resuming: steps {logged}"
    return Outcome([first, second], [interrupted, resumed], error, run_dir, extra)


def _device_flag(setup: Setup) -> list[str]:
    return ["--device", setup.device] if setup.device else []


def _generate(setup: Setup, row: Row, row_dir: Path, env: dict, log: Path, source: Path) -> Outcome:
    side = str(setup.resolution_of(row.backbone))
    image = row_dir / "image.png"
    cmd = setup.lora2("generate", "--base", str(setup.pipelines / row.backbone), "--lora", str(source / ADAPTER_FILE),
                      "--prompt", INSTANCE_PROMPT, "--steps", "4", "--height", side, "--width", side,
                      "--out", str(image), *_device_flag(setup))  # fmt: skip
    process = run_process(cmd, log, env, setup.row_timeout)
    error = _failure(process, log, "lora2 generate") or (None if image.is_file() else "lora2 generate wrote no image")
    return Outcome([cmd], [process], error)


def _eval(setup: Setup, row: Row, row_dir: Path, env: dict, log: Path, source: Path) -> Outcome:
    dtype = "fp32" if setup.device == "cpu" or setup.precision == "no" else setup.precision
    output = row_dir / "eval.json"
    cmd = setup.lora2("eval", "--run", str(source), "--max-prompts", "1", "--num-images", "1",
                      "--num-inference-steps", "4", "--batch-size", "1", "--dino-model", str(WORLD_ASSETS / "dino"),
                      "--clip-model", str(WORLD_ASSETS / "clip"), "--dtype", dtype, "--output", str(output),
                      *_device_flag(setup))  # fmt: skip
    process = run_process(cmd, log, env, setup.row_timeout)
    error = _failure(process, log, "lora2 eval")
    extra = {}
    if error is None:
        try:
            extra["eval_summary"] = json.loads(output.read_text(encoding="utf-8"))["summary"]
        except (OSError, json.JSONDecodeError, KeyError) as problem:
            error = f"lora2 eval wrote no readable {output.name}: {problem}"
    return Outcome([cmd], [process], error, None, extra)


def source_run(results: dict, setup: Setup, row: Row) -> Path | None:
    """The run folder of the row that generate/eval use (its suffixed variant first), if it finished with an
    adapter."""
    for name in (row.source + setup.name_suffix, row.source):
        for record in results.get("rows", []):
            if record.get("name") == name and record.get("status") == "ok" and record.get("output_dir"):
                if (Path(record["output_dir"]) / ADAPTER_FILE).is_file():
                    return Path(record["output_dir"])
    return None


def adapter_facts(setup: Setup, adapter: Path) -> dict:
    """Final mean rank and size from ``lora2 inspect --json``; {"error": …} when it cannot be read."""
    if not adapter.is_file():
        return {"error": f"no adapter written ({adapter} missing)"}
    cmd = setup.lora2("inspect", "--json", str(adapter))
    result = subprocess.run(cmd, capture_output=True, text=True, env=child_env("", None), timeout=600, check=False)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()][-15:]
        return {"error": f"lora2 inspect exited with {result.returncode}\n" + "\n".join(lines)}
    totals = json.loads(result.stdout)["totals"]
    return {
        "final_mean_rank": round(totals["mean_rank"], 2),
        "adapter_mib": round(totals["bytes_fp32"] / MIB, 2),
        "adapter_file_mib": round(adapter.stat().st_size / MIB, 2),
        "adapter_modules": totals["modules"],
    }


def measured(outcome: Outcome, folder: Path, warmup: int) -> dict:
    """Probe numbers, wall time, nvidia-smi peak and commands of an outcome (rows and vs-script runs alike)."""
    smi = [(p["nvidia_smi_mib"], p["nvidia_smi_scope"]) for p in outcome.processes if p["nvidia_smi_mib"]]
    return {
        **probe_summary(read_probes(folder), warmup),
        "nvidia_smi_gib": round(max(smi)[0] / 1024, 3) if smi else None,
        "nvidia_smi_scope": max(smi)[1] if smi else None,
        "wall_s": round(sum(p["wall_s"] for p in outcome.processes), 1),
        "command": " ; then ".join(shlex.join(cmd) for cmd in outcome.commands),
    }


def remove_checkpoints(run_dir: Path | None) -> None:
    """Checkpoints are 0.1-1 GB each at SDXL size: dropped once a row is measured (adapter and logs stay)."""
    for path in run_dir.glob("checkpoint-*") if run_dir is not None and run_dir.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def run_row(setup: Setup, row: Row, results: dict) -> dict:
    """Run one row in ``setup.work/<name>`` and return its record."""
    name = row.name + setup.name_suffix
    record = {"name": name, "backbone": row.backbone, "kind": row.kind, "covers": row.covers, "status": "failed"}
    reason = missing_need(setup, row)
    if reason is not None:
        return {**record, "status": "skipped", "error": reason}
    row_dir = setup.work / name
    if row_dir.exists():
        shutil.rmtree(row_dir)
    row_dir.mkdir(parents=True)
    env = child_env(str(row_dir / "probe-{rank}-{pid}.json"), setup.data)
    log = row_dir / "log.txt"
    if row.kind in ("generate", "eval"):
        source = source_run(results, setup, row)
        if source is None:
            return {**record, "error": f"needs an ok run of row {row.source} with its adapter (run that row first)"}
        outcome = (_generate if row.kind == "generate" else _eval)(setup, row, row_dir, env, log, source)
    else:
        outcome = (_resume if row.kind == "resume" else _train)(setup, row, row_dir, env, log)
    record.update({**measured(outcome, row_dir, setup.warmup), **outcome.extra, "error": outcome.error})
    record["log"] = f"{name}/log.txt"
    if outcome.error is None and outcome.run_dir is not None:
        record["output_dir"] = str(outcome.run_dir)
        facts = adapter_facts(setup, outcome.run_dir / ADAPTER_FILE)
        record.update(facts)
    record["status"] = "ok" if record["error"] is None else "failed"
    if not setup.keep_checkpoints:
        remove_checkpoints(outcome.run_dir)
    return record


# ---------------------------------------------------------------------------------------------- results
def load_results(path: Path) -> dict:
    """The results file to merge into (empty structure when absent)."""
    results = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    results.setdefault("rows", [])
    results.setdefault("vs_script", {})
    results.setdefault("calls", [])
    results["measurement"] = MEASUREMENT
    return results


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def merge_row(results: dict, record: dict) -> None:
    """Replace the row of the same name (a row not run this time keeps an earlier call's result), keeping the
    order of ROWS (other names after, in arrival order)."""
    rows = results["rows"]
    index = next((i for i, row in enumerate(rows) if row["name"] == record["name"]), None)
    if index is None:
        rows.append(record)
    elif record["status"] != "not_run" or rows[index]["status"] == "not_run":
        rows[index] = record
    order = {name: i for i, name in enumerate(ROW_NAMES)}
    rows.sort(key=lambda row: order.get(row["name"], len(order)))


def merge_files(paths: list[Path], labels: list[str] | None = None, vs_from: list[str] | None = None) -> dict:
    """Several results files of separate calls as one: rows by name (later files win, not_run never replaces),
    vs_script keys updated in order with their runs concatenated, calls concatenated.

    ``labels`` (one per file) stamp each row and run with the label of the first file it appears in (``code``: which
    version of the code measured it, e.g. a commit); ``vs_from`` recomputes the vs_script ratios from the runs of
    those labels only (runs of older code stay listed)."""
    merged = load_results(Path("/nonexistent"))
    runs: dict[tuple, dict] = {}
    calls: dict[str, dict] = {}
    seen: dict[str, str] = {}
    for index, path in enumerate(paths):
        part = load_results(path)
        label = labels[index] if labels else None
        for record in part["rows"]:
            merge_row(merged, _stamped(record, label, seen))
        for run in part["vs_script"].get("runs", []):  # a file that grew over calls repeats earlier runs
            key = tuple(run.get(k) for k in ("call", "program", "config", "repeat", "steps", "role"))
            runs.setdefault(key, _stamped(run, label, seen))
        merged["vs_script"].update(part["vs_script"])
        calls.update({call["id"]: call for call in part["calls"]})
    if runs:
        merged["vs_script"]["runs"] = list(runs.values())
    if vs_from:
        chosen = [run for run in runs.values() if run.get("code") in vs_from]
        configs = {name: flags for name, flags in LORA2_CONFIGS.items() if any(r["config"] == name for r in chosen)}
        summary = vs_summary(chosen, configs, {})
        stale = [key for key in merged["vs_script"] if key in LORA2_CONFIGS and key not in summary]
        for key in stale:
            merged["vs_script"].pop(key)
        merged["vs_script"].update(summary, ratios_from=list(vs_from))
    merged["calls"] = list(calls.values())
    return merged


def wall_from_row(results: dict, row_name: str) -> dict:
    """``vs_script.wall_<steps>`` (and ``fast_wall_<steps>``) from a whole-run row of the adaptive defaults (e.g.
    ``run --rows sdxl-adaptive --steps 500 --name-suffix=-500``) and the script's whole runs of as many steps in other
    calls, for when one call cannot hold both: divided by the script's fastest run
    (conservative), ``same_call`` False, the other runs' ratios listed."""
    row = next((r for r in results["rows"] if r["name"] == row_name and r["status"] == "ok"), None)
    if row is None:
        raise ValueError(f"--wall-row {row_name!r}: no ok row of that name in the merged results")
    steps = max(row["steps_per_process"])
    scripts = [r for r in results["vs_script"].get("runs", []) if r["config"] == script_config(())
               and r["role"] == "wall" and r["steps"] == steps and r["status"] == "ok"]  # fmt: skip
    if not scripts:
        raise ValueError(f"--wall-row {row_name!r}: no ok whole run of the script at {steps} steps")
    script = min(scripts, key=lambda r: r["wall_s"])
    entry = {"time_ratio": _ratio(row["wall_s"], script["wall_s"]), "steps": steps, "lora2_config": "adaptive",
             "lora2_wall_s": row["wall_s"], "script_wall_s": script["wall_s"], "lora2_s_per_step": row["s_per_step"],
             "script_s_per_step": script["s_per_step"],
             "mem_ratio": _ratio(row.get("peak_process_gib"), script.get("peak_process_gib")),
             "lora2_peak_process_gib": row.get("peak_process_gib"),
             "script_peak_process_gib": script.get("peak_process_gib"), "same_call": False,
             "lora2_from": f"rows: {row_name}",
             "script_runs": {r["call"]: r["wall_s"] for r in scripts},
             "time_ratios_to_other_script_runs": [_ratio(row["wall_s"], r["wall_s"]) for r in scripts
                                                  if r is not script]}  # fmt: skip
    return {f"wall_{steps}": entry, f"fast_wall_{steps}": {**entry, "same_runs_as": f"wall_{steps}"}}


def _stamped(record: dict, label: str | None, seen: dict[str, str]) -> dict:
    """The record with ``code`` = the label of the first file holding this very record."""
    if label is None or "code" in record:
        return record
    key = json.dumps(record, sort_keys=True)
    seen.setdefault(key, label)
    return {**record, "code": seen[key]}


def pack_logs(work: Path, archive: Path) -> None:
    """Per-row logs, probe records and eval results of ``work`` into one .tgz (a device call returns 8 files)."""
    patterns = ("*/log.txt", "*/probe-*.json", "*/eval.json", "vs/*/log.txt", "vs/*/probe-*.json")
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for pattern in patterns:
            for path in sorted(work.glob(pattern)):
                tar.add(path, arcname=str(path.relative_to(work)))
    os.replace(tmp, archive)


def package_versions(extra_paths: list[Path]) -> dict:
    """Versions of the packages that matter, as the measured processes see them (without importing them)."""
    names = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "torchvision")
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions(path=[str(p) for p in extra_paths] + sys.path):
        name = (dist.metadata["Name"] or "").lower()
        if name in names:
            found.setdefault(name, dist.version)
    return {name: found.get(name) for name in names}


def call_info(setup: Setup, argv: list[str]) -> dict:
    """Machine, versions and commit of this call."""
    gpus = []
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        gpus = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip().splitlines()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return {
        "id": datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "argv": argv,
        "commit": commit.stdout.strip() or os.environ.get("LORA2_COMMIT"),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "gpus": gpus, "python": sys.version.split()[0]},
        "versions": package_versions([setup.data / "site"]),
        "steps": setup.steps,
        "warmup_steps": setup.warmup,
        "extra_args": list(setup.extra_args),
    }


def default_estimate(setup: Setup, backbone: str) -> float:
    """Expected wall time of a defaults row before one has run (seconds): tiny pipelines are quick."""
    marker = setup.pipelines / backbone / "build.json"
    tiny = marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("tiny")
    return 20.0 if tiny else {"sdxl": 60.0, "koala-700m": 40.0, "sd15": 35.0}[backbone]


def run_rows(
    setup: Setup, rows: list[Row], out: Path, budget_s: float | None, argv: list[str], parallel: int = 1
) -> dict:
    """Run ``rows`` in groups of ``parallel`` at once (generate/eval rows last, one by one: they read another row's
    run), merging each record into ``out`` as soon as its group is measured (and the logs into ``logs.tgz``). With
    ``budget_s``, a group whose expected time (the largest weight × the slowest measured defaults-equivalent of its
    backbone in this call) would end past the budget is recorded as "not_run". Rows of a group share the GPU: their
    ``concurrent_rows`` says so, and their s/step is then an upper bound of the row's own (memory is per process)."""
    start = time.time()
    results = load_results(out)
    results["calls"].append(call_info(setup, argv))
    per_backbone: dict[str, float] = {}
    independent = [row for row in rows if row.kind not in ("generate", "eval")]
    dependent = [row for row in rows if row.kind in ("generate", "eval")]
    groups = [independent[i : i + parallel] for i in range(0, len(independent), parallel)] + [[r] for r in dependent]
    for group in groups:
        elapsed = time.time() - start
        estimate = max(r.weight * per_backbone.get(r.backbone, default_estimate(setup, r.backbone)) for r in group)
        if budget_s is not None and elapsed + estimate > budget_s:
            records = [
                {"name": row.name + setup.name_suffix, "backbone": row.backbone, "status": "not_run",
                 "error": f"time budget: {elapsed:.0f} of {budget_s:.0f} s used, row needs about {estimate:.0f} s"}
                for row in group
            ]  # fmt: skip
        else:
            timeout = setup.row_timeout if budget_s is None else min(setup.row_timeout, budget_s - elapsed)
            bounded = replace(setup, row_timeout=timeout)
            with concurrent.futures.ThreadPoolExecutor(len(group)) as pool:
                records = list(pool.map(functools.partial(run_row, bounded, results=results), group))
            for row, record in zip(group, records):
                record["concurrent_rows"] = len(group)
                if record["status"] == "ok" and len(group) == 1:
                    normalised = record["wall_s"] / row.weight
                    per_backbone[row.backbone] = max(per_backbone.get(row.backbone, 0.0), normalised)
                elif record["status"] == "ok":
                    per_backbone.setdefault(row.backbone, record["wall_s"] / row.weight)
        for record in records:
            merge_row(results, record)
            print(row_line(record), flush=True)
        save_results(out, results)
        pack_logs(setup.work, out.parent / "logs.tgz")
    return results


def row_line(record: dict) -> str:
    """One progress line of a row (the device call's output tail)."""
    numbers = [f"{record.get('s_per_step')} s/step", f"alloc {record.get('peak_alloc_gib')} GiB",
               f"reserved {record.get('peak_process_gib')} GiB", f"smi {record.get('nvidia_smi_gib')} GiB",
               f"rank {record.get('final_mean_rank')}", f"{record.get('wall_s')} s"]  # fmt: skip
    line = f"{record['name']}: {record['status']}"
    if record["status"] in ("ok", "failed") and record.get("wall_s") is not None:
        line += " | " + ", ".join(numbers)
    if record.get("error"):
        line += " | " + record["error"].strip().splitlines()[-1][:200]
    return line


# ---------------------------------------------------------------------------------------------- vs the script
LORA2_CONFIGS = {
    "fixed64": ("--rank-mode", "fixed", "--init-rank", "64"),
    "fixed64_ckpt": ("--rank-mode", "fixed", "--init-rank", "64", "--gradient-checkpointing"),
    "adaptive": (),
    "adaptive_ckpt": ("--gradient-checkpointing",),
}
CONFIG_ROWS = {"fixed64": "sdxl-fixed64", "fixed64_ckpt": "sdxl-fixed64-ckpt", "adaptive": "sdxl-adaptive",
               "adaptive_ckpt": "sdxl-adaptive-ckpt"}  # fmt: skip
CHECKPOINTING = "--gradient-checkpointing"
# the script's flags this harness passes (tests check them against the script's argparse)
SCRIPT_FLAGS = ("--pretrained_model_name_or_path", "--instance_data_dir", "--instance_prompt", "--resolution",
                "--train_batch_size", "--max_train_steps", "--rank", "--mixed_precision", "--learning_rate",
                "--lr_scheduler", "--lr_warmup_steps", "--output_dir", "--seed", "--report_to",
                "--gradient_checkpointing")  # fmt: skip


def script_command(setup: Setup, output_dir: Path, steps: int, checkpointing: bool) -> list[str]:
    """The unmodified diffusers script, rank 64, as plain ``python3`` (one process, accelerate's defaults)."""
    cmd = [setup.python, str(setup.data / "peers" / "train_dreambooth_lora_sdxl.py"),
           "--pretrained_model_name_or_path", str(setup.pipelines / "sdxl"),
           "--instance_data_dir", str(setup.subject_dir()), "--instance_prompt", INSTANCE_PROMPT,
           "--resolution", str(setup.resolution_of("sdxl")), "--train_batch_size", "1",
           "--max_train_steps", str(steps), "--rank", "64", "--mixed_precision", setup.precision,
           "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
           "--output_dir", str(output_dir), "--seed", "0", "--report_to", "tensorboard"]  # fmt: skip
    return cmd + (["--gradient_checkpointing"] if checkpointing else [])


def lora2_vs_command(setup: Setup, output_dir: Path, steps: int, flags: tuple[str, ...]) -> list[str]:
    """lora2 with the script's settings; reporting as the script (tensorboard), one sample prompt at 2 steps."""
    args = ["train", "--base", str(setup.pipelines / "sdxl"), "--instance-data-dir", str(setup.subject_dir()),
            "--instance-prompt", INSTANCE_PROMPT, "--output-dir", str(output_dir), "--overwrite",
            "--resolution", str(setup.resolution_of("sdxl")), "--max-train-steps", str(steps),
            "--train-batch-size", "1", "--learning-rate", "1e-4", "--lr-scheduler", "constant",
            "--mixed-precision", setup.precision, "--seed", "0", "--sample-prompts", "{instance}",
            "--sample-steps", "2", "--report-to", "tensorboard", *_device_flag(setup)]  # fmt: skip
    return setup.lora2(*args, *flags, *setup.extra_args)


@dataclass(frozen=True)
class VsRun:
    """One planned run: program "script" | "lora2", config name, its lora2 flags, repeat index, steps, role
    ("round": the interleaved s/step and memory comparison, "wall": the whole-run wall time)."""

    program: str
    config: str
    flags: tuple[str, ...]
    repeat: int
    steps: int
    role: str = "round"


def vs_plan(
    configs: dict, repeats: int, steps: int, wall_steps: int | None, wall: dict, walls_first: bool = False
) -> list[VsRun]:
    """Rounds of (script, lora2 configs without checkpointing, script + checkpointing, lora2 configs with it),
    then (or first, ``walls_first``) one script / lora2 pair per wall-time config."""
    plan = []
    for repeat in range(repeats):
        for checkpointing in (False, True):
            group = [(name, flags) for name, flags in configs.items() if (CHECKPOINTING in flags) == checkpointing]
            if group:
                script_flags = (CHECKPOINTING,) if checkpointing else ()
                plan.append(VsRun("script", script_config(script_flags), script_flags, repeat, steps))
                plan += [VsRun("lora2", name, flags, repeat, steps) for name, flags in group]
    for name, flags in wall.items() if wall_steps else []:
        script_flags = (CHECKPOINTING,) if CHECKPOINTING in flags else ()
        plan.append(VsRun("script", script_config(script_flags), script_flags, 0, wall_steps, "wall"))
        plan.append(VsRun("lora2", name, flags, 0, wall_steps, "wall"))
    if walls_first:
        plan.sort(key=lambda run: run.role != "wall")
    return plan


def script_config(flags: tuple[str, ...]) -> str:
    return "script_ckpt" if CHECKPOINTING in flags else "script"


def vs_run(setup: Setup, planned: VsRun, call_id: str) -> tuple[dict, Outcome]:
    """Run one planned program in ``work/vs/<call>-<config>-s<steps>-r<repeat>`` and measure it."""
    folder = setup.work / "vs" / f"{call_id}-{planned.config}-s{planned.steps}-r{planned.repeat}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    run_dir, log = folder / "run", folder / "log.txt"
    if planned.program == "script":
        cmd = script_command(setup, run_dir, planned.steps, CHECKPOINTING in planned.flags)
    else:
        cmd = lora2_vs_command(setup, run_dir, planned.steps, planned.flags)
    env = child_env(str(folder / "probe-{rank}-{pid}.json"), setup.data)
    process = run_process(cmd, log, env, setup.row_timeout)
    error = _failure(process, log, planned.program)
    if error is None and not (run_dir / ADAPTER_FILE).is_file():
        error = f"{planned.program} wrote no {ADAPTER_FILE}"
    outcome = Outcome([cmd], [process], error, run_dir)
    record = {"program": planned.program, "config": planned.config, "repeat": planned.repeat,
              "steps": planned.steps, "role": planned.role, "call": call_id,
              "status": "ok" if error is None else "failed", "error": error,
              **measured(outcome, folder, setup.warmup), "log": f"vs/{folder.name}/log.txt"}  # fmt: skip
    if not setup.keep_checkpoints:
        remove_checkpoints(run_dir)
    return record, outcome


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _peak(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return max(values) if values else None


def _ratio(mine: float | None, theirs: float | None) -> float | None:
    return round(mine / theirs, 3) if mine is not None and theirs else None


def ratio_entry(mine: list[dict], theirs: list[dict]) -> dict:
    """lora2 / script: time = median of per-run s/step; memory = largest peak (reserved at exit, at the last step,
    nvidia-smi); per-repeat time ratios show the spread."""
    by_repeat = {run["repeat"]: run["s_per_step"] for run in theirs}
    entry = {
        "time_ratio": _ratio(_median([r["s_per_step"] for r in mine]), _median([r["s_per_step"] for r in theirs])),
        "mem_ratio": _ratio(_peak(mine, "peak_process_gib"), _peak(theirs, "peak_process_gib")),
        "train_mem_ratio": _ratio(_peak(mine, "peak_train_reserved_gib"), _peak(theirs, "peak_train_reserved_gib")),
        "nvidia_smi_ratio": _ratio(_peak(mine, "nvidia_smi_gib"), _peak(theirs, "nvidia_smi_gib")),
        "lora2_s_per_step": _median([r["s_per_step"] for r in mine]),
        "script_s_per_step": _median([r["s_per_step"] for r in theirs]),
        "lora2_peak_process_gib": _peak(mine, "peak_process_gib"),
        "script_peak_process_gib": _peak(theirs, "peak_process_gib"),
        "lora2_peak_alloc_gib": _peak(mine, "peak_alloc_gib"),
        "script_peak_alloc_gib": _peak(theirs, "peak_alloc_gib"),
        "per_repeat_time_ratio": [
            _ratio(run["s_per_step"], by_repeat.get(run["repeat"])) for run in sorted(mine, key=lambda r: r["repeat"])
        ],
        "runs": {"lora2": len(mine), "script": len(theirs)},
    }
    return entry


def vs_summary(runs: list[dict], configs: dict, wall: dict) -> dict:
    """The vs_script keys computable from this call's ok runs (configs without both sides are left out)."""
    ok = [run for run in runs if run["status"] == "ok"]
    summary = {}
    for name, flags in configs.items():
        script = script_config((CHECKPOINTING,) if CHECKPOINTING in flags else ())
        mine = [r for r in ok if r["config"] == name and r["role"] == "round"]
        theirs = [r for r in ok if r["config"] == script and r["role"] == "round"]
        if mine and theirs:
            summary[name] = ratio_entry(mine, theirs)
    for adaptive, fixed in (("adaptive", "fixed64"), ("adaptive_ckpt", "fixed64_ckpt")):
        if adaptive in summary and fixed in summary:  # the issue's target: adaptive's peak ≤ fixed rank 64's
            ratio = _ratio(summary[adaptive]["lora2_peak_process_gib"], summary[fixed]["lora2_peak_process_gib"])
            summary[adaptive][f"mem_ratio_to_{fixed}"] = ratio
    for name, flags in wall.items():
        script = script_config((CHECKPOINTING,) if CHECKPOINTING in flags else ())
        mine = [r for r in ok if r["config"] == name and r["role"] == "wall"]
        theirs = [r for r in ok if r["config"] == script and r["role"] == "wall"]
        if mine and theirs:
            steps = mine[0]["steps"]
            key = f"wall_{steps}" if name == "adaptive" else f"{name}_wall_{steps}"
            summary[key] = {"time_ratio": _ratio(mine[0]["wall_s"], theirs[0]["wall_s"]), "steps": steps,
                            "lora2_config": name, "lora2_wall_s": mine[0]["wall_s"],
                            "script_wall_s": theirs[0]["wall_s"], "lora2_s_per_step": mine[0]["s_per_step"],
                            "script_s_per_step": theirs[0]["s_per_step"],
                            "mem_ratio": _ratio(mine[0].get("peak_process_gib"), theirs[0].get("peak_process_gib")),
                            "lora2_peak_process_gib": mine[0].get("peak_process_gib"),
                            "script_peak_process_gib": theirs[0].get("peak_process_gib")}  # fmt: skip
    # lora2 train --compile auto (the default) replays CUDA graphs on a GPU: the "adaptive" runs are the fast path's
    for fast, default in (("fast", "adaptive"), ("fast_wall_500", "wall_500")):
        if fast not in summary and default in summary:
            summary[fast] = {**summary[default], "same_runs_as": default}
    return summary


def vs_row(setup: Setup, record: dict, outcome: Outcome) -> dict:
    """A lora2 run of the first round, recorded also as its row of the table (the same settings but 30 steps,
    tensorboard reporting and the instance prompt given), so the rows call need not repeat it."""
    name = CONFIG_ROWS[record["config"]] + setup.name_suffix
    covers = next(row.covers for row in ROWS if row.name == CONFIG_ROWS[record["config"]])
    skip = ("program", "config", "repeat", "steps", "role", "call")
    row = {"name": name, "backbone": "sdxl", "kind": "train", "covers": covers}
    row.update({key: value for key, value in record.items() if key not in skip})
    row["note"] = f"measured by vs-script ({record['steps']} steps, report_to tensorboard)"
    if record["status"] == "ok":
        row["output_dir"] = str(outcome.run_dir)
        row.update(adapter_facts(setup, outcome.run_dir / ADAPTER_FILE))
        row["status"] = "ok" if row.get("error") is None else "failed"
    return row


@dataclass
class VsOptions:
    """vs-script settings: configs (name → lora2 flags) compared in ``repeats`` interleaved rounds of ``steps``;
    one whole run of ``wall_steps`` for each of ``wall`` (name → lora2 flags) and the script beside it;
    ``as_rows`` records the first round's lora2 runs as table rows."""

    configs: dict
    repeats: int = 2
    steps: int = 30
    wall_steps: int | None = None
    wall: dict = field(default_factory=lambda: {"adaptive": LORA2_CONFIGS["adaptive"]})
    as_rows: bool = True
    walls_first: bool = False


def vs_script(setup: Setup, options: VsOptions, out: Path, budget_s: float | None, argv: list[str]) -> dict:
    """Run the plan in order, merging ``vs_script`` (and rows) into ``out`` after every run; runs that would end
    past ``budget_s`` (estimated from the longest run of the same length so far) are recorded as "not_run"."""
    start = time.time()
    results = load_results(out)
    call = call_info(setup, argv)
    results["calls"].append(call)
    earlier_runs = results["vs_script"].get("runs", [])
    runs: list[dict] = []
    longest: dict[int, float] = {}
    plan = vs_plan(
        options.configs, options.repeats, options.steps, options.wall_steps, options.wall, options.walls_first
    )
    for planned in plan:
        elapsed = time.time() - start
        estimate = longest.get(planned.steps, 1.5 * default_estimate(setup, "sdxl") + 0.5 * planned.steps)
        if budget_s is not None and elapsed + estimate > budget_s:
            record = {"program": planned.program, "config": planned.config, "repeat": planned.repeat,
                      "steps": planned.steps, "role": planned.role, "call": call["id"], "status": "not_run",
                      "error": f"time budget: {elapsed:.0f} of {budget_s:.0f} s used"}  # fmt: skip
        else:
            timeout = setup.row_timeout if budget_s is None else min(setup.row_timeout, budget_s - elapsed)
            record, outcome = vs_run(replace(setup, row_timeout=timeout), planned, call["id"])
            longest[planned.steps] = max(longest.get(planned.steps, 0.0), record["wall_s"])
            first_round = planned.role == "round" and planned.repeat == 0 and planned.program == "lora2"
            if options.as_rows and first_round and planned.config in CONFIG_ROWS:
                merge_row(results, vs_row(setup, record, outcome))
        runs.append(record)
        summary = vs_summary(runs, options.configs, options.wall)
        settings = {"steps": options.steps, "repeats": options.repeats, "wall_steps": options.wall_steps,
                    "configs": {name: list(flags) for name, flags in {**options.configs, **options.wall}.items()},
                    "script": "python3 train_dreambooth_lora_sdxl.py (unmodified, plain python, rank 64)"}  # fmt: skip
        results["vs_script"].update({**summary, "settings": settings, "runs": earlier_runs + runs})
        save_results(out, results)
        pack_logs(setup.work, out.parent / "logs.tgz")
        print(f"vs {planned.program} {planned.config} r{planned.repeat} {planned.steps} steps: " + row_line(
            {"name": planned.config, **record}), flush=True)  # fmt: skip
    return results


# ---------------------------------------------------------------------------------------------- table
TARGETS = {
    "fixed64": "time ≤ 0.95×, memory ≤ 1.0×",
    "fixed64_ckpt": "time ≤ 0.95×, memory ≤ 1.0×",
    "adaptive": "time ≤ 1.0×, memory ≤ fixed64's",
    "adaptive_ckpt": "time ≤ 1.0×, memory ≤ fixed64_ckpt's",
    "fast": "time ≤ 0.5× (stretch ≤ 0.35×)",
    "wall_500": "≤ 1.0×",
    "fast_wall_500": "≤ 0.6×",
}


def _cell(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def rows_table(rows: list[dict]) -> list[str]:
    """One line per row; ``rows at once`` > 1: the GPU was shared (s/step an upper bound; nvidia-smi may sum the
    processes of the group), ``code``: the label of the code version that measured it (``merge --labels``)."""
    lines = [
        "| row | backbone | status | s/step | peak alloc GiB | peak reserved GiB | nvidia-smi GiB | final mean rank "
        "| adapter MiB | wall s | rows at once | code |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        status = row["status"] if row["status"] == "ok" else f"**{row['status']}**"
        lines.append(
            f"| {row['name']} | {row['backbone']} | {status} | {_cell(row.get('s_per_step'), 3)} "
            f"| {_cell(row.get('peak_alloc_gib'), 1)} | {_cell(row.get('peak_process_gib'), 1)} "
            f"| {_cell(row.get('nvidia_smi_gib'), 1)} | {_cell(row.get('final_mean_rank'), 1)} "
            f"| {_cell(row.get('adapter_mib'), 1)} | {_cell(row.get('wall_s'), 0)} "
            f"| {row.get('concurrent_rows') or 1} | {row.get('code', '')} |"
        )
    return lines


def vs_table(vs: dict) -> list[str]:
    lines = [
        "| lora2 | time ratio | lora2 s/step | script s/step | memory ratio | lora2 reserved GiB "
        "| script reserved GiB | target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, entry in vs.items():
        if not isinstance(entry, dict) or "mem_ratio" not in entry or "lora2_wall_s" in entry:
            continue
        lines.append(
            f"| {name} | {_cell(entry['time_ratio'])} | {_cell(entry['lora2_s_per_step'], 3)} "
            f"| {_cell(entry['script_s_per_step'], 3)} | {_cell(entry['mem_ratio'])} "
            f"| {_cell(entry['lora2_peak_process_gib'], 1)} | {_cell(entry['script_peak_process_gib'], 1)} "
            f"| {TARGETS.get(name, '')} |"
        )
    for name, entry in vs.items():
        if isinstance(entry, dict) and "lora2_wall_s" in entry:
            lines.append(
                f"| {name} ({entry['lora2_config']}, whole run) | {_cell(entry['time_ratio'])} "
                f"| {_cell(entry['lora2_wall_s'], 0)} s | {_cell(entry['script_wall_s'], 0)} s "
                f"| {_cell(entry.get('mem_ratio'))} | {_cell(entry.get('lora2_peak_process_gib'), 1)} "
                f"| {_cell(entry.get('script_peak_process_gib'), 1)} "
                f"| {TARGETS.get(name, '')} |"
            )
    return lines


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1][:160] if text.strip() else ""


def markdown(results: dict, commands: bool = False) -> str:
    """The tables of docs/PERFORMANCE.md: rows, failures (last error line), lora2 vs the script, and optionally
    every command."""
    out = ["s/step: " + MEASUREMENT["s_per_step"] + "; memory: peaks at process exit (reserved = the process's "
           "allocator total).", ""]  # fmt: skip
    out += rows_table(results.get("rows", []))
    failures = [row for row in results.get("rows", []) if row["status"] != "ok" and row.get("error")]
    if failures:
        out += ["", "Not ok:", ""]
        out += [f"- {row['name']} ({row['status']}): `{last_line(row['error'])}`" for row in failures]
    vs = results.get("vs_script", {})
    if any(isinstance(entry, dict) and "time_ratio" in entry for entry in vs.values()):
        out += ["", "lora2 / diffusers `train_dreambooth_lora_sdxl.py --rank 64` (same call, interleaved):", ""]
        out += vs_table(vs)
    if commands:
        out += ["", "Commands:", ""]
        for row in results.get("rows", []):
            if row.get("command"):
                out += [f"- {row['name']}:", "", "  ```", f"  {row['command']}", "  ```"]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- command line
def _setup_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipelines", type=Path, required=True, help="folder of the built pipelines (build --out)")
    parser.add_argument("--data", type=Path, required=True, help="prepared folder (prepare --dest)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (merged into when it exists)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fs_work"), help="run folders (kept for later rows)")
    parser.add_argument("--device", default=None, help="passed as --device (default: lora2's auto)")
    parser.add_argument("--precision", default="bf16", choices=("no", "fp16", "bf16"), help="mixed precision")
    parser.add_argument("--resolution", type=int, default=None, help="default: 1024 (SD 1.5: 512)")
    parser.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="steps left out of s/step per process")
    parser.add_argument("--row-timeout", type=float, default=540.0, help="seconds per row (SIGTERM, then SIGKILL)")
    parser.add_argument("--budget-s", type=float, default=None, help="start nothing that would end past this")
    parser.add_argument("--extra-args", default="", help="appended to every lora2 train command (one string)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoint-* folders of the runs")


def _setup(args: argparse.Namespace, steps: int) -> Setup:
    return Setup(
        pipelines=args.pipelines.resolve(), data=args.data.resolve(), work=args.work.resolve(), steps=steps,
        device=args.device, precision=args.precision, resolution=args.resolution, warmup=args.warmup,
        row_timeout=args.row_timeout, extra_args=tuple(shlex.split(args.extra_args)),
        name_suffix=getattr(args, "name_suffix", ""), gpus=getattr(args, "gpus", None),
        keep_checkpoints=args.keep_checkpoints,
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="copy configs, the peers script and the photos into a git-ignored folder")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    p.add_argument("--dest", type=Path, default=REPO / ".gpu")
    p.add_argument("--subject", default="dog")
    p.add_argument("--class-images", type=int, default=2, help="photos of another subject of the class, as given")
    p.add_argument("--bitsandbytes-wheel", type=Path, default=None, help="unpack its CPU/CUDA 13 parts into site/")
    p = commands.add_parser("build", help="random-weight pipeline folders at full architecture (or --tiny)")
    p.add_argument("--configs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument("--device", default="cuda", help="where modules are built and initialised (cuda: seconds)")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="dtype of the weight files")
    p.add_argument("--tiny", action="store_true", help="tiny layouts of the same families (CPU tests)")
    p.add_argument("--skip-existing", action="store_true", help="keep a backbone whose build.json matches")
    p = commands.add_parser("run", help="run rows (names or globs, 'all') and merge their results into --out")
    _setup_flags(p)
    p.add_argument("--rows", nargs="+", required=True, help=f"rows: {', '.join(ROW_NAMES)}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--name-suffix", default="", help="appended to row names (e.g. -fast with --extra-args)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs for the torchrun row (default: nvidia-smi -L)")
    p.add_argument("--parallel", type=int, default=1, help="rows run at once on the GPU (timings then shared)")
    p = commands.add_parser("vs-script", help="lora2 beside the diffusers script, interleaved, same call")
    _setup_flags(p)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--wall-steps", type=int, default=None, help="also one whole run of each at this many steps")
    p.add_argument("--wall-configs", nargs="+", default=["adaptive"], help="lora2 configs of the whole-run pairs")
    p.add_argument("--configs", nargs="+", default=list(LORA2_CONFIGS), help="lora2 configs of the rounds")
    p.add_argument("--add-config", action="append", default=[], metavar="NAME=FLAGS", help="a new lora2 config")
    p.add_argument("--no-rows", action="store_true", help="do not record the first round's lora2 runs as rows")
    p.add_argument("--walls-first", action="store_true", help="the whole-run pairs before the rounds")
    p = commands.add_parser("table", help="Markdown tables for docs/PERFORMANCE.md")
    p.add_argument("results", type=Path)
    p.add_argument("--commands", action="store_true", help="also list every row's command")
    p = commands.add_parser("merge", help="merge results files of several calls")
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--labels", nargs="+", default=None, help="one per input: the code version that measured it")
    p.add_argument("--vs-from", nargs="+", default=None, help="labels whose vs-script runs give the ratios")
    p.add_argument("--wall-row", default=None, help="a whole-run row giving wall_<steps> against the script's runs")
    return parser


def _vs_options(args: argparse.Namespace) -> VsOptions:
    known = dict(LORA2_CONFIGS)
    for item in args.add_config:
        name, sep, flags = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--add-config takes NAME=FLAGS, got {item!r}")
        known[name] = tuple(shlex.split(flags))
    unknown = [name for name in args.configs + args.wall_configs if name not in known]
    if unknown:
        raise ValueError(f"unknown lora2 configs {unknown}; known: {sorted(known)}")
    configs = {name: known[name] for name in args.configs}
    wall = {name: known[name] for name in args.wall_configs}
    return VsOptions(configs, args.repeats, args.steps, args.wall_steps, wall, not args.no_rows, args.walls_first)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "prepare":
            manifest = prepare(args.shared, args.dest, args.subject, args.class_images, args.bitsandbytes_wheel)
            print(json.dumps(manifest, indent=1))
        elif args.command == "build":
            backbones = args.backbones
            if args.skip_existing:
                backbones = [b for b in backbones if not _built(args.out / b, args.tiny, args.dtype)]
            build(args.configs, args.out, backbones, args.device, args.dtype, args.tiny)
        elif args.command == "run":
            setup = _setup(args, args.steps)
            run_rows(setup, select_rows(args.rows), args.out, args.budget_s, argv, max(1, args.parallel))
        elif args.command == "vs-script":
            vs_script(_setup(args, args.steps), _vs_options(args), args.out, args.budget_s, argv)
        elif args.command == "table":
            print(markdown(load_results(args.results), args.commands))
        else:
            if args.labels is not None and len(args.labels) != len(args.inputs):
                raise ValueError(f"--labels needs one label per input ({len(args.inputs)}), got {len(args.labels)}")
            merged = merge_files(args.inputs, args.labels, args.vs_from)
            if args.wall_row:
                merged["vs_script"].update(wall_from_row(merged, args.wall_row))
            save_results(args.out, merged)
    except ValueError as error:
        print(f"ERROR {error}", file=sys.stderr)
        return 2
    return 0


def _built(folder: Path, tiny: bool, dtype: str) -> bool:
    marker = folder / "build.json"
    if not marker.is_file():
        return False
    info = json.loads(marker.read_text(encoding="utf-8"))
    return info.get("tiny") == tiny and info.get("dtype") == dtype


if __name__ == "__main__":
    sys.exit(main())
