# BinaryNet, Train-time/svhn.py (docs/original.md §13.5): test error ~2.80 % (its README).
# Its inputs are 2*pixels/255 - 1, no GCN or LCN: write them first with
#     python svhn_preprocessing.py --inputs=binarynet --SVHN_LOCAL_PATH=data/svhn/binarynet
network = "binarynet"  # Lasagne's BN (epsilon 1e-4, alpha .1), then binary_tanh_unit
SVHN_LOCAL_PATH = "data/svhn/binarynet"
binary = True
stochastic = False
H = 1.
W_LR_scale = "Glorot"
batch_size = 50
alpha = .1
epsilon = 1e-4
num_epochs = 200
LR_start = .001
LR_fin = .000001
