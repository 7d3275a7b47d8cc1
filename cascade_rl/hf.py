"""One place that turns a chat prompt (with images) into the exact tokens and pixels every part consumes.

The rollout engines (vLLM, transformers ``generate``), the learner (SFT, pairs from a log, GSPO) and the process
reward all render prompts here, so one multimodal prompt means the same token ids everywhere:

- ``load_processor``: the model's own processor; without torchvision (CPU installs), its image-only variant (PIL
  image processor + tokenizer, no video processor, whose class check would import torchvision).
- ``load_images``: the one image loader (RGB, errors name the file and the fix).
- ``PromptRenderer.render``: chat template → text; then InternVL's dynamic tiling (``max_tiles`` tiles of the
  vision tower's input size, e.g. 448 px, plus a thumbnail when more than one tile is used) by the model's image
  processor, and the processor's placeholder expansion: each image part becomes
  ``<img>`` + ``<IMG_CONTEXT>`` × (image_seq_length · tiles) + ``</img>``. The result carries
  ``token_ids`` (expanded: what the learner trains on and the engine must report back), ``engine_token_ids``
  (one placeholder per image: vLLM applies the same expansion itself from ``multi_modal_data``; vLLM 0.32
  always expands placeholders in token prompts, so expanded ids given to it would be expanded twice),
  ``pixel_values`` (tiles, 3, H, W), and per image its tile count and content hash (logged with each rollout
  record, so a prompt can be re-rendered exactly later and a changed image file is a named error).
- ``check_engine_prompt``: the engine's prompt ids must equal the rendered ones, else ``PromptMismatchError``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

IMAGE_PART_TYPES = ("image", "image_url", "image_pil")


class PromptMismatchError(ValueError):
    """Two parts of the system tokenised one prompt differently (engine vs renderer, log vs image files)."""


# ------------------------------------------------------------------------------------------------ loaders


def load_processor(path: str, tokenizer: Any | None = None) -> Any:
    """The model's processor; without torchvision, its image-only variant (same tokenizer and image settings)."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, ValueError) as exc:
        if "torchvision" not in str(exc):
            raise
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    config = AutoConfig.from_pretrained(path)
    name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise ValueError(f"no processor class known for model type {config.model_type!r} at {path}")
    base = getattr(transformers, name)

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
    kwargs: dict[str, Any] = {"image_processor": AutoImageProcessor.from_pretrained(path), "tokenizer": tok,
                              "video_processor": None, "chat_template": tok.chat_template}
    if getattr(config, "image_seq_length", None) is not None:
        kwargs["image_seq_length"] = config.image_seq_length
    return ImageOnlyProcessor(**kwargs)


def load_images(paths: Sequence[str]) -> list[Any]:
    """PIL RGB images for file paths; a missing or unreadable file raises naming it and the fix."""
    from PIL import Image

    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt image {path!r} does not exist (check data.image_key and the data "
                                    "file, or the image folder of the rollout log)")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as exc:  # PIL: unidentified, truncated or corrupt files
            raise ValueError(f"prompt image {path!r} is not a readable image ({type(exc).__name__}: {exc}); "
                             "re-save it as PNG/JPEG or drop its row from the data file") from exc
    return images


def image_sha256(path: str) -> str:
    """Content hash of an image file (hex), logged with rollout records."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_image_hashes(paths: Sequence[str], hashes: Sequence[str], where: str) -> None:
    """Image files must still hold what was logged: else the pair would train on other pixels than were sampled."""
    if not hashes:
        return  # an imported log without hashes: nothing to check against
    if len(hashes) != len(paths):
        raise PromptMismatchError(f"{where}: {len(paths)} image path(s) but {len(hashes)} logged hash(es)")
    for path, want in zip(paths, hashes, strict=True):
        got = image_sha256(path) if os.path.isfile(path) else "missing"
        if got != want:
            raise PromptMismatchError(f"{where}: image {path} is {got[:12]}, but the rollout log recorded "
                                      f"{want[:12]}; the file changed after sampling. Restore it, or re-run the "
                                      "rollout stage on the current files")


def with_image_parts(messages: list[dict[str, Any]], num_images: int) -> list[dict[str, Any]]:
    """Messages with one ``{"type": "image"}`` part per image: kept as given if they already have image parts,
    else the parts go before the text of the first user message (as ``cascade_rl.data.prompts`` does)."""
    have = sum(1 for m in messages if isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES)
    if have == num_images:
        return messages
    if have:
        raise ValueError(f"prompt has {have} image part(s) in its messages but {num_images} image file(s)")
    out = [dict(m) for m in messages]
    user = next((m for m in out if m.get("role") == "user"), None)
    if user is None:
        raise ValueError(f"prompt has {num_images} image(s) but no user message to attach them to")
    text = user["content"] if isinstance(user["content"], list) else [{"type": "text", "text": user["content"]}]
    user["content"] = [{"type": "image"}] * num_images + text
    return out


# ------------------------------------------------------------------------------------------------ rendering


@dataclass
class RenderedPrompt:
    """A prompt after the chat template and image expansion (see the module docstring)."""

    text: str
    token_ids: list[int]  # processor-expanded ids
    engine_token_ids: list[int] = field(default_factory=list)  # one placeholder per image; == token_ids if none
    images: list[Any] = field(default_factory=list)  # PIL images
    pixel_values: Any = None  # (tiles, 3, H, W) tensor, None without images
    num_tiles: list[int] = field(default_factory=list)  # per image
    image_hashes: list[str] = field(default_factory=list)  # per image, sha256 of the file


class PromptRenderer:
    """Renders prompts for one model folder; ``max_tiles`` caps InternVL's dynamic tiling (0: the folder's own
    image-processor settings)."""

    def __init__(self, model_path: str, *, max_tiles: int = 0, tokenizer: Any | None = None,
                 is_vlm: bool | None = None) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.model_path, self.max_tiles = model_path, max_tiles
        self.config = AutoConfig.from_pretrained(model_path)
        self.is_vlm = hasattr(self.config, "vision_config") if is_vlm is None else is_vlm
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_path)
        self.processor = load_processor(model_path, self.tokenizer) if self.is_vlm else self.tokenizer
        self.image_token_id = getattr(self.config, "image_token_id", None)
        self.image_seq_length = int(getattr(self.config, "image_seq_length", 0) or 0)

    @property
    def image_kwargs(self) -> dict[str, Any]:
        """Image-processor keyword arguments (also vLLM's ``mm_processor_kwargs``): both sides tile alike."""
        if self.max_tiles <= 0:
            return {}
        return {"crop_to_patches": self.max_tiles > 1, "min_patches": 1, "max_patches": self.max_tiles}

    def chat_text(self, messages: list[dict[str, Any]], num_images: int, *, add_generation_prompt: bool = True
                  ) -> str:
        msgs = with_image_parts(messages, num_images) if num_images else messages
        return self.processor.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)

    def render(self, messages: list[dict[str, Any]], image_paths: Sequence[str] = (), *,
               add_generation_prompt: bool = True) -> RenderedPrompt:
        """Token ids (expanded), engine ids, pixels, tiles and hashes of one prompt."""
        image_paths = list(image_paths)
        if image_paths and not self.is_vlm:
            raise ValueError(f"a prompt has {len(image_paths)} image(s) but the model {self.model_path} is "
                             "text-only; use a VLM (model.path) or drop the images (data.image_key)")
        text = self.chat_text(messages, len(image_paths), add_generation_prompt=add_generation_prompt)
        engine_ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not image_paths:
            return RenderedPrompt(text=text, token_ids=engine_ids, engine_token_ids=engine_ids)
        images = load_images(image_paths)
        enc = self.processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False,
                             **self.image_kwargs)
        ids = enc["input_ids"][0].tolist()
        tiles = self.tiles_per_image(ids)
        placeholders = engine_ids.count(self.image_token_id)
        if len(tiles) != len(images) or placeholders != len(images):
            raise PromptMismatchError(f"prompt with images {image_paths}: the chat template put {placeholders} "
                                      f"image placeholder(s) and the processor {len(tiles)} image block(s) for "
                                      f"{len(images)} image(s); give one image part (or <image>) per image")
        return RenderedPrompt(text=text, token_ids=ids, engine_token_ids=engine_ids, images=images,
                              pixel_values=enc["pixel_values"], num_tiles=tiles,
                              image_hashes=[image_sha256(p) for p in image_paths])

    def tiles_per_image(self, token_ids: Sequence[int]) -> list[int]:
        """Tile count of each image block (a run of image-context tokens) in expanded ids."""
        runs, count = [], 0
        for tok in [*token_ids, None]:
            if tok == self.image_token_id:
                count += 1
            elif count:
                runs.append(count)
                count = 0
        per = max(self.image_seq_length, 1)
        return [n // per for n in runs]

    def pixel_values(self, image_paths: Sequence[str]) -> tuple[Any, list[int]]:
        """``(tiles, 3, H, W)`` for image files in order, and each image's tile count."""
        out = self.processor.image_processor(images=load_images(image_paths), return_tensors="pt",
                                             **self.image_kwargs)
        extra = sorted(set(out) - {"pixel_values", "num_patches"})
        if extra:
            raise NotImplementedError(f"the image processor of {self.model_path} returns {extra}; the learner "
                                      "supports InternVL-style VLMs (pixel_values only)")
        pixels = out["pixel_values"]
        tiles = out.get("num_patches")
        tiles = [int(t) for t in tiles] if tiles is not None else [1] * len(image_paths)
        return pixels, tiles

    def dummy_pixel_values(self) -> Any:
        """One black tile (1, 3, H, W): keeps the vision tower in a pass that has no image."""
        from PIL import Image

        black = Image.new("RGB", (32, 32))  # the processor resizes it to the model's input size
        return self.processor.image_processor(images=[black], return_tensors="pt")["pixel_values"][:1]


def check_engine_prompt(rendered: RenderedPrompt, engine_ids: Sequence[int], where: str) -> None:
    """The engine must report back exactly the rendered (expanded) ids, else the learner would train on others."""
    got = list(engine_ids)
    if got == rendered.token_ids:
        return
    first = next((i for i, (a, b) in enumerate(zip(got, rendered.token_ids, strict=False)) if a != b),
                 min(len(got), len(rendered.token_ids)))
    raise PromptMismatchError(
        f"{where}: the rollout engine expanded the prompt to {len(got)} token(s), the renderer to "
        f"{len(rendered.token_ids)} (first difference at position {first}; tiles per image "
        f"{rendered.num_tiles}). The engine and the learner would see different image tokens: check that "
        "model.max_tiles reaches both, and that vLLM loads the same processor files as the model folder")
