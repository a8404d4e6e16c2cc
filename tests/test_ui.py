"""`p2v ui` through its API (gradio_client), on one in-process server with the tiny model:
a render (checked against the library's own edit), a preview, bad inputs as the CLI's one
line, a cancel that leaves no partial file, the upload limit and the CLI's option checks."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import free_port, one_line_error, p2v

pytest.importorskip("gradio", reason="the [ui] extra (gradio) is not installed")
gradio_client = pytest.importorskip("gradio_client", reason="the [ui] extra (gradio_client) is not installed")

from p2v_fast.apps.renders import Renderer, UISettings  # noqa: E402

# the form's fields after (clip, target prompt, source prompt), as the page orders them
DEFAULTS = {"steps": 2, "size": 64, "resize": "crop", "frames": 3, "guidance": 7.5, "update": "autograd",
            "weight": 100.0, "schedule": "wavefront", "backend": "torch", "engines": "(none)", "seed": 0}


# their EditConfig names, where they differ
FIELDS = {"frames": "max_frames", "guidance": "guidance_scale", "update": "latent_update", "weight": "update_weight"}


def config_of(renderer: Renderer, prompt: str = "a red car", source: str = "a sample clip", **options):
    """The EditConfig the page makes of :func:`form`'s fields."""
    values = {**DEFAULTS, **options}
    return renderer.config(prompt=prompt, source_prompt=source, **{FIELDS.get(k, k): v for k, v in values.items()})


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path):
    from p2v_fast.apps.ui import serve

    root = tmp_path_factory.mktemp("ui")
    (root / "engines" / "sd2-64").mkdir(parents=True)
    renderer = Renderer(UISettings(out_dir=root / "out", model="tiny", threads=1, engines_root=root / "engines",
                                   max_upload_mb=1))
    with pytest.MonkeyPatch.context() as env:  # serve() sets Gradio's environment: restored after the module
        for name in ("GRADIO_ANALYTICS_ENABLED", "GRADIO_TEMP_DIR", "HF_HUB_DISABLE_TELEMETRY"):
            env.delenv(name, raising=False)
        app, url = serve(renderer, port=free_port(), on_line=lambda m: None)
        client = gradio_client.Client(url, verbose=False, download_files=str(root / "downloads"))
        try:
            yield SimpleNamespace(renderer=renderer, url=url, out=renderer.out_dir, root=root, client=client)
        finally:
            app.close()


def form(clip, prompt: str = "a red car", source: str = "a sample clip", **options) -> list:
    values = {**DEFAULTS, **options}
    clip = gradio_client.handle_file(str(clip)) if clip is not None else None
    return [clip, prompt, source, *(values[k] for k in DEFAULTS)]


@pytest.fixture(scope="module")
def sample(ui) -> Path:
    got = ui.client.predict(api_name="/sample")
    return Path(got["video"] if isinstance(got, dict) else got)


def outputs_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


def test_render_is_the_library_edit_and_models_stay_loaded(ui, sample):
    from p2v_fast import edit_video
    from p2v_fast.apps.batch import sidecar_path
    from p2v_fast.media.reader import probe

    job = ui.client.submit(*form(sample), api_name="/render")
    status, video, sbs, strip, numbers, files = job.result(timeout=300)
    seen = [o[0] for o in job.outputs()]
    assert status.startswith("done: "), status
    assert any(s.startswith(("inversion:", "edit:", "encode + depth:")) for s in seen[:-1]), seen  # live progress
    out = Path(numbers["output"])
    assert out.parent == ui.out and out.is_file()
    for name in (f"{out.stem}.side-by-side.mp4", f"{out.stem}.strip.png", f"{out.stem}.json"):
        assert (ui.out / name).is_file(), name
    assert probe(out).n_frames == 3 and Path(video).is_file() and Path(sbs).is_file() and Path(strip).is_file()
    assert {Path(f).name for f in files} >= {out.name, f"{out.stem}.side-by-side.mp4", f"{out.stem}.strip.png"}
    record = json.loads(sidecar_path(out).read_text())  # the job record, as p2v batch writes it
    assert record["spec"]["prompt"] == "a red car" and record["frames"] == 3
    assert numbers["unet_calls"] > 0 and numbers["seconds_per_frame"] > 0 and not numbers["inversion_cache_hit"]

    # the same edit straight through the library: the same frames, the same UNet calls
    cfg = config_of(ui.renderer)
    direct = edit_video(cfg, sample, ui.root / "direct.mp4", runtime=ui.renderer.runtime(cfg))
    assert record["frames_sha256"] == direct.frames_sha256
    assert numbers["unet_calls"] == direct.stats.unet_calls

    # again, other edit-only options: the inversion is a cache hit, the models were loaded once
    status2, *_, numbers2, _ = ui.client.predict(*form(sample, prompt="a blue car", seed=3), api_name="/render")
    assert numbers2["inversion_cache_hit"] and "inversion: cache hit" in status2, status2
    assert Path(numbers2["output"]) != out and out.is_file()  # a new file; the first is kept
    assert len(ui.renderer._workers) == 1 and len(ui.renderer._workers[0]._runtimes) == 1


def test_preview_writes_the_anchor_frame(ui, sample):
    from PIL import Image

    status, png = ui.client.predict(*form(sample, frames=0), api_name="/preview")
    assert status.startswith("anchor frame previewed in "), status
    kept = [p for p in (ui.out / "previews").iterdir() if p.suffix == ".png" and p.stat().st_size > 0]
    assert len(kept) == 1 and kept[0].name in status
    with Image.open(png) as im, Image.open(kept[0]) as kept_im:
        assert im.size == kept_im.size and min(im.size) == 64


def test_caption_fills_the_source_prompt(ui, sample):
    from p2v_fast.media.clip_selection import select_clip
    from p2v_fast.weights.caption import caption_frame

    status, source = ui.client.predict(*form(sample, source=""), api_name="/caption")
    cfg = config_of(ui.renderer, prompt="-", source="", frames=1)
    first = next(iter(select_clip(sample, cfg).frames()))
    assert source == caption_frame(ui.renderer.runtime(cfg).models, first)  # BLIP's, on the first working frame
    assert status == f"caption of frame 1: {source!r}"


def test_one_render_at_a_time_on_the_device(ui, sample):
    """Two pages render at once: the second waits in the queue, the device runs one edit at a time."""
    other = gradio_client.Client(ui.url, verbose=False, download_files=str(ui.root / "downloads2"))
    jobs = [c.submit(*form(sample, prompt=p), api_name="/render") for c, p in ((ui.client, "a cat"),
                                                                                (other, "a dog"))]
    numbers = [j.result(timeout=300)[4] for j in jobs]
    (_, f1), (s2, _) = sorted((n["started"], n["finished"]) for n in numbers)
    assert f1 <= s2, numbers  # no overlap
    assert all(n["device"] == "cpu" for n in numbers)


def test_a_pool_of_two_devices_runs_two_renders_at_once(ui, sample, tmp_path):
    """With two devices (two CPU slots here; each GPU on a machine with several) two renders run
    together, each on its own runtime, loaded once per device."""
    from p2v_fast.apps.renders import devices_for

    assert devices_for("cpu") == ("cpu",) and devices_for("cuda:1") == ("cuda:1",)
    two = Renderer(UISettings(out_dir=tmp_path / "out", model="tiny", threads=1, devices=("cpu", "cpu")))
    cfg = config_of(two, prompt="a cat")
    clip = two.take_input(sample)
    for slot in (0, 1):  # as `p2v ui` does before it serves
        two.runtime(cfg, slot)
    jobs = [two.start("render", f"s{i}", 3, lambda p, slot: two.render(cfg, clip, p, slot)) for i in range(2)]
    for job in jobs:
        assert job.wait(300) and job.error is None, job.message()
    (_, f1), (s2, _) = sorted((j.result.numbers["started"], j.result.numbers["finished"]) for j in jobs)
    assert s2 < f1  # they overlapped
    assert len({id(w.runtime(cfg)) for w in two._workers}) == 2
    assert len({j.result.video for j in jobs}) == 2


def test_bad_inputs_are_the_clis_one_line(ui, sample, tmp_path):
    before, inputs = outputs_in(ui.out), outputs_in(ui.out / "inputs")
    status, *rest = ui.client.predict(*form(None), api_name="/render")
    assert status == "error: no clip: upload a video or press 'Use the sample clip'" and rest == [None] * 5

    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video\n")
    status, *_ = ui.client.predict(*form(bad), api_name="/render")
    cli = p2v("edit", str(bad), "a red car", "--model", "tiny", "--size", "64")
    assert status == one_line_error(cli).replace(str(bad), status.split("'")[1]), (status, cli.stderr)

    status, *_ = ui.client.predict(*form(sample, size=96), api_name="/render")
    cli = p2v("edit", str(sample), "a red car", "--model", "tiny", "--size", "96")
    assert status == one_line_error(cli) == "error: --size must be a positive multiple of 64; got 96"

    status, *_ = ui.client.predict(*form(sample, prompt="  "), api_name="/preview")
    assert status.startswith("error: the prompt is empty"), status
    status, *_ = ui.client.predict(*form(sample, engines="sd2-64", backend="onnxruntime"), api_name="/render")
    assert status.startswith("error: ") and "\n" not in status.split("\n")[0], status
    assert outputs_in(ui.out) == before  # nothing written by a refused request
    assert outputs_in(ui.out / "inputs") == inputs  # nor its upload copied in

    with pytest.raises(gradio_client.exceptions.AppError, match=r"not in the list of choices"):
        ui.client.predict(*form(sample, engines="../sd2-65"), api_name="/render")  # Gradio: a folder it did not list


def test_uploads_over_the_limit_are_refused(ui, tmp_path):
    import httpx

    big = tmp_path / "big.mp4"
    big.write_bytes(b"\0" * (2 << 20))  # the app takes 1 MB here
    with open(big, "rb") as f:
        r = httpx.post(f"{ui.url.rstrip('/')}/gradio_api/upload", files={"files": ("big.mp4", f, "video/mp4")})
    assert r.status_code == 413, (r.status_code, r.text)
    assert not list((ui.out / "inputs").glob("*big*"))
    from p2v_fast.errors import InputError

    with pytest.raises(InputError, match=r"^the clip is 2 MB; this app takes at most 1 MB"):
        ui.renderer.take_input(big)  # and the renderer's own check, for a file that got past it


def test_cancel_stops_the_render_and_leaves_no_partial_file(ui, sample):
    before = outputs_in(ui.out)
    # sequential: frame 1 is written while frame 2 is edited, so a partial video exists when cancelled
    job = ui.client.submit(*form(sample, steps=20, frames=8, schedule="sequential", update="off"),
                           api_name="/render")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = [o[0] for o in job.outputs()]
        if any(s.startswith("edit: ") and float(s.split()[1].split("/")[0]) >= 2 for s in lines):
            break
        assert not job.done(), lines
        time.sleep(0.1)
    partial = [p.name for p in ui.out.iterdir() if ".partial." in p.name]
    assert partial, outputs_in(ui.out)  # the video is being written: cancelling now has something to delete
    assert ui.client.predict(api_name="/cancel") == "cancelling..."
    status, video, *_ = job.result(timeout=120)
    assert status.startswith("cancelled; no partial output was kept"), status
    assert video is None
    assert outputs_in(ui.out) == before, outputs_in(ui.out) - before  # no video, strip, report or temp file
    # the page going away (Gradio cancels the request, which closes its generator) cancels it too
    job = ui.client.submit(*form(sample, steps=20, frames=8, schedule="sequential", update="off", seed=1),
                           api_name="/render")
    while not any(o[0].startswith("edit: ") for o in job.outputs()):
        assert not job.done() and time.monotonic() < deadline + 120
        time.sleep(0.1)
    assert [p for p in ui.out.iterdir() if ".partial." in p.name]
    assert job.cancel()
    deadline = time.monotonic() + 60
    while outputs_in(ui.out) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert outputs_in(ui.out) == before, outputs_in(ui.out) - before
    # the device is free again: the next render runs
    status, *_ = ui.client.predict(*form(sample), api_name="/render")
    assert status.startswith("done: "), status


def test_renderer_keeps_user_text_out_of_paths(ui, tmp_path):
    from p2v_fast.errors import InputError

    r: Renderer = ui.renderer
    assert r.engines_choices() == ["(none)", "sd2-64"]
    assert r.engines_path("sd2-64") == ui.root / "engines" / "sd2-64"
    for name in ("..", "../engines", "/etc", "sd2-64/.."):
        with pytest.raises(InputError, match="is not one of the folders"):
            r.engines_path(name)
    upload = tmp_path / "../../x y;rm -rf.mp4"
    upload.resolve().write_bytes(b"x")
    kept = r.take_input(upload.resolve())
    assert kept.parent == ui.out / "inputs" and kept.name.endswith("-x-y-rm-rf.mp4")


def test_share_problem_and_cli_option_checks(tmp_path):
    from p2v_fast.apps.ui import parse_auth, share_problem

    port = free_port()  # closed now
    assert "refused" in (share_problem(("127.0.0.1", port), timeout=2) or "").lower()
    assert parse_auth("me:pw:x") == ("me", "pw:x")
    line = one_line_error(p2v("ui", "--auth", "nopass"))
    assert line == "error: --auth must be USER:PASS (both non-empty)"
    assert "--port must be between 1 and 65535" in one_line_error(p2v("ui", "--port", "0"))
    (tmp_path / "f").write_text("")
    assert "is a file, not a folder" in one_line_error(p2v("ui", "--out", str(tmp_path / "f")))


def test_the_page_serves_only_what_it_handed_out(ui, sample):
    """The outputs, previews and uploads it returned, as copies in Gradio's upload cache; nothing
    of the output folder itself: not an output by its own path, its job record (absolute server
    paths), a kept input, or a file someone else put there."""
    import httpx

    from p2v_fast.apps.batch import sidecar_path

    status, video, _, _, numbers, files = ui.client.predict(*form(sample, prompt="a served car", frames=2),
                                                             api_name="/render")
    assert status.startswith("done: "), status
    out = Path(numbers["output"])
    assert Path(video).read_bytes() == out.read_bytes()  # fetched through the page
    assert {Path(f).name for f in files} >= {out.name, f"{out.stem}.json"}
    (ui.out / "secret.txt").write_text("not p2v's\n")
    try:
        kept = next(p for p in (ui.out / "inputs").iterdir() if p.is_file())
        for path in (out, sidecar_path(out), out.with_suffix(".json"), kept, ui.out / "secret.txt",
                     ui.out / ".p2v-ui"):
            r = httpx.get(f"{ui.url.rstrip('/')}/gradio_api/file={path}")
            assert r.status_code == 403, (path.name, r.status_code)
    finally:
        (ui.out / "secret.txt").unlink()


def call_raw(ui, api: str, clip: Path, **raw: str) -> list:
    """``api``'s final output for the form with ``raw`` fields given as JSON text (NaN, 1e400:
    what gradio_client will not send), through Gradio's HTTP API."""
    import httpx

    base = ui.url.rstrip("/")
    with open(clip, "rb") as f:
        (path,) = httpx.post(f"{base}/gradio_api/upload", files={"files": (clip.name, f, "video/mp4")}).json()
    fields = [json.dumps(v) for v in form(None)[1:]]
    for name, text in raw.items():
        fields[2 + list(DEFAULTS).index(name)] = text
    clip_data = json.dumps({"path": path, "meta": {"_type": "gradio.FileData"}})
    body = f'{{"data": [{clip_data}, {", ".join(fields)}]}}'
    event = httpx.post(f"{base}/gradio_api/call{api}", content=body, headers={"content-type": "application/json"})
    stream = httpx.get(f"{base}/gradio_api/call{api}/{event.json()['event_id']}", timeout=120).text
    last = stream.split("event: ")[-1]
    assert last.startswith("complete"), stream[-500:]
    return json.loads(last.split("data: ", 1)[1])


@pytest.mark.parametrize(("field", "raw", "line"), [
    ("frames", '"abc"', "error: --max-frames must be a whole number; got 'abc'"),
    ("frames", "NaN", "error: --max-frames must be a whole number; got nan"),
    ("frames", "2.5", "error: --max-frames must be a whole number; got 2.5"),
    ("seed", "1e400", "error: --seed must be a whole number; got inf"),
    ("steps", "null", "error: --steps must be a whole number; got None"),
    ("steps", "2.7", "error: --steps must be a whole number; got 2.7"),
    ("steps", "101", "error: --steps is at most 100 on this page; got 101"),
    ("size", '"64"', "error: --size must be a whole number; got '64'"),
    ("guidance", '"x"', "error: --guidance-scale must be a number; got 'x'"),
    ("guidance", "NaN", "error: --guidance-scale must be a finite number from 1 to 100; got nan"),  # EditConfig's
])
def test_api_values_the_widgets_cannot_send_are_one_line(ui, sample, field, raw, line):
    before, inputs = outputs_in(ui.out), outputs_in(ui.out / "inputs")
    for api in ("/render", "/preview"):
        status, *rest = call_raw(ui, api, sample, **{field: raw})
        assert status == line, (api, status)
        assert all(r is None for r in rest)
    assert outputs_in(ui.out) == before and outputs_in(ui.out / "inputs") == inputs


def test_status_does_not_echo_a_huge_prompt():
    import threading

    from p2v_fast.apps.renders import RenderProgress

    progress = RenderProgress(3, threading.Event())
    progress.log("warning: the target prompt is longer than CLIP's 77 tokens; this part is dropped: "
                 + repr("a " * 500_000))
    report = progress.report()
    assert len(report) < 500 and report.endswith("(1,000,084 characters)"), report[-200:]


def test_an_upload_is_copied_in_only_for_a_finished_render(tmp_path, sample):
    """A render's clip is kept in inputs/ (its job record names it); a render that fails or is
    cancelled takes its copy away again, unless a finished render or a running one uses it."""
    from p2v_fast.apps.renders import Renderer

    r = Renderer(UISettings(out_dir=tmp_path / "out", model="tiny"))
    upload = tmp_path / "up.mp4"
    upload.write_bytes(sample.read_bytes())
    assert r.check_input(upload) == upload and outputs_in(r.out_dir / "inputs") == set()
    with pytest.raises(RuntimeError), r._kept_input(upload) as kept:
        assert kept.parent == r.out_dir / "inputs" and kept.is_file()
        raise RuntimeError("the render failed")
    assert not kept.exists()
    with r._kept_input(upload) as first:  # two renders of one clip; the second fails, the first finishes
        with pytest.raises(RuntimeError), r._kept_input(upload) as second:
            assert second == first
            raise RuntimeError("the render failed")
        assert first.is_file()
    with pytest.raises(RuntimeError), r._kept_input(upload):
        raise RuntimeError("a later failure does not take a finished render's input")
    assert first.is_file()


def test_an_out_folder_with_other_files_is_refused(tmp_path):
    from p2v_fast.apps.renders import MARKER, Renderer
    from p2v_fast.errors import InputError

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("key\n")
    (home / "notes.txt").write_text("mine\n")
    with pytest.raises(InputError, match=r"^--out '.*home' holds files p2v ui did not make \('.ssh' and 1 more\); "):
        Renderer(UISettings(out_dir=home, model="tiny"))
    line = one_line_error(p2v("ui", "--out", str(home), "--model", "tiny",
                                                   "--port", str(free_port())))
    assert "holds files p2v ui did not make" in line
    assert sorted(p.name for p in home.iterdir()) == [".ssh", "notes.txt"]  # nothing made there

    # a folder an earlier p2v ui made (no marker yet) is taken, and marked; a new one is marked
    old = tmp_path / "old"
    for sub in ("inputs", "previews"):
        (old / sub).mkdir(parents=True)
    for name in ("a.cat.20260101-000000.mp4", ".a.cat.20260101-000000.mp4.p2v-job.json", "a.cat.json"):
        (old / name).write_text("")
    Renderer(UISettings(out_dir=old, model="tiny"))
    assert (old / MARKER).is_file()
    (old / "notes.txt").write_text("added later\n")
    Renderer(UISettings(out_dir=old, model="tiny"))  # marked: the app's folder, whatever is added
    new = Renderer(UISettings(out_dir=tmp_path / "new" / "out", model="tiny"))
    assert (new.out_dir / MARKER).is_file()
    new.discard()
    assert not (tmp_path / "new").exists()


def test_a_refused_start_leaves_no_folder(tmp_path):
    out = tmp_path / "a" / "out"
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(p2v("ui", "--out", str(out), "--model", str(empty_model),
                                                       "--port", str(port)))
        assert line == f"error: port {port} on 127.0.0.1 is in use (another server, or another p2v ui); " \
                       f"pick another with --port"
    assert not (tmp_path / "a").exists()
    res = p2v("ui", "--out", str(out), "--model", str(empty_model), "--port", str(free_port()))
    one_line_error(res)  # the model does not load, after the folder was made
    assert not (tmp_path / "a").exists()


def test_hosts(tmp_path):
    from p2v_fast.apps.ui import check_host, serve
    from p2v_fast.errors import InputError

    port = free_port()
    assert check_host("127.0.0.1", port) == "127.0.0.1" and check_host("localhost", port) == "localhost"
    assert check_host(" 0.0.0.0 ", port) == "0.0.0.0"
    for host, message in (("", "--host is empty; give an address of this machine"),
                          ("256.1.1.1", "--host '256.1.1.1' is not an IPv4 address"),
                          ("1.2.3", "--host '1.2.3' is not an IPv4 address"),
                          ("a b", "--host 'a b' is neither an IP address nor a host name"),
                          ("192.0.2.123", "--host '192.0.2.123' is not an address of this machine")):
        with pytest.raises(InputError, match=f"^{message}"):
            check_host(host, port)
        # a model that passes the start-up checks (a missing folder is refused before the host)
        line = one_line_error(p2v("ui", "--host", host, "--out", str(tmp_path / "out"),
                                  "--model", "tiny", "--port", str(port)))
        assert line.startswith(f"error: {message}"), line
        assert not (tmp_path / "out").exists()

    try:
        with socket.socket(socket.AF_INET6) as s6:
            s6.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    import httpx

    assert check_host("::1", port) == check_host("[::1]", port) == "[::1]" and check_host("::", port) == "[::]"
    renderer = Renderer(UISettings(out_dir=tmp_path / "v6", model="tiny"))
    app6, url = serve(renderer, host="::1", port=port, on_line=lambda m: None)
    try:
        assert url == f"http://[::1]:{port}/"
        assert httpx.get(url).status_code == 200
    finally:
        app6.close()


def test_auth_from_a_file_or_the_environment(tmp_path, monkeypatch):
    import httpx

    from p2v_fast.apps.ui import AUTH_ENV, read_auth, serve
    from p2v_fast.errors import InputError

    secret = tmp_path / "auth"
    secret.write_text("me:s3cret pw\n")
    monkeypatch.delenv(AUTH_ENV, raising=False)
    assert read_auth(None, secret) == ("me", "s3cret pw") and read_auth() is None
    assert read_auth(None, None, {AUTH_ENV: "you:pw"}) == ("you", "pw")
    assert read_auth("cli:pw", None, {AUTH_ENV: "you:pw"}) == ("cli", "pw")
    (tmp_path / "bad").write_text("nopass\n")
    for args, message in (((None, tmp_path / "bad"), "the first line of --auth-file '.*bad' must be USER:PASS"),
                          (("a:b", secret), "give --auth or --auth-file, not both"),
                          ((None, tmp_path / "missing"), "--auth-file '.*missing': cannot read it")):
        with pytest.raises(InputError, match=f"^{message}"):
            read_auth(*args)
    with pytest.raises(InputError, match=f"^{AUTH_ENV} must be USER:PASS"):
        read_auth(None, None, {AUTH_ENV: "x"})
    line = one_line_error(p2v("ui", "--auth-file", str(tmp_path / "missing")))
    assert "cannot read it" in line
    monkeypatch.setenv(AUTH_ENV, "nopass")
    assert one_line_error(p2v("ui")) == f"error: {AUTH_ENV} must be USER:PASS (both non-empty)"

    renderer = Renderer(UISettings(out_dir=tmp_path / "out", model="tiny"))
    page, url = serve(renderer, port=free_port(), auth=read_auth(None, secret), on_line=lambda m: None)
    try:
        login = f"{url.rstrip('/')}/login"
        assert httpx.post(login, data={"username": "me", "password": "wrong"}).status_code >= 400
        assert httpx.post(login, data={"username": "me", "password": "s3cret pw"}).status_code == 200
    finally:
        page.close()
