import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # lets model tests import the shared model_harness
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
