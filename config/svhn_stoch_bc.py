# Table 2, SVHN, "BinaryConnect (stoch.)": 2.15 % (C; also the lasagne README's number).
binary = True
stochastic = True
