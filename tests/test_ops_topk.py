"""Streamed similarity top-k and prototype probabilities against torch.topk / torch.softmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.ops import prototype_probs, similarity_topk
from galaxalign_batch.ops.backends import kernel_module

HAVE_CORE = kernel_module(torch.device("cpu"), "topk") is not None
IMPLS = ["reference", pytest.param("fused", marks=pytest.mark.skipif(not HAVE_CORE, reason="_core not built"))]


def _integer_data(n, m, d, seed, low=-3, high=4):
    """Small integers: every dot product is exact in float32 (any summation order) and ties abound."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, d), generator=g).float(), torch.randint(low, high, (m, d), generator=g).float()


def _stable_topk(scores: torch.Tensor, k: int):
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,m,d,k,chunk", [(7, 1000, 5, 10, 256), (300, 777, 9, 3, 100), (1, 50, 3, 50, 7), (200, 97, 16, 1, 1000)])
def test_topk_exact_on_integer_data_with_ties(impl, n, m, d, k, chunk):
    q, mat = _integer_data(n, m, d, seed=n + m)
    scores, index = similarity_topk(q, mat, k, chunk_rows=chunk, impl=impl)
    full = q @ mat.T
    assert scores.dtype == torch.float32 and index.dtype == torch.int64 and scores.shape == (n, k)
    # The values are exactly torch.topk's; the indices are the stable order (ties by lower index).
    assert torch.equal(scores, torch.topk(full, k, dim=1).values)
    ref_scores, ref_index = _stable_topk(full, k)
    assert torch.equal(index, ref_index)
    assert torch.equal(torch.gather(full, 1, index), scores)


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_matches_torch_topk_on_random_floats(impl):
    g = torch.Generator().manual_seed(1)
    q, mat = torch.randn(230, 65, generator=g), torch.randn(3001, 65, generator=g)
    scores, index = similarity_topk(q, mat, 17, chunk_rows=1000, impl=impl)
    ref = torch.topk(q @ mat.T, 17, dim=1)
    torch.testing.assert_close(scores, ref.values, rtol=1e-5, atol=1e-5)
    gaps = (ref.values[:, :-1] - ref.values[:, 1:]).min(dim=1).values
    clear = gaps > 1e-4  # rows whose order is not decided by rounding
    assert clear.sum() > 150
    assert torch.equal(index[clear], ref.indices[clear])


@pytest.mark.parametrize("impl", IMPLS)
def test_all_equal_scores_keep_index_order(impl):
    q = torch.ones(3, 4)
    mat = torch.ones(500, 4)
    scores, index = similarity_topk(q, mat, 20, chunk_rows=64, impl=impl)
    assert torch.equal(index, torch.arange(20).expand(3, 20))
    assert torch.equal(scores, torch.full((3, 20), 4.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_float16_matrix_numpy_memmap_and_zarr(impl, tmp_path):
    q, mat = _integer_data(40, 1234, 12, seed=3)
    half = mat.numpy().astype(np.float16)  # small integers are exact in float16
    ref = _stable_topk(q @ mat.T, 8)
    mm = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=np.float16, shape=half.shape)
    mm[:] = half
    mm.flush()
    zarr = pytest.importorskip("zarr")
    z = zarr.create_array(store=str(tmp_path / "m.zarr"), shape=half.shape, chunks=(300, 12), dtype="float16")
    z[:] = half
    for matrix in (half, np.load(tmp_path / "m.npy", mmap_mode="r"), z, torch.from_numpy(half), mat.double().numpy()):
        scores, index = similarity_topk(q, matrix, 8, chunk_rows=500, impl=impl)
        assert torch.equal(scores, ref[0]) and torch.equal(index, ref[1]), type(matrix)


@pytest.mark.parametrize("impl", IMPLS)
def test_float16_rounding_of_random_rows(impl):
    g = torch.Generator().manual_seed(4)
    q, mat = torch.randn(5, 33, generator=g), torch.randn(400, 33, generator=g).half()
    scores, index = similarity_topk(q, mat, 5, impl=impl)
    ref = torch.topk(q @ mat.float().T, 5, dim=1)
    torch.testing.assert_close(scores, ref.values, rtol=1e-5, atol=1e-5)


def test_topk_errors():
    q, mat = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ConfigError, match="larger than the number of matrix rows"):
        similarity_topk(q, mat, 11)
    with pytest.raises(ConfigError, match="D=4"):
        similarity_topk(q, torch.randn(10, 5), 2)
    with pytest.raises(ConfigError, match="k must be"):
        similarity_topk(q, mat, 0)
    with pytest.raises(ConfigError, match="2-D"):
        similarity_topk(q[0], mat, 2)


@pytest.mark.skipif(not HAVE_CORE, reason="_core not built")
def test_topk_independent_of_thread_count():
    q, mat = _integer_data(500, 2000, 24, seed=5)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(similarity_topk(q, mat, 30, chunk_rows=700, impl="fused"))
            results.append(similarity_topk(q[:3], mat, 30, chunk_rows=700, impl="fused"))  # split-columns mode
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][1], results[2][1]) and torch.equal(results[1][1], results[3][1])
    assert torch.equal(results[1][1], results[0][1][:3])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,k,d", [(1, 1, 3), (150, 10, 64), (37, 200, 17)])
def test_prototype_probs(impl, n, k, d):
    g = torch.Generator().manual_seed(n + k)
    feats = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    protos = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    probs = prototype_probs(feats, protos, 25.0, impl=impl)
    ref = torch.softmax(25.0 * feats.double() @ protos.double().T, dim=1)
    assert probs.shape == (n, k) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(1).double(), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-5)


def test_prototype_probs_errors():
    with pytest.raises(ConfigError, match="prototypes"):
        prototype_probs(torch.randn(3, 4), torch.randn(2, 5), 1.0)
