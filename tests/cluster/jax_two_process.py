"""One process of a multi-process JAX program started by `srun`.

Resolves coordinator, process count and id the way `ablax train` does
(launch/distributed.py, from the SLURM step environment), starts JAX's
multi-controller runtime on CPU and checks that a collective spans every
process. Writes `<out_dir>/process-<id>.json`.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(out_dir: str) -> int:
  from launch import distributed

  config = distributed.resolve_distributed(None, os.environ)
  assert config is not None, "expected a multi-process SLURM step"
  distributed.initialize(config)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils

  mine = np.full((jax.local_device_count(),), jax.process_index() + 1, np.int32)
  gathered = multihost_utils.process_allgather(jnp.asarray(mine))
  result = {
    "config": [config.coordinator_address, config.num_processes, config.process_id],
    "source": config.source,
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "device_count": jax.device_count(),
    "local_device_count": jax.local_device_count(),
    "gathered": np.asarray(gathered).ravel().tolist(),
  }
  Path(out_dir, f"process-{jax.process_index()}.json").write_text(json.dumps(result))
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
