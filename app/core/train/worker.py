"""One worker of a run on several processes: `python -m app.core.train.worker RUN_DIR`, started by
torchrun (launch.py), never by hand. It joins the others (distributed.py), reads the run's config
and plan, checks and tokenizes the data as the launcher did, and trains its share of every step;
rank 0 writes the run folder. The exit status says whether this worker's part ended well."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from app.core.runs import open_run
    from app.core.train import distributed
    from app.core.train.prepare import prepare_training
    from app.core.train.trainer import train_worker

    ranks = distributed.join()
    try:
        run = open_run(argv[0])
        if not ranks.main:
            run = distributed.ReadOnlyRun(run)
        prepared = prepare_training(run.config(), log=lambda message: None, plan=run.plan())
        result = train_worker(run, prepared, ranks, distributed.StopFlag(ranks, run.dir))
        return 0 if result.status in ("finished", "stopped") else 1
    finally:
        distributed.leave()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
