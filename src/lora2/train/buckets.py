"""Aspect-ratio buckets (SDXL, Podell et al. 2023, Sec. 2.3; kohya's ``--enable_bucket``) and their batch order.

Buckets (kohya's ``make_bucket_resolutions``): every (height, width) with sides multiples of 64, area at most
resolution² and as large as the step allows (for each width w, h = ⌊resolution² / w / 64⌋ · 64, and the transpose),
aspect from 1:4 to 4:1 — at 1024 px the SDXL list from 512×2048 through 1024×1024 to 2048×512. Each image goes
to the bucket nearest its aspect ratio (smallest |log(w/h) − log(w_b/h_b)|), is resized to cover it and cropped
(``lora2.train.data.fit``), and SDXL's micro-conditioning gets its true original size and crop offsets.

Batch order: a pure function of (seed, step), as without buckets, so a resumed run needs no data-loader state.
Epoch ``e`` (generator seeded with (seed, e)): each bucket's images in a random permutation, cut into batches of
``batch_size`` (an incomplete last batch is filled from the start of the same permutation), all batches of all buckets
in a random order. Process ``p`` of ``w`` takes global batch ``step · w + p``: every batch holds one bucket.
"""

from __future__ import annotations

import math

import torch

BUCKET_STEP = 64  # SDXL's buckets: sides multiples of 64 (VAE 8 × UNet 8)
MAX_ASPECT = 4.0


def bucket_sizes(resolution: int, step: int = BUCKET_STEP, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """The buckets (height, width) around ``resolution``² pixels, sorted; ``ValueError`` if the side is not a
    multiple of ``step``."""
    if resolution % step or resolution < step:
        raise ValueError(f"aspect-ratio buckets need a resolution that is a multiple of {step}, got {resolution}")
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            sizes.update({(height, width), (width, height)})
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (height, width) whose aspect ratio is nearest (in log ratio) to that of ``size`` (height, width)."""
    aspect = math.log(size[1] / size[0])
    return min(buckets, key=lambda bucket: abs(math.log(bucket[1] / bucket[0]) - aspect))


def epoch_batches(bucket_of: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of item indices of one epoch, each from one bucket (``bucket_of[i]``: item i's bucket id)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batches = []
    for bucket in sorted(set(bucket_of)):
        members = [i for i, b in enumerate(bucket_of) if b == bucket]
        order = [members[int(j)] for j in torch.randperm(len(members), generator=generator)]
        count = -(-len(order) // batch_size)
        padded = (order * (-(-count * batch_size // len(order))))[: count * batch_size]  # refill from the start
        batches += [padded[k * batch_size : (k + 1) * batch_size] for k in range(count)]
    return [batches[int(j)] for j in torch.randperm(len(batches), generator=generator)]


def bucket_batch_indices(
    bucket_of: list[int], seed: int, micro_step: int, batch_size: int, process: int = 0, world_size: int = 1
) -> list[int]:
    """Item indices of one process's batch of global micro-batch ``micro_step`` (epochs chained without gaps)."""
    per_epoch = sum(-(-bucket_of.count(b) // batch_size) for b in set(bucket_of))
    epoch, offset = divmod(micro_step * world_size + process, per_epoch)
    return epoch_batches(bucket_of, batch_size, seed, epoch)[offset]
