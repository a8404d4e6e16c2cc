"""An engine folder is confined to itself (issue 27, items 1, 2): its manifest names only its own
networks' own files, and nothing outside the folder is ever read, stat'ed, loaded or deleted
through it; a manifest too big or listing networks p2v does not know is refused in one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from p2v_fast.errors import EngineError
from p2v_fast.nets.manifest import check_files, describe_folder, read_manifest
from p2v_fast.nets.specs import NETWORKS
from tests.helpers import export_tiny, p2v
from tests.helpers import one_line as _one_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def engines(tiny_engines) -> Path:
    """The session's fp32 tiny export (conftest's tiny_engines)."""
    return tiny_engines[0]


def _tampered(engines: Path, folder: Path, edit) -> Path:
    """A copy of ``engines`` whose manifest.json ``edit(data)`` changed."""
    shutil.copytree(engines, folder)
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def _set(network: str, artifact: str, field: str, value):
    def edit(data):
        entry = data["networks"][network]
        if entry.get(artifact) is None:  # an engine where there was none: the graph's record, renamed
            entry[artifact] = dict(entry["onnx"], key="stale", data_file=None, data_bytes=0)
        entry[artifact][field] = value
    return edit


def _victim(path: Path, text: str = "not p2v's") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ export's cleaning


def test_a_graphs_only_reexport_deletes_no_file_the_manifest_names(engines, tmp_path) -> None:
    """Before: a manifest naming a stale engine '../../x', '/abs/path' or the folder's own
    unet.onnx made `p2v export --format onnx` delete that file (exit 0, 'ONNX current, skipped')."""
    base = tmp_path / "a" / "b"
    up = _victim(tmp_path / "x")  # base/eng/../../x
    absolute = _victim(tmp_path / "abs" / "victim.txt")

    def edit(data):
        _set("vae_encoder", "engine", "file", "../../x")(data)
        _set("vae_decoder", "engine", "file", str(absolute))(data)
        _set("depth", "engine", "file", "unet.onnx")(data)

    folder = _tampered(engines, base / "eng", edit)
    export_tiny(base, name="eng")
    assert up.read_text() == "not p2v's" and absolute.read_text() == "not p2v's"
    manifest = read_manifest(folder)  # rewritten by the export, every graph whole (unet.onnx too)
    check_files(manifest, folder, "onnx")
    assert all(e.engine is None for e in manifest.networks.values())


def test_reexport_cleans_only_the_engine_it_would_write(engines, tmp_path) -> None:
    """export's cleaning function names `<network>.plan`, whatever the manifest said."""
    from export.engines import stale_engine

    assert {stale_engine(tmp_path, n).name for n in NETWORKS} == {f"{n}.plan" for n in NETWORKS}
    assert all(stale_engine(tmp_path, n).parent == tmp_path for n in NETWORKS)


# ------------------------------------------------------------------------------ loading and listing


@pytest.mark.parametrize("name", ["../outside/depth.onnx", "ABS", "unet.onnx", "sub/depth.onnx", "", 7])
def test_a_manifest_naming_any_file_but_its_own_is_refused(engines, tmp_path, name) -> None:
    """Before: `--backend onnxruntime` loaded a graph the manifest named outside the folder; a
    graph named '/etc/passwd' was read by ONNX Runtime. Now the manifest is refused before any
    file it names is touched."""
    outside_graph = tmp_path / "outside" / "depth.onnx"
    outside_graph.parent.mkdir()
    shutil.copy(engines / "depth.onnx", outside_graph)
    name = str(outside_graph) if name == "ABS" else name
    folder = _tampered(engines, tmp_path / "eng", _set("depth", "onnx", "file", name))
    with pytest.raises(EngineError) as err:
        read_manifest(folder)
    msg = _one_line(str(err.value))
    assert "depth graph" in msg and "'depth.onnx'" in msg and f"p2v export --engines {folder} --overwrite" in msg


def test_onnxruntime_never_opens_etc_passwd(engines, tiny_models, tmp_path, monkeypatch) -> None:
    import onnxruntime as ort

    from p2v_fast.nets.runtime import make_backend

    opened: list[object] = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    folder = _tampered(engines, tmp_path / "eng", _set("depth", "onnx", "file", "/etc/passwd"))
    with pytest.raises(EngineError, match="/etc/passwd"):
        make_backend("onnxruntime", tiny_models, folder)
    assert not any("passwd" in str(p) for p in opened)


def test_a_graph_that_links_out_of_the_folder_is_not_loaded_or_listed(engines, tiny_models, tmp_path) -> None:
    """The names are right, but depth.onnx is a link to a graph elsewhere: refused on loading,
    and `p2v info` says so instead of 'usable here'."""
    from p2v_fast.nets.runtime import make_backend

    elsewhere = tmp_path / "elsewhere.onnx"
    shutil.copy(engines / "depth.onnx", elsewhere)
    folder = tmp_path / "eng"
    shutil.copytree(engines, folder)
    (folder / "depth.onnx").unlink()
    os.symlink(elsewhere, folder / "depth.onnx")
    with pytest.raises(EngineError) as err:
        make_backend("onnxruntime", tiny_models, folder)
    assert "leads outside" in _one_line(str(err.value)) and str(elsewhere) in str(err.value)
    rows = dict(describe_folder(folder, model="tiny"))
    assert "NOT USABLE: leads outside the folder" in rows["  depth"]
    assert "usable here" in rows["  unet"]
    # A link that stays inside the folder is the folder's own file.
    os.replace(folder / "depth.onnx", folder / "old")
    shutil.copy(engines / "depth.onnx", folder / "depth-real.onnx")
    os.symlink("depth-real.onnx", folder / "depth.onnx")
    assert check_files(read_manifest(folder), folder, "onnx") is None


def test_info_lists_no_file_outside_the_folder(engines, tmp_path) -> None:
    """Before: `p2v info` listed a graph the manifest named outside as usable, and an extra
    network naming /etc/hostname was stat'ed and its size printed."""
    outside_graph = tmp_path / "depth.onnx"
    shutil.copy(engines / "depth.onnx", outside_graph)
    a = _tampered(engines, tmp_path / "a", _set("depth", "onnx", "file", str(outside_graph)))

    def extra(data):
        data["networks"]["hostname"] = json.loads(json.dumps(data["networks"]["depth"]))
        _set("hostname", "onnx", "file", "/etc/hostname")(data)
        data["networks"]["hostname"]["onnx"]["bytes"] = os.stat("/etc/hostname").st_size

    b = _tampered(engines, tmp_path / "b", extra)
    for folder, needle in ((a, "depth graph"), (b, "networks p2v does not know ('hostname'")):
        r = p2v("info", "--engines", str(folder), terminal_width=400)
        assert r.exit_code == 0, r.output
        assert needle in " ".join(r.output.split()), r.output
        assert "usable here" not in r.output and "hostname 0.0 MB" not in r.output


def test_a_manifest_that_is_a_link_out_of_the_folder_is_not_read(engines, tmp_path) -> None:
    real = tmp_path / "real"
    shutil.copytree(engines, real)
    folder = tmp_path / "eng"
    shutil.copytree(engines, folder)
    (folder / "manifest.json").unlink()
    os.symlink(real / "manifest.json", folder / "manifest.json")
    with pytest.raises(EngineError, match="leads outside"):
        read_manifest(folder)


# ------------------------------------------------------------------------------ only known networks, size capped


def test_extra_networks_are_refused_before_any_session_opens(engines, tmp_path) -> None:
    """Before: 1,000 extra networks made an edit open 1,000 ONNX Runtime sessions (55 s, 4.6 GB)."""
    def many(data):
        for i in range(1000):
            data["networks"][f"extra{i}"] = data["networks"]["depth"]

    folder = _tampered(engines, tmp_path / "eng", many)
    with pytest.raises(EngineError) as err:
        read_manifest(folder)
    msg = _one_line(str(err.value))
    assert "p2v does not know ('extra0', 'extra1', 'extra2' and 997 more" in msg
    assert "it knows unet, vae_encoder, vae_decoder, depth" in msg


def test_a_manifest_larger_than_the_cap_is_not_parsed(engines, tmp_path, monkeypatch) -> None:
    from p2v_fast.nets.manifest import MAX_MANIFEST_BYTES

    folder = _tampered(engines, tmp_path / "eng", lambda d: d.update(padding="x" * MAX_MANIFEST_BYTES))
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed"))
    with pytest.raises(EngineError, match="larger than any manifest p2v writes"):
        read_manifest(folder)
    assert os.path.getsize(engines / "manifest.json") < MAX_MANIFEST_BYTES // 10  # the cap leaves room


@pytest.mark.parametrize("field", ["bytes", "key", "data_bytes"])
def test_an_artifact_record_of_the_wrong_type_is_corrupt(engines, tmp_path, field) -> None:
    folder = _tampered(engines, tmp_path / "eng", _set("unet", "onnx", field, [1] if field != "bytes" else "12"))
    with pytest.raises(EngineError, match="is corrupt"):
        read_manifest(folder)


# ------------------------------------------------------------------------------ messages (item 14)


def test_engines_that_name_a_file_or_a_foreign_folder_get_the_right_advice(tmp_path) -> None:
    """Before: `--engines afile` said 'does not exist', and `engines: /etc` advised
    `p2v export --out /etc` (exporting into a folder of other files)."""
    afile = _victim(tmp_path / "afile")
    with pytest.raises(EngineError) as err:
        read_manifest(afile)
    assert "is a file, not a folder" in _one_line(str(err.value)) and "does not exist" not in str(err.value)

    foreign = tmp_path / "etc"
    _victim(foreign / "passwd")
    with pytest.raises(EngineError) as err:
        read_manifest(foreign)
    msg = _one_line(str(err.value))
    assert "has no manifest.json" in msg and f"p2v export --engines {foreign}" not in msg
    assert "--out" not in msg and "a new or empty DIR" in msg

    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "missing"):
        with pytest.raises(EngineError) as err:
            read_manifest(folder)
        assert f"create it with `p2v export --engines {folder}`" in _one_line(str(err.value))
