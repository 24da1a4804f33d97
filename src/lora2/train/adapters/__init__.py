"""Adapter types of ``lora2 train`` as backends: one module per type, each a subclass of ``AdapterBackend``.

Adding a baseline (say LoHa): write ``adapters/loha.py`` with a ``LoHaBackend(AdapterBackend)`` and add one line to
``_BACKENDS``. Modules are imported on first use, so choosing LoRA² never imports peft's tuners.
"""

from __future__ import annotations

import importlib

# adapter_type → (module, class)
_BACKENDS = {
    "lora2": ("lora2.train.adapters.lora2", "LoRA2Backend"),
    "dora": ("lora2.train.adapters.dora", "DoRABackend"),
    "adalora": ("lora2.train.adapters.adalora", "AdaLoRABackend"),
}
ADAPTER_TYPES = tuple(_BACKENDS)


def backend_class(adapter_type: str):
    """The ``AdapterBackend`` subclass of an adapter type (``ValueError`` naming the known ones)."""
    if adapter_type not in _BACKENDS:
        raise ValueError(f"adapter_type must be one of {ADAPTER_TYPES}, got {adapter_type!r}")
    module, name = _BACKENDS[adapter_type]
    return getattr(importlib.import_module(module), name)
