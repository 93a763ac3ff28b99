"""Caption embeddings: prompts to Gemma-2-2b-it hidden states (the PiD caption conditioning).

PiD is conditioned on the LDM prompt's embedding: the last hidden state of the
Gemma-2 decoder stack (no LM head) for `PREFIX + caption`, right-padded to
`n_prefix_tokens + 298` tokens, of which positions [0] + [-299..-1] are kept,
giving [B, 300, 2304] float32. The empty caption "" is the unconditional input.

`transformers` is an optional extra (`pip install 'pid-export[caption]'`); it is
imported only when an encoder is loaded, so `import pid_runtime` never needs it.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import first_line
from .hub import OFFLINE_HINT, hub_unreachable
from .io import atomic_write, load_caption
from .metadata import EMPTY_CAPTION_NAME

DEFAULT_MODEL = "Efficient-Large-Model/gemma-2-2b-it"
CAPTION_LENGTH = 300  # token positions kept per caption
EMBEDDING_KEY = "y"  # array name inside .npz / .safetensors embedding files (what io.load_caption reads)
EMBEDDING_SUFFIXES = (".npy", ".npz", ".safetensors")
INSTALL_HINT = "pip install 'pid-export[caption]'"
CAPTION_MODEL_ENV = "PID_CAPTION_MODEL"  # where --prompt finds the encoder when not told otherwise
# An exported encoder directory (pid_export.caption_export): graph, tokenizer pipeline, settings.
ONNX_ENCODER_NAME = "caption_encoder.onnx"
ONNX_TOKENIZER_NAME = "caption_tokenizer.json"
ONNX_ENCODER_METADATA = "caption_encoder.json"


class CaptionError(RuntimeError):
    """A caption problem the user can fix (missing extra, model not available, wrong prompt count)."""


def prompt_prefix() -> str:
    """The instruction prefix every caption is appended to (package data, byte-exact)."""
    return importlib.resources.files(__package__).joinpath("chi_prompt.txt").read_bytes().decode("utf-8")


def selected_positions(max_length: int) -> list[int]:
    """Token positions kept from a [B, max_length] sequence: the first one and the last 299."""
    return [0] + list(range(max_length - (CAPTION_LENGTH - 1), max_length))


def check_prompts(prompts: Sequence[str], batch: int) -> list[str]:
    """One prompt per batch item: a single prompt is used for every item, otherwise exactly `batch`."""
    prompts = list(prompts)
    if len(prompts) == 1:
        return prompts * batch
    if len(prompts) != batch:
        raise CaptionError(
            f"got {len(prompts)} prompts for a batch of {batch}: give one prompt (used for every image) or exactly {batch}"
        )
    return prompts


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise CaptionError(f"making caption embeddings needs the transformers library: {INSTALL_HINT}") from None
    return transformers


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once at import, tests and users set it later)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _ways_out(model: str) -> str:
    """What a user without this model in the cache can do (pid-run and pid-export both take --caption-model)."""
    return (
        f"pass --caption-model DIR (a local copy of the model, or an exported encoder; or set ${CAPTION_MODEL_ENV}),"
        f" or pre-download it where the hub is reachable (`hf download {model}`)"
        + ("" if hub_offline() else f"; {OFFLINE_HINT} makes the tools skip the hub without trying")
    )


def _in_hub_cache(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # an id the cache cannot hold (e.g. a path that does not exist): not cached
        return False


def why_caption_model_unavailable(model: str | os.PathLike[str]) -> str | None:
    """Checked before any slow work: a one-line reason `model` cannot be had, or None when it may load.

    A local path, or a hub id in the cache, may load (errors come when it is loaded). A hub id
    that is not cached needs the hub: with HF_HUB_OFFLINE set, or when one quick probe finds the
    hub unreachable, it is refused now instead of after huggingface_hub's retries.
    """
    model = str(model)
    if Path(model).expanduser().exists() or _in_hub_cache(model):
        return None
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:  # a path, not a hub id (`org/name`)
        return f"caption model directory {model} does not exist"
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else hub_unreachable()
    if reason is None:
        return None
    return f"caption model '{model}' is not in the Hugging Face cache and {reason}: {_ways_out(model)}"


def _load_error(model: str, exc: BaseException, no_download_reason: str | None) -> CaptionError:
    if Path(model).expanduser().is_dir():
        return CaptionError(f"cannot load the caption model from directory {model}: {first_line(exc).rstrip('.')}")
    how = _ways_out(model)
    if no_download_reason:
        return CaptionError(f"caption model '{model}' is not in the Hugging Face cache and {no_download_reason}: {how}")
    return CaptionError(
        f"caption model '{model}' is not in the Hugging Face cache and could not be downloaded"
        f" ({first_line(exc).rstrip('.')}): {how}"
    )


def _encode_each_once(prompts: Sequence[str], encode_distinct: Callable[[list[str]], Tensor]) -> Tensor:
    """Encode each distinct prompt once (a prompt shared by the whole batch costs one row), in order."""
    prompts = list(prompts)
    if not prompts:
        raise CaptionError("no prompts to encode: give at least one (the empty prompt \"\" is the unconditional caption)")
    distinct = list(dict.fromkeys(prompts))
    embeddings = encode_distinct(distinct)
    row_of = {prompt: row for row, prompt in enumerate(distinct)}
    rows = torch.tensor([row_of[prompt] for prompt in prompts], device=embeddings.device)
    return embeddings.index_select(0, rows)


class CaptionEncoder:
    """Gemma-2 decoder stack + tokenizer that turn prompts into PiD caption embeddings."""

    def __init__(self, tokenizer: Any, model: Any, prefix: str | None = None):
        self.tokenizer = tokenizer  # a transformers tokenizer
        self.model = model.eval()  # a transformers Gemma2Model (decoder stack)
        self.prefix = prompt_prefix() if prefix is None else prefix
        # The reference pads on the right (Gemma's own default is left) and cuts the caption's end.
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "right"
        self._n_prefix_tokens = len(self.tokenizer(self.prefix)["input_ids"])  # BOS included

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool = False,
    ) -> "CaptionEncoder":
        """Load tokenizer and decoder from a hub id (cache or download) or a local directory.

        Defaults: CUDA if available, bf16 there and float32 on CPU. Nothing is downloaded
        when HF_HUB_OFFLINE=1 or `local_files_only` (a hub id must then be in the cache).
        """
        transformers = _import_transformers()
        model = str(model)
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        if hub_offline():
            no_download_reason: str | None = "HF_HUB_OFFLINE is set"
        elif local_files_only:
            no_download_reason = "downloading was not allowed"
        elif not Path(model).expanduser().exists():
            no_download_reason = hub_unreachable()  # None when the hub answers; else the cache only, quietly
        else:
            no_download_reason = None
        offline = no_download_reason is not None
        # transformers renamed `torch_dtype` to `dtype` in 4.56; the extra allows 4.45+.
        major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
        dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        # Its "Loading weights" bars would be the only lines a Gemma-2-2B load prints; the tools say
        # "loading the caption encoder" themselves, and an error after them must stay one line.
        transformers.utils.logging.disable_progress_bar()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model, local_files_only=offline)
            # AutoModel on the Gemma2ForCausalLM checkpoint gives the decoder stack without the LM head.
            # Eager attention keeps Gemma-2's attention-logit soft-capping (SDPA would drop it).
            decoder = transformers.AutoModel.from_pretrained(
                model, local_files_only=offline, attn_implementation="eager", **{dtype_key: dtype}
            )
        except (OSError, ValueError) as exc:
            raise _load_error(model, exc, no_download_reason) from None
        return cls(tokenizer, decoder.to(dev))

    @property
    def n_prefix_tokens(self) -> int:
        """Token count of the prefix alone, BOS included."""
        return self._n_prefix_tokens

    @property
    def max_length(self) -> int:
        """Tokenised length of every prompt: the prefix plus room for 298 caption tokens."""
        return self._n_prefix_tokens + CAPTION_LENGTH - 2

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """input_ids and attention_mask [B, max_length] for `PREFIX + prompt`, right-padded and truncated."""
        batch = self.tokenizer(
            [self.prefix + prompt for prompt in prompts],
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Caption embeddings [B, 300, hidden] float32 on the encoder's device, one row per prompt."""
        return _encode_each_once(prompts, self._encode_distinct)

    def _encode_distinct(self, prompts: list[str]) -> Tensor:
        tokens = {name: value.to(self.device) for name, value in self.tokenize(prompts).items()}
        with torch.inference_mode():
            hidden = self.model(**tokens).last_hidden_state
        keep = torch.tensor(selected_positions(self.max_length), device=hidden.device)
        return hidden.index_select(1, keep).float()


class OnnxCaptionEncoder:
    """An exported encoder: the `tokenizers` pipeline + ONNX Runtime, no transformers or model download.

    The graph takes input_ids / attention_mask [B, max_length] int64 and returns the
    selected positions [B, 300, hidden] float32, so only tokenisation happens here.
    """

    def __init__(self, session: Any, tokenizer: Any, settings: dict[str, Any]):
        self.session = session
        self.tokenizer = tokenizer
        self.prefix: str = settings["prefix"]
        self._n_prefix_tokens = int(settings["n_prefix_tokens"])
        self._max_length = int(settings["max_length"])
        self._hidden_size = int(settings["hidden_size"])

    @classmethod
    def load(cls, directory: str | os.PathLike[str], device: str | torch.device | None = None) -> "OnnxCaptionEncoder":
        """The exported encoder in `directory`, on `device` (default: a GPU when ONNX Runtime has its CUDA provider)."""
        from .backends.base import BackendError
        from .backends.onnxruntime import create_session, session_device

        directory = Path(directory)
        try:
            settings = json.loads((directory / ONNX_ENCODER_METADATA).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CaptionError(f"cannot read the caption encoder settings in {directory}: {first_line(exc).rstrip('.')}") from None
        try:
            import onnxruntime  # noqa: F401  (checked here to name both missing packages at once)
            from tokenizers import Tokenizer
        except ImportError:
            raise CaptionError(f"the exported caption encoder needs onnxruntime and tokenizers: {INSTALL_HINT}") from None
        tokenizer = Tokenizer.from_file(str(directory / ONNX_TOKENIZER_NAME))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        if len(tokenizer.encode(settings["prefix"]).ids) != settings["n_prefix_tokens"]:
            raise CaptionError(f"the tokenizer in {directory} does not match its settings (prefix token count differs)")
        # Same rule as CaptionEncoder.tokenize: right padding to max_length, the caption's end cut off.
        length = int(settings["max_length"])
        tokenizer.enable_padding(direction="right", pad_id=settings["pad_id"], pad_token=settings["pad_token"], length=length)
        tokenizer.enable_truncation(length, direction="right")
        try:
            session = create_session(directory / ONNX_ENCODER_NAME, session_device(device))
        except BackendError as exc:
            raise CaptionError(str(exc)) from None
        return cls(session, tokenizer, settings)

    @property
    def n_prefix_tokens(self) -> int:
        return self._n_prefix_tokens

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    def tokenize(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        encodings = self.tokenizer.encode_batch([self.prefix + prompt for prompt in prompts])
        return {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.int64),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64),
        }

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Caption embeddings [B, 300, hidden] float32 on the CPU, one row per prompt."""
        return _encode_each_once(prompts, self._encode_distinct)

    def _encode_distinct(self, prompts: list[str]) -> Tensor:
        feeds = {name: value.numpy() for name, value in self.tokenize(prompts).items()}
        return torch.from_numpy(self.session.run(None, feeds)[0])


def default_caption_model() -> str:
    """$PID_CAPTION_MODEL (a hub id, a local model directory or an exported encoder directory), else the hub model."""
    return os.environ.get(CAPTION_MODEL_ENV) or DEFAULT_MODEL


def load_encoder(
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    local_files_only: bool = False,
) -> CaptionEncoder | OnnxCaptionEncoder:
    """An exported ONNX encoder directory, else a transformers model (hub id or local directory)."""
    if (Path(model).expanduser() / ONNX_ENCODER_METADATA).is_file():
        return OnnxCaptionEncoder.load(Path(model).expanduser())
    return CaptionEncoder.load(model, device=device, local_files_only=local_files_only)


def check_embedding_path(path: str | os.PathLike[str]) -> Path:
    """Validate an embedding output name before any slow work starts."""
    path = Path(path)
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise CaptionError(f"cannot write embeddings to {path}: the name must end in {', '.join(EMBEDDING_SUFFIXES)}")
    if not path.parent.is_dir():
        raise CaptionError(f"cannot write embeddings to {path}: directory {path.parent} does not exist")
    return path


def write_embeddings(embeddings: Tensor, path: str | os.PathLike[str]) -> Path:
    """Write [B, 300, hidden] float32 to .npy, .npz or .safetensors (key `y`), atomically."""
    path = check_embedding_path(path)
    suffix = path.suffix.lower()
    tensor = embeddings.detach().to("cpu", torch.float32).contiguous()

    def write(temp: Path) -> None:
        if suffix == ".npy":
            np.save(temp, tensor.numpy())
        elif suffix == ".npz":
            np.savez(temp, y=tensor.numpy())  # y == EMBEDDING_KEY
        else:
            from safetensors.torch import save_file

            save_file({EMBEDDING_KEY: tensor}, str(temp))

    atomic_write(path, write)
    return path


def embed_to_file(
    prompts: Sequence[str],
    out: str | os.PathLike[str],
    *,
    caption_model: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    encoder: CaptionEncoder | OnnxCaptionEncoder | None = None,
) -> Path:
    """`pid-run embed`: encode prompts ([B, 300, hidden], one row each) into a file for --caption-embeds."""
    out_path = check_embedding_path(out)
    encoder = encoder or load_encoder(caption_model or default_caption_model(), device=device)
    return write_embeddings(encoder.encode(prompts), out_path)


def save_empty_caption(encoder: CaptionEncoder | OnnxCaptionEncoder, export_dir: str | os.PathLike[str]) -> Path:
    """Store the unconditional (empty-caption) embedding [1, 300, hidden] in an export directory."""
    return write_embeddings(encoder.encode([""]), Path(export_dir) / EMPTY_CAPTION_NAME)


def find_empty_caption(model_path: str | os.PathLike[str]) -> Path | None:
    """The export directory's empty-caption embedding, given the directory or a file inside it."""
    path = Path(model_path)
    directory = path if path.is_dir() else path.parent
    candidate = directory / EMPTY_CAPTION_NAME
    return candidate if candidate.is_file() else None


def no_caption_message(model_path: str | os.PathLike[str]) -> str:
    return (
        f"no caption given and {model_path} has no {EMPTY_CAPTION_NAME}: pass --caption-embeds FILE,"
        f" --prompt TEXT (needs {INSTALL_HINT}), or an export directory containing {EMPTY_CAPTION_NAME}"
        " (pid-export stores it when the caption encoder is available at export time)"
    )


def resolve_caption(
    batch: int,
    model_path: str | os.PathLike[str],
    prompts: Sequence[str] = (),
    *,
    caption_model: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    encoder: CaptionEncoder | OnnxCaptionEncoder | None = None,
    notify: Callable[[str], None] = lambda message: None,
) -> Tensor:
    """Caption embeddings [batch, 300, hidden] float32 when no --caption-embeds file was given.

    With prompts: encode them (one for every item, or one per item) with `encoder`, else
    with `caption_model` (default: $PID_CAPTION_MODEL, else the hub model), loaded only for
    this and released afterwards. Without prompts: the export directory's empty-caption
    embedding, announced through `notify`. Neither: CaptionError naming the three ways.
    """
    if prompts:
        prompts = check_prompts(prompts, batch)
        if encoder is not None:
            return encoder.encode(prompts)
        model = caption_model or default_caption_model()
        notify(f"encoding {len(set(prompts))} prompt(s) with {model}")
        loaded = load_encoder(model, device=device)
        embeddings = loaded.encode(prompts)
        del loaded  # the decoder needs the memory more than a cache of the 2B-parameter encoder
        if embeddings.is_cuda:
            torch.cuda.empty_cache()
        return embeddings
    empty = find_empty_caption(model_path)
    if empty is None:
        raise CaptionError(no_caption_message(model_path))
    notify(f"no caption given: using the unconditional caption (empty-prompt embedding) {empty}")
    embedding = load_caption(empty)
    if embedding.shape[0] != 1:
        raise CaptionError(f"{empty} holds {embedding.shape[0]} embeddings, expected 1")
    return embedding.expand(batch, -1, -1)
