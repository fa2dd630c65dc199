"""The layer codes of the Linear-chain gradient op (ops `layer_chain_grad_sums_`, schemas.py): the
contract between mini/layer_chain.py, which describes a model's layers with them, its reference
(reference/replay.py) and its C++ kernel (csrc/cpu/replay_cpu.cpp, which spells the same numbers)."""

LINEAR, TANH, SIGMOID, RELU = 0, 1, 2, 3
