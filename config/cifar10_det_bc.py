# Table 2, CIFAR-10, "BinaryConnect (det.)": 9.90 % (C).
binary = True
stochastic = False
