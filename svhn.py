"""BinaryConnect on SVHN: the lasagne branch's svhn.py (§4.4 of ../shared/SPEC.md). Run
`python svhn_preprocessing.py` first: it writes the GCN + LCN sets (§6.3) this script reads.
Edit the values below or override any of them: `python svhn.py --stochastic=False`."""
import os

# BN parameters
batch_size = 50
alpha = .1  # exponential moving average factor of the BN statistics
epsilon = 1e-4

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

# This project's additions
SVHN_LOCAL_PATH = os.environ.get("SVHN_LOCAL_PATH", "data/svhn/preprocessed")
seed = 1234
device = "auto"  # cuda when available, else cpu
out_dir = ""  # default: runs/svhn-<timestamp>
resume = ""  # a run directory to continue

if __name__ == "__main__":
    from configurator import configure
    config = configure(globals())

    import binary_connect
    import training
    from bc_datasets import load_svhn
    from models import cnn

    run = training.start_run("svhn", config)
    LR_decay = binary_connect.lr_decay(LR_start, LR_fin, num_epochs)
    print("LR_decay = " + training.str2(LR_decay))

    print('Loading SVHN dataset')
    train_set, valid_set, test_set = load_svhn(SVHN_LOCAL_PATH)

    print('Building the CNN...')
    # 64C3-64C3-P2-128C3-128C3-P2-256C3-256C3-P2-1024FC-1024FC-10FC: the paper's "half the
    # hidden units" halved only the conv layers in the code (§4.4).
    model = cnn(widths=(64, 128, 256), fc_units=1024, binary=binary, stochastic=stochastic,
                H=H, W_LR_scale=W_LR_scale, epsilon=epsilon, alpha=alpha)

    training.fit(model, train_set, valid_set, test_set, run,
                 batch_size, LR_start, LR_decay, num_epochs)
