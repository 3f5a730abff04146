"""How distributed.py reads a job from the launcher's environment: torchrun's variables,
SLURM's under srun, and SLURM's compressed node lists. No processes are started."""

import pytest

from cifar_ddp.distributed import LaunchEnv, expand_nodelist, launch_environment, slurm_port
from cifar_ddp.errors import UserError


@pytest.mark.parametrize("nodelist, hosts", [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
    ("node[9-10]", ["node9", "node10"]),
    ("a[1-2]-ib[3-4]", ["a1-ib3", "a1-ib4", "a2-ib3", "a2-ib4"]),
    ("gpu[01-02],cpu5,big-mem[7]", ["gpu01", "gpu02", "cpu5", "big-mem7"]),
    ("login.example.org", ["login.example.org"]),
    ("rack1-n[001-002].dc", ["rack1-n001.dc", "rack1-n002.dc"]),
])
def test_expand_nodelist_as_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[01-04", "gpu01-04]", "gpu[[1-2]]", "gpu[a-b]", "gpu[4-2]", "gpu[1-]", ""])
def test_a_malformed_nodelist_is_a_user_error_naming_it(nodelist):
    with pytest.raises(UserError, match="SLURM node list"):
        expand_nodelist(nodelist)


# What `srun -N2 -n4 python launch/train.py` gives the task with SLURM_PROCID=3 (seen on SLURM 22.05).
SRUN_TASK = {
    "SLURM_JOB_ID": "4321", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NODELIST": "gpu[01-04,07]",
    "SLURM_STEP_NODELIST": "gpu[03-04]", "SLURM_NODEID": "1",
}


def test_srun_tasks_form_a_job_from_slurm_variables():
    job = launch_environment(SRUN_TASK)
    # Rank 0 runs on the step's first node (the step may use a part of the job's nodes).
    assert job == LaunchEnv("srun", rank=3, world_size=4, local_rank=1, master_addr="gpu03",
                            master_port=slurm_port(4321))
    assert 20000 <= job.master_port < 30000


def test_srun_falls_back_to_the_job_nodelist_and_honours_master_addr_and_port():
    env = {k: v for k, v in SRUN_TASK.items() if k not in ("SLURM_STEP_NODELIST", "SLURM_STEP_NUM_TASKS")}
    assert launch_environment(env).master_addr == "gpu01"
    assert launch_environment(env).world_size == 4
    job = launch_environment({**SRUN_TASK, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29400"})
    assert (job.master_addr, job.master_port) == ("10.0.0.7", 29400)


def test_torchrun_variables_win_over_slurm_ones():
    env = {**SRUN_TASK, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu01",
           "MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert launch_environment(env) == LaunchEnv("torchrun", rank=5, world_size=8, local_rank=1, master_addr="gpu01",
                                                master_port=29500, restart_count=2, agent_store=True)


@pytest.mark.parametrize("env", [
    {},
    # A one-task step is a plain run.
    {**SRUN_TASK, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"},
    # The batch script itself: the job's task count, but no job step (SLURM 22.05's batch environment).
    {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")} | {"SLURM_PROCID": "0"},
    # torchrun's variables but no MASTER_ADDR: as before, not a launched job.
    {"RANK": "0", "WORLD_SIZE": "2"},
])
def test_no_launcher_means_a_single_process(env):
    assert launch_environment(env) is None
