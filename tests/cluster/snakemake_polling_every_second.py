"""Snakemake's command line, with the SLURM plugin checking its jobs every second.

The plugin (2.8) waits 10 s longer after each status check that finds no job finished, up to
180 s: right for a cluster, where jobs take hours and squeue is shared, but on the test node a
30 s job is noticed up to a minute late, and a test of several job stages spends most of its
time waiting. The site profile asks for checks every second (`seconds-between-status-checks`,
`slurm-init-seconds-before-status-checks`); this restores that interval after every check.
Nothing else changes: the same plugin submits, tracks and reports the jobs on the real SLURM.

    python tests/cluster/snakemake_polling_every_second.py SNAKEMAKE-ARGUMENTS...
"""

import sys

from snakemake.cli import main
from snakemake_executor_plugin_slurm import Executor

_check_active_jobs = Executor.check_active_jobs


async def check_active_jobs(self, active_jobs):
    async for job in _check_active_jobs(self, active_jobs):
        yield job
    self.next_seconds_between_status_checks = (
        self.workflow.executor_settings.init_seconds_before_status_checks
    )


Executor.check_active_jobs = check_active_jobs

if __name__ == "__main__":
    sys.exit(main())
