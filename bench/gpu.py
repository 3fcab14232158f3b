#!/usr/bin/env python3
"""The GPU engine's figures in one run: advex against torchattacks, and the paper's heavy steps.

1. PGD, advex vs torchattacks (its defaults: fp32, the model as given) on ResNet-18 and ResNet-50
   (CIFAR stem) at batch 512, L2 and Linf, every step: images/s, their ratio, and the model FLOP
   utilisation (MFU) of each: FLOPs of one forward+backward (torch.utils.flop_counter) times the
   passes, over the time, over the GPU's dense bf16 peak. advex runs as the server runs models:
   frozen (batch norm folded, no parameter gradients) with --precision auto (bf16 on a GPU that
   has it).
2. The AutoAttack suite (autoattack-fast cascade: APGD-CE then APGD-T) against torchattacks'
   MultiAttack of the same attacks, on the same points: robust accuracy and time.
3. D_R: representation inversion of 4,096 images x 100 steps through ResNet-50.
4. One training epoch of ResNet-18 (standard) on the whole training set.

Every model is trained for --epochs (default 1) first, so that verdicts mean something. --small runs
it all on the CPU at toy sizes (a small CNN, a few hundred images), to check that it works.

    bash bench/gpu.sh                          # on a GPU machine, CIFAR-10 under $ADVEX_DATA_ROOT
    python bench/gpu.py --small --data-root ../shared/data

Writes bench/results/gpu_<device>.json and .md (device, versions, command, every figure).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from advex.engine import zoo
from advex.engine.attacks import AttackConfig, attack, predict
from advex.engine.builders import BuildConfig, InversionConfig, build_all
from advex.engine.data import load_builtin
from advex.engine.models import ModelInfo, ModelWrapper, freeze
from advex.engine.train import TrainConfig, train
from pgd_vs_torchattacks import interleaved, spread, sync  # one timing method for both PGD benchmarks

ROOT = Path(__file__).resolve().parent
# dense bf16 tensor-core peaks (FLOP/s), by a name in torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn, device: torch.device, repeats: int = 1):
    """(best wall time of `repeats` runs after one warm-up run, the last output)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def peak_flops(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def step_flops(model, x: torch.Tensor) -> float:
    """FLOPs of one forward and the backward to the input (what one attack step costs: no
    parameter gradients, on a copy whose parameters want none)."""
    from torch.utils.flop_counter import FlopCounterMode

    probe_model = copy.deepcopy(model)
    for p in probe_model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        labels = probe_model(x).argmax(1)
    probe = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(probe_model(probe), labels).backward()
    return counter.get_total_flops()


def forward_flops(model, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def trained(arch: str, train_set, args, device: torch.device, arch_args: dict) -> ModelWrapper:
    shape, classes = tuple(train_set.example_shape), train_set.num_classes
    torch.manual_seed(0)
    model = ModelWrapper(zoo.build(arch, shape, classes, arch_args), ModelInfo(arch, shape, classes))
    log(f"training {arch} for {args.epochs} epoch(s) on {len(train_set)} images")
    train(model, train_set, TrainConfig(epochs=args.epochs, batch_size=args.train_batch, lr=0.1, schedule="cosine",
                                        augment=True), device)
    return model.eval()


def pgd_rows(arch: str, model: ModelWrapper, x, y, args, device) -> list[dict]:
    import torchattacks

    peer_model = copy.deepcopy(model)  # torchattacks' defaults: the model as given, fp32
    ours = freeze(copy.deepcopy(model)).set_precision(args.precision, device)
    flops_step = step_flops(peer_model, x)
    flops_fwd = forward_flops(peer_model, x)
    peak = peak_flops(device)
    rows = []
    for norm, eps in (("Linf", 8 / 255), ("L2", 0.5)):
        step = 2.5 * eps / args.steps
        cfg = AttackConfig(norm=norm, eps=eps, steps=args.steps, step_size=step, random_start=True, seed=0)
        peer = (torchattacks.PGD if norm == "Linf" else torchattacks.PGDL2)(peer_model, eps=eps, alpha=step,
                                                                             steps=args.steps, random_start=True)
        clean = predict(peer_model, x)
        # the CPU bench's timing: warm-ups, then interleaved rounds; the ratio is the median of the rounds'
        times, _, outs = interleaved({"torchattacks": lambda: (peer(x, y), {}),
                                      "advex": lambda: (attack(ours, x, y, cfg, clean_pred=clean), {})},
                                     device, args.repeats)
        t_peer, t_ours = statistics.median(times["torchattacks"]), statistics.median(times["advex"])
        x_peer, out = outs["torchattacks"], outs["advex"]
        ratios = spread([p / o for p, o in zip(times["torchattacks"], times["advex"])])
        peer_flops = args.steps * flops_step
        our_flops = args.steps * flops_step + flops_fwd  # K forward+backward and the last iterate's forward
        peer_robust = (clean == y) & (predict(peer_model, x_peer) == y)
        our_robust = (clean == y) & ~out.success
        row = {"bench": "pgd", "arch": arch, "norm": norm, "eps": eps, "steps": args.steps, "batch": len(y),
               "torchattacks_img_s": len(y) / t_peer, "advex_img_s": len(y) / t_ours, "ratio": ratios["median"],
               "ratio_min": ratios["min"], "ratio_max": ratios["max"],
               "torchattacks_mfu": peer_flops / t_peer / peak if peak else None,
               "advex_mfu": our_flops / t_ours / peak if peak else None,
               "gflop_per_step": flops_step / 1e9,
               "robust_acc_torchattacks": float(peer_robust.float().mean()),
               "robust_acc_advex": float(our_robust.float().mean()),
               "verdict_agreement": float((peer_robust == our_robust).float().mean()),
               "precision": ours.precision}
        log(f"pgd {arch} {norm}: torchattacks {row['torchattacks_img_s']:.0f} img/s, advex {row['advex_img_s']:.0f} "
            f"img/s ({row['ratio']:.2f}x)")
        rows.append(row)
    return rows


def suite_row(arch: str, model: ModelWrapper, x, y, args, device) -> dict:
    """APGD-CE then APGD-T (100 steps, 9 targets) as a cascade, advex and torchattacks, same points."""
    import torchattacks

    eps = 8 / 255
    ours = freeze(copy.deepcopy(model)).set_precision(args.precision, device)

    def advex_suite():
        robust = predict(ours, x) == y
        for method in ("apgd-ce", "apgd-t"):
            idx = robust.nonzero().flatten()
            if idx.numel():
                out = attack(ours, x[idx], y[idx], AttackConfig(norm="Linf", eps=eps, method=method,
                                                                steps=args.apgd_steps), early_stop=True)
                robust[idx[out.success]] = False
        return robust

    def peer_suite():
        peer = torchattacks.MultiAttack([
            torchattacks.APGD(model, norm="Linf", eps=eps, steps=args.apgd_steps, n_restarts=1, loss="ce"),
            torchattacks.APGDT(model, norm="Linf", eps=eps, steps=args.apgd_steps, n_restarts=1, n_classes=10)])
        return predict(model, peer(x, y)) == y

    t_ours, ours_robust = timed(advex_suite, device)
    t_peer, peer_robust = timed(peer_suite, device)
    peer_robust &= predict(model, x) == y
    row = {"bench": "autoattack-fast", "arch": arch, "norm": "Linf", "eps": eps, "steps": args.apgd_steps,
           "n": len(y), "advex_s": t_ours, "torchattacks_s": t_peer, "ratio": t_peer / t_ours,
           "robust_acc_advex": float(ours_robust.float().mean()),
           "robust_acc_torchattacks": float(peer_robust.float().mean()),
           "verdict_agreement": float((ours_robust == peer_robust).float().mean())}
    log(f"suite {arch}: advex {t_ours:.1f} s, torchattacks {t_peer:.1f} s ({row['ratio']:.2f}x)")
    return row


def d_r_row(arch: str, model: ModelWrapper, train_set, args, device) -> dict:
    ours = freeze(copy.deepcopy(model)).set_precision(args.precision, device)
    subset = train_set.subset(args.dr_images)
    cfg = BuildConfig("d_r", InversionConfig(steps=args.dr_steps, step_size=0.1), batch_size=args.batch)
    sync(device)
    t0 = time.perf_counter()
    _, stats = build_all(ours, subset, cfg, device)
    sync(device)
    wall = time.perf_counter() - t0
    row = {"bench": "d_r", "arch": arch, "images": len(subset), "steps": args.dr_steps, "batch": args.batch,
           "seconds": wall, "img_steps_per_s": len(subset) * args.dr_steps / wall,
           "full_cifar10_minutes_at_this_rate": 50000 * 1000 / (len(subset) * args.dr_steps / wall) / 60,
           "feature_distance_mean": stats.get("feature_distance_mean")}
    log(f"d_r {arch}: {len(subset)} x {args.dr_steps} steps in {wall:.1f} s "
        f"(full CIFAR-10 x 1000 steps: {row['full_cifar10_minutes_at_this_rate']:.0f} min at this rate)")
    return row


def train_row(arch: str, train_set, args, device, arch_args: dict) -> dict:
    shape, classes = tuple(train_set.example_shape), train_set.num_classes
    torch.manual_seed(1)
    model = ModelWrapper(zoo.build(arch, shape, classes, arch_args), ModelInfo(arch, shape, classes))
    sync(device)
    t0 = time.perf_counter()
    history = train(model, train_set, TrainConfig(epochs=1, batch_size=args.train_batch, lr=0.1, schedule="constant",
                                                  augment=True), device)
    sync(device)
    wall = time.perf_counter() - t0
    log(f"train {arch}: one epoch of {len(train_set)} images in {wall:.1f} s")
    return {"bench": "train_epoch", "arch": arch, "images": len(train_set), "batch": args.train_batch,
            "seconds": wall, "img_s": len(train_set) / wall, "train_accuracy": history[0].train_accuracy}


def write(results: dict, tag: str) -> Path:
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    meta = results["meta"]
    lines = [f"# advex GPU engine — {meta['device']}", "", *(f"- {k}: `{v}`" for k, v in meta.items()), ""]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    rows = results["rows"]
    lines += ["## PGD, every step", "", "| arch | norm | batch | steps | torchattacks img/s | advex img/s | ratio | "
              "MFU torchattacks | MFU advex | robust acc torchattacks | robust acc advex | agreement |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['norm']} | {r['batch']} | {r['steps']} | {r['torchattacks_img_s']:.0f} | "
              f"{r['advex_img_s']:.0f} | {r['ratio']:.2f}x [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] | {pct(r['torchattacks_mfu'])} | {pct(r['advex_mfu'])} | "
              f"{r['robust_acc_torchattacks']:.3f} | {r['robust_acc_advex']:.3f} | {r['verdict_agreement']:.3f} |"
              for r in rows if r["bench"] == "pgd"]
    lines += ["", "## AutoAttack (APGD-CE then APGD-T)", "", "| arch | n | steps | torchattacks s | advex s | ratio | "
              "robust acc torchattacks | robust acc advex | agreement |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['n']} | {r['steps']} | {r['torchattacks_s']:.1f} | {r['advex_s']:.1f} | "
              f"{r['ratio']:.2f}x | {r['robust_acc_torchattacks']:.3f} | {r['robust_acc_advex']:.3f} | "
              f"{r['verdict_agreement']:.3f} |" for r in rows if r["bench"] == "autoattack-fast"]
    lines += ["", "## D_R and training", ""]
    lines += [f"- D_R, {r['arch']}: {r['images']} images x {r['steps']} steps in {r['seconds']:.1f} s "
              f"({r['img_steps_per_s']:.0f} image-steps/s; full CIFAR-10 x 1000 steps at this rate: "
              f"{r['full_cifar10_minutes_at_this_rate']:.0f} min)" for r in rows if r["bench"] == "d_r"]
    lines += [f"- one training epoch, {r['arch']}: {r['images']} images in {r['seconds']:.1f} s ({r['img_s']:.0f} img/s)"
              for r in rows if r["bench"] == "train_epoch"]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    return out / f"{tag}.md"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="toy sizes on the CPU: checks that everything runs")
    p.add_argument("--data-root", action="append", default=None)
    p.add_argument("--device", default="")
    p.add_argument("--precision", default="auto")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    device = torch.device(args.device or ("cpu" if args.small or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    small = args.small
    args.batch = 32 if small else 512
    args.train_batch = 64 if small else 512
    args.steps = 3 if small else 10
    args.apgd_steps = 5 if small else 100
    args.repeats = 1 if small else 3
    args.dr_images, args.dr_steps = (64, 5) if small else (4096, 100)
    archs = [("small_cnn", {"width": 8})] if small else [("resnet18", {}), ("resnet50", {})]
    roots = args.data_root or [r for r in os.environ.get("ADVEX_DATA_ROOT", "").split(os.pathsep) if r] \
        + [str(ROOT.parent.parent / "shared" / "data")]
    train_set = load_builtin("cifar10", "train", roots)
    test_set = load_builtin("cifar10", "test", roots)
    if small:
        train_set = train_set.subset(512)
    suite_n = 64 if small else 1000
    x, y = next(test_set.subset(args.batch).batches(args.batch, device))
    xs, ys = next(test_set.subset(suite_n).batches(suite_n, device))
    started = time.perf_counter()
    rows: list[dict] = []
    for arch, arch_args in archs:
        model = trained(arch, train_set, args, device, arch_args)
        rows += pgd_rows(arch, model, x, y, args, device)
        if arch == archs[0][0]:
            rows.append(suite_row(arch, model, xs, ys, args, device))
            rows.append(train_row(arch, train_set, args, device, arch_args))
        if arch == archs[-1][0]:
            rows.append(d_r_row(arch, model, train_set, args, device))
    import torchattacks

    meta = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "precision": args.precision, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "torchattacks": torchattacks.__version__,
            "cpu_threads": torch.get_num_threads(), "epochs_trained": args.epochs, "small": small,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "mfu": "FLOPs (torch.utils.flop_counter: K forward+backward, plus advex's one forward) / time / "
                   "dense bf16 peak of the GPU"}
    tag = args.tag or f"gpu_{'small_' if small else ''}{meta['device'].replace(' ', '_')}"
    path = write({"meta": meta, "rows": rows}, tag)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
