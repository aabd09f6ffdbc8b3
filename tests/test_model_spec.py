"""One model-spec grammar and one identity (issue 17): galaxalign_batch.model.spec."""

from __future__ import annotations

import pytest

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model.spec import ModelSpec, model_identity, parse_model_spec


def test_grammar(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.safetensors").write_bytes(b"x")
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    assert parse_model_spec(str(tmp_path / "run")) == ModelSpec("checkpoint", str(tmp_path / "run"), None, str(tmp_path / "run"))
    assert parse_model_spec("a/b/model.safetensors").kind == "checkpoint"  # a file that is missing is still a checkpoint spec
    assert parse_model_spec("tiny") == ModelSpec("tiny", "galaxalign-tiny", None, "tiny")
    assert parse_model_spec("ViT-B-16:laion2b_s34b_b88k") == ModelSpec("open_clip", "ViT-B-16", "laion2b_s34b_b88k", "ViT-B-16:laion2b_s34b_b88k")
    spec = parse_model_spec(f"galaxalign-tiny:{weights}")
    assert (spec.kind, spec.name, spec.weights, spec.random_weights) == ("open_clip", "galaxalign-tiny", str(weights), False)
    # train's form: --model NAME --pretrained TAG is NAME:TAG; a bare NAME has random weights
    assert parse_model_spec("ViT-B-16", pretrained="openai") == ModelSpec("open_clip", "ViT-B-16", "openai", "ViT-B-16")
    assert parse_model_spec("galaxalign-tiny").random_weights
    assert parse_model_spec("tiny").random_weights and not parse_model_spec(str(tmp_path / "run")).random_weights


@pytest.mark.parametrize("text, pretrained, match", [
    ("", None, "empty"),
    ("ViT-B-16:", None, "after the colon"),
    ("ViT-B-16:openai", "openai", "second source"),
    ("tiny", "openai", "random weights"),
])
def test_grammar_errors(text, pretrained, match):
    with pytest.raises(ConfigError, match=match):
        parse_model_spec(text, pretrained=pretrained)


def test_a_folder_without_a_model_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="without model.safetensors"):
        parse_model_spec(str(tmp_path))
    with pytest.raises(ConfigError, match="pretrained"):
        (tmp_path / "model.safetensors").write_bytes(b"x")
        parse_model_spec(str(tmp_path), pretrained="openai")


def test_embed_and_classify_agree_on_a_checkpoint_identity(tmp_path):
    """The identity a store records (embed) is the one classify/search/fewshot compare against,
    whether the checkpoint is given as its file or its folder, and read with or without torch."""
    from galaxalign_batch.downstream.classify import checkpoint_identity
    from galaxalign_batch.engine.encoder import describe_model
    from galaxalign_batch.engine.encoder import model_identity as embed_identity
    from galaxalign_batch.model.checkpoint import save_model
    from galaxalign_batch.model.train import TrainConfig, build_model

    run = tmp_path / "run"
    run.mkdir()
    path = save_model(build_model(TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"))), run / "model.safetensors")
    by_header = embed_identity(str(path))
    assert by_header == describe_model(str(path))["identity"] == checkpoint_identity(path) == model_identity(str(path))
    assert by_header["kind"] == "checkpoint" and by_header["mode"] == "trimodal" and len(by_header["id"]) == 16
    assert model_identity(str(run))["id"] == by_header["id"]
    other = save_model(build_model(TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), seed=1)), tmp_path / "other.safetensors")
    assert model_identity(str(other))["id"] != by_header["id"]


def test_open_clip_identities(tmp_path):
    w = tmp_path / "w.bin"
    w.write_bytes(b"abc")
    a = model_identity(f"galaxalign-tiny:{w}")
    w.write_bytes(b"abd")
    assert model_identity(f"galaxalign-tiny:{w}")["id"] != a["id"]  # the weights' digest, not their path
    assert model_identity("tiny") == {"kind": "tiny", "name": "galaxalign-tiny", "id": "tiny-seed0"}
    assert model_identity("ViT-B-16:openai")["id"] == model_identity("ViT-B-16:openai")["id"]


def test_embed_refuses_an_open_clip_name_without_weights():
    from galaxalign_batch.engine.encoder import model_identity as embed_identity

    with pytest.raises(ConfigError, match="needs its weights"):
        embed_identity("galaxalign-tiny")
