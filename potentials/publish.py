"""Turn a finished training run into a bundled potential: ``potentials/<name>/`` with a model card.

    python potentials/publish.py NAME [--run runs/potentials/NAME]

Copies the run's ``best.pt`` (EMA weights at the lowest validation loss, or ``run.select_by`` number; a plain matkit
checkpoint, loads with ``weights_only=True``) to ``potentials/NAME/model.pt``, evaluates it again on the held-out
validation split in float64 (``matkit evaluate ... --split val``), times energy+forces on a typical structure, and
writes ``potentials/NAME/README.md`` (the model card) and ``val_errors.json``. The training configuration stays in
``potentials/NAME/config.yaml`` (earlier stages of a multi-stage training in ``stage*.yaml``); hand-written card
sections in ``potentials/NAME/card_extra.md`` are copied into the card before "Reproduce".

``--test DATASET`` (repeatable) also evaluates the published model on a labelled dataset never used in training
(for example the same molecule sampled at a higher temperature): the errors go to ``test_errors.json`` and a card
section.
To add ``--test`` to a potential whose run folder is gone, copy its ``model.pt`` to ``RUN/best.pt`` and pass
``--run RUN``: the card keeps the training sentence it states (the run log is what it comes from otherwise).

``--upgrade-checkpoint`` only re-saves ``potentials/NAME/model.pt`` in the current checkpoint format (format
version 2 adds a checksum) and checks that weights, hyperparameters, metadata and every other entry are unchanged.

``--refit-references`` re-solves the per-element reference energies by least squares on the trained model's
residuals over the training split before publishing (``matkit.training.stats.refit_reference_energies``): for
data of one composition the energy zero drifts in long force-dominated training; forces and stress do not change.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent

DATA_CARDS = {
    "mlearn": ("mlearn (Zuo et al., J. Phys. Chem. A 124, 731 (2020)), VASP PBE; BSD-3-Clause",
               "raw mlearn PBE energies (mlearn's own scale: not MP-compatible; no MP2020 corrections)"),
    "acetylacetone": ("BOTNet acetylacetone 300 K MD (Batatia et al. 2022), DFT; MIT",
                      "total DFT energies of the source (the per-element reference energies are fitted; every frame is "
                      "C5H8O2, so only their sum over the molecule is determined and the single values mean nothing)"),
}

# what a --test dataset measures, by file name
TEST_NOTES = {
    "acetylacetone_600K": "500 geometries from a 600 K MD run (BOTNet `train_600K.xyz`, the same DFT settings as the "
                          "300 K training data). The model saw only 300 K geometries, so this measures extrapolation "
                          "to hotter, more distorted molecules.",
}


ARCHITECTURE_NOTES = {
    "faenet": "FAENet is made invariant by frame averaging over the 8 PCA frames of each structure. Highly symmetric "
              "crystals (cubic cells) have degenerate covariance eigenvalues, so their frames are not unique and "
              "rotation invariance is approximate for them (matkit warns; see matkit/nn/frame_averaging.py). The "
              "energy is still exactly invariant to translations, permutations and re-wrapping.",
    "escn": "eSCN uses spherical-grid nonlinearities; with the default grids the equivariance error is at round-off "
            "level (see tests/test_escn.py).",
}


def timing_structure(species):
    """A typical structure for the speed line of the card: 64-atom bulk for crystals, the molecule otherwise."""
    from ase.build import bulk

    if species == [14]:
        return bulk("Si", "diamond", a=5.43, cubic=True).repeat(2), "64-atom diamond Si"
    if species == [32]:
        return bulk("Ge", "diamond", a=5.76, cubic=True).repeat(2), "64-atom diamond Ge"
    if species == [42]:
        return bulk("Mo", "bcc", a=3.16, cubic=True).repeat(4), "128-atom bcc Mo"
    if species == [3]:
        return bulk("Li", "bcc", a=3.44, cubic=True).repeat(4), "128-atom bcc Li"
    return None, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--run", default=None, help="run folder (default runs/potentials/NAME)")
    parser.add_argument("--refit-references", action="store_true",
                        help="refit the reference energies on the training split's residuals (forces unchanged)")
    parser.add_argument("--test", action="append", default=[], metavar="DATASET",
                        help="also evaluate on this labelled dataset (never used in training); repeatable")
    parser.add_argument("--upgrade-checkpoint", action="store_true",
                        help="only re-save potentials/NAME/model.pt in the current checkpoint format (adds the "
                             "checksum); weights and metadata stay bit-identical")
    args = parser.parse_args(argv)
    if args.upgrade_checkpoint:
        upgrade_checkpoint(ROOT / "potentials" / args.name / "model.pt")
        return 0

    import matkit

    folder = ROOT / "potentials" / args.name
    run = Path(args.run) if args.run else ROOT / "runs" / "potentials" / args.name
    best = run / "best.pt"
    model, payload = matkit.load_checkpoint(best, return_payload=True)
    meta = payload["metadata"]
    folder.mkdir(parents=True, exist_ok=True)
    dataset = meta["dataset"]
    refit_note = ""
    if args.refit_references:
        refit_note = refit_and_save(model, meta, ROOT / dataset, folder / "model.pt")
    else:
        shutil.copyfile(best, folder / "model.pt")
    # parity plots come from the training run; a run without them (run.parity_plots=false) or a refitted model
    # gets them here
    reuse_plots = (run / "parity_forces.png").exists() and not args.refit_references
    copied = ("parity_energy.png", "parity_forces.png", "metrics.csv") if reuse_plots else ("metrics.csv",)
    for extra in copied:
        if (run / extra).exists():
            shutil.copyfile(run / extra, folder / extra)

    errors_path = folder / "val_errors.json"
    plots = [] if reuse_plots else ["--plots", str(folder)]
    # repository-relative paths (run from the repository root), so the card's JSON names no machine's folders
    subprocess.run([sys.executable, "-m", "matkit.cli", "evaluate", str((folder / "model.pt").relative_to(ROOT)),
                    str(dataset), "--split", "val", "--dtype", "float64", "--json", str(errors_path), "--no-progress",
                    *plots], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    errors = json.loads(errors_path.read_text())["metrics"]
    test_section = evaluate_test_sets(folder, args.test, dataset)

    species = [int(z) for z in model.species]
    from matkit.training.datasets import dataset_species, load_dataset

    trained_on = dataset_species(load_dataset(str(ROOT / dataset), model.cutoff))  # a fine-tune keeps more
    atoms, label = timing_structure(trained_on)
    if atoms is None:
        from matkit.data.dataset import HDF5Dataset

        frame = HDF5Dataset(str(ROOT / dataset), cutoff=model.cutoff)[0]
        from ase import Atoms

        atoms = Atoms(numbers=frame.atomic_numbers.numpy(), positions=frame.pos.double().numpy())
        label = f"{len(atoms)}-atom molecule from the dataset"
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from timing import time_energy_forces

    from matkit.calculator import MatkitCalculator

    torch.set_num_threads(1)
    t32 = time_energy_forces(MatkitCalculator(model, dtype="float32"), atoms)
    t64 = time_energy_forces(MatkitCalculator(model, dtype="float64"), atoms)

    n_params = sum(p.numel() for p in model.parameters())
    wall = finished_sentence(run, folder)
    source, energy_scale = next(v for k, v in DATA_CARDS.items() if k in dataset)
    config_text = (folder / "config.yaml").read_text() if (folder / "config.yaml").exists() else "(not found)"
    # multi-stage training: potentials/NAME/stage1.yaml, stage2.yaml, ... run before config.yaml (the final stage)
    stages = sorted(folder.glob("stage*.yaml"), key=lambda path: int(path.stem.removeprefix("stage")))
    stage_note = (f" (final stage of {len(stages) + 1}; earlier stages: {', '.join(f'`{p.name}`' for p in stages)})"
                  if stages else "")
    stage_commands = "".join(f"matkit train potentials/{args.name}/{p.name}\n" for p in stages)
    # hand-written sections (e.g. an MD energy-conservation check) live in card_extra.md and survive republishing
    extra = (folder / "card_extra.md").read_text().strip() + "\n\n" if (folder / "card_extra.md").exists() else ""
    # where the training ran: a "# hardware: ..." line in config.yaml, else the default CPU set-up
    hardware = next((line.split(":", 1)[1].strip() for line in config_text.splitlines()
                     if line.startswith("# hardware:")), "CPU, 1 thread")
    stage_configs = "".join(f"\n`{p.name}`:\n\n```yaml\n{p.read_text().strip()}\n```\n" for p in stages)

    publish_command = (f"python potentials/publish.py {args.name}"
                       + (" --refit-references" if args.refit_references else "")
                       + "".join(f" --test {path}" for path in args.test))
    # the comment column of the train line above it, or two spaces after a longer command
    publish_pad = " " * max(2, 46 + len(args.name) - len(publish_command))

    # paragraphs between the validation table and the plots line, each followed by a blank line
    paragraphs = "".join(f"{part}\n\n" for part in (test_section, ARCHITECTURE_NOTES.get(payload["model"], "")) if part)

    def err(key):
        return in_milli(errors.get(key))

    split_sentence = describe_split((meta.get("config") or {}).get("data") or {})
    # the long rows of the card's table
    split_row = (f"| split | {meta.get('train_structures')} training / {meta.get('val_structures')} validation "
                 f"structures: {split_sentence}. No separate test split exists for this data, so these are "
                 "validation errors, not test errors. |")
    start = training_start(stages, meta.get("config"))
    shown = trained_on if start else species
    others = (f" (the other {len(species) - len(shown)} elements keep `{start}`'s values, on its scale, not this one)"
              if len(shown) < len(species) else "")
    energy_row = (f"| energy scale | {energy_scale}; fitted reference energies (eV): "
                  f"{reference_energies(model, shown)}{others}{refit_note} |")
    species_text = ", ".join(matkit_symbols(species))
    if start and len(species) > len(trained_on):
        species_text = (f"{', '.join(matkit_symbols(trained_on))} (trained); the model keeps all {len(species)} "
                        f"elements of `{start}`, but only these are fitted to this data")
    origin = (f"fine-tuned with matkit from `{start}` on `{dataset}`" if start
              else f"trained with matkit on `{dataset}`")
    select_by = (meta.get("config") or {}).get("run", {}).get("select_by", "loss")
    quantity, _, error = select_by.partition("_")
    chosen = "" if select_by == "loss" else f" (lowest validation {quantity} {error.upper()})"
    training_row = (f"| training | best checkpoint{chosen} after epoch {meta.get('epoch', 0)} (step {meta.get('step')})"
                    f"{stage_note}, AdamW, cosine schedule, EMA weights; float32; {hardware}. {wall} |")
    weights_row = (f"| weights | `model.pt`, a matkit checkpoint ({(folder / 'model.pt').stat().st_size / 1e6:.2f} MB; "
                   "loads with `weights_only=True`) |")

    card = f"""# {args.name}

A `{payload['model']}` potential {origin}.

```python
from matkit.calculator import MatkitCalculator
atoms.calc = MatkitCalculator.from_pretrained("{args.name}", dtype="float64")   # or "float32" for fast MD
```

| | |
|---|---|
| architecture | `{payload['model']}`, {n_params:,} parameters; hyperparameters in `config.yaml` / the checkpoint |
| species | {species_text} |
| cutoff | {model.cutoff} Å |
| training data | `{dataset}`: {source} |
{split_row}
{energy_row}
{training_row}
| forces / stress | conservative: autograd of the energy (positions and a symmetric strain) |
{weights_row}
| license | weights: same terms as the training data ({source.split(';')[-1].strip()}); code: MIT |

## Validation errors (held-out split, float64, `matkit evaluate model.pt {dataset} --split val`)

| quantity | MAE | RMSE |
|---|---|---|
| energy (meV/atom) | {err('energy_mae')} | {err('energy_rmse')} |
| forces (meV/Å, per component) | {err('forces_mae')} | {err('forces_rmse')} |
| stress (meV/Å^3, per component) | {err('stress_mae')} | {err('stress_rmse')} |

{paragraphs}Parity plots: `parity_energy.png`, `parity_forces.png`; learning curves: `metrics.csv`.

## Speed

Energy + forces through `MatkitCalculator` on {label}, 1 CPU thread (torch {torch.__version__}), median of 20
calls on a shared 2-core machine: {t32 * 1e3:.1f} ms (float32), {t64 * 1e3:.1f} ms (float64).

{extra}## Reproduce

```bash
{stage_commands}matkit train potentials/{args.name}/config.yaml          # writes runs/potentials/{args.name}/
{publish_command}{publish_pad}# copies best.pt here, evaluates, writes this card
```
{stage_configs}
`config.yaml`:

```yaml
{config_text.strip()}
```
"""
    (folder / "README.md").write_text(card)
    print(f"published {args.name}: val E MAE {err('energy_mae')} meV/atom, F MAE {err('forces_mae')} meV/Å; "
          f"EF {t32 * 1e3:.1f} ms (f32) / {t64 * 1e3:.1f} ms (f64) on {label}")
    return 0


def training_start(stages, run_config):
    """The checkpoint training started from (``finetune.from_checkpoint``), or None for training from scratch.
    In a multi-stage training it is the first stage's: every later stage warm-restarts from the stage before it."""
    first = yaml.safe_load(Path(stages[0]).read_text()) if stages else run_config
    return ((first or {}).get("finetune") or {}).get("from_checkpoint")


def finished_sentence(run, folder) -> str:
    """The run log's "finished after N epochs, ..." sentence for the card; without a run log (republishing a bundled
    model from a copy of its ``model.pt``, e.g. to add ``--test``), the sentence the existing card states."""
    log = run / "train.log"
    if log.exists():
        line = next((line for line in reversed(log.read_text().splitlines()) if "finished after" in line), "")
        return line.split("; checkpoints in")[0].split("INFO ")[-1]
    card = folder / "README.md"
    match = re.search(r"finished after [^|]*?(?= \|)", card.read_text()) if card.exists() else None
    return match.group(0) if match else ""


def describe_split(data: dict) -> str:
    """How the validation split of a run was made, from its recorded ``data`` configuration (the seed and fraction
    the run used, not assumed ones)."""
    if data.get("val"):
        return f"validation on the separate file `{data['val']}`"
    fraction, seed = data.get("val_fraction"), data.get("seed")
    if fraction is None or seed is None:
        return "a seeded random validation split held out of training (seed and fraction not recorded)"
    return f"a seeded random {100 * fraction:g} % validation split held out of training (seed {seed})"


def in_milli(value) -> str:
    """An error in eV-based units as a card cell in meV-based units (two decimals), or "n/a" when missing."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value * 1000:.2f}"


def refit_and_save(model, meta, dataset_path, out) -> str:
    """Refit ``model``'s reference energies on its training split, save it to ``out``; return a card note."""
    import torch

    from matkit.checkpoint import save_checkpoint
    from matkit.training.datasets import load_dataset
    from matkit.training.stats import refit_reference_energies

    torch.set_num_threads(1)
    dataset = load_dataset(str(dataset_path), model.cutoff, dtype=torch.float64)
    delta = refit_reference_energies(model, dataset, meta["train_indices"])
    meta = {**meta, "reference_energies_refit": {"delta_eV": [float(d) for d in delta],
                                                 "split": "train", "structures": len(meta["train_indices"])}}
    save_checkpoint(model, out, metadata=meta)
    shifts = ", ".join(f"{s} {1000 * d:+.2f} meV" for s, d in zip(matkit_symbols(model.species), delta))
    return (f" (refitted after training by least squares on the model's residuals over the training split: {shifts}; "
            "this moves only the energy zero, forces and stress are unchanged)")


def _identical(a, b) -> bool:
    """Deep equality of checkpoint entries; tensors must match in dtype, shape and every bit."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def upgrade_checkpoint(path) -> None:
    """Re-save the checkpoint ``path`` in the current format (with its checksum), every entry kept as stored.

    The stored entries are written back through :func:`matkit.checkpoint.write_payload` (what
    :func:`matkit.save_checkpoint` writes with) rather than from a rebuilt model: a rebuilt model would store the
    defaults of hyperparameters added since (``readout``, ...) and up-cast some constant buffers to float64. The
    file is replaced only if every entry but ``format_version`` and the checksum reads back identical (tensors bit
    for bit, same dtype) and the rebuilt model's weights are identical too."""
    import os

    from matkit.checkpoint import CHECKSUM_KEY, load_checkpoint, read_checkpoint, write_payload

    path = Path(path)
    before = read_checkpoint(path)
    new = path.with_name(path.name + ".new")
    write_payload(before, new)
    after = read_checkpoint(new)
    ignored = ("format_version", CHECKSUM_KEY)
    changed = [k for k in set(before) | set(after) if k not in ignored
               and (k not in before or k not in after or not _identical(before[k], after[k]))]
    if not _identical(load_checkpoint(path).state_dict(), load_checkpoint(new).state_dict()):
        changed.append("rebuilt model weights")
    if changed:
        new.unlink()
        raise RuntimeError(f"{path}: re-saving would change {sorted(changed)}; left unchanged")
    os.replace(new, path)
    print(f"{path}: format version {before.get('format_version')} -> {after['format_version']}, "
          f"checksum {after[CHECKSUM_KEY][:16]}...")


def evaluate_test_sets(folder, datasets, train_dataset) -> str:
    """Evaluate ``folder/model.pt`` on each of ``datasets`` (float64, all structures); write ``test_errors.json``
    (a list of ``matkit evaluate --json`` results) and return the card section ("" without datasets)."""
    import tempfile

    results = []
    for path in datasets:
        path = Path(path).resolve()
        if path == (ROOT / train_dataset).resolve():
            raise SystemExit(f"--test {path}: that is the training dataset; its held-out split is already reported")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "errors.json"
            subprocess.run([sys.executable, "-m", "matkit.cli", "evaluate", str(folder / "model.pt"), str(path),
                            "--dtype", "float64", "--json", str(out), "--no-progress"],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            result = json.loads(out.read_text())
        result["dataset"] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        result["checkpoint"] = "model.pt"
        results.append(result)
    test_path = folder / "test_errors.json"
    if not results:
        test_path.unlink(missing_ok=True)
        return ""
    test_path.write_text(json.dumps(results, indent=2) + "\n")

    rows = "".join(f"| `{r['dataset']}` | {r['structures']} | {in_milli(r['metrics'].get('energy_mae'))} / "
                   f"{in_milli(r['metrics'].get('energy_rmse'))} | {in_milli(r['metrics'].get('forces_mae'))} / "
                   f"{in_milli(r['metrics'].get('forces_rmse'))} |\n" for r in results)
    notes = "".join(f"{note}\n\n" for key, note in TEST_NOTES.items() if any(key in r["dataset"] for r in results))
    return ("## Test on data never used in training (float64, all structures, `test_errors.json`)\n\n"
            "| dataset | structures | energy MAE / RMSE (meV/atom) | forces MAE / RMSE (meV/Å) |\n"
            f"|---|---|---|---|\n{rows}\n{notes}").strip()


def matkit_symbols(species):
    from ase.data import chemical_symbols

    return [chemical_symbols[z] for z in species]


def reference_energies(model, shown=None):
    from ase.data import chemical_symbols

    values = model.atomic_reference_energies.detach().cpu().numpy()
    return ", ".join(f"{chemical_symbols[z]} {values[k]:.4f}" for k, z in enumerate(model.species)
                     if shown is None or z in shown)


if __name__ == "__main__":
    sys.exit(main())
