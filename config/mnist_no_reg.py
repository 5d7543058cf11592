# Table 2, MNIST, "No regularizer": 1.30 ± 0.04 % (R), measured by the paper with its own MNIST
# protocol (config/mnist_paper_no_reg.py); this is the lasagne branch's mnist.py (3x2048, Adam,
# batch 100, 250 epochs), so its number need not match.
binary = False  # real weights: Glorot-uniform init, one Adam on everything, no scale, no clip
