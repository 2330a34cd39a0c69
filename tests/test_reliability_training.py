"""Bad input never stops a run in a confusing way and never passes silently (training and checkpoints).

* energy-only training (``loss.forces_weight: 0``) trains;
* checkpoints carry a checksum: flipped bytes, NaN weights, text files, random bytes and truncated files are refused
  with a :class:`CheckpointError` that says what is wrong; a failed write names the file and leaves no ``.tmp``;
* training verifies an HDF5 dataset's content hash, reports frames whose labels the loss ignores, and refuses to
  resume on other data or with other seeds;
* ``matkit train`` reports configuration errors as one line naming the key or the file (traceback with ``--debug``).
"""
from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from matkit.checkpoint import (CHECKSUM_KEY, FORMAT_VERSION, CheckpointError, load_checkpoint, payload_checksum,
                               read_checkpoint, save_checkpoint)
from matkit.cli import main as matkit_main
from matkit.data.hdf5 import verify_file
from matkit.models import build
from matkit.training import ConfigError, GraphListDataset, train
from test_training_support import config_with, mlearn_si_graphs

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "potentials" / "tensornet-si" / "model.pt"


def _config(out_dir, **sections):
    cfg = {
        "model": {"name": "test_pair_mlp", "hparams": {"cutoff": 3.5, "hidden": 8}},
        "data": {"batch_size": 4, "val_fraction": 0.25, "seed": 0},
        "loss": {"energy_weight": 1.0, "forces_weight": 1.0, "stress_weight": 0.0},
        "optim": {"lr": 2e-2, "epochs": 1, "ema_decay": 0.0},
        "run": {"out_dir": str(out_dir), "seed": 0, "parity_plots": False, "progress": "off"},
    }
    return config_with(cfg, **sections)


# ---- 1. energy-only training ----------------------------------------------------------------------------------
def test_energy_only_training_runs_and_lowers_the_loss(tmp_path):
    """With forces_weight 0 (and no stress) the step used to take the force gradient without keeping the graph,
    and the energy loss's backward failed ("backward through the graph a second time")."""
    torch.manual_seed(0)
    graphs = mlearn_si_graphs(12, dtype=torch.float32)
    config = _config(tmp_path, loss={"forces_weight": 0.0, "stress_weight": 0.0}, optim={"epochs": 4})
    summary = train(config, train_dataset=GraphListDataset(graphs))
    assert summary["steps"] == 12  # 9 training structures, batches of 4 -> 3 steps per epoch
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    steps = [r for r in rows if r["kind"] == "step"]
    losses = [float(r["loss"]) for r in steps]
    assert len(losses) == 12 and all(math.isfinite(x) and x > 0 for x in losses)
    assert all(float(r["loss_forces"]) == 0.0 for r in steps)       # the force term is not trained
    epochs = [float(r["loss"]) for r in rows if r["kind"] == "epoch"]
    assert epochs[-1] < epochs[0], epochs                            # the energy loss falls
    assert all(r["train_forces_mae"] == "" for r in rows if r["kind"] == "epoch")  # not computed in the step


# ---- 2. checkpoint integrity --------------------------------------------------------------------------------------
def _same_payload(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_payload(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_payload(x, y) for x, y in zip(a, b))
    return a == b


def _member_span(path: Path, suffix: str):
    """(start, length) of the stored bytes of the zip member ending with ``suffix``."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


@pytest.mark.parametrize("region", ["anywhere", "pickle"])
def test_flipped_bytes_never_load_as_different_weights(tmp_path, region):
    """40 seeded single-byte corruptions of a bundled checkpoint: each copy is refused with CheckpointError or
    loads with bit-identical contents (a flip in unused zip bytes is harmless). Before the checksum every flip in
    the tensor data loaded silently as other weights."""
    original = BUNDLED.read_bytes()
    reference = read_checkpoint(BUNDLED)
    start, length = (0, len(original)) if region == "anywhere" else _member_span(BUNDLED, "/data.pkl")
    rng = np.random.default_rng(2024 if region == "anywhere" else 7)
    refused = 0
    for trial in range(40):
        data = bytearray(original)
        position = start + int(rng.integers(length))
        data[position] ^= int(rng.integers(1, 256))
        path = tmp_path / f"flip{trial}.pt"
        path.write_bytes(bytes(data))
        try:
            payload = read_checkpoint(path)
        except CheckpointError as err:
            assert str(path) in str(err)
            refused += 1
            continue
        assert _same_payload(payload, reference), f"flip at byte {position} loaded as a different checkpoint"
    assert refused >= 30, refused  # almost every byte of the file matters


def test_bundled_potentials_carry_a_checksum():
    for path in sorted((ROOT / "potentials").glob("*/model.pt")):
        payload = read_checkpoint(path)
        assert payload["format_version"] == FORMAT_VERSION == 2, path
        assert payload[CHECKSUM_KEY] == payload_checksum(payload), path


def _pair_model():
    torch.manual_seed(0)
    return build("test_pair_mlp", species=[14], cutoff=3.5, hidden=8)


def test_checksum_mismatch_is_refused_and_version_1_files_still_load(tmp_path):
    model = _pair_model()
    path = save_checkpoint(model, tmp_path / "m.pt", metadata={"note": "x"})
    payload = torch.load(path, weights_only=True)
    assert payload["format_version"] == 2 and payload[CHECKSUM_KEY] == payload_checksum(payload)
    # a changed weight under the old checksum (what a flipped byte in the tensor data amounts to)
    payload["state_dict"]["readout.0.weight"] = payload["state_dict"]["readout.0.weight"] + 1e-6
    torch.save(payload, tmp_path / "changed.pt")
    with pytest.raises(CheckpointError, match=r"changed\.pt: checksum mismatch, the file is corrupt"):
        read_checkpoint(tmp_path / "changed.pt")
    # version 2 without a checksum is damaged
    del payload[CHECKSUM_KEY]
    torch.save(payload, tmp_path / "nosum.pt")
    with pytest.raises(CheckpointError, match="no checksum"):
        read_checkpoint(tmp_path / "nosum.pt")
    # version 1 (written before checksums existed) loads with identical weights
    payload["format_version"] = 1
    torch.save(payload, tmp_path / "v1.pt")
    loaded = load_checkpoint(tmp_path / "v1.pt")
    for key, value in payload["state_dict"].items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_non_finite_weights_are_refused(tmp_path):
    model = _pair_model()
    with torch.no_grad():
        model.readout[0].weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to write .*'readout.0.weight' holds non-finite"):
        save_checkpoint(model, tmp_path / "nan.pt")
    assert not (tmp_path / "nan.pt").exists() and not (tmp_path / "nan.pt.tmp").exists()
    good = save_checkpoint(_pair_model(), tmp_path / "good.pt")
    for version in (1, 2):  # a NaN written by something else, with a valid checksum or none
        payload = torch.load(good, weights_only=True)
        payload["state_dict"]["radial.0.bias"][1] = float("inf")
        payload["format_version"] = version
        payload.pop(CHECKSUM_KEY)
        if version == 2:
            payload[CHECKSUM_KEY] = payload_checksum(payload)
        path = tmp_path / f"inf{version}.pt"
        torch.save(payload, path)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and "'radial.0.bias' holds non-finite values" in str(err.value)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_not_a_checkpoint_corrupt_and_unsafe_files_get_the_right_message(tmp_path, capsys):
    """A text file used to raise a bare KeyError and random bytes were called "pickled Python objects that could
    execute code"; only a pickle that asks for a non-allowed global may say that."""
    text = tmp_path / "notes.pt"
    text.write_text("model: tensornet\ncutoff: 5.0\n")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (text, noise, empty):
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path)
        message = str(err.value)
        assert message.startswith(f"{path} is not a matkit checkpoint") and "execute code" not in message, message
        assert "\n" not in message
    good = save_checkpoint(_pair_model(), tmp_path / "good.pt").read_bytes()
    for cut in (len(good) // 2, len(good) - 10, 100):
        (tmp_path / "trunc.pt").write_bytes(good[:cut])
        with pytest.raises(CheckpointError, match=r"trunc\.pt: the file is corrupt or truncated") as err:
            read_checkpoint(tmp_path / "trunc.pt")
        assert "execute code" not in str(err.value) and "\n" not in str(err.value)
    torch.save({"format": "matkit-checkpoint", "format_version": 2, "model": "lj", "hparams": {}, "state_dict": {},
                "x": _Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pt: it contains pickled Python objects "
                                              r"that could execute code \(global 'print'\)"):
        read_checkpoint(tmp_path / "evil.pt")
    assert "this must never run" not in capsys.readouterr().out


# ---- 3. failed writes ---------------------------------------------------------------------------------------------
def test_full_disk_during_a_checkpoint_write_names_the_file_and_keeps_the_previous_one(tmp_path):
    """RLIMIT_FSIZE makes the write fail like a full disk: torch's own message ("unexpected pos ...") used to
    escape and ``latest.pt.tmp`` stayed behind."""
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import torch
        from matkit.checkpoint import CheckpointError, save_checkpoint
        from matkit.models import build
        import test_training_support  # registers test_pair_mlp
        model = build("test_pair_mlp", species=[14], cutoff=3.5, hidden=64)
        save_checkpoint(model, {str(tmp_path / 'latest.pt')!r}, metadata={{"step": 1}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
        try:
            save_checkpoint(model, {str(tmp_path / 'latest.pt')!r}, metadata={{"step": 2}})
        except CheckpointError as err:
            print("CheckpointError:", err)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"CheckpointError: cannot write checkpoint {tmp_path / 'latest.pt'}"), line
    assert "\n" not in line and "enforce fail" not in line
    assert not (tmp_path / "latest.pt.tmp").exists()
    assert read_checkpoint(tmp_path / "latest.pt")["metadata"]["step"] == 1  # the previous checkpoint is intact


def test_os_error_during_a_checkpoint_write_removes_the_partial_file(tmp_path, monkeypatch):
    previous = save_checkpoint(_pair_model(), tmp_path / "best.pt", metadata={"step": 1})

    def partial_write(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", partial_write)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*best\.pt: No space left on device"):
        save_checkpoint(_pair_model(), previous, metadata={"step": 2})
    monkeypatch.undo()
    assert not (tmp_path / "best.pt.tmp").exists()
    assert read_checkpoint(previous)["metadata"]["step"] == 1


# ---- 4. the dataset's content hash and unusable labels -------------------------------------------------------------
def test_training_reports_frames_whose_labels_the_loss_ignores(tmp_path):
    """NaN-labelled frames used to be masked out without a word."""
    graphs = mlearn_si_graphs(12, dtype=torch.float32)
    graphs[1].energy = torch.tensor([float("nan")], dtype=torch.float64)
    graphs[5].forces = graphs[5].forces.clone()
    graphs[5].forces[0, 2] = float("inf")
    graphs[7].energy = torch.tensor([float("nan")], dtype=torch.float64)
    graphs[7].forces = torch.full_like(graphs[7].forces, float("nan"))
    config = _config(tmp_path, data={"val_fraction": 0.0}, optim={"max_steps": 1})
    train(config, train_dataset=GraphListDataset(graphs))
    lines = [line for line in (tmp_path / "train.log").read_text().splitlines() if "NaN/inf" in line]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "WARNING training split" in line
    assert "3 of 12 frames have NaN/inf labels that the loss ignores: energy in 2 (frames 1, 7); " \
           "forces in 2 (frames 5, 7)" in line
    assert "1 of 12 frames have no usable label for the weighted loss terms (energy, forces) and are dropped " \
           "(frames 7)" in line

    for graph in graphs:
        graph.energy = torch.tensor([float("nan")], dtype=torch.float64)
    energy_only = _config(tmp_path / "e", loss={"forces_weight": 0.0}, data={"val_fraction": 0.0})
    with pytest.raises(ConfigError, match="none of the 12 frames has a usable .* label for the weighted loss terms"):
        train(energy_only, train_dataset=GraphListDataset(graphs))


def _h5_copy(tmp_path, name="si.h5", source="mlearn_si.h5"):
    path = tmp_path / name
    shutil.copyfile(ROOT / "datasets" / source, path)
    return path


def _file_config(out_dir, data_path, **sections):
    sections.setdefault("optim", {}).setdefault("max_steps", 1)
    sections.setdefault("data", {})["train"] = str(data_path)
    return _config(out_dir, model={"module": "test_training_support"}, **sections)


def test_training_verifies_the_hdf5_content_hash(tmp_path):
    """An HDF5 file whose arrays changed after it was written (its stored content hash no longer matches) used
    to train silently."""
    data = _h5_copy(tmp_path)
    with h5py.File(data, "r+") as h5:
        h5["frames/energy"][3] = h5["frames/energy"][3] + 1.0
    with pytest.raises(ConfigError, match=r"config key 'data.train': .*si\.h5 failed verification: .*content hash "
                                          r"mismatch"):
        train(_file_config(tmp_path / "run", data))
    good = _h5_copy(tmp_path, "good.h5")
    train(_file_config(tmp_path / "ok", good))
    meta = read_checkpoint(tmp_path / "ok/latest.pt")["metadata"]
    assert meta["dataset_sha256"] == verify_file(good) and meta["val_dataset_sha256"] is None
    assert "(stored content hash verified)" in (tmp_path / "ok/train.log").read_text()


# ---- 5. resume on the same data and seeds only ----------------------------------------------------------------------
def test_resume_refuses_other_data_and_changed_seeds(tmp_path):
    """Resuming used to continue silently on another dataset, and to report the new data.seed while using the
    checkpoint's split."""
    data = _h5_copy(tmp_path)
    run = tmp_path / "run"
    train(_file_config(run, data, data={"batch_size": 8}))
    latest = str(run / "latest.pt")
    other = _h5_copy(tmp_path, "ge.h5", "mlearn_ge.h5")
    with pytest.raises(ConfigError, match=r"--resume .*latest\.pt: config key 'data.train' is .*ge\.h5 \(sha256 "
                                          r"[0-9a-f]{16}\.\.\.\) but the checkpoint was trained on .*si\.h5"):
        train(_file_config(run, other, data={"batch_size": 8}, optim={"max_steps": 2}), resume=latest)
    for section, change in (("run", {"seed": 1}), ("data", {"seed": 5}), ("data", {"val_fraction": 0.2})):
        key, value = next(iter(change.items()))
        sections = {"data": {"batch_size": 8}, "optim": {"max_steps": 2}}
        sections[section] = {**sections.get(section, {}), **change}
        with pytest.raises(ConfigError, match=rf"config key '{section}.{key}' is {value} but the checkpoint's run "
                                              rf"used"):
            train(_file_config(run, data, **sections), resume=latest)
    # the same content under another path resumes, and the log states the seed the split was made with
    moved = _h5_copy(tmp_path, "moved.h5")
    summary = train(_file_config(run, moved, data={"batch_size": 8}, optim={"max_steps": 2}), resume=latest)
    assert summary["steps"] == 2
    log = (run / "train.log").read_text()
    assert "validation split: 54 structures (25.2%, restored from the checkpoint, made with seed 0)" in log


def test_resume_refuses_a_split_that_does_not_fit_the_data(tmp_path):
    graphs = mlearn_si_graphs(12, dtype=torch.float32)
    train(_config(tmp_path, optim={"max_steps": 1}), train_dataset=GraphListDataset(graphs))
    with pytest.raises(ConfigError, match="split refers to structure 1[01] but the dataset has 8"):
        train(_config(tmp_path, optim={"max_steps": 2}), train_dataset=GraphListDataset(graphs[:8]),
              resume=str(tmp_path / "latest.pt"))


# ---- 6. one-line command-line errors ------------------------------------------------------------------------------
def _write_config(path, hparams, data):
    cfg = {"model": {"name": "test_pair_mlp", "module": "test_training_support", "hparams": hparams},
           "data": {"train": str(data), "batch_size": 4},
           "optim": {"epochs": 1, "max_steps": 1},
           "run": {"out_dir": str(path.parent / "run"), "parity_plots": False, "progress": "off"}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("hparams, key", [({"cutoff": "x"}, "model.hparams.cutoff"),
                                          ({"cutoff": -1.0}, "model.hparams.cutoff"),
                                          ({"cutoff": 3.5, "hidden": "x"}, "model.hparams.hidden"),
                                          ({"cutoff": 3.5, "hidden": 8.5}, "model.hparams.hidden")])
def test_cli_bad_hparams_are_one_line_naming_the_key(tmp_path, capsys, hparams, key):
    """``cutoff: x`` used to crash inside the data loader (TypeError: must be real number, not str)."""
    config = _write_config(tmp_path / "c.yaml", hparams, ROOT / "datasets/mlearn_si.h5")
    assert matkit_main(["train", str(config)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and f"config key '{key}'" in err[-1] and "Traceback" not in "\n".join(err)
    with pytest.raises(ConfigError, match=key):
        matkit_main(["train", str(config), "--debug"])


def test_cli_binary_config_and_bad_dataset_are_one_line_naming_the_file(tmp_path, capsys):
    binary = tmp_path / "config.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    assert matkit_main(["train", str(binary)]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{binary}: not a YAML text file" in err and "Traceback" not in err
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("model: {name: caf\xe9}\n".encode("latin-1"))
    assert matkit_main(["train", str(latin1)]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{latin1}: not a YAML text file (byte 0xe9 at offset 17 is not UTF-8)" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {name: x\n  y: [1\n")
    assert matkit_main(["train", str(broken)]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{broken}: not valid YAML (" in err and "line 2" in err

    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file")
    config = _write_config(tmp_path / "c.yaml", {"cutoff": 3.5}, junk)
    assert matkit_main(["train", str(config)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "config key 'data.train'" in err[-1] and str(junk) in err[-1]
    assert "Traceback" not in "\n".join(err)
