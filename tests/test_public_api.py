"""The public surface is explicit and guarded (the idea of httpx's test_exported_members)."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import types
from pathlib import Path

import pytest

import agentstreams
from agentstreams import errors

PUBLIC_MODULES = [
    "agentstreams.errors",
    "agentstreams.logging_utils",
    "agentstreams.metrics",
    "agentstreams.server",
    "agentstreams.tracing",
    "agentstreams.integrations.openai_agents",
]

#: Everything a user needs, importable from the package itself (the list is the contract).
EXPORTED = {
    "AgentCoordinator", "AgentStreamsError", "AuthenticationError", "ConfigurationError",
    "PermissionDeniedError", "TLSError", "TLSKwargs", "BackpressureError", "ClosedError",
    "ConnectionLostError", "DeadLetter", "DeadLetterQueue", "Event", "EventType",
    "GroupNotFoundError", "IdempotencyConflictError", "Handler", "InvalidArgumentError",
    "MalformedEventError", "Observer",
    "PayloadTooLargeError", "PublishTimeoutError", "Publisher", "Reject", "RequestStats",
    "RequestTimeoutError", "Retry",
    "SerializationError", "StreamCap", "TrimResult", "Worker", "WorkerFailedError", "WorkerStats",
    "WrongTypeError",
    "__version__", "get_observer", "set_observer", "trim",
}


def test_export_list_is_the_documented_one() -> None:
    assert set(agentstreams.__all__) == EXPORTED


def test_modules_are_public_only_when_documented() -> None:
    """Every module of the package is either documented public or named with a leading
    underscore (httpx's rule): nothing looks public by accident."""
    root = Path(agentstreams.__file__).parent
    allowed = {m.removeprefix("agentstreams.") for m in PUBLIC_MODULES}
    allowed |= {"cli", "demo", "integrations", "integrations.openai_agents"}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(p.startswith("_") for p in parts):
            continue
        dotted = ".".join(parts)
        assert dotted in allowed or dotted.split(".")[0] in ("cli", "demo"), (
            f"agentstreams.{dotted} looks public but is not documented: rename it _{parts[-1]}")


def test_all_matches_what_is_importable() -> None:
    exported = set(agentstreams.__all__)
    assert len(exported) == len(agentstreams.__all__), "duplicates in __all__"
    for name in exported:
        assert hasattr(agentstreams, name), f"{name} is in __all__ but not importable"
    public = {name for name, value in vars(agentstreams).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public <= exported, f"public but not in __all__: {sorted(public - exported)}"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from agentstreams import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(agentstreams.__all__)


def test_exported_members_come_from_agentstreams() -> None:
    for name in agentstreams.__all__:
        value = getattr(agentstreams, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__.startswith("agentstreams."), name


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_module_all_lists_real_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    assert names is not None, f"{module_name} has no __all__"
    for name in names:
        assert hasattr(module, name), f"{module_name}.__all__ names missing {name}"


def test_version_matches_the_package_metadata() -> None:
    assert agentstreams.__version__ == importlib.metadata.version("agentstreams")


def test_package_is_typed() -> None:
    assert (Path(agentstreams.__file__).parent / "py.typed").exists()


def test_one_exception_root() -> None:
    control = {"Retry", "Reject"}
    for name in errors.__all__:
        cls = getattr(errors, name)
        if name in control:
            assert not issubclass(cls, errors.AgentStreamsError)
        else:
            assert issubclass(cls, errors.AgentStreamsError), name
        # The hierarchy is drawn once, in the module docstring.
        assert name in (errors.__doc__ or ""), f"{name} missing from the errors docstring"
    assert issubclass(errors.InvalidArgumentError, ValueError)
    assert issubclass(errors.SerializationError, errors.InvalidArgumentError)
    assert issubclass(errors.PayloadTooLargeError, errors.InvalidArgumentError)
    assert issubclass(errors.PublishTimeoutError, errors.ConnectionLostError)
    assert issubclass(errors.RequestTimeoutError, TimeoutError)


def test_errors_carry_context() -> None:
    error = errors.GroupNotFoundError("no group", stream="s", group="g", msg_id="1-0")
    assert (error.stream, error.group, error.msg_id) == ("s", "g", "1-0")
    retry = errors.Retry(2.5)
    assert retry.delay_s == 2.5
    assert "2.5" in str(retry)
    assert errors.Reject("bad input").reason == "bad input"
