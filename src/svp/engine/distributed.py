"""Process-group setup for ``torchrun`` and the data sampler shared by 1..N processes.

``torchrun --nproc_per_node=N -m svp train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK;
we then initialise the default process group (NCCL on CUDA, gloo on CPU), wrap the
model in DistributedDataParallel, shard the data with :class:`EpochSampler`, reduce
metrics with :func:`all_reduce_sum` and let only rank 0 write files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List

import torch
import torch.distributed as dist

from .. import runtime


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    world, rank, local_rank, _ = runtime.launch()
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, enabled=True)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: List[float], info: DistInfo, device=None) -> List[float]:
    """Sum a list of numbers over ranks (float64 on the communication device)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main_rank(fn, info: DistInfo, shared=lambda result: result):
    """``fn()`` on the main rank only (claiming or locking the run folder); ``shared(result)``
    reaches the other ranks, which return it. A failure there reaches them as a PeerError: they
    would otherwise wait in the broadcast and fail with a connection error, or check on their
    own and say something else."""
    if not info.enabled:
        return fn()
    from ..errors import PeerError, SVPError
    result, refused = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as e:
            code = e.exit_code if isinstance(e, SVPError) else 1
            broadcast_object((None, (f"{type(e).__name__}: {e}", code)), info)
            raise
    value, refused = broadcast_object((shared(result) if info.is_main else None, None), info)
    if refused is not None:
        raise PeerError(f"the main rank (0) stopped: {refused[0]}", refused[1])
    return result if info.is_main else value


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps); stable across runs and platforms."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x & 0x7FFFFFFFFFFFFFFF


def derive_seed(*parts: int) -> int:
    return _mix(*parts)


class EpochSampler(torch.utils.data.Sampler):
    """Distributed sampler whose order is a pure function of (seed, epoch).

    Each epoch draws one permutation of the dataset from ``(seed, epoch)``; global
    batch ``b`` is positions ``[b*G, (b+1)*G)`` of it (G = batch x world size, the
    incomplete last batch dropped when ``drop_last``) and rank ``r`` takes
    the ``r``-th slice of ``batch`` items. So a run on N processes with batch B sees
    the same global batches as one process with batch N*B. Every yielded item is
    ``(index, sample_seed)``: :class:`SeededDataset` uses the seed for the random
    augmentation of that sample, which makes augmentation independent of worker
    count, world size and interruptions. ``start_batch`` skips batches already done
    in the epoch (mid-epoch resume).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.drop_last = rank, world_size, shuffle, drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self) -> int:
        g = self.global_batch
        return self.n // g if self.drop_last else -(-self.n // g)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 1))
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator:
        perm = self.order().tolist()
        g = self.global_batch
        for b in range(self.start_batch, self.batches_per_epoch()):
            chunk = perm[b * g:(b + 1) * g]
            mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            for idx in mine:
                yield (idx, derive_seed(self.seed, self.epoch, idx, 2))

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch) * self.batch_size


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation sampler: rank r takes indices r, r+N, ... (no padding, no duplicates;
    metrics are summed over ranks)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.idx = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)


class Loader(torch.utils.data.DataLoader):
    """The DataLoader of every loader svp makes: its workers let a first SIGINT/SIGTERM pass, as
    the run does, forked or spawned, also while they start (engine.signals:
    ``loader_worker_init``, ``starting_workers``)."""

    def __init__(self, *args, **kwargs):
        from .signals import loader_worker_init
        if kwargs.get("num_workers") and kwargs.get("multiprocessing_context") is None:
            kwargs["multiprocessing_context"] = _worker_context()
        super().__init__(*args, worker_init_fn=loader_worker_init, **kwargs)

    def __iter__(self):
        if not self.num_workers:
            return super().__iter__()
        import multiprocessing

        from .signals import starting_workers
        before = {p.pid for p in multiprocessing.active_children()}
        try:
            with starting_workers():
                return super().__iter__()
        except (OSError, RuntimeError) as e:
            # a worker that could not start (too many open files or processes: os.pipe, fork):
            # the ones that did waited for work, and ignored the SIGTERM that multiprocessing
            # ends them with at exit (a first signal is the run's to handle): the process hung
            for p in multiprocessing.active_children():
                if p.pid not in before:
                    p.kill()
                    p.join(10)
            _half_made_iterator_shut(e)
            if isinstance(e, OSError) or "can't start new thread" in str(e):
                from ..errors import ConfigError
                raise ConfigError(f"cannot start {self.num_workers} DataLoader worker processes "
                                  f"({getattr(e, 'strerror', None) or e}): a limit on open files or processes "
                                  f"(ulimit -n, ulimit -u)? Use fewer workers (data.num_workers, 0 reads in this "
                                  f"process) or raise the limit") from None
            raise


def _worker_context():
    """Where the start method is forkserver (Linux's default from Python 3.14), svp's workers are
    spawned: a forkserver svp started (while its workers start, with SIGINT/SIGTERM blocked:
    engine.signals) kept them blocked for the program's life, and every later child of the program
    forked from it could not be stopped; one started before svp forks workers that run their start
    unprotected, and a Ctrl-C then killed one, and the run ended as "cannot start ... (Broken
    pipe)" (review44). A forkserver's child imports torch as a spawned one does: no slower."""
    import multiprocessing
    # (not get_start_method(): asking fixes the program's start method, and its own
    # set_start_method failed after an svp Loader was built: review46. The first of
    # get_all_start_methods() is the default, as documented)
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return "spawn" if method == "forkserver" else None


def _half_made_iterator_shut(e: BaseException) -> None:
    """The iterator whose __init__ failed is freed with the exception, and its __del__ printed
    "Exception ignored ... no attribute '_workers_status'" (torch shuts down what it never made):
    its workers are ended above, so it is marked as shut down (its own flag, set early in its
    __init__)."""
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter
    tb = e.__traceback__
    while tb is not None:
        it = tb.tb_frame.f_locals.get("self")
        if isinstance(it, _MultiProcessingDataLoaderIter) and hasattr(it, "_shutdown"):
            it._shutdown = True
        tb = tb.tb_next


class SeededDataset(torch.utils.data.Dataset):
    """Applies ``transform`` to ``base[index]`` with every RNG (python, numpy, torch)
    seeded from the sampler's per-sample seed; the caller's RNG states are restored. A
    transform that draws no random numbers (svp.data.cache.is_fixed: the vtab recipe, every
    evaluation) runs without it: the same tensors, 0.35 ms an item less."""

    def __init__(self, base, transform):
        from ..data.cache import is_fixed
        self.base, self.transform = base, transform
        self.seeded = not is_fixed(transform)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        import random

        import numpy as np

        from .seeds import seed_everything
        idx, seed = item if isinstance(item, tuple) else (item, None)
        img, label = self.base[idx]
        if self.transform is None:
            return img, label
        if hasattr(img, "size") and not isinstance(img, torch.Tensor):
            # an elongated image the resize would blow up (svp eval, training's evaluations): one line
            # naming it, not gigabytes and an out-of-memory advice about batch sizes (review)
            from ..data.transforms import check_resized_size
            ds = getattr(self.base, "ds", self.base)
            check_resized_size(self.transform, *img.size,
                               ds.describe(idx) if hasattr(ds, "describe") else f"item {idx}")
        if seed is None or not self.seeded:
            return self.transform(img), label
        py, npst, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            seed_everything(seed)
            out = self.transform(img)
        finally:
            random.setstate(py)
            np.random.set_state(npst)
            torch.set_rng_state(th)
        return out, label


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def comm_device(device, info: DistInfo):
    """Where all_reduce_sum's tensor lives: the device under NCCL, the CPU under gloo."""
    if not info.enabled:
        return None
    import torch.distributed as dist
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def maybe_device(kind: str, info: DistInfo) -> torch.device:
    if kind.startswith("cuda"):
        if info.enabled:
            return torch.device("cuda", info.local_rank)
        return torch.device(kind)
    return torch.device("cpu")


def arithmetic(model) -> Dict[str, Any]:
    """What the last bits of a step depend on beyond the configuration: on the CPU, torch's thread
    count (its products split their sums by it; svp's own kernels give the same bits at any
    count), and the scan backend of the model's device (``SVP_SCAN_BACKEND`` may choose another)."""
    from .. import ops
    first = next(unwrap(model).parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    try:
        backend = ops.get_backend(device)
    except Exception:   # noqa: BLE001  (a record: never what stops a resume point being written)
        backend = None
    return {"threads": torch.get_num_threads() if device.type == "cpu" else None, "scan_backend": backend,
            "device": device.type}


def arithmetic_words(a: dict) -> str:
    threads, device = a.get("threads"), a.get("device")
    # (an older record has no device: not the CPU where it has no thread count)
    where = (f"{threads} CPU thread(s)" if threads is not None else
             "a GPU" if device in (None, "cuda") else f"the {device} device")
    return f"{where} with scan backend {a.get('scan_backend') or '(not recorded)'}"


__all__ = ["DistInfo", "init_distributed", "shutdown", "all_reduce_sum", "broadcast_object", "barrier",
           "EpochSampler", "ShardSampler", "SeededDataset", "derive_seed", "unwrap", "maybe_device",
           "comm_device", "arithmetic", "arithmetic_words"]
