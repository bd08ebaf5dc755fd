"""``eomt-fast segment``: files written per image, unreadable inputs, names, sharding across processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eomt_fast import cli, segment
from eomt_fast.processing import EomtFastImageProcessor
from eomt_fast.testing import TEST_CONFIGS, random_hf_model

Image = pytest.importorskip("PIL.Image")

SIZES = {"a.png": (50, 64), "b.jpg": (64, 40), "c.png": (123, 77), "sub/d.png": (30, 200), "sub/e.png": (64, 64)}
LABELS = ["sky", "road", "car", "person", "tree"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random-weight transformers model, saved; its classes boosted so that segments exist."""
    pytest.importorskip("transformers")
    config = dict(TEST_CONFIGS["small_r4"])
    config.pop("num_labels")
    hf = random_hf_model(seed=11, dtype=torch.float32, attn_mask_probs=[1.0, 0.0],
                         id2label=dict(enumerate(LABELS)), **config)
    with torch.no_grad():
        hf.class_predictor.bias[-1] -= 10.0
        hf.class_predictor.weight.mul_(5.0)
    directory = tmp_path_factory.mktemp("model")
    hf.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Generated photos of several sizes (one folder level down too), a corrupt JPEG and a text file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        (folder / name).parent.mkdir(exist_ok=True)
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        photo = np.stack([np.sin(x * 9 + rng.uniform(0, 6)), np.cos(y * 7), np.sin((x + y) * 5)], -1)
        Image.fromarray(((photo + 1) * 127.5).astype(np.uint8)).save(folder / name, quality=95)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image, not an input")
    return folder


def segment_args(images, model_dir, out, *extra):
    return ["segment", str(images), "--model", str(model_dir), "--out", str(out), "--batch-size", "2",
            "--threshold", "0", "--overlap-threshold", "0", *extra]


def read_outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def check_image_outputs(out: Path, images: Path, name: str, task: str) -> dict:
    record = json.loads((out / f"{name}.segments.json").read_text())
    source = Path(record["image"])
    assert source == (images / [k for k in SIZES if k.rsplit(".", 1)[0] == name][0]).resolve()
    height, width = SIZES[source.relative_to(images.resolve()).as_posix()]
    assert (record["height"], record["width"], record["task"]) == (height, width, task)
    labels = np.asarray(Image.open(out / f"{name}.labels.png"))
    assert labels.shape == (height, width) and labels.dtype == np.uint8
    overlay = Image.open(out / f"{name}.overlay.png")
    assert overlay.size == (width, height) and overlay.mode == "RGB"
    ids = {s["id"] for s in record["segments"]}
    assert set(np.unique(labels)) - {0} <= {i + 1 for i in ids}  # value = segment id + 1, 0 = none
    for s in record["segments"]:
        assert s["label"] == LABELS[s["label_id"]]
        assert s["area"] == int((labels == s["id"] + 1).sum())
        assert (s["score"] is None) == (task == "semantic")
    return record


def test_segment_command_end_to_end(model_dir, images, tmp_path):
    """As a user runs it: a folder with an unreadable file; every readable image gets its three files,
    the broken one is reported and skipped, the exit status says that something was skipped."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "eomt_fast.cli", *segment_args(images, model_dir, out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr
    assert "5 image(s) segmented" in result.stderr
    assert "5/6 images" in result.stderr or "6/6 images" in result.stderr  # the progress line
    names = sorted(p.name.removesuffix(".segments.json") for p in out.rglob("*.segments.json"))
    assert names == ["a", "b", "c", "d", "e"]
    assert not list(out.rglob(".*tmp*"))  # no temporary files left behind
    # the label maps are those of the processor API on the same pictures
    proc = EomtFastImageProcessor.from_pretrained(model_dir, task="panoptic")
    from eomt_fast import EomtFastForUniversalSegmentation

    model = EomtFastForUniversalSegmentation.from_pretrained(model_dir)
    for name in SIZES:
        stem = name.rsplit(".", 1)[0]
        record = check_image_outputs(out, images, stem, "panoptic")
        photo = np.asarray(Image.open(images / name).convert("RGB"))
        inputs = proc([photo])
        expected = proc.post_process_panoptic_segmentation(model(inputs.pixel_values), inputs.target_sizes,
                                                           threshold=0.0, overlap_mask_area_threshold=0.0)[0]
        labels = np.asarray(Image.open(out / f"{stem}.labels.png")).astype(np.int64) - 1
        # batch of 2 there, of 1 here: logits may differ in the last bit, maps at most at a tie
        assert (labels == expected["segmentation"].numpy()).mean() > 0.999
        assert [(s["id"], s["label_id"]) for s in record["segments"]] == \
            [(s["id"], s["label_id"]) for s in expected["segments_info"]]


@pytest.mark.parametrize("task", ["instance", "semantic"])
def test_segment_instance_and_semantic(model_dir, images, tmp_path, task):
    out = tmp_path / task
    assert cli.main(segment_args(images, model_dir, out, "--task", task, "--no-progress")) == 1  # broken.jpg
    for name in ["a", "b", "c", "sub/d", "sub/e"]:
        record = check_image_outputs(out, images, name, task)
        if task == "semantic":  # one segment per class present; the ids are the class ids
            assert all(s["id"] == s["label_id"] for s in record["segments"]) and record["segments"]


def test_two_processes_write_what_one_process_writes(model_dir, images, tmp_path):
    """RANK/WORLD_SIZE as torchrun sets them: each process takes every second image of the sorted list;
    together they write byte for byte the files of a single run (model batches have fixed shapes)."""
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert cli.main(segment_args(images, model_dir, single, "--no-progress", "--device", "cpu")) == 1
    processes = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "eomt_fast.cli", *segment_args(images, model_dir, sharded)]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    logs = [p.communicate(timeout=300) for p in processes]
    # the sorted inputs are a, b, broken, c, sub/d, sub/e: rank 0 gets a, broken, sub/d. Status 0: under
    # torchrun a non-zero status would stop the other process.
    assert [p.returncode for p in processes] == [0, 0], logs
    assert "[rank 0/2]" in logs[0][1] and "broken.jpg" in logs[0][1] and "broken.jpg" not in logs[1][1]
    assert read_outputs(sharded) == read_outputs(single)


def test_outputs_of_other_images_are_never_overwritten(model_dir, images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    foreign = {"image": "/elsewhere/a.png", "segments": []}
    (out / "a.segments.json").write_text(json.dumps(foreign))
    (out / "b.labels.png").write_bytes(b"left by an interrupted run of another tool")
    assert cli.main(segment_args(images, model_dir, out, "--no-progress")) == 1
    assert json.loads((out / "a.segments.json").read_text()) == foreign
    assert (out / "b.labels.png").read_bytes() == b"left by an interrupted run of another tool"
    renamed = {p.name for p in out.glob("[ab]-*.segments.json")}
    assert len(renamed) == 2  # a-<hash>, b-<hash>
    # running again finds its own files: same names, nothing new
    before = read_outputs(out)
    assert cli.main(segment_args(images, model_dir, out, "--no-progress", "--skip-existing")) == 1
    assert read_outputs(out) == before


def test_output_names_are_unique_and_stable(tmp_path):
    for name in ["x.png", "x.jpg", "x_jpg.png", "sub/x.png", "sub/y.png", "out/x.labels.png"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    arguments = [tmp_path, tmp_path / "sub" / "y.png", tmp_path / "nothing.png"]
    items, missing = segment.collect_inputs(arguments, exclude=tmp_path / "out")  # the output folder is not input
    assert missing == [str(tmp_path / "nothing.png")]
    names = {item.path.relative_to(tmp_path).as_posix(): item.name for item in items}
    assert names == {"sub/x.png": "sub/x", "sub/y.png": "y", "x.jpg": "x", "x.png": "x_png", "x_jpg.png": "x_jpg"}
    again, _ = segment.collect_inputs(arguments[::-1], exclude=tmp_path / "out")
    assert again == items  # same order, same names, whatever the order of the arguments


def test_label_png_is_16_bit_when_needed(tmp_path):
    small = segment.label_image(np.array([[-1, 0], [253, 254]]))
    assert small.mode == "L" and np.asarray(small).tolist() == [[0, 1], [254, 255]]
    large = segment.label_image(np.array([[-1, 255], [1000, 7]]))
    large.save(tmp_path / "large.png")
    assert np.asarray(Image.open(tmp_path / "large.png")).astype(np.int64).tolist() == [[0, 256], [1001, 8]]


def test_distributed_environment_and_device(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert segment.distributed_env() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert segment.distributed_env() == (3, 4, 1)
    assert segment.pick_device("cpu", 1, 4) == torch.device("cpu")
    assert segment.pick_device("cuda", 1, 4) == torch.device("cuda", 1)
    assert segment.pick_device("cuda:1", 0, 1) == torch.device("cuda", 1)
    assert segment.pick_device("cuda", 0, 1).index is not None  # torch.cuda.set_device needs one
    if not torch.cuda.is_available():
        assert segment.pick_device(None, 1, 4) == torch.device("cpu")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK"):
        segment.distributed_env()


def test_cuda_graphs_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not segment.use_cuda_graphs("auto", cpu) and segment.use_cuda_graphs("auto", cuda)
    assert segment.use_cuda_graphs("on", cuda) and not segment.use_cuda_graphs("off", cuda)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        segment.use_cuda_graphs("on", cpu)
    with pytest.raises(ValueError, match="auto, on or off"):
        segment.use_cuda_graphs("maybe", cuda)


@pytest.mark.gpu
def test_cuda_graphs_write_what_eager_forwards_write(model_dir, images, tmp_path):
    """On CUDA, --cuda-graphs auto (the default) replays the graph of the same kernels: the same files as
    --cuda-graphs off, byte for byte (status 1: the broken image is reported)."""
    graphed, eager = tmp_path / "graphed", tmp_path / "eager"
    assert cli.main(segment_args(images, model_dir, graphed, "--no-progress", "--device", "cuda")) == 1
    assert cli.main(segment_args(images, model_dir, eager, "--no-progress", "--device", "cuda",
                                 "--cuda-graphs", "off")) == 1
    assert read_outputs(graphed) == read_outputs(eager) and read_outputs(graphed)


def test_segment_argument_errors(model_dir, images, tmp_path, capsys):
    assert cli.main(["segment", str(images), "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "model directory not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["segment", str(empty), "--model", str(model_dir), "--out", str(tmp_path / "out")]) == 2
    assert "no image files in" in capsys.readouterr().err


def test_segment_and_info_pass_the_revision_to_the_hub(model_dir, images, tmp_path, monkeypatch):
    """--model HUB_ID --revision R: both the model and the processor are fetched at R (a fake snapshot_download
    serving the saved model: no network)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def snapshot_download(repo_id, allow_patterns, **options):
        calls.append((repo_id, options.get("revision")))
        return str(model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    out = tmp_path / "out"
    status = cli.main(["segment", str(images / "a.png"), "--model", "org/eomt", "--revision", "v2", "--out", str(out),
                       "--threshold", "0", "--overlap-threshold", "0", "--no-progress"])
    assert status == 0 and (out / "a.segments.json").is_file()
    assert len(calls) == 2 and set(calls) == {("org/eomt", "v2")}  # the model's weights, the processor's JSON
    calls.clear()
    assert cli.main(["info", "--model", "org/eomt", "--revision", "v3", "--device", "cpu"]) == 0
    assert calls == [("org/eomt", "v3")]
