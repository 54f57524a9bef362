"""Time of `dropwise convert` per step, CPU and wall, on `--quick` zoo packages (issue 13, item 3).

    python -m bench.convert_time                                  # mlp_digits and cnn_mnist, 3 repetitions
    python -m bench.convert_time --networks mlp_digits --repeats 5
    python -m bench.convert_time --python OTHER/.venv/bin/python  # another checkout too, side by side
    python -m bench.convert_time --imports-only                   # CPU of the imports a convert needs

Each repetition converts a fresh copy of the same package in a real subprocess
(``python -m dropwise.cli convert PACKAGE --json --no-progress``, one torch thread), so imports count as a
user sees them. Per step it reads the parity report's ``seconds`` (wall) and ``cpu_seconds`` (CPU of the
process; absent in checkouts from before they were recorded); ``other`` is the rest of the process
(interpreter start, imports, reading the package) and ``total`` the whole process: its CPU time (user +
system, from ``wait4``) and its wall time. Candidates (``--python``) alternate repetition by repetition so
that load from other processes hits them alike; medians are reported with the load average seen during the
runs. Packages: ``dropwise train NETWORKS --quick --no-export`` into a temporary repository (``--repository``
reuses one). Nothing is asserted; one JSON object is printed (``--json PATH`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STEPS = (
    "fold",
    "export model.onnx",
    "deterministic parity",
    "export model.mc.onnx",
    "MC parity",
    "write package",
)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_packages(python: str, networks: list[str], repository: Path) -> None:
    """Quick packages of `networks` (weights only: convert exports them)."""
    cmd = [python, "-m", "dropwise.cli", "train", *networks, "--quick", "-r", str(repository), "--no-export"]
    subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL)


def _run(cmd: list[str]) -> tuple[str, float, int]:
    """Run `cmd`; its stdout, wall seconds and exit status (stderr's tail is shown on failure)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
    return proc.stdout.decode(), wall, proc.returncode


def convert_once(python: str, package: Path, workdir: Path) -> dict[str, Any]:
    """Convert a fresh copy of `package` with `python`; per-step and total times."""
    copy = workdir / package.parent.name / package.name
    if copy.parent.exists():
        shutil.rmtree(copy.parent)
    shutil.copytree(package, copy)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out, wall, code = _run([python, "-m", "dropwise.cli", "convert", str(copy), "--json", "--no-progress"])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    shutil.rmtree(copy.parent)
    if code != 0:
        return {"exit": code, "total": {"cpu": cpu, "wall": wall}}
    report = json.loads(out)
    steps_wall = report.get("seconds", {})
    steps_cpu = report.get("cpu_seconds", {})
    row: dict[str, Any] = {"passed": report.get("passed"), "steps": {}}
    for step in STEPS:
        if step in steps_wall:
            row["steps"][step] = {"wall": steps_wall[step], "cpu": steps_cpu.get(step)}
    known_cpu = [v["cpu"] for v in row["steps"].values()]
    row["steps"]["other"] = {
        "wall": wall - sum(v["wall"] for v in row["steps"].values()),
        "cpu": cpu - sum(known_cpu) if None not in known_cpu else None,
    }
    row["total"] = {"cpu": cpu, "wall": wall}
    return row


IMPORT_STAGES = (
    ("torch", "import torch"),
    ("torch.export tracing (dynamo, aot_autograd)", "import torch.export._trace"),
    ("torch.onnx exporter + onnxscript", "import torch.onnx._internal.exporter._core, onnxscript"),
    ("onnxscript torchlib ops (registry source)", "import onnxscript.function_libs.torch_lib.ops"),
    ("scikit-learn (dataset splits)", "import sklearn.model_selection, sklearn.datasets"),
    ("onnxruntime", "import onnxruntime"),
    ("dropwise CLI and convert", "import dropwise.cli, dropwise.surgery.convert, dropwise.models.data"),
)
_IMPORTS = """
import json, time
stages = json.loads(STAGES)
out, last = [], time.process_time()
for name, statement in stages:
    exec(statement)
    now = time.process_time()
    out.append([name, round(now - last, 3)])
    last = now
print(json.dumps({"stages": out, "total": round(last, 3)}))
"""


def import_costs(python: str) -> dict[str, Any]:
    """CPU seconds of the imports a convert needs, stage by stage in one fresh process (each stage adds to the
    previous ones; ``total`` includes the interpreter's start)."""
    code = _IMPORTS.replace("STAGES", repr(json.dumps(IMPORT_STAGES)))
    proc = subprocess.run([python, "-c", code], env=_env(), capture_output=True, check=True)
    return dict(json.loads(proc.stdout.decode().strip().splitlines()[-1]))


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if len(present) == len(values) and present else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per step and in total over the repetitions of one candidate and network."""
    done = [r for r in rows if "steps" in r]
    out: dict[str, Any] = {"repeats": len(rows), "failed": len(rows) - len(done)}
    if not done:
        return out
    out["passed"] = all(r["passed"] for r in done)
    names = [name for name in (*STEPS, "other") if all(name in r["steps"] for r in done)]
    out["steps"] = {
        name: {kind: _median([r["steps"][name][kind] for r in done]) for kind in ("cpu", "wall")} for name in names
    }
    out["total"] = {kind: _median([r["total"][kind] for r in done]) for kind in ("cpu", "wall")}
    out["total_cpu_min"] = round(min(r["total"]["cpu"] for r in done), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="mlp_digits,cnn_mnist")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--python", action="append", default=[], help="another interpreter (checkout) to time")
    parser.add_argument("--repository", type=Path, help="existing repository with version 1 of each network")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--imports-only", action="store_true", help="only the import stages (no convert)")
    args = parser.parse_args(argv)
    if args.imports_only:
        runs = [import_costs(python) for python in [sys.executable, *args.python] for _ in range(args.repeats)]
        print(json.dumps({"imports_cpu_seconds_per_run": runs}, indent=2))
        return 0
    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    candidates = [sys.executable, *args.python]
    with tempfile.TemporaryDirectory(prefix="dropwise-convert-time-") as tmp:
        repository = args.repository or Path(tmp) / "packages"
        if args.repository is None:
            train_packages(sys.executable, networks, repository)
        workdir = Path(tmp) / "work"
        rows: dict[tuple[str, str], list[dict[str, Any]]] = {(c, n): [] for c in candidates for n in networks}
        loads: list[float] = []
        for _ in range(args.repeats):
            for network in networks:
                for candidate in candidates:
                    loads.append(os.getloadavg()[0])
                    rows[(candidate, network)].append(convert_once(candidate, repository / network / "1", workdir))
                    print(f"{candidate} {network}: {rows[(candidate, network)][-1].get('total')}", file=sys.stderr)
    imports = [import_costs(sys.executable) for _ in range(args.repeats)]
    result = {
        "command": " ".join([Path(sys.executable).name, "-m", "bench.convert_time", *(argv or sys.argv[1:])]),
        "cpus": os.cpu_count(),
        "load_average_1min": {"min": round(min(loads), 2), "max": round(max(loads), 2)},
        "imports_cpu_seconds": {
            name: _median([run["stages"][i][1] for run in imports]) for i, (name, _) in enumerate(IMPORT_STAGES)
        }
        | {"total with interpreter start": _median([run["total"] for run in imports])},
        "results": [
            {"python": candidate, "network": network, **summarise(rows[(candidate, network)])}
            for candidate in candidates
            for network in networks
        ],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
