"""A small exported MLP for test_packed.py, importable from a subprocess too."""
from pathlib import Path

import numpy as np


def small_npz(folder):
    """784 -> 16 -> 16 -> 10, deterministic BC, seeded: the same file in every process."""
    path = Path(folder) / "small.npz"
    if not path.exists():
        import torch

        import export
        from models import mlp
        np.random.seed(11)
        torch.manual_seed(11)
        model = mlp(num_units=16, n_hidden_layers=2, stochastic=False)
        arrays = export.export_arrays(model, (1, 28, 28), dict(dataset="mnist"))
        arrays["input_mean"] = np.zeros((1, 28, 28), np.float32)
        export.save_npz(path, arrays)
    return str(path)
