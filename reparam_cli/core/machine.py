"""The machine as this process may use it (torch-free: read before torch is imported)."""

from __future__ import annotations

import os


def cpu_count() -> int:
    """CPU cores this process may use (the affinity mask under Slurm/cgroups, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def share_the_machine(environ: dict[str, str] | None = None) -> None:
    """Defaults for torch's CPU threads, set before torch is imported and only where the user set
    none: as many OpenMP threads as this process may use cores (not the machine's count, which
    oversubscribes a job given fewer), and threads that sleep rather than spin while they wait,
    so a conversion beside another busy process does not burn the cores it is waiting for."""
    env = os.environ if environ is None else environ
    for key, value in (("OMP_NUM_THREADS", str(cpu_count())), ("OMP_WAIT_POLICY", "PASSIVE")):
        if not env.get(key, "").strip():  # unset or empty (`OMP_NUM_THREADS= cmd`): ours
            env[key] = value
