"""`pretrain --workers N`: tiles dealt whole to the workers, one global batch with global negatives, the same
weights on every worker, resume, and a run that survives a killed worker (Ray Train)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from conftest import kill_a_ray_worker_when

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model.checkpoint import find_latest, read_info
from galaxalign_batch.model.pretrain import PretrainConfig, pretrain, shard_tiles, steps_in_chunk

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def sky2(tmp_path_factory):
    """Two small bricks (a worker each), with Tractor catalogues: ~190 sources."""
    from galaxalign_batch.simulate import simulate_survey

    root = tmp_path_factory.mktemp("pw")
    simulate_survey(root / "sky", bricks=2, size=384, seed=3, density=8000, stars=100, no_coverage=0)
    return root


def test_tiles_are_dealt_whole_once_and_balanced():
    counts = [50, 10, 40, 30, 5, 25, 0]
    chunk = [3, 0, 5, 1, 2, 6]
    shares = shard_tiles(chunk, counts, 2)
    dealt = [t for share in shares for t in share]
    assert sorted(dealt) == sorted(chunk)                                   # every tile once
    for share in shares:
        assert share == [t for t in chunk if t in share]                    # in the chunk's order
    loads = [sum(counts[t] for t in share) for share in shares]
    assert loads == [75, 80]                                                # 50+25+0 / 40+30+10
    assert steps_in_chunk(chunk, counts, 2, 8) == 75 // 8
    assert shard_tiles(chunk, counts, 1) == [chunk]                         # one worker: the chunk as it is
    assert steps_in_chunk(chunk, counts, 1, 8) == 155 // 8
    assert shard_tiles([4], counts, 3) == [[4], [], []]
    assert steps_in_chunk([4], counts, 3, 2) == 0                           # an idle worker: no step


def _run(rank, size, sky, out, steps):
    from galaxalign_batch.model import pretrain as P

    cfg = P.PretrainConfig(tiles=[sky], out=out, batch_size=8, epochs=2, max_steps=steps, checkpoint_every=2, threads=1)
    return P._pretrain(cfg, rank, size, torch.device("cpu"))


@pytest.mark.slow  # two spawned processes (torch imports): ~20-30 s on 2 cores
def test_two_workers_make_one_global_batch_and_keep_the_same_weights(sky2, tmp_path):
    from galaxalign_batch.model.distributed import launch_local

    out = tmp_path / "w2"
    # every worker checks at the end that all hold the same weights (a failure would raise here)
    first = launch_local(_run, 2, str(sky2 / "sky"), str(out), 3)
    assert first[1] is None                                                 # worker 0 writes; the other does not
    summary = first[0]
    assert (summary["global_step"], summary["workers"], summary["global_batch"], summary["tiles"]) == (3, 2, 16, 2)
    # two bricks, one per worker: the smaller brick's sources decide the steps of an epoch
    info = read_info(out / "model.safetensors")
    assert info["pretraining"]["workers"] == 2 and info["pretraining"]["global_batch"] == 16
    counts = json.loads((find_latest(out / "checkpoints") / "progress.json").read_text())["counts"]
    assert summary["total_steps"] == 2 * (min(counts) // 8)
    again = launch_local(_run, 2, str(sky2 / "sky"), str(out), 5)[0]        # resumes at step 3, same schedule
    assert (again["global_step"], again["total_steps"]) == (5, summary["total_steps"])
    # another number of workers deals the tiles otherwise: refused, not mixed in
    with pytest.raises(ConfigError, match="workers: 2, now 1"):
        pretrain(PretrainConfig(tiles=[str(sky2 / "sky")], out=str(out), batch_size=8, epochs=2, max_steps=6,
                                checkpoint_every=2, threads=1))


@pytest.mark.slow  # two spawned processes: ~15 s
def test_fewer_tiles_than_workers_is_a_clear_error(sky2, tmp_path):
    from galaxalign_batch.model.distributed import launch_local

    with pytest.raises(RuntimeError, match="give no step of 8 sources on each of 2 workers"):
        launch_local(_run_one_brick, 2, str(sky2 / "sky"), str(tmp_path / "one"))


def _run_one_brick(rank, size, sky, out):
    from galaxalign_batch.model import pretrain as P
    from galaxalign_batch.survey.tiles import resolve_tiles

    brick = resolve_tiles([sky])[0].brick
    cfg = P.PretrainConfig(tiles=[sky], bricks=[brick], out=out, batch_size=8, epochs=1, threads=1)
    return P._pretrain(cfg, rank, size, torch.device("cpu"))


@pytest.mark.slow  # a Ray instance, two workers, a worker group restart: ~1.5-3 min on 2 shared cores
def test_pretrain_on_two_ray_workers_survives_a_killed_worker(sky2, tmp_path):
    os.symlink(sky2 / "sky", tmp_path / "sky")
    cmd = [sys.executable, "-m", "galaxalign_batch", "pretrain", "--tiles", "sky", "--out", "run", "--workers", "2",
           "--batch-size", "8", "--epochs", "3", "--checkpoint-every", "2", "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", GALAXALIGN_PROGRESS="0", RAY_AUTH_MODE="disabled")
    # one worker dies after worker 0's first checkpoint
    rc, text = kill_a_ray_worker_when(cmd, tmp_path, env, tmp_path / "pretrain.log",
                                      lambda: find_latest(tmp_path / "run" / "checkpoints") is not None)
    assert rc == 0, text[-3000:]
    summary = json.loads((tmp_path / "run" / "pretrain_summary.json").read_text())
    assert summary["workers"] == 2 and summary["global_step"] == summary["total_steps"] > 2
    assert "resuming pretraining from" in text                             # the restarted group continued
    assert "batch 16 (2 workers x 8, global negatives)" in text
    info = read_info(tmp_path / "run" / "model.safetensors")
    assert info["pretraining"]["global_step"] == summary["total_steps"]
