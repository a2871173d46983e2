"""``Decomposition``: every target layer of a model decomposed once; any rank map is a slice.

Calibration statistics are collected in one pass when the object is built, and each layer's
SVD is computed the first time it is needed and cached. ``build(ranks)`` then only slices
cached factors and copies them into new modules, which is what lets a rank search afford a
fresh model per trial.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, Union

import torch
from torch import nn

from lrsearch._errors import (
    CalibrationError,
    InvalidRankError,
    UnknownLayerError,
    UnsupportedLayerError,
    format_problem,
)
from lrsearch.core._calibration import LayerStatistics, collect_statistics
from lrsearch.core._conv import ConvRank
from lrsearch.core._cost import macs_per_sample
from lrsearch.core._coverage import Coverage
from lrsearch.core._factors import TuckerFactors
from lrsearch.core._geometry import LayerGeometry
from lrsearch.core._kind import Factors, LayerKind
from lrsearch.core._kinds import KINDS, kind_of, supported_labels
from lrsearch.core._runtime import ForwardFn, default_forward
from lrsearch.core._surgery import clone_with, explicit_model
from lrsearch.core._targets import Patterns, name_matches, select_targets

__all__ = ["DENSE", "Decomposition", "Method", "RankMap", "Ranks", "coverage", "factorize"]

DENSE = "dense"
Method = Literal["svd", "whitened"]
RankValue = Union[int, tuple[int, int], str]
RankMap = Mapping[str, RankValue]
Ranks = Union[int, float, RankMap]
METHODS: tuple[str, ...] = ("svd", "whitened")


class Decomposition:
    """The decomposition of every target layer of ``model``, computed once and sliced per rank.

    Args:
        model: the trained model. It is never modified; keep it unchanged while this object
            is in use, since factors are computed from its weights on first use.
        method: ``"whitened"`` (data-aware: the exact rank-k optimum of each layer's output
            error on the calibration inputs) or ``"svd"`` (plain truncated SVD of the weight).
        calibration: an iterable of batches (a DataLoader, a list of tensors or of
            ``(inputs, targets)`` tuples). Required for ``"whitened"``; with ``"svd"`` it is
            optional and only records input shapes for the cost model.
        forward: how a batch is fed to the model; default ``model(batch[0])`` for tuples,
            ``model(batch)`` for tensors and ``model(**batch)`` for dicts.
        target_types, target_modules, exclude_modules: which layers to decompose (see
            :func:`lrsearch.core.select_targets`; default: every Linear, transformers
            ``Conv1D``, Conv1d and Conv2d, and the projections of every ``nn.MultiheadAttention``,
            named ``<attention>.in_proj`` and ``<attention>.out_proj``, see :attr:`working_model`).
        layers: restrict the targets to exactly these dotted names.
        conv_scheme: default scheme of conv layers, or a map from layer name to scheme. A
            scheme a layer's kind lacks (``"spatial"`` for a Conv1d) leaves it on its default.
        max_calibration_batches: stop the calibration pass after this many batches.
        ridge: relative eigenvalue floor of the whitening statistics.
    """

    def __init__(self, model: nn.Module, *, method: Method = "whitened",
                 calibration: Iterable[Any] | None = None, forward: ForwardFn | None = None,
                 target_types: Sequence[type[nn.Module]] | None = None,
                 target_modules: Patterns = None, exclude_modules: Patterns = None,
                 layers: Collection[str] | None = None,
                 conv_scheme: str | Mapping[str, str] = "channel",
                 max_calibration_batches: int | None = None, ridge: float = 1e-6) -> None:
        if method not in METHODS:
            raise ValueError(format_problem(f"Unknown method {method!r}", expected=f"one of {list(METHODS)}"))
        if not (isinstance(ridge, (int, float)) and ridge > 0 and math.isfinite(ridge)):
            raise ValueError(format_problem("ridge must be a positive finite number", given=repr(ridge)))
        if method == "whitened" and calibration is None:
            raise CalibrationError(format_problem(
                "method='whitened' needs calibration data", expected="calibration=<iterable of batches>",
                hint="pass calibration=train_loader (a few hundred samples suffice), or method='svd'."))
        self.model = model
        self.method: Method = method
        self.ridge = float(ridge)
        explicit = explicit_model(model)
        self._work, self._hosts = explicit.model, explicit.hosts
        selection = select_targets(self._work, target_types=target_types, target_modules=target_modules,
                                   exclude_modules=exclude_modules)
        self._skipped: dict[str, str] = {
            name: reason for name, reason in explicit.skipped.items()
            if (target_modules is None or name_matches(name, target_modules))
            and not name_matches(name, exclude_modules)}
        self._skipped.update(selection.skipped)
        self._all_names = [name for name, _ in self._work.named_modules() if name]
        self._forward = forward or default_forward
        self._example: Any = None
        targets = selection.targets
        if layers is not None:
            for name in layers:
                self._check_known(name, targets)
            targets = {name: module for name, module in targets.items() if name in set(layers)}
        self._schemes = self._resolve_schemes(conv_scheme, targets)
        self._stats: dict[str, LayerStatistics] = {}
        if calibration is not None:
            needs_gram = list(targets) if method == "whitened" else []
            self._stats = collect_statistics(self._work, targets, self._remember_first(calibration),
                                             covariance=needs_gram, forward=forward,
                                             max_batches=max_calibration_batches)
            for name, stats in self._stats.items():
                if stats.calls == 0:
                    self._skipped[name] = ("its forward() never ran during calibration; its parent "
                                           "probably reads .weight directly, so it stays dense")
            targets = {name: module for name, module in targets.items() if self._stats[name].calls}
        if not targets:
            raise UnsupportedLayerError(format_problem(
                "No target layer can be factorized",
                given="; ".join(f"{n}: {r}" for n, r in list(self._skipped.items())[:5]) or "no layers"))
        self._targets: dict[str, nn.Module] = targets
        self._factors: dict[tuple[str, str], Factors] = {}

    def _remember_first(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Pass the calibration batches through, keeping the first for :meth:`coverage`'s MAC count."""
        for batch in batches:
            if self._example is None:
                self._example = batch
            yield batch

    def _resolve_schemes(self, conv_scheme: str | Mapping[str, str],
                         targets: Mapping[str, nn.Module]) -> dict[str, str]:
        """Each target's default scheme: its entry in a map, else a str scheme if its kind has it."""
        known = {scheme for kind in KINDS for scheme in kind.schemes}
        if isinstance(conv_scheme, Mapping):
            for name in conv_scheme:
                self._check_known(name, targets)
        elif conv_scheme not in known:
            raise ValueError(format_problem(f"Unknown conv scheme {conv_scheme!r}",
                                            expected=f"one of {sorted(known)}"))
        schemes: dict[str, str] = {}
        for name, module in targets.items():
            kind = self._kind_of(module)
            if isinstance(conv_scheme, Mapping):
                scheme = conv_scheme.get(name, kind.schemes[0])
            else:
                scheme = conv_scheme if conv_scheme in kind.schemes else kind.schemes[0]
            schemes[name] = self._check_scheme(name, kind, scheme)
        return schemes

    @staticmethod
    def _kind_of(module: nn.Module) -> LayerKind:
        kind = kind_of(module)
        assert kind is not None, "select_targets only returns modules of a known kind"
        return kind

    def _check_scheme(self, name: str, kind: LayerKind, scheme: str) -> str:
        if scheme not in kind.schemes:
            raise ValueError(format_problem(
                f"Unknown scheme {scheme!r} for layer {name!r}, a {kind.label}",
                expected=f"one of {list(kind.schemes)}"))
        if self.method == "whitened" and scheme not in kind.whitened_schemes:
            raise ValueError(format_problem(
                f"conv_scheme={scheme!r} (layer {name}) has no data-aware decomposition",
                expected=f"method='svd' with {scheme}, or one of {list(kind.whitened_schemes)} with whitening",
                hint="use method='svd', or another scheme for this layer."))
        return scheme

    def _check_known(self, name: str, targets: Mapping[str, nn.Module]) -> None:
        if name in targets:
            return
        if name in self._skipped:
            raise UnsupportedLayerError(format_problem(
                f"Layer {name!r} cannot be factorized: {self._skipped[name]}",
                hint="leave it out of the rank map (it stays dense)."))
        if name in self._all_names:
            module = self._work.get_submodule(name)
            raise UnknownLayerError(format_problem(
                f"Layer {name!r} ({type(module).__name__}) is not a target",
                expected=f"a layer of a supported kind ({supported_labels()}) selected by "
                         "target_types/target_modules and not excluded",
                hint="check target_modules and exclude_modules."))
        close = difflib.get_close_matches(name, list(targets) or self._all_names, n=3)
        raise UnknownLayerError(format_problem(
            f"The model has no module named {name!r}", expected="a dotted name from model.named_modules()",
            hint=f"did you mean {close}?" if close else f"target layers are {list(targets)[:8]}"))

    # ------------------------------------------------------------------ introspection
    @property
    def working_model(self) -> nn.Module:
        """The model as decomposed: ``model`` itself, or (when it has ``nn.MultiheadAttention``
        layers) a copy sharing every tensor with it whose attention layers are
        :class:`LowRankMultiheadAttention` with dense projections, so that ``…attn.in_proj`` and
        ``…attn.out_proj`` are modules. Target names refer to it; treat it as read-only."""
        return self._work

    def coverage(self) -> Coverage:
        """Every parameter-holding module, classified, and the share of parameters (and of MACs per
        sample, measured on the first calibration batch) that the search can change."""
        total = None if self._example is None else macs_per_sample(self._work, self._example,
                                                                    forward=self._forward)
        return Coverage.of(self._work, targets={name: self.geometry(name) for name in self._targets},
                           skipped=self._skipped, total_macs=total)

    @property
    def targets(self) -> tuple[str, ...]:
        """Dotted names of the layers this decomposition can factorize, in model order."""
        return tuple(self._targets)

    @property
    def skipped(self) -> dict[str, str]:
        """Layers that matched but stay dense, with the reason."""
        return dict(self._skipped)

    def module(self, name: str) -> nn.Module:
        self._check_known(name, self._targets)
        return self._targets[name]

    def scheme(self, name: str) -> str:
        """The layer's default scheme: ``"linear"`` for Linear-like layers, else its conv scheme."""
        self._check_known(name, self._targets)
        return self._schemes[name]

    def schemes(self, name: str) -> tuple[str, ...]:
        """Every scheme the layer's kind offers (its default first), whether or not it is the layer's default."""
        return self._kind(name).schemes

    def _kind(self, name: str) -> LayerKind:
        return self._kind_of(self.module(name))

    def geometry(self, name: str) -> LayerGeometry:
        """Shapes for the cost model, including per-sample positions seen during calibration."""
        stats = self._stats.get(name, LayerStatistics())
        return self._kind(name).geometry(self.module(name), input_shape=stats.input_shape,
                                         output_shape=stats.output_shape, rows=stats.rows_per_sample)

    def full_rank(self, name: str, scheme: str | None = None) -> ConvRank:
        return self._kind(name).full_rank(self.geometry(name), self._scheme_for(name, scheme))

    def _scheme_for(self, name: str, scheme: str | None) -> str:
        default = self.scheme(name)
        return default if scheme is None else self._check_scheme(name, self._kind(name), scheme)

    def factors(self, name: str, scheme: str | None = None) -> Factors:
        """The cached decomposition of one layer (computed on first request)."""
        scheme = self._scheme_for(name, scheme)
        key = (name, scheme)
        if key not in self._factors:
            gram = self._stats[name].gram if self.method == "whitened" else None
            self._factors[key] = self._kind(name).decompose(self._targets[name], scheme, gram=gram,
                                                            ridge=self.ridge)
        return self._factors[key]

    def singular_values(self, name: str, scheme: str | None = None) -> torch.Tensor:
        """Singular values (whitened ones for ``"whitened"``); squares are output-error shares."""
        factors = self.factors(name, scheme)
        if isinstance(factors, TuckerFactors):
            return factors.out_singular_values
        return factors.singular_values

    # ------------------------------------------------------------------ building
    def resolve(self, ranks: Ranks, *, schemes: Mapping[str, str] | None = None
                ) -> dict[str, tuple[str, ConvRank]]:
        """Validate ``ranks`` for every layer and return ``{name: (scheme, rank)}`` of factorized layers.

        ``ranks`` is one int for every target, a float in (0, 1] (that fraction of each
        layer's full rank), or a map from layer name to an int, a Tucker-2 pair or ``"dense"``
        (unlisted targets stay dense). Nothing is built until every entry is valid.
        """
        schemes = dict(schemes or {})
        for name in schemes:
            self._check_known(name, self._targets)
        if isinstance(ranks, Mapping):
            requested: dict[str, Any] = {}
            for name, value in ranks.items():
                self._check_known(name, self._targets)
                requested[name] = value
        elif isinstance(ranks, bool) or not isinstance(ranks, (int, float)):
            raise InvalidRankError(format_problem(
                "ranks has the wrong type", expected="an int, a float in (0, 1], or a dict name → int | 'dense'",
                given=f"{type(ranks).__name__}: {ranks!r}"))
        else:
            requested = dict.fromkeys(self._targets, ranks)
        plan: dict[str, tuple[str, ConvRank]] = {}
        for name, value in requested.items():
            if value == DENSE:
                continue
            scheme = self._scheme_for(name, schemes.get(name))
            top = self.full_rank(name, scheme)
            if isinstance(value, float):
                if not 0.0 < value <= 1.0:
                    raise InvalidRankError(format_problem(
                        f"A rank fraction must lie in (0, 1] (layer {name})", given=repr(value),
                        hint="0.25 keeps a quarter of each layer's full rank."))
                value = (tuple(max(1, round(value * t)) for t in top) if isinstance(top, tuple)
                         else max(1, round(value * top)))
            if isinstance(value, str):
                raise InvalidRankError(format_problem(
                    f"Unknown rank {value!r} for layer {name}", expected="an int or 'dense'"))
            kind = self._kind(name)
            what = f"layer {name!r} ({kind.describe(self._targets[name])})"
            plan[name] = (scheme, kind.check_rank(value, self.geometry(name), scheme, what=what))
        return plan

    def layer(self, name: str, rank: ConvRank, *, scheme: str | None = None) -> nn.Module:
        """One low-rank replacement module for layer ``name`` at ``rank``, from cached factors."""
        scheme = self._scheme_for(name, scheme)
        return self._kind(name).from_dense(self._targets[name], rank, scheme, self.factors(name, scheme))

    @torch.inference_mode(False)
    def build(self, ranks: Ranks, *, schemes: Mapping[str, str] | None = None) -> nn.Module:
        """A new model with the listed layers factorized; the original model is untouched.

        Always builds outside inference mode, so the result trains even when called from
        inside ``torch.inference_mode()``.
        """
        plan = self.resolve(ranks, schemes=schemes)
        layers = {name: self.layer(name, rank, scheme=scheme) for name, (scheme, rank) in plan.items()}
        return clone_with(self.model, self._hosted(layers))

    def _hosted(self, layers: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        """Replacements for ``model``: a layer inside a converted host goes into a fresh copy of the host."""
        replacements: dict[str, nn.Module] = {}
        for name, layer in layers.items():
            host_name, _, child = name.rpartition(".")
            if host_name not in self._hosts:
                replacements[name] = layer
                continue
            if host_name not in replacements:
                replacements[host_name] = self._hosts[host_name].convert(self.model.get_submodule(host_name),
                                                                         share=False)
            setattr(replacements[host_name], child, layer)
        return replacements


def factorize(model: nn.Module, ranks: Ranks, *, method: Method = "whitened",
              calibration: Iterable[Any] | None = None, forward: ForwardFn | None = None,
              target_types: Sequence[type[nn.Module]] | None = None,
              target_modules: Patterns = None, exclude_modules: Patterns = None,
              conv_scheme: str | Mapping[str, str] = "channel",
              max_calibration_batches: int | None = None, ridge: float = 1e-6) -> nn.Module:
    """Return a copy of ``model`` with its supported layers replaced by low-rank layers.

    ``ranks``: one int for all target layers, a float fraction of each layer's full rank, or a
    map ``{module name: int | "dense"}`` (only the listed layers are decomposed). Everything
    is validated before anything is built; ``model`` itself is never modified. To build many
    rank maps from one decomposition, use :class:`Decomposition` directly.
    """
    layers = None
    if isinstance(ranks, Mapping):
        if not ranks:
            raise InvalidRankError(format_problem(
                "The rank map is empty", expected="at least one {module name: rank} entry"))
        layers = list(ranks)
    decomposition = Decomposition(model, method=method, calibration=calibration, forward=forward,
                                  target_types=target_types, target_modules=target_modules,
                                  exclude_modules=exclude_modules, layers=layers,
                                  conv_scheme=conv_scheme,
                                  max_calibration_batches=max_calibration_batches, ridge=ridge)
    return decomposition.build(ranks)


def coverage(model: nn.Module, example_batch: Any = None, *, forward: ForwardFn | None = None,
             target_types: Sequence[type[nn.Module]] | None = None, target_modules: Patterns = None,
             exclude_modules: Patterns = None) -> Coverage:
    """What the rank search could change in ``model``: every parameter-holding module, classified.

    With ``example_batch`` (one batch, fed like calibration batches) the MAC shares are
    measured too and layers that never run are found. Raises :class:`NoMatchingModuleError`
    (saying what the model holds instead) when nothing can be factorized. Equivalent to
    ``Decomposition(model, method="svd", calibration=[example_batch], ...).coverage()``.
    """
    decomposition = Decomposition(model, method="svd", forward=forward,
                                  calibration=None if example_batch is None else [example_batch],
                                  target_types=target_types, target_modules=target_modules,
                                  exclude_modules=exclude_modules)
    return decomposition.coverage()
