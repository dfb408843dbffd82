"""The launcher environment (dist_xqa.distributed.launcher_env, first_slurm_host,
rank_threads, cuda_device_index): which rank, world, local rank, rendezvous and GPU each
process of a launch gets, for every launcher, from the environment alone."""
from __future__ import annotations

import pytest

from dist_xqa.distributed import cuda_device_index, first_slurm_host, launcher_env, rank_threads

# What a submitting shell may have exported from an earlier torchrun or by hand: sbatch
# and srun pass it on to every task.
STALE = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "login01", "MASTER_PORT": "29500"}


def srun_task(procid: int, nodes: int = 2, per_node: int = 8, job: str = "4242", **extra: str) -> dict[str, str]:
    """The Slurm variables of task `procid` of `srun` in an sbatch job of `nodes` nodes
    gpu01.., `per_node` tasks each (block distribution: node = procid // per_node)."""
    return {"SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", "SLURM_NNODES": str(nodes),
            "SLURM_JOB_NODELIST": f"gpu[01-{nodes:02d}]", "SLURM_STEP_NODELIST": f"gpu[01-{nodes:02d}]",
            "SLURM_NTASKS": str(nodes * per_node), "SLURM_NTASKS_PER_NODE": str(per_node),
            "SLURM_PROCID": str(procid), "SLURM_NODEID": str(procid // per_node),
            "SLURM_LOCALID": str(procid % per_node), **extra}


def test_two_node_srun_gives_every_task_its_own_rank_and_one_rendezvous_despite_the_submitting_shell():
    worlds = [launcher_env({**STALE, **srun_task(procid)}) for procid in range(16)]
    assert [int(w["RANK"]) for w in worlds] == list(range(16))
    assert {w["WORLD_SIZE"] for w in worlds} == {"16"}
    assert [int(w["LOCAL_RANK"]) for w in worlds] == [*range(8), *range(8)]
    assert {(w["MASTER_ADDR"], w["MASTER_PORT"]) for w in worlds} == {("gpu01", str(20000 + 4242 % 20000))}


@pytest.mark.parametrize("visible, devices", [
    (8, [*range(8), *range(8)]),  # every task sees the node's 8 GPUs
    (1, [0] * 16),  # --gpus-per-task=1: each task sees only its own, as device 0
])
def test_each_task_of_the_two_node_job_gets_a_device_it_can_see(visible, devices):
    local_ranks = [int(launcher_env(srun_task(procid))["LOCAL_RANK"]) for procid in range(16)]
    assert [cuda_device_index(local, visible) for local in local_ranks] == devices


def test_no_visible_device_is_refused():
    with pytest.raises(ValueError, match="no CUDA device"):
        cuda_device_index(3, 0)


def test_a_one_node_step_of_a_two_node_job_meets_on_the_steps_node():
    env = {**srun_task(1, nodes=2, per_node=2), "SLURM_STEP_NODELIST": "gpu02", "SLURM_STEP_NUM_NODES": "1",
           "SLURM_STEP_NUM_TASKS": "2"}
    got = launcher_env(env)
    assert (got["RANK"], got["WORLD_SIZE"], got["MASTER_ADDR"]) == ("1", "2", "gpu02")


def test_srun_env_gives_rank_and_rendezvous_on_the_first_node():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[003-006],cpu1", "SLURM_JOB_ID": "123456"}
    assert launcher_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                 "MASTER_ADDR": "gpu003", "MASTER_PORT": str(20000 + 123456 % 20000)}


def test_torchrun_inside_an_srun_step_is_used_as_is():
    """srun starting one torchrun per node: torchrun's ranks, not the step's (one task a node)."""
    env = {**srun_task(1, nodes=2, per_node=1), "TORCHELASTIC_RUN_ID": "4242", "RANK": "11", "WORLD_SIZE": "16",
           "LOCAL_RANK": "3", "MASTER_ADDR": "gpu01", "MASTER_PORT": "29400"}
    assert launcher_env(env) == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3",
                                 "MASTER_ADDR": "gpu01", "MASTER_PORT": "29400"}


def test_deepspeed_launcher_inside_an_sbatch_job_is_used_as_is():
    """The deepspeed launcher in a batch script: the batch script's SLURM_PROCID is not a rank."""
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234",
           "CROSS_RANK": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "9"}
    assert launcher_env(env) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                 "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}


def test_rank_set_by_hand_outside_slurm_is_used_as_is():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "2345"}
    assert launcher_env(env) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "2345"}


def test_mpirun_env_wins_over_the_batch_steps_slurm_procid():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    got = launcher_env(env)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"], got["MASTER_ADDR"]) == ("2", "4", "2", "127.0.0.1")


def test_multi_node_mpirun_without_master_addr_is_refused():
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        launcher_env(env)


def test_the_batch_script_of_a_many_task_job_is_not_a_rank():
    """`python dist_xqa/train.py` in a batch script without srun: one process, not 16 ranks."""
    env = {**STALE, **srun_task(0)}
    del env["SLURM_STEP_ID"]
    with pytest.raises(ValueError, match="start the ranks with srun"):
        launcher_env({k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE")})


def test_the_batch_script_of_a_one_task_job_is_a_world_of_one():
    got = launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"})
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"], got["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")


@pytest.mark.parametrize("env, message", [
    ({"SLURM_PROCID": "16", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0"}, "outside a world of 16"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}, "SLURM_LOCALID is not set"),
    ({"SLURM_PROCID": "x", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"},
     "SLURM_PROCID must be an integer, got 'x'"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0", "SLURM_NNODES": "2"},
     "srun gave no node list"),
])
def test_a_broken_srun_environment_is_refused_naming_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        launcher_env(env)


def test_no_launcher_is_a_world_of_one():
    got = launcher_env({})
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"], got["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert 0 < int(got["MASTER_PORT"]) < 65536


@pytest.mark.parametrize("nodelist,host", [
    ("node1", "node1"), ("node1,node2", "node1"), ("gpu[003-006,010]", "gpu003"), ("gpu[01-02]", "gpu01"),
    ("a[7,9]-ib,b1", "a7-ib"), ("rack[2-3]n[01-04]", "rack2n01"),
])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


@pytest.mark.parametrize("env, cores, threads", [
    ({}, 2, 2),  # no launcher: one rank has the node
    ({"LOCAL_SIZE": "2"}, 2, 1),  # deepspeed launcher: 2 ranks on 2 cores
    ({"LOCAL_WORLD_SIZE": "4"}, 16, 4),  # torchrun
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, 16, 5),  # mpirun: the remainder stays idle
    ({"SLURM_NTASKS_PER_NODE": "2(x3)"}, 8, 4),  # srun, 2 tasks on each of 3 nodes
    ({"LOCAL_SIZE": "8"}, 2, 1),  # more ranks than cores: never below one
    ({"SLURM_PROCID": "0", "SLURM_CPUS_PER_TASK": "6", "SLURM_NTASKS_PER_NODE": "4"}, 6, 6),  # Slurm narrowed it
    ({"OMP_NUM_THREADS": "3", "LOCAL_SIZE": "2"}, 2, None),  # the user's choice is kept
])
def test_each_rank_gets_its_share_of_the_node_cores(env, cores, threads):
    assert rank_threads(env, cores) == threads
