"""Training of matkit potentials: typed YAML configuration, losses, trainer with exact resume, DDP,
evaluation and parity plots.

Typical use::

    matkit train config.yaml                     # see examples/train_config.yaml
    matkit evaluate runs/x/best.pt data.h5 --json errors.json

or from Python::

    from matkit.training import load_config, train
    summary = train(load_config("config.yaml"), train_dataset=my_graphs)
"""
from .config import ConfigError, TrainConfig, config_from_dict, load_config
from .datasets import GraphListDataset, load_dataset
from .evaluate import evaluate_model
from .trainer import Trainer, train

__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "load_config", "GraphListDataset", "load_dataset",
           "evaluate_model", "Trainer", "train"]
