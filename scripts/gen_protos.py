#!/usr/bin/env python3
"""Regenerate advex's Python protobuf/gRPC code from protos/.

    python scripts/gen_protos.py          # write protos/advex/{v1,oip}/*_pb2*.py
    python scripts/gen_protos.py --check  # exit 1 if the committed code drifted

Two folders: advex/v1 (advex's own contract) and advex/oip (the Open Inference Protocol,
which advex calls as a client of a deployed model).

Needs grpcio-tools (the `dev` extra). The output is deterministic for a given
grpcio-tools version, which ci/constraints.txt pins.
"""
from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = PROTO_ROOT  # the generated Python sits beside the .proto files (advex-protos)
PACKAGES = (Path("advex") / "v1", Path("advex") / "oip")


def generate(out_root: Path) -> dict[Path, list[Path]]:
    """Compile every .proto of PACKAGES into out_root; returns {package: generated files}."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for pkg in PACKAGES for p in (PROTO_ROOT / pkg).glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    for pkg in PACKAGES:
        (out_root / pkg).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return {pkg: sorted(p for p in (out_root / pkg).iterdir() if "_pb2" in p.name) for pkg in PACKAGES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code differs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        drift: list[str] = []
        total = 0
        for pkg, fresh in generated.items():
            target = OUT_ROOT / pkg
            committed = sorted(p for p in target.glob("*_pb2*"))
            total += len(fresh)
            if args.check:
                names_fresh = {p.name for p in fresh}
                names_old = {p.name for p in committed}
                bad = sorted(names_fresh ^ names_old)
                bad += [p.name for p in fresh if p.name in names_old and not filecmp.cmp(p, target / p.name, shallow=False)]
                drift += [str(pkg / name) for name in bad]
                continue
            for p in committed:
                p.unlink()
            for p in fresh:
                shutil.copyfile(p, target / p.name)
            print(f"wrote {len(fresh)} files to {target.relative_to(ROOT)}")
        if args.check:
            if drift:
                print("generated protobuf code is out of date: " + ", ".join(drift), file=sys.stderr)
                print("run: python scripts/gen_protos.py", file=sys.stderr)
                return 1
            print(f"generated protobuf code is up to date ({total} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
