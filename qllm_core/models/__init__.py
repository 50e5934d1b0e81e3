"""Hugging Face MoE families behind small adapters, cut into stages; built-in tiny and bench models."""
