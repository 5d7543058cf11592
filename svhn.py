"""BinaryConnect on SVHN: the lasagne branch's svhn.py (docs/original.md §4.4).

Run `python svhn_preprocessing.py` first: it writes the GCN + LCN sets (§6.3) this script reads.
Edit the values below, or override any of them: `python svhn.py --stochastic=False`.
"""
import os

# BN parameters
batch_size = 50
alpha = .1  # exponential moving average factor of the BN statistics
epsilon = 1e-4  # added to the batch's std in BN (§3); to the variance in BinaryNet's (§13.4)

# Training parameters
num_epochs = 200

# BinaryConnect
binary = True
stochastic = True
H = 1.  # (-H, +H) are the two binary values
W_LR_scale = "Glorot"  # "Glorot": the inverse Glorot coefficient of each layer (§1.3)

# Decaying LR
LR_start = 0.01
LR_fin = 0.000003

# BinaryNet (§13): config/svhn_binarynet.py sets its experiment
network = "binaryconnect"  # "binarynet": Lasagne's BN, then binary_tanh_unit (+-1 activations)

# Options for the paper's own MNIST protocol (§9); the defaults are the lasagne branch's
optimizer = "adam"  # "adam": Lasagne's Adam (§2.2); "sgd": plain SGD, no momentum (§9)
loss_reduction = "mean"  # "mean": over the batch and the 10 outputs (§4.1); "sum_classes" (§9)
monitor_step = 1  # epochs between evaluations (and reshuffles)
bn_stats = "ema"  # "ema": running averages with alpha (§3); "recompute": §9's averages

# This project's additions
SVHN_LOCAL_PATH = os.environ.get("SVHN_LOCAL_PATH", "data/svhn/preprocessed")  # svhn_preprocessing.py's output
seed = 1234
device = "auto"  # cuda when available, else cpu
compile = "auto"  # "auto": on for CUDA, on the CPU for the paper's network sizes; "true"; "false"
precision = "fp32"  # "fp32": the original's float32 (TF32 off); "tf32"; "bf16" (autocast products)
out_dir = ""  # default: runs/svhn-<timestamp>
resume = ""  # a run directory to continue
checkpoint_every = 1  # epochs between checkpoints (last.pt, metrics.jsonl): what a kill can redo


def load_data(c):
    from bc_datasets import load_svhn
    return load_svhn(c["SVHN_LOCAL_PATH"])


def build_model(c):
    from models import cnn
    # 64C3-64C3-P2-128C3-128C3-P2-256C3-256C3-P2-1024FC-1024FC-10FC: the paper's "half the
    # hidden units" halved only the conv layers in the code (§4.4).
    return cnn(widths=(64, 128, 256), fc_units=1024, binary=c["binary"],
               stochastic=c["stochastic"], H=c["H"], W_LR_scale=c["W_LR_scale"],
               epsilon=c["epsilon"], alpha=c["alpha"], network=c["network"])


if __name__ == "__main__":
    from configurator import configure
    config = configure(globals())

    from rundir import start_run
    from training import train
    with start_run("svhn", config) as run:
        print('Loading SVHN dataset')
        data = load_data(config)

        print('Building the CNN...')
        model = build_model(config)

        train(model, data, run)
