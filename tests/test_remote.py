"""bench --remote: a real round trip over SSH to an sshd started on 127.0.0.1 by the test."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from test_bench import tiny_onnx  # noqa: F401  (fixture)

from chita_edge.core.errors import BadInput
from chita_edge.devices.bench import parse_remote

SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.path.exists(p)), None)
SSH_KEYGEN = shutil.which("ssh-keygen")
SSH = shutil.which("ssh")
SFTP_SERVER = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                                "/usr/lib/ssh/sftp-server", "/usr/libexec/sftp-server") if os.path.exists(p)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not (SSHD and SSH_KEYGEN and SSH and shutil.which("scp") and SFTP_SERVER):
        pytest.skip("needs OpenSSH server and client with sftp-server (apt-get install -y openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o700)
    for name in ("host_key", "user_key"):
        subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True, timeout=30)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = _free_port()
    user = getpass.getuser()
    cfg = d / "sshd_config"
    cfg.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
AllowUsers {user}
MaxStartups 20
Subsystem sftp {SFTP_SERVER}
LogLevel ERROR
""")
    Path("/run/sshd").mkdir(exist_ok=True) if os.geteuid() == 0 else None  # privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 15
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"sshd did not start: {proc.stderr.read().decode(errors='replace')[-300:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.skip("sshd did not listen within 15 s")
    opts = [f"IdentityFile={d / 'user_key'}", f"UserKnownHostsFile={d / 'known_hosts'}", "IdentitiesOnly=yes"]
    yield {"url": f"ssh://{user}@127.0.0.1:{port}", "opts": opts, "port": port, "user": user}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_parse_remote():
    t = parse_remote("ssh://pi@raspberrypi.local:2222")
    assert (t.user, t.host, t.port) == ("pi", "raspberrypi.local", 2222)
    assert parse_remote("pi@10.0.0.5").port == 22
    v6 = parse_remote("ssh://me@[::1]:2200")
    assert v6.host == "::1" and v6.scp_dest == "me@[::1]" and v6.dest == "me@::1"
    for bad in ("http://x", "ssh://a@b:99999", "-oProxyCommand=x", "ssh://a b@c", "", "ssh://-evil",
                "ssh://-l@host"):
        with pytest.raises(BadInput, match="--remote"):
            parse_remote(bad)


def test_remote_round_trip_is_measured_on_the_device(sshd, tiny_onnx):  # noqa: F811
    args = ["bench", tiny_onnx, "--remote", sshd["url"], "--remote-python", sys.executable, "--runs", "5",
            "--warmup", "1", "--profile", "sbc-rpi4", "--json"]
    for o in sshd["opts"]:
        args += ["--ssh-option", o]
    r = run_cli(*args)
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["provenance"] == "measured-device" and d["remote"] == f"{sshd['url']}"
    assert len(d["samples_ms"]) == 5 and d["latency_ms"]["p50"] > 0
    assert d["threads"] == 4  # the profile's device threads, not the host's 1
    assert d["file_bytes"] == Path(tiny_onnx).stat().st_size
    assert "device_estimate" not in d  # measured there: nothing to estimate
    # the temporary directory on the device is gone
    left = subprocess.run(["ssh", "-o", "BatchMode=yes", *sum((["-o", o] for o in sshd["opts"]), []),
                           "-p", str(sshd["port"]), f"{sshd['user']}@127.0.0.1", "ls -d /tmp/chita-edge.* 2>/dev/null | wc -l"],
                          capture_output=True, text=True, timeout=30)
    assert left.returncode == 0 and left.stdout.strip() == "0"


def test_remote_check_and_failures(sshd, tiny_onnx, tmp_path):  # noqa: F811
    opts = sum((["--ssh-option", o] for o in sshd["opts"]), [])
    r = run_cli("check", tiny_onnx, "--profile", "sbc-rpi4", "--remote", sshd["url"], "--remote-python",
                sys.executable, "--runs", "3", "--latency-ms", "0.000001", *opts)
    assert r.code == 1 and "latency_ms.p90" in r.stderr and "measured-device" in r.stderr
    # wrong python on the device: a runtime failure that says what to do
    r = run_cli("bench", tiny_onnx, "--remote", sshd["url"], "--remote-python", "/nonexistent/python", "--runs", "1", *opts)
    assert r.code == 3 and "Traceback" not in r.stderr
    # nobody listening: runtime failure, bounded by the connect timeout
    r = run_cli("bench", tiny_onnx, "--remote", f"ssh://{sshd['user']}@127.0.0.1:{_free_port()}", "--runs", "1", *opts)
    assert r.code == 3 and "ssh failed" in r.stderr
    r = run_cli("bench", tiny_onnx, "--remote", "http://nope")
    assert r.code == 2
