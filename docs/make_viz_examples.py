"""Regenerate the example pictures of docs/visualize.md (docs/img/viz_*.png).

    .venv/bin/python docs/make_viz_examples.py              # runs the demo first if needed
    .venv/bin/python docs/make_viz_examples.py --demo-dir runs/demo   # reuse a finished `svp demo`

The models are exactly those of ``svp demo``: the bundled pre-trained mini Vim
(``vim_mini_patch4_32``, frozen) and the SVP and VPT-deep adapters the demo trains on
scikit-learn digits (``<demo-dir>/svp/last``, ``<demo-dir>/vpt_deep/last``). When
``--demo-dir`` holds no finished demo, the demo is run into it (``svp demo --methods
vpt_deep,svp --epochs 3 --batch-size 64 --lr 3e-3 --no-figure``: the budget the pictures of
docs/visualize.md were made with, which was the demo's default then).

The pictures are drawn by ``svp.viz.cli.visualize`` (the code behind ``svp
visualize``) for a few digits test images; the object mask is the digit's ink (grey
level > 127 in the original image). The same figures come from the command line:

    svp visualize --dataset digits --index 0 --pretrained \\
        --adapter SVP=runs/demo/svp/last --adapter VPT-deep=runs/demo/vpt_deep/last \\
        --mask digit0_mask.png --out docs/img --prefix viz_digits0 --dpi 60

The test accuracies (from the demo's summary) and the curve numbers behind
``viz_*_curves.png`` are written to docs/img/viz_examples.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKBONE = "vim_mini_patch4_32"
ADAPTERS = {"SVP": "svp", "VPT-deep": "vpt_deep"}  # label -> demo method
BUDGET = dict(epochs=3, batch_size=64, lr=3e-3, seed=0)  # docs/visualize.md's pictures
# the figures docs/visualize.md shows (suffixes after viz_digits<i>_)
KEEP = ("SVP_maps", "compare_update", "diff_update", "diff_forget", "diff_propagation", "curves")


def compress_png(path: str) -> None:
    """Rewrite a PNG with an adaptive 256-colour palette (about 3x smaller), atomically."""
    from PIL import Image
    with Image.open(path) as im:
        q = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    tmp = path + ".tmp.png"
    q.save(tmp, optimize=True)
    os.replace(tmp, path)


def demo_runs(demo_dir: str):
    """{method: run_dir} of a finished demo in ``demo_dir`` (None if incomplete)."""
    path = os.path.join(demo_dir, "demo_results.json")
    if not os.path.isfile(path):
        return None, None
    with open(path) as f:
        summary = json.load(f)
    runs = {r["method"]: r["run_dir"] for r in summary.get("rows", []) if r.get("run_dir")}
    if not all(m in runs and os.path.isdir(os.path.join(runs[m], "last")) for m in ADAPTERS.values()):
        return None, None
    return runs, summary


def test_set_means(models, ds, n: int) -> dict:
    """Per model and layer, the object / background means of update and forget over the
    first ``n`` test images (each image's object = its ink patches, as for the figures),
    averaged over images: whether what one picture shows holds beyond it."""
    import torch
    from svp.viz import analyze
    from svp.viz.cli import find_vim, mask_to_grid, model_input_size, model_mean_std, prepare_image
    vim = find_vim(next(iter(models.values())))
    size, (mean, std) = model_input_size(vim), model_mean_std(vim)
    xs, masks = [], []
    for i in range(min(n, len(ds))):
        img, _ = ds[i]
        x, _ = prepare_image(img, size, mean, std)
        xs.append(x)
        masks.append(torch.from_numpy(mask_to_grid((np.asarray(img.convert("L")) > 127).astype(np.float32),
                                                   size, vim)[1]).bool())
    x, masks = torch.cat(xs), torch.stack(masks)  # (n, 3, H, W), (n, gh, gw)
    out = {"images": len(xs)}
    for label, model in models.items():
        g = analyze(model, x)
        out[label] = {}
        for q in ("update", "forget"):
            v = g.grid[q][:, :, 2]  # (n, depth, gh, gw)
            m = masks[:, None].expand_as(v).float()
            obj = ((v * m).sum((-1, -2)) / m.sum((-1, -2))).mean(0)
            bg = ((v * (1 - m)).sum((-1, -2)) / (1 - m).sum((-1, -2))).mean(0)
            out[label][q] = {"object": [round(float(a), 5) for a in obj],
                             "background": [round(float(a), 5) for a in bg]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-dir", default=os.path.join(ROOT, "runs", "viz_demo"))
    ap.add_argument("--out", default=os.path.join(HERE, "img"))
    ap.add_argument("--indices", default="0", help="digits test images to render")
    ap.add_argument("--all-figures", action="store_true",
                    help=f"keep every figure (default: only {', '.join(KEEP)}, palette-compressed)")
    ap.add_argument("--dpi", type=int, default=60)
    ap.add_argument("--stats", type=int, default=200,
                    help="also average object/background gate means over this many test images (0: skip)")
    args = ap.parse_args(argv)

    import timm
    import svp  # noqa: F401
    from svp.data import build_dataset
    from svp.peft import load_adapter
    from svp.viz.figures import visualize, write_json

    runs, summary = demo_runs(args.demo_dir)
    if runs is None:
        from svp.demo import run_demo
        print(f"no finished demo in {args.demo_dir}: running it (vpt_deep, svp)", flush=True)
        run_demo(args.demo_dir, methods=tuple(ADAPTERS.values()), figure=False, progress="none", **BUDGET)
        runs, summary = demo_runs(args.demo_dir)
        if runs is None:
            print(f"the demo in {args.demo_dir} did not produce both adapters", file=sys.stderr)
            return 1

    def backbone():
        return timm.create_model(BACKBONE, pretrained=True, num_classes=10).eval()

    models = {"frozen": backbone()}
    for label, method in ADAPTERS.items():
        models[label] = load_adapter(backbone(), os.path.join(runs[method], "last")).eval()

    ds = build_dataset("digits", "test")
    acc = {r["method"]: r.get("test_top1") for r in summary["rows"]}
    import hashlib
    from svp.models.vim_mini import mini_asset_path
    with open(mini_asset_path(), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    info = {"backbone": f"{BACKBONE} (bundled, pretrained)", "backbone_file_sha256": sha,
            "adapters": {label: os.path.relpath(os.path.join(runs[m], "last"), ROOT) for label, m in ADAPTERS.items()},
            "demo": {k: summary.get(k) for k in ("dataset", "epochs", "batch_size", "lr", "seed")},
            "digits_test_top1": {label: acc.get(m) for label, m in ADAPTERS.items()},
            "images": {}}
    for i in [int(v) for v in args.indices.split(",")]:
        img, label = ds[i]
        mask = (np.asarray(img.convert("L")) > 127).astype(np.float32)  # the digit's ink
        prefix = f"viz_digits{i}"
        written = visualize(img, models, args.out, prefix, layers=None,
                            quantities=["update", "forget", "propagation"], mask=mask, dpi=args.dpi)
        cpath = os.path.join(args.out, f"{prefix}_curves.json")
        with open(cpath) as f:
            curves = json.load(f)
        os.remove(cpath)
        info["images"][str(i)] = {"label": int(label), **curves}
        for p in written:
            if not p.endswith(".png"):
                continue
            kind = os.path.basename(p)[len(prefix) + 1:-len(".png")]
            if args.all_figures or kind in KEEP:
                compress_png(p)
                print(p)
            else:
                os.remove(p)
    if args.stats:
        info["test_set_means"] = test_set_means(models, ds, args.stats)
    write_json(os.path.join(args.out, "viz_examples.json"), info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
