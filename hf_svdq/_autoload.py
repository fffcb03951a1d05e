"""Register hf_svdq with transformers without anyone importing hf_svdq.

The installed ``hf_svdq_autoload.pth`` calls :func:`install` at interpreter start. It adds a
meta-path finder that waits for ``transformers.quantizers.auto`` to be imported and then registers
hf_svdq, so ``AutoModelForCausalLM.from_pretrained(<hf_svdq checkpoint>)`` just works. It imports
neither torch nor transformers itself, and nothing beyond what the interpreter has already loaded
(no ``importlib.abc``, ``typing`` or ``warnings``): it runs in every Python process of the
environment, so it must cost well under 5 ms (``benchmarks/startup.py``). Opt out with
``HF_SVDQ_NO_AUTOLOAD=1``.
"""

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import importlib.machinery
    from types import ModuleType
    from typing import Any

TARGET = "transformers.quantizers.auto"
OPT_OUT_ENV = "HF_SVDQ_NO_AUTOLOAD"


def _register(module: "ModuleType") -> None:
    partial = sys.modules.get("hf_svdq.integration.quantizer")
    if partial is not None and not hasattr(partial, "SVDQuantizer"):
        return  # hf_svdq.integration.quantizer is being imported right now; it registers itself when done
    try:
        from hf_svdq.integration.quantizer import register

        register(module)
    except Exception as err:  # noqa: BLE001 (never break `import transformers` because of us)
        import warnings

        warnings.warn(f"hf_svdq could not register with transformers: {err!r}", RuntimeWarning, stacklevel=2)


class _RegisteringLoader:
    """Wraps the real loader of the target module (a duck-typed importlib loader)."""

    def __init__(self, loader: "Any") -> None:
        self._loader = loader

    def create_module(self, spec: "importlib.machinery.ModuleSpec") -> "ModuleType | None":
        return self._loader.create_module(spec)

    def exec_module(self, module: "ModuleType") -> None:
        self._loader.exec_module(module)
        _register(module)


class _Finder:
    """A meta-path finder (duck-typed) that only answers for the target module."""

    def find_spec(self, fullname: str, path: "Any" = None, target: "ModuleType | None" = None) -> "importlib.machinery.ModuleSpec | None":
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader)  # type: ignore[assignment]  # (a duck-typed Loader)
                return spec
        return None


def enabled() -> bool:
    return os.environ.get(OPT_OUT_ENV, "").strip().lower() in ("", "0", "false", "no")


def install() -> None:
    """Install the hook (once); register right away if transformers' quantizers are already loaded."""
    if not enabled():
        return
    if TARGET in sys.modules:
        _register(sys.modules[TARGET])
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
