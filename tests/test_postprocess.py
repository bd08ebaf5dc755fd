"""transformers' EomtImageProcessor post-processing gives identical results on our outputs."""

import numpy as np
import pytest
import torch

from eomt_fast import EomtFastForUniversalSegmentation
from eomt_fast.testing import TEST_CONFIGS, random_hf_model

pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def models():
    hf = random_hf_model(seed=11, dtype=torch.float64, attn_mask_probs=[1.0, 0.0], **TEST_CONFIGS["small_r4"])
    with torch.no_grad():  # random weights predict "no object" everywhere; make real classes win
        hf.class_predictor.bias[-1] -= 10.0
        hf.class_predictor.weight.mul_(5.0)
    return hf, EomtFastForUniversalSegmentation.from_hf(hf)


def processor(size=None, **kwargs):
    from transformers import EomtImageProcessor

    return EomtImageProcessor(size=size or {"shortest_edge": 64, "longest_edge": 64}, **kwargs)


def assert_same_segments(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a["segmentation"], b["segmentation"])
        assert a["segments_info"] == b["segments_info"]


@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_panoptic_and_instance(models, task):
    hf, ours = models
    proc = processor(do_pad=True)
    pics = images([(50, 64), (64, 40)])
    inputs = proc(images=pics, return_tensors="pt")
    pixel_values = inputs["pixel_values"].double()
    sizes = [(p.height, p.width) for p in pics]
    post = getattr(proc, f"post_process_{task}_segmentation")
    kwargs = {"threshold": 0.0}
    if task == "panoptic":
        kwargs.update(stuff_classes=[1, 3], overlap_mask_area_threshold=0.0)  # random masks overlap a lot
    theirs = post(hf(pixel_values), target_sizes=sizes, **kwargs)
    got = post(ours(pixel_values), target_sizes=sizes, **kwargs)
    assert any(r["segments_info"] for r in theirs), "the test needs some segments to compare"
    assert_same_segments(got, theirs)


def test_semantic_with_sliding_windows(models):
    hf, ours = models
    proc = processor(size={"shortest_edge": 64}, do_split_image=True)
    pics = images([(64, 150), (90, 64)], seed=1)
    inputs = proc(images=pics, return_tensors="pt")
    assert inputs["pixel_values"].shape[0] > len(pics)  # several windows per image
    pixel_values, offsets = inputs["pixel_values"].double(), inputs["patch_offsets"]
    sizes = [(p.height, p.width) for p in pics]
    theirs = proc.post_process_semantic_segmentation(hf(pixel_values, patch_offsets=offsets), target_sizes=sizes)
    got = proc.post_process_semantic_segmentation(ours(pixel_values, patch_offsets=offsets), target_sizes=sizes)
    for a, b in zip(got, theirs):
        assert a.shape == b.shape
        assert torch.equal(a, b)
