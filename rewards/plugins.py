"""Reward plug-ins: a reward function of your own, named in a config beside the registered
ones as

    my_module:my_reward            an importable module (PYTHONPATH, an installed package,
                                   or the working directory) and a function in it
    path/to/file.py:my_reward      a Python file, relative to the working directory (made
                                   absolute when the config is resolved) and a function in it

with TRL's signature, one number (or None: not scored) per completion:

    def my_reward(prompts, completions, **kwargs) -> list[float]: ...

A plug-in is called as TRL calls a reward, with keyword arguments: prompts, completions,
completion_ids, the dataset's columns (answer: the gold final answer; task; entry: the
reasoning-gym entry or None), trainer_state, log_extra, log_metric, and its reward_options.
It receives all of them when it takes **kwargs, else the ones it names.

    check_plugin(spec, options)   import it, check it is a function whose parameters take
                                  that call and whose named parameters hold the options
                                  (UserError otherwise): made before the model loads
    plugin_reward(spec, options)  the function for the trainer (its return value checked)
    fingerprint(spec)             {file, sha256} of its source file, recorded in config.yaml
                                  (key reward_plugins) and compared when a run resumes
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
from pathlib import Path

from attnrl.errors import UserError, nearest

COLUMNS = ("prompts", "completions", "completion_ids", "answer", "task", "entry",
           "trainer_state", "log_extra", "log_metric")
"""The keyword arguments a reward is called with (options aside)."""
SIGNATURE = "def f(prompts, completions, **kwargs) -> list[float]"
_PARAMS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def is_plugin(name) -> bool:
    """A plug-in spec ('module:function' or 'file.py:function'), not a registered name."""
    return ":" in str(name)


def _parts(spec: str) -> tuple[str, str, bool]:
    """(module or file, function, whether it is a file)."""
    target, _, function = str(spec).rpartition(":")
    return target, function, target.endswith(".py") or "/" in target or os.sep in target


def spec_problem(spec: str) -> str | None:
    """Why `spec` is not written as a plug-in (None when it is); nothing is imported."""
    target, function, is_file = _parts(spec)
    if not target or not function.isidentifier():
        return f"{spec!r} is not written 'module:function' or 'path/to/file.py:function'"
    if not is_file and not all(part.isidentifier() for part in target.split(".")):
        return (f"{spec!r}: {target!r} is no module name; a file needs its .py suffix "
                "('path/to/file.py:function')")
    return None


def absolute(spec: str) -> str:
    """A file plug-in with its path made absolute (from the working directory); a module
    plug-in or a registered name as it is."""
    if not is_plugin(spec):
        return spec
    target, function, is_file = _parts(spec)
    if not is_file:
        return spec
    return f"{Path(target).expanduser().resolve()}:{function}"


def display_name(spec: str) -> str:
    """The plug-in's name in logs and metrics: 'file.py:function' or 'module:function'."""
    target, function, is_file = _parts(spec)
    return f"{Path(target).name}:{function}" if is_file else f"{target}:{function}"


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def _is_target(err: ModuleNotFoundError, target: str) -> bool:
    """Whether the module not found is the plug-in's own (not one it imports)."""
    missing = err.name or ""
    return target == missing or target.startswith(missing + ".")


def _import_module(spec: str, target: str):
    """The plug-in's module: importable as is, else from the working directory (as
    `python -m` would find it)."""
    cwd = os.getcwd()
    for extra in (None, cwd):
        if extra is not None:
            if extra in sys.path or "" in sys.path:
                break
            sys.path.append(extra)
            importlib.invalidate_caches()
        try:
            return importlib.import_module(target)
        except ModuleNotFoundError as err:
            if not _is_target(err, target):  # a module the plug-in imports
                raise UserError(f"reward {spec!r}: importing {target} failed "
                                f"({_one_line(err)})") from None
            if extra is not None:
                sys.path.remove(extra)
        except Exception as err:  # noqa: BLE001  (the user's module failed)
            raise UserError(f"reward {spec!r}: importing {target} failed ({_one_line(err)})") \
                from None
    raise UserError(f"reward {spec!r}: no module named {target!r} (looked on PYTHONPATH, in "
                    f"the installed packages and in {cwd}); for a file write "
                    f"path/to/file.py:{_parts(spec)[1]}")


def _import_file(spec: str, target: str):
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"reward {spec!r}: no file {path} (a plug-in file is relative to the "
                        "working directory)")
    if path.suffix != ".py":
        raise UserError(f"reward {spec!r}: {path} is not a .py file")
    name = f"attnrl_reward_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{file_sha256(path)[:12]}"
    if name in sys.modules:  # the same file with the same content: imported once
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))  # its sibling modules, as for a script
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001  (the user's file failed)
        del sys.modules[name]
        raise UserError(f"reward {spec!r}: importing {path} failed ({_one_line(err)})") \
            from None
    return module


def load_plugin(spec: str):
    """The plug-in's module and callable (UserError when it cannot be imported or is not
    a function)."""
    problem = spec_problem(spec)
    if problem:
        raise UserError(f"reward {problem}")
    target, function, is_file = _parts(spec)
    module = _import_file(spec, target) if is_file else _import_module(spec, target)
    if not hasattr(module, function):
        names = sorted(n for n, v in vars(module).items() if callable(v) and
                       not n.startswith("_") and getattr(v, "__module__", None) ==
                       module.__name__)
        raise UserError(f"reward {spec!r}: {target} has no {function!r}"
                        f"{nearest(function, names)}; its functions: {', '.join(names) or 'none'}")
    fn = getattr(module, function)
    if inspect.isclass(fn) or not callable(fn):
        what = "a class" if inspect.isclass(fn) else f"{type(fn).__name__} {fn!r}"[:80]
        raise UserError(f"reward {spec!r}: {function} is {what}, not a function; a reward is "
                        f"{SIGNATURE}")
    return module, fn


def _signature(spec: str, fn, options: dict) -> set[str] | None:
    """The keyword arguments the plug-in takes (None: any, it has **kwargs); UserError when
    it cannot take the call or an option."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        raise UserError(f"reward {spec!r}: Python cannot read its signature; a reward is "
                        f"{SIGNATURE}") from None
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    named = [p.name for p in parameters if p.kind in _PARAMS]
    positional = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_ONLY
                  and p.default is inspect.Parameter.empty]
    if positional:
        raise UserError(f"reward {spec!r}: {', '.join(positional)} positional-only; TRL calls "
                        f"a reward with keyword arguments: {SIGNATURE}")
    if "completions" not in named and not any_keyword:
        raise UserError(f"reward {spec!r} takes neither completions nor **kwargs; a reward "
                        f"is {SIGNATURE}")
    allowed = [n for n in named if n not in COLUMNS]
    for option in options:
        if option not in allowed:
            raise UserError(f"reward {spec!r} has no option {option!r}{nearest(option, allowed)}"
                            f"; options (its named parameters): {', '.join(allowed) or 'none'}")
    needed = [p.name for p in parameters if p.kind in _PARAMS and p.default is
              inspect.Parameter.empty and p.name not in COLUMNS and p.name not in options]
    if needed:
        raise UserError(f"reward {spec!r} needs {needed[0]!r}, which is neither a column a "
                        f"reward is given ({', '.join(COLUMNS)}) nor set in reward_options")
    return None if any_keyword else set(named)


def check_plugin(spec: str, options: dict | None = None):
    """The plug-in's function once it imports and takes a reward's call and its options
    (UserError otherwise; see the module docstring)."""
    fn = load_plugin(spec)[1]
    _signature(spec, fn, options or {})
    return fn


def fingerprint(spec: str) -> dict:
    """{'file': its source file, 'sha256': of the file's bytes} (None for a module without
    a file)."""
    target, _, is_file = _parts(spec)
    if is_file:
        path = Path(target).expanduser().resolve()
    else:
        module = load_plugin(spec)[0]
        path = Path(module.__file__) if getattr(module, "__file__", None) else None
    if path is None or not path.is_file():
        return {"file": None, "sha256": None}
    return {"file": str(path), "sha256": file_sha256(path)}


def _checked(name: str, values, completions) -> list:
    try:
        values = list(values)
    except TypeError:
        raise UserError(f"reward {name} returned {type(values).__name__}, not a list of "
                        "numbers (one per completion)") from None
    if len(values) != len(completions):
        raise UserError(f"reward {name} returned {len(values)} values for {len(completions)} "
                        "completions; return one per completion")
    out = []
    for value in values:
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError(value)
            out.append(None if value is None else float(value))
        except (TypeError, ValueError):
            raise UserError(f"reward {name} returned {value!r} ({type(value).__name__}); "
                            "each value must be a number, or None for not scored") from None
    return out


def plugin_reward(spec: str, options: dict | None = None):
    """The plug-in as the trainer calls a reward, fn(prompts, completions, **columns):
    checked (check_plugin), given the keywords it takes and its options, its return value
    checked; a reasoning-gym entry travelling as `entry_json` is decoded to `entry`."""
    options = dict(options or {})
    fn = check_plugin(spec, options)
    takes = _signature(spec, fn, options)
    name = display_name(spec)

    def arguments(prompts, completions, columns) -> dict:
        entry_json = columns.pop("entry_json", None)
        if entry_json is not None:
            columns["entry"] = [json.loads(e) if e else None for e in entry_json]
        kwargs = {"prompts": prompts, "completions": completions, **columns, **options}
        return kwargs if takes is None else {k: v for k, v in kwargs.items() if k in takes}

    if inspect.iscoroutinefunction(fn):
        async def reward(prompts, completions, **columns):
            return _checked(name, await fn(**arguments(prompts, completions, columns)),
                            completions)
    else:
        def reward(prompts, completions, **columns):
            return _checked(name, fn(**arguments(prompts, completions, columns)), completions)

    reward.__name__ = name
    reward.__doc__ = fn.__doc__
    return reward
