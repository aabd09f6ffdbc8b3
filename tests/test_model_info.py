"""`galaxalign-batch info MODEL`: what a weight file is, and the lineage a fine-tuned model keeps of the
foundation it started from (the stretches that foundation saw reach `embed`'s warning)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from galaxalign_batch.cli import main

FOUNDATION = Path(__file__).resolve().parent.parent / "galaxalign_batch" / "data" / "foundation-tiny.safetensors"


def _info(capsys, *args):
    rc = main(["info", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    from galaxalign_batch.model.pretrain import expand_foundation

    out = tmp_path_factory.mktemp("foundation") / "model.safetensors"
    expand_foundation(FOUNDATION, out)
    return out


def test_the_shipped_compact_foundation_describes_itself(capsys):
    rc, out, _ = _info(capsys, FOUNDATION)
    assert rc == 0
    assert "compact foundation file" in out and "pretrain --expand" in out
    # what it was pretrained on, without labels, and the stretches its views were drawn in
    assert "sources of 8 tile(s), no labels" in out
    assert "stretch lupton, also saw gz-decals (pretrain --stretch-augment)" in out
    rc, out, _ = _info(capsys, "--json", FOUNDATION)
    d = json.loads(out)
    assert d["kind"] == "compact foundation" and d["description"]["pretraining"]["config"]["stretch_augment"] == ["gz-decals"]


def test_a_fine_tuned_model_keeps_its_lineage(expanded, tmp_path, capsys):
    from galaxalign_batch.engine.preflight import stretches_seen
    from galaxalign_batch.model.checkpoint import read_info, save_model
    from galaxalign_batch.model.train import TrainConfig, build_model

    tuned = build_model(TrainConfig(data="", out="", model=str(expanded.parent), mode="trimodal",
                                    stretch_augment=("asinh",)))
    tuned.info["training"] = {"mode": "trimodal", "data": "sky", "stretch_augment": ["asinh"], "seed": 3}
    path = save_model(tuned, tmp_path / "model.safetensors")
    *history, entry = read_info(path)["lineage"]   # oldest first: the foundation's own runs, then the foundation
    assert history == read_info(expanded).get("lineage", []) and all(a["made_by"] == "pretrain" for a in history)
    assert entry["path"] == str(expanded.resolve()) and entry["made_by"] == "pretrain"
    assert entry["weights_digest"] == read_info(expanded)["weights_digest"]
    assert entry["expanded_from"] == "foundation-tiny.safetensors" and entry["stretches"] == ["lupton", "gz-decals"]
    assert entry["sources"] > 1000 and entry["steps"] > 0
    # its own run's stretches and those its foundation saw without labels, told apart
    assert stretches_seen(str(path), {"kind": "checkpoint"}) == (("asinh",), ("lupton", "gz-decals"))
    rc, out, _ = _info(capsys, tmp_path)  # the folder is enough
    assert rc == 0 and "made by `train`" in out and "also trained on asinh (train --stretch-augment)" in out
    assert "its foundation also saw gz-decals (without labels)" in out
    assert f"started from  a foundation made by pretrain: {expanded.resolve()}" in out

    # a second fine-tuning adds a generation, oldest first
    again = build_model(TrainConfig(data="", out="", model=str(path), mode="image-text"))
    assert [a["made_by"] for a in again.info["lineage"]][len(history):] == ["pretrain", "train"]
    assert again.info["lineage"][-1]["path"] == str(path.resolve())


def test_heads_and_other_files(tmp_path, capsys):
    from safetensors.numpy import save_file

    from galaxalign_batch.fewshot import fit_head
    from galaxalign_batch.restoration.head import DenoiseHead, HeadConfig, save_head

    rng = np.random.default_rng(0)
    head = fit_head(rng.normal(size=(12, 8)).astype(np.float32), np.repeat([0, 1], 6), ["ring", "no-ring"],
                    source={"store": "sky.zarr", "model": {"name": "tri", "id": "abc"}}, validate=False)
    head.save(tmp_path / "rings.safetensors")
    save_head(DenoiseHead(HeadConfig(width=4)), tmp_path / "denoise.safetensors")
    from galaxalign_batch.detection.files import save_detector
    from galaxalign_batch.detection.head import DetectionHead, DetectorConfig

    save_detector(DetectionHead(DetectorConfig()), tmp_path / "det.safetensors", {"training": {"steps": 7}})
    rc, out, _ = _info(capsys, tmp_path / "rings.safetensors", tmp_path / "denoise.safetensors",
                       tmp_path / "det.safetensors")
    assert rc == 0
    assert "source detector (`detect --model FILE`) (centernet)" in out and "steps 7" in out
    assert "few-shot head" in out and "2: ring, no-ring" in out and "store sky.zarr, model tri (abc)" in out
    assert "denoising head (`restore --model FILE`)" in out

    # not ours, not safetensors, missing: one error line each, the others still described, exit 1
    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "notes.txt").write_text("hello")
    rc, out, err = _info(capsys, tmp_path / "other.safetensors", tmp_path / "notes.txt", tmp_path / "missing",
                         FOUNDATION)
    assert rc == 1 and "compact foundation file" in out
    assert "none of galaxalign-batch's" in err and "not a safetensors file" in err and "no such model file" in err


def test_a_compact_foundation_given_as_a_checkpoint_says_expand_it():
    from galaxalign_batch.errors import ConfigError
    from galaxalign_batch.model.checkpoint import read_info

    with pytest.raises(ConfigError, match="a compact foundation file: expand it into a checkpoint first"):
        read_info(FOUNDATION)


def test_a_store_says_what_it_holds(tmp_path, capsys):
    from galaxalign_batch.store import EmbeddingStore

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 8)).astype(np.float32)
    rows = {"object_id": np.array([f"t1/{i}" for i in range(3)]), "ra": np.array([150.0, 150.1, 150.2]),
            "dec": np.array([2.0, 2.1, 2.2]), "tile": np.array(["t1"] * 3), "x": np.zeros(3, np.float32),
            "y": np.zeros(3, np.float32), "masked_fraction": np.zeros(3, np.float32),
            "embedding": emb / np.linalg.norm(emb, axis=1, keepdims=True)}
    store = EmbeddingStore.create(tmp_path / "s.zarr", 8, attrs={
        "model": {"kind": "checkpoint", "name": "model.safetensors", "id": "abc", "mode": "trimodal"},
        "model_path": "/runs/tri/model.safetensors", "cutout_spec": {"angular_size": 32.0, "out_size": 64,
                                                                      "stretch": "gz-decals"},
        "model_cutout_spec": {"stretch": "lupton"}, "precisions": ["bf16"], "warnings": ["--stretch gz-decals: ..."]})
    store.commit([("t1", rows, ""), ("bad", None, "bad.fits: truncated FITS file")])
    rc, out, _ = _info(capsys, tmp_path / "s.zarr")
    assert rc == 0
    assert "embedding store, format 2, not complete" in out
    assert "3 rows of 8-d float16 embeddings from 1 tile(s), 1 failed" in out
    assert "/runs/tri/model.safetensors (checkpoint, id abc, mode trimodal)" in out
    assert "stretch gz-decals (the model's: lupton), model in bf16" in out and "warning" in out


def test_epochs_line_for_every_mode():
    from galaxalign_batch.model.describe import _epochs

    # a baseline without --epochs runs as many as both tri-modal stages (it printed "None epoch(s)")
    assert _epochs({"mode": "image-text", "epochs": None, "epochs_stage1": 6, "epochs_stage2": 6,
                    "align_epochs": 4}) == "align 4 + 12 epoch(s)"
    assert _epochs({"mode": "trimodal", "epochs": None, "epochs_stage1": 9, "epochs_stage2": 9}) == \
        "stage 1 9 + stage 2 9 epoch(s)"
    assert _epochs({"mode": "image-only", "epochs": 8, "align_epochs": 2}) == "align 2 + 8 epoch(s)"
