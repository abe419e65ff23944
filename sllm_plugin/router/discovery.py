"""Node daemons found in DNS: `sllm router --discover dns://NAME:PORT`.

Every A and AAAA record of NAME is a node daemon at `http://ADDRESS:PORT` (IPv6 in brackets),
named `ADDRESS:PORT` in the router (/admin/nodes, metrics, replica ids). NAME is looked up at
start and every `discover_interval_s` with the system resolver (`loop.getaddrinfo`: the
host's /etc/hosts, resolv.conf and nsswitch, like every other program there); a Kubernetes
headless Service, or any zone with one record per node, answers exactly this.

- An answer is the truth: a new address is a node added (the configured models are registered
  on it, and the regular poll picks it up); an address no longer in it is a node that left,
  treated as failed (`Cluster.remove_node`: its replicas are lost, their streams fail over).
- A lookup that fails (no such name, no address, a timeout, no server) keeps the nodes found
  before, and is logged once until lookups succeed again: a DNS hiccup must not take every
  node out of service. (So DNS can shrink the fleet but never empty it.)
- Answers are hostile input: only literal addresses are used (from getaddrinfo, validated
  again), at most `MAX_NODES` of them, and never a scoped (link-local) IPv6 address, which has
  no portable URL form. A static node (`--node`, `nodes:`) with the same URL wins.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..tokens import TokenError
from .config import NodeRef, RouterConfig, split_address_url

if TYPE_CHECKING:
    from .cluster import Cluster

logger = logging.getLogger("sllm_plugin.router")

MAX_NODES = 256
LOOKUP_TIMEOUT_S = 30.0  # the resolver's own timeouts (resolv.conf) normally end it sooner
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


@dataclass(frozen=True)
class DiscoverTarget:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"dns://{self.name}:{self.port}"


def parse_discover_url(url: str) -> DiscoverTarget:
    """`dns://NAME:PORT`, else ValueError saying what is wrong with it."""
    parts, port, problem = split_address_url(url, ("dns",))
    name = (parts.hostname or "").rstrip(".")
    if problem is None:
        if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
            problem = f"{name!r} is not a DNS name"
        elif port is None:
            problem = "it names no port (the node daemons' port, e.g. dns://nodes.example:8073)"
        elif port == 0:
            problem = "the port must be 1 to 65535"
    if problem:
        raise ValueError(f"discover URL {url!r} is not dns://NAME:PORT: {problem}")
    return DiscoverTarget(name, port)


def node_name(address: str, port: int) -> str:
    """`ADDRESS:PORT`, an IPv6 address in brackets: the discovered node's name and netloc."""
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}"


async def lookup(target: DiscoverTarget) -> list[str]:
    """The addresses `target.name` resolves to now, sorted (OSError if the lookup fails)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(LOOKUP_TIMEOUT_S):
        infos = await loop.getaddrinfo(target.name, target.port, type=socket.SOCK_STREAM)
    found = set()
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        if family == socket.AF_INET6 and sockaddr[3]:
            continue  # scoped (link-local): no portable URL form
        try:
            found.add(ipaddress.ip_address(sockaddr[0]))
        except ValueError:
            continue
    return [str(a) for a in sorted(found, key=lambda a: (a.version, a))]


Resolver = Callable[[DiscoverTarget], Awaitable[list[str]]]


class Discovery:
    """Keeps the cluster's discovered nodes equal to what DNS answers (see the module doc)."""

    def __init__(self, cluster: Cluster, config: RouterConfig,
                 resolve: Resolver = lookup) -> None:
        assert config.discover is not None
        self.cluster, self.config, self.resolve = cluster, config, resolve
        self.target = parse_discover_url(config.discover)
        self.known: set[str] = set()  # the nodes this discovery added (and may remove)
        self.failing = False

    async def refresh(self) -> None:
        """Look the name up once and add or remove nodes to match the answer."""
        try:
            addresses = await self.resolve(self.target)
            if not addresses:
                raise OSError("the answer holds no usable address")
        except (OSError, TimeoutError, UnicodeError) as e:
            if not self.failing:
                logger.warning("discovery: looking up %s failed (%s); keeping the %d node(s) "
                               "found before", self.target.name, e, len(self.known))
            self.failing = True
            return
        if self.failing:
            logger.info("discovery: %s answers again", self.target.name)
            self.failing = False
        if len(addresses) > MAX_NODES:
            logger.warning("discovery: %s has %d addresses; using the first %d",
                           self.target.name, len(addresses), MAX_NODES)
            addresses = addresses[:MAX_NODES]
        wanted = {node_name(a, self.target.port): a for a in addresses}
        for name in sorted(self.known - wanted.keys()):
            logger.warning("discovery: node %s left DNS", name)
            self.known.discard(name)
            self.cluster.remove_node(name)
        static = {ref.url for name, ref in self.cluster.nodes.items() if name not in self.known}
        added = []
        for name in sorted(wanted.keys() - self.known):
            ref = NodeRef(name=name, url=f"http://{name}",
                          token_file=self.config.discover_token_file)
            if ref.url in static or name in self.cluster.nodes:
                continue  # configured statically: that entry (and its token) wins
            try:
                self.cluster.add_node(ref)
            except TokenError as e:  # logged each round until the token file is fixed
                logger.warning("discovery: not adding node %s: %s", name, e)
                continue
            logger.info("discovery: node %s joined", name)
            self.known.add(name)
            added.append(name)
        await asyncio.gather(*(self.cluster.register(name, model) for name in added
                               for model, spec in self.config.models.items() if spec.source),
                             return_exceptions=True)  # best effort: a start registers again

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.discover_interval_s)
            try:
                await self.refresh()
            except Exception:  # a round must never end the loop
                logger.exception("discovery failed")
