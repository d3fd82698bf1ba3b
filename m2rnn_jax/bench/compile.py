"""Ahead-of-time compile of the trainer's real train step for a virtual TPU topology, and what it costs per chip.

Needs libtpu (``jax[tpu]``; in this repository ``.ci/install_tpu.sh`` puts it in ``.venv-tpu/``, used with
``PYTHONPATH=.venv-tpu``), not TPU hardware: ``jax.experimental.topologies`` describes the chips of a topology
such as ``v5e:2x4`` or ``v5p:4x4x4``, a mesh ``(data, fsdp, tensor, expert)`` is laid over them
(:func:`m2rnn_jax.parallel.build_mesh`), and the step that ``m2rnn-jax train`` runs
(:func:`m2rnn_jax.train.step.make_train_step`: AdamW with clipping and the NaN guard, the logical-axis sharding
rules, remat, the M2RNN Mosaic kernel under ``shard_map``, the chunked GDN op, MoE, the chunked LM-head loss) is
traced with abstract sharded arguments and compiled by the real TPU compiler. Nothing is allocated or run.

The report, per chip: argument / output / alias / temporary memory from the compiler's memory analysis, their
total against the chip's HBM, the compiler's FLOP and byte estimates (``cost_analysis``), and the collectives of
the optimized HLO (:mod:`m2rnn_jax.bench.collectives`). The TPU compiler itself refuses a program that needs more
HBM than the chip has; that refusal is reported as "does not fit" with the compiler's message.

M2RNN layers run ``backend="pallas_tpu"`` and GDN layers ``backend="chunked"`` whatever the preset says: the
"auto" choice follows the default device, which is the CPU of the compiling host.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import re
import resource
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from m2rnn_jax.bench.collectives import count_collectives
from m2rnn_jax.layers.grouped_matmul import megablox_fits
from m2rnn_jax.layers.mlp import MoEConfig
from m2rnn_jax.layers.moe_dispatch import resolve_dispatch
from m2rnn_jax.models import ModelConfig
from m2rnn_jax.models.config import MIXER_FIELDS, REMAT_CHOICES
from m2rnn_jax.parallel.mesh import build_mesh, resolve_mesh_shape
from m2rnn_jax.parallel.rules import MESH_AXES
from m2rnn_jax.parallel.shardings import batch_sharding, batch_shards, mesh_shape, replicated

GIB = 2**30
# HBM per chip (GiB) by the topology's chip name (the part of "v5e:2x4" before the colon).
CHIP_HBM_GIB: dict[str, float] = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
TPU_BACKENDS = {"m2rnn": "pallas_tpu", "gated_deltanet": "chunked"}
_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory|exceeds? .*memory|Out of memory")


@dataclasses.dataclass(frozen=True)
class CompileRequest:
    """What to compile: a model preset's train step on ``topology`` with mesh ``mesh`` (``-1`` = the rest).

    ``batch`` is the global batch of one optimizer step (sequences), cut into ``grad_accum`` micro-batches;
    ``remat`` overrides the preset's activation checkpointing (None keeps it); ``hbm_gib`` overrides the chip's HBM.
    ``overrides`` are ``KEY=VALUE`` assignments on the preset's training config (``model.vocab_size=4096``, as
    ``m2rnn-jax train --set``); ``layers`` keeps only the first ``layers`` blocks of the layer pattern (a probe of
    how compile cost and memory grow with depth).
    """

    preset: str
    topology: str
    mesh: Mapping[str, int]
    batch: int
    seq_len: int = 4096
    grad_accum: int = 1
    remat: str | None = None
    hbm_gib: float | None = None
    overrides: tuple[str, ...] = ()
    layers: int | None = None

    def __post_init__(self):
        for name in ("batch", "seq_len", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.remat is not None and self.remat not in REMAT_CHOICES:
            raise ValueError(f"remat: expected one of {REMAT_CHOICES}, got {self.remat!r}")
        if self.hbm_gib is not None and not self.hbm_gib > 0:
            raise ValueError(f"hbm_gib: expected > 0, got {self.hbm_gib!r}")
        if self.layers is not None and (
            not isinstance(self.layers, int) or isinstance(self.layers, bool) or self.layers <= 0
        ):
            raise ValueError(f"layers: expected a positive int or None, got {self.layers!r}")


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (axes of ``MESH_AXES``; one size may be -1)."""
    sizes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ValueError(f"--mesh: expected comma-separated AXIS=SIZE with AXIS in {MESH_AXES}, got {text!r}")
        if name in sizes:
            raise ValueError(f"--mesh: expected each axis once, got {name!r} twice in {text!r}")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size <= 0 and size != -1:
            raise ValueError(f"--mesh: expected a positive size (or -1) for {name}, got {value.strip()!r}")
        sizes[name] = size
    if not sizes:
        raise ValueError(f"--mesh: expected at least one AXIS=SIZE, got {text!r}")
    return sizes


def chip_name(topology: str) -> str:
    """``"v5p:4x4x4"`` -> ``"v5p"``; ValueError for a string that is not ``CHIP:DIMS``."""
    name, sep, dims = topology.partition(":")
    if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims):
        raise ValueError(f"--topology: expected CHIP:DIMS such as v5e:2x4 or v5p:4x4x4, got {topology!r}")
    return name


def topology_devices(topology: str) -> list[Any]:
    """The virtual TPU devices of ``topology`` (ValueError when libtpu is missing or the topology is unknown)."""
    chip_name(topology)
    from jax.experimental import topologies

    # Compiling touches no chip: let several compiles (and a TPU job on this host) share libtpu, whose default is
    # one process per host (a lock file in /tmp).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as err:  # libtpu raises RuntimeError / XlaRuntimeError / ValueError depending on the cause
        if _libtpu_version() is None:
            raise ValueError(
                "--topology: the TPU compiler (libtpu) is not importable; install jax[tpu] or run "
                ".ci/install_tpu.sh and put .venv-tpu first on PYTHONPATH"
            ) from err
        raise ValueError(f"--topology: libtpu cannot describe the topology {topology!r} ({err})") from err
    return list(description.devices)


def _topology_mesh(sizes: Mapping[str, int], devices: list[Any], topology: str) -> Mesh:
    """The mesh of ``sizes`` over the topology's ``devices``; ValueError when JAX cannot lay it on the chips' torus
    (each mesh axis must be a product of some of the topology's dimensions: on 4x4x4, 8 is not)."""
    try:
        return build_mesh(sizes, devices)
    except NotImplementedError as err:
        raise ValueError(
            f"--mesh: expected axis sizes that are products of the topology's dimensions ({topology}), got "
            f"{ {axis: size for axis, size in sizes.items() if size > 1} } ({err})"
        ) from err


def _libtpu_version() -> str | None:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def requested_train_config(request: CompileRequest) -> Any:
    """The TrainConfig of ``request.preset`` with its ``overrides`` applied and the layer pattern cut to
    ``request.layers`` blocks (ValueError when the preset has fewer)."""
    from m2rnn_jax.train.overrides import apply_overrides
    from m2rnn_jax.train.presets import train_config

    config = apply_overrides(train_config(request.preset), list(request.overrides))
    if request.layers is None:
        return config
    model = config.model
    if request.layers > model.num_layers:
        raise ValueError(f"--layers: expected at most the model's {model.num_layers} layers, got {request.layers}")
    pattern = model.layer_pattern[: request.layers]
    used = {MIXER_FIELDS[letter] for letter in pattern}
    unused = {field: None for field in MIXER_FIELDS.values() if field not in used}
    return dataclasses.replace(config, model=model.replace(num_layers=request.layers, layer_pattern=pattern, **unused))


def tpu_model_config(config: ModelConfig, remat: str | None) -> ModelConfig:
    """``config`` with the TPU backends of :data:`TPU_BACKENDS`, the MoE experts on the megablox kernels where
    their widths allow it (the "auto" choice would follow the compiling host's CPU) and, if given, the ``remat``
    policy."""
    changes: dict[str, Any] = {
        field: dataclasses.replace(getattr(config, field), backend=backend)
        for field, backend in TPU_BACKENDS.items()
        if getattr(config, field) is not None
    }
    moe = config.mlp
    if isinstance(moe, MoEConfig) and moe.grouped_matmul == "auto":
        fits = megablox_fits(config.hidden_size, moe.intermediate_size)
        changes["mlp"] = dataclasses.replace(moe, grouped_matmul="megablox" if fits else "ragged_dot")
    if remat is not None:
        changes["remat"] = remat
    return config.replace(**changes)


def check_divisibility(config: ModelConfig, sizes: Mapping[str, int], batch: int, grad_accum: int) -> None:
    """ValueError unless the mesh ``sizes`` splits the batch and the model as the train step needs.

    The micro-batch must split over the batch axes (data * fsdp * expert); the M2RNN heads over ``tensor`` (the
    kernel runs per head block); the MoE experts over ``expert``. Other dimensions that do not divide are
    replicated (see :func:`replicated_parameters`).
    """
    if batch % grad_accum:
        raise ValueError(f"--batch: expected a multiple of --grad-accum={grad_accum}, got {batch}")
    micro = batch // grad_accum
    shards = math.prod(sizes[axis] for axis in ("data", "fsdp", "expert"))
    if micro % shards:
        raise ValueError(
            f"--batch: expected the micro-batch (batch / grad_accum = {micro}) to be a multiple of the {shards} batch "
            f"shards of the mesh (data*fsdp*expert = {sizes['data']}*{sizes['fsdp']}*{sizes['expert']})"
        )
    if config.m2rnn is not None and config.m2rnn.num_heads % sizes["tensor"]:
        raise ValueError(
            f"--mesh: expected tensor to divide the {config.m2rnn.num_heads} M2RNN heads of the model, got "
            f"tensor={sizes['tensor']}"
        )
    experts = getattr(config.mlp, "num_experts", None)
    if sizes["expert"] > 1 and (experts is None or experts % sizes["expert"]):
        raise ValueError(
            f"--mesh: expected expert to divide the model's MoE experts ({experts or 'none: dense MLP'}), got "
            f"expert={sizes['expert']}"
        )


def replicated_parameters(abstract_params: Any, shardings: Any, sizes: Mapping[str, int]) -> list[str]:
    """Names of parameters that carry a split logical axis but stay replicated because the size does not divide."""
    from flax import nnx

    from m2rnn_jax.parallel.rules import LOGICAL_AXIS_RULES

    names = []
    leaves = jax.tree_util.tree_leaves_with_path(abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for (path, variable), sharding in zip(leaves, sharding_leaves):
        logical = variable.get_metadata().get("out_sharding") or ()
        wanted = [n for n in logical if n and any(sizes.get(a, 1) > 1 for a in LOGICAL_AXIS_RULES.get(n, ()))]
        spec = sharding.get_value().spec if isinstance(sharding, nnx.Variable) else sharding.spec
        if wanted and all(entry is None for entry in spec):
            names.append(jax.tree_util.keystr(path))
    return names


def _peak_rss_bytes() -> int:
    """The largest resident memory this process has had so far (the compile's host cost), in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _cost(compiled: Any) -> dict[str, float | None]:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per partition
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {
        "flops": analysis.get("flops"),
        "transcendentals": analysis.get("transcendentals"),
        "bytes_accessed": analysis.get("bytes accessed"),
    }


def _memory(compiled: Any, hbm_bytes: int) -> dict[str, Any]:
    stats = compiled.memory_analysis()
    argument, output = stats.argument_size_in_bytes, stats.output_size_in_bytes
    alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    code = stats.generated_code_size_in_bytes
    total = argument + output - alias + temp + code
    return {
        "argument_bytes": argument,
        "output_bytes": output,
        "alias_bytes": alias,
        "temp_bytes": temp,
        "generated_code_bytes": code,
        "total_bytes": total,
        "hbm_bytes": hbm_bytes,
        "fraction_of_hbm": total / hbm_bytes,
        "fits": total <= hbm_bytes,
    }


def _moe_settings(config: ModelConfig, mesh: Mesh, micro_batch: int) -> dict[str, str] | None:
    """The MoE's ``dispatch`` (as resolved on ``mesh`` for ``micro_batch`` sequences) and ``grouped_matmul``; None
    for a dense model."""
    if not isinstance(config.mlp, MoEConfig):
        return None
    with jax.set_mesh(mesh):
        dispatch = resolve_dispatch(config.mlp.dispatch, config.mlp.num_experts, micro_batch)
    return {"dispatch": dispatch, "grouped_matmul": config.mlp.grouped_matmul}


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _build_step(train: Any, config: ModelConfig, request: CompileRequest, mesh: Mesh):
    """(jitted step, abstract state, abstract batch, parameter count, replicated parameter names) of the train
    config ``train`` with its model replaced by ``config``."""
    from m2rnn_jax.train.optimizer import build_optimizer, learning_rate_schedule
    from m2rnn_jax.train.state import abstract_train_state, model_graphdef, train_state_shardings
    from m2rnn_jax.train.step import make_train_step

    optimizer = build_optimizer(train.optimizer, train.steps)
    schedule = learning_rate_schedule(train.optimizer, train.steps)
    abstract = abstract_train_state(config, optimizer)
    shardings = train_state_shardings(abstract, optimizer, mesh)
    batch_spec = batch_sharding(mesh)
    step = jax.jit(
        make_train_step(model_graphdef(config), optimizer, schedule, request.grad_accum),
        in_shardings=(shardings, batch_spec),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )
    tokens = jax.ShapeDtypeStruct((request.batch, request.seq_len), jnp.int32, sharding=batch_spec)
    batch = {"inputs": tokens, "targets": tokens}
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    replicated_names = replicated_parameters(abstract.params, shardings.params, mesh_shape(mesh))
    return step, _abstract(abstract, shardings), batch, num_params, replicated_names


def compile_train_step(request: CompileRequest) -> dict[str, Any]:
    """Compiles the train step of ``request`` for its topology; returns the report (see docs/tpu_pods.md).

    ValueError for a request that cannot be built (unknown preset or topology, a mesh that does not divide the
    topology or the model, no libtpu). A compile that the TPU compiler refuses for lack of HBM gives a report with
    ``status`` "does_not_fit" and the compiler's message; any other compiler error is raised.
    """
    chip = chip_name(request.topology)
    hbm_gib = request.hbm_gib if request.hbm_gib is not None else CHIP_HBM_GIB.get(chip)
    if hbm_gib is None:
        raise ValueError(f"--hbm-gib: HBM of chip {chip!r} unknown (known: {sorted(CHIP_HBM_GIB)}); pass it")
    train = requested_train_config(request)
    config = tpu_model_config(train.model, request.remat)
    devices = topology_devices(request.topology)
    sizes = resolve_mesh_shape(request.mesh, len(devices))
    check_divisibility(config, sizes, request.batch, request.grad_accum)
    mesh = _topology_mesh(sizes, devices, request.topology)

    report: dict[str, Any] = {
        "preset": request.preset,
        "topology": request.topology,
        "chip": devices[0].device_kind,
        "num_devices": len(devices),
        "mesh": sizes,
        "batch": request.batch,
        "micro_batch": request.batch // request.grad_accum,
        "grad_accum": request.grad_accum,
        "seq_len": request.seq_len,
        "layers": request.layers,
        "layer_pattern": config.layer_pattern,
        "overrides": list(request.overrides),
        "micro_batch_per_device": request.batch // request.grad_accum // batch_shards(mesh),
        "remat": config.remat,
        "backends": {f: b for f, b in TPU_BACKENDS.items() if getattr(config, f) is not None},
        "moe": _moe_settings(config, mesh, request.batch // request.grad_accum),
        "dtype": config.dtype,
        "param_dtype": config.param_dtype,
        "jax_version": jax.__version__,
        "libtpu_version": _libtpu_version(),
    }
    start = time.perf_counter()
    step, state, batch, num_params, replicated_names = _build_step(train, config, request, mesh)
    report["num_params"] = num_params
    report["replicated_parameters"] = replicated_names
    with jax.set_mesh(mesh):  # the step reads the mesh (batch groups of the LM head, shard_map of the kernels)
        lowered = step.trace(state, batch).lower()
    report["lower_seconds"] = time.perf_counter() - start
    try:
        compiled = lowered.compile()
    except Exception as err:  # the TPU compiler's HBM check raises a runtime error with RESOURCE_EXHAUSTED
        if not _OOM.search(str(err)):
            raise
        report.update(
            status="does_not_fit",
            error=str(err).strip().splitlines()[0][:2000],
            compile_seconds=time.perf_counter() - start,
            host_peak_rss_bytes=_peak_rss_bytes(),
            cost=None,
            collectives=None,
        )
        report["memory"] = {"hbm_bytes": int(hbm_gib * GIB), "fits": False}
        return report
    report["compile_seconds"] = time.perf_counter() - start
    report["host_peak_rss_bytes"] = _peak_rss_bytes()
    report["memory"] = _memory(compiled, int(hbm_gib * GIB))
    report["cost"] = _cost(compiled)
    report["collectives"] = count_collectives(compiled.as_text())
    report["status"] = "fits" if report["memory"]["fits"] else "does_not_fit"
    report["error"] = None
    return report


def _size(num_bytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: bytes in the largest binary unit that keeps the number >= 1."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{int(num_bytes)} B"


def format_report(report: Mapping[str, Any]) -> str:
    """A few human-readable lines of a :func:`compile_train_step` report."""
    mesh = ",".join(f"{axis}={size}" for axis, size in report["mesh"].items())
    layers = "" if report["layers"] is None else f" ({report['layers']} layers: {report['layer_pattern']})"
    lines = [
        f"{report['preset']}{layers} on {report['topology']} ({report['num_devices']} x {report['chip']}), mesh {mesh}",
        f"batch {report['batch']} x {report['seq_len']} (micro-batch {report['micro_batch']}, "
        f"{report['micro_batch_per_device']} per device, grad-accum {report['grad_accum']}), remat {report['remat']}, "
        f"{report['num_params'] / 1e6:.1f}M parameters",
    ]
    if report.get("moe"):
        lines.append(f"MoE: dispatch {report['moe']['dispatch']}, grouped matmul {report['moe']['grouped_matmul']}")
    memory = report["memory"]
    if report.get("error"):
        lines.append(f"DOES NOT FIT ({_size(memory['hbm_bytes'])} HBM): {report['error']}")
    else:
        sizes = {
            key: _size(memory[key])
            for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "total_bytes", "hbm_bytes")
        }
        verdict = "fits" if memory["fits"] else "DOES NOT FIT"
        lines.append(
            f"memory per device: arguments {sizes['argument_bytes']}, outputs {sizes['output_bytes']} (aliased "
            f"{sizes['alias_bytes']}), temporaries {sizes['temp_bytes']}, total {sizes['total_bytes']} of "
            f"{sizes['hbm_bytes']} HBM ({memory['fraction_of_hbm']:.1%}) -> {verdict}"
        )
        cost = report["cost"]
        if cost["flops"] is not None:
            lines.append(
                f"compiler estimate per device: {cost['flops']:.3g} FLOP, {_size(cost['bytes_accessed'] or 0)} accessed"
            )
        parts = [
            f"{kind} {c['count']} ({_size(c['bytes'])})" for kind, c in report["collectives"].items() if c["count"]
        ]
        lines.append("collectives: " + (", ".join(parts) if parts else "none"))
    if report["replicated_parameters"]:
        lines.append(
            f"replicated (size not divisible by the mesh): {len(report['replicated_parameters'])} "
            f"parameters, e.g. {report['replicated_parameters'][0]}"
        )
    lines.append(
        f"compiled in {report['compile_seconds']:.1f} s (trace + lower {report['lower_seconds']:.1f} s), "
        f"host peak RSS {_size(report['host_peak_rss_bytes'])}"
    )
    return "\n".join(lines)
