"""The papers' configurations on the papers' hardware: `ablax plan` for every gin/plan preset.

    python bench/plan_table.py [--only gemma2_9b_v5e-256 ...] [--out bench/plan_table.md]

Each preset names its target in its header ("# Plan: ablax plan ... --target X").
Every plan runs in its own process (one compile at a time: a 27B compile takes
minutes and gigabytes here), and the table is rewritten after each, so a long
run shows its progress and an interrupted one keeps what it has.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
HEADER = (
  "| preset | target | mesh (data, fsdp, tensor) | batch x seq | attention | "
  "per device: args / temps / peak (GiB) | HBM | verdict | compile (s) | host peak (GiB) | "
  "tokens/s at 40% MFU | paper's tokens: wall clock | energy |"
)


def presets(only: list[str]) -> list[tuple[Path, str]]:
  rows = []
  for path in sorted((REPO / "gin" / "plan").glob("*.gin")):
    m = re.search(r"--target (\S+)", path.read_text())
    if m and (not only or path.stem in only):
      rows.append((path, m.group(1)))
  return rows


def row(name: str, target: str, record: dict | None, rc: int, tail: str) -> str:
  if record is None:
    return f"| {name} | {target} | | | | | | error (rc {rc}): {tail} | | | | | |"
  p, r = record["plan"], record["run"]
  mesh = ", ".join(str(v) for v in p["mesh"].values())
  attention = ", ".join(sorted(set(p["attention"].values())))
  gib = lambda n: "-" if n is None else f"{n / GIB:.2f}"
  need = p["peak_bytes"] if p["peak_bytes"] is not None else p["used_bytes"]
  if p["fits"]:
    verdict = f"fits ({100 * need / p['usable_bytes']:.0f}% of usable)"
  else:
    verdict = f"**does not fit** ({gib(need)} > {gib(p['usable_bytes'])})"
  verdict += " [compiler]" if p["verdict_by"] == "compiler" else " [peak vs 75% HBM]"
  hours = r["hours"]
  wall = f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h"
  energy = (
    f"{r['energy_mwh']:.0f} MWh" if r.get("energy_mwh") is not None else "needs --device_power_w"
  )
  return (
    f"| {name} | {target} | {mesh} | {p['batch']} x {p['seq']} | {attention} | "
    f"{gib(p['argument_bytes'])} / {gib(p['temp_bytes'])} / {gib(need)} | "
    f"{gib(p['usable_bytes'])} | {verdict} | {p['compile_s']:.0f} | "
    f"{p['host_peak_bytes'] / GIB:.2f} | {r['tokens_per_s']:,.0f} | "
    f"{r['tokens'] / 1e12:.2f}T: {wall} | {energy} |"
  )


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="*", default=[], help="preset names (default: all)")
  parser.add_argument("--out", default=str(REPO / "bench" / "plan_table.md"))
  args = parser.parse_args()
  head = [HEADER, "|" + "|".join("---" for _ in range(HEADER.count("|") - 1)) + "|"]
  # Rows of presets not planned this time stay as they were (--only reruns some).
  out_path = Path(args.out)
  rows = {}
  if out_path.exists():
    for line in out_path.read_text().splitlines()[2:]:
      if line.startswith("| "):
        rows[line.split("|")[1].strip()] = line
  todo = presets(args.only)
  for i, (path, target) in enumerate(todo, 1):
    print(
      f"[{i}/{len(todo)}] ablax plan --gin_file {path.relative_to(REPO)} --target {target}",
      flush=True,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
      out = Path(tmp) / "plan.json"
      proc = subprocess.run(
        [
          sys.executable,
          "-m",
          "launch.cli",
          "plan",
          "--gin_file",
          str(path),
          "--target",
          target,
          "--json",
          str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
      )
      record = json.loads(out.read_text()) if out.exists() else None
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
    print(f"    rc {proc.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
    rows[path.stem] = row(path.stem, target, record, proc.returncode, tail)
    lines = head + [rows[k] for k in sorted(rows)]
    out_path.write_text("\n".join(lines) + "\n")
  print(out_path.read_text())
  return 0


if __name__ == "__main__":
  sys.exit(main())
