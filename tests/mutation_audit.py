"""Plant one single-line bug at a time and run the tests that should catch it.

    python tests/mutation_audit.py                  # every mutant below
    python tests/mutation_audit.py r2-05 a-12       # only these
    python tests/mutation_audit.py --list
    python tests/mutation_audit.py --before a-03    # with the tests that existed before

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

# (id, file, original text, mutated text, tests that should catch it). Where a mutant has
# a sixth entry, that is the tests that existed before the test written for it (the
# "before" column of docs/testing.md: `--before` runs those instead).
DIST_SLOW = ["tests/test_numbers.py::test_bn_buffers_are_averaged_over_ranks_not_summed",
             "tests/test_distributed.py::test_torchrun_with_one_process_still_forms_a_process_group",
             "tests/test_distributed.py::test_two_torchrun_agents_form_one_two_node_job",
             "tests/test_distributed.py::test_torchrun_two_processes_train_evaluate_and_resume_under_one"]
AUGMENT = ["tests/test_augment.py", "tests/test_step.py::test_epoch_augmentation_ignores_chunking_and_resumes_at_its_step"]
CKPT = ["tests/test_checkpoint_files.py", "tests/test_recovery.py::test_resume_takes_the_newest_intact_checkpoint_with_warning",
        "tests/test_recovery.py::test_save_killed_mid_write_leaves_previous_checkpoint_loadable"]
REPORT = ["tests/test_report.py", "-m", "not slow"]
INFERENCE = ["tests/test_export.py", "tests/test_train.py::test_resume_with_ema_and_plain_last_epoch",
             "tests/test_report.py::test_report_numbers_equal_an_independent_computation"]
# The launcher's exits as the CLI tests see them (test_recovery's fast tests on the exit paths).
LAUNCH = ["tests/test_recovery.py", "-m", "not slow", "-k",
          "disk_full or signal or preempted or bad_input or unwritable or explicit_damaged or bad_requests or closed_pipe",
          "tests/test_export.py::test_bad_requests_get_one_line",
          "tests/test_train.py::test_evaluate_output_into_a_closed_pipe_and_a_folder_as_checkpoint"]

MUTANTS = [
    # ---- issue 25's list (round 2 of the audit of main f4f7ebd)
    ("r2-01", "cifar_ddp/step.py", "bad = ~torch.isfinite(norm)", "bad = torch.isnan(norm)",
     ["tests/test_step.py::test_an_infinite_gradient_is_masked_like_a_nan"]),
    ("r2-02", "cifar_ddp/step.py", "first = (self.first_nonfinite_step < 0) & bad", "first = bad",
     ["tests/test_step.py::test_two_nonfinite_steps_in_a_row_report_the_first_of_them"]),
    ("r2-03", "cifar_ddp/ema.py", "keep = torch.where(n == 0, torch.zeros_like(keep), keep)", "pass",
     ["tests/test_ema.py::test_the_first_update_copies_the_model"]),
    ("r2-04", "cifar_ddp/ema.py", "self.n_averaged.add_(1 if skip is None else (~skip).long())",
     "self.n_averaged.add_(1)",
     ["tests/test_ema.py::test_a_skipped_update_changes_nothing_and_is_not_counted"]),
    ("r2-05", "cifar_ddp/ema.py", "return [*model.parameters(), *model.buffers()]", "return [*model.parameters()]",
     ["tests/test_ema.py::test_bn_statistics_are_averaged_and_the_counter_copied"]),
    ("r2-06", "cifar_ddp/engine.py", "local = (seen + wrong) * ctx.world_size + ctx.rank",
     "local = seen + wrong * ctx.world_size + ctx.rank",
     ["tests/test_engine_eval.py::test_mistake_indices_on_a_later_rank_across_several_batches_point_at_the_right_images"]),
    ("r2-07", "cifar_ddp/engine.py", "model(images.flip(3))", "model(images.flip(2))",
     ["tests/test_engine_eval.py::test_flip_tta_averages_the_logits_of_the_image_and_its_mirror"]),
    ("r2-08", "cifar_ddp/engine.py", 'F.cross_entropy(logits, labels, reduction="sum")',
     'F.cross_entropy(logits, labels, reduction="mean")',
     ["tests/test_engine_eval.py::test_loss_is_the_mean_over_the_whole_split_with_an_odd_last_batch"]),
    ("r2-09", "cifar_ddp/metrics.py", "pairs.sort(key=lambda x: -x[0])", "pairs.sort(key=lambda x: x[0])",
     ["tests/test_report.py::test_most_confused_pairs_come_largest_first"]),
    ("r2-10", "cifar_ddp/receptive_field.py",
     "incoming = frozenset().union(*(paths[n] for n in inputs if n in paths))",
     "incoming = frozenset([max(frozenset().union(*(paths[n] for n in inputs if n in paths)), default=(1, 1))])",
     ["tests/test_receptive_field.py::test_a_join_keeps_every_path_not_only_its_largest"]),
    ("r2-11", "cifar_ddp/checkpoint.py", "if best is None or step > best[0]:", "if best is None or step >= best[0]:",
     ["tests/test_checkpoint_files.py::test_on_a_tie_in_steps_the_step_file_is_chosen_over_last_pt"]),
    ("r2-12", "cifar_ddp/data/loaders.py", "return (seed * 1_000_003 + rank * 10_007 + epoch * 101) % (2**63 - 1)",
     "return (seed * 1_000_003 + epoch * 101) % (2**63 - 1)",
     ["tests/test_data.py::test_augmentation_seeds_differ_across_ranks_seeds_and_epochs",
      "tests/test_data.py::test_two_ranks_draw_different_augmentations_from_the_same_seed"]),
    ("r2-13", "cifar_ddp/data/loaders.py",
     "return ImageSplit(split.images[rank::world_size], split.labels[rank::world_size])",
     "return ImageSplit(split.images[rank * world_size::world_size], split.labels[rank * world_size::world_size])",
     ["tests/test_data.py::test_eval_shards_of_all_ranks_partition_the_split"]),
    ("r2-14", "cifar_ddp/data/sources.py", "std = pixels.std(axis=0)",
     "std = images.reshape(len(images), -1, images.shape[-1]).astype(np.float64).std(axis=1).mean(axis=0) / 255.0",
     ["tests/test_data.py::test_channel_std_is_over_all_pixels_not_a_mean_of_per_image_stds",
      "tests/test_data.py::test_cifar10_source_reads_official_batches"]),
    ("r2-15", "cifar_ddp/export.py", "max_abs_diff=float(np.abs(exported - reference).max())",
     "max_abs_diff=float((exported - reference).max())",
     ["tests/test_export.py::test_parity_fails_on_a_large_difference_of_either_sign"]),
    ("r2-16", "cifar_ddp/lr_find.py", "smoothed = average / (1 - smoothing ** (i + 1))", "smoothed = average",
     ["tests/test_lr_find.py::test_the_smoothed_loss_is_bias_corrected_from_the_first_step"]),
    ("r2-17", "cifar_ddp/config.py", 'key, raw = text.split("=", 1)', 'key, raw = text.split("=")',
     ["tests/test_config.py::test_an_override_value_may_itself_hold_an_equals_sign"]),
    ("r2-18", "cifar_ddp/config.py", "t.initial_div >= 1 and t.final_div >= 1", "t.initial_div >= 1 or t.final_div >= 1",
     ["tests/test_config.py::test_each_lr_divisor_below_one_is_refused"]),
    ("r2-19", "cifar_ddp/optim.py",
     "        return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))\n",
     "        return peak\n", ["tests/test_numbers.py::test_the_three_schedules_differ_where_they_should"]),
    # ---- the weak tests of issue 25: bugs each one let through
    ("w-1", "cifar_ddp/ema.py", "keep = torch.where(n == 0, torch.zeros_like(keep), keep)", "pass",
     ["tests/test_train.py::test_ema_decay_warms_up_then_holds"]),
    ("w-2", "cifar_ddp/inference.py", 'NormalizedModel(model, stats["mean"], stats["std"])',
     'NormalizedModel(model, stats["std"], stats["mean"])',
     ["tests/test_export.py::test_exported_files_equal_the_raw_network_after_a_normalization_done_here"],
     ["tests/test_export.py::test_both_formats_export_with_parity_and_predict_like_the_checkpoint"]),
    ("w-3", "cifar_ddp/lr_find.py", "suggest(lrs, losses), stopped_early", "lrs[int(np.argmin(losses))], stopped_early",
     ["tests/test_lr_find.py::test_the_sweep_is_exponential_and_stops_when_the_loss_diverges"]),
    ("w-4", "cifar_ddp/engine.py", "local = (seen + wrong) * ctx.world_size + ctx.rank",
     "local = seen + wrong * ctx.world_size + ctx.rank",
     ["tests/test_report.py::test_two_processes_give_the_same_confusion_matrix_and_mistakes"]),

    # ---- this audit: code issue 25's list does not reach
    ("a-01", "cifar_ddp/distributed.py", "return self.rank == 0", "return self.local_rank == 0",
     ["tests/test_dist_context.py"], DIST_SLOW),
    ("a-02", "cifar_ddp/distributed.py", "return bool(self.backend)", "return self.world_size > 1",
     ["tests/test_dist_context.py"], DIST_SLOW),
    ("a-03", "cifar_ddp/distributed.py", "dist.all_reduce(out, op=dist.ReduceOp.MAX)",
     "dist.all_reduce(out, op=dist.ReduceOp.SUM)",
     ["tests/test_numbers.py::test_bn_buffers_are_averaged_over_ranks_not_summed"], DIST_SLOW),
    ("a-04", "cifar_ddp/distributed.py", "is_master=(rank == 0 and not agent_store)", "is_master=(rank == 0)",
     ["tests/test_dist_context.py"], DIST_SLOW),
    ("a-05", "cifar_ddp/distributed.py", 'dist.PrefixStore(f"cifar_ddp/attempt{attempt}", store)',
     'dist.PrefixStore("cifar_ddp", store)', ["tests/test_dist_context.py"],
     DIST_SLOW + ["tests/test_recovery.py::test_sigkilled_worker_is_restarted_by_torchrun_and_resumes"]),
    ("a-06", "cifar_ddp/distributed.py", "out = tensor.clone()\n        if self.is_distributed:\n            dist.all_reduce(out, op=dist.ReduceOp.SUM)",
     "out = tensor\n        if self.is_distributed:\n            dist.all_reduce(out, op=dist.ReduceOp.SUM)",
     ["tests/test_numbers.py::test_bn_buffers_are_averaged_over_ranks_not_summed"], DIST_SLOW),
    ("a-07", "cifar_ddp/data/transforms.py", "offsets = torch.randint(-pad, pad + 1, (2, n)",
     "offsets = torch.randint(-pad, pad, (2, n)",
     ["tests/test_augment.py::test_batched_crop_offsets_reach_both_ends_symmetrically"], AUGMENT),
    ("a-08", "cifar_ddp/data/transforms.py", 'offset = -(inverse @ (2.0 * params["shift"]).unsqueeze(2))',
     'offset = -(2.0 * params["shift"]).unsqueeze(2)',
     ["tests/test_augment.py::test_batched_scale_and_shift_move_a_square_where_hand_worked"], AUGMENT),
    ("a-09", "cifar_ddp/data/transforms.py",
     'cos, sin = torch.cos(angle) / params["scale"], torch.sin(angle) / params["scale"]',
     'cos, sin = torch.cos(angle) * params["scale"], torch.sin(angle) * params["scale"]',
     ["tests/test_augment.py::test_batched_scale_and_shift_move_a_square_where_hand_worked"], AUGMENT),
    ("a-10", "cifar_ddp/data/transforms.py", "torch.where(index < 0, -index, torch.where",
     "torch.where(index < 0, -index - 1, torch.where",
     ["tests/test_augment.py::test_batched_crop_is_a_whole_pixel_shift_of_the_padded_image"], AUGMENT),
    ("a-11", "cifar_ddp/data/transforms.py", 'x = torch.where(params["flip"].view(n, 1, 1, 1), x.flip(3), x)',
     'x = torch.where(params["flip"].view(n, 1, 1, 1), x.flip(2), x)',
     ["tests/test_augment.py::test_batched_flip_and_normalization_exact"], AUGMENT),
    ("a-12", "cifar_ddp/data/transforms.py", "(rows < top + size)", "(rows <= top + size)",
     ["tests/test_augment.py::test_batched_hole_is_one_square_at_the_mean"], AUGMENT),
    ("a-13", "cifar_ddp/data/transforms.py", "x = images.permute(0, 3, 1, 2).float().div_(255.0)\n    mean, std",
     "x = images.permute(0, 3, 2, 1).float().div_(255.0)\n    mean, std",
     ["tests/test_engine_eval.py::test_loss_is_the_mean_over_the_whole_split_with_an_odd_last_batch"],
     AUGMENT + ["tests/test_report.py::test_report_numbers_equal_an_independent_computation"]),
    ("a-14", "cifar_ddp/checkpoint.py", 'for name in ("last.pt", "best.pt")', 'for name in ("last.pt",)',
     ["tests/test_checkpoint_files.py::test_fallback_goes_by_step_through_last_and_best_then_older_step_files"], CKPT),
    ("a-15", "cifar_ddp/checkpoint.py", '.get("global_step", -1))', '.get("epoch", -1))',
     ["tests/test_checkpoint_files.py::test_fallback_goes_by_step_through_last_and_best_then_older_step_files"], CKPT),
    ("a-16", "cifar_ddp/checkpoint.py", "for _, old in step_files(directory)[keep:]:",
     "for _, old in step_files(directory)[keep + 1:]:",
     ["tests/test_checkpoint_files.py::test_fallback_goes_by_step_through_last_and_best_then_older_step_files"], CKPT),
    ("a-17", "cifar_ddp/checkpoint.py", "            continue\n        step = int(", "            break\n        step = int(",
     ["tests/test_checkpoint_files.py::test_fallback_goes_by_step_through_last_and_best_then_older_step_files"], CKPT),
    ("a-18", "cifar_ddp/metrics.py", "return float(sum(abs(b[2] - b[1]) for b in bins if b[0]) / total)",
     "return float(abs(sum(b[2] - b[1] for b in bins if b[0])) / total)",
     ["tests/test_report.py::test_ece_does_not_let_over_and_under_confident_bins_cancel"], REPORT),
    ("a-19", "cifar_ddp/report.py", "accuracy = np.where(filled, b[:, 2] / np.maximum(b[:, 0], 1), 0)",
     "accuracy = np.where(filled, b[:, 1] / np.maximum(b[:, 0], 1), 0)",
     ["tests/test_report.py::test_reliability_diagram_draws_each_bins_accuracy_at_its_centre_and_its_count"], REPORT),
    ("a-20", "cifar_ddp/report.py", "centres = (edges[:-1] + edges[1:]) / 2", "centres = edges[:-1]",
     ["tests/test_report.py::test_reliability_diagram_draws_each_bins_accuracy_at_its_centre_and_its_count"], REPORT),
    ("a-21", "cifar_ddp/report.py", "hist.bar(centres, b[:, 0]", "hist.bar(centres, b[:, 2]",
     ["tests/test_report.py::test_reliability_diagram_draws_each_bins_accuracy_at_its_centre_and_its_count"], REPORT),
    ("a-22", "cifar_ddp/engine.py", "which = (confidence * CALIBRATION_BINS).long()",
     "which = (confidence * (CALIBRATION_BINS - 1)).long()",
     ["tests/test_report.py::test_report_numbers_equal_an_independent_computation"], REPORT),
    ("a-23", "cifar_ddp/summary.py", "(m.in_channels // m.groups) * kh * kw", "m.in_channels * kh * kw",
     ["tests/test_model.py::test_summary_macs_equal_torchs_flop_counter_layer_by_layer"], ["tests/test_model.py"]),
    ("a-24", "cifar_ddp/summary.py", "for size in layer.output_shape[1:]:", "for size in layer.output_shape[2:]:",
     ["tests/test_model.py::test_summary_macs_equal_torchs_flop_counter_layer_by_layer"], ["tests/test_model.py"]),
    ("a-25", "cifar_ddp/summary.py", "return m.in_features * m.out_features", "return (m.in_features + 1) * m.out_features",
     ["tests/test_model.py::test_summary_macs_equal_torchs_flop_counter_layer_by_layer"], ["tests/test_model.py"]),
    ("a-26", "cifar_ddp/inference.py", "if ema is False or not has_ema:", "if not ema or not has_ema:",
     ["tests/test_export.py::test_checkpoint_weights_picks_the_ema_unless_told_otherwise"], INFERENCE),
    ("a-27", "cifar_ddp/inference.py", "Image.Resampling.BILINEAR", "Image.Resampling.NEAREST",
     ["tests/test_export.py::test_a_larger_picture_is_resized_bilinearly"], INFERENCE),
    ("a-28", "cifar_ddp/inference.py", "return self.model((images - self.mean) / self.std)",
     "return self.model(images / self.std - self.mean)",
     ["tests/test_export.py::test_exported_files_equal_the_raw_network_after_a_normalization_done_here"], INFERENCE),
    ("a-29", "cifar_ddp/launcher.py", "exc.errno in _FILESYSTEM_FULL_OR_CLOSED", "exc.errno == errno.ENOSPC",
     ["tests/test_launcher.py"], LAUNCH),
    ("a-30", "cifar_ddp/launcher.py", "code = EXIT_RESUMABLE      #", "code = 1      #", ["tests/test_launcher.py"], LAUNCH),
    ("a-31", "cifar_ddp/launcher.py", 'print(f"error: {exc}", file=sys.stderr, flush=True)\n        return EXIT_USER_ERROR',
     'print(f"error: {exc}", file=sys.stderr, flush=True)\n        return 1', ["tests/test_launcher.py"], LAUNCH),
    ("a-32", "cifar_ddp/launcher.py", "        elif ctx is None or not ctx.is_distributed:\n            raise",
     "        elif ctx is None:\n            raise", ["tests/test_launcher.py"], LAUNCH),
    ("a-33", "cifar_ddp/launcher.py", "    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())\n    return 1",
     "    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())\n    return 0", ["tests/test_launcher.py"], LAUNCH),
]


def run(mutant, verbose: bool = False, before: bool = False) -> bool:
    ident, rel, old, new, tests = mutant[:5]
    if before and len(mutant) > 5:
        tests = mutant[5]
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
    if done.returncode not in (0, 1):   # 2-5: interrupted, usage error, no tests: not a verdict
        raise RuntimeError(f"{ident}: pytest exited {done.returncode}\n{done.stdout[-1500:]}{done.stderr[-800:]}")
    return done.returncode == 1


def main(argv) -> int:
    if "--list" in argv:
        for ident, rel, old, new, tests, *_ in MUTANTS:
            print(f"{ident}  {rel}: {old.strip()!r} -> {new.strip()!r}  [{' '.join(tests)}]")
        return 0
    if "--check" in argv:   # every original text occurs exactly once
        bad = [m[0] for m in MUTANTS if (REPO / m[1]).read_text().count(m[2]) != 1]
        print("bad:", bad)
        return 1 if bad else 0
    verbose = "-v" in argv
    before = "--before" in argv
    wanted = [a for a in argv if not a.startswith("-")]
    chosen = [m for m in MUTANTS if not wanted or m[0] in wanted]
    survived = 0
    for mutant in chosen:
        started = time.time()
        caught = run(mutant, verbose, before)
        survived += not caught
        print(f"{mutant[0]}  {'caught  ' if caught else 'SURVIVED'}  {time.time() - started:5.1f}s  "
              f"{mutant[1]}: {mutant[2].strip()[:60]!r}", flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} caught")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
