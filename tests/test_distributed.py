"""Real multi-process jobs on loopback: torchrun (one node and two), accelerate launch.

Each job trains on a few fake images for a few seconds; every job is bounded by
JOB_TIMEOUT_S so a hang fails the test rather than the CI run.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_ddp import checkpoint as ckpt

from conftest import JOB_TIMEOUT_S, REPO, free_port, job_env, run_job, tiny_overrides, torchrun

pytestmark = pytest.mark.slow

# 97 images: each of 2 ranks gets 49 training indices (one padded) and an unequal test
# shard (49 and 48) - distributed evaluation must still count each image exactly once.
ODD = {"data.fake_size": 97}


def final_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("final: ")]
    assert lines, stdout
    return json.loads(lines[-1][len("final: "):])


def check_two_identical_replicas(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    final = final_line(done.stdout)
    assert final["world_size"] == 2
    digests = final["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    return final


def evaluate_json(checkpoint: Path, nproc: int) -> dict:
    script = [str(REPO / "launch" / "evaluate.py"), "--checkpoint", str(checkpoint), "--json"]
    if nproc == 1:
        argv = [sys.executable, *script]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
    done = run_job(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_torchrun_two_processes_train_evaluate_and_resume_under_one(tmp_path: Path):
    out = tmp_path / "run"
    done = run_job(torchrun(2, tiny_overrides(out, **ODD)))
    final = check_two_identical_replicas(done)
    last = ckpt.checkpoint_dir(out) / "last.pt"
    assert ckpt.load_file(last)["world_size"] == 2

    # Distributed evaluation of the checkpoint == single-process evaluation == the run's own figure.
    single, double = evaluate_json(last, 1), evaluate_json(last, 2)
    assert single["images"] == double["images"] == 97
    assert single["correct"] == double["correct"]
    assert double["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert double["per_class_accuracy"] == single["per_class_accuracy"]
    assert single["accuracy"] == pytest.approx(final["test_accuracy"], abs=1e-12)


def test_two_ranks_hold_the_same_averages_and_stem(tmp_path: Path):
    """The EMA, the lookahead (its beat at step 4 of 6, the last step copying it into the model)
    and the whitening stem fitted on each rank: every rank ends with the same model and the
    same averages, BN statistics included (replica_digests cover all three)."""
    settings = {**ODD, "train.epochs": 2, "train.ema_decay": 0.9, "train.lookahead_every_steps": 4,
                "model.whiten_stem": "true", "rules.enforce": "false"}   # the stem is over the seed budget
    final = check_two_identical_replicas(run_job(torchrun(2, tiny_overrides(tmp_path / "run", **settings))))
    saved = ckpt.load_file(ckpt.checkpoint_dir(tmp_path / "run") / "last.pt")
    assert saved["lookahead"] is not None and saved["ema"] is not None and final["global_step"] == 6


def test_checkpoint_from_two_processes_resumes_under_one(tmp_path: Path):
    out = tmp_path / "run"
    # 3 steps per epoch with 2 ranks x 16; stop inside epoch 2.
    stopped = run_job(torchrun(2, tiny_overrides(out, **ODD, **{"train.epochs": 3, "train.stop_after_steps": 4,
                                                                  "train.checkpoint_every_steps": 2})))
    # torchrun itself reports any non-zero worker as a failure (1); the workers said 75, "resumable".
    assert stopped.returncode != 0 and "exitcode  : 75" in stopped.stderr, stopped.stderr[-3000:]
    saved = ckpt.load_file(ckpt.checkpoint_dir(out) / "last.pt")
    assert saved["world_size"] == 2 and saved["train_state"]["global_step"] == 4
    resumed = run_job([sys.executable, str(REPO / "launch" / "train.py"), "--resume",
                       *tiny_overrides(out, **ODD, **{"train.epochs": 3})])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = final_line(resumed.stdout)
    # One process with batch 16 has 6 steps per epoch; step 4 of 2x16 = 128 images = step 4 of 1x16... of 6.
    assert final["world_size"] == 1 and final["epochs"] == 3 and final["global_step"] == 18


def test_two_torchrun_agents_form_one_two_node_job(tmp_path: Path):
    port = free_port()
    common = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
              "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=cifar_ddp_test",
              "--local_addr=127.0.0.1", str(REPO / "launch" / "train.py")]
    args = tiny_overrides(tmp_path / "run", **ODD)
    agents = [subprocess.Popen(common + args, cwd=REPO, env=job_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = []
    try:
        for agent in agents:
            stdout, stderr = agent.communicate(timeout=JOB_TIMEOUT_S)
            outputs.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    finally:
        for agent in agents:
            agent.kill()
    assert all(o.returncode == 0 for o in outputs), [o.stderr[-2000:] for o in outputs]
    # Exactly one agent hosts global rank 0, which prints the summary.
    printed = [o for o in outputs if "final: " in o.stdout]
    assert len(printed) == 1
    check_two_identical_replicas(printed[0])


def test_accelerate_launch_starts_two_processes(tmp_path: Path):
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
            str(REPO / "launch" / "train.py"), *tiny_overrides(tmp_path / "run", **ODD)]
    done = run_job(argv)
    check_two_identical_replicas(done)
    assert ckpt.load_file(ckpt.checkpoint_dir(tmp_path / "run") / "last.pt")["world_size"] == 2


def test_torchrun_with_one_process_still_forms_a_process_group(tmp_path: Path):
    """As torchvision's references do: under a launcher the DDP path runs even alone, so a
    one-GPU machine exercises what a cluster runs (here gloo; nccl on a GPU)."""
    done = run_job(torchrun(1, tiny_overrides(tmp_path / "run", **{"train.epochs": 1})))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend: gloo" in done.stdout
    assert final_line(done.stdout)["world_size"] == 1


def test_a_failure_on_rank_0_alone_ends_the_whole_job_promptly(tmp_path: Path):
    """Rank 0 alone finds its output folder unusable while rank 1 already waits in a
    collective: rank 0 must say why and leave at once, and rank 1 follow, instead of both
    waiting out the 300 s process-group timeout (the bound here is far below it)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    done = run_job(torchrun(2, tiny_overrides(blocker)), timeout=120)
    assert done.returncode != 0
    assert "rank 0: out_dir" in done.stderr and "is a file, not a folder" in done.stderr
    assert "exitcode: 2" in done.stderr        # the agent's report: rank 0's user error
    assert "rank 1: stopped because another process of the job stopped" in done.stderr
