"""Round trips: every converter -> HDF5 -> HDF5Dataset gives back the source values (float64), with stress units
and sign converted to ASE eV/Å^3 (tensile positive). References are read independently of matkit's importers."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

from matkit.data import HDF5Dataset, convert, file_info, verify_file
from matkit.data.hdf5 import FrameFile

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
GPA = 160.21766208  # GPa per eV/Å^3 (CODATA 2014, as ase.units)


def fixture(name):
    return os.path.join(FIXTURES, name)


def load_graphs(path, cutoff=3.0):
    dataset = HDF5Dataset(path, cutoff=cutoff, dtype=torch.float64)
    return dataset, [dataset[k] for k in range(len(dataset))]


def voigt(matrix):
    m = np.asarray(matrix, dtype=np.float64).reshape(3, 3)
    return np.array([m[0, 0], m[1, 1], m[2, 2], m[1, 2], m[0, 2], m[0, 1]])


def test_mlearn_round_trip_kbar_vasp_sign_to_ase(tmp_path):
    out = tmp_path / "si.h5"
    convert(fixture("mlearn_si_4.json"), out, "mlearn", progress=False)
    items = json.load(open(fixture("mlearn_si_4.json")))
    _, graphs = load_graphs(out)
    assert len(graphs) == len(items) == 4
    for item, graph in zip(items, graphs):
        lattice = np.array(item["structure"]["lattice"]["matrix"])
        frac = np.array([site["abc"] for site in item["structure"]["sites"]])
        np.testing.assert_allclose(graph.pos.numpy(), frac @ lattice, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(graph.cell[0].numpy(), lattice)
        assert graph.energy.dtype == torch.float64 and graph.energy.item() == item["outputs"]["energy"]
        np.testing.assert_array_equal(graph.forces.numpy(), np.array(item["outputs"]["forces"]))
        xx, yy, zz, xy, yz, xz = item["outputs"]["virial_stress"]
        # shared data README: ASE stress (eV/Å^3) = -virial_stress * 0.1 / 160.21766, reordered to xx yy zz yz xz xy
        expected = -np.array([xx, yy, zz, yz, xz, xy]) * 0.1 / GPA
        np.testing.assert_allclose(graph.stress[0].numpy(), expected, rtol=1e-14, atol=0)
        assert bool(graph.has_stress) and (graph.atomic_numbers == 14).all()


def test_mlearn_stress_sign_compressive_is_negative(tmp_path):
    """A cell under compression has positive VASP pressure (kBar) and negative ASE stress."""
    items = json.load(open(fixture("mlearn_si_4.json")))
    compressed = [k for k, it in enumerate(items) if np.mean(it["outputs"]["virial_stress"][:3]) > 1.0]
    assert compressed, "fixture should contain a compressed cell"
    out = tmp_path / "si.h5"
    convert(fixture("mlearn_si_4.json"), out, "mlearn", progress=False)
    frames = FrameFile(out)
    for k in compressed:
        assert np.mean(frames[k].stress[:3]) < 0


def test_mptrj_json_round_trip_against_ase_db(tmp_path):
    """MPtrj JSON (kBar, VASP sign) and the ASE db of the same real frames give the same ASE stress."""
    out = tmp_path / "mptrj.h5"
    convert(fixture("mptrj_sample.json"), out, "mptrj", progress=False)
    source = json.load(open(fixture("mptrj_sample.json")))
    frames = [(mp_id, fid, item) for mp_id, d in source.items() for fid, item in d.items()]
    dataset, graphs = load_graphs(out)
    assert len(graphs) == 11
    import ase.db

    rows = {row.data["uid"]: row for row in ase.db.connect(fixture("mptrj_thin_11.db")).select()}
    for (mp_id, fid, item), graph in zip(frames, graphs):
        assert graph.frame_id == fid
        assert graph.energy.item() == item["corrected_total_energy"]
        assert graph.corrected_total_energy.item() == item["corrected_total_energy"]
        assert graph.uncorrected_total_energy.item() == item["uncorrected_total_energy"]
        np.testing.assert_array_equal(graph.forces.numpy(), np.array(item["force"]))
        expected = -voigt(item["stress"]) * 0.1 / GPA
        np.testing.assert_allclose(graph.stress[0].numpy(), expected, rtol=1e-14, atol=1e-30)
        row = rows[fid]  # independent: the ASE db stress of the same frame (ASE convention)
        np.testing.assert_allclose(graph.stress[0].numpy(), row.stress, rtol=1e-12, atol=1e-18)
        np.testing.assert_allclose(graph.pos.numpy(), row.positions, atol=1e-9)
        assert graph.energy.item() == row.data["corrected_total_energy"]
        assert row.energy == item["uncorrected_total_energy"]
    raw = tmp_path / "raw.h5"
    convert(fixture("mptrj_sample.json"), raw, "mptrj", energy="uncorrected_total_energy", progress=False)
    assert FrameFile(raw)[0].energy == frames[0][2]["uncorrected_total_energy"]


def test_asedb_round_trip_with_metadata(tmp_path):
    import ase.db

    out = tmp_path / "db.h5"
    convert(fixture("mptrj_thin_11.db"), out, "asedb", id_key="uid", group_key="mp_id", progress=False)
    _, graphs = load_graphs(out)
    rows = list(ase.db.connect(fixture("mptrj_thin_11.db")).select())
    assert len(graphs) == len(rows) == 11
    for row, graph in zip(rows, graphs):
        atoms = row.toatoms()
        np.testing.assert_array_equal(graph.pos.numpy(), atoms.positions)
        np.testing.assert_array_equal(graph.cell[0].numpy(), atoms.cell.array)
        np.testing.assert_array_equal(graph.atomic_numbers.numpy(), atoms.numbers)
        assert graph.energy.item() == row.energy
        np.testing.assert_array_equal(graph.forces.numpy(), row.forces)
        np.testing.assert_array_equal(graph.stress[0].numpy(), row.stress)
        assert graph.frame_id == row.data["uid"]
        assert graph.corrected_total_energy.item() == row.data["corrected_total_energy"]
    info = file_info(out)
    assert info["groups"] == {"mp-1020019": 10, "mp-1205402": 1}


def test_extxyz_plain_keys_from_singlepoint_calculator(tmp_path):
    from ase.io import read

    out = tmp_path / "acac.h5"
    with pytest.warns(UserWarning, match="SinglePointCalculator"):
        convert(fixture("acac_3.xyz"), out, "extxyz", progress=False)
    reference = read(fixture("acac_3.xyz"), ":")
    _, graphs = load_graphs(out)
    assert len(graphs) == 3
    for atoms, graph in zip(reference, graphs):
        np.testing.assert_array_equal(graph.pos.numpy(), atoms.positions)
        assert graph.energy.item() == atoms.get_potential_energy()
        np.testing.assert_array_equal(graph.forces.numpy(), atoms.get_forces())
        assert not bool(graph.has_stress) and torch.isnan(graph.stress).all()
        assert not graph.pbc.any()
        assert graph.dihedral_angle.item() == atoms.info["dihedral_angle"]


def test_extxyz_ref_keys_stress_and_virials(tmp_path):
    from ase.io import read

    out = tmp_path / "ref.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # REF_* keys present: no fallback warning
        convert(fixture("ref_keys_3.extxyz"), out, "extxyz", progress=False)
    reference = read(fixture("ref_keys_3.extxyz"), ":")
    _, graphs = load_graphs(out)
    for k, (atoms, graph) in enumerate(zip(reference, graphs)):
        assert graph.energy.item() == atoms.info["REF_energy"]
        np.testing.assert_array_equal(graph.forces.numpy(), atoms.arrays["REF_forces"])
        if k == 0:
            expected = voigt(atoms.info["REF_stress"])
        elif k == 1:
            expected = np.asarray(atoms.info["REF_stress"])
        else:
            expected = -voigt(atoms.info["REF_virials"]) / atoms.get_volume()
        np.testing.assert_allclose(graph.stress[0].numpy(), expected, rtol=1e-14, atol=0)
        assert graph.pbc.all()


def test_deepmd_round_trip_float32_and_virial_sign(tmp_path):
    import ase.db

    out = tmp_path / "dp.h5"
    convert(fixture("deepmd"), out, "deepmd", progress=False)
    dataset, graphs = load_graphs(out)
    assert len(graphs) == 2 + 3
    # systems are read in sorted folder order: li4n2o4p2 then water
    li_dir, water_dir = fixture("deepmd/li4n2o4p2/set.000"), fixture("deepmd/water/set.000")
    coord, force, energy = (np.load(f"{water_dir}/{k}.npy") for k in ("coord", "force", "energy"))
    assert coord.dtype == np.float32
    for f in range(3):
        graph = graphs[2 + f]
        np.testing.assert_array_equal(graph.pos.numpy(), coord[f].astype(np.float64).reshape(-1, 3))
        np.testing.assert_array_equal(graph.forces.numpy(), force[f].astype(np.float64).reshape(-1, 3))
        assert graph.energy.item() == float(energy[f])
        assert graph.frame_id == f"water/set.000/{f}"
        assert (graph.atomic_numbers[:64] == 8).all() and (graph.atomic_numbers[64:] == 1).all()
    rows = [r for r in ase.db.connect(fixture("mptrj_thin_11.db")).select() if r.formula == "Li4N2O4P2"][:2]
    virial = np.load(f"{li_dir}/virial.npy")
    for f, row in enumerate(rows):
        np.testing.assert_allclose(graphs[f].stress[0].numpy(), row.stress, rtol=1e-12, atol=1e-18)
        volume = abs(np.linalg.det(np.load(f"{li_dir}/box.npy")[f].reshape(3, 3)))
        np.testing.assert_allclose(graphs[f].stress[0].numpy(), -voigt(virial[f]) / volume, rtol=1e-15, atol=0)


def test_mp20csv_round_trip_labels(tmp_path):
    import pandas as pd

    out = tmp_path / "mp20.h5"
    convert(fixture("mp20_val_5.csv"), out, "mp20csv", progress=False)
    table = pd.read_csv(fixture("mp20_val_5.csv"))
    dataset, graphs = load_graphs(out)
    assert dataset.properties == ["band_gap", "e_above_hull", "formation_energy_per_atom"]
    for (_, row), graph in zip(table.iterrows(), graphs):
        assert graph.frame_id == row["material_id"]
        assert graph.formation_energy_per_atom.item() == row["formation_energy_per_atom"]
        assert graph.e_above_hull.item() == row["e_above_hull"]
        assert not bool(graph.has_energy) and torch.isnan(graph.energy).all()
        # independent check of the cell: lattice lengths written in the CIF text
        a = float(row["cif"].split("_cell_length_a")[1].split()[0])
        c = float(row["cif"].split("_cell_length_c")[1].split()[0])
        lengths = np.linalg.norm(graph.cell[0].numpy(), axis=1)
        np.testing.assert_allclose(lengths[[0, 2]], [a, c], rtol=1e-7)
        atom_lines = row["cif"].split("_atom_site_occupancy")[1].strip().splitlines()
        assert graph.num_nodes == len(atom_lines)


def test_cli_convert_info_append(tmp_path, capsys):
    from matkit.cli import main

    out = tmp_path / "cli.h5"
    assert main(["data", "convert", fixture("mlearn_si_4.json"), str(out), "--format", "mlearn", "--license",
                 "BSD-3-Clause", "--no-progress"]) == 0
    assert main(["data", "convert", fixture("mlearn_si_4.json"), str(out), "--format", "mlearn", "--append",
                 "--every", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(out), "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_frames"] == 4 + 2 and info["hash_verified"] and info["license"] == "BSD-3-Clause"
    assert [p["frames"] for p in info["provenance"]] == [[0, 4], [4, 6]]
    frames = FrameFile(out)
    np.testing.assert_array_equal(frames[4].positions, frames[0].positions)
    np.testing.assert_array_equal(frames[5].forces, frames[2].forces)
    assert verify_file(out) == info["content_sha256"]
