"""rattention: the model library (configs, layers, model, decoding cache, training loop, eval, data loader)."""
