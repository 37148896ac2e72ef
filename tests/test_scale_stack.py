"""compose.scale.yaml: Redis behind Sentinel with what exactly-once needs (#24), read as YAML.

No Docker here (fast): the container smoke test (.ci/container-smoke.sh) starts the stack and
runs the chaos test's short form on it; ``make chaos`` (bench/chaos.py) runs the full one. These
checks keep what a valid-but-wrong edit would break: a restart policy on every service, one
Redis image for data nodes and Sentinels, the primary's refusal to write without a replica
(split brain), the API replicas finding Redis through the Sentinels and waiting for every
replica, and fixed addresses that agree with each other.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from app.services.redis_urls import parse_sentinel_url

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's ``!reset`` and ``!override`` tags (their value, as is)."""


for tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(
        tag,
        lambda loader, node: (
            loader.construct_sequence(node)
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_mapping(node)
            if isinstance(node, yaml.MappingNode)
            else loader.construct_scalar(node)
        ),
    )


def defaults(value: Any) -> Any:
    """``${VAR:-default}`` replaced by its default, all the way down."""
    if isinstance(value, str):
        return DEFAULT.sub(lambda m: m.group(2), value)
    if isinstance(value, list):
        return [defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: defaults(v) for k, v in value.items()}
    return value


def load(name: str) -> dict[str, Any]:
    with (ROOT / name).open(encoding="utf-8") as f:
        return defaults(yaml.load(f, Loader=ComposeLoader))  # a SafeLoader


SCALE = load("compose.scale.yaml")
SERVICES = SCALE["services"]
NODES = sorted(n for n in SERVICES if n.startswith("redis-"))
SENTINELS = sorted(n for n in SERVICES if n.startswith("sentinel-"))


def address(service: str) -> str:
    return SERVICES[service]["networks"]["store"]["ipv4_address"]


def command_options(service: str) -> dict[str, str]:
    """redis-server's ``--name value`` options in a data node's command."""
    argv = SERVICES[service]["command"]
    options = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            options[arg[2:]] = argv[i + 1]
    return options


def test_three_data_nodes_and_three_sentinels_from_one_pinned_image() -> None:
    assert NODES == ["redis-1", "redis-2", "redis-3"]
    assert SENTINELS == ["sentinel-1", "sentinel-2", "sentinel-3"]
    images = {SERVICES[n]["image"] for n in NODES + SENTINELS}
    assert images == {"redis:7.0.15-bookworm"}


def test_every_service_restarts_by_itself() -> None:
    base = load("compose.yaml")["services"]
    for name, service in SERVICES.items():
        policy = service.get("restart") or base.get(name, {}).get("restart")
        assert policy in ("always", "unless-stopped", "on-failure"), name


def test_a_primary_without_replicas_refuses_writes_and_nothing_is_evicted() -> None:
    for node in NODES:
        options = command_options(node)
        assert int(options["min-replicas-to-write"]) >= 1, node
        assert 0 < int(options["min-replicas-max-lag"]) <= 5, node
        assert options["appendonly"] == "yes" and options["maxmemory-policy"] == "noeviction"
        assert SERVICES[node]["command"][:2] == ["sh", "/etc/rnn-serving/redis-node.sh"]


def test_the_api_finds_redis_through_the_sentinels_and_waits_for_every_replica() -> None:
    env = SERVICES["api"]["environment"]
    url = parse_sentinel_url(env["ECHO_STORE_URL"])
    assert sorted(url.sentinels) == [(name, 26379) for name in SENTINELS]
    masters = {SERVICES[n]["environment"]["MASTER_NAME"] for n in NODES + SENTINELS}
    assert masters == {url.master}
    # The Sentinels promote whichever replica their last reading of the offsets favours: only
    # a step on every replica survives any failover.
    assert int(env["ECHO_STORE_MIN_REPLICAS"]) == len(NODES) - 1
    assert set(SERVICES["api"]["networks"]) == {"default", "store"}
    assert set(SERVICES["api"]["depends_on"]) == set(NODES + SENTINELS)


def test_fixed_addresses_agree() -> None:
    store = SCALE["networks"]["store"]
    assert store["internal"] is True
    (pool,) = store["ipam"]["config"]
    subnet = ipaddress.ip_network(pool["subnet"])
    dynamic = ipaddress.ip_network(pool["ip_range"])
    fixed = {name: ipaddress.ip_address(address(name)) for name in NODES + SENTINELS}
    assert len(set(fixed.values())) == len(fixed)
    assert all(ip in subnet and ip not in dynamic for ip in fixed.values())
    primary = SERVICES["redis-1"]["environment"]["INITIAL_PRIMARY"]
    for node in NODES:
        env = SERVICES[node]["environment"]
        assert env["NODE_ADDR"] == address(node)
        assert env["INITIAL_PRIMARY"] == primary == address("redis-1")
        assert shlex.split(env["SENTINELS"]) == [address(s) for s in SENTINELS]
    for sentinel in SENTINELS:
        assert SERVICES[sentinel]["environment"]["INITIAL_PRIMARY"] == primary


def test_each_node_and_sentinel_keeps_its_own_volume_and_script() -> None:
    volumes = set(SCALE["volumes"])
    for name in NODES + SENTINELS:
        mounts = SERVICES[name]["volumes"]
        named = [m.split(":")[0] for m in mounts if isinstance(m, str)]
        assert named == [f"{name}-data"] and f"{name}-data" in volumes
        (script,) = [m for m in mounts if isinstance(m, dict)]
        assert script["read_only"] is True and (ROOT / script["source"]).is_file()
