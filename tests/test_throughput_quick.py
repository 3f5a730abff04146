"""benchmarks/throughput.py --quick is bounded on a CPU: a few steps per path, nothing
compiled. (No timing is asserted: tests never depend on wall time.)"""
import sys

import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import throughput  # noqa: E402
from cifar_ddp.assembly import step_options  # noqa: E402


def test_quick_takes_a_few_steps_per_path_and_compiles_nothing_on_a_cpu():
    quick = throughput.parse_args(["--quick"])
    assert (quick.steps, quick.warmup, quick.images, quick.batch_size) == (8, 2, 1024, 256)
    assert quick.images // quick.batch_size == 4            # steps an epoch: the warm-up rounds up to 4
    options, _ = step_options(throughput.make_config(quick).train, torch.device("cpu"))
    assert not options.compile and not options.cuda_graph
    # The compiled path: left out of --quick on a CPU only.
    assert throughput.compiled_skip_reason(quick, cuda=False).startswith("--quick on a CPU")
    assert throughput.compiled_skip_reason(quick, cuda=True) == ""
    full = throughput.parse_args([])
    assert (full.steps, full.warmup, full.images) == (60, 20, 8192)
    assert throughput.compiled_skip_reason(full, cuda=False) == ""


def test_a_recipes_lookahead_is_part_of_the_timed_step(monkeypatch):
    """A recipe with train.lookahead_every_steps is timed with its lookahead, ramped over the
    steps the benchmark runs (--quick: a 4-step warm-up and 8 timed steps at 4 steps an
    epoch), and updated at every one of them."""
    from cifar_ddp import assembly
    from cifar_ddp.ema import Lookahead

    built, updates = [], []

    class Recorded(Lookahead):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

        def update(self, model, step, skip=None):
            updates.append(int(step))
            super().update(model, step, skip)

    monkeypatch.setattr(assembly, "Lookahead", Recorded)
    args = throughput.parse_args(["--quick", "--set", "train.lookahead_every_steps=2"])
    assert throughput.measure_cifar_ddp(args) > 0
    [lookahead] = built
    assert (lookahead.every, lookahead.total_steps) == (2, 12) and updates == list(range(1, 13))
