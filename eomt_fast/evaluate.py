"""Panoptic quality (PQ) of a model on generated scenes: ``eomt-fast evaluate``.

PQ follows the COCO panoptic definition (Kirillov et al., 2019): per class, a predicted and a ground-truth
segment match when their IoU exceeds 0.5 (such matches are unique); PQ_c = sum of matched IoUs /
(TP + FP/2 + FN/2). PQ is the mean over the classes that occur (in ground truth or prediction); PQ_th and
PQ_st the means over thing and stuff classes; SQ and RQ split PQ into the matched IoU and the F1 of
matching. Pixels a prediction leaves unassigned (-1) belong to no predicted segment. The generated scenes
have no void pixels, so unions are plain unions.

Beside PQ, a confusion table separates finding a segment from naming it: each ground-truth segment is
matched to the predicted segment of any class with IoU > 0.5 (unique, as above) and counted under that
segment's class, or under "missed" when there is none. Large off-diagonal counts mean segments drawn
but misnamed; a large "missed" column, segments not drawn (or scored below the threshold).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import scenes as scene_lib

MISSED = -1  # the confusion table's column for ground-truth segments no prediction matches


@dataclass
class ClassCounts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0

    @property
    def occurs(self) -> bool:
        return self.tp + self.fp + self.fn > 0

    @property
    def pq(self) -> float:
        return self.iou / (self.tp + 0.5 * self.fp + 0.5 * self.fn) if self.occurs else float("nan")

    @property
    def sq(self) -> float:
        return self.iou / self.tp if self.tp else 0.0

    @property
    def rq(self) -> float:
        return self.tp / (self.tp + 0.5 * self.fp + 0.5 * self.fn) if self.occurs else float("nan")


@dataclass
class PanopticQuality:
    per_class: dict[int, ClassCounts] = field(default_factory=dict)
    thing_ids: tuple[int, ...] = scene_lib.THING_IDS
    class_names: dict[int, str] = field(default_factory=lambda: dict(scene_lib.ID2LABEL))
    images: int = 0
    # (true class, predicted class or MISSED) -> ground-truth segments matched at IoU > 0.5 regardless of class
    confusion: dict[tuple[int, int], int] = field(default_factory=dict)

    def _mean(self, ids: Sequence[int], attribute: str) -> float:
        values = [getattr(self.per_class[c], attribute) for c in ids if c in self.per_class and self.per_class[c].occurs]
        return float(np.mean(values)) if values else float("nan")

    def _classes(self, things: bool | None) -> list[int]:
        return [c for c in sorted(self.per_class) if things is None or (c in self.thing_ids) == things]

    @property
    def pq(self) -> float:
        return self._mean(self._classes(None), "pq")

    @property
    def pq_things(self) -> float:
        return self._mean(self._classes(True), "pq")

    @property
    def pq_stuff(self) -> float:
        return self._mean(self._classes(False), "pq")

    @property
    def sq(self) -> float:
        return self._mean(self._classes(None), "sq")

    @property
    def rq(self) -> float:
        return self._mean(self._classes(None), "rq")

    def add(self, predicted: np.ndarray, predicted_labels: dict[int, int], truth: np.ndarray,
            true_labels: dict[int, int]) -> None:
        """One image: segment-id maps (predicted -1 = unassigned) and each segment id's class."""
        if predicted.shape != truth.shape:
            raise ValueError(f"prediction shape {predicted.shape} != ground truth shape {truth.shape}")
        pred_ids = sorted(predicted_labels)
        true_ids = sorted(true_labels)
        pred_index = np.full(predicted.shape, len(pred_ids), dtype=np.int64)  # last column: unassigned
        for j, sid in enumerate(pred_ids):
            pred_index[predicted == sid] = j
        unknown = np.setdiff1d(np.unique(predicted), np.array(pred_ids + [-1]))
        if unknown.size:
            raise ValueError(f"segment ids {unknown.tolist()} in the prediction have no class")
        true_index = np.searchsorted(np.array(true_ids), truth)
        if not np.array_equal(np.array(true_ids)[np.clip(true_index, 0, len(true_ids) - 1)], truth):
            raise ValueError("ground truth holds segment ids without a class")
        width = len(pred_ids) + 1
        inter = np.bincount((true_index * width + pred_index).ravel(),
                            minlength=len(true_ids) * width).reshape(len(true_ids), width)
        true_area = inter.sum(1)
        pred_area = inter[:, :-1].sum(0)
        matched_true, matched_pred = set(), set()
        for i, tid in enumerate(true_ids):
            found = MISSED
            for j, pid in enumerate(pred_ids):
                iou = inter[i, j] / (true_area[i] + pred_area[j] - inter[i, j])  # a true segment has pixels
                if iou <= 0.5:
                    continue
                found = predicted_labels[pid]
                if true_labels[tid] == found:
                    counts = self.per_class.setdefault(true_labels[tid], ClassCounts())
                    counts.tp += 1
                    counts.iou += float(iou)
                    matched_true.add(i)
                    matched_pred.add(j)
            key = (true_labels[tid], found)
            self.confusion[key] = self.confusion.get(key, 0) + 1
        for i, tid in enumerate(true_ids):
            if i not in matched_true:
                self.per_class.setdefault(true_labels[tid], ClassCounts()).fn += 1
        for j, pid in enumerate(pred_ids):
            if j not in matched_pred and pred_area[j] > 0:
                self.per_class.setdefault(predicted_labels[pid], ClassCounts()).fp += 1
        self.images += 1

    def summary(self) -> dict[str, Any]:
        classes = {self.class_names.get(c, str(c)): {"pq": counts.pq, "sq": counts.sq, "rq": counts.rq,
                                                     "tp": counts.tp, "fp": counts.fp, "fn": counts.fn}
                   for c, counts in sorted(self.per_class.items())}
        confusion: dict[str, dict[str, int]] = {}
        for (true, found), n in sorted(self.confusion.items()):
            confusion.setdefault(self._name(true), {})[self._name(found)] = n
        return {"images": self.images, "pq": self.pq, "pq_things": self.pq_things, "pq_stuff": self.pq_stuff,
                "sq": self.sq, "rq": self.rq, "classes": classes, "confusion": confusion}

    def _name(self, c: int) -> str:
        return "missed" if c == MISSED else self.class_names.get(c, str(c))

    def confusion_table(self) -> str:
        """Rows: ground-truth classes; columns: the class of the predicted segment found at IoU > 0.5."""
        rows = sorted({t for t, _ in self.confusion})
        columns = sorted(set(rows) | {f for _, f in self.confusion} - {MISSED}) + [MISSED]
        width = max([8, *(len(self._name(c)) for c in rows + columns)])
        lines = ["found (IoU > 0.5, any class) as:",
                 " " * width + "".join(f" {self._name(c):>{width}}" for c in columns)]
        for t in rows:
            lines.append(f"{self._name(t):<{width}}" +
                         "".join(f" {self.confusion.get((t, c), 0):>{width}d}" for c in columns))
        return "\n".join(lines)

    def table(self) -> str:
        lines = [f"{'class':<10} {'PQ':>6} {'SQ':>6} {'RQ':>6} {'TP':>5} {'FP':>5} {'FN':>5}"]
        for c, counts in sorted(self.per_class.items()):
            lines.append(f"{self.class_names.get(c, str(c)):<10} {100 * counts.pq:6.1f} {100 * counts.sq:6.1f} "
                         f"{100 * counts.rq:6.1f} {counts.tp:5d} {counts.fp:5d} {counts.fn:5d}")
        lines.append(f"PQ {100 * self.pq:.1f}  (things {100 * self.pq_things:.1f}, stuff {100 * self.pq_stuff:.1f})"
                     f"  SQ {100 * self.sq:.1f}  RQ {100 * self.rq:.1f}  on {self.images} images")
        return "\n".join(lines)


@torch.no_grad()
def evaluate(model: Any, processor: Any, scenes: Sequence[scene_lib.Scene], batch_size: int = 16,
             threshold: float = 0.8, seed: int = 0) -> PanopticQuality:
    """PQ of ``model`` (ours or transformers') on ``scenes``, post-processed with the stuff classes fused.
    ``seed`` seeds torch's RNG first: a model whose ``attn_mask_probs`` lie strictly between 0 and 1
    draws which queries are masked from it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    torch.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    result = PanopticQuality()
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        inputs = processor.preprocess([s.image for s in chunk], dtype=dtype)
        outputs = model(pixel_values=inputs.pixel_values, output_hidden_states=False, output_attentions=False,
                        return_dict=True)  # whatever config.json says
        panoptic = processor.post_process_panoptic_segmentation(
            outputs, target_sizes=inputs.target_sizes, threshold=threshold, stuff_classes=scene_lib.STUFF_IDS)
        for scene, pred in zip(chunk, panoptic):
            labels = {s["id"]: s["label_id"] for s in pred["segments_info"]}
            truth = {s["id"]: s["category_id"] for s in scene.segments}
            result.add(pred["segmentation"].cpu().numpy(), labels, scene.panoptic, truth)
    return result


# ---- the command -----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="model directory or Hub id, trained on generated scenes (default: the bundled "
                             "default model)")
    parser.add_argument("--revision", default=None,
                        help="with a Hub id: the branch, tag or commit to load (default: main)")
    parser.add_argument("--count", type=int, default=200, help="held-out scenes to evaluate on")
    parser.add_argument("--seed", type=int, default=scene_lib.HELD_OUT_SEED,
                        help=f"scene stream (default {scene_lib.HELD_OUT_SEED}, the held-out set; training uses "
                             f"{scene_lib.TRAIN_SEED})")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--threshold", type=float, default=0.8, help="minimum segment score")
    parser.add_argument("--json", default=None, help="also write the summary to this JSON file")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import default_model_dir
    from .model import EomtFastForUniversalSegmentation
    from .processing import EomtFastImageProcessor

    if args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    model_dir = args.model or default_model_dir()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = EomtFastForUniversalSegmentation.from_pretrained(model_dir, device=device, dtype=args.dtype,
                                                             backend=args.backend, revision=args.revision)
    if model.config.num_labels != scene_lib.NUM_CLASSES:
        raise ValueError(f"{model_dir} predicts {model.config.num_labels} classes; models for generated scenes "
                         f"predict {scene_lib.NUM_CLASSES} ({', '.join(scene_lib.CLASS_NAMES)})")
    processor = EomtFastImageProcessor.from_pretrained(model_dir, device=device, revision=args.revision)
    size = model.config.image_size
    started = time.perf_counter()
    result = evaluate(model, processor, scene_lib.make_scenes(args.count, args.seed, size), args.batch_size,
                      args.threshold)
    seconds = time.perf_counter() - started
    print(f"model {model_dir} on {device} ({str(model.dtype).removeprefix('torch.')}, backend {model.backend}), "
          f"{args.count} scenes of seed {args.seed}, {seconds:.1f} s")
    print(result.table())
    print(result.confusion_table())
    if args.json:
        summary = {"model": str(model_dir), "seed": args.seed, "device": str(device), "dtype": str(model.dtype),
                   "backend": model.backend, **result.summary()}
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="eomt-fast evaluate")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
