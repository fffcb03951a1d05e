"""The policy file (``policy.json``, written by ``hf-svdq analyze``): its version, keys and validation.

A policy names per-layer ranks, dense layers, optionally per-layer bits, and the analysed setting;
:func:`config_kwargs_from_policy` turns it into ``SVDQuantConfig`` keyword arguments (plain data, so this
module sits below the config).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

POLICY_VERSION = 1
POLICY_KEY = "hf_svdq_policy"
SETTING_KEYS = ("residual_bits", "group_size", "residual_method", "refine_steps", "damp")
"""The analysed setting a policy records and :func:`config_kwargs_from_policy` reproduces."""


def load_policy(policy: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A policy document from a path or a dict, validated (``ValueError`` naming the problem)."""
    source = "policy"
    if isinstance(policy, (str, Path)):
        source = str(policy)
        try:
            policy = json.loads(Path(policy).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"policy file {source!r} does not exist") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"policy file {source!r} is not valid JSON: {err}") from None
    if not isinstance(policy, Mapping):
        raise ValueError(f"{source}: a policy must be a JSON object")  # noqa: TRY004 (input errors are ValueError)
    version = policy.get(POLICY_KEY)
    if version is None:
        raise ValueError(f"{source}: not an hf_svdq policy (no {POLICY_KEY!r} key)")
    if version != POLICY_VERSION:
        raise ValueError(f"{source}: policy version {version!r} is not supported (this hf_svdq reads {POLICY_VERSION})")
    for key, kind in (("ranks", dict), ("dense", dict), ("setting", dict), ("layer_bits", (dict, type(None)))):
        if not isinstance(policy.get(key), kind):
            raise ValueError(f"{source}: {key!r} must be a JSON object")  # noqa: TRY004
    return dict(policy)


def config_kwargs_from_policy(policy: str | Path | Mapping[str, Any], calibration: Any = None) -> dict[str, Any]:
    """``SVDQuantConfig`` keyword arguments that reproduce a policy's ranks and dense layers."""
    doc = load_policy(policy)
    setting = doc["setting"]
    kwargs: dict[str, Any] = {k: setting[k] for k in SETTING_KEYS if setting.get(k) is not None}
    if setting.get("calibrated") and calibration is None:
        warnings.warn("this policy was analysed with calibrated (activation-aware) compression; pass calibration= to "
                      "reproduce it; compressing data-free", UserWarning, stacklevel=3)
        if kwargs.get("residual_method") == "gptq":
            kwargs["residual_method"] = "rtn"
    if calibration is not None:
        kwargs["calibration"] = calibration
    kwargs["ranks"] = doc["ranks"]
    kwargs["dense"] = doc["dense"]
    if doc.get("layer_bits"):  # written by the residual-option analysis (hf_svdq.analysis.options)
        kwargs["layer_bits"] = doc["layer_bits"]
    return kwargs


def save_policy(policy: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(policy, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
