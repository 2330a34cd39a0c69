"""Data-parallel training on CPU (gloo): ``torchrun --nproc_per_node=2 -m matkit.cli train`` on a tiny
config gives the same weights as one process with the same global batches, and checkpoints/logs come from
rank 0 only. Also the launcher detection (torchrun and SLURM variables) and the batch partitioning."""
from __future__ import annotations

import csv
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml

from matkit.checkpoint import read_checkpoint
from matkit.cli import main as matkit_main
from matkit.training.batching import make_batches
from matkit.training import ddp as ddp_module
from matkit.training.ddp import all_reduce_sum, cleanup_distributed, detect_distributed, split_global_batch
from test_training_support import mlearn_si_atoms

ROOT = Path(__file__).resolve().parents[1]


def _write_config(tmp_path, data_path):
    config = {
        "model": {"name": "test_pair_mlp", "module": "test_training_support", "hparams": {"cutoff": 3.5, "hidden": 8}},
        "data": {"train": str(data_path), "batch_size": 4, "val_fraction": 0.25, "seed": 1},
        "loss": {"energy_weight": 1.0, "forces_weight": 10.0, "stress_weight": 1.0},
        "optim": {"lr": 1e-2, "epochs": 2, "warmup_steps": 1, "ema_decay": 0.9, "grad_clip": 5.0},
        "run": {"seed": 5, "dtype": "float64", "device": "cpu", "parity_plots": True, "progress": "off"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_torchrun_two_ranks_match_one_process(tmp_path):
    data_path = tmp_path / "si.extxyz"
    ase.io.write(data_path, mlearn_si_atoms(12), format="extxyz")
    config = _write_config(tmp_path, data_path)

    assert matkit_main(["train", str(config), f"run.out_dir={tmp_path / 'one'}"]) == 0

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "matkit.cli",
           "train", str(config), f"run.out_dir={tmp_path / 'two'}"]
    proc = _run_dumping_stacks_on_timeout(cmd, cwd=tmp_path, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distributed: 2 ranks (torchrun launcher), backend gloo" in proc.stderr

    one = read_checkpoint(tmp_path / "one/latest.pt")
    two = read_checkpoint(tmp_path / "two/latest.pt")
    # 9 training structures in batches of 4, 4, 1: the last global batch leaves rank 1 with a masked stand-in
    assert int(one["training_state"]["step"]) == int(two["training_state"]["step"]) == 6
    assert int(two["training_state"]["world_size"]) == 2
    moved = 0.0
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, rtol=1e-9, atol=1e-11, msg=key)
    first = [r for r in csv.DictReader(open(tmp_path / "one/metrics.csv")) if r["kind"] == "step"]
    second = [r for r in csv.DictReader(open(tmp_path / "two/metrics.csv")) if r["kind"] == "step"]
    assert len(first) == len(second) == 6
    for a, b in zip(first, second):  # the logged global-batch losses agree step by step
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-9)
        moved += abs(float(a["loss"]) - float(first[0]["loss"]))
    assert moved > 0  # the weights did change (agreeing untrained weights would prove nothing)
    # rank 0 writes the files: one log, one csv, no per-rank copies
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["best.pt", "latest.pt", "metrics.csv",
                                                                     "parity_energy.png", "parity_forces.png",
                                                                     "train.log"]


def _run_dumping_stacks_on_timeout(cmd, cwd, env, timeout):
    """``subprocess.run`` whose failure on a hang says where: on timeout the launcher's worker processes get
    SIGABRT, which Python's faulthandler (``PYTHONFAULTHANDLER=1``) answers with the stack of each thread."""
    env = dict(env, PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        table = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,stat=,etime=,args="], capture_output=True,
                               text=True).stdout.splitlines()
        rows = {int(line.split()[0]): line for line in table}
        parents = {pid: int(line.split()[1]) for pid, line in rows.items()}
        # torchrun starts each worker in a session of its own: find them as descendants of the launcher
        family = [proc.pid]
        for pid in sorted(parents):
            ancestor = parents[pid]
            while ancestor > 1 and ancestor not in family:
                ancestor = parents.get(ancestor, 0)
            if ancestor in family and pid not in family:
                family.append(pid)
        for pid in family[1:]:
            os.kill(pid, signal.SIGABRT)
        time.sleep(5)
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stdout, stderr = proc.communicate()
        listing = "\n".join(rows[pid] for pid in family if pid in rows)
        pytest.fail(f"torchrun did not finish within {timeout} s; processes:\n{listing}\nstdout:\n{stdout[-3000:]}\n"
                    f"stderr (stacks of the aborted workers at the end):\n{stderr[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_cleanup_destroys_the_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    assert cleanup_distributed(timeout_s=30) is True
    assert not dist.is_initialized()
    assert cleanup_distributed() is True  # nothing left to do


def test_tensors_of_collectives_stay_referenced_until_the_process_group_is_destroyed(tmp_path, monkeypatch):
    # freeing a collective's tensor on a gloo worker thread must never need the GIL (pytorch/pytorch#56297)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(ddp_module, "_active", lambda: True)  # one rank, but through the real collective
    try:
        sums = all_reduce_sum(torch.tensor([1.0, 2.0], dtype=torch.float64))
        assert sums.tolist() == [1.0, 2.0]
        alive = weakref.ref(sums)
        del sums
        gc.collect()
        assert alive() is not None
    finally:
        assert cleanup_distributed(timeout_s=30) is True
    gc.collect()
    assert alive() is None


def test_trainer_frees_the_ddp_wrapper_before_destroying_the_process_group(tmp_path, monkeypatch):
    # the wrapper's C++ Reducer must not hold the last reference to the process group (pytorch/pytorch#56297)
    from torch.nn.parallel import DistributedDataParallel

    from matkit.training import trainer as trainer_module

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    trainer = trainer_module.Trainer.__new__(trainer_module.Trainer)
    trainer.model = torch.nn.Linear(3, 1)
    trainer.ddp_model = DistributedDataParallel(trainer.model)
    wrapper = weakref.ref(trainer.ddp_model)
    seen = []

    def recording_cleanup(*args, **kwargs):
        seen.append((wrapper() is None, dist.is_initialized()))
        return cleanup_distributed(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "cleanup_distributed", recording_cleanup)
    trainer.close()
    assert seen == [(True, True)]
    assert trainer.ddp_model is trainer.model
    assert not dist.is_initialized()


def test_cleanup_gives_up_on_a_stuck_teardown_and_shows_where(monkeypatch, caplog, capfd):
    gate = threading.Event()

    def stuck_teardown():
        gate.wait(60)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", stuck_teardown)
    try:
        start = time.perf_counter()
        with caplog.at_level(logging.WARNING, logger="matkit.training"):
            assert cleanup_distributed(timeout_s=0.5) is False
        assert time.perf_counter() - start < 5
    finally:
        gate.set()
    assert "teardown did not finish within 0.5 s" in caplog.text
    assert "stuck_teardown" in capfd.readouterr().err  # faulthandler's dump of the stuck thread


def test_split_global_batch_is_a_balanced_partition():
    sizes = [64, 63, 12, 96, 20, 40, 64]
    indices = [10, 11, 12, 13, 14, 15, 16]
    parts = split_global_batch(indices, sizes, 3)
    assert sorted(i for p in parts for i in p) == indices
    assert all(p for p in parts)
    loads = [sum(sizes[indices.index(i)] for i in p) for p in parts]
    assert max(loads) - min(loads) <= 96  # greedy largest-first bound: at most the largest structure
    assert loads == [116, 127, 116]
    assert split_global_batch([1, 2, 3], [5, 1, 1], 4) == [[1], [2], [3], []]


def test_make_batches_packs_by_atoms():
    sizes = np.array([10, 30, 25, 5, 40, 8])
    batches = make_batches(range(6), sizes, batch_size=99, max_atoms=40)
    assert batches == [[0, 1], [2, 3], [4], [5]]
    two_ranks = make_batches(range(6), sizes, batch_size=99, max_atoms=40, min_structures=2)
    assert two_ranks == [[0, 1], [2, 3], [4, 5]]
    assert make_batches(range(5), sizes, batch_size=2, min_structures=2) == [[0, 1], [2, 3, 4]]


def test_detect_distributed_reads_torchrun_and_slurm_variables():
    info = detect_distributed({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node1",
                               "MASTER_PORT": "29400"})
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (3, 8, 1, "torchrun")
    info = detect_distributed({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                               "SLURM_NNODES": "2", "MASTER_ADDR": "node7"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (5, 8, 1, "node7",
                                                                                                 29500)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        detect_distributed({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NNODES": "2"})
    single_node = detect_distributed({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NNODES": "1"})
    assert single_node.master_addr == "127.0.0.1" and single_node.world_size == 2
    assert not detect_distributed({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).enabled  # a plain sbatch job
    assert not detect_distributed({}).enabled
