"""BinaryConnect on CIFAR-10: the lasagne branch's cifar10.py (docs/original.md §4.3), on data
preprocessed like pylearn2's pylearn2_gcn_whitened (GCN then ZCA, §6.2). BinaryNet's
Train-time/cifar10.py (§13) is config/cifar10_binarynet.py over this script.

Edit the values below, or override any of them: `python cifar10.py --stochastic=False`.
"""

# BN parameters
batch_size = 50
alpha = .1  # exponential moving average factor of the BN statistics
epsilon = 1e-4  # added to the batch's std in BN (§3); to the variance in BinaryNet's (§13.4)

# Training parameters
num_epochs = 500

# BinaryConnect
binary = True
stochastic = True
H = 1.  # (-H, +H) are the two binary values
W_LR_scale = "Glorot"  # "Glorot": the inverse Glorot coefficient of each layer (§1.3)

# Decaying LR
LR_start = 0.003
LR_fin = 0.000002

# BinaryNet (§13): config/cifar10_binarynet.py sets its experiment
network = "binaryconnect"  # "binarynet": Lasagne's BN, then binary_tanh_unit (+-1 activations)
inputs = "binaryconnect"  # GCN + ZCA (§6.2); "binarynet": 2*pixels/255 - 1

train_set_size = 45000  # the last 5000 training images are the validation set

# Options for the paper's own MNIST protocol (§9); the defaults are the lasagne branch's
optimizer = "adam"  # "adam": Lasagne's Adam (§2.2); "sgd": plain SGD, no momentum (§9)
loss_reduction = "mean"  # "mean": over the batch and the 10 outputs (§4.1); "sum_classes" (§9)
monitor_step = 1  # epochs between evaluations (and reshuffles)
bn_stats = "ema"  # "ema": running averages with alpha (§3); "recompute": §9's averages

# This project's additions
data_dir = "data/cifar10"  # cifar-10-python.tar.gz or cifar-10-batches-py/; downloaded if missing
verify_checksums = True  # False accepts subsets and mirrors of the official files
seed = 1234
device = "auto"  # cuda when available, else cpu
compile = "auto"  # "auto": on for CUDA, on the CPU for the paper's network sizes; "true"; "false"
precision = "fp32"  # "fp32": the original's float32 (TF32 off); "tf32"; "bf16" (autocast products)
out_dir = ""  # default: runs/cifar10-<timestamp>
resume = ""  # a run directory to continue
checkpoint_every = 1  # epochs between checkpoints (last.pt, metrics.jsonl): what a kill can redo


def load_data(c):
    from bc_datasets import load_cifar10
    return load_cifar10(c["data_dir"], train_set_size=c["train_set_size"],
                        verify_checksums=c["verify_checksums"],
                        gcn_zca=c["inputs"] == "binaryconnect")


def build_model(c):
    from models import cnn
    # 128C3-128C3-P2-256C3-256C3-P2-512C3-512C3-P2-1024FC-1024FC-10FC
    return cnn(widths=(128, 256, 512), fc_units=1024, binary=c["binary"],
               stochastic=c["stochastic"], H=c["H"], W_LR_scale=c["W_LR_scale"],
               epsilon=c["epsilon"], alpha=c["alpha"], network=c["network"])


if __name__ == "__main__":
    from configurator import configure
    config = configure(globals())

    from rundir import start_run
    from training import train
    with start_run("cifar10", config) as run:
        print('Loading CIFAR-10 dataset...')
        data = load_data(config)

        print('Building the CNN...')
        model = build_model(config)

        train(model, data, run)
