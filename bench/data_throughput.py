"""Tokens per second delivered by the data pipeline (read + tokenize + pack + batch).

  .venv/bin/python bench/data_throughput.py                      # embedded corpus, default tokenizer
  .venv/bin/python bench/data_throughput.py --seq_len 512 --batch_size 8 --repeats 5

Runs on at most --cores CPU cores (default 2, the trainer's CPU budget) and prints
medians over --repeats timed windows, next to a target: --target_factor (10) x
the tokens/s a trainer consumes (--trainer_tokens_per_s, default 5000, the high
end for a ~20M-parameter model at seq 512 on 2 CPU cores). Also prints the
tokenizer alone (SentencePiece on the same documents), so the pipeline's own
overhead is the difference, and the time set_state takes to resume.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.data.pipeline import lm_batches  # noqa: E402
from core.data.default_tokenizer import default_tokenizer  # noqa: E402
from core.tokenizer import load_tokenizer  # noqa: E402


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--sources",
    default="embedded:code,embedded:prose",
    help="comma-separated source specs (see core/data/sources.py)",
  )
  parser.add_argument("--tokenizer", default=None, help="model path (default: default tokenizer)")
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=50, help="batches per timed window")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--cores", type=int, default=2)
  parser.add_argument("--trainer_tokens_per_s", type=float, default=5000.0)
  parser.add_argument("--target_factor", type=float, default=10.0)
  args = parser.parse_args()

  if hasattr(os, "sched_setaffinity"):
    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cores)
    print(f"cores: {cores}")
  tok = load_tokenizer(args.tokenizer) if args.tokenizer else default_tokenizer()
  specs = [s for s in args.sources.split(",") if s]
  sources = {s.split(":", 1)[1].replace("/", "_") or s: s for s in specs}
  t0 = time.perf_counter()
  it = lm_batches(
    sources=sources, tokenizer=tok, seq_len=args.seq_len, batch_size=args.batch_size, seed=0
  )
  print(
    f"pipeline built in {time.perf_counter() - t0:.2f} s; tokenizer {tok.path} "
    f"({tok.vocab_size} ids); seq_len {args.seq_len}, batch_size {args.batch_size}"
  )
  for _ in range(3):  # warm-up: first reads open the array_record files
    next(it)

  rates = []
  tokens_per_batch = args.seq_len * args.batch_size
  for _ in range(args.repeats):
    start = time.perf_counter()
    real = 0
    for _ in range(args.batches):
      real += int((next(it)["segment_ids"] > 0).sum())
    elapsed = time.perf_counter() - start
    rates.append(args.batches * tokens_per_batch / elapsed)
    padding = 1 - real / (args.batches * tokens_per_batch)
  pipeline_rate = statistics.median(rates)

  # The tokenizer alone on the same kind of documents: the floor the pipeline adds to.
  texts = []
  for name, source in it._sources.items():  # pylint: disable=protected-access
    texts.extend(source[i] for i in range(min(len(source), 200)))
  tok_rates = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    n = sum(len(tok.encode(t)) for t in texts)
    tok_rates.append(n / (time.perf_counter() - start))

  state = it.get_state()
  resume_times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    it.set_state(state)
    resume_times.append(time.perf_counter() - start)

  target = args.target_factor * args.trainer_tokens_per_s
  print(
    f"pipeline tokens/s (median of {args.repeats} x {args.batches} batches): "
    f"{pipeline_rate:,.0f}   [min {min(rates):,.0f}, max {max(rates):,.0f}]   "
    f"padding {padding:.2%}"
  )
  print(f"tokenizer alone tokens/s (median): {statistics.median(tok_rates):,.0f}")
  print(f"set_state (resume) median: {statistics.median(resume_times) * 1e3:.1f} ms")
  print(
    f"target {args.target_factor:g} x {args.trainer_tokens_per_s:,.0f} = {target:,.0f} tokens/s: "
    f"{'met' if pipeline_rate >= target else 'NOT met'} (ratio {pipeline_rate / target:.1f}x)"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
