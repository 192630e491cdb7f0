"""Evaluation: top-1/top-5 accuracy and mean cross-entropy, sharded over ranks."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import runtime
from ..peft.heads import top_classes
from .distributed import DistInfo, Loader, SeededDataset, ShardSampler, all_reduce_sum, comm_device

# On the CPU the model runs over near-equal chunks of at most this many images (the loader's batch
# is unchanged; the same logits, bit for bit). At batch 144 (train.eval_batch_size's default, the
# official GPU value) a Vim-Small forward's activations are 87 MB each, above glibc's largest mmap
# threshold, so without a held heap (svp.runtime.held_heap, which evaluate holds) every forward
# page-faulted them in afresh: 11.4 images/s against 17.5 in chunks on 2 vCPUs. With the heap held
# the two run alike (18.1 and 17.6; docs/benchmarks.md, "Forty-sixth round"); the chunks keep a
# forward's memory to 32 images' worth, and the speed where the heap cannot be held (the user's
# own malloc settings, not glibc).
CPU_CHUNK = 32


def chunk_count(n: int, most: Optional[int]) -> int:
    """How many near-equal chunks of at most ``most`` items ``n`` items split into (``most``
    None, or ``n`` or more: one). Near-equal: sizes differ by one at most (16 by at most 3:
    3,3,3,3,2,2), so no lone image after full chunks (3,3,3,3,3,1), whose products take another
    path. Evaluation's chunks here and train.micro_batch's (engine/loop.py)."""
    return 1 if most is None or n <= int(most) else -(-n // int(most))


def forward_in_chunks(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, on the CPU over near-equal chunks of at most CPU_CHUNK images."""
    chunks = chunk_count(x.shape[0], CPU_CHUNK) if x.device.type == "cpu" else 1
    if chunks == 1:
        return model(x)
    return torch.cat([model(c) for c in x.tensor_split(chunks)])


@torch.no_grad()
def evaluate(model: nn.Module, dataset, transform, batch_size: int, device, dist_info: DistInfo,
             autocast: Optional[Callable] = None, num_workers: int = 0,
             per_class: Optional[int] = None, predictions: Optional[list] = None) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of ``model`` on ``dataset``,
    summed over ranks (each rank evaluates a disjoint shard). Counts stay on the device
    until the end (one host synchronisation per evaluation). ``per_class``, the number of
    classes: also each class's images and top-1 hits, by true class index (``class_n``,
    ``class_correct1``). ``predictions``, a list: each image's (dataset index, label, top-1
    class or None where its logits are not finite, that class's probability) appended, in the
    order the images were read (one host synchronisation per batch, only then)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    cuda = device.type == "cuda"
    loader = Loader(
        SeededDataset(dataset, transform), batch_size=batch_size, pin_memory=cuda,
        sampler=ShardSampler(len(dataset), dist_info.rank, dist_info.world_size), num_workers=num_workers)
    acc = torch.zeros(5, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, n, non-finite
    if per_class:   # images, top-1 hits
        by_class = torch.zeros(2, per_class, dtype=torch.float64, device=device)
    order = iter(loader.sampler)   # (the dataset index of each image, as the loader reads them)
    with runtime.held_heap(device.type == "cpu"):   # (the loader's batches too: 87 MB at 144 images)
        for x, y in loader:
            x, y = x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda)
            with (autocast() if autocast else contextlib.nullcontext()):
                logits = forward_in_chunks(model, x)
            logits = logits.float()
            top = top_classes(logits, top_k(logits.shape[1]))[1]
            # an image whose logits are not all finite has no prediction (topk's order among NaNs
            # is arbitrary): counted wrong, and counted, so that eval and the run's log say so
            finite = torch.isfinite(logits).all(dim=1)
            acc += torch.stack([((top[:, 0] == y) & finite).sum().double(),
                                ((top == y[:, None]).any(dim=1) & finite).sum().double(),
                                F.cross_entropy(logits, y, reduction="sum").double(),
                                torch.tensor(float(y.numel()), dtype=torch.float64, device=device),
                                (~finite).sum().double()])
            if predictions is not None:
                prob = logits.softmax(dim=1).gather(1, top[:, :1])[:, 0]
                for label, pred, p, ok in zip(y.tolist(), top[:, 0].tolist(), prob.tolist(), finite.tolist()):
                    predictions.append((next(order), label, pred if ok else None, p if ok else None))
            if per_class:
                by_class[0].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
                by_class[1].index_add_(0, y, ((top[:, 0] == y) & finite).double())
    sums = all_reduce_sum(acc.tolist() + (by_class.flatten().tolist() if per_class else []), dist_info,
                          device=comm_device(device, dist_info))
    correct1, correct5, loss_sum, n, nonfinite = sums[:5]
    model.train(was_training)
    if n == 0:
        r = {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "n": 0, "nonfinite": 0}
    else:
        r = {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": int(n),
             "nonfinite": int(nonfinite)}
    if per_class:
        r["class_n"] = [int(v) for v in sums[5:5 + per_class]]
        r["class_correct1"] = [int(v) for v in sums[5 + per_class:]]
    return r


def top_k(num_classes: int) -> int:
    """The k of the second accuracy, reported under the key ``top5``: 5, or 2 for tasks of fewer
    than 5 classes, as the official evaluator falls back (top-5 of 4 classes would always be 100%)."""
    return 5 if num_classes >= 5 else min(2, num_classes)


def wilson_interval(hits: int, n: int, z: float = 1.959963984540054) -> tuple:
    """The Wilson score interval (%, 95% by default) of an accuracy of ``hits`` in ``n``: what
    the test set's size alone leaves uncertain about the accuracy (not the spread over seeds).
    Unlike the normal approximation it stays inside [0, 100] and is not empty at 0 or n hits;
    (nan, nan) for n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = hits / n
    scale = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    # (at 0 and n hits a bound is exactly 0 or 1, the root the rounding of centre -/+ half misses)
    lo = 0.0 if hits == 0 else 100.0 * max(0.0, centre - half)
    return lo, 100.0 if hits == n else 100.0 * min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided p-value of McNemar's exact test on paired predictions: ``only_a`` images one
    model gets right and the other wrong, ``only_b`` the reverse (the images both get right, or
    both wrong, say nothing about which is better). Under 'equally good' each discordant image
    is a fair coin: p = min(1, 2 P(Binomial(b + c, 1/2) <= min(b, c))); 1.0 when none is
    discordant. The tail is summed in logarithms (exact integers took 30 s at 600,000 discordant
    images): against exact fractions the relative error is 1e-13 at 230 discordant images, 1e-11 at
    10,000 and 8e-11 at 59,000 (lgamma's rounding at large n); a p below float's range (under
    1e-308: 1,100 discordant images all one way) is 0.0."""
    n, k = int(only_a) + int(only_b), min(int(only_a), int(only_b))
    if n == 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, 2 * math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def paired_difference_interval(both: int, only_first: int, only_other: int, neither: int,
                               z: float = 1.959963984540054) -> tuple:
    """The 95% interval (percentage points, by default) of the difference in accuracy, the other
    model's minus the first's, of two models scored on the same images: Newcombe's hybrid score
    interval for paired proportions (Statistics in Medicine 17:2635, 1998, method 10), made of the two
    accuracies' Wilson intervals and the correlation (phi) of the two models' hits, which pairing
    brings (the images both get right or wrong narrow it), phi's numerator corrected as Newcombe
    does (below). Altman et al.'s worked example (Statistics with Confidence, 2nd ed., table 6.2:
    14 both, 5 only the first, 22 neither) gives -22.65 to -1.15 points. (nan, nan) without images."""
    n = both + only_first + only_other + neither
    if n <= 0:
        return float("nan"), float("nan")
    p1, p2 = (both + only_first) / n, (both + only_other) / n
    l1, u1 = (v / 100 for v in wilson_interval(both + only_first, n, z))
    l2, u2 = (v / 100 for v in wilson_interval(both + only_other, n, z))
    margins = (both + only_first) * (only_other + neither) * (both + only_other) * (only_first + neither)
    # Newcombe's correction of phi's numerator (as his method 10 and the reference implementations,
    # R's contingencytables, define it): a positive AD - BC lowered by N/2, to 0 at most. Without it two
    # models that agree on every image got an interval of zero width (+0.00 to +0.00 on 2 images), and
    # strongly agreeing pairs covered 86% (retest 93)
    cross = both * neither - only_first * only_other
    if cross > 0:
        cross = max(cross - n / 2, 0.0)
    phi = cross / math.sqrt(margins) if margins else 0.0
    d = p2 - p1
    below = math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    above = math.sqrt(max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2))
    return 100.0 * max(-1.0, d - below), 100.0 * min(1.0, d + above)
