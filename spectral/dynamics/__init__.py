"""Dynamics of the spectra: change-points across training checkpoints (``changepoints``) and per-token spectra during generation (``generation``)."""
