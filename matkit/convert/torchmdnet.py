"""Load torchmd-net (3.x) TensorNet checkpoints into :class:`matkit.models.tensornet.TensorNet`.

torchmd-net embeds atoms by atomic number (``nn.Embedding(max_z, F)``); matkit by species index, so the rows of
the requested atomic numbers are copied. The model is torchmd-net's ``TorchMD_Net(TensorNet, Scalar)``:
per-atom output ``x * std`` (+ an ``Atomref`` prior per element) summed over atoms, ``+ mean`` per structure.
It maps to matkit's ``scale = std``, ``shift = 0``, ``E0[Z] = atomref[Z]``. A nonzero ``mean`` is a per-structure
constant with no per-atom equivalent and is refused, as are the other priors (ZBL, D2, Coulomb) and output
models other than ``Scalar``.

Other conventions handled here: torchmd-net's edge vector is centre minus neighbour (matkit's model uses the
same sign internally), its neighbour list has self-loops (matkit adds them per node), its ``distance_proj1..3``
become one stacked linear, and its ``linears_tensor`` become stacked mixer weights.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..models.tensornet import TensorNet

__all__ = ["load_torchmdnet_tensornet", "tensornet_from_torchmdnet_state", "read_torchmdnet_checkpoint"]


def read_torchmdnet_checkpoint(path) -> dict:
    """Read a torchmd-net / Lightning checkpoint: ``{"hyper_parameters": dict, "state_dict": dict}``.

    Tries ``torch.load(weights_only=True)`` first; Lightning checkpoints that pickle other objects are then
    loaded with ``weights_only=False`` (as torchmd-net's own ``load_model`` does): only load files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"torchmd-net checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{path} is not a torchmd-net checkpoint (needs 'hyper_parameters' and 'state_dict')")
    return ckpt


def _check_hparams(hp: Mapping) -> None:
    problems = []
    if hp.get("model") != "tensornet":
        problems.append(f"model={hp.get('model')!r} (only 'tensornet' is supported)")
    if hp.get("rbf_type", "expnorm") != "expnorm":
        problems.append(f"rbf_type={hp.get('rbf_type')!r} (only 'expnorm')")
    if hp.get("output_model", "Scalar") != "Scalar":
        problems.append(f"output_model={hp.get('output_model')!r} (only 'Scalar')")
    if hp.get("reduce_op", "sum") != "sum":
        problems.append(f"reduce_op={hp.get('reduce_op')!r} (only 'sum')")
    if problems:
        raise ValueError("cannot convert this torchmd-net checkpoint: " + "; ".join(problems))


def _strip(state: Mapping[str, torch.Tensor]) -> dict:
    return {re.sub(r"^model\.", "", k): v for k, v in state.items()}


def tensornet_from_torchmdnet_state(state_dict: Mapping[str, torch.Tensor], hparams: Mapping,
                                    species: Optional[Sequence[int]] = None,
                                    dtype: torch.dtype = torch.float64) -> TensorNet:
    """Build a matkit TensorNet from a torchmd-net state dict (keys with or without ``model.``) and hparams.

    species : atomic numbers the matkit model should support (default: every Z < max_z, up to 118).
    """
    _check_hparams(hparams)
    sd = _strip(state_dict)
    max_z = sd["representation_model.tensor_embedding.emb.weight"].shape[0]
    if species is None:
        species = list(range(1, min(max_z, 119)))
    species = [int(z) for z in species]
    too_big = [z for z in species if z >= max_z]
    if too_big:
        raise ValueError(f"atomic numbers {too_big} are not embedded by this checkpoint (max_z={max_z})")

    model = TensorNet(species=species, cutoff=float(hparams["cutoff_upper"]),
                      hidden_channels=int(hparams["embedding_dimension"]), num_layers=int(hparams["num_layers"]),
                      num_rbf=int(hparams["num_rbf"]), cutoff_lower=float(hparams.get("cutoff_lower", 0.0)),
                      activation=str(hparams.get("activation", "silu")),
                      group=str(hparams.get("equivariance_invariance_group", "O(3)")),
                      trainable_rbf=bool(hparams.get("trainable_rbf", False)),
                      output_hidden_layers=int(hparams.get("output_mlp_num_layers", 0) or 0)).to(dtype)

    rep, emb = "representation_model.", "representation_model.tensor_embedding."
    rows = torch.tensor(species)
    new = {
        "rbf.means": sd[rep + "distance_expansion.means"],
        "rbf.betas": sd[rep + "distance_expansion.betas"],
        "embedding.species_embedding.weight": sd[emb + "emb.weight"][rows],
        "embedding.pair_linear.weight": sd[emb + "emb2.weight"],
        "embedding.pair_linear.bias": sd[emb + "emb2.bias"],
        "embedding.distance_proj.weight": torch.cat([sd[emb + f"distance_proj{k}.weight"] for k in (1, 2, 3)]),
        "embedding.distance_proj.bias": torch.cat([sd[emb + f"distance_proj{k}.bias"] for k in (1, 2, 3)]),
        "embedding.tensor_mixers": torch.stack([sd[emb + f"linears_tensor.{k}.weight"] for k in range(3)]),
        "embedding.init_norm.weight": sd[emb + "init_norm.weight"],
        "embedding.init_norm.bias": sd[emb + "init_norm.bias"],
        "out_norm.weight": sd[rep + "out_norm.weight"],
        "out_norm.bias": sd[rep + "out_norm.bias"],
        "out_linear.weight": sd[rep + "linear.weight"],
        "out_linear.bias": sd[rep + "linear.bias"],
    }
    for k, ours in ((0, 0), (1, 2)):
        for p in ("weight", "bias"):
            new[f"embedding.scalar_mlp.{ours}.{p}"] = sd[emb + f"linears_scalar.{k}.{p}"]
    for layer in range(len(model.layers)):
        src = f"{rep}layers.{layer}."
        for k in range(3):
            for p in ("weight", "bias"):
                new[f"layers.{layer}.radial_mlp.{2 * k}.{p}"] = sd[src + f"linears_scalar.{k}.{p}"]
        new[f"layers.{layer}.tensor_mixers"] = torch.stack([sd[src + f"linears_tensor.{k}.weight"] for k in range(6)])
    head = sorted({int(m.group(1)) for key in sd
                   if (m := re.match(r"output_model\.output_network\.layers\.(\d+)\.weight$", key))})
    ours_head = [i for i, layer in enumerate(model.output_mlp) if isinstance(layer, torch.nn.Linear)]
    if len(head) != len(ours_head):
        raise ValueError(f"output MLP has {len(head)} linear layers in the checkpoint, expected {len(ours_head)}")
    for theirs, ours in zip(head, ours_head):
        for p in ("weight", "bias"):
            new[f"output_mlp.{ours}.{p}"] = sd[f"output_model.output_network.layers.{theirs}.{p}"]

    missing = set(model.state_dict()) - set(new) - set(model._FLOAT64_BUFFERS)
    if missing:
        raise RuntimeError(f"converter left parameters unset: {sorted(missing)}")
    model.load_state_dict({k: v.to(dtype) for k, v in new.items()}, strict=False)
    _map_output_transform(model, sd, rows)
    return model


def _map_output_transform(model: TensorNet, sd: Mapping[str, torch.Tensor], rows: torch.Tensor) -> None:
    mean = sd.get("mean")
    if mean is not None and float(torch.as_tensor(mean).abs().max()) != 0.0:
        raise ValueError(f"torchmd-net model has mean={float(mean)}: a per-structure constant that matkit's "
                         "per-atom output transform cannot represent")
    if "std" in sd:
        model.scale.fill_(float(sd["std"]))
    priors = sorted({key.split(".")[1] for key in sd if key.startswith("prior_model.")})
    for index in priors:
        keys = [key for key in sd if key.startswith(f"prior_model.{index}.")]
        if f"prior_model.{index}.atomref.weight" not in sd:
            raise ValueError(f"unsupported torchmd-net prior (only Atomref can be converted): {keys}")
        atomref = sd[f"prior_model.{index}.atomref.weight"].to(torch.float64).reshape(-1)
        model.atomic_reference_energies += atomref[rows]


def load_torchmdnet_tensornet(ckpt_path, species: Optional[Sequence[int]] = None,
                              dtype: torch.dtype = torch.float64, atomref: bool = True) -> TensorNet:
    """Load a torchmd-net TensorNet checkpoint (``.ckpt``) as a matkit :class:`TensorNet`.

    species : atomic numbers to support (default all Z < max_z); atomref : keep an ``Atomref`` prior's
    per-element energies as ``E0`` (torchmd-net's ASE calculator enables it by default, ``remove_ref_energy=True``).
    """
    ckpt = read_torchmdnet_checkpoint(ckpt_path)
    state = _strip(ckpt["state_dict"])
    if not atomref:
        state = {k: v for k, v in state.items() if not k.startswith("prior_model.")}
    return tensornet_from_torchmdnet_state(state, ckpt["hyper_parameters"], species=species, dtype=dtype)
