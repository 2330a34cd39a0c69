"""TensorNet against torchmd-net 3.1.0's TensorNet (warp-lang CPU kernels) through its TMDNETCalculator.

Same hyperparameters on both sides: 128 channels, 2 layers, 32 expnorm functions, cutoff 0-5 Å, O(3), SiLU,
random weights. The peer has no stress (TMDNETCalculator implements energy and forces only), reads
``atoms.info["charge"]`` (the runner sets 0) and builds a minimum-image neighbour list inside the model
(cutoff must stay below half the box: fine for all benchmark systems).
"""
import os

MODEL = "tensornet"
PEER = "torchmd-net 3.1.0 TensorNet (warp CPU kernels, random weights)"
PEER_PYTHON = os.environ.get("MATKIT_TMD_PYTHON")  # torchmd-net venv, see model_specs/README.md

HPARAMS = dict(hidden_channels=128, num_layers=2, num_rbf=32, cutoff=5.0, cutoff_lower=0.0, group="O(3)",
               activation="silu")


def ours_hparams():
    return dict(HPARAMS)


def make_peer_calculator(species):
    import os
    import tempfile

    import torch
    from torchmdnet.calculators import TMDNETCalculator
    from torchmdnet.models.model import create_model

    args = dict(model="tensornet", embedding_dimension=HPARAMS["hidden_channels"], num_layers=HPARAMS["num_layers"],
                num_rbf=HPARAMS["num_rbf"], rbf_type="expnorm", trainable_rbf=False, activation="silu",
                cutoff_lower=0.0, cutoff_upper=HPARAMS["cutoff"], max_z=128, max_num_neighbors=64,
                equivariance_invariance_group=HPARAMS["group"], static_shapes=False, precision=32,
                derivative=False, atom_filter=-1, prior_model=None, output_model="Scalar", reduce_op="sum",
                output_mlp_num_layers=0)
    torch.manual_seed(0)
    model = create_model(dict(args))
    path = os.path.join(tempfile.mkdtemp(prefix="tmd_tensornet_"), "model.ckpt")
    torch.save({"hyper_parameters": args, "state_dict": {"model." + k: v for k, v in model.state_dict().items()}},
               path)
    return TMDNETCalculator(path, device="cpu")
