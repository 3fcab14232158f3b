#!/usr/bin/env python3
"""advex PGD vs torchattacks PGD: same model, batch, eps, steps, step size and device, one run.

Reports images/second of each and their ratio, and how well their robust accuracies agree
(the same question asked of two implementations of the same attack). advex is measured twice:
running every step (like torchattacks) and with per-example early stopping (what Evaluate does,
which changes no robust-accuracy number, only the work).

Equal work on both sides: the clean predictions, which both verdicts need, are computed once
outside the timing and given to advex (as Evaluate does); torchattacks returns only the last
iterate, so its verdict costs one forward pass on it, timed apart: ratios are given against
torchattacks with that pass ("attack + verdict", the same product as advex's: examples and their
predictions) and without it ("attack only"). Timing: every contender runs once untimed (warm-up),
then `--repeats` rounds each run every contender once, in an order that rotates per round; a ratio
is taken per round (paired, so slow spells of a shared machine hit both sides) and reported as
the median with its min-max over rounds.

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
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from advex.engine import zoo
from advex.engine.attacks import AttackConfig, attack
from advex.engine.data import load_builtin
from advex.engine.models import ModelInfo, ModelWrapper
from advex.engine.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent


# A contender: runs once, returns its output and the seconds of its named phases (if any).
Run = Callable[[], tuple[object, dict[str, float]]]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(runs: dict[str, Run], device: torch.device, repeats: int
                ) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]], dict[str, object]]:
    """Each contender once untimed, then `repeats` rounds of every contender, the order rotated
    by one per round. Returns per contender: wall seconds per round, its phases' seconds per
    round, and its last output."""
    outs = {name: run()[0] for name, run in runs.items()}  # warm-up: allocator, oneDNN primitives, lazy init
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    phases: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            outs[name], marks = runs[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            for phase, seconds in marks.items():
                phases[name].setdefault(phase, []).append(seconds)
    return times, phases, outs


def spread(ratios: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--data-root", action="append", default=None)
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after one untimed)")
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
    with torch.no_grad():  # both sides' verdicts need them; neither side is timed on them
        clean_pred = model(x).argmax(1)

    eps_of = {"Linf": 8 / 255, "L2": 0.5}
    rows = []
    for norm, eps in eps_of.items():
        step = 2.5 * eps / args.steps
        cfg = AttackConfig(norm=norm, eps=eps, steps=args.steps, step_size=step, random_start=True, seed=0)
        peer_cls = torchattacks.PGD if norm == "Linf" else torchattacks.PGDL2
        peer = peer_cls(model, eps=eps, alpha=step, steps=args.steps, random_start=True)

        def run_peer() -> tuple[object, dict[str, float]]:
            t0 = time.perf_counter()
            x_peer = peer(x, y)
            sync(device)
            t1 = time.perf_counter()
            with torch.no_grad():  # its verdict: advex's output has it, torchattacks' has not
                pred = model(x_peer).argmax(1)
            sync(device)
            return (x_peer, pred), {"attack": t1 - t0}

        runs: dict[str, Run] = {
            "torchattacks": run_peer,
            "advex": lambda: (attack(model, x, y, cfg, clean_pred=clean_pred), {}),
            "advex_early_stop": lambda: (attack(model, x, y, cfg, early_stop=True, clean_pred=clean_pred), {}),
        }
        times, phases, outs = interleaved(runs, device, args.repeats)
        (x_peer, peer_pred), out_full, out_early = outs["torchattacks"], outs["advex"], outs["advex_early_stop"]
        t_peer, t_attack = times["torchattacks"], phases["torchattacks"]["attack"]
        clean = clean_pred == y
        peer_robust = clean & (peer_pred == y)
        ours_robust = clean & ~out_full.success
        ours_early_robust = clean & ~out_early.success
        n = len(y)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        rows.append({
            "norm": norm, "eps": eps, "steps": args.steps, "step_size": step, "batch": n,
            "torchattacks_img_s": n / med["torchattacks"], "torchattacks_attack_only_img_s": n / statistics.median(t_attack),
            "advex_img_s": n / med["advex"], "advex_early_stop_img_s": n / med["advex_early_stop"],
            # per round: torchattacks' seconds over advex's (> 1: advex faster)
            "ratio_advex_vs_torchattacks": spread([p / a for p, a in zip(t_peer, times["advex"])]),
            "ratio_advex_vs_torchattacks_attack_only": spread([p / a for p, a in zip(t_attack, times["advex"])]),
            "ratio_early_stop_vs_torchattacks": spread([p / a for p, a in zip(t_peer, times["advex_early_stop"])]),
            "ratio_early_stop_vs_torchattacks_attack_only":
                spread([p / a for p, a in zip(t_attack, times["advex_early_stop"])]),
            "seconds": {"torchattacks": t_peer, "torchattacks_attack_only": t_attack, "advex": times["advex"],
                        "advex_early_stop": times["advex_early_stop"]},
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
        "repeats": args.repeats,
        "timing": "wall clock; one untimed run each, then interleaved rounds (order rotating); img/s from the "
                  "median round; ratios per round (torchattacks s / advex s), median [min-max]; clean predictions "
                  "given to advex, torchattacks timed with the forward pass for its verdict (and without: attack only)",
    }
    tag = args.tag or f"pgd_vs_torchattacks_{args.dataset}_{args.arch}_{device.type}"
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    def ratio(s: dict[str, float]) -> str:
        return f"{s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}]"

    lines = [f"# advex PGD vs torchattacks PGD — {meta['device']}", "",
             *(f"- {k}: `{v}`" for k, v in meta.items()), "",
             "Ratios: advex's speed over torchattacks', median [min-max] over rounds; \"+ verdict\": torchattacks "
             "timed with the forward pass that gives its predictions (advex's output has them), \"attack only\": without.",
             "",
             "| norm | eps | steps | batch | torchattacks img/s (attack only) | advex img/s | ratio, + verdict "
             "| ratio, attack only | advex early-stop img/s | ratio, + verdict | ratio, attack only "
             "| robust acc torchattacks | robust acc advex | verdict agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['norm']} | {r['eps']:.4g} | {r['steps']} | {r['batch']} | {r['torchattacks_img_s']:.1f} "
                     f"({r['torchattacks_attack_only_img_s']:.1f}) | {r['advex_img_s']:.1f} | "
                     f"{ratio(r['ratio_advex_vs_torchattacks'])} | {ratio(r['ratio_advex_vs_torchattacks_attack_only'])} | "
                     f"{r['advex_early_stop_img_s']:.1f} | {ratio(r['ratio_early_stop_vs_torchattacks'])} | "
                     f"{ratio(r['ratio_early_stop_vs_torchattacks_attack_only'])} | "
                     f"{r['robust_acc_torchattacks']:.3f} | {r['robust_acc_advex']:.3f} | {r['verdict_agreement']:.3f} |")
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
