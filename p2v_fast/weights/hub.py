"""Loading from the Hugging Face hub or a local folder, with one-line errors.

A model argument is a local folder (used as it is) or a hub id (fetched, or read from the hub
cache when offline). Every failure a user can cause (no network, no such repo, a gated repo, an
incomplete folder) becomes one :class:`~p2v_fast.errors.ModelLoadError` line that says what to do.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from p2v_fast.errors import ModelLoadError, one_line

#: Where the trained small pipeline ``mini`` ships in the package (the one place that says so;
#: torch-free, for the start-up checks and the memory estimate too).
MINI_FOLDER = Path(__file__).resolve().with_name("mini")

#: Seconds to wait for the hub before declaring it unreachable.
HUB_TIMEOUT_S = 10.0

#: Inside :func:`one_probe_per_repo`: the repos the hub has answered for (else None: every probe asks).
_answered: set[str] | None = None


@contextlib.contextmanager
def one_probe_per_repo() -> Iterator[None]:
    """Within: the hub is asked about a repo once (a command's early check, then its loader)."""
    global _answered
    outer, _answered = _answered, set() if _answered is None else _answered
    try:
        yield
    finally:
        _answered = outer


def looks_like_path(model: str) -> bool:
    """True for strings meant as a folder: ``./x``, ``/x``, ``~/x``, ``a/b/c``, ``a\\b``.

    A plain ``owner/name`` is read as a hub id even though it contains ``/``.
    """
    if model.startswith((".", "/", "~")):
        return True
    if any(sep and sep != "/" and sep in model for sep in (os.sep, os.altsep)):
        return True
    return "/" in model and not looks_like_repo_id(model)


def looks_like_repo_id(model: str) -> bool:
    """``owner/name`` with hub-legal characters and no path-only syntax."""
    import re

    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*", model) is not None


def check_model_source(model: str, named: tuple[str, ...] = ("tiny", "mini")) -> None:
    """ModelLoadError (one line) unless ``model`` can name a model: one of ``named`` (the
    package's own sets), an existing folder or a hub id (owner/name). Only the string and the
    file system are asked (nothing loads, nothing is fetched), so a command refuses a bad
    --model before it loads the networks' libraries."""
    if model in named:
        return
    path = Path(model).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ModelLoadError(f"model '{model}' is a file, not a model folder or hub id")
    if looks_like_path(model):
        raise ModelLoadError(f"model folder '{model}' does not exist")
    if not looks_like_repo_id(model):
        raise ModelLoadError(f"model '{model}' is neither a local folder nor a Hugging Face repo id (owner/name); "
                             f"pass a hub id, a local folder or {' or '.join(repr(n) for n in named)}")


def _hub_offline() -> bool:
    val = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if val in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old/new huggingface_hub
        return False


def _not_cached_message(repo_id: str, instead: str = "use --model tiny", what: str = "model") -> str:
    """One line: what is missing (with its size when the catalog knows it), why it cannot be
    fetched now, and the ways around it."""
    from p2v_fast.weights.catalog import fetch_hint, label

    why = "offline mode (HF_HUB_OFFLINE) is on" if _hub_offline() else "the hub cannot be reached"
    return (
        f"{what} {label(repo_id)} is not in the local Hugging Face cache and {why}; {fetch_hint(repo_id)}, "
        f"pass a local folder, or {instead}"
    )


def hub_cache() -> Path:
    """The Hugging Face hub cache folder (HF_HUB_CACHE, or HF_HOME/hub, or ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_bytes(repo_id: str) -> int:
    """Bytes of ``repo_id`` already in the hub cache (finished and partial files)."""
    blobs = hub_cache() / ("models--" + repo_id.replace("/", "--")) / "blobs"
    return sum(f.stat().st_size for f in blobs.glob("*") if f.is_file()) if blobs.is_dir() else 0


def notify(line: str) -> None:
    """A line for the user on stderr (what is about to be downloaded)."""
    print(line, file=sys.stderr, flush=True)


def check_disk(what: str, folder: Path, needed: int) -> None:
    """ModelLoadError, one line, unless ``needed`` more bytes fit on ``folder``'s disk (with
    1 % and 100 MB to spare)."""
    import shutil

    from p2v_fast.text import size_text

    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed * 1.01 + 100e6 > free:
        raise ModelLoadError(f"{what} does not fit: {size_text(needed)} to download into {folder}, "
                             f"{size_text(free)} free there; free some space or set HF_HOME to a folder on a "
                             "larger disk")


def before_download(repo_id: str) -> None:
    """Say what is about to be fetched and how big it is, after checking that it fits."""
    from p2v_fast.text import size_text
    from p2v_fast.weights.catalog import known, label

    entry, cache, have = known(repo_id), hub_cache(), cached_bytes(repo_id)
    if entry is not None:
        check_disk(f"model {label(repo_id)}", cache, max(entry.size - have, 0))
        there = f", {size_text(have)} of it already there" if have else ""
        notify(f"downloading {label(repo_id)} into {cache}{there}, once (`p2v download {entry.group}` fetches it "
               "ahead of time; docs/models.md)")
    else:
        notify(f"downloading model '{repo_id}' into {cache}, once")


def snapshot(repo_id: str) -> Path:
    """Fetch what p2v loads of ``repo_id`` into the hub cache (the catalog's files for a known
    repo; huggingface_hub resumes an interrupted download, with progress bars) and return the
    snapshot folder. The loaders fetch anything else they want themselves."""
    from huggingface_hub import snapshot_download

    from p2v_fast.weights.catalog import known

    entry = known(repo_id)
    patterns = list(entry.patterns) if entry is not None else None
    return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=HUB_TIMEOUT_S))


def _probe_hub(repo_id: str, instead: str = "use --model tiny", what: str = "model",
               unreachable: str | None = None) -> None:
    """Fail fast, with one line, when the hub is unreachable (``unreachable``: that line instead of
    "not in the cache") or the repo does not exist."""
    if _answered is not None and repo_id in _answered:
        return
    from huggingface_hub import model_info
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    try:
        model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ModelLoadError(
            f"model '{repo_id}' is gated on the Hugging Face hub; accept its licence and log "
            "in (hf auth login), or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"model '{repo_id}' was not found on the Hugging Face hub (check the id, or log in "
            "if it is private), and it is not a local folder"
        ) from None
    except HFValidationError:
        raise ModelLoadError(f"model '{repo_id}' is neither a local folder nor a valid Hugging Face repo id") from None
    except Exception:
        raise ModelLoadError(unreachable or _not_cached_message(repo_id, instead, what)) from None
    if _answered is not None:
        _answered.add(repo_id)


def from_hub(repo_id: str, load: Callable[[bool], Any], instead: str = "use --model tiny") -> Any:
    """Run ``load(local_files_only)``: from the cache first, then online if reachable (one
    probe with a short timeout, so an offline machine fails at once instead of retrying for
    half a minute). ``instead``: the way around a model that cannot be had, for the error."""
    if not looks_like_repo_id(repo_id):
        raise ModelLoadError(
            f"model '{repo_id}' is neither a local folder nor a Hugging Face repo id (owner/name); "
            "pass a hub id, a local folder or 'tiny'"
        )
    try:
        return load(True)
    except ModelLoadError:
        raise
    except Exception:
        pass  # not (fully) cached: try the hub below
    if _hub_offline():
        raise ModelLoadError(_not_cached_message(repo_id, instead))
    _probe_hub(repo_id, instead)
    before_download(repo_id)
    try:
        from p2v_fast.weights.catalog import known

        if known(repo_id) is not None:
            snapshot(repo_id)  # only the files the catalog names, then the loader finds them cached
        return load(False)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not download model '{repo_id}': {one_line(exc)}") from None


def load_from_hub_or_folder(model: str, load: Callable[[str, bool], Any], instead: str) -> Any:
    """``load(source, local_files_only)`` for a local folder (as is) or a hub id (the cache first,
    then the hub if it answers; see :func:`from_hub`). Every failure is one ModelLoadError line."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        try:
            return load(str(folder), True)
        except Exception as exc:
            raise ModelLoadError(f"could not load '{model}': {one_line(exc)}; {instead}") from None
    if looks_like_path(model):
        raise ModelLoadError(f"model folder '{model}' does not exist; {instead}")
    return from_hub(model, lambda local_only: load(model, local_only), instead)


def fetch_url_file(url: str, folder: Path, what: str, instead: str, timeout: float = HUB_TIMEOUT_S) -> Path:
    """The file ``url`` names, from ``folder`` (a download cache such as torch hub's) or
    downloaded into it. Offline (HF_HUB_OFFLINE) or when the host does not answer within
    ``timeout`` seconds: one ModelLoadError line at once, never a long wait."""
    import shutil
    import tempfile
    import urllib.request
    from urllib.parse import urlparse

    target = url_target(url, folder)
    if target.is_file():
        return target
    host = urlparse(url).netloc or url
    check_url_offline(url, folder, what, instead)
    from p2v_fast.weights.catalog import known

    entry = known(url)
    if entry is not None:
        check_disk(f"{what} ({entry.label()})", folder, entry.size)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as response:
            notify(f"downloading {entry.label() if entry else what} from {host} into {folder}, once"
                   + (f" (`p2v download {entry.group}` fetches it ahead of time)" if entry else ""))
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=folder)
            try:
                with open(fd, "wb") as f:
                    shutil.copyfileobj(response, f)
                Path(tmp).replace(target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except (TimeoutError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ModelLoadError(f"{what}{_sized(url)} is not downloaded and {host} cannot be reached "
                             f"({one_line(reason)}); {instead}") from None
    return target


def url_target(url: str, folder: Path) -> Path:
    """Where :func:`fetch_url_file` keeps ``url``'s file in ``folder``."""
    from urllib.parse import urlparse

    return folder / Path(urlparse(url).path).name


def check_url_offline(url: str, folder: Path, what: str, instead: str) -> None:
    """ModelLoadError, one line, when ``url``'s file is not in ``folder`` and offline mode is on."""
    target = url_target(url, folder)
    if not target.is_file() and _hub_offline():
        raise ModelLoadError(f"{what}{_sized(url)} is not downloaded ({target} is missing) and offline mode "
                             f"(HF_HUB_OFFLINE) is on; {instead}")


def _sized(url: str) -> str:
    """' (20.1 MB)' for a download the catalog knows, else ''."""
    from p2v_fast.text import size_text
    from p2v_fast.weights.catalog import known

    entry = known(url)
    return f" ({size_text(entry.size)})" if entry is not None else ""


def image_processor_class(name: str):
    """``<name>`` (torchvision backend) if torchvision is installed, else ``<name>Pil``.

    transformers 5 falls back to the PIL class anyway and warns each time; choosing it here
    keeps the output quiet and the choice explicit.
    """
    import transformers
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available() and hasattr(transformers, name + "Pil"):
        return getattr(transformers, name + "Pil")
    return getattr(transformers, name)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide diffusers'/transformers' per-component progress bars and load-time advice.

    Hub download progress (huggingface_hub) is left alone: it is useful. Prior settings are
    restored on exit.
    """
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    d_bar, t_bar = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity(max(d_level, dlog.ERROR))
    tlog.set_verbosity(max(t_level, tlog.ERROR))
    try:
        yield
    finally:
        dlog.set_verbosity(d_level)
        tlog.set_verbosity(t_level)
        if d_bar:
            dlog.enable_progress_bar()
        if t_bar:
            tlog.enable_progress_bar()
