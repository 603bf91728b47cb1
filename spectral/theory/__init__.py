"""The kernel view's predictions in closed form (docs/THEORY.md): first-order effects of a
steering injection computed on the real model (``spectral.theory.first_order``)."""
