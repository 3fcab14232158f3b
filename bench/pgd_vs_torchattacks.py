#!/usr/bin/env python3
"""advex PGD vs torchattacks PGD: same model, batch, eps, steps, step size and device, one run.

Reports images/second of each and their ratio, and how well their robust accuracies agree
(the same question asked of two implementations of the same attack). advex is measured twice:
running every step (like torchattacks) and with per-example early stopping (what Evaluate does,
which changes no robust-accuracy number, only the work).

    python bench/pgd_vs_torchattacks.py                          # Fashion-MNIST small CNN, CPU
    python bench/pgd_vs_torchattacks.py --dataset cifar10 --arch resnet18 --device cuda

Needs torchattacks (pip install --no-deps torchattacks scipy). Writes bench/results/<tag>.json
and .md with device, versions and command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from advex.engine import zoo
from advex.engine.attacks import AttackConfig, attack
from advex.engine.data import load_builtin
from advex.engine.models import ModelInfo, ModelWrapper
from advex.engine.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent


def timed(fn, device: torch.device, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--data-root", action="append", default=None)
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    import torchattacks

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    roots = args.data_root or [r for r in os.environ.get("ADVEX_DATA_ROOT", "").split(os.pathsep) if r] \
        + ["/usr/share/datasets", str(ROOT.parent.parent / "shared" / "data")]
    train_set = load_builtin(args.dataset, "train", roots).subset(args.train_limit)
    test_set = load_builtin(args.dataset, "test", roots).subset(args.batch)
    shape, classes = tuple(train_set.example_shape), train_set.num_classes
    torch.manual_seed(0)
    model = ModelWrapper(zoo.build(args.arch, shape, classes), ModelInfo(args.arch, shape, classes))
    t0 = time.perf_counter()
    train(model, train_set, TrainConfig(epochs=args.epochs, batch_size=128, lr=0.05, schedule="cosine"), device)
    train_s = time.perf_counter() - t0
    model.eval()
    x, y = next(test_set.batches(args.batch, device))

    eps_of = {"Linf": 8 / 255, "L2": 0.5}
    rows = []
    for norm, eps in eps_of.items():
        step = 2.5 * eps / args.steps
        cfg = AttackConfig(norm=norm, eps=eps, steps=args.steps, step_size=step, random_start=True, seed=0)
        peer_cls = torchattacks.PGD if norm == "Linf" else torchattacks.PGDL2
        peer = peer_cls(model, eps=eps, alpha=step, steps=args.steps, random_start=True)
        t_peer, x_peer = timed(lambda: peer(x, y), device, args.repeats)
        t_full, out_full = timed(lambda: attack(model, x, y, cfg), device, args.repeats)
        t_early, out_early = timed(lambda: attack(model, x, y, cfg, early_stop=True), device, args.repeats)
        with torch.no_grad():
            clean = model(x).argmax(1) == y
            peer_robust = clean & (model(x_peer).argmax(1) == y)
        ours_robust = clean & ~out_full.success
        ours_early_robust = clean & ~out_early.success
        n = len(y)
        rows.append({
            "norm": norm, "eps": eps, "steps": args.steps, "step_size": step, "batch": n,
            "torchattacks_img_s": n / t_peer, "advex_img_s": n / t_full, "advex_early_stop_img_s": n / t_early,
            "ratio_advex_vs_torchattacks": t_peer / t_full, "ratio_early_stop_vs_torchattacks": t_peer / t_early,
            "clean_accuracy": float(clean.float().mean()),
            "robust_acc_torchattacks": float(peer_robust.float().mean()),
            "robust_acc_advex": float(ours_robust.float().mean()),
            "robust_acc_advex_early_stop": float(ours_early_robust.float().mean()),
            "verdict_agreement": float((peer_robust == ours_robust).float().mean()),
        })

    meta = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "torchattacks": getattr(torchattacks, "__version__", "?"),
        "dataset": args.dataset, "arch": args.arch, "train_images": len(train_set), "train_seconds": train_s,
        "repeats": args.repeats, "timing": "best of repeats, wall clock",
    }
    tag = args.tag or f"pgd_vs_torchattacks_{args.dataset}_{args.arch}_{device.type}"
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# advex PGD vs torchattacks PGD — {meta['device']}", "",
             *(f"- {k}: `{v}`" for k, v in meta.items()), "",
             "| norm | eps | steps | batch | torchattacks img/s | advex img/s | ratio | advex early-stop img/s | ratio "
             "| robust acc torchattacks | robust acc advex | verdict agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['norm']} | {r['eps']:.4g} | {r['steps']} | {r['batch']} | {r['torchattacks_img_s']:.1f} | "
                     f"{r['advex_img_s']:.1f} | {r['ratio_advex_vs_torchattacks']:.2f}x | "
                     f"{r['advex_early_stop_img_s']:.1f} | {r['ratio_early_stop_vs_torchattacks']:.2f}x | "
                     f"{r['robust_acc_torchattacks']:.3f} | {r['robust_acc_advex']:.3f} | {r['verdict_agreement']:.3f} |")
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
