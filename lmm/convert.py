"""`lmm convert edm`: NVlabs EDM network pickles (`network-snapshot-*.pkl`, `edm-*.pkl`) to lmm teacher files.

An EDM pickle holds {"ema": network, "loss_fn": ..., "augment_pipe": ..., "dataset_kwargs": ...}; its modules
are "persistent" objects that carry their Python source and rebuild themselves by executing it, so a plain
`pickle.load` runs whatever code the file contains. `read_edm_pickle` never does: a restricted unpickler turns
each persistent object into an inert `EDMObject` (class name + state, the source ignored), builds tensors from
their serialised storages with `torch.load(weights_only=True)`, decodes the numpy scalars EDM passes to its
modules (`np.sqrt(0.5)`, ...) from their bytes into Python bool/int/float/complex (numeric dtypes only), and
refuses every other global (numpy arrays, plain torch modules, ...). The network is then rebuilt from its
recorded constructor arguments as lmm's own classes (lmm.nets.edm, lmm.nets.precond) and its weights loaded
with a strict state dict.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
from pathlib import Path
from typing import Any

import torch

from lmm.checkpoint import save_model
from lmm.config import defaults
from lmm.io import file_sha256
from lmm.models import build_model, model_meta, teacher_objective

EDM_PRECONDS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
EDM_NETS = {"SongUNet": "songunet", "DhariwalUNet": "dhariwalunet"}
# EDM's sampler defaults (generate.py): 18 Heun steps (35 NFE) from sigma_max 80 to sigma_min 0.002, rho 7,
# clamped to the network's own sigma range.
SAMPLER = {"solver": "heun", "steps": 18, "schedule": "edm", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
_VP_DEFAULTS = {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5}


class EDMObject:
    """A persistent object of an EDM pickle, not executed: its class name and its pickled __dict__."""

    class_name = ""
    state: dict[str, Any] = {}

    def __init__(self, class_name: str, state: dict[str, Any]) -> None:
        self.class_name, self.state = class_name, state

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


def _container(name: str) -> type:
    """A torch.nn container class (ModuleDict, ...) as an inert record: pickle makes it with __new__ + __setstate__."""
    return type(name, (EDMObject,), {"class_name": name})


class _EasyDict(dict):
    """dnnlib.util.EasyDict: a dict."""


def _persistent(meta: dict) -> EDMObject:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("malformed persistent object record")
    return EDMObject(meta["class_name"], dict(meta.get("state") or {}))


def _storage(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("torch.storage", "_load_from_bytes"): _storage,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("_codecs", "encode"): lambda text, encoding="latin1": text.encode(encoding),
    **{("torch.nn.modules.container", n): _container(n) for n in ("ModuleDict", "ModuleList", "Sequential")},
}


# struct formats of the numpy scalar dtypes read, by the code numpy pickles a dtype with (kind + size).
_NUMPY_SCALARS = {"b1": "?", "i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "i8": "q", "u8": "Q",
                  "f2": "e", "f4": "f", "f8": "d", "c8": "2f", "c16": "2d"}
_BYTE_ORDERS = {"<": "<", ">": ">", "=": "=", "|": "="}
_NUMPY_SCALAR_GLOBALS = {("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar")}


class _NumpyDtype:
    """numpy.dtype(code, align, copy) of a numeric scalar as an inert record; BUILD sets its byte order."""

    def __init__(self, code: str, byte_order: str = "=") -> None:
        self.code, self.byte_order = code, byte_order

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in _BYTE_ORDERS
                and state[2:5] == (None, None, None)):
            raise pickle.UnpicklingError(f"numpy.dtype {self.code!r} with malformed state {state!r:.80}")
        self.byte_order = state[1]


def _refusal(module: str, name: str) -> str:
    if module.split(".")[0] == "numpy":
        what = "a numpy array; " if name == "_reconstruct" else ""
        return f"{what}only numeric numpy scalars are read from an EDM pickle"
    if module.startswith("torch.nn.modules."):
        return "a plain torch module; 'ema' must be an EDM persistent network (torch_utils.persistence)"
    return "not part of an EDM network pickle; loading it could run code"


class _EDMUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) == ("numpy", "dtype"):
            return self._numpy_dtype
        if (module, name) in _NUMPY_SCALAR_GLOBALS:
            return self._numpy_scalar
        raise pickle.UnpicklingError(f"{self.path}: refuses to load global {f'{module}.{name}'!r} "
                                     f"({_refusal(module, name)})")

    def _numpy_dtype(self, code: Any, align: Any = False, copy: Any = False) -> _NumpyDtype:
        if not isinstance(code, str) or code not in _NUMPY_SCALARS:
            why = ("a long double, whose layout depends on the machine that wrote it" if code in ("f16", "c32")
                   else "only numeric numpy scalars are read from an EDM pickle")
            raise pickle.UnpicklingError(f"{self.path}: refuses numpy.dtype {code!r} ({why})")
        return _NumpyDtype(code)

    def _numpy_scalar(self, dtype: Any, data: Any) -> bool | int | float | complex:
        if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes):
            raise pickle.UnpicklingError(f"{self.path}: refuses numpy scalar({type(dtype).__name__}, "
                                         f"{type(data).__name__}) (only numeric numpy scalars are read)")
        fmt = _BYTE_ORDERS[dtype.byte_order] + _NUMPY_SCALARS[dtype.code]
        if len(data) != struct.calcsize(fmt):
            raise pickle.UnpicklingError(f"{self.path}: a numpy scalar of dtype {dtype.code!r} takes "
                                         f"{struct.calcsize(fmt)} bytes, this one has {len(data)}")
        values = struct.unpack(fmt, data)
        return complex(*values) if len(values) == 2 else values[0]

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"{self.path}: persistent id {pid!r} (a torch.save file, not an EDM pickle)")


def _not_a_pickle(head: bytes) -> str:
    """What a file whose first bytes are `head` is instead of a pickle of protocol 2 or later (EDM's); "" if it
    may be one."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (what torch.save writes)"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "a safetensors file (lmm reads those with --model / --teacher)"
    if not head.startswith(b"\x80"):
        return "not a pickle"
    return ""


def read_edm_pickle(path: str | Path) -> dict[str, Any]:
    """The top-level dict of an EDM pickle, persistent objects as `EDMObject`s, tensors as tensors.
    Raises ValueError naming the file for anything else (unknown globals, truncation, not a dict)."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            not_pickle = _not_a_pickle(f.read(9))
        if not_pickle:
            raise ValueError(f"{path}: {not_pickle}, not an EDM network pickle (network-snapshot-*.pkl)")
    try:
        with open(path, "rb") as f:
            data = _EDMUnpickler(f, path).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"EDM pickle {path} does not exist") from None
    except pickle.UnpicklingError as e:
        raise ValueError(str(e) if str(path) in str(e) else f"{path}: not a readable EDM pickle ({e})") from None
    except (EOFError, OSError, RuntimeError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{path}: not a readable EDM pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an EDM pickle holds a dict with key 'ema'; this one holds {type(data).__name__}")
    return data


def _state_dict(obj: EDMObject, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a module record, named as torch's state_dict names them."""
    out: dict[str, torch.Tensor] = {}
    state = obj.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if value is not None and name not in skip:
                out[prefix + name] = value.detach().clone()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, EDMObject):
            out.update(_state_dict(child, f"{prefix}{name}."))
    return out


def _init_kwargs(obj: EDMObject, path: Path) -> dict[str, Any]:
    args, kwargs = obj.state.get("_init_args") or (), obj.state.get("_init_kwargs")
    if args or not isinstance(kwargs, dict):
        raise ValueError(f"{path}: network {obj.class_name} does not record its constructor keyword arguments")
    return dict(kwargs)


def _edm_teacher_config(path: Path, network: EDMObject) -> tuple[dict, tuple[int, ...], int]:
    """(teacher config section, data shape, classes) of an EDM preconditioner record."""
    if network.class_name not in EDM_PRECONDS:
        known = ", ".join(EDM_PRECONDS)
        raise ValueError(f"{path}: 'ema' is a {network.class_name}; lmm converts {known} networks")
    kw = _init_kwargs(network, path)
    try:
        res, channels = int(kw.pop("img_resolution")), int(kw.pop("img_channels"))
    except KeyError as e:
        raise ValueError(f"{path}: {network.class_name} lacks constructor argument {e}") from None
    ncls = int(kw.pop("label_dim", 0) or 0)
    kw.pop("use_fp16", None)
    model_type = kw.pop("model_type", "DhariwalUNet" if network.class_name == "EDMPrecond" else "SongUNet")
    if model_type not in EDM_NETS:
        raise ValueError(f"{path}: model_type {model_type!r} is not one of {', '.join(EDM_NETS)}")
    denoiser = EDM_PRECONDS[network.class_name]
    net_sigma = (0.0, float("inf"))
    if denoiser == "edm":
        sigma_data = float(kw.pop("sigma_data", 0.5))
        net_sigma = (float(kw.pop("sigma_min", 0.0)), float(kw.pop("sigma_max", float("inf"))))
    elif denoiser == "vp":
        sigma_data = 0.5
        vp = {k: kw.pop(k, v) for k, v in _VP_DEFAULTS.items()}
        if any(float(vp[k]) != float(v) for k, v in _VP_DEFAULTS.items() if k != "epsilon_t"):
            raise ValueError(f"{path}: VPPrecond with {vp}; lmm supports EDM's VP constants {_VP_DEFAULTS}")
        beta = 0.5 * vp["beta_d"] * vp["epsilon_t"] ** 2 + vp["beta_min"] * vp["epsilon_t"]
        net_sigma = (float(torch.tensor(beta, dtype=torch.float64).expm1().sqrt()),
                     float(torch.tensor(0.5 * vp["beta_d"] + vp["beta_min"], dtype=torch.float64).expm1().sqrt()))
    else:
        sigma_data = 0.5
        net_sigma = (float(kw.pop("sigma_min", 0.02)), float(kw.pop("sigma_max", 100.0)))
    net_cfg = {"kind": EDM_NETS[model_type], **kw}
    teacher = defaults()["teacher"]
    teacher.update(SAMPLER, kind="edm", denoiser=denoiser, sigma_data=sigma_data, net=net_cfg,
                   sigma_min=max(SAMPLER["sigma_min"], net_sigma[0]), sigma_max=min(SAMPLER["sigma_max"], net_sigma[1]))
    return teacher, (channels, res, res), ncls


def convert_edm(src: str | Path, out: str | Path) -> Path:
    """Convert the 'ema' network of EDM pickle `src` into the lmm teacher file OUT/model.safetensors (+ .json);
    returns its path. Its sampler is EDM's default (Heun, 18 steps = 35 NFE, sigma 80 -> 0.002, rho 7)."""
    src, out = Path(src), Path(out)
    data = read_edm_pickle(src)
    network = data.get("ema")
    if not isinstance(network, EDMObject):
        raise ValueError(f"{src}: no 'ema' network (keys: {', '.join(map(str, data))})")
    tcfg, shape, ncls = _edm_teacher_config(src, network)
    objective = teacher_objective(tcfg)
    try:
        with torch.device("meta"):
            model = build_model(objective, tcfg["net"], shape, ncls)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{src}: cannot build its network {tcfg['net']}: {e}") from None
    state = {("net." + k[len("model."):] if k.startswith("model.") else k): v for k, v in _state_dict(network).items()}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label} {keys[:4]}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        raise ValueError(f"{src}: its weights do not match the {tcfg['net']['kind']} its constructor arguments "
                         f"describe ({detail})")
    model.load_state_dict(state, assign=True)
    meta = model_meta("teacher", objective, tcfg["net"], shape, ncls, {"teacher": tcfg}, bf16=False)
    meta["source"] = {"format": "edm-pickle", "path": str(src), "sha256": file_sha256(src),
                      "class_name": network.class_name}
    out.mkdir(parents=True, exist_ok=True)
    return save_model(out / "model.safetensors", model.state_dict(), meta)
