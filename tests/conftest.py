"""Test-wide settings: offline (no model hub), deterministic, and light on CI's two cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# small tensors: one thread is faster than two and does not oversubscribe a loaded 2-core machine
torch.set_num_threads(1)
