#!/usr/bin/env python3
"""advex AutoAttack components vs torchattacks: same model, same test points, same settings.

A validation benchmark (a question of strength, not speed): for APGD-CE, APGD-T, FAB-T, Square and
the whole AutoAttack cascade, the robust accuracy advex measures and the one torchattacks measures
on the same points, their difference, the per-example agreement of the robust/broken verdicts and
the wall time of each; plus advex PGD-50 with 5 restarts, the baseline the suite must beat.

Acceptance (per row): advex robust accuracy <= torchattacks' + 0.5 pp (at least as strong) and
within 2 pp of it either way.

    python bench/autoattack_vs_torchattacks.py                       # Fashion-MNIST small CNN, CPU
    python bench/autoattack_vs_torchattacks.py --dataset cifar10 --arch small_cnn --device cuda
    python bench/autoattack_vs_torchattacks.py --dataset cifar10 --arch resnet18 --device cuda --epochs 5
    python bench/autoattack_vs_torchattacks.py --adv-train-eps 0.1 --epochs 5 --tag advtrain   # robust model

--adv-train-eps E trains the model adversarially (Madry et al.: the engine's own training with
TrainConfig.adversarial = Linf PGD at E, --adv-train-steps steps of 2.5*E/steps, random start), so
that many test points stay robust and the comparison has more power than on an undefended model.

Settings on both sides: APGD-CE / APGD-T / FAB-T 100 steps, one run (torchattacks n_restarts=1,
advex restarts=0), 9 target classes; Square 5000 queries in the suite and --square-queries
(default 1000) in its own row. torchattacks.AutoAttack(version='standard') builds its APGD, APGD-T
and FAB with torchattacks' default of 10 steps, so the suite's reference here is torchattacks'
MultiAttack of the same four attacks at 100 steps (AutoAttack's published standard settings); the
stock AutoAttack object is also run (--no-stock to skip) and reported in its own row, as is.

Needs torchattacks (pip install --no-deps torchattacks scipy). Writes bench/results/<tag>.json and
.md with device, versions, command, n and wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from advex.engine import zoo
from advex.engine.attacks import AttackConfig, attack
from advex.engine.data import load_builtin
from advex.engine.evaluate import evaluate, suite_sweeps
from advex.engine.models import ModelInfo, ModelWrapper
from advex.engine.train import EpochStats, TrainConfig, train

ROOT = Path(__file__).resolve().parent
DEFAULT_EPS = {"fashion-mnist": 0.1, "mnist": 0.3, "cifar10": 8 / 255}
# advex-suite: advex's suite alone, no torchattacks reference (for the PGD-50x5 baseline when the
# torchattacks cascade is too slow to run, e.g. on a robust model on CPU); not in the default rows.
ROWS = ("apgd-ce", "apgd-t", "fab-t", "square", "suite", "stock", "pgd50x5", "advex-suite")
ACCEPT_STRONGER_PP = 0.5  # advex may be at most this much weaker (higher robust accuracy)
ACCEPT_BAND_PP = 2.0      # and at most this far away either way


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def in_batches(fn, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def predictions(model, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().amax(1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--data-root", action="append", default=None)
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (cosine schedule)")
    p.add_argument("--adv-train-eps", type=float, default=0.0,
                   help="train adversarially: Linf PGD radius of the inner loop (0: standard training)")
    p.add_argument("--adv-train-steps", type=int, default=7, help="PGD steps of the adversarial-training inner loop")
    p.add_argument("--n", type=int, default=500, help="test images (the first n of the test split)")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--eps", type=float, default=0.0, help="Linf radius (default: 0.1 Fashion-MNIST, 8/255 CIFAR-10)")
    p.add_argument("--steps", type=int, default=100, help="APGD-CE, APGD-T and FAB-T steps")
    p.add_argument("--suite-square-queries", type=int, default=5000)
    p.add_argument("--square-queries", type=int, default=1000, help="query budget of the stand-alone Square row")
    p.add_argument("--rows", default=",".join(ROWS[:-1]), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--no-stock", action="store_true", help="skip stock torchattacks.AutoAttack(version='standard')")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-cache", default="", help="folder: keep the trained weights there, keyed by the training "
                   "settings, and reuse them on the next run with the same settings (training is deterministic on CPU)")
    p.add_argument("--tag", default="", help="suffix of the result files' names: ..._<dataset>_<arch>_<device>_<tag>")
    args = p.parse_args()
    import torchattacks

    wall0 = time.perf_counter()
    wanted = [r for r in args.rows.split(",") if r]
    if args.no_stock and "stock" in wanted:
        wanted.remove("stock")
    unknown = set(wanted) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; expected some of {ROWS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    eps = args.eps or DEFAULT_EPS.get(args.dataset, 8 / 255)
    roots = args.data_root or [r for r in os.environ.get("ADVEX_DATA_ROOT", "").split(os.pathsep) if r] \
        + ["/usr/share/datasets", str(ROOT.parent.parent / "shared" / "data")]
    train_set = load_builtin(args.dataset, "train", roots).subset(args.train_limit)
    test_set = load_builtin(args.dataset, "test", roots).subset(args.n)
    shape, classes = tuple(train_set.example_shape), train_set.num_classes
    torch.manual_seed(args.seed)
    model = ModelWrapper(zoo.build(args.arch, shape, classes), ModelInfo(args.arch, shape, classes))
    adv_train = None
    if args.adv_train_eps > 0:
        adv_train = AttackConfig(norm="Linf", eps=args.adv_train_eps, method="pgd", steps=args.adv_train_steps,
                                 step_size=2.5 * args.adv_train_eps / args.adv_train_steps, random_start=True)
    cache = None
    if args.model_cache:
        key = (f"{args.dataset}_{args.arch}_{len(train_set)}_{args.epochs}_{args.lr:g}_{args.adv_train_eps:g}_"
               f"{args.adv_train_steps}_{args.seed}")
        cache = Path(args.model_cache) / f"{key}.pt"
    loaded = cache is not None and cache.exists()
    if loaded:
        saved = torch.load(cache, map_location="cpu")
        model.load_state_dict(saved["weights"])
        model.to(device)
        train_s, history = saved["train_seconds"], [EpochStats(**h) for h in saved["history"]]
        log(f"loaded the trained weights from {cache} (trained in {train_s:.1f}s)")
    else:
        t0 = time.perf_counter()
        history = train(model, train_set, TrainConfig(epochs=args.epochs, batch_size=128, lr=args.lr,
                                                      schedule="cosine", adversarial=adv_train, seed=args.seed),
                        device, on_epoch=lambda st: log(
                            f"epoch {st.epoch}: loss {st.train_loss:.4f} clean acc {st.train_accuracy:.4f} "
                            f"adversarial acc {st.train_robust_accuracy:.4f} ({st.wall_seconds:.1f}s)"))
        train_s = time.perf_counter() - t0
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"weights": model.state_dict(), "train_seconds": train_s,
                        "history": [asdict(h) for h in history]}, cache)
    model.eval()
    log(f"trained {args.arch} on {len(train_set)} {args.dataset} images in {train_s:.1f}s"
        + (f", adversarially (PGD-{args.adv_train_steps} at eps {args.adv_train_eps:g})" if adv_train else ""))

    x = torch.cat([xb for xb, _ in test_set.batches(args.batch, device)])
    y = torch.cat([yb for _, yb in test_set.batches(args.batch, device)])
    n = len(y)
    clean = predictions(model, x, args.batch) == y
    log(f"n={n} clean accuracy {clean.float().mean():.4f} eps={eps:g}")
    tol = 1e-5

    def robust_of(x_adv: torch.Tensor) -> tuple[torch.Tensor, int]:
        """robust verdicts (clean-correct and still correct at x_adv), and how many x_adv that fool
        the model lie outside the eps ball (they then count as robust: no valid adversarial example)."""
        fooled = predictions(model, x_adv, args.batch) != y
        outside = linf(x_adv, x) > eps + tol
        return clean & ~(fooled & ~outside), int((fooled & outside & clean).sum())

    def advex_single(cfg: AttackConfig):
        def run(xb, yb):
            return attack(model, xb, yb, cfg, early_stop=True).success

        torch.manual_seed(args.seed)
        s, success = timed(lambda: in_batches(run, x, y, args.batch), device)
        return s, clean & ~success.to(clean.device), 0

    def ta_single(atk):
        torch.manual_seed(args.seed)
        s, x_adv = timed(lambda: in_batches(lambda xb, yb: atk(xb, yb), x, y, args.batch), device)
        robust, outside = robust_of(x_adv)
        return s, robust, outside

    def ta_attacks(square_queries: int):
        common = dict(norm="Linf", eps=eps, seed=args.seed)
        return {
            "apgd-ce": torchattacks.APGD(model, steps=args.steps, n_restarts=1, loss="ce", **common),
            "apgd-t": torchattacks.APGDT(model, steps=args.steps, n_restarts=1, n_classes=classes, **common),
            "fab-t": torchattacks.FAB(model, steps=args.steps, n_restarts=1, multi_targeted=True,
                                      n_classes=classes, **common),
            "square": torchattacks.Square(model, n_queries=square_queries, n_restarts=1, p_init=0.8,
                                          loss="margin", **common),
        }

    def advex_suite():
        torch.manual_seed(args.seed)
        sweeps = suite_sweeps("autoattack", "Linf", (eps,), seed=args.seed)
        assert [s.config.method for s in sweeps] == ["apgd-ce", "apgd-t", "fab-t", "square"]
        from dataclasses import replace
        sweeps = [replace(s, config=replace(s.config, steps={"square": args.suite_square_queries}.get(
            s.config.method, args.steps))) for s in sweeps]
        s, report = timed(lambda: evaluate(model, test_set, sweeps, batch_size=args.batch, device=device), device)
        stages = {r.config.method: r.robust_correct / n for r in report.rows}
        return s, report.rows[-1].robust_mask.to(clean.device) & clean, 0, stages

    rows = []

    def add(name: str, advex_part, ta_part, settings: str, extra: dict | None = None):
        a_s, a_rob, a_out = advex_part
        t_s, t_rob, t_out = ta_part
        ra_a, ra_t = float(a_rob.float().mean()), float(t_rob.float().mean())
        diff_pp = 100 * (ra_a - ra_t)
        row = {
            "row": name, "settings": settings, "n": n,
            "robust_acc_advex": ra_a, "robust_acc_torchattacks": ra_t, "diff_pp": diff_pp,
            "agreement": float((a_rob == t_rob).float().mean()),
            "broken_only_by_advex": int((~a_rob & t_rob).sum()), "broken_only_by_torchattacks": int((a_rob & ~t_rob).sum()),
            "advex_s": a_s, "torchattacks_s": t_s, "time_ratio_advex_over_torchattacks": a_s / t_s,
            "advex_outside_eps": a_out, "torchattacks_outside_eps": t_out,
            "indices_broken_only_by_advex": torch.nonzero(~a_rob & t_rob).flatten().tolist(),
            "indices_broken_only_by_torchattacks": torch.nonzero(a_rob & ~t_rob).flatten().tolist(),
            "meets_stronger": diff_pp <= ACCEPT_STRONGER_PP, "meets_band": abs(diff_pp) <= ACCEPT_BAND_PP,
        }
        row["meets_acceptance"] = row["meets_stronger"] and row["meets_band"]
        row.update(extra or {})
        rows.append(row)
        log(f"{name}: advex {ra_a:.4f} ({a_s:.1f}s) torchattacks {ra_t:.4f} ({t_s:.1f}s) diff {diff_pp:+.2f}pp "
            f"agreement {row['agreement']:.4f} {'MEETS' if row['meets_acceptance'] else 'FAILS'}")

    singles = ta_attacks(args.square_queries)
    advex_cfg = {
        "apgd-ce": AttackConfig(norm="Linf", eps=eps, method="apgd-ce", steps=args.steps, seed=args.seed),
        "apgd-t": AttackConfig(norm="Linf", eps=eps, method="apgd-t", steps=args.steps, seed=args.seed),
        "fab-t": AttackConfig(norm="Linf", eps=eps, method="fab-t", steps=args.steps, seed=args.seed),
        "square": AttackConfig(norm="Linf", eps=eps, method="square", steps=args.square_queries, seed=args.seed),
    }
    for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
        if name in wanted:
            log(f"{name} ...")
            budget = f"{args.square_queries} queries" if name == "square" else f"{args.steps} steps, 1 run"
            targets = f", {classes - 1} target classes" if name in ("apgd-t", "fab-t") else ""
            add(name, advex_single(advex_cfg[name]), ta_single(singles[name]), budget + targets)

    suite_stages = {}
    suite_alone = None
    pgd_row = None
    has_suite = bool({"suite", "stock", "advex-suite"} & set(wanted))
    if has_suite:
        log("advex suite autoattack ...")
        a_s, a_rob, a_out, suite_stages = advex_suite()
        log(f"advex suite: {a_rob.float().mean():.4f} in {a_s:.1f}s, after each stage {suite_stages}")
        suite_alone = {"robust_acc_advex": float(a_rob.float().mean()), "advex_s": a_s,
                       "settings": f"APGD-CE, APGD-T, FAB-T {args.steps} steps; Square {args.suite_square_queries} "
                                   "queries; cascade", "advex_after_each_stage": suite_stages}
        if "suite" in wanted:
            log("torchattacks MultiAttack(APGD-CE, APGD-T, FAB-T, Square) at the same settings ...")
            parts = ta_attacks(args.suite_square_queries)
            multi = torchattacks.MultiAttack([parts["apgd-ce"], parts["apgd-t"], parts["fab-t"], parts["square"]])
            add("suite", (a_s, a_rob, a_out), ta_single(multi),
                f"APGD-CE, APGD-T, FAB-T {args.steps} steps; Square {args.suite_square_queries} queries; cascade",
                {"advex_after_each_stage": suite_stages,
                 "reference": "torchattacks.MultiAttack of APGD/APGDT/FAB(multi_targeted)/Square at the settings above"})
        if "stock" in wanted:
            log("stock torchattacks.AutoAttack(version='standard') ...")
            stock = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=classes,
                                            seed=args.seed)
            add("suite-vs-stock", (a_s, a_rob, a_out), ta_single(stock),
                "advex suite as above vs torchattacks.AutoAttack(version='standard') as shipped "
                "(its APGD/APGD-T/FAB run torchattacks' default 10 steps)",
                {"reference": "torchattacks.AutoAttack(version='standard'), stock"})
    if "pgd50x5" in wanted:
        log("advex PGD-50 x 5 ...")
        cfg = AttackConfig(norm="Linf", eps=eps, method="pgd", steps=50, restarts=4, seed=args.seed)
        p_s, p_rob, _ = advex_single(cfg)
        pgd_row = {"row": "advex PGD-50 x 5 restarts", "settings": "50 steps of 2.5*eps/50, random start, "
                   "5 runs (restarts=4)", "n": n, "robust_acc": float(p_rob.float().mean()), "seconds": p_s}
        log(f"PGD-50x5: {pgd_row['robust_acc']:.4f} in {p_s:.1f}s")
        if has_suite:
            pgd_row["suite_robust_acc_advex"] = float(a_rob.float().mean())
            pgd_row["suite_minus_pgd_pp"] = 100 * (pgd_row["suite_robust_acc_advex"] - pgd_row["robust_acc"])
            pgd_row["suite_at_least_as_strong"] = pgd_row["suite_minus_pgd_pp"] <= 0
            pgd_row["points_pgd_broke_suite_did_not"] = int((a_rob & ~p_rob).sum())
            pgd_row["points_suite_broke_pgd_did_not"] = int((~a_rob & p_rob).sum())
            pgd_row["indices_pgd_broke_suite_did_not"] = torch.nonzero(a_rob & ~p_rob).flatten().tolist()

    wall = time.perf_counter() - wall0
    meta = {
        "command": " ".join(["python", "bench/" + Path(sys.argv[0]).name] + sys.argv[1:]),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "torchattacks": getattr(torchattacks, "__version__", "?"),
        "dataset": args.dataset, "arch": args.arch, "train_images": len(train_set), "epochs": args.epochs,
        "lr": args.lr,
        "training": (f"adversarial: Linf PGD-{args.adv_train_steps}, eps {args.adv_train_eps:g}, step "
                     f"{2.5 * args.adv_train_eps / args.adv_train_steps:g}, random start (TrainConfig.adversarial)"
                     if adv_train else "standard"),
        "train_last_epoch_clean_acc": round(history[-1].train_accuracy, 4),
        **({"train_last_epoch_adversarial_acc": round(history[-1].train_robust_accuracy, 4)} if adv_train else {}),
        "train_seconds": round(train_s, 1), "weights_from_cache": bool(cache is not None and loaded),
        "n_test_images": n, "clean_accuracy": float(clean.float().mean()),
        "norm": "Linf", "eps": eps, "steps": args.steps, "suite_square_queries": args.suite_square_queries,
        "square_row_queries": args.square_queries, "seed": args.seed, "batch": args.batch,
        "wall_seconds_total": round(wall, 1),
        "acceptance": f"advex <= torchattacks + {ACCEPT_STRONGER_PP} pp and |advex - torchattacks| <= {ACCEPT_BAND_PP} pp",
        "timing": "one run each, wall clock; advex with per-example early stopping (as Evaluate runs)",
    }
    tag = f"autoattack_vs_torchattacks_{args.dataset}_{args.arch}_{device.type}" + (f"_{args.tag}" if args.tag else "")
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows, "advex_suite": suite_alone, "pgd50x5": pgd_row}, indent=2) + "\n")
    lines = [f"# advex AutoAttack vs torchattacks — {args.dataset} {args.arch}, {meta['device']}", "",
             *(f"- {k}: `{v}`" for k, v in meta.items()), "",
             "Robust accuracy over all n test images (clean-misclassified count as broken). diff = advex − "
             "torchattacks (negative: advex stronger). agreement = fraction of images with the same "
             "robust/broken verdict. time ratio = advex s / torchattacks s.", "",
             "| row | settings | robust acc advex | robust acc torchattacks | diff (pp) | agreement "
             "| advex s | torchattacks s | time ratio | meets acceptance |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "yes" if r["meets_acceptance"] else \
            ("no (advex weaker by > 0.5 pp)" if not r["meets_stronger"] else "no (outside ±2 pp)")
        lines.append(f"| {r['row']} | {r['settings']} | {r['robust_acc_advex']:.4f} | {r['robust_acc_torchattacks']:.4f} "
                     f"| {r['diff_pp']:+.2f} | {r['agreement']:.4f} | {r['advex_s']:.1f} | {r['torchattacks_s']:.1f} "
                     f"| {r['time_ratio_advex_over_torchattacks']:.2f} | {verdict} |")
    if suite_alone and not {"suite", "stock"} & set(wanted):
        lines += ["", f"advex suite alone (no torchattacks reference run; {suite_alone['settings']}): robust accuracy "
                      f"{suite_alone['robust_acc_advex']:.4f} in {suite_alone['advex_s']:.1f}s."]
    if suite_stages:
        lines += ["", "advex suite, robust accuracy after each stage: " +
                  ", ".join(f"{k} {v:.4f}" for k, v in suite_stages.items())]
    if pgd_row:
        lines += ["", f"Baseline: advex PGD-50 × 5 restarts ({pgd_row['settings']}): robust accuracy "
                      f"{pgd_row['robust_acc']:.4f} in {pgd_row['seconds']:.1f}s."]
        if "suite_minus_pgd_pp" in pgd_row:
            lines.append(f"advex suite {pgd_row['suite_robust_acc_advex']:.4f} − PGD-50×5 = "
                         f"{pgd_row['suite_minus_pgd_pp']:+.2f} pp: suite "
                         f"{'at least as strong' if pgd_row['suite_at_least_as_strong'] else 'WEAKER than the baseline'} "
                         f"(images PGD broke and the suite did not: {pgd_row['points_pgd_broke_suite_did_not']}; "
                         f"the reverse: {pgd_row['points_suite_broke_pgd_did_not']}).")
    outside = [r for r in rows if r["advex_outside_eps"] or r["torchattacks_outside_eps"]]
    for r in outside:
        lines.append(f"- {r['row']}: fooling points outside the eps ball (counted robust): advex "
                     f"{r['advex_outside_eps']}, torchattacks {r['torchattacks_outside_eps']}")
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
