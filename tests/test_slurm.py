"""Against a real SLURM: one slurmctld and two slurmd on loopback (tests/slurm/cluster.sh),
the job scripts in launch/slurm/, srun without a launcher, requeue after preemption and
before the time limit, job arrays. Fake data, gloo, one thread per process."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

from cifar_ddp import checkpoint as ckpt
from cifar_ddp.trainer import StopSignal

from conftest import REPO, assert_bitwise_equal, final_weights, job_env, run_job, tiny_overrides, torchrun

CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
THROTTLE = REPO / "tests" / "slurm" / "throttle"
SLURM_TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
# Upper bound for one job, requeues included; a hang fails the test, not CI's whole run.
JOB_DEADLINE_S = 300
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
ODD = {"data.fake_size": 97}


def test_stop_signal_takes_slurms_usr1_warning():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1


def _unavailable() -> str:
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge"
    if os.geteuid() != 0:
        return "the test cluster's slurmd must run as root"
    return ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Dict[str, str]:
    """The environment (SLURM_CONF) of a running two-node cluster; stopped afterwards."""
    reason = _unavailable()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the SLURM tests: {reason}")
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("slurm")
    try:
        up = subprocess.run(["bash", str(CLUSTER_SH), "up", str(directory)], capture_output=True, text=True,
                            timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr + _logs(directory)
        yield {"SLURM_CONF": str(directory / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "down", str(directory)], timeout=120)


def _logs(directory: Path) -> str:
    return "".join(f"\n--- {log.name}\n" + log.read_text()[-2000:] for log in sorted((directory / "log").glob("*")))


def slurm_env(cluster: Dict[str, str], **extra: str) -> Dict[str, str]:
    env = job_env({**cluster, "PYTHON": sys.executable, **extra})
    # Under srun distributed.py must find rank 0's host from SLURM's node list itself.
    env.pop("MASTER_ADDR", None)
    return env


def sbatch(env: Dict[str, str], options: List[str], script: str, args: List[str]) -> str:
    done = subprocess.run(["sbatch", "--parsable", *options, str(REPO / "launch" / "slurm" / script), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job_records(env: Dict[str, str], job_id: str) -> List[Dict[str, str]]:
    """`scontrol show job` as key=value records (one per array task)."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                           timeout=30)
    assert shown.returncode == 0, shown.stderr
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in shown.stdout.splitlines() if line.strip()]


def wait_for_job(env: Dict[str, str], job_id: str, output: Path, timeout: float = JOB_DEADLINE_S,
                 on_running=None, requeued_update: Sequence[str] = ()) -> List[Dict[str, str]]:
    """Every record of `job_id` once all have ended. A requeued job waits about two minutes
    (BeginTime) before it may start again: the test lets it start as soon as the previous
    start's processes are gone (if it started before, the old batch script's end would
    count as the new start's), and changes `requeued_update` (scontrol update settings) too."""
    deadline = time.monotonic() + timeout
    gone_since: Dict[str, float] = {}
    try:
        while True:
            records = job_records(env, job_id)
            if records and all(r["JobState"] in FINAL_STATES for r in records):
                return records
            for record in records:
                if record["JobState"] == "PENDING" and record.get("Reason") == "BeginTime":
                    if job_processes(record["JobId"]):
                        gone_since.pop(record["JobId"], None)
                    elif time.monotonic() - gone_since.setdefault(record["JobId"], time.monotonic()) > 2:
                        subprocess.run(["scontrol", "update", f"JobId={record['JobId']}", "StartTime=now",
                                        *requeued_update], env=env, capture_output=True, timeout=30)
                if record["JobState"] == "RUNNING" and on_running is not None and on_running(record):
                    on_running = None
            assert time.monotonic() < deadline, f"job {job_id} did not end in {timeout}s: {records}\n{_tail(output)}"
            time.sleep(0.5)
    except BaseException:
        subprocess.run(["scancel", job_id], env=env, timeout=30)
        raise


def job_processes(job_id: str) -> List[int]:
    """This machine's processes of SLURM job `job_id` (they carry SLURM_JOB_ID)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"\0SLURM_JOB_ID={job_id}\0".encode() in b"\0" + environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            pass  # gone, or not ours to read
    return found


def _tail(output: Path) -> str:
    files = sorted(output.parent.glob(output.name.replace("%a", "*")))
    return "".join(f"--- {f}\n{f.read_text()[-3000:]}" for f in files)


def final_lines(text: str) -> List[dict]:
    import json

    return [json.loads(line[len("final: "):]) for line in text.splitlines() if line.startswith("final: ")]


def check_completed(records: List[Dict[str, str]], output: Path) -> None:
    for record in records:
        assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), _tail(output)


@pytest.mark.slow
def test_torchrun_script_runs_two_nodes_of_two_processes_as_one_job(cluster, tmp_path: Path):
    env, output = slurm_env(cluster, NPROC_PER_NODE="2"), tmp_path / "slurm.out"
    job = sbatch(env, ["-N", "2", "-o", str(output)], "torchrun.sbatch", tiny_overrides(tmp_path / "run", **ODD))
    check_completed(wait_for_job(env, job, output), output)
    (final,) = final_lines(output.read_text())
    assert final["world_size"] == 4 and len(set(final["replica_digests"])) == 1, final
    assert ckpt.load_file(ckpt.checkpoint_dir(tmp_path / "run") / "last.pt")["world_size"] == 4


@pytest.mark.slow
def test_srun_without_a_launcher_forms_one_process_group(cluster, tmp_path: Path):
    argv = ["srun", "-N2", "-n2", "--time=5", sys.executable, str(REPO / "launch" / "train.py"),
            *tiny_overrides(tmp_path / "run", **ODD, **{"train.epochs": 1})]
    done = run_job(argv, env=slurm_env(cluster), timeout=JOB_DEADLINE_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # One job of two ranks (rank 0 alone prints), not two single-process runs.
    (final,) = final_lines(done.stdout)
    assert final["world_size"] == 2 and len(set(final["replica_digests"])) == 1, final


@pytest.mark.slow
def test_accelerate_script_runs_on_two_nodes(cluster, tmp_path: Path):
    env, output = slurm_env(cluster), tmp_path / "slurm.out"
    job = sbatch(env, ["-N", "2", "-o", str(output)], "accelerate.sbatch",
                 tiny_overrides(tmp_path / "run", **ODD, **{"train.epochs": 1}))
    check_completed(wait_for_job(env, job, output), output)
    (final,) = final_lines(output.read_text())
    assert final["world_size"] == 2 and len(set(final["replica_digests"])) == 1, final


@pytest.mark.slow
def test_job_array_trains_one_run_per_task(cluster, tmp_path: Path):
    env, output = slurm_env(cluster, OUT_ROOT=str(tmp_path / "runs")), tmp_path / "slurm-%a.out"
    job = sbatch(env, ["--array=0-1", "-o", str(output)], "array.sbatch",
                 tiny_overrides(tmp_path / "ignored", **ODD, **{"train.epochs": 1}))
    records = wait_for_job(env, job, output)
    assert len(records) == 2
    check_completed(records, output)
    seeds = [ckpt.load_file(ckpt.checkpoint_dir(tmp_path / "runs" / f"task-{task}") / "last.pt")["config"]["seed"]
             for task in (0, 1)]
    assert seeds == [0, 1]
    assert not (tmp_path / "ignored").exists()


# 2 ranks x batch 16 over 256 images: 8 steps per epoch, 24 in all. In a job's first
# start every step waits 2.5 s (tests/slurm/throttle), so the scheduler meets it mid-run;
# later starts run at full speed.
LONG = {"data.fake_size": 256, "train.epochs": 3, "train.checkpoint_every_steps": 4, "train.log_every_steps": 1}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = run_job(torchrun(2, tiny_overrides(out, **LONG)))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def requeue_env(cluster: Dict[str, str]) -> Dict[str, str]:
    env = slurm_env(cluster, NPROC_PER_NODE="2", CIFAR_DDP_TEST_STEP_SLEEP="2.5")
    env["PYTHONPATH"] = str(THROTTLE) + os.pathsep + env["PYTHONPATH"]
    return env


def check_resumed_and_complete(out: Path, output: Path, records: List[Dict[str, str]], uninterrupted: Path) -> None:
    check_completed(records, output)
    assert int(records[0]["Restarts"]) >= 1, records
    text = output.read_text()
    assert "resumed from" in text, _tail(output)
    epochs = re.findall(r"^\| (\d+) \|", (out / "training_log.md").read_text(), flags=re.M)
    assert epochs == ["1", "2", "3"], (out / "training_log.md").read_text()
    # Nothing checkpointed was lost or done twice: bit for bit the uninterrupted run.
    assert_bitwise_equal(final_weights(uninterrupted), final_weights(out))


@pytest.mark.slow
def test_a_job_requeued_by_the_scheduler_resumes_and_completes(cluster, uninterrupted, tmp_path: Path):
    env, output, out = requeue_env(cluster), tmp_path / "slurm.out", tmp_path / "run"
    job = sbatch(env, ["-o", str(output)], "torchrun.sbatch", tiny_overrides(out, **LONG))
    first_checkpoint = next(iter(sorted(ckpt.checkpoint_dir(out).glob("*step-00000004.pt"))), ckpt.checkpoint_dir(out) / "none")

    def requeue_once_checkpointed(record: Dict[str, str]) -> bool:
        # What preemption with PreemptMode=REQUEUE does: SIGTERM to every process, SIGKILL after KillWait.
        if record.get("Restarts") != "0" or not any(ckpt.checkpoint_dir(out).glob("*step-00000004.pt")):
            return False
        done = subprocess.run(["scontrol", "requeue", job], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return True

    records = wait_for_job(env, job, output, on_running=requeue_once_checkpointed)
    assert "SIGTERM" in output.read_text()
    check_resumed_and_complete(out, output, records, uninterrupted)


@pytest.mark.slow
def test_the_signal_before_the_time_limit_checkpoints_and_requeues(cluster, uninterrupted, tmp_path: Path):
    # SLURM checks time limits every 30 s and sends the signal up to 30 s early: with
    # --time=1 and @1 the USR1 comes 29 to 59 s after the start (seen on 22.05), once the
    # ranks are training (starting them takes up to 25 s on a busy machine; a signal
    # before that would find no checkpoint to write) and before the 60 s of steps the
    # first start would need; the limit's SIGTERM comes 30 s later at the earliest. Each
    # start would get as little, mostly spent starting Python: once requeued, the job
    # gets a longer limit.
    env, output, out = requeue_env(cluster), tmp_path / "slurm.out", tmp_path / "run"
    job = sbatch(env, ["--time=1", "--signal=B:USR1@1", "-o", str(output)], "torchrun.sbatch",
                 tiny_overrides(out, **LONG))
    records = wait_for_job(env, job, output, requeued_update=["TimeLimit=10"])
    text = output.read_text()
    assert "USR1" in text and "stopped by SIGTERM" in text and "requeueing job" in text, _tail(output)
    check_resumed_and_complete(out, output, records, uninterrupted)


@pytest.mark.slow
def test_a_run_that_fails_otherwise_is_not_requeued(cluster, tmp_path: Path):
    env, output = slurm_env(cluster), tmp_path / "slurm.out"
    job = sbatch(env, ["-o", str(output)], "torchrun.sbatch",
                 tiny_overrides(tmp_path / "run", **{"train.epochs": 0}))
    (record,) = wait_for_job(env, job, output)
    assert record["JobState"] == "FAILED" and record["Restarts"] == "0", record
    assert "not requeued" in output.read_text() and "train.epochs" in output.read_text()


@pytest.mark.slow
def test_a_cancelled_job_checkpoints_and_is_not_requeued(cluster, tmp_path: Path):
    env, output, out = requeue_env(cluster), tmp_path / "slurm.out", tmp_path / "run"
    job = sbatch(env, ["-o", str(output)], "torchrun.sbatch", tiny_overrides(out, **LONG))

    def cancel_once_checkpointed(record: Dict[str, str]) -> bool:
        if not any(ckpt.checkpoint_dir(out).glob("*step-00000004.pt")):
            return False
        subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
        return True

    wait_for_job(env, job, output, on_running=cancel_once_checkpointed)
    # The batch script decides after its step has ended: wait for its last word.
    deadline = time.monotonic() + 60
    while "SLURM decides" not in output.read_text():
        assert time.monotonic() < deadline, _tail(output)
        time.sleep(0.5)
    time.sleep(2)
    (record,) = job_records(env, job)
    assert (record["JobState"], record["Restarts"]) == ("CANCELLED", "0"), record
    assert "stopped by SIGTERM" in output.read_text() and "requeueing" not in output.read_text()
