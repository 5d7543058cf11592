"""BinaryConnect on permutation-invariant MNIST: the lasagne branch's mnist.py (docs/original.md §4.2).
BinaryNet's Train-time/mnist.py (§13) is config/mnist_binarynet.py over this script.

This is the original repository's MNIST script (3x2048 MLP, Adam, batch 100, 250 epochs), not the
paper's own MNIST experiment (3x1024, SGD, batch 200, 1000 epochs): config/mnist_paper_*.py sets
that one up (docs/original.md §9). Edit the values below, or override any of them:
`python mnist.py --stochastic=False`, `python mnist.py my_config.py --num_epochs=10`.
"""

# BN parameters
batch_size = 100
alpha = .15  # exponential moving average factor of the BN statistics
epsilon = 1e-4  # added to the batch's std in BN (§3); to the variance in BinaryNet's (§13.4)

# MLP parameters
num_units = 2048
n_hidden_layers = 3

# Training parameters
num_epochs = 250

# Dropout parameters
dropout_in = 0.  # 0. means no dropout
dropout_hidden = 0.

# BinaryConnect
binary = True
stochastic = True
H = 1.  # (-H, +H) are the two binary values
W_LR_scale = "Glorot"  # "Glorot": the inverse Glorot coefficient of each layer (§1.3)

# Decaying LR
LR_start = .001
LR_fin = 0.000003

# BinaryNet (§13): config/mnist_binarynet.py sets its experiment
network = "binaryconnect"  # "binarynet": Lasagne's BN, then binary_tanh_unit (+-1 activations)
inputs = "binaryconnect"  # pixels/255 minus the per-pixel mean (§6.1); "binarynet": 2*pixels/255 - 1

# The paper's own MNIST protocol (§9) needs these; the defaults are the lasagne branch's
optimizer = "adam"  # "adam": Lasagne's Adam (§2.2); "sgd": plain SGD, no momentum (§9)
init_range = 1.  # binary W ~ U(-init_range*H, init_range*H) (§1.4); §9 used 2
bn_form = "std"  # "std": (x-mean)/(std+epsilon) (§3); "var": (x-mean)/sqrt(var+epsilon) (§9)
bn_stats = "ema"  # "ema": running averages with alpha (§3); "recompute": §9's averages over train+valid
loss_reduction = "mean"  # "mean": over the batch and the 10 outputs (§4.1); "sum_classes" (§9)
monitor_step = 1  # epochs between evaluations (and reshuffles); §9 used 2

# This project's additions
data_dir = "data/mnist"  # the four official idx files; downloaded there when missing
train_set_size = 50000  # the rest of the training file is the validation set
verify_checksums = True  # False accepts subsets and mirrors of the official files
seed = 1234
device = "auto"  # cuda when available, else cpu
compile = "auto"  # "auto": on for CUDA, on the CPU for the paper's network sizes; "true"; "false"
precision = "fp32"  # "fp32": the original's float32 (TF32 off); "tf32"; "bf16" (autocast products)
out_dir = ""  # default: runs/mnist-<timestamp>
resume = ""  # a run directory to continue
checkpoint_every = 1  # epochs between checkpoints (last.pt, metrics.jsonl): what a kill can redo


def load_data(c):
    from bc_datasets import load_mnist
    sets = load_mnist(c["data_dir"], train_set_size=c["train_set_size"],
                      verify_checksums=c["verify_checksums"],
                      center=c["inputs"] == "binaryconnect")
    if c["inputs"] == "binarynet":  # §13.5: pylearn2's center=False pixels in [0, 1], then 2x - 1
        sets = tuple((2 * X - 1., y) for X, y in sets)
    return sets


def build_model(c):
    from models import mlp
    return mlp(num_units=c["num_units"], n_hidden_layers=c["n_hidden_layers"],
               dropout_in=c["dropout_in"], dropout_hidden=c["dropout_hidden"], binary=c["binary"],
               stochastic=c["stochastic"], H=c["H"], W_LR_scale=c["W_LR_scale"],
               epsilon=c["epsilon"], alpha=c["alpha"], init_range=c["init_range"],
               bn_form=c["bn_form"], network=c["network"])


if __name__ == "__main__":
    from configurator import configure
    config = configure(globals())

    from rundir import start_run
    from training import train
    with start_run("mnist", config) as run:
        print('Loading MNIST dataset...')
        data = load_data(config)

        print('Building the MLP...')
        model = build_model(config)

        train(model, data, run)
