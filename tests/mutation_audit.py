"""Plant one single-line bug at a time and run the tests that should catch it.

    python tests/mutation_audit.py                  # every mutant below
    python tests/mutation_audit.py r2-05 a-12       # only these
    python tests/mutation_audit.py --list

Each mutant replaces one exact text (it must occur exactly once) in one file of the package,
runs pytest on the named tests, and puts the file back (in a `finally`, also on Ctrl-C). A
mutant is "caught" when pytest fails. Run it in a clean checkout: it edits the source files
in place for the duration of each run. docs/testing.md has the results of the last audits.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (id, file, original text, mutated text, tests that should catch it)
MUTANTS = [
    # ---- issue 25's list (round 2 of the audit of main f4f7ebd)
    ("r2-01", "cifar_ddp/step.py", "bad = ~torch.isfinite(norm)", "bad = torch.isnan(norm)",
     ["tests/test_step.py"]),
    ("r2-02", "cifar_ddp/step.py", "first = (self.first_nonfinite_step < 0) & bad", "first = bad",
     ["tests/test_step.py"]),
    ("r2-03", "cifar_ddp/ema.py", "keep = torch.where(n == 0, torch.zeros_like(keep), keep)", "pass",
     ["tests/test_ema.py", "tests/test_train.py::test_ema_decay_warms_up_then_holds"]),
    ("r2-04", "cifar_ddp/ema.py", "self.n_averaged.add_(1 if skip is None else (~skip).long())",
     "self.n_averaged.add_(1)", ["tests/test_ema.py"]),
    ("r2-05", "cifar_ddp/ema.py", "return [*model.parameters(), *model.buffers()]", "return [*model.parameters()]",
     ["tests/test_ema.py", "tests/test_train.py::test_ema_decay_warms_up_then_holds"]),
    ("r2-06", "cifar_ddp/engine.py", "local = (seen + wrong) * ctx.world_size + ctx.rank",
     "local = seen + wrong * ctx.world_size + ctx.rank", ["tests/test_engine_eval.py"]),
    ("r2-07", "cifar_ddp/engine.py", "model(images.flip(3))", "model(images.flip(2))", ["tests/test_engine_eval.py"]),
    ("r2-08", "cifar_ddp/engine.py", 'F.cross_entropy(logits, labels, reduction="sum")',
     'F.cross_entropy(logits, labels, reduction="mean")', ["tests/test_engine_eval.py"]),
    ("r2-09", "cifar_ddp/report.py", "pairs.sort(key=lambda x: -x[0])", "pairs.sort(key=lambda x: x[0])",
     ["tests/test_report.py::test_most_confused_pairs_come_largest_first"]),
    ("r2-10", "cifar_ddp/receptive_field.py",
     "incoming = frozenset().union(*(paths[n] for n in inputs if n in paths))",
     "incoming = frozenset([max(frozenset().union(*(paths[n] for n in inputs if n in paths)), default=(1, 1))])",
     ["tests/test_receptive_field.py"]),
    ("r2-11", "cifar_ddp/checkpoint.py", "if best is None or step > best[0]:", "if best is None or step >= best[0]:",
     ["tests/test_checkpoint_files.py"]),
    ("r2-12", "cifar_ddp/data/loaders.py", "return (seed * 1_000_003 + rank * 10_007 + epoch * 101) % (2**63 - 1)",
     "return (seed * 1_000_003 + epoch * 101) % (2**63 - 1)", ["tests/test_data.py"]),
    ("r2-13", "cifar_ddp/data/loaders.py",
     "return ImageSplit(split.images[rank::world_size], split.labels[rank::world_size])",
     "return ImageSplit(split.images[rank * world_size::world_size], split.labels[rank * world_size::world_size])",
     ["tests/test_data.py"]),
    ("r2-14", "cifar_ddp/data/sources.py", "std = pixels.std(axis=0)",
     "std = images.reshape(len(images), -1, images.shape[-1]).astype(np.float64).std(axis=1).mean(axis=0) / 255.0",
     ["tests/test_data.py"]),
    ("r2-15", "cifar_ddp/export.py", "max_abs_diff=float(np.abs(exported - reference).max())",
     "max_abs_diff=float((exported - reference).max())", ["tests/test_export.py"]),
    ("r2-16", "cifar_ddp/lr_find.py", "smoothed = average / (1 - smoothing ** (i + 1))", "smoothed = average",
     ["tests/test_lr_find.py"]),
    ("r2-17", "cifar_ddp/config.py", 'key, raw = text.split("=", 1)', 'key, raw = text.split("=")',
     ["tests/test_config.py"]),
    ("r2-18", "cifar_ddp/config.py", "t.initial_div >= 1 and t.final_div >= 1", "t.initial_div >= 1 or t.final_div >= 1",
     ["tests/test_config.py"]),
    ("r2-19", "cifar_ddp/optim.py",
     "        return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))\n",
     "        return peak\n", ["tests/test_numbers.py::test_the_three_schedules_differ_where_they_should"]),
]


def run(mutant, verbose: bool = False) -> bool:
    ident, rel, old, new, tests = mutant
    path = REPO / rel
    original = path.read_text()
    if original.count(old) != 1:
        raise SystemExit(f"{ident}: the text to mutate occurs {original.count(old)} times in {rel}")
    try:
        path.write_text(original.replace(old, new))
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=REPO, capture_output=True, text=True)
    finally:
        path.write_text(original)
    if verbose:
        print(done.stdout[-1500:])
    return done.returncode != 0


def main(argv) -> int:
    if "--list" in argv:
        for ident, rel, old, new, tests in MUTANTS:
            print(f"{ident}  {rel}: {old.strip()!r} -> {new.strip()!r}  [{' '.join(tests)}]")
        return 0
    verbose = "-v" in argv
    wanted = [a for a in argv if not a.startswith("-")]
    chosen = [m for m in MUTANTS if not wanted or m[0] in wanted]
    survived = 0
    for mutant in chosen:
        started = time.time()
        caught = run(mutant, verbose)
        survived += not caught
        print(f"{mutant[0]}  {'caught  ' if caught else 'SURVIVED'}  {time.time() - started:5.1f}s  "
              f"{mutant[1]}: {mutant[2].strip()[:60]!r}", flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} caught")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
