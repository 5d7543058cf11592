# Table 2, MNIST, "50% Dropout": 1.01 ± 0.04 % (R), measured by the paper with its own MNIST
# protocol (config/mnist_paper_dropout.py); this is the lasagne branch's mnist.py (3x2048, Adam,
# batch 100, 250 epochs) without binarization and with dropout, so its number need not match.
binary = False  # real weights: Glorot-uniform init, one Adam on everything, no scale, no clip
dropout_hidden = .5
# Our choice: no input dropout. The row names one rate, and the original mnist.py named its saved
# weight histograms by dropout_hidden alone. Srivastava et al. (2014) also dropped 20 % of the
# inputs: try --dropout_in=.2.
dropout_in = 0.
