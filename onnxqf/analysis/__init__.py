"""What a rewrite did to a model: ``evaluate`` (KL, perplexity), ``inspection`` (difficulty per layer) and ``plots``."""
