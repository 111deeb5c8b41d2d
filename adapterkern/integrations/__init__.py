"""Integrations: `adapterhub` (patch models set up with the AdapterHub `adapters` library) and
`transformers` (add bottleneck adapters to Hugging Face models without that library)."""
