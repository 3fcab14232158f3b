"""The example notebooks (examples/*.ipynb): committed without outputs, and each runs top to bottom
against an in-process server with tiny sizes, its key cells showing what they should."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from conftest import require_builtin, require_module

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = ["quickstart.ipynb", "paper_small.ipynb", "audit_onnx.ipynb"]
CELL_TIMEOUT = 300

# Sizes that make each notebook run in well under a minute and a half on 2 CPU cores.
TINY = {
    "quickstart.ipynb": dict(WIDTH=8, TRAIN_LIMIT=3000, EPOCHS=2, EVAL_LIMIT=60, STEPS=3, L2_EPS=[0.5, 1.0],
                             LINF_EPS=[0.03, 0.1], N_IMAGES=4),
    "paper_small.ipynb": dict(WIDTH=8, TRAIN_LIMIT=2000, EPOCHS=2, ADV_STEPS=2, BUILD_LIMIT=256, INVERSION_STEPS=5,
                              RELABEL_EPS=2.0, RELABEL_STEPS=5, NEW_SET_EPOCHS=2, TEST_LIMIT=60, EVAL_STEPS=3),
    "audit_onnx.ipynb": dict(WIDTH=8, TRAIN_LIMIT=3000, EPOCHS=2, EXPORT_LIMIT=40, AUDIT_LIMIT=24,
                             SQUARE_QUERIES=20, LINF_EPS=[0.05, 0.1], MIN_ROBUST=0.3, MIN_CLEAN=0.5),
}


def _read(name: str):
    nbformat = require_module("nbformat", "pip install nbformat")
    return nbformat.read(str(EXAMPLES / name), as_version=4)


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _cell(nb, tag: str):
    found = [c for c in nb.cells if tag in _tags(c)]
    assert len(found) == 1, f"expected one cell tagged {tag!r}, found {len(found)}"
    return found[0]


def _outputs(nb, tag: str, mime: str) -> list[str]:
    """The `mime` data of every output of the cell tagged `tag` (execute_result and display_data)."""
    cell = _cell(nb, tag)
    return [out["data"][mime] for out in cell.get("outputs", [])
            if out.get("output_type") in ("execute_result", "display_data") and mime in out.get("data", {})]


def _html(nb, tag: str) -> str:
    found = _outputs(nb, tag, "text/html")
    assert found, f"cell {tag!r} shows no HTML"
    return "\n".join(found)


def _has_png(nb, tag: str) -> None:
    assert _outputs(nb, tag, "image/png"), f"cell {tag!r} shows no image"


def _columns_in(html: str, columns) -> None:
    headers = set(re.findall(r"<th[^>]*>\s*([^<]*?)\s*</th>", html))
    missing = [c for c in columns if c not in headers]
    assert not missing, f"DataFrame lacks columns {missing}; it has {sorted(headers)}"


# ----------------------------------------------------------------------------- committed clean

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_committed_clean(name):
    nbformat = require_module("nbformat", "pip install nbformat")
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert sum("parameters" in _tags(c) for c in nb.cells) == 1, "exactly one cell tagged 'parameters'"
    assert _cell(nb, "parameters").cell_type == "code"
    assert 'os.environ.get("ADVEX_TARGET"' in _cell(nb, "parameters").source
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for k, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {k} of {name} was committed with outputs"
            assert cell.execution_count is None, f"cell {k} of {name} was committed with an execution count"
        assert "attachments" not in cell or not cell.attachments


def test_every_example_notebook_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.ipynb")) == sorted(NOTEBOOKS)


def test_tiny_overrides_name_real_parameters():
    for name, values in TINY.items():
        source = _cell(_read(name), "parameters").source
        for key in values:
            assert re.search(rf"^{key} = ", source, re.M), f"{name}: {key} is not a parameter"


# ----------------------------------------------------------------------------- executed

@pytest.fixture(scope="module")
def nb_server(tmp_path_factory):
    from advex.service.inprocess import InProcessServer

    roots = require_builtin("fashion-mnist")
    with InProcessServer(data_dir=str(tmp_path_factory.mktemp("nb")), data_roots=roots) as srv:
        yield srv


def _execute(name: str, target: str, cwd: Path, monkeypatch):
    nbformat = require_module("nbformat", "pip install nbformat")
    nbclient = require_module("nbclient", "pip install nbclient ipykernel")
    nb = _read(name)
    params = "\n".join(f"{k} = {v!r}" for k, v in TINY[name].items())
    cell = nbformat.v4.new_code_cell(params, metadata={"tags": ["injected-parameters"]})
    at = nb.cells.index(_cell(nb, "parameters")) + 1
    nb.cells.insert(at, cell)
    monkeypatch.setenv("ADVEX_TARGET", target)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    started = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    wall = time.perf_counter() - started
    print(f"\n{name}: executed in {wall:.1f} s")
    if os.environ.get("ADVEX_NOTEBOOK_OUT"):  # keep the executed notebook, to look at
        out = Path(os.environ["ADVEX_NOTEBOOK_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(out / name))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors
    return nb


EVAL_COLUMNS = ("attack", "suite", "norm", "eps", "steps", "robust_accuracy", "ci_lower", "ci_upper",
                "robust_correct", "total", "success_rate", "mean_queries", "wall_seconds")


def test_quickstart_runs(nb_server, tmp_path, monkeypatch):
    nb = _execute("quickstart.ipynb", nb_server.target, tmp_path, monkeypatch)
    assert "fashion-mnist" in _html(nb, "list-datasets")
    assert "Train" in _html(nb, "show-training")
    _has_png(nb, "plot-training")
    ev = _html(nb, "show-evaluation")
    assert "robust accuracy" in ev and "clean accuracy" in ev
    for eps in TINY["quickstart.ipynb"]["L2_EPS"] + TINY["quickstart.ipynb"]["LINF_EPS"]:
        assert f"<td>{eps:.4g}</td>" in ev or f">{eps:.4g}<" in ev, f"eps {eps} not in the evaluation"
    assert "L2" in ev and "Linf" in ev
    _columns_in(_html(nb, "evaluation-table"), EVAL_COLUMNS)
    _has_png(nb, "plot-evaluation")
    attack = _html(nb, "show-attack")
    assert "Attack: pgd L2" in attack and "data:image/png;base64," in attack
    _columns_in(_html(nb, "attack-table"), ("label", "clean_pred", "adv_pred", "success", "perturbation_norm"))
    _has_png(nb, "plot-attack")


def test_paper_small_runs(nb_server, tmp_path, monkeypatch):
    nb = _execute("paper_small.ipynb", nb_server.target, tmp_path, monkeypatch)
    assert "robust accuracy" in _html(nb, "show-robust-training")
    builds = _html(nb, "build-table")
    for mode in ("target_hit_rate", "mean_l2", "feature_distance_mean"):
        assert mode in builds
    assert "Dataset build" in _html(nb, "show-build")
    _has_png(nb, "plot-build")
    _has_png(nb, "plot-build-det")
    models = "\n".join(_outputs(nb, "train-new-sets", "text/plain"))
    for name in ("D_R", "D_NR", "D_rand", "D_det"):
        assert f"'{name}'" in models
    ev = _html(nb, "show-evaluation")
    assert "robust accuracy" in ev and ">0.25<" in ev
    table = _html(nb, "comparison")
    for name in ("D_R", "D_NR", "D_rand", "D_det", "D (standard)", "D (adversarial)"):
        assert f">{name}<" in table, f"{name} missing from the comparison"
    _columns_in(table, ("standard acc. (ours)", "standard acc. (paper)", "robust acc. @ L2 0.25 (ours)",
                        "robust acc. @ L2 0.25 (paper)"))
    assert "84.0" in table and "48.0" in table  # the paper's D_R row, in %


def test_audit_onnx_runs(nb_server, tmp_path, monkeypatch):
    nb = _execute("audit_onnx.ipynb", nb_server.target, tmp_path, monkeypatch)
    assert "ExportModel" in _html(nb, "show-export") and "agreement" in _html(nb, "show-export")
    audit = _html(nb, "show-audit")
    assert "PASSED" in audit or "FAILED" in audit
    assert "fashion-onnx" in audit
    _columns_in(_html(nb, "audit-table"), ("audit_name", "target", "check", "norm", "eps", "measured", "limit",
                                           "passed"))
    _has_png(nb, "plot-audit")
    history = _html(nb, "show-history")
    assert "Audit history" in history and "2 run(s)" in history
    _columns_in(_html(nb, "history-table"), ("time", "audit_name", "passed", "clean_accuracy", "robust_accuracy"))
    _has_png(nb, "plot-history")
    report = tmp_path / "audit-report"
    for file in ("report.html", "report.md", "report.json"):
        assert (report / file).is_file() and (report / file).stat().st_size > 0, file
    assert "fashion-onnx" in (report / "report.md").read_text()
