"""Robust accuracy at every eps from one run: FAB-T's minimal adversarial distance per example,
checked against the closed form of a linear model, and the curve it gives, through the engine,
the service (Evaluate.minimal_distance), the SDK, the CLI and the plot."""
from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import torch

from advex.client.cli import main as cli_main
from advex.engine.data import ArrayDataset
from advex.engine.evaluate import minimal_distances, robustness_curve

from conftest import LINEAR_MARGIN, linear_model, linear_points

DUAL = {"Linf": 1.0, "L2": 2.0}  # the dual norm of w gives the minimal distance MARGIN / ||w||_dual


def test_the_curve_counts_what_each_radius_breaks():
    d = torch.tensor([0.0, 0.1, 0.2, math.inf, 0.3, 0.2])
    assert robustness_curve(d) == [(pytest.approx(0.1), 4), (pytest.approx(0.2), 2), (pytest.approx(0.3), 1)]
    many = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    curve = robustness_curve(many, max_points=50)
    assert len(curve) == 50 and curve[-1] == (pytest.approx(float(many.max())), 0)
    assert all(a[0] <= b[0] and a[1] >= b[1] for a, b in zip(curve, curve[1:]))
    assert robustness_curve(torch.tensor([0.0, math.inf])) == []


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_minimal_distances_are_the_closed_form_on_a_linear_model(norm):
    model, w, b = linear_model()
    x, y = linear_points(w, b, n=20)
    data = ArrayDataset(x, y, 2)
    d = minimal_distances(model, data, norm, steps=20)
    exact = LINEAR_MARGIN / float(w.norm(p=DUAL[norm]))
    assert d.shape == (20,) and torch.allclose(d, torch.full((20,), exact), rtol=0.01)


@pytest.fixture(scope="module")
def linear_on_server(client, tmp_path_factory):
    from advex.engine.loaders import safetensors_bytes

    model, w, b = linear_model()
    x, y = linear_points(w, b, n=30)
    y[:5] = 1 - y[:5]  # five the model gets wrong: distance 0
    m = client.upload_model(safetensors_bytes(model.net), format="safetensors", architecture="linear",
                            num_classes=2, input_shape=(1, 8, 8))
    ds = client.upload_dataset((x.numpy(), y.numpy()), split="test")
    return m.id, ds.id, w


def test_evaluate_returns_distances_and_the_curve(client, linear_on_server, server, capsys, tmp_path):
    model_id, dataset_id, w = linear_on_server
    ev = client.evaluate(model_id, dataset_id, minimal_distance=["Linf", "L2"]).result(progress=False)
    assert [c.norm for c in ev.distance_curves] == [1, 2] and ev.clean_correct == 25
    for curve, norm in zip(ev.distance_curves, ("Linf", "L2")):
        from advex.v1.wire import from_tensor

        d = from_tensor(curve.per_example)
        exact = LINEAR_MARGIN / float(w.norm(p=DUAL[norm]))
        assert (d[:5] == 0).all() and np.allclose(d[5:], exact, rtol=0.01)
        assert curve.median_distance == pytest.approx(exact, rel=0.01)
        last = curve.points[-1]
        assert last.robust_correct == 0 and last.eps == pytest.approx(exact, rel=0.01)
        assert curve.points[0].robust_accuracy_ci.upper >= curve.points[0].robust_accuracy
    assert cli_main(["--target", server.target, "evaluate", "--model", model_id, "--dataset", dataset_id,
                     "--minimal-distance", "L2"]) == 0
    assert "minimal L2 distance (fab-t): median" in capsys.readouterr().out

    from advex.client.plots import missing_plot_extra, robustness_curve as plot_curve

    if missing_plot_extra() is None:
        fig = plot_curve(ev.distance_curves[0], tmp_path / "curve.png", clean_accuracy=ev.clean_accuracy)
        assert (tmp_path / "curve.png").stat().st_size > 1000
        xs, ys = fig.axes[0].lines[0].get_data()
        assert ys[0] == pytest.approx(ev.clean_accuracy) and ys[-1] == 0.0


def test_minimal_distance_refusals(client, linear_on_server):
    model_id, dataset_id, _ = linear_on_server
    from advex.v1 import robustness_pb2 as rpc

    request = rpc.EvaluateRequest(model_id=model_id, dataset_id=dataset_id, minimal_distance=[1, 1])
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Evaluate(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("minimal_distance[1]: Linf is listed twice")
    request = rpc.EvaluateRequest(model_id=model_id, dataset_id=dataset_id, minimal_distance=[0])
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Evaluate(request)
    assert err.value.details().startswith("minimal_distance[0]: must be L2 or LINF")
