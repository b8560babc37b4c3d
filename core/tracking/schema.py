"""The names of a run record: one spelling for every metric, param and tag ablax writes or reads.

Writers (core/train/loop.py, core/train/tracking.py, launch/sweep_runner.py) and
readers (analysis/) import these names; tests check that a real `ablax train`
run carries only declared keys, so a reader cannot go on looking for a name
that nothing writes.
"""

from __future__ import annotations

# -- metrics ---------------------------------------------------------------------------
# Training, at every logged step (the trainer writes f"train/{name}").
TRAIN = "train/"
TRAIN_LOSS = "train/loss"
TOKENS_PER_S = "train/tokens_per_s"
MFU = "train/mfu"
TOKENS = "train/tokens"            # cumulative tokens trained on
FLOPS = "train/flops"              # cumulative model FLOPs (flops_per_token x tokens)
LEARNING_RATE = "train/learning_rate"
TRAIN_METRICS = (TRAIN_LOSS, "train/z_loss", "train/grad_norm", "train/param_norm",
                 TOKENS_PER_S, "train/step_time_s", MFU, TOKENS, FLOPS, LEARNING_RATE)
# Held-out loss of the trainer's own evaluator.
EVAL_LOSS = "eval/loss"
EVAL_LOSS_SE = "eval/loss_se"      # the eval set's standard error of EVAL_LOSS
EVAL_TOKENS = "eval/tokens"
EVAL_METRICS = (EVAL_LOSS, EVAL_LOSS_SE, EVAL_TOKENS)
# Energy and carbon (core/tracking/energy.py writes f"energy/{name}").
ENERGY = "energy/"
ENERGY_KWH = "energy/energy_kwh"          # device energy, before PUE
ENERGY_KWH_PUE = "energy/energy_kwh_pue"  # with the facility overhead
CO2_KG = "energy/co2_kg"
COMPILE_S = "compile_s"
# MLflow's own system metrics (SystemMetricsMonitor) start with this.
SYSTEM = "system/"
# On a sweep's parent run.
SWEEP_CPU_PEAK = "sweep/cpu_peak_flops"
SWEEP_ENERGY_KWH = "sweep/energy_kwh"
SWEEP_CO2_KG = "sweep/co2_kg"
COMPARE = "compare/"  # compare/<variant>/{mean,std,delta,ci_low,ci_high,p,p_holm,matched_*}
SCALING = "scaling/"  # scaling/<variant>/{E,A,alpha}[_low,_high], delta_at*, multiplier*

# -- params ----------------------------------------------------------------------------
MODEL = "model."                   # every ModelConfig field, once
SEQ_LEN = "train.seq_len"
GLOBAL_BATCH = "train.global_batch"
MESH = "train.mesh"
DATA_SHARDS = "train.data_shards"
FLOPS_PER_TOKEN = "flops_per_token"
ATTENTION_IMPL = "attention.impl."  # attention.impl.<layer kind>
# gin bindings are logged under their module path, e.g. core.train.optimizer.llama_adamw.peak_lr.
GIN_PREFIXES = ("core.", "launch.", "analysis.")

# -- tags ------------------------------------------------------------------------------
CONFIG_HASH = "ablax.config_hash"


def is_declared_metric(key: str) -> bool:
  """Whether `key` is a metric this schema names (by name or by its family's prefix)."""
  return (key in TRAIN_METRICS or key in EVAL_METRICS or key == COMPILE_S
          or key.startswith((ENERGY, SYSTEM, "heldout/", "sweep/", COMPARE, SCALING)))


def is_declared_param(key: str) -> bool:
  return (key in (SEQ_LEN, GLOBAL_BATCH, MESH, DATA_SHARDS, FLOPS_PER_TOKEN)
          or key.startswith((MODEL, ATTENTION_IMPL, *GIN_PREFIXES)))
