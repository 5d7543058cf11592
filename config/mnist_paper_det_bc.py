# Table 2, MNIST, "BinaryConnect (det.)": 1.29 ± 0.08 % (C).
binary = True
stochastic = False

# The paper's own MNIST protocol (§9, the master-lineage code; moderate confidence that it is
# the paper's exact setup). The same lines in every config/mnist_paper_*.py.
batch_size = 200
num_units = 1024
n_hidden_layers = 3
num_epochs = 1000
LR_start = .3
LR_fin = .01
optimizer = "sgd"  # plain SGD, no momentum, on every parameter
H = "Glorot"  # each layer's sqrt(1.5 / (fan_in + fan_out))
W_LR_scale = 1.  # no learning-rate scaling
init_range = 2.  # binary W ~ U(-2H, 2H)
epsilon = 1e-4
bn_form = "var"  # (x - mean) / sqrt(var + epsilon)
bn_stats = "recompute"  # inference statistics: averages over the train + valid minibatches
loss_reduction = "sum_classes"  # squared hinge summed over the 10 classes, averaged over the batch
monitor_step = 2  # evaluate, and reshuffle, every 2 epochs
