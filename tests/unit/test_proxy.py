"""HTTP(S) proxies (issue 18): the spec's and the inventory's settings, what each node gets per OS family,
init system and engine, and the shell commands run for real on local files (sh, sed, awk, grep, as on a
node). k3s cannot run here: its environment file is checked against the install script's documented form
(`create_env_file` in https://get.k3s.io writes `KEY='value'` lines of NO_PROXY/HTTP_PROXY/HTTPS_PROXY)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from dcx.bootstrap import proxy
from dcx.errors import SpecError
from dcx.inventory import parse_inventory_text
from dcx.log import redact
from dcx.spec import ClusterSpec, load

PROXY_A = "http://proxy.corp:3128"
SECRET_URL = "http://ops:s3cret-pw@proxy.corp:3128"


def spec_file(tmp_path: Path, network_proxy: str = "", pool_proxy: str = "", engine: str = "swarm") -> Path:
    path = tmp_path / "cluster.yaml"
    net = f"  network:\n    proxy: {network_proxy}\n" if network_proxy else ""
    extra = f", proxy: {pool_proxy}" if pool_proxy else ""
    path.write_text("apiVersion: dcx/v1\nkind: Cluster\nmetadata: {name: px}\nspec:\n"
                    f"  engine: {{type: {engine}}}\n{net}  pools:\n"
                    "    - {name: control, role: control, count: 1, provider: local, local: {subnet: 10.77.0.0/24}}\n"
                    f"    - {{name: edge, role: worker, count: 1, provider: local{extra}}}\n")
    return path


# --- spec and inventory -------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "line", "field", "problem"), [
    ("{http: 'proxy:3128'}", 7, "spec.network.proxy.http", "must be an http:// or https:// URL"),
    ("{https: 'http://p:3128/path'}", 7, "spec.network.proxy.https", "with no path"),
    ("{http: 'http://p:70000'}", 7, "spec.network.proxy.http", "port '70000'"),
    ("{http: 'http://u:pa$$word@p:3128'}", 7, "spec.network.proxy.http", "percent-encode"),
    ("{http: 'http://p:3128', noProxy: 'a.corp,bad host'}", 7, "spec.network.proxy.noProxy", "'bad host'"),
    ("{http: 'http://p:3128', ftp: x}", 7, "spec.network.proxy.ftp", "unknown field"),
])
def test_bad_proxy_is_one_located_line(tmp_path: Path, value: str, line: int, field: str, problem: str) -> None:
    with pytest.raises(SpecError) as err:
        load(spec_file(tmp_path, network_proxy=value))
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'cluster.yaml'}:{line}: {field}: ") and problem in text, text
    assert "\n" not in text and "pa$$word" not in text


def test_pool_proxy_error_names_the_pool(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        load(spec_file(tmp_path, pool_proxy="{http: 'socks5://p:1080'}"))
    assert ":8: spec.pools[1].proxy.http: must be an http:// or https:// URL" in str(err.value)


def test_password_is_a_secret_and_not_stored(tmp_path: Path) -> None:
    spec = load(spec_file(tmp_path, network_proxy=f"{{http: '{SECRET_URL}', noProxy: 'registry.corp,.corp'}}"))
    assert spec.spec.network.proxy.http == SECRET_URL  # used as given
    assert spec.spec.network.proxy.noProxy == ["registry.corp", ".corp"]
    assert redact(f"curl -x {SECRET_URL}") == "curl -x http://ops:***@proxy.corp:3128"
    assert redact("s3cret-pw alone") == "*** alone"  # registered: redacted wherever it appears
    stored = spec.model_dump(mode="json")  # what state.json records
    assert stored["spec"]["network"]["proxy"]["http"] == "http://ops:***@proxy.corp:3128"
    again = ClusterSpec.model_validate(stored)  # status/destroy read the recorded spec back
    assert again.spec.network.proxy.http == "http://ops:***@proxy.corp:3128"


def test_inventory_proxy_env_as_ansible_users_set_it() -> None:
    text = ("[web]\n"
            "a ansible_host=10.0.0.1 proxy_env=\"{'HTTP_PROXY': 'http://p:3128', 'no_proxy': 'x.corp,10.1.0.0/16'}\"\n"
            "b\n"
            "[web:vars]\n"
            "environment={\"https_proxy\": \"http://q:8080\", \"LANG\": \"C\"}\n")
    hosts = {h.name: h.proxy for h in parse_inventory_text(text, "hosts.ini")}
    assert hosts == {"a": {"http": "http://p:3128", "noProxy": ["x.corp", "10.1.0.0/16"]},
                     "b": {"https": "http://q:8080"}}
    yaml_text = ("all:\n  vars:\n    proxy_env: {http_proxy: 'http://p:3128'}\n  hosts:\n    c: {}\n"
                 "    d: {proxy_env: {http_proxy: 'ftp://nope'}}\n")
    with pytest.raises(SpecError) as err:
        parse_inventory_text(yaml_text, "hosts.yml")
    assert str(err.value).startswith("hosts.yml:6: host d: proxy_env.http_proxy: must be an http://")
    with pytest.raises(SpecError) as err:
        parse_inventory_text("[w]\nh proxy_env=\"{'http_proxy': '{{ corp_proxy }}'}\"\n", "hosts.ini")
    assert "hosts.ini:2: host h: proxy_env.http_proxy: is templated" in str(err.value)


def test_most_specific_proxy_wins(tmp_path: Path) -> None:
    spec = load(spec_file(tmp_path, network_proxy=f"{{http: '{PROXY_A}'}}", pool_proxy="{}"))
    assert proxy.chosen(spec, "control", None).http == PROXY_A  # the cluster's
    assert proxy.node_proxy(proxy.chosen(spec, "edge", None), []) is None  # the pool's {}: none
    host = proxy.chosen(spec, "edge", {"http": "http://site:8080"})  # the inventory host's
    assert host.http == "http://site:8080"
    made = proxy.node_proxy(host, ["localhost"])
    assert made == proxy.Proxy(http="http://site:8080", https="http://site:8080", no_proxy=("localhost",))


# --- NO_PROXY -------------------------------------------------------------------------------------


def ctx_for(spec: ClusterSpec, nodes: list[tuple[str, str, str]]) -> SimpleNamespace:
    hosts = [SimpleNamespace(node=SimpleNamespace(private_address=priv, public_address="", ssh_address=ssh),
                             facts=SimpleNamespace(addresses=facts)) for priv, ssh, facts in nodes]
    return SimpleNamespace(spec=spec, hosts=hosts)


def test_no_proxy_covers_localhost_nodes_subnets_mesh_and_k3s_ranges(tmp_path: Path) -> None:
    spec = load(spec_file(tmp_path, network_proxy="{http: 'http://p:3128', noProxy: [.corp]}", engine="k3s"))
    ranges = proxy.cluster_ranges(ctx_for(spec, [("10.77.0.5", "10.77.0.5", "10.77.0.5 192.168.9.4"),
                                                 ("", "edge.example.net", "172.20.1.7")]))
    assert ranges == ["localhost", "127.0.0.1", "::1", "100.96.0.0/16", "10.77.0.0/24", "10.42.0.0/16",
                      "10.43.0.0/16", "192.168.9.4", "edge.example.net", "172.20.1.7"]  # 10.77.0.5: in its subnet
    made = proxy.node_proxy(spec.spec.network.proxy, ranges)
    assert made is not None and made.no_proxy[0] == ".corp" and "10.0.0.0/8" not in made.no_proxy
    swarm = load(spec_file(tmp_path, network_proxy="{http: 'http://p:3128'}"))
    assert "10.42.0.0/16" not in proxy.cluster_ranges(ctx_for(swarm, []))


# --- what each node gets --------------------------------------------------------------------------

P = proxy.Proxy(http=PROXY_A, https="http://tls.corp:3129", no_proxy=("localhost", "10.77.0.0/24"))


@pytest.mark.parametrize(("family", "init", "engine", "role", "files"), [
    ("debian", "systemd", "swarm", "worker", {"env", "dropin", "apt"}),
    ("debian", "none", "swarm", "worker", {"env", "apt"}),  # dcx starts dockerd itself: it sources env
    ("rhel", "systemd", "swarm", "control", {"env", "dropin", "dnf"}),
    ("alpine", "openrc", "swarm", "control", {"env"}),
    ("debian", "systemd", "k3s", "control", {"env", "apt", "k3s:/etc/systemd/system/k3s.service.env"}),
    ("debian", "systemd", "k3s", "worker", {"env", "apt", "k3s:/etc/systemd/system/k3s-agent.service.env"}),
    ("alpine", "openrc", "k3s", "worker", {"env", "k3s:/etc/rancher/k3s/k3s-agent.env"}),
    ("debian", "none", "k3s", "control", {"env", "apt"}),
])
def test_files_per_family_init_and_engine(family: str, init: str, engine: str, role: str, files: set[str]) -> None:
    t = proxy.target(P, family=family, init=init, engine=engine, role=role)
    have = {name for name in ("env", "dropin", "apt") if getattr(t, name) is not None}
    have |= {"dnf"} if t.dnf_line else set()
    have |= {f"k3s:{t.k3s_env}"} if t.k3s_env else set()
    assert have == files
    assert t.env == ("HTTP_PROXY=http://proxy.corp:3128\nhttp_proxy=http://proxy.corp:3128\n"
                     "HTTPS_PROXY=http://tls.corp:3129\nhttps_proxy=http://tls.corp:3129\n"
                     "NO_PROXY=localhost,10.77.0.0/24\nno_proxy=localhost,10.77.0.0/24\n")
    if t.dropin:
        assert "[Service]\nEnvironmentFile=-/etc/dcx/proxy.env\n" in t.dropin and "proxy.corp" not in t.dropin
    if t.apt:
        assert ('Acquire::http::Proxy "http://proxy.corp:3128";\nAcquire::https::Proxy "http://tls.corp:3129";\n'
                in t.apt)
    if t.dnf_line:
        assert t.dnf_line == "proxy=http://proxy.corp:3128"
    none = proxy.target(None, family=family, init=init, engine=engine, role=role)
    assert (none.env, none.dropin, none.apt, none.dnf_line, none.k3s_lines) == (None, None, None, None, ())


def test_restarts_only_for_what_changed() -> None:
    kw = {"init": "systemd", "engine": "swarm", "role": "worker", "docker_running": True}
    assert proxy.restart_commands([], **kw) == []
    assert proxy.restart_commands(["apt"], **kw) == []  # apt reads its config on each run
    assert proxy.restart_commands(["env", "dropin"], **kw) == ["systemctl daemon-reload",
                                                                "systemctl try-restart docker"]
    assert proxy.restart_commands(["env"], **{**kw, "docker_running": False}) == []
    none = proxy.restart_commands(["env"], **{**kw, "init": "none"})
    assert len(none) == 1 and "kill \"$pid\"" in none[0] and "/run/dcx/dockerd.pid" in none[0]
    k3s = proxy.restart_commands(["k3s"], **{**kw, "engine": "k3s", "role": "control"})
    assert k3s == ["if systemctl is-active --quiet k3s; then systemctl restart k3s; fi"]
    agent = proxy.restart_commands(["k3s"], **{**kw, "engine": "k3s", "init": "openrc"})
    assert agent == ["if rc-service k3s-agent status >/dev/null 2>&1; then rc-service k3s-agent restart; fi"]


# --- the commands, run for real on local files ------------------------------------------------------


def sh(command: str, stdin: str = "") -> str:
    return subprocess.run(["sh", "-c", command], input=stdin, capture_output=True, text=True, check=True).stdout


def at(tmp_path: Path, command: str, *paths: str) -> str:
    """A node's command pointed at a directory of this machine instead of /."""
    for p in paths:
        command = command.replace(p, str(tmp_path / p.lstrip("/")))
    return command


ALL_PATHS = (proxy.PROXY_ENV, proxy.DOCKER_DROPIN, proxy.APT_CONF, *proxy.DNF_CONFS)


def probe(tmp_path: Path, t: proxy.NodeFiles) -> dict[str, str]:
    return proxy.parse_probe(sh(at(tmp_path, proxy.probe_script(t), *ALL_PATHS)))


def apply(tmp_path: Path, t: proxy.NodeFiles) -> list[str]:
    have = probe(tmp_path, t)
    what = proxy.changes(t, have)
    for command, stdin in proxy.apply_commands(t, what, have.get("dnf_file", "").replace(str(tmp_path), "")):
        sh(at(tmp_path, command, *ALL_PATHS), stdin)
    return what


def test_write_change_remove_on_a_debian_systemd_node(tmp_path: Path) -> None:
    t = proxy.target(P, family="debian", init="systemd", engine="swarm", role="worker")
    assert apply(tmp_path, t) == ["env", "dropin", "apt"]
    env = tmp_path / "etc/dcx/proxy.env"
    assert env.read_text() == t.env and oct(env.stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / proxy.DOCKER_DROPIN.lstrip("/")).read_text() == t.dropin
    assert apply(tmp_path, t) == []  # idempotent: nothing written, nothing restarted
    changed = proxy.target(proxy.Proxy(http="http://other:8080", https="http://other:8080", no_proxy=()),
                           family="debian", init="systemd", engine="swarm", role="worker")
    assert apply(tmp_path, changed) == ["env", "apt"]  # the drop-in only names the file
    assert "other:8080" in env.read_text()
    gone = proxy.target(None, family="debian", init="systemd", engine="swarm", role="worker")
    assert apply(tmp_path, gone) == ["env", "dropin", "apt"]
    assert not env.exists() and not (tmp_path / proxy.DOCKER_DROPIN.lstrip("/")).exists()
    assert not (tmp_path / proxy.APT_CONF.lstrip("/")).exists()
    assert apply(tmp_path, gone) == []


def test_a_drop_in_of_the_owner_is_left_alone(tmp_path: Path) -> None:
    mine = tmp_path / proxy.DOCKER_DROPIN.lstrip("/")
    mine.parent.mkdir(parents=True)
    mine.write_text('[Service]\nEnvironment="HTTP_PROXY=http://theirs:3128"\n')
    gone = proxy.target(None, family="debian", init="systemd", engine="swarm", role="worker")
    assert probe(tmp_path, gone)["dropin"] == "foreign" and apply(tmp_path, gone) == []
    assert mine.exists()


def test_dnf_line_is_added_under_main_replaced_and_removed(tmp_path: Path) -> None:
    conf = tmp_path / "etc/dnf/dnf.conf"
    conf.parent.mkdir(parents=True)
    original = "[main]\ngpgcheck=1\ninstallonly_limit=3\n"
    conf.write_text(original)
    t = proxy.target(P, family="rhel", init="systemd", engine="swarm", role="worker")
    assert "dnf" in apply(tmp_path, t)
    assert conf.read_text() == "[main]\n# dcx proxy\nproxy=http://proxy.corp:3128\ngpgcheck=1\ninstallonly_limit=3\n"
    assert apply(tmp_path, t) == []
    other = proxy.target(proxy.Proxy(http="http://n:1", https="", no_proxy=()), family="rhel", init="systemd",
                         engine="swarm", role="worker")
    apply(tmp_path, other)
    assert conf.read_text().count("proxy=") == 1 and "proxy=http://n:1" in conf.read_text()
    assert oct(conf.stat().st_mode & 0o777) == "0o644"
    # A proxy with a password: the file becomes readable by root only; without one again, 0644.
    secret = proxy.target(proxy.Proxy(http="http://u:pw@n:1", https="", no_proxy=()), family="rhel",
                          init="systemd", engine="swarm", role="worker")
    apply(tmp_path, secret)
    assert "proxy=http://u:pw@n:1" in conf.read_text() and oct(conf.stat().st_mode & 0o777) == "0o600"
    apply(tmp_path, proxy.target(None, family="rhel", init="systemd", engine="swarm", role="worker"))
    assert conf.read_text() == original and oct(conf.stat().st_mode & 0o777) == "0o644"


def test_k3s_env_file_as_the_install_script_writes_it(tmp_path: Path) -> None:
    """The install script's own lines (`sh -c export` under dash: KEY='value') compare equal to dcx's;
    a change replaces only the proxy lines, K3S_ and CONTAINERD_ lines stay."""
    t = proxy.target(P, family="debian", init="systemd", engine="k3s", role="control")
    env_file = tmp_path / t.k3s_env.lstrip("/")
    env_file.parent.mkdir(parents=True)
    exported = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in P.env_lines()}
    script = ("export K3S_NODE_NAME=n1 CONTAINERD_LOG_LEVEL=info " + " ".join(f"{k}={v}" for k, v in exported.items())
              + f"; sh -c export | while read x v; do echo $v; done | grep -E '^(K3S|CONTAINERD)_' > {env_file}"
              + f"; sh -c export | while read x v; do echo $v; done | grep -Ei '^(NO|HTTP|HTTPS)_PROXY' >> {env_file}")
    subprocess.run(["dash", "-c", script], check=True)
    assert "HTTP_PROXY='http://proxy.corp:3128'" in env_file.read_text()
    paths = (*ALL_PATHS, t.k3s_env)
    have = proxy.parse_probe(sh(at(tmp_path, proxy.probe_script(t), *paths)))
    assert have["env"] == "-" and proxy.changes(t, have) == ["env", "apt"]  # the k3s lines match already
    other = proxy.target(proxy.Proxy(http="http://n:1", https="http://n:1", no_proxy=("localhost",)),
                         family="debian", init="systemd", engine="k3s", role="control")
    have = proxy.parse_probe(sh(at(tmp_path, proxy.probe_script(other), *paths)))
    assert "k3s" in proxy.changes(other, have)
    for command, stdin in proxy.apply_commands(other, ["k3s"], ""):
        sh(at(tmp_path, command, *paths), stdin)
    lines = env_file.read_text().splitlines()
    assert lines[:2] == ["CONTAINERD_LOG_LEVEL='info'", "K3S_NODE_NAME='n1'"]
    assert sorted(lines[2:]) == sorted(other.k3s_lines) and "HTTP_PROXY=http://n:1" in lines
    have = proxy.parse_probe(sh(at(tmp_path, proxy.probe_script(other), *paths)))
    assert "k3s" not in proxy.changes(other, have)
    gone = proxy.target(None, family="debian", init="systemd", engine="k3s", role="control")
    have = proxy.parse_probe(sh(at(tmp_path, proxy.probe_script(gone), *paths)))
    for command, stdin in proxy.apply_commands(gone, proxy.changes(gone, have), ""):
        sh(at(tmp_path, command, *paths), stdin)
    assert env_file.read_text() == "CONTAINERD_LOG_LEVEL='info'\nK3S_NODE_NAME='n1'\n"
    assert hashlib.sha256(b"").hexdigest() == proxy.EMPTY_SHA


def test_dcx_downloads_and_detached_daemons_take_the_proxy(tmp_path: Path) -> None:
    from dcx.bootstrap import k3s
    from dcx.bootstrap.runtime import Facts, docker_start_commands

    start = docker_start_commands(Facts(init="none"))[1]
    assert start.index(proxy.SOURCE_ENV) < start.index("setsid dockerd")
    assert k3s.detached_start_command("agent").index(proxy.SOURCE_ENV) < \
        k3s.detached_start_command("agent").index("setsid")
    env = tmp_path / "proxy.env"
    env.write_text(proxy.Proxy(http=PROXY_A, https=PROXY_A, no_proxy=("localhost",)).env_lines()[0] + "\n")
    out = sh(proxy.with_env("sh -c 'echo $HTTP_PROXY'").replace(proxy.PROXY_ENV, str(env)))
    assert out.strip() == PROXY_A  # exported to the child (curl, apt-get, k3s's install script)


def test_reset_leaves_none_of_dcxs_settings_and_keeps_the_owners(tmp_path: Path) -> None:
    t = proxy.target(P, family="rhel", init="systemd", engine="swarm", role="worker")
    conf = tmp_path / "etc/dnf/dnf.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[main]\ngpgcheck=1\n")
    apply(tmp_path, t)
    assert "# dcx proxy" in conf.read_text() and (tmp_path / proxy.DOCKER_DROPIN.lstrip("/")).exists()
    sh(at(tmp_path, proxy.reset_command().replace("systemctl daemon-reload", "true"), *ALL_PATHS))
    assert conf.read_text() == "[main]\ngpgcheck=1\n"
    assert not (tmp_path / proxy.DOCKER_DROPIN.lstrip("/")).exists() and not (tmp_path / "etc/dcx/proxy.env").exists()
    theirs = tmp_path / proxy.DOCKER_DROPIN.lstrip("/")
    theirs.write_text("[Service]\nEnvironment=HTTP_PROXY=http://theirs:1\n")
    sh(at(tmp_path, proxy.reset_command().replace("systemctl daemon-reload", "true"), *ALL_PATHS))
    assert theirs.exists()


# --- the phase, on hosts whose files are a local directory -----------------------------------------


class DirHost:
    """A node whose / is a local directory: file commands run for real there (sh), service commands
    (systemctl, rc-service) are recorded and answer as the node's `running` says."""

    def __init__(self, root: Path, name: str, role: str, facts: object, running: bool = True) -> None:
        self.root, self.name, self.facts, self.running = root, name, facts, running
        self.node = SimpleNamespace(name=name, pool="control" if role == "control" else "edge", role=role,
                                    private_address="10.77.0.5", public_address="", ssh_address="10.77.0.5")
        self.data: dict[str, object] = {}
        self.services: list[str] = []

    def run(self, command: str, *, stdin: str = "", check: bool = False, **_: object) -> SimpleNamespace:
        if "systemctl" in command or "rc-service" in command:
            self.services.append(command)
            return SimpleNamespace(stdout="", ok=True)
        paths = (*ALL_PATHS, "/etc/systemd/system/k3s.service.env", "/etc/systemd/system/k3s-agent.service.env")
        return SimpleNamespace(stdout=sh(at(self.root, command, *paths), stdin), ok=True)


def run_phase_on(spec: ClusterSpec, hosts: list[DirHost]) -> list[str]:
    ctx = SimpleNamespace(spec=spec, hosts=hosts)
    phase = proxy.ConfigureProxy()
    phase.prepare(ctx)
    done = []
    for h in hosts:
        if phase.needs_run(ctx, h):
            phase.run(ctx, h)
            done.append(h.name)
    return done


def test_phase_on_a_k3s_server_rewrites_and_restarts_only_on_change(tmp_path: Path) -> None:
    facts = SimpleNamespace(family="debian", init="systemd", addresses="10.77.0.5", docker_running=False)
    host = DirHost(tmp_path, "px-control-1", "control", facts)
    env_file = tmp_path / "etc/systemd/system/k3s.service.env"
    env_file.parent.mkdir(parents=True)
    env_file.write_text("K3S_TOKEN_FILE='x'\n")  # k3s installed before any proxy was set
    spec = load(spec_file(tmp_path, network_proxy="{http: 'http://p:3128'}", engine="k3s"))
    assert run_phase_on(spec, [host]) == ["px-control-1"]
    assert "HTTP_PROXY=http://p:3128" in env_file.read_text() and env_file.read_text().startswith("K3S_TOKEN_FILE")
    assert host.services == ["if systemctl is-active --quiet k3s; then systemctl restart k3s; fi"]
    assert (tmp_path / "etc/apt/apt.conf.d/90dcx-proxy").exists()
    assert not (tmp_path / proxy.DOCKER_DROPIN.lstrip("/")).exists()  # k3s runs no dockerd
    host.services.clear()
    assert run_phase_on(spec, [host]) == [] and host.services == []  # the same: nothing at all
    run_phase_on(load(spec_file(tmp_path, engine="k3s")), [host])  # no proxy
    assert env_file.read_text() == "K3S_TOKEN_FILE='x'\n" and not (tmp_path / "etc/dcx/proxy.env").exists()
    assert host.services == ["if systemctl is-active --quiet k3s; then systemctl restart k3s; fi"]


def test_phase_restarts_a_detached_dockerd_through_the_runtime_phase(tmp_path: Path) -> None:
    facts = SimpleNamespace(family="debian", init="none", addresses="10.77.0.6", docker_running=True)
    host = DirHost(tmp_path, "px-edge-1", "worker", facts)
    stops: list[str] = []
    real_run = host.run

    def run(command: str, **kw: object) -> SimpleNamespace:
        if "dockerd.pid" in command:  # stopping the detached dockerd: recorded, never run here
            stops.append(command)
            return SimpleNamespace(stdout="", ok=True)
        return real_run(command, **kw)

    host.run = run  # type: ignore[method-assign]
    spec = load(spec_file(tmp_path, network_proxy="{http: 'http://p:3128'}"))
    run_phase_on(spec, [host])
    assert len(stops) == 1 and facts.docker_running is False  # StartRuntime starts it again, with the env


def test_a_url_password_dcx_never_saw_is_redacted_by_its_form() -> None:
    """A daemon's log line or a gathered config with a proxy URL (diagnose archives): the password goes."""
    assert redact("HTTPS_PROXY=http://ops:p%40ss-word@proxy:3128") == "HTTPS_PROXY=http://ops:***@proxy:3128"
    assert redact("ssh://root@10.0.0.1:22 http://proxy:3128 https://h:443/a@b") == \
        "ssh://root@10.0.0.1:22 http://proxy:3128 https://h:443/a@b"


def test_k3s_install_script_runs_with_the_proxy_exported(tmp_path: Path) -> None:
    """With a proxy, the install (and the download of the script) run with it exported, so the script's
    create_env_file copies HTTP_PROXY/HTTPS_PROXY/NO_PROXY into the service's env file; without, unchanged."""
    from dcx.bootstrap import k3s

    env = k3s.install_env("systemd", "server", version="v1.31.4+k3s1")
    plain = k3s.install_command(env)
    host = SimpleNamespace(data={"proxy": None})
    assert k3s._K3sNodes._proxied(host, plain) == plain  # type: ignore[arg-type]
    host.data["proxy"] = P
    proxied = k3s._K3sNodes._proxied(host, plain)  # type: ignore[arg-type]
    (tmp_path / "proxy.env").write_text("".join(f"{line}\n" for line in P.env_lines()))
    script = tmp_path / "install.sh"  # stands in for k3s's: prints what its create_env_file would keep
    script.write_text("sh -c export | while read x v; do echo $v; done | grep -Ei '^(NO|HTTP|HTTPS)_PROXY'\n")
    out = sh(proxied.replace(proxy.PROXY_ENV, str(tmp_path / "proxy.env")).replace(k3s.INSTALL_SCRIPT, str(script)))
    assert sorted(out.replace("'", "").split()) == sorted(P.env_lines())


def test_a_recorded_spec_with_a_masked_password_asks_for_the_file(tmp_path: Path) -> None:
    """roll / node replace / node remove work from the spec recorded in state, where the proxy password is
    masked: writing `***` to the nodes would break them, so they ask for the spec file instead."""
    from dcx.errors import InputError

    spec = load(spec_file(tmp_path, network_proxy=f"{{http: '{SECRET_URL}'}}"))
    assert proxy.node_proxy(proxy.chosen(spec, "control", None), []).http == SECRET_URL
    recorded = ClusterSpec.model_validate(spec.model_dump(mode="json"))
    with pytest.raises(InputError) as err:
        proxy.node_proxy(proxy.chosen(recorded, "control", None), [])
    assert "-f FILE" in str(err.value) and "s3cret-pw" not in str(err.value)


def test_roll_and_node_commands_take_the_spec_file_of_the_same_cluster(tmp_path: Path) -> None:
    from dcx.errors import InputError
    from dcx.lifecycle.replace import recorded_spec

    path = spec_file(tmp_path, network_proxy=f"{{http: '{SECRET_URL}'}}")
    recorded = load(path)
    store = SimpleNamespace(cluster=lambda name: SimpleNamespace(
        load=lambda: SimpleNamespace(name=name, spec=recorded.model_dump(mode="json"), spec_file=str(path))))
    with pytest.raises(InputError) as err:  # up front, before any machine is made
        recorded_spec(store, "px")
    assert "-f FILE" in str(err.value) and "s3cret-pw" not in str(err.value)
    _, from_file = recorded_spec(store, "px", str(path))
    assert from_file.spec.network.proxy.http == SECRET_URL
    with pytest.raises(InputError) as err:
        recorded_spec(store, "other", str(path))
    assert str(err.value).startswith(f"{path}:3: metadata.name: is px, not cluster other")
