"""The local Ray cluster ``adaptkit serve`` starts: token authentication on unless the user chose, and every
control-plane port (GCS, raylet, workers, agents) on the loopback when the server listens only there.

Ray's control plane runs whatever code a caller sends it, so who may reach it matters more than the HTTP port:
Ray authenticates its control plane with a token from 2.52 on (``RAY_AUTH_MODE=token``; the default for local
clusters only from 2.59), and binds its gRPC servers to every interface unless the node's address is the loopback,
which on Linux it only is when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the single-machine mode Ray uses on macOS and
Windows). Both are environment variables read when Ray is imported, so :func:`prepare` runs before ``import ray``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys

from adaptkit.errors import ConfigError

__all__ = ["MIN_RAY", "check_version", "is_loopback", "prepare"]

MIN_RAY = (2, 52)  # the first Ray whose control plane can authenticate (RAY_AUTH_MODE=token)
AUTH = "RAY_AUTH_MODE"
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": the node's address is the loopback
_log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) reaches only this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_version(version: str) -> None:
    """Refuse a Ray older than :data:`MIN_RAY`: its control plane cannot authenticate callers."""
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return  # a development build: trust it
    if parts < MIN_RAY:
        need = ".".join(map(str, MIN_RAY))
        raise ConfigError(f"Ray {version} cannot authenticate its control plane (token authentication came in "
                          f"{need}): upgrade it with pip install -U 'ray[serve]>={need}'")


def prepare(host: str) -> list[str]:
    """Set the environment Ray reads at import so the cluster :func:`ray.init` starts authenticates and, when
    ``host`` is the loopback, listens only there. A choice the user made in the environment is kept.

    Returns:
        Notes to show the user (an authentication the user turned off).
    """
    notes = []
    mode = os.environ.get(AUTH)
    if mode is None:
        os.environ[AUTH] = "token"  # Ray makes a token in ~/.ray/auth_token when there is none
    elif mode.lower() != "token":
        notes.append(f"{AUTH}={mode}: Ray's control plane does not authenticate, so anyone who can reach this "
                     "machine's Ray ports can run code on it (unset it, or set it to token)")
    if is_loopback(host) and SINGLE_MACHINE not in os.environ:
        if "ray._private.ray_constants" in sys.modules:  # read already: this process keeps Ray's choice
            _log.warning("Ray was imported before %s could be set; its control plane may listen on every "
                         "interface", SINGLE_MACHINE)
        os.environ[SINGLE_MACHINE] = "0"
    return notes
