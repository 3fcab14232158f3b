"""Seeded fuzz of every RPC of advex.v1.Robustness (unary, server-streaming, client-streaming
uploads): 2,000 requests of random bytes, random and extreme field values, near-valid requests
with mutated fields, lying tensors and hostile upload files. Not one may be answered INTERNAL or
UNKNOWN, and the server must be alive at the end. The generator is bench/fuzz.py's (which runs
it at any size: `python bench/fuzz.py --count 10000`)."""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import grpc
import pytest

from advex.service.inprocess import InProcessServer

from conftest import data_roots

SEED = 20240611
COUNT = 2000


def _load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("advex_bench_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fuzz = _load_bench()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with InProcessServer(data_dir=str(tmp_path_factory.mktemp("advex")), data_roots=data_roots(),
                         **fuzz.SERVER_SETTINGS) as srv:
        yield srv


def test_generator_is_deterministic_and_covers_every_rpc():
    fx = fuzz.Fixtures(models=["m-a", "m-b", "m-c"], feature_models=["m-a"], datasets=["ds-a", "tsipras"],
                       pairs=[("m-a", "ds-a", (1, 28, 28), 10, "image"), ("m-b", "tsipras", (101,), 2, "real")],
                       files={k: b"PK\x03\x04" + bytes(range(200)) for k in
                              ("safetensors", "safetensors_linear", "torchscript", "torch_export", "onnx")},
                       file_specs={k: fuzz.res.ModelSpec(format=1) for k in
                                   ("safetensors", "safetensors_linear", "torchscript", "torch_export", "onnx")},
                       npz=b"PK\x03\x04npz")
    gen, again = fuzz.Generator(7, fx), fuzz.Generator(7, fx)
    first = [gen.case(i) for i in range(400)]
    assert [(c.method, c.payload) for c in first] == [(c.method, c.payload) for c in (again.case(i) for i in range(400))]
    assert {c.method for c in first} == set(fuzz.METHODS)
    assert {c.kind for c in first} == {"bytes", "random", "near", "upload"}


def test_fuzzed_requests_never_get_internal_or_unknown(server):
    channel = grpc.insecure_channel(server.target)
    fx = fuzz.prepare(channel)
    channel.close()
    logging.disable(logging.ERROR)  # every INTERNAL is logged with its traceback; the report below names them
    try:
        report = fuzz.fuzz(server.target, COUNT, SEED, fx, deadline=5.0)
    finally:
        logging.disable(logging.NOTSET)
    counts = report.counts()
    assert all(sum(row.values()) for row in counts.values()), f"an RPC was never called: {counts}"
    assert not report.bad(), report.summary(8)
    assert report.alive, f"server not alive after the fuzz: {report.alive_detail}"
