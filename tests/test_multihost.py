"""Several hosts: the broker and each stage in a network namespace of its own, linked through a
bridge, talking over real addresses with CURVE on; this test process is one client's host, and
a client host of its own sees no checkpoint at all.

Greedy output equals transformers' generate across three stage hosts; strangers are refused;
a stage host whose link is cut is resharded around, and rejoins when it comes back; a broker
host cut off for a while is ridden out by stages and clients alike.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from transformers import AutoTokenizer

from broker import messages as M
from broker.keys import make_keys
from client import Client, query_broker
from layerline.cluster import cluster_env
from layerline.netns import Net, unavailable
from stage.demo_model import ensure_demo_model
from tests.test_e2e import prompt_ids, reference_greedy
from tests.test_failover import run_stream

why_not = unavailable()
pytestmark = pytest.mark.skipif(why_not is not None, reason=why_not or "")

PORT = 5555
TOKENS = 24
STAGE_HOSTS = ("h0", "h1", "h2")
# The client host's program: only the broker's URL and its keys; prints what it generated.
REMOTE_CLIENT = """
import json, os, sys
from client import Client
url, cert, broker_key, prompt = sys.argv[1:5]
with Client(url, cert=cert, broker_key=broker_key) as c:
    model = c.status()["model"]
    r = c.generate(prompt, max_new_tokens=int(sys.argv[5]), ignore_eos=True)
seen = os.listdir(model) if os.path.isdir(model) else []
print(json.dumps({"model_files": seen, "ids": r.token_ids, "text": r.text}))
"""


class Hosts:
    """A broker host and three stage hosts, with keys; stages s0, s1, s2 on h0, h1, h2."""

    def __init__(self, net: Net, checkpoint, keys, logs):
        self.net, self.checkpoint, self.keys, self.logs = net, checkpoint, keys, logs
        self.url = f"tcp://{net.addr('broker')}:{PORT}"
        self.env = cluster_env()

    def start_broker(self):
        return self.net.spawn(
            "broker",
            [sys.executable, "-m", "broker", "--bind", self.url,
             "--feed", f"tcp://{self.net.addr('broker')}:{PORT + 1}",
             "--model", str(self.checkpoint), "--keys", str(self.keys),
             "--expect-stages", "3", "--settle", "1", "--rebalance-cooldown", "1"],
            self.logs / "broker.log", self.env,
        )  # fmt: skip

    def start_stage(self, host: str, name: str, cert: str | None = None):
        cert = cert or str(self.keys / "private" / f"{name}.key_secret")
        return self.net.spawn(
            host,
            [sys.executable, "-m", "stage", "--broker", self.url, "--model", str(self.checkpoint),
             "--name", name, "--threads", "1", "--cert", cert,
             "--broker-key", str(self.keys / "broker.key")],
            self.logs / f"{name}.log", self.env,
        )  # fmt: skip

    def client_keys(self, name: str = "alice") -> dict:
        return {
            "cert": self.keys / "private" / f"{name}.key_secret",
            "broker_key": self.keys / "broker.key",
        }

    def status(self) -> dict | None:
        try:
            return query_broker(self.url, timeout=1.0, **self.client_keys("ops"))
        except Exception:
            return None

    def wait_for(self, predicate, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        status = None
        while time.monotonic() < deadline:
            status = self.status()
            if status is not None and predicate(status):
                return status
            time.sleep(0.1)  # a poll interval, not a wait for an event
        raise AssertionError(f"{what}: not within {timeout_s} s; last status {status}")


@pytest.fixture(scope="module")
def hosts(checkpoints, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys")
    make_keys(keys, {"stage": ["s0", "s1", "s2"], "client": ["alice"], "admin": ["ops"]})
    logs = tmp_path_factory.mktemp("logs")
    # The demo checkpoint ships a tokenizer, which the broker serves to the client host.
    model = shutil.copytree(ensure_demo_model(), tmp_path_factory.mktemp("model") / "demo")
    with Net(["broker", *STAGE_HOSTS, "client"]) as net:
        h = Hosts(net, model, keys, logs)
        h.start_broker()
        for i, host in enumerate(STAGE_HOSTS):
            h.start_stage(host, f"s{i}")
        h.wait_for(lambda s: s["ready"] and len(s["map"]) == 3, 120, "three stage hosts in the map")
        yield h


def test_greedy_across_three_stage_hosts_with_keys_equals_generate(hosts):
    prompt = prompt_ids(91)
    expected = reference_greedy(hosts.checkpoint, prompt, TOKENS)
    with Client(hosts.url, **hosts.client_keys()) as client:
        status = client.status()
        assert status["security"] == "curve"
        result = client.generate(prompt, max_new_tokens=TOKENS, ignore_eos=True)
    assert result.token_ids == expected
    assert len(status["map"]) == 3
    # Each stage runs in a namespace of its own: the bridge is its only way to the broker.
    assert sorted(s["name"] for s in status["stages"]) == ["s0", "s1", "s2"]


def test_a_stage_host_with_an_unknown_key_gets_no_layers(hosts, tmp_path):
    stranger = tmp_path / "stranger"
    make_keys(stranger, {"stage": ["s7"]})
    proc = hosts.start_stage("h2", "s7", str(stranger / "private" / "s7.key_secret"))
    assert proc.wait(timeout=120) == 3
    log = (hosts.logs / "s7.log").read_text()
    assert "refused this stage's key" in log
    status = hosts.status()
    assert sorted(s["name"] for s in status["stages"]) == ["s0", "s1", "s2"]
    assert status["ready"]


def test_a_cut_stage_link_is_resharded_around_and_the_stage_rejoins(hosts):
    prompt = prompt_ids(92)
    expected = reference_greedy(hosts.checkpoint, prompt, TOKENS)
    with Client(hosts.url, **hosts.client_keys()) as client:
        cut = {}

        def on_token(i: int) -> None:
            if i == 6:
                hosts.net.link("h1", up=False)
                cut["at"] = time.monotonic()

        tokens, events = run_stream(client, prompt, TOKENS, on_token)
    assert tokens == expected
    assert any(e["type"] in ("reshard", "replay") for e in events)
    status = hosts.wait_for(
        lambda s: s["ready"] and "s1" not in [r["stage"] for r in s["map"]], 30, "s1 resharded out"
    )
    assert len(status["map"]) == 2
    hosts.net.link("h1", up=True)
    hosts.wait_for(
        lambda s: s["ready"] and "s1" in [r["stage"] for r in s["map"]], 90, "s1 back in the map"
    )


def test_a_broker_host_cut_off_for_a_while_is_ridden_out(hosts):
    prompt = prompt_ids(93)
    expected = reference_greedy(hosts.checkpoint, prompt, TOKENS)
    hosts.wait_for(lambda s: s["ready"] and len(s["map"]) == 3, 90, "three stages in the map")
    with Client(hosts.url, **hosts.client_keys(), reconnect_timeout=60) as client:

        def on_token(i: int) -> None:
            if i == 8:
                hosts.net.link("broker", up=False)
                time.sleep(2.0)  # the outage itself: what is tested is riding it out
                hosts.net.link("broker", up=True)

        tokens, _ = run_stream(client, prompt, TOKENS, on_token)
    assert tokens == expected
    status = hosts.wait_for(lambda s: s["ready"], 60, "ready after the outage")
    jobs = query_broker(hosts.url, M.JobsQuery(), 5, **hosts.client_keys("ops")).get("jobs", [])
    assert jobs and jobs[-1]["outcome"] == "done"
    assert status["security"] == "curve"


def test_a_client_host_needs_only_the_url_and_its_keys(hosts, tmp_path):
    """On its own host, with the checkpoint's directory hidden under an empty mount, a client
    gets the tokenizer from the broker and generates what transformers does."""
    tokenizer = AutoTokenizer.from_pretrained(hosts.checkpoint)
    text = "Once upon a time"
    prompt = tokenizer(text)["input_ids"]
    expected = reference_greedy(hosts.checkpoint, prompt, TOKENS)
    keys = hosts.client_keys()
    program = [sys.executable, "-c", REMOTE_CLIENT, hosts.url, str(keys["cert"]),
               str(keys["broker_key"]), text, str(TOKENS)]  # fmt: skip
    hide = f'mount -t tmpfs tmpfs {hosts.checkpoint} && exec "$@"'
    env = {**hosts.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run(
        ["ip", "netns", "exec", hosts.net.hosts["client"], "unshare", "--mount",
         "--propagation", "private", "sh", "-c", hide, "sh", *program],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model_files"] == []  # the client host sees none of the checkpoint
    assert result["ids"] == expected
    assert result["text"] == tokenizer.decode(expected)
    assert (tmp_path / "cache" / "layerline" / "tokenizers").is_dir()
