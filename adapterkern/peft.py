"""Bottleneck adapters as a PEFT method (``pip install adapterkern[peft]``)::

    import adapterkern.peft                      # registers the method with PEFT (once)
    from adapterkern.peft import BottleneckConfig
    from peft import get_peft_model

    model = get_peft_model(model, BottleneckConfig(preset="pfeiffer", reduction_factor=16, task_type="SEQ_CLS"))

See :mod:`adapterkern.integrations.peft_method` for what it relies on in PEFT.
"""
from .integrations.peft_method import LOAD_HINT, PEFT_TYPE_NAME, TESTED_PEFT_VERSIONS, peft_classes, register

register()
BottleneckConfig, BottleneckModel = peft_classes()

__all__ = ["BottleneckConfig", "BottleneckModel", "LOAD_HINT", "PEFT_TYPE_NAME", "TESTED_PEFT_VERSIONS", "register"]
