"""The model's LLM as a GGUF file for llama.cpp (llama_engine.py), with its LoRA: the weights the torch path runs.

Two forms (weights=):
- "gguf": the LLM's own .gguf file, untouched (e.g. the shipped Q4_1), and the LoRA, if any, as a llama.cpp adapter
  file that llama.cpp adds at run time; for LLMs loaded from a .gguf file.
- "f32", "f16", "q8_0": a file written from the torch weights with the LoRA merged in (f32: the same numbers the torch
  path computes with). Metadata (tokenizer, chat template, sizes) is copied from a source .gguf file, or written from
  the HF config and tokenizer (llama and qwen2 models with a byte-level BPE tokenizer).

Written files are cached under cache_dir (default: $SPEECHLLM_CACHE, else ~/.cache/speechllm/gguf), named by a hash
of what they hold (the LLM's source, the LoRA weights, the form): a model whose weights changed gets a new file,
an unchanged one reuses its file, and a file is only ever seen whole (written aside, then renamed).

GGUF stores llama-architecture q/k projections with each head's rotary halves interleaved (llama.cpp's rope);
transformers un-permutes them when it loads a GGUF file, so they are permuted back here, LoRA deltas included.
"""

import hashlib
import json
import os

import gguf
import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from .errors import InputError
from .files import write_atomically
from .lora import is_lora_parameter
from .packaged_models import resolve as resolve_packaged

WEIGHT_TYPES = ("gguf", "f32", "f16", "q8_0")
QUANT_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
ROTARY_INTERLEAVED = ("llama",)  # architectures whose q/k rows GGUF stores permuted (convert_hf_to_gguf's permute)
FORMAT_VERSION = 1  # part of every cached file's hash: bump when what is written changes


def default_cache_dir() -> str:
    base = os.environ.get("SPEECHLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "speechllm")
    return os.path.join(base, "gguf")


def source_gguf(model) -> str | None:
    """The .gguf file the model's LLM was loaded from, if it was."""
    path = resolve_packaged(model.config.llm_model_name_or_path)
    return os.path.abspath(path) if path.endswith(".gguf") else None


def llm_gguf(model, weights: str = "gguf", cache_dir: str | None = None) -> tuple[str, str | None]:
    """(the LLM's GGUF file, its LoRA adapter file or None) for llama.cpp, written if not cached."""
    if weights not in WEIGHT_TYPES:
        raise InputError(f"gguf weights must be one of {', '.join(WEIGHT_TYPES)}, not {weights!r}")
    llm, source = model.llm, source_gguf(model)
    model_type = llm.config.model_type
    if model_type not in ARCHITECTURES:
        raise InputError(f"the llama.cpp engine writes GGUF for {', '.join(ARCHITECTURES)} LLMs, not {model_type!r}")
    cache_dir = cache_dir or default_cache_dir()
    lora = lora_layers(llm)
    if weights == "gguf":
        if source is None:
            raise InputError("gguf weights 'gguf' run the LLM's own .gguf file: this LLM was not loaded from one")
        if not lora:
            return source, None
        key = content_hash(weights, source_identity(model, source), lora_state(llm))
        path = os.path.join(cache_dir, f"lora-{key}.gguf")
        if not os.path.isfile(path):
            write_atomically(path, lambda file: write_lora_adapter(llm, lora, file))
        return source, path
    # Merged forms may be written from the torch weights: the dtype they were loaded in is part of what was written.
    key = content_hash(weights, {**source_identity(model, source), "dtype": str(llm.dtype)}, lora_state(llm))
    path = os.path.join(cache_dir, f"llm-{weights}-{key}.gguf")
    if not os.path.isfile(path):
        write_atomically(path, lambda file: write_merged(model, source, weights, file))
    return path, None


# --- what a cached file depends on -----------------------------------------------------------------------------


def source_identity(model, source: str | None) -> dict:
    """The frozen LLM's weights, named without reading them: a file's path, size and time, or a hub revision."""
    if source is not None:
        stat = os.stat(source)
        return {"file": source, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    name = model.llm.config._name_or_path
    identity = {"name": name, "commit": getattr(model.llm.config, "_commit_hash", None)}
    if os.path.isdir(name):
        for entry in sorted(os.scandir(name), key=lambda e: e.name):
            if entry.is_file():
                identity[entry.name] = [entry.stat().st_size, entry.stat().st_mtime_ns]
    return identity


def lora_state(llm) -> dict[str, torch.Tensor]:
    return {name: p for name, p in llm.named_parameters() if is_lora_parameter(name)}


def content_hash(weights: str, identity: dict, lora: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, weights, identity], sort_keys=True).encode())
    for name in sorted(lora):
        digest.update(name.encode())
        digest.update(lora[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# --- tensors -----------------------------------------------------------------------------------------------------


def lora_layers(llm) -> dict[str, BaseTunerLayer]:
    """The LLM's LoRA layers by the name of the weight they adapt (as the plain LLM names it)."""
    layers = {}
    for name, module in llm.named_modules():
        if isinstance(module, BaseTunerLayer) and module.active_adapters and not module.merged:
            layers[name + ".weight"] = module
    return layers


def interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF's q/k rows (each head's rotary halves one after the other) in GGUF's llama order (the halves interleaved)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


class TensorNames:
    """HF parameter names to GGUF tensor names, and the permutation each tensor needs."""

    def __init__(self, config):
        self.config = config
        self.map = gguf.get_tensor_name_map(ARCHITECTURES[config.model_type], config.num_hidden_layers)

    def __call__(self, hf_name: str) -> str:
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InputError(f"the llama.cpp engine cannot place the LLM's tensor {hf_name!r} in a GGUF file")
        return name

    def to_gguf_rows(self, gguf_name: str, tensor: np.ndarray) -> np.ndarray:
        if self.config.model_type not in ROTARY_INTERLEAVED:
            return tensor
        if ".attn_q." in gguf_name:
            return interleave_rotary(tensor, self.config.num_attention_heads)
        if ".attn_k." in gguf_name:
            return interleave_rotary(tensor, self.config.num_key_value_heads)
        return tensor


def merged_tensors(llm):
    """(HF name, float32 array) of every LLM weight with its LoRA delta added; a tied output layer is left out."""
    lora = lora_layers(llm)
    tied = llm.config.tie_word_embeddings
    for name, tensor in llm.state_dict().items():
        if is_lora_parameter(name):
            continue
        name = name.replace(".base_layer.", ".")
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reads the token embedding as the output layer when there is no output tensor
        tensor = tensor.detach().float()
        if name in lora:
            layer = lora[name]
            for adapter in layer.active_adapters:
                tensor = tensor + layer.get_delta_weight(adapter).detach().float()
        yield name, tensor.cpu().numpy()


def write_merged(model, source: str | None, weights: str, path: str):
    llm = model.llm
    names = TensorNames(llm.config)
    quant_type, file_type = QUANT_TYPES[weights]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ARCHITECTURES[llm.config.model_type]])
    if source is not None:
        copy_metadata(gguf.GGUFReader(source), writer)
    else:
        write_metadata(model, writer)
    writer.add_file_type(file_type)
    for hf_name, tensor in merged_tensors(llm):
        name = names(hf_name)
        tensor = names.to_gguf_rows(name, tensor)
        kind = quant_type
        if tensor.ndim == 1:
            kind = gguf.GGMLQuantizationType.F32  # norms and biases: llama.cpp computes them in f32
        elif kind == gguf.GGMLQuantizationType.Q8_0 and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
            kind = gguf.GGMLQuantizationType.F16  # rows that do not split into whole Q8_0 blocks
        data = gguf.quants.quantize(tensor, kind) if kind != gguf.GGMLQuantizationType.F32 else tensor
        writer.add_tensor(name, data, raw_dtype=kind)
    write_file(writer)


def write_lora_adapter(llm, lora: dict[str, BaseTunerLayer], path: str):
    """llama.cpp's LoRA adapter format: NAME.lora_a (rank x in) and NAME.lora_b (out x rank) per adapted weight, and
    alpha, which llama.cpp divides by the rank: written as scaling x rank, so peft's scaling (alpha / rank, or
    rsLoRA's alpha / sqrt(rank)) is what it applies."""
    names = TensorNames(llm.config)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ARCHITECTURES[llm.config.model_type]])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    scalings = set()
    for hf_name, layer in lora.items():
        if len(layer.active_adapters) != 1:
            raise InputError("the llama.cpp engine applies one LoRA adapter a layer: merge the others first")
        adapter = layer.active_adapters[0]
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        scalings.add(layer.scaling[adapter] * a.shape[0])
        name = names(hf_name)
        writer.add_tensor(name + ".lora_a", a.detach().float().cpu().numpy())
        writer.add_tensor(name + ".lora_b", names.to_gguf_rows(name, b.detach().float().cpu().numpy()))
    if len(scalings) != 1:
        raise InputError("the llama.cpp engine needs one LoRA scaling for the whole LLM")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scalings.pop())
    write_file(writer)


def write_file(writer: gguf.GGUFWriter):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- metadata ----------------------------------------------------------------------------------------------------


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter):
    """Every key of a source file but those the writer sets itself (the architecture, the file type)."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)


def write_metadata(model, writer: gguf.GGUFWriter):
    """Sizes from the HF config, and the tokenizer as llama.cpp's byte-level BPE ("gpt2"): llama.cpp loads it with the
    model, though the engine tokenises in Python with the HF tokenizer."""
    config, tokenizer = model.llm.config, model.tokenizer
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"the llama.cpp engine writes no GGUF for rope scaling {rope['rope_type']!r}: use a .gguf LLM")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(os.path.basename(str(config._name_or_path)) or "llm")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if backend.get("type") != "BPE":
        raise InputError(f"the llama.cpp engine writes byte-level BPE tokenizers into GGUF, not {backend.get('type')}")
    tokens = tokenizer.convert_ids_to_tokens(list(range(config.vocab_size)))
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token if token is not None else f"[PAD{i}]" for i, token in enumerate(tokens)])
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(config.vocab_size)]
    )
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["merges"]])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
