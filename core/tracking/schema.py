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
TOKENS = "train/tokens"  # cumulative tokens trained on
FLOPS = "train/flops"  # cumulative model FLOPs (flops_per_token x tokens)
LEARNING_RATE = "train/learning_rate"
TRAIN_METRICS = (
  TRAIN_LOSS,
  "train/z_loss",
  "train/grad_norm",
  "train/param_norm",
  TOKENS_PER_S,
  "train/step_time_s",
  MFU,
  TOKENS,
  FLOPS,
  LEARNING_RATE,
)
# Evaluations: every key under EVAL, in training (core.train.evaluators) and from
# `ablax eval` alike. The trainer's held-out loss:
EVAL = "eval/"
EVAL_LOSS = "eval/loss"
EVAL_LOSS_SE = "eval/loss_se"  # the eval set's standard error of EVAL_LOSS
EVAL_TOKENS = "eval/tokens"
# core.eval's families (core.eval.suite.EvalSuite in training, `ablax eval` standalone):
EVAL_HELDOUT = "eval/heldout"  # /<source>/<metric>, /domain/<domain>/<metric>, /<metric>
EVAL_MC = "eval/mc"  # /<task>/<k>shot/<metric> (core/eval/mc_metrics.py)
EVAL_MEMORIZATION = "eval/memorization"  # /[<source>/]<metric>
# Energy and carbon (core/tracking/energy.py writes f"energy/{name}").
ENERGY = "energy/"
ENERGY_KWH = "energy/energy_kwh"  # device energy, before PUE
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
MODEL = "model."  # every ModelConfig field, once
SEQ_LEN = "train.seq_len"
GLOBAL_BATCH = "train.global_batch"
MESH = "train.mesh"
DATA_SHARDS = "train.data_shards"
FLOPS_PER_TOKEN = "flops_per_token"
ATTENTION_IMPL = "attention.impl."  # attention.impl.<layer kind>
# gin bindings are logged under their module path, e.g. core.train.optimizer.llama_adamw.peak_lr.
GIN_PREFIXES = ("core.", "launch.", "analysis.")

# On a sweep's parent run.
SWEEP_NAME_PARAM = "sweep.name"
SWEEP_POINTS_PARAM = "sweep.points"
SWEEP_SEEDS_PARAM = "sweep.seeds"
SWEEP_BASE_PARAM = "sweep.base"
AXIS_PARAM = "axis."  # axis.<name>: the axis's variant labels

# -- tags ------------------------------------------------------------------------------
# Every run (core/tracking/record.py run_tags).
CONFIG_HASH = "ablax.config_hash"
VERSION = "ablax.version"
GIT_COMMIT = "git.commit"
GIT_DIRTY = "git.dirty"
DEVICE_KIND = "device.kind"
DEVICE_COUNT = "device.count"
PROCESS_COUNT = "process.count"
PYTHON = "python"
MESH_TAG = "mesh"
PACKAGE = "pkg."  # pkg.<distribution> = version
SWEPT = "ablax.swept"  # the axes a run's params vary, by short name
MFU_PEAK_SOURCE = "mfu_peak_source"
KIND = "ablax.kind"  # what made a run that is not training: 'eval', 'plan'
MODEL_DIR = "ablax.model_dir"  # an eval run's model directory
PLAN_TARGET = "ablax.target"
PLAN_FITS = "ablax.fits"
ERROR = "ablax.error"  # why a run failed, in one line
# MLflow's own, which its UI shows.
PARENT = "mlflow.parentRunId"
NOTE = "mlflow.note.content"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_PREFIX = "mlflow."
# Sweeps (launch/sweep_runner.py writes, analysis/runs.py reads).
SWEEP_NAME = "ablax.sweep.name"
SWEEP_ROLE = "ablax.sweep.role"  # 'parent' or 'child'
SWEEP_HASH = "ablax.sweep.hash"
SWEEP_POINT = "ablax.sweep.point"
SWEEP_VARIANT = "ablax.sweep.variant"
SWEEP_SEED = "ablax.sweep.seed"
SWEEP_INDEX = "ablax.sweep.index"
SWEEP_BASELINE = "ablax.sweep.baseline"
SWEEP_METRIC = "ablax.sweep.metric"
SWEEP_FILE = "ablax.sweep.file"
LAUNCHER = "ablax.launcher"
ENV = "ablax.env."  # ablax.env.<VAR>: a child's thread and device settings
CPUS = "ablax.cpus"  # cores a pinned worker had
SLURM_JOB_IDS = "ablax.slurm.job_ids"
SLURM_ARRAY = "ablax.slurm.array"
SLURM_SCRIPT = "ablax.slurm.script"
# Reproduction (launch/commands/reproduce.py).
REPRODUCES = "ablax.reproduces"
REPRODUCE_RESULT = "ablax.reproduce.result"
REPRODUCE_MAX_REL_DIFF = "ablax.reproduce.max_rel_diff"
_TAGS = (
  CONFIG_HASH,
  VERSION,
  ERROR,
  GIT_COMMIT,
  GIT_DIRTY,
  DEVICE_KIND,
  DEVICE_COUNT,
  PROCESS_COUNT,
  PYTHON,
  MESH_TAG,
  SWEPT,
  MFU_PEAK_SOURCE,
  KIND,
  MODEL_DIR,
  PLAN_TARGET,
  PLAN_FITS,
  SWEEP_NAME,
  SWEEP_ROLE,
  SWEEP_HASH,
  SWEEP_POINT,
  SWEEP_VARIANT,
  SWEEP_SEED,
  SWEEP_INDEX,
  SWEEP_BASELINE,
  SWEEP_METRIC,
  SWEEP_FILE,
  LAUNCHER,
  CPUS,
  SLURM_JOB_IDS,
  SLURM_ARRAY,
  SLURM_SCRIPT,
  REPRODUCES,
  REPRODUCE_RESULT,
  REPRODUCE_MAX_REL_DIFF,
)

# -- artifacts -------------------------------------------------------------------------
CONFIG_ARTIFACT = "config/config.gin"
OPERATIVE_CONFIG_ARTIFACT = "config/operative_config.gin"
GIN_FILES_ARTIFACTS = "config/gin_files"
ENVIRONMENT_ARTIFACT = "environment.json"
CODE_VERSION_ARTIFACT = "code/version.json"
CODE_DIFF_ARTIFACT = "code/diff.patch"
PARAM_COUNTS_ARTIFACT = "model/param_counts.json"
DATA_MANIFEST_ARTIFACT = "data/manifest.json"
SWEEP_ARTIFACT = "sweep/sweep.json"
PLAN_ARTIFACT = "plan.json"
COMPARISON_TABLE_ARTIFACT = "comparison/table.json"

# -- the workdir's run.json: the MLflow run a workdir continues -------------------------
RUN_FILE = "run.json"
RUN_ID_KEY = "mlflow_run_id"
TRACKING_URI_KEY = "tracking_uri"  # without credentials (core.tracking.store.public_uri)
EXPERIMENT_KEY = "experiment"
FINISHED_STEP_KEY = "finished_step"  # written last: running a finished run again does nothing
# A sweep's sweep.json: its definition's hash and parent run, next to its points' workdirs.
SWEEP_STATE_FILE = "sweep.json"
PARENT_RUN_ID_KEY = "parent_run_id"


def is_declared_metric(key: str) -> bool:
  """Whether `key` is a metric this schema names (by name or by its family's prefix)."""
  return (
    key in TRAIN_METRICS
    or key == COMPILE_S
    or key.startswith((EVAL, ENERGY, SYSTEM, "sweep/", COMPARE, SCALING))
  )


def is_declared_param(key: str) -> bool:
  return key in (
    SEQ_LEN,
    GLOBAL_BATCH,
    MESH,
    DATA_SHARDS,
    FLOPS_PER_TOKEN,
    SWEEP_NAME_PARAM,
    SWEEP_POINTS_PARAM,
    SWEEP_SEEDS_PARAM,
    SWEEP_BASE_PARAM,
  ) or key.startswith((MODEL, ATTENTION_IMPL, AXIS_PARAM, *GIN_PREFIXES))


def is_declared_tag(key: str) -> bool:
  """Whether `key` is a tag this schema names (MLflow's own `mlflow.*` included)."""
  return key in _TAGS or key.startswith((PACKAGE, ENV, MLFLOW_PREFIX))
