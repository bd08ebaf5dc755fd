"""The generated panoptic scenes and the PQ metric (no model involved)."""

from __future__ import annotations

import numpy as np
import pytest

from eomt_fast import scenes
from eomt_fast.evaluate import PanopticQuality


def test_scene_is_deterministic_and_seeded():
    a, b = scenes.make_scene(7, seed=3), scenes.make_scene(7, seed=3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.panoptic, b.panoptic)
    assert a.segments == b.segments
    c = scenes.make_scene(7, seed=4)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(scenes.make_scene(8, seed=3).image, a.image)


@pytest.mark.parametrize("index", range(25))
def test_scene_ground_truth_is_consistent(index):
    scene = scenes.make_scene(index, seed=11)
    size = scenes.DEFAULT_SIZE
    assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
    assert scene.panoptic.shape == (size, size)
    ids = [s["id"] for s in scene.segments]
    assert ids == list(range(1, len(ids) + 1))
    assert set(np.unique(scene.panoptic).tolist()) == set(ids)  # every pixel in exactly one segment
    for s in scene.segments:
        assert s["area"] == int((scene.panoptic == s["id"]).sum()) > 0
        assert s["isthing"] == (s["category_id"] in scenes.THING_IDS)
        if s["isthing"]:
            assert s["area"] >= scenes.MIN_THING_AREA
    stuff = [s["category_id"] for s in scene.segments if not s["isthing"]]
    assert len(stuff) == len(set(stuff)) >= 1  # one segment per stuff class present
    things = [s for s in scene.segments if s["isthing"]]
    assert 1 <= len(things) <= scenes.MAX_THINGS
    masks, classes = scene.targets()
    assert masks.shape == (len(ids), size, size) and classes.tolist() == [s["category_id"] for s in scene.segments]
    assert np.array_equal(masks.sum(0), np.ones((size, size)))


def test_scene_streams_cover_every_class():
    seen = {s["category_id"] for i in range(40) for s in scenes.make_scene(i, seed=scenes.HELD_OUT_SEED).segments}
    assert seen == set(range(scenes.NUM_CLASSES))


def test_scene_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 32"):
        scenes.make_scene(0, size=16)
    with pytest.raises(ValueError, match="count"):
        scenes.make_scenes(-1)


def _truth():
    truth = np.ones((10, 10), dtype=np.int32)  # segment 1: stuff class 4
    truth[0:4, 0:4] = 2  # a 16-pixel thing of class 0
    truth[6:10, 6:10] = 3  # a 16-pixel thing of class 1
    return truth, {1: 4, 2: 0, 3: 1}


def test_pq_perfect_prediction_is_one():
    truth, labels = _truth()
    pq = PanopticQuality()
    pq.add(truth.astype(np.int64) + 10, {k + 10: v for k, v in labels.items()}, truth, labels)  # ids may differ
    assert pq.pq == pytest.approx(1.0) and pq.sq == pytest.approx(1.0) and pq.rq == pytest.approx(1.0)
    assert pq.pq_things == pytest.approx(1.0) and pq.pq_stuff == pytest.approx(1.0)


def test_pq_counts_partial_missing_and_wrong_segments():
    truth, labels = _truth()
    predicted = np.full((10, 10), -1, dtype=np.int64)
    predicted[truth == 1] = 0  # stuff exactly right
    predicted[0:4, 0:3] = 5  # thing 2 with 12 of its 16 pixels: IoU 0.75
    predicted[6:10, 6:10] = 6  # thing 3 found but with the wrong class: FP for class 0 and FN for class 1
    pq = PanopticQuality()
    pq.add(predicted, {0: 4, 5: 0, 6: 0}, truth, labels)
    c = pq.per_class
    assert (c[4].tp, c[4].fp, c[4].fn) == (1, 0, 0) and c[4].pq == pytest.approx(1.0)
    assert (c[0].tp, c[0].fp, c[0].fn) == (1, 1, 0) and c[0].pq == pytest.approx(0.75 / 1.5)
    assert (c[1].tp, c[1].fp, c[1].fn) == (0, 0, 1) and c[1].pq == 0.0
    assert pq.pq == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert pq.pq_things == pytest.approx(0.25) and pq.pq_stuff == pytest.approx(1.0)
    # found regardless of class: the stuff and thing 2 as themselves, thing 3 as a class-0 segment
    assert pq.confusion == {(4, 4): 1, (0, 0): 1, (1, 0): 1}
    assert pq.summary()["confusion"] == {"circle": {"circle": 1}, "square": {"circle": 1},
                                         "stripes": {"stripes": 1}}
    table = pq.confusion_table().splitlines()
    assert table[1].split() == ["circle", "square", "stripes", "missed"]
    assert table[2].split() == ["circle", "1", "0", "0", "0"] and table[3].split() == ["square", "1", "0", "0", "0"]


def test_pq_iou_of_one_half_does_not_match():
    truth, labels = _truth()
    predicted = truth.astype(np.int64).copy()
    predicted[0:4, 0:4] = 1  # give the thing's pixels to the stuff...
    predicted[0:2, 0:4] = 2  # ...except 8 of 16: IoU exactly 0.5
    pq = PanopticQuality()
    pq.add(predicted, {1: 4, 2: 0, 3: 1}, truth, labels)
    assert (pq.per_class[0].tp, pq.per_class[0].fp, pq.per_class[0].fn) == (0, 1, 1)
    assert pq.confusion[(0, -1)] == 1 and pq.summary()["confusion"]["circle"] == {"missed": 1}
    assert PanopticQuality().confusion_table().splitlines()[-1].split() == ["missed"]  # nothing evaluated yet


def test_pq_rejects_inconsistent_predictions():
    truth, labels = _truth()
    with pytest.raises(ValueError, match="no class"):
        PanopticQuality().add(truth.astype(np.int64), {1: 4, 2: 0}, truth, labels)
    with pytest.raises(ValueError, match="shape"):
        PanopticQuality().add(truth[:5].astype(np.int64), labels, truth, labels)
