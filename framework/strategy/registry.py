"""Plugin loading: built-ins, ``quotelab`` entry points and explicitly named local files, one path."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pluggy

from quotelab import PROJECT_NAME, __version__, hookspecs
from quotelab.component import Component
from quotelab.errors import ConfigError, PluginError

BUILTIN_PLUGINS: tuple[str, ...] = (
    "quotelab.plugins.mid",
    "quotelab.plugins.book_imbalance",
    "quotelab.plugins.inventory_skew",
    "quotelab.plugins.fixed_spread",
    "quotelab.plugins.weighted_mid",
    "quotelab.plugins.multi_level_imbalance_mid",
    "quotelab.plugins.multi_venue_mid",
    "quotelab.plugins.spot_plus_basis",
    "quotelab.plugins.trade_flow_imbalance",
    "quotelab.plugins.composite_imbalance",
    "quotelab.plugins.order_flow_imbalance",
    "quotelab.plugins.returns",
    "quotelab.plugins.basis_change",
    "quotelab.plugins.linear_forecast",
    "quotelab.plugins.position_limits",
    "quotelab.plugins.volatility_spread",
    "quotelab.plugins.avellaneda_stoikov",
    "quotelab.plugins.glft",
    "quotelab.plugins.precomputed_forecast",
    "quotelab.plugins.microprice",
    "quotelab.plugins.funding_rate",
)

ENTRY_POINT_GROUP = "quotelab"
# Set to a comma-separated list of plugin names to keep them from loading (e.g. a broken third-party one).
BLOCK_ENV = "QUOTELAB_BLOCK_PLUGINS"


class Registry:
    """The components every loaded plugin registered, by role and name."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.components: dict[str, dict[str, Component]] = {}
        self.origin: dict[str, str] = {}

    def add(self, component: Component, source: str) -> None:
        if not isinstance(component, Component):
            raise PluginError(f'Error in plugin "{source}": register() takes a Component, got {component!r}')
        by_name = self.components.setdefault(component.role, {})
        if component.name in by_name:
            raise PluginError(
                f"two {component.role} components are named {component.name!r}: one from "
                f'"{by_name[component.name].source}", one from "{source}"; rename one of them'
            )
        by_name[component.name] = replace(component, source=source)

    def get(self, role: str, name: str, where: str = "") -> Component:
        by_name = self.components.get(role, {})
        if name not in by_name:
            known = sorted(by_name)
            near = difflib.get_close_matches(name, known, n=len(known), cutoff=0.0)
            raise ConfigError(
                f"{where}unknown {role} kind {name!r}; registered: {', '.join(near) or 'none'}"
            )
        return by_name[name]

    def all(self) -> list[Component]:
        return [c for role in sorted(self.components) for c in self.components[role].values()]

    def fingerprint(self) -> str:
        """Changes whenever any registered kernel's source changes."""
        h = hashlib.sha256()
        for c in self.all():
            h.update(f"{c.role}:{c.name}:{c.source}".encode())
        return h.hexdigest()[:16]


def _plugin_name(obj: object) -> str:
    return getattr(obj, "__name__", repr(obj))


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    if pm.is_blocked(name) or pm.has_plugin(name):
        return
    pm.register(plugin, name=name)


def _import_local(path: Path) -> ModuleType:
    if not path.exists():
        raise PluginError(f'Error importing plugin "{path}": file not found')
    mod_name = "quotelab_local_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f'Error importing plugin "{path}": not a Python file')
    module = importlib.util.module_from_spec(spec)
    # The composer imports kernels by module name, so the module must be findable.
    sys.modules[mod_name] = module
    sys.path_importer_cache.pop(str(path.parent), None)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise PluginError(f'Error importing plugin "{path}": {type(exc).__name__}: {exc}') from exc
    return module


_SHARED: dict[tuple[bool, str], Registry] = {}


def load_registry(local_files: Iterable[str | Path] = (), entry_points: bool = True) -> Registry:
    """Load built-ins, entry points and ``local_files``; collect their components.

    Without local files the result is kept for the process (per ``entry_points`` and
    ``QUOTELAB_BLOCK_PLUGINS`` value): pluggy's scan and entry-point discovery cost ~6 ms a call,
    which a notebook or batch evaluating in a loop paid every time. A plugin package installed
    while the process runs is seen by the next process. Local files are imported on every call.
    """
    local_files = list(local_files)
    key = (entry_points, os.environ.get(BLOCK_ENV, ""))
    if not local_files and key in _SHARED:
        return _SHARED[key]
    registry = _load(local_files, entry_points)
    if not local_files:
        _SHARED[key] = registry
    return registry


def _load(local_files: list[str | Path], entry_points: bool) -> Registry:
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in filter(None, os.environ.get(BLOCK_ENV, "").split(",")):
        pm.set_blocked(name.strip())
    for mod in BUILTIN_PLUGINS:
        try:
            _register(pm, importlib.import_module(mod), mod)
        except Exception as exc:
            raise PluginError(f'Error importing plugin "{mod}": {type(exc).__name__}: {exc}') from exc
    sources: dict[str, str] = {}
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f'Error importing plugin "{ep.name}" ({ep.value}): {type(exc).__name__}: {exc}; '
                    f"uninstall it or block it with {BLOCK_ENV}={ep.name}"
                ) from exc
            _register(pm, plugin, ep.name)
            dist = getattr(ep, "dist", None)
            sources[ep.name] = f"{dist.name} {dist.version}" if dist is not None else f"entry point {ep.name}"
    for path in local_files:
        path = Path(path)
        _register(pm, _import_local(path), str(path))

    registry = Registry(pm)
    # Calling each implementation ourselves (rather than the hook as a whole) is what lets an error
    # or a duplicate name point at the plugin that caused it.
    for impl in pm.hook.quotelab_register_components.get_hookimpls():
        plugin_name = impl.plugin_name
        source = sources.get(plugin_name) or (
            f"quotelab {__version__}" if plugin_name.startswith("quotelab.plugins.") else plugin_name
        )

        def register(component: Component, _source: str = source) -> None:
            registry.add(component, _source)

        try:
            impl.function(register=register)
        except (PluginError, ConfigError):
            raise
        except Exception as exc:
            raise PluginError(f'Error in plugin "{plugin_name}": {type(exc).__name__}: {exc}') from exc
    from quotelab.pysignal import register_python_signals

    register_python_signals(pm, registry, sources)
    return registry
