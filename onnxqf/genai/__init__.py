"""onnxruntime-genai folders: reading and writing them, feeding their graphs, generating text."""
