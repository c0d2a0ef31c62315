"""Helpers the tests share: NumPy references of the math, model factories, subprocess runners
(Keras backends, torch.distributed ranks), the dashboard server fixture."""
