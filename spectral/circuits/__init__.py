"""Circuits: head classes, path patching, edge-level circuit discovery."""
