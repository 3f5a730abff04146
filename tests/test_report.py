"""The evaluation report: its numbers against an independent computation, its files, and
the same figures from two processes as from one."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from cifar_ddp import checkpoint as ckpt
from cifar_ddp import metrics, report
from cifar_ddp.config import config_from_dict
from cifar_ddp.data.sources import CIFAR10_CLASSES, ChannelStats, load_dataset
from cifar_ddp.distributed import DistContext
from cifar_ddp.evaluation import evaluate_checkpoint, format_report
from cifar_ddp.inference import load_for_inference, uint8_to_input

from conftest import REPO, run_job, train_in_process


@pytest.fixture(scope="module")
def last_pt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    folder = root / "images"
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 20), ("test", 10)):
        for k, name in enumerate(CIFAR10_CLASSES):
            (folder / split / name).mkdir(parents=True)
            for i in range(per_class):   # each class a flat colour, with noise: learnable, not perfectly
                picture = np.array([25 * k, 255 - 25 * k, (70 * k) % 256]) + rng.integers(-60, 60, (32, 32, 3))
                Image.fromarray(picture.clip(0, 255).astype(np.uint8)).save(folder / split / name / f"{i}.png")
    out = root / "run"
    train_in_process(out, **{"train.epochs": 3, "data.source": "folder", "data.root": str(folder),
                             "model.dropout": 0.0, "train.lr": 0.8, "augment.plain_last_epochs": 3})
    return ckpt.checkpoint_dir(out) / "last.pt"


def test_report_numbers_equal_an_independent_computation(last_pt: Path, tmp_path: Path):
    payload = ckpt.load_file(last_pt)
    # fp32 like the independent computation below (bf16 autocast moves confidences across ECE bins).
    cfg = config_from_dict(payload["config"], ["train.channels_last=false", "train.precision=fp32"])
    figures = evaluate_checkpoint(payload, cfg, DistContext(), report_dir=tmp_path / "report", gallery=8)
    # Independently: the model applied to every test image, scored by scikit-learn.
    trained = load_for_inference(last_pt)
    stats = ChannelStats.from_payload(payload["stats"])
    test = load_dataset(cfg.data, with_train=False, stats=stats, classes=trained.classes).test
    with torch.no_grad():
        probabilities = trained.model(uint8_to_input(test.images)).softmax(1).numpy()
    predicted = probabilities.argmax(1)
    expected = confusion_matrix(test.labels, predicted, labels=range(10))
    assert np.array_equal(np.asarray(figures["confusion_matrix"]), expected)
    assert expected.sum() == figures["images"] == 100
    assert len(set(predicted.tolist())) > 1, "the toy model must not predict one class only"
    totals = expected.sum(1)
    for k, name in enumerate(trained.classes):
        assert round(figures["per_class_accuracy"][name] * totals[k]) == expected[k, k]
    precision, recall, f1, support = precision_recall_fscore_support(test.labels, predicted, labels=range(10),
                                                                     zero_division=0)
    for k, name in enumerate(trained.classes):
        mine = figures["per_class"][name]
        assert mine["precision"] == pytest.approx(precision[k]) and mine["recall"] == pytest.approx(recall[k])
        assert mine["f1"] == pytest.approx(f1[k]) and mine["support"] == support[k]
    # ECE over 15 equal bins of the top-1 probability, computed directly.
    confidence = probabilities.max(1)
    which = np.minimum((confidence * 15).astype(int), 14)
    ece = sum(abs((predicted[which == b] == test.labels[which == b]).sum() - confidence[which == b].sum())
              for b in range(15)) / len(confidence)
    assert figures["ece"] == pytest.approx(ece, abs=1e-5)
    # The most confident mistakes, in order, are the gallery's.
    wrong = np.flatnonzero(predicted != test.labels)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:8]
    assert [m["index"] for m in figures["mistakes"]] == order.tolist()


def test_ece_of_calibrated_and_overconfident_toys():
    # Each bin's accuracy equals its mean confidence: perfectly calibrated.
    assert metrics.expected_calibration_error([[10, 10 * 0.55, 10 * 0.55], [0, 0, 0], [30, 30 * 0.95, 30 * 0.95]]) == 0
    # 40 images at confidence 0.9, half right: |0.5 - 0.9| = 0.4.
    assert metrics.expected_calibration_error([[40, 36.0, 20.0]]) == pytest.approx(0.4)


def test_report_files_are_valid_and_say_what_the_json_says(last_pt: Path, tmp_path: Path):
    directory = tmp_path / "report"
    done = run_job([sys.executable, str(REPO / "launch" / "evaluate.py"), "--checkpoint", str(last_pt),
                    "--report", str(directory), "--gallery", "6", "--json", "train.channels_last=false"])
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout[done.stdout.index("{"):])
    for name in ("confusion.png", "reliability.png", "mistakes.png", "gradcam.png"):
        with Image.open(directory / name) as img:
            img.verify()
            assert img.format == "PNG"
    page = (directory / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<img ") == 4 and "<table>" in page
    markdown = (directory / "report.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\w+) \| (\w+) \| ([\d.]+)% \| `([^`]+)` \|$", markdown, re.M)
    assert [(int(i), t, p, path) for _, i, t, p, _, path in rows] == \
        [(m["index"], m["true"], m["predicted"], m["path"]) for m in figures["mistakes"]]
    assert len(rows) == len(figures["mistakes"]) >= 1


@pytest.mark.slow
def test_two_processes_give_the_same_confusion_matrix_and_mistakes(last_pt: Path, tmp_path: Path):
    # A test split of 1,200 images: 500 airplanes, 500 automobiles, then 25 of each other class.
    # Each rank's shard (600) takes two of evaluate's batches of 500, and the first batches
    # hold only the two easy classes: the mistakes are found in the ranks' second batches.
    counts = [500, 500] + [25] * 8
    rng = np.random.default_rng(5)
    for k, name in enumerate(CIFAR10_CLASSES):
        (tmp_path / "big" / "test" / name).mkdir(parents=True)
        for i in range(counts[k]):
            picture = np.array([25 * k, 255 - 25 * k, (70 * k) % 256]) + rng.integers(-30, 30, (32, 32, 3))
            Image.fromarray(picture.clip(0, 255).astype(np.uint8)).save(tmp_path / "big" / "test" / name / f"{i:03d}.png")
    label_of = np.repeat(np.arange(10), counts)
    results = []
    for nproc in (1, 2):
        script = [str(REPO / "launch" / "evaluate.py"), "--checkpoint", str(last_pt), "--json",
                  "--report", str(tmp_path / f"report{nproc}"), "--gallery", "10", f"data.root={tmp_path / 'big'}",
                  "train.precision=fp32"]   # exact over ranks: bf16 (auto on an AMX CPU) rounds per batch shape
        argv = [sys.executable, *script] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
        done = run_job(argv)
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(json.loads(done.stdout[done.stdout.index("{"):]))
    one, two = results
    assert two["world_size"] == 2 and one["images"] == two["images"] == 1200
    assert one["confusion_matrix"] == two["confusion_matrix"]
    assert [m["index"] for m in one["mistakes"]] == [m["index"] for m in two["mistakes"]]
    assert len(two["mistakes"]) == 10 and any(m["index"] >= 1000 for m in two["mistakes"]), \
        "some mistake must come from a rank's second batch"
    for m in two["mistakes"]:   # the folder lists class by class
        assert m["true"] == CIFAR10_CLASSES[label_of[m["index"]]] != m["predicted"]
    assert one["ece"] == pytest.approx(two["ece"])


def test_most_confused_pairs_come_largest_first():
    classes = ["a", "b", "c"]
    confusion = [[50, 2, 7],     # a taken for c 7 times, for b twice
                 [9, 40, 0],     # b taken for a 9 times
                 [1, 4, 30]]
    got = metrics.most_confused(confusion, classes, count=4)
    assert [(p["true"], p["predicted"], p["images"]) for p in got] == \
        [("b", "a", 9), ("a", "c", 7), ("c", "b", 4), ("a", "b", 2)]
    # The diagonal and empty cells are never listed.
    assert len(metrics.most_confused(confusion, classes, count=10)) == 5


def test_ece_does_not_let_over_and_under_confident_bins_cancel():
    # Bin 1: 10 images at mean confidence 0.9, 5 right; bin 2: 10 at 0.2, 6 right:
    # (|5 - 9| + |6 - 2|) / 20 = 0.4, although the signed gaps sum to 0.
    assert metrics.expected_calibration_error([[10, 9.0, 5.0], [10, 2.0, 6.0]]) == pytest.approx(0.4)
    assert metrics.expected_calibration_error([[0, 0, 0], [0, 0, 0]]) == 0.0


def test_reliability_diagram_draws_each_bins_accuracy_at_its_centre_and_its_count():
    bins = [[0, 0, 0] for _ in range(5)]
    bins[1] = [10, 10 * 0.3, 2]        # images in [0.2, 0.4): accuracy 0.2
    bins[4] = [30, 30 * 0.9, 24]       # images in [0.8, 1.0]: accuracy 0.8
    fig = report.plot_reliability(bins)
    accuracy_ax, count_ax = fig.axes
    bars = [(round(p.get_x() + p.get_width() / 2, 6), round(p.get_height(), 6)) for p in accuracy_ax.patches]
    assert bars == [(0.3, 0.2), (0.9, 0.8)]
    counts = [(round(p.get_x() + p.get_width() / 2, 6), p.get_height()) for p in count_ax.patches]
    assert counts == [(0.1, 0), (0.3, 10), (0.5, 0), (0.7, 0), (0.9, 30)]
    report.pyplot().close(fig)


def mirror_sensitive_folder(last_pt: Path, root: Path, per_class: int = 10) -> Path:
    """A test/<class>/*.png tree on which the toy model's answer changes when mirrored, for some.

    Candidates blend two classes' colours from left to right, through every mixing point, so
    some sit on a decision boundary that a mirror crosses. Which ones depends on the weights
    (which another CPU's kernels round otherwise), so they are picked by the float64 reference
    here: the premise is built into the data, not hoped of the trained model."""
    net = load_for_inference(last_pt).model.double().eval()
    rng = np.random.default_rng(3)
    colours = np.array([[25 * k, 255 - 25 * k, (70 * k) % 256] for k in range(10)], dtype=np.float64)
    ramp = np.linspace(0.0, 1.0, 32)
    candidates = []
    for k in range(10):
        for j in range(10):
            for centre in np.linspace(-0.6, 0.6, 13):   # where the blend is half and half
                weight = np.clip(ramp[None, :, None] - centre, 0.0, 1.0) if j != k else np.zeros((1, 32, 1))
                picture = colours[k] * (1 - weight) + colours[j] * weight + rng.integers(-30, 30, (32, 32, 3))
                candidates.append((k, np.broadcast_to(picture, (32, 32, 3)).clip(0, 255).astype(np.uint8)))
    pictures = np.stack([picture for _, picture in candidates])
    with torch.no_grad():
        x = uint8_to_input(pictures).double()
        plain, mirrored = net(x), net(x.flip(3))
    differs = (plain.argmax(1) != ((plain + mirrored) / 2).argmax(1)).numpy()
    assert differs.sum() >= 3, f"only {differs.sum()} of {len(candidates)} candidates tell TTA from plain"
    # Per class: those that tell TTA from plain first, then the rest.
    order = sorted(range(len(candidates)), key=lambda i: (not differs[i], rng.random()))
    for k, name in enumerate(CIFAR10_CLASSES):
        (root / "test" / name).mkdir(parents=True)
        chosen = [i for i in order if candidates[i][0] == k][:per_class]
        for n, i in enumerate(chosen):
            Image.fromarray(candidates[i][1]).save(root / "test" / name / f"{n}.png")
    return root


def test_tta_is_reported_beside_the_plain_accuracy(last_pt: Path, tmp_path: Path):
    blends = mirror_sensitive_folder(last_pt, tmp_path / "blends")
    payload = ckpt.load_file(last_pt)
    cfg = config_from_dict(payload["config"], ["train.channels_last=false", "train.precision=fp32",
                                               f"data.root={blends}"])
    plain = evaluate_checkpoint(payload, cfg, DistContext())
    both = evaluate_checkpoint(payload, cfg, DistContext(), tta_flip=True)
    assert "accuracy_tta" not in plain
    # Independently, in float64: the plain logits, and the mean of each image's and its mirror's.
    trained = load_for_inference(last_pt)
    test = load_dataset(cfg.data, with_train=False, stats=ChannelStats.from_payload(payload["stats"]),
                        classes=trained.classes).test
    x = uint8_to_input(test.images).double()
    net = trained.model.double()
    with torch.no_grad():
        logits = net(x)
        mirrored = (logits + net(x.flip(3))) / 2
    plain_matrix = confusion_matrix(test.labels, logits.argmax(1).numpy(), labels=range(10))
    tta_matrix = confusion_matrix(test.labels, mirrored.argmax(1).numpy(), labels=range(10))
    assert not np.array_equal(plain_matrix, tta_matrix), "the data must tell TTA from plain"
    # The plain figures stay plain (accuracy, confusion matrix); TTA's come beside them.
    assert np.array_equal(np.asarray(both["confusion_matrix"]), plain_matrix) and both["accuracy"] == plain["accuracy"]
    assert both["correct"] == np.trace(plain_matrix) and both["correct_tta"] == np.trace(tta_matrix)
    assert both["accuracy_tta"] == pytest.approx(np.trace(tta_matrix) / 100)
    text = format_report(both)
    assert f"accuracy: {np.trace(plain_matrix):.2f}%" in text  # of 100 images
    assert f"accuracy with flip TTA: {np.trace(tta_matrix):.2f}%" in text


def test_evaluating_a_validation_carve_says_val_everywhere(last_pt: Path, tmp_path: Path):
    payload = ckpt.load_file(last_pt)
    cfg = config_from_dict(payload["config"], ["train.channels_last=false", "data.val_size=30"])
    figures = evaluate_checkpoint(payload, cfg, DistContext(), report_dir=tmp_path / "report", gallery=4)
    assert figures["split"] == "val" and figures["images"] == 30
    assert format_report(figures).splitlines()[1] == "val images: 30"
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "- val images: 30\n" in markdown and "| # | val image |" in markdown
    assert "test image" not in markdown
    test = evaluate_checkpoint(payload, config_from_dict(payload["config"], ["train.channels_last=false"]),
                               DistContext())
    assert test["split"] == "test" and test["images"] == 100


def _check_page(page: str, directory: Path) -> dict:
    """Parse `page` with html.parser: every element closed in order, list items only in
    lists, table rows only in <thead>/<tbody>, every picture on disk; returns tag counts."""
    from html.parser import HTMLParser

    void = {"meta", "img", "br", "hr", "link", "input"}

    class Checker(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack, self.counts, self.images = [], {}, []

        def handle_starttag(self, tag, attrs):
            self.counts[tag] = self.counts.get(tag, 0) + 1
            if tag == "li":
                assert self.stack[-1] in ("ul", "ol"), f"<li> inside <{self.stack[-1]}>"
            if tag == "tr":
                assert self.stack[-1] in ("thead", "tbody"), f"<tr> inside <{self.stack[-1]}>"
            if tag in ("thead", "tbody"):
                assert self.stack[-1] == "table"
            if tag == "img":
                self.images.append(dict(attrs)["src"])
            if tag not in void:
                self.stack.append(tag)

        def handle_endtag(self, tag):
            assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
            self.stack.pop()

    checker = Checker()
    checker.feed(page)
    checker.close()
    assert checker.stack == [], f"unclosed: {checker.stack}"
    assert checker.images and all((directory / src).is_file() for src in checker.images)
    return checker.counts


def test_the_html_page_is_well_formed_with_lists_tables_and_its_pictures(last_pt: Path, tmp_path: Path):
    payload = ckpt.load_file(last_pt)
    cfg = config_from_dict(payload["config"], ["train.channels_last=false"])
    directory = tmp_path / "report"
    figures = evaluate_checkpoint(payload, cfg, DistContext(), report_dir=directory, gallery=5)
    page = (directory / "index.html").read_text()
    counts = _check_page(page, directory)
    # Per class and the mistakes: two tables, each with a head and a body; the header
    # facts and the most confused pairs: two lists; four pictures.
    assert counts["table"] == counts["thead"] == counts["tbody"] == 2 and counts["ul"] == 2
    assert counts["img"] == 4 and counts["tr"] == 1 + 10 + 1 + len(figures["mistakes"])
    assert "border" in page[page.index("<style>"):page.index("</style>")]
    # The planted bug this catches: the old hand-written converter's <li> without <ul>.
    with pytest.raises(AssertionError, match="<li> inside <body>"):
        _check_page("<html><body><li>x</li><img src='confusion.png'></body></html>", directory)


def test_the_mistakes_table_names_each_images_file(last_pt: Path, tmp_path: Path):
    payload = ckpt.load_file(last_pt)
    cfg = config_from_dict(payload["config"], ["train.channels_last=false"])
    figures = evaluate_checkpoint(payload, cfg, DistContext(), report_dir=tmp_path / "report", gallery=6)
    test = load_dataset(cfg.data, with_train=False, stats=ChannelStats.from_payload(payload["stats"])).test
    markdown = (tmp_path / "report" / "report.md").read_text()
    for m in figures["mistakes"]:
        path = Path(m["path"])
        assert path.parent.name == m["true"] and path.parent.parent.name == "test"
        with Image.open(path) as img:   # the file holds the very picture scored
            assert np.array_equal(np.asarray(img.convert("RGB")), test.images[m["index"]])
        assert f"| `{path}` |" in markdown


def test_folder_paths_survive_the_array_cache_and_the_validation_carve(tmp_path: Path):
    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "images", per_class=4)
    cfg = config_from_dict({"data": {"source": "folder", "root": str(root)}})
    first = load_dataset(cfg.data)     # decodes, writes the cache
    cached = load_dataset(cfg.data)    # reads the cache
    for data in (first, cached):
        assert data.test.paths == tuple(str(root / "test" / c / f"{i:04d}.png") for c in CIFAR10_CLASSES
                                        for i in range(4))
    carved = load_dataset(config_from_dict({"data": {"source": "folder", "root": str(root), "val_size": 7}}).data)
    for split in (carved.train, carved.test):
        assert len(split.paths) == len(split)
        for k in (0, len(split) - 1):
            with Image.open(split.paths[k]) as img:
                assert np.array_equal(np.asarray(img), split.images[k])
            assert Path(split.paths[k]).parent.name == CIFAR10_CLASSES[split.labels[k]]
    fake = load_dataset(config_from_dict({"data": {"source": "fake", "fake_size": 8}}).data)
    assert fake.test.paths is None


def test_grad_cam_default_layer_is_the_last_block_with_a_map_of_4x4_or_more():
    from torch import nn

    from cifar_ddp.models import build_model, cam_layer_name
    from cifar_ddp.config import ModelConfig

    seed = build_model("seed")
    assert cam_layer_name(ModelConfig(name="seed"), seed) == "c4"              # registered; 2x2
    assert report.default_cam_layer(seed, "c4") == "c3"                         # c3: 4x4
    sep = build_model("sep_resnet")
    assert report.default_cam_layer(sep, cam_layer_name(ModelConfig(name="sep_resnet"), sep)) == "c4"   # 4x4
    toy = nn.Sequential()
    toy.add_module("a", nn.Conv2d(3, 4, 3, padding=1))                     # 32x32
    toy.add_module("b", nn.Conv2d(4, 4, 3, stride=8, padding=1))           # 4x4
    toy.add_module("c", nn.Conv2d(4, 4, 3, stride=2, padding=1))           # 2x2
    toy.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)))
    assert report.default_cam_layer(toy, "c") == "b"
    assert report.default_cam_layer(toy, "a") == "a"                       # a choice with detail is kept
    toy.b.stride = (16, 16)                                                # b: 2x2 now
    assert report.default_cam_layer(toy, "c") == "a"
    toy.a.stride = (32, 32)                                                # nothing has 4x4: the choice stands
    assert report.default_cam_layer(toy, "c") == "c"


def test_the_grad_cam_figure_fits_the_page_and_has_a_colour_bar():
    images = np.zeros((30, 32, 32, 3), dtype=np.uint8)
    maps = np.tile(np.linspace(0, 1, 32), (30, 32, 1))
    fig = report.plot_gallery(images, ["true cat\npredicted dog (97%)"] * 30, columns=3, overlays=maps)
    width, _ = fig.get_size_inches() * report.DPI
    assert width <= report.PAGE_WIDTH_PX
    labels = [ax.get_xlabel() for ax in fig.axes]
    assert sum("Grad-CAM" in label for label in labels) == 1, "one colour bar, labelled"
    assert all(ax.title.get_fontsize() >= 9 for ax in fig.axes if ax.get_title())
    report.pyplot().close(fig)


def test_lr_find_legend_gives_the_train_lr_to_type():
    from cifar_ddp.lr_find import LRFindResult, plot

    lrs = list(np.geomspace(1e-3, 1.0, 20))
    result = LRFindResult(lrs, [2.3 - 0.05 * i for i in range(20)], suggested_lr=0.4, stopped_early=False,
                          global_batch=512, lr_reference_batch=256)
    fig = plot(result)
    (legend_text,) = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend_text.startswith("suggested: train.lr=0.2\n(per 256 images; 0.4 at batch 512)")
    assert result.suggested_train_lr == pytest.approx(0.2)
    report.pyplot().close(fig)
