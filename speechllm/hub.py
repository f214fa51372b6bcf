"""Where a saved SpeechLLM comes from and goes to: its folder, the folder's model.safetensors, or a hub repository.

Hub repositories are fetched with huggingface_hub, so its cache and its switches apply: with HF_HUB_OFFLINE=1 a
model already in the cache loads without a network.
"""

import hashlib
import json
import os

from huggingface_hub import HfApi, hf_hub_download, is_offline_mode
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from safetensors import SafetensorError, safe_open
from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME

WEIGHTS_NAME = "model.safetensors"
SAVED_FILES = [CONFIG_NAME, GENERATION_CONFIG_NAME, WEIGHTS_NAME]  # all that save_pretrained writes
# save_pretrained's files whose sha256 the config records (it is written after them): a config is read only with them.
DIGESTED_FILES = [WEIGHTS_NAME, GENERATION_CONFIG_NAME]
HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")
AUTO_CLASS_OPTIONS = ("_from_auto", "trust_remote_code", "adapter_kwargs", "proxies")  # AutoModel passes; unused here
PUSH_OPTIONS = ("repo_id", "commit_message", "private", "token", "create_pr", "revision")


def split_options(options: dict, names) -> tuple[dict, dict]:
    """(the options named in names, the rest)."""
    return {k: v for k, v in options.items() if k in names}, {k: v for k, v in options.items() if k not in names}


def pretrained_folder(path, options: dict) -> tuple[str, dict]:
    """The local folder of a saved SpeechLLM given as the folder, its model.safetensors, or a hub id; and the
    from_pretrained options left once the hub's (HUB_OPTIONS) and AutoModel's own are taken out. The folder's files
    are checked (check_saved_model), so a wrong path fails before any frozen model is built."""
    folder, options = _find_folder(path, options)
    check_saved_model(folder)
    return folder, options


def file_sha256(folder: str) -> dict[str, str]:
    """The sha256 of each of DIGESTED_FILES that folder holds."""
    digests = {}
    for name in DIGESTED_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            digests[name] = hash_file(hashlib.sha256(), path).hexdigest()
    return digests


def hash_file(digest, path: str):
    """digest (a hashlib object) updated with the file's bytes, read a MiB at a time; returned."""
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest


def check_saved_model(folder: str):
    """The folder holds what save_pretrained writes: a SpeechLLM config and a whole weights file (its header read,
    not its tensors), the ones the config was saved with."""
    try:
        with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as file:
            config = json.load(file)
        model_type = config.get("model_type")
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}: not a saved SpeechLLM") from None
    except (ValueError, AttributeError):
        raise ValueError(f"{os.path.join(folder, CONFIG_NAME)}: not a JSON object") from None
    if model_type != "speechllm":
        raise ValueError(
            f"{folder}: a {model_type!r} model, not a saved SpeechLLM (model_type 'speechllm'): give the folder "
            "train.py or save_pretrained wrote"
        )
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: no trained weights here")
    try:
        with safe_open(weights, "pt"):
            pass
    except SafetensorError as error:
        raise ValueError(f"{weights}: not a whole safetensors file ({error}): was its save interrupted?") from None
    recorded = config.get("file_sha256")  # None: saved before configs recorded them
    found = file_sha256(folder) if recorded is not None else None
    if found != recorded:
        other = [name for name in DIGESTED_FILES if found.get(name) != recorded.get(name)]
        raise ValueError(
            f"{folder}: its {CONFIG_NAME} was saved with another {' and '.join(other)} (a save cut short, or a file "
            f"replaced): save the model again, or delete file_sha256 from {CONFIG_NAME} to load the files as they are"
        )


def _find_folder(path, options: dict) -> tuple[str, dict]:
    hub_options, options = split_options(options, HUB_OPTIONS)
    auto_options, options = split_options(options, AUTO_CLASS_OPTIONS)
    if auto_options.get("proxies"):  # AutoModel always passes the option (None unless given)
        raise ValueError(
            "proxies: huggingface_hub takes them from the HTTPS_PROXY and HTTP_PROXY environment variables"
        )
    path = os.fspath(path)
    if os.path.isdir(path):
        subfolder = hub_options.get("subfolder")
        return (os.path.join(path, subfolder) if subfolder else path), options
    if os.path.isfile(path):
        if os.path.basename(path) != WEIGHTS_NAME:
            raise ValueError(f"{path}: expected a saved SpeechLLM's folder or its {WEIGHTS_NAME}")
        return os.path.dirname(path) or ".", options
    if os.path.isdir(os.path.dirname(path)):  # "runs/my_modle": a local path misspelt, not a hub id to look up
        raise FileNotFoundError(f"{path}: no such folder or file")
    try:
        files = [hf_hub_download(path, name, **hub_options) for name in (CONFIG_NAME, WEIGHTS_NAME)]
    except HFValidationError:  # not even shaped like a repo id
        raise FileNotFoundError(f"{path}: no such folder or file") from None
    except (OSError, EntryNotFoundError) as error:  # not on the hub, not in the cache offline, no connection
        if is_offline_mode():
            raise FileNotFoundError(
                f"{path}: no such folder or file, nor in the hub cache (HF_HUB_OFFLINE is set)"
            ) from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(f"{path}: no such folder or file, nor a model on the hub: {reason}") from None
    try:  # decoding defaults, saved since the loop guards; older models have none
        hf_hub_download(path, GENERATION_CONFIG_NAME, **hub_options)
    except EntryNotFoundError:
        pass
    return os.path.dirname(files[0]), options


def push_folder(folder: str, repo_id: str | None = None, *, token=None, private=None, **upload_options) -> str:
    """Upload a saved SpeechLLM (its configs and trained weights) to a hub repository, created if need be; its URL."""
    repo_id = repo_id or os.path.basename(os.path.abspath(folder))
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=SAVED_FILES,
            **upload_options,
        )
    except Exception as error:  # offline, no token, no rights: say what could not be pushed, keep the cause
        raise RuntimeError(f"push_to_hub: could not push {folder} to {repo_id!r}: {error}") from error
    return commit.commit_url
