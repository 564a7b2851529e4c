"""A minimal copy of the behaviour of LLaVA's training code, with clipfeat's documented edits.

LLaVA (github.com/haotian-liu/LLaVA) cannot be installed or fetched in CI, so this module
restates, in our own words and reduced to what touches the vision tower, what these LLaVA
functions do (LLaVA-1.5, ``llava/train/train.py``, ``llava/model/llava_arch.py``,
``llava/model/multimodal_encoder/builder.py``):

- ``ModelArguments``, ``DataArguments`` and ``TrainingArguments``: the dataclasses
  ``train()`` hands to ``transformers.HfArgumentParser``, with LLaVA's field names and
  defaults (``mm_vision_select_layer`` defaults to -1, ``image_aspect_ratio`` to
  ``'square'``; the aspect is a *DataArguments* field). ``TrainingArguments`` is reduced to
  the fields used here instead of subclassing ``transformers.TrainingArguments``.
- ``build_vision_tower(cfg, **kwargs)``: the model name from ``mm_vision_tower`` or
  ``vision_tower``; a local path or an ``openai``/``laion``/``ShareGPT4V`` name gives a
  ``CLIPVisionTower(name, args=cfg, **kwargs)`` (here a weightless stand-in that records
  what it was built from), anything else ``ValueError``.
- ``LlavaMetaModel.__init__(config)``: when the config has ``mm_vision_tower`` (a LLaVA
  checkpoint), ``build_vision_tower(config, delay_load=True)`` and the projector.
- ``LlavaMetaModel.initialize_vision_modules(model_args)``: sets
  ``config.mm_vision_tower``; builds the tower from ``model_args`` only if there is none,
  else calls ``tower.load_model()``; then sets ``use_mm_proj``, ``mm_projector_type``,
  ``mm_hidden_size`` (from the tower), ``mm_vision_select_layer``/``_feature``,
  ``mm_patch_merge_type``, and builds the projector if missing. ``image_aspect_ratio`` is
  not among them.
- ``train()``'s order after it: ``tower.to(dtype, device)``,
  ``data_args.image_processor = tower.image_processor``, ``data_args.is_multimodal = True``,
  and only then ``model.config.image_aspect_ratio = data_args.image_aspect_ratio``.
- ``LazySupervisedDataset.__getitem__``: the image branch (here: with clipfeat's edit
  instead of ``Image.open`` + ``processor.preprocess``) and the text-only branch, which puts
  a placeholder in ``data_dict['image']`` when ``data_args.is_multimodal``.
- ``DataCollatorForSupervisedDataset``: pads ``input_ids``/``labels``; when the first
  instance has ``image``, stacks all images into ``batch['images']`` if they all have the
  same shape, else passes the list.
- ``encode_images`` (``tower(images)`` then ``mm_projector``) and
  ``prepare_inputs_labels_for_multimodal``'s use of it: a list or 5-d input is concatenated
  and split, a tensor goes to ``encode_images`` whole; then each sample takes the next
  image feature, a text-only sample included (it splices an empty slice of it).

Lines carrying a ``# clipfeat`` comment are the user's edits; tests check that each one
appears verbatim in docs/reading.md. Nothing else here is clipfeat's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import transformers
from torch import nn

from clipfeat.llava import load_features  # clipfeat

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default="facebook/opt-125m")
    version: Optional[str] = field(default="v0")
    freeze_backbone: bool = field(default=False)
    tune_mm_mlp_adapter: bool = field(default=False)
    vision_tower: Optional[str] = field(default=None)
    mm_vision_select_layer: Optional[int] = field(default=-1)
    pretrain_mm_mlp_adapter: Optional[str] = field(default=None)
    mm_projector_type: Optional[str] = field(default="linear")
    mm_use_im_start_end: bool = field(default=False)
    mm_use_im_patch_token: bool = field(default=True)
    mm_patch_merge_type: Optional[str] = field(default="flat")
    mm_vision_select_feature: Optional[str] = field(default="patch")


@dataclass
class DataArguments:
    data_path: str = field(default=None)
    lazy_preprocess: bool = False
    is_multimodal: bool = False
    image_folder: Optional[str] = field(default=None)
    image_aspect_ratio: str = "square"


@dataclass
class TrainingArguments:
    output_dir: str = field(default="out")
    bf16: bool = False
    fp16: bool = False
    model_max_length: int = 512
    dataloader_num_workers: int = 0
    per_device_train_batch_size: int = 4


class CLIPVisionTowerStandIn(nn.Module):
    """Where LLaVA would build its ``CLIPVisionTower``: records how, holds no weights."""

    def __init__(self, vision_tower, args, delay_load=False):
        super().__init__()
        self.vision_tower_name = vision_tower
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        self.delay_load = delay_load
        self.is_loaded = False
        self.image_processor = None

    def load_model(self):
        self.is_loaded = True

    @property
    def hidden_size(self):
        return 8

    def forward(self, images):
        raise AssertionError("LLaVA's own CLIP tower ran: the store was not used")


def build_vision_tower(vision_tower_cfg, **kwargs):
    from clipfeat.llava import precomputed_vision_tower  # clipfeat
    tower = precomputed_vision_tower(vision_tower_cfg, **kwargs)  # clipfeat
    if tower is not None:  # clipfeat
        return tower  # clipfeat
    vision_tower = getattr(vision_tower_cfg, "mm_vision_tower",
                           getattr(vision_tower_cfg, "vision_tower", None))
    if (os.path.exists(vision_tower) or vision_tower.startswith(("openai", "laion"))
            or "ShareGPT4V" in vision_tower):
        return CLIPVisionTowerStandIn(vision_tower, args=vision_tower_cfg, **kwargs)
    raise ValueError(f"Unknown vision tower: {vision_tower}")


def build_vision_projector(config):
    return nn.Linear(config.mm_hidden_size, config.hidden_size)


class LlavaModel(nn.Module):
    """``LlavaMetaModel`` + the bits of ``LlavaMetaForCausalLM`` that use the tower."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(32, config.hidden_size)
        if hasattr(config, "mm_vision_tower"):
            self.vision_tower = build_vision_tower(config, delay_load=True)
            self.mm_projector = build_vision_projector(config)

    @classmethod
    def from_pretrained(cls, path):
        # a LLaVA checkpoint: its config.json (weights are beside the point here)
        return cls(transformers.PretrainedConfig.from_pretrained(path))

    def get_vision_tower(self):
        return getattr(self, "vision_tower", None)

    def initialize_vision_modules(self, model_args, fsdp=None):
        self.config.mm_vision_tower = model_args.vision_tower
        if self.get_vision_tower() is None:
            self.vision_tower = build_vision_tower(model_args)
        else:
            self.vision_tower.load_model()
        vision_tower = self.vision_tower
        self.config.use_mm_proj = True
        self.config.mm_projector_type = getattr(model_args, "mm_projector_type", "linear")
        self.config.mm_hidden_size = vision_tower.hidden_size
        self.config.mm_vision_select_layer = model_args.mm_vision_select_layer
        self.config.mm_vision_select_feature = model_args.mm_vision_select_feature
        self.config.mm_patch_merge_type = model_args.mm_patch_merge_type
        if getattr(self, "mm_projector", None) is None:
            self.mm_projector = build_vision_projector(self.config)

    def encode_images(self, images):
        image_features = self.get_vision_tower()(images)
        return self.mm_projector(image_features)

    def prepare_inputs_labels_for_multimodal(self, input_ids, images):
        """Per sample, the input embeddings with the image features spliced in."""
        if type(images) is list or images.ndim == 5:
            if type(images) is list:
                images = [x.unsqueeze(0) if x.ndim == 3 else x for x in images]
            concat = torch.cat(list(images), dim=0)
            image_features = self.encode_images(concat)
            split = [image.shape[0] for image in images]
            image_features = [x.flatten(0, 1) for x in torch.split(image_features, split)]
        else:
            image_features = self.encode_images(images)
        out, cur_image_idx = [], 0
        for ids in input_ids:
            n_images = int((ids == IMAGE_TOKEN_INDEX).sum())
            if n_images == 0:
                feats = image_features[cur_image_idx]
                embeds = self.embed_tokens(ids.clamp(min=0))
                out.append(torch.cat([embeds, feats[0:0].to(embeds.dtype)], dim=0))
                cur_image_idx += 1
                continue
            pieces = []
            where = [-1] + torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist() + [len(ids)]
            for j in range(n_images + 1):
                pieces.append(self.embed_tokens(ids[where[j] + 1:where[j + 1]].clamp(min=0)))
                if j < n_images:
                    pieces.append(image_features[cur_image_idx].to(pieces[-1].dtype))
                    cur_image_idx += 1
            out.append(torch.cat(pieces, dim=0))
        return out


def tokenize(sample, has_image):
    """Stands in for ``preprocess``: one image token where LLaVA puts it."""
    text = [7, 8, 9][: 1 + len(sample.get("conversations", [])) % 3]
    ids = [1] + ([IMAGE_TOKEN_INDEX] if has_image else []) + text
    return dict(input_ids=torch.tensor(ids), labels=torch.tensor(ids))


class LazySupervisedDataset(torch.utils.data.Dataset):
    def __init__(self, list_data_dict, data_args):
        self.list_data_dict = list_data_dict
        self.data_args = data_args

    def __len__(self):
        return len(self.list_data_dict)

    def __getitem__(self, i):
        if "image" in self.list_data_dict[i]:
            image = load_features(self.list_data_dict[i], self.data_args)  # clipfeat
        data_dict = tokenize(self.list_data_dict[i], has_image="image" in self.list_data_dict[i])
        if "image" in self.list_data_dict[i]:
            data_dict["image"] = image
        elif self.data_args.is_multimodal:
            data_dict['image'] = load_features(self.list_data_dict[i], self.data_args)  # clipfeat
        return data_dict


def collate(instances):
    """``DataCollatorForSupervisedDataset.__call__`` (pad id 0)."""
    input_ids = nn.utils.rnn.pad_sequence([x["input_ids"] for x in instances],
                                          batch_first=True, padding_value=0)
    labels = nn.utils.rnn.pad_sequence([x["labels"] for x in instances],
                                       batch_first=True, padding_value=IGNORE_INDEX)
    batch = dict(input_ids=input_ids, labels=labels, attention_mask=input_ids.ne(0))
    if "image" in instances[0]:
        images = [x["image"] for x in instances]
        if all(x is not None and x.shape == images[0].shape for x in images):
            batch["images"] = torch.stack(images)
        else:
            batch["images"] = images
    return batch


def train(argv, samples):
    """``train()``'s order, one pass over ``samples``; returns (model, batches, embeds)."""
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if os.path.isdir(model_args.model_name_or_path):
        model = LlavaModel.from_pretrained(model_args.model_name_or_path)
    else:  # a language model with no vision config yet (e.g. vicuna)
        model = LlavaModel(transformers.PretrainedConfig(hidden_size=16))
    model.get_model = lambda: model
    model.get_model().initialize_vision_modules(model_args=model_args, fsdp=None)
    vision_tower = model.get_vision_tower()
    vision_tower.to(dtype=torch.bfloat16 if training_args.bf16 else torch.float16, device="cpu")
    data_args.image_processor = vision_tower.image_processor
    data_args.is_multimodal = True
    model.config.image_aspect_ratio = data_args.image_aspect_ratio
    if training_args.bf16:  # the Trainer (DeepSpeed) runs the whole model in bf16
        model.to(torch.bfloat16)
    loader = torch.utils.data.DataLoader(
        LazySupervisedDataset(samples, data_args), collate_fn=collate,
        batch_size=training_args.per_device_train_batch_size,
        num_workers=training_args.dataloader_num_workers)
    batches, embeds = [], []
    for batch in loader:
        batches.append(batch)
        embeds.append(model.prepare_inputs_labels_for_multimodal(batch["input_ids"],
                                                                 batch["images"]))
    model.config.save_pretrained(training_args.output_dir)  # the checkpoint's config.json
    return model, batches, embeds
