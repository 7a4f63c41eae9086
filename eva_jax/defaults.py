"""Default fields of every pretraining config; files in configs/ start from these and override.

Kept as a plain function returning a ConfigDict (big_vision style) so any field can be overridden
on the command line: --config.batch_size=8 --config.mesh.fsdp=-1.
"""
from __future__ import annotations

import ml_collections

from eva_jax.data.config import default_data_config, image_size_field
from eva_jax.models.config import model_section


def pretrain_defaults(model: str = 'tiny', teacher: str = 'clip-tiny') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 100
  c.batch_size = 32            # global batch over all hosts
  # An int (square), or for fine-tuning and probes (height, width) / 'HxW' from the command line
  # (--config.image_size=224x336); image_size_field lets the field take either form.
  c.image_size = image_size_field(224)
  c.precision = 'fp32'         # fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling)
  c.log_every = 10
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.eval_every = 0             # 0 = only at the end; eval uses the spec's deterministic mask
  c.eval_batches = 2
  c.progress = True            # progress bar on a TTY, plain lines otherwise
  # A resume must match its checkpoint's metadata (resolved student/teacher, teacher weights
  # fingerprint, class count, ...; training/resume.py). Fields listed here may differ on purpose:
  # a field ('teacher_fingerprint'), a section ('student' = student.*) or '*'. Shapes must match.
  c.resume_accept = ()
  # Divergence (training/loop.py Divergence): stop after this many consecutive non-finite losses
  # (fp16: or skipped updates at the minimum loss scale; fp32/bf16 stop at the first), or after
  # spike_patience steps in a row whose loss exceeds the median of the last spike_window by
  # spike_factor x their median absolute deviation (0 = no spike test), or when a save finds the
  # parameter norm grown over max_norm_growth x that of the start or the previous save (0 = off).
  # No checkpoint is written while such a streak is under way.
  c.divergence = ml_collections.ConfigDict(dict(
      max_nonfinite_steps=5, spike_factor=10.0, spike_window=50, spike_patience=5,
      max_norm_growth=10.0))

  # The architecture name plus overrides only (models/config.py model_section): any encoder field
  # may be set, --config.model.drop_path=0.2; --config.model.name picks another architecture.
  c.model = model_section(model, drop_path=0.1)

  c.teacher = ml_collections.ConfigDict()
  # What the teacher is; docs/teachers.md has the families, layouts and targets.
  c.teacher.family = 'clip'         # clip | eva_clip | siglip | dinov2: what the checkpoint holds
  c.teacher.name = teacher          # architecture of a random-init teacher when checkpoint is empty
  c.teacher.checkpoint = ''         # file or directory of a tower of config.teacher.family
  c.teacher.shard = 'replicate'     # replicate | fsdp (shard the frozen teacher like the student)
  c.teacher.precision = ''          # '' = same as precision
  # Architecture facts a file may not record (never guessed: the load is refused naming them):
  c.teacher.arch = ''               # '' = from the file; else a named architecture (TEACHER_NAMES)
                                    #   the checkpoint must match, whose facts fill the gaps
  c.teacher.act = ''                # '' = from the file; else 'gelu' | 'quick_gelu' | 'gelu_tanh'
  c.teacher.heads = 0               # 0 = from the file; else the attention head count
  # An empty checkpoint means a RANDOM-INIT teacher, whose targets teach nothing: refused unless a
  # demo or test opts in here (issue 12 L). The run then prints a banner and records it.
  c.teacher.allow_random_init = False
  c.teacher.target = ''             # '' = the family's; 'projected' | 'tokens' (drop the projection)
  # How the teacher meets the student (eva_jax/models/teacher.py):
  c.teacher.grid = 'same'           # same | resize_input | resize_targets (teacher patch grid !=
                                    #   the student's)
  c.teacher.mean = ()               # () = the family's input normalization (CLIP, SigLIP 0.5,
  c.teacher.std = ()                #   DINOv2 ImageNet); the batch is re-normalized from data.mean/std

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, min_lr=1e-5, warmup_steps=10, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05,
      clip_norm=3.0, layer_decay=1.0))
  c.sharding_rules = ()             # (logical axis, mesh axes) pairs tried before parallel.LOGICAL_RULES
  c.loss_scale = ml_collections.ConfigDict(dict(
      initial=2.0 ** 16, growth_interval=500, hysteresis=2, min_scale=1.0))

  # layout 'flat': sizes over all devices; 'hybrid': sizes within each host, data repeated
  # across hosts (parallel.make_mesh).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, layout='flat'))
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator='', num_processes=1, process_id=0, auto=True))
  c.data = default_data_config()
  return c


def finetune_defaults(model: str = 'tiny') -> ml_collections.ConfigDict:
  """Fields of every fine-tuning config (eva_jax.finetune)."""
  c = pretrain_defaults(model=model)
  del c.teacher
  del c.loss_scale
  c.loss_scale = ml_collections.ConfigDict(dict(
      initial=2.0 ** 16, growth_interval=500, hysteresis=2, min_scale=1.0))
  c.init_from = ''              # pretraining workdir/checkpoint, or timm/official EVA file; '' = random
  # Which weights of init_from (eva_jax runs with ema_decay > 0 and official training files hold
  # two): 'auto' = the EMA if any (the evaluated ones), 'raw' / 'model', 'ema' / 'model_ema'.
  c.init_from_weights = 'auto'
  c.num_classes = 0             # 0 = from the labeled source
  c.pool = 'mean'               # mean-pool patch tokens -> fc_norm -> head (EVA); 'token' = cls
  c.head_init_scale = 0.001
  c.fc_norm_from_norm = True    # init fc_norm from the pretrained `norm` (timm's checkpoint filter)
  c.freeze_patch_embed = True   # EVA fine-tuning keeps the patch embedding fixed
  # init_from of another patch size than model.patch_size: the kernel is resampled ('pinv' =
  # FlexiViT / timm resample_patch_embed, 'bicubic' = official interpolate_patch_14to16.py).
  c.patch_resample = 'pinv'
  c.ema_decay = 0.0             # > 0: EMA of the weights, used for evaluation
  c.eval_source = ''            # '' = config.data.source
  # True: evaluate init_from's weights (fc_norm and head included) once on the evaluation source
  # and train nothing; writes WORKDIR/eval.json (the official run_class_finetuning.py --eval).
  c.eval_only = False
  c.eval_every = 0
  c.eval_batches = 0            # 0 = the whole eval split
  c.model.drop_path = 0.4
  c.optim.update(dict(lr=1e-4, min_lr=1e-6, warmup_steps=10, b1=0.9, b2=0.98, eps=1e-6,
                      weight_decay=0.05, clip_norm=0.0, layer_decay=0.85))
  c.data.label_smoothing = 0.1
  c.data.finetune_scale = (0.5, 1.0)
  return c


def linear_probe_defaults() -> ml_collections.ConfigDict:
  """Fields of eva_jax.linear_probe configs."""
  return ml_collections.ConfigDict(dict(
      init_from='',          # pretraining / fine-tuning workdir or checkpoint folder
      weights='auto',        # auto = the EMA when init_from has one (the evaluated weights), raw, ema
      pool='mean',           # 'mean' of patch tokens or 'token' (cls)
      image_size=image_size_field(0),   # 0 = the encoder's own; int, (h, w) or 'HxW'
      batch_size=64, seed=0,
      eval_source='',        # '' = a stratified hold-out of config.data.source
      holdout=0.25,
      epochs=100, lr=1e-3, weight_decay=0.0, probe_batch_size=256,
      knn_k=20, knn_temperature=0.07,
      data=default_data_config()))


MERGED30M_IMAGES = 29_600_000   # the paper's count of merged-30M


def merged30m_pretrain(model: str, teacher: str, *, precision: str, batch_size: int, lr: float,
                       epochs: int = 150, warmup_epochs: int = 2,
                       images: int = MERGED30M_IMAGES) -> ml_collections.ConfigDict:
  """The paper's pretraining recipe on merged-30M for any student/teacher pair: AdamW
  (0.9, 0.98, 1e-6, wd 0.05), warmup then per-step cosine to 1e-5, clip 3.0, drop path 0.1,
  data parallel over every chip (configs override the mesh for FSDP)."""
  from eva_jax.data.config import merged30m_mixture
  c = pretrain_defaults(model=model, teacher=teacher)
  c.precision = precision
  c.batch_size = batch_size
  steps_per_epoch = images // batch_size
  c.total_steps = epochs * steps_per_epoch
  c.optim.warmup_steps = warmup_epochs * steps_per_epoch
  c.optim.lr, c.optim.min_lr = lr, 1e-5
  c.model.drop_path = 0.1
  c.log_every, c.checkpoint_every = 100, 2000
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  c.data.mixture = merged30m_mixture()
  c.data.source = ''
  c.data.workers = 16
  return c


def finetune_recipe(model: str, *, images: int, image_size: int, batch_size: int, epochs: int,
                    warmup_epochs: int, lr: float, min_lr: float, betas: tuple[float, float],
                    eps: float, layer_decay: float, drop_path: float,
                    precision: str = 'fp16') -> ml_collections.ConfigDict:
  """The shape shared by the paper's ImageNet fine-tuning stages (EVA-SPEC "ImageNet fine-tuning"):
  epochs and warmup counted in steps of `images // batch_size`, AdamW with weight decay 0.05 and
  layer decay, FSDP over each host's chips and data parallel across hosts (mesh.layout 'hybrid',
  parallel.make_mesh); the configs set data, augmentation and EMA per stage."""
  c = finetune_defaults(model=model)
  c.precision = precision
  c.image_size = image_size
  c.batch_size = batch_size
  steps_per_epoch = images // batch_size
  c.total_steps = epochs * steps_per_epoch
  c.optim.update(dict(lr=lr, min_lr=min_lr, warmup_steps=warmup_epochs * steps_per_epoch,
                      b1=betas[0], b2=betas[1], eps=eps, weight_decay=0.05,
                      layer_decay=layer_decay))
  c.model.drop_path = drop_path
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.mesh.layout = 'hybrid'   # FSDP within each host, data across hosts (docs/speed.md 2)
  c.data.workers = 16
  return c


def clip_defaults(model: str = 'eva-clip-tiny') -> ml_collections.ConfigDict:
  """Fields of every contrastive image-text (EVA-CLIP) config (eva_jax.training.clip).

  config.model: the CLIP model name (models/clip.py CLIP_NAMES) and CLIP-level fields;
  config.vision / config.text: overrides of the named towers' fields (None = the named model's;
  image size and dtype are the run's: config.image_size, config.precision).
  """
  from ml_collections import config_dict
  from eva_jax.models import clip as clip_lib
  c = pretrain_defaults()
  del c.teacher
  c.model = ml_collections.ConfigDict(dict(
      name=model,
      pool='token',            # 'token' (EVA-CLIP: head(norm(x)[:, 0])) | 'avg'
      patch_dropout=0.0,       # FLIP: share of patch tokens dropped in training (EVA-CLIP g: 0.5)
      remat='none'))           # none | full | dots | dots_no_batch (both towers)
  template = clip_lib.clip_config(model)
  c.vision = ml_collections.ConfigDict(
      {k: config_dict.placeholder(type(v)) for k, v in template.vision.items()
       if k not in ('name', 'image_size', 'dtype', 'remat') and v is not None
       and not isinstance(v, (tuple, list, dict, ml_collections.ConfigDict))})
  c.text = ml_collections.ConfigDict(
      {k: config_dict.placeholder(type(v)) for k, v in template.text.items()
       if k not in ('name', 'dtype', 'remat')})
  c.loss = 'clip'              # clip (InfoNCE, gather-with-grad + local loss) | siglip
  c.init = ml_collections.ConfigDict(dict(
      image='',                # eva_jax MIM / fine-tuning workdir or checkpoint, timm / official EVA
                               #   file ('' = random init); lm_head, mask_token, head skipped
      image_weights='auto',    # auto (EMA if kept) | raw | ema
      patch_resample='bicubic',  # an image tower of another patch size: bicubic (official
                               #   interpolate_patch_14to16, EVA02-CLIP-B/16) | pinv (FlexiViT)
      text='',                 # transformers CLIP dir, OpenAI .pt, open_clip file ('' = random)
  ))
  c.optim = ml_collections.ConfigDict(dict(
      name='lamb', lr=5e-4, min_lr=0.0, warmup_steps=10, b1=0.9, b2=0.98, eps=1e-6,
      weight_decay=0.05, clip_norm=5.0, layer_decay=1.0,
      towers=ml_collections.ConfigDict(dict(
          visual=ml_collections.ConfigDict(dict(lr=4e-4, weight_decay=0.05, layer_decay=0.85)),
          text=ml_collections.ConfigDict(dict(lr=4e-5, weight_decay=0.05, layer_decay=0.75))))))
  c.eval = ml_collections.ConfigDict(dict(
      zero_shot='demo:val',    # labelled image folder (class sub-folders): folder:DIR, demo:val; '' = off
      classnames='',           # '' = the demo's names (demo) or the folder names; 'imagenet'
      templates='demo',        # demo | openai | simple (open_clip's ImageNet prompts)
      retrieval='demo:val',    # image-text pairs (a caption file's lines = that image's captions); '' = off
      batch_size=32,           # images / prompts per encoder call
      limit=0,                 # > 0: at most this many retrieval pairs
  ))
  c.eval_every = 0             # 0 = only at the end
  c.data.source = 'demo:train'
  c.data.workers = 0
  return c


def eva_clip_recipe(model: str, *, batch_size: int, samples: float, lr: float, visual_lr: float,
                    text_lr: float, visual_ld: float, text_ld: float, patch_dropout: float,
                    warmup_steps: int = 2000, weight_decay: float = 0.05, clip_norm: float = 5.0,
                    precision: str = 'fp16') -> ml_collections.ConfigDict:
  """The shape of the official EVA-CLIP pre-training runs (EVA-SPEC "EVA-CLIP"; baaivision/EVA
  EVA-CLIP/README.md "Pre-training" scripts, rei/training/main.py): LAMB, betas (0.9, 0.98), eps
  1e-6 (open_clip's ViT defaults), per-tower lr / wd / layer decay, grad clip 5.0, 2000 warmup
  steps then cosine to 0, fp16, grad checkpointing, gather-with-grad + local loss, FSDP over every
  chip (the official DeepSpeed ZeRO stage 1). `samples`: images seen (total_steps = samples /
  batch_size, rounded)."""
  c = clip_defaults(model=model)
  c.precision = precision
  c.image_size = 224
  c.batch_size = batch_size
  c.total_steps = int(round(samples / batch_size))
  c.loss = 'clip'
  c.model.patch_dropout = patch_dropout
  c.model.remat = 'full'                  # --grad-checkpointing
  c.optim.update(dict(name='lamb', lr=lr, min_lr=0.0, warmup_steps=warmup_steps, b1=0.9,
                      b2=0.98, eps=1e-6, weight_decay=weight_decay, clip_norm=clip_norm))
  c.optim.towers.visual.update(dict(lr=visual_lr, weight_decay=weight_decay,
                                    layer_decay=visual_ld))
  c.optim.towers.text.update(dict(lr=text_lr, weight_decay=weight_decay, layer_decay=text_ld))
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.mesh.layout = 'hybrid'   # FSDP within each host, data across hosts (docs/speed.md 2)
  c.data.source = ''                      # set: webdataset:/path/{000000..164090}.tar, or a mixture
  c.data.workers = 8                      # --workers=8
  c.log_every, c.checkpoint_every = 100, 2000
  c.eval_every = 5000
  c.eval.zero_shot = ''                   # set: folder:/path/to/imagenet/val (class folders)
  c.eval.classnames = 'imagenet'
  c.eval.templates = 'openai'             # open_clip's 80 ImageNet prompts, as EVA-CLIP evaluates
  c.eval.retrieval = ''                   # e.g. webdataset:/path/to/coco_5k_test.tar
  c.eval.batch_size = 256
  c.seed = 4096                           # --seed 4096
  return c
