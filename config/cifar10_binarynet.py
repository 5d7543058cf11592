# BinaryNet, Train-time/cifar10.py (docs/original.md §13.5): test error ~11.40 % (its README).
network = "binarynet"  # Lasagne's BN (epsilon 1e-4, alpha .1), then binary_tanh_unit
inputs = "binarynet"  # 2*pixels/255 - 1, no GCN or ZCA
binary = True
stochastic = False
H = 1.
W_LR_scale = "Glorot"
batch_size = 50
alpha = .1
epsilon = 1e-4
num_epochs = 500
LR_start = .001
LR_fin = .0000003
train_set_size = 45000
