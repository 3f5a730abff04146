"""Test-only, on PYTHONPATH for the SLURM requeue tests: CIFAR_DDP_TEST_STEP_SLEEP=SECONDS
makes each sync step of a cifar_ddp run wait that long in the job's first start (not
after a requeue), so that a run on fake data lasts long enough for the scheduler to
interrupt it, without keeping the CPU busy. Python imports this module at start-up."""

import os
import sys

_SLEEP = float(os.environ.get("CIFAR_DDP_TEST_STEP_SLEEP") or 0)
_FIRST_START = os.environ.get("SLURM_RESTART_COUNT", "0") in ("", "0")


def _slow_down(module) -> None:
    import time

    original = module.Trainer._on_sync

    def on_sync(self, *args, **kwargs):
        time.sleep(_SLEEP)
        return original(self, *args, **kwargs)

    module.Trainer._on_sync = on_sync


if _SLEEP and _FIRST_START:
    import importlib.abc
    import importlib.util

    class _PatchTrainer(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "cifar_ddp.trainer":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                _slow_down(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchTrainer())
