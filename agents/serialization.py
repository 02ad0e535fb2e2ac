"""Agent files that load without unpickling anything.

Stable-Baselines3's own ``save``/``load`` stores every attribute that is not plain JSON (spaces, classes,
numpy arrays, random generators, schedules) as a cloudpickle blob and unpickles it on ``load``: loading
a file runs whatever code the file names. Our agents (:class:`~keepgym.agents.RLPruner`, the baselines,
:class:`~keepgym.agents.DDQN`) use :class:`SafeSaveMixin` instead, a drop-in ``save``/``load`` pair with
the same signatures that writes a zip (the ``.zip`` suffix is kept) holding

* ``keepgym-agent.json``: the format tag, the agent's class and its attributes as tagged JSON (spaces as
  a JSON description, classes as ``module:name`` restricted to torch / SB3 / gymnasium / keepgym classes,
  numpy generators by their bit-generator state, arrays as references into ``tensors.pt``);
* ``tensors.pt``: the network and optimizer ``state_dict``s and every array, read back with
  ``torch.load(weights_only=True)``.

Replay buffers (``save_replay_buffer``/``load_replay_buffer``, same SB3 method names) are a NumPy
``.npz`` of the buffer's arrays, read with ``np.load(allow_pickle=False)``.

:func:`load_sb3_agent` loads a zip written by a plain SB3 algorithm (PPO, A2C, DQN, SAC) with
``custom_objects`` for *every* pickled field of its ``data`` (read from the zip's JSON without
unpickling): spaces from the env, schedules rebuilt from their readable form, classes from an allowlist.
A field it cannot rebuild safely is refused with one line (:class:`AgentLoadError`), never unpickled.
"""

from __future__ import annotations

import collections
import importlib
import io
import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces

from keepgym.models.serialization import atomic_write

__all__ = [
    "AGENT_FORMAT",
    "AgentLoadError",
    "SafeSaveMixin",
    "load_sb3_agent",
    "read_agent_header",
    "save_replay_buffer",
    "load_replay_buffer",
]

logger = logging.getLogger(__name__)

AGENT_FORMAT = "keepgym-agent"
_VERSION = 1
_HEADER = "keepgym-agent.json"
_TENSORS = "tensors.pt"
_BUFFER_FORMAT = "keepgym-replay-buffer"
#: Module prefixes a class named in an agent file may come from (it must also subclass one of _CLASS_BASES).
_CLASS_MODULES = ("torch.", "stable_baselines3.", "sb3_contrib.", "keepgym.", "gymnasium.")
#: Attributes never stored: rebuilt by ``_setup_model`` from the stored hyper-parameters.
_REBUILT = ("lr_schedule", "batch_norm_stats", "batch_norm_stats_target", "exploration_schedule_fn")
_MAX_FILE_BYTES = 4 * 2**30


class AgentLoadError(ValueError):
    """An agent or replay-buffer file is unreadable, foreign, or would need unpickling to load."""


def _class_bases() -> tuple[type, ...]:
    from stable_baselines3.common.buffers import BaseBuffer

    return (th.nn.Module, th.optim.Optimizer, BaseBuffer)


def _class_ref(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(ref: str, where: str) -> type:
    """Import ``module:qualname`` from the allowlisted packages; it must be a module/optimizer/buffer class."""
    module_name, _, qualname = ref.partition(":")
    if not module_name.startswith(_CLASS_MODULES) or not qualname or not re.fullmatch(r"[\w.]+", ref.replace(":", ".")):
        raise AgentLoadError(f"{where}: class {ref!r} is not from torch, stable_baselines3 or keepgym; refused")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise AgentLoadError(f"{where}: class {ref!r} does not exist in this installation") from None
    if not isinstance(obj, type) or not issubclass(obj, _class_bases()):
        raise AgentLoadError(f"{where}: {ref!r} is not a network, optimizer or buffer class; refused")
    return obj


# --------------------------------------------------------------------------------------------------
# spaces as JSON
# --------------------------------------------------------------------------------------------------


def space_to_json(space: spaces.Space) -> dict[str, Any]:
    """A JSON description of a gymnasium space (Box, Discrete, MultiBinary, MultiDiscrete, Dict, Tuple)."""
    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "low": space.low.tolist(),
            "high": space.high.tolist(),
            "shape": list(space.shape),
            "dtype": np.dtype(space.dtype).name,
        }
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.MultiBinary):
        n = space.n
        return {"type": "MultiBinary", "n": int(n) if isinstance(n, int | np.integer) else [int(v) for v in n]}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist(), "dtype": np.dtype(space.dtype).name}
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {k: space_to_json(v) for k, v in space.spaces.items()}}
    if isinstance(space, spaces.Tuple):
        return {"type": "Tuple", "spaces": [space_to_json(v) for v in space.spaces]}
    raise TypeError(f"cannot save a {type(space).__name__} space")


def space_from_json(desc: Any, where: str = "agent file") -> spaces.Space:
    """Rebuild a space written by :func:`space_to_json`."""
    try:
        kind = desc["type"]
        if kind == "Box":
            dtype = np.dtype(desc["dtype"])
            low = np.asarray(desc["low"], dtype=dtype)
            high = np.asarray(desc["high"], dtype=dtype)
            return spaces.Box(low=low, high=high, shape=tuple(int(s) for s in desc["shape"]), dtype=dtype)
        if kind == "Discrete":
            return spaces.Discrete(int(desc["n"]), start=int(desc.get("start", 0)))
        if kind == "MultiBinary":
            return spaces.MultiBinary(desc["n"])
        if kind == "MultiDiscrete":
            return spaces.MultiDiscrete(np.asarray(desc["nvec"]), dtype=np.dtype(desc["dtype"]))
        if kind == "Dict":
            return spaces.Dict({str(k): space_from_json(v, where) for k, v in desc["spaces"].items()})
        if kind == "Tuple":
            return spaces.Tuple([space_from_json(v, where) for v in desc["spaces"]])
    except (KeyError, TypeError, ValueError) as err:
        raise AgentLoadError(f"{where}: bad space description ({err})") from None
    raise AgentLoadError(f"{where}: unknown space type {kind!r}")


# --------------------------------------------------------------------------------------------------
# attribute encoding: tagged JSON plus a list of tensors
# --------------------------------------------------------------------------------------------------


class _Encoder:
    def __init__(self) -> None:
        self.tensors: list[th.Tensor] = []

    def _ref(self, tensor: th.Tensor) -> int:
        self.tensors.append(tensor.detach().cpu().clone())
        return len(self.tensors) - 1

    def __call__(self, obj: Any, name: str) -> Any:  # noqa: C901 (one branch per stored type)
        from stable_baselines3.common.type_aliases import TrainFreq

        if obj is None or isinstance(obj, bool | int | str):
            return obj
        if isinstance(obj, float):
            return obj if np.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, TrainFreq):
            return {"__trainfreq__": [int(obj.frequency), obj.unit.value]}
        if isinstance(obj, list):
            return [self(v, name) for v in obj]
        if isinstance(obj, tuple):
            return {"__tuple__": [self(v, name) for v in obj]}
        if isinstance(obj, collections.deque):
            return {"__deque__": [self(v, name) for v in obj], "maxlen": obj.maxlen}
        if isinstance(obj, dict):
            if not all(isinstance(k, str) for k in obj):
                raise TypeError(f"{name}: dict keys must be strings")
            return {"__dict__": {k: self(v, f"{name}.{k}") for k, v in obj.items()}}
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                raise TypeError(f"{name}: object arrays cannot be saved")
            return {"__ndarray__": self._ref(th.from_numpy(np.ascontiguousarray(obj).copy())), "dtype": obj.dtype.str}
        if isinstance(obj, np.generic):
            return {"__npscalar__": obj.item(), "dtype": obj.dtype.str}
        if isinstance(obj, th.Tensor):
            return {"__tensor__": self._ref(obj)}
        if isinstance(obj, th.device):
            return {"__device__": str(obj)}
        if isinstance(obj, np.random.Generator):
            return {"__generator__": _plain_bitgen_state(obj.bit_generator.state)}
        if isinstance(obj, spaces.Space):
            return {"__space__": space_to_json(obj)}
        if isinstance(obj, type):
            return {"__class__": _class_ref(obj)}
        schedule = _schedule_to_json(obj)
        if schedule is not None:
            return {"__schedule__": schedule}
        raise TypeError(f"{name}: a {type(obj).__name__} cannot be saved without pickling")


def _plain_bitgen_state(state: dict) -> dict:
    return {k: (_plain_bitgen_state(v) if isinstance(v, dict) else (int(v) if isinstance(v, np.integer) else v))
            for k, v in state.items()}


def _schedule_to_json(obj: Any) -> dict[str, Any] | None:
    """SB3's schedule objects (Constant/Linear/FloatSchedule) by class name and plain attributes."""
    from stable_baselines3.common import utils

    for cls_name in ("ConstantSchedule", "LinearSchedule", "FloatSchedule"):
        cls = getattr(utils, cls_name, None)
        if cls is not None and type(obj) is cls:
            attrs = {}
            for key, value in vars(obj).items():
                nested = _schedule_to_json(value)
                attrs[key] = {"__schedule__": nested} if nested is not None else value
            return {"class": cls_name, "attrs": attrs}
    return None


def _schedule_from_json(desc: dict[str, Any], where: str) -> Any:
    from stable_baselines3.common import utils

    name = desc.get("class")
    if name not in ("ConstantSchedule", "LinearSchedule", "FloatSchedule") or not hasattr(utils, name):
        raise AgentLoadError(f"{where}: unknown schedule {name!r}")
    attrs = {
        k: _schedule_from_json(v["__schedule__"], where) if isinstance(v, dict) and "__schedule__" in v else v
        for k, v in desc.get("attrs", {}).items()
    }
    if any(not isinstance(v, int | float) and not callable(v) for v in attrs.values()):
        raise AgentLoadError(f"{where}: bad schedule attributes")
    return getattr(utils, name)(**attrs)


def _decode(obj: Any, tensors: list[th.Tensor], where: str) -> Any:  # noqa: C901
    from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit

    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict) or len(obj) not in (1, 2):
        raise AgentLoadError(f"{where}: malformed attribute encoding")

    def tensor(i: Any) -> th.Tensor:
        if not isinstance(i, int) or not 0 <= i < len(tensors):
            raise AgentLoadError(f"{where}: dangling tensor reference {i!r}")
        return tensors[i]

    if "__dict__" in obj:
        return {str(k): _decode(v, tensors, where) for k, v in obj["__dict__"].items()}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if "__deque__" in obj:
        return collections.deque((_decode(v, tensors, where) for v in obj["__deque__"]), maxlen=obj.get("maxlen"))
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__trainfreq__" in obj:
        freq, unit = obj["__trainfreq__"]
        return TrainFreq(int(freq), TrainFrequencyUnit(unit))
    if "__ndarray__" in obj:
        dtype = np.dtype(obj["dtype"])
        if dtype.hasobject:
            raise AgentLoadError(f"{where}: object arrays are refused")
        return tensor(obj["__ndarray__"]).numpy().astype(dtype, copy=True)
    if "__npscalar__" in obj:
        dtype = np.dtype(obj["dtype"])
        if dtype.hasobject:
            raise AgentLoadError(f"{where}: object scalars are refused")
        return dtype.type(obj["__npscalar__"])
    if "__tensor__" in obj:
        return tensor(obj["__tensor__"])
    if "__device__" in obj:
        return th.device(obj["__device__"])
    if "__generator__" in obj:
        state = obj["__generator__"]
        name = state.get("bit_generator") if isinstance(state, dict) else None
        if name not in ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"):
            raise AgentLoadError(f"{where}: unknown bit generator {name!r}")
        bitgen = getattr(np.random, name)()
        bitgen.state = state
        return np.random.Generator(bitgen)
    if "__space__" in obj:
        return space_from_json(obj["__space__"], where)
    if "__class__" in obj:
        return _resolve_class(str(obj["__class__"]), where)
    if "__schedule__" in obj:
        return _schedule_from_json(obj["__schedule__"], where)
    raise AgentLoadError(f"{where}: unknown attribute encoding {sorted(obj)!r}")


# --------------------------------------------------------------------------------------------------
# atomic file writing
# --------------------------------------------------------------------------------------------------


def _write_atomically(path: Path, payload: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(payload))


def _zip_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix else path.with_suffix(".zip")


def read_agent_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a keepgym agent file (class, format); raises :class:`AgentLoadError` otherwise."""
    return _read_agent(path, tensors=False)[0]


def _read_agent(path: str | os.PathLike, tensors: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    path = Path(path)
    if not path.is_file() and path.with_suffix(".zip").is_file() and not path.suffix:
        path = path.with_suffix(".zip")
    if not path.is_file():
        raise AgentLoadError(f"{path}: no such agent file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if _HEADER not in names:
                kind = "a Stable-Baselines3 zip (pickled fields)" if "data" in names else "no keepgym agent"
                raise AgentLoadError(
                    f"{path}: not a keepgym agent file (it holds {kind}); refused, nothing in it was unpickled"
                )
            if any(info.file_size > _MAX_FILE_BYTES for info in archive.infolist()):
                raise AgentLoadError(f"{path}: an entry is larger than 4 GiB; refused")
            header = json.loads(archive.read(_HEADER).decode())
            blob = archive.read(_TENSORS) if tensors else None
    except AgentLoadError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, UnicodeDecodeError) as err:
        raise AgentLoadError(f"{path}: not a readable agent file (truncated or corrupt?): {err}") from None
    if not isinstance(header, dict) or header.get("format") != AGENT_FORMAT:
        raise AgentLoadError(f"{path}: not a keepgym agent file")
    if header.get("version") != _VERSION:
        raise AgentLoadError(f"{path}: unsupported keepgym agent file version {header.get('version')!r}")
    payload: dict[str, Any] = {}
    if blob is not None:
        try:
            payload = th.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a bad or hostile file
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise AgentLoadError(f"{path}: unreadable tensors ({reason[:200]})") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("tensors"), list):
            raise AgentLoadError(f"{path}: malformed tensors entry")
    return header, payload


# --------------------------------------------------------------------------------------------------
# the mixin
# --------------------------------------------------------------------------------------------------


class SafeSaveMixin:
    """``save``/``load`` (and the replay-buffer pair) for an SB3 algorithm, in a pickle-free format.

    Put it before the SB3 base class: ``class DDQN(SafeSaveMixin, OffPolicyAlgorithm)``. The signatures
    are SB3's; ``load`` refuses (one line, :class:`AgentLoadError`) a file of another class or format.
    """

    def save(
        self,
        path: str | os.PathLike | io.BufferedIOBase,
        exclude: list[str] | None = None,
        include: list[str] | None = None,
    ) -> None:
        """Write the agent to ``path`` (a ``.zip`` is added when the name has no suffix), atomically."""
        data = self.__dict__.copy()
        excluded = set(exclude or []) | set(self._excluded_save_params()) | set(_REBUILT)  # type: ignore[attr-defined]
        excluded -= set(include or [])
        state_dicts, torch_vars = self._get_torch_save_params()  # type: ignore[attr-defined]
        for name in state_dicts + torch_vars:
            excluded.add(name.split(".")[0])
        encode = _Encoder()
        attrs = {k: encode(v, k) for k, v in data.items() if k not in excluded}
        params = {name: _get_attr(self, name).state_dict() for name in state_dicts}
        variables = {name: _get_attr(self, name) for name in torch_vars}
        header = {"format": AGENT_FORMAT, "version": _VERSION, "class": _class_ref(type(self)), "attrs": attrs}
        tensor_buf = io.BytesIO()
        # state_dicts hold only tensors and plain values: torch.load(weights_only=True) reads them back
        th.save({"tensors": encode.tensors, "state_dicts": params, "variables": variables}, tensor_buf)
        zip_buf = io.BytesIO()
        with zipfile.ZipFile(zip_buf, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(_HEADER, json.dumps(header))
            archive.writestr(_TENSORS, tensor_buf.getvalue())
        if isinstance(path, io.BufferedIOBase):
            path.write(zip_buf.getvalue())
            return
        _write_atomically(_zip_path(path), zip_buf.getvalue())

    @classmethod
    def load(  # type: ignore[override]
        cls,
        path: str | os.PathLike,
        env: Any = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Load an agent saved by :meth:`save` (SB3's signature; nothing is unpickled).

        Raises:
            AgentLoadError: unreadable file, another format (e.g. a pickled SB3 zip), another class, or
                spaces that do not match ``env``. One line naming the file.
        """
        from stable_baselines3.common.utils import check_for_correct_spaces

        del print_system_info
        header, payload = _read_agent(path)
        where = str(path)
        if header.get("class") != _class_ref(cls):
            raise AgentLoadError(f"{where}: holds a {header.get('class')!r} agent, not a {cls.__name__}")
        tensors = payload["tensors"]
        try:
            data = {k: _decode(v, tensors, f"{where}: {k}") for k, v in header["attrs"].items()}
            params, variables = dict(payload["state_dicts"]), dict(payload["variables"])
        except (KeyError, TypeError, AttributeError) as err:
            raise AgentLoadError(f"{where}: malformed agent file ({err})") from None
        data.update(custom_objects or {})
        for key in ("observation_space", "action_space", "policy_class"):
            if key not in data:
                raise AgentLoadError(f"{where}: the agent file has no {key}")
        from stable_baselines3.common.policies import BasePolicy

        if not (isinstance(data["policy_class"], type) and issubclass(data["policy_class"], BasePolicy)):
            raise AgentLoadError(f"{where}: policy_class {data['policy_class']!r} is not an SB3 policy; refused")
        if env is not None:
            env = cls._wrap_env(env, data.get("verbose", 0))  # type: ignore[attr-defined]
            try:
                check_for_correct_spaces(env, data["observation_space"], data["action_space"])
            except ValueError as err:
                raise AgentLoadError(f"{where}: the env does not fit the agent: {err}") from None
            if force_reset:
                data["_last_obs"] = None
            data["n_envs"] = env.num_envs
        model = cls(policy=data["policy_class"], env=env, device=device, _init_setup_model=False)  # type: ignore[call-arg]
        model.__dict__.update(data)
        model.__dict__.update(kwargs)
        model._setup_model()
        try:
            model.set_parameters(params, exact_match=True, device=device)
        except (RuntimeError, ValueError, KeyError) as err:
            reason = " ".join(str(err).split())[:300]
            raise AgentLoadError(f"{where}: the weights do not fit the agent: {reason}") from None
        for name, value in variables.items():
            if value is not None:
                _get_attr(model, name).data = value.data.to(model.device)
        return model

    # -- replay buffer ------------------------------------------------------------------------------

    def save_replay_buffer(self, path: str | os.PathLike | io.BufferedIOBase) -> None:
        """Write the replay buffer's arrays as a NumPy ``.npz`` (see :func:`save_replay_buffer`)."""
        save_replay_buffer(self, path)

    def load_replay_buffer(self, path: str | os.PathLike, truncate_last_traj: bool = True) -> None:
        """Fill the replay buffer from a :meth:`save_replay_buffer` file (see :func:`load_replay_buffer`)."""
        del truncate_last_traj
        load_replay_buffer(self, path)


def save_replay_buffer(agent: Any, path: str | os.PathLike | io.BufferedIOBase) -> None:
    """Write ``agent.replay_buffer``'s arrays as a NumPy ``.npz`` (``allow_pickle=False`` loads it), atomically.

    Works for any SB3 off-policy algorithm (DDQN, and SB3's DQN/SAC, whose own method pickles). The file
    is written to ``path`` as given (``.npz`` is added only when the name has no suffix).
    """
    buffer = getattr(agent, "replay_buffer", None)
    if buffer is None:
        raise ValueError("this agent has no replay buffer")
    arrays = {"format": np.array(_BUFFER_FORMAT), "class": np.array(_class_ref(type(buffer)))}
    arrays["pos"] = np.array(int(buffer.pos), dtype=np.int64)
    arrays["full"] = np.array(bool(buffer.full))
    for name in _buffer_fields(buffer):
        arrays[name] = getattr(buffer, name)
    out = io.BytesIO()
    np.savez(out, **arrays)
    if isinstance(path, io.BufferedIOBase):
        path.write(out.getvalue())
        return
    path = Path(path)
    _write_atomically(path if path.suffix else path.with_suffix(".npz"), out.getvalue())


def load_replay_buffer(agent: Any, path: str | os.PathLike) -> None:
    """Fill ``agent.replay_buffer`` from a :func:`save_replay_buffer` file (``np.load(allow_pickle=False)``).

    Raises:
        AgentLoadError: not such a file, or arrays whose shapes or dtypes do not fit this agent's buffer.
    """
    buffer = getattr(agent, "replay_buffer", None)
    if buffer is None:
        raise ValueError("this agent has no replay buffer")
    path = Path(path)
    if not path.is_file() and not path.suffix and path.with_suffix(".npz").is_file():
        path = path.with_suffix(".npz")
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        reason = " ".join(str(err).split())[:200]
        raise AgentLoadError(f"{path}: not a keepgym replay-buffer file ({reason})") from None
    if str(files.get("format", "")) != _BUFFER_FORMAT:
        raise AgentLoadError(f"{path}: not a keepgym replay-buffer file")
    if str(files.get("class", "")) != _class_ref(type(buffer)):
        raise AgentLoadError(f"{path}: holds a {files.get('class')} buffer, not a {_class_ref(type(buffer))}")
    for name in _buffer_fields(buffer):
        current, saved = getattr(buffer, name), files.get(name)
        if saved is None or saved.shape != current.shape or saved.dtype != current.dtype:
            raise AgentLoadError(
                f"{path}: buffer array {name!r} does not fit this agent's buffer "
                f"({None if saved is None else (saved.shape, str(saved.dtype))} "
                f"vs {(current.shape, str(current.dtype))})"
            )
    pos = int(files["pos"])
    if not 0 <= pos < buffer.buffer_size:
        raise AgentLoadError(f"{path}: buffer position {pos} out of range")
    for name in _buffer_fields(buffer):
        getattr(buffer, name)[...] = files[name]
    buffer.pos, buffer.full = pos, bool(files["full"])
    buffer.device = agent.device  # type: ignore[attr-defined]


def _buffer_fields(buffer: Any) -> list[str]:
    """The numpy arrays of an SB3 ``ReplayBuffer`` (``next_observations`` is None when memory is optimized)."""
    from stable_baselines3.common.buffers import ReplayBuffer

    if not isinstance(buffer, ReplayBuffer) or isinstance(getattr(buffer, "observations", None), dict):
        raise TypeError(f"cannot save a {type(buffer).__name__} replay buffer safely")
    names = ["observations", "next_observations", "actions", "rewards", "dones", "timeouts"]
    return [n for n in names if isinstance(getattr(buffer, n, None), np.ndarray)]


def _get_attr(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------------
# plain SB3 zips (PPO, A2C, DQN, SAC, ...) without unpickling
# --------------------------------------------------------------------------------------------------

_CONSTANT = re.compile(r"^ConstantSchedule\(val=([-+0-9.eE]+|inf|nan)\)$")
_CLASS_STR = re.compile(r"^<class '([\w.]+)'>$")


def _readable_policy_kwargs(item: dict[str, Any], where: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for key, value in item.items():
        if key.startswith(":"):
            continue
        match = _CLASS_STR.match(value) if isinstance(value, str) else None
        if match:
            module, _, name = match.group(1).rpartition(".")
            kwargs[key] = _resolve_class(f"{module}:{name}", f"{where}: policy_kwargs.{key}")
        elif isinstance(value, str) and value.startswith("<"):
            raise AgentLoadError(f"{where}: policy_kwargs.{key} ({value[:60]}) cannot be rebuilt without unpickling")
        else:
            kwargs[key] = value
    return kwargs


def _sb3_custom_objects(cls: type, data: dict[str, Any], env: Any, where: str) -> dict[str, Any]:
    """A replacement for every pickled field of an SB3 ``data`` JSON, or :class:`AgentLoadError`."""
    import inspect

    from stable_baselines3.common.utils import FloatSchedule

    custom: dict[str, Any] = {}
    for key, item in data.items():
        if not (isinstance(item, dict) and ":serialized:" in item):
            continue
        if key in ("observation_space", "action_space"):
            if env is None:
                raise AgentLoadError(f"{where}: an SB3 zip needs the env to rebuild its {key} without unpickling")
            custom[key] = getattr(env, key)
        elif key in ("lr_schedule", "exploration_schedule"):
            custom[key] = FloatSchedule(0.0)  # rebuilt by _setup_model from the plain hyper-parameters
        elif key in ("_last_obs", "_last_original_obs", "_last_episode_starts", "ep_info_buffer", "ep_success_buffer"):
            custom[key] = None  # rollout state: learn() starts it afresh
        elif key in ("batch_norm_stats", "batch_norm_stats_target"):
            custom[key] = []
        elif key in ("clip_range", "clip_range_vf"):
            match = _CONSTANT.match(str(item.get("value_schedule", "")))
            if not match:
                raise AgentLoadError(f"{where}: {key} is not a constant schedule; refused (it would be unpickled)")
            custom[key] = float(match.group(1))
        elif key == "policy_class":
            module = item.get("__module__")
            aliases = getattr(cls, "policy_aliases", {})
            found = [p for alias, p in aliases.items() if p.__module__ == module and alias == "MlpPolicy"]
            found = found or [p for p in aliases.values() if p.__module__ == module]
            if not found:
                raise AgentLoadError(f"{where}: policy class from {module!r} is not one of {cls.__name__}'s; refused")
            custom[key] = found[0]
        elif key in ("replay_buffer_class", "rollout_buffer_class"):
            if item.get("__module__") != "stable_baselines3.common.buffers":
                raise AgentLoadError(f"{where}: custom {key} refused (it would be unpickled)")
            custom[key] = None  # SB3 picks its default buffer
        elif key == "policy_kwargs":
            custom[key] = _readable_policy_kwargs(item, where)
        elif key == "train_freq":
            default = inspect.signature(cls.__init__).parameters.get("train_freq")
            if default is None or default.default is inspect.Parameter.empty:
                raise AgentLoadError(f"{where}: train_freq cannot be rebuilt; refused")
            logger.warning("%s: train_freq is pickled in SB3 zips; using %s's default %r", where, cls.__name__,
                           default.default)
            custom[key] = default.default
        else:
            raise AgentLoadError(f"{where}: field {key!r} of this SB3 zip would have to be unpickled; refused")
    return custom


def load_sb3_agent(cls: type, path: str | os.PathLike, env: Any = None, device: str = "auto", **kwargs: Any) -> Any:
    """``cls.load(path, env)`` for a plain SB3 algorithm without unpickling any field of the zip.

    Our own agents (anything with :class:`SafeSaveMixin`) are loaded with their own ``load``. For SB3's
    algorithms the zip's ``data`` JSON is read first; every cloudpickled field gets a replacement in
    ``custom_objects`` (see the module docstring) or the file is refused with :class:`AgentLoadError`.
    The weights themselves are ``torch.load(weights_only=True)`` in SB3.
    """
    if issubclass(cls, SafeSaveMixin):
        return cls.load(path, env=env, device=device, **kwargs)
    path = Path(path)
    if not path.is_file() and not path.suffix and path.with_suffix(".zip").is_file():
        path = path.with_suffix(".zip")
    try:
        raw = path.read_bytes()  # read once: SB3 then loads these very bytes, not a file that may change
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            if _HEADER in archive.namelist():
                header = json.loads(archive.read(_HEADER).decode())
                raise AgentLoadError(f"{path}: holds a keepgym {header.get('class')!r} agent, not a {cls.__name__}")
            data = json.loads(archive.read("data").decode())
    except AgentLoadError:
        raise
    except (zipfile.BadZipFile, OSError, KeyError, ValueError, UnicodeDecodeError) as err:
        raise AgentLoadError(f"{path}: not a readable SB3 agent zip: {err}") from None
    if not isinstance(data, dict):
        raise AgentLoadError(f"{path}: malformed SB3 agent zip")
    custom = _sb3_custom_objects(cls, data, env, str(path))
    custom.update(kwargs.pop("custom_objects", None) or {})
    try:
        return cls.load(io.BytesIO(raw), env=env, device=device, custom_objects=custom, **kwargs)
    except (ValueError, RuntimeError, KeyError) as err:
        raise AgentLoadError(f"{path}: cannot load: {' '.join(str(err).split())[:300]}") from None
