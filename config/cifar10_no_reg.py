# Table 2, CIFAR-10, "No regularizer": 10.64 % (C).
binary = False  # real weights: Glorot-uniform init, one Adam on everything, no scale, no clip
