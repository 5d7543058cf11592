# Table 2, SVHN, "No regularizer": 2.44 % (R).
binary = False  # real weights: Glorot-uniform init, one Adam on everything, no scale, no clip
