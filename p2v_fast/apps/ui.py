"""`p2v ui`: the Gradio page a person opens to restyle a clip (the optional extra ``[ui]``).

The page is a form over :class:`~p2v_fast.apps.renders.Renderer`, which calls the library's entry
points; this module only lays out the page, turns its fields into a config and shows a job's
state. Each button is an API endpoint too (``/render``, ``/preview``, ``/caption``,
``/cancel``, ``/sample``), which is how the tests drive it with ``gradio_client``.

Safe by default: it binds to 127.0.0.1, uploads have a size limit, the page loads nothing
from the internet (no analytics, no version check, local fonts), and it serves only what it
handed out: the uploads, and copies of the outputs and previews it returned, all in Gradio's
upload cache under names made from their content (nothing of the output folder itself: not
the job records, the kept inputs, or a file someone else put there).
"""

# no `from __future__ import annotations`: Gradio reads the handlers' `gr.Request` annotation as an object

import errno
import ipaddress
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2v_fast.apps.renders import Renderer, RenderJob, UISettings
from p2v_fast.config import LATENT_UPDATES, RESIZES, SCHEDULES, EditConfig
from p2v_fast.errors import InputError, one_line

if TYPE_CHECKING:
    import gradio as gr

#: Seconds between the page's progress updates while a job runs.
POLL_S = 0.5
#: Gradio's share server (``--share``), probed before launching so an offline machine says so at once.
SHARE_SERVER = ("api.gradio.app", 443)
# (label, EditConfig field) of the form's options, in the order the handlers take them
OPTIONS = ("steps", "size", "resize", "max_frames", "guidance_scale", "latent_update", "update_weight", "schedule",
           "backend", "engines", "seed")
#: The sliders' ranges (EditConfig field -> the CLI's option, lowest, highest): the API can send
#: any value, and one past a slider's end is refused as the page would never send it.
SLIDERS = {"steps": ("--steps", 1, 100), "size": ("--size", 64, 1024), "guidance_scale": ("--guidance-scale", 1, 20)}
#: Where `p2v ui` reads USER:PASS when neither --auth nor --auth-file is given (so it is not in
#: ``ps``'s listing of the command line).
AUTH_ENV = "P2V_UI_AUTH"


def quiet_gradio(out_dir: Path) -> None:
    """Before Gradio is imported: no analytics or version check (nothing leaves the machine),
    uploads cached inside the output folder."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_TEMP_DIR", str(out_dir.resolve() / ".uploads"))
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def form_defaults(model: str) -> dict[str, Any]:
    """The form's starting values: the CLI's defaults, smaller for the tiny random-weight model
    (which is there to try the app offline, not for its pictures)."""
    d = EditConfig()
    values: dict[str, Any] = {k: getattr(d, k) for k in OPTIONS if k not in ("engines", "max_frames")}
    values["max_frames"] = 0
    if model == "tiny":
        values.update(size=128, steps=10, max_frames=8)
    return values


def _session(request: Any) -> str:
    return getattr(request, "session_hash", None) or "default"


def _prepare(renderer: Renderer, clip: str | None, prompt: str, source: str, options: tuple, *,
             preview: bool = False) -> tuple[EditConfig, Path, int]:
    """Config, input and frame count of a request (InputError, one line, on a bad one); nothing is
    copied or written for a refused request."""
    cfg = renderer.config(prompt=prompt or "", source_prompt=source, **dict(zip(OPTIONS, options, strict=True)))
    for key, (option, _, highest) in SLIDERS.items():
        if getattr(cfg, key) > highest:
            raise InputError(f"{option} is at most {highest} on this page; got {getattr(cfg, key)}")
    if preview:
        cfg = cfg.replace(max_frames=1)
    path = renderer.check_input(clip)
    return cfg, path, renderer.frames_of(cfg, path)


def _served(path: Path | str | None) -> str | None:
    """``path`` as the page hands it out: a copy in Gradio's upload cache, in a folder named by
    the file's hash (Gradio's own ``save_file_to_cache``, so Gradio does not copy it again).
    Gradio serves that cache, and nothing of the output folder is in its allowed paths."""
    if path is None:
        return None
    from gradio.processing_utils import save_file_to_cache
    from gradio.utils import get_upload_folder

    return str(save_file_to_cache(path, get_upload_folder()))


def _as_sent(component: Any) -> Any:
    """``component`` (a gr.Number or gr.Slider) whose value reaches the handler as the client sent
    it: Gradio's own preprocessing turns 2.7 into 3 for a whole-number field and fails with a
    traceback at "abc", NaN, 1e400 or null; the handler refuses those in one line, as the CLI does.
    (Set on the instance: a subclass of a Gradio component makes Gradio write a ``.pyi`` file
    beside the module that defines it.)"""
    component.preprocess = _unchanged
    return component


def _unchanged(payload: Any) -> Any:
    return payload


def _follow(job: RenderJob) -> Iterator[str]:
    """The job's report every :data:`POLL_S` seconds until it ends; the job is cancelled if the
    page goes away (Gradio closes the generator)."""
    try:
        while not job.wait(POLL_S):
            yield job.progress.report()
    finally:
        if not job.done.is_set():
            job.cancel.set()


def build_app(renderer: Renderer) -> "gr.Blocks":
    """The page. Jobs that use a device share one Gradio queue (``concurrency_id`` "device") with
    one slot per device, on top of the renderer's own pool of free devices; Cancel bypasses the
    queue."""
    import gradio as gr

    s = renderer.settings
    d = form_defaults(s.model)
    with gr.Blocks(title="p2v-fast", analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as app:
        gr.Markdown(f"## p2v-fast: restyle a clip from a text prompt\nPix2Video on Stable Diffusion 2 depth. "
                    f"Model `{s.model}`, outputs kept in `{renderer.out_dir}`.")
        with gr.Row():
            with gr.Column(scale=1):
                clip = gr.Video(label="Clip", sources=["upload"], elem_id="clip", height=260)
                sample = gr.Button("Use the sample clip", size="sm", elem_id="sample")
                prompt = gr.Textbox(label="Target prompt", value="a crochet swan on the lake", elem_id="prompt")
                with gr.Row():
                    source = gr.Textbox(label="Source prompt (empty: BLIP caption of frame 1)", scale=4,
                                        elem_id="source")
                    caption = gr.Button("Caption", size="sm", scale=1, elem_id="caption")
                with gr.Row():
                    preview = gr.Button("Preview anchor frame", elem_id="preview")
                    render = gr.Button("Render", variant="primary", elem_id="render")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                status = gr.Textbox(label="Status", lines=4, max_lines=8, interactive=False, elem_id="status")
                with gr.Accordion("Options", open=False):
                    with gr.Row():
                        steps = gr.Slider(*SLIDERS["steps"][1:], value=d["steps"], step=1, label="Steps",
                                          elem_id="steps")
                        size = gr.Slider(*SLIDERS["size"][1:], value=d["size"], step=64, label="Size (short side)",
                                         elem_id="size")
                    with gr.Row():
                        resize = gr.Radio(list(RESIZES), value=d["resize"], label="Resize", elem_id="resize")
                        frames = gr.Number(d["max_frames"], precision=0, minimum=0, label="Frames (0: all)",
                                           elem_id="frames")
                    with gr.Row():
                        guidance = gr.Slider(*SLIDERS["guidance_scale"][1:], value=d["guidance_scale"], step=0.5,
                                             label="Guidance", elem_id="guidance")
                        seed = gr.Number(d["seed"], precision=0, minimum=0, label="Seed", elem_id="seed")
                    with gr.Row():
                        update = gr.Radio(list(LATENT_UPDATES), value=d["latent_update"], label="Latent update",
                                          elem_id="latent-update")
                        weight = gr.Number(d["update_weight"], minimum=0, label="Update weight (delta at 512)",
                                           elem_id="update-weight")
                    with gr.Row():
                        schedule = gr.Radio(list(SCHEDULES), value=d["schedule"], label="Schedule", elem_id="schedule")
                        backend = gr.Dropdown(["torch", "onnxruntime", "tensorrt", "auto"], value=d["backend"],
                                              label="Backend")
                        engines = gr.Dropdown(renderer.engines_choices(), value="(none)",
                                              label=f"Engines folder (in {s.engines_root})")
            with gr.Column(scale=1):
                result = gr.Video(label="Result", interactive=False, elem_id="result", height=260, autoplay=True,
                                  loop=True)
                sbs = gr.Video(label="Side by side (input | edit)", interactive=False, elem_id="sbs", loop=True,
                               height=200)
                strip = gr.Image(label="Contact strip", interactive=False, type="filepath", elem_id="strip",
                                 height=160)
                anchor = gr.Image(label="Anchor frame preview", interactive=False, type="filepath",
                                  elem_id="anchor", height=160)
                numbers = gr.JSON(label="Numbers", elem_id="numbers", open=True)
                files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="files")
        options = [steps, size, resize, frames, guidance, update, weight, schedule, backend, engines, seed]
        for widget in (steps, size, frames, guidance, weight, seed):
            _as_sent(widget)
        form = [clip, prompt, source, *options]
        video_outputs = [status, result, sbs, strip, numbers, files]

        def on_render(clip_path, prompt_text, source_text, steps, size, resize, frames, guidance, update, weight,
                      schedule, backend, engines, seed, request: gr.Request):
            opts = (steps, size, resize, frames, guidance, update, weight, schedule, backend, engines, seed)
            try:
                cfg, path, n = _prepare(renderer, clip_path, prompt_text, source_text, opts)
            except InputError as exc:
                yield f"error: {exc}", None, None, None, None, None
                return
            job = renderer.start("render", _session(request), n, lambda p, slot: renderer.render(cfg, path, p, slot))
            for line in _follow(job):
                yield line, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            if job.error is not None:
                yield f"{job.message()}\n{job.progress.report()}", None, None, None, None, None
                return
            out = job.result
            done = f"done: {out.video.name}, {out.numbers['seconds_per_frame']:.2f} s/frame, " \
                   f"{out.numbers['unet_calls']} UNet calls, inversion " \
                   f"{'cache hit' if out.numbers['inversion_cache_hit'] else 'computed'}"
            yield (f"{done}\n{job.progress.report()}", _served(out.video), _served(out.side_by_side),
                   _served(out.strip), out.numbers, [_served(p) for p in out.files])

        def on_preview(clip_path, prompt_text, source_text, steps, size, resize, frames, guidance, update, weight,
                      schedule, backend, engines, seed, request: gr.Request):
            opts = (steps, size, resize, frames, guidance, update, weight, schedule, backend, engines, seed)
            try:
                cfg, path, n = _prepare(renderer, clip_path, prompt_text, source_text, opts, preview=True)
            except InputError as exc:
                yield f"error: {exc}", None
                return
            job = renderer.start("preview", _session(request), n, lambda p, slot: renderer.preview(cfg, path, p, slot))
            for line in _follow(job):
                yield line, gr.skip()
            if job.error is not None:
                yield f"{job.message()}\n{job.progress.report()}", None
                return
            png, seconds = job.result
            yield f"anchor frame previewed in {seconds:.1f} s: {png.name}", _served(png)

        def on_caption(clip_path, prompt_text, source_text, steps, size, resize, frames, guidance, update, weight,
                      schedule, backend, engines, seed, request: gr.Request):
            opts = (steps, size, resize, frames, guidance, update, weight, schedule, backend, engines, seed)
            try:
                cfg, path, _ = _prepare(renderer, clip_path, prompt_text or "-", "", opts, preview=True)
            except InputError as exc:
                return f"error: {exc}", gr.skip()
            job = renderer.start("caption", _session(request), 1, lambda p, slot: renderer.caption(cfg, path, p, slot))
            job.wait()
            if job.error is not None:
                return job.message(), gr.skip()
            return f"caption of frame 1: {job.result!r}", job.result

        def on_cancel(request: gr.Request):
            cancelled = renderer.cancel(_session(request))
            return "cancelling..." if cancelled else gr.skip()

        queue: dict[str, Any] = {"concurrency_limit": len(renderer.devices), "concurrency_id": "device"}  # 1 per device
        render.click(on_render, form, video_outputs, api_name="render", **queue)
        preview.click(on_preview, form, [status, anchor], api_name="preview", **queue)
        caption.click(on_caption, form, [status, source], api_name="caption", **queue)
        cancel.click(on_cancel, None, [status], api_name="cancel", queue=False)
        sample.click(lambda: _served(renderer.sample_clip()), None, [clip], api_name="sample", queue=False)
    return app


def parse_auth(text: str | None, source: str = "--auth") -> tuple[str, str] | None:
    """``USER:PASS`` as a pair; InputError (one line, naming ``source``) unless both parts are there."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise InputError(f"{source} must be USER:PASS (both non-empty)")
    return user, password


def read_auth(auth: str | None = None, auth_file: Path | None = None,
              environ: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """The login: ``--auth USER:PASS``, else the first line of ``--auth-file``, else
    :data:`AUTH_ENV`; None if none is given. The file and the variable keep the password out of
    the command line, which other users of the machine can read."""
    if auth is not None and auth_file is not None:
        raise InputError("give --auth or --auth-file, not both")
    if auth_file is not None:
        try:
            lines = auth_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--auth-file '{auth_file}': cannot read it ({one_line(exc)})") from None
        return parse_auth(lines[0].strip() if lines else "", f"the first line of --auth-file '{auth_file}'")
    if auth is None and environ.get(AUTH_ENV) is not None:
        return parse_auth(environ[AUTH_ENV].strip(), AUTH_ENV)
    return parse_auth(auth)


def check_host(host: str, port: int) -> str:
    """``--host`` as Gradio takes it (an IPv6 address in brackets), once it is known to be an
    address of this machine whose ``port`` is free; InputError (one line) otherwise."""
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if not name:
        raise InputError("--host is empty; give an address of this machine, e.g. 127.0.0.1 (this machine only) "
                         "or 0.0.0.0 (every interface)")
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
    except ValueError:
        addr = None
        if re.fullmatch(r"[0-9.]+", name):
            raise InputError(f"--host '{host}' is not an IPv4 address (four numbers 0-255)") from None
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", name):
            raise InputError(f"--host '{host}' is neither an IP address nor a host name") from None
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InputError(f"--host '{host}': cannot resolve it ({one_line(exc)})") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise InputError(f"port {port} on {host} is in use (another server, or another p2v ui); "
                                 f"pick another with --port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise InputError(f"--host '{host}' is not an address of this machine") from None
            raise InputError(f"cannot serve on {host} port {port}: {one_line(exc)}") from None
    return f"[{addr}]" if isinstance(addr, ipaddress.IPv6Address) else name


def _is_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def share_problem(server: tuple[str, int] = SHARE_SERVER, timeout: float = 5.0) -> str | None:
    """Why ``--share`` cannot work here (Gradio's share server unreachable), or None."""
    try:
        with socket.create_connection(server, timeout=timeout):
            return None
    except OSError as exc:
        return f"{server[0]}:{server[1]}: {one_line(exc)}"


def launch(settings: UISettings, *, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
           share: bool = False, on_line=print) -> None:
    """`p2v ui`: check the address, load the default runtime (so the first render does not wait
    for it), then serve the page until interrupted. A start refused on the way leaves no folder."""
    check_host(host, port)
    quiet_gradio(settings.out_dir)
    renderer = Renderer(settings)
    try:
        t0 = time.perf_counter()
        cfg = renderer.config(prompt="-", **form_defaults(settings.model))
        where = [str(renderer.runtime(cfg, slot).backend.device) for slot in range(len(renderer.devices))]
        on_line(f"models loaded in {time.perf_counter() - t0:.1f} s ({settings.model} on {', '.join(where)})")
        app, _ = serve(renderer, host=host, port=port, auth=auth, share=share, on_line=on_line)
    except BaseException:
        renderer.discard()
        raise
    try:
        app.block_thread()
    finally:
        app.close()


def serve(renderer: Renderer, *, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
          share: bool = False, on_line=print) -> tuple[Any, str]:
    """Serve the page in background threads; returns (the Gradio app, its local URL). ``app.close()``
    stops it."""
    server_name = check_host(host, port)
    quiet_gradio(renderer.out_dir)
    import gradio as gr

    if share:
        problem = share_problem()
        if problem is not None:
            on_line(f"warning: --share could not connect to Gradio's share server ({problem}); "
                    f"serving on this machine only")
            share = False
    if not _is_local(host) and auth is None:
        on_line(f"warning: serving on {host} without --auth: anyone who can reach this port can render")
    app = build_app(renderer)
    app.queue(default_concurrency_limit=1)
    try:
        _, url, share_url = app.launch(
            server_name=server_name, server_port=port, auth=auth, share=share, prevent_thread_lock=True, quiet=True,
            max_file_size=f"{renderer.settings.max_upload_mb}mb", ssr_mode=False, show_error=False,
            theme=gr.themes.Default(), footer_links=["api"])
    except OSError as exc:
        raise InputError(f"cannot serve on {host}:{port}: {exc}") from None
    on_line(f"p2v ui: {url}" + (f" (public: {share_url})" if share_url else ""))
    return app, url
