"""Reliability of ``matkit data``: bad input never stops a run and never passes silently.

A failed write (a file-size limit standing in for a full disk) is a one-line error that keeps an existing output
byte-identical; work files (``*.partial``) never outlive a failure and stale ones of killed processes are found;
outputs get the umask's mode; ``--verify`` checks shapes and values, not only the hash; CLI errors are one line
(tracebacks only with ``--debug``); one bad CSV row or frame is named, skipped and counted, and a truncated CIF
that parses as another compound is caught."""
import glob
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest

from matkit.data import FrameFile, HDF5FormatError, HDF5Writer, convert, verify_file
from matkit.data.converters import BadItemError, SkippedFrameWarning, read_mp20csv
from matkit.data.hdf5 import content_hash, stale_partials
from test_data_errors import make_frame, mptrj_without_force, write

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fixture(name):
    return os.path.join(FIXTURES, name)


def matkit_cli(args, file_size_limit=None, **popen):
    """``python -m matkit.cli ARGS`` in a subprocess; with a file-size limit (SIGXFSZ ignored, so a write past it
    fails with EFBIG like a full disk does)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "matkit.cli", *args], capture_output=True, text=True, env=env,
                          preexec_fn=limit if file_size_limit is not None else None, timeout=600, **popen)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and ": warning:" not in line]


# ------------------------------------------------------------------------------------- 1. failed writes
def test_failed_write_is_one_line_error_and_keeps_existing_output(tmp_path):
    """Before: HDF5Writer.abort crashed (segmentation fault, exit -11) and left the .partial file behind."""
    out = tmp_path / "out.h5"
    convert(fixture("mlearn_si_4.json"), out, "mlearn", progress=False)
    before = out.read_bytes()
    result = matkit_cli(["data", "convert", fixture("mptrj_sample.json"), str(out), "--format", "mptrj",
                         "--no-progress", "--compression", "none"], file_size_limit=60_000)
    assert result.returncode > 0, f"must exit with an error status, not a signal: {result.returncode}"
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(out) in lines[0] and "File too large" in lines[0], lines[0]
    assert out.read_bytes() == before, "the existing output must stay byte-identical"
    assert not glob.glob(str(tmp_path / "*.partial"))


def test_failed_write_of_a_new_output_and_of_an_append_leave_nothing(tmp_path):
    """Before: a segmentation fault; the failing copy of an append left its work file."""
    out = tmp_path / "new.h5"
    result = matkit_cli(["data", "convert", fixture("mlearn_si_4.json"), str(out), "--format", "mlearn",
                         "--no-progress"], file_size_limit=20_000)
    assert result.returncode > 0 and len(error_lines(result.stderr)) == 1, result.stderr
    assert "no file was created" in result.stderr and not out.exists()
    big = tmp_path / "big.h5"
    convert(fixture("mptrj_sample.json"), big, "mptrj", progress=False, compression=None)
    before = big.read_bytes()
    result = matkit_cli(["data", "convert", fixture("mlearn_si_4.json"), str(big), "--format", "mlearn",
                         "--append", "--no-progress"], file_size_limit=len(before) // 2)  # the copy fails
    assert result.returncode > 0 and len(error_lines(result.stderr)) == 1, result.stderr
    assert str(big) in result.stderr and "File too large" in result.stderr
    assert big.read_bytes() == before
    assert not glob.glob(str(tmp_path / "*.partial"))


# ------------------------------------------------------------------------------------- 2. work files
def test_failed_open_for_append_removes_its_work_file(tmp_path):
    """Before: the refused append (units differ) raised after copying the file to a .partial that stayed."""
    path = tmp_path / "data.h5"
    write(path, [make_frame(seed=k) for k in range(2)])
    with h5py.File(path, "r+") as h5:
        h5.attrs["units"] = json.dumps({"length": "nm"})
    with pytest.raises(HDF5FormatError, match="cannot append"):
        HDF5Writer(path, mode="a")
    assert not glob.glob(str(tmp_path / "*.partial"))


def test_ctrl_c_during_convert_is_one_line_and_removes_the_work_file(tmp_path):
    """Before: KeyboardInterrupt printed a Python traceback."""
    from ase import Atoms
    from ase.io import write as ase_write

    source = tmp_path / "many.xyz"
    atoms = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    ase_write(source, [atoms] * 60_000, format="extxyz")
    out = tmp_path / "out.h5"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "matkit.cli", "data", "convert", str(source), str(out),
                                "--format", "extxyz", "--no-progress", "--flush-frames", "64"],
                               stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                               # SIGINT at its default in the child, as in a shell, even when this test runs in a
                               # background job (which ignores SIGINT; the child would inherit that and never see
                               # KeyboardInterrupt)
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not glob.glob(str(tmp_path / "*.partial")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the conversion ended before it could be interrupted"
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert len(error_lines(stderr)) == 1 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert not out.exists() and not glob.glob(str(tmp_path / "*.partial"))


def test_stale_work_files_of_dead_processes_are_reported_and_removed(tmp_path, capsys):
    """Before: work files had no owner in their name; nothing found or removed them."""
    from matkit.cli import main

    out = tmp_path / "out.h5"
    write(out, [make_frame(seed=0)])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().split(".")[0]
    stale = tmp_path / f"out.h5.{host}.{dead.pid}.abcd1234.partial"
    running = tmp_path / f"out.h5.{host}.{os.getpid()}.efgh5678.partial"  # this process: still running
    unknown = tmp_path / "out.h5.x1y2z3.partial"  # old-style name, owner unknown
    for path in (stale, running, unknown):
        path.write_bytes(b"partial")
    assert stale_partials(out) == [str(stale)]
    assert main(["data", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stale_work_files"] == [str(stale)]
    with pytest.warns(UserWarning, match="stale work file"):
        write(out, [make_frame(seed=1)])
    assert not stale.exists() and running.exists() and unknown.exists()
    assert FrameFile(out)[0].id == "f1"


# ------------------------------------------------------------------------------------- 3. file mode
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_new_output_mode_follows_umask_and_replacing_keeps_the_mode(tmp_path, umask):
    """Before: mkstemp's 0600 for every output."""
    old = os.umask(umask)
    try:
        path = tmp_path / "new.h5"
        write(path, [make_frame(seed=0)])
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
        os.chmod(path, 0o640)
        write(path, [make_frame(seed=1)])  # overwrite: like open(path, "w"), the file keeps its mode
        assert os.stat(path).st_mode & 0o777 == 0o640
        write(path, [make_frame(seed=2)], mode="a")  # append (copy + rename): keeps its mode
        assert os.stat(path).st_mode & 0o777 == 0o640 and len(FrameFile(path)) == 2
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------- 4. --verify
def restamp(h5):
    """What a faulty writer would leave: wrong arrays with a matching content hash (when it can be computed)."""
    try:
        h5.attrs["content_sha256"] = content_hash(h5)
    except (OSError, ValueError, IndexError):  # a dataset shorter than the header says cannot be hashed
        pass


def corrupt_force_shape(h5):
    forces = h5["atoms/forces"][:]
    del h5["atoms/forces"]
    h5.create_dataset("atoms/forces", data=forces[:, :2], maxshape=(None, 2))


def corrupt_energy(h5):
    h5["frames/energy"][1] = np.nan  # frame 1 keeps has_energy = True


def corrupt_forces(h5):
    h5["atoms/forces"][9] = [0.0, np.inf, 0.0]  # atom 9 = frame 2 (4 atoms per frame)


def corrupt_missing_label(h5):
    h5["frames/stress"][2] = np.zeros(6)  # frame 2 has no stress (has_stress False): its stress must stay NaN


def corrupt_short_forces(h5):
    h5["atoms/forces"].resize(10, axis=0)  # frame 2 (atoms 8..11) loses rows; the file header says 16


@pytest.mark.parametrize("corrupt, message", [
    (corrupt_force_shape, r"dataset 'atoms/forces' has shape \(16, 2\), expected \(16, 3\).*from frame 0 \(id 'f0'\)"),
    (corrupt_energy, r"frame 1 \(id 'f1'\): 'frames/energy' is NaN or inf but has_energy is True"),
    (corrupt_forces, r"frame 2 \(id 'f2'\): 'atoms/forces' is NaN or inf but has_forces is True"),
    (corrupt_missing_label, r"frame 2 \(id 'f2'\): 'frames/stress' holds a value but has_stress is False"),
    (corrupt_short_forces, r"'atoms/forces' has 10 rows, the file header says 16: .* from frame 2 \(id 'f2'\)"),
])
def test_verify_checks_shapes_and_values_not_only_the_hash(tmp_path, capsys, corrupt, message):
    """Before: a file with a wrong force shape or a NaN energy marked present passed --verify (its hash matched)."""
    from matkit.cli import main

    path = tmp_path / "data.h5"
    write(path, [make_frame(seed=0), make_frame(seed=1), make_frame(seed=2, stress=None), make_frame(seed=3)])
    verify_file(path)  # valid, with a missing label (NaN + has_stress False)
    with h5py.File(path, "r+") as h5:
        corrupt(h5)
        restamp(h5)
    with pytest.raises(HDF5FormatError, match=message) as error:
        verify_file(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    capsys.readouterr()
    assert main(["data", "info", str(path), "--verify"]) != 0
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and str(path) in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------------- 5. CLI errors
def standalone_data_cli(argv):
    """The ``data`` commands under a bare top-level parser (no shared error handling): their own mechanism."""
    import argparse

    from matkit.data.cli import register

    parser = argparse.ArgumentParser(prog="matkit")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def broken_mlearn(tmp_path):
    items = json.load(open(fixture("mlearn_si_4.json")))
    items[2]["outputs"]["forces"] = items[2]["outputs"]["forces"][:-1]
    source = tmp_path / "broken.json"
    json.dump(items, open(source, "w"))
    return str(source)


@pytest.mark.parametrize("make_args, expected", [
    (lambda d: ["data", "convert", str(d / "absent.json"), str(d / "o.h5"), "--format", "mlearn"],
     r"absent\.json: no such file"),
    (lambda d: ["data", "convert", fixture("mlearn_si_4.json"), str(d / "o.h5"), "--format", "xyz"],
     r"argument --format: invalid choice: 'xyz'"),
    (lambda d: ["data", "convert", fixture("mp20_val_5.csv"), str(d / "o.h5"), "--format", "mp20csv",
                "--label-columns", "gap"], r"mp20_val_5\.csv: missing column\(s\) \['gap'\]"),
    (lambda d: ["data", "convert", broken_mlearn(d), str(d / "o.h5"), "--format", "mlearn", "--strict"],
     r"broken\.json: frame 2 \(id 'Si-2'\): forces has shape \(63, 3\), expected \(64, 3\)"),
    (lambda d: ["data", "info", str(d / "absent.h5")], r"absent\.h5: no such file"),
    (lambda d: ["data", "info", fixture("mlearn_si_4.json")], r"mlearn_si_4\.json: not a readable HDF5 file"),
])
@pytest.mark.parametrize("entry", ["main", "standalone"])
def test_cli_user_errors_are_one_line(tmp_path, capsys, make_args, expected, entry):
    """Before: Python tracebacks (and argparse's many-line usage) for user errors."""
    import re

    from matkit.cli import main

    argv = make_args(tmp_path) + ["--no-progress"] * ("convert" in make_args(tmp_path))
    capsys.readouterr()
    try:
        status = (main if entry == "main" else standalone_data_cli)(argv)
    except SystemExit as exit_:  # argparse
        status = exit_.code
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert status not in (0, None) and len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert re.search(expected, lines[0]), lines[0]
    assert not glob.glob(str(tmp_path / "*.partial")) and not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize("entry", ["main", "standalone"])
def test_cli_debug_keeps_the_traceback(tmp_path, entry):
    from matkit.cli import main

    argv = ["data", "info", str(tmp_path / "absent.h5"), "--debug"]
    with pytest.raises(FileNotFoundError, match="absent.h5: no such file"):
        (main if entry == "main" else standalone_data_cli)(argv)


# ------------------------------------------------------------------------------------- 6. bad rows
def bad_mp20_csv(tmp_path):
    """mp20_val_5.csv with row 1 (mp-1103778) unparsable and row 3 (mp-754553) truncated: its last atom lines are
    gone, so the CIF still parses, as Zn3N (too little N) instead of Zn3N2."""
    table = pd.read_csv(fixture("mp20_val_5.csv"))
    assert table.loc[3, "material_id"] == "mp-754553" and table.loc[3, "pretty_formula"] == "Zn3N2"
    table.loc[1, "cif"] = "data_broken\n_cell_length_a 3.0\nloop_\n_atom_site_label\n"
    lines = table.loc[3, "cif"].rstrip().splitlines()
    table.loc[3, "cif"] = "\n".join(lines[:-4]) + "\n"
    path = tmp_path / "bad.csv"
    table.to_csv(path, index=False)
    return path, table


def test_mp20csv_bad_rows_are_named_skipped_and_counted(tmp_path):
    """Before: the unparsable row aborted the conversion, and the truncated row was converted as another compound."""
    source, table = bad_mp20_csv(tmp_path)
    out = tmp_path / "mp20.h5"
    with pytest.warns(SkippedFrameWarning) as caught:
        counts = convert(source, out, "mp20csv", progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedFrameWarning)]
    assert counts["frames_added"] == 3 and counts["frames_skipped"] == 2 and counts["skipped"] == messages
    assert messages[0].startswith(f"{source}: row 1 (mp-1103778): cannot parse the 'cif' column")
    assert messages[1].startswith(f"{source}: row 3 (mp-754553): the CIF parses as Zn3N")
    assert "'pretty_formula' column says Zn3N2" in messages[1]
    frames = FrameFile(out)
    assert [frames[k].id for k in range(len(frames))] == ["mp-865981", "mp-39712", "mp-20332"]
    for k, row in zip(range(3), table.drop(index=[1, 3]).itertuples()):
        assert frames[k].properties["formation_energy_per_atom"] == row.formation_energy_per_atom
    with pytest.raises(BadItemError, match=r"row 1 \(mp-1103778\)"):
        convert(source, tmp_path / "strict.h5", "mp20csv", progress=False, strict=True)
    assert not (tmp_path / "strict.h5").exists()
    # rows are numbered across CSV chunks (pandas' running index)
    seen = []
    assert len(list(read_mp20csv(source, chunksize=2, on_bad=seen.append))) == 3
    assert [m.split(": ")[1] for m in seen] == ["row 1 (mp-1103778)", "row 3 (mp-754553)"]


def test_mp20csv_cli_reports_each_skipped_row_and_the_count(tmp_path, capsys):
    from matkit.cli import main

    source, _ = bad_mp20_csv(tmp_path)
    out = tmp_path / "mp20.h5"
    capsys.readouterr()
    assert main(["data", "convert", str(source), str(out), "--format", "mp20csv", "--no-progress"]) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("matkit data convert: skipped ")]
    assert len(skipped) == 2 and "row 1 (mp-1103778)" in skipped[0] and "row 3 (mp-754553)" in skipped[1]
    assert "wrote 3 frames" in captured.out and "skipped 2 bad rows" in captured.out
    assert "Traceback" not in captured.err


def test_one_bad_frame_never_stops_the_other_converters(tmp_path):
    """Before: a frame with a short force array (mlearn) or a missing key (MPtrj) aborted the whole conversion."""
    with pytest.warns(SkippedFrameWarning, match=r"broken\.json: frame 2 \(id 'Si-2'\): forces has shape"):
        counts = convert(broken_mlearn(tmp_path), tmp_path / "si.h5", "mlearn", progress=False, flush_frames=1)
    assert counts["frames_added"] == 3 and counts["frames_skipped"] == 1
    assert [f.id for f in FrameFile(tmp_path / "si.h5")] == ["Si-0", "Si-1", "Si-3"]

    source, mp_id, frame_id = mptrj_without_force(tmp_path)
    with pytest.warns(SkippedFrameWarning, match=f"MPtrj frame {mp_id}/{frame_id} lacks key"):
        counts = convert(source, tmp_path / "mptrj.h5", "mptrj", progress=False)
    assert counts["frames_added"] == 10 and counts["frames_skipped"] == 1


def test_malformed_extxyz_frame_names_the_frame(tmp_path):
    """A frame ASE cannot parse ends the file (the next frames cannot be found reliably): the error names it."""
    lines = open(fixture("acac_3.xyz")).read().splitlines()
    lines[2 * 17 + 5] = "C  not-a-number 0.0 0.0 0.0 0.0 0.0"  # frame 2, an atom line
    source = tmp_path / "bad.xyz"
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.xyz: frame 2: cannot parse extxyz"):
        convert(source, tmp_path / "out.h5", "extxyz", progress=False, energy_key="energy", forces_key="forces")
    assert not (tmp_path / "out.h5").exists() and not glob.glob(str(tmp_path / "*.partial"))
