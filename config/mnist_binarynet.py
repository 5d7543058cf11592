# BinaryNet, Train-time/mnist.py (docs/original.md §13.5): test error ~0.96 % (its README).
network = "binarynet"  # Lasagne's BN (epsilon 1e-4, alpha .1), then binary_tanh_unit
inputs = "binarynet"  # 2*pixels/255 - 1, not centred
binary = True
stochastic = False
H = 1.
W_LR_scale = "Glorot"
num_units = 4096
n_hidden_layers = 3
dropout_in = .2
dropout_hidden = .5
batch_size = 100
alpha = .1
epsilon = 1e-4
num_epochs = 1000
LR_start = .003
LR_fin = .0000003
