"""Integrations of vlmkern with other libraries. ``vlmkern.integrations.hf``: patch loaded transformers models."""
