"""Load matgl TensorNet potentials (e.g. TensorNet-MatPES-PBE / -r2SCAN) as matkit :class:`TensorNet`, without matgl.

A matgl potential folder holds ``model.json`` (the constructor arguments of matgl's ``Potential`` and of the
``TensorNet`` inside it) and ``state.pt`` (a plain state dict, read with ``torch.load(weights_only=True)``);
``model.pt`` (matgl's pickled class header) is never read.

matgl's ``Potential`` (``matgl.apps._pes_pyg``) computes ``E = data_std * sum_i e_i + data_mean + sum_i ref[Z_i]``
(eV), with ``e_i`` the TensorNet's per-atom outputs. That maps to matkit's ``scale = data_std``, ``shift = 0``,
``E0[Z] = ref[Z]``. A nonzero ``data_mean`` (a per-structure constant), the ZBL repulsion (``calc_repuls``),
state (charge / functional) embeddings, intensive readouts and other radial bases or activations are refused
with an error naming the setting, never approximated.

matgl changed TensorNet's message-passing convention between releases, and the weights record which one they
were trained with (``@model_version`` of the TensorNet in ``model.json``):

* version 1 (matgl <= 2.0.6; the MatPES ``v2025.1`` weights): the embedding sums its messages at the
  destination of each edge and its species-pair linear ``emb2`` sees ``[neighbour || centre]``;
* version 2 (matgl >= 3.0, PRs materialyzeai/matgl#758/#759): messages are summed at the source and ``emb2``
  sees ``[centre || neighbour]``; edge vectors point the other way (neighbour minus centre), which changes
  nothing for O(3) models (every node tensor is transposed, every norm is unchanged) and is refused for SO(3).

matgl >= 3.0 still loads version-1 weights (with an "Incompatible model version" warning) but evaluates them
with the version-2 convention, which is wrong for any structure with more than one element; this importer
applies the convention the weights were trained with (numbers in the model cards of ``tensornet-matpes-*``).

Other conventions, mapped by permuting weights (checked against matgl 2.0.6 and 4.1.2 themselves:
``tests/test_matgl_import.py`` and ``benchmarks/tensornet_vs_matgl.py``):

* species: matgl embeds by position in ``element_types``; the matkit model's ``species`` are those elements'
  atomic numbers in the same order;
* species-pair embedding: matkit's ``pair_linear`` sees ``[centre || neighbour]``, so for version 1 the two
  column halves of ``emb2`` are swapped;
* the 3F distance / norm factors: matgl reshapes them to (N, F, 3) (I, A, S interleaved per channel), matkit
  to (3, F) blocks: the output rows of the last scalar linear of the embedding and of each interaction are
  permuted;
* smooth spherical Bessel basis (``rbf_type="SphericalBessel"``, ``use_smooth=True``: ``max_n`` functions;
  ``max_l`` does not enter), no self-loops, gated readout: :class:`TensorNet` options.

Units and signs of the source: energies eV, positions Å. matgl's ``Potential`` returns stress in GPa as
``160.2 (1/V) dE/d(strain)`` (tensile positive, the ASE sign); its ``PESCalculator(stress_unit="eV/A3")``
gives eV/Å^3. matkit computes ``(1/V) dE/d(strain)`` in eV/Å^3 directly: same sign, no conversion.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping, Optional, Tuple

import torch

from ..models.tensornet import TensorNet

__all__ = ["read_matgl_potential", "tensornet_from_matgl_state", "load_matgl_tensornet", "MatglImportError"]

#: matgl activation names -> matkit TensorNet activations (matgl's ``softplus2`` is ``softplus(x) - log 2``)
_ACTIVATIONS = {"swish": "silu", "tanh": "tanh", "sigmoid": "sigmoid", "softplus2": "ssp"}
#: modules of matgl's PyG TensorNet (matgl <= 2.x: ``_tensornet_pyg``; >= 3.0: ``_tensornet``)
_MODULES = ("matgl.models._tensornet_pyg", "matgl.models._tensornet")
#: state-dict entries that carry no weights of the network (checked separately or not needed)
_NON_WEIGHTS = {"data_mean", "data_std", "model.bond_expansion.rbf.cutoff", "element_refs.property_offset",
                "element_refs.onehot"}


class MatglImportError(ValueError):
    """A matgl potential folder is missing, unreadable, or uses a setting matkit's TensorNet does not have."""


def read_matgl_potential(path) -> Tuple[dict, dict]:
    """Read ``model.json`` and ``state.pt`` of a matgl potential folder -> ``(config, state_dict)``.

    ``config`` is the parsed ``model.json``; ``state_dict`` maps names to CPU tensors. Nothing is unpickled
    beyond tensors and plain containers (``weights_only=True``).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MatglImportError(f"matgl potential folder not found: {folder}")
    config_path, state_path = folder / "model.json", folder / "state.pt"
    for needed in (config_path, state_path):
        if not needed.is_file():
            raise MatglImportError(f"{folder} is not a matgl potential folder: {needed.name} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MatglImportError(f"{config_path}: not valid JSON ({err})") from None
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise MatglImportError(f"refusing to load {state_path}: it holds pickled objects other than tensors "
                               f"({str(err).splitlines()[0]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise MatglImportError(f"cannot read {state_path}: corrupt or truncated ({err})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MatglImportError(f"{state_path} is not a state dict of tensors")
    return config, dict(state)


def _model_hparams(config: Mapping, where: str) -> dict:
    """Check a matgl ``Potential`` config -> (matkit TensorNet hyperparameters, TensorNet ``@model_version``)."""
    problems = []
    if config.get("@class") != "Potential" or not str(config.get("@module", "")).startswith("matgl.apps"):
        raise MatglImportError(f"{where}: not a matgl Potential (model.json @class={config.get('@class')!r}, "
                               f"@module={config.get('@module')!r})")
    kwargs = config.get("kwargs", {})
    model = kwargs.get("model", {})
    if model.get("@class") != "TensorNet" or model.get("@module") not in _MODULES:
        raise MatglImportError(f"{where}: only matgl's PyG TensorNet ({' or '.join(_MODULES)}) can be "
                               f"imported, this is {model.get('@module')}.{model.get('@class')}")
    version = model.get("@model_version")
    if version not in (1, 2):
        raise MatglImportError(f"{where}: TensorNet @model_version={version!r}; this importer knows versions 1 "
                               "(matgl <= 2.0.6) and 2 (matgl >= 3.0)")
    args = model.get("init_args", {})
    for flag, what in (("calc_repuls", "ZBL repulsion"), ("calc_charge", "charge equilibration")):
        if kwargs.get(flag):
            problems.append(f"{flag}=True ({what})")
    if args.get("rbf_type") != "SphericalBessel" or not args.get("use_smooth"):
        problems.append(f"rbf_type={args.get('rbf_type')!r}, use_smooth={args.get('use_smooth')!r} "
                        "(only the smooth spherical Bessel basis)")
    if args.get("activation_type") not in _ACTIVATIONS:
        problems.append(f"activation_type={args.get('activation_type')!r} (supported: {sorted(_ACTIVATIONS)})")
    if args.get("is_intensive", True):
        problems.append("is_intensive=True (an intensive readout is not a potential energy)")
    if args.get("include_state") or args.get("ntypes_state") or args.get("dim_state_feats"):
        problems.append("state (global attribute) embedding")
    if args.get("task_type", "regression") != "regression" or int(args.get("ntargets", 1)) != 1:
        problems.append(f"task_type={args.get('task_type')!r}, ntargets={args.get('ntargets')!r}")
    group = args.get("equivariance_invariance_group", "O(3)")
    if group not in ("O(3)", "SO(3)") or (group == "SO(3)" and version == 2):
        problems.append(f"equivariance_invariance_group={group!r} with @model_version {version} (supported: O(3); "
                        "SO(3) for version 1)")
    if problems:
        raise MatglImportError(f"{where}: cannot import this matgl TensorNet: " + "; ".join(problems))

    from ase.data import atomic_numbers

    unknown = [e for e in args["element_types"] if e not in atomic_numbers]
    if unknown:
        raise MatglImportError(f"{where}: unknown element symbols in element_types: {unknown}")
    return dict(species=[atomic_numbers[e] for e in args["element_types"]], cutoff=float(args["cutoff"]),
                hidden_channels=int(args["units"]), num_layers=int(args["nblocks"]), num_rbf=int(args["max_n"]),
                activation=_ACTIVATIONS[args["activation_type"]], group=args.get("equivariance_invariance_group",
                                                                                  "O(3)"),
                radial_basis="smooth_bessel", self_loops=False, readout="gated"), version


def _blocked_rows(channels: int) -> torch.Tensor:
    """Row order taking matgl's interleaved (F, 3) factor layout to matkit's (3, F) blocks."""
    return torch.arange(3 * channels).view(channels, 3).t().reshape(-1)


def tensornet_from_matgl_state(config: Mapping, state_dict: Mapping[str, torch.Tensor],
                               dtype: torch.dtype = torch.float64, where: str = "matgl potential") -> TensorNet:
    """Build a matkit :class:`TensorNet` from a parsed matgl ``model.json`` and its ``state.pt`` state dict.

    dtype : dtype of the network's parameters (reference energies, scale and shift stay float64).
    where : a name for error messages (the folder).
    """
    hp, version = _model_hparams(config, where)
    sd = dict(state_dict)
    F, L = hp["hidden_channels"], hp["num_layers"]
    mean = sd.get("data_mean")
    if mean is not None and float(mean) != 0.0:
        raise MatglImportError(f"{where}: data_mean={float(mean)} is a per-structure energy constant that "
                               "matkit's per-atom output transform cannot represent")
    basis_cutoff = sd.get("model.bond_expansion.rbf.cutoff")
    if basis_cutoff is not None and not math.isclose(float(basis_cutoff), hp["cutoff"], rel_tol=1e-6):
        raise MatglImportError(f"{where}: radial-basis cutoff {float(basis_cutoff)} differs from the model "
                               f"cutoff {hp['cutoff']}")
    unused = set(sd) - _NON_WEIGHTS
    emb, rows = "model.tensor_embedding.", _blocked_rows(F)

    def take(key):
        if key not in sd:
            raise MatglImportError(f"{where}: state.pt lacks {key!r} (not a {L}-block TensorNet with {F} units?)")
        unused.discard(key)
        return sd[key]

    try:
        new = _mapped_weights(take, emb, rows, version, F, L)
    except (IndexError, RuntimeError) as err:  # a tensor of the wrong size for these settings
        raise MatglImportError(f"{where}: weight shapes do not match the model.json settings ({err})") from None
    if new["embedding.species_embedding.weight"].shape[0] != len(hp["species"]):
        raise MatglImportError(f"{where}: {new['embedding.species_embedding.weight'].shape[0]} embedded species "
                               f"but {len(hp['species'])} element_types")
    if unused:
        raise MatglImportError(f"{where}: state.pt has weights this importer does not map: {sorted(unused)[:8]} "
                               "(a different matgl TensorNet variant?)")

    model = TensorNet(**hp).to(dtype)
    missing = set(model.state_dict()) - set(new) - set(model._FLOAT64_BUFFERS)
    if missing:
        raise RuntimeError(f"importer left parameters unset: {sorted(missing)}")
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in new.items()}, strict=False)
    except RuntimeError as err:
        raise MatglImportError(f"{where}: weight shapes do not match the model.json settings: {err}") from None
    if "data_std" in sd:
        model.scale.fill_(float(sd["data_std"]))
    refs = sd.get("element_refs.property_offset")
    if refs is not None:
        refs = refs.to(torch.float64).reshape(-1) if refs.ndim <= 1 else None
        if refs is None or refs.shape[0] != len(hp["species"]):
            raise MatglImportError(f"{where}: element_refs must be one value per element_types entry "
                                   f"({len(hp['species'])}); state-dependent references are not supported")
        model.atomic_reference_energies.copy_(refs)
    return model.eval()


def _mapped_weights(take, emb: str, rows: torch.Tensor, version: int, F: int, L: int) -> dict:
    """matkit state-dict entries from matgl's (``take(key)`` returns matgl's tensor ``key``)."""
    pair_w = take(emb + "emb2.weight")
    new = {
        "embedding.species_embedding.weight": take(emb + "emb.weight"),
        "embedding.pair_linear.weight": torch.cat((pair_w[:, F:], pair_w[:, :F]), 1) if version == 1 else pair_w,
        "embedding.pair_linear.bias": take(emb + "emb2.bias"),
        "embedding.distance_proj.weight": torch.cat([take(emb + f"distance_proj{k}.weight") for k in (1, 2, 3)]),
        "embedding.distance_proj.bias": torch.cat([take(emb + f"distance_proj{k}.bias") for k in (1, 2, 3)]),
        "embedding.tensor_mixers": torch.stack([take(emb + f"linears_tensor.{k}.weight") for k in range(3)]),
        "embedding.init_norm.weight": take(emb + "init_norm.weight"),
        "embedding.init_norm.bias": take(emb + "init_norm.bias"),
        "embedding.scalar_mlp.0.weight": take(emb + "linears_scalar.0.weight"),
        "embedding.scalar_mlp.0.bias": take(emb + "linears_scalar.0.bias"),
        "embedding.scalar_mlp.2.weight": take(emb + "linears_scalar.1.weight")[rows],
        "embedding.scalar_mlp.2.bias": take(emb + "linears_scalar.1.bias")[rows],
        "out_norm.weight": take("model.out_norm.weight"),
        "out_norm.bias": take("model.out_norm.bias"),
        "out_linear.weight": take("model.linear.weight"),
        "out_linear.bias": take("model.linear.bias"),
    }
    for layer in range(L):
        src = f"model.layers.{layer}."
        for k in range(3):
            order = rows if k == 2 else slice(None)
            new[f"layers.{layer}.radial_mlp.{2 * k}.weight"] = take(src + f"linears_scalar.{k}.weight")[order]
            new[f"layers.{layer}.radial_mlp.{2 * k}.bias"] = take(src + f"linears_scalar.{k}.bias")[order]
        new[f"layers.{layer}.tensor_mixers"] = torch.stack([take(src + f"linears_tensor.{k}.weight")
                                                            for k in range(6)])
    for branch in ("layers", "gates"):
        for k in (0, 2, 4, 6):
            for p in ("weight", "bias"):
                new[f"output_mlp.{branch}.{k}.{p}"] = take(f"model.final_layer.gated.{branch}.{k}.{p}")
    return new


def load_matgl_tensornet(path, dtype: torch.dtype = torch.float64) -> TensorNet:
    """Load the matgl TensorNet potential in folder ``path`` (``model.json`` + ``state.pt``) as a matkit model."""
    config, state = read_matgl_potential(path)
    return tensornet_from_matgl_state(config, state, dtype=dtype, where=str(path))


def _main(argv: Optional[list] = None) -> int:
    """``python -m matkit.convert.matgl SRC_FOLDER OUT.pt``: write a matkit checkpoint of a matgl TensorNet."""
    import argparse

    from ..checkpoint import save_checkpoint

    parser = argparse.ArgumentParser(prog="python -m matkit.convert.matgl", description=_main.__doc__)
    parser.add_argument("source", help="matgl potential folder (model.json + state.pt)")
    parser.add_argument("output", help="matkit checkpoint to write (.pt)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="parameter dtype stored in the checkpoint (matgl's weights are float32)")
    parser.add_argument("--energy-scale", choices=("own", "raw", "mp2020"), default="own",
                        help="energy scale recorded for 'matkit discovery' (default own: not the Materials "
                             "Project's, as for MatPES; formation energies then need fitted references)")
    args = parser.parse_args(argv)
    try:
        model = load_matgl_tensornet(args.source, dtype=getattr(torch, args.dtype))
    except MatglImportError as err:
        parser.exit(2, f"error: {err}\n")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(args.source).resolve().name)
    save_checkpoint(model, args.output, metadata={"source": f"matgl:{name}", "converted_by": "matkit.convert.matgl",
                                                  "energy_scale": args.energy_scale})
    print(f"wrote {args.output}: {len(model.species)} elements, cutoff {model.cutoff} Å")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
