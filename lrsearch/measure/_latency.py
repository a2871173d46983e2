"""Per-layer latency lookup table, measured on the deployment device.

FLOP counts predict latency poorly: a factorized layer runs two skinny kernels instead of one,
small batches are overhead-bound, and misaligned ranks fall off the vectorized fast paths. So
the search prices a rank map by *measured* times: the dense model, and every target layer
dense and at every candidate rank, each on the real input that layer sees at the deployment
batch size. A rank map's latency is then the dense model's minus the dense times of the layers
it replaces plus their factorized times (:meth:`LatencyTable.predict`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import timeit
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark import Timer

from lrsearch._atomic import atomic_write_json
from lrsearch._errors import CalibrationError, LrSearchError, format_problem
from lrsearch.core._conv import ConvRank
from lrsearch.core._cost import candidate_ranks
from lrsearch.core._decomposition import Decomposition
from lrsearch.core._runtime import ForwardFn, default_forward, move_to_device

__all__ = [
    "LatencyTable",
    "LatencyTableError",
    "LayerLatency",
    "MissingLatencyError",
    "Plan",
    "build_latency_table",
    "time_call",
]

Plan = Mapping[str, tuple[str, ConvRank]]
FORMAT = "lrsearch.latency_table"
VERSION = 1


class LatencyTableError(LrSearchError, ValueError):
    """A saved latency table is corrupted, truncated or not a latency table."""


class MissingLatencyError(LatencyTableError, KeyError):
    """A plan asks for a layer, scheme or rank the table never measured."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------- timing
def _resolve_device(device: str | torch.device) -> torch.device:
    """``"cuda"`` becomes ``cuda:<current>`` so a table records which device it timed."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None and torch.accelerator.is_available():
        return torch.device(device.type, torch.accelerator.current_device_index())
    return device


def _clock(device: torch.device) -> Callable[[], float]:
    """A clock that first waits for ``device``'s queued kernels.

    ``torch.utils.benchmark``'s default clock calls ``torch.accelerator.synchronize()`` when
    an accelerator is present, but that waits for the *current* device only (wrong for
    ``cuda:1``) and needlessly syncs a GPU while timing CPU work; so name the device here.
    """
    if device.type == "cpu":
        return timeit.default_timer

    def clock() -> float:
        torch.accelerator.synchronize(device)
        return timeit.default_timer()

    return clock


def _check_positive_int(value: object, what: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(format_problem(f"{what} must be an integer of at least {minimum}", given=repr(value)))
    return value


def time_call(fn: Callable[[], Any], *, device: torch.device | str, threads: int,
              min_run_time: float = 0.05, repeats: int = 5, warmup: int = 2) -> float:
    """Seconds per call of ``fn()``: the minimum over ``repeats`` blocked-autorange medians.

    Warm-up calls (at the timed thread count, since oneDNN caches primitives per thread
    count) absorb lazy initialization. Each ``blocked_autorange`` median already resists
    single outliers, but a busy 2-core machine can slow a whole run several-fold; such
    noise only ever adds time, so the fastest of several runs estimates the layer's cost.
    On a shared CPU, OpenMP's default spin-waiting can make multi-threaded timings 100× too
    slow; ``OMP_WAIT_POLICY=PASSIVE`` (set before importing torch) avoids that.
    """
    threads = _check_positive_int(threads, "threads")
    repeats = _check_positive_int(repeats, "repeats")
    warmup = _check_positive_int(warmup, "warmup", minimum=0)
    if not (isinstance(min_run_time, (int, float)) and min_run_time > 0 and math.isfinite(min_run_time)):
        raise ValueError(format_problem("min_run_time must be a positive number of seconds",
                                        given=repr(min_run_time)))
    device = _resolve_device(device)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, timer=_clock(device))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            fn()
        return min(timer.blocked_autorange(min_run_time=min_run_time).median for _ in range(repeats))
    finally:
        torch.set_num_threads(previous)


def _hardware(device: torch.device) -> str:
    """A name for the physical device, so a table copied to another machine does not match."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------- the table
@dataclass
class LayerLatency:
    """Seconds per call of one layer: dense, and factorized per scheme and rank.

    ``calls`` is how often one model forward runs the layer (a shared layer counts each
    time); ``input_shape`` is the captured input the timings ran on.
    """

    dense: float
    factorized: dict[str, dict[int, float]]
    geometry: dict[str, Any]
    input_shape: tuple[int, ...] = ()
    calls: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"dense": self.dense, "geometry": dict(self.geometry), "input_shape": list(self.input_shape),
                "calls": self.calls,
                "factorized": {scheme: {str(rank): seconds for rank, seconds in times.items()}
                               for scheme, times in self.factorized.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerLatency:
        factorized = {str(scheme): {int(rank): _seconds(seconds, f"rank {rank} ({scheme})")
                                    for rank, seconds in times.items()}
                      for scheme, times in data["factorized"].items()}
        geometry = data["geometry"]
        if not isinstance(geometry, dict):
            raise TypeError("geometry is not an object")
        return cls(dense=_seconds(data["dense"], "dense"), factorized=factorized, geometry=dict(geometry),
                   input_shape=tuple(int(size) for size in data["input_shape"]),
                   calls=_check_positive_int(data["calls"], "calls"))


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"the time of {what} is {value!r}, not a positive finite number of seconds")
    return float(value)


@dataclass
class LatencyTable:
    """Measured seconds of a model's forward and of each target layer, dense and factorized.

    Valid only for the settings it was measured with (device, threads, batch size, torch
    version, layer shapes): check :meth:`matches` before reusing a saved table.
    """

    device: str
    threads: int
    batch_size: int
    torch_version: str
    dense_model: float
    layers: dict[str, LayerLatency]
    hardware: str = ""

    def _layer(self, name: str) -> LayerLatency:
        if name not in self.layers:
            raise MissingLatencyError(format_problem(
                f"The latency table has no layer {name!r}", expected=f"one of {list(self.layers)}",
                hint="rebuild the table for this model's decomposition."))
        return self.layers[name]

    def _times(self, name: str, scheme: str) -> dict[int, float]:
        layer = self._layer(name)
        if scheme not in layer.factorized:
            raise MissingLatencyError(format_problem(
                f"The latency table has no timings of layer {name!r} with scheme {scheme!r}",
                expected=f"one of {sorted(layer.factorized)}",
                hint=f"rebuild the table with schemes={{{name!r}: [..., {scheme!r}]}}."))
        return layer.factorized[scheme]

    def factorized_time(self, name: str, scheme: str, rank: ConvRank) -> float:
        """Seconds per call of layer ``name`` factorized at ``rank``.

        A Tucker-2 pair is found under the int rank that clips to it, since the table is
        measured at int ranks ``r`` meaning ``(min(r, Cin), min(r, Cout))``.
        """
        layer, times = self._layer(name), self._times(name, scheme)
        key: int | None = None
        if isinstance(rank, (tuple, list)):
            cin, cout = layer.geometry["in_features"], layer.geometry["out_features"]
            key = next((r for r in times if (min(r, cin), min(r, cout)) == tuple(rank)), None)
        elif isinstance(rank, int) and not isinstance(rank, bool):
            key = rank
        if key not in times:
            raise MissingLatencyError(format_problem(
                f"The latency table has no timing of layer {name!r} ({scheme}) at rank {rank!r}",
                expected=f"one of the measured ranks {sorted(times)}",
                hint="search only the measured ranks, or rebuild the table with ranks= that include it."))
        return times[key]  # type: ignore[index]

    def predict(self, plan: Plan) -> float:
        """Seconds of one forward with the layers in ``plan`` (name → (scheme, rank)) factorized.

        The dense model's time minus each replaced layer's dense time plus its factorized
        time (per call, times the calls per forward). Layers not in ``plan`` stay dense.

        Layers timed one by one can add up to more than the whole model timed at once (caches
        stay warm for a lone layer on a busy machine); the per-layer times are then scaled down
        to fit the whole model, so a prediction is never negative and candidates keep their order.
        """
        layers = sum(layer.calls * layer.dense for layer in self.layers.values())
        scale = min(1.0, self.dense_model / layers) if layers > 0 else 1.0
        seconds = self.dense_model
        for name, (scheme, rank) in plan.items():
            layer = self._layer(name)
            seconds += scale * layer.calls * (self.factorized_time(name, scheme, rank) - layer.dense)
        return seconds

    def faster_ranks(self, name: str, scheme: str) -> list[int]:
        """Measured ranks strictly faster than the dense layer, ascending: the only ones worth keeping."""
        dense = self._layer(name).dense
        return sorted(rank for rank, seconds in self._times(name, scheme).items() if seconds < dense)

    def matches(self, *, device: str | torch.device, threads: int, batch_size: int,
                layers: Mapping[str, Mapping[str, Any]]) -> bool:
        """Whether this table was measured for these settings, this torch and this hardware.

        ``layers`` maps every target name to ``LayerGeometry.to_dict()``; the table must
        cover exactly these layers with the same shapes.
        """
        resolved = _resolve_device(device)
        return (self.device == str(resolved) and self.threads == threads and self.batch_size == batch_size
                and self.torch_version == torch.__version__ and self.hardware == _hardware(resolved)
                and set(self.layers) == set(layers)
                and all(self.layers[name].geometry == dict(geometry) for name, geometry in layers.items()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (rank keys become strings)."""
        return {"format": FORMAT, "version": VERSION, "device": self.device, "threads": self.threads,
                "batch_size": self.batch_size, "torch_version": self.torch_version,
                "hardware": self.hardware, "dense_model": self.dense_model,
                "layers": {name: layer.to_dict() for name, layer in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: Any) -> LatencyTable:
        """Parse :meth:`to_dict` output; anything malformed raises :class:`LatencyTableError`."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise LatencyTableError(format_problem(
                "This is not an lrsearch latency table", expected=f'a JSON object with "format": "{FORMAT}"'))
        if data.get("version") != VERSION:
            raise LatencyTableError(format_problem(
                "Unsupported latency table version", expected=str(VERSION), given=repr(data.get("version")),
                hint="rebuild the table with this version of lrsearch."))
        try:
            return cls(device=str(data["device"]), threads=_check_positive_int(data["threads"], "threads"),
                       batch_size=_check_positive_int(data["batch_size"], "batch_size"),
                       torch_version=str(data["torch_version"]), hardware=str(data["hardware"]),
                       dense_model=_seconds(data["dense_model"], "the dense model"),
                       layers={str(name): LayerLatency.from_dict(layer) for name, layer in data["layers"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise LatencyTableError(format_problem(
                "The latency table is malformed", given=f"{type(error).__name__}: {error}",
                hint="delete it and rebuild it with build_latency_table().")) from error

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the table as JSON atomically (a crash leaves the old file or the new one)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyTable:
        """Read a table written by :meth:`save`; a corrupted file raises :class:`LatencyTableError`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LatencyTableError(format_problem(
                f"The latency table {os.fspath(path)!r} is not valid JSON (corrupted or truncated)",
                given=str(error), hint="delete it and rebuild it with build_latency_table().")) from error
        return cls.from_dict(data)


# ---------------------------------------------------------------------------------- building
def _leading_size(batch: Any) -> int | None:
    """Dim 0 of the first tensor in the batch (the input, by the ``default_forward`` convention)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        size = _leading_size(value)
        if size is not None:
            return size
    return None


def _resize(batch: Any, old: int, new: int) -> Any:
    """Cycle or cut every tensor whose dim 0 is the batch size, keeping the container types."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] != old:
            return batch
        return batch[:new] if new <= old else batch[torch.arange(new, device=batch.device) % old]
    if isinstance(batch, Mapping):
        return {key: _resize(value, old, new) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_resize(value, old, new) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_resize(value, old, new) for value in batch)
    return batch


def resize_batch(batch: Any, size: int) -> Any:
    """``batch`` with its batch dimension cycled or cut to ``size`` (other tensors left as they are)."""
    old = _leading_size(batch)
    return batch if old is None or old == size else _resize(batch, old, size)


def _plan_measurements(decomposition: Decomposition, ranks: Mapping[str, Sequence[int]] | None,
                       schemes: Mapping[str, Sequence[str]] | None, multiple: int
                       ) -> dict[str, dict[str, list[int]]]:
    """Validate every requested layer, scheme and rank up front: name → scheme → ranks."""
    for name in [*(ranks or {}), *(schemes or {})]:
        decomposition.scheme(name)  # raises UnknownLayerError with suggestions
    work: dict[str, dict[str, list[int]]] = {}
    for name in decomposition.targets:
        layer_schemes = list((schemes or {}).get(name, [decomposition.scheme(name)]))
        work[name] = {}
        for scheme in layer_schemes:
            decomposition.full_rank(name, scheme)  # raises on a scheme the layer's kind lacks or cannot use
            if ranks is not None and name in ranks:
                layer_ranks = list(dict.fromkeys(ranks[name]))
                for rank in layer_ranks:
                    decomposition.resolve({name: rank}, schemes={name: scheme})  # raises InvalidRankError
            else:
                layer_ranks = candidate_ranks(decomposition.geometry(name), scheme, multiple=multiple)
            work[name][scheme] = layer_ranks
    return work


def build_latency_table(decomposition: Decomposition, example_batch: Any, *, batch_size: int | None = None,
                        device: str | torch.device = "cpu", threads: int | None = None,
                        ranks: Mapping[str, Sequence[int]] | None = None,
                        schemes: Mapping[str, Sequence[str]] | None = None, forward: ForwardFn | None = None,
                        multiple: int = 8, min_run_time: float = 0.05, repeats: int = 5,
                        progress: Callable[[int, int], None] | None = None) -> LatencyTable:
    """Time the dense model and every target layer, dense and at each candidate rank.

    Works on a deep copy of ``decomposition.working_model`` (the model, with any
    ``nn.MultiheadAttention`` in its explicit form) moved to ``device``; the user's model is
    never moved or changed. ``example_batch`` is cycled or cut along dim 0 to ``batch_size``
    (default: its own size), since per-layer speedups depend strongly on the batch size.
    Each layer is timed on the input it really receives in one forward pass.

    Args:
        ranks: layer name → ranks to time (default: multiples of ``multiple`` below the
            break-even rank, as in :func:`lrsearch.core.candidate_ranks`).
        schemes: layer name → factorization schemes to time (default: the layer's scheme).
        threads: CPU threads (default: ``torch.get_num_threads()``); restored afterwards.
        repeats: timed runs per measurement, the fastest kept (a layer's candidates are
            run in turn, see :func:`_round_robin`).
        progress: called as ``progress(done, total)`` after each timed run.
    """
    size = _leading_size(example_batch)
    if size is None or size < 1:
        raise CalibrationError(format_problem(
            "The example batch has no tensor with a batch dimension",
            expected="a tensor, a tuple/list whose first element is the input, or a dict of tensors",
            given=type(example_batch).__name__))
    batch_size = size if batch_size is None else _check_positive_int(batch_size, "batch_size")
    previous_threads = torch.get_num_threads()
    threads = previous_threads if threads is None else _check_positive_int(threads, "threads")
    device = _resolve_device(device)
    forward = forward or default_forward
    work = _plan_measurements(decomposition, ranks, schemes, multiple)
    repeats = _check_positive_int(repeats, "repeats")
    # The whole model runs in every round of the first layer and the first round of the others.
    total = repeats + len(work) - 1 + repeats * sum(
        1 + sum(len(r) for r in by_scheme.values()) for by_scheme in work.values())
    done = 0

    def measure(fn: Callable[[], Any], *, warmup: int) -> float:
        nonlocal done
        seconds = time_call(fn, device=device, threads=threads, min_run_time=min_run_time,
                            repeats=1, warmup=warmup)
        done += 1
        if progress is not None:
            progress(done, total)
        return seconds

    model = copy.deepcopy(decomposition.working_model).to(device).eval()
    batch = move_to_device(_resize(example_batch, size, batch_size), device)
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            inputs, calls = _capture_inputs(model, batch, forward, decomposition.targets)
            whole = partial(forward, model, batch)
            dense_model = math.inf
            layers: dict[str, LayerLatency] = {}
            for index, (name, by_scheme) in enumerate(work.items()):
                x = inputs[name]
                keys = [(scheme, rank) for scheme, layer_ranks in by_scheme.items() for rank in layer_ranks]
                modules = [model.get_submodule(name), *(
                    decomposition.layer(name, rank, scheme=scheme).to(device).eval() for scheme, rank in keys)]
                # The whole model also joins each layer's rounds, so its minimum draws on runs
                # spread over the entire build rather than on one stretch that may be busy.
                model_time, dense, *factorized = _round_robin(
                    [whole, *(partial(module, x) for module in modules)],
                    [repeats if index == 0 else 1] + [repeats] * len(modules), measure)
                dense_model = min(dense_model, model_time)
                times: dict[str, dict[int, float]] = {scheme: {} for scheme in by_scheme}
                for (scheme, rank), seconds in zip(keys, factorized):
                    times[scheme][rank] = seconds
                layers[name] = LayerLatency(dense=dense, factorized=times,
                                            geometry=decomposition.geometry(name).to_dict(),
                                            input_shape=tuple(x.shape), calls=calls[name])
    finally:
        torch.set_num_threads(previous_threads)
    return LatencyTable(device=str(device), threads=threads, batch_size=batch_size,
                        torch_version=torch.__version__, dense_model=dense_model, layers=layers,
                        hardware=_hardware(device))


def _round_robin(fns: Sequence[Callable[[], Any]], runs: Sequence[int],
                 measure: Callable[..., float]) -> list[float]:
    """The fastest of ``runs[i]`` timed runs of each ``fns[i]``, one run of each in turn.

    Interleaving (rather than all runs of one function in a row) means a burst of load from
    another process slows one run of several candidates, never every run of one, so a
    layer's dense and factorized minima stay comparable on a busy machine.
    """
    best = [math.inf] * len(fns)
    for round_ in range(max(runs)):
        for index, fn in enumerate(fns):
            if round_ < runs[index]:
                best[index] = min(best[index], measure(fn, warmup=2 if round_ == 0 else 0))
    return best


def _capture_inputs(model: nn.Module, batch: Any, forward: ForwardFn, names: Sequence[str]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Run one forward and keep each target's first input and how often it was called."""
    inputs: dict[str, torch.Tensor] = {}
    calls = dict.fromkeys(names, 0)

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            calls[name] += 1
            if name not in inputs and args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].detach()
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in inputs]
    if missing:
        raise CalibrationError(format_problem(
            f"Layers {missing} received no tensor input during a forward of the example batch",
            hint="pass an example batch (and forward=) that runs every target layer, "
                 "or leave those layers out of the decomposition."))
    return inputs, calls
