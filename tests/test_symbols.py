"""Symbols: every class renders, augmentation changes pixels, classes differ, user symbols, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model.symbols import DRAWERS, SymbolSet, SymbolSettings, draw_symbol, find_user_symbols
from galaxalign_batch.vocabulary import Vocabulary, load_vocabulary

SETTINGS = SymbolSettings(size=48)


def test_drawer_covers_galaxy10():
    assert set(load_vocabulary("galaxy10").keys) == set(DRAWERS)


@pytest.mark.parametrize("key", sorted(DRAWERS))
def test_every_class_renders(key):
    img = draw_symbol(key, SETTINGS)
    assert img.shape == (3, 48, 48) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert img.max() > 0.5, "the symbol has a bright part"
    assert (img < 0.02).mean() > 0.2, "the symbol sits on a dark background"
    # anti-aliased: intermediate grey levels exist, not just on/off pixels
    assert ((img > 0.05) & (img < 0.95)).mean() > 0.02


def test_canonical_is_deterministic_and_augmentation_changes_pixels():
    for key in DRAWERS:
        a, b = draw_symbol(key, SETTINGS), draw_symbol(key, SETTINGS)
        np.testing.assert_array_equal(a, b)
        rng = np.random.default_rng(1)
        aug1, aug2 = draw_symbol(key, SETTINGS, rng), draw_symbol(key, SETTINGS, rng)
        assert np.abs(aug1 - a).mean() > 0.01, key
        assert np.abs(aug1 - aug2).mean() > 0.01, key
        # the same seed gives the same augmented symbol
        np.testing.assert_array_equal(draw_symbol(key, SETTINGS, np.random.default_rng(7)),
                                      draw_symbol(key, SETTINGS, np.random.default_rng(7)))


def test_different_classes_differ():
    imgs = {k: draw_symbol(k, SETTINGS) for k in DRAWERS}
    for a, b in itertools.combinations(DRAWERS, 2):
        assert np.abs(imgs[a] - imgs[b]).mean() > 0.01, (a, b)


def test_bank_and_prototypes():
    vocab = load_vocabulary("galaxy10")
    s = SymbolSet.builtin(vocab, 32)
    images, labels = s.bank(3, seed=5)
    assert images.shape == (30, 3, 32, 32) and list(np.bincount(labels)) == [3] * 10
    np.testing.assert_array_equal(images, s.bank(3, seed=5)[0])
    protos, plabels = s.prototype_images(4, seed=0)
    assert protos.shape == (40, 3, 32, 32)
    np.testing.assert_array_equal(protos[0], s.render(0))  # the canonical symbol comes first
    d = s.to_dict()
    assert SymbolSet.from_dict(d).to_dict() == d


def _write_png(path, value, size=40):
    arr = np.zeros((size, size, 3), np.uint8)
    arr[size // 4: 3 * size // 4, size // 3: 2 * size // 3] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_user_symbols_subfolders_and_prefixes(tmp_path):
    vocab = load_vocabulary("galaxy10")
    _write_png(tmp_path / "merging" / "a.png", 200)
    _write_png(tmp_path / "edge_on_with_bulge_1.png", 150)
    _write_png(tmp_path / "edge_on_no_bulge.png", 100)
    files = find_user_symbols(tmp_path, vocab.keys)
    assert set(files) == {"merging", "edge_on_with_bulge", "edge_on_no_bulge"}  # longest key wins
    s = SymbolSet.from_folder(tmp_path, vocab, 32)
    merging = vocab.keys.index("merging")
    canon = s.render(merging)
    assert canon.shape == (3, 32, 32) and abs(canon.max() - 200 / 255) < 0.05
    aug = s.render(merging, np.random.default_rng(0))
    assert np.abs(aug - canon).mean() > 0.005
    # classes without user images still use the drawer
    np.testing.assert_array_equal(s.render(vocab.keys.index("round_smooth")), draw_symbol("round_smooth", s.settings))
    assert s.to_dict()["user_count"] == 3 and len(s.to_dict()["user_hash"]) == 16


def test_user_symbol_errors(tmp_path):
    vocab = load_vocabulary("galaxy10")
    _write_png(tmp_path / "spaceship" / "a.png", 200)
    with pytest.raises(ConfigError, match="unknown class 'spaceship'"):
        SymbolSet.from_folder(tmp_path, vocab, 32)
    with pytest.raises(ConfigError, match="not a directory"):
        SymbolSet.from_folder(tmp_path / "nope", vocab, 32)


def test_custom_vocabulary_needs_symbols_for_unknown_classes(tmp_path):
    vocab = Vocabulary.from_dict({"name": "mine", "classes": [{"key": "round_smooth"}, {"key": "ring"}]})
    with pytest.raises(ConfigError, match="ring.*--symbols"):
        SymbolSet.builtin(vocab, 32)
    _write_png(tmp_path / "ring" / "r.png", 255)
    s = SymbolSet.from_folder(tmp_path, vocab, 32)
    assert s.render(1).shape == (3, 32, 32)
    assert s.to_dict()["drawn"] == ["round_smooth"]
