"""Where a run's wall time goes: from the process's start to the end of the run, split into
phases that add up to the whole.

A phase opened inside another pauses the outer one (exclusive time), so that a checkpoint
written at a sync step counts as checkpointing, not as training, and nothing is counted
twice. What no phase claims is "other", so the parts always add up to the wall; the
instrumentation is good when "other" is small (tests/test_timing.py checks a real run).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Dict, Iterator, List, Optional

# In the order a run goes through them; each is a key of the breakdown.
PHASES = ("start-up", "data", "build", "set-up", "training steps", "evaluation", "checkpoints", "logging", "other")
DESCRIPTIONS = {
    "start-up": "interpreter, imports, config, process group",
    "data": "load or decode, cache, copy to the device",
    "build": "model, design rules, optimizer, resume",
    "set-up": "first step, compiling, capturing (cuDNN autotuning on a GPU)",
    "training steps": "the epochs' steps and their sync reads",
    "evaluation": "scoring the evaluation split",
    "checkpoints": "writing checkpoints",
    "logging": "console, TensorBoard, figures, training_log.md",
    "other": "everything no phase claims",
}


def process_age() -> Optional[float]:
    """Seconds since this process started (Linux: /proc), or None where that is unknown."""
    try:
        with open("/proc/self/stat") as stat:
            # The command name may hold spaces: the fields after its closing parenthesis.
            fields = stat.read().rpartition(")")[2].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")     # field 22: start time after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class PhaseClock:
    """Exclusive wall time per phase. `since_process_start`: the wall starts at the
    process's start, and what passed before the clock was created is "start-up" (the
    launcher's clock); otherwise it starts now (a run inside a longer-lived process)."""

    def __init__(self, since_process_start: bool = False) -> None:
        self.created = time.perf_counter()
        self.before = (process_age() or 0.0) if since_process_start else 0.0
        self.seconds: Dict[str, float] = {name: 0.0 for name in PHASES}
        self.seconds["start-up"] = self.before
        self._stack: List[List] = []        # [name, started] of the open phases, innermost last

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        assert name in self.seconds, name
        now = time.perf_counter()
        if self._stack:
            outer = self._stack[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            inner = self._stack.pop()
            self.seconds[inner[0]] += now - inner[1]
            if self._stack:
                self._stack[-1][1] = now

    def move(self, source: str, target: str, seconds: float) -> None:
        """Reassign time measured inside `source` (e.g. the set-up steps inside an epoch)."""
        seconds = min(seconds, self.seconds[source])
        self.seconds[source] -= seconds
        self.seconds[target] += seconds

    def breakdown(self) -> Dict[str, float]:
        """Seconds per phase and "wall" (from the process's start until now); "other" is the
        rest, so the phases add up to the wall."""
        wall = self.before + time.perf_counter() - self.created
        parts = dict(self.seconds)
        parts["other"] = max(wall - sum(v for k, v in parts.items() if k != "other"), 0.0)
        return {**{k: round(v, 3) for k, v in parts.items()}, "wall": round(wall, 3)}


def format_breakdown(parts: Dict[str, float], as_list: bool = False) -> str:
    """A markdown table (phase, seconds, share of the wall, what it holds), or a list
    (`as_list`: for training_log.md, whose one table is the epochs')."""
    wall = max(parts["wall"], 1e-9)
    shown = [(name, parts[name], DESCRIPTIONS[name]) for name in PHASES if name in parts]
    if as_list:
        return "\n".join([*(f"- {name}: {seconds:.2f} s ({100 * seconds / wall:.1f}%): {what}"
                             for name, seconds, what in shown),
                          f"- wall: {parts['wall']:.2f} s, from the process's start to the run's end"])
    rows = [f"| {name} | {seconds:.2f} | {100 * seconds / wall:.1f}% | {what} |" for name, seconds, what in shown]
    return "\n".join(["| phase | seconds | share | what |", "|---|---:|---:|---|", *rows,
                      f"| **wall** | **{parts['wall']:.2f}** | 100% | from the process's start to the run's end |"])
