"""`advex reproduce`: Ilyas et al. (NeurIPS 2019) through the service only.

Train a standard and an adversarially trained model on D; build D_R (through the robust
model), D_NR, D_rand and D_det (through the standard one); train a standard model on each, and a
matched control: a standard model on the same images of D the sets were built from, with the
same training as the constructed sets, so that a gap between D and D_R is not a gap in data or
epochs. Evaluate all seven on the original test set: standard accuracy, and robust accuracy at
every eps as the worst case of an evaluation suite (AutoAttack; its fast variant, APGD-CE +
APGD-T, on the CPU presets), each with its 95% interval. `seeds` > 1 repeats the whole pipeline
with other seeds (training and construction) and reports mean and spread.

The report folder: results.json and report.md (table beside the paper's numbers, settings,
reductions, diagnostics) first, then the figures: figure2.png (bars in the style of the paper's
Figure 2, at every evaluated eps, with whiskers) and samples.png (x beside its D_R / D_NR /
D_rand / D_det counterparts, with labels). A rate over an empty denominator is "n/a" (null in
JSON), never 0%.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from advex.client import plots
from advex.client.render import fmt_range, fmt_rate, image_grid, rate, table
from advex.client.sdk import Client

CONTROL = "D (matched control)"
# PAPER.md: CIFAR-10 test set, (standard accuracy, robust accuracy at L2 eps 0.25). The matched
# control is advex's own addition: the paper has no number for it.
PAPER = {
    "D (standard)": (0.953, 0.045),
    "D (adversarial)": (0.91, 0.825),
    CONTROL: (None, None),
    "D_R": (0.84, 0.48),
    "D_NR": (0.88, 0.005),
    "D_rand": (0.633, 0.0),
    "D_det": (0.437, 0.0),
}
ROWS = list(PAPER)
PAPER_EPS = 0.25
SUITE_ATTACKS = {"autoattack": "APGD-CE, APGD-T, FAB-T, Square", "autoattack-fast": "APGD-CE, APGD-T",
                 "pgd": "PGD-50"}


@dataclass
class Preset:
    name: str
    dataset: str
    arch: str
    arch_args: dict
    train_limit: int            # examples of D used for the two models on D (0 = all)
    build_limit: int            # the first examples of D turned into D_R, D_NR, D_rand, D_det (0 = all)
    test_limit: int             # test examples evaluated (0 = all)
    train: dict                 # standard training on D
    robust_attack: dict         # adversarial training's inner loop
    new_set_train: dict         # standard training on each constructed set (and the matched control)
    inversion: dict             # D_R / D_NR
    relabel_attack: dict        # D_rand / D_det
    eval_eps: tuple = (0.25, 0.5, 1.0)
    eval_suite: str = "autoattack"  # the evaluation suite (L2, at every eval_eps)
    mean: tuple = ()
    std: tuple = ()
    reductions: list = field(default_factory=list)
    batch_size: int = 128

    @classmethod
    def from_json(cls, data: dict) -> "Preset":
        """A preset from a results.json (keys of older versions that no longer exist are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


PAPER_TRAIN = dict(epochs=150, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="step",
                   lr_step_epochs=50, lr_gamma=0.1, augment=True)
FAST_SUITE_NOTE = ("evaluation: the autoattack-fast suite (APGD-CE then APGD-T, 100 steps each, worst case per "
                   "example) instead of the full AutoAttack (which adds FAB-T and Square-5000): the CPU preset's "
                   "budget. Run the full suite on a GPU with --suite autoattack")

PRESETS = {
    "tiny": Preset(  # a smoke test of the whole pipeline (about a minute); its numbers mean little
        name="tiny", dataset="fashion-mnist", arch="small_cnn", arch_args={"width": 8},
        train_limit=1000, build_limit=200, test_limit=100,
        train=dict(epochs=1, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        robust_attack=dict(norm="L2", eps=0.5, steps=3, step_size=0.25),
        new_set_train=dict(epochs=2, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        inversion=dict(steps=20, step_size=0.1),
        relabel_attack=dict(norm="L2", eps=0.5, steps=10, step_size=0.1),
        eval_eps=(0.25, 1.0), eval_suite="pgd",
        reductions=["smoke-test scale: 1,000 training images, 200 per constructed set, 1-2 epochs, "
                    "20 inversion steps, 10 relabelling steps, 100 test images; the numbers are not a reproduction",
                    "evaluation: the pgd suite (PGD-50) instead of AutoAttack, to keep the smoke test at a minute; "
                    "its robust accuracies are upper bounds"]),
    "small": Preset(
        name="small", dataset="fashion-mnist", arch="small_cnn", arch_args={"width": 16},
        train_limit=10000, build_limit=3000, test_limit=1000,
        train=dict(epochs=4, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        robust_attack=dict(norm="L2", eps=0.5, steps=7, step_size=0.1),
        new_set_train=dict(epochs=10, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        inversion=dict(steps=200, step_size=0.1),
        relabel_attack=dict(norm="L2", eps=2.0, steps=50, step_size=0.1),
        eval_eps=(0.25, 0.5, 1.0, 2.0), eval_suite="autoattack-fast",
        reductions=[
            "Fashion-MNIST (28x28 grey) instead of CIFAR-10; a small CNN (width 16, pooled representation) "
            "instead of ResNet-50",
            "D: 10,000 training images for the two models on D; the first 3,000 of them turned into each "
            "constructed set (and used by the matched control); 1,000 test images evaluated",
            "training: 4 epochs on D, 10 epochs on each constructed set and the matched control (SGD lr 0.05, "
            "cosine) instead of 150 epochs with steps at 50 and 100",
            "D_R / D_NR: 200 inversion steps of 0.1 instead of 1000",
            "D_rand / D_det: L2 eps 2.0 instead of 0.5, 50 PGD steps of 0.1 instead of 100. Fashion-MNIST models "
            "are far more robust than CIFAR-10 ones: at eps 0.5 the targeted attack reaches only ~10% of its "
            "targets (measured), so D_det would carry y's features under label y+1 instead of the target's "
            "non-robust features; at eps 2.0 it reaches ~90%",
            "robust model: L2 eps 0.5, 7 steps of 0.1, random start (the paper's settings), 4 epochs",
            FAST_SUITE_NOTE,
        ]),
    "cifar10": Preset(
        name="cifar10", dataset="cifar10", arch="resnet18", arch_args={},
        train_limit=0, build_limit=0, test_limit=0,
        train=PAPER_TRAIN,
        robust_attack=dict(norm="L2", eps=0.5, steps=7, step_size=0.1),
        new_set_train=PAPER_TRAIN,
        inversion=dict(steps=1000, step_size=0.1),
        relabel_attack=dict(norm="L2", eps=0.5, steps=100, step_size=0.1),
        eval_eps=(0.25, 0.5), eval_suite="autoattack", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        reductions=["ResNet-18 instead of ResNet-50 (resnet50 is one --arch away)",
                    "no learning-rate grid search: lr 0.1 with augmentation for every training set"],
        batch_size=256),
}


@dataclass
class Row:
    """One model of one seed: what it was trained on and its accuracies on the original test set."""

    training_set: str
    dataset_id: str
    model_id: str
    seed: int = 0
    clean: float = 0.0
    clean_ci: Optional[list] = None      # [lower, upper], the 95% interval the server reported
    robust_025: Optional[float] = None   # None when eps 0.25 is not in the preset's eval_eps
    sweep: dict = field(default_factory=dict)     # "eps" -> robust accuracy (the suite's worst case)
    sweep_ci: dict = field(default_factory=dict)  # "eps" -> [lower, upper]
    suite: str = ""                      # the suite that produced `sweep`, as the server named it
    diagnostics: dict = field(default_factory=dict)


def _train(client: Client, p: Preset, dataset_id: str, name: str, settings: dict, limit: int, seed: int,
           adversarial: Optional[dict] = None) -> str:
    op = client.train(p.arch, dataset_id, limit=limit, name=name, arch_args=p.arch_args, adversarial=adversarial,
                      mean=p.mean, std=p.std, seed=seed, **settings)
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


def _interval(message, name: str) -> Optional[list]:
    """[lower, upper] of an advex.v1.Interval field; None where the server left it unset."""
    if not message.HasField(name):
        return None
    ci = getattr(message, name)
    return [ci.lower, ci.upper]


def _evaluate(client: Client, p: Preset, row: Row) -> None:
    """Fill row's accuracies: clean, and at every eps the worst case of the preset's suite."""
    ev = client.evaluate(row.model_id, p.dataset, split="test", limit=p.test_limit, suite=p.eval_suite,
                         attacks=[{"norm": "L2", "eps": list(p.eval_eps)}]).result()
    row.clean, row.clean_ci = ev.clean_accuracy, _interval(ev, "clean_accuracy_ci")
    row.sweep = {f"{w.eps:g}": w.robust_accuracy for w in ev.worst_case}
    row.sweep_ci = {f"{w.eps:g}": _interval(w, "robust_accuracy_ci") for w in ev.worst_case}
    row.robust_025 = row.sweep.get(f"{PAPER_EPS:g}")
    row.suite = ",".join(sorted({r.suite for r in ev.robust if r.suite}))


def run_seed(client: Client, p: Preset, seed: int, log: Callable[[str], None] = print) -> tuple[list[Row], dict]:
    """The whole pipeline once: the seven rows (ROWS order) and the constructed sets' results."""
    d = p.dataset
    log(f"\n[1/4] seed {seed}: train a standard and an adversarially trained model on D, and the matched control")
    std_id = _train(client, p, d, "D standard", p.train, p.train_limit, seed)
    rob_id = _train(client, p, d, "D adversarial", p.train, p.train_limit, seed, adversarial=p.robust_attack)
    control_id = _train(client, p, d, "D matched control", p.new_set_train, p.build_limit, seed)

    log(f"\n[2/4] seed {seed}: build D_R (robust model), D_NR, D_rand, D_det (standard model)")
    common = dict(limit=p.build_limit, batch_size=p.batch_size, seed=seed)
    builds = {
        "D_R": client.robustify(rob_id, d, name="D_R", **common, **p.inversion),
        "D_NR": client.build_nonrobust_dataset("d_nr", std_id, d, name="D_NR", **common, **p.inversion),
        "D_rand": client.build_nonrobust_dataset("d_rand", std_id, d, attack=p.relabel_attack, name="D_rand",
                                                 **common),
        "D_det": client.build_nonrobust_dataset("d_det", std_id, d, attack=p.relabel_attack, name="D_det", **common),
    }
    built = {name: op.result() for name, op in builds.items()}

    log(f"\n[3/4] seed {seed}: train a standard model on each constructed set")
    rows = [Row("D (standard)", d, std_id, seed), Row("D (adversarial)", d, rob_id, seed), Row(CONTROL, d, control_id, seed)]
    for name, res in built.items():
        model_id = _train(client, p, res.dataset_id, f"standard on {name}", p.new_set_train, 0, seed)
        rows.append(Row(name, res.dataset_id, model_id, seed, diagnostics=_diagnostics(res)))

    log(f"\n[4/4] seed {seed}: evaluate every model on the original test set ({p.eval_suite} suite)")
    for row in rows:
        _evaluate(client, p, row)
    return rows, built


def run(client: Client, p: Preset, out: Path, log: Callable[[str], None] = print, *, seeds: int = 1) -> list[Row]:
    """The experiment at seeds 0 .. seeds-1; every seed's rows, in seed then ROWS order."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    t0 = _start(out, log, f"advex reproduce — preset {p.name!r}: {p.dataset}, {p.arch}, {seeds} seed(s).",
                p.reductions)
    rows: list[Row] = []
    built: dict = {}
    for seed in range(seeds):
        seed_rows, seed_built = run_seed(client, p, seed, log)
        rows += seed_rows
        built = built or seed_built  # the samples figure shows the first seed's sets
    headers, cells = report_table(p, rows)
    log("\n" + table(headers, cells))
    _write_report(client, p, rows, built, out, time.perf_counter() - t0)
    log(f"\nReport: {out / 'report.md'} ({time.perf_counter() - t0:.0f} s)")
    return rows


# ---------------------------------------------------------------- numbers for people

@dataclass
class Spread:
    """One accuracy over seeds: the mean, the sample standard deviation (None for one seed), the
    range, and for one seed its 95% interval."""

    values: list
    interval: Optional[list] = None

    @property
    def known(self) -> bool:
        return bool(self.values) and all(v is not None for v in self.values)

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.values) if self.known else None

    @property
    def sd(self) -> Optional[float]:
        return statistics.stdev(self.values) if self.known and len(self.values) > 1 else None

    def text(self) -> str:
        """"82.8% (80.3-85.1)" for one seed (the 95% interval), "82.8% ± 1.2 (81.1-84.0)" for
        several (sample sd in pp, then min-max); "n/a" when a seed has no number."""
        if not self.known:
            return "n/a"
        if len(self.values) == 1:
            ci = self.interval
            return fmt_rate(self.mean) + (f" ({fmt_range(*ci, unit='')})" if ci else "")
        return f"{fmt_rate(self.mean)} ± {100 * self.sd:.1f} ({fmt_range(min(self.values), max(self.values), unit='')})"

    def whisker(self) -> Optional[tuple]:
        """The figure's whisker: the 95% interval (one seed) or mean ± sd (several)."""
        if not self.known:
            return None
        if len(self.values) == 1:
            return tuple(self.interval) if self.interval else None
        return (self.mean - self.sd, self.mean + self.sd)

    def as_json(self) -> dict:
        return {"mean": self.mean, "sd": self.sd, "min": min(self.values) if self.known else None,
                "max": max(self.values) if self.known else None, "n": len(self.values), "ci95": self.interval}


def column_eps(p: Preset) -> list[float]:
    """The table's robust-accuracy columns: every evaluated eps, and the paper's 0.25 even when it
    was not evaluated (it then reads n/a beside the paper's number)."""
    return sorted(set(float(e) for e in p.eval_eps) | {PAPER_EPS})


def summarize(rows: Sequence[Row], p: Preset) -> dict:
    """training set -> {"clean": Spread, eps: Spread for every column eps}, over the seeds."""
    out: dict = {}
    for name in ROWS:
        mine = [r for r in rows if r.training_set == name]
        if not mine:
            continue
        one = len(mine) == 1
        cells = {"clean": Spread([r.clean for r in mine], mine[0].clean_ci if one else None)}
        for e in column_eps(p):
            key = f"{e:g}"
            cells[key] = Spread([r.sweep.get(key) for r in mine], mine[0].sweep_ci.get(key) if one else None)
        out[name] = cells
    return out


def report_table(p: Preset, rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the results table (printed, and written to report.md): per training
    set, standard accuracy and robust accuracy at every column eps, the paper's beside its own."""
    summary = summarize(rows, p)
    headers = ["training set", "standard acc.", "paper"]
    for e in column_eps(p):
        headers.append(f"robust @{e:g}")
        if e == PAPER_EPS:
            headers.append(f"paper @{e:g}")
    cells = []
    for name, cell in summary.items():
        paper_std, paper_rob = PAPER[name]
        line = [name, cell["clean"].text(), _paper(paper_std)]
        for e in column_eps(p):
            line.append(cell[f"{e:g}"].text())
            if e == PAPER_EPS:
                line.append(_paper(paper_rob))
        cells.append(line)
    return headers, cells


def _paper(value: Optional[float]) -> str:
    return "—" if value is None else fmt_rate(value)


def _suite_text(rows: Sequence[Row], p: Preset) -> str:
    suites = sorted({r.suite for r in rows if r.suite}) or [p.eval_suite]
    return "; ".join(f"`{s}` ({SUITE_ATTACKS.get(s, 'as named by the server')})" for s in suites)


def _write_report(client: Client, p: Preset, rows: list[Row], built: dict, out: Path, wall: float) -> None:
    """results.json and report.md first, then the figures: a crash while drawing loses no result."""
    seeds = sorted({r.seed for r in rows})
    summary = summarize(rows, p)
    (out / "results.json").write_text(json.dumps(
        {"preset": asdict(p), "seeds": seeds, "rows": [asdict(r) for r in rows],
         "summary": {name: {k: s.as_json() for k, s in cells.items()} for name, cells in summary.items()},
         "paper": PAPER, "wall_seconds": wall}, indent=2, default=str))
    headers, cells = report_table(p, rows)
    spread = ("each cell: the accuracy and its 95% Clopper-Pearson interval (in %, from the server)" if len(seeds) == 1
              else f"each cell: the mean over {len(seeds)} seeds ± the sample standard deviation (pp), then the "
                   "range over the seeds (in %)")
    lines = [f"# Ilyas et al. (2019) reproduced through advex — preset `{p.name}`", "",
             f"Dataset **{p.dataset}**, architecture **{p.arch}** {p.arch_args or ''}; seeds {seeds}; wall time "
             f"{wall / 60:.1f} min.",
             f"Accuracies are on the original test set ({p.test_limit or 'all'} examples). Robust accuracy is the "
             f"worst case per example of the {_suite_text(rows, p)} suite at L2 eps "
             f"{', '.join(f'{e:g}' for e in p.eval_eps)} (the paper reports PGD at eps 0.25); {spread}. "
             "The paper's numbers are for CIFAR-10 with ResNet-50.", "",
             f"**{CONTROL}** is a standard model trained on the same {p.build_limit or 'all'} images of D the "
             "constructed sets were built from, with their training settings: D_R's gap to it is the effect of the "
             "construction, not of less data or fewer epochs. The paper has no such row (—).", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    lines += ["", "![figure 2](figure2.png)", "",
              "Figure 2: bars are this run (standard accuracy, then robust accuracy at each eps; whiskers: "
              + ("the 95% interval" if len(seeds) == 1 else "± one standard deviation over the seeds")
              + "); black marks are the paper's numbers (standard accuracy and robust accuracy at eps 0.25).", "",
              "## Reductions from the paper's settings", ""]
    lines += [f"- {r}" for r in p.reductions] or ["- none"]
    lines += ["", "## Settings", "", "```json", json.dumps(
        {k: v for k, v in asdict(p).items() if k not in ("reductions", "name")}, indent=2, default=str), "```",
        "", "## Construction diagnostics", ""]
    for r in rows:
        if r.diagnostics:
            lines.append(f"- **{r.training_set}**, seed {r.seed} (`{r.dataset_id}`): "
                         + ", ".join(f"{k} {v}" for k, v in r.diagnostics.items()))
    lines += ["", "## Samples", "", "Rows: training images x, then the example of each constructed set with the same "
              "index (D_R / D_NR keep the label y; D_rand / D_det carry the target label); seed 0.", "",
              "![samples](samples.png)", "", "## Models", ""]
    lines += [f"- {r.training_set}, seed {r.seed}: model `{r.model_id}` trained on `{r.dataset_id}`" for r in rows]
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
    """figure2.png from the rows (also from a results.json: see scripts/redraw_figures.py): the
    mean over seeds per bar, whiskers as in Spread.whisker."""
    summary = summarize(rows, p)
    names = list(summary)
    seeds = len({r.seed for r in rows})
    return plots.figure2(names, [summary[n]["clean"].mean for n in names],
                         {e: [summary[n][f"{e:g}"].mean for n in names] for e in p.eval_eps}, path,
                         title=f"advex reproduce ({p.name}, {p.dataset}, {seeds} seed{'s' * (seeds > 1)}): "
                               "accuracy on the original test set",
                         paper_standard=[PAPER[n][0] for n in names],
                         paper_robust={PAPER_EPS: [PAPER[n][1] for n in names]},
                         paper_label="paper (CIFAR-10, ResNet-50)",
                         standard_whiskers=[summary[n]["clean"].whisker() for n in names],
                         robust_whiskers={e: [summary[n][f"{e:g}"].whisker() for n in names] for e in p.eval_eps})


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
    # the paper's reading: among the source's successes that the target classifies correctly on x
    conditional_rate: Optional[float] = None    # transferred_target_correct / successful_target_correct
    successful_target_correct: int = 0
    transferred_target_correct: int = 0
    d_det_accuracy_ci: Optional[list] = None    # 95% intervals [lower, upper] from the server
    transfer_rate_ci: Optional[list] = None
    unconditional_rate_ci: Optional[list] = None
    conditional_rate_ci: Optional[list] = None


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


def pearson_interval(r: Optional[float], n: int, z: float = 1.959964) -> Optional[list]:
    """The approximate 95% interval of Pearson's r over n pairs (Fisher's z-transform: atanh(r) is
    about normal with standard error 1/sqrt(n-3)); None when r is unknown or n < 4. With few pairs it
    is wide, and says so: r over 4 architectures is one noisy number."""
    if r is None or n < 4:
        return None
    centre = math.atanh(max(-0.999999, min(0.999999, r)))
    half = z / math.sqrt(n - 3)
    return [math.tanh(centre - half), math.tanh(centre + half)]


def _fmt_interval(ci: Optional[Sequence[float]], spec: str = "pct") -> str:
    if ci is None:
        return "n/a"
    return f"{ci[0]:.2f} to {ci[1]:.2f}" if spec == "r" else fmt_range(*ci)


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
        row.clean_accuracy_on_d = client.evaluate(row.model_on_d, d, split="test", limit=p.test_limit).result() \
            .clean_accuracy
        ev = client.evaluate(row.model_on_d_det, d, split="test", limit=p.test_limit).result()
        row.d_det_accuracy, row.d_det_accuracy_ci = ev.clean_accuracy, _interval(ev, "clean_accuracy_ci")

    log("\n[4/4] Transfer from the source to each architecture (trained on D)")
    attack = dict(p.transfer_attack)
    tr = client.transfer_rate([source], [r.model_on_d for r in rows], d, split="test", limit=p.test_limit,
                              norm=attack.pop("norm"), eps=attack.pop("eps"), **attack).result()
    targeted = bool(p.transfer_attack.get("targeted"))
    for row, pair in zip(rows, tr.pairs):
        row.transfer_rate = rate(pair.transferred, pair.successful_on_source)
        row.unconditional_rate = rate(pair.fooled_target, pair.examples if targeted else pair.correct_on_target)
        row.conditional_rate = rate(pair.transferred_target_correct, pair.successful_target_correct)
        row.successful_on_source, row.transferred = pair.successful_on_source, pair.transferred
        row.successful_target_correct = pair.successful_target_correct
        row.transferred_target_correct = pair.transferred_target_correct
        row.transfer_rate_ci = _interval(pair, "transfer_rate_ci")
        row.unconditional_rate_ci = _interval(pair, "unconditional_rate_ci")
        row.conditional_rate_ci = _interval(pair, "conditional_transfer_rate_ci")

    corr = pearson_r([r.conditional_rate for r in rows], [r.d_det_accuracy for r in rows])
    known = sum(r.conditional_rate is not None for r in rows)
    summary = {"preset": asdict(p), "rows": [asdict(r) for r in rows], "pearson_r": corr,
               "pearson_r_ci": pearson_interval(corr, known),
               "correlated": "conditional_rate vs d_det_accuracy",
               "d_det": {"dataset_id": d_det.dataset_id, "target_hit_rate": d_det.target_hit_rate},
               "source_model_id": source, "definition": tr.definition, "wall_seconds": time.perf_counter() - t0}
    _write_transfer_report(p, rows, summary, out, log)
    log(f"\nPearson r = {fmt_rate(corr, '.2f')}. Report: {out / 'report.md'} ({summary['wall_seconds']:.0f} s)")
    return summary


CORRELATED = {"conditional_rate": "transfer rate from the source (targets trained on D; target right on x)",
              "transfer_rate": "transfer rate from the source (targets trained on D; all source successes)"}


def _correlation_text(rows: list[TransferRow], corr: Optional[float], rate_name: str = "conditional_rate") -> str:
    known = sum(getattr(r, rate_name) is not None for r in rows)
    over = f"{len(rows)}" if known == len(rows) else f"{known} of {len(rows)}"
    if corr is not None:
        ci = pearson_interval(corr, known)
        return f"Pearson r = {corr:.2f} over {over} architectures (95% interval {_fmt_interval(ci, 'r')})"
    if known < 3:
        return f"Pearson r = n/a ({over} architectures have a transfer rate; it takes 3)"
    return f"Pearson r = n/a (over {over} architectures, one of the two values does not vary)"


def _rate_cell(value: Optional[float], ci: Optional[Sequence[float]]) -> str:
    return fmt_rate(value) if value is None or ci is None else f"{fmt_rate(value)} ({_fmt_interval(ci)})"


TRANSFER_HEADERS = ["architecture", "acc. on D", "acc. after D_det", "transfer rate (target right on x)",
                    "transferred", "transfer rate (all)", "unconditional"]


def transfer_cells(rows: Sequence[TransferRow]) -> list[list[str]]:
    return [[r.architecture, fmt_rate(r.clean_accuracy_on_d), _rate_cell(r.d_det_accuracy, r.d_det_accuracy_ci),
             _rate_cell(r.conditional_rate, r.conditional_rate_ci),
             f"{r.transferred_target_correct}/{r.successful_target_correct}",
             _rate_cell(r.transfer_rate, r.transfer_rate_ci), _rate_cell(r.unconditional_rate, r.unconditional_rate_ci)]
            for r in rows]


def _write_transfer_report(p: TransferPreset, rows: list[TransferRow], summary: dict, out: Path,
                           log: Callable[[str], None] = print) -> None:
    """transfer.json and report.md first, then the table, then the figure: a crash while drawing
    loses no result."""
    (out / "transfer.json").write_text(json.dumps(summary, indent=2, default=str))
    corr, wall = summary["pearson_r"], summary["wall_seconds"]
    cells = transfer_cells(rows)
    lines = [f"# Transferability and D_det (Ilyas et al. §3.3) through advex — preset `{p.name}`", "",
             PAPER_TRANSFER_CLAIM, "",
             f"Here: source **{p.source_arch}** {p.source_args or ''} on **{p.dataset}**; D_det target-hit rate "
             f"{fmt_rate(summary['d_det']['target_hit_rate'])}; wall time {wall / 60:.1f} min. "
             f"**{_correlation_text(rows, corr)}**, between the transfer rate (target right on x) and the accuracy "
             "after training on D_det.", "",
             "The transfer rate is read as in the paper: among the source's successful adversarial examples whose "
             "clean x the target classifies correctly, the fraction that also fool the target (`transferred` "
             "counts them), so that a target's own clean errors do not count as transferred. Beside it, the rate "
             "over all the source's successes and the unconditional rate. Every rate carries its 95% "
             "Clopper-Pearson interval (from the server); r its Fisher-z interval.", ""]
    if any(r.conditional_rate is None for r in rows):
        lines += ["A transfer rate reads n/a where no source success was classified correctly by the target on x "
                  "(0/0); such architectures are left out of the correlation and the figure.", ""]
    lines += ["| " + " | ".join(TRANSFER_HEADERS) + " |", "|" + "---|" * len(TRANSFER_HEADERS)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    lines += ["", "![transfer vs D_det](transfer_vs_d_det.png)", "", "## Definitions", "", summary["definition"], "",
              "## Reductions", ""] + [f"- {r}" for r in p.reductions]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    log("\n" + table(TRANSFER_HEADERS, cells))
    draw_transfer_figure(p, rows, corr, out / "transfer_vs_d_det.png")


def draw_transfer_figure(p: TransferPreset, rows: list[TransferRow], corr: Optional[float], path: Path,
                         rate_name: str = "conditional_rate"):
    """transfer_vs_d_det.png (also from a transfer.json: see scripts/redraw_figures.py). rate_name:
    the rate on the x axis, the one `corr` was computed over (an older transfer.json has only
    "transfer_rate")."""
    return plots.scatter([(r.architecture, getattr(r, rate_name), r.d_det_accuracy) for r in rows], path,
                         xlabel=CORRELATED[rate_name], ylabel="test accuracy after training on D_det",
                         title=f"advex reproduce transfer ({p.name}): {len(rows)} architectures, "
                               f"source {p.source_arch}",
                         note=_correlation_text(rows, corr, rate_name))
