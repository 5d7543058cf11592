# Table 2, MNIST, "BinaryConnect (det.)": 1.29 ± 0.08 % (C), measured by the paper with its own
# MNIST protocol (config/mnist_paper_det_bc.py); this is the lasagne branch's mnist.py (3x2048,
# Adam, batch 100, 250 epochs), so its number need not match.
binary = True
stochastic = False
