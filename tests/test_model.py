"""The GalaxAlign model: tiny config, local weights, stage-2 initialisation, checkpoints, layers, metrics."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model.checkpoint import load_checkpoint, read_info, save_model
from galaxalign_batch.model.config import TINY, create_clip
from galaxalign_batch.model.evaluate import classification_metrics, retrieval_metrics
from galaxalign_batch.model.train import TrainConfig, build_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # conftest: one torch thread per module


def _model(tmp_path, mode="trimodal", **kw):
    torch.manual_seed(0)
    return build_model(TrainConfig(data=str(tmp_path), out=str(tmp_path / "out"), mode=mode, **kw))


def _images(n=6, size=64, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32))


def test_tiny_config_is_registered_with_open_clip():
    assert TINY in open_clip.list_models()
    m = open_clip.create_model(TINY)
    assert m.visual.image_size == (64, 64)
    with torch.no_grad():
        assert m.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, 128)


def test_local_weights_file(tmp_path):
    torch.manual_seed(1)
    ref = open_clip.create_model(TINY)
    path = tmp_path / "tiny_weights.pt"
    torch.save(ref.state_dict(), path)
    model, cfg, pre = create_clip(TINY, str(path))
    assert pre["size"] == 64 and cfg["embed_dim"] == 128
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ConfigError, match="neither a file nor a pretrained tag"):
        create_clip(TINY, str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        create_clip("no-such-model")


def test_stage2_symbol_encoder_is_an_independent_copy(tmp_path):
    model = _model(tmp_path)
    model.init_symbol_encoder()
    image_sd, symbol_sd = model.clip.visual.state_dict(), model.symbol_encoder.state_dict()
    assert image_sd.keys() == symbol_sd.keys()
    for k in image_sd:
        assert torch.equal(image_sd[k], symbol_sd[k]), k
        assert image_sd[k].data_ptr() != symbol_sd[k].data_ptr(), f"{k} shares storage"
    x = model.prepare_images(_images(4))
    with torch.no_grad():
        np.testing.assert_allclose(model(images=x)["image"].numpy(), model(symbols=x)["symbol"].numpy(), atol=1e-6)
    before = {k: v.clone() for k, v in image_sd.items()}
    model.set_trainable("all")
    opt = torch.optim.SGD(model.symbol_encoder.parameters(), lr=0.1)
    model(symbols=x)["symbol"].sum().backward()
    opt.step()
    after_image, after_symbol = model.clip.visual.state_dict(), model.symbol_encoder.state_dict()
    assert all(torch.equal(before[k], after_image[k]) for k in before), "image encoder changed"
    assert any(not torch.equal(before[k], after_symbol[k]) for k in before), "symbol encoder did not train"


@pytest.mark.parametrize("mode,stage2", [("trimodal", True), ("image-only", False)])
def test_checkpoint_round_trip_reproduces_embeddings(tmp_path, mode, stage2):
    model = _model(tmp_path, mode=mode, temperature=0.05)
    if stage2:
        model.init_symbol_encoder()
        with torch.no_grad():  # make the symbol encoder differ from the image encoder
            model.symbol_encoder.proj.mul_(1.5)
    model.eval()
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    x = _images(5)
    assert torch.equal(model.encode_images(x), loaded.encode_images(x))
    assert torch.equal(model.encode_symbols(x), loaded.encode_symbols(x))
    texts = ["a photo of a barred spiral galaxy.", "a merging galaxy."]
    assert torch.equal(model.encode_text(texts), loaded.encode_text(texts))
    for kind in ("text", "symbol", "combined"):
        p = loaded.class_prototypes(kind, symbols_per_class=3)
        assert p.shape == (10, 128)
        torch.testing.assert_close(p.norm(dim=1), torch.ones(10))
        assert torch.equal(model.class_prototypes(kind, symbols_per_class=3), p)
    assert loaded.mode == mode and abs(loaded.logit_scale.item() - 20.0) < 1e-3
    assert (loaded.symbol_encoder is not None) == stage2
    if mode == "image-only":
        assert torch.equal(model.classify(x, "head"), loaded.classify(x, "head"))
    info = read_info(path)
    assert info["vocabulary"]["name"] == "galaxy10-decals" and info["cutout_spec"]["out_size"] == 64
    assert info["open_clip"]["name"] == TINY and info["weights_digest"]
    # the description alone rebuilds the preprocessing
    from galaxalign_batch.preprocess import CutoutSpec

    assert CutoutSpec.from_dict(info["cutout_spec"]).angular_size == 32.0


def test_checkpoint_with_user_symbols_carries_them(tmp_path):
    from PIL import Image

    img = np.zeros((20, 20, 3), np.uint8)
    img[5:15, 8:12] = 255
    (tmp_path / "syms" / "cigar_smooth").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "syms" / "cigar_smooth" / "c.png")
    model = _model(tmp_path, symbols=str(tmp_path / "syms"))
    path = save_model(model, tmp_path / "m.safetensors")
    (tmp_path / "syms" / "cigar_smooth" / "c.png").unlink()  # the checkpoint must not need the folder
    loaded = load_checkpoint(path)
    np.testing.assert_array_equal(loaded.symbols.user_images, model.symbols.user_images)
    assert torch.equal(model.class_prototypes("symbol", 3), loaded.class_prototypes("symbol", 3))


def _flip_a_bit(path, from_end: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - from_end] ^= 0x10  # one bit of the last tensor's data
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_the_weights_is_refused(tmp_path):
    """safetensors has no checksum: a copy damaged in its tensor data loaded, and embed/classify ran on
    garbage (every source one class). The checksum written with the tensors is checked on load, for every
    weight file of the project (model/files.py), and a checkpoint written before it by its weights digest."""
    from safetensors.torch import load_file, save_file

    from galaxalign_batch.fewshot.heads import fit_head, load_head
    from galaxalign_batch.model.files import CHECKSUM_KEY, has_checksum

    path = save_model(_model(tmp_path), tmp_path / "m.safetensors")
    assert has_checksum(path)
    load_checkpoint(path)  # whole: loads
    _flip_a_bit(path)
    with pytest.raises(ConfigError, match="damaged: its weights do not match the checksum"):
        load_checkpoint(path)
    # a checkpoint from before the checksum: its weights digest (the model's identity) is checked instead
    old = save_model(_model(tmp_path), tmp_path / "old.safetensors")
    from safetensors import safe_open

    with safe_open(str(old), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != CHECKSUM_KEY}
    save_file(load_file(str(old)), str(old), metadata=meta)
    assert not has_checksum(old)
    load_checkpoint(old)
    _flip_a_bit(old)
    with pytest.raises(ConfigError, match="damaged: its weights do not match the digest"):
        load_checkpoint(old)
    # a few-shot head (numpy tensors): the same check
    rng = np.random.default_rng(0)
    head = fit_head(rng.normal(size=(40, 8)).astype(np.float32), np.repeat([0, 1], 20), ["a", "b"])
    hp = head.save(tmp_path / "head.safetensors")
    load_head(hp)
    _flip_a_bit(hp, from_end=20)
    with pytest.raises(ConfigError, match="damaged"):
        load_head(hp)


def test_loading_refuses_non_checkpoints(tmp_path):
    pickle_file = tmp_path / "x.safetensors"
    torch.save({"a": torch.zeros(2)}, pickle_file)
    with pytest.raises(ConfigError, match="not a safetensors file"):
        load_checkpoint(pickle_file)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ConfigError, match="without a GalaxAlign checkpoint description"):
        load_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(ConfigError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_encode_images_accepts_uint8_and_other_sizes(tmp_path):
    model = _model(tmp_path).eval()
    x = _images(3, size=64)
    as_uint8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(model.encode_images(as_uint8), model.encode_images(as_uint8.float() / 255))
    assert model.encode_images(_images(2, size=100)).shape == (2, 128)
    with pytest.raises(ConfigError, match=r"\(N, 3, S, S\)"):
        model.encode_images(torch.zeros(2, 64, 64))


def test_set_trainable_layers(tmp_path):
    model = _model(tmp_path)
    n_all = model.set_trainable("all")
    n_proj = model.set_trainable("proj")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"clip.visual.proj", "clip.visual.ln_post.weight", "clip.visual.ln_post.bias",
                         "clip.text_projection", "clip.ln_final.weight", "clip.ln_final.bias", "clip.logit_scale"}
    n_last = model.set_trainable("last:1", temperature=False)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("clip.visual.transformer.resblocks.3.") for n in names)
    assert not any(n.startswith("clip.visual.transformer.resblocks.2.") for n in names)
    assert any(n.startswith("clip.transformer.resblocks.3.") for n in names)
    assert "clip.logit_scale" not in names and "clip.token_embedding.weight" not in names
    assert n_proj < n_last < n_all
    model.set_trainable("all", text=False)
    assert not model.clip.token_embedding.weight.requires_grad and model.clip.visual.conv1.weight.requires_grad
    for bad in ("last", "last:0", "some"):
        with pytest.raises(ConfigError, match="--train-layers"):
            model.set_trainable(bad)


def test_classification_metrics_hand_case():
    truth = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(truth, pred, 4)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_class_recall"] == [0.5, 1.0, 0.0, None]
    # F1: class 0 p=1/2 r=1/2 -> 0.5; class 1 p=2/3 r=1 -> 0.8; class 2 -> 0; class 3 absent
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["confusion"][0] == [1, 1, 0, 0] and m["confusion"][2] == [1, 0, 0, 0]


def test_retrieval_metrics_hand_case():
    # four points on a line: classes 0,0,1,1; cosine neighbours are the adjacent points
    feats = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.1, 0.9], [0.0, 1.0]]), dim=1)
    r = retrieval_metrics(feats, np.array([0, 0, 1, 1]), ks=(1, 2))
    assert r["precision@1"] == 1.0 and r["precision@2"] == 0.5
    assert r["mAP@1"] == 1.0 and r["mAP@2"] == 1.0
    # labels 0,1,0,1: only the end points find their one relevant item, at rank 2
    r = retrieval_metrics(feats, np.array([0, 1, 0, 1]), ks=(2,))
    assert r["precision@2"] == pytest.approx((0.5 + 0 + 0 + 0.5) / 4)
    assert r["mAP@2"] == pytest.approx((0.5 + 0 + 0 + 0.5) / 4)
