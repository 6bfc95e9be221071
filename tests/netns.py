"""Several hosts on one machine: Linux network namespaces joined by a bridge (iproute2, root only).

The test's own namespace plays the services host: it owns the bridge and its address, and the
services listen on that address only. Each worker host is a namespace whose one link (a veth
pair) ends on the bridge, so everything it reaches, it reaches over that link, and cutting the
link (``Host.cut``) is a network partition as a real host would see it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from tests.servers import ServerUnavailable


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str
    link: str  # the link's end on the services side; down = this host is cut off

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def cut(self) -> None:
        _ip("link", "set", self.link, "down")


@dataclass(frozen=True)
class Network:
    services_address: str
    subnet: str
    hosts: list[Host]


@contextlib.contextmanager
def network(worker_hosts: int) -> Iterator[Network]:
    """A bridge with the services address and ``worker_hosts`` namespaced hosts; all removed at exit."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        raise ServerUnavailable("network namespaces need root and iproute2 (apt-get install iproute2)")
    tag = f"{os.getpid() % 100000:05d}"
    octet = os.getpid() % 200 + 20
    subnet, services = f"10.231.{octet}.0/24", f"10.231.{octet}.1"
    bridge = f"csbr{tag}"
    undo: list[list[str]] = []
    try:
        try:
            _ip("link", "add", bridge, "type", "bridge")
        except subprocess.CalledProcessError as exc:
            raise ServerUnavailable(f"cannot create network devices here: {exc.stderr.strip()}") from exc
        undo.append(["link", "del", bridge])
        _ip("addr", "add", f"{services}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        hosts = []
        for number in range(1, worker_hosts + 1):
            namespace, outside, inside = f"cs{tag}h{number}", f"csv{tag}{number}", f"csi{tag}{number}"
            address = f"10.231.{octet}.{10 + number}"
            _ip("netns", "add", namespace)
            undo.append(["netns", "del", namespace])
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            undo.append(["link", "del", outside])
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            _ip("link", "set", inside, "netns", namespace)
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", namespace, "link", "set", inside, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            hosts.append(Host(namespace, address, outside))
        yield Network(services, subnet, hosts)
    finally:
        for step in reversed(undo):
            subprocess.run(["ip", *step], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)
