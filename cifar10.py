"""BinaryConnect on CIFAR-10: the lasagne branch's cifar10.py (§4.3 of ../shared/SPEC.md), on data
preprocessed like pylearn2's pylearn2_gcn_whitened (GCN then ZCA, §6.2). Edit the values below or
override any of them: `python cifar10.py --stochastic=False`."""

# BN parameters
batch_size = 50
alpha = .1  # exponential moving average factor of the BN statistics
epsilon = 1e-4

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

train_set_size = 45000  # the last 5000 training images are the validation set

# This project's additions
data_dir = "data/cifar10"  # cifar-10-python.tar.gz or cifar-10-batches-py/; downloaded if missing
verify_checksums = True  # False accepts subsets and mirrors of the official files
seed = 1234
device = "auto"  # cuda when available, else cpu
out_dir = ""  # default: runs/cifar10-<timestamp>
resume = ""  # a run directory to continue

if __name__ == "__main__":
    from configurator import configure
    config = configure(globals())

    import binary_connect
    import training
    from bc_datasets import load_cifar10
    from models import cnn

    run = training.start_run("cifar10", config)
    LR_decay = binary_connect.lr_decay(LR_start, LR_fin, num_epochs)
    print("LR_decay = " + training.str2(LR_decay))

    print('Loading CIFAR-10 dataset...')
    train_set, valid_set, test_set = load_cifar10(data_dir, train_set_size=train_set_size,
                                                  verify_checksums=verify_checksums)

    print('Building the CNN...')
    # 128C3-128C3-P2-256C3-256C3-P2-512C3-512C3-P2-1024FC-1024FC-10FC
    model = cnn(widths=(128, 256, 512), fc_units=1024, binary=binary, stochastic=stochastic,
                H=H, W_LR_scale=W_LR_scale, epsilon=epsilon, alpha=alpha)

    training.fit(model, train_set, valid_set, test_set, run,
                 batch_size, LR_start, LR_decay, num_epochs)
