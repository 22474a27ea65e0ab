"""`make bench`: run every ``benchmarks/bench_*.py`` in a fresh process and print one summary of their targets.

Each script runs in its own Python process, so JIT compilation, JAX's compilation cache and cold-start costs are
what a user would see running it alone. A script prints whatever details it likes, and its targets as a markdown
table with the header

    | name | ours | peer | ratio | target | holds |

(``holds``: ``yes``, ``no``, or ``info`` for a figure that is printed rather than held to a threshold). Lines of the
form ``TARGET <text>: holds|does not hold (...)`` are collected too. The summary lists every row of every script,
then how many targets hold; the exit status is 1 if a script failed, else 0 (a target that does not hold is a
finding, not an error).

    python benchmarks/run.py                  # all benchmarks, full size
    python benchmarks/run.py --quick          # tiny sizes (RNNLAB_BENCH_QUICK=1): checks the benchmark code runs
    python benchmarks/run.py cells            # only the scripts whose name contains "cells"
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time

HEADER = ("name", "ours", "peer", "ratio", "target", "holds")
_TARGET_LINE = re.compile(r"^TARGET (?P<name>.*?): (?P<verdict>holds|does not hold)\s*(?P<rest>.*)$")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def parse_rows(output: str) -> list[tuple[str, ...]]:
    """The target rows in a benchmark's output: every 6-column ``HEADER`` table, and ``TARGET ...`` lines."""
    rows, in_table = [], False
    for line in output.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            cells = _cells(stripped)
            if tuple(cell.lower() for cell in cells) == HEADER:
                in_table = True
            elif in_table and not all(set(cell) <= set("-: ") for cell in cells) and len(cells) == len(HEADER):
                rows.append(tuple(cells))
            continue
        in_table = False
        match = _TARGET_LINE.match(stripped)
        if match:
            holds = "yes" if match["verdict"] == "holds" else "no"
            rows.append((match["name"], "", "", match["rest"].strip("() "), "", holds))
    return rows


def run_script(path: pathlib.Path, quick: bool) -> tuple[int, str, float]:
    env = dict(os.environ)
    if quick:
        env["RNNLAB_BENCH_QUICK"] = "1"
    root = path.parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    process = subprocess.run([sys.executable, str(path)], cwd=root, env=env, capture_output=True, text=True)
    output = process.stdout + (f"\n[stderr]\n{process.stderr}" if process.returncode else "")
    return process.returncode, output, time.perf_counter() - start


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    patterns = [arg for arg in argv if not arg.startswith("--")]
    scripts = sorted(pathlib.Path(__file__).resolve().parent.glob("bench_*.py"))
    scripts = [path for path in scripts if not patterns or any(p in path.stem for p in patterns)]
    summary, failed = [], []
    for path in scripts:
        print(f"=== {path.name}" + (" (quick)" if quick else ""), flush=True)
        code, output, seconds = run_script(path, quick)
        print(output.rstrip())
        print(f"=== {path.name}: exit {code}, {seconds:.0f} s\n", flush=True)
        if code:
            failed.append(path.name)
        summary += [(path.stem.removeprefix("bench_"),) + row for row in parse_rows(output)]
    print("## Summary" + (" (quick mode: sizes too small to mean anything)" if quick else ""))
    print("| benchmark | " + " | ".join(HEADER) + " |")
    print("|" + " --- |" * (len(HEADER) + 1))
    for row in summary:
        print("| " + " | ".join(row) + " |")
    held = [row for row in summary if row[-1] in ("yes", "no")]
    print(f"\n{sum(row[-1] == 'yes' for row in held)} of {len(held)} targets hold"
          + (f"; failed: {', '.join(failed)}" if failed else "") + ".")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
