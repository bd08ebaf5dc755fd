"""``eomt-fast segment``: segment image files with an EoMT checkpoint.

For every input image it writes, into ``--out``, as soon as that image is done:

    NAME.labels.png     segment id + 1 per pixel (0 = no segment); 8-bit, 16-bit when ids exceed 254
    NAME.overlay.png    the photo with the segments coloured, outlined and labelled (id2label)
    NAME.segments.json  the source image, its size, and the segments: id, label_id, label, score, area

NAME is the file's stem, or its path relative to a folder given on the command line (sub-folders are
mirrored); names that would collide get the extension appended, then a counter. A file already in
``--out`` that belongs to another image (per its JSON) is never overwritten: the new image then gets a
name with a hash of its path. Each file is written to a temporary name and renamed, so an interrupted
run leaves complete files only. Unreadable images are reported on stderr and skipped.

Segments follow transformers' post-processing (``eomt_fast.processing``): panoptic and instance ids as in
``segments_info``; semantic: one segment per class present, its id the class id, no score.

Under ``torchrun --nproc-per-node N`` (RANK / WORLD_SIZE / LOCAL_RANK set), process r takes inputs
r, r+N, r+2N, ... of the sorted list and runs on cuda:LOCAL_RANK (or the CPU without CUDA). Names are
assigned over the whole list first, and the model always runs on batches of exactly min(--batch-size,
number of inputs) images (the last one padded), so the files are byte for byte those of a single run.
No collectives are used.

Exit status: 0, or 1 when inputs were skipped (unreadable, missing, not writable). Under torchrun
skipped inputs are only reported: a non-zero status would make torchrun stop the other processes.
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                              ".pgm", ".pbm", ".pnm"})
OUTPUT_SUFFIXES = (".labels.png", ".overlay.png", ".segments.json")
PROGRESS_MIN_IMAGES = 4  # fewer images than this: no progress bar


def _require_pillow():
    try:
        from PIL import Image, ImageDraw, ImageOps
    except ImportError:
        raise ImportError("eomt-fast segment reads and writes images with Pillow, which is not installed: "
                          "pip install pillow") from None
    return Image, ImageDraw, ImageOps


# ---- inputs ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputImage:
    path: Path  # absolute
    name: str  # output name, relative to --out, without suffix


def collect_inputs(arguments: Sequence[str | os.PathLike],
                   exclude: str | os.PathLike | None = None) -> tuple[list[InputImage], list[str]]:
    """Image files named on the command line or found (recursively, by extension) in folders named there,
    except under ``exclude`` (the output folder). Returns them in sorted order of absolute path, each with
    a unique output name, plus the arguments that name nothing (reported by the caller).

    A file's name is its stem when it is named directly, else its path relative to the nearest folder
    argument holding it; then, in path order, a repeated name gets the file's extension, then a counter.
    The result does not depend on the order of the arguments."""
    excluded = Path(exclude).expanduser().resolve() if exclude is not None else None
    candidates: dict[Path, set[str]] = {}  # absolute path -> names it could take
    missing = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            for file in path.rglob("*"):
                if file.suffix.lower() not in IMAGE_EXTENSIONS or not file.is_file():
                    continue
                resolved = file.resolve()
                if excluded is not None and resolved.is_relative_to(excluded):
                    continue
                candidates.setdefault(resolved, set()).add(file.relative_to(path).with_suffix("").as_posix())
        elif path.is_file():
            candidates.setdefault(path.resolve(), set()).add(path.stem)
        else:
            missing.append(os.fspath(argument))
    images, taken = [], set()
    for path in sorted(candidates, key=lambda p: p.as_posix()):
        name = min(candidates[path], key=lambda n: (n.count("/"), n))
        if name in taken:
            name = f"{name}_{path.suffix.lstrip('.').lower()}"
        base, counter = name, 2
        while name in taken:
            name, counter = f"{base}_{counter}", counter + 1
        taken.add(name)
        images.append(InputImage(path, name))
    return images, missing


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when not distributed."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid RANK={rank} for WORLD_SIZE={world}")
    return rank, world, local


def pick_device(requested: str | None, local_rank: int, world: int) -> torch.device:
    """--device, else cuda:LOCAL_RANK when CUDA is present, else the CPU. A bare "cuda" becomes
    cuda:LOCAL_RANK under torchrun, else the current CUDA device (always with an index:
    torch.cuda.set_device refuses a bare "cuda")."""
    if requested is None:
        return torch.device(f"cuda:{local_rank % max(1, torch.cuda.device_count())}" if torch.cuda.is_available()
                            else "cpu")
    from .model import indexed_device

    device = torch.device(requested)
    if device.type == "cuda" and device.index is None and world > 1:
        return torch.device("cuda", local_rank)
    return indexed_device(device)


def read_image(path: Path) -> np.ndarray:
    """An RGB uint8 HWC array, EXIF orientation applied (as transformers' load_image)."""
    Image, _, ImageOps = _require_pillow()
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return np.asarray(image.convert("RGB"))


# ---- outputs ---------------------------------------------------------------------------------------------
def palette(keys: np.ndarray) -> np.ndarray:
    """A distinct, stable RGB colour per integer key (golden-ratio hues)."""
    colours = [colorsys.hsv_to_rgb((0.07 + 0.618034 * int(k)) % 1.0, 0.65 + 0.3 * ((int(k) * 7) % 3) / 2, 0.95)
               for k in keys]
    return (np.array(colours, dtype=np.float32).reshape(-1, 3) * 255).astype(np.uint8)


def label_image(segmentation: np.ndarray):
    """(H, W) segment ids (-1 = none) -> a PNG-ready image of id + 1, 8-bit when it fits, else 16-bit."""
    Image, _, _ = _require_pillow()
    values = segmentation.astype(np.int64) + 1
    top = int(values.max(initial=0))
    if top > 65535:
        raise ValueError(f"{top - 1} segments do not fit a 16-bit PNG")
    if top <= 255:
        return Image.fromarray(values.astype(np.uint8), mode="L")
    return Image.fromarray(values.astype(np.uint16))  # mode I;16


def overlay_image(photo: np.ndarray, segmentation: np.ndarray, segments: list[dict[str, Any]], alpha: float = 0.5):
    """The photo with each segment tinted in its colour, outlined in white and labelled at an inner point."""
    Image, ImageDraw, _ = _require_pillow()
    out = photo.astype(np.float32)
    if segments:
        ids = np.array([s["id"] for s in segments])
        lookup = np.zeros(int(ids.max()) + 2, dtype=np.int64)  # segment id + 1 -> row of colours (0: none)
        lookup[ids + 1] = np.arange(1, len(ids) + 1)
        colours = np.concatenate([np.zeros((1, 3), np.uint8), palette(ids)]).astype(np.float32)
        rows = lookup[np.clip(segmentation + 1, 0, len(lookup) - 1)]
        inside = rows > 0
        out[inside] = out[inside] * (1 - alpha) + colours[rows[inside]] * alpha
        edge = np.zeros(segmentation.shape, dtype=bool)
        edge[:, 1:] |= segmentation[:, 1:] != segmentation[:, :-1]
        edge[1:, :] |= segmentation[1:, :] != segmentation[:-1, :]
        out[edge & inside] = 255.0
    image = Image.fromarray(out.clip(0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    anchors = _label_anchors(segmentation)
    for segment in segments:
        if segment["id"] not in anchors:
            continue
        cy, cx = anchors[segment["id"]]
        text = segment["label"] if segment.get("score") is None else f"{segment['label']} {segment['score']:.2f}"
        left, top, right, bottom = draw.textbbox((cx, cy), text, anchor="mm")
        dx = max(0, 2 - left) - max(0, right + 2 - image.width)  # keep the label inside the image
        dy = max(0, 1 - top) - max(0, bottom + 1 - image.height)
        draw.rectangle((left + dx - 2, top + dy - 1, right + dx + 2, bottom + dy + 1), fill=(0, 0, 0))
        draw.text((cx + dx, cy + dy), text, fill=(255, 255, 255), anchor="mm")
    return image


def _label_anchors(segmentation: np.ndarray) -> dict[int, tuple[int, int]]:
    """segment id -> a pixel of the segment to put its label on: the centroid when the segment holds it,
    else the segment's middle pixel in row-major order. One sort of the map, whatever the segment count."""
    flat = segmentation.ravel().astype(np.int64) + 1
    counts = np.bincount(flat)
    width = segmentation.shape[1]
    rows, cols = np.divmod(np.arange(flat.size), width)
    sum_rows, sum_cols = np.bincount(flat, weights=rows), np.bincount(flat, weights=cols)
    order = np.argsort(flat, kind="stable")  # pixels grouped by segment, row-major inside a group
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    anchors = {}
    for value in np.nonzero(counts)[0]:
        if value == 0:  # no segment
            continue
        cy, cx = int(sum_rows[value] / counts[value]), int(sum_cols[value] / counts[value])
        if flat[cy * width + cx] != value:  # concave or split: the middle pixel instead
            cy, cx = divmod(int(order[starts[value] + counts[value] // 2]), width)
        anchors[int(value) - 1] = (cy, cx)
    return anchors


def _atomic_save(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _owner(json_path: Path) -> str | None:
    """The source image recorded in an existing segments JSON (None if it cannot be read)."""
    try:
        with open(json_path, encoding="utf-8") as f:
            return json.load(f).get("image")
    except (OSError, ValueError, AttributeError):
        return None


def output_base(out_dir: Path, item: InputImage) -> Path:
    """Where this image's files go: out/NAME, unless files there belong to another image."""
    base = out_dir / item.name
    existing = [base.with_name(base.name + s) for s in OUTPUT_SUFFIXES if base.with_name(base.name + s).exists()]
    if existing and _owner(base.with_name(base.name + ".segments.json")) != str(item.path):
        digest = hashlib.sha1(str(item.path).encode()).hexdigest()[:8]
        base = base.with_name(f"{base.name}-{digest}")
    return base


def done_before(out_dir: Path, item: InputImage) -> bool:
    base = output_base(out_dir, item)
    return all(base.with_name(base.name + s).exists() for s in OUTPUT_SUFFIXES) and \
        _owner(base.with_name(base.name + ".segments.json")) == str(item.path)


def segments_table(task: str, result: Any, segmentation: np.ndarray, id2label: dict[int, str]) -> list[dict[str, Any]]:
    """The JSON rows: id, label_id, label, score (None for semantic), area (visible pixels)."""
    if task == "semantic":
        areas = np.bincount(segmentation.ravel(), minlength=1)
        return [{"id": int(c), "label_id": int(c), "label": id2label.get(int(c), str(c)), "score": None,
                 "area": int(areas[c])} for c in np.nonzero(areas)[0]]
    areas = np.bincount(segmentation.ravel() + 1)
    rows = []
    for info in result["segments_info"]:
        sid, label = int(info["id"]), int(info["label_id"])
        rows.append({"id": sid, "label_id": label, "label": id2label.get(label, str(label)), "score": info["score"],
                     "area": int(areas[sid + 1]) if sid + 1 < len(areas) else 0})
    return rows


def write_outputs(out_dir: Path, item: InputImage, photo: np.ndarray, segmentation: np.ndarray,
                  segments: list[dict[str, Any]], task: str, model: str, overlay: bool = True) -> Path:
    """Write the three files of one image (label PNG, overlay PNG, JSON last); returns the base path."""
    base = output_base(out_dir, item)
    base.parent.mkdir(parents=True, exist_ok=True)
    labels_path = base.with_name(base.name + ".labels.png")  # semantic: segment id = class id
    _atomic_save(labels_path, lambda p: label_image(segmentation).save(p, format="PNG"))
    overlay_path = base.with_name(base.name + ".overlay.png")
    if overlay:
        _atomic_save(overlay_path, lambda p: overlay_image(photo, segmentation, segments).save(p, format="PNG"))
    record = {
        "image": str(item.path),
        "task": task,
        "model": model,
        "height": int(segmentation.shape[0]),
        "width": int(segmentation.shape[1]),
        "labels_png": labels_path.name,
        "labels_png_values": "segment id + 1 (0: no segment)",
        "overlay_png": overlay_path.name if overlay else None,
        "segments": segments,
    }

    def write_json(p: Path) -> None:
        with open(p, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.write("\n")

    _atomic_save(base.with_name(base.name + ".segments.json"), write_json)
    return base


def use_cuda_graphs(choice: str, device: torch.device) -> bool:
    """Whether ``--cuda-graphs`` CHOICE runs the forwards as CUDA graphs on ``device``: ``auto`` on CUDA (an
    eager EoMT-L/640 forward measured 22-37 ms at batch 1 on an H200 and its graph 5.1 ms: the eager
    forward is bound by the host launching Triton kernels), ``on`` anywhere CUDA is (else a ValueError),
    ``off`` never."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"--cuda-graphs must be auto, on or off, got {choice!r}")
    if choice == "on" and device.type != "cuda":
        raise ValueError(f"--cuda-graphs on needs a CUDA device, got {device}")
    return choice != "off" and device.type == "cuda"


def forward_fixed_batches(model, pixel_values: torch.Tensor, patch_offsets, batch_size: int):
    """The model on ``pixel_values`` in forwards of exactly ``batch_size`` inputs (the last one padded with
    copies of its last input). A GEMM's rows do not depend on the other rows of the same shape, but can
    change in the last bits with the number of rows; fixed shapes make each image's result independent
    of its batch companions, so a sharded run (torchrun) writes the same files as a single run."""
    from .model import EomtFastOutput

    masks, classes = [], []
    for start in range(0, pixel_values.shape[0], batch_size):
        chunk = pixel_values[start:start + batch_size]
        count = chunk.shape[0]
        if count < batch_size:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch_size - count, -1, -1, -1)])
        out = model(chunk, output_hidden_states=False, output_attentions=False, return_dict=True)  # not config.json's
        masks.append(out.masks_queries_logits[:count])
        classes.append(out.class_queries_logits[:count])
    return EomtFastOutput(class_queries_logits=torch.cat(classes), masks_queries_logits=torch.cat(masks),
                          patch_offsets=patch_offsets)


# ---- progress --------------------------------------------------------------------------------------------
class Progress:
    """One stderr line: a carriage-return bar on a terminal, a line every few seconds otherwise."""

    def __init__(self, total: int, prefix: str, enabled: bool) -> None:
        self.total, self.prefix, self.enabled = total, prefix, enabled and total >= PROGRESS_MIN_IMAGES
        self.done = self.failed = 0
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def report(self, message: str) -> None:
        """A message on its own line (not glued to a carriage-return bar)."""
        print(("\n" if self.enabled and self.tty and self.done + self.failed else "") + message, file=sys.stderr,
              flush=True)

    def update(self, done: int = 0, failed: int = 0) -> None:
        self.done += done
        self.failed += failed
        now = time.perf_counter()
        finished = self.done + self.failed >= self.total
        if not self.enabled or (not finished and now - self.last < (0.2 if self.tty else 5.0)):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        width = 24
        filled = int(width * (self.done + self.failed) / max(self.total, 1))
        line = (f"{self.prefix}[{'#' * filled}{'.' * (width - filled)}] {self.done + self.failed}/{self.total} images"
                f"{f', {self.failed} skipped' if self.failed else ''}, {rate:.1f} img/s")
        print(("\r" + line) if self.tty else line, end="\n" if finished or not self.tty else "", file=sys.stderr,
              flush=True)


# ---- the command -----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS",
                        help="image files, or folders searched recursively for images")
    parser.add_argument("--model", default=None,
                        help="model directory (config.json + weights) or Hub id (default: the bundled model "
                             "trained on generated scenes of shapes and textures, 128 px)")
    parser.add_argument("--revision", default=None,
                        help="with a Hub id: the branch, tag or commit to load (default: main)")
    parser.add_argument("--task", default="panoptic", choices=["panoptic", "instance", "semantic"])
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK when CUDA is present, else cpu)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                        help="replay the forward as CUDA graphs (every forward has --batch-size inputs, so one "
                             "graph a model input size); auto: on a CUDA device (default)")
    parser.add_argument("--threshold", type=float, default=0.8, help="minimum segment score (panoptic, instance)")
    parser.add_argument("--mask-threshold", type=float, default=0.5, help="mask probability threshold (panoptic)")
    parser.add_argument("--overlap-threshold", type=float, default=0.8,
                        help="overlap_mask_area_threshold: kept share of a query's mask (panoptic)")
    parser.add_argument("--stuff-classes", type=int, nargs="*", default=None,
                        help="label ids whose queries are fused into one segment (panoptic; default: none, "
                             "the stripes/checker/dots classes for the bundled model)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="threads that read and write images")
    parser.add_argument("--skip-existing", action="store_true",
                        help="skip images whose outputs in --out are complete (resume an interrupted run)")
    parser.add_argument("--no-overlay", action="store_true", help="write only the label PNG and the JSON")
    parser.add_argument("--no-progress", action="store_true")


def _read_all(items: list[InputImage], pool: ThreadPoolExecutor, ahead: int) -> Iterator[tuple[InputImage, Any]]:
    """(item, array or the exception) in order, reading up to ``ahead`` images in advance."""
    pending: list[tuple[InputImage, Future]] = []
    queue = iter(items)
    for item in queue:
        pending.append((item, pool.submit(read_image, item.path)))
        if len(pending) >= ahead:
            break
    while pending:
        item, future = pending.pop(0)
        nxt = next(queue, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(read_image, nxt.path)))
        try:
            yield item, future.result()
        except Exception as exc:  # unreadable: reported by the caller, never fatal
            yield item, exc


def run(args: argparse.Namespace) -> int:
    try:
        _require_pillow()
    except ImportError as exc:  # the command line reports RuntimeErrors as one line
        raise RuntimeError(str(exc)) from None
    from .checkpoint import default_model_dir
    from .model import EomtFastForUniversalSegmentation
    from .processing import EomtFastImageProcessor

    if args.model is None:
        from .scenes import STUFF_IDS

        args.model = default_model_dir()
        if args.stuff_classes is None:
            args.stuff_classes = list(STUFF_IDS)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    rank, world, local_rank = distributed_env()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    out_dir = Path(args.out).expanduser()
    items, missing = collect_inputs(args.inputs, exclude=out_dir)
    if not items:
        raise FileNotFoundError(f"no image files in {' '.join(map(str, args.inputs))} "
                                f"(extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})")
    if rank == 0:
        for argument in missing:
            print(f"eomt-fast segment: skipped {argument}: no such file or folder", file=sys.stderr)
    # Every forward gets exactly `batch` inputs, a number all processes agree on (see forward_fixed_batches).
    batch_size = min(args.batch_size, len(items))
    mine = items[rank::world]
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.skip_existing:
        mine = [item for item in mine if not done_before(out_dir, item)]

    device = pick_device(args.device, local_rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = EomtFastForUniversalSegmentation.from_pretrained(args.model, device=device, dtype=args.dtype,
                                                             backend=args.backend, revision=args.revision,
                                                             cuda_graphs=False)  # enabled just below, or not
    if use_cuda_graphs(args.cuda_graphs, device):
        # forward_fixed_batches asks for no hidden states or attentions, whatever config.json says
        model.config.extra.update(output_hidden_states=False, output_attentions=False)
        model.enable_cuda_graphs()
    processor = EomtFastImageProcessor.from_pretrained(args.model, task=args.task, device=device,
                                                       revision=args.revision)
    if processor.do_split_image and args.task != "semantic":
        raise ValueError(f"{args.model} cuts images into sliding windows (a semantic checkpoint, per its "
                         f"preprocessor_config.json): use --task semantic")
    id2label = model.config.id2label
    progress = Progress(len(mine), prefix, enabled=not args.no_progress)
    failures = len(missing) if rank == 0 else 0
    workers = max(1, args.workers)

    def post_process(outputs, sizes):
        if args.task == "semantic":
            return processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
        if args.task == "instance":
            return processor.post_process_instance_segmentation(outputs, target_sizes=sizes, threshold=args.threshold)
        return processor.post_process_panoptic_segmentation(
            outputs, target_sizes=sizes, threshold=args.threshold, mask_threshold=args.mask_threshold,
            overlap_mask_area_threshold=args.overlap_threshold, stuff_classes=args.stuff_classes)

    def finish(item: InputImage, photo: np.ndarray, result: Any, segmentation: np.ndarray) -> None:
        rows = segments_table(args.task, result, segmentation, id2label)
        write_outputs(out_dir, item, photo, segmentation, rows, args.task, str(args.model), overlay=not args.no_overlay)

    writes: list[tuple[InputImage, Future]] = []

    def reap(block: bool) -> None:
        nonlocal failures
        keep = []
        for item, future in writes:
            if not block and not future.done():
                keep.append((item, future))
                continue
            try:
                future.result()
                progress.update(done=1)
            except Exception as exc:
                failures += 1
                progress.update(failed=1)
                progress.report(f"{prefix}eomt-fast segment: could not write the outputs of {item.path}: {exc}")
        writes[:] = keep

    with ThreadPoolExecutor(workers, thread_name_prefix="eomt-read") as readers, \
            ThreadPoolExecutor(workers, thread_name_prefix="eomt-write") as writers:
        batch: list[tuple[InputImage, np.ndarray]] = []

        def flush() -> None:
            if not batch:
                return
            inputs = processor.preprocess([photo for _, photo in batch], dtype=model.dtype)
            with torch.inference_mode():
                outputs = forward_fixed_batches(model, inputs.pixel_values, inputs.patch_offsets, batch_size)
                results = post_process(outputs, inputs.target_sizes)
            for (item, photo), result in zip(batch, results):
                labels = result if args.task == "semantic" else result["segmentation"]
                labels = labels.to(torch.int32).cpu().numpy()  # one device-to-host copy per image, int32
                writes.append((item, writers.submit(finish, item, photo, result, labels)))
            batch.clear()
            reap(block=len(writes) > 4 * batch_size)

        for item, photo in _read_all(mine, readers, ahead=2 * batch_size + workers):
            if isinstance(photo, BaseException):
                failures += 1
                progress.update(failed=1)
                progress.report(f"{prefix}eomt-fast segment: skipped {item.path}: cannot read it as an image "
                                f"({type(photo).__name__}: {photo})")
                continue
            batch.append((item, photo))
            if len(batch) == batch_size:
                flush()
        flush()
        reap(block=True)
    print(f"{prefix}eomt-fast segment: {progress.done} image(s) segmented into {out_dir}"
          f"{f', {failures} skipped' if failures else ''}", file=sys.stderr)
    # Exit status 1 says that inputs were skipped; not under torchrun, whose agent stops every other
    # process of the job as soon as one exits with a non-zero status.
    return 1 if failures and world == 1 else 0
