"""The guard's engine side: :mod:`zetaguard.engine.session` (tracker choice, host/device
migration, the path of one step) over the host engine (``zetaguard._core``) and the device
path (:mod:`zetaguard.engine.device`, torch, imported only for tensors on their device)."""
