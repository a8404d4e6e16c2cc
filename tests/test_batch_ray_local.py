"""The local Ray that `p2v batch --ray` starts itself: token-authenticated (Ray 2.59+, the `[ray]`
extra's floor), refused with authentication turned off, and listening on the loopback only.

A module of its own: the local Ray here is started by p2v (`connect`), not by a fixture, so no
other Ray may be up in this process (tests/test_batch_ray.py keeps one for its module).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from p2v_fast.errors import InputError
from tests.helpers import one_line_error, p2v, write_jobs

ray = pytest.importorskip("ray", reason="Ray is the 'ray' extra: pip install -e '.[ray]'")
ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_the_ray_extra_needs_a_release_that_authenticates_local_clusters():
    from packaging.requirements import Requirement

    # (tomllib is 3.11+; the project supports 3.10)
    (line,) = re.findall(r"^ray = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.M)
    (req,) = [Requirement(r) for r in re.findall(r'"([^"]+)"', line)]
    assert req.name == "ray"
    assert not req.specifier.contains("2.58.1") and not req.specifier.contains("2.9.0")
    assert req.specifier.contains("2.59.0") and req.specifier.contains("2.60.0")


@pytest.mark.parametrize("mode", ["disabled", "DISABLED", "", "k8s"])
def test_a_local_ray_without_authentication_is_refused(mode, monkeypatch, tmp_path):
    from p2v_fast.apps.batch_ray import connect
    from p2v_fast.media import samples

    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    with pytest.raises(InputError) as exc:
        connect(None)
    assert str(exc.value).startswith(f"RAY_AUTH_MODE={mode} turns off Ray's token authentication")
    assert not ray.is_initialized()
    if mode != "disabled":
        return
    samples.make_sample_clip(tmp_path / "a.mp4", n_frames=2, size=(64, 64), with_audio=False)
    jobs = write_jobs(tmp_path, [{"input": "a.mp4", "prompt": "a cat"}], {"model": "tiny", "size": 64, "steps": 1})
    res = p2v("batch", str(jobs), "--ray")
    assert res.exit_code == 2 and one_line_error(res).startswith("error: RAY_AUTH_MODE=disabled turns off"), res.output
    assert not (tmp_path / "a.p2v.mp4").exists() and not ray.is_initialized()


def test_a_local_ray_listens_on_the_loopback_only(monkeypatch):
    """Every listening socket of the driver, the GCS server, the raylet and the workers is on
    127.0.0.1 (Ray's default gave the machine's address and listened on every interface). Ray
    logs no warning on the way (it warned that it had turned token authentication on)."""
    import logging

    import psutil

    from p2v_fast.apps.batch_ray import connect

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # Ray sets it to "token" in this process
    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("ray").addHandler(handler)  # its modules' loggers pass records up to it
    try:
        assert connect(None)
    finally:
        logging.getLogger("ray").removeHandler(handler)
    try:
        assert warned == []
        @ray.remote(num_cpus=1)
        def pid() -> int:
            import os

            return os.getpid()

        worker = ray.get(pid.remote())
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
        pids = {p.pid for p in procs}
        assert worker in pids and any("gcs_server" in p.name() for p in procs), [p.name() for p in procs]
        listening = [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids]
        assert len({p for p, _, _ in listening}) >= 3, listening  # driver, GCS, raylet, worker...
        assert {ip for _, ip, _ in listening} <= LOOPBACK, listening
    finally:
        ray.shutdown()
