"""Training-time interventions on the organisms (issue 20): the training arms (``arms``: names,
options, cache entries; torch-free), the differentiable key-kernel gap and its penalty
(``penalties``) and the installation of an arm on a GPT-NeoX model during training
(``regularizer``). Below ``spectral.organisms`` in the layering (the organism recipe carries an
arm), so nothing here imports ``spectral.models`` or anything that loads organisms."""
