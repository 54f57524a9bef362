"""``python -m bench.experiments [--only NAME[,NAME]] [--out DIR] [--epochs N] [--seeds N]``.

Runs every experiment (or the named ones), writes one PNG each and ``results.json`` into ``--out``
(default ``docs/evidence``), and regenerates ``docs/evidence.md`` from all results found there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import conv_regularisers, drop_path, dropconnect_inference, keep_probability, max_norm, variance_shift
from .common import COMMAND, Context, Finding

EXPERIMENTS = {
    module.__name__.rsplit(".", 1)[-1]: module
    for module in (keep_probability, max_norm, variance_shift, conv_regularisers, dropconnect_inference, drop_path)
}


def _markdown(findings: list[Finding], meta: dict[str, object]) -> str:
    lines = [
        "# Evidence: the seed's claims about the dropout family, re-measured",
        "",
        f"Every figure below was made by `{COMMAND}` ({meta['command_line']}) on {meta['machine']}, "
        f"torch {meta['torch']}, in {meta['seconds']:.0f} s of wall time ({meta['cpu_seconds']:.0f} s of CPU time) in "
        "all. Seeds are fixed; each "
        "caption names the command that regenerates that figure alone. The verdicts are computed from the "
        "numbers, not written by hand, and say where the data contradicts the seed. " + str(meta["note"]),
        "",
    ]
    for f in findings:
        lines += [
            f"## {f.title}",
            "",
            f"**Claim.** {f.claim}",
            "",
            f"![{f.title}](evidence/{f.figure})",
            "",
            f"*{f.caption}* ({f.seconds:.0f} s)",
            "",
        ]
        lines += ["| " + " | ".join(f.headers) + " |", "|" + "---|" * len(f.headers)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in f.rows]
        lines += ["", f"**What the data shows.** {f.verdict}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__)
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(EXPERIMENTS)}")
    parser.add_argument("--out", type=Path, default=Path("docs/evidence"))
    parser.add_argument("--epochs", type=int, default=10, help="epochs per training run (early stopping on val)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per configuration")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--note", default=None, help="a sentence about the run (machine load...) for evidence.md")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        print(
            f"{COMMAND}: error: unknown experiment {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}",
            file=sys.stderr,
        )
        return 2
    ctx = Context(out=args.out, seeds=tuple(range(args.seeds)), epochs=args.epochs, progress=args.progress)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    stored = json.loads(results_path.read_text()) if results_path.exists() else {"findings": {}}
    start, cpu_start = time.perf_counter(), time.process_time()
    for name in names:
        began = time.perf_counter()
        print(f"{COMMAND}: {name} ...", file=sys.stderr, flush=True)
        finding = EXPERIMENTS[name].run(ctx)
        finding.seconds = time.perf_counter() - began
        stored["findings"][name] = asdict(finding)
        print(f"  {finding.verdict}", file=sys.stderr, flush=True)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if set(names) == set(EXPERIMENTS):
        stored["seconds"], stored["cpu_seconds"] = total, cpu
    stored.setdefault("seconds", total)
    stored.setdefault("cpu_seconds", cpu)
    stored["torch"] = torch.__version__
    stored["threads"] = torch.get_num_threads()
    stored["command_line"] = f"--epochs {args.epochs} --seeds {args.seeds}"
    if args.note is not None:
        stored["note"] = args.note
    results_path.write_text(json.dumps(stored, indent=1, default=float) + "\n")
    findings = [Finding(**stored["findings"][n]) for n in EXPERIMENTS if n in stored["findings"]]
    meta = {
        "command_line": stored["command_line"],
        "machine": f"{stored['threads']} torch threads",
        "torch": stored["torch"],
        "seconds": stored["seconds"],
        "cpu_seconds": stored["cpu_seconds"],
        "note": stored.get("note", ""),
    }
    markdown = args.out.parent / "evidence.md"
    markdown.write_text(_markdown(findings, meta) + "\n")
    print(f"{COMMAND}: wrote {markdown} and {len(findings)} figures in {args.out} ({total:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
