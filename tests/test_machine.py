"""core.machine: torch's thread defaults, set only where the user set none."""

from __future__ import annotations

from reparam_cli.core.machine import cpu_count, share_the_machine


def test_thread_defaults_fill_unset_and_empty_values_and_keep_the_users():
    env = {"OMP_NUM_THREADS": "", "OMP_WAIT_POLICY": "ACTIVE"}
    share_the_machine(env)
    assert env == {"OMP_NUM_THREADS": str(cpu_count()), "OMP_WAIT_POLICY": "ACTIVE"}
    env = {}
    share_the_machine(env)
    assert env == {"OMP_NUM_THREADS": str(cpu_count()), "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_NUM_THREADS": "1"}
    share_the_machine(env)
    assert env["OMP_NUM_THREADS"] == "1"
