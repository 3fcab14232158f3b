"""`advex reproduce`: Ilyas et al. (NeurIPS 2019) through the service only.

Train a standard and an adversarially trained model on D; build D_R (through the robust
model), D_NR, D_rand and D_det (through the standard one); train a standard model on each; then
evaluate all six on the original test set (standard accuracy, L2 robust accuracy at eps 0.25 and
over a sweep). Write a report folder: results.json and report.md (table beside the paper's numbers,
settings, reductions, diagnostics) first, then the figures: figure2.png (bars in the style of the
paper's Figure 2, at every evaluated eps) and samples.png (x beside its D_R / D_NR / D_rand / D_det
counterparts, with labels). A rate over an empty denominator is "n/a" (null in JSON), never 0%.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from advex.client import plots
from advex.client.render import fmt_rate, image_grid, rate, table
from advex.client.sdk import Client

# PAPER.md: CIFAR-10 test set, (standard accuracy, robust accuracy at L2 eps 0.25).
PAPER = {
    "D (standard)": (0.953, 0.045),
    "D (adversarial)": (0.91, 0.825),
    "D_R": (0.84, 0.48),
    "D_NR": (0.88, 0.005),
    "D_rand": (0.633, 0.0),
    "D_det": (0.437, 0.0),
}
ROWS = list(PAPER)


@dataclass
class Preset:
    name: str
    dataset: str
    arch: str
    arch_args: dict
    train_limit: int            # examples of D used for the two models on D (0 = all)
    build_limit: int            # examples of D turned into D_R, D_NR, D_rand, D_det (0 = all)
    test_limit: int             # test examples evaluated (0 = all)
    train: dict                 # standard training on D
    robust_attack: dict         # adversarial training's inner loop
    new_set_train: dict         # standard training on each constructed set
    inversion: dict             # D_R / D_NR
    relabel_attack: dict        # D_rand / D_det
    eval_eps: tuple = (0.25, 0.5, 1.0)
    eval_steps: int = 20
    mean: tuple = ()
    std: tuple = ()
    reductions: list = field(default_factory=list)
    batch_size: int = 128


PAPER_TRAIN = dict(epochs=150, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="step",
                   lr_step_epochs=50, lr_gamma=0.1, augment=True)

PRESETS = {
    "tiny": Preset(  # a smoke test of the whole pipeline (about a minute); its numbers mean little
        name="tiny", dataset="fashion-mnist", arch="small_cnn", arch_args={"width": 8},
        train_limit=1000, build_limit=200, test_limit=200,
        train=dict(epochs=1, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        robust_attack=dict(norm="L2", eps=0.5, steps=3, step_size=0.25),
        new_set_train=dict(epochs=2, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        inversion=dict(steps=20, step_size=0.1),
        relabel_attack=dict(norm="L2", eps=0.5, steps=10, step_size=0.1),
        eval_eps=(0.25, 0.5), eval_steps=5,
        reductions=["smoke-test scale: 1,000 training images, 200 per constructed set, 1-2 epochs, "
                    "20 inversion steps, 10 relabelling steps; the numbers are not a reproduction"]),
    "small": Preset(
        name="small", dataset="fashion-mnist", arch="small_cnn", arch_args={"width": 16},
        train_limit=10000, build_limit=3000, test_limit=1000,
        train=dict(epochs=4, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        robust_attack=dict(norm="L2", eps=0.5, steps=7, step_size=0.1),
        new_set_train=dict(epochs=10, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        inversion=dict(steps=200, step_size=0.1),
        relabel_attack=dict(norm="L2", eps=2.0, steps=50, step_size=0.1),
        eval_eps=(0.25, 0.5, 1.0, 2.0),
        reductions=[
            "Fashion-MNIST (28x28 grey) instead of CIFAR-10; a small CNN (width 16, pooled representation) "
            "instead of ResNet-50",
            "D: 10,000 training images for the two models on D; 3,000 of them turned into each constructed set; "
            "1,000 test images evaluated",
            "training: 4 epochs on D, 10 epochs on each constructed set (SGD lr 0.05, cosine) instead of 150 "
            "epochs with steps at 50 and 100",
            "D_R / D_NR: 200 inversion steps of 0.1 instead of 1000",
            "D_rand / D_det: L2 eps 2.0 instead of 0.5, 50 PGD steps of 0.1 instead of 100. Fashion-MNIST models "
            "are far more robust than CIFAR-10 ones: at eps 0.5 the targeted attack reaches only ~10% of its "
            "targets (measured), so D_det would carry y's features under label y+1 instead of the target's "
            "non-robust features; at eps 2.0 it reaches ~90%",
            "robust model: L2 eps 0.5, 7 steps of 0.1, random start (the paper's settings), 4 epochs",
        ]),
    "cifar10": Preset(
        name="cifar10", dataset="cifar10", arch="resnet18", arch_args={},
        train_limit=0, build_limit=0, test_limit=0,
        train=PAPER_TRAIN,
        robust_attack=dict(norm="L2", eps=0.5, steps=7, step_size=0.1),
        new_set_train=PAPER_TRAIN,
        inversion=dict(steps=1000, step_size=0.1),
        relabel_attack=dict(norm="L2", eps=0.5, steps=100, step_size=0.1),
        eval_eps=(0.25, 0.5), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        reductions=["ResNet-18 instead of ResNet-50 (resnet50 is one --arch away)",
                    "no learning-rate grid search: lr 0.1 with augmentation for every training set"],
        batch_size=256),
}


@dataclass
class Row:
    training_set: str
    dataset_id: str
    model_id: str
    clean: float = 0.0
    robust_025: Optional[float] = None    # None when eps 0.25 is not in the preset's eval_eps
    sweep: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)


def _train(client: Client, p: Preset, dataset_id: str, name: str, settings: dict, limit: int,
           adversarial: Optional[dict] = None) -> str:
    op = client.train(p.arch, dataset_id, limit=limit, name=name, arch_args=p.arch_args, adversarial=adversarial,
                      mean=p.mean, std=p.std, seed=0, **settings)
    return op.result().model_id


def _diagnostics(result) -> dict:
    keys = ("target_hit_rate", "mean_l2", "max_l2") if result.mode in ("D_rand", "D_det") else \
        ("feature_distance_start_mean", "feature_distance_mean", "feature_distance_p95", "mean_l2_from_start")
    return {k: round(getattr(result, k), 4) for k in keys} | {"wall_seconds": round(result.wall_seconds, 1)}


def _start(out: Path, log: Callable[[str], None], headline: str, reductions: list) -> float:
    """Make the report folder and say what runs and how it departs from the paper."""
    out.mkdir(parents=True, exist_ok=True)
    log(headline + " Reductions from the paper:")
    for r in reductions:
        log(f"  - {r}")
    return time.perf_counter()


def run(client: Client, p: Preset, out: Path, log: Callable[[str], None] = print) -> list[Row]:
    t0 = _start(out, log, f"advex reproduce — preset {p.name!r}: {p.dataset}, {p.arch}.", p.reductions)
    d = p.dataset

    log("\n[1/4] Train a standard and an adversarially trained model on D")
    std_id = _train(client, p, d, "D standard", p.train, p.train_limit)
    rob_id = _train(client, p, d, "D adversarial", p.train, p.train_limit, adversarial=p.robust_attack)

    log("\n[2/4] Build D_R (robust model), D_NR, D_rand, D_det (standard model)")
    builds = {
        "D_R": client.robustify(rob_id, d, limit=p.build_limit, batch_size=p.batch_size, name="D_R", **p.inversion),
        "D_NR": client.build_nonrobust_dataset("d_nr", std_id, d, limit=p.build_limit, batch_size=p.batch_size,
                                               name="D_NR", **p.inversion),
        "D_rand": client.build_nonrobust_dataset("d_rand", std_id, d, limit=p.build_limit, batch_size=p.batch_size,
                                                 attack=p.relabel_attack, name="D_rand"),
        "D_det": client.build_nonrobust_dataset("d_det", std_id, d, limit=p.build_limit, batch_size=p.batch_size,
                                                attack=p.relabel_attack, name="D_det"),
    }
    built = {name: op.result() for name, op in builds.items()}

    log("\n[3/4] Train a standard model on each constructed set")
    rows = [Row("D (standard)", d, std_id), Row("D (adversarial)", d, rob_id)]
    for name, res in built.items():
        model_id = _train(client, p, res.dataset_id, f"standard on {name}", p.new_set_train, 0)
        rows.append(Row(name, res.dataset_id, model_id, diagnostics=_diagnostics(res)))

    log("\n[4/4] Evaluate every model on the original test set")
    for row in rows:
        ev = client.evaluate(row.model_id, d, split="test", limit=p.test_limit,
                             attacks=[{"norm": "L2", "eps": list(p.eval_eps), "steps": p.eval_steps}]).result()
        row.clean = ev.clean_accuracy
        row.sweep = {f"{r.attack.eps:g}": r.robust_accuracy for r in ev.robust}
        row.robust_025 = row.sweep.get("0.25")

    log("\n" + _table(rows, p))
    _write_report(client, p, rows, built, out, time.perf_counter() - t0)
    log(f"\nReport: {out / 'report.md'} ({time.perf_counter() - t0:.0f} s)")
    return rows


def _table(rows: list[Row], p: Preset) -> str:
    eps = [f"{e:g}" for e in p.eval_eps if e != 0.25]
    return table(["training set", "std acc", "paper", "robust @0.25", "paper"] + [f"@{e}" for e in eps],
                 [[r.training_set, fmt_rate(r.clean), fmt_rate(PAPER[r.training_set][0]), fmt_rate(r.robust_025),
                   fmt_rate(PAPER[r.training_set][1])] + [fmt_rate(r.sweep.get(e)) for e in eps]
                  for r in rows])


def _write_report(client: Client, p: Preset, rows: list[Row], built: dict, out: Path, wall: float) -> None:
    """results.json and report.md first, then the figures: a crash while drawing loses no result."""
    (out / "results.json").write_text(json.dumps({"preset": asdict(p), "rows": [asdict(r) for r in rows],
                                                  "paper": PAPER, "wall_seconds": wall}, indent=2, default=str))
    eps_text = ", ".join(f"{e:g}" for e in p.eval_eps)
    lines = [f"# Ilyas et al. (2019) reproduced through advex — preset `{p.name}`", "",
             f"Dataset **{p.dataset}**, architecture **{p.arch}** {p.arch_args or ''}; wall time {wall / 60:.1f} min.",
             "Accuracies are on the original test set "
             f"({p.test_limit or 'all'} examples); robust accuracy is PGD-{p.eval_steps} at L2 eps {eps_text} "
             "(the paper reports eps 0.25). The paper's numbers are for CIFAR-10 with ResNet-50.", "",
             "| training set | standard acc. | paper | robust acc. (L2 0.25) | paper | "
             + " | ".join(f"robust @{e:g}" for e in p.eval_eps if e != 0.25) + " |",
             "|---|---|---|---|---|" + "---|" * sum(e != 0.25 for e in p.eval_eps)]
    for r in rows:
        extra = " | ".join(fmt_rate(r.sweep.get(f"{e:g}")) for e in p.eval_eps if e != 0.25)
        lines.append(f"| {r.training_set} | {fmt_rate(r.clean)} | {fmt_rate(PAPER[r.training_set][0])} | "
                     f"{fmt_rate(r.robust_025)} | {fmt_rate(PAPER[r.training_set][1])} | {extra} |")
    lines += ["", "![figure 2](figure2.png)", "",
              "Figure 2: bars are this run (standard accuracy, then robust accuracy at each eps); black marks are the "
              "paper's numbers (standard accuracy and robust accuracy at eps 0.25).", "",
              "## Reductions from the paper's settings", ""]
    lines += [f"- {r}" for r in p.reductions] or ["- none"]
    lines += ["", "## Settings", "", "```json", json.dumps(
        {k: v for k, v in asdict(p).items() if k not in ("reductions", "name")}, indent=2, default=str), "```",
        "", "## Construction diagnostics", ""]
    for r in rows[2:]:
        lines.append(f"- **{r.training_set}** (`{r.dataset_id}`): " + ", ".join(f"{k} {v}" for k, v in r.diagnostics.items()))
    lines += ["", "## Samples", "", "Rows: training images x, then the example of each constructed set with the same "
              "index (D_R / D_NR keep the label y; D_rand / D_det carry the target label).", "",
              "![samples](samples.png)", "", "## Models", ""]
    lines += [f"- {r.training_set}: model `{r.model_id}` trained on `{r.dataset_id}`" for r in rows]
    (out / "report.md").write_text("\n".join(lines) + "\n")

    draw_figure2(p, rows, out / "figure2.png")
    n = 8
    x, y = client.download_dataset(p.dataset, limit=n)
    names = list(client.get_dataset(p.dataset).class_names) or [str(i) for i in range(10)]
    grid_rows = [("D (x)", _as_float(x), [names[int(v)] for v in y])]
    for name, res in built.items():
        xs, ys = client.download_dataset(res.dataset_id, limit=n)
        grid_rows.append((name, _as_float(xs), [names[int(v)] for v in ys]))
    image_grid(grid_rows, out / "samples.png")


def draw_figure2(p: Preset, rows: list[Row], path: Path):
    """figure2.png from the rows (also from a results.json: see scripts/redraw_figures.py)."""
    return plots.figure2([r.training_set for r in rows], [r.clean for r in rows],
                         {e: [r.sweep.get(f"{e:g}") for r in rows] for e in p.eval_eps}, path,
                         title=f"advex reproduce ({p.name}, {p.dataset}): accuracy on the original test set",
                         paper_standard=[PAPER[r.training_set][0] for r in rows],
                         paper_robust={0.25: [PAPER[r.training_set][1] for r in rows]},
                         paper_label="paper (CIFAR-10, ResNet-50)")


def _as_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


# ---------------------------------------------------------------- §3.3: transferability

PAPER_TRANSFER_CLAIM = (
    "Ilyas et al. §3.3 (Figure 3): adversarial examples crafted on a ResNet-50 transfer to other "
    "architectures (VGG-16, Inception-v3, DenseNet, ResNet-18, ResNet-50) at rates that track how well each "
    "architecture learns from the ResNet-50's D_det: the better an architecture generalizes from D_det's "
    "non-robust features to the original test set, the more often those adversarial examples fool it.")


@dataclass
class TransferPreset:
    name: str
    dataset: str
    source_arch: str
    source_args: dict
    architectures: dict          # name -> (arch, arch_args)
    train_limit: int
    build_limit: int
    test_limit: int
    train: dict
    relabel_attack: dict         # D_det
    transfer_attack: dict        # crafted once on the source
    new_set_train: dict
    mean: tuple = ()
    std: tuple = ()
    reductions: list = field(default_factory=list)


TRANSFER_PRESETS = {
    "tiny": TransferPreset(
        name="tiny", dataset="fashion-mnist", source_arch="small_cnn", source_args={"width": 8},
        architectures={"small_cnn": ("small_cnn", {"width": 8}), "mlp": ("mlp", {"hidden": 64}),
                       "linear": ("linear", {})},
        train_limit=1000, build_limit=300, test_limit=200,   # 1 epoch of 600 left the source at chance (10%):
        train=dict(epochs=3, batch_size=64, lr=0.05, schedule="cosine"),  # no attack could succeed on it
        relabel_attack=dict(norm="L2", eps=2.0, steps=10, step_size=0.4),
        transfer_attack=dict(norm="L2", eps=2.0, steps=10),
        new_set_train=dict(epochs=2, batch_size=64, lr=0.05, schedule="cosine"),
        reductions=["smoke-test scale; the numbers are not a reproduction"]),
    "small": TransferPreset(
        name="small", dataset="fashion-mnist", source_arch="small_cnn", source_args={"width": 16},
        architectures={"small_cnn": ("small_cnn", {"width": 16}), "resnet18": ("resnet18", {}),
                       "mlp": ("mlp", {"hidden": 256}), "linear": ("linear", {})},
        train_limit=5000, build_limit=2000, test_limit=1000,
        train=dict(epochs=3, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        relabel_attack=dict(norm="L2", eps=2.0, steps=50, step_size=0.1),
        transfer_attack=dict(norm="L2", eps=2.0, steps=20),
        new_set_train=dict(epochs=8, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        reductions=[
            "Fashion-MNIST instead of CIFAR-10; the source is a small CNN (width 16) instead of a ResNet-50",
            "architectures: small CNN (another seed), ResNet-18 (CIFAR stem), a one-hidden-layer MLP and a linear "
            "model: four families instead of the paper's five ImageNet-class networks",
            "5,000 training images for the models on D, 2,000 turned into D_det, 1,000 test images",
            "D_det: L2 eps 2.0 (Fashion-MNIST models are robust to 0.5), 50 steps of 0.1",
            "transfer attack: untargeted PGD-20 at L2 eps 2.0 on the source, reused for every target"]),
    "cifar10": TransferPreset(
        name="cifar10", dataset="cifar10", source_arch="resnet50", source_args={},
        architectures={"resnet18": ("resnet18", {}), "resnet50": ("resnet50", {}), "small_cnn": ("small_cnn", {}),
                       "mlp": ("mlp", {"hidden": 1024})},
        train_limit=0, build_limit=0, test_limit=10000, train=PAPER_TRAIN,
        relabel_attack=dict(norm="L2", eps=0.5, steps=100, step_size=0.1),
        transfer_attack=dict(norm="L2", eps=0.5, steps=20),
        new_set_train=PAPER_TRAIN, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        reductions=["four families from the zoo (VGG, Inception and DenseNet are not in the zoo)"]),
}


@dataclass
class TransferRow:
    architecture: str
    model_on_d: str
    model_on_d_det: str
    clean_accuracy_on_d: float = 0.0
    d_det_accuracy: float = 0.0       # standard accuracy on the original test set after training on D_det
    transfer_rate: Optional[float] = None       # transferred / successful_on_source; None over 0/0
    unconditional_rate: Optional[float] = None  # None when the target gets no example right
    successful_on_source: int = 0
    transferred: int = 0


def pearson_r(xs, ys) -> Optional[float]:
    """Pearson's r over the pairs where both values are known (not None, not nan); None when fewer
    than 3 such pairs or when either side does not vary (r is undefined or meaningless there)."""
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys)
             if x is not None and y is not None and np.isfinite(float(x)) and np.isfinite(float(y))]
    if len(pairs) < 3:
        return None
    a, b = np.array(pairs).T
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def run_transfer(client: Client, p: TransferPreset, out: Path, log: Callable[[str], None] = print) -> dict:
    t0 = _start(out, log, f"advex reproduce transfer — preset {p.name!r}: {p.dataset}, source {p.source_arch}.",
                p.reductions)
    d = p.dataset

    def train(arch: str, args: dict, dataset_id: str, settings: dict, limit: int, name: str, seed: int) -> str:
        return client.train(arch, dataset_id, limit=limit, name=name, arch_args=args, mean=p.mean, std=p.std,
                            seed=seed, **settings).result().model_id

    log("\n[1/4] Train the source model on D and build its D_det")
    source = train(p.source_arch, p.source_args, d, p.train, p.train_limit, "transfer source", 0)
    d_det = client.build_nonrobust_dataset("d_det", source, d, limit=p.build_limit, attack=p.relabel_attack,
                                           name="D_det of the transfer source").result()
    log(f"      D_det target-hit rate {fmt_rate(d_det.target_hit_rate)}")

    log("\n[2/4] Train every architecture on D and on D_det")
    rows = []
    for k, (name, (arch, args)) in enumerate(p.architectures.items()):
        on_d = train(arch, args, d, p.train, p.train_limit, f"{name} on D", 100 + k)
        on_det = train(arch, args, d_det.dataset_id, p.new_set_train, 0, f"{name} on D_det", 200 + k)
        rows.append(TransferRow(name, on_d, on_det))

    log("\n[3/4] Accuracy on the original test set")
    for row in rows:
        for model_id, attr in ((row.model_on_d, "clean_accuracy_on_d"), (row.model_on_d_det, "d_det_accuracy")):
            ev = client.evaluate(model_id, d, split="test", limit=p.test_limit).result()
            setattr(row, attr, ev.clean_accuracy)

    log("\n[4/4] Transfer from the source to each architecture (trained on D)")
    attack = dict(p.transfer_attack)
    tr = client.transfer_rate([source], [r.model_on_d for r in rows], d, split="test", limit=p.test_limit,
                              norm=attack.pop("norm"), eps=attack.pop("eps"), **attack).result()
    targeted = bool(p.transfer_attack.get("targeted"))
    for row, pair in zip(rows, tr.pairs):
        row.transfer_rate = rate(pair.transferred, pair.successful_on_source)
        row.unconditional_rate = rate(pair.fooled_target, pair.examples if targeted else pair.correct_on_target)
        row.successful_on_source, row.transferred = pair.successful_on_source, pair.transferred

    corr = pearson_r([r.transfer_rate for r in rows], [r.d_det_accuracy for r in rows])
    summary = {"preset": asdict(p), "rows": [asdict(r) for r in rows], "pearson_r": corr,
               "d_det": {"dataset_id": d_det.dataset_id, "target_hit_rate": d_det.target_hit_rate},
               "source_model_id": source, "definition": tr.definition, "wall_seconds": time.perf_counter() - t0}
    _write_transfer_report(p, rows, summary, out, log)
    log(f"\nPearson r = {fmt_rate(corr, '.2f')}. Report: {out / 'report.md'} ({summary['wall_seconds']:.0f} s)")
    return summary


def _correlation_text(rows: list[TransferRow], corr: Optional[float]) -> str:
    known = sum(r.transfer_rate is not None for r in rows)
    over = f"{len(rows)}" if known == len(rows) else f"{known} of {len(rows)}"
    if corr is not None:
        return f"Pearson r = {corr:.2f} over {over} architectures"
    if known < 3:
        return f"Pearson r = n/a ({over} architectures have a transfer rate; it takes 3)"
    return f"Pearson r = n/a (over {over} architectures, one of the two values does not vary)"


def _write_transfer_report(p: TransferPreset, rows: list[TransferRow], summary: dict, out: Path,
                           log: Callable[[str], None] = print) -> None:
    """transfer.json and report.md first, then the table, then the figure: a crash while drawing
    loses no result."""
    (out / "transfer.json").write_text(json.dumps(summary, indent=2, default=str))
    corr, wall = summary["pearson_r"], summary["wall_seconds"]
    headers = ["architecture", "acc. on D", "acc. after D_det", "transfer rate", "unconditional", "transferred"]
    cells = [[r.architecture, fmt_rate(r.clean_accuracy_on_d), fmt_rate(r.d_det_accuracy), fmt_rate(r.transfer_rate),
              fmt_rate(r.unconditional_rate), f"{r.transferred}/{r.successful_on_source}"] for r in rows]
    lines = [f"# Transferability and D_det (Ilyas et al. §3.3) through advex — preset `{p.name}`", "",
             PAPER_TRANSFER_CLAIM, "",
             f"Here: source **{p.source_arch}** {p.source_args or ''} on **{p.dataset}**; D_det target-hit rate "
             f"{fmt_rate(summary['d_det']['target_hit_rate'])}; wall time {wall / 60:.1f} min. "
             f"**{_correlation_text(rows, corr)}**, between the transfer rate and the accuracy after training on "
             "D_det.", ""]
    if any(r.transfer_rate is None for r in rows):
        lines += ["A transfer rate reads n/a where the source's attack succeeded on no test example (0/0); "
                  "such architectures are left out of the correlation and the figure.", ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    lines += ["", "![transfer vs D_det](transfer_vs_d_det.png)", "", "## Definitions", "", summary["definition"], "",
              "## Reductions", ""] + [f"- {r}" for r in p.reductions]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    log("\n" + table(headers, cells))
    draw_transfer_figure(p, rows, corr, out / "transfer_vs_d_det.png")


def draw_transfer_figure(p: TransferPreset, rows: list[TransferRow], corr: Optional[float], path: Path):
    """transfer_vs_d_det.png (also from a transfer.json: see scripts/redraw_figures.py)."""
    return plots.scatter([(r.architecture, r.transfer_rate, r.d_det_accuracy) for r in rows], path,
                         xlabel="transfer rate from the source (targets trained on D)",
                         ylabel="test accuracy after training on D_det",
                         title=f"advex reproduce transfer ({p.name}): {len(rows)} architectures, "
                               f"source {p.source_arch}",
                         note=_correlation_text(rows, corr))
