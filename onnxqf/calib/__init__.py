"""Calibration: ``data`` (text and token windows), ``calibrate`` (activation statistics and X^T X from one run of the
model), ``layerwise`` (the model run one layer at a time: bounded memory, sequential GPTQ)."""
