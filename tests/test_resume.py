"""Crash safety of a real `advex serve`: kill -9 at several points of a dataset build and of a
training run; after each restart the same operation goes on from its checkpoint, and the result
is bit-identical (sha256) to an uninterrupted run's. SIGTERM checkpoints such work instead of
cancelling it; other work says it does not resume; what a crash orphans is reclaimed at start."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from advex.client import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`advex serve` on a data dir, its output in a file (read by the test)."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.out = log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "advex.client.cli", "serve", "--port", str(self.port), "--metrics-port", "0",
             "--data-dir", str(data_dir), "--data-roots", str(data_dir / "no-data"), "--shutdown-grace-s", "30"],
            stdout=self.out, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 90
        while f"serving on 127.0.0.1:{self.port}" not in log.read_text():
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        self.client = Client(f"127.0.0.1:{self.port}")

    def kill9(self) -> None:
        self.client.close()
        self.proc.kill()  # SIGKILL: no handler, no cleanup
        self.proc.wait(30)
        self.out.close()

    def stop(self, timeout: float = 60) -> int:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.out.close()
        return code


@contextmanager
def serving(data_dir: Path, log: Path):
    srv = Serve(data_dir, log)
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(30)
        srv.out.close()


def wait_progress(client: Client, op_id: str, at_least: int, timeout: float = 120) -> int:
    """Block until the operation reported `at_least` units done; returns what it reported."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        op = client.get_operation(op_id).proto
        assert not op.done, f"finished before the kill point {at_least}: {op}"
        if op.progress.done >= at_least:
            return op.progress.done
        time.sleep(0.02)
    raise AssertionError(f"no progress to {at_least} within {timeout} s")


def trained_mlp(client: Client) -> str:
    return client.train("mlp", "tsipras", epochs=1, batch_size=100, limit=1000, seed=3,
                        arch_args={"hidden": "32"}).result(timeout=120, progress=False).model_id


# 96 examples, batches of 8, a checkpoint every 16; each batch is 300 inversion steps
BUILD = dict(split="train", limit=96, steps=300, step_size=0.05, batch_size=8, shard_size=16, seed=5)
# 6 epochs of 100 batches of 10
TRAIN = dict(limit=1000, epochs=6, batch_size=10, lr=0.05, schedule="cosine", seed=9, arch_args={"hidden": "64"})


def test_kill_9_during_a_build_and_a_training_run_resumes_bit_for_bit(tmp_path):
    data_dir, log = tmp_path / "d", tmp_path / "serve.log"
    with serving(data_dir, log) as srv:
        model_id = trained_mlp(srv.client)
        build = srv.client.robustify(model_id, "tsipras", **BUILD)
        wait_progress(srv.client, build.id, 24)   # the first checkpoint (16) is written, mid-shard now
        srv.kill9()
    progress = (data_dir / "artifacts" / "jobs" / build.id / "progress.json").read_text()
    assert int(re.search(r'"done": (\d+)', progress).group(1)) >= 16
    with serving(data_dir, log) as srv:
        wait_progress(srv.client, build.id, 64)   # resumed, and past more checkpoints
        srv.kill9()
    with serving(data_dir, log) as srv:
        c = srv.client
        result = c.wait_operation(build.id, timeout=300).result(timeout=300, progress=False)
        assert c.get_operation(build.id).state == "SUCCEEDED"
        resumed = c.get_dataset(result.dataset_id)
        train = c.train("mlp", "tsipras", **TRAIN)
        wait_progress(c, train.id, 250)           # epoch 3 of 6, after two epoch checkpoints
        srv.kill9()
    text = log.read_text()
    first, second = [int(m) for m in re.findall(r"resuming the D_R build at example (\d+) of 96", text)]
    assert 16 <= first < second <= 96
    with serving(data_dir, log) as srv:
        wait_progress(srv.client, train.id, 450)  # mid epoch 5
        srv.kill9()
    with serving(data_dir, log) as srv:
        c = srv.client
        trained = c.wait_operation(train.id, timeout=300).result(timeout=300, progress=False)
        assert [h.epoch for h in trained.history] == [1, 2, 3, 4, 5, 6]
        # the same requests, uninterrupted
        reference_build = c.robustify(model_id, "tsipras", **BUILD).result(timeout=300, progress=False)
        reference_train = c.train("mlp", "tsipras", **TRAIN).result(timeout=300, progress=False)
        assert resumed.sha256 == c.get_dataset(reference_build.dataset_id).sha256
        assert trained.model_sha256 == reference_train.model_sha256
        assert [round(h.train_loss, 12) for h in trained.history] == \
               [round(h.train_loss, 12) for h in reference_train.history]
        x, y = c.download_dataset(result.dataset_id)  # what is stored is what was announced
        assert x.shape == (96, 101) and np.isfinite(x).all()
        assert srv.stop() == 0
    epochs = [int(m) for m in re.findall(r"resuming training at epoch (\d+)", log.read_text())]
    assert len(epochs) == 2 and 3 <= epochs[0] <= epochs[1] <= 6
    jobs = data_dir / "artifacts" / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir())  # finished operations leave no checkpoints


def test_sigterm_checkpoints_a_build_and_training_instead_of_cancelling(tmp_path):
    data_dir, log = tmp_path / "d", tmp_path / "serve.log"
    with serving(data_dir, log) as srv:
        model_id = trained_mlp(srv.client)
        build = srv.client.robustify(model_id, "tsipras", **{**BUILD, "shard_size": 4096})  # no shard checkpoint
        train = srv.client.train("mlp", "tsipras", **TRAIN)  # queued behind the build (one worker)
        wait_progress(srv.client, build.id, 40)
        t0 = time.monotonic()
        assert srv.stop() == 0
        stopped_in = time.monotonic() - t0
    assert stopped_in < 20, stopped_in  # it did not wait for the build to finish (grace is 30 s)
    progress = (data_dir / "artifacts" / "jobs" / build.id / "progress.json").read_text()
    assert int(re.search(r'"done": (\d+)', progress).group(1)) >= 40  # saved at shutdown, mid-shard
    with serving(data_dir, log) as srv:
        c = srv.client
        result = c.wait_operation(build.id, timeout=300).result(timeout=300, progress=False)
        wait_progress(c, train.id, 150)
        assert srv.stop() == 0  # this time training is stopped mid-epoch 2 and checkpoints there
    with serving(data_dir, log) as srv:
        c = srv.client
        trained = c.wait_operation(train.id, timeout=300).result(timeout=300, progress=False)
        reference_build = c.robustify(model_id, "tsipras", **BUILD).result(timeout=300, progress=False)
        reference_train = c.train("mlp", "tsipras", **TRAIN).result(timeout=300, progress=False)
        assert c.get_dataset(result.dataset_id).sha256 == c.get_dataset(reference_build.dataset_id).sha256
        assert trained.model_sha256 == reference_train.model_sha256
    text = log.read_text()
    assert re.search(r"resuming the D_R build at example (4[0-9]|[5-8][0-9]|9[0-6]) of 96", text)
    assert re.search(r"resuming training at epoch 2, example [1-9]\d* of it", text)


def test_work_that_does_not_resume_says_so_and_orphans_are_reclaimed(tmp_path):
    data_dir, log = tmp_path / "d", tmp_path / "serve.log"
    with serving(data_dir, log) as srv:
        c = srv.client
        model_id = trained_mlp(c)
        kept = c.upload_dataset((np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1])), domain="real")
        evaluation = c.evaluate(model_id, "tsipras", attacks=[{"norm": "L2", "eps": [0.5], "steps": 5000}])
        wait_progress(c, evaluation.id, 1)
        srv.kill9()
    artifacts = data_dir / "artifacts"
    (artifacts / "datasets" / "ds-0123456789ab").mkdir()
    (artifacts / "datasets" / "ds-0123456789ab" / "data.npz").write_bytes(b"PK\x03\x04 half-written")
    (artifacts / "models" / "m-0123456789ab").mkdir()
    (artifacts / "jobs" / "op-0123456789ab").mkdir(parents=True)
    (artifacts / "tmp" / "upload-stale").write_bytes(b"x" * 1000)
    (data_dir / "tmp" / "tmpabc123").mkdir(parents=True, exist_ok=True)  # a temporary folder of the export
    with serving(data_dir, log) as srv:
        c = srv.client
        failed = c.get_operation(evaluation.id).proto
        assert failed.done and failed.error.code == 10  # ABORTED
        assert "evaluate operations do not resume" in failed.error.message
        assert {p.name for p in (artifacts / "datasets").iterdir()} == {kept.id}
        assert [p.name for p in (artifacts / "models").iterdir()] == [model_id]
        assert not any((artifacts / "jobs").iterdir()) and not any((artifacts / "tmp").iterdir())
        assert not (data_dir / "tmp" / "tmpabc123").exists()
        assert c.download_dataset(kept.id)[0].shape == (4, 3)
        assert srv.stop() == 0
    assert re.search(r"reclaimed 4 orphaned artifact", log.read_text())


def test_a_resumable_request_survives_its_json_record_exactly():
    """A resumed operation is planned again from Operation.request_json: floats (float32 and
    double), infinities, int64 seeds, optional fields set to zero and maps must come back equal."""
    from google.protobuf import json_format

    from advex.v1 import robustness_pb2 as rpc

    train = rpc.TrainRequest(architecture="mlp", dataset_id="tsipras", mean=[0.4914, 1 / 3], std=[1e-7, 3.4e38],
                             lr=0.0, momentum=1 / 3, augment=False, seed=2**62 + 1, arch_args={"hidden": "3"})
    train.adversarial.eps = 1 / 3
    robustify = rpc.RobustifyRequest(model_id="m-1", dataset_id="cifar10", limit=7,
                                     inversion=rpc.InversionSpec(step_size=1 / 3, eps=float("inf")))
    nonrobust = rpc.BuildNonRobustDatasetRequest(mode=rpc.BuildNonRobustDatasetRequest.D_RAND, model_id="m-1")
    nonrobust.attack.eps = 0.1 + 0.2
    for request in (train, robustify, nonrobust):
        text = json_format.MessageToJson(request, indent=None, preserving_proto_field_name=True)
        back = json_format.Parse(text, type(request)())
        assert back == request and back.SerializeToString() == request.SerializeToString()
    assert json_format.Parse(json_format.MessageToJson(train), rpc.TrainRequest()).HasField("lr")
