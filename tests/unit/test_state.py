"""state/ is checked before use, and the PKI always verifies (issue 11).

Each test damages state/ the way a user, a crash or a race does, then renders again:
what is derivable is made again and verifies against the CA; what is not is refused
with a message naming the file and the way out, and the previous render stays whole.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clusterforge import fsutil, inventory, render
from clusterforge.log import UserError

from .conftest import EXAMPLE, REPO, write_inventory

MACS = ("52-54-00-00-00-11", "52-54-00-00-00-12", "52-54-00-00-00-13")


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_pki_verifies(state: Path, rendered: Path | None = None) -> None:
    """Every node certificate in state/ (and in the seeds, if given) is signed by ca.crt's key,
    matches its private key, and `openssl verify` agrees."""
    ca = x509.load_pem_x509_certificate((state / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((state / "ca.key").read_bytes(), password=None)
    assert ca.public_key() == ca_key.public_key(), "ca.crt is not made from ca.key"
    certs = sorted(state.glob("nodes/*/tls.crt"))
    assert certs, f"no node certificate in {state}"
    for path in certs:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        cert.verify_directly_issued_by(ca)
        key = serialization.load_pem_private_key((path.parent / "tls.key").read_bytes(), password=None)
        assert cert.public_key() == key.public_key(), path
    proc = subprocess.run(["openssl", "verify", "-CAfile", str(state / "ca.crt"), *map(str, certs)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if rendered is not None:  # what the nodes get: the same CA and certificates that verify against it
        import yaml

        for user_data in sorted(rendered.glob("nodes/*/user-data")):
            files = {f["path"]: f["content"] for f in yaml.safe_load(user_data.read_text())["write_files"]}
            seed_ca = x509.load_pem_x509_certificate(files["/etc/clusterforge/pki/ca.crt"].encode())
            assert seed_ca.public_key() == ca.public_key()
            x509.load_pem_x509_certificate(files["/etc/clusterforge/pki/node.crt"].encode()) \
                .verify_directly_issued_by(seed_ca)


@pytest.fixture
def fresh(tmp_path: Path) -> tuple[inventory.Cluster, Path, Path]:
    """The example rendered once into a new state: (cluster, out root, state root)."""
    cluster = inventory.load(EXAMPLE)
    out, state = tmp_path / "dist", tmp_path / "state"
    render.render(cluster, out, state)
    return cluster, out, state


def refused(cluster: inventory.Cluster, out: Path, state: Path, fragment: str) -> UserError:
    """A render that must be refused: the message says `fragment`, the previous render is untouched."""
    before = tree(out / cluster.name)
    with pytest.raises(UserError) as info:
        render.render(cluster, out, state)
    assert fragment in str(info.value), str(info.value)
    assert tree(out / cluster.name) == before
    assert sorted(p.name for p in out.iterdir()) == [f".{cluster.name}.lock", cluster.name]
    return info.value


# ---------------------------------------------------------------- defect 1: the CA

def test_lost_ca_crt_is_made_again_from_ca_key(fresh: tuple[inventory.Cluster, Path, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cluster, out, state = fresh
    lab = state / "lab"
    certs = {p: p.read_bytes() for p in lab.glob("nodes/*/tls.crt")}
    (lab / "ca.crt").unlink()
    rendered = render.render(cluster, out, state)
    assert "ca.crt: missing; made again from" in capsys.readouterr().err
    assert rendered.reissued == ()  # the node certificates were kept, and they verify
    assert {p: p.read_bytes() for p in lab.glob("nodes/*/tls.crt")} == certs
    assert_pki_verifies(lab, rendered.path)


def test_ca_crt_of_another_key_is_made_again(fresh: tuple[inventory.Cluster, Path, Path]) -> None:
    cluster, out, state = fresh
    lab = state / "lab"
    other = lab.parent / "other"
    render.render(inventory.load(EXAMPLE), out / "other", other)
    shutil.copy(other / "lab" / "ca.crt", lab / "ca.crt")  # the node certs say which key is ours
    rendered = render.render(cluster, out, state)
    assert rendered.reissued == ()
    assert_pki_verifies(lab, rendered.path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "directory"])
def test_damaged_ca_crt(fresh: tuple[inventory.Cluster, Path, Path], damage: str) -> None:
    cluster, out, state = fresh
    ca_crt = state / "lab" / "ca.crt"
    if damage == "directory":
        ca_crt.unlink()
        (ca_crt / "x").mkdir(parents=True)
        refused(cluster, out, state, f"{ca_crt}: exists and is a directory")
        return
    ca_crt.write_bytes({"truncated": ca_crt.read_bytes()[:200], "empty": b"", "garbage": b"\xff\0" * 300}[damage])
    assert render.render(cluster, out, state).reissued == ()
    assert_pki_verifies(state / "lab")


def test_lost_ca_key_is_refused_with_the_way_out(fresh: tuple[inventory.Cluster, Path, Path]) -> None:
    cluster, out, state = fresh
    (state / "lab" / "ca.key").unlink()
    error = refused(cluster, out, state, "ca.key is missing")
    assert error.hint is not None and "./forge render --rekey" in error.hint
    assert not (state / "lab" / "ca.key").exists()  # no new CA made behind the user's back
    # The way out works: a new CA, every node certificate reissued under it.
    rendered = render.render(cluster, out, state, rekey=True)
    assert sorted(rendered.reissued) == ["s1", "s2", "s3"]
    assert_pki_verifies(state / "lab", rendered.path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "rsa", "another"])
def test_damaged_or_foreign_ca_key_is_refused(fresh: tuple[inventory.Cluster, Path, Path], damage: str) -> None:
    cluster, out, state = fresh
    ca_key = state / "lab" / "ca.key"
    if damage == "another":  # another CA's key: reissuing every certificate would silently re-key
        data = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        (state / "lab" / "ca.crt").unlink()
        fragment = "it is not this cluster's CA key"
    elif damage == "rsa":
        from cryptography.hazmat.primitives.asymmetric import rsa

        data = rsa.generate_private_key(65537, 1024).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        fragment = "not an EC private key"
    else:
        data = ca_key.read_bytes()[:60] if damage == "truncated" else b""
        fragment = "not an EC private key"
    ca_key.write_bytes(data)
    certs = {p: p.read_bytes() for p in (state / "lab").glob("nodes/*/tls.crt")}
    error = refused(cluster, out, state, f"{ca_key}: ")
    assert fragment in error.message
    assert error.hint is not None and "--rekey" in error.hint
    assert {p: p.read_bytes() for p in (state / "lab").glob("nodes/*/tls.crt")} == certs


def test_concurrent_first_renders_share_one_ca(tmp_path: Path) -> None:
    """Several renders of a new cluster at once, in separate processes, several times: one CA,
    and every node certificate verifies against it (the race made two CAs in 4 of 12 runs)."""
    context = multiprocessing.get_context("spawn")
    for round_ in range(3):
        out, state = tmp_path / f"dist{round_}", tmp_path / f"state{round_}"
        start = context.Barrier(4)
        procs = [context.Process(target=_render_at_once, args=(start, out, state)) for _ in range(4)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(120)
        assert [p.exitcode for p in procs] == [0] * 4
        assert_pki_verifies(state / "lab", out / "lab")
        assert sorted(p.name for p in out.iterdir()) == [".lab.lock", "lab"]  # no .tmp-/.old- left


def _render_at_once(start: multiprocessing.synchronize.Barrier, out: Path, state: Path) -> None:
    cluster = inventory.load(EXAMPLE)
    start.wait(60)
    render.render(cluster, out, state)


def test_renders_into_one_out_from_two_states_at_once(tmp_path: Path) -> None:
    """Two renders into the same out directory at once (ENOTEMPTY before): they take turns."""
    context = multiprocessing.get_context("spawn")
    out = tmp_path / "dist"
    start = context.Barrier(2)
    procs = [context.Process(target=_render_at_once, args=(start, out, tmp_path / f"state{i}")) for i in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(p.name for p in out.iterdir()) == [".lab.lock", "lab"]
    # The tree is one render's whole output: its seeds carry one of the two CAs, the same in all.
    cas = {(tmp_path / f"state{i}" / "lab" / "ca.crt").read_text() for i in range(2)}
    import yaml

    seeds = [yaml.safe_load(p.read_text()) for p in sorted((out / "lab").glob("nodes/*/user-data"))]
    seen = {next(f["content"] for f in s["write_files"] if f["path"].endswith("pki/ca.crt")) for s in seeds}
    assert len(seen) == 1 and seen <= cas


# ---------------------------------------------------------------- node certificates and keys

@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign", "key-lost"])
def test_damaged_node_certificate_is_reissued_and_verifies(fresh: tuple[inventory.Cluster, Path, Path],
                                                           damage: str) -> None:
    cluster, out, state = fresh
    node = state / "lab" / "nodes" / MACS[1]
    cert = node / "tls.crt"
    if damage == "foreign":  # a certificate of another cluster's CA, for the same key
        other = state.parent / "other"
        render.render(inventory.load(EXAMPLE), out / "other", other)
        shutil.copy(other / "lab" / "nodes" / MACS[1] / "tls.crt", cert)
        shutil.copy(other / "lab" / "nodes" / MACS[1] / "tls.key", node / "tls.key")
    elif damage == "key-lost":
        (node / "tls.key").unlink()
    else:
        cert.write_bytes(cert.read_bytes()[:100] if damage == "truncated" else b"")
    rendered = render.render(cluster, out, state)
    assert rendered.reissued == ("s2",)
    assert_pki_verifies(state / "lab", rendered.path)


@pytest.mark.parametrize(("file", "data", "fragment"), [
    (f"nodes/{MACS[0]}/wireguard.key", b"garbage!!\n", "not a WireGuard private key"),
    (f"nodes/{MACS[0]}/wireguard.key", b"AAAA" * 10 + b"\n", "not a WireGuard private key"),
    (f"nodes/{MACS[0]}/wireguard.key", b"\xff\xfe\x00", "not a WireGuard private key"),
    ("munge.key", b"", "a munge key of 0 bytes"),  # seeds got content "" before
    ("munge.key", b"x" * 5000, "a munge key of 5000 bytes"),
    ("k3s-token", b"\xc3\xa9" * 40, "not a K3s token"),
    ("k3s-token", b"a" * 5000, "not a K3s token"),
    ("ceph-fsid", b"urn:uuid:12345678-1234-5678-1234-567812345678", "not a Ceph fsid"),
    ("ceph-fsid", b"\xff" * 36, "not a Ceph fsid"),
    ("ceph/mon.key", b"AQ==", "not a CephX key"),
    (f"nodes/{MACS[0]}/ceph-mgr.key", b"\n", "not a CephX key"),
    ("ssh/id_ed25519", b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n", "not an OpenSSH private key"),
    ("nodes.json", b'{"schema": 1, "nodes": {"x": []', "unreadable"),
    ("nodes.json", b'{"schema": 1, "nodes": []}', "malformed"),
])
def test_damaged_secret_is_refused(fresh: tuple[inventory.Cluster, Path, Path], file: str, data: bytes,
                                   fragment: str) -> None:
    cluster, out, state = fresh
    path = state / "lab" / file
    path.write_bytes(data)
    error = refused(cluster, out, state, f"{path}: {fragment}")
    assert error.hint is not None
    assert path.read_bytes() == data  # refused, not replaced


@pytest.mark.parametrize("file", ["munge.key", "k3s-token", f"nodes/{MACS[2]}/wireguard.key", "nodes.json"])
def test_directory_where_a_secret_belongs(fresh: tuple[inventory.Cluster, Path, Path], file: str) -> None:
    cluster, out, state = fresh
    path = state / "lab" / file
    path.unlink()
    (path / "keep").mkdir(parents=True)
    refused(cluster, out, state, str(path))
    assert (path / "keep").is_dir()


def test_operator_public_key_is_derived_not_trusted(fresh: tuple[inventory.Cluster, Path, Path]) -> None:
    """A hand-edited id_ed25519.pub (a control character in its comment) never reaches a seed."""
    cluster, out, state = fresh
    public = state / "lab" / "ssh" / "id_ed25519.pub"
    good = public.read_text()
    public.write_text(good.strip() + "\x7f\x1b[2J\n")
    rendered = render.render(cluster, out, state)
    assert public.read_text() == good
    assert b"\x7f" not in b"".join(tree(rendered.path).values())


# ---------------------------------------------------------------- defect 8: interrupts

def _sigint_while_deleting_old(monkeypatch: pytest.MonkeyPatch, signum: int = signal.SIGINT) -> list[Path]:
    """Make remove_path send the signal to this process just before it deletes `<x>.old-<pid>`:
    the moment Ctrl-C left the old tree (0600 seeds and all) behind."""
    hit: list[Path] = []
    real = fsutil.remove_path

    def remove(path: Path) -> None:
        if ".old-" in path.name:
            hit.append(path)
            os.kill(os.getpid(), signum)
        real(path)

    monkeypatch.setattr(fsutil, "remove_path", remove)
    return hit


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_during_swap_leaves_new_output_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       signum: int) -> None:
    final = tmp_path / "lab"
    (final / "nodes").mkdir(parents=True)
    (final / "nodes" / "old").write_text("old")
    hit = _sigint_while_deleting_old(monkeypatch, signum)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            with fsutil.atomic_path(final) as tmp:
                (tmp / "nodes").mkdir(parents=True)
                (tmp / "nodes" / "new").write_text("new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert hit, "the signal was not sent during the swap"
    assert tree(final) == {"nodes/new": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab"]  # no .old-/.tmp- left


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def test_ctrl_c_during_render_swap(fresh: tuple[inventory.Cluster, Path, Path], tmp_path: Path) -> None:
    """The command as a user runs it: Ctrl-C while the old tree is deleted. Exit 130, an accurate
    message, the new tree whole, and no .old-<pid>/ with seeds left behind."""
    _, out, state = fresh
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from clusterforge import cli, fsutil, inventory, render
        real = fsutil.remove_path
        def remove(path):
            if ".old-" in path.name:
                os.kill(os.getpid(), signal.SIGINT)
            real(path)
        fsutil.remove_path = remove
        cluster = inventory.load({str(EXAMPLE)!r})
        cli.user_errors(lambda: render.render(cluster, Path({str(out)!r}), Path({str(state)!r})))()
        """)
    before = tree(out / "lab")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted: nothing half-written was left in place" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lab.lock", "lab"]
    assert tree(out / "lab") == before  # the same state renders the same bytes: the new tree is whole


def test_leftovers_of_a_killed_render_are_removed(fresh: tuple[inventory.Cluster, Path, Path]) -> None:
    cluster, out, state = fresh
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is no process's now
    leftover = out / f"lab.old-{gone.pid}"
    shutil.copytree(out / "lab", leftover)
    render.render(cluster, out, state)
    assert not leftover.exists()


def test_names_given_before_another_render_changed_state(tmp_path: Path) -> None:
    """A command loads the inventory (giving names and addresses from state/) before it takes the
    render lock; another render in between may have given them to other MACs. Refused, and
    nodes.json never records one name or address for two MACs."""
    out, state = tmp_path / "dist", tmp_path / "state"
    first = EXAMPLE.read_text()
    second = first.replace('"52:54:00:00:00:11"', '"52:54:00:00:00:21"')
    late = inventory.load(write_inventory(tmp_path, second, "second.yaml"), state=state)  # loaded, not yet rendered
    render.render(inventory.load(write_inventory(tmp_path, first, "first.yaml"), state=state), out, state)
    records = (state / "lab" / "nodes.json").read_bytes()
    error = refused(late, out, state, "would both be recorded with the name s1")
    assert "run the command again" in (error.hint or "")
    assert (state / "lab" / "nodes.json").read_bytes() == records
    # Loaded again, it gets names of its own: 52:54:00:00:00:21 is the new node s4.
    again = inventory.load(write_inventory(tmp_path, second, "second.yaml"), state=state)
    assert next(n.name for n in again.nodes if n.mac.endswith(":21")) == "s4"
    render.render(again, out, state)
