"""Which modules of a model get factorized, and why the others are left dense.

Matching follows PEFT: a string is a regular expression that must match the *whole* dotted
module name; a list matches exact names or ``"." + suffix``; exclusions are checked first and
win. Layers that cannot be factorized correctly are reported with a reason, never broken.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from lrsearch._errors import NoMatchingModuleError, format_problem
from lrsearch.core._kinds import describe_contents, kind_of, supported_labels

__all__ = ["Patterns", "TargetSelection", "name_matches", "select_targets", "unsupported_reason"]

Patterns = str | Sequence[str] | None


def name_matches(name: str, patterns: Patterns) -> bool:
    """PEFT semantics: regex full match for a ``str``; exact name or ``.suffix`` for a list."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == item or name.endswith("." + item) for item in patterns)


@dataclass(frozen=True)
class TargetSelection:
    """Target modules by dotted name, and modules that matched but must stay dense, with why."""

    targets: dict[str, nn.Module] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def unsupported_reason(module: nn.Module, *, parent: nn.Module | None) -> str | None:
    """Why ``module`` cannot be replaced by a low-rank layer without breaking the model, or None."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed convolutions are not supported"
    if isinstance(parent, nn.MultiheadAttention):
        return "its parent nn.MultiheadAttention reads .weight directly instead of calling it"
    kind = kind_of(module)
    if kind is None:
        return f"{type(module).__name__} is not supported (supported: {supported_labels()})"
    return kind.unsupported_reason(module)


def _is_candidate(module: nn.Module) -> bool:
    """Modules worth reporting when skipped: anything Linear- or conv-like."""
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or kind_of(module) is not None


def select_targets(model: nn.Module, *, target_types: Sequence[type[nn.Module]] | None = None,
                   target_modules: Patterns = None,
                   exclude_modules: Patterns = None) -> TargetSelection:
    """Pick the layers to factorize.

    With ``target_modules`` a module must match it by name; otherwise it must be an instance
    of ``target_types`` (default: of any kind lrsearch supports). Raises :class:`NoMatchingModuleError` when nothing is left, with a
    message that says whether nothing matched, everything was excluded or everything was
    unsupported.
    """
    parents: dict[str, nn.Module] = dict(model.named_modules())
    names_by_module: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_by_module.setdefault(id(module), []).append(name)
    owners: dict[int, list[str]] = {}
    for name, module in parents.items():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)

    targets: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    matched_any = excluded_any = False
    used_exclusions = False
    for name, module in parents.items():
        if not name:
            continue
        if target_modules is not None:
            selected = name_matches(name, target_modules) and _is_candidate(module)
        else:
            supported = kind_of(module) is not None
            wanted = supported if target_types is None else isinstance(module, tuple(target_types))
            selected = wanted or (_is_candidate(module) and not supported)
        if not selected:
            continue
        matched_any = True
        if name_matches(name, exclude_modules):
            excluded_any = used_exclusions = True
            continue
        parent = parents.get(name.rpartition(".")[0]) if "." in name else model
        reason = unsupported_reason(module, parent=parent)
        if reason is None and len(names_by_module[id(module)]) > 1:
            others = [n for n in names_by_module[id(module)] if n != name]
            reason = f"the same module is also registered as {others}; replacing one name would not replace the other"
        if reason is None:
            shared = sorted({owner for param in module.parameters(recurse=False)
                             for owner in owners[id(param)] if owner != name})
            if shared:
                reason = f"its weights are shared (tied) with {shared}"
        if reason is None:
            targets[name] = module
        else:
            skipped[name] = reason

    if exclude_modules is not None and not used_exclusions:
        warnings.warn(f"exclude_modules={exclude_modules!r} did not exclude any module", UserWarning,
                      stacklevel=3)
    if not targets:
        raise NoMatchingModuleError(_no_match_message(
            model, matched_any=matched_any, excluded_any=excluded_any, skipped=skipped,
            target_modules=target_modules, exclude_modules=exclude_modules))
    return TargetSelection(targets=targets, skipped=skipped)


def _no_match_message(model: nn.Module, *, matched_any: bool, excluded_any: bool,
                      skipped: dict[str, str], target_modules: Patterns,
                      exclude_modules: Patterns) -> str:
    if skipped:
        details = "; ".join(f"{name}: {reason}" for name, reason in list(skipped.items())[:5])
        return format_problem("Every matched module is unsupported and stays dense",
                              given=details, hint=f"target {supported_labels()} layers (convs with groups=1).")
    if excluded_any:
        return format_problem(f"exclude_modules={exclude_modules!r} excluded every matched module",
                              hint="narrow exclude_modules.")
    available = [name for name, module in model.named_modules() if name and _is_candidate(module)]
    sample = ", ".join(available[:8]) + (" ..." if len(available) > 8 else "")
    if target_modules is not None:
        return format_problem(f"target_modules={target_modules!r} matched no layer lrsearch can factorize",
                              expected="a regex matching whole dotted names, or a list of names/suffixes",
                              given=f"available layers: {sample or 'none'}",
                              hint="copy names from model.named_modules().")
    return format_problem(f"The model ({type(model).__name__}) has no layer lrsearch can factorize",
                          expected=f"at least one {supported_labels()} layer",
                          given=f"a model whose parameters are held by {describe_contents(model)}",
                          hint="lrsearch factorizes the layers listed above; the others stay as they are.")
