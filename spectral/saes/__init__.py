"""Sparse autoencoders on attention heads' result ``z``: activations streamed from the model
(``activations``), TopK SAEs trained with SAELens and saved in its layout (``train``)."""
