"""One worker of a run on several processes: `python -m app.core.train.parallel.worker RUN_DIR`, started by
torchrun (launch.py), never by hand. It joins the others (distributed.py), reads the run's config
and plan, checks and tokenizes the data as the launcher did, checks that every process has the
same plan, data and starting step (machines of a cluster each plan for themselves), and trains its
share of every step; rank 0 writes the run folder. On the other machines of a cluster the first
worker of each records in that machine's own run folder how its part ended. The exit status says
whether this worker's part ended well (MISMATCH: the processes disagreed, and the run says how).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict

from app.core.errors import RunError
from app.core.events import RunFailed
from app.core.runs import checkpoint_step, open_run
from app.core.train.loop import train_worker
from app.core.train.parallel import distributed
from app.core.train.prepare import prepare_training

MISMATCH = 3
# What a plan holds that does not change the training: the machines may differ in these.
INFORMATIONAL = ("reasons", "breakdown", "predicted_peak_bytes", "budget_bytes", "gpu", "gpu_capability", "preset")


def main(argv: list[str]) -> int:
    ranks = distributed.join()
    try:
        local = open_run(argv[0])  # this machine's run folder
        run = local if ranks.main else distributed.ReadOnlyRun(local)
        config = local.config()
        prepared = prepare_training(config, log=lambda message: None, plan=local.plan())
        try:
            check_the_same(ranks, run, prepared)
        except RunError as err:
            if ranks.main or ranks.local_rank == 0:
                local.write_status("failed", reason=str(err))
                local.append_event(RunFailed(str(err), 0))
            return MISMATCH
        result = train_worker(run, prepared, ranks, distributed.StopFlag(ranks, run.dir))
        if not ranks.main and ranks.local_rank == 0:  # another machine of a cluster: its own record
            local.write_status(result.status, step=result.step, last_loss=result.final_loss,
                               reason=f"node {config.node_rank} of {config.nodes}: trained its share; the run's "
                                      f"progress, checkpoints and adapter are on node 0 ({config.master_addr})")
        return 0 if result.status in ("finished", "stopped") else 1
    finally:
        distributed.leave()


def check_the_same(ranks, run, prepared) -> None:
    """RunError naming the first process whose plan, data or starting checkpoint differs from rank 0's."""
    plan = {k: v for k, v in asdict(prepared.plan).items() if k not in INFORMATIONAL}

    start = checkpoint_step(run.verified_checkpoint())
    data = [prepared.data_info.get("sha256"), prepared.data_info.get("val_sha256")]
    for what, value, fix in (
            ("plan", _digest(plan), "start every machine with the same command and settings, on the same kind of "
                                    "GPU (compare `tunesmith plan` on each)"),
            ("data", _digest(data), "copy the same data file to every machine"),
            ("starting step", start, "to resume, copy the run folder from node 0 to the other machines first")):
        values = ranks.gather(float(value))
        odd = [rank for rank, got in enumerate(values) if got != values[0]]
        if odd:
            step = f" (step {int(values[odd[0]])} against {int(values[0])})" if what == "starting step" else ""
            raise RunError(f"process {odd[0]} of {ranks.world} has another {what} than process 0{step}: {fix}")


def _digest(value) -> int:
    """48 bits of a SHA-256 of `value` as JSON: exact in a float64, for `Ranks.gather`."""
    text = json.dumps(value, sort_keys=True, default=str)
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
