#!/usr/bin/env python3
"""Many clients, one server: Attack calls per second with and without the merging of concurrent
calls into one engine batch (the server's --attack-merge-rows; 0 = each call alone, as before).

A server runs in a child process (`advex serve`, the given device); CLIENTS threads of this
process each send, for SECONDS, one Attack call after another: BATCH images of a CIFAR-10-shaped
small CNN (random weights and inputs: the cost of an attack does not depend on them), PGD-10 Linf
eps 8/255. A call answered RESOURCE_EXHAUSTED is counted and sent again at once. Reported per mode:
successful calls/s, images/s, the share of RESOURCE_EXHAUSTED answers, latency p50/p95 of the
successful calls, and the engine batches the server ran (advex_attack_batch_calls).

    python bench/concurrent_attacks.py                       # CPU, 64 clients x 8 images, 20 s a mode
    python bench/concurrent_attacks.py --device cuda --seconds 30

Clients and server share the machine: on a small CPU the clients' own work is part of the figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(data_dir: str, device: str, merge_rows: int, threads: int) -> tuple[subprocess.Popen, int, int]:
    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "advex.client.cli", "serve", "--port", str(port), "--metrics-port",
           str(metrics_port), "--data-dir", data_dir, "--device", device, "--attack-merge-rows", str(merge_rows)]
    if threads:
        cmd += ["--torch-threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if "serving on" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stdout.read()}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
    return proc, port, metrics_port


def batches_run(metrics_port: int) -> tuple[float, float]:
    """(engine batches, calls in them) from the server's advex_attack_batch_calls histogram."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    count = re.search(r"^advex_attack_batch_calls_count (\S+)$", text, re.M)
    total = re.search(r"^advex_attack_batch_calls_sum (\S+)$", text, re.M)
    return (float(count.group(1)), float(total.group(1))) if count and total else (0.0, 0.0)


def run_mode(args, merge_rows: int, weights: Path) -> dict:
    from advex.client import Client

    with tempfile.TemporaryDirectory() as data_dir:
        proc, port, metrics_port = serve(data_dir, args.device, merge_rows, args.server_threads)
        try:
            target = f"127.0.0.1:{port}"
            with Client(target) as c:
                model = c.upload_model(weights, format="safetensors", architecture="small_cnn", num_classes=10,
                                       input_shape=[3, 32, 32])
                rng = np.random.default_rng(0)
                x = rng.random((args.batch, 3, 32, 32), dtype=np.float32)
                y = rng.integers(0, 10, args.batch)
                c.attack(model.id, x, y, eps=8 / 255, steps=10)  # warm-up: the model is loaded
            ok, exhausted, other, latencies = [0], [0], [0], []
            lock = threading.Lock()
            stop = time.monotonic() + args.seconds

            def client_loop() -> None:
                with Client(target) as c:
                    while time.monotonic() < stop:
                        t0 = time.perf_counter()
                        try:
                            c.attack(model.id, x, y, eps=8 / 255, steps=10)
                        except grpc.RpcError as exc:
                            with lock:
                                (exhausted if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else other)[0] += 1
                            continue
                        with lock:
                            ok[0] += 1
                            latencies.append(time.perf_counter() - t0)

            start = time.monotonic()
            threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - start
            runs, calls = batches_run(metrics_port)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    answered = ok[0] + exhausted[0] + other[0]
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"merge_rows": merge_rows, "seconds": round(elapsed, 2), "calls_ok": ok[0],
            "calls_per_s": ok[0] / elapsed, "images_per_s": ok[0] * args.batch / elapsed,
            "resource_exhausted_share": exhausted[0] / answered if answered else 0.0, "other_errors": other[0],
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
            "engine_batches": runs, "calls_per_engine_batch": calls / runs if runs else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="images per call")
    p.add_argument("--seconds", type=float, default=20.0, help="per mode")
    p.add_argument("--device", default="cpu")
    p.add_argument("--server-threads", type=int, default=0, help="the server's --torch-threads (0 = its default)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    from advex.engine.loaders import save_safetensors
    from advex.engine.zoo import SmallCNN

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "cnn.safetensors"
        torch.manual_seed(0)
        save_safetensors(SmallCNN(3, 10), weights)
        modes = [run_mode(args, 0, weights), run_mode(args, 1024, weights)]
    alone, merged = modes
    report = {"benchmark": "concurrent Attack calls, merged vs alone", "device": args.device,
              "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
              "torch": torch.__version__, "grpc": grpc.__version__, "command": " ".join([Path(sys.argv[0]).name]
                                                                                      + sys.argv[1:]),
              "clients": args.clients, "images_per_call": args.batch, "attack": "PGD-10 Linf eps 8/255",
              "modes": modes, "calls_per_s_ratio_merged_over_alone": merged["calls_per_s"] / alone["calls_per_s"]
              if alone["calls_per_s"] else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"concurrent_attacks_{args.clients}x{args.batch}_{args.device.split(':')[0]}"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = ["| mode | calls/s | images/s | RESOURCE_EXHAUSTED | p50 | p95 | calls per engine batch |", "|---" * 7 + "|"]
    for m in modes:
        rows.append(f"| {'merged (--attack-merge-rows 1024)' if m['merge_rows'] else 'alone (--attack-merge-rows 0)'} "
                    f"| {m['calls_per_s']:.1f} | {m['images_per_s']:.0f} | {m['resource_exhausted_share']:.0%} "
                    f"| {m['latency_p50_s'] * 1000:.0f} ms | {m['latency_p95_s'] * 1000:.0f} ms "
                    f"| {m['calls_per_engine_batch']:.1f} |")
    md = (f"# {report['benchmark']}\n\n{args.clients} clients x {args.batch} images, {report['attack']}, small CNN "
          f"3x32x32, device {args.device} ({os.cpu_count()} CPUs), torch {torch.__version__}.\n\n"
          f"Command: `python bench/{report['command']}`\n\n" + "\n".join(rows) + "\n\n"
          f"Merged / alone: {report['calls_per_s_ratio_merged_over_alone']:.2f}x successful calls per second.\n")
    (out / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
