"""The model as records and the file it lives in: ``structure`` (typed records of a decoder), ``edit``
(changes to a graph), ``modelfile`` (load and save, validated, atomic), ``store`` (rewritten tensors on disk),
``fileio`` (the one atomic-write helper), ``graphio`` (a graph's inputs and outputs: ids, mask, positions,
KV cache, logits)."""
