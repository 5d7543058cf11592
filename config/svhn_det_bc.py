# Table 2, SVHN, "BinaryConnect (det.)": 2.30 % (C).
binary = True
stochastic = False
