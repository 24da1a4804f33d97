"""Evaluation: DreamBooth metrics (``metrics``: DINO, CLIP-I, CLIP-T), ``lora2 eval`` (``evaluate``), the
``lora2 bench`` grid (``bench``) and ``lora2 report`` (``report``). Import the submodules directly; this package
imports nothing so that ``lora2`` commands stay fast to start."""
