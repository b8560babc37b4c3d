"""The sweep's live view reads each running point's progress from its log."""

from __future__ import annotations

import io

from rich.console import Console

from launch import sweep_view

LOG = """$ ablax train --gin_file x.gin
step 10/240 | loss 6.1234 | 5.2k tok/s | MFU 19.8% | ETA 3m 10s
step 20/240 | loss 5.4321 | 5.3k tok/s | MFU 20.1% | ETA 2m 55s
step 20 | held-out loss 5.5012 ± 0.0041 (standard error over 393216 tokens)
"""


def test_read_progress_takes_the_newest_lines(tmp_path):
  log = tmp_path / "p.log"
  log.write_text(LOG)
  p = sweep_view.read_progress(log)
  assert (p.step, p.num_steps, p.loss, p.tokens_per_s, p.mfu, p.eta, p.eval_loss) == (
    20,
    240,
    "5.4321",
    "5.3k",
    "20.1",
    "2m 55s",
    "5.5012",
  )
  assert sweep_view.read_progress(tmp_path / "missing.log") == sweep_view.Progress()


def test_view_shows_running_points_and_drops_finished_ones(tmp_path):
  (tmp_path / "a.log").write_text(LOG)
  (tmp_path / "b.log").write_text("$ ablax train\n")
  now = [100.0]
  out = io.StringIO()
  view = sweep_view.SweepView(
    3, console=Console(file=out, width=140), clock=lambda: now[0], interval_s=0.05
  )
  view.started("a", "mqa seed=0", tmp_path / "a.log")
  view.started("b", "mha seed=1", tmp_path / "b.log")
  now[0] = 130.0
  lines = view.lines()
  assert lines == [
    "  running mqa seed=0: step 20/240 | loss 5.4321 | held-out 5.5012 | ETA 2m 55s | 30 s",
    "  running mha seed=1: starting | 30 s",
  ]
  recorded = Console(record=True, width=140, file=io.StringIO())
  recorded.print(view.table())
  text = recorded.export_text()
  assert "0/3 points done" in text and "20/240" in text and "5.4321" in text
  view.finished("b")
  assert [l.split(":")[0] for l in view.lines()] == ["  running mqa seed=0"]
  # Not a terminal: plain lines at the interval, so a log file shows progress too.
  import time

  deadline = time.monotonic() + 5
  while "running mqa seed=0" not in out.getvalue() and time.monotonic() < deadline:
    time.sleep(0.05)
  view.stop()
  assert "running mqa seed=0: step 20/240" in out.getvalue()
