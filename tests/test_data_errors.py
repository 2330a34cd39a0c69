"""Bad input: corrupt/truncated files, missing keys, mismatched shapes, NaN labels, failed appends and interrupted
conversions. Each error names the frame or key, and nothing already written is lost."""
import glob
import json
import os
import shutil

import h5py
import numpy as np
import pytest

from matkit.data import Frame, FrameFile, FrameValidationError, HDF5FormatError, HDF5Writer, convert, verify_file
from matkit.data.dataset import HDF5Dataset

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")


def make_frame(n=4, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    values = dict(positions=rng.uniform(0, 4, (n, 3)), atomic_numbers=np.full(n, 14), cell=np.eye(3) * 4.0,
                  pbc=[True] * 3, energy=-4.0 * n + rng.normal(), forces=rng.normal(size=(n, 3)),
                  stress=rng.normal(size=6) * 1e-3, id=f"f{seed}")
    values.update(overrides)
    return Frame(**values)


def write(path, frames, **options):
    with HDF5Writer(path, **options) as writer:
        writer.add_many(frames)


def snapshot(path):
    frames = FrameFile(path)
    return [(f.positions.copy(), f.forces, f.energy, f.stress) for f in frames]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("overrides, message", [
    (dict(forces=np.zeros((3, 3))), r"frame 2 \(id 'f2'\): forces has shape \(3, 3\), expected \(4, 3\)"),
    (dict(energy=float("nan")), r"frame 2 \(id 'f2'\): energy contains NaN"),
    (dict(stress=[0, 0, np.nan, 0, 0, 0]), r"frame 2 .*stress contains NaN or inf \(first at index \[2\]\)"),
    (dict(positions=np.zeros((4, 2))), r"frame 2 .*positions has shape"),
    (dict(atomic_numbers=[14, 14, 0, 14]), r"frame 2 .*atomic_numbers outside 1..118"),
    (dict(stress=np.array([50.0, 50, 50, 0, 0, 0])), r"frame 2 .*looks like kBar or GPa"),
    (dict(cell=np.zeros((3, 3))), r"frame 2 .*cell is degenerate"),
    (dict(properties={"energy": 1.0}), r"frame 2 .*property name 'energy' is reserved"),
])
def test_bad_frame_is_rejected_naming_frame_and_key(tmp_path, overrides, message):
    path = tmp_path / "bad.h5"
    with pytest.raises(FrameValidationError, match=message):
        write(path, [make_frame(seed=0), make_frame(seed=1), make_frame(seed=2, **overrides)])
    assert not path.exists(), "a failed conversion must not leave a file"
    assert not glob.glob(str(tmp_path / "*.partial")), "temporary file must be removed"


def test_failed_append_leaves_earlier_frames_intact(tmp_path):
    path = tmp_path / "data.h5"
    write(path, [make_frame(seed=k) for k in range(5)])
    before, digest = snapshot(path), verify_file(path)
    with pytest.raises(FrameValidationError, match=r"frame 7 \(id 'f7'\): forces"):
        write(path, [make_frame(seed=5), make_frame(seed=6), make_frame(seed=7, forces=np.ones((2, 3)))], mode="a")
    assert_same(snapshot(path), before)
    assert verify_file(path) == digest
    assert not glob.glob(str(tmp_path / "*.partial"))


def test_in_place_append_rolls_back_a_partially_written_chunk(tmp_path):
    """The error here happens inside the HDF5 write (after positions/forces/... were already grown)."""
    path = tmp_path / "data.h5"
    write(path, [make_frame(seed=k, atom_properties={"m": np.ones(4)}) for k in range(3)])
    before, digest = snapshot(path), verify_file(path)
    bad = make_frame(seed=4, atom_properties={"m": np.ones((4, 2))})  # per-atom shape differs from the file's
    with pytest.raises(ValueError, match="atom_properties\\['m'\\] has per-atom shape"):
        write(path, [make_frame(seed=3), bad], mode="a", in_place=True)
    with h5py.File(path, "r") as h5:
        assert h5.attrs["n_frames"] == 3
        assert h5["atoms/positions"].shape[0] == 12 and h5["frames/energy"].shape[0] == 3  # shrunk back
    assert_same(snapshot(path), before)
    assert verify_file(path) == digest
    # and the file still takes a good append afterwards
    write(path, [make_frame(seed=9)], mode="a", in_place=True)
    assert len(FrameFile(path)) == 4
    verify_file(path)


def test_interrupted_conversion_leaves_no_file(tmp_path):
    items = json.load(open(os.path.join(FIXTURES, "mlearn_si_4.json")))
    items[2]["outputs"]["forces"] = items[2]["outputs"]["forces"][:-1]  # one force row missing
    source = tmp_path / "broken.json"
    json.dump(items, open(source, "w"))
    out = tmp_path / "out.h5"
    with pytest.raises(FrameValidationError, match=r"frame 2 \(id 'Si-2'\): forces has shape"):
        # strict: stop at the bad frame (by default it is skipped, see test_reliability_data.py)
        convert(source, out, "mlearn", progress=False, flush_frames=1, strict=True)  # frames 0, 1 already flushed
    assert not out.exists() and not glob.glob(str(tmp_path / "*.partial"))


def test_truncated_json_names_position(tmp_path):
    text = open(os.path.join(FIXTURES, "mlearn_si_4.json")).read()
    source = tmp_path / "truncated.json"
    source.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="invalid or truncated JSON at character"):
        convert(source, tmp_path / "out.h5", "mlearn", progress=False)
    assert not (tmp_path / "out.h5").exists()


def mptrj_without_force(tmp_path):
    """``(path, mp_id, frame_id)``: the MPtrj fixture with the "force" key of its first frame deleted."""
    data = json.load(open(os.path.join(FIXTURES, "mptrj_sample.json")))
    mp_id = next(iter(data))
    frame_id = next(iter(data[mp_id]))
    del data[mp_id][frame_id]["force"]
    source = tmp_path / "mptrj.json"
    json.dump(data, open(source, "w"))
    return source, mp_id, frame_id


def test_mptrj_missing_key_names_frame(tmp_path):
    source, mp_id, frame_id = mptrj_without_force(tmp_path)
    with pytest.raises(ValueError, match=f"MPtrj frame {mp_id}/{frame_id} lacks key\\(s\\) \\['force'\\]"):
        convert(source, tmp_path / "out.h5", "mptrj", progress=False, strict=True)


def test_deepmd_mismatched_shapes_name_the_file(tmp_path):
    system = tmp_path / "sys"
    shutil.copytree(os.path.join(FIXTURES, "deepmd", "water"), system)
    force = np.load(system / "set.000" / "force.npy")
    np.save(system / "set.000" / "force.npy", force[:, :-3])
    with pytest.raises(ValueError, match=r"set.000: force.npy has shape \(3, 573\), expected \(3, 576\)"):
        convert(system, tmp_path / "out.h5", "deepmd", progress=False)


def test_corrupt_and_truncated_files(tmp_path):
    good = tmp_path / "good.h5"
    write(good, [make_frame(seed=k, n=40) for k in range(50)])
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(HDF5FormatError, match="not a readable HDF5 file"):
        HDF5Dataset(garbage, cutoff=3.0)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(HDF5FormatError, match="corrupt or truncated"):
        HDF5Dataset(truncated, cutoff=3.0)
    with pytest.raises(HDF5FormatError):  # and refusing to append to it
        HDF5Writer(truncated, mode="a")
    with pytest.raises(FileNotFoundError, match="no such file"):
        HDF5Dataset(tmp_path / "absent.h5", cutoff=3.0)


def test_missing_keys_and_tampering_are_named(tmp_path):
    path = tmp_path / "data.h5"
    write(path, [make_frame(seed=k) for k in range(3)])
    broken = tmp_path / "missing.h5"
    shutil.copyfile(path, broken)
    with h5py.File(broken, "r+") as h5:
        del h5["frames/energy"]
    with pytest.raises(HDF5FormatError, match="missing dataset 'frames/energy'"):
        HDF5Dataset(broken, cutoff=3.0)
    short = tmp_path / "short.h5"
    shutil.copyfile(path, short)
    with h5py.File(short, "r+") as h5:
        h5["atoms/forces"].resize(5, axis=0)
    with pytest.raises(HDF5FormatError, match="'atoms/forces' has 5 rows, the file header says 12"):
        FrameFile(short).check()
    tampered = tmp_path / "tampered.h5"
    shutil.copyfile(path, tampered)
    with h5py.File(tampered, "r+") as h5:
        h5["frames/energy"][1] = 0.0
    with pytest.raises(HDF5FormatError, match="content hash mismatch"):
        verify_file(tampered)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as h5:
        h5["x"] = np.zeros(3)
    with pytest.raises(HDF5FormatError, match="not a matkit frames file"):
        FrameFile(foreign).check()
