import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
KEYS_FILE = SHARED / "design" / "var-checkpoint-keys.txt"


@pytest.fixture(scope="session")
def vae():
    from actvar_export.init import init_vae
    return init_vae(seed=0).eval()


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="session")
def actvar_ckpt(ckpt_dir):
    """A random-weight ActVAR d2 checkpoint file (16 experts) written by the init-ckpt code path."""
    from actvar_export.checkpoint import save_atomic
    from actvar_export.init import init_checkpoint
    p = ckpt_dir / "actvar_d2.pt"
    save_atomic(init_checkpoint(2, seed=3), p)
    return p


def make_model(depth=2, actvar=None, seed=0):
    from actvar_export.config import ModelSpec, VarConfig
    from actvar_export.init import init_var
    return init_var(ModelSpec(VarConfig(depth), actvar), seed).eval()
