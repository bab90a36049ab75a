"""What a training run is told: `TrainConfig`, its defaults in one place (nanoGPT's way), read from
a TOML file and `--set key=value` overrides, every value checked for its type and range."""

from __future__ import annotations

import functools
import numbers
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    # data: a packs file from `nr pack`; its catalogs are found through it
    packs: str = ""
    catalogs: list[str] | None = None  # override the catalog paths recorded in the packs file
    out: str = "runs/nit"
    # model
    model: str = "tiny"  # tiny, S, B, L, XL (NiT's table)
    mlp: str = "gelu"  # gelu (NiT) or swiglu
    attention: str = "auto"  # auto, flash-varlen, torch-varlen, sdpa-loop, masked-sdpa, flex
    num_classes: int | None = None  # default: largest label in the catalogs + 1
    # objective
    reduction: str = "image"  # image: every image weighs the same; token: NiT's per-token mean
    direction_loss: bool = False  # NiT trains with it on
    class_dropout_prob: float = 0.1
    t_mean: float = 0.0  # t = sigmoid(N(t_mean, t_std)) per image (logit-normal; NiT: 0 and 1)
    t_std: float = 1.0
    # latents as the model sees them: per-channel (the catalogs' mean/std) or scalar (z * scaling_factor,
    # NiT's: for its released latents from `nr import nit` and fine-tunes of its weights)
    normalization: str = "per-channel"
    scaling_factor: float | None = None  # scalar mode; default: the encoder's own, from the catalogs' manifests
    # start from these weights (an nr run or checkpoint, or an `nr import nit-model` folder): model and EMA
    # begin there, optimizer and schedule fresh; the model config must match
    init_from: str | None = None
    # REPA, on when repa_encoder is set: a TorchScript file or hub:<local repo dir>:<entry> (nrtrain.repa)
    repa_encoder: str | None = None
    repa_depth: int = 8  # the projector reads this block's output (NiT: 4 for S and B, 6 for L, 8 for XL)
    repa_weight: float = 1.0
    repa_hidden: int = 2048  # projector width (NiT-S: 768)
    repa_normalization: str = "imagenet"  # input mean/std the encoder expects: imagenet, clip, none (RADIO)
    # REPA reads the images `nr encode --repa-pixels` stored; setting repa_image_root instead decodes the
    # source images under it at every step (the slow path, for catalogs encoded without them)
    repa_image_root: str | None = None
    # optimisation (NiT-XL: lr 1e-4 for 8 packs of 16384 tokens per step)
    steps: int = 1000
    lr: float = 1e-4
    schedule: str = "constant"  # constant or cosine (to min_lr_ratio * lr)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    eps: float = 1e-6
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.9999
    # system
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    precision: str = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu
    compile: bool = False  # torch.compile each transformer block (dynamic shapes: one graph for every pack)
    compile_backend: str = "inductor"  # torch.compile's backend; aot_eager checks tracing without code generation
    tf32: bool = True
    workers: int = 2
    log_every: int = 10
    ckpt_every: int = 1000
    keep_checkpoints: int | None = 3  # the last N; None keeps every one
    keep_every: int | None = None  # also keep every checkpoint whose step is a multiple (milestones for FID curves)
    tensorboard: bool = True
    resume: bool = False
    overwrite: bool = False  # start afresh in an out folder that holds a run: its outputs are deleted first

    def __post_init__(self) -> None:
        _check_types(self)
        checks = {
            "schedule": (self.schedule in ("constant", "cosine"), "constant or cosine"),
            "reduction": (self.reduction in ("image", "token"), "image or token"),
            "precision": (self.precision in ("auto", "bf16", "fp32"), "auto, bf16 or fp32"),
            "steps": (self.steps >= 1, ">= 1"), "grad_accum": (self.grad_accum >= 1, ">= 1"),
            "ckpt_every": (self.ckpt_every >= 1, ">= 1"), "log_every": (self.log_every >= 1, ">= 1"),
            "t_std": (self.t_std > 0, "> 0"),
            "normalization": (self.normalization in ("per-channel", "scalar"), "per-channel or scalar"),
            "scaling_factor": (self.scaling_factor is None or self.scaling_factor > 0, "> 0 (or unset)"), "keep_every": (self.keep_every is None or self.keep_every >= 1, ">= 1"),
            "keep_checkpoints": (self.keep_checkpoints is None or self.keep_checkpoints >= 1, ">= 1 (or unset: all)"),
            "repa_weight": (self.repa_encoder is None or self.repa_weight > 0, "> 0 when repa_encoder is set"),
            "overwrite": (not (self.overwrite and self.resume), "false with resume (one continues the run in out, "
                          "the other deletes it)"),
        }
        for name, (ok, wanted) in checks.items():
            if not ok:
                raise ValueError(f"config {name} = {getattr(self, name)!r}: must be {wanted}")


def _check_types(config: TrainConfig) -> None:
    """Every field holds a value of its declared type (a TOML file or `--set key=value` gives anything);
    numbers are converted (an int where a float is declared, a whole float where an int is)."""
    for spec in fields(config):
        value = getattr(config, spec.name)
        try:
            setattr(config, spec.name, _as_type(value, _field_types()[spec.name]))
        except TypeError as exc:
            raise ValueError(f"config {spec.name} = {value!r}: must be {exc}") from None


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)  # the annotations are strings (postponed evaluation)


def _as_type(value: Any, hint: Any) -> Any:
    """`value` as `hint` (bool, int, float, str, X | None, list[X], tuple[X, ...]); TypeError(what it must be)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return _as_type(value, inner)
        except TypeError as exc:
            raise TypeError(f"{exc} or unset") from None
    if origin in (list, tuple):
        wanted = _describe(hint)
        if not isinstance(value, (list, tuple)):
            raise TypeError(wanted)
        variadic = origin is list or args[-1] is Ellipsis
        if not variadic and len(value) != len(args):
            raise TypeError(wanted)
        try:
            items = [_as_type(v, t) for v, t in zip(value, [args[0]] * len(value) if variadic else args)]
        except TypeError:
            raise TypeError(wanted) from None
        return items if origin is list else tuple(items)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    else:
        return value
    raise TypeError(_describe(hint))


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is tuple:
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(hint, str(hint))


# -- config files: TOML (sections are only for reading; keys are TrainConfig's fields) ---------------

def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    import tomllib

    values: dict[str, Any] = {}
    if path:
        data = tomllib.loads(Path(path).read_text())
        for key, value in data.items():
            values.update(value if isinstance(value, dict) else {key: value})
    values.update(overrides or {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path or 'overrides'}: unknown config keys {unknown}; known: {sorted(known)}")
    return TrainConfig(**values)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with a TOML value (numbers, true/false, lists), or a bare string."""
    import tomllib

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r}: expected key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value
