"""What share of a model the rank search can change: every parameter-holding module, classified.

A user whose model is mostly an Embedding, an LSTM or layers lrsearch must leave dense should
learn that before a search, not infer it from a disappointing speed-up.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from torch import nn

from lrsearch.core._geometry import LayerGeometry
from lrsearch.core._kinds import kind_named, kind_of

__all__ = ["Coverage", "ModuleCoverage", "Status"]

Status = Literal["target", "skipped", "excluded", "unhandled"]
_MAX_LISTED = 20


@dataclass(frozen=True)
class ModuleCoverage:
    """One module that holds parameters of its own.

    ``status``: ``"target"`` (the search can factorize it), ``"skipped"`` (a supported-looking
    layer that must stay dense, see ``reason``), ``"excluded"`` (a supported layer left out by
    ``target_modules``/``exclude_modules``/``target_types``) or ``"unhandled"`` (a kind lrsearch
    does not factorize: embeddings, norms, recurrent layers, ...). ``params`` counts each
    shared parameter once, at its first owner; ``macs`` (per sample, dense) is known for
    targets whose input shapes calibration recorded.
    """

    name: str
    type: str
    status: Status
    params: int
    macs: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class Coverage:
    """Every parameter-holding module of a model, classified, with the shares the search can change.

    ``total_macs`` is the whole model's multiply-adds per sample measured by torch's FLOP
    counter on a calibration batch (None without calibration data). The counter skips kernels
    it does not know (on CPU: fused attention, LSTMs), so ``mac_share`` is an upper bound there.
    """

    model: str
    modules: tuple[ModuleCoverage, ...]
    total_params: int
    total_macs: float | None = None

    @classmethod
    def of(cls, model: nn.Module, *, targets: Mapping[str, LayerGeometry], skipped: Mapping[str, str],
           total_macs: float | None = None) -> Coverage:
        """Classify ``model``'s modules given the targets (with their geometry) and skipped layers."""
        seen: set[int] = set()
        modules: list[ModuleCoverage] = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
            seen.update(id(p) for p in module.parameters(recurse=False))
            holds = next(module.parameters(recurse=False), None) is not None
            if not (holds or name in targets or name in skipped):
                continue
            params = sum(p.numel() for p in own)
            if name in targets:
                geometry = targets[name]
                macs = kind_named(geometry.kind).dense_cost(geometry).macs
                modules.append(ModuleCoverage(name, type(module).__name__, "target", params, macs))
            elif name in skipped:
                modules.append(ModuleCoverage(name, type(module).__name__, "skipped", params,
                                              reason=skipped[name]))
            else:
                status: Status = "excluded" if kind_of(module) is not None else "unhandled"
                modules.append(ModuleCoverage(name, type(module).__name__, status, params))
        return cls(model=type(model).__name__, modules=tuple(modules),
                   total_params=sum(p.numel() for p in model.parameters()), total_macs=total_macs)

    def by_status(self, status: Status) -> tuple[ModuleCoverage, ...]:
        return tuple(module for module in self.modules if module.status == status)

    @property
    def target_params(self) -> int:
        return sum(module.params for module in self.by_status("target"))

    @property
    def target_macs(self) -> int | None:
        """Dense multiply-adds per sample of the targets; None if any is unknown."""
        macs = [module.macs for module in self.by_status("target")]
        return None if any(m is None for m in macs) else sum(macs)  # type: ignore[misc]

    @property
    def param_share(self) -> float:
        """Fraction of the model's parameters the search can change."""
        return self.target_params / self.total_params if self.total_params else 0.0

    @property
    def mac_share(self) -> float | None:
        """Fraction of the model's multiply-adds per sample the search can change (None if unknown)."""
        macs = self.target_macs
        if macs is None or not self.total_macs:
            return None
        return min(1.0, macs / self.total_macs)

    def _share(self, params: int) -> str:
        return f"{100 * params / self.total_params:.1f}%" if self.total_params else "0%"

    def _grouped(self, status: Status) -> str:
        counts: Counter[str] = Counter()
        params: dict[str, int] = defaultdict(int)
        for module in self.by_status(status):
            counts[module.type] += 1
            params[module.type] += module.params
        return ", ".join(f"{count} {kind} ({self._share(params[kind])} of parameters)"
                         for kind, count in counts.most_common())

    def lines(self) -> list[str]:
        """Text for a terminal or a report: a summary line, then one line per group or skipped layer."""
        targets = self.by_status("target")
        macs = "" if self.mac_share is None else f" and {100 * self.mac_share:.1f}% of the multiply-adds"
        lines = [f"Coverage of {self.model}: the search can change {len(targets)} layers holding "
                 f"{self._share(self.target_params)} of the parameters{macs}."]
        if targets:
            lines.append(f"  targets: {self._grouped('target')}")
        skipped = self.by_status("skipped")
        for module in skipped[:_MAX_LISTED]:
            lines.append(f"  skipped {module.name} ({module.type}): {module.reason}")
        if len(skipped) > _MAX_LISTED:
            lines.append(f"  ... and {len(skipped) - _MAX_LISTED} more skipped layers")
        if self.by_status("excluded"):
            lines.append(f"  excluded by the target/exclude patterns: {self._grouped('excluded')}")
        if self.by_status("unhandled"):
            lines.append(f"  not factorized by lrsearch (kept as they are): {self._grouped('unhandled')}")
        return lines

    def format(self) -> str:
        return "\n".join(self.lines())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, with the derived shares."""
        return {"model": self.model, "total_params": self.total_params, "total_macs": self.total_macs,
                "target_params": self.target_params, "target_macs": self.target_macs,
                "param_share": self.param_share, "mac_share": self.mac_share,
                "modules": [asdict(module) for module in self.modules]}
