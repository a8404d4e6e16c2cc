"""Downloads on purpose: `p2v download` (fetch ahead of time), `p2v info`'s cache rows, and the
captioner's check before any model loads. Import-light: huggingface_hub only, never torch.

What each download is, and its size: :mod:`p2v_fast.weights.catalog` (docs/models.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from p2v_fast.config import DEFAULT_CAPTIONER
from p2v_fast.errors import InputError, ModelLoadError, one_line
from p2v_fast.text import plural, size_text
from p2v_fast.weights.catalog import GROUPS, Download, group_entries, label
from p2v_fast.weights.hub import (
    _hub_offline,
    _not_cached_message,
    _probe_hub,
    fetch_url_file,
    hub_cache,
    looks_like_path,
    looks_like_repo_id,
    notify,
    snapshot,
)

#: The ways around a captioner that cannot be had, for its errors.
CAPTIONER_INSTEAD = "pass --source-prompt (then no captioner is needed) or another --captioner"

_ONLINE = "run p2v download on a machine with internet"

#: Files whose presence in the hub cache means a transformers model's weights are there.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def torch_hub_checkpoints() -> Path:
    """torch hub's checkpoints folder (TORCH_HOME, else ~/.cache/torch), where torchvision keeps
    RAFT's weights; computed as torch.hub.get_dir does, without importing torch."""
    import os

    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


def own_captioner(local_dir: Path | None) -> Path | None:
    """The ``captioner/`` subfolder of a model folder (tiny, mini, a user's folder), if it has one."""
    folder = Path(local_dir) / "captioner" if local_dir is not None else None
    return folder if folder is not None and folder.is_dir() else None


def _cached(repo_id: str, name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, name), str)


def in_hub_cache(repo_id: str) -> bool:
    """True when a transformers model's config and weights are in the hub cache (no network)."""
    return _cached(repo_id, "config.json") and any(_cached(repo_id, f) for f in _WEIGHT_FILES)


def check_downloads(model: str, captioner: str | None, source_prompt: str | None, caption: bool = True) -> None:
    """Before any model loads: the hub models a run needs (``model``, and, with ``caption``, the
    captioner a missing ``source_prompt`` needs) are in the hub cache, or the hub answers; else one
    line that names each missing one with its size, the `p2v download` that fetches them and the
    options around them (``--model``, ``--captioner``, ``--source-prompt``). Seconds, not an SD2
    load; imports neither torch nor the loaders, so the CLI runs it before they load."""
    check_scheduler(model)
    the_captioner = _missing_captioner(model, captioner, source_prompt) if caption else None
    missing = [m for m in (_missing_model(model), the_captioner) if m]
    if not missing:
        return
    if len(missing) == 1:
        what, repo, instead = missing[0]
        if _hub_offline():
            raise ModelLoadError(_not_cached_message(repo, instead, what))
        _probe_hub(repo, instead, what)  # unreachable: one line at once; else fetched when used
        return
    from p2v_fast.weights.catalog import known

    why = "offline mode (HF_HUB_OFFLINE) is on" if _hub_offline() else "the hub cannot be reached"
    names = " and ".join(f"{what} {label(repo)}" for what, repo, _ in missing)
    groups = " ".join(dict.fromkeys(e.group for e in (known(r) for _, r, _ in missing) if e is not None))
    fetch = f"run `p2v download {groups}` on a connected machine" if groups else "download them on a connected machine"
    both = (f"{names} are not in the local Hugging Face cache and {why}; {fetch}, or pass local folders "
            "(--model, --captioner), --model mini, or --source-prompt")
    if _hub_offline():
        raise ModelLoadError(both)
    for what, repo, instead in missing:  # a repo the hub does not have, or gates: its own line
        _probe_hub(repo, instead, what, unreachable=both)


def check_predicts_noise(folder: Path, label: str) -> None:
    """ModelLoadError, one line, when the pipeline in ``folder`` has a scheduler whose
    ``prediction_type`` is not 'epsilon' (read from its scheduler_config.json: no torch)."""
    import json

    try:  # an unreadable scheduler config is diffusers' to report, as it loads it
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        scheduler = {}
    predicts = scheduler.get("prediction_type", "epsilon") if isinstance(scheduler, dict) else "epsilon"
    if predicts != "epsilon":
        raise ModelLoadError(
            f"{label} predicts {predicts!r} (its scheduler's prediction_type; SD2's 768 models predict "
            "'v_prediction'): p2v edits with noise-predicting ('epsilon') depth models, such as "
            "stabilityai/stable-diffusion-2-depth"
        )


def check_scheduler(model: str) -> None:
    """A --model folder whose scheduler does not predict noise: refused as the loader would (same words)."""
    folder = Path(model).expanduser()
    if model not in ("tiny", "mini") and folder.is_dir():
        check_predicts_noise(folder, f"model folder '{model}'")


#: The way around a CLIP model or RAFT's weights that cannot be had.
CLIP_INSTEAD = "use --clip-model tiny (random weights, for testing only)"
RAFT_INSTEAD = "use --flow dis (no weights needed)"


def _installed(name: str) -> bool:
    """True when ``name`` can be imported (found, not imported)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # in sys.modules as None: blocked
        return False


def check_eval_downloads(clip_model: str, flow: str) -> None:
    """Before the metrics load: ``clip_model`` (a hub id) is in the hub cache or the hub answers,
    and --flow raft's weights are downloaded or offline mode is off; else one line naming the
    download and its size (as the loaders would say, seconds earlier)."""
    from p2v_fast.weights.catalog import RAFT_LARGE
    from p2v_fast.weights.hub import check_url_offline

    if flow == "raft":
        if not _installed("torchvision"):
            return  # the loader says what to install (it knows torch's build), before CLIP's check
        check_url_offline(RAFT_LARGE.source, torch_hub_checkpoints(), "RAFT's weights", RAFT_INSTEAD)
    if clip_model in ("tiny", "mini") or Path(clip_model).expanduser().exists():
        return
    if not looks_like_repo_id(clip_model) or in_hub_cache(clip_model):
        return  # a name the loader refuses in its own words, or nothing to fetch
    if _hub_offline():
        raise ModelLoadError(_not_cached_message(clip_model, CLIP_INSTEAD, "CLIP model"))
    _probe_hub(clip_model, CLIP_INSTEAD, "CLIP model")


def _missing_model(model: str) -> tuple[str, str, str] | None:
    """("model", hub id, the way around it) when ``model`` is a hub id whose files are not cached."""
    from p2v_fast.weights.catalog import known

    if model in ("tiny", "mini") or Path(model).expanduser().exists() or not looks_like_repo_id(model):
        return None  # a folder, or a name the loader refuses in its own words
    entry = known(model)
    files = [p for p in entry.patterns if "*" not in p] if entry is not None else ["model_index.json"]
    if all(_cached(model, f) for f in files):
        return None
    return "model", model, "use --model mini (offline, trained on rendered scenes)"


def _missing_captioner(model: str, captioner: str | None, source_prompt: str | None) -> tuple[str, str, str] | None:
    """("captioner", hub id, the way around it) when the captioner a missing ``source_prompt``
    needs is a hub id not in the cache. InputError/ModelLoadError for a value that cannot work."""
    if source_prompt is not None:
        return None
    if captioner == "none":
        raise InputError("--captioner none needs --source-prompt (the inversion prompt: what the input shows)")
    if captioner is None:
        if model in ("tiny", "mini"):  # their sets carry their own captioner (built or shipped)
            return None
        if Path(model).expanduser().is_dir() and own_captioner(Path(model).expanduser()) is not None:
            return None
        captioner = DEFAULT_CAPTIONER
    if Path(captioner).expanduser().is_dir():
        return None
    if looks_like_path(captioner) or not looks_like_repo_id(captioner):
        raise ModelLoadError(f"--captioner '{captioner}' is neither a folder here nor a hub id; {CAPTIONER_INSTEAD}")
    if in_hub_cache(captioner):
        return None
    return "captioner", captioner, CAPTIONER_INSTEAD


def download(groups: Sequence[str], log: Callable[[str], None] = notify) -> list[tuple[Download, Path]]:
    """`p2v download GROUP...`: fetch the catalog's entries of ``groups`` (edit, caption, eval,
    all) now, with progress, resuming an interrupted download; returns (entry, where) pairs.
    Says first what it will fetch and how big it is, and refuses, in one line, what cannot fit."""
    for g in groups:
        if g not in GROUPS:
            raise InputError(f"p2v download takes {', '.join(GROUPS)}; got {g!r}")
    entries = list(dict.fromkeys(e for g in groups for e in group_entries(g)))
    total = sum(e.size for e in entries)
    log(f"fetching {plural(len(entries), 'download')}, {size_text(total)} at most: "
        + "; ".join(label(e.source) for e in entries))
    if _hub_offline():
        raise ModelLoadError("p2v download needs the network and offline mode (HF_HUB_OFFLINE) is on; "
                             "run it with HF_HUB_OFFLINE unset on a machine with internet")
    done = []
    for e in entries:
        if e.is_hub:
            from huggingface_hub import constants

            from p2v_fast.weights.hub import before_download

            _probe_hub(e.source, _ONLINE, unreachable=f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached "
                       f"to fetch {label(e.source)}; {_ONLINE}")
            before_download(e.source)
            try:
                where = snapshot(e.source)
            except Exception as exc:
                raise ModelLoadError(f"could not download {label(e.source)}: {one_line(exc)}") from None
        else:
            where = fetch_url_file(e.source, torch_hub_checkpoints(), e.name, _ONLINE)
        done.append((e, where))
    return done


def cache_rows() -> list[tuple[str, str]]:
    """`p2v info`'s rows for what is downloaded: every repo in the hub cache (size, path) and
    RAFT's weights in torch hub's folder."""
    from huggingface_hub import scan_cache_dir

    cache = hub_cache()
    rows = []
    try:
        info = scan_cache_dir(cache) if cache.is_dir() else None
    except Exception as exc:  # an unreadable or foreign folder: say so, do not fail info
        return [("hub cache", f"{cache}: unreadable ({one_line(exc)})")]
    repos = sorted(info.repos, key=lambda r: r.repo_id) if info is not None else []
    total = size_text(sum(r.size_on_disk for r in repos))
    rows.append(("hub cache", f"{cache}: {plural(len(repos), 'repo')}, {total}"))
    for r in repos:
        rows.append((f"  {r.repo_id}", f"{size_text(r.size_on_disk)}, {r.repo_path}"))
    raft = torch_hub_checkpoints()
    for f in sorted(raft.glob("raft_*.pth")) if raft.is_dir() else []:
        rows.append((f"  {f.name}", f"{size_text(f.stat().st_size)}, {f}"))
    return rows
