"""BinaryConnect on permutation-invariant MNIST: the lasagne branch's mnist.py (§4.2 of
../shared/SPEC.md; not the paper's own MNIST experiment, see README). `python mnist.py --help`-free:
edit the values below, or override any of them: `python mnist.py --stochastic=False`."""

# BN parameters
batch_size = 100
alpha = .15  # exponential moving average factor of the BN statistics
epsilon = 1e-4

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

# This project's additions
data_dir = "data/mnist"  # the four official idx files; downloaded there when missing
train_set_size = 50000  # the rest of the training file is the validation set
verify_checksums = True  # False accepts subsets and mirrors of the official files
seed = 1234
device = "auto"  # cuda when available, else cpu
out_dir = ""  # default: runs/mnist-<timestamp>
resume = ""  # a run directory to continue

if __name__ == "__main__":
    from configurator import configure
    config = configure(globals())

    import binary_connect
    import training
    from bc_datasets import load_mnist
    from models import mlp

    run = training.start_run("mnist", config)
    LR_decay = binary_connect.lr_decay(LR_start, LR_fin, num_epochs)
    print("LR_decay = " + training.str2(LR_decay))

    print('Loading MNIST dataset...')
    train_set, valid_set, test_set = load_mnist(data_dir, train_set_size=train_set_size,
                                                verify_checksums=verify_checksums)

    print('Building the MLP...')
    model = mlp(num_units=num_units, n_hidden_layers=n_hidden_layers, dropout_in=dropout_in,
                dropout_hidden=dropout_hidden, binary=binary, stochastic=stochastic, H=H,
                W_LR_scale=W_LR_scale, epsilon=epsilon, alpha=alpha)

    training.fit(model, train_set, valid_set, test_set, run,
                 batch_size, LR_start, LR_decay, num_epochs)
