# Table 2, CIFAR-10, "BinaryConnect (stoch.)": 8.27 % (C; also the lasagne README's number).
binary = True
stochastic = True
