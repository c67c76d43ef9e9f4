"""The math, as pure functions on numpy arrays: ``hadamard`` (Hadamard and random rotations), ``fold`` (each fold
with its formula), ``qmath`` (quantizers), ``smoothing`` (SmoothQuant scales, the measured α), ``gptq``, ``nbits``
(MatMulNBits blocks) and ``metrics`` (difficulty, layer error, KL). Nothing here touches a graph."""
