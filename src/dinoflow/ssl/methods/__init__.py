"""Self-supervised methods, one module per method, registered with `dinoflow.ssl.methods.base.register`.

Every module of this package (except ``base`` and names starting with ``_``) is imported by the registry on first
use, so adding a method is writing ``<name>.py`` here with an ``@register``-ed `SSLMethod` subclass
(docs/methods.md). The engine that trains them is `dinoflow.train.engine`.
"""

from dinoflow.ssl.methods.base import (Batch, MethodSetup, SSLMethod, StepContext, ViewSettings, Views,
                                       available_methods, build_method, get_method, parse_config, register)

__all__ = ["Batch", "MethodSetup", "SSLMethod", "StepContext", "ViewSettings", "Views", "available_methods",
           "build_method", "get_method", "parse_config", "register"]
