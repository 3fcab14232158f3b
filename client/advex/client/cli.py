"""The `advex` command: serve | demo | attack | evaluate | train | models | datasets | ops.
Everything but `serve` (and `demo --in-process`) talks to a server through the SDK."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import grpc
import numpy as np

from advex.client.render import fmt_ci, fmt_rate, rate, table
from advex.client.sdk import Client, Operation, OperationError, to_dict
from advex.v1 import resources_pb2 as res


CONNECT_TIMEOUT = 5.0         # seconds a command waits for the server
LONG_CONNECT_TIMEOUT = 60.0   # demo and reproduce: scripts start them right beside a starting server


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.replace(":", ",").split(",") if v]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: expected integers like 3,32,32, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _attack_arg(text: str) -> dict:
    """'norm=L2,eps=0.25:0.5,steps=20' -> {"norm": "L2", "eps": [0.25, 0.5], "steps": 20}."""
    out: dict = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key == "eps":
            out["eps"] = _floats(value)
        elif key in ("steps", "restarts", "seed"):
            out[key] = int(value)
        elif key == "step_size":
            out[key] = float(value)
        elif key in ("norm", "method"):
            out[key] = value
        elif key == "random_start":
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            raise argparse.ArgumentTypeError(f"unknown attack setting {key!r}")
    if "norm" not in out:
        raise argparse.ArgumentTypeError("each --attack needs norm=L2 or norm=Linf")
    return out


def _print_json(message) -> None:
    """JSON with numbers as numbers (protobuf's own JSON mapping prints int64 fields as strings)."""
    print(json.dumps(to_dict(message), indent=2))


def _wait_result(op: Operation, wait: bool):
    """(result, None) once the operation succeeded; (None, exit code) when not waiting (its id is
    printed) or when it failed (the error is printed)."""
    if not wait:
        print(op.id)
        return None, 0
    try:
        return op.result(), None
    except OperationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None, 1


def _finish(op: Operation, wait: bool) -> int:
    result, code = _wait_result(op, wait)
    if result is None:
        return code
    _print_json(result)
    return 0


# ---------------------------------------------------------------- commands

def _server_plugin():
    """advex.service.plugin through its entry point, or None when the server is not installed.
    (The client never imports the service: the server registers itself as a plugin.)"""
    from importlib.metadata import entry_points

    found = list(entry_points(group="advex.plugins", name="server"))
    return found[0].load() if found else None


SERVER_MISSING = "needs the server, which is not installed here: pip install 'advex[server]'"


def cmd_serve(server_args: list[str]) -> int:
    plugin = _server_plugin()
    if plugin is None:
        print(f"error: `advex serve` {SERVER_MISSING}", file=sys.stderr)
        return 2
    return plugin.serve(server_args)


def _plots_missing(command: str) -> bool:
    """Say which extra to install, before any work starts, when the figures cannot be drawn."""
    from advex.client.plots import missing_plot_extra

    missing = missing_plot_extra()
    if missing:
        print(f"error: `advex {command}` draws figures: {missing}", file=sys.stderr)
    return bool(missing)


def cmd_demo(args) -> int:
    from advex.client import demo

    if _plots_missing("demo"):
        return 2
    settings = demo.DemoSettings(dataset=args.dataset, train_limit=args.train_limit, epochs=args.epochs,
                                 eval_limit=args.eval_limit, steps=args.steps, out=args.out, seed=args.seed)
    if args.in_process:
        plugin = _server_plugin()
        if plugin is None:
            print(f"error: `advex demo --in-process` {SERVER_MISSING}", file=sys.stderr)
            return 2
        with plugin.InProcessServer(data_dir=args.data_dir) as srv, Client(srv.target) as client:
            demo.run(client, settings)
        return 0
    client = _ready_client(args)
    if client is None:
        return 2
    demo.run(client, settings)
    return 0


def cmd_reproduce(args) -> int:
    from pathlib import Path

    from advex.client import reproduce

    if _plots_missing("reproduce"):
        return 2
    client = _ready_client(args)
    if client is None:
        return 2
    if args.experiment == "transfer":
        if args.seeds != 1 or args.suite:
            print("advex: --seeds and --suite are for the datasets experiment", file=sys.stderr)
            return 2
        preset = reproduce.TRANSFER_PRESETS[args.preset]
        reproduce.run_transfer(client, preset, Path(args.out or f"reproduce-transfer-{preset.name}"))
        return 0
    preset = reproduce.PRESETS[args.preset]
    if args.arch:
        preset.arch, preset.arch_args = args.arch, {}
    if args.suite and args.suite != preset.eval_suite:
        preset.eval_suite = args.suite
        preset.reductions = [r for r in preset.reductions if r != reproduce.FAST_SUITE_NOTE]
    reproduce.run(client, preset, Path(args.out or f"reproduce-{preset.name}"), seeds=args.seeds)
    return 0


def cmd_attack(args) -> int:
    with np.load(args.input, allow_pickle=False) as z:
        x, y = z["x"], z["y"]
    out = _client(args).attack(args.model, x, y, norm=args.norm, eps=args.eps, method=args.method, steps=args.steps,
                               step_size=args.step_size, restarts=args.restarts, targeted=args.targeted,
                               seed=args.seed)
    np.savez(args.output, x_adv=out.x_adv, clean_pred=out.clean_pred, adv_pred=out.adv_pred, success=out.success,
             perturbation_norm=out.perturbation_norm)
    print(f"{int(out.success.sum())}/{len(out.success)} successful; wrote {args.output}")
    return 0


def cmd_evaluate(args) -> int:
    attacks = args.attack or []
    op = _client(args).evaluate(args.model, args.dataset, split=args.split, limit=args.limit, attacks=attacks,
                                batch_size=args.batch_size, suite=args.suite,
                                minimal_distance=args.minimal_distance or ())
    result, code = _wait_result(op, args.wait)
    if result is None:
        return code
    if args.json:
        _print_json(result)
        return 0
    rows = [["clean", "-", f"{result.clean_accuracy:.2%}", fmt_ci(result, "clean_accuracy_ci")]]
    for r in result.robust:
        norm = "L2" if r.attack.norm == 2 else "Linf"
        name = f"{r.suite}: after {r.attack.method}" if r.suite else r.attack.method
        steps = f"{r.attack.steps} {'queries' if r.attack.method == 'square' else 'steps'}"
        steps += f" x {r.attack.eot} EOT" if r.attack.eot > 1 else ""
        rows.append([f"{name} {norm} ({steps})", f"{r.attack.eps:g}", f"{r.robust_accuracy:.2%}",
                     fmt_ci(r, "robust_accuracy_ci")])
    print(table(["attack", "eps", "accuracy", "95% CI"], rows))
    for s in result.skipped:
        print(f"skipped {s.attack.method}: {s.reason}")
    if result.gradient_masking_suspected:
        print("WARNING: gradient masking suspected: the robust accuracies above may overstate robustness")
    for note in result.notes:
        print(f"note: {note}")
    for curve in result.distance_curves:
        norm = "L2" if curve.norm == 2 else "Linf"
        points = list(curve.points)
        shown = [points[round(k * (len(points) - 1) / 7)] for k in range(8)] if len(points) > 8 else points
        print(f"\nminimal {norm} distance ({curve.method}): median {curve.median_distance:.4g}; robust accuracy "
              "at every eps from one run")
        print(table(["eps", "accuracy", "95% CI"],
                    [[f"{p.eps:.4g}", f"{p.robust_accuracy:.2%}", fmt_ci(p, "robust_accuracy_ci")] for p in shown]))
    return 0


def cmd_health(args) -> int:
    """The server's gRPC health (grpc.health.v1): exit 0 SERVING, 1 not serving, 2 unreachable (for
    container health checks and scripts)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        client = _client(args)
    except NoServer:
        print(f"UNREACHABLE: no advex server answered at {args.server}", file=sys.stderr)
        return 2
    try:
        reply = health_pb2_grpc.HealthStub(client.channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), metadata=client.metadata, timeout=10)
    except grpc.RpcError as exc:
        print(f"UNREACHABLE: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    finally:
        client.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_audit(args) -> int:
    """advex audit SPEC.yaml | advex audit history TARGET: exit 0 pass, 1 breach, 2 error (any
    error: a breach is only ever a judged threshold)."""
    from advex.client import audit

    try:
        return _audit_history(args) if args.spec == "history" else _audit_run(args)
    except audit.SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except NoServer:
        print(no_server_message(args.server), file=sys.stderr)
    except grpc.RpcError as exc:
        print(f"error: the audit could not run: {exc.code().name}: {exc.details()}", file=sys.stderr)
    except OperationError as exc:
        print(f"error: the audit could not run: {exc}", file=sys.stderr)
    except SystemExit as exc:  # the client's own checks (TLS files, ...) end with a message
        print(exc if isinstance(exc.code, str) else f"error: exit {exc.code}", file=sys.stderr)
    except Exception as exc:  # the report could not be written, ...: an error, never a verdict
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return audit.EXIT_ERROR


def _audit_run(args) -> int:
    from advex.client import audit
    from advex.client.audit_report import write_reports

    if args.target:
        raise audit.SpecError(f"unexpected argument {args.target!r} (advex audit SPEC.yaml, or advex audit "
                              "history TARGET)")
    spec, text = audit.load_spec(args.spec)
    client = _client(args)
    result, op_id, kinds = audit.run(client, spec, text, progress=False if args.quiet else None)
    data = audit.report_data(client, spec, result, op_id, kinds)
    paths = write_reports(data, args.output or spec.output)
    for t in data["targets"]:
        print(f"{'PASS' if t['passed'] else 'FAIL'}  {t['name']} ({t['model_id']})")
        for c in t["checks"]:
            print(f"  {'ok  ' if c['passed'] else 'FAIL'} {c['message']}")
    verdict = "PASSED" if data["passed"] else "FAILED: a threshold is breached"
    print(f"audit {spec.name!r} {verdict}; report: {paths['html']} (also {paths['md'].name}, {paths['json'].name})")
    return audit.EXIT_PASS if data["passed"] else audit.EXIT_BREACH


def _audit_history(args) -> int:
    """The audits of a target (model id or name), per audit name and model, oldest first."""
    from advex.client import audit
    from advex.client.audit_report import draw_history, history_table

    if not args.target:
        raise audit.SpecError("advex audit history TARGET (a model id or a target name)")
    records = _client(args).list_audits(target=args.target, audit_name=args.name, limit=args.limit or None)
    if not records:
        print(f"no audits of {args.target!r}{f' named {args.name!r}' if args.name else ''}")
        return audit.EXIT_PASS
    records = sorted(records, key=lambda r: (r.create_time.seconds, r.create_time.nanos, r.id))
    groups = sorted({(r.audit_name, r.model_id) for r in records})
    for name, model_id in groups:
        entries = [audit.history_entry(r) for r in records if (r.audit_name, r.model_id) == (name, model_id)]
        print(f"audit {name!r} of {args.target!r} (model {model_id}): {len(entries)} run(s)")
        print(history_table(entries))
        if args.plot:
            path = args.plot if len(groups) == 1 else f"{Path(args.plot).with_suffix('')}-{name}-{model_id}.png"
            draw_history(entries, path, title=f"{args.target}: {name}")
            print(f"wrote {path}")
    return audit.EXIT_PASS


def cmd_train(args) -> int:
    adversarial = None
    if args.adv_norm:
        adversarial = {"norm": args.adv_norm, "eps": args.adv_eps, "steps": args.adv_steps,
                       "step_size": args.adv_step_size}
    op = _client(args).train(args.arch, args.dataset, split=args.split, limit=args.limit, preset=args.preset,
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                             weight_decay=args.weight_decay, schedule=args.schedule, augment=args.augment,
                             adversarial=adversarial, seed=args.seed, name=args.name,
                             mean=_floats(args.mean) if args.mean else (), std=_floats(args.std) if args.std else ())
    return _finish(op, args.wait)


def cmd_robustify(args) -> int:
    op = _client(args).robustify(args.model, args.dataset, split=args.split, limit=args.limit, steps=args.steps,
                                 step_size=args.step_size, start=args.start, seed=args.seed, name=args.name,
                                 batch_size=args.batch_size)
    return _finish(op, args.wait)


def cmd_build_nonrobust(args) -> int:
    attack = {k: v for k, v in (("eps", args.eps), ("steps", args.attack_steps), ("step_size", args.attack_step_size),
                                ("norm", args.norm)) if v}
    op = _client(args).build_nonrobust_dataset(args.mode, args.model, args.dataset, split=args.split, limit=args.limit,
                                               attack=attack or None, steps=args.steps, step_size=args.step_size,
                                               seed=args.seed, name=args.name, batch_size=args.batch_size)
    return _finish(op, args.wait)


def cmd_transfer(args) -> int:
    op = _client(args).transfer_rate(args.source, args.targets, args.dataset, norm=args.norm, eps=args.eps,
                                     steps=args.steps, targeted=args.targeted, split=args.split, limit=args.limit,
                                     seed=args.seed)
    result, code = _wait_result(op, args.wait)
    if result is None:
        return code
    print(table(["source", "target", "white-box", "transfer rate", "95% CI", "if target right on x", "95% CI",
                 "unconditional", "successes", "transferred"],
                [[p.source_model_id, p.target_model_id,
                  fmt_rate(rate(p.successful_on_source, p.examples if args.targeted else p.correct_on_source)),
                  fmt_rate(rate(p.transferred, p.successful_on_source)), fmt_ci(p, "transfer_rate_ci"),
                  fmt_rate(rate(p.transferred_target_correct, p.successful_target_correct)),
                  fmt_ci(p, "conditional_transfer_rate_ci"),
                  fmt_rate(rate(p.fooled_target, p.examples if args.targeted else p.correct_on_target)),
                  p.successful_on_source, p.transferred] for p in result.pairs]))
    print(f"\n{result.definition}")
    return 0


def cmd_models(args) -> int:
    c = _client(args)
    if args.action == "list":
        print(table(["id", "name", "architecture", "format", "classes", "input", "source"],
                    [[m.id, m.spec.name, m.spec.architecture or "-", res.ModelFormat.Name(m.spec.format).lower(),
                      m.spec.num_classes,
                      "x".join(map(str, m.spec.input_shape)), m.source] for m in c.list_models()]))
    elif args.action == "get":
        _print_json(c.get_model(args.id))
    elif args.action == "delete":
        c.delete_model(args.id)
        print(f"deleted {args.id}")
    elif args.action == "upload":
        m = c.upload_model(args.id, format=args.format, num_classes=args.num_classes,
                           input_shape=_ints(args.input_shape), architecture=args.arch,
                           name=args.name, mean=_floats(args.mean) if args.mean else (),
                           std=_floats(args.std) if args.std else (), layout=args.layout,
                           value_range=args.value_range)
        print(m.id)
    elif args.action == "export":
        if not args.dataset:
            print("error: `models export` needs --dataset (agreement is measured on it)", file=sys.stderr)
            return 2
        return _finish(c.export_model(args.id, args.dataset, limit=args.limit, name=args.name), True)
    return 0


def cmd_datasets(args) -> int:
    c = _client(args)
    if args.action == "list":
        print(table(["id", "name", "kind", "splits", "shape", "classes"],
                    [[d.id, d.name, d.kind, ",".join(f"{k}:{v}" for k, v in sorted(d.splits.items())),
                      "x".join(map(str, d.example_shape)), d.num_classes] for d in c.list_datasets()]))
    elif args.action == "get":
        _print_json(c.get_dataset(args.id))
    elif args.action == "delete":
        c.delete_dataset(args.id)
        print(f"deleted {args.id}")
    elif args.action == "upload":
        d = c.upload_dataset(args.id, name=args.name, split=args.split or "train", num_classes=args.num_classes)
        print(d.id)
    elif args.action == "download":
        output = args.output or f"{args.id}.npz"
        x, _ = c.download_dataset(args.id, split=args.split, path=output, lossy_uint8=args.lossy_uint8)
        print(f"wrote {output} ({len(x)} examples, {x.dtype})")
    return 0


def cmd_ops(args) -> int:
    c = _client(args)
    if args.action == "list":
        print(table(["id", "kind", "state", "progress", "stage"],
                    [[o.id, o.proto.kind, o.state, f"{o.proto.progress.done}/{o.proto.progress.total}",
                      o.proto.progress.stage] for o in c.list_operations(kind=args.kind, limit=args.limit or None)]))
    elif args.action == "get":
        _print_json(c.get_operation(args.id).proto)
    elif args.action == "cancel":
        print(c.cancel_operation(args.id).state)
    elif args.action == "wait":
        return _finish(c.get_operation(args.id), True)
    elif args.action == "watch":
        for op in c.watch_operation(args.id):
            p = op.progress
            print(f"{op.id} {op.State.Name(op.state)} {p.done}/{p.total} {p.unit} {p.stage}", flush=True)
    return 0


class NoServer(Exception):
    """No advex server answers at the target address."""


def no_server_message(target: str) -> str:
    return f"error: no advex server at {target} (start one with `advex serve`)"


def _token(args) -> Optional[str]:
    """--token, else the file of --token-file (a trailing newline is ignored), else none."""
    if args.token:
        return args.token
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError as exc:
            raise SystemExit(f"error: cannot read --token-file {args.token_file!r}: {exc.strerror or exc}") from None
    return None


def _client(args) -> Client:
    """A client once the server answers (within --connect-timeout); NoServer otherwise."""
    try:
        client = Client(args.server, token=_token(args), tls=args.tls_ca or bool(args.tls),
                        client_cert=args.tls_cert or None, client_key=args.tls_key or None)
    except ValueError as exc:  # a TLS file that cannot be read, a certificate without its key
        raise SystemExit(f"error: {exc}") from None
    timeout = args.connect_timeout if args.connect_timeout is not None else \
        LONG_CONNECT_TIMEOUT if args.command in ("demo", "reproduce") else CONNECT_TIMEOUT
    try:
        client.wait_ready(timeout=timeout)
    except grpc.FutureTimeoutError:
        client.close()
        raise NoServer(args.server) from None
    return client


def _ready_client(args) -> Optional[Client]:
    """A client once the server answers, or None after saying why on stderr."""
    try:
        return _client(args)
    except NoServer:
        print(no_server_message(args.server), file=sys.stderr)
        return None


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="advex", description="advex: model robustness as a gRPC service")
    # The server address is stored as `server`: subcommands have options of their own named
    # --target (transfer's target models), which must not overwrite it.
    p.add_argument("--target", "--server", dest="server", default=os.environ.get("ADVEX_TARGET", "localhost:50051"),
                   help="server address host:port (env ADVEX_TARGET; default localhost:50051)")
    p.add_argument("--token", default=os.environ.get("ADVEX_TOKEN", ""),
                   help="bearer token (env ADVEX_TOKEN). A flag is visible in the process list: prefer "
                        "--token-file or ADVEX_TOKEN")
    p.add_argument("--token-file", default=os.environ.get("ADVEX_TOKEN_FILE", ""), metavar="FILE",
                   help="file holding the bearer token (env ADVEX_TOKEN_FILE)")
    p.add_argument("--tls", action="store_true", default=False,
                   help="connect with TLS, trusting the system's root certificates")
    p.add_argument("--tls-ca", default=os.environ.get("ADVEX_TLS_CA", ""), metavar="FILE",
                   help="connect with TLS, trusting the CA certificates in this PEM file (env ADVEX_TLS_CA)")
    p.add_argument("--tls-cert", default=os.environ.get("ADVEX_TLS_CERT", ""), metavar="FILE",
                   help="client certificate chain (PEM) for servers that require mutual TLS; implies TLS "
                        "(env ADVEX_TLS_CERT)")
    p.add_argument("--tls-key", default=os.environ.get("ADVEX_TLS_KEY", ""), metavar="FILE",
                   help="private key (PEM) of --tls-cert (env ADVEX_TLS_KEY)")
    p.add_argument("--connect-timeout", type=float, default=None,
                   help=f"seconds to wait for the server (default {CONNECT_TIMEOUT:g}; "
                        f"{LONG_CONNECT_TIMEOUT:g} for demo and reproduce, which may start beside a server)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC server (needs advex[server]; `advex serve --help`)",
                       add_help=False)
    s.set_defaults(fn=None)  # dispatched in main(): its flags belong to the service

    d = sub.add_parser("demo", help="train, evaluate and attack a small CNN on Fashion-MNIST through the service")
    d.add_argument("--dataset", default="fashion-mnist")
    d.add_argument("--train-limit", type=int, default=20000)
    d.add_argument("--epochs", type=int, default=2)
    d.add_argument("--eval-limit", type=int, default=1000)
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="demo-out", help="folder for the PNG and summary.json")
    d.add_argument("--connect-timeout", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    d.add_argument("--in-process", action="store_true", help="start a server inside this process (needs advex[server])")
    d.add_argument("--data-dir", default="advex-data", help="with --in-process: the server's data dir")
    d.set_defaults(fn=cmd_demo)

    rp = sub.add_parser("reproduce", help="Ilyas et al. (2019) end to end through the service, with a report")
    rp.add_argument("experiment", nargs="?", default="datasets", choices=["datasets", "transfer"],
                    help="datasets: D, D_R, D_NR, D_rand, D_det (§3.1-3.2); transfer: transferability vs D_det (§3.3)")
    rp.add_argument("--preset", default="small", choices=["tiny", "small", "cifar10"],
                    help="small: Fashion-MNIST on 2 CPU cores in ~55 min; cifar10: the paper's settings, for a GPU; "
                         "tiny: a smoke test of a few minutes")
    rp.add_argument("--arch", default="", help="override the preset's architecture (e.g. resnet50)")
    rp.add_argument("--out", default="", help="report folder (default reproduce-<preset>)")
    rp.add_argument("--seeds", type=_positive_int, default=1,
                    help="run the whole pipeline with seeds 0..N-1 and report mean and spread (default 1)")
    rp.add_argument("--suite", default="", choices=["", "autoattack", "autoattack-fast", "pgd"],
                    help="evaluation suite (default: the preset's: autoattack-fast on the CPU presets, autoattack on "
                         "cifar10)")
    rp.add_argument("--connect-timeout", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    rp.set_defaults(fn=cmd_reproduce)

    a = sub.add_parser("attack", help="adversarial examples for an .npz batch (arrays x, y)")
    a.add_argument("--model", required=True)
    a.add_argument("--input", required=True, help=".npz with x [N,C,H,W] (float32 in [0,1] or uint8) and y [N]")
    a.add_argument("--output", default="adversarial.npz")
    a.add_argument("--norm", default="Linf", choices=["L2", "Linf"])
    a.add_argument("--eps", type=float, required=True)
    a.add_argument("--method", default="pgd", choices=["pgd", "fgsm"])
    a.add_argument("--steps", type=int, default=0)
    a.add_argument("--step-size", type=float, default=0.0)
    a.add_argument("--restarts", type=int, default=0)
    a.add_argument("--targeted", action="store_true", help="y holds target classes")
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(fn=cmd_attack)

    e = sub.add_parser("evaluate", help="clean and robust accuracy of a model on a dataset")
    e.add_argument("--model", required=True)
    e.add_argument("--dataset", required=True)
    e.add_argument("--split", default="")
    e.add_argument("--limit", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=0)
    e.add_argument("--attack", type=_attack_arg, action="append",
                   help="e.g. norm=L2,eps=0.25:0.5,steps=20 (repeatable); with --suite only norm, eps and seed")
    e.add_argument("--minimal-distance", action="append", choices=["L2", "Linf"],
                   help="measure each example's smallest adversarial perturbation in this norm (FAB-T) and print "
                        "robust accuracy at every eps (repeatable)")
    e.add_argument("--suite", default="", choices=["", "pgd", "autoattack-fast", "autoattack", "rand"],
                   help="a standard suite run as a cascade at each eps: autoattack (APGD-CE, APGD-T, FAB-T, Square "
                        "5000 queries), autoattack-fast (APGD-CE, APGD-T), pgd (PGD-50), or rand (APGD-CE, APGD-DLR "
                        "with 20 EOT passes per step, for randomized models)")
    e.add_argument("--no-wait", dest="wait", action="store_false", help="print the operation id and return")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_evaluate)

    t = sub.add_parser("train", help="standard or adversarial training of a zoo architecture")
    t.add_argument("--arch", required=True, help="small_cnn, resnet18, resnet50, mlp, linear")
    t.add_argument("--dataset", required=True)
    t.add_argument("--split", default="")
    t.add_argument("--limit", type=int, default=0)
    t.add_argument("--preset", default="", help="cifar10_standard, cifar10_l2_robust, quick")
    t.add_argument("--epochs", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=0)
    t.add_argument("--lr", type=float)
    t.add_argument("--momentum", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--schedule", default="", choices=["", "step", "cosine", "constant"])
    t.add_argument("--augment", action="store_true", default=None)
    t.add_argument("--adv-norm", choices=["L2", "Linf"], help="adversarial training with this norm")
    t.add_argument("--adv-eps", type=float, default=0.5)
    t.add_argument("--adv-steps", type=int, default=7)
    t.add_argument("--adv-step-size", type=float, default=0.0)
    t.add_argument("--mean", default="", help="per-channel normalization, e.g. 0.49,0.48,0.45")
    t.add_argument("--std", default="")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--name", default="")
    t.add_argument("--no-wait", dest="wait", action="store_false")
    t.set_defaults(fn=cmd_train)

    for name, help_text in (("robustify", "build D_R: representation inversion through a robust model"),
                            ("build-nonrobust", "build D_NR, D_rand or D_det (Ilyas et al. 2019)")):
        b = sub.add_parser(name, help=help_text)
        if name == "build-nonrobust":
            b.add_argument("--mode", required=True, choices=["d_nr", "d_rand", "d_det"])
            b.add_argument("--norm", default="", choices=["", "L2", "Linf"], help="D_rand/D_det attack (default L2)")
            b.add_argument("--eps", type=float, default=0.0, help="D_rand/D_det radius (default 0.5)")
            b.add_argument("--attack-steps", type=int, default=0, help="D_rand/D_det steps (default 100)")
            b.add_argument("--attack-step-size", type=float, default=0.0, help="D_rand/D_det step (default 0.1)")
        b.add_argument("--model", required=True)
        b.add_argument("--dataset", required=True)
        b.add_argument("--split", default="")
        b.add_argument("--limit", type=int, default=0)
        b.add_argument("--steps", type=int, default=0, help="inversion steps (default 1000)")
        b.add_argument("--step-size", type=float, default=0.0, help="inversion step size (default 0.1)")
        if name == "robustify":
            b.add_argument("--start", default="", choices=["", "image", "noise"])
        b.add_argument("--batch-size", type=int, default=0)
        b.add_argument("--seed", type=int, default=0)
        b.add_argument("--name", default="")
        b.add_argument("--no-wait", dest="wait", action="store_false")
        b.set_defaults(fn=cmd_robustify if name == "robustify" else cmd_build_nonrobust)

    tr = sub.add_parser("transfer", help="how often each source's adversarial examples fool each target")
    tr.add_argument("--source", action="append", required=True, help="source model id (repeatable)")
    tr.add_argument("--target", dest="targets", action="append", required=True,
                    help="target model id (repeatable)")
    tr.add_argument("--dataset", required=True)
    tr.add_argument("--split", default="")
    tr.add_argument("--limit", type=int, default=0)
    tr.add_argument("--norm", default="L2", choices=["L2", "Linf"])
    tr.add_argument("--eps", type=float, default=0.5)
    tr.add_argument("--steps", type=int, default=0)
    tr.add_argument("--targeted", action="store_true", help="aim at (y + 1) mod C")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--no-wait", dest="wait", action="store_false")
    tr.set_defaults(fn=cmd_transfer)

    h = sub.add_parser("health", help="the server's gRPC health: exit 0 serving, 1 not serving, 2 unreachable")
    h.add_argument("--service", default="", help="a service name (default: the server as a whole)")
    h.set_defaults(fn=cmd_health)

    au = sub.add_parser("audit", help="audit models or inference endpoints against a spec (exit 0 pass, 1 breach, "
                                      "2 error), or show a target's history",
                        description="advex audit SPEC.yaml: run the audit the spec describes (see "
                                    "advex.client.audit) and write report.html, report.md and report.json. "
                                    "advex audit history TARGET: the target's audits, oldest first, and a trend plot.")
    au.add_argument("spec", help="the spec file (YAML), or the word history")
    au.add_argument("target", nargs="?", default="", help="history: a model id or target name")
    au.add_argument("--output", default="", help="report folder (default: the spec's output)")
    au.add_argument("--name", default="", help="history: only audits of this name")
    au.add_argument("--limit", type=int, default=100, help="history: the newest N audits (0 = all)")
    au.add_argument("--plot", default="", help="history: draw the trend into this PNG")
    au.add_argument("--quiet", action="store_true", help="no progress bar")
    au.set_defaults(fn=cmd_audit)

    for name, fn, extra in (("models", cmd_models, True), ("datasets", cmd_datasets, True), ("ops", cmd_ops, False)):
        r = sub.add_parser(name, help=f"{name}: list, get, ...")
        actions = ["list", "get", "delete", "upload"] if extra else ["list", "get", "cancel", "wait", "watch"]
        if name == "datasets":
            actions.append("download")
        if name == "models":
            actions.append("export")
        r.add_argument("action", choices=actions)
        r.add_argument("id", nargs="?", help="resource id (or file, for upload)")
        if name == "models":
            r.add_argument("--format", default="safetensors",
                           choices=["safetensors", "torchscript", "torch_export", "onnx"])
            r.add_argument("--layout", default="", choices=["", "NCHW", "NHWC"], help="ONNX input layout")
            r.add_argument("--value-range", default="", choices=["", "0-1", "0-255"], help="ONNX input range")
            r.add_argument("--dataset", default="", help="export: dataset to measure agreement on")
            r.add_argument("--limit", type=int, default=1000, help="export: examples to compare")
            r.add_argument("--arch", default="")
            r.add_argument("--num-classes", type=int, default=0,
                           help="upload: classes (read from ONNX, torch.export and zoo weights when left out)")
            r.add_argument("--input-shape", default="",
                           help="upload: C,H,W without the batch dim (read from the file where it records it; "
                                "required for torchscript)")
            r.add_argument("--name", default="")
            r.add_argument("--mean", default="")
            r.add_argument("--std", default="")
        if name == "datasets":
            r.add_argument("--name", default="")
            r.add_argument("--split", default="", help="upload: the split it holds (default train); "
                                                        "download: which split (default: the only one, or train)")
            r.add_argument("--num-classes", type=int, default=0)
            r.add_argument("--output", default="", help="download: file to write (default <id>.npz)")
            r.add_argument("--lossy-uint8", action="store_true", help="download: round float32 images to uint8")
        if name == "ops":
            r.add_argument("--kind", default="")
            r.add_argument("--limit", type=int, default=100, help="list: the newest N operations (0 = all)")
        r.set_defaults(fn=fn)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return cmd_serve(argv[1:])
    args = build_parser().parse_args(argv)
    needs_id = getattr(args, "action", "list") not in ("list",)
    if needs_id and not getattr(args, "id", None):
        print(f"error: `{args.command} {args.action}` needs an id", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except NoServer:
        print(no_server_message(args.server), file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            print(f"error: lost the advex server at {args.server}: {exc.details()}", file=sys.stderr)
        else:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
