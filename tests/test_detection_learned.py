"""The learned detectors (issue 16): box metrics against hand-made boxes, truth boxes, the head's
targets and decoding, and the head and the Faster R-CNN baseline trained a few steps on tiny simulated
fields, written and read back, and applied to tiles as catalogues in the documented format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from galaxalign_batch.detection.metrics import average_precision, box_iou, evaluate_boxes, match_boxes
from galaxalign_batch.errors import ConfigError

FOUNDATION = Path(__file__).resolve().parent.parent / "galaxalign_batch" / "data" / "foundation-tiny.safetensors"
CATALOGUE_COLUMNS = ["object_id", "tile", "ra", "dec", "x", "y", "box", "score", "flux_r"]


# ---------------------------------------------------------------------------------------------- metrics

def test_box_iou_of_hand_made_boxes():
    a = [[0, 0, 10, 10]]
    b = [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 5, 5]]
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 50 / 150, 0.0, 25 / 100]])
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 4)
    with pytest.raises(ConfigError):
        box_iou([[10, 0, 0, 10]], b)


def test_matching_takes_detections_by_score_and_each_truth_once():
    truth = [[0, 0, 10, 10], [20, 0, 30, 10]]
    det = [[1, 0, 11, 10],    # IoU 0.82 with truth 0, score 0.6
           [0, 0, 10, 10],    # IoU 1 with truth 0, score 0.9: taken first
           [21, 0, 31, 10],   # truth 1
           [50, 50, 60, 60]]  # nothing
    d2t, t2d = match_boxes(det, [0.6, 0.9, 0.5, 0.8], truth)
    assert d2t.tolist() == [-1, 0, 1, -1] and t2d.tolist() == [1, 2]
    d2t, _ = match_boxes([[0, 0, 10, 10]], [1.0], [[5, 0, 15, 10]])   # IoU 1/3 < 0.5
    assert d2t.tolist() == [-1]


def test_average_precision_all_point_interpolation():
    # ranked TP, FP, TP with 3 truths: precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3
    # -> monotone precision 1 up to 1/3, 2/3 up to 2/3: AP = 1/3 + 2/9
    assert average_precision([True, False, True], [0.9, 0.8, 0.7], 3) == pytest.approx(1 / 3 + 2 / 9)
    assert average_precision([True, True], [0.9, 0.1], 2) == pytest.approx(1.0)
    assert average_precision([False, True], [0.9, 0.1], 1) == pytest.approx(0.5)
    assert average_precision([], [], 2) == 0.0


def test_evaluate_boxes_with_an_ignored_truth():
    # field 0: two truths, one ignored (centred outside the field); detections hit both and one misses
    truths = [(np.array([[0, 0, 10, 10], [20, 0, 30, 10]]), np.array([False, True])),
              (np.array([[0, 0, 8, 8]]), np.array([False]))]
    dets = [(np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 40, 50, 50]]), np.array([0.9, 0.8, 0.2])),
            (np.zeros((0, 4)), np.zeros(0))]
    r = evaluate_boxes(dets, truths, score_threshold=0.5)
    assert r["n_truth"] == 2                     # the ignored box is not counted
    assert r["n_detections"] == 1 and r["true_positives"] == 1   # the match to the ignored box counts neither way
    assert r["precision"] == 1.0 and r["recall"] == 0.5 and r["f1"] == pytest.approx(2 / 3)
    assert r["ap"] == pytest.approx(0.5)          # TP at 0.9 then FP at 0.2: recall 1/2 at precision 1
    with pytest.raises(ConfigError):
        evaluate_boxes(dets[:1], truths)


def test_truth_boxes_follow_size_shape_and_psf():
    from galaxalign_batch.detection.fields import BOX_FACTOR, truth_boxes

    ps = 0.262
    ref = Table({"x": [10.0, 50.0], "y": [20.0, 60.0], "true_r_half": [0.0, 3.0], "psfsize_r": [1.3, 1.3],
                 "shape_e1": [0.0, 0.5], "shape_e2": [0.0, 0.0]})   # the galaxy: q = 1/3, major axis north-south
    b = truth_boxes(ref, ps)
    h = BOX_FACTOR * 0.65 / ps                                        # a star: 2 x FWHM/2
    np.testing.assert_allclose(b[0], [10 - h, 20 - h, 10 + h, 20 + h])
    hx, hy = (b[1, 2] - b[1, 0]) / 2, (b[1, 3] - b[1, 1]) / 2
    assert hy == pytest.approx(BOX_FACTOR * np.hypot(3.0, 0.65) / ps)
    assert hx == pytest.approx(BOX_FACTOR * np.hypot(1.0, 0.65) / ps)


def test_head_targets_decode_back_to_the_boxes():
    import torch

    from galaxalign_batch.detection.head import decode, targets

    boxes = np.array([[10.0, 12.0, 30.0, 40.0], [60.0, 60.0, 70.0, 70.0]])
    t = targets([boxes], 96, 96)
    logit = torch.logit(t["heat"].clamp(1e-4, 1 - 1e-4))
    (got, scores), = decode((logit, t["offset"], t["size"]), min_score=0.5)
    assert len(got) == 2 and np.all(scores > 0.99)
    order = np.argsort(got[:, 0])
    np.testing.assert_allclose(got[order], boxes, atol=1e-3)


# ---------------------------------------------------------------------------------------------- training, files, apply

@pytest.fixture(scope="module")
def tiny_sky(tmp_path_factory):
    from galaxalign_batch.simulate import simulate_survey

    root = tmp_path_factory.mktemp("det") / "sky"
    simulate_survey(root, bricks=1, size=256, seed=5, density=6000, stars=300, no_coverage=0)
    return root


@pytest.fixture(scope="module")
def tiny_fields(tiny_sky):
    from galaxalign_batch.detection.fields import cut_fields

    return cut_fields(tiny_sky, size=64)


def test_fields_have_truth_boxes_inside_them(tiny_fields):
    f = tiny_fields
    assert len(f) == 16 and f.images.shape == (16, 3, 64, 64) and f.sigma.shape == (16, 3)
    t = f.truth
    assert len(t) and np.all(np.asarray(t["x0"]) >= -0.5) and np.all(np.asarray(t["x1"]) <= 63.5)
    assert np.any(~np.asarray(t["inside"]))          # a source centred outside reaching in: ignored in evaluation
    sub = f.subset([3, 1])
    assert len(sub) == 2 and set(np.asarray(sub.truth["field"])) <= {0, 1}
    np.testing.assert_array_equal(sub.images[0], f.images[3])


def _check_catalogue(path: Path, n_tiles: int = 1) -> Table:
    t = Table.read(path)
    assert t.colnames == CATALOGUE_COLUMNS
    assert t["box"].shape[1:] == (4,)
    assert len(set(t["tile"])) <= n_tiles
    if len(t):
        b = np.asarray(t["box"])
        assert np.all(b[:, 2] >= b[:, 0]) and np.all(b[:, 3] >= b[:, 1])
        np.testing.assert_allclose(t["x"], (b[:, 0] + b[:, 2]) / 2, atol=1e-6)
        assert np.all((t["score"] >= 0.0) & (t["score"] <= 1.0))
        assert np.all(np.isfinite(t["ra"])) and np.all(np.isfinite(t["dec"]))
    return t


def test_head_trains_saves_and_writes_a_catalogue(tiny_sky, tiny_fields, tmp_path, torch_one_thread):
    from galaxalign_batch.detection import detect_tiles, load_detector, read_detector_info, save_detector
    from galaxalign_batch.model.tokens import load_token_encoder
    from galaxalign_batch.detection.evaluate import evaluate
    from galaxalign_batch.detection.head import predict
    from galaxalign_batch.detection.train import DetectTrainSettings, train_detector

    enc = load_token_encoder(FOUNDATION)
    s = DetectTrainSettings(steps=4, batch_size=4, width=8)
    r = train_detector("head", tiny_fields, s, encoder=enc, progress=False)
    assert len(r.losses) == 4 and all(np.isfinite(r.losses))
    path = save_detector(r.model, tmp_path / "head.safetensors", {"training": r.record(tiny_fields, s)})
    info = read_detector_info(path)
    assert info["kind"] == "centernet" and info["encoder"]["weights_digest"] == enc.weights_digest()
    assert info["training"]["fields"] == 16 and info["config"]["field"] == 64
    back = load_detector(path)
    a = predict(r.model, tiny_fields.images[:2], tiny_fields.sigma[:2])
    b = predict(back, tiny_fields.images[:2], tiny_fields.sigma[:2])
    for (ba, sa), (bb, sb) in zip(a, b):
        np.testing.assert_allclose(sa, sb, rtol=1e-5)
    ev = evaluate(a + predict(back, tiny_fields.images[2:], tiny_fields.sigma[2:]), tiny_fields, score_threshold=0.0)
    assert set(ev["box"]) >= {"precision", "recall", "f1", "ap"} and ev["position"]["totals"]["reference"] > 0
    summary = detect_tiles([str(tiny_sky)], path, tmp_path / "cat.fits", min_score=0.0)
    assert not summary.failed
    t = _check_catalogue(tmp_path / "cat.fits")
    assert len(t) and t.meta["DETECTOR"] == "centernet"
    with pytest.raises(ConfigError, match="exists"):
        detect_tiles([str(tiny_sky)], path, tmp_path / "cat.fits")
    # bf16 (what --precision auto runs where the CPU has AVX512-BF16): the head's scores move by thousandths
    # (measured on a 400-step head over the demo's 4 bricks: 779 boxes both ways, 99.7 % at IoU >= 0.9,
    # scores within 0.0033)
    c = predict(r.model, tiny_fields.images[:4], tiny_fields.sigma[:4], precision="bf16")
    full = predict(r.model, tiny_fields.images[:4], tiny_fields.sigma[:4])
    assert any(not np.array_equal(sa, sc) for (_, sa), (_, sc) in zip(full, c))  # bf16 did run
    for (_, sa), (_, sc) in zip(full, c):
        assert sc.dtype == np.float32 and abs(sa.max() - sc.max()) < 0.02
    for precision in ("fp32", "bf16"):
        detect_tiles([str(tiny_sky)], path, tmp_path / f"{precision}.fits", min_score=0.0, precision=precision)
        assert _check_catalogue(tmp_path / f"{precision}.fits").meta["PRECISN"] == precision


def test_budget_in_epochs_and_precision_settings():
    import torch

    from galaxalign_batch.detection.train import DetectTrainSettings, steps_for_epochs
    from galaxalign_batch.model.precision import resolve_precision

    assert steps_for_epochs(12, 1000, 8) == 1500 and steps_for_epochs(12, 100, 8) == 150
    assert steps_for_epochs(1, 5, 8) == 1 and steps_for_epochs(2.5, 10, 4) == 7
    with pytest.raises(ConfigError, match="budget"):
        steps_for_epochs(0, 10, 8)
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) in ("fp32", "bf16")
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp16")
    with pytest.raises(ConfigError, match="precision"):
        DetectTrainSettings(precision="half")


def test_bf16_training_and_the_step_callback(tiny_fields, torch_one_thread):
    """bf16 autocast trains both detectors (finite losses, fp32 weights kept) and ``on_step`` sees every step with
    the model, which is back in training mode afterwards (the callback may evaluate)."""
    import torch

    from galaxalign_batch.detection.head import predict
    from galaxalign_batch.detection.train import DetectTrainSettings, train_detector
    from galaxalign_batch.model.tokens import load_token_encoder

    enc = load_token_encoder(FOUNDATION)
    seen, modes = [], []

    def on_step(done, model):
        seen.append(done)
        modes.append(model.training)
        if done == 2:
            predict(model, tiny_fields.images[:2], tiny_fields.sigma[:2])   # switches to eval mode
            assert not model.training

    r = train_detector("head", tiny_fields, DetectTrainSettings(steps=3, batch_size=4, width=8, precision="bf16"),
                       encoder=enc, progress=False, on_step=on_step)
    assert seen == [1, 2, 3] and modes == [True, True, True]
    assert all(np.isfinite(r.losses)) and all(p.dtype == torch.float32 for p in r.model.trainable_parameters())
    r = train_detector("rcnn", tiny_fields.subset([0, 1]), DetectTrainSettings(steps=1, batch_size=2, precision="bf16"),
                       progress=False)
    assert np.isfinite(r.losses[0]) and all(p.dtype == torch.float32 for p in r.model.parameters())


def test_rcnn_baseline_trains_and_writes_a_catalogue(tiny_sky, tiny_fields, tmp_path, torch_one_thread):
    from galaxalign_batch.detection import detect_tiles, load_detector, save_detector
    from galaxalign_batch.detection.rcnn import RCNNDetector
    from galaxalign_batch.detection.train import DetectTrainSettings, train_detector

    r = train_detector("rcnn", tiny_fields.subset([0, 1]), DetectTrainSettings(steps=1, batch_size=2),
                       progress=False)
    assert len(r.losses) == 1 and np.isfinite(r.losses[0])
    path = save_detector(r.model, tmp_path / "rcnn.safetensors")
    assert isinstance(load_detector(path), RCNNDetector)
    detect_tiles([str(tiny_sky)], path, tmp_path / "cat.fits", window=64, margin=8, min_score=0.0, precision="bf16")
    assert _check_catalogue(tmp_path / "cat.fits").meta["PRECISN"] == "fp32"  # Faster R-CNN is applied in fp32


def test_detect_command_trains_and_applies(tiny_sky, tmp_path, torch_one_thread, cutouts_dir):
    from galaxalign_batch.cli import main

    det = tmp_path / "d.safetensors"
    assert main(["--no-progress", "detect", "--train", "--tiles", str(tiny_sky), "--model", str(FOUNDATION),
                 "--out", str(det), "--field", "64", "--epochs", "1", "--batch-size", "2", "--fields", "4",
                 "--precision", "fp32"]) == 0
    out = tmp_path / "c.fits"
    # a simulated brick and a real cube at 0.1"/px (resampled to the detector's 0.262"/px)
    assert main(["--no-progress", "detect", "--tiles", str(tiny_sky), str(cutouts_dir / "example_a.fits"),
                 "--model", str(det), "--out", str(out), "--min-score", "0"]) == 0
    t = _check_catalogue(out, n_tiles=2)
    cube = t[np.char.endswith(np.asarray(t["tile"]).astype(str), "example_a.fits")]
    assert np.all((cube["x"] > -1) & (cube["x"] < 424) & (cube["y"] > -1) & (cube["y"] < 424))
    assert main(["detect", "--tiles", str(tiny_sky), "--model", str(det), "--out", str(out)]) == 1  # exists
