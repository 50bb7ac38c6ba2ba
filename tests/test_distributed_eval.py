"""`cdm stats`, `cdm eval` and `cdm sweep` split over 2 gloo processes give the numbers of one process."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cascaded_diffusion.cli import main


def _worker(rank: int, world: int, rendezvous: str, tmp: str, commands: list) -> None:
    torch.set_num_threads(1)
    os.environ["CDM_CACHE"] = os.path.join(tmp, f"cache-distributed-{rank}")
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        for argv in commands:
            assert main(argv) == 0, argv
    finally:
        torch.distributed.destroy_process_group()


def test_stats_eval_and_sweep_on_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cache-single"))
    sample = ["sample", "--pretrained", "fashion-mnist", "--steps", "2", "--device", "cpu", "--quiet"]
    assert main(sample + ["--num", "20", "--seed", "1", "--out", str(tmp_path / "ref.npz")]) == 0
    assert main(sample + ["--num", "12", "--out", str(tmp_path / "samples.npz")]) == 0

    def commands(tag: str) -> list:
        feats = ["--features", "classifier", "--device", "cpu"]
        return [
            ["stats", f"npz:{tmp_path / 'ref.npz'}", "--out", str(tmp_path / f"stats-{tag}.npz"), *feats],
            ["eval", str(tmp_path / "samples.npz"), "--ref", f"npz:{tmp_path / 'ref.npz'}", "--metrics", "fid,kid,is,pr",
             "--out", str(tmp_path / f"eval-{tag}.json"), *feats],
            ["sweep", "--pretrained", "fashion-mnist", "--aug-levels", "0", "--num", "7", "--steps", "2",
             "--batch-size", "3", "--ref", str(tmp_path / f"stats-{tag}.npz"), "--no-ground-truth",
             "--out", str(tmp_path / f"sweep-{tag}.json"), *feats],
        ]

    for argv in commands("one"):
        assert main(argv) == 0, argv
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path), commands("two")), nprocs=2,
             join=True)

    with np.load(tmp_path / "stats-one.npz") as a, np.load(tmp_path / "stats-two.npz") as b:
        assert int(a["num"]) == int(b["num"]) == 20
        # Ranks extract features in other batch shapes, so conv kernels may block (and round) differently: float32
        # round-off (~1e-7 on features of order 1), not a different image set, which would move them by ~0.1.
        np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-6)
    one, two = (json.loads((tmp_path / f"eval-{t}.json").read_text()) for t in ("one", "two"))
    assert one["num_samples"] == two["num_samples"] == 12
    for key in ("fid", "precision", "recall"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    assert two["is"]["mean"] == pytest.approx(one["is"]["mean"], rel=1e-6)
    one, two = (json.loads((tmp_path / f"sweep-{t}.json").read_text()) for t in ("one", "two"))
    assert [r["level"] for r in two["generated"]] == [0]
    for a, b in zip(one["generated"], two["generated"]):
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-6)
