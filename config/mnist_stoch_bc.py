# Table 2, MNIST, "BinaryConnect (stoch.)": 1.18 ± 0.04 % (1.18 C, ± R), measured by the paper
# with its own MNIST protocol (config/mnist_paper_stoch_bc.py); this is the lasagne branch's
# mnist.py as it stands (3x2048, Adam, batch 100, 250 epochs), whose README reports ~1.15 % (C).
binary = True
stochastic = True
