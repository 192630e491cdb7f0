"""Cost of the divergence guard (engine/divergence.py) per training step, as a ratio to the
same step without it, measured in the same run.

    .venv/bin/python benchmarks/divergence_guard.py [--model vim_mini_patch4_32] [--batch 32]
        [--methods svp full] [--steps 20] [--reps 5] [--device cpu]

A step is forward + backward + AdamW step of the method on the model (random images). The
guarded step adds what the training loop adds: the gradient check, the snapshot of the
trainable weights and optimizer state, and the check of the weights and optimizer state
after the step. Times: median over --reps of --steps steps, the two variants interleaved;
process CPU time on CPU (run with OMP_NUM_THREADS=1 on a shared machine), wall time on CUDA.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vim_mini_patch4_32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=["svp", "full"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import svp.peft as peft   # (before torch: the short spin of its OpenMP threads, svp.runtime)
    import torch
    from svp.build import ModelSpec, build_model
    from svp.engine.divergence import DivergenceGuard

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("divergence_guard: no CUDA GPU here (--device cpu measures on the CPU)", file=sys.stderr)
        raise SystemExit(2)
    settings = {"svp": {"shared_layers": 4, "hidden": 16}}
    for method in args.methods:
        backbone = build_model(ModelSpec(model=args.model, num_classes=10))
        model = peft.get_peft_model(backbone, peft.make_config(method, num_classes=10,
                                                               **settings.get(method, {}))).to(dev).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        guard = DivergenceGuard(model, opt)
        size = int(model.base_model.patch_embed.img_size[0])
        x = torch.randn(args.batch, 3, size, size, device=dev)
        y = torch.randint(0, 10, (args.batch,), device=dev)

        def step(guarded: bool) -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if guarded:
                assert not guard.bad_gradients()
                guard.snapshot()
            opt.step()
            if guarded:
                assert not guard.bad_state()

        def timed(guarded: bool) -> float:
            # CPU time of this process on CPU (robust to other load on a shared machine), wall on CUDA
            clock = time.perf_counter if dev.type == "cuda" else time.process_time
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            for _ in range(args.steps):
                step(guarded)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return (clock() - t0) / args.steps

        step(True)  # warm-up (creates the optimizer state and the snapshot buffers)
        plain, guarded = [], []
        for _ in range(args.reps):
            plain.append(timed(False))
            guarded.append(timed(True))
        p, g = statistics.median(plain), statistics.median(guarded)
        n = sum(q.numel() for q in model.parameters() if q.requires_grad)
        print(f"{args.model} {method:5s} trainable {n:>9,}  batch {args.batch}  {args.device}: "
              f"step {1000 * p:8.2f} ms, guarded {1000 * g:8.2f} ms, ratio {g / p:.3f}")


if __name__ == "__main__":
    main()
