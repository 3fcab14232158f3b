"""`advex demo`: the service end to end through the SDK, on real data, in a few minutes on
2 CPU cores. Train a small CNN on Fashion-MNIST (Train), measure clean and L2/Linf robust
accuracy over an eps sweep (Evaluate), attack a few test images (Attack), print a table and
write a PNG of clean vs adversarial images with their predictions."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from advex.client.render import fmt_rate, image_grid, rate, table
from advex.client.sdk import Client


@dataclass
class DemoSettings:
    dataset: str = "fashion-mnist"
    train_limit: int = 20000
    epochs: int = 2
    eval_limit: int = 1000
    steps: int = 10
    l2_eps: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    linf_eps: tuple[float, ...] = (0.01, 0.03, 0.1)
    show: int = 8
    seed: int = 0
    out: str = "demo-out"


def _test_images(client: Client, dataset_id: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n test images, from the service (DownloadDataset): a client needs no data files."""
    x, y = client.download_dataset(dataset_id, split="test", limit=n)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return x, y.astype(np.int64)


def run(client: Client, s: DemoSettings = DemoSettings(), log=print) -> dict:
    t_start = time.perf_counter()
    ids = {d.id: d for d in client.list_datasets()}
    if s.dataset not in ids:
        raise SystemExit(f"the server has no dataset {s.dataset!r} (it has {sorted(ids)}). For Fashion-MNIST: "
                         "apt-get install -y dataset-fashion-mnist, then restart the server")
    ds = ids[s.dataset]
    names = list(ds.class_names) or [str(i) for i in range(ds.num_classes)]
    log(f"[1/3] Train: small_cnn on {s.dataset} ({s.train_limit} images, {s.epochs} epochs, SGD + cosine)")
    op = client.train("small_cnn", s.dataset, limit=s.train_limit, epochs=s.epochs, batch_size=128, lr=0.05,
                      momentum=0.9, weight_decay=5e-4, schedule="cosine", seed=s.seed, name=f"demo-{s.dataset}")
    trained = op.result()
    model = client.get_model(trained.model_id)
    log(f"      model {model.id} (sha256 {model.sha256[:12]}…), final train accuracy "
        f"{trained.history[-1].train_accuracy:.1%}, {trained.wall_seconds:.0f} s")

    log(f"[2/3] Evaluate: {s.eval_limit} test images, PGD-{s.steps} at L2 eps {list(s.l2_eps)} "
        f"and Linf eps {list(s.linf_eps)}")
    attacks = [{"norm": "L2", "eps": list(s.l2_eps), "steps": s.steps, "seed": s.seed},
               {"norm": "Linf", "eps": list(s.linf_eps), "steps": s.steps, "seed": s.seed}]
    ev = client.evaluate(model.id, s.dataset, split="test", limit=s.eval_limit, attacks=attacks).result()
    rows = [["clean", "-", f"{ev.clean_accuracy:.1%}", "-"]]
    for r in ev.robust:
        rows.append([f"PGD-{r.attack.steps} {'L2' if r.attack.norm == 2 else 'Linf'}", f"{r.attack.eps:g}",
                     f"{r.robust_accuracy:.1%}", fmt_rate(rate(ev.clean_correct - r.robust_correct, ev.clean_correct))])
    log("")
    log(f"Robustness of {model.spec.name} on {s.dataset} test ({ev.num_examples} images, {ev.device}, "
        f"{ev.wall_seconds:.0f} s)")
    log(table(["attack", "eps", "accuracy", "attack success"], rows))
    log("")

    log(f"[3/3] Attack: {s.show} test images, PGD-{s.steps} L2 eps {s.l2_eps[-2]}")
    x, y = _test_images(client, s.dataset, s.show)
    adv = client.attack(model.id, x, y, norm="L2", eps=s.l2_eps[-2], steps=s.steps, seed=s.seed)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    flips = int((adv.clean_pred != adv.adv_pred).sum())
    png = out / "adversarial_examples.png"
    summary = {"model_id": model.id, "dataset": s.dataset, "clean_accuracy": ev.clean_accuracy,
               "robust": [{"norm": "L2" if r.attack.norm == 2 else "Linf", "eps": r.attack.eps,
                           "robust_accuracy": r.robust_accuracy} for r in ev.robust],
               "attack": {"norm": "L2", "eps": s.l2_eps[-2], "images": len(y), "predictions_changed": flips},
               "png": str(png), "wall_seconds": time.perf_counter() - t_start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))  # results first: a failing figure loses none
    image_grid([
        ("clean", x, [f"y: {names[t]}\npred: {names[p]}" for t, p in zip(y, adv.clean_pred)]),
        (f"L2 eps={s.l2_eps[-2]:g}", adv.x_adv, [f"pred: {names[p]}\n|d|={d:.2f}" for p, d in
                                             zip(adv.adv_pred, adv.perturbation_norm)]),
        ("perturbation", (adv.x_adv - x) * 4, ["x4" for _ in y]),
    ], png)
    log(f"      {flips}/{len(y)} predictions changed; wrote {png}")
    log(f"Done in {summary['wall_seconds']:.0f} s. Summary: {out / 'summary.json'}")
    return summary
