"""Formation energies on a model's own energy scale: per-element reference energies fitted to known ones.

A model trained on another DFT setting than the Materials Project's (e.g. MatPES PBE without Hubbard U, or
r2SCAN) predicts total energies on its own scale, where MP's elemental references and the MP2020 corrections do
not apply. Its formation energies against MP are then defined through chemical potentials ``mu_el`` on the
model's scale, fitted by least squares so that the model's formation energies of a *training* set of relaxed
crystals match MP's::

    e_form = (E' - sum_el n_el mu_el - sum_el m_el t_el) / N        (eV/atom)

with ``E'`` the model's total energy, after one of three ``corrections``:

* ``"none"``: ``E' = E``, no ``t`` terms;
* ``"mp2020"``: ``E'`` = E after pymatgen's MP2020 corrections (anion corrections; the Hubbard-U corrections of
  oxides and fluorides of Co, Cr, Fe, Mn, Mo, Ni, V, W, as if the model were GGA+U);
* ``"fitted-u"``: ``E' = E``, plus one fitted energy ``t_el`` per atom of each of those U elements in an oxide or
  fluoride (``m_el`` its count there): the shape of MP's U correction, with values fitted on the model's scale.

The fit minimises ``sum_i (e_form_i(model) - e_form_i(MP))^2 + lam * (sum_el (mu_el - mu_el^MP)^2 + sum t^2)``
(``loss="l2"``, least squares) or the sum of absolute errors (``loss="l1"``, by iteratively reweighted least
squares: the benchmark's metric is the MAE, and a few materials the two DFT settings treat differently then pull
less on everyone's references); the small ridge toward MP's elemental references ``mu^MP`` only keeps rarely seen
elements well-conditioned. Elements
absent from the training set get no reference: their compounds get no formation energy (an error naming the
element), never a guess. :class:`ReferenceFit` is saved as JSON and given to ``matkit discovery run/metrics
--references``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from .energies import MP_HUBBARD_U, _composition, elemental_reference_energies, mp2020_corrected_energy

__all__ = ["CORRECTIONS", "LOSSES", "ReferenceFit", "fit_reference_energies", "cross_validated_formation_energies",
           "u_term_counts"]

CORRECTIONS = ("none", "mp2020", "fitted-u")
LOSSES = ("l2", "l1")
FORMAT = "matkit-reference-energies"


def u_term_counts(composition) -> Dict[str, float]:
    """Atoms of each MP Hubbard-U element in ``composition`` if it is an oxide or fluoride, else none."""
    comp = _composition(composition)
    symbols = {str(el) for el in comp.elements}
    if not symbols & {"O", "F"}:
        return {}
    return {str(el): float(amount) for el, amount in comp.items() if str(el) in MP_HUBBARD_U}


@dataclass
class ReferenceFit:
    """Fitted chemical potentials (eV/atom) and U terms (eV per U-element atom in oxides/fluorides).

    ``formation_energy(structure, energy)`` applies them; ``save`` / ``load`` read and write JSON.
    """

    elements: Dict[str, float]
    corrections: str = "none"
    u_terms: Dict[str, float] = field(default_factory=dict)
    loss: str = "l2"
    regularization: float = 1e-6
    fitted_on: str = ""
    n_fit: int = 0
    fit_mae: float = float("nan")
    note: str = ""

    def corrected_energy(self, structure, energy: float) -> float:
        """``E'`` of the module docstring (eV)."""
        if self.corrections == "mp2020":
            return mp2020_corrected_energy(structure, energy)
        return float(energy)

    def formation_energy(self, structure, energy: float) -> float:
        """Formation energy per atom (eV/atom) of ``structure`` (ase.Atoms or pymatgen) with total ``energy`` (eV,
        the model's scale). Raises ``KeyError`` naming elements the fit has no reference for."""
        comp = _composition(structure)
        missing = sorted(str(el) for el in comp.elements if str(el) not in self.elements)
        if missing:
            raise KeyError(f"no fitted reference energy for {missing} ({comp.formula}): the references were "
                           f"fitted on {self.fitted_on or 'a set'} without these elements")
        total = self.corrected_energy(structure, energy)
        total -= sum(amount * self.elements[str(el)] for el, amount in comp.items())
        if self.corrections == "fitted-u":
            total -= sum(n * self.u_terms.get(el, 0.0) for el, n in u_term_counts(comp).items())
        return float(total / comp.num_atoms)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, **asdict(self)}
        path.write_text(json.dumps(data, indent=1, allow_nan=True))
        return path

    @classmethod
    def load(cls, path) -> "ReferenceFit":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference-energy file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a matkit reference-energy file (written by 'matkit discovery "
                             f"fit-references'; missing 'format': '{FORMAT}')")
        data.pop("format")
        if data.get("corrections") not in CORRECTIONS or data.get("loss", "l2") not in LOSSES:
            raise ValueError(f"{path}: corrections must be one of {CORRECTIONS} and loss one of {LOSSES}, got "
                             f"{data.get('corrections')!r}, {data.get('loss')!r}")
        bad = [el for el, v in data.get("elements", {}).items() if not np.isfinite(v)]
        if bad:
            raise ValueError(f"{path}: non-finite reference energies for {bad}")
        return cls(**data)


def fit_reference_energies(structures: Sequence, energies: Sequence[float], e_form_target: Sequence[float],
                           corrections: str = "none", regularization: float = 1e-6,
                           prior: Optional[Mapping[str, float]] = None, fitted_on: str = "",
                           loss: str = "l2") -> ReferenceFit:
    """Least-squares chemical potentials (and U terms) that map model energies onto target formation energies.

    structures : relaxed structures (ase.Atoms / pymatgen; compositions suffice unless ``corrections="mp2020"``).
    energies : their total energies from the model, eV. e_form_target : the formation energies to reproduce
    (eV/atom; MP's, MP2020-corrected). corrections : see the module docstring. regularization : ridge weight
    ``lam`` (dimensionless, per-atom residuals in eV/atom). prior : element -> eV/atom the ridge pulls toward
    (default: MP's 2023-02-07 elemental references). loss : "l2" (least squares) or "l1" (least absolute
    deviations).
    """
    if corrections not in CORRECTIONS:
        raise ValueError(f"corrections must be one of {CORRECTIONS}, got {corrections!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    energies = np.asarray(energies, dtype=float)
    target = np.asarray(e_form_target, dtype=float)
    if not (len(structures) == len(energies) == len(target)):
        raise ValueError(f"{len(structures)} structures, {len(energies)} energies, {len(target)} targets")
    ok = np.isfinite(energies) & np.isfinite(target)
    if ok.sum() == 0:
        raise ValueError("no structure with a finite energy and target formation energy to fit on")
    comps = [_composition(s) for s in structures]
    corrected = np.array([mp2020_corrected_energy(s, e) if corrections == "mp2020" and k else e
                          for s, e, k in zip(structures, energies, ok)])
    elements = sorted({str(el) for k, c in enumerate(comps) if ok[k] for el in c.elements})
    u_names = sorted({el for k, c in enumerate(comps) if ok[k] for el in u_term_counts(c)}) \
        if corrections == "fitted-u" else []
    columns = elements + [f"U:{el}" for el in u_names]
    index = {name: j for j, name in enumerate(columns)}
    rows = np.flatnonzero(ok)
    A = np.zeros((len(rows), len(columns)))
    y = np.zeros(len(rows))
    for r, k in enumerate(rows):
        n_atoms = comps[k].num_atoms
        for el, amount in comps[k].items():
            A[r, index[str(el)]] = amount / n_atoms
        for el, count in (u_term_counts(comps[k]).items() if u_names else ()):
            A[r, index[f"U:{el}"]] = count / n_atoms
        y[r] = corrected[k] / n_atoms - target[k]        # = sum_el x_el mu_el (+ U terms) when fitted exactly
    prior = dict(elemental_reference_energies() if prior is None else prior)
    mu0 = np.array([prior.get(el, 0.0) for el in elements] + [0.0] * len(u_names))
    lam = float(regularization)
    solution = _ridge(A, y, mu0, lam, np.ones(len(y)))
    if loss == "l1":  # iteratively reweighted least squares: weights 1 / |residual|
        for _ in range(100):
            weights = 1.0 / np.maximum(np.abs(A @ solution - y), 1e-5)
            updated = _ridge(A, y, mu0, lam, weights)
            converged = np.abs(updated - solution).max() < 1e-10
            solution = updated
            if converged:
                break
    residual = A @ solution - y
    fit = ReferenceFit(elements={el: float(solution[index[el]]) for el in elements}, corrections=corrections,
                       u_terms={el: float(solution[index[f"U:{el}"]]) for el in u_names}, loss=loss,
                       regularization=lam, fitted_on=fitted_on, n_fit=int(len(rows)),
                       fit_mae=float(np.abs(residual).mean()))
    return fit


def _ridge(A, y, mu0, lam, weights) -> np.ndarray:
    """argmin_x sum_i w_i (A x - y)_i^2 + lam |x - mu0|^2, via the stacked system for delta = x - mu0."""
    root = np.sqrt(weights)[:, None]
    stacked = np.vstack([root * A, np.sqrt(lam) * np.eye(A.shape[1])])
    rhs = np.concatenate([root[:, 0] * (y - A @ mu0), np.zeros(A.shape[1])])
    delta, *_ = np.linalg.lstsq(stacked, rhs, rcond=None)
    return mu0 + delta


def cross_validated_formation_energies(structures: Sequence, energies: Sequence[float],
                                       e_form_target: Sequence[float], folds: int = 5, seed: int = 0,
                                       **fit_kwargs) -> np.ndarray:
    """Formation energies (eV/atom) of every structure from references fitted on the other ``folds - 1`` folds
    (NaN where a fold's fit lacks an element): an honest error estimate on the training set itself."""
    n = len(structures)
    order = np.random.default_rng(seed).permutation(n)
    out = np.full(n, np.nan)
    energies, target = np.asarray(energies, float), np.asarray(e_form_target, float)
    for fold in range(folds):
        test = order[fold::folds]
        train = np.setdiff1d(order, test)
        fit = fit_reference_energies([structures[k] for k in train], energies[train], target[train], **fit_kwargs)
        for k in test:
            try:
                out[k] = fit.formation_energy(structures[k], energies[k])
            except (KeyError, ValueError):
                pass
    return out
