"""Serving many tasks behind one backbone: an adapter cache with a byte budget (``cache``) and a Ray Serve
deployment (``ray_app``) over :class:`adaptkit.inference.Predictor`."""
