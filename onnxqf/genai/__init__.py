"""onnxruntime-genai folders: ``folder`` (reading, checking and writing them), ``feeds`` (feeding a graph from its
GraphIO: ids, mask, positions, an empty KV cache) and ``generate`` (text through onnxruntime-genai). None of them
imports onnxqf's runtime; the runtime imports ``feeds``."""
