"""The ``cxr`` command."""
