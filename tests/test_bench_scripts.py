"""The GPU checks' scripts stay runnable on a machine without a GPU.

`bench/gpu_check.sh` runs only when a GPU is lent (minutes, rarely), so code that only it exercises can rot
unseen: the model-spec refactor changed the encoder factory's signature and `bench/embed.py --device cuda`
would have died with a TypeError on the next lease. These checks run the parts that need no GPU.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))  # the scripts import each other (bench/preprocess.py)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_gpu_check_script_parses():
    out = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", ["embed", "kernels", "flash_kernels"])
def test_scripts_of_the_gpu_check_start(script):
    out = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_gpu_embed_benchmarks_encoder_is_the_engines():
    """bench/embed.py --device cuda builds the engine's Encoder for an open_clip name at random weights; on the
    CPU with the tiny config it must give unit rows in the precision `embed --precision auto` picks."""
    from galaxalign_batch.model.precision import resolve_precision

    enc = _bench_module("embed").gpu_encoder("galaxalign-tiny", "cpu")
    assert enc.precision == resolve_precision("auto", "cpu")
    rows = enc.encode(np.random.default_rng(0).integers(0, 256, (5, 3, enc.spec.out_size, enc.spec.out_size),
                                                        dtype=np.uint8))
    assert rows.shape == (5, enc.dim) and rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


def test_the_galaxalign_bench_refuses_a_folder_of_runs_from_another_foundation(tmp_path):
    """bench/galaxalign.py resumes from OUT/results.json; a folder whose runs started from another foundation
    file (the shipped one was re-made) must not be silently mixed with runs from the new one."""
    out = tmp_path / "res"
    (out / "foundation").mkdir(parents=True)
    (out / "foundation" / "source.sha256").write_text("0" * 64 + "  old.safetensors\n")
    r = subprocess.run([sys.executable, str(BENCH / "galaxalign.py"), "--data", str(tmp_path / "none"), "--out",
                        str(out), "--inits", "foundation", "--modes", "trimodal", "--seeds", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "holds runs from another foundation" in r.stderr, r.stderr[-2000:]
