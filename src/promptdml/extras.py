"""Optional dependencies ("extras"): import them where a feature needs them, or say which extra to install.

``pip install "promptdml[viz]"`` (matplotlib, tensorboard): the training plot and TensorBoard event files;
``[faiss]``: approximate indexes; ``[export]``: ONNX export. The core (train, evaluate, embed, exact search)
needs none of them.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

__all__ = ["EXTRAS", "install_hint", "optional_import", "require"]

log = logging.getLogger("promptdml")

EXTRAS: dict[str, str] = {
    "viz": "matplotlib, tensorboard",
    "faiss": "faiss-cpu",
    "export": "onnx, onnxruntime, onnxscript",
}
_warned: set[str] = set()


def install_hint(extra: str) -> str:
    return f'pip install "promptdml[{extra}]" (or pip install {EXTRAS[extra].replace(",", "")})'


def require(module: str, feature: str, extra: str, error: type[Exception] = ImportError,
            package: str | None = None) -> ModuleType:
    """Import ``module`` or raise ``error`` saying that ``feature`` needs ``package`` from the extra ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise error(f"{feature} needs the '{package or module.split('.')[0]}' package, which is not installed: "
                    f"{install_hint(extra)}") from None


def optional_import(module: str, feature: str, extra: str, setting: str, package: str | None = None
                    ) -> ModuleType | None:
    """Import ``module``, or warn once per process that ``feature`` is skipped (naming the missing ``package``,
    the install command and the ``setting`` that turns the feature off) and return None."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if feature not in _warned:
            _warned.add(feature)
            log.warning("%s skipped: it needs the '%s' package, which is not installed. Install it with %s, "
                        "or set %s=false.", feature, package or module.split(".")[0], install_hint(extra), setting)
        return None
