"""A custom MLServer runtime for advex's tests: a linear classifier behind the Open Inference
Protocol, with knobs to make it slow or failing. Runs inside the MLServer venv (numpy only,
never imported by advex itself).

logits = x.reshape(n, -1).astype(float32) @ weight.T + bias, in float32, exactly like
torch.nn.Linear(784, 10) with `weight` (10, 784) and `bias` (10,) read from the .npz file given
as parameters.uri in model-settings.json.

Knobs (model-settings.json -> parameters.extra):
  max_rows     int    reject a request of more rows than this with 400 (0: no limit)
  delay_s      float  asyncio.sleep this long on every call (other calls still run meanwhile)
  fail_status  int    status of the MLServerError to raise (0: none)
  fail_every   int    with fail_status: fail the calls whose 0-based index i has i % fail_every == 0
                      (1: every call; 2: the 1st, 3rd, 5th, ... call fails)
  above_rows   int    delay and fail only requests of more rows than this (0: every request), so
                      that a model passes advex's registration check (one row) and then misbehaves

Every call (failed ones too) is counted, and the counts are written atomically to
<folder of the weights>/counts/<model name>.json after each call:
{"calls": ..., "rows": ..., "failures": ...}, so tests can check what the server saw.
"""
import asyncio
import json
import os
from pathlib import Path

import numpy as np

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

INPUT = "input"
OUTPUT = "logits"


class LinearClassifier(MLModel):
    async def load(self) -> bool:
        path = Path(await get_model_uri(self.settings))
        with np.load(path) as z:
            self._weight = np.ascontiguousarray(z["weight"], dtype=np.float32)
            self._bias = np.ascontiguousarray(z["bias"], dtype=np.float32)
        extra = (self.settings.parameters.extra or {}) if self.settings.parameters else {}
        self._max_rows = int(extra.get("max_rows", 0))
        self._delay_s = float(extra.get("delay_s", 0.0))
        self._fail_status = int(extra.get("fail_status", 0))
        self._fail_every = int(extra.get("fail_every", 1))
        self._above_rows = int(extra.get("above_rows", 0))
        self._counts_path = path.parent / "counts" / f"{self.name}.json"
        self._counts_path.parent.mkdir(exist_ok=True)
        self._calls = self._rows = self._failures = 0
        return True

    def _record(self, rows: int, failed: bool) -> None:
        self._calls += 1
        self._rows += rows
        self._failures += int(failed)
        tmp = self._counts_path.with_name(f".{self._counts_path.name}.tmp")
        tmp.write_text(json.dumps({"calls": self._calls, "rows": self._rows, "failures": self._failures}))
        os.replace(tmp, self._counts_path)

    def _check(self, payload: InferenceRequest) -> int:
        names = [i.name for i in payload.inputs]
        if names != [INPUT]:
            raise MLServerError(f"expected exactly one input named {INPUT!r}, got {names}", 400)
        inp = payload.inputs[0]
        if inp.datatype != "FP32":
            raise MLServerError(f"input {INPUT!r} must be FP32, got {inp.datatype}", 400)
        d = self._weight.shape[1]
        shape = list(inp.shape)
        if len(shape) < 2 or int(np.prod(shape[1:])) != d:
            raise MLServerError(f"input {INPUT!r} must have shape [-1, 1, 28, 28] or [-1, {d}], got {shape}", 400)
        n = int(shape[0])
        if self._max_rows and n > self._max_rows:
            raise MLServerError(f"batch of {n} rows exceeds max_rows={self._max_rows}", 400)
        return n

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        index = self._calls  # 0-based index of this call
        rows = int(payload.inputs[0].shape[0]) if payload.inputs and payload.inputs[0].shape else 0
        try:
            n = self._check(payload)
            misbehave = n > self._above_rows
            if self._delay_s > 0 and misbehave:
                await asyncio.sleep(self._delay_s)
            if self._fail_status and misbehave and index % self._fail_every == 0:
                raise MLServerError(f"simulated failure on call {index}", self._fail_status)
            x = NumpyCodec.decode_input(payload.inputs[0])
            logits = (x.reshape(n, -1).astype(np.float32) @ self._weight.T + self._bias).astype(np.float32)
        except Exception:
            self._record(rows, failed=True)
            raise
        self._record(n, failed=False)
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(name=OUTPUT, payload=logits)])
