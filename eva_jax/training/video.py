"""Fine-tuning EVA on video (../shared/EVA-SPEC.md "Video: Kinetics fine-tuning").

The video classifier (models/video.py: joint space-time attention over T/t*N patch tokens + cls,
mean pool -> fc_norm -> head) trained with the image fine-tuning's pieces, imported from
training/finetune.py: soft-label cross-entropy (`soft_targets`), the frozen patch embedding
(`trainable`), AdamW + layer decay through task.build, fc_norm from the pretrained `norm`.
`config.init_from`: anything checkpoint.read_encoder reads -- an eva_jax image or video workdir /
checkpoint, a timm or official EVA file. Image weights are inflated (models/video.py
inflate_image_params); a video checkpoint at another frame count or size has its pos-embed
resized trilinearly.

Evaluation runs the multi-view test (data.video.test_clips x test_crops views per video, softmax
scores averaged over views, as the official test) and reports top-1/top-5 of the averaged scores.

`config.video.model='frame_average'` trains the frame-averaged image baseline instead (the image
encoder on each frame, features averaged over frames): the video demo's control.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from eva_jax.data import sources as data_sources, video as video_data
from eva_jax.defaults import finetune_defaults
from eva_jax.models import classifier as clf_lib, video as video_lib
from eva_jax.training import finetune, task as task_lib, trainer
from eva_jax.training.pretrain import student_config

MODELS = ('space_time', 'frame_average')
KIND = 'eva_video_finetune'


def video_finetune_defaults(model: str = 'tiny') -> ml_collections.ConfigDict:
  """Fields of every video fine-tuning config: the image fine-tuning ones plus config.video
  (num_frames, tubelet, model) and config.data.video (data/video.py); remat on (EVA-SPEC:
  activation checkpointing), mixup/cutmix off, RandAugment off (the video recipe's augmentation
  is data.video's colour jitter and grayscale)."""
  c = finetune_defaults(model=model)
  c.video = ml_collections.ConfigDict(dict(
      num_frames=16,            # frames per clip (T)
      tubelet=1,                # frames per token (t); EVA-01/video: 1 (per-frame patches)
      model='space_time',       # space_time | frame_average (the image baseline)
      # std of a random offset per time step added to the inflated pos-embed's patch rows at
      # init from an image checkpoint (0 = the spec's plain repeat; see init_state for when it
      # matters)
      time_noise=0.0,
  ))
  c.model.remat = 'full'        # activation checkpointing per block (4,097 tokens at 16 x 224)
  c.data.source = 'video_demo'
  c.data.video = video_data.video_data_config()
  c.data.randaug = ''
  c.data.mixup, c.data.cutmix = 0.0, 0.0
  c.data.threads = 8
  return c


def _model_factory(cfg, ecfg, num_classes: int):
  v = cfg.video

  def make_model(seed):
    rngs = nnx.Rngs(params=jax.random.key(seed))
    if v.model == 'frame_average':
      return video_lib.FrameAveragedClassifier(ecfg, num_classes,
                                               head_init_scale=cfg.head_init_scale, rngs=rngs)
    return video_lib.VideoClassifier(ecfg, num_classes, num_frames=v.num_frames,
                                     tubelet=v.tubelet, head_init_scale=cfg.head_init_scale,
                                     rngs=rngs)
  return make_model


def multi_view_scores(logits, views: int):
  """[B * V, C] logits -> [B, C] softmax scores averaged over the V views of each video."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
  return probs.reshape(-1, views, probs.shape[-1]).mean(1)


def build(cfg, mesh, num_classes: int, eval_classes: np.ndarray | None = None):
  """(Task, encoder ConfigDict) of the video classifier with soft-label cross-entropy.
  eval_classes: bool [num_classes], the classes evaluation predicts among (None = all; see
  finetune.build)."""
  ecfg = student_config(cfg)
  smoothing = float(cfg.data.label_smoothing)
  make_model = _model_factory(cfg, ecfg, num_classes)

  def loss_fn(model, consts, batch, key):
    targets = finetune.soft_targets(batch['label'], num_classes, smoothing)
    logits = model(batch['video'], dropout_key=key)
    acc = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
    import optax   # pylint: disable=g-import-not-at-top
    return optax.softmax_cross_entropy(logits, targets).mean(), {'train_top1': acc}

  def eval_fn(model, consts, batch):
    clips, labels = batch['video'], batch['label']          # [B, V, T, H, W, C]
    b, views = clips.shape[:2]
    logits = model(clips.reshape((b * views,) + clips.shape[2:]))
    scores = multi_view_scores(
        finetune.restrict_logits(logits, eval_classes), views)
    valid = batch['valid'].astype(jnp.float32)
    top5 = jax.lax.top_k(scores, min(5, num_classes))[1]
    hit1 = (top5[:, 0] == labels).astype(jnp.float32)
    hit5 = jnp.any(top5 == labels[:, None], -1).astype(jnp.float32)
    nll = -jnp.log(jnp.take_along_axis(scores, labels[:, None], 1)[:, 0] + 1e-12)
    return {'loss': jnp.sum(nll * valid), 'top1': jnp.sum(hit1 * valid),
            'top5': jnp.sum(hit5 * valid), 'count': jnp.sum(valid)}

  soft = cfg.data.mixup > 0 or cfg.data.cutmix > 0
  _, template = task_lib.split_abstract(make_model)
  task = task_lib.build(
      cfg, mesh, make_model=make_model, loss_fn=loss_fn, eval_fn=eval_fn,
      batch_ndims={'video': 5, 'label': 2 if soft else 1},
      eval_batch_ndims={'video': 6, 'label': 1, 'valid': 1}, depth=ecfg.depth,
      trainable=finetune.trainable(nnx.to_pure_dict(template), cfg.freeze_patch_embed))
  return task, ecfg


class VideoFinetuneProgram(trainer.Program):
  kind = KIND
  config_kind = 'video'
  init_fields = finetune.FinetuneProgram.init_fields + ('video.time_noise',)

  def validate(self):
    cfg = self.cfg
    v = cfg.video
    if v.model not in MODELS:
      raise ValueError(f'config.video.model={v.model!r} must be one of {MODELS}.')
    video_lib.check_frames(int(v.num_frames), int(v.tubelet))   # names both
    student_config(cfg)   # a bad model name or field, or config.image_size off the patch grid
    if v.model == 'frame_average' and v.tubelet != 1:
      raise ValueError('config.video.model=frame_average encodes single frames: set '
                       f'config.video.tubelet=1 (got {v.tubelet}).')
    self.num_classes = self.classifier_num_classes()   # config.eval_source too, before any step
    if cfg.pool != 'mean':
      raise ValueError(f"config.pool={cfg.pool!r}: the video model mean-pools (EVA-01/video); "
                       "set config.pool='mean'.")

  def build(self, mesh):
    task, self.encoder_cfg = build(self.cfg, mesh, self.num_classes,
                                   self.eval_class_mask(self.num_classes))
    return task

  def open_train_sources(self):
    with data_sources.source_field('config.data.source', self.cfg.data.source):
      return [(video_data.open_video_source(self.cfg.data.source, self.cfg.data), 1.0)]

  def open_eval_source(self, spec):
    return video_data.open_video_source(spec, self.cfg.data)

  def loader(self, train: bool):
    """The video loader: training reads the training source, evaluation config.eval_source (else
    the training source), each opened once."""
    return video_data.build_video_loader(
        self.cfg.data, num_frames=self.cfg.video.num_frames, image_size=self.cfg.image_size,
        batch_size=trainer.per_host_batch(self.cfg), seed=self.cfg.seed, train=train,
        num_classes=self.num_classes,
        records=(self.train_sources() if train else self.eval_sources())[0][0])

  def train_loader(self, task):
    return self.loader(train=True)

  def init_state(self, task):
    cfg = self.cfg
    if not cfg.init_from:
      return task.init(cfg.seed)
    ecfg = self.encoder_cfg
    w = finetune.read_init_encoder(cfg, ecfg)
    if w.config.get('patch_size', ecfg.patch_size) != ecfg.patch_size:
      raise ValueError(f'config.init_from has patch size {w.config["patch_size"]} but the video '
                       f'config has model.patch_size={ecfg.patch_size}; set '
                       f'--config.model.patch_size={w.config["patch_size"]} (or the matching '
                       'model name).')
    finetune.check_init_architecture(w.config, ecfg, 'video')
    # Compiled only now: a file that does not fit the config fails before the whole-model init.
    state = task.init(cfg.seed)
    params = jax.tree.map(np.asarray, jax.device_get(state.params))
    p, v = ecfg.patch_size, cfg.video
    grid_to = ecfg.image_size // p
    if w.meta.get('kind') == KIND:    # a video checkpoint: same tubelet, pos-embed resized
      src = w.meta
      if src['tubelet'] != v.tubelet or v.model != 'space_time':
        raise ValueError(f'config.init_from is a video model with tubelet {src["tubelet"]}; '
                         f'this run has tubelet {v.tubelet} and model {v.model!r}.')
      g = w.config['image_size'] // p
      enc = video_lib.resize_video_params(
          dict(w.params),
          old_thw=(src['num_frames'] // src['tubelet'], g, g),
          new_thw=(v.num_frames // v.tubelet, grid_to, grid_to))
      dropped = []
    elif v.model == 'space_time':
      enc, dropped = video_lib.inflate_image_params(
          w.params, w.config, patch_size=p, num_frames=v.num_frames, tubelet=v.tubelet,
          image_size=ecfg.image_size)
      if v.get('time_noise', 0.0) > 0:
        # The inflated pos-embed is the same at every time step, so the model starts blind to
        # frame order; where appearance carries no label (the demo), gradients keep it so (every
        # time step sees the same frame distribution). One random offset per time step, the
        # same for every patch of that step, breaks the tie and leaves the spatial part intact.
        rng = np.random.default_rng(cfg.seed)
        n = grid_to * grid_to
        offsets = rng.normal(0.0, v.time_noise, (v.num_frames // v.tubelet, ecfg.width))
        enc['pos_embed'][1:] += np.repeat(offsets, n, 0).astype(np.float32)
    else:   # the frame-averaged baseline is an image classifier: the image fine-tuning's loader
      g = w.config.get('image_size', 224) // p
      enc, dropped = finetune.pretrained_into(task.abstract_state.params, w.params,
                                              grid_from=(g, g), grid_to=(grid_to, grid_to))
    from eva_jax.convert import common
    want = {k: tuple(a.shape) for k, a in common.flatten(task.abstract_state.params['encoder']).items()}
    got = {k: np.shape(x) for k, x in common.flatten(enc).items()}
    bad = sorted(f'{k}: {got.get(k)} vs {s}' for k, s in want.items() if got.get(k) != s)
    enc = common.unflatten({k: x for k, x in common.flatten(enc).items() if k in want})
    if bad:
      raise ValueError(f'config.init_from ({w.source}) does not fit the video encoder: {bad}; '
                       'is it the same architecture?')
    params['encoder'] = jax.tree.map(lambda x: np.asarray(x, np.float32), enc)
    self.init_heads, dropped = finetune.classifier_heads(params, w, cfg.fc_norm_from_norm,
                                                         dropped)
    self.init_source = w.source
    print(f'Initialized the video encoder ({v.model}, {v.num_frames} frames, tubelet '
          f'{v.tubelet}) from {w.source} ({finetune.heads_note(self.init_heads)}not used: '
          f'{", ".join(dropped) or "nothing"}).', flush=True)
    return task.with_params(state, jax.tree.map(jax.device_put, params, task.param_shardings))

  def evaluate(self, task, state, consts, step):
    cfg = self.cfg
    mask = self.eval_class_mask(self.num_classes)
    rec = finetune.eval_top_k(task, state, consts, self.loader(train=False), cfg.eval_batches,
                              'video')
    v = cfg.data.video
    if jax.process_index() == 0:
      print(f"step {step} eval top1 {rec['eval_top1']:.4f} top5 {rec['eval_top5']:.4f} on "
            f"{rec['eval_count']}{self.eval_split_note()} videos{finetune.skipped_note(rec)} "
            f"({v.test_clips} clips x "
            f"{v.test_crops} crops)"
            f"{finetune.classes_note(mask)}", flush=True)
    return rec

  def meta(self, task):
    v = self.cfg.video
    return {'kind': self.kind, 'num_classes': self.num_classes, 'pool': 'mean',
            'num_frames': int(v.num_frames), 'tubelet': int(v.tubelet), 'video_model': v.model,
            'student': clf_lib.finetune_encoder_config(self.encoder_cfg).to_dict()}

  def resolved(self, task):
    return {'encoder': self.encoder_cfg.to_dict(), 'num_classes': self.num_classes,
            'tokens': 1 + self.cfg.video.num_frames // self.cfg.video.tubelet
            * (self.encoder_cfg.image_size // self.encoder_cfg.patch_size) ** 2}


def train(cfg, workdir: str) -> dict:
  """Runs (or resumes) video fine-tuning in `workdir`; returns the last logged metrics."""
  return trainer.run(VideoFinetuneProgram(cfg), workdir)
