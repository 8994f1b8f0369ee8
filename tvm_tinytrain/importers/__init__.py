"""Importers that turn model files into a :class:`tvm_tinytrain.model.Model`."""
