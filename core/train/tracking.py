"""The run's MLflow record: one tracker per run, the run kept in the workdir.

Only process 0 records; the others get a tracker that records nothing. Process
0 always writes the workdir's journal (metrics.jsonl); with tracking on, its
RunTracker also uploads the workdir's record to MLflow (core/tracking/sync.py).
A restarted run reads `<workdir>/run.json` and continues the same MLflow run
from where its upload stopped. The default store is the project's
(core.tracking.store.default_tracking_uri: $MLFLOW_TRACKING_URI, else
runs/mlflow.db) unless a URI is given. Starting the tracker creates or reopens
the run, so a store that cannot be written fails before any training step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from core.model import attention_impls
from core.model.flops import flops_per_token, param_counts
from core.paths import REPO_ROOT
from core.tracking import local, schema
from core.tracking.local import read_run_file
from core.tracking.run import LocalTracker, NullTracker, RunTracker
from core.tracking.store import adopt_credentials, default_tracking_uri, public_uri
from core.train import mesh as meshlib
from core.train import partition

logger = logging.getLogger(__name__)

RUN_FILE = schema.RUN_FILE
# In run.json: the step a run finished at (written last), so running it again does nothing.
FINISHED_STEP = schema.FINISHED_STEP_KEY
# MLflow system metrics (system/cpu_utilization_percentage, ...) on process 0, every 10 s.
SYSTEM_METRICS_S = 10.0


def resolve_tracking_uri(tracking_uri: str | None) -> str:
  """The given URI, else the one default store of every command (core.tracking.store).

  Credentials in it move to the environment (core.tracking.store.adopt_credentials).
  """
  return adopt_credentials(tracking_uri or default_tracking_uri())


def write_run_file(workdir: Path, run_id: str, tracking_uri: str, experiment: str) -> None:
  """Points `workdir` at an MLflow run: the trainer there continues it (the sweep and reproduce
  write it; the URI never holds credentials)."""
  local.update_run_file(
    workdir,
    **{
      schema.RUN_ID_KEY: run_id,
      schema.TRACKING_URI_KEY: public_uri(tracking_uri),
      schema.EXPERIMENT_KEY: experiment,
    },
  )


def start_tracker(
  workdir: Path,
  *,
  tracking_uri: str | None,
  experiment: str,
  run_name: str | None,
  enabled: bool,
  tags: Mapping[str, Any] | None = None,
):
  """Process 0: a started RunTracker (resuming the workdir's run), or with tracking off a
  LocalTracker (the journal alone); other processes: a NullTracker."""
  import jax  # pylint: disable=g-import-not-at-top  (not at import: `ablax tracking` needs no JAX)

  if jax.process_index() != 0:
    return NullTracker()
  if not enabled:
    return LocalTracker(workdir)
  uri = resolve_tracking_uri(tracking_uri)
  record = read_run_file(workdir)
  same_store = public_uri(record.get(schema.TRACKING_URI_KEY)) == public_uri(uri)
  run_id = record.get(schema.RUN_ID_KEY) if same_store else None
  tracker = RunTracker(
    uri,
    experiment,
    run_name=run_name or Path(workdir).name,
    run_id=run_id,
    workdir=workdir,
    tags=dict(tags or {}),
    system_metrics_s=SYSTEM_METRICS_S,
  )
  tracker.start()
  return tracker


def mark_finished(workdir: Path, step: int) -> None:
  """Records in run.json that the run finished at `step` (also for runs that are not tracked)."""
  local.update_run_file(workdir, **{FINISHED_STEP: int(step)})


def undelivered_note(workdir: Path, tracker) -> str | None:
  """What to run when part of the run's record has not reached the store at the end, else None."""
  waiting = tracker.pending
  if not waiting:
    return None
  uri = tracker.tracking_uri
  flag = "" if uri == default_tracking_uri() else f" --tracking_uri {uri}"
  return (
    f"{waiting} records of MLflow run {tracker.run_id} did not reach {uri}; they are kept "
    f"in {workdir}. Deliver them once the store answers:\n"
    f"  ablax tracking sync {workdir}{flag}"
  )


def write_record(
  tracker,
  *,
  repo_dir: Path,
  mesh_shape: Mapping[str, int],
  params: Mapping[str, Any],
  counts: Mapping[str, int],
  operative_config: str | None,
  bound_config: str | None,
  gin_files: list,
  manifest: Any,
  config_hash: str | None = None,
) -> None:
  """The run record of a new run: params, tags, config/code/environment/manifest artifacts."""
  from core.tracking import record  # pylint: disable=g-import-not-at-top

  record.write_run_record(
    tracker,
    repo_dir=repo_dir,
    operative_config=operative_config,
    bound_config=bound_config,
    gin_files=tuple(gin_files),
    flat_params=params,
    mesh_shape=dict(mesh_shape),
    param_counts=dict(counts),
    dataset_manifest=manifest,
    config_sha=config_hash,
  )


def energy_meter(
  device_kind: str,
  device_count: int,
  resume_from: Mapping[str, Any] | None = None,
  *,
  pue: float = 1.0,
  grid_region: str | None = None,
  grid_intensity: float | None = None,
  device_power_w: float | None = None,
):
  """A started core.tracking.energy.EnergyMeter (cumulative over resumed sessions), or None.

  None when the device has no known power figure and none was given: energy is
  part of the record, never a reason to stop training. Bad carbon inputs are
  caught earlier, by `check_carbon_inputs`.
  """
  try:
    from core.tracking.energy import EnergyMeter  # pylint: disable=g-import-not-at-top

    meter = EnergyMeter(
      device_kind=device_kind,
      device_count=device_count,
      pue=pue,
      region=grid_region,
      intensity_g_per_kwh=grid_intensity,
      power_w=device_power_w,
    )
    meter.start(resume_from=resume_from or None)
    return meter
  except Exception as e:  # noqa: BLE001  energy is a record, never a reason to stop training
    logger.info("energy not measured: %s", e)
    print(f"energy and carbon not recorded: {e}", flush=True)
    return None


def check_carbon_inputs(
  pue: float, grid_region: str | None, grid_intensity: float | None, device_power_w: float | None
) -> None:
  """Raises CarbonInputError for a bad PUE, region, intensity or power, before training starts."""
  from core.tracking import carbon  # pylint: disable=g-import-not-at-top

  carbon.check_pue(pue)
  if grid_region is not None or grid_intensity is not None:
    carbon.grid_intensity(region=grid_region, intensity_g_per_kwh=grid_intensity)
  if device_power_w is not None and not device_power_w > 0:
    raise carbon.CarbonInputError(f"device_power_w must be positive, got {device_power_w!r}")


def log_run_record(
  tracker, record, builder, model, mesh_obj, seq_len, batch_size, start_step, manifest, data_shards
) -> None:
  """The record a run writes once, at its first step: params, counts, configs, sharding."""
  if start_step > 0:
    return  # logged by the first session of this run; MLflow refuses changed params
  params = {f"{schema.MODEL}{k}": v for k, v in model.to_dict().items()}
  params.update(
    {
      schema.SEQ_LEN: seq_len,
      schema.GLOBAL_BATCH: batch_size,
      schema.MESH: meshlib.describe(mesh_obj),
      schema.DATA_SHARDS: data_shards,
      schema.FLOPS_PER_TOKEN: flops_per_token(model, seq_len),
    }
  )
  # What 'auto' resolved to on this platform at this length (the trainer always packs).
  used = attention_impls.used_by_kind(
    model, attention_impls.current_platform(), seq_len, packed=True
  )
  params.update({f"{schema.ATTENTION_IMPL}{kind}": impl for kind, impl in used.items()})
  if record:
    params.update(record.params)
  write_record(
    tracker,
    repo_dir=REPO_ROOT,
    mesh_shape=dict(mesh_obj.shape),
    params=params,
    counts=param_counts(model),
    operative_config=record.text if record else None,
    bound_config=record.bound_text if record else None,
    gin_files=record.gin_files if record else [],
    manifest=manifest,
    config_hash=record.config_hash if record else None,
  )
  tracker.log_dict(partition.describe_specs(builder.param_specs), "sharding.json")


def energy_reading(energy) -> dict[str, float]:
  """The meter's cumulative figures; {} when it cannot be read."""
  try:
    return {k: float(v) for k, v in energy.read().items() if isinstance(v, (int, float))}
  except Exception as e:  # noqa: BLE001  a failing counter must not stop training
    logger.info("energy reading failed: %s", e)
    return {}


def energy_metrics(energy) -> dict[str, float]:
  """energy_reading under the schema's metric names (energy/...)."""
  return {f"{schema.ENERGY}{k}": v for k, v in energy_reading(energy).items()}


def finish_record(tracker, workdir: Path, record, peak_source: str, energy, step: int) -> None:
  """What a finished run adds to its record: the MFU peak's source, energy, the journal."""
  tracker.set_tags({schema.MFU_PEAK_SOURCE: peak_source})
  if energy is not None:  # the loop leaves the last step's reading to this, the final one
    tracker.log_metrics(energy_metrics(energy), step=step)
    try:
      tracker.log_dict(energy.inputs(), "energy/inputs.json")
    except Exception as e:  # noqa: BLE001
      logger.info("energy inputs unavailable: %s", e)
  if (workdir / "metrics.jsonl").is_file():
    tracker.log_artifact(workdir / "metrics.jsonl")
